"""The Sophgo targets (issue 7) on TPU-MLIR's chip simulators, against transformers and our ONNX bundles.

Bundles: tiny random checkpoints of the factory (bf16 and AWQ) with 224-pixel tiles (64 image tokens: the
simulator needs ~12 s per ViT layer at 448 pixels, under 1 s at 224; the nets are the same), -s 128,
compiled for bm1684x in f16 (with --use_block_with_kv and --max_input_length 48, so a prompt with an
image is prefilled by block_i, then block_kv_i twice; and --do_sample), bf16, w4bf16 (bf16 weights quantised by us to
4-bit groups of 64) and the AWQ checkpoint (w4bf16 -> w4f16, its 4-bit values as published), and for
bm1688 in f16 (checked in a child process: a process holds one chip's simulator); and bm1684x f16
with --dynamic (end to end). InternVL3.5 (a Qwen3 decoder: per-head query/key RMS norms before the
rotary embedding, no attention biases) as a tiny checkpoint with heads of 128: bm1684x f16 with
--use_block_with_kv per net and end to end (text and one tile), bm1684x w4bf16 per net, bm1688 f16 per net
and through `run`.

Per net (tests/sophgo_checks.py), every net fed the reference's own inputs, the relative RMS error
||ours - reference|| / ||reference|| must stay under 8 units of roundoff of the half type the chip
computes in: u = 2^-11 for f16 (tolerance 3.9e-3), u = 2^-8 for bf16 (3.1e-2). Each net rounds its
inputs, weights and a few intermediates once to that type and accumulates in float32, so its error is
a few u in RMS (measured: f16 and w4f16 4e-4..1.2e-3, bf16 and w4bf16 2.5e-3..7.2e-3); a wrong mask,
rotary layout, scale or weight layout gives 1e-1 and more. 4-bit bundles are compared with
transformers holding the very 4-bit weights the bundle holds (dequantised), so the tolerance is the
half type's; the quantisation error itself (0.14 in the logits of this tiny model) is not a tolerance.
The same nets are compared with our ONNX bundles: the ViT and the decoder logits against the f32
bundle (float cases) or against the CPU bundle with the same 4-bit values and float32 activations
(--accuracy_level 1; w4 cases), with the same tolerances; token ids and the greedy head are exact.

End to end through the public API, greedy tokens must equal transformers' until the first step whose
reference top-1 margin is unclear (below 5% of the logits' standard deviation, 12x the f16 tolerance),
and at least 8 clear steps must match: text only, and one image tile.

The toolchain is installed once into the user cache (`internvl-edge toolchain install`); without network
the tests skip. Deselect them with `-m "not sophgo"`. About 3 minutes in all on 2 cores, and 6 more for
InternVL3.5 (measured on a loaded machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sophgo_checks
from conftest import picture

from internvl_edge import kernels
from internvl_edge.checkpoint.factory import make_checkpoint, shapes_with
from internvl_edge.convert import ConvertOptions, convert
from internvl_edge.errors import UserError
from internvl_edge.progress import Progress
from internvl_edge.sophgo import compile as sophgo_compile
from internvl_edge.sophgo import toolchain
from internvl_edge.sophgo.convert import parse_info

sim = pytest.mark.sophgo  # needs TPU-MLIR (installed once into the user cache) and runs its simulator

UNIT_ROUNDOFF = {"f16": 2.0**-11, "bf16": 2.0**-8}
TOLERANCE = {half: 8 * u for half, u in UNIT_ROUNDOFF.items()}
CLEAR_MARGIN = 0.05  # of the reference logits' standard deviation
STEPS = 10
SIM_SHAPES = shapes_with("tiny", image_size=224)
# InternVL3.5 (Qwen3: per-head query/key norms, no attention biases) with heads of 128 as the published ones
SIM35_SHAPES = shapes_with("3.5-tiny", image_size=224, text_head_dim=128)
CHECKPOINTS = {"bf16": (SIM_SHAPES, "bf16", 10), "awq": (SIM_SHAPES, "awq", 11), "qwen3": (SIM35_SHAPES, "bf16", 12)}
# case: (checkpoint, chip, -q, extra convert options, ONNX bundle the decoder is compared with, check the ViT)
NET_CASES = {
    "bm1684x-f16": (
        "bf16",
        "bm1684x",
        "f16",
        {"max_input_length": 48, "use_block_with_kv": True, "do_sample": True},
        "f32",
        True,
    ),
    "bm1684x-bf16": ("bf16", "bm1684x", "bf16", {}, "f32", True),
    "bm1684x-w4bf16": ("bf16", "bm1684x", "w4bf16", {}, "w4bf16", False),  # its ViT is the bf16 case's
    "bm1684x-awq-w4f16": ("awq", "bm1684x", "w4bf16", {}, "w4f16", True),
    # InternVL3.5: block_kv_i after 48 rows as well (one tile then takes block_i and block_kv_i)
    "bm1684x-3.5-f16": ("qwen3", "bm1684x", "f16", {"max_input_length": 48, "use_block_with_kv": True}, "f32", True),
    "bm1684x-3.5-w4bf16": ("qwen3", "bm1684x", "w4bf16", {}, "w4bf16", False),  # its ViT is the f16 case's
}


@pytest.fixture(scope="session")
def tpu_mlir():
    """TPU-MLIR, installed into the user cache once (kept between test runs)."""
    tc = toolchain.locate()
    if tc is not None and not toolchain.check(tc):
        return tc
    try:
        return toolchain.install(Progress("[toolchain] ", enabled=False))
    except UserError as e:
        pytest.skip(f"TPU-MLIR {toolchain.VERSION} is not available ({e})")


@pytest.fixture(scope="session")
def sim_checkpoint(workdir):
    made = {}

    def get(kind: str) -> str:
        if kind not in made:
            shapes, weights, seed = CHECKPOINTS[kind]
            made[kind] = make_checkpoint(str(workdir / f"sim_ckpt_{kind}"), size=shapes, weights=weights, seed=seed)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def sim_bundle(workdir, sim_checkpoint):
    """Bundles of the simulator checkpoints, any target (-s 128)."""
    made = {}

    def get(kind: str, chip: str, quantize: str, **options) -> str:
        key = (kind, chip, quantize, tuple(sorted(options.items())))
        if key not in made:
            tag = "_".join([kind, chip, quantize] + [f"{k}{v}" for k, v in sorted(options.items())])
            opts = ConvertOptions(
                model_path=sim_checkpoint(kind),
                out_dir=str(workdir / f"sim_bundle_{tag}"),
                seq_length=128,
                quantize=quantize,
                chip=chip,
                **options,
            )
            made[key] = convert(opts, progress=Progress(enabled=False)).path
        return made[key]

    return get


def onnx_bundle(sim_bundle, kind: str, which: str) -> str:
    if which == "f32":
        return sim_bundle(kind, "cpu", "f32")
    # same 4-bit values (the Sophgo default block of 64), float32 activations
    return sim_bundle(kind, "cpu", which, accuracy_level=1, lm_head_bits=0, q_group_size=64)


@pytest.fixture(scope="session")
def tile(workdir) -> str:
    path = workdir / "sim_tile.png"
    picture(200, 160, seed=5).save(path)
    return str(path)


def assert_net_errors(errors: dict, half: str, check_vit: bool, onnx_exact: bool = True) -> None:
    tol = TOLERANCE[half]
    assert errors["greedy_head_wrong"] == 0
    assert errors["decoder_argmax_disagreements"] == 0
    # the ONNX bundle we compare with computes the reference's function (float32 throughout), except that
    # the CPU target's 4-bit scales are rounded to float16 where the chip's are rounded to bf16 (the codes
    # follow each rounded scale): every weight moves by up to half a bf16 unit, and the logits by about one
    # unit (InternVL3.5's tiny w4bf16 decoder: 4.9e-3 = 1.3 units), so two units bound it
    assert errors["onnx_vs_reference"] < (1e-5 if onnx_exact else 2 * UNIT_ROUNDOFF[half])
    assert errors["embedding"] <= UNIT_ROUNDOFF[half] and errors["embedding_cache"] <= UNIT_ROUNDOFF[half]
    measured = {
        k: v
        for k, v in errors.items()
        if k.startswith(("block", "lm_head", "decoder", "vit"))
        and "disagreements" not in k
        and (check_vit or not k.startswith("vit"))
    }
    assert len(measured) == 3 * 2 * 2 + 3 + 2 * check_vit  # 2 layers x (block, block_cache) x (hidden, k, v), ...
    worst = max(measured, key=measured.get)
    assert measured[worst] < tol, f"{worst}: relative RMS error {measured[worst]:.2e} > {tol:.2e} ({half})"


def _half(quantize: str) -> str:
    return "bf16" if quantize in ("bf16", "w4bf16") else "f16"


@sim
@pytest.mark.parametrize("case", list(NET_CASES))
def test_nets_against_reference(case, tpu_mlir, sim_checkpoint, sim_bundle, tile, monkeypatch):
    # the ONNX bundle stands for the reference's function: its KV cache in float32, as the reference's
    monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", "float32")
    kernels.settings.cache_clear()
    kind, chip, quantize, options, onnx, check_vit = NET_CASES[case]
    bdir = sim_bundle(kind, chip, quantize, **options)
    errors = sophgo_checks.net_errors(bdir, sim_checkpoint(kind), onnx_bundle(sim_bundle, kind, onnx), tile, check_vit)
    effective = "w4f16" if kind == "awq" else quantize  # AWQ keeps its float16 tensors (as TPU-MLIR does)
    assert_net_errors(errors, _half(effective), check_vit, onnx_exact=effective != "w4bf16")


def assert_greedy(result: dict) -> None:
    ours, ref = result["ours"], result["reference"]
    clear = np.asarray(result["margins"]) > CLEAR_MARGIN * np.asarray(result["logit_std"])
    assert len(ours) == len(ref) == STEPS
    n = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
    assert n == len(ref) or not clear[n], f"diverged at step {n} whose reference margin is clear: {ours} vs {ref}"
    assert clear[:n].sum() >= 8, (ours, ref, result["margins"])


@sim
@pytest.mark.parametrize(
    "case, media, dynamic",
    [
        ("bm1684x-f16", "text", False),
        ("bm1684x-f16", "one_tile", False),
        ("bm1684x-f16", "text", True),
        ("bm1684x-3.5-f16", "text", False),
        ("bm1684x-3.5-f16", "one_tile", False),
    ],
)
def test_greedy_tokens_equal_reference(case, media, dynamic, tpu_mlir, sim_checkpoint, sim_bundle, tile):
    """The f16 bundles of InternVL3 and InternVL3.5 (block_kv_i after the first 48 rows of a prompt), and
    a --dynamic one (prefill blocks whose rows follow the prompt, the causal mask inside the net)."""
    kind, chip, quantize, options, _, _ = NET_CASES[case]
    if dynamic:
        options = {"dynamic": True}
    bdir = sim_bundle(kind, chip, quantize, **options)
    result = sophgo_checks.greedy_tokens(bdir, sim_checkpoint(kind), STEPS, tile if media == "one_tile" else None)
    assert result["prompt_ids_equal"]
    assert "bm1684x simulator" in result["backend"]["library"]
    assert_greedy(result)


def _child(args: list[str], timeout: int = 600) -> dict:
    """Run in a fresh process (its own simulator); the JSON it prints on its RESULT line."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@sim
