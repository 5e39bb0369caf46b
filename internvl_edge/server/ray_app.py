"""The OpenAI server as a Ray Serve application: one ingress, many engine replicas.

    HTTP ──> Serve's proxy ──> ingress (app.py's FastAPI app, 1 replica, no CPU reserved)
                                 │ checks, key, media, tokenizing: as `serve`
                                 │ Job ──deployment handle, streamed──> engine replica (N, or autoscaled)
                                 │                                       scheduler.Engine: --parallel slots,
                                 │ <──── chunks (or an error) ────────── --threads threads = num_cpus
                                 └ /health: every replica's state, pushed by the replicas to the ingress

The protocol layer is app.py's, unchanged: the ingress gives create_app a RemoteEngine whose `submit`
starts a streamed call on a replica (Serve picks the less loaded of two) and whose handles behave as the
local engine's. Cancelling a handle (the client left) cancels the Serve request, which cancels the
sequence on its replica. A replica that dies fails its requests with a 503 error object; Serve starts
another. A replica loads the bundle (manifest checksums checked) in its constructor, so a node without
the bundle fails the deploy with the loader's one-line reason in Serve's status.

Started by `internvl-edge serve --ray`, by `serve run internvl_edge.server.ray_app:builder bundle=B
replicas=2` or from `internvl-edge ray-config`'s YAML with `serve deploy`. Serve's API:
https://docs.ray.io/en/latest/serve/api/index.html
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
import weakref
from dataclasses import dataclass, fields

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from ..api import Model, load
from ..bundle import load_manifest, sha256_file
from ..errors import UserError
from ..tokenizer import TextTokenizer
from .app import ServerSettings, create_app
from .protocol import ApiError
from .scheduler import Engine, Job

log = logging.getLogger("internvl_edge.server")

ENGINE, INGRESS = "engine", "ingress"  # the deployments' names
REPORT_POLL_S = 0.25  # a replica looks at its engine this often and reports a change at once
HEARTBEAT_S = 2.0  # and reports at least this often
UNREACHABLE_S = 3 * HEARTBEAT_S  # a replica not heard from for this long shows as unreachable
FORGET_S = 30.0  # and is dropped from /health after this long
INGRESS_MAX_ONGOING = 4096  # the ingress only waits on replicas; the engines' queues do the limiting


@dataclass
class RaySettings:
    """The application's arguments (`serve run ... key=value`, the config YAML's `args`)."""

    bundle: str
    replicas: int | None = None  # fixed count (default 1 unless min/max are given)
    min_replicas: int | None = None  # with max_replicas: Serve's autoscaling
    max_replicas: int | None = None
    threads: int = 1  # per replica, reserved as num_cpus
    parallel: int = 4
    max_queue: int = 64
    api_key: str | None = None
    allowed_media_path: str | None = None
    max_body_bytes: int = 32 << 20
    max_tokens: int | None = None
    served_model_name: str | None = None
    config_path: str | None = None

    @classmethod
    def from_args(cls, args: dict) -> RaySettings:
        """From strings (the command line) or YAML values; a mistake is a one-line UserError."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise UserError(f"unknown application argument {unknown[0]!r} (known: {', '.join(known)})")
        if not args.get("bundle"):
            raise UserError("the application needs bundle=PATH (the bundle folder, the same path on every node)")
        values = {}
        for key, value in args.items():
            if value is None or value == "":
                continue
            if "int" in str(known[key].type):
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    raise UserError(f"application argument {key}={value!r} is not a whole number") from None
            values[key] = value
        s = cls(**values)
        s.check()
        return s

    def check(self) -> None:
        if self.replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise UserError("give either a fixed number of replicas or min/max replicas for autoscaling, not both")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise UserError("autoscaling needs both min replicas and max replicas")
        if self.replicas is not None and self.replicas < 1:
            raise UserError("replicas must be at least 1")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas == 0:
            raise UserError("autoscaling needs 0 <= min replicas <= max replicas and max replicas >= 1")
        if self.threads < 1 or self.parallel < 1 or self.max_queue < 0:
            raise UserError("threads and parallel must be at least 1 and max queue 0 or more")
        if self.max_body_bytes < 1024:
            raise UserError("max body bytes must be at least 1024")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError("max tokens must be at least 1")

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.bundle))

    def as_args(self) -> dict:
        """The non-default arguments, as `from_args` takes them."""
        defaults = RaySettings(bundle="")
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name == "bundle" or getattr(self, f.name) != getattr(defaults, f.name)
        }


