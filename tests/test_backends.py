"""Every backend offers the whole `Backend` protocol (backends/base.py), so callers ask its capability
properties instead of probing for attributes; and the manifest's facts reach the backend as parsed.

The Sophgo backend is checked here at the class level (its instances need TPU-MLIR's simulator;
tests/test_sophgo.py drives one through generate, bench and the API)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

from internvl_edge.backends import open_backend
from internvl_edge.backends.base import Backend, KVCache, checked_query_lens
from internvl_edge.backends.bmrt import BmrtBackend
from internvl_edge.backends.ort import OrtBackend
from internvl_edge.bundle import load_manifest


def protocol_members() -> tuple[set[str], set[str]]:
    """(methods, properties and plain attributes) that the protocol declares."""
    methods = {n for n, v in vars(Backend).items() if inspect.isfunction(v) and not n.startswith("_")}
    properties = {n for n, v in vars(Backend).items() if isinstance(v, property)}
    return methods, properties | set(Backend.__annotations__)


@pytest.mark.parametrize("cls", [OrtBackend, BmrtBackend])
def test_each_backend_class_defines_every_method(cls):
    """With the protocol's parameters (properties may be set per instance: checked on one below)."""
    methods, _ = protocol_members()
    assert {"encode_images", "forward", "read_rows", "sample", "describe"} <= methods
    for name in methods:
        assert inspect.isfunction(getattr(cls, name, None)), f"{cls.__name__} lacks {name}"
        expected = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == expected, name


def test_the_cpu_backend_answers_every_capability(bundle):
    manifest = load_manifest(bundle("tiny_bf16", "f32"))
    backend = open_backend(manifest, threads=1)
    methods, members = protocol_members()
    assert {"can_sample", "can_copy_rows", "dynamic", "runs_on", "threads", "q4_kernel"} <= members
    for name in methods | members:
        getattr(backend, name)  # an AttributeError here is a probe some caller would need
    assert backend.can_sample and backend.can_copy_rows and backend.dynamic
    assert backend.runs_on == "onnxruntime-cpu" and backend.threads == 1
    facts = manifest.facts
    assert (backend.hidden, backend.vocab, backend.layers) == (facts.hidden_size, facts.vocab_size, facts.num_layers)
    assert backend.row_bytes == 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * 4
    assert backend.seq_length == manifest.settings.seq_length == 2048


def test_forward_arguments_are_checked(bundle):
    """The contract's rules (base.checked_query_lens, which every backend's forward applies)."""
    backend = open_backend(load_manifest(bundle("tiny_bf16", "f32")), threads=1)
    cache = KVCache(batch=2, capacity=backend.seq_length, lengths=np.zeros(2, np.int64))
    rows = np.zeros((2, 3, backend.hidden), np.float32)
    assert checked_query_lens(backend, cache, rows, [3, 0]).tolist() == [3, 0]
    with pytest.raises(ValueError, match="do not fit"):
        checked_query_lens(backend, cache, rows[:1], [3, 0])
    with pytest.raises(ValueError, match="at most"):
        checked_query_lens(backend, cache, rows, [backend.max_input_length + 1, 0])
    cache.lengths[:] = backend.seq_length - 1
    with pytest.raises(ValueError, match="full"):
        checked_query_lens(backend, cache, rows, [2, 0])


FREED_BLOCKS = """
import sys, numpy as np
from internvl_edge.backends.ort import hand_back_large_blocks
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
if sys.argv[1] == "1":
    assert hand_back_large_blocks()
a = np.ones(24 << 20, np.uint8); del a  # glibc raises its mmap threshold to 24 MiB here, unless fixed
before = rss()
b = np.ones(16 << 20, np.uint8); del b  # a heap block that stays, or a mapping handed back
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_go_back_to_the_system():
    """The ONNX Runtime backend fixes glibc's mmap threshold (hand_back_large_blocks): a large block
    freed after a larger one goes back to the system instead of staying in the heap."""
    kept = {}
    for fixed in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        proc = subprocess.run(
            [sys.executable, "-c", FREED_BLOCKS, fixed], env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        kept[fixed] = int(proc.stdout.split()[-1])
    if kept["0"] < 8 << 20:
        pytest.skip("this C library hands the block back by itself")
    assert kept["1"] < 4 << 20, kept


def _meeting_sessions(monkeypatch, parties: int):
    """OrtBackend._session patched to wait (up to 10 s) until `parties` sessions are being made at the
    same time: the threads that reached the meeting point, the nets made, and the meeting point."""
    import threading

    meeting = threading.Barrier(parties, timeout=10)
    made, threads = [], set()
    original = OrtBackend._session

    def meeting_session(self, name, profile_prefix=None):
        threads.add(threading.get_ident())
        try:
            meeting.wait()
        except threading.BrokenBarrierError:
            pass  # nobody else came: the sessions are made one after the other
        made.append(name)
        return original(self, name, profile_prefix)

    monkeypatch.setattr(OrtBackend, "_session", meeting_session)
    return threads, made, meeting


def test_sessions_are_made_side_by_side_on_the_decode_threads(bundle, monkeypatch):
    """The vision encoder's and the decoder's sessions load at the same time with two threads (the
    second load's time is the longer one's), one after the other with one; either way both work."""
    manifest = load_manifest(bundle("tiny_bf16", "w4bf16"))
    threads, made, meeting = _meeting_sessions(monkeypatch, 2)
    backend = OrtBackend(manifest, threads=2)
    assert sorted(made) == ["decoder", "vision"] and len(threads) == 2 and not meeting.broken
    assert backend.encode_images(np.zeros((1, 3, 448, 448), np.float32)).shape[0] == 1

    monkeypatch.undo()  # the first meeting point's patch off, or the next one would wrap it
    threads, made, _ = _meeting_sessions(monkeypatch, 1)
    OrtBackend(manifest, threads=1)
    assert sorted(made) == ["decoder", "vision"] and len(threads) == 1


def test_a_net_that_cannot_load_is_named_when_the_others_load_beside_it(bundle, tmp_path):
    """A damaged net among sessions made side by side: the one-line error names that net's file."""
    import shutil

    from internvl_edge.errors import UserError

    src = bundle("tiny_bf16", "w4bf16")
    broken = tmp_path / "bundle"
    shutil.copytree(src, broken)
    (broken / "vision.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match=r"cannot load .*vision\.onnx"):
        OrtBackend(load_manifest(str(broken), verify=False), threads=2)
