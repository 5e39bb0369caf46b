"""The stage contract (base.py) over a combined Sophgo bmodel: what `chat`, `run` and the API call.

It drives the nets as the seed's runtime does (LLM-TPU models/InternVL3 chat.cpp), with the KV history
in device memory, one buffer pair per layer and per cache slot:

    prefill from position 0   block_i(rows, positions 0.., causal mask) per layer; the new K/V rows are
                              copied into the history; the last real row goes to lm_head
    one more token            block_cache_i(row, position, mask over the history, history) per layer;
                              its K/V row is copied into the history at its position
    more rows after history   block_kv_i when compiled (--use_block_with_kv), else one row at a time

Static shapes: a prefill is padded to `max_input_length` rows (padding rows are masked out and their
K/V never copied); with --dynamic the prefill blocks take the prompt's rows as they are. Masks use the
seed's "minus infinity": -10000 in f16, -9984 in bf16.
"""

from __future__ import annotations

import os
import re
import weakref

import numpy as np

from ..bundle import Manifest
from ..errors import UserError
from ..sampling import GREEDY_TEMPERATURE, NO_SAMPLING, SamplingParams
from ..sophgo.bmrt import Runtime, find_libraries, from_device_dtype, quiet_c_stdout, to_device_dtype
from ..sophgo.mlir import MAX_TOP_K
from .base import KVCache, checked_query_lens, parse_devid

MASKED = -10000.0  # rounds to 0xF0E2 in f16 and 0xC61C (-9984) in bf16, the seed's mask values


