"""Decode against the roofline by the state the memory was in: the bench's step-by-step figures of
several runs, each run's decode put in the state its probe readings give.

This machine's memory switches between a slow state (the probe reads 40-52 GB/s) and a fast one
(58-68 GB/s), for minutes at a time. `internvl-edge bench --json` pairs every timed decode step with
a read of its quarter-GiB probe right after it (`decode_pairs`) and sums them into one fraction per
context (bench.paired_fraction). This lists, for every JSON file given and context, the median of the
probe's readings, the state that puts the run in (fast from FAST_GBS on) and the bench's fraction;
then each state's steps pooled, with the same formula. A run is put in a state as a whole: put one
step at a time by its own reading, a reading that came out low by chance would lift its step's
fraction and a high one lower it, so the bands would differ by that alone. Not part of CI.

    for i in 1 2 3; do internvl-edge bench -m B --threads 2 --json > run$i.json; done
    python benchmarks/paired_states.py run*.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from internvl_edge.bench import paired_fraction  # noqa: E402

FAST_GBS = 58.0  # the probe's median reading from which a run counts as in the fast state


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON files of internvl-edge bench --json")
    args = ap.parse_args(argv)
    runs = []
    for path in args.runs:
        try:
            with open(path, encoding="utf-8") as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            return 2
    try:
        keys = {(r["bundle"]["path"], r["probe_bytes"], json.dumps(r["bytes_per_token"], sort_keys=True)) for r in runs}
    except (KeyError, TypeError):
        print("error: not the JSON of internvl-edge bench --json on the ONNX Runtime backend", file=sys.stderr)
        return 2
    if len(keys) != 1:
        print("error: the runs are of different bundles or probe sizes", file=sys.stderr)
        return 2
    first = runs[0]
    per_token, probe = first["bytes_per_token"], first["probe_bytes"]
    print(f"{len(runs)} runs of {first['bundle']['path']}, {first['machine']['threads']} threads")
    print("| run | context | probe GB/s (median) | state | fraction of the roofline, step by step |")
    print("|---|---|---:|---|---:|")
    pooled: dict[tuple[str, str], list] = {}
    figures: dict[tuple[str, str], list[float]] = {}
    for path, run in zip(args.runs, runs, strict=True):
        for ctx, pairs in run.get("decode_pairs", {}).items():
            gbs = median([p[1] for p in pairs])
            state = "fast" if gbs >= FAST_GBS else "slow"
            fraction = paired_fraction(pairs, per_token[ctx], probe)
            pooled.setdefault((ctx, state), []).extend(pairs)
            figures.setdefault((ctx, state), []).append(fraction)
            print(f"| {os.path.basename(path)} | {ctx} | {gbs:.1f} | {state} | {100 * fraction:.1f}% |")
    print("\n| context | state | runs | steps | fraction, the state's steps pooled | the runs' own |")
    print("|---|---|---:|---:|---:|---:|")
    for key in sorted(pooled, key=lambda k: (int(k[0]), k[1])):
        own = figures[key]
        print(
            f"| {key[0]} | {key[1]} | {len(own)} | {len(pooled[key])} | "
            f"{100 * paired_fraction(pooled[key], per_token[key[0]], probe):.1f}% | "
            f"{100 * min(own):.1f}-{100 * max(own):.1f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