# -- the engine replicas ---------------------------------------------------------------------------


def _error(e: ApiError) -> tuple:
    return ("error", e.status, str(e), e.code, e.param)


class EngineReplica:
    """One engine (scheduler.Engine) on a loaded bundle; streams a Job's chunks to the ingress and
    reports its load to the ingress for /health."""

    async def __init__(self, settings: dict):
        s = RaySettings(**settings)
        ctx = serve.get_replica_context()
        self.tag, self.app_name = ctx.replica_tag, ctx.app_name
        self.node = ray.util.get_node_ip_address()
        try:
            model = load(s.bundle, threads=s.threads, config_path=s.config_path)  # verifies the checksums
        except UserError as e:  # the reason, in one line, reaches Serve's deploy status
            raise RuntimeError(f"replica on {socket.gethostname()} ({self.node}): {e}") from None
        self.engine = Engine(model, s.parallel, s.max_queue)
        self.engine.start()
        self.reporter = asyncio.get_running_loop().create_task(self._report())
        log.info("replica %s serves %s (parallel %d, threads %d)", self.tag, s.bundle, s.parallel, s.threads)

    async def generate(self, job: Job):
        """The job's messages: ("chunk", Chunk, queue_s, replica) ... or one ("error", status, ...)."""
        job.received = time.perf_counter()  # this node's clock (the ingress measures end to end)
        try:
            handle = self.engine.submit(job, asyncio.get_running_loop())
        except ApiError as e:  # busy (429) or stopping
            yield _error(e)
            return
        try:
            while True:
                try:
                    item = await handle.next()
                except ApiError as e:
                    yield _error(e)
                    return
                if item is None:
                    return
                yield ("chunk", item, handle.queue_s, self.tag)
                if item.finish_reason:
                    return
        finally:  # done, or the request was cancelled (the client left): frees the slot
            handle.cancel()

    def state(self) -> dict:
        actor = ray.get_runtime_context().get_actor_name()
        return {"replica": self.tag, "actor": actor, "node": self.node, "pid": os.getpid(), **self.engine.health()}

    async def _report(self) -> None:
        ingress = serve.get_deployment_handle(INGRESS, app_name=self.app_name)
        last, sent = None, 0.0
        while True:
            state = self.state()
            key = {k: v for k, v in state.items() if k != "decode_steps"}
            if key != last or time.monotonic() - sent > HEARTBEAT_S:
                try:
                    await ingress.report.remote(state)
                    last, sent = key, time.monotonic()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the ingress is (re)starting: the next round tries again
                    log.debug("report to the ingress failed: %s", e)
            await asyncio.sleep(REPORT_POLL_S)

    def check_health(self) -> None:
        """Serve calls this periodically; a stopped engine thread makes Serve replace the replica."""
        if self.engine.health()["status"] != "ok":
            raise RuntimeError("the engine thread stopped")

    def __del__(self):
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(5.0)


# -- the ingress -----------------------------------------------------------------------------------


