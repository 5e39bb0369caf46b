"""Our kernels against ONNX Runtime's on one bundle, interleaved step by step in one process.

This machine's speed drifts by more than the kernels differ (decode 28-47 tok/s within minutes), so
one bench after the other says little. This loads the bundle once per setting of
INTERNVL_EDGE_KERNELS (`--modes`: 1 = all of ours, matmul = our 4-bit matmul and SwiGLU with ONNX
Runtime's attention, attention = the other way round, 0 = ONNX Runtime's alone), keeps them all
loaded, and then, round after round, times the same work on each in turn (in the reverse order
every other round: the setting timed second in a pair read up to 4% faster in an A/A run): a
prefill of 256 and of 1024 tokens, and 16 greedy decode steps at contexts 300 and 1500 (from a cache
prefilled once per setting, rewound to the context every round, so every round decodes the same
positions). A setting may name the KV cache's type after a slash (`1/float32`: all of our kernels
with a float32 cache; INTERNVL_EDGE_KV_CACHE, kernels/settings.py). Medians,
bests (the machine's fast state) and the median per-round speed ratio against the last mode. Not
part of CI. `--against LIB` adds another build of our library (another commit's `_q4*.so`, or one
built with other -D settings) as one more setting, named "against", with all of its kernels
(`--against-mode`: another INTERNVL_EDGE_KERNELS for it, e.g. `unlayered` for a build from before
the DecoderLayer op, which has none);
`--against-bundle B2` another conversion of the same checkpoint (made by another commit, or with
other options), with all of our kernels, as the setting "bundle2".

    python benchmarks/kernels_ab.py --bundle B --threads 2 --rounds 20 --modes 1,matmul,0
    python benchmarks/kernels_ab.py --bundle B --rounds 20 --modes 1,1/float32
    python benchmarks/kernels_ab.py --bundle B --rounds 20 --modes 1 --against OTHER/_q4.so
    python benchmarks/kernels_ab.py --bundle B --rounds 16 --modes 1 --against OLD/_q4.so --against-mode unlayered
    python benchmarks/kernels_ab.py --bundle B --rounds 20 --modes 1 --against-bundle B2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import internvl_edge
from internvl_edge import kernels
from internvl_edge.bench import PAIRED_PROBE_GIB, ReadProbe, _greedy_steps, _prefilled, _random_embeds
from internvl_edge.generate import prefill

CONTEXTS = (300, 1500)
PREFILLS = (256, 1024)
STEPS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--modes", default="1,0", help="INTERNVL_EDGE_KERNELS settings, comma-separated")
    ap.add_argument("--prefill-every", type=int, default=5, help="time the prefills every this many rounds")
    ap.add_argument("--against", help='another build of our library, loaded as the setting "against"')
    ap.add_argument("--against-mode", default="1", help="INTERNVL_EDGE_KERNELS for the --against build")
    ap.add_argument("--against-bundle", help='another bundle of the same checkpoint, loaded as the setting "bundle2"')
    ap.add_argument(
        "--probe",
        action="store_true",
        help="read the bench's probe array between steps, as its step-by-step roofline does (only the steps timed)",
    )
    args = ap.parse_args()
    probe = ReadProbe(args.threads, PAIRED_PROBE_GIB) if args.probe else None
    modes = args.modes.split(",") + (["against"] if args.against else []) + (["bundle2"] if args.against_bundle else [])
    loaded = {}
    ours = kernels.library_path
    for mode in modes:
        kernel_mode, _, kv_cache = mode.partition("/")
        kernel_mode = {"against": args.against_mode, "bundle2": "1"}.get(mode, kernel_mode)
        os.environ["INTERNVL_EDGE_KERNELS"] = kernel_mode
        if kv_cache:
            os.environ["INTERNVL_EDGE_KV_CACHE"] = kv_cache
        else:
            os.environ.pop("INTERNVL_EDGE_KV_CACHE", None)
        kernels.settings.cache_clear()
        kernels.library_path = (lambda: args.against) if mode == "against" else ours  # what the runtime loads
        model = internvl_edge.load(args.against_bundle if mode == "bundle2" else args.bundle, threads=args.threads)
        kernels.library_path = ours
        caches = {ctx: _prefilled(model, ctx) for ctx in CONTEXTS}
        loaded[mode] = (model, caches)
        print(
            f"loaded INTERNVL_EDGE_KERNELS={mode}: 4-bit linears {model.backend.q4_kernel}, attention "
            f"{model.backend.attention_kernel}, {model.backend.kv_dtype} KV cache",
            flush=True,
        )
    embeds = {n: _random_embeds(loaded[modes[0]][0], n) for n in PREFILLS}
    step_ms = {(m, c): [] for m in modes for c in CONTEXTS}
    prefill_tps = {(m, n): [] for m in modes for n in PREFILLS}
    for rnd in range(args.rounds):
        for mode in modes if rnd % 2 == 0 else modes[::-1]:
            model, caches = loaded[mode]
            for ctx in CONTEXTS:
                cache, token = caches[ctx]
                cache.lengths[:] = ctx
                spent, step_token = 0.0, token
                for _ in range(STEPS):
                    if probe:
                        probe.read()
                    t0 = time.perf_counter()
                    step_token = _greedy_steps(model.backend, cache, step_token, 1)
                    spent += time.perf_counter() - t0
                step_ms[mode, ctx].append(spent / STEPS * 1000)
            if rnd % args.prefill_every == 0:
                for n in PREFILLS:
                    cache = model.backend.new_cache(1)
                    t0 = time.perf_counter()
                    prefill(model.backend, cache, embeds[n])
                    prefill_tps[mode, n].append(n / (time.perf_counter() - t0))
                    del cache
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
    base = modes[-1]
    columns = [f"decode @{c}: ms/token median (best), speed vs {base}" for c in CONTEXTS]
    columns += [f"prefill {n} tok/s median" for n in PREFILLS]
    print("\n| INTERNVL_EDGE_KERNELS | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(CONTEXTS) + len(PREFILLS)))
    for mode in modes:
        cells = []
        for ctx in CONTEXTS:
            mine, theirs = step_ms[mode, ctx], step_ms[base, ctx]
            ratio = statistics.median(t / m for m, t in zip(mine, theirs, strict=True))
            cells.append(f"{statistics.median(mine):.2f} ({min(mine):.2f}), {ratio:.3f}x")
        cells += [f"{statistics.median(prefill_tps[mode, n]):.0f}" for n in PREFILLS]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
