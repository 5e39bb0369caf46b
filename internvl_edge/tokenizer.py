"""The tokenizer (Hugging Face `tokenizers`, no transformers) and a UTF-8-safe streaming detokeniser.

Checkpoints ship `tokenizer.json`; older ones only `vocab.json` + `merges.txt` (+ `added_tokens.json`).
From those we build the same fast tokenizer transformers builds for Qwen2 (byte-level BPE, Qwen2's
pre-tokenizer split, NFC), so both layouts tokenize identically.
https://github.com/huggingface/transformers/blob/main/src/transformers/convert_slow_tokenizer.py (Qwen2Converter)
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import UserError, reason

# Qwen2's pre-tokenizer pattern (tokenizer.json of any Qwen2.5 model)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
REQUIRED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)


def qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Give a byte-level BPE model Qwen2's normalizer, pre-tokenizer and decoder."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    return tok


def _added_tokens(folder: str) -> list[tuple[int, str, bool]]:
    """(id, content, special) from tokenizer_config.json's added_tokens_decoder or added_tokens.json."""
    found: dict[int, tuple[str, bool]] = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            for k, v in (json.load(f).get("added_tokens_decoder") or {}).items():
                found[int(k)] = (v["content"], bool(v.get("special", True)))
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path, encoding="utf-8") as f:
            for content, idx in json.load(f).items():
                found.setdefault(int(idx), (content, True))
    return [(i, c, s) for i, (c, s) in sorted(found.items())]


def build_from_vocab_merges(folder: str) -> Tokenizer:
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    tok = qwen2_pipeline(Tokenizer(models.BPE.from_file(vocab, merges, unk_token=None, fuse_unk=False)))
    added = _added_tokens(folder)
    for idx, content, special in added:
        if tok.token_to_id(content) is None:
            if idx != tok.get_vocab_size(with_added_tokens=True):
                raise UserError(f"{folder}: added token {content!r} has id {idx}, not the next free id")
            tok.add_special_tokens([AddedToken(content, special=special, normalized=False)])
    return tok


def load_raw_tokenizer(folder: str) -> Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    try:
        if os.path.isfile(path):
            return Tokenizer.from_file(path)
        if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
            return build_from_vocab_merges(folder)
    except UserError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise UserError(f"cannot load the tokenizer in {folder}: {reason(e)}") from None
    raise UserError(f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")


class TextTokenizer:
    """Encoding, decoding and the special token ids InternVL needs."""

    def __init__(self, folder: str):
        self.raw = load_raw_tokenizer(folder)
        self.ids = {}
        for t in REQUIRED_TOKENS + (END_OF_TEXT,):
            self.ids[t] = self.raw.token_to_id(t)
        missing = [t for t in REQUIRED_TOKENS if self.ids[t] is None]
        if missing:
            raise UserError(f"the tokenizer in {folder} lacks InternVL's special tokens {', '.join(missing)}")
        self.img_context_id = self.ids[IMG_CONTEXT]
        self.im_end_id = self.ids[IM_END]

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.raw.token_to_id(token)

    def vocab_size(self) -> int:
        return self.raw.get_vocab_size(with_added_tokens=True)


class StreamDetokenizer:
    """Turns a growing list of token ids into text pieces, never emitting half a UTF-8 character.

    Byte-level BPE tokens can end inside a multi-byte character; decoding them alone yields U+FFFD.
    We decode a small window (from the previous emission point) and emit only once the window's text
    no longer ends in U+FFFD (the approach of vLLM's incremental detokenizer)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (a genuinely incomplete character comes out as U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""