class RemoteHandle:
    """scheduler.Handle's interface over a streamed Serve call to a replica."""

    def __init__(self, job: Job, response, engine: RemoteEngine):
        self.job, self.response, self.engine = job, response, engine
        self.cancelled = self.finished = False
        self.served_by: str | None = None
        self.first_at: float | None = None
        self.replica_queue_s = 0.0
        self.transit_s = 0.0  # what the first token's latency gained on the way (Ray, the network)
        self.aborted: ApiError | None = None

    def cancel(self) -> None:
        if not self.cancelled and not self.finished:
            self.response.cancel()  # Serve cancels the replica's generator: its finally frees the slot
        self.cancelled = True

    def abort(self, error: ApiError) -> None:
        """End the request with `error` (the app's graceful stop): a pending `next()` raises it."""
        if not self.finished and self.aborted is None:
            self.aborted = error
            self.response.cancel()

    @property
    def queue_s(self) -> float:
        return self.replica_queue_s + self.transit_s if self.first_at else time.perf_counter() - self.job.received

    async def next(self):
        """The next chunk; None once cancelled; errors (the replica's, or its loss) as ApiError."""
        if self.cancelled:
            return None
        try:
            if self.aborted is not None:
                raise RequestCancelledError()
            msg = await self.response.__anext__()
        except (RequestCancelledError, StopAsyncIteration, asyncio.CancelledError) as e:
            if self.aborted is not None:
                self.finished = True
                raise self.aborted from None
            if isinstance(e, asyncio.CancelledError):
                raise
            if self.cancelled:
                return None
            self.finished = True
            raise ApiError(
                500, f"the replica ended the request without an answer ({type(e).__name__})", code="internal_error"
            ) from None
        except BackPressureError:
            self.finished = True
            raise ApiError(
                429, "the server is busy: every replica's queue is full; retry later", code="server_busy"
            ) from None
        except DeploymentUnavailableError:
            self.finished = True
            raise ApiError(
                503,
                "no engine replica is available: the engine deployment failed to deploy (see `serve status`)",
                code="unavailable",
            ) from None
        except (RayActorError, ActorUnavailableError, ReplicaUnavailableError) as e:
            self.finished = True
            self.engine.lost(self.served_by)
            where = f"replica {self.served_by}" if self.served_by else "the replica"
            raise ApiError(
                503,
                f"{where} serving this request stopped ({type(e).__name__}); retry the request",
                code="replica_failed",
            ) from None
        if msg[0] == "error":
            self.finished = True
            raise ApiError(*msg[1:])
        _, chunk, queue_s, self.served_by = msg
        if self.first_at is None:
            self.first_at, self.replica_queue_s = time.perf_counter(), queue_s
        if chunk.finish_reason:
            self.finished = True
        if chunk.stats is not None:  # end to end from the ingress's receipt, as `serve` measures it
            here = self.first_at - self.job.received
            self.transit_s = max(0.0, here - chunk.stats.ftl_s)
            chunk.stats.ftl_s = here
        return chunk


class RemoteEngine:
    """scheduler.Engine's interface for the app, over the engine deployment's replicas."""

    def __init__(self, handle, settings: RaySettings):
        self.handle = handle.options(stream=True, method_name="generate")
        self.parallel = settings.parallel
        self.reports: dict[str, tuple[float, dict]] = {}  # replica -> (monotonic time, state)
        self.handles: weakref.WeakSet[RemoteHandle] = weakref.WeakSet()
        self.draining = False

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 30.0) -> None:
        pass

    def drain(self) -> None:
        self.draining = True

    def abort(self, error: ApiError) -> None:
        for handle in list(self.handles):
            handle.abort(error)

    def submit(self, job: Job, loop) -> RemoteHandle:
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another instance or later", code="unavailable")
        handle = RemoteHandle(job, self.handle.remote(job), self)
        self.handles.add(handle)
        return handle

    def report(self, state: dict) -> None:
        self.reports[state["replica"]] = (time.monotonic(), state)

    def lost(self, replica: str | None) -> None:
        self.reports.pop(replica, None)

    def replicas(self) -> list[dict]:
        now = time.monotonic()
        for tag in [t for t, (at, _) in self.reports.items() if now - at > FORGET_S]:
            del self.reports[tag]
        out = []
        for at, state in self.reports.values():
            seen = now - at
            out.append(
                {
                    **state,
                    "status": state["status"] if seen <= UNREACHABLE_S else "unreachable",
                    "seen_s": round(seen, 3),
                }
            )
        return sorted(out, key=lambda r: r["replica"])

    def _live(self) -> list[dict]:
        return [r for r in self.replicas() if r["status"] == "ok"]

    @property
    def admitted(self) -> int:
        return sum(r["active"] for r in self._live())

    @property
    def waiting_count(self) -> int:
        return sum(r["waiting"] for r in self._live())

    def health(self) -> dict:
        replicas = self.replicas()
        live = [r for r in replicas if r["status"] == "ok"]
        status = ("draining" if self.draining else "ok") if live else "unavailable"
        return {
            "status": status,
            "parallel": sum(r["parallel"] for r in live),
            "active": sum(r["active"] for r in live),
            "waiting": sum(r["waiting"] for r in live),
            "decode_steps": sum(r["decode_steps"] for r in live),
            "replicas": replicas,
        }


