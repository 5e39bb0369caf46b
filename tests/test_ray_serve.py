"""The server as a Ray Serve application (server/ray_app.py) on a real local Ray instance bound to
127.0.0.1 (no dashboard): 2 engine replicas of 1 thread each behind app.py's FastAPI app, driven by the
official `openai` client and raw HTTP. Ray is shut down at the end whatever happens.

The replicas here are EngineReplica with every decoder call slowed by 2 ms (as test_server.py's
`slowed`), so that a long answer is still running when a test cancels it or kills its replica."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-node mode: Ray's addresses are 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

import httpx

with warnings.catch_warnings():  # Serve's pydantic models warn on import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import cloudpickle, serve

    from internvl_edge.server.ray_app import EngineReplica, RaySettings, build_app, builder
from test_server import cli_run_json, data_url, user

from internvl_edge.api import load
from internvl_edge.errors import UserError

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
    resp = app.client().chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                                extra_body={"return_token_ids": True})  # fmt: skip
    choice = resp.choices[0]
    assert choice.token_ids == expected["token_ids"] and resp.prompt_token_ids == expected["prompt_token_ids"]
    assert choice.message.content == expected["text"] and choice.finish_reason == "length"
    stream = app.client().chat.completions.create(model=NAME, messages=messages, max_tokens=12, stream=True,
                                                  stream_options={"include_usage": True})  # fmt: skip
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
        raw = app.client().chat.completions.with_raw_response.create(model=NAME, messages=user(prompt), max_tokens=24,
                                                                     stream=True)  # fmt: skip
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
    with httpx.stream("POST", app.url + "/v1/chat/completions", json=long, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
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

    with httpx.stream("POST", app.url + "/v1/chat/completions", json={**long, "stream": True}, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
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
    h = app.wait_for(lambda h: len([x for x in h["replicas"] if x["status"] == "ok"]) == 2
                     and victim not in {x["replica"] for x in h["replicas"]}, timeout=120)  # fmt: skip
    assert len(set(before) & {x["replica"] for x in h["replicas"]}) == 1
    for _ in range(4):
        resp = app.client().chat.completions.create(model=NAME, messages=user("Hi again"), max_tokens=4)
        assert resp.choices[0].finish_reason == "length"


# -- the command line ------------------------------------------------------------------------------


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "internvl_edge", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=kw.pop("timeout", 120), **kw)  # fmt: skip


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
    assert app["args"] == {"bundle": os.path.abspath(greedy_bundle), "replicas": 2, "parallel": 2,
                           "served_model_name": os.path.basename(greedy_bundle)}  # fmt: skip
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
        "error: give either a fixed number of replicas or min/max replicas for autoscaling, not both"]  # fmt: skip


def test_serve_ray_a_missing_bundle_is_one_line(tmp_path):
    proc = cli("serve", "-m", tmp_path / "nowhere", "--ray", "--replicas", 2, "--port", free_port())
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: bundle not found: {tmp_path / 'nowhere'}"
    ]


def test_serve_ray_starts_a_local_ray_serves_and_stops(greedy_bundle):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "internvl_edge", "serve", "-m", greedy_bundle, "--ray",
                             "--replicas", "1", "--threads", "1", "--port", str(port), "--api-key", KEY, "--served-model-name", NAME],
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
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
