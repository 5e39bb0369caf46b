"""The token loop: prefill -> per-token rules -> stream of text pieces -> collect.

    prefill()           feed a prompt's embeddings into one cache slot, in chunks of max_input_length
    prefill_prompt()    the same for a prepared prompt, reusing a stored prefix's KV rows (reuse.py)
    SequenceDecoding    one sequence's per-token rules (pick, stop tokens and strings, lengths, UTF-8-safe
                        text, timings); the server's engine drives many of these in one batch
    stream()            one sequence end to end: yields Chunk, the last with finish_reason and Stats
    collect()           runs a stream to the end and returns a Result

As in the seed, a stop token ends the turn without being fed back into the cache, and timings follow
its pipeline.py: FTL is the time from the request to the first token (vision, embedding and prefill
included), TPS counts the tokens after the first over the time after the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .backends.base import Backend, KVCache
from .errors import UserError
from .sampling import GREEDY_TEMPERATURE, NO_SAMPLING, SamplingParams, draw, log_softmax, top_logprobs
from .tokenizer import StreamDetokenizer, TextTokenizer


@dataclass
class GenerationConfig:
    max_new_tokens: int = 1024
    do_sample: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int = 0  # > 0: the top-k log-probabilities of every generated position
    ignore_eos: bool = False

    @property
    def samples(self) -> bool:
        """Whether tokens are drawn (a temperature at or below GREEDY_TEMPERATURE is greedy)."""
        return self.do_sample and self.sampling.temperature > GREEDY_TEMPERATURE


@dataclass
class PreparedPrompt:
    """A prompt ready for the decoder: token ids and their embeddings (image rows already placed)."""

    input_ids: list[int]
    embeds: np.ndarray  # float32 [S, hidden]
    vision_s: float = 0.0
    num_tiles: int = 0
    started: float = field(default_factory=time.perf_counter)
    key: np.ndarray | None = None  # reuse.py's prefix key (image positions named by their image's hash)
    cached_tokens: int = 0  # prompt tokens whose KV rows came from the prefix cache


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    num_tiles: int = 0
    vision_s: float = 0.0
    ftl_s: float = 0.0
    decode_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens not prefilled: their KV rows were reused

    @property
    def decode_tps(self) -> float:
        after_first = self.generated_tokens - 1
        return after_first / self.decode_s if after_first > 0 and self.decode_s > 0 else 0.0


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None = None  # per token: the top-k (token_id, logprob)
    finish_reason: str | None = None
    stats: Stats | None = None
    token_logprobs: list[float] | None = None  # per token: its own logprob (OpenAI's logprobs.content)
    notice: str | None = None  # on the last chunk: why the answer ended early, in one line (or None)
    prompt_token_ids: list[int] | None = None  # on the last chunk: the prompt's token ids


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str
    stats: Stats
    notice: str | None = None  # e.g. the context, not max_new_tokens, ended the answer


def prefill(backend: Backend, cache: KVCache, embeds: np.ndarray, slot: int = 0) -> np.ndarray:
    """Feed [S, hidden] rows into one slot in chunks of the bundle's max input length; returns the
    logits row after the last one."""
    step = backend.max_input_length
    logits = None
    for start in range(0, len(embeds), step):
        chunk = embeds[start : start + step]
        batch_embeds = np.zeros((cache.batch, len(chunk), embeds.shape[1]), np.float32)
        batch_embeds[slot] = chunk
        lens = np.zeros(cache.batch, np.int64)
        lens[slot] = len(chunk)
        logits = backend.forward(cache, batch_embeds, lens)
    return logits[slot]


def prefill_spans(length: int, start: int, step: int) -> list[tuple[int, int]]:
    """The calls that prefill rows start..length of a prompt whose whole prefill runs calls of `step`
    rows from row 0: up to the next multiple of `step`, then whole calls. After a reused prefix every
    row is then computed in a call laid out as without reuse (reuse.reusable's rule)."""
    spans, boundary = [], min(-(-start // step) * step, length)
    if start < boundary:
        spans.append((start, boundary))
    spans += [(a, min(a + step, length)) for a in range(boundary, length, step)]
    return spans


def reuse_prefix(
    backend: Backend, cache: KVCache, prompt: PreparedPrompt, slot: int, prefixes, step: int
) -> np.ndarray | None:
    """With a reuse.PrefixCache and an empty slot: the stored rows of the prompt's longest stored prefix
    copied into the slot (prompt.cached_tokens says how many); the logits after the prompt when all of
    it was stored, else None."""
    prompt.cached_tokens = 0
    if prefixes is None or prompt.key is None or int(cache.lengths[slot]):
        return None
    prompt.cached_tokens, logits = prefixes.restore(backend, cache, slot, prompt.key, step)
    return logits


def keep_prefix(
    backend: Backend, cache: KVCache, prompt: PreparedPrompt, slot: int, prefixes, logits: np.ndarray
) -> None:
    """Store a prompt just prefilled from an empty slot (see reuse_prefix)."""
    if prefixes is not None and prompt.key is not None and int(cache.lengths[slot]) == len(prompt.key):
        prefixes.store(backend, cache, slot, prompt.key, logits)


def prefill_prompt(
    backend: Backend, cache: KVCache, prompt: PreparedPrompt, slot: int = 0, prefixes=None
) -> np.ndarray:
    """`prefill` of a prepared prompt into a slot (empty, or after history). With a reuse.PrefixCache,
    an empty slot first takes the KV rows of the longest stored prefix of the prompt (or all of them
    and the logits, for a prompt seen before) and prefills only the rest; the prompt is then stored.
    Returns the logits row after the prompt (the cache's own buffer, or a stored copy)."""
    step = backend.max_input_length
    fresh = int(cache.lengths[slot]) == 0
    logits = reuse_prefix(backend, cache, prompt, slot, prefixes, step)
    if logits is not None:
        return logits
    for a, b in prefill_spans(len(prompt.embeds), prompt.cached_tokens, step):
        logits = prefill(backend, cache, prompt.embeds[a:b], slot)
    if fresh:
        keep_prefix(backend, cache, prompt, slot, prefixes, logits)
    return logits


def select(backend: Backend, logits: np.ndarray, seen: list[int], cfg: GenerationConfig, rng) -> int:
    if cfg.samples:
        probs, ids = backend.sample(logits[None, :], np.asarray([seen], np.int64), cfg.sampling)
        return draw(probs[0], ids[0], rng)
    return int(backend.greedy(logits[None, :])[0])


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop string (so are not sent yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class SequenceDecoding:
    """One sequence's decoding state and per-token rules, shared by `stream` (one sequence) and the
    server's engine (many in a batch): pick a token from a logits row, time it, then `accept` it:
    a stop token ends the answer unsent; max_new_tokens or a full cache end it after the token; the
    text is detokenised UTF-8-safely and held back while it could still become a stop string."""

    def __init__(self, tokenizer: TextTokenizer, cfg: GenerationConfig, prompt: PreparedPrompt):
        self.cfg, self.started = cfg, prompt.started
        self.stats = Stats(
            prompt_tokens=len(prompt.input_ids),
            num_tiles=prompt.num_tiles,
            vision_s=prompt.vision_s,
            cached_tokens=prompt.cached_tokens,
        )
        self.rng = np.random.default_rng(cfg.seed)
        self.prompt_ids = prompt.input_ids
        self.seen = list(prompt.input_ids)  # the repetition penalty covers the whole turn
        self.samples = cfg.samples
        self.detok = StreamDetokenizer(tokenizer)
        self.pending = ""  # decoded, not sent yet (it might start a stop string)
        self.first_at: float | None = None
        self.token: int | None = None  # the token to feed at the next step
        self.done = False

    def pick(self, backend: Backend, logits_row: np.ndarray) -> int:
        return select(backend, logits_row, self.seen, self.cfg, self.rng)

    def accept(self, token: int, logits_row: np.ndarray, cache_length: int, capacity: int) -> list[Chunk]:
        """One picked token -> the chunks to emit (the last one with finish_reason and stats when the
        answer ends: `done` is then set); otherwise `token` is the next one to feed."""
        cfg, stats = self.cfg, self.stats
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at, stats.ftl_s = now, now - self.started
        stats.decode_s = now - self.first_at
        if token in cfg.stop_token_ids and not cfg.ignore_eos:
            return [self._last("stop")]
        stats.generated_tokens += 1
        top = chosen = None
        if cfg.logprobs:  # one log-softmax over the vocabulary per token, for both
            lp = log_softmax(logits_row)
            top, chosen = [top_logprobs(lp, cfg.logprobs, normalized=True)], [float(lp[token])]
        ends = cache_length + 1 >= capacity or stats.generated_tokens >= cfg.max_new_tokens
        self.pending += self.detok.add(token)
        if ends:
            self.pending += self.detok.flush()
        hits = [self.pending.find(s) for s in cfg.stop_strings if s in self.pending]
        if hits:
            out = Chunk(self.pending[: min(hits)], [token], top, token_logprobs=chosen)
            self.pending = ""
            return [out, self._last("stop")]
        hold = 0 if ends else held_back(self.pending, cfg.stop_strings)
        emit, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        out = Chunk(emit, [token], top, token_logprobs=chosen)
        if ends:
            last = self._last("length")
            if stats.generated_tokens < cfg.max_new_tokens:
                last.notice = (
                    f"the answer was cut at the end of the bundle's context ({capacity} tokens, prompt "
                    "included); convert with a larger -s or ask a shorter question"
                )
            return [out, last]
        self.seen.append(token)
        self.token = token
        return [out]

    def _last(self, finish: str) -> Chunk:
        self.done = True
        return Chunk(self.pending + self.detok.flush(), [], None, finish, self.stats, prompt_token_ids=self.prompt_ids)


def stream(
    backend: Backend,
    tokenizer: TextTokenizer,
    cache: KVCache,
    prompt: PreparedPrompt,
    cfg: GenerationConfig,
    prefixes=None,
) -> Iterator[Chunk]:
    """Prefill one sequence (slot 0; reusing `prefixes`' rows, see prefill_prompt), then decode it token
    by token: text pieces as they become printable; the last chunk carries the finish reason and stats.
    The cache keeps every fed token."""
    if cfg.do_sample and not backend.can_sample:
        raise UserError(NO_SAMPLING)
    room = cache.capacity - int(cache.lengths[0])
    if len(prompt.input_ids) >= room:
        raise UserError(
            f"the prompt has {len(prompt.input_ids)} tokens but only {room - 1} fit before the bundle's "
            f"seq_length {cache.capacity}; shorten it, use fewer tiles, or convert with a larger -s"
        )
    logits = prefill_prompt(backend, cache, prompt, prefixes=prefixes)
    seq = SequenceDecoding(tokenizer, cfg, prompt)
    while True:
        yield from seq.accept(seq.pick(backend, logits), logits, int(cache.lengths[0]), cache.capacity)
        if seq.done:
            return
        logits = backend.forward(cache, backend.embed(np.array([[seq.token]], np.int64)), [1])[0]


def collect(chunks: Iterator[Chunk], prompt_ids: list[int] | None = None) -> Result:
    """A stream run to its end, as one Result (`prompt_ids`: default, those its last chunk carries)."""
    text, ids, lps, finish, stats = [], [], [], "length", Stats()
    any_lp, notice = False, None
    for c in chunks:
        notice = c.notice or notice
        text.append(c.text)
        ids += c.token_ids
        if c.logprobs:
            any_lp = True
            lps += c.logprobs
        if c.finish_reason:
            finish, stats = c.finish_reason, c.stats or stats
            prompt_ids = c.prompt_token_ids if prompt_ids is None else prompt_ids
    return Result("".join(text), ids, list(prompt_ids or ()), lps if any_lp else None, finish, stats, notice)
