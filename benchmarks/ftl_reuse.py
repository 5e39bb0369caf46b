"""First-token latency of one tile + a ~40-word question, cold and warm, for each bundle given, in one
process each, one after the other; with each process's peak RSS against its bundle's weights.

    python benchmarks/ftl_reuse.py B [B ...] [--threads 2] [--repeats 1]

Cold: the image and prefix caches emptied before every request (what `bench` reports as
"1 tile + 40 tokens"). Warm: the same request repeated (image embeddings and the whole prompt
cached), and a new question about the same image (its embeddings and the system prompt and image's KV
cached; the question prefilled). The same cases as `internvl-edge bench`, without its other figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import numpy as np
from PIL import Image
from internvl_edge.api import load
from internvl_edge.bench import time_ftl
bundle, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
model = load(bundle, threads=threads)
load_s = time.perf_counter() - t0
picture = Image.fromarray((np.random.default_rng(1).random((448, 448, 3)) * 255).astype(np.uint8))
out = {"bundle": bundle, "dynamic": model.manifest.settings.dynamic, "load_s": load_s, "ftl_s": {}}
for case, warm in (("cold", ""), ("repeated", "repeat"), ("same image, new question", "new question")):
    out["ftl_s"][case] = time_ftl(model, picture, repeats, warm)
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["weight_bytes"] = model.manifest.weight_bytes
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for b in args.bundles:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, b, str(args.threads), str(args.repeats)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode:
            print(f"{b}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
            return 1
        r = json.loads(proc.stdout)
        ftl = r["ftl_s"]
        print(
            f"{b} ({'dynamic' if r['dynamic'] else 'static'}): load {r['load_s']:.2f} s; FTL 1 tile + 40 tokens: "
            f"cold {ftl['cold']:.2f} s, repeated {ftl['repeated']:.3f} s ({ftl['repeated'] / ftl['cold']:.3f}x), "
            f"same image, new question {ftl['same image, new question']:.2f} s "
            f"({ftl['same image, new question'] / ftl['cold']:.3f}x); peak RSS "
            f"{r['peak_rss_bytes'] / 1e9:.2f} GB ({r['peak_rss_bytes'] / r['weight_bytes']:.2f}x weights)"
        )
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
