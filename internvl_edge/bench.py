"""Measurements of a bundle on this machine: load, vision, prefill, decode, FTL, memory, roofline.

Every decoded token reads all decoder weights (plus the KV cache) once, so the best possible decode
speed is read bandwidth / bytes per token: the roofline. The bandwidth is measured here, in the same
run (sampled at the start, middle and end, the best kept), with as many threads as the model uses, so
the ratio does not depend on remembered figures. On a shared machine whose bandwidth drifts by up to
3x within seconds (22-70 GB/s seen on 2 cores), that ratio mixes machine states; so the decode is
also timed step by step against the bandwidth: every decoded token is followed by one read of a
256 MiB array, and the ratio of the two summed rates (bytes decoded per second of decoding, bytes
read per second of reading) is reported beside it: both sample the same moments of the machine.
Where decode falls short of the roofline, the profile (--profile), benchmarks/matmulnbits.py and
benchmarks/attention.py tell whether a kernel or our graph is the limit.
Every figure is a median over repeated runs after a warm-up run.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .api import Model, load
from .backends.base import available_cores
from .backends.ort import OrtBackend
from .bundle import load_manifest
from .errors import UserError
from .generate import prefill
from .progress import Progress

PREFILL_LENGTHS = (64, 256, 1024)
DECODE_CONTEXTS = (300, 1500)
FTL_TEXT_TOKENS = 40  # the seed's case: one 448 tile + a short question
PAIRED_PROBE_GIB = 0.25  # read after every decoded token: a few ms, about a fifth of a 2B model's step
PAIRED_STEPS_PER_TOKEN = 2  # steps of the step-by-step roofline, per --decode-tokens


@dataclass
class BenchResult:
    machine: dict = field(default_factory=dict)
    bundle: dict = field(default_factory=dict)
    load_s: float = 0.0
    vision_s_per_tile: float | None = None
    prefill_tps: dict = field(default_factory=dict)
    decode_tps: dict = field(default_factory=dict)
    decode_overhead_ms: dict = field(default_factory=dict)  # per token, outside the decoder net
    ftl_s: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    weight_bytes: int = 0
    bytes_per_token: dict = field(default_factory=dict)
    bandwidth_gbs: float = 0.0  # the best of the samples: the roofline is an upper bound
    bandwidth_samples_gbs: list = field(default_factory=list)
    roofline_tps: dict = field(default_factory=dict)
    roofline_fraction: dict = field(default_factory=dict)
    decode_pairs: dict = field(default_factory=dict)  # per context: [step seconds, GB/s read right after] per token
    probe_bytes: int = 0  # what each of those reads read
    roofline_fraction_paired: dict = field(default_factory=dict)  # step by step: summed rates' ratio
    decode_profile_ms: dict = field(default_factory=dict)  # per token, by operator type (--profile)
    vision_profile_ms: dict = field(default_factory=dict)  # per tile, by operator type (--profile)


def machine_info(threads: int) -> dict:
    import onnxruntime

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "threads": threads,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


class ReadProbe:
    """Reads of a `gib` GiB float32 array with ONNX Runtime's ReduceSum on `threads` threads (the
    runtime and thread pool that decode with; numpy's sum would hold the GIL and use one core).
    Its threads stop spinning when a read returns, as the runtime's do (`stop_spinning`)."""

    def __init__(self, threads: int, gib: float, stop_spinning: bool = True):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        rows = 64  # the reduction is split over rows, one per task
        graph = helper.make_graph(
            [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
            "bandwidth",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, None])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows])],
            [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        if stop_spinning:  # as the runtime's sessions (backends/ort.py, OrtBackend._options)
            so.add_session_config_entry("session.force_spinning_stop", "1")
        self.sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.data = np.ones((rows, int(gib * (1 << 30)) // 4 // rows), dtype=np.float32)
        self.sess.run(None, {"x": self.data})  # warm-up: pages touched

    def read(self) -> float:
        """GB/s of one pass over the array."""
        t0 = time.perf_counter()
        self.sess.run(None, {"x": self.data})
        return self.data.nbytes / (time.perf_counter() - t0) / 1e9


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """The best GB/s of `repeats` reads of a `gib` GiB array (ReadProbe)."""
    probe = ReadProbe(threads, gib)
    return max(probe.read() for _ in range(repeats))


def sample_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """read_bandwidth in a child process, so that its 1 GiB array stays out of this one's peak RSS.
    The bench samples it at its start, middle and end: on a shared machine the figure drifts by up to
    2x within minutes (36-64 GB/s seen on 2 cores), and one sample would make the roofline ratio drift."""
    code = f"from internvl_edge.bench import read_bandwidth; print(read_bandwidth({threads}, {gib}, {repeats}))"
    return float(_child(code, "measuring the read bandwidth").split()[-1])


def _ort(model: Model) -> OrtBackend | None:
    """The model's ONNX Runtime backend, or None: the roofline, the time outside the decoder net and
    the profile read ORT's sessions and our kernels' tables, which other backends do not have."""
    return model.backend if isinstance(model.backend, OrtBackend) else None


def _child(code: str, what: str) -> str:
    """Run Python code in a child process; its stdout, or a one-line error with its last words."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{what} failed in a child process: {last}")
    return proc.stdout


def decoder_bytes_per_token(model: Model) -> int:
    """Bytes of weights one decode step reads, as the decoder's kernels hold them: 4-bit blocks as
    stored (our kernel's repacked copy is the same size), float weights widened to float32 (a Cast on
    an initializer is folded at load), rotary tables not counted (one row is read); where our 4-bit
    kernel reads its own table of scales and zero points (float16 scales where they are float16
    values: q4gemm.h), that table instead of the float32 scales and 4-bit zero points."""
    import onnx

    path = model.manifest.net_path("decoder")
    graph = onnx.load(path, load_external_data=False).graph
    cast_inputs = {n.input[0] for n in graph.node if n.op_type == "Cast"}
    ort = _ort(model)
    replaced = set(ort.table_inputs) if ort else set()
    total = ort.table_bytes if ort else 0
    for t in graph.initializer:
        if "rotary_emb" in t.name or t.name in replaced:
            continue
        numel = int(np.prod(t.dims)) if t.dims else 1
        if t.name in cast_inputs:
            total += numel * 4
        else:
            total += numel * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def kv_bytes(model: Model, context: int) -> int:
    """Bytes of KV cache one decode step reads at `context`, in the cache's element type."""
    return model.backend.row_bytes * context


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _random_tile(model: Model) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, model.image_size, model.image_size)).astype(np.float32)


def _prefilled(model: Model, context: int, seed: int = 0):
    """A batch-1 cache holding `context` random tokens, and the greedy token that follows them."""
    backend = model.backend
    cache = backend.new_cache(1)
    logits = prefill(backend, cache, _random_embeds(model, context, seed=seed))
    return cache, int(backend.greedy(logits[None])[0])


def _greedy_steps(backend, cache, token: int, tokens: int) -> int:
    """Decode `tokens` tokens one at a time, as generation does (embed, decoder, greedy head)."""
    for _ in range(tokens):
        logits = backend.forward(cache, backend.embed(np.array([[token]], np.int64)), [1])[0]
        token = int(backend.greedy(logits[None])[0])
    return token


def time_vision(model: Model, repeats: int) -> float:
    px = _random_tile(model)
    model.backend.encode_images(px)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.backend.encode_images(px)
        times.append(time.perf_counter() - t0)
    return _median(times)


def _random_embeds(model: Model, n: int, seed: int = 0) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, model.tokenizer.vocab_size() - 40, size=(1, n))
    return model.backend.embed(ids)[0]