@pytest.mark.parametrize("kind", ["bf16", "qwen3"])
def test_bm1688_nets_and_cli_run(kind, tpu_mlir, sim_checkpoint, sim_bundle, tile):
    """BM1688 (two TPU cores) in f16, InternVL3 and InternVL3.5: per net in a child process, then `run --json`
    (the public CLI)."""
    ckpt = sim_checkpoint(kind)
    bdir = sim_bundle(kind, "bm1688", "f16")
    checks = os.path.join(os.path.dirname(__file__), "sophgo_checks.py")
    errors = _child([checks, "nets", bdir, ckpt, onnx_bundle(sim_bundle, kind, "f32"), tile, "1"])
    assert_net_errors(errors, "f16", True)

    argv = [sys.executable, "-m", "internvl_edge", "run", "-m", bdir, "-p", sophgo_checks.QUESTION]
    argv += ["--max-new-tokens", str(STEPS), "--ignore-eos", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout holds the JSON alone: the simulator's chatter is kept off it
    assert out["backend"]["library"].endswith("bm1688 simulator (cmodel)")
    ref = sophgo_checks.reference_greedy(ckpt, STEPS)
    assert out["prompt_token_ids"] == ref["prompt_ids"]
    assert_greedy(
        {"ours": out["token_ids"], "reference": ref["tokens"], "margins": ref["margins"], "logit_std": ref["logit_std"]}
    )


@sim
def test_bmodel_holds_the_seeds_nets(tpu_mlir, sim_bundle):
    """`model_tool --info` lists the seed's nets with its shapes; the manifest records them."""
    bdir = sim_bundle(*NET_CASES["bm1684x-f16"][:3], **NET_CASES["bm1684x-f16"][3])
    manifest = json.load(open(os.path.join(bdir, "manifest.json")))
    bmodel = manifest["target"]["bmodel"]
    assert bmodel == "sim_ckpt_bf16_f16_seq128_bm1684x_1dev.bmodel"
    text = sophgo_compile.info(tpu_mlir, os.path.join(bdir, bmodel))
    H, L, S, V, kvh, hd = 128, 48, 128, manifest["model"]["vocab_size"], 2, 32
    expect = {
        "vit": ([[1, 3, 224, 224]], [[64, H]]),
        "embedding": ([[1, L]], [[1, L, H]]),
        "embedding_cache": ([[1, 1]], [[1, 1, H]]),
        "lm_head": ([[1, H]], [[1, V]]),
        "greedy_head": ([[1, V]], [[1, 1]]),
        "sample_head": ([[1, V], [1, S], [1, 1], [1, 1], [1, 1], [1, 1]], [[1, 50], [1, 50]]),
    }
    for i in range(2):
        expect[f"block_{i}"] = ([[1, L, H], [1, L], [1, 1, L, L]], [[1, L, H], [1, L, kvh, hd], [1, L, kvh, hd]])
        expect[f"block_cache_{i}"] = (
            [[1, 1, H], [1, 1], [1, 1, 1, S + 1], [1, S, kvh, hd], [1, S, kvh, hd]],
            [[1, 1, H], [1, 1, kvh, hd], [1, 1, kvh, hd]],
        )
        expect[f"block_kv_{i}"] = (
            [[1, L, H], [1, L], [1, 1, L, S + L], [1, S, kvh, hd], [1, S, kvh, hd]],
            [[1, L, H], [1, L, kvh, hd], [1, L, kvh, hd]],
        )
    parsed = parse_info(text, bmodel)
    assert list(parsed) == ["vit", "embedding", "embedding_cache", "lm_head", "greedy_head", "sample_head"] + [
        f"{k}_{i}" for i in range(2) for k in ("block", "block_cache", "block_kv")
    ]
    for name, (ins, outs) in expect.items():
        assert [t["shape"] for t in parsed[name]["inputs"]] == ins, name
        assert [t["shape"] for t in parsed[name]["outputs"]] == outs, name
        assert parsed[name] == manifest["nets"][name]
    assert [t["name"] for t in parsed["block_cache_0"]["inputs"]] == [
        "input_states",
        "position_ids",
        "attention_mask",
        "history_k",
        "history_v",
    ]
    assert {t["dtype"] for t in parsed["block_0"]["inputs"]} == {"float16", "int32"}


@sim
def test_sample_head_matches_cpu_sampling(tpu_mlir, sim_bundle):
    """The sampling head (--do_sample) gives the candidates and probabilities of sampling.candidates (the
    CPU target's semantics) for top_k up to the seed's 50: penalty, top-k, temperature, top-p."""
    from internvl_edge.api import load
    from internvl_edge.sampling import SamplingParams, candidates

    kind, chip, quantize, options, _, _ = NET_CASES["bm1684x-f16"]
    backend = load(sim_bundle(kind, chip, quantize, **options)).backend
    assert backend.can_sample
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, backend.vocab)) * 3).astype(np.float32)
    seen = rng.integers(0, backend.vocab, (3, 20))
    for p in (SamplingParams(0.7, 40, 0.9, 1.3), SamplingParams(1.0, 50, 1.0, 1.0), SamplingParams(0.5, 10, 0.5, 1.1)):
        probs, ids = backend.sample(logits, seen, p)
        for b in range(3):
            ref_probs, ref_ids = candidates(logits[b], seen[b], p)
            k = len(ref_ids)
            assert list(ids[b, :k]) == list(ref_ids)
            assert np.abs(probs[b, :k] - ref_probs).max() < 1e-5 and np.abs(probs[b, k:]).max(initial=0) < 1e-6


