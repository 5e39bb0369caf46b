"""The HTTP side: OpenAI-compatible routes on FastAPI, errors as OpenAI error objects, one log line per
request.

    GET  /health                 engine state (no key needed): 200 "ok", or 503 "draining" while the
                                 server stops, "unavailable" once the engine is gone
    GET  /metrics                counters in Prometheus' text format (metrics.py; behind the key)
    GET  /, /chat                the chat page (page.py; static files, no key needed to load it)
    GET  /v1/models[/{id}]       the one served model
    POST /v1/chat/completions    streaming (SSE `data:` chunks, then `data: [DONE]`) or not

A request is checked (key, body size, JSON, fields, model, images), its images decoded and tiled and its
prompt tokenized in a worker thread; then the engine (scheduler.py) runs it. The response starts when
the first token exists, so errors found up to then still get their HTTP status. A client that leaves
(stream closed, or a dropped connection while waiting) cancels its sequence at the engine's next step;
its log line and /metrics say `cancelled`.

A graceful stop (`drain`, which cli/serve.py's server runs on SIGTERM/SIGINT): new requests get a 503
error object, the admitted and waiting ones get up to `--drain-timeout` seconds to finish, then the rest
end with a 503 error (a stream: a last chunk holding the error object, then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..api import Model
from ..errors import UserError
from .media import MediaPolicy
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .page import add_page_routes
from .protocol import ApiError, ChatRequest, logprobs_content, parse_chat_request, sse, usage
from .scheduler import Engine, Handle, Job

log = logging.getLogger("internvl_edge.server")
POLL_S = 0.25  # how often a request that is not streaming yet checks that its client is still there


@dataclass
class ServerSettings:
    model_name: str
    parallel: int = 4
    max_queue: int = 64
    api_key: str | None = None
    allowed_media_path: str | None = None
    max_body_bytes: int = 32 << 20
    max_tokens: int | None = None  # the most tokens one answer may ask for (None: the bundle's context)


@dataclass
class Outcome:
    """What one request's log line reports."""

    id: str
    received: float
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish: str | None = None
    stats: object = None
    handle: Handle | None = None
    error: str | None = None
    logged: bool = field(default=False, repr=False)
    metrics: Metrics | None = field(default=None, repr=False)

    open: set | None = field(default=None, repr=False)  # the app's requests not logged yet (the drain waits on it)

    def __post_init__(self):
        if self.open is not None:
            self.open.add(self)

    __hash__ = object.__hash__  # in `open` by identity

    def log(self) -> None:
        if self.logged:
            return
        self.logged = True
        if self.open is not None:
            self.open.discard(self)
        total = time.perf_counter() - self.received
        # the client left before the answer ended: no HTTP status reached it
        status = str(self.status) if self.error is not None or self.finish else "cancelled"
        if self.metrics is not None:
            self.metrics.finished(status, self.prompt_tokens, self.completion_tokens,
                                  self.stats.ftl_s if self.stats else None, total)  # fmt: skip
        if self.error is not None:
            log.info("%s %s error=%r total=%.3fs", self.id, status, self.error, total)
            return
        s = self.stats
        queue = self.handle.queue_s if self.handle else 0.0
        timing = f" ftl={s.ftl_s:.3f}s vision={s.vision_s:.3f}s decode={s.decode_tps:.1f}tok/s" if s else ""
        where = f" replica={self.handle.served_by}" if self.handle and self.handle.served_by else ""
        log.info("%s %s %s prompt=%d completion=%d finish=%s queue=%.3fs%s total=%.3fs%s", self.id, status,
                 "stream" if self.stream else "json", self.prompt_tokens, self.completion_tokens,
                 self.finish or "cancelled", queue, timing, total, where)  # fmt: skip


