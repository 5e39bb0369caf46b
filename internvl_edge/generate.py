"""The token loop as stacked generators: steps (token ids) -> stream (text pieces + stats) -> collect.

    steps()   prefill the prompt in chunks, then pick a token, feed it back, repeat; yields Step
    stream()  detokenises steps UTF-8-safely, applies stop strings, yields Chunk, the last with Stats
    collect() runs a stream to the end and returns a Result

As in the seed, a stop token ends the turn without being fed back into the cache, and timings follow
its pipeline.py: FTL is the time from the request to the first token (vision, embedding and prefill
included), TPS counts the tokens after the first over the time after the first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .runtime import KVCache
from .sampling import GREEDY_TEMPERATURE, SamplingParams, draw, top_logprobs
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


@dataclass
class PreparedPrompt:
    """A prompt ready for the decoder: token ids and their embeddings (image rows already placed)."""

    input_ids: list[int]
    embeds: np.ndarray  # float32 [S, hidden]
    vision_s: float = 0.0
    num_tiles: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Step:
    token_id: int
    logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None, "stop" (a stop token: not part of the answer) or "length"
    is_stop_token: bool = False


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    num_tiles: int = 0
    vision_s: float = 0.0
    ftl_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tps(self) -> float:
        after_first = self.generated_tokens - 1
        return after_first / self.decode_s if after_first > 0 and self.decode_s > 0 else 0.0


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    stats: Stats | None = None


@dataclass
class Result:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str
    stats: Stats


def prefill(backend, cache: KVCache, embeds: np.ndarray, slot: int = 0) -> np.ndarray:
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


def select(backend, logits: np.ndarray, seen: list[int], cfg: GenerationConfig, rng) -> int:
    if cfg.do_sample and cfg.sampling.temperature > GREEDY_TEMPERATURE:
        probs, ids = backend.sample(logits[None, :], np.asarray([seen], np.int64), cfg.sampling)
        return draw(probs[0], ids[0], rng)
    return int(backend.greedy(logits[None, :])[0])


def steps(backend, cache: KVCache, prompt: PreparedPrompt, cfg: GenerationConfig, stats: Stats) -> Iterator[Step]:
    """Prefill, then one token per iteration. The cache keeps every token that was fed."""
    if cfg.do_sample and not getattr(backend, "can_sample", False):
        raise UserError("this bundle was converted without --do_sample; convert it with --do_sample to sample")
    room = cache.capacity - int(cache.lengths[0])
    if len(prompt.input_ids) >= room:
        raise UserError(
            f"the prompt has {len(prompt.input_ids)} tokens but only {room - 1} fit before the bundle's "
            f"seq_length {cache.capacity}; shorten it, use fewer tiles, or convert with a larger -s"
        )
    rng = np.random.default_rng(cfg.seed)
    seen = list(prompt.input_ids)  # the repetition penalty covers the whole turn
    logits = prefill(backend, cache, prompt.embeds)
    stats.prompt_tokens = len(prompt.input_ids)
    first_at = None
    for produced in range(cfg.max_new_tokens):
        token = select(backend, logits, seen, cfg, rng)
        lp = top_logprobs(logits, cfg.logprobs) if cfg.logprobs else None
        now = time.perf_counter()
        if first_at is None:
            first_at = now
            stats.ftl_s = now - prompt.started
        stats.decode_s = now - first_at
        if token in cfg.stop_token_ids and not cfg.ignore_eos:
            yield Step(token, lp, "stop", is_stop_token=True)
            return
        stats.generated_tokens += 1
        cache_full = int(cache.lengths[0]) + 1 >= cache.capacity
        if cache_full or produced + 1 == cfg.max_new_tokens:
            yield Step(token, lp, "length")
            return
        yield Step(token, lp, None)
        seen.append(token)
        logits = backend.forward(cache, backend.embed(np.array([[token]], np.int64)), [1])[0]


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still grow into a stop string (so are not printed yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


def stream(backend, tokenizer: TextTokenizer, cache: KVCache, prompt: PreparedPrompt, cfg: GenerationConfig) -> Iterator[Chunk]:
    """Text pieces as they become printable; the last chunk carries the finish reason and stats."""
    stats = Stats(num_tiles=prompt.num_tiles, vision_s=prompt.vision_s)
    detok = StreamDetokenizer(tokenizer)
    pending = ""  # decoded, not yet emitted (it might be the start of a stop string)
    finish = "length"
    for step in steps(backend, cache, prompt, cfg, stats):
        if step.is_stop_token:
            finish = "stop"
            break
        pending += detok.add(step.token_id)
        if step.finish_reason:
            pending += detok.flush()
        lps = [step.logprobs] if step.logprobs is not None else None
        hits = [pending.find(s) for s in cfg.stop_strings if s in pending]
        if hits:
            yield Chunk(pending[: min(hits)], [step.token_id], lps)
            pending, finish = "", "stop"
            break
        hold = 0 if step.finish_reason else _held_back(pending, cfg.stop_strings)
        emit, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        yield Chunk(emit, [step.token_id], lps)
        if step.finish_reason:
            finish = step.finish_reason
            break
    yield Chunk(pending + detok.flush(), [], None, finish, stats)


def collect(chunks: Iterator[Chunk], prompt_ids: list[int]) -> Result:
    text, ids, lps, finish, stats = [], [], [], "length", Stats()
    any_lp = False
    for c in chunks:
        text.append(c.text)
        ids += c.token_ids
        if c.logprobs:
            any_lp = True
            lps += c.logprobs
        if c.finish_reason:
            finish, stats = c.finish_reason, c.stats or stats
    return Result("".join(text), ids, list(prompt_ids), lps if any_lp else None, finish, stats)
