"""How fast ONNX Runtime's 4-bit kernel reads weights on this machine, alone, for the decoder's shapes.

Decode is one M=1 `MatMulNBits` per linear layer: its speed bounds ours. This builds graphs of that
single op on the InternVL3-2B decoder's shapes (Qwen2.5-1.5B: hidden 1536, intermediate 8960, 2 KV
heads of 128) with distinct random weights per copy (identical weights would stay in cache and
flatter it), times them after a warm-up, and prints GB/s next to the machine's read bandwidth as the
bench measures it (ONNX Runtime ReduceSum). The 4-bit shapes, and the 8-bit lm_head on a VNNI CPU,
run twice, on ONNX Runtime's kernel (MLAS) and on ours (internvl_edge/kernels, the nodes moved as the
runtime moves them), one after the other. Not part of CI.

    python benchmarks/matmulnbits.py --threads 2
    python benchmarks/matmulnbits.py --threads 1 --hot   # compute ceiling: 8 weights of 1536 x 2048, in L3

The gate/up shape also runs fused with its SwiGLU (attribute swiglu=1, as the runtime fuses it:
kernels.fuse_swiglu), on ours: "gate_up swiglu", the same weights read, half the columns written.

`--layers 28` (1 to 28) times the 4-bit linears in decode's order instead: qkv, o_proj, gate_up,
down_proj of each layer in turn, each fed (a slice of) the one before, distinct random weights per
layer (655 MB for 28 layers: more than the caches), without attention, norms, the fused SwiGLU or the
lm_head, on our kernel and on ONNX Runtime's; milliseconds per pass and GB/s of weights, medians of
40 passes. Between shapes, each linear starts where the last one ended (the thread pool's hand-over,
the serial prologue, cold first lines), which the per-shape figures, each shape repeated, do not
show. Builds compare by running it from each build in turn:

    python benchmarks/matmulnbits.py --layers 28
    PYTHONPATH=OTHER python benchmarks/matmulnbits.py --layers 28   # OTHER: a copy of the package

`--hot` times 8 distinct weights of 1536 x 2048 (12.6 MB, held in this machine's 32 MB L3), run after
run: what the kernel can consume when memory is not the limit (on a machine whose bandwidth changes
with its load, the figure that says whether a kernel can keep up with the fast state). Distinct
weights, not one shared by many nodes: our kernel holds a packed copy per node, so 64 nodes of one
weight would be 64 copies (25 MB, not in cache for ours).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from internvl_edge import kernels
from internvl_edge.backends.ort import hand_back_large_blocks
from internvl_edge.bench import read_bandwidth

HIDDEN, INTERMEDIATE, LAYERS = 1536, 8960, 28
SHAPES = {  # name: (K, N, bits, copies): one copy per layer; lm_head once, 8-bit as our default
    "qkv": (HIDDEN, HIDDEN + 2 * 2 * 128, 4, LAYERS),
    "o_proj": (HIDDEN, HIDDEN, 4, LAYERS),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE, 4, LAYERS // 2),  # half the layers: 2 GB of inputs is enough
    "down_proj": (INTERMEDIATE, HIDDEN, 4, LAYERS // 2),
    "lm_head 8-bit": (HIDDEN, 151674, 8, 1),
    "lm_head 4-bit": (HIDDEN, 151674, 4, 1),
}


def linear(rng, name: str, x: str, k: int, n: int, bits: int, block: int, accuracy_level: int):
    """One MatMulNBits node `name` reading `x` and writing `name`_y, and its random weights."""
    blocks = (k + block - 1) // block
    weights = [
        numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), name + "_w"),
        numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 0.01 + 0.001, name + "_s"),
        # zero points as our bundles have them: always given
        numpy_helper.from_array(rng.integers(0, 256, n * (-(-blocks * bits // 8)), dtype=np.uint8), name + "_z"),
    ]
    node = helper.make_node(
        "MatMulNBits",
        [x, name + "_w", name + "_s", name + "_z"],
        [name + "_y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    return node, weights


def graph(k: int, n: int, bits: int, block: int, copies: int, accuracy_level: int):
    rng = np.random.default_rng(0)
    nodes, weights, outputs = [], [], []
    for i in range(copies):
        node, w = linear(rng, f"l{i}", "x", k, n, bits, block, accuracy_level)
        nodes.append(node)
        weights += w
        outputs.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, [1, n]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    g = helper.make_graph(nodes, "matmulnbits", [x], outputs, weights)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")  # as the runtime's sessions
    return so


def median_run(sess, x: np.ndarray, repeats: int) -> float:
    """Seconds per run of `sess` on `x`, the median of `repeats` after 3 warm-up runs."""
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_shape(
    k, n, bits, copies, threads, block, accuracy_level, ours=False, hot=False, swiglu=False
) -> tuple[float, float]:
    so = options(threads)
    model = graph(k, n, bits, block, copies, accuracy_level)
    repeats = 100 if hot else 10
    if ours:
        kernels.rewrite(model, threads)
        so.register_custom_ops_library(kernels.library_path())
    if swiglu:  # what fuse_swiglu makes of the gate/up linear and the SwiGLU after it
        for node, output in zip(model.graph.node, model.graph.output, strict=True):
            node.attribute.append(helper.make_attribute("swiglu", 1))
            output.type.tensor_type.shape.dim[1].dim_value = n // 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    seconds = median_run(sess, np.random.default_rng(1).random((1, k), dtype=np.float32), repeats)
    return seconds / copies * 1e3, copies * n * k * bits / 8 / seconds / 1e9


def layers_graph(layers: int, block: int, accuracy_level: int):
    """The decoder's 4-bit linears of `layers` layers in decode's order, each fed by the one before."""
    rng = np.random.default_rng(0)
    shapes = [("qkv", *SHAPES["qkv"][:2]), ("o", HIDDEN, HIDDEN), ("gate_up", *SHAPES["gate_up"][:2])]
    shapes.append(("down", INTERMEDIATE, HIDDEN))
    inits = [numpy_helper.from_array(np.array([v], np.int64), name) for name, v in (("zero", 0), ("one", 1))]
    inits += [numpy_helper.from_array(np.array([w], np.int64), f"width{w}") for w in (HIDDEN, INTERMEDIATE)]
    nodes, x, width = [], "x", HIDDEN
    for layer in range(layers):
        for name, k, n in shapes:
            if width != k:  # the next linear's input: the first k outputs (o_proj after qkv, down after gate_up)
                nodes.append(helper.make_node("Slice", [x, "zero", f"width{k}", "one"], [f"{x}_{k}"]))
                x = f"{x}_{k}"
            node, weights = linear(rng, f"{name}{layer}", x, k, n, 4, block, accuracy_level)
            nodes.append(node)
            inits += weights
            x, width = node.output[0], n
    g = helper.make_graph(
        nodes,
        "decoder_linears",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    weight_bytes = layers * sum(k * n // 2 for _, k, n in shapes)
    return model, weight_bytes


def time_layers(layers: int, threads: int, block: int, accuracy_level: int, ours: bool) -> tuple[float, float]:
    """Milliseconds per pass through `layers` layers' linears, and GB/s of 4-bit weights."""
    so = options(threads)
    so.enable_cpu_mem_arena = False  # as the runtime's sessions (backends/ort.py)
    model, weight_bytes = layers_graph(layers, block, accuracy_level)
    if ours:
        kernels.rewrite(model, threads)
        so.register_custom_ops_library(kernels.library_path())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    # small: the values grow ~20x per layer and stay finite through the 2B's 28 layers (scales 20x
    # smaller, which keep them near 1, made ONNX Runtime's kernel 1.4-1.5x slower; not looked into)
    x = np.random.default_rng(1).random((1, HIDDEN), dtype=np.float32) * 0.01
    seconds = median_run(sess, x, 40)
    return seconds * 1e3, weight_bytes / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--accuracy_level", type=int, default=4)
    ap.add_argument("--hot", action="store_true", help="8 weights of 1536 x 2048 held in L3: the compute ceiling")
    ap.add_argument("--layers", type=int, default=0, help="time this many layers' linears in decode's order")
    args = ap.parse_args()
    if not 0 <= args.layers <= LAYERS:
        ap.error(f"--layers takes 1 to {LAYERS} (InternVL3-2B's layers)")
    # as the runtime does (backends/ort.py): without it glibc served the packed weights from heap memory
    # that earlier sessions freed, in 4 KB pages (/proc/self/smaps: 0.15 of 0.63 GB in huge pages), and
    # our kernel's --layers 28 ran 1.05-1.14x slower
    hand_back_large_blocks()
    if args.layers:
        print(f"onnxruntime {ort.__version__}, {args.threads} threads, blocks of {args.block}", flush=True)
        print(f"read bandwidth (ReduceSum): {read_bandwidth(args.threads):.1f} GB/s", flush=True)
        for ours in (False, True) if kernels.library_path() is not None else (False,):
            ms, gbs = time_layers(args.layers, args.threads, args.block, args.accuracy_level, ours)
            name = "internvl-edge q4gemm" if ours else "onnxruntime"
            print(f"{args.layers} layers' linears, {name}: {ms:.2f} ms per pass, {gbs:.1f} GB/s", flush=True)
        return
    shapes = {"hot 8x1536x2048": (HIDDEN, 2048, 4, 8)} if args.hot else SHAPES
    print(
        f"onnxruntime {ort.__version__}, {args.threads} threads, blocks of {args.block}, "
        f"accuracy_level {args.accuracy_level}",
        flush=True,
    )
    print(f"read bandwidth (ReduceSum): {read_bandwidth(args.threads):.1f} GB/s", flush=True)
    ours_here = kernels.library_path() is not None
    for name, (k, n, bits, copies) in shapes.items():
        ms, gbs = time_shape(k, n, bits, copies, args.threads, args.block, args.accuracy_level, hot=args.hot)
        line = f"{name:14s} K={k:5d} N={n:6d} {bits}-bit: onnxruntime {ms:7.3f} ms each, {gbs:5.1f} GB/s"
        ours_takes = bits == 4 or (bits == 8 and kernels.isa() in kernels.EIGHT_BIT_ISAS)  # its 8-bit path: VNNI
        if ours_here and ours_takes and args.accuracy_level == 4:
            ms, gbs = time_shape(
                k, n, bits, copies, args.threads, args.block, args.accuracy_level, ours=True, hot=args.hot
            )
            line += f" | internvl-edge q4gemm {ms:7.3f} ms, {gbs:5.1f} GB/s"
        print(line, flush=True)
        if ours_here and name == "gate_up" and args.accuracy_level == 4:
            ms, gbs = time_shape(
                k, n, bits, copies, args.threads, args.block, args.accuracy_level, ours=True, swiglu=True
            )
            print(
                f"{'gate_up swiglu':14s} K={k:5d} N={n:6d} {bits}-bit: fused with its SwiGLU, ours only"
                f"{'':19s} | internvl-edge q4gemm {ms:7.3f} ms, {gbs:5.1f} GB/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
