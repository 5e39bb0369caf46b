"""`internvl-edge ray-config`: a Ray Serve config file for `serve deploy` (Ray's own tooling).

    internvl-edge ray-config -m /data/internvl3_2b --replicas 4 --threads 2 -o internvl.yaml
    serve deploy internvl.yaml          # on a machine of the cluster (or with --address)
    serve status

The YAML runs server/ray_app.py's `builder` with the flags as its `args` (Serve's config file format:
https://docs.ray.io/en/latest/serve/production-guide/config.html). Every node needs the bundle at the
given path and internvl-edge[ray] installed. An API key is written only with --api-key; without it the
ingress takes $INTERNVL_EDGE_API_KEY from its node's environment (that of `ray start`).
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import UserError
from .common import add_model_arguments, int_at_least
from .ray_serve import APP_NAME, add_ray_arguments, ray_settings


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_ray_arguments(p, serving=False)
    p.add_argument("-o", "--output", default="serve_config.yaml", help="file to write (default serve_config.yaml)")
    p.add_argument("--host", default="0.0.0.0", help="address Serve's proxies listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int_at_least(1), default=8000, help="port (default 8000)")
    p.add_argument("--name", default=APP_NAME, help=f"application name (default {APP_NAME})")
    p.add_argument(
        "--parallel", type=int_at_least(1), default=4, help="sequences decoded together per replica (default 4)"
    )
    p.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int_at_least(0),
        default=64,
        help="requests that may wait per replica; beyond it 429 (default 64)",
    )
    p.add_argument(
        "--api-key",
        dest="api_key",
        default=None,
        help="write this key into the file (default: the ingress reads $INTERNVL_EDGE_API_KEY)",
    )
    p.add_argument(
        "--allowed-local-media-path",
        dest="allowed_media_path",
        default=None,
        help="folder (on the ingress's node) whose images requests may name (default: none)",
    )
    p.add_argument(
        "--max-body-bytes",
        dest="max_body_bytes",
        type=int,
        default=32 << 20,
        help="largest request body (default 32 MiB)",
    )
    p.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=int,
        default=None,
        help="the most tokens one answer may ask for (default: the bundle's context)",
    )
    p.add_argument(
        "--served-model-name",
        dest="served_model_name",
        default=None,
        help="the model id clients send (default: the bundle folder's name)",
    )


def config_text(settings, name: str, host: str, port: int) -> str:
    """Serve's config file; JSON scalars are valid YAML, so values are quoted by json.dumps."""
    args = settings.as_args()
    lines = [
        "# Ray Serve config written by `internvl-edge ray-config`; deploy with `serve deploy FILE`",
        "proxy_location: EveryNode",
        "http_options:",
        f"  host: {json.dumps(host)}",
        f"  port: {port}",
        "applications:",
        f"  - name: {json.dumps(name)}",
        "    route_prefix: /",
        "    import_path: internvl_edge.server.ray_app:builder",
        "    args:",
    ]
    lines += [f"      {key}: {json.dumps(value)}" for key, value in args.items()]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    if args.port > 65535:
        raise UserError("--port must be between 1 and 65535")
    settings = ray_settings(args)
    if not os.path.isdir(settings.bundle):
        note = f"note: {settings.bundle} is not on this machine; every node of the cluster needs it there"
        print(note, file=sys.stderr)
    text = config_text(settings, args.name, args.host, args.port)
    tmp = f"{args.output}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    except OSError as e:
        raise UserError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"wrote {args.output}; deploy it with: serve deploy {args.output}", file=sys.stderr)
    return 0
