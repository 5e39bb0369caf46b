"""OpenAI chat completions on the wire: request validation, response and chunk bodies, error objects.

Field names follow https://platform.openai.com/docs/api-reference/chat (create, the chat completion
object, the chunk object). User messages may also hold `video_url` parts (a data URL), as vLLM takes
them. Extra request fields, as vLLM and llama.cpp take them: `max_tiles` (tiles per image), `top_k`,
`repetition_penalty`, `ignore_eos` and `return_token_ids` (adds `token_ids` to the choice and
`prompt_token_ids` to the response, as vLLM does). Fields a client may send that change
nothing here (`user`, `store`, `metadata`, penalties of 0, `n` of 1, ...) are accepted; ones whose
meaning we cannot honour (`n` > 1, tools, logit_bias, non-zero presence/frequency penalties) are
refused rather than ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

from ..generate import Stats

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_TILES_LIMIT = 12  # InternVL3's largest max_dynamic_patch (its model card)

ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}  # else by status: 4xx invalid request, 5xx server


class ApiError(Exception):
    """An error a client receives as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.status, self.code, self.param = status, code, param

    def body(self) -> dict:
        return error_body(self.status, str(self), self.code, self.param)


@dataclass
class ChatRequest:
    messages: list
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    max_tiles: int | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @property
    def image_count(self) -> int:
        contents = [m["content"] for m in self.messages if isinstance(m, dict) and isinstance(m.get("content"), list)]
        parts = [p for content in contents for p in content]
        media = ("image_url", "image", "video_url", "video")  # a video takes at least one frame's room
        return sum(isinstance(p, dict) and p.get("type") in media for p in parts)

    def generation_options(self) -> dict:
        """Keyword arguments for Model.generation_config. A temperature above 0 samples; none or 0 is
        greedy decoding (the CLI's default), so a plain request gives the same tokens as `run`."""
        opts = {
            "max_new_tokens": self.max_tokens,
            "do_sample": bool(self.temperature),
            "seed": self.seed,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "logprobs": (self.top_logprobs or 1) if self.logprobs else 0,
        }
        if self.temperature:
            opts.update(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                repetition_penalty=self.repetition_penalty,
            )
        return opts


def _is_number(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))


