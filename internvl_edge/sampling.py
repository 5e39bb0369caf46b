"""Logits processing as pure functions on numpy arrays (the reference for the sampling head).

The order is the seed's sample head and transformers' default processor order: repetition penalty
over the tokens already in the turn, top-k, temperature, top-p, then one draw.
https://github.com/huggingface/transformers/blob/main/src/transformers/generation/logits_process.py
(RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TemperatureLogitsWarper, TopPLogitsWarper)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# transformers' GenerationConfig defaults, used where generation_config.json is silent
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0
DEFAULT_REPETITION_PENALTY = 1.0
GREEDY_TEMPERATURE = 1e-5  # at or below this, sampling is greedy decoding
# Only a backend whose logits stay on the chip (Sophgo) needs the bundle's sampling head to sample
NO_SAMPLING = (
    "sampling (a temperature above 0, or --do_sample) needs this bundle's sampling head, since its "
    "logits stay on the chip, and it was converted without --do_sample: ask for greedy decoding "
    "(temperature 0, no --do_sample) or convert it with --do_sample"
)


@dataclass
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    def validate(self) -> None:
        from .errors import UserError

        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def top_logprobs(logits: np.ndarray, k: int, normalized: bool = False) -> list[tuple[int, float]]:
    """The k most likely next tokens of one logits row, as (token_id, logprob), best first
    (`normalized`: the row is log_softmax's output already)."""
    lp = logits if normalized else log_softmax(logits)
    k = min(k, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]


def repetition_penalty(logits: np.ndarray, seen_ids, penalty: float) -> np.ndarray:
    """Logits of tokens already seen: positive ones divided by `penalty`, negative ones multiplied."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0 or len(seen_ids) == 0:
        return out
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def top_k_candidates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, ids) of the k largest logits, best first (k = 0 or >= vocabulary: all of them)."""
    n = logits.shape[-1]
    k = n if k <= 0 or k > n else k
    idx = np.argpartition(-logits, k - 1)[:k] if k < n else np.arange(n)
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    return logits[idx], idx


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def top_p_keep(probs_desc: np.ndarray, top_p: float) -> np.ndarray:
    """Mask over probabilities sorted best first: the smallest prefix whose mass reaches top_p."""
    if top_p >= 1.0:
        return np.ones_like(probs_desc, dtype=bool)
    before = np.cumsum(probs_desc) - probs_desc  # mass of the better tokens
    return before < top_p


def candidates(logits: np.ndarray, seen_ids, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, token ids) to draw from, after penalty, top-k, temperature and top-p."""
    x = repetition_penalty(logits, seen_ids, p.repetition_penalty)
    values, ids = top_k_candidates(x, p.top_k)
    probs = softmax(values / max(p.temperature, GREEDY_TEMPERATURE))
    keep = top_p_keep(probs, p.top_p)
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum(), ids


def draw(probs: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> int:
    """One token from candidate probabilities (float64 renormalised, so rounding cannot bias it)."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum()
    return int(ids[rng.choice(len(p), p=p)])
