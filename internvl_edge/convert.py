"""Checkpoint folder -> bundle: read, build each net, copy the configs, checksum, rename into place.

Flags follow Sophgo's `llm_convert.py` (-m, -s, -q, -c, --out_dir, --do_sample, --use_block_with_kv,
--max_input_length, --max_prefill_kv_length, --dynamic). Shapes: CPU bundles follow the input's
lengths by default (`--dynamic` is accepted and changes nothing there); `--static` pads every prefill to
`--max_input_length` rows and feeds the vision net one tile at a time, for fixed-shape compilers and
NPUs. Sophgo targets keep the seed's meaning: fixed shapes unless `--dynamic`. The manifest's
`options.dynamic` records which a bundle is. On the CPU every activation is float32, so
the quantisation mode chooses how weights are stored:
  w4bf16 / w4f16  decoder linears as 4-bit blocks (AWQ values kept as published, bf16/f16 sources
                  quantised here); everything else in bfloat16 / float16
  bf16 / f16      every weight in bfloat16 / float16
  f32             every weight in float32 (for verification against the reference)
In the w4 modes lm_head is stored as 8-bit blocks by default (`--lm-head-bits`): it is the largest
single matrix every decoded token reads (151674 x hidden), and 8 bits keep its error well below the
4-bit decoder's (llama.cpp's Q4 files keep it at 6 bits for the same reason).
AWQ checkpoints keep their float16 tensors (w4bf16 becomes w4f16, as TPU-MLIR does: "AWQ only
support w4f16"), since rounding them to bfloat16 would lose precision.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass

from . import bundle
from .checkpoint.generation_config import GenerationDefaults, read_generation_config
from .checkpoint.identity import identity
from .checkpoint.reader import Checkpoint
from .errors import UserError
from .nets import graph as graphs
from .nets.decoder import DecoderOptions, build_decoder
from .nets.heads import build_embedding, build_greedy_head, build_sample_head
from .nets.vision import VisionOptions, build_vision
from .progress import Progress
from .prompt import get_template
from .sophgo import CHIPS as SOPHGO_CHIPS
from .tokenizer import END_OF_TEXT, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, TextTokenizer

QUANTIZE_MODES = ("w4bf16", "w4f16", "bf16", "f16", "f32")
CHIPS = ("cpu", *SOPHGO_CHIPS)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".py", ".pyc")
CONFIG_FILE_LIMIT = 64 * 1024 * 1024


@dataclass
class ConvertOptions:
    model_path: str
    out_dir: str
    seq_length: int = 2048
    quantize: str = "w4bf16"
    chip: str = "cpu"
    q_group_size: int = 0  # block size when we quantise: 0 = 128 on the CPU, 64 (TPU-MLIR's default) on Sophgo
    max_input_length: int = 0  # 0: seq_length // 4 (the longest single prefill call)
    max_prefill_kv_length: int = 0  # 0: seq_length (history a prefill may see, with use_block_with_kv)
    use_block_with_kv: bool = False
    dynamic: bool = False  # resolved: whether shapes follow the input (CPU default; Sophgo with --dynamic)
    static: bool = False  # CPU: pad to fixed shapes (bundles meant for export); resolved as `not dynamic`
    do_sample: bool = False
    max_tiles: int = 4  # the seed's default, recorded as the bundle's default
    lm_head_bits: int | None = None  # None: 8 for w4 modes (every token reads lm_head), else float
    vision_bits: int = 0
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fast); 1 = float32 activations (exact)
    tpu_mlir: str | None = None  # Sophgo targets: TPU-MLIR's tpu_mlir folder (default: TPUC_ROOT, then our copy)


def resolve(opts: ConvertOptions, ckpt: Checkpoint) -> tuple[ConvertOptions, list[str]]:
    """Validate and fill defaults; returns the options as recorded and notes for the user."""
    notes = []
    if opts.quantize not in QUANTIZE_MODES:
        raise UserError(f"-q {opts.quantize} is not supported; choose one of {', '.join(QUANTIZE_MODES)}")
    if opts.chip not in CHIPS:
        raise UserError(f"-c {opts.chip} is not supported yet; supported targets: {', '.join(CHIPS)}")
    if opts.static and opts.dynamic:
        raise UserError("--static and --dynamic exclude each other; give one (CPU bundles are dynamic by default)")
    if opts.chip == "cpu":  # a fixed shape only helps compilers and NPUs; the CPU runs the real lengths
        opts.dynamic = not opts.static
    opts.static = not opts.dynamic
    if opts.chip in SOPHGO_CHIPS:
        from .sophgo.convert import resolve as resolve_sophgo

        notes += resolve_sophgo(opts, ckpt)  # fills the chip's defaults (-g 64 among them)
    # on the CPU, the 4-bit kernel runs ~20% faster on 128-blocks than on 64 (fewer scales; MatMulNBits is
    # compute-bound on 2 cores) and match the published -AWQ checkpoints' groups
    opts.q_group_size = opts.q_group_size or 128
    t = ckpt.config.text
    if opts.seq_length < 32:
        raise UserError(f"-s {opts.seq_length} is too short (at least 32 tokens)")
    if opts.seq_length > t.max_position_embeddings:
        raise UserError(
            f"-s {opts.seq_length} exceeds the model's max_position_embeddings ({t.max_position_embeddings})"
        )
    if opts.q_group_size < 16 or opts.q_group_size & (opts.q_group_size - 1):
        raise UserError(f"--q_group_size {opts.q_group_size} must be a power of two, at least 16")
    if not opts.max_input_length:
        opts.max_input_length = max(opts.seq_length // 4, 16)
    if not 1 <= opts.max_input_length <= opts.seq_length:
        raise UserError(f"--max_input_length {opts.max_input_length} must be between 1 and -s {opts.seq_length}")
    if not opts.max_prefill_kv_length:
        opts.max_prefill_kv_length = opts.seq_length
    if not opts.max_input_length <= opts.max_prefill_kv_length <= opts.seq_length:
        raise UserError("--max_prefill_kv_length must lie between --max_input_length and -s")
    if opts.max_tiles < 1:
        raise UserError("--max-tiles must be at least 1")
    if opts.accuracy_level not in (0, 1, 4):
        raise UserError("--accuracy_level takes 4 (int8 activations, fast) or 1 (float32 activations, exact)")
    if opts.lm_head_bits is None:
        opts.lm_head_bits = 8 if opts.quantize.startswith("w4") else 0
    if opts.lm_head_bits not in (0, 4, 8) or opts.vision_bits not in (0, 8):
        raise UserError("--lm-head-bits takes 0, 4 or 8 and --vision-bits 0 or 8")
    if t.awq is not None and opts.quantize == "w4bf16":
        opts.quantize = "w4f16"
        notes.append("AWQ checkpoint: its float16 tensors are kept as float16 (w4bf16 -> w4f16, as TPU-MLIR does)")
    get_template(ckpt.config.template)
    return opts, notes


def _store(quantize: str) -> str:
    return {"w4bf16": "bf16", "w4f16": "f16", "bf16": "bf16", "f16": "f16", "f32": "f32"}[quantize]


def _copy_configs(src: str, dst: str) -> list[str]:
    os.makedirs(dst)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        if name == "model.safetensors.index.json" or os.path.getsize(path) > CONFIG_FILE_LIMIT:
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    if "tokenizer.json" not in copied:  # older checkpoints: build it, so every bundle has one
        TextTokenizer(src).raw.save(os.path.join(dst, "tokenizer.json"))
        copied.append("tokenizer.json")
    return copied


def _token_facts(tok: TextTokenizer, ckpt: Checkpoint, gen: GenerationDefaults) -> dict:
    eos_ids = list(gen.eos_token_ids)
    for t in (IM_END,):
        if tok.token_to_id(t) not in eos_ids:
            eos_ids.insert(0, tok.token_to_id(t))
    facts = {
        "img_start": tok.token_to_id(IMG_START),
        "img_end": tok.token_to_id(IMG_END),
        "img_context": tok.token_to_id(IMG_CONTEXT),
        "im_start": tok.token_to_id(IM_START),
        "im_end": tok.token_to_id(IM_END),
        "end_of_text": tok.token_to_id(END_OF_TEXT),
        "eos": eos_ids,
    }
    if ckpt.config.image_token_id is not None and ckpt.config.image_token_id != facts["img_context"]:
        raise UserError(
            f"config image_token_id {ckpt.config.image_token_id} differs from the tokenizer's "
            f"{IMG_CONTEXT} id {facts['img_context']}"
        )
    if tok.vocab_size() > ckpt.config.text.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size()} tokens, more than the model's vocab_size")
    return facts


def convert(opts: ConvertOptions, progress: Progress | None = None) -> bundle.Manifest:
    progress = progress or Progress("[convert] ")
    progress.step(f"reading {opts.model_path}")
    ckpt = Checkpoint(opts.model_path)
    opts, notes = resolve(opts, ckpt)
    for n in notes:
        progress.stream.write(f"note: {n}\n")
    tok = TextTokenizer(opts.model_path)
    gen = read_generation_config(opts.model_path)
    tokens = _token_facts(tok, ckpt, gen)
    bundle.check_destination(opts.out_dir)
    progress.done(
        f"({ckpt.config.format} format, {ckpt.storage_dtype} weights{', AWQ int4' if ckpt.config.text.awq else ''})"
    )

    store = _store(opts.quantize)
    kv_capacity = opts.seq_length + opts.max_input_length  # room for a padded chunk at the end
    dec_opts = DecoderOptions(
        weight_bits=4 if opts.quantize.startswith("w4") else 0,
        store=store,
        group_size=opts.q_group_size,
        lm_head_bits=opts.lm_head_bits,
        accuracy_level=opts.accuracy_level,
        kv_capacity=kv_capacity,
    )
    vis_opts = VisionOptions(
        store=store, weight_bits=opts.vision_bits, accuracy_level=opts.accuracy_level, static=not opts.dynamic
    )
    tmp = bundle.staging_dir(opts.out_dir)
    nets = {}
    try:

        def emit(name: str, build, with_weights: bool = True):
            weights = graphs.WeightFile(os.path.join(tmp, f"{name}.data")) if with_weights else None
            g = build(weights)
            graphs.save(g, os.path.join(tmp, f"{name}.onnx"))
            nets[name] = {"file": f"{name}.onnx", "data": f"{name}.data" if with_weights else None, **g.io}

        target = {"chip": opts.chip, "backend": "onnxruntime", "execution_provider": "CPUExecutionProvider"}
        if opts.chip in SOPHGO_CHIPS:  # TPU-MLIR compiles the seed's nets into one bmodel
            from .sophgo.convert import build as build_bmodel

            nets, target = build_bmodel(ckpt, opts, tmp, progress)
        else:
            progress.step("vision encoder layer")
            emit("vision", lambda w: build_vision(ckpt, vis_opts, w, progress.update))
            progress.done()
            progress.step("embedding")
            emit("embedding", lambda w: build_embedding(ckpt, store, w))
            progress.done()
            progress.step("decoder layer")
            emit("decoder", lambda w: build_decoder(ckpt, dec_opts, w, progress.update))
            progress.done()
            emit("greedy_head", lambda w: build_greedy_head(), with_weights=False)
            if opts.do_sample:
                emit("sample_head", lambda w: build_sample_head(), with_weights=False)
        progress.step("source checksums")
        source_identity = identity(ckpt, progress.update)
        progress.done()
        progress.step("configs and checksums")
        _copy_configs(opts.model_path, os.path.join(tmp, "config"))
        manifest = bundle.Manifest(
            source={
                "path": os.path.abspath(opts.model_path),
                "format": ckpt.config.format,
                "dtype": ckpt.storage_dtype,
                "awq": asdict(ckpt.config.text.awq) if ckpt.config.text.awq else None,
                "identity": source_identity,  # config hash + tensor checksums: verify refuses another checkpoint
            },
            target=target,
            options={
                **asdict(opts),
                "model_path": os.path.abspath(opts.model_path),
                "out_dir": os.path.abspath(opts.out_dir),
                "store": store,
                "kv_capacity": kv_capacity,
                "decoder_weight_bits": dec_opts.weight_bits,
            },
            model={
                "name": os.path.basename(os.path.abspath(opts.model_path)).lower(),
                "config": ckpt.config.summary(),
                "num_image_token": ckpt.config.num_image_token,
                "image_size": ckpt.config.image_size,
                "template": ckpt.config.template,
                "tokens": tokens,
                "hidden_size": ckpt.config.text.hidden_size,
                "num_layers": ckpt.config.text.num_hidden_layers,
                "num_kv_heads": ckpt.config.text.num_key_value_heads,
                "head_dim": ckpt.config.text.head_dim,
                "vocab_size": ckpt.config.text.vocab_size,
            },
            nets=nets,
        )
        bundle.finish(tmp, manifest, opts.out_dir)
        progress.done()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.path = os.path.abspath(opts.out_dir)
    return manifest
