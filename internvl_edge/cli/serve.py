"""`internvl-edge serve`: an OpenAI-compatible HTTP server for one bundle, many clients at once.

    internvl-edge serve -m internvl3_2b --parallel 4 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "internvl3_2b", "messages": [{"role": "user", "content": "Hello"}]}'

SIGTERM or Ctrl-C stops it gracefully (GracefulServer): no new requests (503), up to --drain-timeout
seconds for those in progress, then the rest end with an error; the exit status is 0. A second signal
ends the wait at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from ..errors import UserError
from .common import add_model_arguments, int_at_least, listen, load_model
from .ray_serve import add_ray_arguments


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--parallel", type=int_at_least(1), default=4, help="sequences decoded together in one batch (default 4)"
    )
    p.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int_at_least(0),
        default=64,
        help="requests that may wait for a free slot; beyond it 429 (default 64)",
    )
    p.add_argument(
        "--api-key",
        dest="api_key",
        default=os.environ.get("INTERNVL_EDGE_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $INTERNVL_EDGE_API_KEY, else none)",
    )
    p.add_argument(
        "--allowed-local-media-path",
        dest="allowed_media_path",
        default=None,
        help="folder whose images requests may name as file:// URLs or paths (default: none)",
    )
    p.add_argument(
        "--max-body-bytes",
        dest="max_body_bytes",
        type=int,
        default=32 << 20,
        help="largest request body, base64 images included (default 32 MiB)",
    )
    p.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=int,
        default=None,
        help="the most tokens one answer may ask for; more is a 400 (default: the bundle's context)",
    )
    p.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/Ctrl-C, seconds the answers in progress get to finish before they are "
        "ended with an error (default 30)",
    )
    p.add_argument(
        "--served-model-name",
        dest="served_model_name",
        default=None,
        help="the model id clients send (default: the bundle folder's name)",
    )
    add_ray_arguments(p, serving=True)


def graceful_server(uvicorn):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app (app.state.drain) before uvicorn's own
    shutdown, and which exits normally afterwards instead of re-raising the signal (uvicorn's default,
    which made the process end with status 143 mid-answer)."""

    class GracefulServer(uvicorn.Server):
        def __init__(self, config, drain, drain_timeout: float):
            super().__init__(config)
            self.drain, self.drain_timeout = drain, drain_timeout
            self.loop: asyncio.AbstractEventLoop | None = None
            self.draining: asyncio.Task | None = None
            self.hurry: asyncio.Event | None = None

        async def serve(self, sockets=None):
            self.loop, self.hurry = asyncio.get_running_loop(), asyncio.Event()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:  # a signal handler: only schedule work on the loop
            if self.loop is None:
                return super().handle_exit(sig, frame)
            self.loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

        def _on_signal(self, name: str) -> None:
            if self.draining is None:
                self.draining = asyncio.ensure_future(self._drain(name))
            else:
                logging.getLogger("internvl_edge.server").info("%s again: ending the answers in progress now", name)
                self.hurry.set()

        async def _drain(self, name: str) -> None:
            log = logging.getLogger("internvl_edge.server")
            log.info(
                "%s: stopping; new requests get 503, answers in progress get up to %g s (--drain-timeout)",
                name,
                self.drain_timeout,
            )
            try:
                finished, ended = await self.drain(self.drain_timeout, self.hurry)
                log.info("stopped: %d requests finished, %d ended by the stop", finished, ended)
            finally:
                self.should_exit = True

    return GracefulServer


def main(args) -> int:
    try:
        import uvicorn

        from ..server.app import ServerSettings, create_app
    except ImportError as e:
        raise UserError(
            f"the server needs FastAPI and uvicorn ({e.name} is missing): pip install 'internvl-edge[server]'"
        ) from None
    if args.allowed_media_path and not os.path.isdir(args.allowed_media_path):
        raise UserError(f"--allowed-local-media-path: {args.allowed_media_path} is not a folder")
    if args.max_body_bytes < 1024:
        raise UserError("--max-body-bytes must be at least 1024")
    if not 0 <= args.port < 65536:
        raise UserError("--port must be between 0 and 65535")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if not args.drain_timeout >= 0:
        raise UserError("--drain-timeout must be 0 or more seconds")
    if args.parallel < 1 or args.max_queue < 0:  # checked before the model's load, not after it
        raise UserError("--parallel must be at least 1 and --max-queue 0 or more")
    if args.ray:
        from . import ray_serve

        return ray_serve.main(args)
    if args.ray_address or args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None:
        raise UserError("--ray-address, --replicas, --min-replicas and --max-replicas need --ray")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sock = listen(args.host, args.port)  # a busy port is told before the model's load too
    model = load_model(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_path))
    settings = ServerSettings(
        model_name=name,
        parallel=args.parallel,
        max_queue=args.max_queue,
        api_key=args.api_key,
        allowed_media_path=args.allowed_media_path,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
    )
    app = create_app(model, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {name} on http://{shown}:{port}/v1 (parallel {args.parallel}, queue {args.max_queue}"
        f"{', API key required' if args.api_key else ''})",
        file=sys.stderr,
        flush=True,
    )
    print(f"chat page: http://{shown}:{port}/ (open it in a browser)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    graceful_server(uvicorn)(config, app.state.drain, args.drain_timeout).run(sockets=[sock])
    return 0