def max_images(model: Model) -> int:
    """The most images whose smallest form (one tile between <img> and </img>) fit the bundle at all."""
    return max(1, (model.seq_length - 1) // (model.tokens_per_tile + 2))


def create_app(model: Model, settings: ServerSettings, engine=None) -> FastAPI:
    """The app over `engine` (default: an Engine on `model` in this process; ray_app.py passes one whose
    sequences run on Ray Serve replicas, with the same submit/Handle interface)."""
    engine = engine if engine is not None else Engine(model, settings.parallel, settings.max_queue)
    policy = MediaPolicy(settings.allowed_media_path, settings.max_body_bytes)
    image_limit = max_images(model)
    metrics = Metrics()
    requests: set[Outcome] = set()  # chat requests not finished yet
    context_cap = model.seq_length if settings.max_tokens is None else min(settings.max_tokens, model.seq_length)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="internvl-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.engine = engine
    app.state.metrics = metrics
    add_page_routes(app)

    async def drain(timeout: float, hurry: asyncio.Event | None = None) -> tuple[int, int]:
        """The graceful stop: refuse new requests, give those held up to `timeout` seconds (or until
        `hurry` is set), then end the rest with a 503. Returns (finished, ended) request counts."""
        engine.drain()
        held = len(requests)
        hurry = hurry or asyncio.Event()
        deadline = time.monotonic() + timeout
        while requests and time.monotonic() < deadline and not hurry.is_set():
            await asyncio.sleep(0.05)
        ended = len(requests)
        if ended:
            engine.abort(ApiError(503, f"the server stopped before this answer finished (it waited {timeout:g} s "
                                       "for answers in progress: --drain-timeout)", code="unavailable"))  # fmt: skip
            grace = time.monotonic() + 5  # the error chunks and objects are written
            while requests and time.monotonic() < grace:
                await asyncio.sleep(0.02)
        return held - ended, ended

    app.state.drain = drain

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(ApiError(e.status_code, message, code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        body = ApiError(500, f"internal error ({type(e).__name__})", code="internal_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")  # fmt: skip

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": int(os.path.getmtime(model.manifest.path)),
                "owned_by": "internvl-edge"}  # fmt: skip

    @app.get("/health")
    async def health():
        # active: every admitted request (preparing, prefilling or decoding); waiting: those without a slot
        state = engine.health()
        body = {"status": state.pop("status"), "model": settings.model_name, **state}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        authorize(request)
        return Response(metrics.text(engine.admitted, engine.waiting_count), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        authorize(request)
        if model_id != settings.model_name:
            raise ApiError(404, f"model {model_id!r} not found (this server serves {settings.model_name!r})",
                           param="model", code="model_not_found")  # fmt: skip
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        out = Outcome(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", received=time.perf_counter(), metrics=metrics,
                      open=requests)  # fmt: skip
        headers = {"x-request-id": out.id}
        streaming = False
        try:
            authorize(request)
            req = parse_chat_request(await read_json(request, settings.max_body_bytes))
            out.stream = req.stream
            handle = await submit(req, out)
            watcher = asyncio.create_task(cancel_when_gone(request, handle))
            try:
                first = await handle.next()
                if handle.served_by:  # which replica, when the engine is spread over several
                    headers["x-served-by"] = handle.served_by
                if first is not None and req.stream:
                    watcher.cancel()  # the streaming response watches the connection from here
                    streaming = True  # and owns the sequence
                    return EngineStream(stream_events(req, handle, first, out), handle, out,
                                        media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})  # fmt: skip
                body = await complete(req, handle, first, out) if first is not None else None
            finally:
                watcher.cancel()
            out.log()
            return JSONResponse(body, headers=headers) if body else Response(status_code=499)  # 499: the client left
        except ApiError as e:
            out.status, out.error = e.status, str(e)
            out.log()
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        finally:
            if out.handle is not None and not streaming:
                out.handle.cancel()  # a no-op once finished; frees the slot if this handler failed or was cancelled
            if not streaming:
                requests.discard(out)  # ended, logged or not (a bug's 500): a drain must not wait for it

    async def submit(req: ChatRequest, out: Outcome) -> Handle:
        if req.model and req.model != settings.model_name:
            raise ApiError(404, f"model {req.model!r} not found (this server serves {settings.model_name!r})",
                           param="model", code="model_not_found")  # fmt: skip
        if req.image_count > image_limit:
            raise ApiError(400, f"too many images: {req.image_count}; this bundle's context "
                                f"({model.seq_length} tokens) holds at most {image_limit}", param="messages")  # fmt: skip
        if engine.draining:  # refused before the prompt's work (the engine would refuse it after)
            raise ApiError(503, "the server is shutting down; retry on another instance or later", code="unavailable")
        try:
            cfg = model.generation_config(**req.generation_options())
            ids, media = await run_in_threadpool(model.request, messages=req.messages, max_tiles=req.max_tiles,
                                                 resolve=policy.resolve, resolve_video=policy.resolve_video)  # fmt: skip
            cfg = dataclasses.replace(cfg, max_new_tokens=answer_limit(req, len(ids)))
        except UserError as e:
            raise ApiError(400, str(e)) from None
        out.prompt_tokens = len(ids)
        out.handle = engine.submit(Job(out.id, ids, media, cfg, out.received), asyncio.get_running_loop())
        return out.handle

    def answer_limit(req: ChatRequest, prompt_tokens: int) -> int:
        """The request's max_tokens, or the most the context (and --max-tokens) allow; ApiError(400)
        naming the limit when it asks for more. A prompt that leaves no room is the engine's 400."""
        room = model.seq_length - prompt_tokens  # the answer's last token needs no KV row
        limit = min(context_cap, room)
        if req.max_tokens is None or room < 1:
            return max(1, limit)
        if req.max_tokens > limit:
            why = (f"this server's limit (--max-tokens {context_cap})" if limit == context_cap < room else
                   f"what the bundle's context ({model.seq_length} tokens) holds after this prompt's "
                   f"{prompt_tokens} tokens")  # fmt: skip
            raise ApiError(400, f"`max_tokens` is too large: {req.max_tokens}; at most {limit} tokens may be "
                                f"generated, {why}", param="max_tokens", code="max_tokens_too_large")  # fmt: skip
        return req.max_tokens

    async def complete(req: ChatRequest, handle: Handle, item, out: Outcome) -> dict | None:
        text, ids, tops, chosen = [], [], [], []
        while True:
            text.append(item.text)
            ids += item.token_ids
            tops += item.logprobs or []
            chosen += item.token_logprobs or []
            if item.finish_reason:
                break
            item = await handle.next()
            if item is None:  # cancelled: the client left
                return None
        out.completion_tokens, out.finish, out.stats = len(ids), item.finish_reason, item.stats
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "logprobs": logprobs_body(req, ids, chosen, tops), "finish_reason": item.finish_reason}  # fmt: skip
        body = {"id": out.id, "object": "chat.completion", "created": int(time.time()), "model": settings.model_name,
                "choices": [choice], "usage": usage(out.prompt_tokens, len(ids), item.stats.cached_tokens),
                "timings": timings(out)}  # fmt: skip
        if req.return_token_ids:
            choice["token_ids"] = ids
            body["prompt_token_ids"] = handle.job.input_ids
        return body

    def logprobs_body(req: ChatRequest, ids: list[int], chosen: list[float], tops: list) -> dict | None:
        if not req.logprobs:
            return None
        return {"content": logprobs_content(model.tokenizer, ids, chosen, tops, req.top_logprobs)}

    async def stream_events(req: ChatRequest, handle: Handle, item, out: Outcome):
        base = {"id": out.id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": settings.model_name}  # fmt: skip

        def event(delta: dict, finish: str | None = None, logprobs=None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}
            return sse({**base, "choices": [choice], **({"usage": None} if req.include_usage else {})})

        opening = {"prompt_token_ids": handle.job.input_ids} if req.return_token_ids else {}
        yield event({"role": "assistant", "content": ""}, **opening)
        while True:
            out.completion_tokens += len(item.token_ids)
            if item.text or item.token_ids:
                extra = {"token_ids": item.token_ids} if req.return_token_ids else {}
                lps = logprobs_body(req, item.token_ids, item.token_logprobs or [], item.logprobs or [])
                yield event({"content": item.text}, logprobs=lps, **extra)
            if item.finish_reason:
                break
            await asyncio.sleep(0)  # let the loop see a closed connection before the next write
            try:
                item = await handle.next()
            except ApiError as e:  # the status line is sent: the error goes in the stream, as OpenAI's
                out.status, out.error = e.status, str(e)
                yield sse(e.body())
                yield sse("[DONE]")
                return
            if item is None:  # cancelled: the client is gone
                return
        out.finish, out.stats = item.finish_reason, item.stats
        yield event({}, item.finish_reason, timings=timings(out))
        if req.include_usage:
            yield sse(
                {
                    **base,
                    "choices": [],
                    "usage": usage(out.prompt_tokens, out.completion_tokens, out.stats.cached_tokens),
                }
            )
        yield sse("[DONE]")

    def timings(out: Outcome) -> dict:
        s = out.stats
        return {"queue_s": round(out.handle.queue_s, 6), "vision_s": round(s.vision_s, 6), "ftl_s": round(s.ftl_s, 6),
                "decode_tps": round(s.decode_tps, 3)}  # fmt: skip

    return app


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing one over `limit` bytes before reading it all (413)."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than the server's limit of {limit} bytes "
                            "(--max-body-bytes)", code="request_too_large")  # fmt: skip
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection while sending the body") from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep
        raise ApiError(400, f"the request body is not valid JSON ({type(e).__name__}: {e})") from None


async def cancel_when_gone(request: Request, handle: Handle) -> None:
    """Cancel the sequence once the client has disconnected (checked every POLL_S seconds)."""
    while not handle.finished:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(POLL_S)


class EngineStream(StreamingResponse):
    """A streaming response that, however it ends (done, client gone, server stopping), cancels its
    sequence (a no-op once finished) and writes the request's log line."""

    def __init__(self, content, handle: Handle, outcome: Outcome, **kw):
        super().__init__(content, **kw)
        self.handle, self.outcome = handle, outcome

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client left; nothing more to send
        finally:
            self.handle.cancel()
            try:
                await self.body_iterator.aclose()
            except RuntimeError:  # still running: it ends with its task
                pass
            self.outcome.log()
