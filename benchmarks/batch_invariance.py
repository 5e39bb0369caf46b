"""What batch invariance costs: prefill and decode speed (a batch of 1 and of 4) of one bundle with
the kernels of the checkout it runs from, one JSON line per round.

The kernels compute every row in one order whatever shares its decoder call (README, "Serving"); the
4-bit linears have no other order left, prefill attention keeps its tiled path behind
INTERNVL_EDGE_BATCH_INVARIANT=0. So the cost is measured against the same script run from a checkout
of the kernels before the change (its own `python setup.py build_ext --inplace`), and against the
opt-out, alternating the runs so that a shared machine's drift falls on all of them alike:

    python benchmarks/batch_invariance.py BUNDLE                        # invariant (the default)
    INTERNVL_EDGE_BATCH_INVARIANT=0 python benchmarks/batch_invariance.py BUNDLE
    PYTHONPATH=BEFORE python benchmarks/batch_invariance.py BUNDLE     # BEFORE: a checkout of the old kernels

Random token ids (no tokenizer, no image): prefill of --prompt tokens into an empty cache in the
bundle's chunks, then --steps greedy decode steps alone and with 4 sequences of that context.
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def measure(bundle: str, prompt: int, steps: int, rounds: int, threads: int | None) -> None:
    from internvl_edge import kernels
    from internvl_edge.api import load
    from internvl_edge.generate import prefill

    model = load(bundle, threads=threads, verify=False)
    backend = model.backend
    ids = np.random.default_rng(0).integers(100, 20000, size=(1, prompt))
    embeds = backend.embed(ids)[0]
    one, four = backend.new_cache(1), backend.new_cache(4)

    def decode(cache, rows: int) -> float:
        tokens = np.full((cache.batch, 1), 1000, np.int64)
        lens = np.zeros(cache.batch, np.int64)
        lens[:rows] = 1
        start = time.perf_counter()
        for _ in range(steps):
            logits = backend.forward(cache, backend.embed(tokens), lens)
            tokens[:, 0] = np.argmax(logits, axis=-1)
        return rows * steps / (time.perf_counter() - start)

    for r in range(rounds + 1):  # round 0 warms up (page faults, the pools' threads) and is not printed
        one.reset()
        start = time.perf_counter()
        prefill(backend, one, embeds)
        prefill_tps = prompt / (time.perf_counter() - start)
        four.reset()
        for slot in range(4):
            backend.copy_slot(one, 0, four, slot)
        single = decode(one, 1)
        batched = decode(four, 4)
        if r:
            print(
                json.dumps(
                    {
                        "kernels": os.path.dirname(kernels.__file__),
                        "q4_kernel": backend.q4_kernel,
                        "attention_kernel": backend.attention_kernel,
                        "batch_invariant": os.environ.get("INTERNVL_EDGE_BATCH_INVARIANT", "1") != "0",
                        "prompt": prompt,
                        "prefill_tps": round(prefill_tps, 2),
                        "decode_tps_batch1": round(single, 2),
                        "decode_tps_batch4": round(batched, 2),
                    }
                ),
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens prefilled (default 512)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement (default 16)")
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds after a warm-up one (default 2)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    measure(args.bundle, args.prompt, args.steps, args.rounds, args.threads)


if __name__ == "__main__":
    main()
