"""`convert -c bm1684x|bm1688`: the seed's nets emitted, compiled and combined into one bmodel.

    vit, embedding, embedding_cache, lm_head, greedy_head (and sample_head with --do_sample), then
    block_i, block_cache_i (and block_kv_i with --use_block_with_kv) for every layer: the order and the
    deploy flags of the seed's LlmConverter.compile_all. InternVL3 (Qwen2 decoder) and InternVL3.5 (dense
    Qwen3: query/key norms, head size 128, no attention biases) share the nets. Each layer's weights are
    prepared once, written once (one npz for its block nets) and stored once in the combined bmodel
    (model_tool shares identical coefficients).

The bmodel is named as the seed names its output folder: <model>_<quantize>_seq<N>_<chip>_1dev (bm1684x)
or _<cores>core (bm1688). Options the chip flow does not support are refused, never ignored.
"""

from __future__ import annotations

import os
import re

from ..checkpoint.reader import Checkpoint
from ..errors import UserError
from . import mlir, toolchain
from .compile import MAX_CORES, NPU_NUM, Compiler, clean_work, combine, info, work_dir
from .mlir import Net

# -q -> (processor-assign mode of the decoder blocks, half type of everything else)
QUANTIZE = {"w4bf16": ("W4BF16", "bf16"), "w4f16": ("W4F16", "f16"), "bf16": ("BF16", "bf16"), "f16": ("F16", "f16")}


def resolve(opts, ckpt: Checkpoint) -> list[str]:
    """Check the options against what the chip flow supports; fill its defaults. Returns notes."""
    if opts.quantize not in QUANTIZE:
        raise UserError(f"-q {opts.quantize} is not supported for {opts.chip}; choose one of {', '.join(QUANTIZE)}")
    cpu_only, both = "is a CPU-target option", opts.dynamic and opts.use_block_with_kv
    unsupported = [
        (both, "--dynamic together with --use_block_with_kv is not supported for Sophgo targets yet; choose one"),
        (opts.lm_head_bits, f"--lm-head-bits {cpu_only} (the seed keeps lm_head in half precision)"),
        (opts.vision_bits, f"--vision-bits {cpu_only} (the seed keeps the vision encoder in half precision)"),
        (opts.accuracy_level != 4, f"--accuracy_level {cpu_only} (the chip computes 4-bit matmuls in half precision)"),
    ]
    for flag, message in unsupported:
        if flag:
            raise UserError(message)
    opts.lm_head_bits = 0  # lm_head stays in the half type, as in the seed (not the CPU target's default)
    if not opts.max_input_length:  # the seed prefills the whole context at once by default
        opts.max_input_length = opts.seq_length
    t, given = ckpt.config.text, opts.q_group_size
    opts.q_group_size = given or 64  # TPU-MLIR llm_convert's default block
    if not opts.quantize.startswith("w4"):
        return []
    if t.awq is not None:
        return (
            [f"AWQ checkpoint: its group size {t.awq.group_size} is used (not -g {given})"]
            if given and given != t.awq.group_size
            else []
        )
    # the decoder linears' input widths (o_proj's is heads x head_dim: wider than hidden in InternVL3.5-4B)
    for k in (t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim):
        if k % opts.q_group_size:
            raise UserError(
                f"-g {opts.q_group_size}: the decoder's linear layers with {k} inputs cannot be split "
                "into 4-bit groups of that size on Sophgo chips; choose a divisor of it"
            )
    return []


def bmodel_name(opts, chip: str) -> str:
    model = os.path.basename(os.path.abspath(opts.model_path)).lower()
    where = "1dev" if chip == "bm1684x" else f"{MAX_CORES[chip]}core"
    return f"{model}_{opts.quantize}_seq{opts.seq_length}_{chip}_{where}.bmodel"


def _nets_plan(layers: int, with_kv: bool, with_sample: bool) -> list[str]:
    names = ["vit", "embedding", "embedding_cache", "lm_head", "greedy_head"] + (["sample_head"] if with_sample else [])
    for i in range(layers):
        names += [f"block_{i}", f"block_cache_{i}"] + ([f"block_kv_{i}"] if with_kv else [])
    return names


