"""Soak: `internvl-edge serve` under a busy deployment's load for a bounded time, loopback only (not run in CI).

    python benchmarks/soak.py --bundle BUNDLE --clients 8 --minutes 30 --parallel 4 --max-queue 16

It starts the server on a free 127.0.0.1 port (or uses --url, which must be a loopback address, with
--pid for its memory), then for --minutes runs --clients client threads, each sending one request after
another, drawn at random (--seed) from:
  stream      a streamed answer (text, or one image as a data URL), 16-128 tokens
  whole       the same, not streamed
  disconnect  a stream its client closes after a few chunks (the server must log it as cancelled)
  hostile     a bad body (broken JSON, wrong types, max_tokens 2**64+1 or 1e9, an image that is not one,
              no messages): each must be a 4xx OpenAI error object, never a 5xx
  greedy      THE fixed greedy request (one image, --greedy-tokens tokens), compared token for token
              with the same request sent alone before the load started
and every --burst-every seconds a burst of --burst-size short requests at once (200 or 429 expected).
A sampler reads /health every 0.5 s (a request waiting while a slot is free is counted) and the
server's RSS every 10 s. When the time is up the server gets SIGTERM: its graceful stop ends what is
still in flight (timed; its exit status and log checked for tracebacks). Clients back off 1 s after a
429, a 5xx or a refused connection, as real clients do.

Reports (printed, and as JSON with --json-out): outcomes by kind and status, time to first token
p50/p95 from the client, split by the server's `timings` into queue (arrival to slot) and prefill
(slot to first token: vision, embedding, prefill), greedy mismatches against the request alone (first
differing token index), idle-slot samples, RSS over time, and the stop.
"""

from __future__ import annotations

import argparse
import base64
import io
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter

