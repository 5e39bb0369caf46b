"""`verify`'s reference: the source checkpoint in float32, run by our own graphs on ONNX Runtime's
standard kernels, small enough to sit beside the bundle on the machine that converted it.

The graphs are the converter's (`build_vision`, `build_decoder` with float32 weights: the graphs the
test suite proves equal to transformers' model), with one change: their weights become graph inputs
instead of initializers, so one session serves every decoder layer and the weights are streamed in
per call. The decoder runs one layer at a time over all probes: each layer's float32 weights are read
from the checkpoint (AWQ int4 dequantised exactly: (q - zero) * scale in float32), used for every
probe, and dropped, so the reference holds one layer's weights, the KV cache of the probes and the
vision encoder (while images are encoded) at most. lm_head is applied in slices of the vocabulary for
the same reason. Greedy decoding repeats the layer walk once per generated token.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper

from .checkpoint.reader import Checkpoint, DenseLinear
from .checkpoint.safetensors import RawTensor
from .nets.decoder import DecoderOptions, build_decoder, kv_names
from .nets.vision import VisionOptions, build_vision

VOCAB_SLICE = 16384  # lm_head rows converted to float32 at a time (100 MB for InternVL3-2B)
HIDDEN = "/model/layers.last/Add/output_0"  # the residual stream after the (one) decoder layer


@dataclass
class ReferenceProbe:
    """What the reference needs of one probe: prompt ids, the image tiles and where they go."""

    ids: list[int]
    pixel_values: np.ndarray | None
    image_rows: np.ndarray  # positions of the image-context tokens in ids


@dataclass
class ReferenceResult:
    tokens: list[int]  # greedy answer, `steps` tokens (end-of-turn tokens do not stop it)
    logits: np.ndarray  # float32 [steps, vocab]: step k predicts tokens[k]
    image_embeds: np.ndarray | None  # float32 [tiles * tokens_per_tile, hidden]


class _Captured:
    """Stands in for the converter's WeightFile: keeps each weight in memory and gives its index as
    the `offset`, so the built graph's external initializers can become inputs fed with them."""

    name = "in-memory"

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def append(self, data: np.ndarray) -> tuple[int, int]:
        self.arrays.append(np.ascontiguousarray(data))
        return len(self.arrays) - 1, data.nbytes

    def close(self) -> None:
        pass


def weights_as_inputs(model: onnx.ModelProto, captured: _Captured) -> dict[str, np.ndarray]:
    """Turn every external initializer into a graph input; returns {input name: array}."""
    feeds, keep = {}, []
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            keep.append(t)
            continue
        offset = int({e.key: e.value for e in t.external_data}["offset"])
        feeds[t.name] = captured.arrays[offset]
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return feeds


