"""Ray Serve layouts on one box, and what Ray adds per request (not run in CI; needs the ray extra).

    python benchmarks/ray_serve.py --bundle B2B --tiny TINY     # both parts
    python benchmarks/ray_serve.py --bundle B2B --streams 4,8 --max-tokens 32 --rounds 1

Part 1 (--bundle): the application (server/ray_app.py) on a local Ray bound to 127.0.0.1, with each
layout of --layouts (REPLICASxTHREADS: 1x2 is one replica with 2 threads, 2x1 two replicas with one
thread each; --parallel slots per replica = the largest level / replicas), N concurrent streams per level
as benchmarks/concurrency.py sends them (same prompt, `ignore_eos`, exactly --max-tokens tokens): total
tokens/s, TTFT p50/p95, and each replica's memory (RSS, and USS: what it holds alone; the weights are
memory-mapped, so replicas on one node share their pages).

Part 2 (--tiny): a tiny bundle's request latency (1-token answers, one at a time) through plain
`internvl-edge serve` against the application with one replica of one thread; the difference of the
medians is what the ingress and Ray's hops add per request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from concurrency import percentile, run_level, start_server, stream_once

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's single-node mode: 127.0.0.1 only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(serve, ray_app, bundle: str, name: str, replicas: int, threads: int, parallel: int) -> str:
    args = {
        "bundle": bundle,
        "replicas": replicas,
        "threads": threads,
        "parallel": parallel,
        "max_queue": 256,
        "served_model_name": "m",
    }
    settings = ray_app.RaySettings.from_args(args)
    serve.run(ray_app.build_app(settings), name=name, route_prefix=f"/{name}")
    url = f"{serve_url}/{name}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health", timeout=10).json()
        if len([r for r in h.get("replicas", []) if r["status"] == "ok"]) == replicas:
            return url
        time.sleep(0.2)
    raise SystemExit(f"{name}: the replicas did not report")


def replica_memory(url: str) -> list[dict]:
    import psutil

    out = []
    for r in httpx.get(url + "/health", timeout=10).json()["replicas"]:
        info = psutil.Process(r["pid"]).memory_full_info()
        out.append({"replica": r["replica"], "rss_mib": info.rss / 2**20, "uss_mib": info.uss / 2**20})
    return out


def latency(url: str, model: str, n: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    times = []
    with httpx.Client(timeout=60) as http:
        for i in range(n + 2):  # two warm-ups
            t0 = time.perf_counter()
            r = http.post(url + "/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise SystemExit(f"HTTP {r.status_code}: {r.text[:300]}")
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return {"p50_ms": statistics.median(times) * 1e3, "p95_ms": percentile(times, 95) * 1e3, "n": n}


def main() -> int:
    global serve_url
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle for the layouts (part 1)")
    p.add_argument("--tiny", help="tiny bundle for Ray's per-request overhead (part 2)")
    p.add_argument("--layouts", default="1x2,2x1", help="REPLICASxTHREADS list (default 1x2,2x1)")
    p.add_argument("--streams", default="4,8", help="concurrency levels (default 4,8)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per stream (default 32)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per level (default 1)")
    p.add_argument("--requests", type=int, default=40, help="requests for the overhead (default 40)")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    args = p.parse_args()
    if not args.bundle and not args.tiny:
        p.error("give --bundle and/or --tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve

        from internvl_edge.server import ray_app
    levels = [int(x) for x in args.streams.split(",")]
    port = free_port()
    serve_url = f"http://127.0.0.1:{port}"
    rows, overhead = [], {}
    ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for layout in args.layouts.split(",") if args.bundle else []:
            replicas, threads = (int(x) for x in layout.split("x"))
            parallel = max(1, -(-max(levels) // replicas))
            url = deploy(serve, ray_app, os.path.abspath(args.bundle), f"l{layout}", replicas, threads, parallel)
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": args.prompt}],
                "stream": True,
                "max_tokens": args.max_tokens,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            stream_once(url, body, None)  # warm-up
            for n in levels:
                row = run_level(url, body, None, n, args.rounds)
                rows.append({"layout": layout, "parallel": parallel, **row})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            rows[-1]["memory"] = memory = replica_memory(url)
            for r in rows[-len(levels) :]:
                r["memory"] = memory
            serve.delete(f"l{layout}")
        if args.tiny:
            url = deploy(serve, ray_app, os.path.abspath(args.tiny), "tiny", 1, 1, 1)
            overhead["ray"] = latency(url, "m", args.requests)
            serve.delete("tiny")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    if args.tiny:
        proc, url, model = start_server(args.tiny, 1, 1)
        try:
            overhead["plain"] = latency(url, model, args.requests)
        finally:
            proc.terminate()
            proc.wait(30)
    from internvl_edge.bench import machine_info

    info = {**machine_info(None), "load_average": os.getloadavg()}
    print(f"# {' '.join(sys.argv)}\n# {json.dumps(info)}")
    if rows:
        print(
            "| layout | slots/replica | streams | total tok/s | TTFT p50 (s) | TTFT p95 (s) "
            "| RSS / USS per replica (MiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            mem = ", ".join(f"{m['rss_mib']:.0f} / {m['uss_mib']:.0f}" for m in r["memory"])
            print(
                f"| {r['layout']} | {r['parallel']} | {r['streams']} | {r['total_tps']:.1f} | {r['ttft_p50_s']:.2f} "
                f"| {r['ttft_p95_s']:.2f} | {mem} |"
            )
    if overhead:
        plain, ray_ = overhead["plain"], overhead["ray"]
        print("\n| tiny bundle, 1-token answer | p50 (ms) | p95 (ms) |\n|---|---:|---:|")
        print(f"| plain `serve` | {plain['p50_ms']:.1f} | {plain['p95_ms']:.1f} |")
        print(f"| Ray Serve (1 replica) | {ray_['p50_ms']:.1f} | {ray_['p95_ms']:.1f} |")
        print(f"| Ray adds (p50) | {ray_['p50_ms'] - plain['p50_ms']:.1f} | |")
    print(json.dumps({"machine": info, "max_tokens": args.max_tokens, "rows": rows, "overhead": overhead}))
    return 0


serve_url = ""

if __name__ == "__main__":
    sys.exit(main())