def time_prefill(model: Model, n: int, repeats: int) -> float:
    embeds = _random_embeds(model, n)
    times = []
    for r in range(repeats + 1):
        cache = model.backend.new_cache(1)
        t0 = time.perf_counter()
        prefill(model.backend, cache, embeds)
        if r:
            times.append(time.perf_counter() - t0)
        del cache  # before the next one is made: two caches alive would count in peak RSS
    return n / _median(times)


def time_decode(model: Model, context: int, tokens: int, repeats: int) -> tuple[float, float | None]:
    """(tokens/s, milliseconds per token spent outside the decoder net) at a given context; the second
    is measured on the ONNX Runtime backend only (None elsewhere)."""
    backend, ort = model.backend, _ort(model)
    sess = ort.sessions["decoder"] if ort else None
    inside = [0.0]
    if sess is not None:
        run = sess.run_with_iobinding

        def timed_run(io, *a):
            t0 = time.perf_counter()
            run(io, *a)
            inside[0] += time.perf_counter() - t0

        sess.run_with_iobinding = timed_run
    rates, overheads = [], []
    try:
        for r in range(repeats + 1):
            cache, token = _prefilled(model, context, seed=r)
            inside[0] = 0.0
            t0 = time.perf_counter()
            _greedy_steps(backend, cache, token, tokens)
            elapsed = time.perf_counter() - t0
            del cache
            if r:
                rates.append(tokens / elapsed)
                overheads.append((elapsed - inside[0]) / tokens * 1000)
    finally:
        if sess is not None:
            del sess.run_with_iobinding
    return _median(rates), (_median(overheads) if sess is not None else None)


