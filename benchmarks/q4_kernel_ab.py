"""Our 4-bit kernel against ONNX Runtime's (MLAS) on one bundle, alternating in one process.

This machine's bandwidth drifts by more than the two kernels differ, so one bench after the other
says little; this loads the bundle afresh for each kernel in turn (INTERNVL_EDGE_KERNELS) and
times prefill and decode with the bench's own helpers, `--rounds` times. Not part of CI.

    python benchmarks/q4_kernel_ab.py --bundle B --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os

import internvl_edge
from internvl_edge import kernels
from internvl_edge.bench import read_bandwidth, time_decode, time_prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print("round | kernel | prefill 256 tok/s | decode @300 tok/s | decode @1500 tok/s | ReduceSum GB/s", flush=True)
    for rnd in range(1, args.rounds + 1):
        for flag in ("1", "0"):
            os.environ["INTERNVL_EDGE_KERNELS"] = flag
            kernels.library_path.cache_clear()
            model = internvl_edge.load(args.bundle, threads=args.threads)
            prefill = time_prefill(model, 256, 1)
            short, _ = time_decode(model, 300, 32, 2)
            long, _ = time_decode(model, 1500, 32, 2)
            print(f"{rnd} | {model.backend.q4_kernel} | {prefill:.0f} | {short:.1f} | {long:.1f} | "
                  f"{read_bandwidth(args.threads):.1f}", flush=True)  # fmt: skip
            del model


if __name__ == "__main__":
    main()
