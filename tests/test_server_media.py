"""The server's video_url parts and its /metrics, driven over HTTP: a video as a data URL gives the answer the
Python API gives for the same frames, fitted to the context; a bad video is a 400 in the user's terms;
/metrics parses as Prometheus text (prometheus-client's own parser) and its counters move."""

from __future__ import annotations

import base64
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import KEY, NAME, assert_error, serving, slowed, user
from test_video import write_video

from internvl_edge.api import ANSWER_ROOM, Media, load
from internvl_edge.prompt import IMG_START


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def video_data_url(path: str, mime: str = "video/mp4") -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def greedy_bundle(bundle):
    return bundle("tiny_bf16", "w4bf16")


def test_video_url_answers_as_the_api_with_frames_fitted_to_the_context(greedy_bundle, tmp_path):
    path = write_video(tmp_path / "v.mp4", "libx264", 40, size=(320, 240))
    ref = load(greedy_bundle)
    video = video_part(video_data_url(path))
    messages = [{"role": "user", "content": [{"type": "text", "text": "What happens?"}, video]}]
    with serving(greedy_bundle, parallel=2) as s:
        r = s.post({"model": NAME, "messages": messages, "max_tokens": 6, "return_token_ids": True}, key=None)
        assert r.status_code == 200, r.text
        body = r.json()
    prompt = body["prompt_token_ids"]
    frames = prompt.count(ref.tokenizer.raw.token_to_id(IMG_START))
    # the tiny model's 256 tokens a frame: 8 frames do not leave the answer its room in 2048, fewer do
    assert 1 <= frames < 8 and len(prompt) + ANSWER_ROOM <= ref.seq_length
    alone = ref.generate("What happens?", video=path, video_frames=frames, max_new_tokens=6)
    assert alone.prompt_token_ids == prompt
    assert body["choices"][0]["token_ids"] == alone.token_ids
    assert body["choices"][0]["message"]["content"] == alone.text
    more = Media(None, [1] * (frames + 1), is_video=True)
    # one frame more would not have left the answer its room
    assert len(ref.tokenize(ref.question("What happens?", more), more)) + ANSWER_ROOM > ref.seq_length


def test_bad_videos_are_400s_in_the_users_terms(greedy_bundle, tmp_path):
    good = write_video(tmp_path / "good.mp4", "libx264", 30)
    cut = tmp_path / "cut.mp4"
    with open(good, "rb") as f:
        cut.write_bytes(f.read()[:600])
    junk = "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4).decode()
    text = "data:text/plain;base64," + base64.b64encode(b"hello").decode()

    def ask(*parts):
        content = [{"type": "text", "text": "What?"}, *parts]
        return {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}

    with serving(greedy_bundle, parallel=1) as s:
        opened = "messages[0]: the video file is not a video file"
        assert_error(s.post(ask(video_part(junk)), key=None), 400, opened)
        assert_error(s.post(ask(video_part(video_data_url(cut))), key=None), 400, "messages[0]: the video file")
        assert_error(s.post(ask(video_part(text)), key=None), 400, "not a video")
        assert_error(s.post(ask(video_part("https://example.com/v.mp4")), key=None), 400, "does not fetch http(s)")
        assert_error(s.post(ask(video_part(str(good))), key=None), 400, "--allowed-local-media-path")
        assert_error(s.post(ask({"type": "video_url", "video_url": {}}), key=None), 400, "needs a `url`")
        both = ask(video_part(video_data_url(good)), video_part(video_data_url(good)))
        assert_error(s.post(both, key=None), 400, "at most one video")
        assert s.post(ask(), key=None).status_code == 200  # the server goes on


def scrape(url: str, key: str | None = KEY) -> dict:
    """/metrics as {sample name with labels: value}, through prometheus-client's parser."""
    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_count_requests_tokens_and_times(greedy_bundle):
    p = "internvl_edge_"
    with serving(greedy_bundle, parallel=1, max_queue=0, api_key=KEY) as s:
        assert_error(httpx.get(s.url + "/metrics", timeout=10), 401, "API key", kind="authentication_error")
        before = scrape(s.url)
        assert before[p + "active_sequences"] == 0 and before[p + "waiting_sequences"] == 0
        assert before[p + "prompt_tokens_total"] == 0 and before[p + "request_duration_seconds_count"] == 0
        ok = s.post({"model": NAME, "messages": user("Hi"), "max_tokens": 5, "ignore_eos": True})
        assert ok.status_code == 200, ok.text
        assert s.post({"model": NAME, "messages": user("Hi"), "max_tokens": 0}).status_code == 400
        assert s.post({"model": NAME, "messages": user("Hi")}, key="wrong").status_code == 401
        after = scrape(s.url)
        usage = ok.json()["usage"]
        assert after[p + "requests_total{status=200}"] == 1
        assert after[p + "requests_total{status=400}"] == 1 and after[p + "requests_total{status=401}"] == 1
        assert after[p + "prompt_tokens_total"] == usage["prompt_tokens"]
        assert after[p + "generation_tokens_total"] == usage["completion_tokens"] == 5
        assert after[p + "time_to_first_token_seconds_count"] == 1
        assert after[p + "request_duration_seconds_count"] == 3
        assert after[p + "request_duration_seconds_bucket{le=+Inf}"] == 3
        ttft = ok.json()["timings"]["ftl_s"]
        assert abs(after[p + "time_to_first_token_seconds_sum"] - ttft) < 1e-3
        # a long stream in the slot and one waiting behind it show in the gauges; closing it counts as cancelled
        long = {
            "model": NAME,
            "messages": user("Write a long story."),
            "max_tokens": 1900,
            "ignore_eos": True,
            "stream": True,
        }
        with slowed(s):
            with httpx.stream(
                "POST",
                s.url + "/v1/chat/completions",
                json=long,
                timeout=60,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as r:
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                short = {"model": NAME, "messages": user("Hi"), "max_tokens": 2}
                waiting = threading.Thread(target=s.post, args=(short,))
                s.engine.max_queue = 1
                waiting.start()
                s.wait_for(lambda h: h["waiting"] == 1)
                busy = scrape(s.url)
                assert busy[p + "active_sequences"] == 1 and busy[p + "waiting_sequences"] == 1
            waiting.join(60)
            s.wait_for(lambda h: h["active"] == 0 and h["waiting"] == 0)
        deadline = time.monotonic() + 10  # the stream's log line (and count) comes as its response ends
        while (final := scrape(s.url)).get(p + "requests_total{status=cancelled}") is None:
            assert time.monotonic() < deadline, final
            time.sleep(0.05)
        assert final[p + "requests_total{status=cancelled}"] == 1
        assert final[p + "requests_total{status=200}"] == 2
        assert final[p + "active_sequences"] == 0