import httpx
import numpy as np
from PIL import Image

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "List ten uses for a paperclip.",
    "Explain how a bicycle gear works.",
    "Describe a walk through a forest in autumn.",
]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def image_url(seed: int, size: int = 448) -> str:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, args, url: str, model: str, pid: int | None):
        self.args, self.url, self.model, self.pid = args, url, model, pid
        self.lock = threading.Lock()
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (kind, status) -> count
        self.ttft, self.queue, self.prefill = [], [], []
        self.mismatches: list[int] = []  # first differing token index of each mismatching greedy run
        self.greedy_runs = 0
        self.idle_slot_samples = 0
        self.health_samples = 0
        self.max_waiting = 0
        self.rss: list[tuple[float, float]] = []
        self.image = image_url(args.seed)
        self.greedy_body = {
            "model": model,
            "max_tokens": args.greedy_tokens,
            "return_token_ids": True,
            "max_tiles": 1,
            "messages": self.user("Describe the image in detail.", image=True),
        }
        self.reference: list[int] = []
        self.stop = threading.Event()
        self.on_end = None  # called when the time is up, before the clients are joined

    def user(self, text: str, image: bool = False) -> list[dict]:
        parts = [{"type": "text", "text": text}]
        if image:
            parts.append({"type": "image_url", "image_url": {"url": self.image}})
        return [{"role": "user", "content": parts}]

    def count(self, kind: str, status: str) -> None:
        with self.lock:
            self.outcomes[(kind, status)] += 1
        if not status.startswith(("200", "4", "closed")) or status.startswith("429"):
            time.sleep(1.0)  # a busy or stopping server: back off as clients do (openai's retries wait too)

    # -- requests ----------------------------------------------------------------------------------
    def stream(self, body: dict, kind: str, close_after: int | None = None) -> list[int] | None:
        """A streamed request; returns its token ids (None when it failed or was closed)."""
        sent = time.perf_counter()
        first, ids, timings = None, [], None
        try:
            with httpx.stream(
                "POST",
                self.url + "/v1/chat/completions",
                timeout=900,
                json={**body, "stream": True, "return_token_ids": True},
            ) as r:
                if r.status_code != 200:
                    r.read()
                    self.count(kind, str(r.status_code))
                    return None
                chunks = 0
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.count(kind, f"stream error {event['error'].get('code')}")
                        return None
                    for choice in event.get("choices", []):
                        if choice.get("token_ids") and first is None:
                            first = time.perf_counter()
                        ids += choice.get("token_ids") or []
                        timings = choice.get("timings") or timings
                    chunks += 1
                    if close_after is not None and chunks >= close_after:
                        self.count(kind, "closed by client")
                        return None
        except httpx.HTTPError as e:
            self.count(kind, f"transport {type(e).__name__}")
            return None
        self.count(kind, "200")
        if first is not None and timings:
            with self.lock:
                self.ttft.append(first - sent)
                self.queue.append(timings["queue_s"])
                self.prefill.append(timings["ftl_s"] - timings["queue_s"])
        return ids

    def whole(self, body: dict, kind: str) -> None:
        try:
            r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=900)
            ok = "choices" in r.json() if r.status_code == 200 else "message" in r.json().get("error", {})
            self.count(kind, str(r.status_code) if ok else f"{r.status_code} not an OpenAI object")
        except (httpx.HTTPError, ValueError) as e:
            self.count(kind, f"transport {type(e).__name__}")

    def hostile(self, rng: random.Random) -> None:
        m = self.model
        broken_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        bodies = [
            b"{not json",
            b'{"model": "x", "messages": [',
            json.dumps({"model": m}).encode(),
            json.dumps({"model": m, "messages": "hi"}).encode(),
            json.dumps({"model": m, "max_tokens": 2**64 + 1, "messages": self.user("Hi")}).encode(),
            json.dumps({"model": m, "max_tokens": 1e9, "messages": self.user("Hi")}).encode(),
            json.dumps({"model": m, "temperature": "hot", "messages": self.user("Hi")}).encode(),
            json.dumps({"model": m, "messages": [{"role": "user", "content": [broken_image]}]}).encode(),
            b"[" * 100000,
        ]
        body = rng.choice(bodies)
        try:
            r = httpx.post(
                self.url + "/v1/chat/completions",
                content=body,
                timeout=120,
                headers={"Content-Type": "application/json"},
            )
            error_object = "error" in r.json() and "message" in r.json()["error"]
            self.count("hostile", str(r.status_code) if error_object else f"{r.status_code} not an error object")
        except (httpx.HTTPError, ValueError) as e:
            self.count("hostile", f"transport {type(e).__name__}")

    def greedy(self) -> None:
        ids = self.stream(self.greedy_body, "greedy")
        if ids is None:
            return
        with self.lock:
            self.greedy_runs += 1
            if ids != self.reference:
                # the first differing token; a run that stops early differs where the shorter one ends
                pairs = zip(ids, self.reference, strict=False)
                diff = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ids), len(self.reference)))
                self.mismatches.append(diff)

    def one(self, rng: random.Random) -> None:
        kind = rng.choices(["stream", "whole", "disconnect", "hostile", "greedy"], [4, 2, 2, 2, 1])[0]
        text = rng.choice(PROMPTS)
        body = {
            "model": self.model,
            "max_tokens": rng.randint(16, 128),
            "max_tiles": 1,
            "messages": self.user(text, image=rng.random() < 0.3),
        }
        if kind == "stream":
            self.stream(body, kind)
        elif kind == "whole":
            self.whole(body, kind)
        elif kind == "disconnect":
            self.stream({**body, "max_tokens": 256}, kind, close_after=rng.randint(2, 12))
        elif kind == "hostile":
            self.hostile(rng)
        else:
            self.greedy()

    # -- threads -----------------------------------------------------------------------------------
    def client(self, i: int) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        while not self.stop.is_set():
            self.one(rng)

    def bursts(self) -> None:
        while not self.stop.wait(self.args.burst_every):
            body = {"model": self.model, "max_tokens": 8, "messages": self.user("Say hi.")}
            threads = [threading.Thread(target=self.whole, args=(body, "burst")) for _ in range(self.args.burst_size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def sampler(self, started: float) -> None:
        last_rss = -1e9
        while not self.stop.wait(0.5):
            try:
                h = httpx.get(self.url + "/health", timeout=10).json()
            except (httpx.HTTPError, ValueError):
                continue
            with self.lock:
                self.health_samples += 1
                self.max_waiting = max(self.max_waiting, h.get("waiting", 0))
                if h.get("waiting", 0) > 0 and h.get("active", 0) < h.get("parallel", 0):
                    self.idle_slot_samples += 1
            now = time.monotonic()
            if self.pid and now - last_rss >= 10:
                last_rss = now
                mb = rss_mb(self.pid)
                if mb is not None:
                    self.rss.append((round(now - started, 1), round(mb, 1)))

    def run(self) -> dict:
        ref = self.stream(self.greedy_body, "greedy alone")
        if ref is None:
            raise SystemExit("the greedy reference request failed; is the server serving?")
        self.reference = ref
        started = time.monotonic()
        threads = [threading.Thread(target=self.client, args=(i,)) for i in range(self.args.clients)]
        threads += [threading.Thread(target=self.bursts), threading.Thread(target=self.sampler, args=(started,))]
        for t in threads:
            t.start()
        self.stop.wait(self.args.minutes * 60)
        self.stop.set()
        elapsed = time.monotonic() - started
        if self.on_end is not None:
            self.on_end()  # the graceful stop ends what is still in flight (bounded by --drain-timeout)
        for t in threads:
            t.join()

        def ms(values):
            return {
                q: None if v is None else round(v, 3)
                for q, v in [("p50", percentile(values, 50)), ("p95", percentile(values, 95))]
            }

        return {
            "minutes": round(elapsed / 60, 2),
            "clients": self.args.clients,
            "outcomes": {f"{k} {s}": n for (k, s), n in sorted(self.outcomes.items())},
            "ttft_s": ms(self.ttft),
            "queue_s": ms(self.queue),
            "prefill_s": ms(self.prefill),
            "greedy_runs": self.greedy_runs,
            "greedy_mismatches": len(self.mismatches),
            "first_differing_tokens": sorted(Counter(self.mismatches).items()),
            "health_samples": self.health_samples,
            "idle_slot_while_waiting_samples": self.idle_slot_samples,
            "max_waiting": self.max_waiting,
            "rss_mb": self.rss,
        }


def loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def start_server(args) -> tuple[subprocess.Popen, str, str, list[str]]:
    cmd = [sys.executable, "-m", "internvl_edge", "serve", "-m", args.bundle, "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--parallel", str(args.parallel), "--max-queue", str(args.max_queue)]
    cmd += ["--drain-timeout", str(args.drain_timeout)] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    log: list[str] = []
    for line in iter(proc.stderr.readline, ""):
        log.append(line)
        if line.startswith("serving "):
            url = line.split(" on ")[1].split()[0].removesuffix("/v1")
            threading.Thread(target=lambda: log.extend(iter(proc.stderr.readline, "")), daemon=True).start()
            return proc, url, os.path.basename(os.path.normpath(args.bundle)), log
    proc.wait()
    raise SystemExit(f"the server did not start (exit status {proc.returncode}):\n{''.join(log)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle to serve (starts `internvl-edge serve` on a free loopback port)")
    p.add_argument("--url", help="an already running server on a loopback address instead")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's process id (for its RSS)")
    p.add_argument("--model", default=None, help="model id (default: the bundle folder's name)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts (default 60)")
    p.add_argument("--burst-size", type=int, default=20)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the report here (JSON)")
    args = p.parse_args()
    if bool(args.bundle) == bool(args.url):
        p.error("give --bundle or --url")
    proc, log = None, []
    if args.bundle:
        proc, url, model, log = start_server(args)
        pid = proc.pid
    else:
        if not loopback(args.url):
            p.error("--url must be a loopback address (this benchmark loads a server hard)")
        url, model, pid = args.url.rstrip("/"), args.model, args.pid
    soak, stop = Soak(args, url, args.model or model, pid), {}

    def graceful_stop():
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            stop["exit_status"] = proc.wait(args.drain_timeout + 300)  # the engine's step in progress ends first
        except subprocess.TimeoutExpired:
            proc.kill()
            stop["exit_status"] = "killed"
        stop["seconds"] = round(time.monotonic() - stopping, 2)

    if proc is not None:
        soak.on_end = graceful_stop
    report = soak.run()
    if proc is not None:
        time.sleep(0.2)
        text = "".join(log)
        report["stop"] = {
            **stop,
            "tracebacks_in_log": text.count("Traceback"),
            "cancelled_in_log": sum(" cancelled " in line for line in log),
        }
    print(json.dumps(report, indent=1))
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
