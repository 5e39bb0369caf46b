"""The server under load and while it stops, as an operator runs it: `internvl-edge serve` in a
subprocess on 127.0.0.1 (a free port), the official `openai` client and raw HTTP. Admission fills every
free slot; SIGTERM drains (503 for new requests, answers in progress finish or end with an error event
after --drain-timeout, exit status 0, no traceback); max_tokens is bounded by the context and
--max-tokens; a stream its client leaves is logged as cancelled."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from openai import OpenAI
from test_server import LOOPBACK, NAME, data_url, serving, user

LONG = {"max_tokens": 1500, "ignore_eos": True}  # 0.2 s alone on the tiny model, longer side by side in the server


@pytest.fixture(scope="module")
def greedy_bundle(bundle):
    return bundle("tiny_bf16", "w4bf16")


class Serve:
    """`internvl-edge serve` in a subprocess; its stderr collected line by line."""

    def __init__(self, bundle_path: str, *flags: str):
        argv = [sys.executable, "-m", "internvl_edge", "serve", "-m", bundle_path, "--host", LOOPBACK, "--port", "0"]
        argv += ["--served-model-name", NAME, *flags]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        lines = iter(self.proc.stderr.readline, "")
        self.reader = threading.Thread(target=self.lines.extend, args=(lines,), daemon=True)
        self.reader.start()
        self.url = self.line_with("serving ", timeout=300).split(" on ")[1].split()[0].removesuffix("/v1")

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def line_with(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if needle in line]
            if found:
                return found[0]
            assert self.proc.poll() is None or self.reader.is_alive(), self.log
            time.sleep(0.02)
        raise AssertionError(f"no {needle!r} in the log:\n{self.log}")

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)

    def post(self, body: dict) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=60)

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def wait_for(self, condition, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health().json()
            if condition(h):
                return h
            time.sleep(0.01)
        raise AssertionError(f"never reached: {self.health().json()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.reader.join(10)


@contextmanager
def serve(bundle_path: str, *flags: str):
    s = Serve(bundle_path, *flags)
    try:
        yield s
    finally:
        s.stop()


def raw_stream(url: str, body: dict, events: list, started: threading.Event | None = None) -> None:
    """POST a streamed request and keep every `data:` payload (JSON decoded, or the string [DONE])."""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        events.append(("status", r.status_code))
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                if started is not None:
                    started.set()


def body(text: str, **kw) -> dict:
    return {"model": NAME, "messages": user(text), **kw}


def test_admission_fills_every_free_slot(greedy_bundle):
    parallel, requests = 4, 12
    with serve(greedy_bundle, "--parallel", str(parallel), "--max-queue", "16") as s:
        samples: list[tuple[float, dict]] = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                samples.append((time.monotonic(), s.health().json()))

        watcher = threading.Thread(target=watch)
        watcher.start()
        results = [[] for _ in range(requests)]
        threads = [
            threading.Thread(
                target=raw_stream, args=(s.url, body(f"Count to {i}.", max_tokens=200, ignore_eos=True), results[i])
            )
            for i in range(requests)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        watcher.join(10)
        assert all(r[0] == ("status", 200) and r[-1] == "[DONE]" for r in results)
        assert all(r[-2]["choices"][0]["finish_reason"] == "length" for r in results)
        # every admitted request counts (active = preparing + prefilling + decoding), and the load filled the slots
        for _, h in samples:
            assert h["active"] == h["preparing"] + h["prefilling"] + h["decoding"] <= parallel
        assert any(h["active"] == parallel and h["waiting"] > 0 for _, h in samples)
        # a request waits while a slot is free only until the engine's next step (one admission at most)
        longest, since = 0.0, None
        for t, h in samples:
            idle_slot_while_waiting = h["waiting"] > 0 and h["active"] < parallel
            since = (since or t) if idle_slot_while_waiting else None
            longest = max(longest, t - since) if since else longest
        assert longest < 0.5, longest


def test_sigterm_lets_streams_finish_refuses_new_requests_and_exits_0(greedy_bundle):
    with serve(greedy_bundle, "--parallel", "2", "--drain-timeout", "60") as s:
        streams = [[] for _ in range(3)]  # two decoding, one waiting for a slot
        started = [threading.Event() for _ in streams]
        threads = [
            threading.Thread(target=raw_stream, args=(s.url, body(f"Story {i}.", **LONG), ev, st))
            for i, (ev, st) in enumerate(zip(streams, started, strict=True))
        ]
        for t in threads:
            t.start()
        s.wait_for(lambda h: h["decoding"] == 2 and h["waiting"] == 1)
        stopped = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        h = s.health()
        assert h.status_code == 503 and h.json()["status"] == "draining"
        refused = s.post(body("Hi", max_tokens=2))
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "unavailable" and "shutting down" in error["message"]
        with pytest.raises(Exception) as e:
            s.client().chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=2)
        assert getattr(e.value, "status_code", None) == 503
        for t in threads:
            t.join(120)
        assert s.proc.wait(60) == 0, s.log
        assert time.monotonic() - stopped < 60
    for events in streams:  # the waiting one was admitted and finished too
        assert events[0] == ("status", 200) and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["delta"].get("content") or "") > 0 for e in events[1:-1]) > 0
    assert "Traceback" not in s.log and "3 requests finished, 0 ended" in s.log, s.log


def test_a_drain_timeout_shorter_than_the_answers_ends_them_with_an_error_event(greedy_bundle):
    # 0 s: the answers end as the drain starts. With a fraction of a second, the tiny model could
    # finish an answer of 1500 tokens inside it when the second request was admitted late.
    with serve(greedy_bundle, "--parallel", "2", "--drain-timeout", "0") as s:
        streamed, started = [], threading.Event()
        stream = threading.Thread(target=raw_stream, args=(s.url, body("A long story.", **LONG), streamed, started))
        stream.start()
        whole: list = []
        answer = threading.Thread(target=lambda: whole.append(s.post(body("Another long story.", **LONG))))
        answer.start()
        started.wait(60)
        s.wait_for(lambda h: h["decoding"] == 2)
        s.proc.send_signal(signal.SIGTERM)
        stream.join(60)
        answer.join(60)
        assert s.proc.wait(60) == 0, s.log
    assert streamed[0] == ("status", 200) and streamed[-1] == "[DONE]"
    error = streamed[-2]["error"]
    assert error["code"] == "unavailable" and "--drain-timeout" in error["message"]
    assert not any(e["choices"][0]["finish_reason"] for e in streamed[1:-2])
    assert whole[0].status_code == 503 and whole[0].json()["error"]["code"] == "unavailable"
    assert "Traceback" not in s.log and "0 requests finished, 2 ended" in s.log, s.log


def test_max_tokens_is_bounded_by_the_context_and_the_servers_cap(greedy_bundle):
    with serving(greedy_bundle, parallel=2) as s:
        ctx = s.model.seq_length
        for n in (ctx, 2**64 + 1, 1e9):
            r = s.post(body("Hi", max_tokens=n), key=None)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "max_tokens" and f"context ({ctx} tokens)" in err["message"]
        prompt = s.post(body("Hi", max_tokens=1, return_token_ids=True), key=None).json()["usage"]["prompt_tokens"]
        assert s.post(body("Hi", max_tokens=ctx - prompt), key=None).status_code == 200
        assert s.post(body("Hi", max_tokens=ctx - prompt + 1), key=None).status_code == 400
    with serve(greedy_bundle, "--max-tokens", "20") as s:
        r = s.post(body("Hi", max_tokens=21))
        assert r.status_code == 400 and "--max-tokens 20" in r.json()["error"]["message"]
        r = s.post(body("Hi", ignore_eos=True))  # no max_tokens: the cap
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20


def test_a_stream_its_client_leaves_is_logged_as_cancelled(greedy_bundle):
    with serve(greedy_bundle) as s:
        stream = s.client().chat.completions.create(
            model=NAME, messages=user("A long story."), stream=True, extra_body={"ignore_eos": True}, max_tokens=1500
        )
        first = next(iter(stream))
        stream.close()
        line = s.line_with(first.id)
        assert " cancelled stream " in line and " 200 " not in line, line
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
        assert 'internvl_edge_requests_total{status="cancelled"} 1' in metrics


def test_greedy_answers_under_concurrent_load_equal_the_request_alone(bundle, images):
    """On a model wide enough that batched and single reductions would differ (hidden 1024): the same
    greedy request, its prompt longer than one prefill chunk, gives the same whole answer (token ids and
    logprobs to the last bit) alone and while 7 other requests (text, images, sampling) share the
    decoder calls and the admission's prefill chunks with it."""
    path = bundle("mid_bf16", "w4bf16")
    image = data_url(images["wide"])
    probe = {
        "model": NAME,
        "messages": user("Describe the picture in detail. " * 20, image),
        "max_tokens": 24,
        "logprobs": True,
        "return_token_ids": True,
        "ignore_eos": True,
    }
    others = [
        {
            "model": NAME,
            "max_tokens": 40,
            "ignore_eos": True,
            "messages": user(f"Question {i}: what is it?", *([image] if i % 2 else [])),
            **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {}),
        }
        for i in range(7)
    ]
    with serving(path, parallel=4, max_queue=16) as s:
        alone = s.post(probe, key=None).json()
        assert alone["usage"]["prompt_tokens"] > 2 * s.app.state.engine.prefill_chunk
        with ThreadPoolExecutor(10) as pool:
            crowd = [pool.submit(s.post, b, key=None) for b in others[:3]]
            crowd += [pool.submit(s.post, probe, key=None)] + [pool.submit(s.post, b, key=None) for b in others[3:]]
            crowd += [pool.submit(s.post, probe, key=None)]
            answers = [f.result().json() for f in crowd]
    loaded = [a for a in answers if a.get("prompt_token_ids") == alone["prompt_token_ids"]]
    assert len(loaded) == 2 and all("choices" in a for a in answers)
    for a in loaded:
        assert a["choices"][0]["token_ids"] == alone["choices"][0]["token_ids"]
        assert a["choices"][0]["logprobs"] == alone["choices"][0]["logprobs"]  # floats equal to the last bit
