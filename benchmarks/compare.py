"""Side by side on this machine, in one go: our bundles, transformers (the reference) and llama.cpp.

    python benchmarks/compare.py --checkpoint CKPT --work DIR [--threads 2] [--write BENCHMARKS.md]
    python benchmarks/compare.py --checkpoint CKPT_8B --work DIR --repeats 2 --quick --write BENCHMARKS.md

CKPT is an InternVL3 checkpoint in OpenGVLab's original bf16 format (weights cannot be downloaded here,
so the recorded runs use `internvl-edge make-checkpoint CKPT --size 2b`: random weights, exact
InternVL3-2B shapes). Not part of CI: it takes about an hour on 2 cores.

- ours: `internvl-edge convert` of CKPT (the default w4bf16 bundle, a `--static` one, and the default
  with the 8-bit vision encoder), each measured by `internvl_edge.bench.run_bench` in a fresh process;
- transformers 5.x on CPU in float32 and bfloat16 (eager attention), on the same weights;
- llama.cpp, built from the llama-cpp-python source distribution on PyPI (its vendored llama.cpp,
  `-DLLAMA_CURL=OFF -DGGML_NATIVE=ON`; on a CPU with AMX, whose tile path crashes in this llama.cpp, every
  other extension of the CPU named instead: llama_build), CKPT converted with its own convert_hf_to_gguf.py (text model
  and `--mmproj`), quantised to Q4_0 with llama-quantize; llama-bench for prefill/decode and
  llama-mtmd-cli for the image encoder and the first-token latency of one tile + 40 words.
  Our random checkpoint's tokenizer is unknown to the converter's pre-tokenizer table, so it is told
  that the tokenizer is Qwen2's (which the real InternVL3 tokenizer maps to).

The table it writes gives medians and the ratios ours / peer, in a section of its own per model size
(the size is read from the factory's record in CKPT). `--quick` measures the default bundle alone against
llama.cpp Q4_0 (bf16 mmproj), without transformers: the form used for the 1B and 8B shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from statistics import median

from records import write_atomic

from internvl_edge.bench import machine_info

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
PY = sys.executable


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(
    cmd: list[str],
    cwd: str | None = None,
    env: dict | None = None,
    log_to: str | None = None,
    stdout_only: bool = False,
) -> str:
    log(" ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout if stdout_only and proc.returncode == 0 else proc.stdout + proc.stderr
    if log_to:
        with open(log_to, "w") as f:
            f.write(out)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out


def timed(cmd: list[str], **kw) -> tuple[str, float, float]:
    """Run under /usr/bin/time -v: (output, wall seconds, peak RSS GB)."""
    out = sh(["/usr/bin/time", "-v"] + cmd, **kw)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", out).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** (len(parts) - 1 - i) for i, p in enumerate(parts))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1)) / 1e6
    return out, seconds, rss


# -- ours ------------------------------------------------------------------------------------------
def our_bundles(ckpt: str, work: str, quick: bool) -> dict[str, dict]:
    variants = {
        "w4bf16 static": ["--static"],
        "w4bf16 dynamic": [],  # the CPU's default
        "w4bf16 dynamic, int8 vision": ["--vision-bits", "8"],
    }
    if quick:  # the default bundle alone
        variants = {"w4bf16 dynamic": []}
    out = {}
    for name, flags in variants.items():
        path = os.path.join(work, "ours_" + re.sub(r"\W+", "_", name))
        info = {"path": path, "flags": flags}
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            cmd = [PY, "-m", "internvl_edge", "convert", "-m", ckpt, *"-s 2048 -q w4bf16 -c cpu".split()]
            cmd += ["--out_dir", path, *flags]
            _, info["convert_s"], info["convert_peak_gb"] = timed(cmd)
            info["convert_command"] = "internvl-edge " + " ".join(cmd[3:])
        out[name] = info
    return out


def bench_ours(path: str, threads: int, repeats: int) -> dict:
    cmd = [PY, "-m", "internvl_edge", "bench", "-m", path, "--threads", str(threads), "--repeats", str(repeats)]
    out = sh(cmd + ["--profile", "--json"], stdout_only=True)
    return json.loads(out)


def bench_history(path: str, threads: int) -> dict:
    """Turn-2 prefill time after a short and a long turn 1 (history kept as KV cache)."""
    code = f"""
