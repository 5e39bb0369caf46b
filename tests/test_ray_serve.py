"""The server as a Ray Serve application (server/ray_app.py) on a real local Ray instance bound to
127.0.0.1 (no dashboard): 2 engine replicas of 1 thread each behind app.py's FastAPI app, driven by the
official `openai` client and raw HTTP. Ray is shut down at the end whatever happens.

The replicas here are EngineReplica with every decoder call slowed by 2 ms (as test_server.py's
`slowed`), so that a long answer is still running when a test cancels it or kills its replica."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-node mode: Ray's addresses are 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"  # the workers' (autoscaling test)
ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

with warnings.catch_warnings():  # Serve's pydantic models warn on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import cloudpickle, serve

    from internvl_edge.server.ray_app import EngineReplica, RaySettings, build_app, builder
from test_cli import with_sigint  # noqa: E402
from test_server import cli_run_json, data_url, user  # noqa: E402 - after the skip when Ray is missing

from internvl_edge.api import load  # noqa: E402
from internvl_edge.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "sk-ray-key"
NAME = "tiny"
STEP_DELAY_S = 0.002
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module


class SlowedReplica(EngineReplica):
    async def __init__(self, settings: dict):
        await super().__init__(settings)
        backend = self.engine.backend
        forward = backend.forward

        def slow_forward(*args):
            time.sleep(STEP_DELAY_S)
            return forward(*args)

        backend.forward = slow_forward


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, url: str, name: str):
        self.url, self.name = url, name

    def client(self, key: str | None = KEY):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)

    def post(self, body: dict, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=kw.pop("timeout", 120))

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_for(self, condition, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if condition(h):
                return h
            time.sleep(0.05)
        raise AssertionError(f"state never reached: {self.health()}")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance and Serve's proxy on 127.0.0.1; both shut down however the tests end."""
    port = free_port()
    try:
        # "local": a new instance, never one `ray start` left running on this machine
        ray.init(address="local", include_dashboard=False, num_cpus=4, logging_level="WARNING", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def deploy(cluster: str, name: str, bundle: str, **args) -> App:
    settings = RaySettings.from_args({"bundle": bundle, "served_model_name": NAME, **args})
    serve.run(build_app(settings, SlowedReplica), name=name, route_prefix=f"/{name}")
    app = App(f"{cluster}/{name}", name)
    app.wait_for(lambda h: len([r for r in h.get("replicas", []) if r["status"] == "ok"]) == settings.replicas)
    return app


@pytest.fixture(scope="module")
def greedy_bundle(bundle):
    return bundle("tiny_bf16", "w4bf16")


@pytest.fixture(scope="module")
def app(cluster, greedy_bundle):
    return deploy(cluster, "main", greedy_bundle, replicas=2, threads=1, parallel=4, max_queue=16, api_key=KEY)


def test_ray_is_local_and_every_replica_is_reported(cluster, app):
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes() if n["Alive"])
    h = app.health()
    assert h["status"] == "ok" and h["model"] == NAME and len(h["replicas"]) == 2
    for r in h["replicas"]:
        assert r["status"] == "ok" and r["parallel"] == 4 and r["active"] == 0 and r["waiting"] == 0
        assert r["actor"].startswith("SERVE_REPLICA::main#engine#") and r["node"] == "127.0.0.1"
    assert h["parallel"] == 8


