"""Our kernels against ONNX Runtime's on one bundle, alternating in one process.

This machine's bandwidth drifts by more than the kernels differ, so one bench after the other says
little; this loads the bundle afresh for each setting of INTERNVL_EDGE_KERNELS in turn (`--modes`:
1 = all of ours, matmul = our 4-bit matmul with ONNX Runtime's attention, attention = the other way
round, 0 = ONNX Runtime's alone) and times prefill and decode with the bench's own helpers, `--rounds`
times. Each decode is followed by a read-bandwidth sample (ReduceSum, as the bench measures it), so
every decode figure has its own roofline fraction. Not part of CI.

    python benchmarks/kernels_ab.py --bundle B --threads 2 --rounds 3 --modes 1,matmul,0
"""

from __future__ import annotations

import argparse
import os

import internvl_edge
from internvl_edge import kernels
from internvl_edge.bench import decoder_bytes_per_token, kv_bytes, read_bandwidth, time_decode, time_prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="1,0", help="INTERNVL_EDGE_KERNELS settings, comma-separated")
    args = ap.parse_args()
    print("round | INTERNVL_EDGE_KERNELS | 4-bit linears | attention | prefill 256 / 1024 tok/s | "
          "decode @300 tok/s (of roofline) | decode @1500 tok/s (of roofline)", flush=True)  # fmt: skip
    for rnd in range(1, args.rounds + 1):
        for mode in args.modes.split(","):
            os.environ["INTERNVL_EDGE_KERNELS"] = mode
            kernels.library_path.cache_clear()
            model = internvl_edge.load(args.bundle, threads=args.threads)
            weights = decoder_bytes_per_token(model)
            prefill = [time_prefill(model, n, 1) for n in (256, 1024)]
            decode = []
            for ctx in (300, 1500):
                tps, _ = time_decode(model, ctx, 32, 2)
                roofline = read_bandwidth(args.threads, 0.5, 3) * 1e9 / (weights + kv_bytes(model, ctx))
                decode.append(f"{tps:.1f} ({100 * tps / roofline:.0f}%)")
            print(f"{rnd} | {mode} | {model.backend.q4_kernel} | {model.backend.attention_kernel} | "
                  f"{prefill[0]:.0f} / {prefill[1]:.0f} | {decode[0]} | {decode[1]}", flush=True)  # fmt: skip
            del model


if __name__ == "__main__":
    main()
