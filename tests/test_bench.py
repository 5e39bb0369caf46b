"""The bench command runs end to end on a small bundle and reports every figure the issue asks for
(timings themselves are recorded in BENCHMARKS.md, not asserted here)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from internvl_edge import kernels
from internvl_edge.api import load
from internvl_edge.bench import decoder_bytes_per_token, kv_bytes, paired_fraction


def test_bench_reports_every_figure(bundle):
    b = bundle("tiny_bf16", "w4bf16")
    argv = [sys.executable, "-m", "internvl_edge", "bench", "-m", b, "--quick", "--repeats", "1"]
    argv += ["--decode-tokens", "4", "--profile", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["machine"]["cores"] >= 1 and r["machine"]["onnxruntime"]
    assert r["load_s"] > 0 and r["vision_s_per_tile"] > 0
    assert set(r["prefill_tps"]) == {"64", "256"} and all(v > 0 for v in r["prefill_tps"].values())
    assert set(r["decode_tps"]) == {"300"} and r["decode_overhead_ms"]["300"] >= 0
    assert set(r["ftl_s"]) == {
        "text",
        "1 tile + 40 tokens",
        "1 tile + 40 tokens, repeated",
        "1 tile + 40 tokens, same image, new question",
    }
    assert r["bandwidth_gbs"] > 1 and 0 < r["roofline_fraction"]["300"]
    pairs = r["decode_pairs"]["300"]  # 2 x --decode-tokens steps, each paired with the read after it
    assert len(pairs) == 8 and all(step > 0 and gbs > 1 for step, gbs in pairs) and r["probe_bytes"] >= 2**28
    assert r["roofline_fraction_paired"]["300"] == paired_fraction(pairs, r["bytes_per_token"]["300"], r["probe_bytes"])
    assert r["bundle"]["attention_kernel"] in ("internvl-edge", "onnxruntime")
    ours = r["bundle"]["attention_kernel"] == "internvl-edge"
    assert r["bundle"]["kv_cache"] == ("float16" if ours else "float32")
    assert r["peak_rss_bytes"] > r["weight_bytes"] > 0
    # the profile times the decoder as it runs (our kernels included: their ops keep their names; each
    # layer is one DecoderLayer node where our attention runs, the lm_head a MatMulNBits)
    layer = "DecoderLayer" if ours else "GroupQueryAttention"
    assert "MatMulNBits" in r["decode_profile_ms"] and layer in r["decode_profile_ms"]
    # the float vision: MatMul on ONNX Runtime, or MatMulBf16 where the CPU has a bfloat16 path (bf16gemm.h)
    linear = "MatMulBf16" if kernels.bf16_path() else "MatMul"
    assert linear in r["vision_profile_ms"] and "LayerNormalization" in r["vision_profile_ms"]
    argv = [sys.executable, "-m", "internvl_edge", "bench", "-m", b, "--quick", "--repeats", "1"]
    argv += ["--decode-tokens", "2", "--profile"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout
    assert "decoder net" in out and "vision net per tile" in out


def test_paired_fraction_is_the_ratio_of_summed_rates():
    """Two steps of 1 GB in 0.1 s and 0.3 s (5 GB/s decoding), each followed by a 2 GB read at 20
    and at 10 GB/s (0.1 + 0.2 s: 13.3 GB/s reading): 3 / 8. The mean of the per-pair ratios would
    say (10/20 + 3.33/10) / 2 = 0.42, weighting the short step as much as the long one."""
    assert abs(paired_fraction([[0.1, 20.0], [0.3, 10.0]], 10**9, 2 * 10**9) - 3 / 8) < 1e-12
    assert paired_fraction([], 10**9, 10**9) == 0.0


def test_paired_fraction_leaves_out_a_stalled_read():
    """A read at 1.5 GB/s among reads of ~25 (a stalled VM, not a memory state) is left out: the
    fraction is the other pairs', not past 100%; a read at 0.6x the median (a slow state) counts."""
    steady = [[0.19, 25.0]] * 9
    alone = paired_fraction(steady, 4.5 * 10**9, 2**28)
    assert paired_fraction([*steady, [0.19, 1.5]], 4.5 * 10**9, 2**28) == pytest.approx(alone)
    slow = paired_fraction([*steady, [0.19, 15.0]], 4.5 * 10**9, 2**28)
    assert slow > alone


def test_bytes_per_token_counts_weights_as_held_in_memory(bundle):
    """An f32 bundle's decoder reads its whole weight file per token (less the rotary tables, of which
    one row is used); the KV cache adds 2 x layers x kv_heads x head_dim x 4 bytes per context token,
    2 bytes where the cache is float16 (a 4-bit bundle on our attention)."""
    model = load(bundle("tiny_bf16", "f32"))
    data = model.manifest.files["decoder.data"]["bytes"]
    tables = 2 * model.backend.kv_capacity * model.backend.head_dim // 2 * 4
    assert data - tables - 4096 * 200 <= decoder_bytes_per_token(model) <= data - tables
    assert kv_bytes(model, 100) == 2 * 2 * 2 * 32 * 4 * 100
    w4 = load(bundle("tiny_bf16", "w4bf16"))
    itemsize = 2 if w4.backend.attention_kernel == "internvl-edge" else 4
    assert kv_bytes(w4, 100) == 2 * 2 * 2 * 32 * itemsize * 100


@pytest.mark.skipif(kernels.library_path() is None, reason="q4gemm kernel not available here")
def test_bytes_per_token_count_our_scale_tables_where_the_kernel_reads_them(bundle):
    """Where our 4-bit kernel runs a linear, decode reads its table of float16 scales and byte zero
    points (24 bytes per 8 columns and block) instead of the float32 scales and 4-bit zero points; on
    AMX tiles, the 8-bit lm_head's table covers its padding columns to a whole tile too."""
    import onnx
    from onnx import helper

    model = load(bundle("tiny_bf16", "w4bf16"))
    graph = onnx.load(model.manifest.net_path("decoder"), load_external_data=False).graph
    size = {
        t.name: int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in graph.initializer
    }
    held, tables, replaced = sum(v for k, v in size.items() if "rotary_emb" not in k), 0, 0
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            blocks = -(-a["K"] // a["block_size"])
            # 8 bits: groups of 8 to the last column, on AMX tiles of 16 (q4gemm.h: q4_path8) to the tile's
            groups = (
                (-(-a["N"] // 16) * 2 if kernels.path8() == "amx" else -(-a["N"] // 8))
                if a["bits"] == 8
                else a["N"] // 8
            )
            if a["bits"] == 4 or kernels.isa() in kernels.EIGHT_BIT_ISAS:  # the 8-bit lm_head: ours on VNNI only
                tables += groups * blocks * 24
                replaced += size[node.input[2]] + size[node.input[3]]
    assert tables > 0 and model.backend.table_bytes == tables
    assert decoder_bytes_per_token(model) == held - replaced + tables


def test_bad_input_is_one_line(bundle, tmp_path):
    b = bundle("tiny_bf16", "w4bf16")
    for args in (["-m", str(tmp_path / "missing")], ["-m", b, "--repeats", "0"], ["-m", b, "--threads", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "internvl_edge", "bench", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
