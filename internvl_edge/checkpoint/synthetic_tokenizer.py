"""A small but real Qwen2-style byte-level BPE tokenizer, trained here with the `tokenizers` library.

Weights cannot be downloaded, and neither can InternVL's tokenizer, so the random-weight checkpoints
carry one built the same way: Qwen2's pre-tokenizer split and byte-level alphabet, a BPE vocabulary
trained on a built-in text, then Qwen2's and InternVL's special tokens appended at the end (as in the
real vocabulary, where they follow the 151643 BPE tokens).
https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/tokenizer_config.json (Qwen2 special tokens)
https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/train/constants.py (InternVL tokens)
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from ..tokenizer import qwen2_pipeline

QWEN2_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
INTERNVL_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
}

_CORPUS = """
Describe the image. What is in the picture? The cat sits on a red mat next to a blue door.
A dog runs across the green field while two children play with a yellow ball in the park.
Please answer the question about the video. Frame by frame, the car moves from left to right.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How many people are in the photo? There are three people standing near the window at sunset.
InternVL is a multimodal large language model. It reads images, videos and text, and answers questions.
Edge devices run small models: a convert step builds a bundle, then chat and run use it.
The weather today is sunny with a light breeze; the temperature is 23 degrees Celsius.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14 1e-6. Symbols: ( ) [ ] { } < > + - * / = % # @ & !
你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。
图片里有什么？这是一只猫。请描述这张图片。视频中发生了什么？
Emoji and accents: café naïve résumé 😀 🐱 🚗 ✓ — “quotes” and ‘apostrophes’.
"""


def build_tokenizer(vocab_size: int = 1000, total: int = 0) -> Tokenizer:
    """Train the byte-level BPE on the built-in text and append the special tokens. `total` > 0: fill
    the BPE vocabulary with more merges first, so that BPE and special tokens make exactly `total` ids
    (the published shapes' 151,674, where the BPE part ends at 151,643 as in Qwen2's vocabulary)."""
    tok = _train(vocab_size)
    if total:
        tok = _filled(tok, total - len(QWEN2_SPECIAL) - len(INTERNVL_SPECIAL))
    tok.add_special_tokens(
        [AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in QWEN2_SPECIAL + INTERNVL_SPECIAL]
    )
    return tok


def _filled(tok: Tokenizer, size: int) -> Tokenizer:
    """The trained BPE extended to `size` tokens by merges of its own word pieces: every new token is an
    ASCII word piece (a letter run, with or without the byte-level space mark), so that any id a
    random-weight model picks decodes to visible text. Merges are added after the trained ones (lower
    priority), each joining two tokens that already exist, as BPE requires."""
    import json as _json

    model = _json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if size <= len(vocab):
        return tok
    by_id = sorted(vocab, key=vocab.get)
    space = "\u0120"  # byte-level BPE's mark for a leading space
    starts = [t for t in by_id if t.lstrip(space).isascii() and t.lstrip(space).isalpha() and t.count(space) <= 1]
    tails = [t for t in by_id if t.isascii() and t.isalpha()]
    frontier = list(starts)
    while len(vocab) < size:
        grown = []
        for head in frontier:
            for tail in tails:
                piece = head + tail
                if piece in vocab:
                    continue
                vocab[piece] = len(vocab)
                merges.append((head, tail))
                grown.append(piece)
                if len(vocab) == size:
                    break
            if len(vocab) == size:
                break
        if not grown:
            raise ValueError(f"cannot fill the vocabulary to {size} tokens")
        frontier = grown
    filled = qwen2_pipeline(
        Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    )
    return filled


def _train(vocab_size: int) -> Tokenizer:
    tok = qwen2_pipeline(Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in _CORPUS.splitlines() if line] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def write_tokenizer_files(tok: Tokenizer, out_dir: str, model_max_length: int = 8192) -> dict[str, int]:
    """Write tokenizer.json, vocab.json + merges.txt, added_tokens.json, tokenizer_config.json and
    special_tokens_map.json as a Qwen2/InternVL checkpoint has them. Returns the special token ids."""
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    tok.model.save(out_dir)  # vocab.json, merges.txt
    specials = QWEN2_SPECIAL + INTERNVL_SPECIAL
    ids = {t: tok.token_to_id(t) for t in specials}
    with open(os.path.join(out_dir, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2, ensure_ascii=False)
    decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t not in NOT_SPECIAL,
        }
        for t in specials
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + INTERNVL_SPECIAL,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    special_map = {
        "additional_special_tokens": config["additional_special_tokens"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
    return ids