class BmrtBackend:
    name = "bmrt"

    def __init__(self, manifest: Manifest, threads: int | None = None, devid=None, log=None):
        self.manifest = manifest
        self.devices = parse_devid(devid)
        if len(self.devices) != 1:
            raise UserError(
                f"-d {devid}: this bundle runs on one chip (it was compiled with num_device 1); use one device number"
            )
        chip = manifest.platform.chip
        libs = find_libraries(chip)
        self.library = libs.description
        self.bmodel = os.path.join(manifest.path, manifest.platform.bmodel)
        # bm_memcpy_d2d(_byte) crashes inside the BM1688 simulator (sg_api_memcpy_byte): copy through the host there
        self.rt = Runtime(libs.folder, self.bmodel, self.devices[0], host_copies=libs.simulator and chip == "bm1688")
        self._finalizer = weakref.finalize(self, self.rt.close)
        nets = self.rt.nets
        missing = [n for n in manifest.nets if n not in nets]
        if missing:
            raise UserError(f"{self.bmodel} lacks the nets {', '.join(missing)}; convert again")
        facts = manifest.facts
        self.layers, self.hidden, self.vocab = facts.num_layers, facts.hidden_size, facts.vocab_size
        self.kv_heads, self.head_dim = facts.num_kv_heads, facts.head_dim
        self.blocks = [nets[f"block_{i}"] for i in range(self.layers)]
        self.caches = [nets[f"block_cache_{i}"] for i in range(self.layers)]
        self.kv_blocks = [nets[f"block_kv_{i}"] for i in range(self.layers)] if "block_kv_0" in nets else None
        self.max_input_length = self.blocks[0].inputs[0].shape[1]
        self.seq_length = self.caches[0].inputs[3].shape[1]
        self.half = self.blocks[0].inputs[0].dtype  # f16 | bf16: activations between nets
        self.position_bytes = self.kv_heads * self.head_dim * 2  # one position of K (or V) in the history
        self.hidden_bytes = self.hidden * 2
        self.dynamic = manifest.settings.dynamic
        self.threads = threads
        # bench reports the kernels the backend chose; TPU-MLIR chose them when it compiled the bmodel
        self.q4_kernel: str | None = None
        self.attention_kernel: str | None = None
        self._io = {name: self._alloc_io(net) for name, net in nets.items()}

    def _alloc_io(self, net) -> tuple[list, list]:
        """Device buffers for a net's inputs and outputs. History inputs come from the cache, and a
        block after the first layer gets all of its inputs bound (the previous layer's output, layer
        0's positions and mask: see _layers), so neither has buffers of its own (for 2B at -s 2048
        that would be ~1 GB of device memory never written)."""
        later_layer = re.fullmatch(r"block(_kv|_cache)?_(\d+)", net.name) and not net.name.endswith("_0")
        ins = [None if later_layer or t.name.startswith("history_") else self.rt.alloc(t.nbytes) for t in net.inputs]
        return ins, [self.rt.alloc(t.nbytes) for t in net.outputs]

    def _run(self, name: str, inputs: dict | None = None, mems: dict | None = None, shapes=None) -> list:
        """Upload host inputs by position, bind device inputs by position, launch (dynamic nets with the
        given input shapes); the output buffers."""
        net = self.rt.nets[name]
        ins, outs = self._io[name]
        ins = list(ins)
        for i, data in (inputs or {}).items():
            self.rt.upload(ins[i], to_device_dtype(data, net.inputs[i].dtype))
        for i, mem in (mems or {}).items():
            ins[i] = mem
        self.rt.launch(net, ins, outs, shapes)
        return outs

    def _read(self, name: str, index: int = 0) -> np.ndarray:
        net = self.rt.nets[name]
        t = net.outputs[index]
        return from_device_dtype(self.rt.download(self._io[name][1][index], t.nbytes), t.dtype).reshape(t.shape)

    def run_net(self, name: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """One net on host arrays (see Runtime.run): for tests and measurements."""
        return self.rt.run(name, *inputs)

    # -- vision and embedding ----------------------------------------------------------------------
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        out = []
        for tile in np.asarray(pixel_values, np.float32):
            self._run("vit", {0: tile[None]})
            out.append(self._read("vit"))
        return np.stack(out)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64)
        batch, length = ids.shape
        out = np.empty((batch, length, self.hidden), np.float32)
        step = self.max_input_length
        for b in range(batch):
            if length == 1:
                self._run("embedding_cache", {0: ids[b : b + 1].astype(np.int32)})
                out[b] = self._read("embedding_cache")[0]
                continue
            for start in range(0, length, step):
                chunk = ids[b, start : start + step]
                padded = np.zeros((1, step), np.int32)
                padded[0, : len(chunk)] = chunk
                self._run("embedding", {0: padded})
                out[b, start : start + len(chunk)] = self._read("embedding")[0, : len(chunk)]
        return out

    # -- decoder -----------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1) -> KVCache:
        """History buffers [seq_length, kv_heads, head_dim] per layer, K and V, per slot, zeroed (masked
        positions are multiplied by zero attention weights: they must hold finite numbers)."""
        nbytes = self.seq_length * self.position_bytes
        zeros = np.zeros(nbytes, np.uint8)
        slots = []
        for _ in range(batch):
            pairs = []
            for _ in range(self.layers):
                k, v = self.rt.alloc(nbytes), self.rt.alloc(nbytes)
                self.rt.upload(k, zeros)
                self.rt.upload(v, zeros)
                pairs.append((k, v))
            slots.append(pairs)
        cache = KVCache(batch=batch, capacity=self.seq_length, lengths=np.zeros(batch, np.int64), buffers=slots)
        weakref.finalize(cache, _free_all, weakref.ref(self.rt), [m for pairs in slots for kv in pairs for m in kv])
        return cache

    def copy_slot(self, src: KVCache, src_slot: int, dst: KVCache, dst_slot: int) -> None:
        """Copy one sequence's cached rows (and length) between caches, on the device."""
        n = int(src.lengths[src_slot])
        for (sk, sv), (dk, dv) in zip(src.buffers[src_slot], dst.buffers[dst_slot], strict=True):
            if n:
                self.rt.copy(dk, 0, sk, 0, n * self.position_bytes)
                self.rt.copy(dv, 0, sv, 0, n * self.position_bytes)
        dst.lengths[dst_slot] = n

    @property
    def can_copy_rows(self) -> bool:
        """Never: the KV history stays in device memory (no prefix reuse through the host)."""
        return False

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's KV history, all layers (K and V)."""
        return 2 * self.layers * self.position_bytes

    def read_rows(self, cache: KVCache, slot: int, n: int) -> list[np.ndarray]:
        raise NotImplementedError("a bmodel's KV history stays on the chip (can_copy_rows is False)")

    def write_rows(self, cache: KVCache, slot: int, rows: list[np.ndarray], n: int) -> None:
        raise NotImplementedError("a bmodel's KV history stays on the chip (can_copy_rows is False)")

    def forward(self, cache: KVCache, embeds: np.ndarray, query_lens) -> np.ndarray:
        query_lens = checked_query_lens(self, cache, embeds, query_lens)
        batch = cache.batch
        logits = np.zeros((batch, self.vocab), np.float32)
        with quiet_c_stdout():  # once for the call, not once per launch and copy
            for b in range(batch):
                n, start = int(query_lens[b]), int(cache.lengths[b])
                if n == 0:
                    continue
                x = embeds[b, :n]
                if start == 0:
                    last = self._prefill(cache.buffers[b], x)
                elif n == 1:
                    last = self._decode(cache.buffers[b], x, start)
                elif self.kv_blocks is not None:
                    last = self._prefill_after(cache.buffers[b], x, start)
                else:  # without block_kv_i, rows after a history go through the one-token nets
                    for j in range(n):
                        last = self._decode(cache.buffers[b], x[j : j + 1], start + j)
                logits[b] = self._lm_head(*last)
                cache.lengths[b] = start + n
        return logits

    def _prefill(self, pairs, x: np.ndarray):
        n, L = len(x), self.max_input_length
        if self.blocks[0].dynamic:  # rows = the prompt's; the causal mask is inside the net
            positions = np.arange(n, dtype=np.int32)[None]
            return self._layers(self.blocks, pairs, x[None], positions, None, n, 0, [(1, n, self.hidden), (1, n)])
        states = np.zeros((1, L, self.hidden), np.float32)
        states[0, :n] = x
        positions = np.zeros((1, L), np.int32)
        positions[0, :n] = np.arange(n)
        mask = np.full((1, 1, L, L), MASKED, np.float32)
        mask[0, 0, :n, :n] = np.where(np.tri(n, dtype=bool), 0.0, MASKED)  # causal over the real rows
        return self._layers(self.blocks, pairs, states, positions, mask, n, 0)

    def _prefill_after(self, pairs, x: np.ndarray, start: int):
        n, L, S = len(x), self.max_input_length, self.seq_length
        states = np.zeros((1, L, self.hidden), np.float32)
        states[0, :n] = x
        positions = np.zeros((1, L), np.int32)
        positions[0, :n] = np.arange(start, start + n)
        mask = np.full((1, 1, L, S + L), MASKED, np.float32)
        mask[0, 0, :n, :start] = 0.0  # the whole history, then causal over the new rows
        mask[0, 0, :n, S : S + n] = np.where(np.tri(n, dtype=bool), 0.0, MASKED)
        return self._layers(self.kv_blocks, pairs, states, positions, mask, n, start)

    def _decode(self, pairs, x: np.ndarray, start: int):
        S = self.seq_length
        mask = np.full((1, 1, 1, S + 1), MASKED, np.float32)
        mask[..., :start] = 0.0
        mask[..., S] = 0.0  # the new token itself, concatenated after the history
        return self._layers(self.caches, pairs, x.reshape(1, 1, -1), np.array([[start]], np.int32), mask, 1, start)

    def _layers(self, nets, pairs, states, positions, mask, n: int, start: int, shapes=None):
        """Run one kind of block over all layers; the hidden rows stay on the device between layers."""
        h = None
        shared = [1] if mask is None else [1, 2]  # positions and mask: uploaded for layer 0, shared after
        for i, net in enumerate(nets):
            if i == 0:
                host = {0: states, 1: positions} if mask is None else {0: states, 1: positions, 2: mask}
                bind = {}
            else:
                host = {}
                first = self._io[nets[0].name][0]
                bind = {0: h, **{j: first[j] for j in shared}}
            if net.inputs[-1].name == "history_v":
                bind.update({3: pairs[i][0], 4: pairs[i][1]})
            outs = self._run(net.name, host, bind, shapes)
            k, v = outs[1], outs[2]
            self.rt.copy(pairs[i][0], start * self.position_bytes, k, 0, n * self.position_bytes)
            self.rt.copy(pairs[i][1], start * self.position_bytes, v, 0, n * self.position_bytes)
            h = outs[0]
        return h, n - 1

    def _lm_head(self, h, row: int) -> np.ndarray:
        ins, _ = self._io["lm_head"]
        self.rt.copy(ins[0], 0, h, row * self.hidden_bytes, self.hidden_bytes)
        self._run("lm_head")
        return self._read("lm_head")[0]

    # -- heads -------------------------------------------------------------------------------------
    def greedy(self, logits: np.ndarray) -> np.ndarray:
        out = []
        for row in np.asarray(logits, np.float32):
            self._run("greedy_head", {0: row[None]})
            out.append(int(self._read("greedy_head").reshape(-1)[0]))
        return np.array(out, np.int64)

    @property
    def can_sample(self) -> bool:
        return "sample_head" in self.rt.nets

    @property
    def runs_on(self) -> str:
        return self.library

    def sample(self, logits: np.ndarray, penalty_ids: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
        """The sampling head per row: at most MAX_TOP_K candidates (top_k 0 or above it means MAX_TOP_K,
        the seed's limit); the penalty covers the most recent distinct ids that fit its input."""
        if not self.can_sample:
            raise UserError(NO_SAMPLING)
        rows = self.rt.nets["sample_head"].inputs[1].shape[1]
        top_k = p.top_k if 0 < p.top_k <= MAX_TOP_K else MAX_TOP_K
        probs, ids = [], []
        for b, row in enumerate(np.asarray(logits, np.float32)):
            seen = list(dict.fromkeys(int(t) for t in np.asarray(penalty_ids[b]).reshape(-1)[::-1]))[:rows]
            penalty = p.repetition_penalty if seen else 1.0
            padded = np.full((1, rows), seen[0] if seen else 0, np.int32)  # repeats are penalised once
            padded[0, : len(seen)] = seen
            temperature = max(p.temperature, GREEDY_TEMPERATURE)
            feeds = {0: row[None], 1: padded, 2: [[penalty]], 3: [[temperature]], 4: [[top_k]], 5: [[p.top_p]]}
            self._run("sample_head", feeds)
            probs.append(self._read("sample_head", 0)[0])
            ids.append(self._read("sample_head", 1)[0].astype(np.int64))
        return np.stack(probs), np.stack(ids)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "library": self.library,
            "chip": self.manifest.platform.chip,
            "bmodel": os.path.basename(self.bmodel),
            "devices": self.devices,
        }

    def close(self) -> None:
        self._finalizer()


def _free_all(rt_ref, mems) -> None:
    rt = rt_ref()
    if rt is not None:
        for m in mems:
            rt.free(m)