def test_whole_and_streamed_answers_equal_run_json(app, greedy_bundle, images):
    expected = cli_run_json(
        greedy_bundle, "-p", "Describe the image.", "--image", images["wide"], "--max-new-tokens", 12
    )
    messages = user("Describe the image.", data_url(images["wide"]))
    resp = app.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, extra_body={"return_token_ids": True}
    )
    choice = resp.choices[0]
    assert choice.token_ids == expected["token_ids"] and resp.prompt_token_ids == expected["prompt_token_ids"]
    assert choice.message.content == expected["text"] and choice.finish_reason == "length"
    stream = app.client().chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_sixteen_concurrent_streams_complete_over_both_replicas(app, greedy_bundle):
    reference = load(greedy_bundle)
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(4)]
    expected = {p: reference.generate(messages=user(p), max_new_tokens=24).text for p in prompts}

    def one(i: int) -> tuple[str, str, str, str]:
        prompt = prompts[i % 4]
        raw = app.client().chat.completions.with_raw_response.create(
            model=NAME, messages=user(prompt), max_tokens=24, stream=True
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return prompt, text, chunks[-1].choices[0].finish_reason, raw.headers["x-served-by"]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(text == expected[p] and finish == "length" for p, text, finish, _ in results)
    served_by = [r[3] for r in results]
    assert set(served_by) == {r["replica"] for r in app.health()["replicas"]}  # both replicas served
    app.wait_for(lambda h: h["active"] == 0 and h["waiting"] == 0)


def test_a_wrong_key_is_401(app):
    for key in ("wrong", None):
        r = app.post({"model": NAME, "messages": user("Hi"), "max_tokens": 2}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_client_that_leaves_cancels_its_sequence_on_its_replica(app):
    long = {"model": NAME, "messages": user("Go on."), "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", app.url + "/v1/chat/completions", json=long, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        replica = r.headers["x-served-by"]
        lines = r.iter_lines()
        next(lines)
        app.wait_for(lambda h: any(x["replica"] == replica and x["active"] == 1 for x in h["replicas"]))
    # the stream is closed long before 1900 slowed steps (>= 3.8 s) could end it
    started = time.monotonic()
    app.wait_for(lambda h: all(x["active"] == 0 for x in h["replicas"]), timeout=30)
    assert time.monotonic() - started < 3.0


def test_a_full_queue_is_429(cluster, greedy_bundle):
    small = deploy(cluster, "small", greedy_bundle, replicas=2, threads=1, parallel=1, max_queue=0)
    long = {"model": NAME, "messages": user("Go on."), "max_tokens": 1900, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=60) as http:
            url = small.url + "/v1/chat/completions"
            with http.stream("POST", url, json=long) as first:
                first_lines = first.iter_lines()
                next(first_lines)
                with http.stream("POST", url, json=long) as second:
                    second_lines = second.iter_lines()
                    next(second_lines)
                    assert first.headers["x-served-by"] != second.headers["x-served-by"]  # one per replica
                    busy = http.post(url, json={"model": NAME, "messages": user("Me too"), "max_tokens": 2})
                    assert busy.status_code == 429
                    error = busy.json()["error"]
                    assert error["type"] == "rate_limit_error" and "busy" in error["message"]
            small.wait_for(lambda h: h["active"] == 0)
            assert http.post(url, json={"model": NAME, "messages": user("Now?"), "max_tokens": 2}).status_code == 200
    finally:
        serve.delete("small")


def test_a_damaged_bundle_fails_the_deploy_with_the_reason(cluster, greedy_bundle, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(greedy_bundle, damaged)
    data = next(p for p in sorted(damaged.iterdir()) if p.suffix == ".data")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    settings = RaySettings.from_args({"bundle": str(damaged), "replicas": 1})
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError):
            serve.run(build_app(settings), name="damaged", route_prefix="/damaged")
        engine = serve.status().applications["damaged"].deployments["engine"]
        assert engine.status == "DEPLOY_FAILED"
        assert f"{data.name} fails its checksum; convert again" in engine.message
        assert time.monotonic() - started < 120
    finally:
        serve.delete("damaged")


def test_a_killed_replica_fails_its_requests_and_is_replaced(app):
    long = {"model": NAME, "messages": user("Go on."), "max_tokens": 1900, "ignore_eos": True}
    before = {r["replica"]: r["actor"] for r in app.health()["replicas"]}
    results: dict[str, object] = {}

    def non_streamed():  # in flight on one replica: it must end with an error object, not hang
        results["json"] = app.post(long)

    with httpx.stream(
        "POST",
        app.url + "/v1/chat/completions",
        json={**long, "stream": True},
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        victim = r.headers["x-served-by"]
        lines = r.iter_lines()
        next(lines)
        waiter = threading.Thread(target=non_streamed)
        waiter.start()
        app.wait_for(lambda h: sum(x["active"] for x in h["replicas"]) == 2)
        ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][len("data: ") :])["error"]
    assert error["code"] == "replica_failed" and error["type"] == "server_error"
    waiter.join(60)
    assert not waiter.is_alive()
    # the non-streamed request was on the other replica (the less loaded) and finished, or on the victim
    # and ended with an error object
    j = results["json"]
    assert j.status_code == 200 or (j.status_code == 503 and j.json()["error"]["code"] == "replica_failed")
    # Serve replaces the replica; later requests succeed
    h = app.wait_for(
        lambda h: (
            len([x for x in h["replicas"] if x["status"] == "ok"]) == 2
            and victim not in {x["replica"] for x in h["replicas"]}
        ),
        timeout=120,
    )
    assert len(set(before) & {x["replica"] for x in h["replicas"]}) == 1
    for _ in range(4):
        resp = app.client().chat.completions.create(model=NAME, messages=user("Hi again"), max_tokens=4)
        assert resp.choices[0].finish_reason == "length"


# -- the command line ------------------------------------------------------------------------------


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "internvl_edge", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 120),
        **kw,
    )


