"""The bundle on disk: a versioned manifest, the nets, their weight files and `config/`.

    <bundle>/manifest.json     format, version, source, target, options, model facts, nets + I/O, checksums
    <bundle>/<net>.onnx        one graph per stage (vision, embedding, decoder, greedy_head, sample_head)
    <bundle>/<net>.data        its weights (page-aligned external data, memory-mapped when loaded)
    <bundle>/config/           tokenizer, generation_config.json and the checkpoint's original configs

A bundle is written into a temporary folder beside the destination and renamed into place at the
end, so a failed or interrupted conversion never leaves a half-written bundle. Loading checks the
format name, the version and every file's size and SHA-256; the hash of an unchanged file is not
recomputed on later loads (a stamp of size, mtime and inode in the user's cache folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

from . import __version__
from .errors import UserError

MANIFEST = "manifest.json"
FORMAT_NAME = "internvl-edge-bundle"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


@dataclass
class Manifest:
    source: dict
    target: dict
    options: dict
    model: dict
    nets: dict
    files: dict = field(default_factory=dict)
    # `convert --verify`'s summary (verify.py); the manifest is outside the checksummed files, so adding
    # it later leaves every checksum true
    verification: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    created_by: str = f"internvl-edge {__version__}"
    created_at: str = ""
    path: str = ""  # where it was loaded from (not written)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("path")
        return json.dumps(d, indent=2, ensure_ascii=False)

    def net_path(self, name: str) -> str:
        return os.path.join(self.path, self.nets[name]["file"])

    @property
    def config_dir(self) -> str:
        return os.path.join(self.path, "config")

    @property
    def weight_bytes(self) -> int:
        """Bytes of the nets' weights (what a load has to bring into memory)."""
        return sum(self.files[n["data"]]["bytes"] for n in self.nets.values() if n.get("data"))


def sha256_file(path: str, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_table(root: str) -> dict:
    """{relative path: {bytes, sha256}} for every file under root except the manifest."""
    table = {}
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel == MANIFEST:
                continue
            table[rel] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
    return dict(sorted(table.items()))


def staging_dir(out_dir: str) -> str:
    """A fresh temporary folder on the same filesystem as out_dir (so the final rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the bundle gets the usual permissions
    return tmp


def check_destination(out_dir: str) -> None:
    """Refuse to replace anything that is not a bundle (a user's folder must never be deleted)."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} exists and is not a folder")
    if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        raise UserError(f"--out_dir {out_dir} exists and is not an internvl-edge bundle; choose another folder")


def finish(tmp: str, manifest: Manifest, out_dir: str) -> None:
    """Checksum everything, write the manifest, then move the staged bundle into place."""
    manifest.files = file_table(tmp)
    manifest.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    check_destination(out_dir)
    if os.path.exists(out_dir):
        old = tmp + ".old"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def write_manifest(manifest: Manifest) -> None:
    """Rewrite a finished bundle's manifest in place (temporary file, then rename)."""
    path = os.path.join(manifest.path, MANIFEST)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
    os.replace(tmp, path)


# -- loading ----------------------------------------------------------------------------------------
def user_cache_dir() -> str:
    """The user's cache folder for this project (XDG's rule): verified-bundle stamps, the ORT graph
    cache, the TPU-MLIR toolchain."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "internvl-edge")


def _stamp_path() -> str:
    return os.path.join(user_cache_dir(), "verified.json")


def _file_key(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_stamps() -> dict:
    try:
        with open(_stamp_path(), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_stamps(stamps: dict) -> None:
    path = _stamp_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stamps, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-hashing next time


def load_manifest(path: str, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest and files; every failure is a one-line UserError."""
    if not os.path.exists(path):
        raise UserError(f"bundle not found: {path}")
    if os.path.isfile(path):
        raise UserError(f"{path} is a file; pass the bundle folder written by `internvl-edge convert`")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise UserError(f"{path} is not an internvl-edge bundle (no {MANIFEST}); convert a checkpoint first")
    try:
        with open(mpath, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{mpath} is damaged ({e}); convert again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise UserError(
            f"{mpath} is not an internvl-edge manifest (format {raw.get('format') if isinstance(raw, dict) else None!r})"
        )
    version = raw.get("version")
    if version not in SUPPORTED_VERSIONS:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise UserError(
                f"bundle format version {version} is newer than this internvl-edge reads ({FORMAT_VERSION}); upgrade internvl-edge"
            )
        raise UserError(
            f"bundle format version {version!r} is not supported (this internvl-edge reads {FORMAT_VERSION}); convert again"
        )
    try:
        m = Manifest(**{k: raw[k] for k in ("source", "target", "options", "model", "nets", "files")},
                     created_by=raw.get("created_by", ""), created_at=raw.get("created_at", ""),
                     verification=raw.get("verification") or {})  # fmt: skip
    except (KeyError, TypeError) as e:
        raise UserError(f"{mpath} lacks {e}; convert again") from None
    m.path = os.path.abspath(path)
    if verify:
        verify_files(m)
    return m


def verify_files(m: Manifest) -> None:
    stamps = _read_stamps()
    key = m.path
    known = stamps.get(key, {}).get("files", {})
    fresh: dict[str, list] = {}
    changed = False
    for rel, meta in m.files.items():
        full = os.path.join(m.path, rel)
        if not os.path.isfile(full):
            raise UserError(f"bundle {m.path} is damaged: {rel} is missing; convert again")
        fkey = _file_key(full)
        if fkey[0] != meta["bytes"]:
            raise UserError(
                f"bundle {m.path} is damaged: {rel} has {fkey[0]} bytes, expected {meta['bytes']}; convert again"
            )
        if known.get(rel) == fkey + [meta["sha256"]]:
            fresh[rel] = known[rel]
            continue
        if sha256_file(full) != meta["sha256"]:
            raise UserError(f"bundle {m.path} is damaged: {rel} fails its checksum; convert again")
        fresh[rel] = fkey + [meta["sha256"]]
        changed = True
    if changed or set(fresh) != set(known):
        stamps[key] = {"files": fresh}
        _write_stamps(stamps)
