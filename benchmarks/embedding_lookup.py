"""The token embedding right after a decode step: the embedding net's ONNX Runtime session against
the numpy table lookup the CPU backend uses (internvl_edge/embedding_table.py).

A bundle is loaded and a cache prefilled with 300 random tokens; then, round after round, one decode
step runs and is followed by one embedding of a random token, by the session and by the lookup in
turn (so both find the caches as decode leaves them). Milliseconds per embedding, medians. Not part
of CI.

    python benchmarks/embedding_lookup.py --bundle B --threads 2 --rounds 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from internvl_edge import bench
from internvl_edge.api import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    model = load(args.bundle, threads=args.threads)
    backend = model.backend
    if backend.embedding_lookup is None:
        raise SystemExit("error: this bundle's embedding net is not a plain table lookup")
    session = backend._session("embedding")
    ways = {
        "onnxruntime session": lambda ids: session.run(None, {"input_ids": ids})[0],
        "numpy table lookup": backend.embedding_lookup,
    }
    cache, token = bench._prefilled(model, 300)
    rng = np.random.default_rng(0)
    ms = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            backend.forward(cache, backend.embed(np.array([[token]], np.int64)), [1])
            cache.lengths[:] = 300  # every step at the same context
            ids = rng.integers(0, backend.vocab, size=(1, 1))
            t0 = time.perf_counter()
            way(ids)
            ms[name].append((time.perf_counter() - t0) * 1000)
    print("| embedding of one token after a decode step | ms (median) | ms (mean) |\n|---|---:|---:|")
    for name, xs in ms.items():
        print(f"| {name} | {np.median(xs):.4f} | {np.mean(xs):.4f} |")


if __name__ == "__main__":
    main()