def time_decode_paired(model: Model, context: int, tokens: int, probe: ReadProbe) -> list[list[float]]:
    """[seconds of the decode step, GB/s of the probe read right after it] for `tokens` greedy steps
    from a cache holding `context` tokens (one warm-up step first, not returned)."""
    cache, token = _prefilled(model, context)
    pairs = []
    for step in range(tokens + 1):
        t0 = time.perf_counter()
        token = _greedy_steps(model.backend, cache, token, 1)
        elapsed = time.perf_counter() - t0
        gbs = probe.read()
        if step:
            pairs.append([elapsed, gbs])
    return pairs


STALLED_READ = 0.5  # a probe read below this share of the run's median is a stalled machine, not a state


def paired_fraction(pairs: list[list[float]], bytes_per_token: int, probe_bytes: int) -> float:
    """Decode's byte rate over the probe's, each summed over the pairs: (n x bytes per token / time
    decoding) / (n x probe bytes / time reading). Pairs whose read ran below half the median read are
    left out: the machine's two memory states differ by less than 1.5x, and one read of a stalled VM
    (1.5 GB/s among reads of 17-28 seen) would count 15 times an ordinary one and push the
    fraction past 100%."""
    if pairs:
        median = statistics.median(gbs for _, gbs in pairs)
        pairs = [(step, gbs) for step, gbs in pairs if gbs >= STALLED_READ * median]
    decoding = sum(step for step, _ in pairs)
    reading = sum(probe_bytes / 1e9 / gbs for _, gbs in pairs)
    return (bytes_per_token / decoding) / (probe_bytes / reading) if decoding > 0 and reading > 0 else 0.0


def time_ftl(model: Model, image, repeats: int, warm: str = "") -> float:
    """First-token latency of a ~40-word question (with one tile of `image`). Cold (`warm` empty): the
    model's image and prefix caches emptied before every request. "repeat": the same request again
    (its image embeddings and whole prompt cached). "new question": the same image with another
    question each time (the image's embeddings and the KV of the system prompt and image cached)."""
    kw = {"images": [image], "max_tiles": 1} if image is not None else {}
    times = []
    for r in range(repeats + 1):
        words = [f"q{r}" if warm == "new question" else "word"] + ["word"] * (FTL_TEXT_TOKENS - 1)
        if not warm:
            model.clear_caches()
        result = model.generate(" ".join(words), max_new_tokens=1, **kw)
        if r:
            times.append(result.stats.ftl_s)
    return _median(times)


