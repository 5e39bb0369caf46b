"""The engine: one thread runs every model call; up to `parallel` sequences decode in one batch.

    requests ──submit──> waiting (bounded: beyond it 429) ──admit──> admitting ──join──> slot j of the
                                                                                  batched KV cache
    chunks  <──asyncio queue per request── pick each row's token <── one batched decoder call per step

Each loop iteration does, in order:
  1. drop cancelled requests (a client that left): waiting, admitting or decoding, their slots are free
     at once;
  2. admission: a request takes a free slot as it arrives (submit), and a freed slot takes the first
     waiting request at once (slots = decoding + admitting), so no request waits while a slot is idle,
     not even until the step in progress ends; the step then does one unit of the oldest admitting
     request's work: its vision + embedding, or one PREFILL_CHUNK-row chunk of its prefill into the
     batch-1 prefill cache, or, after the last chunk, the copy into a free slot of the decode batch and
     its first token (picked from the prefill logits). Admissions go in arrival order, one unit per
     step, so a long prompt costs the live streams one chunk's time per token rather than its whole
     prefill; with no live stream the units run back to back;
  3. one decode step: every live slot feeds its last token, one row each, through ONE forward call
     (idle slots have query length 0), then every row's next token is picked: the greedy head once for
     the batch, the sampling head per sampling row (its parameters are per call). The batch is sized to
     the live sequences (Engine's docstring).

A sequence leaves its slot when it finishes (stop token, stop string, max_tokens, full cache). Every
ONNX Runtime call happens on this thread: sessions and IO bindings are not safe for concurrent runs.
The per-token rules are generate.SequenceDecoding's, the same object `stream` uses.

Stopping (app.py's graceful stop): `drain()` refuses new requests (503) and lets the admitted and
waiting ones run; `abort(error)` ends whatever is left with `error` at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..api import Media, Model
from ..errors import UserError
from ..generate import (
    GenerationConfig,
    PreparedPrompt,
    SequenceDecoding,
    keep_prefix,
    prefill,
    prefill_spans,
    reuse_prefix,
)
from .protocol import ApiError

log = logging.getLogger("internvl_edge.server")


@dataclass
class Job:
    """A validated request: prompt token ids, its images' tiles and how to generate."""

    id: str
    input_ids: list[int]
    media: Media
    config: GenerationConfig
    received: float = field(default_factory=time.perf_counter)


class Handle:
    """The request's side: chunks (then the last, with finish_reason and stats) or an ApiError arrive on
    an asyncio queue; `cancel()` (on the event loop) frees the sequence's slot at the engine's next step
    and makes a pending `next()` return None."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.admitted: float | None = None  # perf_counter when it took a slot
        self.finished = False
        self.served_by: str | None = None  # the replica, when several serve (ray_app.py)

    def cancel(self) -> None:
        if not self.cancelled and not self.finished:
            self.queue.put_nowait(None)  # wakes whoever waits on next()
        self.cancelled = True

    @property
    def queue_s(self) -> float:
        return (self.admitted or time.perf_counter()) - self.job.received

    def push(self, item) -> None:
        """From the engine thread: hand a Chunk or ApiError to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    async def next(self):
        """The next chunk; None once cancelled; an ApiError from the engine is raised."""
        item = await self.queue.get()
        if item is None or self.cancelled:
            return None
        if isinstance(item, Exception):
            self.finished = True
            raise item
        if item.finish_reason:
            self.finished = True
        return item


class Sequence(SequenceDecoding):
    """One admitted request in slot `slot`: generate.SequenceDecoding's per-token rules and state, plus
    where its chunks go."""

    def __init__(self, handle: Handle, slot: int, model: Model, prompt: PreparedPrompt):
        super().__init__(model.tokenizer, handle.job.config, prompt)
        self.handle, self.slot = handle, slot


PREFILL_CHUNK = 256  # prompt rows per prefill call (dynamic bundles): ~1 s of the 2B's prefill on 2 cores


def batch_sizes(parallel: int) -> list[int]:
    """The decode batch sizes the engine uses: 1, 2, 4, ... up to `parallel`."""
    sizes = [1]
    while sizes[-1] * 2 < parallel:
        sizes.append(sizes[-1] * 2)
    return sizes + [parallel] if parallel > 1 else sizes


class Admission:
    """A request that holds a slot and is not decoding yet: `stage` is "preparing" (vision and
    embedding to do) or "prefilling"; `work` is the generator that does one unit per next()."""

    def __init__(self, handle: Handle, work):
        self.handle, self.work = handle, work
        self.stage = "preparing"


