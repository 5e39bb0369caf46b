"""What a loaded model keeps so that it does not compute the same thing twice, each within a memory
budget, least recently used first out:

    ImageCache    image embeddings by the content hash of the image's tiles: a second question about
                  the same picture skips the vision encoder
    PrefixCache   the KV rows of prompts already prefilled on this model, keyed by their token ids
                  (image positions by their image's hash): a prompt that starts like one of them (the
                  same system prompt; the same system prompt and image with another question) copies
                  those rows into its cache slot and prefills only the rest; the same prompt again
                  takes its stored logits too

A prompt's key is its token ids with every image position replaced by a negative number derived from
its image's content hash (token ids are never negative), so two prompts share a key prefix exactly when
they share their text and images up to that point. KV rows depend only on the tokens before them and
their positions (causal attention), so a shared prefix's rows are the rows a prefill would compute.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_IMAGE_CACHE_MB = 32  # InternVL3-2B: 1.5 MB of embeddings per tile, ~20 tiles
DEFAULT_PREFIX_CACHE_MB = 128  # InternVL3-2B: 28 KB of KV per token in float16 (57 in float32), ~4500 tokens


def image_key(pixels: np.ndarray) -> int:
    """A negative int64 naming one image's tiles by content (BLAKE2b of the pixels and their shape)."""
    px = np.ascontiguousarray(pixels, dtype=np.float32)
    h = hashlib.blake2b(repr(px.shape).encode(), digest_size=8)
    h.update(memoryview(px).cast("B"))
    return -1 - (int.from_bytes(h.digest(), "little") >> 2)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading entries two int64 keys share."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m


ROW_GRANULE = 8  # reused rows: a multiple of this, and at least this many rows are prefilled after them
# Why: the kernels compute a prefill row the same way whatever the call's other rows, as long as rows
# are grouped alike (the 4-bit GEMM takes 4 (AVX2) or 8 (AVX-512) rows at a time from a task's first
# row) and a call has at least 8 rows (fewer take the decode paths of the 4-bit GEMM and of attention).
# Reused prefixes cut at multiples of 8 and followed by calls of 8 rows or more keep both true, so the
# answers are bit-identical to those without reuse (tests/test_reuse.py).


def reusable(shared: int, prompt: int, chunk: int) -> int:
    """How many of `shared` leading rows of a `prompt`-token prompt may be reused: a multiple of
    ROW_GRANULE such that the first call after them (up to the next multiple of `chunk`, where the
    prefill's calls start) has at least ROW_GRANULE rows."""
    n = min(shared, prompt - 1)
    n -= n % (ROW_GRANULE if chunk % ROW_GRANULE == 0 else chunk)  # else: whole calls only
    while n > 0 and min(-(-n // chunk) * chunk, prompt) - n < ROW_GRANULE and n % chunk:
        n -= ROW_GRANULE
    return max(n, 0)


class _Lru:
    """An ordered store with a byte budget: putting an item evicts the least recently used ones until
    the total fits; an item larger than the whole budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.items: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key, value, nbytes: int) -> None:
        with self.lock:
            self._drop(key)
            if nbytes > self.max_bytes:
                return
            self.items[key], self.sizes[key] = value, nbytes
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self.items)))

    def drop(self, key) -> None:
        with self.lock:
            self._drop(key)

    def _drop(self, key) -> None:
        if key in self.items:
            del self.items[key]
            self.bytes -= self.sizes.pop(key)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.sizes.clear()
            self.bytes = 0


class ImageCache(_Lru):
    """Image embeddings [tiles, tokens, hidden] by image_key."""

    def put(self, key: int, embeds: np.ndarray) -> None:  # type: ignore[override]
        super().put(key, embeds, embeds.nbytes)


@dataclass
class _Prefix:
    key: np.ndarray  # int64 [n]
    rows: list  # the backend's copy of the KV rows of these n tokens (read_rows)
    logits: np.ndarray | None  # float32 [vocab]: the logits after the n-th token


class PrefixCache(_Lru):
    """KV rows of prompts prefilled on this model (see the module docstring). The backend provides
    `read_rows(cache, slot, n)`, `write_rows(cache, slot, rows)` and `row_bytes` (per token)."""

    def __init__(self, max_bytes: int, row_bytes: int):
        super().__init__(max_bytes)
        self.row_bytes = row_bytes
        self.counter = 0

    def restore(self, backend, cache, slot: int, key: np.ndarray, chunk: int) -> tuple[int, np.ndarray | None]:
        """Copy the longest stored prefix of `key` into the (empty) slot. Returns how many rows it holds
        and, when the whole prompt was stored, the logits after it (a copy); else None, and the rest
        is left to prefill, at least the prompt's last token (see `reusable`; `chunk`: the rows of the
        caller's prefill calls)."""
        with self.lock:
            best, n = None, 0
            for name, entry in self.items.items():
                shared = common_prefix(entry.key, key)
                if shared > n:
                    best, n = name, shared
            if best is None:
                return 0, None
            self.items.move_to_end(best)
            entry = self.items[best]
        whole = n == len(key) == len(entry.key) and entry.logits is not None
        if not whole:
            n = reusable(n, len(key), chunk)
        if n <= 0:
            return 0, None
        backend.write_rows(cache, slot, entry.rows, n)
        return n, entry.logits.copy() if whole else None

    def store(self, backend, cache, slot: int, key: np.ndarray, logits: np.ndarray) -> None:
        """Keep the slot's rows of the prompt `key` (just prefilled) and its logits. A stored prompt that
        is a prefix of this one is replaced by it; nothing is added when this prompt is stored already."""
        n = len(key)
        if n == 0 or n * self.row_bytes > self.max_bytes:
            return
        with self.lock:
            for name, entry in list(self.items.items()):
                shared = common_prefix(entry.key, key)
                if shared == n == len(entry.key):
                    self.items.move_to_end(name)
                    return
                if shared == len(entry.key):  # this prompt extends it
                    self._drop(name)
        rows = backend.read_rows(cache, slot, n)
        self.counter += 1
        prefix = _Prefix(np.array(key, np.int64), rows, np.array(logits, np.float32))
        self.put(self.counter, prefix, n * self.row_bytes + logits.nbytes)
