"""Decode with and without a flag that the kernel library reads once per process, in turns.

INTERNVL_EDGE_AMX, INTERNVL_EDGE_PREFETCH and INTERNVL_EDGE_ISA are read once when the library first
runs, so kernels_ab.py, which keeps every setting loaded in one process, cannot compare them. This
loads the bundle in a fresh child process per run, the default environment and the one with `--set`
taking turns (round r starts with the other side when r is odd), and in each child times the bench's
step-by-step roofline: `--steps` greedy decode steps from a cache prefilled to `--context`, each step
followed by one read of the bench's probe (bench.time_decode_paired, bench.paired_fraction). Prints
every run and the medians of ms per token and of the fraction per side. Not part of CI.

    python benchmarks/env_ab.py --bundle B --set INTERNVL_EDGE_AMX=0 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, statistics, sys
import internvl_edge
from internvl_edge import kernels
from internvl_edge.bench import (PAIRED_PROBE_GIB, ReadProbe, decoder_bytes_per_token, kv_bytes, paired_fraction,
                                 time_decode_paired)
bundle, threads, context, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = internvl_edge.load(bundle, threads=threads)
probe = ReadProbe(threads, PAIRED_PROBE_GIB)
pairs = time_decode_paired(model, context, steps, probe)
per_token = decoder_bytes_per_token(model) + kv_bytes(model, context)
print(json.dumps({
    "ms": 1e3 * statistics.median(step for step, _ in pairs),
    "fraction": paired_fraction(pairs, per_token, probe.data.nbytes),
    "probe_gbs": statistics.median(gbs for _, gbs in pairs),
    "kernel": model.backend.q4_kernel,
}))
"""


def run(args, env: dict) -> dict:
    cmd = [sys.executable, "-c", CHILD, args.bundle, str(args.threads), str(args.context), str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"a run failed (exit status {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--set", required=True, action="append", help="NAME=VALUE for the other side (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    other = dict(item.split("=", 1) for item in args.set)
    default = {k: v for k, v in os.environ.items() if k not in other}  # the flags unset: the library's choice
    sides = {"default": default, "with " + " ".join(args.set): {**default, **other}}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            res = run(args, sides[name])
            results[name].append(res)
            print(
                f"round {r + 1} {name}: {res['ms']:.2f} ms/token, {100 * res['fraction']:.1f}% of the roofline "
                f"step by step (probe {res['probe_gbs']:.1f} GB/s) [{res['kernel']}]",
                flush=True,
            )
    for name, runs in results.items():
        print(
            f"{name}: median {statistics.median(x['ms'] for x in runs):.2f} ms/token, "
            f"{100 * statistics.median(x['fraction'] for x in runs):.1f}% of the roofline"
        )


if __name__ == "__main__":
    main()
