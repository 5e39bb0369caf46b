"""`internvl-edge verify`: what a bundle's 4-bit and 8-bit choices cost, measured on its own source.

reference   the source checkpoint in float32 (verify_reference.py; or transformers' model), run on
            the probes: greedy answers (`steps` tokens each), their logits, the image embeddings
bundle      the same prompts through the bundle as `run` computes them, teacher-forced on the
            reference's answer: its logits at every answer position, its image embeddings
figures     vision, per image: cosine similarity of the embeddings reaching the decoder (min and
            mean over tokens) and their relative RMS error; decoder, per probe: top-1 agreement
            with the reference's tokens, KL(reference || bundle) mean and max, the largest
            log-prob difference over the reference's top 5, and the first step where the two
            greedy answers part (teacher forcing follows the bundle's own greedy path until its
            first disagreement, so that step is where free-running answers part)
attribution the decoder figures again with one lossy option undone in memory at a time: float
            activations in the 4-bit matmuls (the nets' accuracy_level set to 1), a float lm_head
            (the source's, applied to what the bundle feeds its lm_head), float vision (the
            reference's image embeddings) and, where the runtime keeps the KV cache in float16, a
            float32 cache; the advice names the convert flag (or runtime setting) that removes the
            largest share of the loss (mean KL)
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from .bundle import Manifest, load_manifest
from .checkpoint.identity import check_source
from .checkpoint.reader import Checkpoint
from .errors import UserError
from .generate import prefill
from .progress import Progress
from .verify_probes import ProbeSpec, builtin_probes
from .verify_reference import ReferenceProbe, ReferenceResult, lm_head_logits

DEFAULT_STEPS = 16
REFERENCES = ("onnxruntime", "transformers")
NOTHING_LOST_KL = 1e-4  # below this mean KL (nats) the bundle is as good as the reference
OPTIONS = {  # variant -> (what is undone, the convert flag that removes the loss)
    "float_activations": ("float activations in the 4-bit matmuls", "--accuracy_level 1"),
    "float_lm_head": ("float lm_head", "--lm-head-bits 0"),
    "float_vision": ("float vision encoder", "--vision-bits 0"),
    "float_kv_cache": ("float32 KV cache", "INTERNVL_EDGE_KV_CACHE=float32"),
}


@dataclass
class Probe:
    name: str
    question: str
    ids: list[int]
    pixel_values: np.ndarray | None
    tiles_per_image: list[int]
    image_labels: list[str]
    image_rows: np.ndarray


# -- figures -------------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def decoder_figures(ref_logits: np.ndarray, tokens: list[int], logits: np.ndarray) -> dict:
    """Teacher-forced figures of one probe: logits [steps, vocab] of the reference and of the bundle."""
    lr, lo = _log_softmax(ref_logits), _log_softmax(logits)
    agree = np.argmax(logits, axis=-1) == np.asarray(tokens)
    kl = np.maximum((np.exp(lr) * (lr - lo)).sum(axis=-1), 0.0)
    top5 = np.argsort(-ref_logits, axis=-1, kind="stable")[:, :5]
    diff = np.abs(np.take_along_axis(lo, top5, -1) - np.take_along_axis(lr, top5, -1))
    parted = np.flatnonzero(~agree)
    return {
        "top1_agreement": float(agree.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top5_logprob_diff_max": float(diff.max()),
        "first_divergence": int(parted[0]) if len(parted) else None,
        "_agree": agree,
        "_kl": kl,
    }


def summarise(per_probe: list[dict]) -> dict:
    """All probes' steps together (each step counts once)."""
    agree = np.concatenate([p["_agree"] for p in per_probe])
    kl = np.concatenate([p["_kl"] for p in per_probe])
    parted = [p["first_divergence"] for p in per_probe if p["first_divergence"] is not None]
    return {
        "top1_agreement": float(agree.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top5_logprob_diff_max": max(p["top5_logprob_diff_max"] for p in per_probe),
        "probes_parted": len(parted),
        "first_divergence": min(parted) if parted else None,
    }


def vision_figures(ref: np.ndarray, ours: np.ndarray) -> dict:
    """Embeddings [tokens, hidden] of one image: cosine per token (min, mean) and relative RMS error."""
    ref, ours = np.asarray(ref, np.float64), np.asarray(ours, np.float64)
    cos = (ref * ours).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(ours, axis=-1), 1e-30)
    rel = np.sqrt(np.mean((ours - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-30)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "relative_rms": float(rel)}


def _public(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if not k.startswith("_")}


# -- probes --------------------------------------------------------------------------------------------
def build_probes(model, specs: list[ProbeSpec], steps: int, max_tiles: int | None) -> list[Probe]:
    """The probes as prompt ids and tiles. A built-in probe that does not fit the bundle's context
    with `steps` answer tokens gets fewer tiles (or is left out); the user's own are refused."""
    probes = []
    for spec in specs:
        tiles = max_tiles or model.max_tiles
        while True:
            media = model.images_to_media(spec.images, tiles)
            ids = model.tokenize(model.question(spec.question, media), media)
            if not spec.builtin or len(ids) + steps <= model.seq_length or tiles == 1:
                break
            tiles -= 1
        if spec.builtin and len(ids) + steps > model.seq_length:
            continue
        if len(ids) + steps > model.seq_length:
            raise UserError(
                f"probe {spec.name!r} has {len(ids)} prompt tokens; with --steps {steps} it does "
                f"not fit the bundle's seq_length {model.seq_length} (use fewer --steps or --max-tiles)"
            )
        labels = [img if isinstance(img, str) else spec.name for img in spec.images]
        rows = np.flatnonzero(np.asarray(ids) == model.tokens["img_context"])
        probes.append(Probe(spec.name, spec.question, ids, media.pixel_values, media.tiles_per_image, labels, rows))
    return probes


# -- the bundle, teacher-forced ------------------------------------------------------------------------
def _lm_head_input(model) -> str:
    for node in model.graph.node:
        if node.name.startswith("/lm_head/"):
            return node.input[0]
    raise UserError("the bundle's decoder has no lm_head node; convert again")


def expose_lm_head_input(model) -> None:
    """Edit: the decoder also returns what it feeds lm_head (the float lm_head variant needs it)."""
    model.graph.output.append(helper.make_tensor_value_info(_lm_head_input(model), TensorProto.FLOAT, None))


def float_activations(model) -> None:
    """Edit: every MatMulNBits with float32 activations (accuracy_level 1), the lm_head input exposed."""
    expose_lm_head_input(model)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 1


def teacher_forced(
    model, probe: Probe, tokens: list[int], image_embeds: np.ndarray | None, hidden_name: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The bundle's logits [steps, vocab] after the prompt and after each reference token but the last,
    and (with `hidden_name`, CPU bundles) what it fed lm_head at each of those steps."""
    backend = model.backend
    embeds = np.array(backend.embed(np.asarray([probe.ids], np.int64))[0], np.float32, copy=True)
    if image_embeds is not None:
        embeds[probe.image_rows] = image_embeds
    cache = backend.new_cache(1)
    hidden_buf = None
    if hidden_name is not None:
        hidden_buf = np.zeros((1, backend.hidden), np.float32)
        cache.binding["io"].bind_output(hidden_name, "cpu", 0, np.float32, [1, backend.hidden], hidden_buf.ctypes.data)
    logits, hidden = [np.array(prefill(backend, cache, embeds), np.float32)], []
    if hidden_buf is not None:
        hidden.append(hidden_buf[0].copy())
    for t in tokens[:-1]:
        logits.append(np.array(backend.forward(cache, backend.embed(np.array([[t]], np.int64)), [1])[0], np.float32))
        if hidden_buf is not None:
            hidden.append(hidden_buf[0].copy())
    return np.stack(logits), (np.stack(hidden) if hidden else None)


def bundle_images(model, probe: Probe) -> np.ndarray | None:
    if probe.pixel_values is None:
        return None
    emb = model.backend.encode_images(probe.pixel_values)
    return np.asarray(emb, np.float32).reshape(-1, emb.shape[-1])


# -- the whole check -----------------------------------------------------------------------------------
def _load(bundle: str, threads, edits=None):
    from .api import load

    return load(bundle, threads=threads, verify=False, edits=edits)


def _sophgo_runner(manifest: Manifest) -> str:
    """Sophgo bundles run on a board or TPU-MLIR's chip simulator: which one will run it, or a one-line
    refusal where neither is (before any reference is computed)."""
    from .sophgo.bmrt import find_libraries

    chip = manifest.platform.chip
    try:
        return find_libraries(chip).description
    except UserError as e:
        raise UserError(
            f"{manifest.path} is a {chip} bundle: verify runs it on a board or TPU-MLIR's {chip} "
            f"simulator, and neither is found here ({e})"
        ) from None


def _load_with_float32_cache(bundle: str, threads):
    """The bundle loaded with its KV cache in float32 (INTERNVL_EDGE_KV_CACHE, read at load)."""
    from . import kernels

    before = os.environ.get(kernels.KV_VARIABLE)
    os.environ[kernels.KV_VARIABLE] = "float32"
    kernels.settings.cache_clear()
    try:
        return _load(bundle, threads)
    finally:
        if before is None:
            os.environ.pop(kernels.KV_VARIABLE, None)
        else:
            os.environ[kernels.KV_VARIABLE] = before
        kernels.settings.cache_clear()


def _options_in_use(manifest: Manifest, ckpt: Checkpoint) -> dict:
    o = manifest.settings
    source_half = {"BF16": "bf16", "F16": "f16"}.get(ckpt.storage_dtype, "f32")
    w4 = o.decoder_weight_bits == 4 or o.lm_head_bits > 0
    return {
        "float_activations": w4 and o.accuracy_level == 4,
        "float_lm_head": o.lm_head_bits > 0,
        "float_vision": o.vision_bits == 8 or o.store not in ("f32", source_half),
        "float_kv_cache": False,  # the runtime's choice, known once the bundle is loaded
    }


def _advice(decoder: dict, variants: dict, in_use: dict, manifest: Manifest, options: dict = OPTIONS) -> str:
    base = decoder["kl_mean"]
    if base < NOTHING_LOST_KL and decoder["top1_agreement"] == 1.0:
        return "nothing to fix: the bundle agrees with the float reference on every probe"
    gains = {k: base - v["kl_mean"] for k, v in variants.items()}
    best = max(gains, key=gains.get) if gains else None
    if best is not None and gains[best] > 0.25 * base:
        what, flag = options[best]
        share = 100 * gains[best] / base
        if in_use[best]:
            how = f"convert with {flag}" if flag.startswith("--") else f"run with {flag}"
            return f"the {what} would remove {share:.0f}% of the loss (mean KL): {how}"
        return (
            f"the bundle's {what.replace('float ', '')} differs from the source more than its precision "
            f"explains ({share:.0f}% of the loss): convert again"
        )
    if manifest.settings.decoder_weight_bits == 4:
        return (
            "most of the loss is in the 4-bit decoder weights themselves, which no option undoes: "
            "convert with -q bf16 (4x the decoder's size) if it matters"
        )
    return "the loss is in the decoder's weights as stored: convert with -q f32 to remove it"


def verify(
    bundle: str,
    checkpoint: str,
    images: list[str] = (),
    prompts: list[str] = (),
    steps: int = DEFAULT_STEPS,
    reference: str = "onnxruntime",
    max_tiles: int | None = None,
    threads: int | None = None,
    builtin: bool = True,
    progress: Progress | None = None,
) -> dict:
    from .api import Model
    from .tokenizer import TextTokenizer
    from .verify_probes import user_probes

    progress = progress or Progress("[verify] ")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if reference not in REFERENCES:
        raise UserError(f"--reference {reference} is not known; choose {' or '.join(REFERENCES)}")
    manifest = load_manifest(bundle)
    if not os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint {checkpoint} is not a folder; pass the checkpoint the bundle was converted from")
    ckpt = Checkpoint(checkpoint)
    progress.step("checking the checkpoint is the bundle's source")
    checked = check_source(manifest.source.get("identity"), ckpt, manifest.path, progress.update)
    progress.done("" if checked else "(the bundle records no source identity: not checked)")
    cpu = manifest.platform.is_cpu
    if not cpu:
        progress.stream.write(f"[verify] the bundle runs on {_sophgo_runner(manifest)}\n")

    model = Model(manifest, None, TextTokenizer(manifest.config_dir), manifest.config_dir)
    specs = (builtin_probes() if builtin else []) + user_probes(list(images), list(prompts))
    if not specs:
        raise UserError("no probes: give --image or --prompts, or keep the built-in probes")
    probes = build_probes(model, specs, steps, max_tiles)
    if not probes:
        raise UserError(
            f"no probe fits the bundle's seq_length {model.seq_length} with --steps {steps}; use fewer --steps"
        )

    progress.step(f"reference ({reference}), {len(probes)} probes x {steps} tokens")
    if reference == "transformers":
        from .verify_reference_hf import TransformersReference

        ref_model = TransformersReference(ckpt, model.tokens["img_context"], threads)
    else:
        from .verify_reference import OrtReference

        ref_model = OrtReference(ckpt, threads, progress.update)
    ref_name = ref_model.name
    refs: list[ReferenceResult] = ref_model.generate(
        [ReferenceProbe(p.ids, p.pixel_values, p.image_rows) for p in probes], steps
    )
    del ref_model
    gc.collect()
    progress.done()

    in_use = _options_in_use(manifest, ckpt)
    progress.step("bundle, teacher-forced on the reference's answers")
    if cpu:
        model = _load(bundle, threads, edits={"decoder": expose_lm_head_input})
        hidden_name = _lm_head_input_of(manifest)
    else:
        model = _load(bundle, threads)  # Sophgo: no in-memory edits, so no attribution
        hidden_name = None
    ran_on = model.backend.runs_on
    in_use["float_kv_cache"] = np.dtype(getattr(model.backend, "kv_dtype", np.float32)) == np.float16
    options = dict(OPTIONS)
    bf16_vision = str(getattr(model.backend, "vision_kernel", "")).startswith("internvl-edge bf16")
    if bf16_vision and manifest.settings.vision_bits != 8:
        # the encoder's float weights run as bfloat16 products on this CPU (kernels/bf16gemm.h): a loss
        # of the runtime's, not of the bundle's, which the environment undoes
        in_use["float_vision"] = True
        options["float_vision"] = ("float32 vision encoder", "INTERNVL_EDGE_BF16=none")
    vision, ours_images, per_probe, hidden = [], [], [], []
    for i, (p, r) in enumerate(zip(probes, refs, strict=True)):
        img = bundle_images(model, p)
        ours_images.append(img)
        if img is not None:
            start = 0
            for label, tiles in zip(p.image_labels, p.tiles_per_image, strict=True):
                n = tiles * manifest.facts.num_image_token
                figures = vision_figures(r.image_embeds[start : start + n], img[start : start + n])
                vision.append({"probe": p.name, "image": label, "tiles": tiles, **figures})
                start += n
        logits, h = teacher_forced(model, p, r.tokens, img, hidden_name)
        per_probe.append(
            {
                "probe": p.name,
                "prompt_tokens": len(p.ids),
                "reference_answer": list(r.tokens),
                **decoder_figures(r.logits, r.tokens, logits),
            }
        )
        hidden.append(h)
        progress.update(i + 1, len(probes))
    progress.done()

    variants = {}
    if cpu:
        if any(p.pixel_values is not None for p in probes):
            progress.step("attribution: float vision")
            variants["float_vision"] = summarise(
                [
                    decoder_figures(r.logits, r.tokens, teacher_forced(model, p, r.tokens, r.image_embeds, None)[0])
                    if p.pixel_values is not None
                    else fig
                    for p, r, fig in zip(probes, refs, per_probe, strict=True)
                ]
            )
            progress.done()
        del model
        gc.collect()
        progress.step("attribution: float lm_head")
        variants["float_lm_head"] = summarise(
            [decoder_figures(r.logits, r.tokens, lm_head_logits(ckpt, h)) for r, h in zip(refs, hidden, strict=True)]
        )
        ckpt.release()
        progress.done()

        def undone(what: str, load_variant) -> dict:
            """The decoder figures of the bundle loaded with one option undone, teacher-forced on the
            reference's answers with the bundle's own image embeddings."""
            progress.step(f"attribution: {what}")
            variant = load_variant()
            figures = summarise(
                [
                    decoder_figures(r.logits, r.tokens, teacher_forced(variant, p, r.tokens, ours, None)[0])
                    for p, r, ours in zip(probes, refs, ours_images, strict=True)
                ]
            )
            del variant
            gc.collect()
            progress.done()
            return figures

        if in_use["float_activations"]:
            variants["float_activations"] = undone(
                "float activations in the 4-bit matmuls",
                lambda: _load(bundle, threads, edits={"decoder": float_activations}),
            )
        if in_use["float_kv_cache"]:
            variants["float_kv_cache"] = undone("float32 KV cache", lambda: _load_with_float32_cache(bundle, threads))
    decoder = summarise(per_probe)
    advice = _advice(decoder, variants, in_use, manifest, options) if cpu else None
    order = ["float_activations", "float_lm_head", "float_vision", "float_kv_cache"]
    attribution = [
        {"undone": options[k][0], "flag": options[k][1], "option_in_use": in_use[k], **variants[k]}
        for k in order
        if k in variants
    ]
    summary = {
        "top1_agreement": decoder["top1_agreement"],
        "kl_mean": decoder["kl_mean"],
        "kl_max": decoder["kl_max"],
        "top5_logprob_diff_max": decoder["top5_logprob_diff_max"],
        "first_divergence": decoder["first_divergence"],
        "vision_cosine_min": min((v["cosine_min"] for v in vision), default=None),
        "vision_relative_rms_max": max((v["relative_rms"] for v in vision), default=None),
        "probes": len(probes),
        "steps": steps,
        "reference": reference,
        "ran_on": ran_on,
        "advice": advice,
    }
    return {
        "bundle": manifest.path,
        "checkpoint": os.path.abspath(checkpoint),
        "source_checked": checked,
        "reference": ref_name,
        "ran_on": ran_on,
        "steps": steps,
        "vision": vision,
        "decoder": {"probes": [_public(p) for p in per_probe], "summary": decoder},
        "attribution": attribution,
        "advice": advice,
        "summary": summary,
    }


def record(bundle: str, report: dict) -> dict:
    """Store the report's summary (and the attribution's headline figures) in the bundle's manifest,
    which the checksums do not cover: every file stays as converted."""
    import time

    from .bundle import write_manifest

    m = load_manifest(bundle, verify=False)
    keys = ("undone", "flag", "option_in_use", "top1_agreement", "kl_mean")
    m.verification = {
        **report["summary"],
        "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "attribution": [{k: a[k] for k in keys} for a in report["attribution"]],
    }
    write_manifest(m)
    return m.verification


def summary_line(s: dict) -> str:
    vision = "" if s.get("vision_cosine_min") is None else f", vision cosine min {s['vision_cosine_min']:.4f}"
    advice = f"; {s['advice']}" if s.get("advice") else ""
    return (
        f"verify: top-1 agreement {100 * s['top1_agreement']:.1f}%, KL mean {s['kl_mean']:.4f} "
        f"max {s['kl_max']:.4f}{vision} ({s['probes']} probes x {s['steps']} tokens){advice}"
    )


def _lm_head_input_of(manifest: Manifest) -> str:
    import onnx

    return _lm_head_input(onnx.load(manifest.net_path("decoder"), load_external_data=False))


def format_report(report: dict) -> str:
    """The report as a few aligned tables for a terminal."""
    unchecked = "" if report["source_checked"] else " (not checked: the bundle records no source identity)"
    lines = [
        f"bundle     {report['bundle']}",
        f"checkpoint {report['checkpoint']}{unchecked}",
        f"reference  {report['reference']}",
        f"ran on     {report['ran_on']}, {report['steps']} tokens per answer",
        "",
    ]
    if report["vision"]:
        lines.append(f"{'vision':<24} {'tiles':>5} {'cos min':>8} {'cos mean':>9} {'rel RMS':>8}")
        for v in report["vision"]:
            lines.append(
                f"{v['probe'][:24]:<24} {v['tiles']:>5} {v['cosine_min']:>8.4f} {v['cosine_mean']:>9.4f} "
                f"{v['relative_rms']:>8.4f}"
            )
        lines.append("")
    head = f"{'decoder':<24} {'top-1':>6} {'KL mean':>9} {'KL max':>9} {'top-5 dlogp':>11} {'parts at':>8}"
    lines.append(head)

    def row(name, f):
        parted = "-" if f["first_divergence"] is None else str(f["first_divergence"])
        return (
            f"{name[:24]:<24} {100 * f['top1_agreement']:>5.1f}% {f['kl_mean']:>9.5f} {f['kl_max']:>9.5f} "
            f"{f['top5_logprob_diff_max']:>11.4f} {parted:>8}"
        )

    for p in report["decoder"]["probes"]:
        lines.append(row(p["probe"], p))
    lines.append(row("all probes", report["decoder"]["summary"]))
    if report["attribution"]:
        lines += ["", f"{'with one option undone':<24}" + head[24:]]
        for a in report["attribution"]:
            lines.append(
                row(a["undone"].replace(" in the 4-bit matmuls", ""), a)
                + ("" if a["option_in_use"] else "  (bundle already float here)")
            )
    if report["advice"]:
        lines += ["", f"advice: {report['advice']}"]
    return "\n".join(lines)
