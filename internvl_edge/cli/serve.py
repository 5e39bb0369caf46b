"""`internvl-edge serve`: an OpenAI-compatible HTTP server for one bundle, many clients at once.

    internvl-edge serve -m internvl3_2b --parallel 4 --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"model": "internvl3_2b", "messages": [{"role": "user", "content": "Hello"}]}'
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from ..errors import UserError
from .common import add_model_arguments, load_model


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together in one batch (default 4)")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=64,
                   help="requests that may wait for a free slot; beyond it 429 (default 64)")  # fmt: skip
    p.add_argument("--api-key", dest="api_key", default=os.environ.get("INTERNVL_EDGE_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $INTERNVL_EDGE_API_KEY, else none)")  # fmt: skip
    p.add_argument("--allowed-local-media-path", dest="allowed_media_path", default=None,
                   help="folder whose images requests may name as file:// URLs or paths (default: none)")  # fmt: skip
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=32 << 20,
                   help="largest request body, base64 images included (default 32 MiB)")  # fmt: skip
    p.add_argument("--served-model-name", dest="served_model_name", default=None,
                   help="the model id clients send (default: the bundle folder's name)")  # fmt: skip


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound here so that port 0 works and a busy port is a one-line error)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(args) -> int:
    try:
        import uvicorn

        from ..server.app import ServerSettings, create_app
    except ImportError as e:
        raise UserError(f"the server needs FastAPI and uvicorn ({e.name} is missing): pip install 'internvl-edge[server]'") from None
    if args.allowed_media_path and not os.path.isdir(args.allowed_media_path):
        raise UserError(f"--allowed-local-media-path: {args.allowed_media_path} is not a folder")
    if args.max_body_bytes < 1024:
        raise UserError("--max-body-bytes must be at least 1024")
    if not 0 <= args.port < 65536:
        raise UserError("--port must be between 0 and 65535")
    if args.parallel < 1 or args.max_queue < 0:  # checked before the model's load, not after it
        raise UserError("--parallel must be at least 1 and --max-queue 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    sock = listen(args.host, args.port)  # a busy port is told before the model's load too
    model = load_model(args)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_path))
    settings = ServerSettings(model_name=name, parallel=args.parallel, max_queue=args.max_queue, api_key=args.api_key,
                              allowed_media_path=args.allowed_media_path, max_body_bytes=args.max_body_bytes)  # fmt: skip
    app = create_app(model, settings)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name} on http://{shown}:{port}/v1 (parallel {args.parallel}, queue {args.max_queue}"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)  # fmt: skip
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