class Engine:
    """Owns the model while serving. `submit`, `drain` and `abort` are called from the event loop;
    everything else runs on the engine thread.

    The decode batch is the smallest of 1, 2, 4, ... `parallel` slots that holds the live sequences:
    ONNX Runtime computes every row of a batch, idle or not (on 2 cores a lone stream in an 8-slot batch
    decodes ~2.5x slower than in a 1-slot one). A cache of each size is made when first needed and
    kept; a join or leave that changes the size copies the live sequences' KV rows across (copy_slot),
    far cheaper than the prefill that comes with every join. So KV memory is up to 2 x parallel slots,
    plus the batch-1 cache that admissions prefill in.
    """

    def __init__(self, model: Model, parallel: int = 4, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK):
        if parallel < 1:
            raise UserError("--parallel must be at least 1")
        if max_queue < 0:
            raise UserError("--max-queue must be 0 or more")
        self.model, self.backend = model, model.backend
        self.parallel, self.max_queue = parallel, max_queue
        # a static bundle pads every prefill call to max_input_length rows: smaller chunks would cost as much each
        dynamic = self.backend.dynamic
        longest = self.backend.max_input_length
        self.prefill_chunk = max(1, min(prefill_chunk, longest)) if dynamic else longest
        self.waiting: deque[Handle] = deque()
        self.admitting: deque[Admission] = deque()  # in arrival order; the first one is worked on
        self.cond = threading.Condition()
        self.running = False
        self.draining = False
        self.aborting: ApiError | None = None
        self.steps = 0  # decode steps run (tests and /health)
        self.thread: threading.Thread | None = None
        self.sizes = batch_sizes(parallel)
        self.caches: dict[int, object] = {}
        self.prefill_cache = self.backend.new_cache(1)
        self.cache = self._cache(1)
        self.slots: list[Sequence | None] = [None]

    # -- the request side --------------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="internvl-edge-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def drain(self) -> None:
        """Refuse new requests from now on; the admitted and waiting ones go on."""
        with self.cond:
            self.draining = True

    def abort(self, error: ApiError) -> None:
        """End every request still held (waiting, admitting, decoding) with `error` at the next step."""
        with self.cond:
            self.aborting = error
            self.cond.notify_all()

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Handle:
        handle = Handle(job, loop)
        with self.cond:
            if not self.running or self.draining:
                raise ApiError(
                    503, "the server is shutting down; retry on another instance or later", code="unavailable"
                )
            # the queue limit counts requests that must wait for a slot: with a slot free, even
            # --max-queue 0 takes the request
            must_wait = self.admitted + len(self.waiting) >= self.parallel
            if must_wait and len(self.waiting) >= self.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy: {self.admitted} requests are generating and "
                    f"{len(self.waiting)} are waiting (the limit); retry later",
                    code="server_busy",
                )
            self.waiting.append(handle)
            self._fill()
            self.cond.notify_all()
        return handle

    @property
    def active(self) -> int:
        """Sequences decoding in a slot of the batch."""
        return sum(s is not None for s in self.slots)

    @property
    def admitted(self) -> int:
        """Requests holding a slot: decoding, or preparing/prefilling to join the batch."""
        return self.active + len(self.admitting)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.admitting and not self.active

    def counts(self) -> dict:
        """/health's view: every admitted request by stage, and the waiting ones."""
        with self.cond:  # the engine moves a request between admitting and its slot under this lock
            stages, decoding, waiting = [a.stage for a in self.admitting], self.active, len(self.waiting)
        return {
            "active": decoding + len(stages),
            "preparing": stages.count("preparing"),
            "prefilling": stages.count("prefilling"),
            "decoding": decoding,
            "waiting": waiting,
        }

    @property
    def waiting_count(self) -> int:
        return len(self.waiting)

    def health(self) -> dict:
        """What /health reports: whether the engine runs (or drains), its slots and its requests by stage."""
        alive = self.running and self.thread is not None and self.thread.is_alive()
        status = ("draining" if self.draining else "ok") if alive else "unavailable"
        return {
            "status": status,
            "parallel": self.parallel,
            "batch": self.cache.batch,
            **self.counts(),
            "decode_steps": self.steps,
        }

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while self.running and self.aborting is None and self.idle:
                    self.cond.wait()
                if not self.running:
                    break
                error, self.aborting = self.aborting, None
            if error is not None:
                self._fail_all(error)
                continue
            try:
                self._drop_cancelled()
                self._admit()
                self._decode()
            except Exception as e:  # a bug in this loop: fail what it holds rather than hang them
                log.exception("engine step failed")
                self._fail_all(ApiError(500, f"internal error ({type(e).__name__}: {e})", code="internal_error"))
        self._fail_all(ApiError(503, "the server is shutting down", code="unavailable"))

    def _drop_cancelled(self) -> None:
        with self.cond:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
            dropped = [a for a in self.admitting if a.handle.cancelled]
        for a in dropped:
            a.work.close()  # a started one leaves `admitting` itself
            with self.cond:
                if a in self.admitting:
                    self.admitting.remove(a)
        for seq in self.slots:
            if seq is not None and seq.handle.cancelled:
                self._free(seq)
        self._fill()

    def _fill(self) -> None:
        """Give every free slot a waiting request (bookkeeping only: the admission's work runs on the
        engine thread). Called by submit, and wherever a slot frees, so nobody waits for a step to end."""
        now = time.perf_counter()
        with self.cond:
            while self.waiting and self.admitted < self.parallel:
                handle = self.waiting.popleft()
                handle.admitted = now
                admission = Admission(handle, None)
                admission.work = self._admission(admission)  # a generator: nothing runs until next()
                self.admitting.append(admission)

    def _admit(self) -> None:
        """One unit of the oldest admission's work."""
        self._fill()
        with self.cond:
            first = self.admitting[0] if self.admitting else None
        if first is None:
            return
        try:
            next(first.work)
        except StopIteration:  # it joined the batch or failed, and left `admitting` on its way out
            pass

    def _admission(self, admission: Admission):
        """The units of one request's admission: prepare (vision + embedding), the prefill's chunks, the
        join. Yields between units."""
        handle = admission.handle
        job = handle.job
        try:
            yield from self._admission_units(admission, handle, job)
        finally:
            with self.cond:
                if admission in self.admitting:
                    self.admitting.remove(admission)

    def _admission_units(self, admission: Admission, handle: Handle, job: Job):
        try:
            prepared = self.model.prepare(job.input_ids, job.media, started=job.received)  # vision + embedding
            admission.stage = "prefilling"
            if prepared.vision_s:
                yield  # the others decode a step between the vision net and the prefill
            self.prefill_cache.reset()
            embeds = prepared.embeds
            # a prompt prefix prefilled before comes from the model's prefix cache (a repeat: all of it)
            prefixes = self.model.prefix_cache
            logits = reuse_prefix(self.backend, self.prefill_cache, prepared, 0, prefixes, self.prefill_chunk)
            if logits is None:
                for i, (a, b) in enumerate(prefill_spans(len(embeds), prepared.cached_tokens, self.prefill_chunk)):
                    if i:
                        yield
                    logits = prefill(self.backend, self.prefill_cache, embeds[a:b])
                keep_prefix(self.backend, self.prefill_cache, prepared, 0, prefixes, logits)
            self._fit(self.active + 1)
            slot = self.slots.index(None)
            self.backend.copy_slot(self.prefill_cache, 0, self.cache, slot)
            seq = Sequence(handle, slot, self.model, prepared)  # prepared.started is job.received
            with self.cond:  # from admitting to its slot in one move, as /health sees it
                self.slots[slot] = seq
                self.admitting.remove(admission)
            self._deliver(seq, seq.pick(self.backend, logits), logits)
        except UserError as e:
            self._abandon(handle, ApiError(400, str(e)))
        except Exception as e:  # a bug or a runtime failure: this request fails, the others go on
            log.exception("%s: prefill failed", job.id)
            self._abandon(handle, ApiError(500, f"internal error ({type(e).__name__}: {e})", code="internal_error"))

    def _abandon(self, handle: Handle, error: ApiError) -> None:
        for seq in self.slots:
            if seq is not None and seq.handle is handle:
                self._free(seq)
        handle.push(error)

    def _cache(self, size: int):
        if size not in self.caches:
            self.caches[size] = self.backend.new_cache(size)
        return self.caches[size]

    def _fit(self, needed: int) -> None:
        """Move the live sequences into the smallest batch that holds `needed` of them."""
        size = next(s for s in self.sizes if s >= needed)
        if size == self.cache.batch:
            return
        new = self._cache(size)
        new.reset()
        live = [s for s in self.slots if s is not None]
        for j, seq in enumerate(live):
            self.backend.copy_slot(self.cache, seq.slot, new, j)
            seq.slot = j
        self.cache.reset()
        self.cache, self.slots = new, live + [None] * (size - len(live))

    def _decode(self) -> None:
        self._fit(max(1, self.active))
        live = [s for s in self.slots if s is not None and not s.done]
        if not live:
            return
        batch = self.cache.batch
        ids, lens = np.zeros((batch, 1), np.int64), np.zeros(batch, np.int64)
        for seq in live:
            ids[seq.slot, 0], lens[seq.slot] = seq.token, 1
        try:
            logits = self.backend.forward(self.cache, self.backend.embed(ids), lens)
            greedy = self.backend.greedy(logits) if any(not s.samples for s in live) else None
            self.steps += 1
            for seq in live:
                row = logits[seq.slot]
                token = seq.pick(self.backend, row) if seq.samples else int(greedy[seq.slot])
                self._deliver(seq, token, row)
        except Exception as e:  # the batch is lost; its requests fail, later ones are served
            log.exception("decode step failed")
            for seq in live:
                if self.slots[seq.slot] is seq:
                    self._free(seq)
                seq.handle.push(ApiError(500, f"internal error ({type(e).__name__}: {e})", code="internal_error"))

    def _deliver(self, seq: Sequence, token: int, logits_row: np.ndarray) -> None:
        chunks = seq.accept(int(token), logits_row, int(self.cache.lengths[seq.slot]), self.cache.capacity)
        for chunk in chunks:
            seq.handle.push(chunk)
        if seq.done:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        seq.done = True
        with self.cond:
            self.slots[seq.slot] = None
        self.cache.reset(seq.slot)
        self._fill()

    def _fail_all(self, error: ApiError) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
            admitting, self.admitting = list(self.admitting), deque()
        for a in admitting:
            a.work.close()
        for handle in waiting + [a.handle for a in admitting] + [s.handle for s in self.slots if s is not None]:
            handle.push(error)
        self.slots = [None] * self.cache.batch
        self.cache.reset()
