"""The OpenAI-compatible server, driven as its users drive it: the official `openai` client (streaming
and not, an image as a data URL), raw HTTP for the error paths, 16 concurrent streams, a cancelled
stream, a full queue, local media rules and the API key. Servers listen on 127.0.0.1 on a free port,
in a thread of this process (or one `internvl-edge serve` subprocess), and are always stopped."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import pairwise

import httpx
import numpy as np
import pytest
import uvicorn
from openai import OpenAI

from internvl_edge.api import load
from internvl_edge.errors import UserError
from internvl_edge.server.app import ServerSettings, create_app
from internvl_edge.server.media import MediaPolicy

KEY = "sk-test-key"
NAME = "tiny"
LOOPBACK = "127.0.0.1"


class Served:
    def __init__(self, url: str, app, model):
        self.url, self.app, self.model = url, app, model
        self.engine = app.state.engine

    def client(self, key: str | None = KEY) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def post(self, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(
            self.url + "/v1/chat/completions",
            content=data,
            timeout=kw.pop("timeout", 60),
            headers={"Content-Type": "application/json", **headers, **kw.pop("headers", {})},
            **kw,
        )

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for(self, condition, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if condition(h):
                return h
            time.sleep(0.02)
        raise AssertionError(f"server state never reached: {self.health()}")


@contextmanager
def serving(bundle_path: str, **settings):
    """A server for one bundle in a thread of this process, on a free loopback port; stopped on exit."""
    model = load(bundle_path)
    app = create_app(model, ServerSettings(model_name=NAME, **settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield Served(f"http://{LOOPBACK}:{sock.getsockname()[1]}", app, model)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def data_url(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def greedy_bundle(bundle):
    return bundle("tiny_bf16", "w4bf16")


@pytest.fixture(scope="module")
def media_root(tmp_path_factory, images):
    """An allowed folder with an image, a symlink that escapes it, and a secret image outside it."""
    base = tmp_path_factory.mktemp("media")
    root, outside = base / "allowed", base / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "pics").mkdir()
    (root / "pics" / "square.png").write_bytes(open(images["square"], "rb").read())
    (outside / "secret.png").write_bytes(open(images["square"], "rb").read())
    os.symlink(outside / "secret.png", root / "pics" / "escape.png")
    os.symlink(outside, root / "linkdir")
    return root, outside


@pytest.fixture(scope="module")
def served(greedy_bundle, media_root):
    with serving(
        greedy_bundle,
        parallel=8,
        max_queue=32,
        api_key=KEY,
        allowed_media_path=str(media_root[0]),
        max_body_bytes=4 << 20,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def reference(greedy_bundle):
    """The same bundle loaded separately: single-request answers through the Python API (its sessions
    are never touched by the server's engine thread)."""
    return load(greedy_bundle)


def cli_run_json(bundle_path: str, *args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "internvl_edge", "run", "-m", bundle_path, "--json", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- the openai client -------------------------------------------------------------------------------


def test_openai_client_with_an_image_equals_run_json(served, greedy_bundle, images):
    expected = cli_run_json(
        greedy_bundle, "-p", "Describe the image.", "--image", images["wide"], "--max-new-tokens", 12
    )
    resp = served.client().chat.completions.create(
        model=NAME,
        messages=user("Describe the image.", data_url(images["wide"])),
        max_tokens=12,
        extra_body={"return_token_ids": True},
    )
    choice = resp.choices[0]
    assert choice.token_ids == expected["token_ids"]
    assert resp.prompt_token_ids == expected["prompt_token_ids"]
    assert choice.message.content == expected["text"] and choice.message.role == "assistant"
    assert choice.finish_reason == expected["finish_reason"] == "length"
    assert resp.usage.prompt_tokens == len(expected["prompt_token_ids"]) and resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    assert resp.model == NAME and resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.timings["vision_s"] > 0 and resp.timings["ftl_s"] > 0


def test_openai_client_streaming_with_usage(served, reference, images):
    messages = user("What is in the picture?", data_url(images["square"]))
    stream = served.client().chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = reference.generate(messages=messages, max_new_tokens=10)
    assert text == expected.text and chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_requests_share_the_prefix_and_image_caches(served, reference, images):
    """A second request with the system prompt and image of an earlier one prefills only what follows
    them (usage.prompt_tokens_details.cached_tokens) and skips the vision encoder, with the same tokens."""

    def ask(question):
        messages = [{"role": "system", "content": "Answer in one word."}] + user(question, data_url(images["tall"]))
        resp = served.client().chat.completions.create(
            model=NAME, messages=messages, max_tokens=6, extra_body={"return_token_ids": True}
        )
        assert resp.choices[0].token_ids == reference.generate(messages=messages, max_new_tokens=6).token_ids
        return resp

    first, second = ask("What is it?"), ask("Which colour dominates in this picture?")
    assert first.usage.prompt_tokens_details.cached_tokens < 256 and first.timings["vision_s"] > 0
    assert second.usage.prompt_tokens_details.cached_tokens > 256 and second.timings["vision_s"] == 0


def test_raw_stream_is_sse_ending_in_done(served):
    body = {"model": NAME, "messages": user("Hi"), "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", served.url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)


def test_logprobs_stop_and_max_tiles(served, reference, images):
    client = served.client()
    resp = client.chat.completions.create(
        model=NAME, messages=user("Hello"), max_tokens=6, logprobs=True, top_logprobs=3
    )
    expected = reference.generate(messages=user("Hello"), max_new_tokens=6, logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    for entry, top in zip(content, expected.logprobs, strict=True):
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-4)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the likeliest token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # stop strings: the answer ends before the first stop string, with finish_reason "stop"
    full = reference.generate(messages=user("Hello"), max_new_tokens=12).text
    stop = next(
        full[i : i + 2] for i in range(2, len(full) - 1) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    resp = client.chat.completions.create(model=NAME, messages=user("Hello"), max_tokens=12, stop=[stop])
    assert resp.choices[0].message.content == full[: full.index(stop)] and resp.choices[0].finish_reason == "stop"
    # max_tiles: the wide image takes 2x1 tiles + a thumbnail by default, one tile with max_tiles=1
    wide = user("Describe.", data_url(images["wide"]))
    tiles3 = client.chat.completions.create(model=NAME, messages=wide, max_tokens=1)
    tiles1 = client.chat.completions.create(model=NAME, messages=wide, max_tokens=1, extra_body={"max_tiles": 1})
    assert tiles3.usage.prompt_tokens - tiles1.usage.prompt_tokens == 2 * 256


def test_models_and_health(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert served.client().models.retrieve(NAME).id == NAME
    h = served.health()
    assert h["status"] == "ok" and h["parallel"] == 8 and h["model"] == NAME and h["batch"] in (1, 2, 4, 8)


# -- many users at once ------------------------------------------------------------------------------


def test_sixteen_concurrent_streams_equal_single_requests(served, reference, images):
    """16 streams against 8 slots: every one completes with exactly the tokens it gets alone, the
    decoder really ran several sequences per call, and a lone request afterwards decodes in a batch of 1."""
    rows_per_call, batches = [], []
    forward = served.model.backend.forward

    def counting_forward(cache, embeds, query_lens):
        if embeds.shape[1] == 1:
            rows_per_call.append(int(np.count_nonzero(query_lens)))
            batches.append(embeds.shape[0])
        return forward(cache, embeds, query_lens)

    pics = [images["square"], images["wide"], images["tall"]]
    requests = [
        (
            user(
                f"Question {i}: describe it." if i % 3 else f"Tell me about item {i}.",
                *([data_url(pics[i % 3])] if i % 4 == 0 else []),
            ),
            6 + (i * 7) % 19,
        )
        for i in range(16)
    ]

    def run_stream(request):
        messages, max_tokens = request
        stream = served.client().chat.completions.create(
            model=NAME, messages=messages, max_tokens=max_tokens, stream=True, extra_body={"return_token_ids": True}
        )
        ids, text, finish = [], [], None
        for c in stream:
            if c.choices:
                ids += getattr(c.choices[0], "token_ids", None) or []
                text.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return ids, "".join(text), finish

    served.model.backend.forward = counting_forward
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run_stream, requests))
        served.wait_for(lambda h: h["active"] == 0)
        crowd = len(batches)
        alone = run_stream((user("Alone now."), 8))
    finally:
        served.model.backend.forward = forward
    assert max(batches[:crowd]) == 8 and set(batches[crowd:]) == {1}, batches
    assert any(b < a for a, b in pairwise(batches[:crowd]))  # live sequences moved to a smaller batch
    assert alone[0] == reference.generate(messages=user("Alone now."), max_new_tokens=8).token_ids
    for (messages, max_tokens), (ids, text, finish) in zip(requests, results, strict=True):
        alone = reference.generate(messages=messages, max_new_tokens=max_tokens)
        assert ids == alone.token_ids and text == alone.text and finish == alone.finish_reason
    assert max(rows_per_call) > 1 and sum(rows_per_call) / len(rows_per_call) > 1.5, rows_per_call
    served.wait_for(lambda h: h["active"] == 0 and h["waiting"] == 0)


def test_a_cancelled_stream_frees_its_slot(served):
    body = {
        "model": NAME,
        "messages": user("Write a long story."),
        "max_tokens": 1900,
        "ignore_eos": True,
        "stream": True,
    }
    with slowed(served):
        with httpx.stream(
            "POST",
            served.url + "/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            steps_at_close = served.health()["decode_steps"]
        h = served.wait_for(lambda h: h["active"] == 0, timeout=20)
    assert h["decode_steps"] - steps_at_close < 1500  # stopped long before its 1900 tokens
    time.sleep(0.3)
    assert served.health()["decode_steps"] == h["decode_steps"]  # nothing left decoding
    ok = served.post({"model": NAME, "messages": user("Hi"), "max_tokens": 2})
    assert ok.status_code == 200


@contextmanager
def slowed(served: Served, seconds: float = 0.002):
    """Every decoder call of the served model takes at least `seconds` more (1900 tokens: >= 3.8 s),
    so a cancellation is seen long before the end whatever the machine's speed."""
    forward = served.model.backend.forward

    def slow_forward(*args):
        time.sleep(seconds)
        return forward(*args)

    served.model.backend.forward = slow_forward
    try:
        yield
    finally:
        served.model.backend.forward = forward


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(served):
    steps_before = served.health()["decode_steps"]
    body = {"model": NAME, "messages": user("Write a long story."), "max_tokens": 1900, "ignore_eos": True}
    with slowed(served):
        with pytest.raises(httpx.ReadTimeout):
            served.post(body, timeout=httpx.Timeout(60, read=0.3))  # gives up and closes the connection
        h = served.wait_for(lambda h: h["active"] == 0, timeout=20)
    assert h["decode_steps"] - steps_before < 1500


def test_a_full_queue_answers_429_and_the_server_recovers(greedy_bundle):
    long = {"model": NAME, "messages": user("Go on."), "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with serving(greedy_bundle, parallel=1, max_queue=1) as s, slowed(s), httpx.Client(timeout=60) as http:
        url = s.url + "/v1/chat/completions"
        with http.stream("POST", url, json=long) as first:
            first_lines = first.iter_lines()  # kept: dropping the iterator would close the stream
            next(first_lines)  # it holds the only slot
            second_done = threading.Event()

            def second():
                with httpx.stream("POST", url, json=long, timeout=60) as r:
                    lines = r.iter_lines()
                    next(lines)
                second_done.set()

            waiter = threading.Thread(target=second)
            waiter.start()
            s.wait_for(lambda h: h["waiting"] == 1)
            busy = http.post(url, json={"model": NAME, "messages": user("Me too"), "max_tokens": 2})
            assert busy.status_code == 429
            error = busy.json()["error"]
            assert error["type"] == "rate_limit_error" and "busy" in error["message"]
        waiter.join(30)  # the first stream closed: the second gets the slot, reads a line and leaves
        assert second_done.is_set()
        s.wait_for(lambda h: h["active"] == 0 and h["waiting"] == 0)
        assert http.post(url, json={"model": NAME, "messages": user("Now?"), "max_tokens": 2}).status_code == 200


def test_no_queue_still_serves_a_free_slot(greedy_bundle):
    """--max-queue 0: nothing may wait, but a request that finds a slot free is served."""
    with serving(greedy_bundle, parallel=1, max_queue=0) as s, httpx.Client(timeout=60) as http:
        r = http.post(s.url + "/v1/chat/completions", json={"model": NAME, "messages": user("Hi"), "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_sampling_requests_keep_their_own_state_in_a_batch(bundle):
    """Sampled requests with seeds give, served together, what each gives alone through the API."""
    b = bundle("tiny_bf16", "w4bf16", do_sample=True)
    ref = load(b)
    cases = [
        dict(temperature=t, top_p=p, seed=seed)
        for t, p, seed in [(0.8, 0.9, 1), (1.2, 1.0, 2), (0.5, 0.7, 3), (1.0, 0.95, 1)]
    ]
    with serving(b, parallel=4) as s:

        def ask(kw):
            r = s.post(
                {
                    "model": NAME,
                    "messages": user("Say something."),
                    "max_tokens": 16,
                    "ignore_eos": True,
                    "return_token_ids": True,
                    **kw,
                }
            )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(4) as pool:
            served_ids = list(pool.map(ask, cases))
    for kw, ids in zip(cases, served_ids, strict=True):
        alone = ref.generate(messages=user("Say something."), max_new_tokens=16, ignore_eos=True, do_sample=True, **kw)
        assert ids == alone.token_ids
    assert served_ids[0] != served_ids[1]


def test_a_bundle_without_the_head_samples(bundle):
    """`temperature: 0.8, seed: 1` on a bundle converted without --do_sample: the host samples, the same
    tokens twice and the same tokens as the bundle with the sampling head."""
    body = {
        "model": NAME,
        "messages": user("Say something."),
        "max_tokens": 12,
        "ignore_eos": True,
        "return_token_ids": True,
        "temperature": 0.8,
        "seed": 1,
    }

    def tokens(path: str) -> list[list[int]]:
        with serving(path, parallel=2) as s:
            out = []
            for _ in range(2):
                r = s.post(body)
                assert r.status_code == 200, r.text
                out.append(r.json()["choices"][0]["token_ids"])
            return out

    host, head = tokens(bundle("tiny_bf16", "w4bf16")), tokens(bundle("tiny_bf16", "w4bf16", do_sample=True))
    assert host[0] == host[1] == head[0] == head[1] and len(host[0]) == 12
    greedy = load(bundle("tiny_bf16", "w4bf16")).generate(
        messages=user("Say something."), max_new_tokens=12, ignore_eos=True
    )
    assert host[0] != greedy.token_ids


# -- local media -------------------------------------------------------------------------------------


def test_local_media_only_under_the_allowed_folder(served, media_root, reference, images):
    root, outside = media_root
    ok = served.post(
        {"model": NAME, "messages": user("Describe.", "pics/square.png"), "max_tokens": 5, "return_token_ids": True}
    )
    assert ok.status_code == 200, ok.text
    as_file_url = served.post(
        {
            "model": NAME,
            "messages": user("Describe.", (root / "pics" / "square.png").as_uri()),
            "max_tokens": 5,
            "return_token_ids": True,
        }
    )
    expected = reference.generate("Describe.", images=[images["square"]], max_new_tokens=5).token_ids
    assert ok.json()["choices"][0]["token_ids"] == as_file_url.json()["choices"][0]["token_ids"] == expected
    refused = [
        str(outside / "secret.png"),
        (outside / "secret.png").as_uri(),
        "../outside/secret.png",
        "pics/../../outside/secret.png",
        "pics/escape.png",
        "linkdir/secret.png",
        str(root / "linkdir" / "secret.png"),
        "/etc/hostname",
    ]
    for ref in refused:
        r = served.post({"model": NAME, "messages": user("Describe.", ref), "max_tokens": 2})
        assert r.status_code == 400, (ref, r.text)
        assert "outside the allowed media folder" in r.json()["error"]["message"], ref
    missing = served.post({"model": NAME, "messages": user("Describe.", "pics/none.png"), "max_tokens": 2})
    assert missing.status_code == 400 and "not found" in missing.json()["error"]["message"]
    remote = served.post({"model": NAME, "messages": user("Describe.", "https://example.com/cat.png"), "max_tokens": 2})
    assert remote.status_code == 400 and "does not fetch http(s)" in remote.json()["error"]["message"]


def test_media_policy_reads_only_regular_files_under_the_root(media_root):
    root, outside = media_root
    policy = MediaPolicy(str(root), max_bytes=1 << 20)
    os.mkfifo(root / "pics" / "pipe.png")  # opening it must neither block nor read
    assert policy.resolve("pics/square.png") == (root / "pics" / "square.png").read_bytes()
    for ref, needle in [
        ("pics", "not a regular file"),
        ("pics/pipe.png", "not a regular file"),
        (".", "outside"),
        ("", "outside"),
        (str(root), "outside"),
        ("pics/escape.png", "outside"),
        ("ftp://host/x.png", "scheme 'ftp'"),
        ("file://otherhost/x.png", "not on 'otherhost'"),
        ("pics/\x00.png", "not valid"),
    ]:
        with pytest.raises(UserError, match=needle):
            policy.resolve(ref)
    with pytest.raises(UserError, match="larger than"):
        MediaPolicy(str(root), max_bytes=10).resolve("pics/square.png")


def test_local_paths_refused_without_a_media_folder(greedy_bundle, images):
    with serving(greedy_bundle, parallel=1) as s:
        r = s.post({"model": NAME, "messages": user("Describe.", images["square"]), "max_tokens": 2})
        assert r.status_code == 400 and "--allowed-local-media-path" in r.json()["error"]["message"]
        assert (
            s.post(
                {"model": NAME, "messages": user("Describe.", data_url(images["square"])), "max_tokens": 2}
            ).status_code
            == 200
        )


# -- errors ------------------------------------------------------------------------------------------


def assert_error(r: httpx.Response, status: int, needle: str, kind: str = "invalid_request_error") -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and needle in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, tmp_path):
    base = {"model": NAME, "messages": user("Hi"), "max_tokens": 2}
    assert_error(served.post(b"{not json"), 400, "not valid JSON")
    assert_error(served.post(b"[" * 100_000), 400, "not valid JSON")  # nested past Python's recursion limit
    assert_error(served.post("[1, 2]"), 400, "JSON object")
    assert_error(served.post({**base, "model": "gpt-4o"}), 404, "not found")
    assert served.post({**base, "model": "gpt-4o"}).json()["error"]["code"] == "model_not_found"
    assert_error(served.post({"model": NAME}), 400, "messages")
    assert_error(
        served.post({**base, "messages": [{"role": "assistant", "content": "Hi"}]}),
        400,
        "assistant message must follow",
    )
    assert_error(served.post({**base, "messages": [{"role": "tool", "content": "x"}]}), 400, "unsupported role")
    assert_error(served.post({**base, "temperature": "hot"}), 400, "`temperature` must be a number")
    assert_error(served.post({**base, "temperature": 0.7, "top_p": 0}), 400, "top_p")
    assert_error(served.post({**base, "max_tokens": 0}), 400, "`max_tokens` must be at least 1")
    assert_error(served.post({**base, "n": 2}), 400, "n=1")
    assert_error(served.post({**base, "top_logprobs": 2}), 400, "needs `logprobs: true`")
    assert_error(served.post({**base, "stop": [""]}), 400, "`stop`")
    assert_error(served.post({**base, "max_tiles": 0}), 400, "max_tiles")
    tiny_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()
    assert_error(served.post({**base, "messages": user("What?", tiny_png)}), 400, "cannot be decoded")
    assert_error(served.post({**base, "messages": user("What?", "data:image/png;base64,@@@")}), 400, "not valid base64")
    assert_error(served.post({**base, "messages": user("What?", *[tiny_png] * 8)}), 400, "too many images: 8")
    assert_error(served.post({**base, "messages": user("word " * 3000)}), 400, "tokens but only")
    assert_error(served.post(b"x" * (5 << 20)), 413, "larger than the server's limit")
    assert_error(httpx.get(served.url + "/v1/nothing", timeout=10), 404, "Not Found")
    assert_error(httpx.get(served.url + "/v1/chat/completions", timeout=10), 405, "Method Not Allowed")
    r = served.post(base)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_api_key(served):
    body = {"model": NAME, "messages": user("Hi"), "max_tokens": 1}
    assert_error(served.post(body, key=None), 401, "API key", kind="authentication_error")
    assert_error(served.post(body, key="wrong"), 401, "API key", kind="authentication_error")
    assert_error(httpx.get(served.url + "/v1/models", timeout=10), 401, "API key", kind="authentication_error")
    with pytest.raises(Exception) as e:
        served.client(key="wrong").chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=1)
    assert getattr(e.value, "status_code", None) == 401
    assert served.post(body).status_code == 200
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200  # health needs no key


# -- the command -------------------------------------------------------------------------------------


def test_serve_command(greedy_bundle):
    argv = [sys.executable, "-m", "internvl_edge", "serve", "-m", greedy_bundle, "--host", LOOPBACK, "--port", "0"]
    proc = subprocess.Popen(
        [*argv, "--parallel", "2", "--api-key", KEY], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def line_with(needle: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [line for line in list(lines) if needle in line]
            if found:
                return found[0]
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} in {lines}")

    try:
        url = line_with("serving ").split(" on ")[1].split()[0]
        assert url.startswith(f"http://{LOOPBACK}:") and url.endswith("/v1")
        client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        resp = client.chat.completions.create(model=os.path.basename(greedy_bundle), messages=user("Hi"), max_tokens=3)
        assert resp.usage.completion_tokens == 3
        log_line = line_with(resp.id)
        assert " 200 " in log_line and "completion=3" in log_line and "ftl=" in log_line and "queue=" in log_line
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode in (0, -15)


def test_serve_refuses_a_busy_port(greedy_bundle):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "internvl_edge", "serve", "-m", greedy_bundle, "--host", LOOPBACK]
        proc = subprocess.run([*argv, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on {LOOPBACK}:{port}")
    assert "[load]" not in proc.stderr  # told before the model's load


def test_serve_refuses_bad_limits_before_loading(greedy_bundle):
    for flag, told in [
        (["--parallel", "0"], "argument --parallel: must be at least 1"),
        (["--max-queue", "-1"], "argument --max-queue/--max_queue: must be at least 0"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--drain-timeout", "-1"], "--drain-timeout must be 0 or more seconds"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "internvl_edge", "serve", "-m", greedy_bundle, *flag],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "[load]" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {told}")
