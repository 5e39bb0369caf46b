"""Sampling: the pure functions' distribution properties on hand-made logits, the bundle's sampling head
against them, seeds, temperature -> greedy, stop strings, and a sampled run end to end."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from internvl_edge.api import load
from internvl_edge.errors import UserError
from internvl_edge.nets.heads import build_sample_head
from internvl_edge.sampling import (
    SamplingParams,
    candidates,
    draw,
    repetition_penalty,
    top_k_candidates,
    top_p_keep,
)


def test_repetition_penalty_changes_only_seen_logits():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5], np.float32)
    out = repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0, 0.5]  # positive halved, negative doubled, others kept
    assert repetition_penalty(logits, [0, 1], 1.0).tolist() == logits.tolist()


def test_top_k_never_leaves_the_k_best():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    best = set(np.argsort(-logits)[:5].tolist())
    params = SamplingParams(temperature=3.0, top_k=5, top_p=1.0)
    probs, ids = candidates(logits, [], params)
    draws = {draw(probs, ids, rng) for _ in range(2000)}
    assert draws <= best and len(draws) == 5  # every one of the five is reachable at high temperature
    values, idx = top_k_candidates(logits, 0)  # 0 = no limit
    assert len(idx) == 50 and np.all(np.diff(values) <= 0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    assert top_p_keep(probs, 0.5).tolist() == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert top_p_keep(probs, 0.51).tolist() == [True, True, False, False]
    assert top_p_keep(probs, 0.9).tolist() == [True, True, True, False]
    assert top_p_keep(probs, 0.01).tolist() == [True, False, False, False]  # never empty
    assert top_p_keep(probs, 1.0).all()


def test_order_is_penalty_topk_temperature_topp():
    logits = np.array([4.0, 3.9, 1.0, 0.0], np.float32)
    # the penalty on token 0 (4.0 / 2 = 2.0) drops it below token 1 before top-k = 1 picks
    probs, ids = candidates(logits, [0], SamplingParams(temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=2.0))
    assert ids.tolist() == [1] and probs.tolist() == [1.0]
    # temperature before top-p: a high temperature flattens the distribution, so top-p keeps more
    few = candidates(logits, [], SamplingParams(temperature=0.5, top_k=4, top_p=0.8))[0]
    many = candidates(logits, [], SamplingParams(temperature=5.0, top_k=4, top_p=0.8))[0]
    assert (few > 0).sum() < (many > 0).sum()


def test_same_seed_same_tokens_and_low_temperature_is_greedy():
    logits = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.9)
    probs, ids = candidates(logits, [], params)
    a = [draw(probs, ids, np.random.default_rng(7)) for _ in range(5)]
    b = [draw(probs, ids, np.random.default_rng(7)) for _ in range(5)]
    assert a == b
    cold = candidates(logits, [], SamplingParams(temperature=1e-4, top_k=50, top_p=1.0))
    assert draw(*cold, np.random.default_rng(3)) == int(np.argmax(logits))


@pytest.mark.parametrize("seed", range(5))
def test_sampling_head_net_matches_the_pure_functions(seed):
    rng = np.random.default_rng(seed)
    vocab = 300
    logits = (rng.standard_normal((1, vocab)) * 3).astype(np.float32)
    seen = rng.integers(0, vocab, size=12)
    params = SamplingParams(
        temperature=float(rng.uniform(0.3, 2.0)),
        top_k=int(rng.integers(1, 60)),
        top_p=float(rng.uniform(0.2, 1.0)),
        repetition_penalty=float(rng.uniform(1.0, 1.5)),
    )
    sess = ort.InferenceSession(build_sample_head().model().SerializeToString(), providers=["CPUExecutionProvider"])
    probs, ids = sess.run(
        None,
        {
            "logits": logits,
            "penalty_ids": seen[None].astype(np.int64),
            "repetition_penalty": np.array([params.repetition_penalty], np.float32),
            "temperature": np.array([params.temperature], np.float32),
            "top_k": np.array([params.top_k], np.int64),
            "top_p": np.array([params.top_p], np.float32),
        },
    )
    ref_probs, ref_ids = candidates(logits[0], seen, params)
    assert ids[0].tolist() == ref_ids.tolist()
    assert np.abs(probs[0] - ref_probs).max() < 1e-5


def test_sampled_run_end_to_end(bundle):
    model = load(bundle("tiny_bf16", "w4bf16", do_sample=True))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=4.0, top_k=40, ignore_eos=True)
    a = model.generate("Describe the image.", seed=11, **kw)
    b = model.generate("Describe the image.", seed=11, **kw)
    c = model.generate("Describe the image.", seed=12, **kw)
    greedy = model.generate("Describe the image.", max_new_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids and a.token_ids != greedy.token_ids
    cold = model.generate(
        "Describe the image.", seed=5, max_new_tokens=12, do_sample=True, temperature=1e-3, ignore_eos=True
    )
    assert cold.token_ids == greedy.token_ids
    with pytest.raises(UserError, match="top_p"):
        model.generate("x", do_sample=True, top_p=1.5)


def test_a_bundle_without_the_head_samples_on_the_host_with_the_same_tokens(bundle):
    """Converted without --do_sample, a CPU bundle samples from the logits on the host: a seed gives the
    same tokens twice, and the same tokens as the same weights converted with the sampling head."""
    head, host = load(bundle("tiny_bf16", "w4bf16", do_sample=True)), load(bundle("tiny_bf16", "w4bf16"))
    assert head.backend.has_sample_head and not host.backend.has_sample_head
    assert host.backend.describe()["sampling"] == "host"
    kw = {
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
    }
    for seed in (1, 2):
        a = host.generate("Describe the image.", seed=seed, **kw).token_ids
        assert a == host.generate("Describe the image.", seed=seed, **kw).token_ids
        assert a == head.generate("Describe the image.", seed=seed, **kw).token_ids
    greedy = host.generate("Describe the image.", max_new_tokens=12, ignore_eos=True).token_ids
    assert host.generate("Describe the image.", seed=1, **{**kw, "temperature": 4.0}).token_ids != greedy
    # the host's candidates are the head's, row by row of a batch
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 300)) * 3).astype(np.float32)
    seen = rng.integers(0, 300, size=(3, 9))
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.2)
    hp, hi = head.backend.sample(logits, seen, params)
    cp, ci = host.backend.sample(logits, seen, params)
    assert hi.tolist() == ci.tolist() and np.abs(hp - cp).max() < 1e-5


def test_parameters_come_from_generation_config(workdir, bundle):
    from internvl_edge.checkpoint.factory import make_checkpoint
    from internvl_edge.convert import ConvertOptions, convert
    from internvl_edge.progress import Progress

    base = load(bundle("tiny_bf16", "w4bf16"))
    text = base.generate("Describe the image.", max_new_tokens=10, ignore_eos=True).text
    stop = text[4:7]
    assert len(stop) == 3 and stop not in text[:6]
    gen = {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.1, "stop_strings": [stop]}
    ckpt = make_checkpoint(str(workdir / "ckpt_gen"), size="tiny", weights="bf16", seed=0, generation=gen)
    path = convert(
        ConvertOptions(ckpt, str(workdir / "bundle_gen"), seq_length=1024, do_sample=True),
        progress=Progress(enabled=False),
    ).path
    model = load(path)
    cfg = model.generation_config(do_sample=True)
    assert (cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p, cfg.sampling.repetition_penalty) == (
        0.7,
        20,
        0.8,
        1.1,
    )
    assert model.generation_config(do_sample=True, top_k=5).sampling.top_k == 5  # the command line wins
    # the same weights as the base bundle, so the same greedy text, now cut at the stop string
    cut = model.generate("Describe the image.", max_new_tokens=10, ignore_eos=True)
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