KINDS = {  # kind -> (test, how the error names it)
    "int": (lambda v: _is_number(v) and (isinstance(v, int) or v.is_integer()), "an integer"),
    "number": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _get(body: dict, key: str, kind: str, lo=None, hi=None):
    """A field's value, checked against its kind and bounds; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    test, named = KINDS[kind]
    if not test(value):
        raise ApiError(400, f"`{key}` must be {named}", param=key)
    if kind == "int":
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ApiError(400, f"`{key}` must be {bounds}, got {value}", param=key)
    return value


def _refuse_unsupported(body: dict) -> None:
    if _get(body, "n", "int", 1) not in (None, 1):
        raise ApiError(400, "only n=1 is supported (one choice per request)", param="n")
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise ApiError(400, f"`{key}` is not supported by this server", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _get(body, key, "number", -2, 2):
            raise ApiError(400, f"`{key}` is not supported (use the extra field `repetition_penalty`)", param=key)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, 'only response_format {"type": "text"} is supported', param="response_format")


def parse_chat_request(body) -> ChatRequest:
    """A decoded JSON body -> ChatRequest, or ApiError(400) naming the field at fault."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    _refuse_unsupported(body)
    stream = bool(_get(body, "stream", "bool"))
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise ApiError(400, "`stream_options` is an object, and only allowed with stream: true", param="stream_options")
    include_usage = bool(_get(options or {}, "include_usage", "bool"))
    max_tokens = _get(body, "max_completion_tokens", "int", 1)
    max_tokens = _get(body, "max_tokens", "int", 1) if max_tokens is None else max_tokens
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    strings = isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    if stop is not None and (not strings or len(stop) > MAX_STOP_STRINGS):
        raise ApiError(
            400, f"`stop` must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", param="stop"
        )
    logprobs = bool(_get(body, "logprobs", "bool"))
    top_logprobs = _get(body, "top_logprobs", "int", 0, MAX_TOP_LOGPROBS) or 0
    if top_logprobs and not logprobs:
        raise ApiError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    model = _get(body, "model", "str")
    return ChatRequest(
        messages=messages,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=_get(body, "temperature", "number", 0, 2),
        top_p=_get(body, "top_p", "number", 0, 1),
        top_k=_get(body, "top_k", "int", 0),
        repetition_penalty=_get(body, "repetition_penalty", "number", 0),
        seed=_get(body, "seed", "int", 0, 2**64 - 1),
        stop=tuple(stop or ()),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        max_tiles=_get(body, "max_tiles", "int", 1, MAX_TILES_LIMIT),
        ignore_eos=bool(_get(body, "ignore_eos", "bool")),
        return_token_ids=bool(_get(body, "return_token_ids", "bool")),
    )


# -- responses ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes, reversed (GPT-2's bytes_to_unicode:
    https://github.com/openai/gpt-2/blob/master/src/encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (a special token: its text)."""
    piece = tokenizer.raw.id_to_token(int(token_id)) or ""
    table = _byte_decoder()
    if piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return piece.encode("utf-8")


def _logprob_entry(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def logprobs_content(tokenizer, token_ids: list[int], chosen: list[float], tops: list, top_n: int) -> list[dict]:
    """OpenAI's `logprobs.content`: per generated token its logprob and the `top_n` likeliest."""
    out = []
    for token_id, lp, top in zip(token_ids, chosen, tops, strict=False):
        entry = _logprob_entry(tokenizer, token_id, lp)
        entry["top_logprobs"] = [_logprob_entry(tokenizer, t, v) for t, v in top[:top_n]]
        out.append(entry)
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def timings(queue_s: float, stats: Stats) -> dict:
    """The answer's timings (an extension, as llama.cpp's server adds one): seconds waiting for a slot,
    in the vision encoder and to the first token (from arrival, vision and prefill included), and the
    decode rate after the first token."""
    return {
        "queue_s": round(queue_s, 6),
        "vision_s": round(stats.vision_s, 6),
        "ftl_s": round(stats.ftl_s, 6),
        "decode_tps": round(stats.decode_tps, 3),
    }


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object for an HTTP status."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def response_head(kind: str, request_id: str, model: str, created: int) -> dict:
    """The fields every response body and chunk opens with (`kind`: its `object`)."""
    return {"id": request_id, "object": kind, "created": created, "model": model}


def completion_body(
    head: dict,
    text: str,
    finish_reason: str,
    usage: dict,
    timings: dict,
    logprobs: dict | None = None,
    token_ids: list[int] | None = None,
    prompt_token_ids: list[int] | None = None,
) -> dict:
    """A whole answer (`chat.completion`). `token_ids` and `prompt_token_ids`: vLLM's `return_token_ids`
    fields, added when given."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    body = {**head, "choices": [choice], "usage": usage, "timings": timings}
    if prompt_token_ids is not None:
        body["prompt_token_ids"] = prompt_token_ids
    return body


def _chunk(head: dict, delta: dict, usage_field: bool, logprobs=None, finish_reason=None, **extra) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
    return {**head, "choices": [choice], **({"usage": None} if usage_field else {})}


# The chunks of a stream (`chat.completion.chunk`). `usage_field`: the client asked for usage
# (stream_options.include_usage), so every chunk but the usage chunk says `"usage": null`, as OpenAI's do.


def opening_chunk(head: dict, usage_field: bool = False, prompt_token_ids: list[int] | None = None) -> dict:
    """The first chunk: the assistant's role, empty content (and vLLM's `prompt_token_ids`, when given)."""
    extra = {} if prompt_token_ids is None else {"prompt_token_ids": prompt_token_ids}
    return _chunk(head, {"role": "assistant", "content": ""}, usage_field, **extra)


def content_chunk(
    head: dict, text: str, usage_field: bool = False, logprobs: dict | None = None, token_ids: list[int] | None = None
) -> dict:
    """A piece of the answer (and vLLM's `token_ids`, when given)."""
    extra = {} if token_ids is None else {"token_ids": token_ids}
    return _chunk(head, {"content": text}, usage_field, logprobs, **extra)


def final_chunk(head: dict, finish_reason: str, timings: dict, usage_field: bool = False) -> dict:
    """The chunk that ends an answer: no text, the finish reason and the timings."""
    return _chunk(head, {}, usage_field, finish_reason=finish_reason, timings=timings)


def usage_chunk(head: dict, usage: dict) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage object."""
    return {**head, "choices": [], "usage": usage}


def sse(data: dict | str) -> str:
    """One server-sent event (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
