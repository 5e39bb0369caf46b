"""Compile InternVL3-2B shapes (random weights) for BM1684X with -q w4bf16 -s 2048; run one block of it on
the chip simulator against a float32 CPU computation of the same layer; record the numbers in BENCHMARKS.md.

    python benchmarks/sophgo_compile_2b.py [--work DIR] [--checkpoint DIR] [--jobs N] [--no-write] [--block-json F]

Measured: wall time of `convert` (emitting, the tpuc-opt pipeline of every net, model_tool --combine),
the peak resident memory of the whole process tree (this process and the tpuc-opt processes it runs,
summed, sampled every 0.2 s), and the bmodel's size. Then block_0 (the first layer's prefill net) runs
on the simulator; the reference is transformers' Qwen2DecoderLayer in float32 holding the bundle's
4-bit weights (dequantised).
Not part of CI: it needs ~4 GB of disk for the checkpoint, ~2 GB for the bundle and tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time

import numpy as np
from records import write_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTION = "## Sophgo BM1684X compile (InternVL3-2B shapes)"


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
    from transformers import Qwen2Config
    from transformers.cache_utils import DynamicCache
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

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
    cfg = Qwen2Config(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        max_position_embeddings=t.max_position_embeddings,
        num_hidden_layers=1,
        vocab_size=t.vocab_size,
    )
    cfg._attn_implementation = "eager"
    layer = Qwen2DecoderLayer(cfg, 0).float().eval()
    rotary = Qwen2RotaryEmbedding(cfg)
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
        layer.post_attention_layernorm.weight.copy_(torch.from_numpy(ckpt.f32(f"{p}.post_attention_layernorm.weight")))

        rng = np.random.default_rng(seed)
        table = ckpt.f32("language_model.model.embed_tokens.weight")
        x = table[rng.integers(0, t.vocab_size, rows)][None]  # real embedding rows as the input states
        cache = DynamicCache(config=cfg)
        pos = torch.arange(rows)[None]
        cos, sin = rotary(torch.from_numpy(x), pos)
        causal = torch.full((rows, rows), float("-inf")).triu(1)[None, None]
        out = layer(
            torch.from_numpy(x),
            attention_mask=causal,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=(cos, sin),
        )
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

    return {
        "net": net,
        "rows": L,
        "prompt": rows,
        "simulator_s": round(seconds, 1),
        "library": libs.description,
        "rel_rms_hidden": rel(h[0, :rows], out),
        "rel_rms_k": rel(k[0, :rows], keys),
        "rel_rms_v": rel(v[0, :rows], values),
        "max_abs_hidden": float(np.abs(h[0, :rows] - out).max()),
        "hidden_rms": float(np.sqrt((out**2).mean())),
    }


def write_section(text: str) -> None:
    path = os.path.join(ROOT, "BENCHMARKS.md")
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = re.search(r"^## ", old[start + len(SECTION) :], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(old)
        new = old[:start] + text + ("\n" + old[end:] if nxt else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    write_atomic(path, new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/internvl-edge-sophgo-2b")
    ap.add_argument("--checkpoint", default=None, help="an existing 2b-shaped checkpoint (default: make one in --work)")
    ap.add_argument("--jobs", type=int, default=None, help="tpuc-opt processes at once (default: the core count)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    ap.add_argument(
        "--block-json",
        default=None,
        help="reuse this saved one-block result (the simulator run takes ~40 min) instead of running it",
    )
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from internvl_edge.checkpoint.factory import make_checkpoint
    from internvl_edge.convert import ConvertOptions, convert
    from internvl_edge.progress import Progress
    from internvl_edge.sophgo import compile as sophgo_compile
    from internvl_edge.sophgo import toolchain

    os.makedirs(args.work, exist_ok=True)
    ckpt = args.checkpoint or os.path.join(args.work, "InternVL3-2B")
    if not os.path.isdir(ckpt):
        progress = Progress("[make-checkpoint] ")
        progress.step("InternVL3-2B shapes, bf16, random")
        make_checkpoint(ckpt, size="2b", weights="bf16", seed=0, progress=lambda d, t, n: progress.update(d, t))
        progress.done()
    out = os.path.join(args.work, "internvl3_2b_bm1684x")
    if args.jobs:
        sophgo_compile.DEFAULT_JOBS = args.jobs
    command = f"internvl-edge convert -m {ckpt} -s 2048 -q w4bf16 -c bm1684x --out_dir {out}"
    tc = toolchain.require_working()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        manifest = convert(
            ConvertOptions(model_path=ckpt, out_dir=out, seq_length=2048, quantize="w4bf16", chip="bm1684x"),
            progress=Progress("[convert] "),
        )
        seconds = time.perf_counter() - t0
    bmodel = os.path.join(out, manifest.target["bmodel"])
    size = os.path.getsize(bmodel)
    info = sophgo_compile.info(tc, bmodel)
    device_mem = re.search(r"device mem size: (\d+) \(weight: (\d+), instruct: (\d+), runtime: (\d+)\)", info)
    if args.block_json:
        with open(args.block_json, encoding="utf-8") as f:
            block = json.load(f)
    else:
        block = one_block(out, ckpt, args.work)
        write_atomic(os.path.join(args.work, "block.json"), json.dumps({**block, "date": time.strftime("%Y-%m-%d")}))
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "compile_s": round(seconds, 1),
        "peak_rss_gb": round(mem.peak / 2**30, 2),
        "bmodel": manifest.target["bmodel"],
        "bmodel_bytes": size,
        "nets": len(manifest.nets),
        "cores": os.cpu_count(),
        "toolchain": manifest.target["toolchain"],
        "device_mem": [int(x) for x in device_mem.groups()] if device_mem else None,
        "block": block,
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        write_section(render(result))
    return 0


def render(r: dict) -> str:
    b = r["block"]
    dm = r["device_mem"]
    mem_line = ""
    if dm:
        mem_line = (
            f"- device memory the bmodel asks for: {dm[0] / 2**30:.2f} GiB (weights {dm[1] / 2**30:.2f} GiB, "
            f"instructions {dm[2] / 2**20:.0f} MiB, runtime {dm[3] / 2**20:.0f} MiB)\n"
        )
    return (
        f"{SECTION}\n\n"
        f"Measured {r['date']} on this machine ({r['cores']} cores, 24 GB), {r['toolchain']}, with "
        "`benchmarks/sophgo_compile_2b.py` (random weights with the exact InternVL3-2B shapes: InternViT-300M, "
        "Qwen2.5-1.5B decoder with 28 layers, vocab 151674):\n\n"
        f"```\n{r['command']}\n```\n\n"
        f"- compile time: {r['compile_s']:.0f} s for {r['nets']} nets (emitting MLIR and weights, the tpuc-opt "
        "pipeline per net with as many processes as cores, model_tool --combine)\n"
        f"- peak memory: {r['peak_rss_gb']:.1f} GiB resident, this process and its tpuc-opt processes summed\n"
        f"- bmodel: `{r['bmodel']}`, {r['bmodel_bytes'] / 1e9:.2f} GB ({r['bmodel_bytes']:,} bytes)\n"
        f"{mem_line}"
        "- the simulator's device memory (about 3 GB) does not hold this bmodel with its working memory, so one "
        "net is taken out of it as compiled (`model_tool --extract`) and run alone:\n"
        f"- one block on the simulator ({b['library']}): `{b['net']}` (the first layer's prefill net, {b['rows']} "
        f"rows, a {b['prompt']}-token prompt and padding) took {b['simulator_s']:.0f} s; against transformers' "
        "Qwen2DecoderLayer in float32 on the CPU with "
        f"the same 4-bit weights: relative RMS error {b['rel_rms_hidden']:.1e} in the hidden state (max abs "
        f"{b['max_abs_hidden']:.3f} for an RMS of {b['hidden_rms']:.2f}), {b['rel_rms_k']:.1e} in K, "
        f"{b['rel_rms_v']:.1e} in V (bf16 activations: unit roundoff 3.9e-3)"
        f"{'; measured ' + b['date'] if b.get('date') else ''}{'; ' + b['note'] if b.get('note') else ''}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
