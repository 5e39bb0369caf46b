"""The server's response bodies, built by protocol.py's pure functions: the whole answer, the chunks of a
stream, usage, timings and error objects, field by field as OpenAI's API reference lays them out
(https://platform.openai.com/docs/api-reference/chat), with vLLM's `token_ids`/`prompt_token_ids`."""

from __future__ import annotations

import json

from internvl_edge.generate import Stats
from internvl_edge.server.protocol import (
    ApiError,
    completion_body,
    content_chunk,
    error_body,
    final_chunk,
    opening_chunk,
    response_head,
    sse,
    timings,
    usage,
    usage_chunk,
)

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}
STATS = Stats(prompt_tokens=9, generated_tokens=5, vision_s=0.12345678, ftl_s=0.5, decode_s=2.0, cached_tokens=4)


def test_head_usage_and_timings():
    assert response_head("chat.completion.chunk", "chatcmpl-1", "m", 1700000000) == HEAD
    assert usage(9, 5, 4) == {
        "prompt_tokens": 9,
        "completion_tokens": 5,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    # four tokens after the first in 2 s: 2 tokens/s; seconds rounded to the microsecond
    assert timings(0.0312345678, STATS) == {"queue_s": 0.031235, "vision_s": 0.123457, "ftl_s": 0.5, "decode_tps": 2.0}


def test_whole_answer():
    head = response_head("chat.completion", "chatcmpl-1", "m", 1700000000)
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
    body = completion_body(head, "Hi", "stop", usage(9, 1), {"ftl_s": 0.5}, logprobs)
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi"},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(9, 1),
        "timings": {"ftl_s": 0.5},
    }
    with_ids = completion_body(head, "Hi", "length", usage(9, 1), {}, token_ids=[7], prompt_token_ids=[1, 2])
    assert with_ids["choices"][0]["token_ids"] == [7] and with_ids["prompt_token_ids"] == [1, 2]
    assert with_ids["choices"][0]["logprobs"] is None and with_ids["choices"][0]["finish_reason"] == "length"
    assert list(with_ids) == ["id", "object", "created", "model", "choices", "usage", "timings", "prompt_token_ids"]


def test_stream_chunks():
    def choice(**fields):
        return {"index": 0, "logprobs": None, "finish_reason": None, **fields}

    assert opening_chunk(HEAD) == {**HEAD, "choices": [choice(delta={"role": "assistant", "content": ""})]}
    assert opening_chunk(HEAD, True, [1, 2]) == {
        **HEAD,
        "choices": [choice(delta={"role": "assistant", "content": ""}, prompt_token_ids=[1, 2])],
        "usage": None,  # include_usage: null on every chunk but the usage chunk
    }
    assert content_chunk(HEAD, "Hel") == {**HEAD, "choices": [choice(delta={"content": "Hel"})]}
    lps = {"content": []}
    assert content_chunk(HEAD, "", False, lps, []) == {
        **HEAD,
        "choices": [choice(delta={"content": ""}, logprobs=lps, token_ids=[])],
    }
    assert final_chunk(HEAD, "length", {"ftl_s": 0.5}, True) == {
        **HEAD,
        "choices": [choice(delta={}, finish_reason="length", timings={"ftl_s": 0.5})],
        "usage": None,
    }
    assert usage_chunk(HEAD, usage(9, 5)) == {**HEAD, "choices": [], "usage": usage(9, 5)}
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"


def test_error_objects():
    assert error_body(400, "bad `stop`", param="stop") == {
        "error": {"message": "bad `stop`", "type": "invalid_request_error", "param": "stop", "code": None}
    }
    kinds = {s: error_body(s, "x")["error"]["type"] for s in (401, 404, 405, 413, 429, 500, 503)}
    assert kinds == {
        401: "authentication_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }
    e = ApiError(503, "the server\n  is stopping", code="unavailable")  # one line, whatever the caller wrote
    assert e.body() == error_body(503, "the server is stopping", "unavailable")
    assert json.loads(sse(e.body())[len("data: ") :]) == e.body()
