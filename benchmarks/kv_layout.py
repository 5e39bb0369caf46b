"""Decode speed by where the KV cache lies in memory, on one bundle, in one process.

The runtime allocates every layer's key and value buffers at a page boundary (backends/ort.py, aligned_zeros).
This times greedy decode steps at contexts 300 and 1500 from caches allocated three ways, taking turns
round after round with the same sessions: "aligned" (as the runtime does), "numpy" (16 bytes past a
64-byte boundary, where numpy's own large arrays start, as the runtime's caches did before), and
"2 MB pages" (aligned to 2 MB and madvised for transparent huge pages: faster streaming, but a
partly used cache is held in whole huge pages). Medians of ms per token and the median per-round
ratio against "aligned". `--probe` reads the bench's bandwidth probe (a quarter GiB) before every
step, as its step-by-step roofline does, and times the steps alone. Not part of CI.

    python benchmarks/kv_layout.py --bundle B --threads 2 --rounds 20
    python benchmarks/kv_layout.py --bundle B --threads 2 --rounds 30 --probe
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np

from internvl_edge import bench
from internvl_edge.api import load
from internvl_edge.backends import ort

CONTEXTS = (300, 1500)
STEPS = 8
MADV_HUGEPAGE = 14  # <linux/mman.h>
HUGE_PAGE = 2 << 20
ALIGNED = ort.aligned_zeros  # the runtime's own, before main() swaps others in


def numpy_placed(shape, dtype=np.float32, align=4096):
    """Zeros 16 bytes past a 64-byte boundary, as np.zeros places a large array."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return ALIGNED((count + 16 // dtype.itemsize,), dtype, align=64)[16 // dtype.itemsize :].reshape(shape)


def huge_paged(shape, dtype=np.float32, align=4096):
    """Zeros on a 2 MB boundary, their whole 2 MB pages madvised for transparent huge pages."""
    array = ALIGNED(shape, dtype, align=HUGE_PAGE)
    if array.nbytes >= HUGE_PAGE:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(array.ctypes.data, array.nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return array


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--probe", action="store_true", help="read the bench's probe array before every step")
    args = ap.parse_args()
    model = load(args.bundle, threads=args.threads)
    probe = bench.ReadProbe(model.backend.threads or 1, bench.PAIRED_PROBE_GIB) if args.probe else None
    allocators = {"aligned": ALIGNED, "numpy": numpy_placed, "2 MB pages": huge_paged}
    caches = {}
    for name, allocate in allocators.items():
        ort.aligned_zeros = allocate  # what new_cache() allocates with
        for ctx in CONTEXTS:
            caches[name, ctx] = bench._prefilled(model, ctx)
        ort.aligned_zeros = ALIGNED
    ms = {key: [] for key in caches}
    for rnd in range(args.rounds):
        for (name, ctx), (cache, token) in caches.items():
            cache.lengths[:] = ctx  # every round decodes the same positions
            spent, next_token = 0.0, token
            for _ in range(STEPS):
                if probe:
                    probe.read()
                t0 = time.perf_counter()
                next_token = bench._greedy_steps(model.backend, cache, next_token, 1)
                spent += time.perf_counter() - t0
            ms[name, ctx].append(spent / STEPS * 1000)
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
    print("\n| KV cache | " + " | ".join(f"decode @{c}: ms/token, speed vs aligned" for c in CONTEXTS) + " |")
    print("|---|" + "---:|" * len(CONTEXTS))
    for name in allocators:
        cells = []
        for ctx in CONTEXTS:
            ratio = statistics.median(a / m for m, a in zip(ms[name, ctx], ms["aligned", ctx], strict=True))
            cells.append(f"{statistics.median(ms[name, ctx]):.2f}, {ratio:.3f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
