"""Compile InternVL3-2B or InternVL3.5-2B shapes (random weights) for BM1684X with -q w4bf16 -s 2048; run one
block of it on the chip simulator against a float32 CPU computation of the same layer; record the numbers in
BENCHMARKS.md (one section per preset).

    python benchmarks/sophgo_compile_2b.py [--size 2b|3.5-2b] [--work DIR] [--checkpoint DIR] [--jobs N]
                                           [--no-write] [--block-json F]

Measured: wall time of `convert` (emitting, the tpuc-opt pipeline of every net, model_tool --combine),
the peak resident memory of the whole process tree (this process and the tpuc-opt processes it runs,
summed, sampled every 0.2 s), and the bmodel's size. Then block_0 (the first layer's prefill net) runs
on the simulator; the reference is transformers' Qwen2DecoderLayer (InternVL3) or Qwen3DecoderLayer
(InternVL3.5: per-head query/key norms) in float32 holding the bundle's 4-bit weights (dequantised).
Not part of CI: it needs ~4 GB of disk for the checkpoint, ~2 GB for the bundle and tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time

import numpy as np
from records import write_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# preset -> (model name, BENCHMARKS.md section, what its shapes are)
PRESETS = {
    "2b": ("InternVL3-2B", "InternViT-300M, Qwen2.5-1.5B decoder with 28 layers, vocab 151674"),
    "3.5-2b": ("InternVL3_5-2B", "InternViT-300M, Qwen3-1.7B decoder with 28 layers, 16 heads of 128, vocab 151936"),
}


def section(size: str) -> str:
    return f"## Sophgo BM1684X compile ({PRESETS[size][0].replace('_', '.')} shapes)"


class PeakMemory:
    """Peak of the summed RSS of this process and all its descendants."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.psutil, self.interval, self.peak = psutil, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = self.psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def one_block(bundle_dir: str, ckpt_dir: str, work: str, rows: int = 16, seed: int = 0) -> dict:
    """block_0 (the first layer's prefill net, 2048 rows) on the simulator against transformers' layer 0
    in float32 holding the bundle's 4-bit weights (dequantised); the first `rows` rows are a prompt of
    real embedding rows, the rest padding (masked, as the runtime pads).

    The simulator's device memory (about 3 GB) does not hold the 2.3 GB bmodel with its working memory,
    so the net is taken out of the combined bmodel as it is (`model_tool --extract`) and run alone.
    (Extracted nets compiled with addr_mode io_alone, the block_cache_i, return zeros when run alone:
    the prefill block, addr_mode basic, runs as in the combined bmodel.)"""
    import torch
    from transformers import Qwen2Config, Qwen3Config
    from transformers.cache_utils import DynamicCache
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    from internvl_edge.bundle import load_manifest
    from internvl_edge.checkpoint.reader import Checkpoint
    from internvl_edge.sophgo import bmrt, toolchain
    from internvl_edge.sophgo.mlir import LINEARS
    from internvl_edge.sophgo.weights import decoder_linear

    m = load_manifest(bundle_dir, verify=False)
    net = "block_0"
    extract = os.path.join(work, "extract")
    os.makedirs(extract, exist_ok=True)
    tc = toolchain.require_working()
    with open(os.path.join(work, "extract.log"), "w") as log:
        if tc.run(["model_tool", "--extract", os.path.join(bundle_dir, m.target["bmodel"])], cwd=extract, log=log):
            raise RuntimeError("model_tool --extract failed")
    single = os.path.join(extract, f"bm_net{list(m.nets).index(net)}_stage0.bmodel")
    libs = bmrt.find_libraries(m.target["chip"])
    rt = bmrt.Runtime(libs.folder, single)
    assert list(rt.nets) == [net], list(rt.nets)

    ckpt = Checkpoint(ckpt_dir)
    t = ckpt.config.text
    shape = {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": 1}
    shape.update(num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads)
    shape.update(rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, vocab_size=t.vocab_size)
    shape.update(max_position_embeddings=t.max_position_embeddings)
    if t.qk_norm:  # Qwen3: head size 128 whatever the width, no attention biases
        cfg = Qwen3Config(head_dim=t.head_dim, attention_bias=False, **shape)
        decoder_layer, rotary_embedding = Qwen3DecoderLayer, Qwen3RotaryEmbedding
    else:
        cfg, decoder_layer, rotary_embedding = Qwen2Config(**shape), Qwen2DecoderLayer, Qwen2RotaryEmbedding
    cfg._attn_implementation = "eager"
    layer = decoder_layer(cfg, 0).float().eval()
    rotary = rotary_embedding(cfg)
    p = "language_model.model.layers.0"
    group, half = m.target["weights"]["q_group_size"], "bf16"
    with torch.no_grad():
        for name in LINEARS:
            lin = ckpt.linear(f"{p}.{name}")
            mod = layer.get_submodule(name)
            mod.weight.copy_(torch.from_numpy(decoder_linear(lin, True, group, half).dequantize()))
            if lin.bias is not None:
                mod.bias.copy_(torch.from_numpy(lin.bias))
        layer.input_layernorm.weight.copy_(torch.from_numpy(ckpt.f32(f"{p}.input_layernorm.weight")))
        post = ckpt.f32(f"{p}.post_attention_layernorm.weight")
        layer.post_attention_layernorm.weight.copy_(torch.from_numpy(post))
        if t.qk_norm:
            for name in ("q_norm", "k_norm"):
                norm = layer.self_attn.get_submodule(name)
                norm.weight.copy_(torch.from_numpy(ckpt.f32(f"{p}.self_attn.{name}.weight")))

        rng = np.random.default_rng(seed)
        table = ckpt.f32("language_model.model.embed_tokens.weight")
        x = table[rng.integers(0, t.vocab_size, rows)][None]  # real embedding rows as the input states
        cache = DynamicCache(config=cfg)
        pos = torch.arange(rows)[None]
        cos, sin = rotary(torch.from_numpy(x), pos)
        causal = torch.full((rows, rows), float("-inf")).triu(1)[None, None]
        kw = {"position_ids": pos, "past_key_values": cache, "use_cache": True, "position_embeddings": (cos, sin)}
        out = layer(torch.from_numpy(x), attention_mask=causal, **kw)
        out = (out[0] if isinstance(out, tuple) else out)[0].numpy()
        keys = cache.layers[0].keys[0].transpose(0, 1).numpy()  # [rows, kv_heads, head_dim]
        values = cache.layers[0].values[0].transpose(0, 1).numpy()

    L = rt.nets[net].inputs[0].shape[1]
    states = np.zeros((1, L, t.hidden_size), np.float32)
    states[0, :rows] = x[0]
    positions = np.zeros((1, L), np.int32)
    positions[0, :rows] = np.arange(rows)
    mask = np.full((1, 1, L, L), -10000.0, np.float32)
    mask[0, 0, :rows, :rows] = np.where(np.tri(rows, dtype=bool), 0.0, -10000.0)
    started = time.perf_counter()
    h, k, v = rt.run(net, states, positions, mask)
    seconds = time.perf_counter() - started
    rt.close()

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    hidden = {"rel_rms_hidden": rel(h[0, :rows], out), "max_abs_hidden": float(np.abs(h[0, :rows] - out).max())}
    hidden["hidden_rms"] = float(np.sqrt((out**2).mean()))
    kv = {"rel_rms_k": rel(k[0, :rows], keys), "rel_rms_v": rel(v[0, :rows], values)}
    where = {"net": net, "rows": L, "prompt": rows, "simulator_s": round(seconds, 1), "library": libs.description}
    return {**where, "reference": type(layer).__name__, **hidden, **kv}


def write_section(heading: str, text: str) -> None:
    path = os.path.join(ROOT, "BENCHMARKS.md")
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if heading in old:
        start = old.index(heading)
        nxt = re.search(r"^## ", old[start + len(heading) :], flags=re.M)
        end = start + len(heading) + nxt.start() if nxt else len(old)
        new = old[:start] + text + ("\n" + old[end:] if nxt else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    write_atomic(path, new)


def compile_bundle(size: str, work: str, ckpt: str | None) -> dict:
    """make-checkpoint (unless given) and convert -c bm1684x, measured; the result is saved in `work`."""
    from internvl_edge.checkpoint.factory import make_checkpoint
    from internvl_edge.convert import ConvertOptions, convert
    from internvl_edge.progress import Progress
    from internvl_edge.sophgo import compile as sophgo_compile
    from internvl_edge.sophgo import toolchain

    name = PRESETS[size][0]
    ckpt = ckpt or os.path.join(work, name)
    if not os.path.isdir(ckpt):
        progress = Progress("[make-checkpoint] ")
        progress.step(f"{name} shapes, bf16, random")
        make_checkpoint(ckpt, size=size, weights="bf16", seed=0, progress=lambda d, t, n: progress.update(d, t))
        progress.done()
    out = os.path.join(work, f"{name.lower()}_bm1684x")
    command = f"internvl-edge convert -m {name} -s 2048 -q w4bf16 -c bm1684x --out_dir {name.lower()}"
    tc = toolchain.require_working()
    opts = ConvertOptions(model_path=ckpt, out_dir=out, seq_length=2048, quantize="w4bf16", chip="bm1684x")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        manifest = convert(opts, progress=Progress("[convert] "))
        seconds = time.perf_counter() - t0
    bmodel = os.path.join(out, manifest.target["bmodel"])
    info = sophgo_compile.info(tc, bmodel)
    device_mem = re.search(r"device mem size: (\d+) \(weight: (\d+), instruct: (\d+), runtime: (\d+)\)", info)
    result = {"size": size, "command": command, "date": time.strftime("%Y-%m-%d"), "compile_s": round(seconds, 1)}
    result.update(peak_rss_gb=round(mem.peak / 2**30, 2), bmodel=manifest.target["bmodel"])
    result.update(bmodel_bytes=os.path.getsize(bmodel), nets=len(manifest.nets), cores=os.cpu_count())
    result.update(toolchain=manifest.target["toolchain"], bundle=out, checkpoint=ckpt)
    result["device_mem"] = [int(x) for x in device_mem.groups()] if device_mem else None
    write_atomic(os.path.join(work, "compile.json"), json.dumps(result))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(PRESETS), default="2b", help="the preset's shapes (default 2b)")
    ap.add_argument("--work", default=None, help="default: internvl-edge-sophgo-SIZE in the temporary folder")
    ap.add_argument("--checkpoint", default=None, help="an existing checkpoint of the preset (default: make one)")
    ap.add_argument("--jobs", type=int, default=None, help="tpuc-opt processes at once (default: the core count)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    ap.add_argument("--compile-json", default=None, help="reuse this saved compile result (its bundle in place)")
    ap.add_argument("--block-json", default=None, help="reuse this saved one-block result (the run takes ~40 min)")
    ap.add_argument("--no-block", action="store_true", help="record the compile only (the block is not run)")
    ap.add_argument(
        "--note", default="", help="a remark on the compile run for BENCHMARKS.md (e.g. the machine's load)"
    )
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from internvl_edge.sophgo import compile as sophgo_compile

    work = args.work or os.path.join(tempfile.gettempdir(), f"internvl-edge-sophgo-{args.size}")
    os.makedirs(work, exist_ok=True)
    if args.jobs:
        sophgo_compile.DEFAULT_JOBS = args.jobs
    if args.compile_json:
        with open(args.compile_json, encoding="utf-8") as f:
            result = json.load(f)
    else:
        result = compile_bundle(args.size, work, args.checkpoint)
    print(json.dumps(result, indent=2), flush=True)
    block = None
    if args.block_json:
        with open(args.block_json, encoding="utf-8") as f:
            block = json.load(f)
    elif not args.no_block:
        block = one_block(result["bundle"], result["checkpoint"], work)
        write_atomic(os.path.join(work, "block.json"), json.dumps({**block, "date": time.strftime("%Y-%m-%d")}))
    result["block"] = block
    if args.note:
        result["note"] = args.note
    print(json.dumps(block, indent=2))
    if not args.no_write:
        write_section(section(result.get("size", "2b")), render(result))
    return 0


def render(r: dict) -> str:
    b, dm = r["block"], r["device_mem"]
    size = r.get("size", "2b")
    name, shapes = PRESETS[size]
    mem_line, note = "", f"; {r['note']}" if r.get("note") else ""
    if dm:
        mem_line = (
            f"- device memory the bmodel asks for: {dm[0] / 2**30:.2f} GiB (weights {dm[1] / 2**30:.2f} GiB, "
            f"instructions {dm[2] / 2**20:.0f} MiB, runtime {dm[3] / 2**20:.0f} MiB)\n"
        )
    text = (
        f"{section(size)}\n\n"
        f"Measured {r['date']} on this machine ({r['cores']} cores, 24 GB), {r['toolchain']}, with "
        f"`python benchmarks/sophgo_compile_2b.py --size {size}` (random weights with the exact "
        f"{name.replace('_', '.')} shapes: {shapes}):\n\n"
        f"```\n{r['command']}\n```\n\n"
        f"- compile time: {r['compile_s']:.0f} s for {r['nets']} nets (emitting MLIR and weights, the tpuc-opt "
        f"pipeline per net with as many processes as cores, model_tool --combine){note}\n"
        f"- peak memory: {r['peak_rss_gb']:.1f} GiB resident, this process and its tpuc-opt processes summed\n"
        f"- bmodel: `{r['bmodel']}`, {r['bmodel_bytes'] / 1e9:.2f} GB ({r['bmodel_bytes']:,} bytes)\n"
        f"{mem_line}"
    )
    if b is None:
        return text + "- one block on the simulator: not run\n"
    date = f"; measured {b['date']}" if b.get("date") else ""
    block_note = f"; {b['note']}" if b.get("note") else ""
    return text + (
        "- the simulator's device memory (about 3 GB) does not hold this bmodel with its working memory, so one "
        "net is taken out of it as compiled (`model_tool --extract`) and run alone:\n"
        f"- one block on the simulator ({b['library']}): `{b['net']}` (the first layer's prefill net, "
        f"{b['rows']} rows, a {b['prompt']}-token prompt and padding) took {b['simulator_s']:.0f} s; against "
        f"transformers' {b.get('reference', 'Qwen2DecoderLayer')} in float32 on the CPU with "
        f"the same 4-bit weights: relative RMS error {b['rel_rms_hidden']:.1e} in the hidden state (max abs "
        f"{b['max_abs_hidden']:.3f} for an RMS of {b['hidden_rms']:.2f}), {b['rel_rms_k']:.1e} in K, "
        f"{b['rel_rms_v']:.1e} in V (bf16 activations: unit roundoff 3.9e-3){date}{block_note}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
