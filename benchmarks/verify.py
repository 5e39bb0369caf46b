"""Time and peak memory of `internvl-edge verify`, and its report, for one bundle.

Runs `internvl-edge verify -m BUNDLE --checkpoint SRC --json` in a child process (so the peak resident
memory is the command's own, from getrusage of the child) and prints one JSON line: wall time, peak
RSS, the bundle's weight bytes (the memory bound is bundle + 2 GB), and the report's summary and
attribution. The full report is written next to it with --report FILE. Not part of CI.

    internvl-edge make-checkpoint --size 2b ckpt_2b
    internvl-edge convert -m ckpt_2b --out_dir b_2b
    python benchmarks/verify.py -m b_2b --checkpoint ckpt_2b --steps 8 --report b_2b_verify.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from internvl_edge.bundle import load_manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model_path", required=True, help="bundle folder")
    ap.add_argument("--checkpoint", required=True, help="its source checkpoint")
    ap.add_argument("--steps", type=int, default=16, help="answer tokens per probe (verify's --steps)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--report", default=None, help="write the full JSON report here")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "internvl_edge", "verify", "-m", args.model_path, "--checkpoint", args.checkpoint]
    cmd += ["--steps", str(args.steps), "--json"] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "verify failed", file=sys.stderr)
        return proc.returncode
    report = json.loads(proc.stdout)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    weights = load_manifest(args.model_path, verify=False).weight_bytes
    keys = ("undone", "top1_agreement", "kl_mean", "kl_max")
    result = {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak / 1e9, 2),
        "bundle_weights_gb": round(weights / 1e9, 2),
        "summary": report["summary"],
        "attribution": [{k: a[k] for k in keys} for a in report["attribution"]],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