import json, time, numpy as np
from internvl_edge.api import load
m = load({path!r}, threads={threads})
out = {{}}
the = m.tokenizer.encode(" the")[0]
for hist in (64, 1024):
    turn1 = m.tokenizer.decode([the] * hist)  # about `hist` tokens
    times = []
    for r in range(3):
        chat = m.chat()
        chat.send(turn1, max_new_tokens=1)
        t0 = time.perf_counter()
        chat.send("And then?", max_new_tokens=1)
        times.append(time.perf_counter() - t0)
    out[str(hist)] = sorted(times)[1]
print(json.dumps(out))
"""
    out = sh([PY, "-c", code], stdout_only=True)
    return json.loads(out.strip().splitlines()[-1])


# -- transformers ----------------------------------------------------------------------------------
def bench_transformers(ckpt: str, threads: int, dtype: str) -> dict:
    code = f"""
import json, sys, time, torch
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from reference import load_reference
torch.set_num_threads({threads})
m = load_reference({ckpt!r}).to(torch.{dtype}).eval()
res = {{}}
with torch.no_grad():
    px = torch.randn(1, 3, 448, 448, dtype=torch.{dtype})
    m.get_image_features(pixel_values=px)
    t = []
    for _ in range(2):
        t0 = time.perf_counter(); m.get_image_features(pixel_values=px); t.append(time.perf_counter() - t0)
    res["vision_s_per_tile"] = min(t)
    ids = torch.randint(0, 1000, (1, 296))
    m(input_ids=ids)
    t0 = time.perf_counter(); out = m(input_ids=ids, use_cache=True)
    res["prefill_296_tps"] = 296 / (time.perf_counter() - t0)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(16):
        o = m(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = o.past_key_values if hasattr(o, "past_key_values") else o.cache
        nxt = o.logits[:, -1:].argmax(-1)
    res["decode_tps_300"] = 16 / (time.perf_counter() - t0)
print(json.dumps(res))
"""
    out = sh([PY, "-c", code], stdout_only=True)
    return json.loads(out.strip().splitlines()[-1])


# -- llama.cpp -------------------------------------------------------------------------------------
def llama_build() -> tuple[str, list[str]]:
    """(build folder, cmake options) for llama.cpp on this CPU: -DGGML_NATIVE=ON, except on a CPU with AMX,
    where this llama.cpp's AMX path for Q4_0 crashes (SIGSEGV at its ldtilecfg; SIGILL at tileloadd with
    the tile permission granted beforehand): there every x86 extension the CPU has but AMX, named one by
    one (its int8/bf16 paths are then AVX512-VNNI/-BF16's)."""
    base = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    if "amx_tile" not in flags:
        return "build", [*base, "-DGGML_NATIVE=ON"]
    extensions = {  # /proc/cpuinfo flag: ggml's cmake option
        "avx": "GGML_AVX",
        "avx2": "GGML_AVX2",
        "bmi2": "GGML_BMI2",
        "fma": "GGML_FMA",
        "f16c": "GGML_F16C",
        "avx_vnni": "GGML_AVX_VNNI",
        "avx512f": "GGML_AVX512",
        "avx512vbmi": "GGML_AVX512_VBMI",
        "avx512_vnni": "GGML_AVX512_VNNI",
        "avx512_bf16": "GGML_AVX512_BF16",
    }
    named = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for flag, option in extensions.items()]
    return "build-noamx", [*base, "-DGGML_NATIVE=OFF", *named, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"]


def llama_bin(llama: str, name: str) -> str:
    return os.path.join(llama, llama_build()[0], "bin", name)


def build_llama_cpp(work: str) -> str:
    """llama.cpp from the llama-cpp-python sdist (PyPI); returns its source folder."""
    src_root = os.path.join(work, "llama-cpp-python")
    os.makedirs(src_root, exist_ok=True)
    tars = [f for f in os.listdir(src_root) if f.endswith(".tar.gz")]
    if not tars:
        sh([PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", src_root])
        tars = [f for f in os.listdir(src_root) if f.endswith(".tar.gz")]
    top = tars[0][: -len(".tar.gz")]
    llama = os.path.join(src_root, top, "vendor", "llama.cpp")
    if not os.path.isdir(llama):
        with tarfile.open(os.path.join(src_root, tars[0])) as tf:
            tf.extractall(src_root, filter="data")
    targets = ["llama-bench", "llama-mtmd-cli", "llama-quantize"]
    if not all(os.path.isfile(llama_bin(llama, b)) for b in targets):
        folder, options = llama_build()
        sh(["cmake", "-B", folder, *options], cwd=llama)
        sh(["cmake", "--build", folder, "-j", str(os.cpu_count() or 2), "--target", *targets], cwd=llama)
    return llama


CONVERT_WRAPPER = """
import sys
sys.path.insert(0, {llama!r}); sys.path.insert(1, {gguf!r})
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # the synthetic tokenizer is Qwen2's kind
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py"] + {args!r}
convert_hf_to_gguf.main()
"""


def gguf_files(llama: str, ckpt: str, work: str, quick: bool) -> dict[str, str]:
    files = {
        "bf16": os.path.join(work, "text-bf16.gguf"),
        "q4_0": os.path.join(work, "text-q4_0.gguf"),
        "mmproj_bf16": os.path.join(work, "mmproj-bf16.gguf"),
        "mmproj_f16": os.path.join(work, "mmproj-f16.gguf"),
    }
    gguf_py = os.path.join(llama, "gguf-py")
    if importlib.util.find_spec("sentencepiece") is None:  # llama.cpp's converter imports it
        sys.exit("compare.py: llama.cpp's convert_hf_to_gguf.py needs sentencepiece: pip install sentencepiece")
    conversions = [
        ("bf16", [ckpt, "--outtype", "bf16", "--outfile", files["bf16"]]),
        ("mmproj_bf16", [ckpt, "--mmproj", "--outtype", "bf16", "--outfile", files["mmproj_bf16"]]),
        ("mmproj_f16", [ckpt, "--mmproj", "--outtype", "f16", "--outfile", files["mmproj_f16"]]),
    ]
    if quick:
        del files["mmproj_f16"]
        conversions.pop()
    for key, args in conversions:
        if key == "bf16" and quick and os.path.isfile(files["q4_0"]):
            continue
        if not os.path.isfile(files[key]):  # written under a temporary name: a file there is whole
            partial = files[key] + ".partial"
            sh([PY, "-c", CONVERT_WRAPPER.format(llama=llama, gguf=gguf_py, args=args[:-1] + [partial])])
            os.replace(partial, files[key])
    if not os.path.isfile(files["q4_0"]):
        sh([llama_bin(llama, "llama-quantize"), files["bf16"], files["q4_0"] + ".partial", "Q4_0"])
        os.replace(files["q4_0"] + ".partial", files["q4_0"])
    if quick:  # the bf16 text model is only the quantiser's input here (an 8B one is 16 GB of disk)
        bf16 = files.pop("bf16")
        if os.path.isfile(bf16):
            os.remove(bf16)
    return files


def bench_llama(llama: str, files: dict, threads: int, repeats: int, image: str) -> dict:
    bench = llama_bin(llama, "llama-bench")
    res = {}
    for model in ("q4_0", "bf16"):
        if model not in files:
            continue
        # prefill from an empty context, decode after 0 / 300 / 1500 tokens of context
        for shapes in ("-p 64,256,1024 -n 0 -d 0", "-p 0 -n 64 -d 0,300,1500"):
            cmd = [bench, "-m", files[model], "-t", str(threads), *shapes.split(), "-r", str(repeats), "-o", "json"]
            out = sh(cmd, stdout_only=True)
            for row in json.loads(out[out.index("[") : out.rindex("]") + 1]):
                depth = row.get("n_depth", 0)
                if row["n_prompt"] and not row["n_gen"] and depth == 0:
                    res[f"{model} prefill {row['n_prompt']}"] = row["avg_ts"]
                if row["n_gen"] and not row["n_prompt"]:
                    res[f"{model} decode at {depth}"] = row["avg_ts"]
    cli = llama_bin(llama, "llama-mtmd-cli")
    prompt = " ".join(["word"] * 40)
    for proj in ("mmproj_bf16", "mmproj_f16"):
        if proj not in files:
            continue
        ftls, encodes, images = [], [], []
        for _ in range(repeats):
            cmd = [cli, "-m", files["q4_0"], "--mmproj", files[proj], "--image", image, "-p", prompt, "-n", "1"]
            out = sh(cmd + ["-t", str(threads), *"--temp 0 --chat-template chatml --perf -lv 4".split()])
            encodes.append(float(re.search(r"mtmd batch encoding done in (\d+) ms", out).group(1)) / 1000)
            images.append(float(re.search(r"decoded \(batch \d+/\d+\) in (\d+) ms", out).group(1)) / 1000)
            # first-token latency from the log's own timestamps: from the start of
            # the media encoding (the short text before the image is already in) to the timing report
            # printed after the first token
            start = _log_seconds(out, "encoding mtmd batch")
            end = _log_seconds(out, "llama_perf_context_print")
            ftls.append(end - start)
        res[f"{proj} vision s/tile"] = median(encodes)
        res[f"{proj} 256 image embeddings through the LM s"] = median(images)
        res[f"{proj} FTL 1 tile + 40 words"] = median(ftls)
    return res


def _log_seconds(log: str, marker: str) -> float:
    line = next(line for line in log.splitlines() if marker in line)
    minutes, seconds, millis, micros = line.split()[0].split(".")  # m.ss.mmm.uuu since start
    return int(minutes) * 60 + int(seconds) + int(millis) / 1e3 + int(micros) / 1e6


def picture(path: str) -> str:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((448, 448, 3)) * 255).astype("uint8")).save(path)
    return path


START, END = "<!-- compare:start -->", "<!-- compare:end -->"


def _f(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def model_size(ckpt: str) -> str:
    """The factory's size name of a random checkpoint (`make-checkpoint --size`), else "custom"."""
    path = os.path.join(ckpt, "internvl_edge_factory.json")
    return json.load(open(path)).get("size", "custom") if os.path.isfile(path) else "custom"


def model_name(size: str) -> str:
    family, _, params = size.rpartition("-")  # "2b" -> InternVL3-2B, "3.5-8b" -> InternVL3.5-8B
    return f"InternVL{family or '3'}-{params.upper()}"


def markers(size: str, section: str | None = None) -> tuple[str, str]:
    """Each model size has its own section in BENCHMARKS.md (2B's keeps the original markers); `section`
    names another (`--section`: the same size measured on another machine kind)."""
    if section:
        return f"<!-- compare {section}:start -->", f"<!-- compare {section}:end -->"
    return (START, END) if size == "2b" else (f"<!-- compare {size}:start -->", f"<!-- compare {size}:end -->")


def render(results: dict, command: str) -> str:
    """The comparison as markdown: one row per system, our rows' ratios against llama.cpp Q4_0."""
    m = results.get("machine", {})
    size = results.get("size", "2b")
    start, end = markers(size, results.get("section"))
    repeats = results.get("repeats", 3)
    runs = "One run" if repeats == 1 else f"Medians of {repeats} runs"
    lines = [
        start,
        f"## Side by side: internvl-edge, llama.cpp{' and transformers' * ('transformers' in results)} "
        f"({model_name(size)} shapes)",
        "",
        f"Measured {m.get('date')} on this machine kind ({m.get('cores')} cores, {m.get('threads')} threads "
        "everywhere), random",
        f"weights with the exact {model_name(size)} shapes (`internvl-edge make-checkpoint CKPT --size {size}`), "
        "one run",
        f"after another (never concurrently). {runs} after a warm-up. Command:",
        "",
        f"    {command}",
        "",
    ]
    kernels = sorted({info["bench"]["bundle"].get("q4_kernel") for info in results.get("ours", {}).values()} - {None})
    vision = sorted(
        {info["bench"]["bundle"].get("vision_kernel") for info in results.get("ours", {}).values()} - {None}
    )
    if kernels:  # which instruction set our 4-bit kernel ran decides what "this machine kind" means here
        seen = f"CPU: {m.get('cpu')}; our 4-bit kernel: {', '.join(kernels)}"
        lines += [seen + (f"; our vision encoder: {', '.join(vision)}." if vision else "."), ""]
    if results.get("llama.cpp", {}).get("cmake"):
        lines += [f"llama.cpp built with `{results['llama.cpp']['cmake']}` (compare.py, llama_build).", ""]
    head = (
        "| system | decode tok/s @300 | decode tok/s @1500 | prefill tok/s 64 / 256 / 1024 | "
        "vision s/tile | FTL text s | FTL 1 tile + 40 tokens s | load s | peak RSS GB |"
    )
    lines += [head, "|" + "---|" * 9]
    llama = results.get("llama.cpp", {})
    for name, info in results.get("ours", {}).items():
        b = info["bench"]
        pf = " / ".join(_f(b["prefill_tps"].get(n)) for n in ("64", "256", "1024"))
        # the roofline fraction step by step (bench.py: each step against a read right after it); the one
        # against the best bandwidth sample mixes machine states
        paired = b.get("roofline_fraction_paired") or b["roofline_fraction"]
        decode, ftl, rss = b["decode_tps"], b["ftl_s"], b["peak_rss_bytes"]
        lines.append(
            f"| internvl-edge {name} | {_f(decode.get('300'))} ({100 * paired.get('300', 0):.0f}% of roofline) "
            f"| {_f(decode.get('1500'))} ({100 * paired.get('1500', 0):.0f}%) | {pf} "
            f"| {_f(b['vision_s_per_tile'], 2)} | {_f(ftl.get('text'), 2)} | {_f(ftl.get('1 tile + 40 tokens'), 2)} "
            f"| {_f(b['load_s'], 2)} | {rss / 1e9:.2f} ({rss / b['weight_bytes']:.2f}x weights) |"
        )
    for q in ("q4_0", "bf16"):
        if f"{q} decode at 0" not in llama:
            continue
        pf = " / ".join(_f(llama.get(f"{q} prefill {n}")) for n in (64, 256, 1024))
        bf16_tile, f16_tile = (
            _f(llama.get("mmproj_bf16 vision s/tile"), 2),
            _f(llama.get("mmproj_f16 vision s/tile"), 2),
        )
        vision = f"{bf16_tile} (bf16 mmproj), {f16_tile} (f16)" if q == "q4_0" else "-"
        ftl = _f(llama.get("mmproj_bf16 FTL 1 tile + 40 words"), 2) if q == "q4_0" else "-"
        at300, at1500 = _f(llama.get(f"{q} decode at 300")), _f(llama.get(f"{q} decode at 1500"))
        lines.append(f"| llama.cpp {q.upper()} | {at300} | {at1500} | {pf} | {vision} | - | {ftl} | - | - |")
    for dtype, t in results.get("transformers", {}).items():
        prefill = f"- / - / - ({_f(t.get('prefill_296_tps'))} at 296)"
        lines.append(
            f"| transformers {dtype} (eager) | {_f(t.get('decode_tps_300'))} | - | {prefill} "
            f"| {_f(t.get('vision_s_per_tile'), 2)} | - | - | - | - |"
        )
    ours = results.get("ours", {})
    ref = llama.get("q4_0 decode at 300")
    if ours and ref:
        lines += ["", "Ratios, internvl-edge / llama.cpp Q4_0 (higher is better for speeds, lower for times):", ""]
        for name, info in ours.items():
            b = info["bench"]
            parts = [f"decode @300 {b['decode_tps'].get('300', 0) / ref:.2f}x"]
            if llama.get("q4_0 decode at 1500"):
                parts.append(f"decode @1500 {b['decode_tps'].get('1500', 0) / llama['q4_0 decode at 1500']:.2f}x")
            for n in ("256", "1024"):
                if llama.get(f"q4_0 prefill {n}") and n in b["prefill_tps"]:
                    parts.append(f"prefill {n} {b['prefill_tps'][n] / llama[f'q4_0 prefill {n}']:.2f}x")
            if llama.get("mmproj_bf16 vision s/tile"):
                parts.append(f"vision time {b['vision_s_per_tile'] / llama['mmproj_bf16 vision s/tile']:.2f}x")
            if llama_ftl := llama.get("mmproj_bf16 FTL 1 tile + 40 words"):
                parts.append(f"FTL 1 tile + 40 {b['ftl_s']['1 tile + 40 tokens'] / llama_ftl:.2f}x")
            lines.append(f"- {name}: " + ", ".join(parts))
    if "history_turn2_s" in results:
        h = results["history_turn2_s"]
        lines += [
            "",
            f"History as KV cache (`--use_block_with_kv`, dynamic): turn 2 (a 16-token question) takes "
            f"{h['64']:.2f} s after a 64-token turn 1 and {h['1024']:.2f} s after a 1024-token turn 1: "
            "its prefill covers its own tokens, not the history.",
        ]
    lines += ["", end]
    return "\n".join(lines)


def write_section(path: str, section: str, size: str, name: str | None = None) -> None:
    start, end = markers(size, name)
    text = open(path).read() if os.path.isfile(path) else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_atomic(path, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: ours,history,transformers,llama")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the default bundle alone against llama.cpp Q4_0 with its bf16 mmproj; no transformers, no history "
        "(for the 1B and 8B shapes: an 8B in float32 does not fit 24 GB)",
    )
    ap.add_argument("--out", default=None, help="JSON file for the raw results (default WORK/results.json)")
    ap.add_argument("--write", default=None, help="update this markdown file's comparison section (BENCHMARKS.md)")
    ap.add_argument("--section", default=None, help="the section's name in that file (default: the model size's)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.quick:
        skip |= {"history", "transformers"}
    os.makedirs(args.work, exist_ok=True)
    out_path = args.out or os.path.join(args.work, "results.json")
    results = json.load(open(out_path)) if os.path.isfile(out_path) else {}
    results["machine"] = machine_info(args.threads)  # as `internvl-edge bench` reports it
    results["size"], results["repeats"] = model_size(args.checkpoint), args.repeats

    def save():
        write_atomic(out_path, json.dumps(results, indent=2))

    if "ours" not in skip:
        bundles = our_bundles(args.checkpoint, args.work, args.quick)
        results["ours"] = {}
        for name, info in bundles.items():
            log(f"bench ours: {name}")
            results["ours"][name] = {**info, "bench": bench_ours(info["path"], args.threads, args.repeats)}
            save()
    if "history" not in skip:
        path = os.path.join(args.work, "ours_history")
        if not os.path.isfile(os.path.join(path, "manifest.json")):
            options = "-s 2048 -q w4bf16 --use_block_with_kv --max_input_length 1100".split()
            sh([PY, "-m", "internvl_edge", "convert", "-m", args.checkpoint, *options, "--out_dir", path])
        results["history_turn2_s"] = bench_history(path, args.threads)
        save()
    if "transformers" not in skip:
        results["transformers"] = {
            d: bench_transformers(args.checkpoint, args.threads, d) for d in ("float32", "bfloat16")
        }
        save()
    if "llama" not in skip:
        llama = build_llama_cpp(args.work)
        files = gguf_files(llama, args.checkpoint, args.work, args.quick)
        tile = picture(os.path.join(args.work, "tile.png"))
        results["llama.cpp"] = bench_llama(llama, files, args.threads, args.repeats, tile)
        results["llama.cpp"]["cmake"] = " ".join(llama_build()[1])
        save()
    log(f"wrote {out_path}")
    if args.write:
        # the table covers every part (a --skip run reuses the others' saved results), so it names the full command
        # BENCHMARKS.md's placeholders (CKPT, WORK), not this machine's folders
        command = ["python", "benchmarks/compare.py", "--checkpoint", "CKPT", "--work", "WORK"]
        command += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        command += ["--quick"] * args.quick + ["--section", args.section] * bool(args.section)
        command += ["--write", os.path.basename(args.write)]
        results["section"] = args.section
        write_section(args.write, render(results, " ".join(command)), results["size"], args.section)
        log(f"updated {args.write}")


if __name__ == "__main__":
    main()
