"""Greedy decode steps in a loop for a sampling profiler to attach to, and where their threads' time went.

ONNX Runtime's profile (`internvl-edge bench --profile`) times each node, but not what the pool's
threads do between and inside them: a thread that has run out of work waits in the pool's spin loop
(`pause`), and that time shows up in no node. This decodes from a cache of `--context` random tokens
(rewound to it whenever it fills up) for `--seconds`, after a warm-up, so that `perf record` can
sample it, and prints the steps it made. With `--perf`, it samples a child doing that with `perf
record -p` from the end of the warm-up on (Linux perf must be installed) and prints, per thread, the
share of its samples in our kernels, in ONNX Runtime (most of which is the pool's spin loop: its
hottest address follows a `pause`) and elsewhere. Not part of CI.

    python benchmarks/decode_loop.py --bundle B --perf
    python benchmarks/decode_loop.py --bundle B --seconds 20 &   # then perf record -p its pid
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def decode(bundle: str, threads: int, context: int, seconds: float) -> None:
    import internvl_edge
    from internvl_edge.bench import _greedy_steps, _prefilled

    model = internvl_edge.load(bundle, threads=threads)
    cache, token = _prefilled(model, context)
    token = _greedy_steps(model.backend, cache, token, 8)  # warm-up
    print("decoding", flush=True)  # --perf starts sampling here
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        token = _greedy_steps(model.backend, cache, token, 1)
        steps += 1
        if cache.lengths[0] >= model.backend.seq_length - 1:
            cache.lengths[:] = context
    elapsed = time.perf_counter() - start
    print(f"{steps} steps in {elapsed:.1f} s: {steps / elapsed:.1f} tok/s", flush=True)


def shares(data: str) -> None:
    """Per thread: its share of all samples, and of its own samples in our library, ORT and the rest."""
    report = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "--sort", "pid,dso", "-g", "none", "--stdio"],
        capture_output=True,
        text=True,
    )
    threads: dict[str, dict[str, float]] = {}
    for line in report.stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%") or line.lstrip().startswith("#"):
            continue
        share, tid, dso = float(parts[0][:-1]), parts[1], parts[2]
        kind = "ours" if dso.startswith("_q4") else "onnxruntime" if "onnxruntime" in dso else "other"
        threads.setdefault(tid, {"ours": 0.0, "onnxruntime": 0.0, "other": 0.0})[kind] += share
    print("| thread | share of all samples | in our kernels | in ONNX Runtime | elsewhere |")
    print("|---|---:|---:|---:|---:|")
    for tid, kinds in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(kinds.values())
        if total < 1.0:
            continue
        cells = " | ".join(f"{100 * kinds[k] / total:.1f}%" for k in ("ours", "onnxruntime", "other"))
        print(f"| {tid} | {total:.1f}% | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--perf", action="store_true", help="run under perf record and print the threads' shares")
    args = ap.parse_args()
    if not args.perf:
        decode(args.bundle, args.threads, args.context, args.seconds)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "decode.data")
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--bundle",
                args.bundle,
                "--threads",
                str(args.threads),
                "--context",
                str(args.context),
                "--seconds",
                str(args.seconds + 2),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in child.stdout:  # load, prefill and warm-up are not sampled
            if line.strip() == "decoding":
                break
        subprocess.run(
            ["perf", "record", "-F", "2000", "-q", "-o", data, "-p", str(child.pid), "--", "sleep", str(args.seconds)],
            check=True,
        )
        print(child.stdout.read().strip(), flush=True)
        child.wait()
        shares(data)


if __name__ == "__main__":
    main()