def prune(model: onnx.ModelProto, outputs: list[tuple[str, list]]) -> None:
    """Keep only the nodes the given outputs need (and the inputs those nodes read)."""
    del model.graph.output[:]
    for name, shape in outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    needed = {name for name, _ in outputs}
    kept = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    inputs = [i for i in model.graph.input if i.name in needed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


class _LayerView:
    """The checkpoint as a one-layer model whose layer 0 is layer `layer` of the real one."""

    def __init__(self, ckpt: Checkpoint, layer: int):
        self.ckpt, self.layer = ckpt, layer
        self.config = replace(ckpt.config, text=replace(ckpt.config.text, num_hidden_layers=1))

    def _name(self, name: str) -> str:
        return name.replace("language_model.model.layers.0.", f"language_model.model.layers.{self.layer}.")

    def f32(self, name: str) -> np.ndarray:
        return self.ckpt.f32(self._name(name))

    def optional_f32(self, name: str):
        return self.ckpt.optional_f32(self._name(name))

    def linear(self, prefix: str):
        return self.ckpt.linear(self._name(prefix))

    def lm_head(self):  # pruned away: the reference applies lm_head itself, in slices
        return DenseLinear(RawTensor("F32", np.zeros((1, self.config.text.hidden_size), np.float32)), None)


def _session_options(ort, threads: int | None):
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = False  # hand the large activations back between calls (backends/ort.py says why)
    so.log_severity_level = 3
    return so


class OrtReference:
    """The float32 reference on ONNX Runtime; see the module's docstring."""

    name = "float32 graphs of the source checkpoint on ONNX Runtime's standard kernels"

    def __init__(self, ckpt: Checkpoint, threads: int | None = None, progress=None):
        import onnxruntime as ort

        self.ort, self.ckpt, self.threads, self.progress = ort, ckpt, threads, progress

    def _session(self, model: onnx.ModelProto):
        so = _session_options(self.ort, self.threads)
        return self.ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])

    # -- vision ------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """Per probe: its tiles' embeddings [tiles * tokens_per_tile, hidden], one tile per call."""
        if all(p is None for p in pixel_values):
            return [None] * len(pixel_values)
        captured = _Captured()
        graph = build_vision(self.ckpt, VisionOptions(store="f32", static=False), captured)
        model = graph.model()
        feeds = weights_as_inputs(model, captured)
        self.ckpt.release()
        sess = self._session(model)
        out, total, done = [], sum(len(p) for p in pixel_values if p is not None), 0
        for px in pixel_values:
            if px is None:
                out.append(None)
                continue
            rows = []
            for tile in px:
                feeds["pixel_values"] = np.ascontiguousarray(tile[None], np.float32)
                rows.append(sess.run(None, feeds)[0][0])
                done += 1
                if self.progress:
                    self.progress(done, total, "vision tiles")
            out.append(np.concatenate(rows))
        del sess, feeds, captured
        gc.collect()
        return out

    # -- decoder -----------------------------------------------------------------------------------
    def _layer(self, layer: int, capacity: int):
        """(graph, feeds) of decoder layer `layer` with float32 weights as inputs."""
        captured = _Captured()
        opts = DecoderOptions(weight_bits=0, store="f32", lm_head_bits=0, kv_capacity=capacity)
        model = build_decoder(_LayerView(self.ckpt, layer), opts, captured).model()
        feeds = weights_as_inputs(model, captured)
        self.ckpt.release()
        t = self.ckpt.config.text
        pk, pv, ok, ov = kv_names(0)
        kv = ["batch", t.num_key_value_heads, "kv_rows", t.head_dim]  # caches sized per probe
        prune(model, [(HIDDEN, ["batch", "sequence", t.hidden_size]), (ok, kv), (ov, kv)])
        for vi in model.graph.input:
            if vi.name in (pk, pv):
                vi.type.tensor_type.shape.dim[2].dim_param = "kv_rows"
        return model, {k: v for k, v in feeds.items() if k in {i.name for i in model.graph.input}}

    def _final(self, hidden: np.ndarray) -> np.ndarray:
        """Final RMSNorm and lm_head over rows [n, hidden] -> logits [n, vocab], lm_head in slices."""
        t = self.ckpt.config.text
        x = hidden.astype(np.float32)
        var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
        x = x / np.sqrt(var + np.float32(t.rms_norm_eps)) * self.ckpt.f32("language_model.model.norm.weight")
        return lm_head_logits(self.ckpt, x.astype(np.float32))

    def generate(self, probes: list[ReferenceProbe], steps: int) -> list[ReferenceResult]:
        ort, t = self.ort, self.ckpt.config.text
        images = self.encode_images([p.pixel_values for p in probes])
        embed = self.ckpt.raw("language_model.model.embed_tokens.weight")
        states = []
        for p, img in zip(probes, images, strict=True):
            x = RawTensor(embed.dtype, embed.data[np.asarray(p.ids)]).to_float32()
            if img is not None:
                x[p.image_rows] = img
            states.append(x)
        self.ckpt.release()
        capacity = max(len(p.ids) for p in probes) + steps
        shapes = [(1, t.num_key_value_heads, len(p.ids) + steps, t.head_dim) for p in probes]
        caches = [
            [(np.zeros(s, np.float32), np.zeros(s, np.float32)) for _ in range(t.num_hidden_layers)] for s in shapes
        ]
        lengths = [0] * len(probes)
        tokens: list[list[int]] = [[] for _ in probes]
        logits: list[list[np.ndarray]] = [[] for _ in probes]
        sess = None
        for step in range(steps):
            for layer in range(t.num_hidden_layers):
                model, feeds = self._layer(layer, capacity)
                if sess is None:
                    sess = self._session(model)
                io = sess.io_binding()
                values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
                for k, v in values.items():
                    io.bind_ortvalue_input(k, v)
                for i, x in enumerate(states):
                    states[i] = self._run(io, sess, x, caches[i][layer], lengths[i])
                del io, values, feeds, model
                if self.progress:
                    self.progress(
                        step * t.num_hidden_layers + layer + 1,
                        steps * t.num_hidden_layers,
                        "decoder layers x answer tokens",
                    )
            last = np.stack([x[-1] for x in states])
            step_logits = self._final(last)
            for i, row in enumerate(step_logits):
                lengths[i] += len(states[i])
                token = int(np.argmax(row))
                tokens[i].append(token)
                logits[i].append(row)
                states[i] = RawTensor(embed.dtype, embed.data[[token]]).to_float32()
            self.ckpt.release()
        return [ReferenceResult(tok, np.stack(lg), img) for tok, lg, img in zip(tokens, logits, images, strict=True)]

    def _run(self, io, sess, x: np.ndarray, cache, length: int) -> np.ndarray:
        ort = self.ort
        rows = len(x)
        total = length + rows
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(x[None], np.float32))
        io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        io.bind_cpu_input("query_seqlens", np.array([rows], np.int32))
        pk, pv, ok, ov = kv_names(0)
        k, v = (ort.OrtValue.ortvalue_from_numpy(a) for a in cache)
        io.bind_ortvalue_input(pk, k)
        io.bind_ortvalue_input(pv, v)
        io.bind_ortvalue_output(ok, k)  # the same buffer: the cache grows in place
        io.bind_ortvalue_output(ov, v)
        out = np.empty((1, rows, x.shape[1]), np.float32)
        io.bind_output(HIDDEN, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        sess.run_with_iobinding(io)
        return out[0]


def lm_head_logits(ckpt: Checkpoint, normed: np.ndarray) -> np.ndarray:
    """normed [n, hidden] @ lm_head^T (+ bias) in float32, the source's lm_head read in slices."""
    head = ckpt.lm_head()
    if not isinstance(head, DenseLinear):  # AWQ lm_head: dequantised exactly, at once
        w = np.ascontiguousarray(head.awq.dequantize().T)
        out = normed @ w.T
    else:
        V = head.out_features
        out = np.empty((len(normed), V), np.float32)
        for start in range(0, V, VOCAB_SLICE):
            w = RawTensor(head.weight.dtype, head.weight.data[start : start + VOCAB_SLICE]).to_float32()
            out[:, start : start + len(w)] = normed @ w.T
            del w
            ckpt.release()
    if head.bias is not None:
        out += head.bias
    return out