def build(ckpt: Checkpoint, opts, tmp: str, progress) -> tuple[dict, dict]:
    """Compile every net into `tmp`/<bmodel>; returns the manifest's nets and target."""
    tc = toolchain.require_working(opts.tpu_mlir)
    t = ckpt.config.text
    mode, half = QUANTIZE[opts.quantize]
    half_mode = half.upper()
    four_bit = opts.quantize.startswith("w4")
    group = (t.awq.group_size if t.awq is not None else opts.q_group_size) if four_bit else 0
    S, L = opts.seq_length, opts.max_input_length
    plan = _nets_plan(t.num_hidden_layers, opts.use_block_with_kv, opts.do_sample)
    work = work_dir(opts.out_dir)
    ok, comp = False, None
    try:
        comp = Compiler(tc, opts.chip, work, progress, total=len(plan))
        progress.step(f"compiling {len(plan)} nets for {opts.chip} ({opts.quantize}) with TPU-MLIR {toolchain.VERSION}")

        m = mlir.vit(ckpt, "../vit.npz")
        comp.write_weights("vit.npz", m.weights)
        comp.submit(Net("vit", m, half_mode, quant_output=True))
        table = ckpt.f32("language_model.model.embed_tokens.weight")
        for name, rows in (("embedding", L), ("embedding_cache", 1)):
            m = mlir.embedding(table, name, rows, "../embedding.npz")
            if name == "embedding":
                comp.write_weights("embedding.npz", m.weights)
            comp.submit(Net(name, m, half_mode, quant_input=True, quant_output=True))
        del table
        m = mlir.lm_head(mlir.lm_head_table(ckpt), "../lm_head.npz")
        comp.write_weights("lm_head.npz", m.weights)
        comp.submit(Net("lm_head", m, half_mode, quant_input=True))
        comp.submit(Net("greedy_head", mlir.greedy_head(t.vocab_size), "F32", addr_mode="io_alone"))
        if opts.do_sample:
            m = mlir.sample_head(t.vocab_size, S, "../sample_head.npz")
            comp.write_weights("sample_head.npz", m.weights)
            comp.submit(Net("sample_head", m, "F32", addr_mode="io_alone"))
        del m

        kinds = [("block", L, "basic"), ("block_cache", 1, "io_alone")] + (
            [("block_kv", L, "basic")] if opts.use_block_with_kv else []
        )
        small_mask = 4 * NPU_NUM[opts.chip] if opts.dynamic else 0
        for i in range(t.num_hidden_layers):
            lw = mlir.layer_weights(ckpt, i, four_bit, group, half, S)
            for kind, rows, addr_mode in kinds:
                prefill = kind == "block"  # --dynamic: the prefill's rows follow the prompt (the seed's flow)
                m = mlir.block(ckpt, lw, kind, rows, S, f"../block_{i}.npz", small_mask if prefill else 0)
                if prefill:
                    comp.write_weights(f"block_{i}.npz", m.weights)
                comp.submit(
                    Net(
                        f"{kind}_{i}",
                        m,
                        mode,
                        quant_input=True,
                        quant_output=True,
                        addr_mode=addr_mode,
                        q_group_size=group,
                        dynamic=prefill and opts.dynamic,
                    )
                )
            del lw, m
        bmodels = comp.finish()
        progress.done()

        name = bmodel_name(opts, opts.chip)
        out = os.path.join(tmp, name)
        progress.step("model_tool --combine")
        combine(tc, bmodels, out, work)
        nets = parse_info(info(tc, out), name)
        progress.done(f"({os.path.getsize(out) / 1e6:.1f} MB)")
        ok = True
    finally:
        if comp is not None and not ok:  # no queued or running job may read what clean_work removes
            comp.pool.shutdown(wait=True, cancel_futures=True)
        clean_work(work, keep_logs=not ok)
    if list(nets) != plan:
        raise UserError(f"the combined bmodel holds {list(nets)}, expected {plan}")
    target = {
        "chip": opts.chip,
        "backend": "bmrt",
        "bmodel": name,
        "num_device": 1,
        "num_core": MAX_CORES[opts.chip],
        "toolchain": f"tpu-mlir {toolchain.VERSION} ({toolchain.tool_version(tc)})",
        "weights": {"blocks": mode, "other": half_mode, "q_group_size": group},
    }
    return nets, target


_NET = re.compile(r"^net \d+: \[(\S+)\]")
_IO = re.compile(r"^(input|output): (\S+), \[([\d, max:]*)\], (\w+),")  # dynamic nets print "max:N"


def parse_info(text: str, bmodel: str) -> dict:
    """`model_tool --info` -> {net: {file, inputs: [{name, dtype, shape}], outputs: [...]}} in bmodel order."""
    nets: dict = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        m = _NET.match(line)
        if m:
            current = nets.setdefault(m.group(1), {"file": bmodel, "inputs": [], "outputs": []})
            continue
        m = _IO.match(line)
        if m and current is not None:
            shape = [int(d.strip().removeprefix("max:")) for d in m.group(3).split(",") if d.strip()]
            current[f"{m.group(1)}s"].append({"name": m.group(2), "dtype": m.group(4), "shape": shape})
    return nets
