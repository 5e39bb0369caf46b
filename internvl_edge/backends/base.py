"""The stage contract every backend implements, and what all backends share.

What generate.py, the API and the server use; a Sophgo bmodel (bmrt.py), ONNX Runtime (ort.py) or a
future backend plugs in behind the same methods:

    encode_images(pixel_values [tiles, 3, 448, 448]) -> image embeddings [tiles, 256, hidden]
    embed(input_ids [B, S]) -> embeddings [B, S, hidden]
    new_cache(batch) -> KVCache            one slot per sequence, each with its own cached length
    copy_slot(src, i, dst, j)              copy sequence i of one cache into slot j of another
    read_rows(cache, i, n) -> rows         a copy of the first n cached rows of sequence i and back
    write_rows(cache, i, rows, n)          into a slot, whose length becomes n (prefix reuse,
                                           reuse.PrefixCache; only where `can_copy_rows`); row_bytes:
                                           their bytes per token
    forward(cache, embeds [B, S, hidden], query_lens [B]) -> logits [B, vocab]
        appends query_lens[b] rows of embeds[b] to slot b and returns the logits after its last row;
        a slot with query_lens[b] == 0 is idle and its row is meaningless. The returned array may
        belong to the cache and be overwritten by its next forward call (copy what you keep)
    greedy(logits [B, vocab]) -> token ids [B]
    sample(logits [B, vocab], penalty_ids [B, n], params) -> (probs [B, k], token ids [B, k])
        only where `can_sample`

Dynamic bundles (the CPU's default) pass the real lengths; static ones (`convert --static`, the seed's
fixed shapes) pad every prefill call to `max_input_length` rows and feed the vision net one tile at a
time.

`open_backend` (the package's __init__) picks the implementation from the manifest's target; this
module knows none of them, so that they can import it without a cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..bundle import Manifest
from ..errors import UserError
from ..sampling import SamplingParams


@dataclass
class KVCache:
    """KV buffers for `batch` sequences and how many rows each slot holds."""

    batch: int
    capacity: int
    lengths: np.ndarray  # int64 [batch]
    buffers: list = field(default_factory=list)  # backend-specific storage
    binding: object = None  # backend-specific state (ORT: the IO binding that holds the buffers)

    def reset(self, slot: int | None = None) -> None:
        if slot is None:
            self.lengths[:] = 0
        else:
            self.lengths[slot] = 0


class Backend(Protocol):
    """What every backend offers. The capability properties say what a caller may ask of this one,
    instead of the caller probing for attributes."""

    name: str
    manifest: Manifest
    devices: list[int]
    hidden: int
    vocab: int
    layers: int
    max_input_length: int  # the most rows one forward call takes per sequence
    seq_length: int  # the most rows a sequence holds
    # host threads the backend computes with (None: the backend does not use the host's cores for it)
    threads: int | None

    @property
    def dynamic(self) -> bool:
        """Whether calls follow the input's shapes (else every prefill is padded to max_input_length)."""
        ...

    @property
    def can_sample(self) -> bool:
        """Whether `sample` works on this bundle."""
        ...

    @property
    def can_copy_rows(self) -> bool:
        """Whether `read_rows` / `write_rows` move KV rows through the host (prefix reuse)."""
        ...

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's KV rows, all layers, as read_rows returns them."""
        ...

    @property
    def runs_on(self) -> str:
        """Where the nets run, in words (a report's "ran on")."""
        ...

    @property
    def q4_kernel(self) -> str | None:
        """Who computes the decoder's 4-bit linears, where the backend chooses (bench's report)."""
        ...

    @property
    def attention_kernel(self) -> str | None:
        """Who computes the decoder's attention, where the backend chooses (bench's report)."""
        ...

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def embed(self, input_ids: np.ndarray) -> np.ndarray: ...

    def new_cache(self, batch: int = 1) -> KVCache: ...

    def copy_slot(self, src: KVCache, src_slot: int, dst: KVCache, dst_slot: int) -> None: ...

    def read_rows(self, cache: KVCache, slot: int, n: int) -> list[np.ndarray]: ...

    def write_rows(self, cache: KVCache, slot: int, rows: list[np.ndarray], n: int) -> None: ...

    def forward(self, cache: KVCache, embeds: np.ndarray, query_lens) -> np.ndarray: ...

    def greedy(self, logits: np.ndarray) -> np.ndarray: ...

    def sample(
        self, logits: np.ndarray, penalty_ids: np.ndarray, p: SamplingParams
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> dict: ...


def checked_query_lens(backend: Backend, cache: KVCache, embeds: np.ndarray, query_lens) -> np.ndarray:
    """The contract's rules for a forward call, whatever the backend: embeddings [batch, rows,
    hidden] for the cache's batch, at most max_input_length new rows per sequence, and room for them
    within seq_length. Returns the per-sequence row counts as int64."""
    query_lens = np.asarray(query_lens, dtype=np.int64).reshape(cache.batch)
    if embeds.shape[0] != cache.batch or embeds.shape[2] != backend.hidden:
        raise ValueError(f"embeddings {embeds.shape} do not fit a cache of batch {cache.batch}")
    if int(query_lens.max(initial=0)) > backend.max_input_length:
        raise ValueError(f"a forward call takes at most {backend.max_input_length} rows")
    if int((cache.lengths + query_lens).max(initial=0)) > backend.seq_length:
        raise ValueError("the KV cache is full")
    return query_lens


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_devid(devid: str | int | None) -> list[int]:
    """The seed's `-d 0` or `-d 0,1` forms."""
    if devid is None or devid == "":
        return [0]
    try:
        ids = [int(x) for x in str(devid).split(",")]
    except ValueError:
        raise UserError(f"-d/--devid takes device numbers such as 0 or 0,1; got {devid!r}") from None
    if any(i < 0 for i in ids):
        raise UserError(f"-d/--devid takes non-negative device numbers; got {devid!r}")
    return ids