@sim
def test_a_bundle_without_the_head_refuses_to_sample_in_the_requests_terms(tpu_mlir, sim_bundle):
    """On the chip the logits stay on the chip: without --do_sample a bundle cannot sample, and says so in
    the terms of the request (a temperature above 0, or --do_sample), through the API and the server."""
    from starlette.testclient import TestClient

    from internvl_edge.api import load
    from internvl_edge.server.app import ServerSettings, create_app

    kind, chip, quantize, options, _, _ = NET_CASES["bm1684x-bf16"]
    model = load(sim_bundle(kind, chip, quantize, **options))
    assert not model.backend.can_sample
    with pytest.raises(UserError, match="a temperature above 0, or --do_sample.*converted without --do_sample"):
        model.generate("Hi", do_sample=True, temperature=0.8, max_new_tokens=2)
    with TestClient(create_app(model, ServerSettings(model_name="sim", parallel=1))) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.8, "max_tokens": 2},
        )
        assert r.status_code == 400 and "temperature 0" in r.json()["error"]["message"], r.text
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text


@sim
def test_batched_cache_and_copy_slot(tpu_mlir, sim_bundle):
    """The server's use of the contract: a prefilled sequence copied into slot 1 of a batch-2 cache
    continues exactly as it would alone, and an idle slot is left untouched."""
    from internvl_edge.api import load

    kind, chip, quantize, options, _, _ = NET_CASES["bm1684x-f16"]
    backend = load(sim_bundle(kind, chip, quantize, **options)).backend
    ids = np.arange(5, 30)[None]
    alone = backend.new_cache(1)
    backend.forward(alone, backend.embed(ids), [ids.shape[1]])
    batch = backend.new_cache(2)
    backend.copy_slot(alone, 0, batch, 1)
    assert list(batch.lengths) == [0, ids.shape[1]]
    logits = backend.forward(batch, backend.embed(np.array([[7], [7]])), [0, 1])[1]
    expected = backend.forward(alone, backend.embed(np.array([[7]])), [1])[0]
    assert np.array_equal(logits, expected) and list(batch.lengths) == [0, ids.shape[1] + 1]


