"""`internvl-edge verify` against independent computations.

- an f32 bundle agrees with its float32 reference exactly (top-1 100%, KL ~0, vision cosine 1);
- a w4 bundle (float activations, so transformers can compute the same function) reports the figures
  this test computes itself from transformers' model: the source's weights for the reference, the
  bundle's 4-bit (and 8-bit lm_head) weights dequantised for the bundle;
- an AWQ bundle keeps the published 4-bit values, so with float activations and a float32 KV cache
  it equals its reference: the attribution's "float32 KV cache" says so, and the bundle as it runs
  (float16 cache) is within that cache's rounding;
- a bundle with one damaged weight block is caught, --min-agreement fails, and the attribution points
  at the stage that was damaged;
- a checkpoint that is not the bundle's source is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from reference import apply_bundle_quantisation, greedy, load_reference, logits_for
from test_reference import QUESTION, reference_inputs

from internvl_edge import bundle as bundle_files
from internvl_edge import kernels
from internvl_edge.checkpoint.factory import make_checkpoint
from internvl_edge.cli import main as cli
from internvl_edge.errors import UserError
from internvl_edge.progress import Progress
from internvl_edge.verify import verify

STEPS = 6


def run_verify(bundle_dir, ckpt_dir, **kw):
    return verify(bundle_dir, ckpt_dir, steps=kw.pop("steps", STEPS), progress=Progress(enabled=False), **kw)


def test_f32_bundle_agrees_exactly(checkpoint, bundle):
    report = run_verify(bundle("tiny_bf16", "f32"), checkpoint("tiny_bf16"))
    s = report["summary"]
    assert report["source_checked"]
    assert s["top1_agreement"] == 1.0 and s["first_divergence"] is None
    assert s["kl_max"] < 1e-6 and s["top5_logprob_diff_max"] < 1e-3
    assert len(report["vision"]) == 4 and s["vision_cosine_min"] > 0.99999 and s["vision_relative_rms_max"] < 1e-4
    assert report["advice"].startswith("nothing to fix")


def _independent(ref_logits: np.ndarray, tokens: list[int], logits: np.ndarray) -> dict:
    def lsm(x):
        x = x.astype(np.float64)
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

    lr, lo = lsm(ref_logits), lsm(logits)
    kl = [float(np.sum(np.exp(lr[i]) * (lr[i] - lo[i]))) for i in range(len(tokens))]
    agree = [int(np.argmax(logits[i])) == tokens[i] for i in range(len(tokens))]
    top5 = max(abs(lo[i, t] - lr[i, t]) for i in range(len(tokens)) for t in np.argsort(-ref_logits[i])[:5])
    return {
        "top1_agreement": float(np.mean(agree)),
        "kl_mean": float(np.mean(kl)),
        "kl_max": max(kl),
        "top5_logprob_diff_max": float(top5),
        "first_divergence": agree.index(False) if False in agree else None,
    }


@pytest.mark.slow
def test_w4_figures_equal_transformers(checkpoint, bundle, images, monkeypatch):
    monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", "float32")  # transformers' cache, as its model computes
    kernels.settings.cache_clear()
    ckpt = checkpoint("tiny_bf16")
    b = bundle("tiny_bf16", "w4bf16", accuracy_level=1)
    report = run_verify(b, ckpt, images=[images["square"]], prompts=[QUESTION], builtin=False)
    ref_model = load_reference(ckpt)
    quantised = load_reference(ckpt)
    apply_bundle_quantisation(quantised, b)
    for probe, paths in zip(report["decoder"]["probes"], [[images["square"]], []], strict=True):
        ids, pv = reference_inputs(ckpt, paths)
        assert probe["prompt_tokens"] == len(ids)
        tokens, ref_logits = greedy(ref_model, ids, pv, STEPS)
        assert probe["reference_answer"] == tokens
        ours = logits_for(quantised, ids + tokens[:-1], pv, start=len(ids))
        expected = _independent(ref_logits, tokens, ours)
        assert expected["kl_mean"] > 1e-3  # the 4-bit weights cost something: the comparison is not trivial
        assert probe["top1_agreement"] == expected["top1_agreement"]
        assert probe["first_divergence"] == expected["first_divergence"]
        for key in ("kl_mean", "kl_max", "top5_logprob_diff_max"):
            assert probe[key] == pytest.approx(expected[key], rel=2e-2, abs=2e-4), key


def test_awq_bundle_with_float_activations_equals_its_reference(checkpoint, bundle):
    report = run_verify(
        bundle("tiny_awq", "w4bf16", accuracy_level=1, lm_head_bits=0),
        checkpoint("tiny_awq"),
        prompts=["Count to five."],
        builtin=False,
    )
    undone = {a["undone"]: a for a in report["attribution"]}
    if kernels.library_path() is None or kernels.isa() not in kernels.ATTENTION_ISAS:  # ORT's attention: float32
        assert "float32 KV cache" not in undone
        assert report["summary"]["top1_agreement"] == 1.0 and report["summary"]["kl_max"] < 1e-5
        return
    cache = undone["float32 KV cache"]
    assert cache["option_in_use"] and cache["flag"] == "INTERNVL_EDGE_KV_CACHE=float32"
    assert cache["top1_agreement"] == 1.0 and cache["kl_max"] < 1e-5
    assert 1e-7 < report["summary"]["kl_max"] < 1e-3  # the float16 cache's rounding, and only that


def _damage(src: str, dst: str, net: str, tensor: str) -> None:
    """Copy a bundle and overwrite the first 2048 values of one weight, keeping the manifest's checksums
    true (as a faulty conversion would)."""
    shutil.copytree(src, dst)
    model = onnx.load(os.path.join(dst, f"{net}.onnx"), load_external_data=False)
    init = next(t for t in model.graph.initializer if t.name == tensor)
    offset = int({e.key: e.value for e in init.external_data}["offset"])
    rng = np.random.default_rng(0)
    with open(os.path.join(dst, f"{net}.data"), "r+b") as f:
        f.seek(offset)
        f.write(rng.normal(0, 0.5, 2048).astype(np.float32).tobytes())
    m = bundle_files.load_manifest(dst, verify=False)
    m.files = bundle_files.file_table(dst)
    with open(os.path.join(dst, bundle_files.MANIFEST), "w", encoding="utf-8") as f:
        f.write(m.to_json())


@pytest.mark.parametrize(
    "net,tensor,stage",
    [("vision", "mlp1.1.weight_t", "float vision encoder"), ("decoder", "lm_head.weight_t", "float lm_head")],
)
def test_damaged_block_is_caught_and_attributed(net, tensor, stage, checkpoint, bundle, workdir, capsys):
    damaged = str(workdir / f"damaged_{net}")
    if not os.path.exists(damaged):
        _damage(bundle("tiny_bf16", "f32"), damaged, net, tensor)
    report = run_verify(damaged, checkpoint("tiny_bf16"))
    assert report["summary"]["top1_agreement"] < 0.9
    best = min(report["attribution"], key=lambda a: a["kl_mean"])
    assert best["undone"] == stage and best["top1_agreement"] == 1.0
    assert "convert again" in report["advice"] and stage.replace("float ", "") in report["advice"]
    if net == "vision":
        assert report["summary"]["vision_cosine_min"] < 0.99
    capsys.readouterr()
    argv = ["verify", "-m", damaged, "--checkpoint", checkpoint("tiny_bf16"), "--steps", "3", "--json"]
    rc = cli([*argv, "--min-agreement", "0.95"])
    out, err = capsys.readouterr()
    assert rc == 1 and json.loads(out)["summary"]["top1_agreement"] < 0.95
    assert err.strip().splitlines()[-1].startswith("error: top-1 agreement")


def test_checkpoint_that_is_not_the_source_is_refused(checkpoint, bundle, workdir, capsys):
    b = bundle("tiny_bf16", "f32")
    with pytest.raises(UserError, match="config.json differs"):
        run_verify(b, checkpoint("odd_bf16"))
    other = make_checkpoint(str(workdir / "ckpt_tiny_seed9"), size="tiny", fmt="original", weights="bf16", seed=9)
    with pytest.raises(UserError, match=r"is not the checkpoint .* was converted from \(tensor .* differ"):
        run_verify(b, other)
    capsys.readouterr()
    assert cli(["verify", "-m", b, "--checkpoint", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "pass the bundle's source checkpoint" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_convert_verify_stores_the_summary_and_checksums_hold(checkpoint, workdir, capsys):
    out = str(workdir / "bundle_convert_verify")
    assert cli(["convert", "-m", checkpoint("tiny_bf16"), "-q", "f32", "-s", "512", "--out_dir", out, "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verify: top-1 agreement 100.0%" in printed
    m = bundle_files.load_manifest(out, verify=True)  # every file's size and SHA-256 still as recorded
    assert m.files == bundle_files.file_table(out)
    v = m.verification
    assert v["top1_agreement"] == 1.0 and v["kl_max"] < 1e-6 and v["probes"] == 5 and v["steps"] == 16
    assert {a["undone"] for a in v["attribution"]} == {"float lm_head", "float vision encoder"}
    assert cli(["run", "-m", out, "-p", "Hi", "--max-new-tokens", "2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)["bundle"]
    assert facts["verification"] == v


@pytest.mark.parametrize("ckpt", ["tiny_bf16", "tiny_hf"])
def test_transformers_reference_gives_the_same_figures(ckpt, checkpoint, bundle, images):
    b = bundle(ckpt, "w4bf16")
    kw = {"images": [images["wide"]], "prompts": ["Describe the image."], "builtin": False}
    ours = run_verify(b, checkpoint(ckpt), **kw)
    theirs = run_verify(b, checkpoint(ckpt), reference="transformers", **kw)
    assert "transformers" in theirs["reference"]
    for a, t in zip(ours["decoder"]["probes"], theirs["decoder"]["probes"], strict=True):
        assert a["reference_answer"] == t["reference_answer"]
        assert a["top1_agreement"] == t["top1_agreement"] and a["first_divergence"] == t["first_divergence"]
        assert a["kl_mean"] == pytest.approx(t["kl_mean"], rel=1e-2, abs=1e-5)
    for a, t in zip(ours["vision"], theirs["vision"], strict=True):
        assert a["cosine_min"] == pytest.approx(t["cosine_min"], abs=1e-5)
        assert a["relative_rms"] == pytest.approx(t["relative_rms"], rel=1e-2, abs=1e-6)


def test_transformers_reference_refused_without_torch(checkpoint, bundle, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(UserError, match="needs torch and transformers installed"):
        run_verify(
            bundle("tiny_bf16", "f32"), checkpoint("tiny_bf16"), reference="transformers", builtin=False, prompts=["Hi"]
        )


def test_sophgo_bundle_refused_where_no_simulator_runs(bundle, checkpoint, workdir, tmp_path, monkeypatch):
    """A bm1684x bundle (its manifest's target) with neither a board nor TPU-MLIR's simulator here:
    one line, before any reference is computed."""
    fake = str(workdir / "bundle_sophgo_target")
    if not os.path.exists(fake):
        shutil.copytree(bundle("tiny_bf16", "f32"), fake)
        m = bundle_files.load_manifest(fake, verify=False)
        m.target = {"chip": "bm1684x", "backend": "bmrt", "bmodel": "decoder.onnx"}
        bundle_files.write_manifest(m)
    for name in ("TPUC_ROOT", "INTERNVL_EDGE_BMRT_LIB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no installed toolchain
    monkeypatch.setattr("internvl_edge.sophgo.bmrt.device_present", lambda: False)
    with pytest.raises(
        UserError,
        match=r"is a bm1684x bundle: verify runs it on a board or TPU-MLIR's bm1684x "
        r"simulator, and neither is found here \(TPU-MLIR .* is not installed",
    ):
        run_verify(fake, checkpoint("tiny_bf16"))
