"""Tokenizer loading (tokenizer.json or vocab+merges), UTF-8-safe streaming, the chat template."""

import os
import shutil

import pytest
from reference import prompt_text, reference_tokenizer

from internvl_edge.errors import UserError
from internvl_edge.prompt import TEMPLATES, expand_images, with_media_tags
from internvl_edge.tokenizer import StreamDetokenizer, TextTokenizer

TEXTS = [
    "Describe the image.",
    "你是书生·万象，英文名是InternVL。图片里有什么？",
    "Emoji 😀🐱 and café naïve — “quotes” 3.14 1e-6\n\nnew paragraph",
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>hello<|im_end|>\n",
]


def test_matches_transformers_tokenizer(checkpoint):
    ckpt = checkpoint("tiny_bf16")
    ours, ref = TextTokenizer(ckpt), reference_tokenizer(ckpt)
    for text in TEXTS:
        assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_vocab_merges_only_checkpoint_tokenizes_the_same(checkpoint, tmp_path):
    src = checkpoint("tiny_bf16")
    old = tmp_path / "old_style"
    os.makedirs(old)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), old / name)
    a, b = TextTokenizer(src), TextTokenizer(str(old))
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
    assert a.img_context_id == b.img_context_id


def test_missing_special_tokens_is_a_clear_error(tmp_path, checkpoint):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="IMG_CONTEXT"):
        TextTokenizer(str(tmp_path))
    with pytest.raises(UserError, match="no tokenizer"):
        TextTokenizer(str(tmp_path / "nowhere"))


def test_streaming_never_splits_a_character(checkpoint):
    tok = TextTokenizer(checkpoint("tiny_bf16"))
    text = "猫🐱café 万象😀!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level tokens split these characters
    stream = StreamDetokenizer(tok)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a lone first byte of a 4-byte character is held back until the character is complete
    first = tok.encode("🐱")
    s = StreamDetokenizer(tok)
    assert s.add(first[0]) == ""


def test_streaming_flushes_an_incomplete_character_at_the_end(checkpoint):
    tok = TextTokenizer(checkpoint("tiny_bf16"))
    ids = tok.encode("ok🦊")  # not in the tiny vocabulary: the fox is several byte tokens
    assert len(ids) >= 3
    s = StreamDetokenizer(tok)
    out = "".join(s.add(i) for i in ids[:-1])  # the fox's last byte never arrives
    assert out == "ok"
    assert s.flush() == "\ufffd"  # what is left is not a whole character; it is still shown at the end


def test_template_matches_hand_written_internvl2_5():
    t = TEMPLATES["internvl2_5"]
    assert expand_images(t.conversation(with_media_tags("Q?", n_images=1)), [2], 4) == prompt_text("Q?", [2], 4)
    assert expand_images(t.conversation(with_media_tags("Q?", n_images=2)), [1, 3], 4) == prompt_text("Q?", [1, 3], 4)
    assert t.conversation("Q?", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert with_media_tags("Q?", n_frames=2) == "Frame1: <image>\nFrame2: <image>\nQ?"
    assert with_media_tags("Look: <image> now", n_images=1) == "Look: <image> now"


def test_placeholder_count_must_match_images():
    with pytest.raises(UserError, match="placeholders"):
        expand_images("<image> <image>", [1], 256)
    with pytest.raises(UserError, match="reserved"):
        expand_images("<IMG_CONTEXT>", [], 256)


def test_published_shapes_get_a_tokenizer_covering_the_whole_vocabulary(tmp_path):
    """make-checkpoint --size 1b/2b/8b: 151,674 ids as the model's vocabulary, the BPE part ending where
    Qwen2's does (151,643), and every id outside the special tokens decoding to visible text."""
    import numpy as np

    from internvl_edge.checkpoint.factory import SIZES
    from internvl_edge.checkpoint.synthetic_tokenizer import build_tokenizer, write_tokenizer_files

    vocab = SIZES["1b"].vocab_size
    assert vocab == SIZES["2b"].vocab_size == SIZES["8b"].vocab_size == 151674
    tok = build_tokenizer(SIZES["1b"].tokenizer_vocab, total=vocab)
    ids = write_tokenizer_files(tok, str(tmp_path))
    ours = TextTokenizer(str(tmp_path))
    assert ours.vocab_size() == vocab and ids["<|endoftext|>"] == 151643 and max(ids.values()) == vocab - 1
    specials = set(ids.values())
    sample = np.random.default_rng(0).integers(0, vocab, 3000).tolist() + list(range(256, vocab, 997))
    blank = [i for i in sample if i not in specials and not ours.decode([i]).strip()]
    assert not blank, blank[:10]
    for text in TEXTS[:3]:  # still a lossless tokenizer of real text
        assert ours.decode(ours.encode(text)) == text
    assert build_tokenizer(1000).get_vocab_size(with_added_tokens=True) < 1000  # tiny: unchanged, trained only
