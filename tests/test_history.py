"""Multi-turn history kept as KV cache (--use_block_with_kv), and turns that stand alone without it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reference import greedy, load_reference, reference_tokenizer
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_edge.api import load
from internvl_edge.errors import UserError
from internvl_edge.sampling import log_softmax

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


class ForwardSpy:
    """Counts the rows each forward call feeds (the real work of a prefill)."""

    def __init__(self, backend):
        self.backend, self.rows = backend, []
        self._forward = backend.forward
        backend.forward = self

    def __call__(self, cache, embeds, query_lens):
        self.rows.append(int(np.sum(query_lens)))
        return self._forward(cache, embeds, query_lens)


@pytest.mark.parametrize("first_stop", ["length", "stop"])
def test_turn_two_sees_turn_one_like_the_whole_conversation(checkpoint, bundle, images, first_stop):
    """Turn 2's logits equal the reference run on the whole conversation in one pass."""
    ckpt = checkpoint("tiny_bf16")
    model = load(bundle("tiny_bf16", "f32", use_block_with_kv=True, max_input_length=512))
    chat = model.chat()
    if first_stop == "stop":  # make turn 1 end with an end-of-turn token: treat its 4th token as one
        probe = model.generate("What is in the image?", images=[images["square"]], max_new_tokens=6)
        chat.model.tokens = dict(model.tokens, eos=list(model.tokens["eos"]) + [probe.token_ids[3]])
    t1 = chat.send("What is in the image?", images=[images["square"]], max_new_tokens=6)
    assert t1.finish_reason == first_stop
    spy = ForwardSpy(model.backend)
    t2 = chat.send("And its colour?", max_new_tokens=8, ignore_eos=True, logprobs=5)

    # the conversation as one text, as InternVL's chat(history=...) builds it, tokenized by transformers
    tok = reference_tokenizer(ckpt)
    q1 = "<image>\nWhat is in the image?".replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 + "</img>")
    turn1 = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n"
    turn2 = "<|im_end|>\n<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n"
    # the answer as generated (a stop token is not part of it: turn 2's separator closes the answer)
    conversation = tok(turn1).input_ids + t1.token_ids + tok(turn2).input_ids
    proc = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        max_patches=4,
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    pv = proc(images=[Image.open(images["square"]).convert("RGB")], return_tensors="np")["pixel_values"]
    ref_tokens, ref_logits = greedy(load_reference(ckpt), conversation, pv, 8)

    assert t2.token_ids == ref_tokens
    ref_lp = log_softmax(ref_logits)
    for step, top in enumerate(t2.logprobs):
        assert max(abs(lp - ref_lp[step, t]) for t, lp in top) < 1e-3
    # turn 2 prefilled only its own tokens on top of the history
    assert spy.rows[0] == len(tok(turn2).input_ids) and all(r == 1 for r in spy.rows[1:])


def test_history_full_is_announced_and_cleared(checkpoint, bundle):
    model = load(bundle("tiny_bf16", "w4bf16", seq_length=320, use_block_with_kv=True, max_input_length=80))
    chat = model.chat()
    notices = []
    for _ in range(6):
        r = chat.send("Tell me more about the weather today, please.", max_new_tokens=30, on_notice=notices.append)
        assert r.token_ids
    assert notices and "cleared" in notices[0]
    assert int(chat.cache.lengths[0]) <= 320
    with pytest.raises(UserError, match="max_input_length"):
        chat.send("word " * 200)
    chat.clear()
    assert int(chat.cache.lengths[0]) == 0 and chat.turns == 0


def test_without_history_every_turn_stands_alone(bundle, images):
    model = load(bundle("tiny_bf16", "w4bf16"))
    chat = model.chat()
    assert not chat.keeps_history
    chat.send("What is in the image?", images=[images["square"]], max_new_tokens=5)
    second = chat.send("And its colour?", max_new_tokens=5)
    alone = model.generate("And its colour?", max_new_tokens=5)
    assert second.token_ids == alone.token_ids
