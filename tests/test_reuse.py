"""Reuse within a process (reuse.py): image embeddings by content, and the KV rows of prompt prefixes
already prefilled. Answers with reuse are bit-identical to answers without it (the same tokens and the
same log-probabilities); the comparison with transformers' reference is in test_reference.py."""

from __future__ import annotations

import numpy as np
import pytest

from internvl_edge.api import load
from internvl_edge.generate import PreparedPrompt, prefill_prompt
from internvl_edge.reuse import PrefixCache, common_prefix, reusable

GREEDY = {"max_new_tokens": 8, "ignore_eos": True, "logprobs": 5}


@pytest.fixture(scope="module")
def pair(bundle):
    """One bundle loaded twice: with the default caches, and with both caches off."""
    b = bundle("tiny_bf16", "w4bf16")
    return load(b), load(b, image_cache_mb=0, prefix_cache_mb=0)


def count_vision_calls(model) -> list:
    calls, encode = [], model.backend.encode_images

    def spied(pixels):
        calls.append(len(pixels))
        return encode(pixels)

    model.backend.encode_images = spied
    return calls


def test_same_answers_with_and_without_reuse(pair, images):
    """A sequence of requests that shares system prompts, images and whole prompts: every answer equals
    the cache-less model's bit for bit, and the prompt tokens taken from the prefix cache are the ones
    it shares with an earlier prompt (all of it for a repeat)."""
    warm, cold = pair
    warm.clear_caches()
    square, wide = images["square"], images["wide"]
    requests = [
        ({"system": "You are terse."}, "What is this?", []),
        ({"system": "You are terse."}, "Name three colours in the picture, please.", []),  # system prompt shared
        ({}, "Describe the image.", [wide]),
        ({}, "Hi", [wide]),  # system + image shared; a 7-token rest (below the tiled attention path)
        ({}, "What is in the top left corner of this picture, and what colour is it?", [wide]),
        ({}, "Describe the image.", [wide]),  # a repeat: no prefill at all
        ({}, "Compare them.", [wide, square]),  # the first image shared, the second new
        ({}, "Describe the image.", [square]),  # another image at the first image's place: system only
    ]
    seen: list[np.ndarray] = []
    for kw, question, paths in requests:
        a = warm.generate(question, images=paths, **kw, **GREEDY)
        b = cold.generate(question, images=paths, **kw, **GREEDY)
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs, question
        assert b.stats.cached_tokens == 0
        ids, media = warm.request(question, images=paths, **kw)
        key = warm.prepare(ids, media).key
        shared = max((common_prefix(k, key) for k in seen), default=0)
        repeat = any(np.array_equal(k, key) for k in seen)
        expected = len(key) if repeat else reusable(shared, len(key), warm.backend.max_input_length)
        assert a.stats.cached_tokens == expected and a.stats.prompt_tokens == len(ids)
        seen.append(key)
    cached = [warm.generate(q, images=p, **kw, max_new_tokens=1).stats.cached_tokens for kw, q, p in requests]
    assert all(c == len(k) for c, k in zip(cached, seen, strict=True))  # every prompt is stored now
    assert reusable(common_prefix(seen[0], seen[1]), len(seen[1]), 512) >= 16  # the system prompt
    assert reusable(common_prefix(seen[2], seen[3]), len(seen[3]), 512) > 3 * 256  # system + image


def test_a_second_question_about_a_picture_skips_the_vision_encoder(pair, images):
    warm, cold = pair
    warm.clear_caches()
    calls = count_vision_calls(warm)
    first = warm.generate("Describe the image.", images=[images["wide"]], max_new_tokens=2)
    assert calls == [3] and first.stats.vision_s > 0  # 2x1 + thumbnail, one call for the image
    second = warm.generate("And its colours?", images=[images["wide"]], max_new_tokens=2)
    assert calls == [3] and second.stats.vision_s == 0
    warm.generate("Again.", images=[images["wide"]], max_tiles=1, max_new_tokens=2)  # other tiles: other content
    assert calls == [3, 1]
    calls_cold = count_vision_calls(cold)
    cold.generate("And its colours?", images=[images["wide"]], max_new_tokens=2)
    cold.generate("And its colours?", images=[images["wide"]], max_new_tokens=2)
    assert calls_cold == [3, 3]  # a budget of 0 keeps nothing


def test_caches_stay_within_their_budgets(bundle, images):
    model = load(bundle("tiny_bf16", "w4bf16"), image_cache_mb=0.5, prefix_cache_mb=1)
    tile = model.encode_media(model.images_to_media([images["square"]]))[0][0].nbytes
    for name in ("square", "wide", "tall", "large"):
        model.generate("Describe the image.", images=[images[name]], max_new_tokens=1)
        assert model.image_cache.bytes <= model.image_cache.max_bytes and model.image_cache.bytes >= tile
        assert model.prefix_cache.bytes <= model.prefix_cache.max_bytes
    assert len(model.image_cache.items) < 4  # the least recently used were dropped
    row = model.backend.row_bytes
    assert model.prefix_cache.bytes >= row * 100  # the last prompts' rows are kept


def test_prefix_cache_keeps_the_longest_prompt_of_a_chain(bundle):
    """A prompt that extends a stored one replaces it; a prompt stored already is not stored twice."""
    model = load(bundle("tiny_bf16", "w4bf16"))
    backend = model.backend
    prefixes = PrefixCache(64 << 20, backend.row_bytes)
    ids = model.tokenize(model.question("Tell me a long story about the sea.", model.images_to_media([])))

    def run(n):
        cache = backend.new_cache(1)
        p = PreparedPrompt(ids[:n], backend.embed(np.asarray([ids[:n]]))[0], key=np.asarray(ids[:n], np.int64))
        logits = prefill_prompt(backend, cache, p, prefixes=prefixes).copy()
        return p.cached_tokens, logits, cache

    assert run(20)[0] == 0 and len(prefixes.items) == 1
    reused, logits, cache = run(len(ids))
    assert reused == 16 and len(prefixes.items) == 1  # replaced by the longer prompt
    assert prefixes.bytes == len(ids) * backend.row_bytes + logits.nbytes
    again, logits_again, cache_again = run(len(ids))
    assert again == len(ids) and len(prefixes.items) == 1 and np.array_equal(logits, logits_again)
    n = len(ids)
    for a, b in zip(cache.buffers, cache_again.buffers, strict=True):
        assert np.array_equal(a[0, :, :n], b[0, :, :n])
    assert run(30)[0] == 16 and len(prefixes.items) == 2  # a shorter prompt: 8 rows or more prefilled; its own logits
