"""`internvl-edge serve --ray`: the server as a Ray Serve application (server/ray_app.py), started here.

    internvl-edge serve -m internvl3_2b --ray --replicas 2 --threads 1          # a local Ray on 127.0.0.1
    internvl-edge serve -m internvl3_2b --ray --min-replicas 1 --max-replicas 4 # autoscaled
    internvl-edge serve -m /data/internvl3_2b --ray --ray-address HEAD:6379 --host 0.0.0.0 --replicas 4

Without --ray-address a private Ray instance starts on this machine, bound to 127.0.0.1 with no
dashboard; it stops with the command. With it, the application joins that cluster (every node needs the
bundle at the same path and internvl-edge[ray] installed) and is deleted from it when the command stops.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import warnings

from ..errors import UserError

APP_NAME = "internvl-edge"
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's single-node mode, every address on 127.0.0.1


def add_ray_arguments(p, serving: bool) -> None:
    from .common import int_at_least

    if serving:
        p.add_argument(
            "--ray",
            action="store_true",
            help="serve on Ray Serve: engine replicas behind one ingress "
            "(pip install 'internvl-edge[ray]'; default: one process, no Ray)",
        )
        p.add_argument(
            "--ray-address",
            "--ray_address",
            dest="ray_address",
            default=None,
            help="with --ray: join this Ray cluster (default: start a local one on 127.0.0.1)",
        )
    p.add_argument(
        "--replicas",
        type=int_at_least(1),
        default=None,
        help="engine replicas, each with --threads threads (default 1)",
    )
    p.add_argument(
        "--min-replicas",
        "--min_replicas",
        dest="min_replicas",
        type=int_at_least(0),
        default=None,
        help="with --max-replicas: Serve's autoscaling on ongoing requests per replica, target --parallel "
        "(default: a fixed --replicas)",
    )
    p.add_argument(
        "--max-replicas",
        "--max_replicas",
        dest="max_replicas",
        type=int_at_least(1),
        default=None,
        help="the autoscaling's upper bound (default: a fixed --replicas)",
    )


def ray_settings(args):
    """RaySettings from the command's flags (a mistake is a one-line UserError)."""
    from ..server.ray_app import RaySettings
    from .names import resolve_bundle

    if args.allowed_media_path and not os.path.isabs(args.allowed_media_path):
        args.allowed_media_path = os.path.abspath(args.allowed_media_path)
    settings = RaySettings(
        bundle=os.path.abspath(resolve_bundle(args.model_path)),
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        threads=args.threads or 1,
        parallel=args.parallel,
        max_queue=args.max_queue,
        api_key=getattr(args, "api_key", None),
        allowed_media_path=args.allowed_media_path,
        max_body_bytes=args.max_body_bytes,
        max_tokens=args.max_tokens,
        served_model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model_path)),
        config_path=os.path.abspath(args.config_path) if args.config_path else None,
    )
    settings.check()
    return settings


def import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    try:
        with warnings.catch_warnings():  # Serve's pydantic models warn on import
            warnings.simplefilter("ignore", DeprecationWarning)
            import ray
            from ray import serve

            from ..server import ray_app
    except ImportError as e:
        raise UserError(f"--ray needs Ray Serve ({e.name} is missing): pip install 'internvl-edge[ray]'") from None
    return ray, serve, ray_app


def failure_reason(serve, app_name: str) -> str:
    """The one-line reason a deploy failed, from Serve's status (a replica's constructor error)."""
    try:
        app = serve.status().applications[app_name]
    except Exception as e:  # noqa: BLE001 - the status itself is unavailable: say so
        return f"Serve's status is unavailable ({type(e).__name__})"
    for dep in app.deployments.values():
        if dep.status in ("DEPLOY_FAILED", "UNHEALTHY") and dep.message:
            found = re.findall(r"^RuntimeError: (.+)$", dep.message, re.MULTILINE)
            return found[-1] if found else dep.message.strip().splitlines()[0]
    return app.message.strip().splitlines()[0] if app.message.strip() else app.status


def join_failure(e: Exception) -> str:
    """ray.init's failure in one line: its first line, the first sentence of its explanation, and what to do
    about Ray's token authentication (on by default in Ray 2.60 once a token exists, off in its clients)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    reason = lines[0] + (f"; {lines[1].split('. ')[0].rstrip('.')}" if len(lines) > 1 else "")
    text = f"{e} {e.__cause__ or ''}"  # ray.init's ConnectionError names the address; its cause, the reason
    if re.search(r"auth(entication|token)", text, re.I) and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        reason += " (set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN)"
    return reason


def proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxy listens: a Serve instance already running on the cluster keeps its own address
    (Serve ignores the new one), so say it rather than the one asked for."""
    from ray.serve.context import _get_global_client

    try:
        config = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - no address to compare with: keep the one asked for
        return host, port
    if (config.host, config.port) != (host, port):
        running = f"{config.host}:{config.port}"
        note = f"note: Serve already runs on this cluster with its proxy on {running}; --host/--port do not apply"
        print(note, file=sys.stderr, flush=True)
    return config.host, config.port


def _interrupt(*_):
    raise KeyboardInterrupt


def main(args) -> int:
    from .common import listen

    settings = ray_settings(args)
    from ..bundle import load_manifest

    if not args.ray_address:
        load_manifest(settings.bundle, verify=False)  # the local replicas would fail on it: say it now
        os.environ[LOCAL_ONLY] = "0"
    sock = listen(args.host, args.port)  # a busy port is a one-line error; Serve's proxy binds it next
    port = sock.getsockname()[1]
    sock.close()
    ray, serve, ray_app = import_ray()
    where = f"joining the Ray cluster at {args.ray_address}" if args.ray_address else "starting Ray on 127.0.0.1"
    print(f"[ray] {where}", file=sys.stderr, flush=True)
    local = not args.ray_address
    try:
        if local:
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=args.ray_address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot start or join Ray ({args.ray_address or 'local'}): {join_failure(e)}") from None
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops as Ctrl-C does
    try:
        serve.start(http_options={"host": args.host, "port": port})
        host, port = proxy_address(args.host, port)
        count = (
            f"{settings.replicas or 1} replicas"
            if settings.min_replicas is None
            else f"{settings.min_replicas}-{settings.max_replicas} replicas (autoscaled)"
        )
        print(
            f"[ray] deploying {count} x parallel {settings.parallel}, {settings.threads} threads each",
            file=sys.stderr,
            flush=True,
        )
        try:
            serve.run(ray_app.build_app(settings), name=APP_NAME, route_prefix="/")
        except RuntimeError:
            raise UserError(f"the application did not deploy: {failure_reason(serve, APP_NAME)}") from None
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving {settings.model_name} on http://{shown}:{port}/v1 on Ray Serve ({count}, parallel "
            f"{settings.parallel} each{', API key required' if settings.api_key else ''}); "
            "/health lists the replicas",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[ray] stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