def _profile_net(model: Model, net: str, work, runs: int) -> dict[str, float]:
    """Milliseconds per run by operator type over the last `runs` runs of `net` that `work()` makes
    (ONNX Runtime's profiler on a second session of the net, swapped in for the call)."""
    import json

    backend = _ort(model)
    if backend is None:
        raise UserError("bench --profile needs an ONNX Runtime bundle")
    original = backend.sessions[net]
    # the net as the backend builds it (our kernels included), so the profile times what runs
    backend.sessions[net] = backend._session(
        net, profile_prefix=os.path.join(tempfile.gettempdir(), f"internvl-edge-{net}")
    )
    try:
        work()
        path = backend.sessions[net].end_profiling()
    finally:
        backend.sessions[net] = original
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    first = [e for e in events if e.get("name") == "model_run"][-runs]["ts"]
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            op = e["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1000 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def profile_decode(model: Model, context: int = 300, tokens: int = 16) -> dict[str, float]:
    """Milliseconds per decoded token by operator type, in the decoder net."""

    def work():
        _greedy_steps(model.backend, *_prefilled(model, context), tokens)

    return _profile_net(model, "decoder", work, tokens)


def profile_vision(model: Model, runs: int = 2) -> dict[str, float]:
    """Milliseconds per tile by operator type, in the vision net (after a warm-up tile)."""
    px = _random_tile(model)
    return _profile_net(model, "vision", lambda: [model.backend.encode_images(px) for _ in range(runs + 1)], runs)


def run_bench(
    bundle: str,
    threads: int | None = None,
    repeats: int = 3,
    decode_tokens: int = 32,
    quick: bool = False,
    profile: bool = False,
    progress: Progress | None = None,
) -> BenchResult:
    from PIL import Image

    if min(repeats, decode_tokens) < 1 or (threads is not None and threads < 1):
        raise UserError("--repeats, --decode-tokens and --threads must be at least 1")
    progress = progress or Progress("[bench] ")
    res = BenchResult()
    progress.step("loading the bundle")
    load_manifest(bundle, verify=False)  # a folder that is no bundle: its one-line error, from here
    # the first load (checksums verified and stamped, files in the page cache) in another process, so
    # that this one's load time and peak memory are those of a later load
    _child(f"import internvl_edge; internvl_edge.load({bundle!r})", "loading the bundle")
    t0 = time.perf_counter()
    model = load(bundle, threads=threads)
    res.load_s = time.perf_counter() - t0
    progress.done()
    onnxruntime_backend = _ort(model) is not None  # the roofline and profile read ORT's nets
    threads_used = model.backend.threads or threads or available_cores()
    res.machine = machine_info(threads_used)
    opts = model.manifest.settings
    res.bundle = {
        "path": model.manifest.path,
        "quantize": opts.quantize,
        "dynamic": opts.dynamic,
        "max_input_length": opts.max_input_length,
        "seq_length": opts.seq_length,
        "lm_head_bits": opts.lm_head_bits,
        "vision_bits": opts.vision_bits,
        "accuracy_level": opts.accuracy_level,
        "model": model.manifest.facts.name,
        "q4_kernel": model.backend.q4_kernel,
        "attention_kernel": model.backend.attention_kernel,
        "kv_cache": str(kv) if (kv := getattr(model.backend, "kv_dtype", None)) is not None else None,
        "verification": model.manifest.verification or None,
    }
    res.weight_bytes = model.manifest.weight_bytes
    seq = model.seq_length

    progress.step("memory bandwidth")
    res.bandwidth_samples_gbs.append(sample_bandwidth(threads_used))
    progress.done(f"{res.bandwidth_samples_gbs[-1]:.1f} GB/s")
    progress.step("vision, one tile")
    res.vision_s_per_tile = time_vision(model, repeats)
    progress.done(f"{res.vision_s_per_tile:.3f} s")
    for n in PREFILL_LENGTHS:
        if n >= seq or (quick and n > 256):
            continue
        progress.step(f"prefill {n} tokens")
        res.prefill_tps[str(n)] = time_prefill(model, n, repeats)
        progress.done(f"{res.prefill_tps[str(n)]:.1f} tokens/s")
    for i, ctx in enumerate(DECODE_CONTEXTS):
        if ctx + decode_tokens >= seq or (quick and ctx > 300):
            continue
        if i == 1:
            res.bandwidth_samples_gbs.append(sample_bandwidth(threads_used))
        progress.step(f"decode at context {ctx}")
        tps, overhead = time_decode(model, ctx, decode_tokens, repeats)
        res.decode_tps[str(ctx)], res.decode_overhead_ms[str(ctx)] = tps, overhead
        progress.done(f"{tps:.2f} tokens/s")
    progress.step("first-token latency")
    picture = Image.fromarray((np.random.default_rng(1).random((448, 448, 3)) * 255).astype(np.uint8))
    skipped = []
    cases = (
        ("text", None, ""),
        ("1 tile + 40 tokens", picture, ""),
        ("1 tile + 40 tokens, repeated", picture, "repeat"),
        ("1 tile + 40 tokens, same image, new question", picture, "new question"),
    )
    for case, image, warm in cases:
        try:
            res.ftl_s[case] = time_ftl(model, image, repeats, warm)
        except UserError as e:  # a small bundle's context may not hold the case's prompt
            skipped.append(f"{case} skipped: {e}")
    progress.done("; ".join(skipped))

    res.peak_rss_bytes = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # the probe and profile below not counted
    if onnxruntime_backend and res.decode_tps:
        probe = ReadProbe(threads_used, PAIRED_PROBE_GIB)
        res.probe_bytes = probe.data.nbytes
        for ctx in res.decode_tps:
            progress.step(f"decode at context {ctx} against the bandwidth, step by step")
            res.decode_pairs[ctx] = time_decode_paired(model, int(ctx), PAIRED_STEPS_PER_TOKEN * decode_tokens, probe)
            progress.done()
        del probe
    if profile and onnxruntime_backend:
        progress.step("profile by operator")
        res.decode_profile_ms = profile_decode(model) if res.decode_tps else {}
        res.vision_profile_ms = profile_vision(model)
        progress.done()
    progress.step("memory bandwidth")
    res.bandwidth_samples_gbs.append(sample_bandwidth(threads_used))
    res.bandwidth_gbs = max(res.bandwidth_samples_gbs)
    progress.done(f"{res.bandwidth_gbs:.1f} GB/s (best of {len(res.bandwidth_samples_gbs)} samples)")
    if not onnxruntime_backend:
        return res
    weights = decoder_bytes_per_token(model)
    for ctx, tps in res.decode_tps.items():
        per_token = weights + kv_bytes(model, int(ctx))
        res.bytes_per_token[ctx] = per_token
        res.roofline_tps[ctx] = res.bandwidth_gbs * 1e9 / per_token
        res.roofline_fraction[ctx] = tps / res.roofline_tps[ctx]
        if res.decode_pairs.get(ctx):
            res.roofline_fraction_paired[ctx] = paired_fraction(res.decode_pairs[ctx], per_token, res.probe_bytes)
    return res


def format_result(r: BenchResult) -> str:
    m = r.machine
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, onnxruntime {m['onnxruntime']}",
        f"bundle: {r.bundle['path']} ({r.bundle['quantize']}, {'dynamic' if r.bundle['dynamic'] else 'static'}, "
        f"max_input_length {r.bundle['max_input_length']}, lm_head bits {r.bundle['lm_head_bits']}, "
        f"vision bits {r.bundle['vision_bits']})",
        f"4-bit linears: {r.bundle.get('q4_kernel') or '-'}; attention: {r.bundle.get('attention_kernel') or '-'}"
        + (f", {r.bundle['kv_cache']} KV cache" if r.bundle.get("kv_cache") else ""),
        f"load (second): {r.load_s:.2f} s",
        f"vision: {r.vision_s_per_tile:.3f} s per tile",
    ]
    lines += [f"prefill {n}: {tps:.1f} tokens/s" for n, tps in r.prefill_tps.items()]
    for ctx, tps in r.decode_tps.items():
        line = f"decode at {ctx}: {tps:.2f} tokens/s"
        if ctx in r.roofline_tps:
            paired = r.roofline_fraction_paired.get(ctx)
            fraction = f"{100 * r.roofline_fraction[ctx]:.0f}%"
            fraction += f"; {100 * paired:.0f}% step by step" if paired else ""
            line += f", roofline {r.roofline_tps[ctx]:.1f} ({fraction}), {r.bytes_per_token[ctx] / 1e6:.0f} MB/token, "
            line += f"{r.decode_overhead_ms[ctx]:.2f} ms/token outside the decoder net"
        lines.append(line)
    lines += [f"FTL {k}: {v:.3f} s" for k, v in r.ftl_s.items()]
    if r.decode_profile_ms:
        total = sum(r.decode_profile_ms.values())
        lines.append(f"decoder net per token at context 300, by operator ({total:.2f} ms in kernels):")
        lines += [
            f"  {op:34s} {ms:7.3f} ms  {100 * ms / total:5.1f}%" for op, ms in list(r.decode_profile_ms.items())[:8]
        ]
    if r.vision_profile_ms:
        total = sum(r.vision_profile_ms.values())
        lines.append(f"vision net per tile, by operator ({total:.1f} ms in kernels):")
        lines += [
            f"  {op:34s} {ms:7.1f} ms  {100 * ms / total:5.1f}%" for op, ms in list(r.vision_profile_ms.items())[:6]
        ]
    samples = ", ".join(f"{b:.1f}" for b in r.bandwidth_samples_gbs)
    lines.append(f"memory read bandwidth ({m['threads']} threads): {r.bandwidth_gbs:.1f} GB/s (best of {samples})")
    rss = f"peak RSS: {r.peak_rss_bytes / 1e9:.2f} GB"
    if r.weight_bytes:  # a Sophgo bundle's weights are inside its bmodel, on the device
        rss += f" ({r.peak_rss_bytes / r.weight_bytes:.2f}x the bundle's {r.weight_bytes / 1e9:.2f} GB of weights)"
    lines.append(rss)
    return "\n".join(lines)


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