def test_ray_config_writes_what_the_builder_takes(greedy_bundle, tmp_path):
    import yaml
    from ray.serve import Application

    out = tmp_path / "serve.yaml"
    proc = cli("ray-config", "-m", greedy_bundle, "--replicas", 2, "--threads", 1, "--parallel", 2, "-o", out)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(out.read_text())
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    assert app["import_path"] == "internvl_edge.server.ray_app:builder" and app["route_prefix"] == "/"
    assert app["args"] == {
        "bundle": os.path.abspath(greedy_bundle),
        "replicas": 2,
        "parallel": 2,
        "served_model_name": os.path.basename(greedy_bundle),
    }
    assert isinstance(builder(app["args"]), Application)
    auto = builder({"bundle": greedy_bundle, "min_replicas": "1", "max_replicas": "3", "parallel": "2", "threads": "2"})
    engine = auto._bound_deployment.init_args[0]._bound_deployment  # Serve's objects (the extra pins Ray)
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 2)
    assert engine.ray_actor_options["num_cpus"] == 2 and engine.max_ongoing_requests == 2 + 64 + 1
    with pytest.raises(UserError, match="unknown application argument 'replica'"):
        builder({"bundle": greedy_bundle, "replica": "2"})
    with pytest.raises(UserError, match="not a whole number"):
        builder({"bundle": greedy_bundle, "replicas": "two"})
    proc = cli("ray-config", "-m", greedy_bundle, "--replicas", 2, "--min-replicas", 1, "-o", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: give either a fixed number of replicas or min/max replicas for autoscaling, not both"
    ]


def test_serve_ray_a_missing_bundle_is_one_line(tmp_path):
    proc = cli("serve", "-m", tmp_path / "nowhere", "--ray", "--replicas", 2, "--port", free_port())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: bundle not found: {tmp_path / 'nowhere'}"
    ]


