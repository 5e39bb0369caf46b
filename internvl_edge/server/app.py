"""The HTTP side: OpenAI-compatible routes on FastAPI, errors as OpenAI error objects, one log line per
request.

    GET  /health                 engine state (no key needed): 200 "ok", or 503 "draining" while the
                                 server stops, "unavailable" once the engine is gone
    GET  /metrics                counters in Prometheus' text format (metrics.py; behind the key)
    GET  /, /chat                the chat page (page.py; static files, no key needed to load it)
    GET  /v1/models[/{id}]       the one served model
    POST /v1/chat/completions    streaming (SSE `data:` chunks, then `data: [DONE]`) or not

`ChatCompletions` handles the chat route; protocol.py's pure functions build every body it sends.
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

from ..api import Model
from ..errors import UserError
from ..version import __version__
from .media import MediaPolicy
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .page import add_page_routes
from .protocol import (
    ApiError,
    ChatRequest,
    completion_body,
    content_chunk,
    final_chunk,
    logprobs_content,
    opening_chunk,
    parse_chat_request,
    response_head,
    sse,
    timings,
    usage,
    usage_chunk,
)
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
        s = self.stats
        if self.metrics is not None:
            self.metrics.finished(status, self.prompt_tokens, self.completion_tokens, s.ftl_s if s else None, total)
        if self.error is not None:
            log.info("%s %s error=%r total=%.3fs", self.id, status, self.error, total)
            return
        kind = "stream" if self.stream else "json"
        queue = self.handle.queue_s if self.handle else 0.0
        tokens = f"prompt={self.prompt_tokens} completion={self.completion_tokens}"
        ended = f"finish={self.finish or 'cancelled'} queue={queue:.3f}s"
        timing = f" ftl={s.ftl_s:.3f}s vision={s.vision_s:.3f}s decode={s.decode_tps:.1f}tok/s" if s else ""
        where = f" replica={self.handle.served_by}" if self.handle and self.handle.served_by else ""
        log.info("%s %s %s %s %s%s total=%.3fs%s", self.id, status, kind, tokens, ended, timing, total, where)


def max_images(model: Model) -> int:
    """The most images whose smallest form (one tile between <img> and </img>) fit the bundle at all."""
    return max(1, (model.seq_length - 1) // (model.tokens_per_tile + 2))


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "internvl-edge"}


def not_served(asked: str, served: str) -> ApiError:
    message = f"model {asked!r} not found (this server serves {served!r})"
    return ApiError(404, message, param="model", code="model_not_found")


def authorize(request: Request, api_key: str | None) -> None:
    """Refuse (401) a request without `Authorization: Bearer <api_key>`, when the server has a key."""
    if not api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        why = "missing or wrong API key: send the header `Authorization: Bearer <key>`"
        raise ApiError(401, why, code="invalid_api_key")


class ChatCompletions:
    """POST /v1/chat/completions over one engine: check a request, prepare and submit it, then answer with
    one JSON body or a stream of chunks (protocol.py builds both). Every request gets one log line and
    its /metrics counts; `open` holds those not finished yet, which `drain` waits for."""

    def __init__(self, model: Model, settings: ServerSettings, engine, metrics: Metrics):
        self.model, self.settings, self.engine, self.metrics = model, settings, engine, metrics
        self.name = settings.model_name
        self.policy = MediaPolicy(settings.allowed_media_path, settings.max_body_bytes)
        self.image_limit = max_images(model)
        cap = settings.max_tokens
        self.context_cap = model.seq_length if cap is None else min(cap, model.seq_length)
        self.open: set[Outcome] = set()

    async def respond(self, request: Request) -> Response:
        """One request, start to end."""
        received = time.perf_counter()
        out = Outcome(id=f"chatcmpl-{uuid.uuid4().hex[:24]}", received=received, metrics=self.metrics, open=self.open)
        headers = {"x-request-id": out.id}
        streaming = False
        try:
            authorize(request, self.settings.api_key)
            req = parse_chat_request(await read_json(request, self.settings.max_body_bytes))
            out.stream = req.stream
            handle = await self.submit(req, out)
            watcher = asyncio.create_task(cancel_when_gone(request, handle))
            try:
                first = await handle.next()
                if handle.served_by:  # which replica, when the engine is spread over several
                    headers["x-served-by"] = handle.served_by
                if first is not None and req.stream:
                    watcher.cancel()  # the streaming response watches the connection from here
                    streaming = True  # and owns the sequence
                    events = self.stream_events(req, handle, first, out)
                    headers["cache-control"] = "no-cache"
                    return EngineStream(events, handle, out, media_type="text/event-stream", headers=headers)
                body = await self.complete(req, handle, first, out) if first is not None else None
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
                self.open.discard(out)  # ended, logged or not (a bug's 500): a drain must not wait for it

    async def submit(self, req: ChatRequest, out: Outcome) -> Handle:
        """Check the request against this server, prepare its prompt (images decoded and tiled, text
        tokenized: in a worker thread) and hand it to the engine."""
        model = self.model
        if req.model and req.model != self.name:
            raise not_served(req.model, self.name)
        if req.image_count > self.image_limit:
            held = f"this bundle's context ({model.seq_length} tokens) holds at most {self.image_limit}"
            raise ApiError(400, f"too many images: {req.image_count}; {held}", param="messages")
        if self.engine.draining:  # refused before the prompt's work (the engine would refuse it after)
            raise ApiError(503, "the server is shutting down; retry on another instance or later", code="unavailable")
        policy = self.policy
        try:
            cfg = model.generation_config(**req.generation_options())
            ids, media = await run_in_threadpool(
                model.request,
                messages=req.messages,
                max_tiles=req.max_tiles,
                resolve=policy.resolve,
                resolve_video=policy.resolve_video,
            )
            cfg = dataclasses.replace(cfg, max_new_tokens=self.answer_limit(req, len(ids)))
        except UserError as e:
            raise ApiError(400, str(e)) from None
        out.prompt_tokens = len(ids)
        out.handle = self.engine.submit(Job(out.id, ids, media, cfg, out.received), asyncio.get_running_loop())
        return out.handle

    def answer_limit(self, req: ChatRequest, prompt_tokens: int) -> int:
        """The request's max_tokens, or the most the context (and --max-tokens) allow; ApiError(400)
        naming the limit when it asks for more. A prompt that leaves no room is the engine's 400."""
        seq_length, cap = self.model.seq_length, self.context_cap
        room = seq_length - prompt_tokens  # the answer's last token needs no KV row
        limit = min(cap, room)
        if req.max_tokens is None or room < 1:
            return max(1, limit)
        if req.max_tokens > limit:
            if limit == cap < room:
                why = f"this server's limit (--max-tokens {cap})"
            else:
                held = f"what the bundle's context ({seq_length} tokens) holds"
                why = f"{held} after this prompt's {prompt_tokens} tokens"
            message = f"`max_tokens` is too large: {req.max_tokens}; at most {limit} tokens may be generated, {why}"
            raise ApiError(400, message, param="max_tokens", code="max_tokens_too_large")
        return req.max_tokens

    def logprobs(self, req: ChatRequest, ids: list[int], chosen: list[float], tops: list) -> dict | None:
        if not req.logprobs:
            return None
        return {"content": logprobs_content(self.model.tokenizer, ids, chosen, tops, req.top_logprobs)}

    async def complete(self, req: ChatRequest, handle: Handle, item, out: Outcome) -> dict | None:
        """The whole answer as one body, from its first chunk `item` on; None if the client left."""
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
        return completion_body(
            response_head("chat.completion", out.id, self.name, int(time.time())),
            "".join(text),
            item.finish_reason,
            usage(out.prompt_tokens, len(ids), item.stats.cached_tokens),
            timings(handle.queue_s, item.stats),
            self.logprobs(req, ids, chosen, tops),
            token_ids=ids if req.return_token_ids else None,
            prompt_token_ids=handle.job.input_ids if req.return_token_ids else None,
        )

    async def stream_events(self, req: ChatRequest, handle: Handle, item, out: Outcome):
        """The answer as server-sent events, from its first chunk `item` on; an error after the status
        line goes in the stream, as OpenAI's."""
        head = response_head("chat.completion.chunk", out.id, self.name, int(time.time()))
        with_ids, with_usage = req.return_token_ids, req.include_usage
        yield sse(opening_chunk(head, with_usage, handle.job.input_ids if with_ids else None))
        while True:
            out.completion_tokens += len(item.token_ids)
            if item.text or item.token_ids:
                lps = self.logprobs(req, item.token_ids, item.token_logprobs or [], item.logprobs or [])
                yield sse(content_chunk(head, item.text, with_usage, lps, item.token_ids if with_ids else None))
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
        yield sse(final_chunk(head, item.finish_reason, timings(handle.queue_s, item.stats), with_usage))
        if with_usage:
            yield sse(usage_chunk(head, usage(out.prompt_tokens, out.completion_tokens, item.stats.cached_tokens)))
        yield sse("[DONE]")

    async def drain(self, timeout: float, hurry: asyncio.Event | None = None) -> tuple[int, int]:
        """The graceful stop: refuse new requests, give those held up to `timeout` seconds (or until
        `hurry` is set), then end the rest with a 503. Returns (finished, ended) request counts."""
        self.engine.drain()
        held = len(self.open)
        hurry = hurry or asyncio.Event()
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline and not hurry.is_set():
            await asyncio.sleep(0.05)
        ended = len(self.open)
        if ended:
            waited = f"it waited {timeout:g} s for answers in progress: --drain-timeout"
            stopped = f"the server stopped before this answer finished ({waited})"
            self.engine.abort(ApiError(503, stopped, code="unavailable"))
            grace = time.monotonic() + 5  # the error chunks and objects are written
            while self.open and time.monotonic() < grace:
                await asyncio.sleep(0.02)
        return held - ended, ended


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(ApiError(e.status_code, message, code=code).body(), status_code=e.status_code)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    body = ApiError(500, f"internal error ({type(e).__name__})", code="internal_error").body()
    return JSONResponse(body, status_code=500)


