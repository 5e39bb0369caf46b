"""The bundle on disk: a versioned manifest, the nets, their weight files and `config/`.

    <bundle>/manifest.json     format, version, source, target, options, model facts, nets + I/O, checksums
    <bundle>/<net>.onnx        one graph per stage (vision, embedding, decoder, greedy_head, sample_head)
    <bundle>/<net>.data        its weights (page-aligned external data, memory-mapped when loaded)
    <bundle>/config/           tokenizer, generation_config.json and the checkpoint's original configs

A bundle is written into a temporary folder beside the destination and renamed into place at the
end, so a failed or interrupted conversion never leaves a half-written bundle. Loading checks the
format name, the version and every file's size and SHA-256; the hash of an unchanged file is not
recomputed on later loads (a stamp of size, mtime and inode in the user's cache folder).

The manifest's `model`, `options` and `target` sections are parsed once, when the manifest is made or
loaded, into `ModelFacts`, `BundleOptions` and `Target` (`manifest.facts`, `.settings`, `.platform`);
backends, the API, bench and verify read those rather than the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

from .errors import UserError
from .version import __version__

MANIFEST = "manifest.json"
FORMAT_NAME = "internvl-edge-bundle"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


@dataclass(frozen=True)
class ModelFacts:
    """The manifest's `model`: what the converter read from the checkpoint's configs."""

    name: str
    template: str  # the chat template's name (prompt.TEMPLATES)
    tokens: dict  # special token ids: img_context, img_start, img_end, eos [...]
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: int  # one tile's side in pixels (448)
    num_image_token: int  # image embeddings per tile (256)

    @classmethod
    def from_json(cls, model: dict) -> ModelFacts:
        return cls(
            name=str(model["name"]),
            template=str(model["template"]),
            tokens=dict(model["tokens"]),
            hidden_size=int(model["hidden_size"]),
            num_layers=int(model["num_layers"]),
            num_kv_heads=int(model["num_kv_heads"]),
            head_dim=int(model["head_dim"]),
            vocab_size=int(model["vocab_size"]),
            image_size=int(model["image_size"]),
            num_image_token=int(model["num_image_token"]),
        )


@dataclass(frozen=True)
class BundleOptions:
    """The manifest's `options`: the convert options as resolved, the ones the run side reads."""

    quantize: str  # w4bf16 | w4f16 | bf16 | f16 | f32
    store: str  # the float type of weights kept in float: bf16 | f16 | f32
    dynamic: bool  # shapes follow the input; else every prefill is padded to max_input_length rows
    seq_length: int  # the most tokens a sequence holds
    max_input_length: int  # the most rows one prefill call takes
    max_prefill_kv_length: int  # the history a prefill may attend to (use_block_with_kv)
    kv_capacity: int  # rows of the CPU decoder's KV buffers (seq_length + room for a padded chunk)
    max_tiles: int  # the default tiles per image
    use_block_with_kv: bool  # a later turn prefills after the history kept as KV cache
    do_sample: bool  # the bundle has a sampling head
    q_group_size: int
    decoder_weight_bits: int  # 4, or 0 for float decoder linears
    lm_head_bits: int  # 8, 4 or 0 (float)
    vision_bits: int  # 8 or 0 (float)
    accuracy_level: int  # MatMulNBits: 4 = int8 activations, 1 = float

    @classmethod
    def from_json(cls, o: dict) -> BundleOptions:
        seq_length, max_input_length = int(o["seq_length"]), int(o["max_input_length"])
        return cls(
            quantize=str(o["quantize"]),
            store=str(o.get("store", "f32")),
            dynamic=bool(o.get("dynamic", False)),
            seq_length=seq_length,
            max_input_length=max_input_length,
            max_prefill_kv_length=int(o.get("max_prefill_kv_length") or seq_length),
            kv_capacity=int(o.get("kv_capacity") or seq_length + max_input_length),
            max_tiles=int(o.get("max_tiles", 4)),
            use_block_with_kv=bool(o.get("use_block_with_kv", False)),
            do_sample=bool(o.get("do_sample", False)),
            q_group_size=int(o.get("q_group_size") or 0),
            decoder_weight_bits=int(o.get("decoder_weight_bits") or 0),
            lm_head_bits=int(o.get("lm_head_bits") or 0),
            vision_bits=int(o.get("vision_bits") or 0),
            accuracy_level=int(o.get("accuracy_level", 4)),
        )


@dataclass(frozen=True)
class Target:
    """The manifest's `target`: which chip the bundle was built for and which backend runs it."""

    chip: str  # cpu | bm1684x | bm1688
    backend: str | None  # onnxruntime | bmrt (backends/)
    bmodel: str | None = None  # Sophgo: the combined bmodel's file in the bundle

    @classmethod
    def from_json(cls, target: dict) -> Target:
        return cls(chip=str(target.get("chip", "cpu")), backend=target.get("backend"), bmodel=target.get("bmodel"))

    @property
    def is_cpu(self) -> bool:
        return self.backend == "onnxruntime"


@dataclass
class Manifest:
    """manifest.json. `source`, `target`, `options` and `model` are its sections as written; `facts`,
    `settings` and `platform` are the last three parsed (made with the manifest, not written)."""

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
    facts: ModelFacts = field(init=False, repr=False, compare=False)
    settings: BundleOptions = field(init=False, repr=False, compare=False)
    platform: Target = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.facts = ModelFacts.from_json(self.model)
        self.settings = BundleOptions.from_json(self.options)
        self.platform = Target.from_json(self.target)

    def to_json(self) -> str:
        d = asdict(self)
        for derived in ("path", "facts", "settings", "platform"):
            d.pop(derived)
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
        found = raw.get("format") if isinstance(raw, dict) else None
        raise UserError(f"{mpath} is not an internvl-edge manifest (format {found!r})")
    version = raw.get("version")
    if version not in SUPPORTED_VERSIONS:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise UserError(
                f"bundle format version {version} is newer than this internvl-edge reads ({FORMAT_VERSION}); "
                "upgrade internvl-edge"
            )
        raise UserError(
            f"bundle format version {version!r} is not supported (this internvl-edge reads {FORMAT_VERSION}); "
            "convert again"
        )
    extra = {"created_by": raw.get("created_by", ""), "created_at": raw.get("created_at", "")}
    try:
        sections = {k: raw[k] for k in ("source", "target", "options", "model", "nets", "files")}
        m = Manifest(**sections, **extra, verification=raw.get("verification") or {})
    except KeyError as e:  # a section, or an entry the model facts and options need
        raise UserError(f"{mpath} lacks {e}; convert again") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{mpath} has a malformed entry ({e}); convert again") from None
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