@sim
def test_bench_runs_on_a_sophgo_bundle(tpu_mlir, sim_bundle):
    """bench measures what any backend has (load, vision, prefill) and leaves out what reads ONNX
    Runtime's nets (roofline, profile) and what the bundle's context cannot hold (the FTL prompts)."""
    from internvl_edge.bench import format_result, run_bench
    from internvl_edge.progress import Progress

    kind, chip, quantize, options, _, _ = NET_CASES["bm1684x-bf16"]
    r = run_bench(
        sim_bundle(kind, chip, quantize, **options),
        repeats=1,
        quick=True,
        profile=True,
        progress=Progress(enabled=False),
    )
    assert r.load_s > 0 and r.vision_s_per_tile > 0 and r.prefill_tps["64"] > 0
    assert not r.decode_tps and not r.roofline_tps and not r.decode_profile_ms  # -s 128: no 300-token context
    assert not r.ftl_s and r.bandwidth_gbs > 0 and r.peak_rss_bytes > 0
    text = format_result(r)
    assert "prefill 64" in text and "peak RSS" in text and "x the bundle" not in text


@sim
def test_unsupported_options_are_refused(tpu_mlir, sim_checkpoint, tmp_path):
    """Flags the chip flow does not support are refused in one line, never ignored; no bundle is left."""
    for opts, words in (
        ({"quantize": "f32"}, "-q f32"),
        ({"dynamic": True, "use_block_with_kv": True}, "--dynamic"),
        ({"vision_bits": 8}, "--vision-bits"),
        ({"accuracy_level": 1}, "--accuracy_level"),
        ({"lm_head_bits": 8}, "--lm-head-bits"),
        ({"quantize": "w4bf16", "q_group_size": 256}, "-g 256"),
    ):
        out = tmp_path / "b"
        with pytest.raises(UserError, match=words.replace("-", r"\-")):
            convert(
                ConvertOptions(
                    model_path=sim_checkpoint("bf16"),
                    out_dir=str(out),
                    seq_length=128,
                    chip="bm1684x",
                    **{"quantize": "f16", **opts},
                ),
                progress=Progress(enabled=False),
            )
        assert not out.exists()