def create_app(model: Model, settings: ServerSettings, engine=None) -> FastAPI:
    """The app over `engine` (default: an Engine on `model` in this process; ray_app.py passes one whose
    sequences run on Ray Serve replicas, with the same submit/Handle interface)."""
    engine = engine if engine is not None else Engine(model, settings.parallel, settings.max_queue)
    metrics = Metrics()
    chat = ChatCompletions(model, settings, engine, metrics)
    name, api_key = settings.model_name, settings.api_key

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(
        title="internvl-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.drain = chat.drain
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    add_page_routes(app)
    app.add_api_route("/v1/chat/completions", chat.respond, methods=["POST"])

    @app.get("/health")
    async def health():
        # active: every admitted request (preparing, prefilling or decoding); waiting: those without a slot
        state = engine.health()
        body = {"status": state.pop("status"), "model": name, **state}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        authorize(request, api_key)
        return Response(metrics.text(engine.admitted, engine.waiting_count), media_type=METRICS_CONTENT_TYPE)

    def card() -> dict:
        return model_card(name, int(os.path.getmtime(model.manifest.path)))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request, api_key)
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        authorize(request, api_key)
        if model_id != name:
            raise not_served(model_id, name)
        return card()

    return app


async def read_json(request: Request, limit: int):
    """The body as JSON, refusing one over `limit` bytes before reading it all (413)."""
    declared = request.headers.get("content-length")
    message = f"the request body is larger than the server's limit of {limit} bytes (--max-body-bytes)"
    too_big = ApiError(413, message, code="request_too_large")
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
