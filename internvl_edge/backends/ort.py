"""The stage contract (base.py) on ONNX Runtime's CPU execution provider.

One session per net, thread settings, and the KV cache bound in place through IO binding. The decoder
graph is the same for dynamic and static bundles, so prefill and decode share one copy of the
prepacked weights; its 4-bit linears and attention move to our kernels (kernels/) when they run on
this CPU. Without a sampling head (converted without --do_sample) the host samples from the logits,
which are in host memory here anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import kernels, ort_cache
from ..bundle import Manifest
from ..embedding_table import plain_table
from ..errors import UserError
from ..nets.decoder import kv_names
from ..sampling import SamplingParams, candidates
from .base import KVCache, available_cores, checked_query_lens, parse_devid


def aligned_zeros(shape, dtype=np.float32, align: int = 4096) -> np.ndarray:
    """Zeros that start on an `align`-byte boundary (lazily zeroed pages, as np.zeros). numpy's large
    arrays start 16 bytes into the block malloc maps for them, so every 64-byte vector of a KV cache
    row straddled two cache lines: decode attention at context 1500 ran 1.15-1.4x slower on such a
    cache, decode up to 4% (benchmarks/attention.py --offsets 0,16, benchmarks/kv_layout.py;
    docs/performance-notes.md, "Attention")."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)  # the view keeps `raw` alive


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def hand_back_large_blocks(threshold: int = 1 << 20) -> bool:
    """On glibc, blocks of `threshold` bytes and more always come from mmap and go back to the system
    when freed. glibc's own threshold rises to the size of each large block freed (up to 32 MiB), after
    which prefill's and the vision encoder's activations come from the heap and stay there, fragmented:
    `internvl-edge bench` on InternVL3-2B shapes grew to 1.19x the weights by its end, 1.10x with this
    (docs/performance-notes.md, "Memory and load"). Nothing where the process set MALLOC_MMAP_THRESHOLD_
    itself or the C library is not glibc. True when set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def _plain_table(path: str):
    """embedding_table.plain_table, or None when the net cannot be read (its session reports why)."""
    try:
        return plain_table(path)
    except Exception:  # onnx raises its own types for a damaged file; the session load names the problem
        return None


class OrtBackend:
    """ONNX Runtime sessions for a bundle's nets, CPU execution provider."""

    name = "onnxruntime-cpu"

    def __init__(self, manifest: Manifest, threads: int | None = None, devid=None, log=None, edits=None):
        import onnxruntime as ort

        self.ort = ort
        # {net name: function(onnx.ModelProto)} changing a net's graph in memory before its session is
        # made (`verify` undoes one lossy option at a time this way); the bundle's files stay as they are
        self.edits = dict(edits or {})
        self.manifest = manifest
        self.devices = parse_devid(devid)
        if self.devices != [0] and log is not None:
            log(f"note: -d {devid} selects nothing on the CPU; the bundle runs on this machine's cores")
        opts, facts = manifest.settings, manifest.facts
        self.dynamic = opts.dynamic
        self.max_input_length = opts.max_input_length
        self.seq_length = opts.seq_length
        self.kv_capacity = opts.kv_capacity
        self.hidden, self.vocab = facts.hidden_size, facts.vocab_size
        self.layers, self.kv_heads, self.head_dim = facts.num_layers, facts.num_kv_heads, facts.head_dim
        self.threads = threads or available_cores()
        kernels.settings()  # the environment's kernel settings, checked before any net loads (a bad one: UserError)
        hand_back_large_blocks()
        self.load_seconds: dict[str, float] = {}
        self.sessions = {}
        self.q4_kernel: str | None = "onnxruntime"  # who computes the decoder's 4-bit linears (describe, bench)
        self.attention_kernel: str | None = "onnxruntime"  # and its attention
        # the KV cache's element type: float16 where our attention takes the decoder's and the bundle's
        # weights are not float32 (kernels/settings.py, INTERNVL_EDGE_KV_CACHE), as the session declares
        self.kv_dtype = np.dtype(np.float32)
        self.vision_kernel = "onnxruntime"  # who computes the vision encoder's float linears
        # what the decoder's kernels read in place of scale and zero-point initializers (bench's roofline)
        self.table_inputs: list[str] = []  # those initializers
        self.table_bytes = 0  # our 4-bit kernel's tables of them
        # the converter's plain table lookup is read by numpy, without a session (embedding_table.py)
        self.embedding_lookup = _plain_table(manifest.net_path("embedding"))
        # largest weights first, so the longest session starts first
        by_size = sorted(
            manifest.nets, key=lambda n: -manifest.files.get(manifest.nets[n].get("data") or "", {}).get("bytes", 0)
        )
        numpy_nets = {"greedy_head"} | ({"embedding"} if self.embedding_lookup is not None else set())
        names = [n for n in by_size if n not in numpy_nets]
        # the sessions are made side by side, on as many threads as the user gave decode: ONNX Runtime
        # and our kernels' weight packing release the GIL, so on two cores the InternVL3-2B bundle's
        # second load takes the decoder's time instead of the decoder's and the vision encoder's
        # (the two sessions: 0.84-1.47 s against 1.42-2.12 s; docs/performance-notes.md, "Memory and load")
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), self.threads))) as pool:
            made = {name: pool.submit(self._timed_session, name) for name in names}
            try:
                for name in names:  # the first failure in load order is the one reported
                    self.sessions[name], self.load_seconds[name] = made[name].result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # nets not started yet are not loaded for nothing
                raise
        if "decoder" in self.sessions:
            declared = {i.name: i.type for i in self.sessions["decoder"].get_inputs()}
            if declared.get(kv_names(0)[0]) == "tensor(float16)":
                self.kv_dtype = np.dtype(np.float16)

    def _options(self, optimize: bool = True, profile_prefix: str | None = None):
        so = self.ort.SessionOptions()
        if profile_prefix:  # bench --profile: ORT's per-node timings, written at end_profiling()
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        level = self.ort.GraphOptimizationLevel
        so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
        so.log_severity_level = 3
        # no memory arena: ORT's arena keeps the largest call's activations (a 1024-token prefill, the
        # vision net), grown in powers of two, for the life of the process; plain malloc hands big
        # blocks back. `internvl-edge bench` on InternVL3-2B shapes (int8 vision): peak RSS 2.51 -> 1.91
        # GB together with 128-blocks, the same vision, prefill and decode speed (BENCHMARKS.md,
        # "Memory and load")
        so.enable_cpu_mem_arena = False
        # the pool's threads spin between the parallel parts of a run (ORT's default, which decode
        # needs), but stop when the run returns: left spinning, they took a core from the next net's
        # threads (vision -> prefill, another session), which then ran up to 1.8x slower
        # (benchmarks/spinning.py; docs/performance-notes.md)
        so.add_session_config_entry("session.force_spinning_stop", "1")
        return so

    def _kernel_graph(self, name: str, path: str) -> bytes | None:
        """The decoder's graph with its 4-bit linears and attention moved to our kernels (kernels/), or
        the vision encoder's with its bfloat16 linears moved to ours, serialised, when they are
        installed and run on this CPU; else None (the graph as it is)."""
        edit = self.edits.get(name)
        ours = name == "decoder" and kernels.library_path() is not None
        bf16 = name == "vision" and kernels.bf16_path() is not None
        if edit is None and not (ours or bf16):
            return None
        import onnx

        model = onnx.load(path, load_external_data=False)  # the graph only: a few hundred KB
        if edit is not None:
            edit(model)
        if bf16:
            # the bfloat16 weights as stored, bfloat16 products summed in float32, instead of a float32
            # copy of the encoder made at load (kernels/bf16gemm.h; BENCHMARKS.md, "bfloat16 vision")
            path = kernels.bf16_path()
            moved = kernels.rewrite_vision(model, self.threads, attention=path == "amx")
            if moved[kernels.BF16_OP]:
                with_attention = " with its attention" if moved[kernels.VISION_ATTENTION_OP] else ""
                self.vision_kernel = f"internvl-edge bf16 ({path}){with_attention}"
                return model.SerializeToString()
            return model.SerializeToString() if edit is not None else None
        if not ours:
            return model.SerializeToString()
        half_cache = kernels.settings().half_cache(self.manifest.settings.quantize)
        moved = kernels.rewrite(model, self.threads, half_cache=half_cache)
        if not any(moved.values()):
            return model.SerializeToString() if edit is not None else None
        if moved[kernels.OP]:
            eight_bit = any(
                n.domain == kernels.DOMAIN and any(a.name == "bits" and a.i == 8 for a in n.attribute)
                for n in model.graph.node
            )  # the lm_head at --lm-head-bits 8: on AMX tiles where the CPU has them (q4gemm.h, q4_path8)
            where8 = f", 8-bit weights on {kernels.path8()}" if eight_bit else ""
            self.q4_kernel = f"internvl-edge q4gemm ({kernels.isa()}, {kernels.prefetch_hint()} prefetch{where8})"
        if moved[kernels.ATTENTION_OP]:
            self.attention_kernel = "internvl-edge"
        if moved["layer"]:
            self.q4_kernel += ", one node per layer"
        self.table_inputs = kernels.table_inputs(model)
        return model.SerializeToString()

    def _timed_session(self, name: str):
        t0 = time.perf_counter()
        return self._session(name), time.perf_counter() - t0

    def _session(self, name: str, profile_prefix: str | None = None):
        """A session for one net: from the per-machine cache of optimised, pre-packed graphs when it
        holds this net (memory-mapped, nothing to prepare), else built and added to it. The decoder
        runs its 4-bit linears on our kernel when it can (no pre-packing there, so no cache). With
        `profile_prefix` (bench --profile): the same graph and kernels, profiled, never cached."""
        path = self.manifest.net_path(name)
        net = self.manifest.nets[name]
        files = [net["file"]] + ([net["data"]] if net.get("data") else [])
        try:
            graph = self._kernel_graph(name, path)
            if graph is not None:
                so = self._options(profile_prefix=profile_prefix)
                if kernels.library_path() is not None:
                    so.register_custom_ops_library(kernels.library_path())
                # the graph comes as bytes: its external weights are found next to the bundle's file
                so.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", os.path.dirname(path)
                )
                # the scale tables the decoder net's kernels make while it loads: process-wide
                # counters that only its 4-bit linears add to, so a net loading beside it leaves them
                before = sum(kernels.table_stats())
                sess = self.ort.InferenceSession(graph, sess_options=so, providers=["CPUExecutionProvider"])
                if name == "decoder":
                    self.table_bytes = sum(kernels.table_stats()) - before
                return sess
            if ort_cache.enabled() and net.get("data") and not profile_prefix:
                key = ort_cache.cache_key(self.ort.__version__, [self.manifest.files[f]["sha256"] for f in files])
                cached = ort_cache.cached_graph(key)
                if cached:
                    return self.ort.InferenceSession(
                        cached, sess_options=self._options(optimize=False), providers=["CPUExecutionProvider"]
                    )
                try:
                    return ort_cache.build(self.ort, path, key, self._options)
                except OSError:  # an unwritable cache folder only costs preparing the net at every load
                    pass
            return self.ort.InferenceSession(
                path, sess_options=self._options(profile_prefix=profile_prefix), providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own exception types; all mean the net cannot load
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load {path}: {first}") from None

    # -- vision and embedding ----------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        sess = self.sessions["vision"]
        px = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.dynamic:
            return sess.run(None, {"pixel_values": px})[0]
        return np.concatenate([sess.run(None, {"pixel_values": px[i : i + 1]})[0] for i in range(len(px))])

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if self.embedding_lookup is not None:
            return self.embedding_lookup(ids)
        return self.sessions["embedding"].run(None, {"input_ids": ids})[0]

    # -- decoder -----------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1) -> KVCache:
        ort = self.ort
        shape = [batch, self.kv_heads, self.kv_capacity, self.head_dim]
        sess = self.sessions["decoder"]
        binding = sess.io_binding()
        arrays, values = [], []
        for layer in range(self.layers):
            past_k, past_v, present_k, present_v = kv_names(layer)
            # numpy owns the memory and the OrtValues wrap it (no copy), so slots can be copied with numpy
            k, v = aligned_zeros(shape, self.kv_dtype), aligned_zeros(shape, self.kv_dtype)
            k_val, v_val = ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)
            binding.bind_ortvalue_input(past_k, k_val)
            binding.bind_ortvalue_input(past_v, v_val)
            binding.bind_ortvalue_output(present_k, k_val)  # the same buffer: the cache is updated in place
            binding.bind_ortvalue_output(present_v, v_val)
            arrays += [k, v]
            values += [k_val, v_val]
        cache = KVCache(batch=batch, capacity=self.seq_length, lengths=np.zeros(batch, np.int64), buffers=arrays)
        cache.binding = {
            "io": binding,
            "ortvalues": values,
            "logits": aligned_zeros((batch, self.vocab)),
            "step": self._step_inputs(batch),
            "step_bound": False,
        }
        binding.bind_output("logits", "cpu", 0, np.float32, [batch, self.vocab], cache.binding["logits"].ctypes.data)
        return cache

    def _step_inputs(self, batch: int) -> dict:
        """The decoder's inputs for a one-row step, as arrays and the OrtValues that wrap them (no
        copy): bound once, then rewritten in place at every step. Binding them anew (bind_cpu_input
        makes an OrtValue per input) was a third of the 0.1 ms per token that forward spent outside
        the decoder net (docs/performance-notes.md, "Python around the decoder")."""
        arrays = {
            "inputs_embeds": np.zeros((batch, 1, self.hidden), np.float32),
            "seqlens_k": np.zeros(batch, np.int32),
            "query_seqlens": np.zeros(batch, np.int32),
            "total_sequence_length": np.zeros((), np.int32),
        }
        return {name: (a, self.ort.OrtValue.ortvalue_from_numpy(a)) for name, a in arrays.items()}

    def copy_slot(self, src: KVCache, src_slot: int, dst: KVCache, dst_slot: int) -> None:
        """Copy one sequence's cached rows (and length) between caches, e.g. from a batch-1 prefill
        into a slot of a batched decode cache."""
        n = int(src.lengths[src_slot])
        for a, b in zip(src.buffers, dst.buffers, strict=True):
            b[dst_slot, :, :n] = a[src_slot, :, :n]
        dst.lengths[dst_slot] = n

    @property
    def can_copy_rows(self) -> bool:
        """Always: the KV cache is numpy arrays in host memory."""
        return True

    @property
    def runs_on(self) -> str:
        return self.name

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's KV rows, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype.itemsize

    def read_rows(self, cache: KVCache, slot: int, n: int) -> list[np.ndarray]:
        """A copy of the first n cached rows of one sequence: per layer K and V, [kv_heads, n, head_dim]."""
        return [b[slot, :, :n].copy() for b in cache.buffers]

    def write_rows(self, cache: KVCache, slot: int, rows: list[np.ndarray], n: int) -> None:
        """The first n of `rows` (read_rows') into a slot, which then holds exactly them."""
        for b, r in zip(cache.buffers, rows, strict=True):
            b[slot, :, :n] = r[:, :n]
        cache.lengths[slot] = n

    def forward(self, cache: KVCache, embeds: np.ndarray, query_lens) -> np.ndarray:
        query_lens = checked_query_lens(self, cache, embeds, query_lens)
        batch, rows, width = embeds.shape
        total = cache.lengths + query_lens
        if not self.dynamic and rows > 1 and rows != self.max_input_length:  # static prefill shape
            padded = np.zeros((batch, self.max_input_length, width), np.float32)
            padded[:, :rows] = embeds
            embeds, rows = padded, self.max_input_length
        seqlens_k = np.maximum(total, 1) - 1
        total_length = max(int(total.max(initial=1)), rows)
        io, step = cache.binding["io"], cache.binding["step"]
        if rows == 1:  # a decode step: the bound arrays rewritten in place
            step["inputs_embeds"][0][...] = embeds
            step["seqlens_k"][0][...] = seqlens_k
            step["query_seqlens"][0][...] = query_lens
            step["total_sequence_length"][0][...] = total_length
            if not cache.binding["step_bound"]:
                for name, (_, value) in step.items():
                    io.bind_ortvalue_input(name, value)
                cache.binding["step_bound"] = True
        else:
            io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
            io.bind_cpu_input("seqlens_k", seqlens_k.astype(np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(total_length, np.int32))
            io.bind_cpu_input("query_seqlens", query_lens.astype(np.int32))
            cache.binding["step_bound"] = False
        self.sessions["decoder"].run_with_iobinding(io)
        cache.lengths[:] = total
        return cache.binding["logits"]

    # -- heads -------------------------------------------------------------------------------------
    def greedy(self, logits: np.ndarray) -> np.ndarray:
        """The greedy head's ArgMax, computed by numpy on this backend: the same first-maximum rule
        as the bundle's net (ONNX ArgMax, select_last_index=0), without a session run's fixed cost,
        which the decode loop pays every token."""
        return np.argmax(logits, axis=-1).astype(np.int64)

    @property
    def can_sample(self) -> bool:
        """Always: without the bundle's sampling head (converted without --do_sample) the host samples
        from the logits, which are in host memory on this backend anyway."""
        return True

    @property
    def has_sample_head(self) -> bool:
        return "sample_head" in self.sessions

    def sample(self, logits: np.ndarray, penalty_ids: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
        """The sampling head's (probs, ids) per row, or without the head sampling.candidates, the function
        the head is tested against: the same candidates, so the same tokens for a seed either way."""
        if not self.has_sample_head:
            rows = [
                candidates(row, np.asarray(seen).reshape(-1), p) for row, seen in zip(logits, penalty_ids, strict=True)
            ]
            return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
        penalty = p.repetition_penalty
        if penalty_ids.size == 0:  # nothing seen yet: a no-op penalty on token 0
            penalty_ids, penalty = np.zeros((logits.shape[0], 1), np.int64), 1.0
        top_k = p.top_k if 0 < p.top_k <= logits.shape[-1] else logits.shape[-1]
        feeds = {
            "logits": np.ascontiguousarray(logits, np.float32),
            "penalty_ids": np.ascontiguousarray(penalty_ids, np.int64),
            "repetition_penalty": np.array([penalty], np.float32),
            "temperature": np.array([p.temperature], np.float32),
            "top_k": np.array([top_k], np.int64),
            "top_p": np.array([p.top_p], np.float32),
        }
        probs, ids = self.sessions["sample_head"].run(None, feeds)
        return probs, ids

    def describe(self) -> dict:
        import onnxruntime

        return {
            "backend": self.name,
            "onnxruntime": onnxruntime.__version__,
            "threads": self.threads,
            "devices": self.devices,
            "python": sys.version.split()[0],
            "q4_kernel": self.q4_kernel,
            "attention_kernel": self.attention_kernel,
            "kv_cache": str(self.kv_dtype),
            "vision_kernel": self.vision_kernel,
            "sampling": "head" if self.has_sample_head else "host",
            "embedding": "numpy table lookup" if self.embedding_lookup is not None else "onnxruntime",
        }