@sim
def test_toolchain_info_cli(tpu_mlir):
    proc = subprocess.run(
        [sys.executable, "-m", "internvl_edge", "toolchain", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    info = json.loads(proc.stdout)
    assert proc.returncode == 0 and info["works"] and info["version"].startswith(f"v{toolchain.VERSION}")
    assert set(info["simulators"]) == {"bm1684x", "bm1688"}


def test_group_size_must_divide_the_attention_output_width(workdir, tmp_path):
    """InternVL3.5's o_proj takes heads x 128 inputs, not the hidden size (InternVL3.5-4B: 4096 for 2560):
    a -g that divides the hidden and MLP widths but not that one is refused in one line before compiling."""
    widths = {"text_hidden": 192, "text_intermediate": 384, "text_heads": 2, "text_kv_heads": 1}
    ckpt = make_checkpoint(str(workdir / "o_proj_256"), size=shapes_with("3.5-tiny", text_head_dim=128, **widths))
    out = tmp_path / "bundle"
    opts = ConvertOptions(ckpt, str(out), seq_length=128, chip="bm1684x", quantize="w4bf16", q_group_size=96)
    with pytest.raises(UserError, match="-g 96: the decoder's linear layers with 256 inputs") as e:
        convert(opts, progress=Progress(enabled=False))
    assert "\n" not in str(e.value) and not out.exists()


def test_missing_toolchain_is_one_line(sim_checkpoint, tmp_path, monkeypatch):
    """Without TPU-MLIR a Sophgo convert stops at once, naming the install command, leaving nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TPUC_ROOT", raising=False)
    out = tmp_path / "bundle"
    with pytest.raises(UserError, match="internvl-edge toolchain install"):
        convert(
            ConvertOptions(
                model_path=sim_checkpoint("bf16"), out_dir=str(out), seq_length=128, chip="bm1688", quantize="f16"
            ),
            progress=Progress(enabled=False),
        )
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".bundle")]


@sim
def test_compile_failure_shows_the_log_and_leaves_no_bundle(tpu_mlir, sim_checkpoint, tmp_path, monkeypatch, capsys):
    """A net that TPU-MLIR cannot compile stops the conversion with one line naming the net, the step and
    its log; the log's tail is shown, the logs are kept in the work folder, no bundle is written."""
    real_steps = sophgo_compile.steps

    def broken(net, chip, num_core):
        out = real_steps(net, chip, num_core)
        if net.name == "block_cache_1":
            out[0][1].append("--no-such-pass")  # the lowering step of one net fails
        return out

    monkeypatch.setattr(sophgo_compile, "steps", broken)
    out = tmp_path / "bundle"
    with pytest.raises(UserError, match=r"net block_cache_1 \(lowering step") as err:
        convert(
            ConvertOptions(
                model_path=sim_checkpoint("bf16"), out_dir=str(out), seq_length=128, chip="bm1684x", quantize="f16"
            ),
            progress=Progress(stream=sys.stderr),
        )
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".bundle.partial")]
    log = str(err.value).rsplit("its log is ", 1)[1]
    assert os.path.isfile(log) and "no-such-pass" in open(log).read()
    work = os.path.dirname(os.path.dirname(log))
    assert all(f.endswith(".log") for _, _, files in os.walk(work) for f in files)
    assert "--- last lines of" in capsys.readouterr().err
