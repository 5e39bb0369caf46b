"""Serving concurrency: 1, 2, 4, 8 concurrent streams against `internvl-edge serve` (not run in CI).

    python benchmarks/concurrency.py --bundle /path/to/bundle            # starts its own server
    python benchmarks/concurrency.py --url http://127.0.0.1:8000 --model NAME

For each level N it sends N streaming chat completions at once (the same prompt, `ignore_eos` so each
makes exactly --max-tokens tokens), --rounds times, and reports:
  total tok/s      all generated tokens / wall time of the round (first request sent -> last stream done)
  per-stream tok/s each stream's tokens after its first / time after its first token (mean over streams)
  TTFT p50 / p95   request sent -> first token, over every stream of every round
With --decode-steps it first times the batched decoder call alone (every row live) for each level;
--decode-only does only that (no server), e.g. for every batch size: --streams 1,2,3,4,5,6,7,8.
Decoding is memory bound, so N streams decoded in one batched call should give close to N times the
total tokens/s of one stream until compute or the KV reads dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def stream_once(url: str, body: dict, key: str | None) -> dict:
    """One streaming request: when it was sent, its first token, its end, and how many tokens."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sent = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event.get("choices", []):
                n = len(choice.get("token_ids") or [])
                if n and first is None:
                    first = time.perf_counter()
                tokens += n
    return {"sent": sent, "first": first, "end": time.perf_counter(), "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def run_level(url: str, body: dict, key: str | None, streams: int, rounds: int) -> dict:
    totals, per_stream, ttft = [], [], []
    for _ in range(rounds):
        with ThreadPoolExecutor(streams) as pool:
            results = list(pool.map(lambda _: stream_once(url, body, key), range(streams)))
        wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
        totals.append(sum(r["tokens"] for r in results) / wall)
        for r in results:
            ttft.append(r["first"] - r["sent"])
            if r["tokens"] > 1 and r["end"] > r["first"]:
                per_stream.append((r["tokens"] - 1) / (r["end"] - r["first"]))
    return {
        "streams": streams,
        "total_tps": statistics.median(totals),
        "per_stream_tps": statistics.mean(per_stream),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "samples": len(ttft),
    }


def decode_steps(bundle: str, sizes: list[int], context: int = 256, repeats: int = 5) -> list[dict]:
    """The decoder call alone, every row live at `context` cached tokens: median ms per step for each
    batch size, and the tokens/s that makes (what batching can buy once prefills are out of the way)."""
    import numpy as np

    from internvl_edge.api import load

    backend = load(bundle, verify=False).backend
    rows = []
    for n in sizes:
        cache = backend.new_cache(n)
        embeds = backend.embed(np.zeros((n, 1), np.int64))
        cache.lengths[:] = context
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            cache.lengths[:] = context
            t0 = time.perf_counter()
            backend.forward(cache, embeds, np.ones(n, np.int64))
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[1:])
        rows.append({"batch": n, "step_ms": step * 1e3, "tps": n / step})
    return rows


def start_server(bundle: str, parallel: int, threads: int | None) -> tuple[subprocess.Popen, str, str]:
    """`internvl-edge serve` on a free loopback port; returns the process, its URL and model name."""
    cmd = [sys.executable, "-m", "internvl_edge", "serve", "-m", bundle, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--parallel", str(parallel), "--max-queue", "256"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in iter(proc.stderr.readline, ""):
        if line.startswith("serving "):
            url = line.split(" on ")[1].split()[0].removesuffix("/v1")
            threading.Thread(target=lambda: [None for _ in iter(proc.stderr.readline, "")], daemon=True).start()
            return proc, url, os.path.basename(os.path.normpath(bundle))
    proc.wait()
    raise SystemExit(f"the server did not start (exit status {proc.returncode})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle to serve (starts `internvl-edge serve` on a free loopback port)")
    p.add_argument("--url", help="an already running server instead")
    p.add_argument("--model", default=None, help="model id (default: the bundle folder's name)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--streams", default="1,2,4,8", help="concurrency levels (default 1,2,4,8)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per level (default 2)")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (with --bundle)")
    p.add_argument(
        "--decode-steps",
        action="store_true",
        help="with --bundle: first time the batched decoder call alone for each level",
    )
    p.add_argument("--decode-only", action="store_true", help="with --bundle: the decoder calls alone, no server")
    args = p.parse_args()
    if bool(args.bundle) == bool(args.url):
        p.error("give --bundle or --url")
    if args.decode_only and not args.bundle:
        p.error("--decode-only needs --bundle")
    levels = [int(x) for x in args.streams.split(",")]
    steps = decode_steps(args.bundle, levels) if args.bundle and (args.decode_steps or args.decode_only) else []
    if args.decode_only:
        print(f"# {' '.join(sys.argv)}\n| batch | decoder call (ms) | tok/s |\n|---:|---:|---:|")
        for r in steps:
            print(f"| {r['batch']} | {r['step_ms']:.1f} | {r['tps']:.1f} |")
        return 0
    proc = None
    try:
        if args.bundle:
            proc, url, model = start_server(args.bundle, max(levels), args.threads)
        else:
            url, model = args.url.rstrip("/").removesuffix("/v1"), args.model
        body = {
            "model": model,
            "messages": [{"role": "user", "content": args.prompt}],
            "stream": True,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        stream_once(url, body, args.api_key)  # warm-up
        rows = [run_level(url, body, args.api_key, n, args.rounds) for n in levels]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    from internvl_edge.backends.base import available_cores
    from internvl_edge.bench import machine_info

    info = {**machine_info(args.threads or available_cores()), "load_average": os.getloadavg()}
    print(f"# {' '.join(sys.argv)}\n# {json.dumps(info)}")
    print("| streams | total tok/s | per-stream tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            f"{r['total_tps']:.1f}",
            f"{r['per_stream_tps']:.1f}",
            f"{r['ttft_p50_s']:.3f}",
            f"{r['ttft_p95_s']:.3f}",
        ]
        print(f"| {r['streams']} | " + " | ".join(cells) + " |")
    if steps:
        print("\n| batch | decoder call (ms) | tok/s |\n|---:|---:|---:|")
        for r in steps:
            print(f"| {r['batch']} | {r['step_ms']:.1f} | {r['tps']:.1f} |")
    print(json.dumps({"machine": info, "max_tokens": args.max_tokens, "rows": rows, "decode_steps": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
