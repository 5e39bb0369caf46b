"""Static (fixed, padded) and dynamic shapes give the same tokens; only the work differs. CPU bundles
are dynamic unless converted with --static; -d/--devid."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from internvl_edge.api import load


def spy_shapes(backend):
    """Rows of every decoder call as the net receives them (after any padding), and tiles per vision call."""
    calls = {"decoder": [], "vision": []}
    new_cache, vision = backend.new_cache, backend.sessions["vision"].run
    decoder_run = backend.sessions["decoder"].run_with_iobinding

    class BindingSpy:  # the rows of the embeddings bound last, as a copy (prefill) or in place (decode)
        def __init__(self, io):
            self.io, self.rows = io, None

        def bind_cpu_input(self, name, value):
            if name == "inputs_embeds":
                self.rows = value.shape[1]
            return self.io.bind_cpu_input(name, value)

        def bind_ortvalue_input(self, name, value):
            if name == "inputs_embeds":
                self.rows = value.shape()[1]
            return self.io.bind_ortvalue_input(name, value)

        def __getattr__(self, name):
            return getattr(self.io, name)

    def spied_run(io, *args):
        calls["decoder"].append(io.rows)
        return decoder_run(io, *args)

    def spied_cache(batch=1):
        cache = new_cache(batch)
        cache.binding["io"] = BindingSpy(cache.binding["io"])
        return cache

    class VisionSpy:
        def run(self, outputs, feeds):
            calls["vision"].append(feeds["pixel_values"].shape[0])
            return vision(outputs, feeds)

    backend.new_cache = spied_cache
    backend.sessions["decoder"].run_with_iobinding = spied_run
    backend.sessions["vision"] = VisionSpy()
    return calls


def test_static_and_dynamic_bundles_agree(bundle, images):
    static = load(bundle("tiny_bf16", "f32", max_input_length=256, static=True))
    dynamic = load(bundle("tiny_bf16", "f32", max_input_length=256))  # the CPU's default
    assert static.manifest.options["dynamic"] is False and dynamic.manifest.options["dynamic"] is True
    assert static.manifest.options["static"] is True and dynamic.manifest.options["static"] is False
    for kw in ({}, {"images": [images["wide"]]}):
        s = static.generate("Describe the image.", max_new_tokens=10, ignore_eos=True, logprobs=3, **kw)
        d = dynamic.generate("Describe the image.", max_new_tokens=10, ignore_eos=True, logprobs=3, **kw)
        assert s.token_ids == d.token_ids
        for a, b in zip(s.logprobs, d.logprobs, strict=True):
            assert [t for t, _ in a] == [t for t, _ in b]
            assert np.allclose([lp for _, lp in a], [lp for _, lp in b], atol=1e-4)


def test_static_pads_every_prefill_and_feeds_one_tile_at_a_time(bundle, images):
    static = load(bundle("tiny_bf16", "f32", max_input_length=256, static=True))
    calls = spy_shapes(static.backend)
    static.generate("Describe the image.", images=[images["wide"]], max_new_tokens=3)
    n_prompt = 3 * 256 + 40
    prefill = [s for s in calls["decoder"] if s > 1]
    assert prefill and all(s == 256 for s in prefill) and len(prefill) >= n_prompt // 256
    assert calls["vision"] == [1, 1, 1]
    dynamic = load(bundle("tiny_bf16", "f32", max_input_length=256))
    calls = spy_shapes(dynamic.backend)
    r = dynamic.generate("Hello", max_new_tokens=3)
    assert calls["decoder"][0] == len(r.prompt_token_ids) < 256
    assert calls["decoder"][1:] == [1, 1]
    dynamic.generate("Describe the image.", images=[images["wide"]], max_new_tokens=1)
    assert calls["vision"] == [3]  # all tiles in one call


def test_cpu_shape_flags(checkpoint, tmp_path):
    """--dynamic is still accepted on the CPU (it is the default there); --static with it is refused."""
    out = tmp_path / "b"
    run = [sys.executable, "-m", "internvl_edge", "convert", "-m", checkpoint("tiny_bf16"), "-s", "256", "-q", "f32"]
    run += ["--out_dir", str(out)]
    proc = subprocess.run(run + ["--dynamic"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "dynamic shapes" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["options"]["dynamic"] is True
    both = subprocess.run(run[:-1] + [str(tmp_path / "c"), "--static", "--dynamic"], capture_output=True, text=True)
    assert both.returncode == 2 and "Traceback" not in both.stderr
    assert "--static and --dynamic" in both.stderr.strip().splitlines()[-1]


def test_devid_forms(bundle):
    b = bundle("tiny_bf16", "w4bf16")
    run = [sys.executable, "-m", "internvl_edge", "run", "-m", b, "-p", "Hi", "--max-new-tokens", "2", "--json"]
    zero = subprocess.run(run + ["-d", "0"], capture_output=True, text=True)
    pair = subprocess.run(run + ["-d", "0,1"], capture_output=True, text=True)
    assert zero.returncode == 0 and pair.returncode == 0
    assert "selects nothing" not in zero.stderr
    assert pair.stderr.count("selects nothing on the CPU") == 1
    assert '"devices": [0, 1]' in pair.stdout
    assert zero.stdout.split('"token_ids"')[1].split("]")[0] == pair.stdout.split('"token_ids"')[1].split("]")[0]