class FrontendBackend:
    """What the ingress knows of the replicas' backend without loading a net: whether it samples (and
    that it keeps no prefix cache: the replicas do)."""

    def __init__(self, manifest):
        self.can_sample = manifest.platform.is_cpu or "sample_head" in manifest.nets
        self.can_copy_rows = False


def frontend_model(bundle: str, config_path: str | None = None) -> Model:
    """The bundle's tokenizer, template and limits for the ingress (no nets loaded); the files it reads
    (config/) are checked against the manifest, the nets are checked by each replica."""
    manifest = load_manifest(bundle, verify=False)
    for rel, meta in manifest.files.items():
        if rel.startswith("config/") and sha256_file(os.path.join(manifest.path, rel)) != meta["sha256"]:
            raise UserError(f"bundle {manifest.path} is damaged: {rel} fails its checksum; convert again")
    config_dir = config_path or manifest.config_dir
    return Model(manifest, FrontendBackend(manifest), TextTokenizer(config_dir), config_dir)


@serve.deployment(
    name=INGRESS,
    num_replicas=1,
    max_ongoing_requests=INGRESS_MAX_ONGOING,
    ray_actor_options={"num_cpus": 0},
    logging_config={"enable_access_log": False},
)
@serve.ingress()
class Ingress:
    """app.py's FastAPI app over the engine replicas; replicas call `report` with their state."""

    def __init__(self, engine_handle, settings: dict):
        s = RaySettings(**settings)
        logger = logging.getLogger("internvl_edge.server")
        if not logger.handlers:  # one log line per request, as `serve` writes them (the replica's log)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        try:
            model = frontend_model(s.bundle, s.config_path)
        except (UserError, OSError) as e:
            raise RuntimeError(f"ingress on {socket.gethostname()}: {e}") from None
        self.engine = RemoteEngine(engine_handle, s)
        api_key = s.api_key or os.environ.get("INTERNVL_EDGE_API_KEY") or None
        server = ServerSettings(
            model_name=s.model_name,
            parallel=s.parallel,
            max_queue=s.max_queue,
            api_key=api_key,
            allowed_media_path=s.allowed_media_path,
            max_body_bytes=s.max_body_bytes,
            max_tokens=s.max_tokens,
        )
        self.asgi = create_app(model, server, engine=self.engine)

    def __serve_build_asgi_app__(self):
        return self.asgi

    def report(self, state: dict) -> None:
        self.engine.report(state)


# -- building the application ----------------------------------------------------------------------


def build_app(settings: RaySettings, replica_class: type = EngineReplica, autoscaling: dict | None = None):
    """The bound application (ingress over engine replicas) for serve.run or a config file; `autoscaling`
    adds to Serve's autoscaling_config (its delays, say) when min/max replicas are given."""
    engine = serve.deployment(
        replica_class,
        name=ENGINE,
        max_ongoing_requests=settings.parallel + settings.max_queue + 1,  # the engine's own 429 comes first
        ray_actor_options={"num_cpus": settings.threads},
        max_constructor_retry_count=3,  # a missing or damaged bundle does not come back by retrying
        health_check_period_s=5,
        graceful_shutdown_timeout_s=10,
        **replica_count(settings, autoscaling or {}),
    )
    args = settings.as_args()
    return Ingress.bind(engine.bind(args), args)


def replica_count(settings: RaySettings, autoscaling: dict) -> dict:
    if settings.min_replicas is None:
        return {"num_replicas": settings.replicas or 1}
    # scale on ongoing requests per replica: a replica is as busy as wanted when its slots are all used
    config = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "initial_replicas": max(1, settings.min_replicas),
        "target_ongoing_requests": settings.parallel,
    }
    return {"autoscaling_config": {**config, **autoscaling}}


def builder(args: dict):
    """`serve run internvl_edge.server.ray_app:builder bundle=B replicas=2 threads=1 parallel=4 ...`"""
    return build_app(RaySettings.from_args(dict(args)))
