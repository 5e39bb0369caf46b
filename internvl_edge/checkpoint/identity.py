"""A checkpoint's identity: the hash of its config.json and a checksum of every tensor's stored bytes.

`convert` records it in the bundle's manifest (`source.identity`), so that `verify` can refuse a
checkpoint that is not the bundle's source with one line naming what differs, instead of reporting
the differences between two unrelated models as conversion losses. The checksums are over the bytes
as stored (dtype, shape and data of each tensor under its file's name), so the same weights written
in another format or precision count as another checkpoint: the reference must be the very source.
"""

from __future__ import annotations

import hashlib
import os

from ..errors import UserError
from .reader import Checkpoint

CHUNK = 64 * 1024 * 1024  # hash large tensors piecewise, so no copy of them is made


def config_hash(model_dir: str) -> str:
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tensor_checksums(ckpt: Checkpoint, progress=None) -> dict[str, str]:
    """{tensor name as stored: 16 hex digits of its blake2b} for every tensor of every shard."""
    out = {}
    names = sorted(ckpt._key_file)
    for i, name in enumerate(names):
        raw = ckpt._file(ckpt._key_file[name]).get(name)
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{raw.dtype}{list(raw.shape)}".encode())
        flat = raw.data.reshape(-1).view("uint8")
        for start in range(0, flat.size, CHUNK):
            h.update(memoryview(flat[start : start + CHUNK]))
        out[name] = h.hexdigest()
        del raw, flat
        ckpt.release()  # the pages read so far leave this process's memory
        if progress:
            progress(i + 1, len(names))
    return out


def identity(ckpt: Checkpoint, progress=None) -> dict:
    return {"config_sha256": config_hash(ckpt.model_dir), "tensors": tensor_checksums(ckpt, progress)}


def check_source(recorded: dict | None, ckpt: Checkpoint, bundle_path: str, progress=None) -> bool:
    """Raise a one-line UserError when `ckpt` is not the checkpoint the bundle was converted from.
    Returns False when the bundle records no identity (converted by an older internvl-edge)."""
    if not recorded:
        return False
    where = f"{ckpt.model_dir} is not the checkpoint {bundle_path} was converted from"
    if config_hash(ckpt.model_dir) != recorded.get("config_sha256"):
        raise UserError(f"{where} (its config.json differs); pass the bundle's source checkpoint")
    mine, theirs = tensor_checksums(ckpt, progress), recorded.get("tensors", {})
    missing = sorted(set(theirs) - set(mine))
    extra = sorted(set(mine) - set(theirs))
    if missing or extra:
        what = f"it lacks tensor {missing[0]}" if missing else f"it has tensor {extra[0]} the source had not"
        raise UserError(f"{where} ({what}); pass the bundle's source checkpoint")
    changed = [n for n in sorted(theirs) if mine[n] != theirs[n]]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise UserError(f"{where} (tensor {changed[0]}{more} differ); pass the bundle's source checkpoint")
    return True
