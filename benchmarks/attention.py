"""Our attention kernel against ONNX Runtime's GroupQueryAttention, alone, on the decoder's shapes.

28 attention nodes in one graph (InternVL3-2B: 12 query heads, 2 KV heads of 128, a KV buffer of
2560 rows per layer, each layer its own cache so that nothing stays in cache between layers), the
caches bound in place as the runtime binds them; decode (one new row) at contexts 300 and 1500 and
prefill chunks of 256 and 1024 rows from an empty cache. Milliseconds for all 28, medians over
rounds in which the kernels take turns (their sessions stop spinning when a run returns, as the
runtime's do, so one does not slow the next). `--against LIB` adds another build of our library
(another commit's `_q4*.so`) as a third column, with its time over ours. The caches start on a
page boundary, as the runtime allocates them (backends/ort.py, aligned_zeros); `--offsets 0,16` times our
kernel on caches that many bytes past it as further columns (16: where numpy's own large arrays
start); `--half` times ours with float16 caches (what the runtime uses for 4-bit and half-precision
bundles: kernels/settings.py) as one more column, with its time over ours in float32. Not part of CI.

    python benchmarks/attention.py --threads 2
    python benchmarks/attention.py --threads 2 --against OLD/_q4.so
    python benchmarks/attention.py --threads 2 --offsets 0,16
    python benchmarks/attention.py --threads 2 --half
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from internvl_edge import kernels
from internvl_edge.backends.ort import aligned_zeros

LAYERS, HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 28, 12, 2, 128, 2560


def session(domain: str, rows: int, threads: int, library: str | None = None, cache=TensorProto.FLOAT):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.random((CAPACITY, HEAD_DIM // 2), dtype=np.float32), n) for n in ("cos", "sin")
    ]
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, rows, width])]
    inputs += [
        helper.make_tensor_value_info(n, TensorProto.INT32, s)
        for n, s in (("seqlens_k", [1]), ("total", []), ("query_lens", [1]))
    ]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        k, v = f"past_k{layer}", f"past_v{layer}"
        inputs += [helper.make_tensor_value_info(n, cache, [1, KV_HEADS, CAPACITY, HEAD_DIM]) for n in (k, v)]
        outs = [f"out{layer}", f"present_k{layer}", f"present_v{layer}"]
        if domain == kernels.SOURCE_DOMAIN:
            ins = ["qkv", "", "", k, v, "seqlens_k", "total", "cos", "sin"] + [""] * 7 + ["query_lens"]
            extra = {"do_rotary": 1, "rotary_interleaved": 0}
        else:
            ins, extra = ["qkv", k, v, "seqlens_k", "total", "cos", "sin", "query_lens"], {}
        nodes.append(
            helper.make_node(
                "GroupQueryAttention", ins, outs, domain=domain, num_heads=HEADS, kv_num_heads=KV_HEADS, **extra
            )
        )
        outputs += [
            helper.make_tensor_value_info(o, t, None)
            for o, t in zip(outs, [TensorProto.FLOAT, cache, cache], strict=True)
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "attention", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.force_spinning_stop", "1")  # as the runtime's sessions
    if domain == kernels.DOMAIN:
        so.register_custom_ops_library(library or kernels.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def random_caches(offset: int, dtype=np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every layer's key and value caches, random, starting `offset` bytes past a page boundary."""
    rng = np.random.default_rng(2)
    shape, count = (1, KV_HEADS, CAPACITY, HEAD_DIM), KV_HEADS * CAPACITY * HEAD_DIM
    caches = []
    for _ in range(LAYERS):
        pair = []
        for _ in range(2):
            skip = offset // np.dtype(dtype).itemsize
            flat = aligned_zeros((count + skip,), dtype)[skip:]
            flat[:] = rng.random(count, dtype=np.float32)
            pair.append(flat.reshape(shape))
        caches.append(tuple(pair))
    return caches


def time_ms(sess, caches, rows: int, context: int, repeats: int) -> float:
    io = sess.io_binding()
    for layer, (k, v) in enumerate(caches):
        for name, array in ((f"k{layer}", k), (f"v{layer}", v)):
            value = ort.OrtValue.ortvalue_from_numpy(array)
            io.bind_ortvalue_input(f"past_{name}", value)
            io.bind_ortvalue_output(f"present_{name}", value)
        io.bind_output(f"out{layer}")
    io.bind_cpu_input(
        "qkv", np.random.default_rng(1).random((1, rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype=np.float32)
    )
    io.bind_cpu_input("seqlens_k", np.array([context - 1], np.int32))
    io.bind_cpu_input("total", np.array(context, np.int32))
    io.bind_cpu_input("query_lens", np.array([rows], np.int32))
    sess.run_with_iobinding(io)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--against", help="another build of our library to time beside this one")
    ap.add_argument("--half", action="store_true", help="also time ours with float16 caches")
    ap.add_argument(
        "--offsets", default="", help="also time ours on caches this many bytes past a page boundary (e.g. 0,16)"
    )
    args = ap.parse_args()
    if kernels.library_path() is None:
        raise SystemExit("error: our kernels are not built here (pip install . compiles them)")
    offsets = [int(x) for x in args.offsets.split(",") if x]
    caches = random_caches(0)
    shifted = {off: random_caches(off) for off in offsets}
    halves = random_caches(0, np.float16) if args.half else None
    other = " | other build ms | other / ours" if args.against else ""
    other += "".join(f" | ours, offset {off} ms" for off in offsets)
    other += " | ours, float16 cache ms | float16 / float32" if args.half else ""
    print(
        f"| case | ONNX Runtime ms | ours ms | ours / ORT{other} |\n|---|---:|---:|---:|"
        + "---:|---:|" * bool(args.against)
        + "---:|" * len(offsets)
        + "---:|---:|" * args.half
    )
    for rows, context, repeats in ((1, 300, 5), (1, 1500, 5), (256, 256, 1), (1024, 1024, 1)):
        sessions = {
            "ort": session(kernels.SOURCE_DOMAIN, rows, args.threads),
            "ours": session(kernels.DOMAIN, rows, args.threads),
        }
        if args.against:
            sessions["other"] = session(kernels.DOMAIN, rows, args.threads, args.against)
        half = session(kernels.DOMAIN, rows, args.threads, cache=TensorProto.FLOAT16) if args.half else None
        ms = {name: [] for name in sessions}
        for _ in range(args.rounds if rows == 1 else max(2, args.rounds // 4)):
            for name, sess in sessions.items():
                ms[name].append(time_ms(sess, caches, rows, context, repeats))
            for off in offsets:
                ms.setdefault(off, []).append(time_ms(sessions["ours"], shifted[off], rows, context, repeats))
            if half is not None:
                ms.setdefault("half", []).append(time_ms(half, halves, rows, context, repeats))
        med = {name: float(np.median(v)) for name, v in ms.items()}
        case = f"decode @{context}" if rows == 1 else f"prefill {rows}"
        line = f"| {case} | {med['ort']:.2f} | {med['ours']:.2f} | {med['ours'] / med['ort']:.2f} |"
        if args.against:
            ratio = np.median([o / u for o, u in zip(ms["other"], ms["ours"], strict=True)])
            line += f" {med['other']:.2f} | {ratio:.3f} |"
        line += "".join(f" {med[off]:.2f} |" for off in offsets)
        if half is not None:
            ratio = np.median([h / u for h, u in zip(ms["half"], ms["ours"], strict=True)])
            line += f" {med['half']:.2f} | {ratio:.3f} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