def test_serve_ray_starts_a_local_ray_serves_and_stops(greedy_bundle):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    flags = ["--replicas", "1", "--threads", "1", "--port", str(port), "--api-key", KEY, "--served-model-name", NAME]
    cmd = [sys.executable, "-m", "internvl_edge", "serve", "-m", greedy_bundle, "--ray", *flags]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert lines and lines[-1].startswith(f"serving {NAME} on http://127.0.0.1:{port}/v1 on Ray Serve"), lines
        served = App(f"http://127.0.0.1:{port}", "cli")
        h = served.wait_for(lambda h: len(h.get("replicas", [])) == 1)
        assert h["replicas"][0]["node"] == "127.0.0.1"
        resp = served.client().chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=3)
        assert resp.choices[0].finish_reason == "length"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_autoscaling_bounds_reach_serve_and_load_adds_a_replica(cluster, greedy_bundle):
    """min 1, max 2: Serve's deployment gets the bounds and the target (--parallel ongoing requests per
    replica), starts 1 replica, and adds the second under load. Serve's upscale delay (30 s by default)
    and its look-back window are shortened here through build_app's `autoscaling`."""
    from ray.serve.context import _get_global_client

    args = dict(bundle=greedy_bundle, min_replicas=1, max_replicas=2, threads=1, parallel=1, max_queue=16)
    settings = RaySettings.from_args({**args, "served_model_name": NAME})
    quick = {"upscale_delay_s": 0.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
    serve.run(build_app(settings, SlowedReplica, autoscaling=quick), name="auto", route_prefix="/auto")
    try:
        details = _get_global_client().get_serve_details()["applications"]["auto"]["deployments"]["engine"]
        scaling = details["deployment_config"]["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (1, 2, 1)
        assert scaling["target_ongoing_requests"] == 1 and scaling["upscale_delay_s"] == 0

        def engine_states() -> dict:
            return serve.status().applications["auto"].deployments["engine"].replica_states

        assert engine_states() == {"RUNNING": 1}
        auto = App(f"{cluster}/auto", "auto")
        auto.wait_for(lambda h: len(h.get("replicas", [])) == 1)
        # six long answers on one slot: 6 ongoing requests against a target of 1 per replica
        long = {"model": NAME, "messages": user("Go on."), "max_tokens": 1900, "ignore_eos": True, "stream": True}
        enough = threading.Event()

        def one():
            with httpx.stream("POST", auto.url + "/v1/chat/completions", json=long, timeout=120) as r:
                for _ in r.iter_lines():
                    if enough.is_set():
                        return

        with ThreadPoolExecutor(6) as pool:
            streams = [pool.submit(one) for _ in range(6)]
            try:
                h = auto.wait_for(lambda h: len([r for r in h["replicas"] if r["status"] == "ok"]) == 2, timeout=90)
                assert {r["node"] for r in h["replicas"]} == {"127.0.0.1"}
                deadline = time.monotonic() + 30  # Serve counts it RUNNING after its first health check
                while (states := engine_states()) != {"RUNNING": 2}:
                    assert time.monotonic() < deadline, states
                    time.sleep(0.2)
            finally:
                enough.set()
            for stream in streams:
                stream.result()
    finally:
        serve.delete("auto")


# -- Ray's own tooling on a cluster started by `ray start` -----------------------------------------


def ray_tool(name: str) -> str:
    """Ray's `ray` and `serve` commands: those beside this Python (its venv), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else shutil.which(name) or name


class External:
    """A cluster started by `ray start --head` (its GCS and dashboard addresses) and the environment that
    every command talking to it needs."""

    def __init__(self, address: str, dashboard: str, env: dict, proc: subprocess.Popen):
        self.address, self.dashboard, self.env, self.proc = address, dashboard, env, proc

    def run(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*map(str, args)], capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )

    def applications(self) -> dict:
        """Serve's applications, from the dashboard's REST API (what `serve status` reads)."""
        auth = {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        r = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=auth, timeout=30)
        r.raise_for_status()
        return r.json()["applications"]

    def alive(self) -> bool:
        status = self.run(ray_tool("ray"), "status", "--address", self.address)
        return self.proc.poll() is None and status.returncode == 0


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """`ray start --head` bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: without it Ray replaces
    127.0.0.1 by the machine's address), with the dashboard on 127.0.0.1 (`serve deploy` talks to its REST
    API) and Ray's token authentication (its default once a token exists; its clients need RAY_AUTH_MODE).
    Stopped at the end whatever happens: SIGTERM to that `ray start --block`, which stops what it started,
    then its process group. Not `ray stop`: that stops every Ray process on the machine, this module's
    other instance included."""
    gcs, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("rt")
    if len(str(temp)) > 40:  # Ray's socket paths (temp/session_.../sockets/...) must stay under 108 bytes
        temp = tempfile.mkdtemp(prefix="ray-")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.update(auth, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # `ray start`'s SIGTERM stops at once
    env["INTERNVL_EDGE_API_KEY"] = KEY  # the ingresses read it from their node's environment: `ray start`'s
    log = open(os.path.join(temp, "ray-start.log"), "w+")
    bind = f"--node-ip-address 127.0.0.1 --port {gcs} --dashboard-host 127.0.0.1 --dashboard-port {dashboard}"
    cmd = [ray_tool("ray"), "start", "--head", *bind.split(), "--num-cpus", "4", "--temp-dir", str(temp), "--block"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in open(log.name).read():
            assert proc.poll() is None and time.monotonic() < deadline, open(log.name).read()[-3000:]
            time.sleep(0.5)
        while True:  # the dashboard's REST API (serve deploy's) answers a little later
            try:
                httpx.get(f"http://127.0.0.1:{dashboard}/api/version", timeout=5)
                break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the dashboard never answered"
            time.sleep(0.5)
        yield External(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left (its session: start_new_session)
        except ProcessLookupError:
            pass
        proc.wait(30)
        log.close()


def start(cmd: list, env: dict, ready: str, timeout: float = 180) -> tuple[subprocess.Popen, list[str]]:
    """A long-running command; returns once a line of its output contains `ready`. It starts with SIGINT's
    default disposition, as from a terminal, whatever this process inherited: a CI runner that starts the
    tests with `&` (no job control) leaves SIGINT ignored, and the Ctrl-C that `stop` sends would be lost."""
    proc = subprocess.Popen(
        with_sigint("default", cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    done = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if ready in line:
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout) or not any(ready in line for line in lines):
        proc.kill()
        raise AssertionError("".join(lines[-40:]))
    return proc, lines


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 90) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def expected(greedy_bundle) -> dict:
    return cli_run_json(greedy_bundle, "-p", "What is Ray?", "--max-new-tokens", 10)


def test_serve_ray_joins_a_cluster_and_serve_run_deploys_beside_it(external, greedy_bundle, expected):
    """`internvl-edge serve --ray --ray-address` on a `ray start` cluster, then Ray's `serve run` with the
    builder on the same cluster (Serve's proxy is the one serve --ray started); stopping serve --ray
    deletes its application only: the cluster and `serve run`'s application go on. Ctrl-C on `serve run`
    shuts Serve down (Ray's behaviour), the cluster still goes on."""
    port = free_port()
    flags = f"--ray-address {external.address} --port {port} --min-replicas 1 --max-replicas 2 --threads 1"
    flags += f" --served-model-name {NAME}"
    cmd = [sys.executable, "-m", "internvl_edge", "serve", "-m", greedy_bundle, "--ray", *flags.split()]
    # without RAY_AUTH_MODE=token, Ray's client sends no token: one line says what to set
    no_auth = {k: v for k, v in external.env.items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(cmd, env=no_auth, capture_output=True, text=True, timeout=180, check=False)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and last.startswith(f"error: cannot start or join Ray ({external.address}): ")
    assert "set RAY_AUTH_MODE=token" in last, refused.stderr[-2000:]
    joined, lines = start(cmd, external.env, "serving ")
    run = None
    try:
        assert any(line.startswith(f"serving {NAME} on http://127.0.0.1:{port}/v1 on Ray Serve") for line in lines)
        served = App(f"http://127.0.0.1:{port}", "joined")
        h = served.wait_for(lambda h: len(h.get("replicas", [])) == 1)
        assert h["replicas"][0]["actor"].startswith("SERVE_REPLICA::internvl-edge#engine#")
        # --min-replicas/--max-replicas reach Serve as its autoscaling config (target: --parallel, default 4)
        engine = external.applications()["internvl-edge"]["deployments"]["engine"]
        scaling = engine["deployment_config"]["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 2, 4)
        resp = served.client().chat.completions.create(model=NAME, messages=user("What is Ray?"), max_tokens=10)
        assert resp.choices[0].message.content == expected["text"]

        # Ray's CLI, as the README shows it: `serve run module:builder key=value ...`
        builder_args = f"bundle={greedy_bundle} replicas=2 threads=1 served_model_name={NAME}"
        options = f"--address {external.address} --name run --route-prefix /run"
        builder = "internvl_edge.server.ray_app:builder"
        cmd = [ray_tool("serve"), "run", *options.split(), builder, *builder_args.split()]
        run, _ = start(cmd, external.env, "Application 'run' is ready")
        by_run = App(f"http://127.0.0.1:{port}/run", "run")
        h = by_run.wait_for(lambda h: len([r for r in h.get("replicas", []) if r["status"] == "ok"]) == 2)
        assert all(r["actor"].startswith("SERVE_REPLICA::run#engine#") for r in h["replicas"])
        resp = by_run.client().chat.completions.create(
            model=NAME, messages=user("What is Ray?"), max_tokens=10, extra_body={"return_token_ids": True}
        )
        assert resp.choices[0].message.content == expected["text"]
        assert resp.choices[0].token_ids == expected["token_ids"]

        assert stop(joined) == 0
        apps = external.applications()
        assert "internvl-edge" not in apps and apps["run"]["status"] == "RUNNING"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 404  # its route is gone
        assert by_run.client().chat.completions.create(model=NAME, messages=user("Hi"), max_tokens=2).choices

        assert stop(run, signal.SIGINT, timeout=180) == 0  # Ctrl-C: Serve's shutdown on the cluster
        assert external.alive()
    finally:
        stop(joined, timeout=30)
        if run is not None:
            stop(run, signal.SIGINT, timeout=30)


def serve_status(external: External) -> dict:
    import yaml

    proc = external.run(ray_tool("serve"), "status", "-a", external.dashboard)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_ray_config_yaml_deploys_with_serve_deploy(external, greedy_bundle, expected, tmp_path):
    """`internvl-edge ray-config ... -o FILE` then `serve deploy FILE` (the dashboard's REST API): the
    application answers as `run --json`; a bundle missing on the cluster fails the deploy with the
    loader's one-line reason in `serve status`."""
    port, config = free_port(), tmp_path / "internvl.yaml"
    try:
        flags = f"--replicas 2 --threads 1 --served-model-name {NAME} --host 127.0.0.1 --port {port} -o {config}"
        proc = cli("ray-config", "-m", greedy_bundle, *flags.split())
        assert proc.returncode == 0, proc.stderr
        proc = external.run(ray_tool("serve"), "deploy", "-a", external.dashboard, config)
        assert proc.returncode == 0, proc.stderr
        deployed = App(f"http://127.0.0.1:{port}", "deployed")
        deadline = time.monotonic() + 180
        while True:
            try:
                deployed.wait_for(lambda h: len([r for r in h.get("replicas", []) if r["status"] == "ok"]) == 2)
                break
            except (httpx.HTTPError, ValueError):  # the proxy or the route is not there yet
                assert time.monotonic() < deadline, external.applications()
                time.sleep(1)
        resp = deployed.client().chat.completions.create(model=NAME, messages=user("What is Ray?"), max_tokens=10)
        assert resp.choices[0].message.content == expected["text"]
        assert external.applications()["internvl-edge"]["status"] == "RUNNING"
        wrong = deployed.post({"model": NAME, "messages": user("Hi"), "max_tokens": 2}, key="wrong")
        assert wrong.status_code == 401  # the key from `ray start`'s environment (none in the file)

        missing = tmp_path / "not-on-this-node"
        proc = cli("ray-config", "-m", missing, "--replicas", 1, "--host", "127.0.0.1", "--port", port, "-o", config)
        assert proc.returncode == 0 and "is not on this machine" in proc.stderr
        proc = external.run(ray_tool("serve"), "deploy", "-a", external.dashboard, config)
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 180
        while (app := external.applications()["internvl-edge"])["status"] != "DEPLOY_FAILED":
            assert time.monotonic() < deadline, app
            time.sleep(0.5)
        app = serve_status(external)["applications"]["internvl-edge"]  # as Ray's CLI shows it
        reasons = [d["message"] for d in app["deployments"].values() if d["status"] == "DEPLOY_FAILED"]
        assert any(f": bundle not found: {missing}" in r for r in reasons), app
    finally:
        external.run(ray_tool("serve"), "shutdown", "-y", "-a", external.dashboard)
