"""Conversion: bundle contents, manifest and checksums, atomic writing, and what is refused."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from internvl_edge.api import load
from internvl_edge.bundle import MANIFEST, load_manifest
from internvl_edge.checkpoint.reader import Checkpoint
from internvl_edge.convert import ConvertOptions, convert
from internvl_edge.errors import UserError
from internvl_edge.progress import Progress

QUIET = Progress(enabled=False)


def test_bundle_layout_and_manifest(bundle):
    path = bundle("tiny_bf16", "w4bf16", do_sample=True)
    m = load_manifest(path)
    assert m.format == "internvl-edge-bundle" and m.version == 1
    assert set(m.nets) == {"vision", "embedding", "decoder", "greedy_head", "sample_head"}
    for net in m.nets.values():
        assert os.path.isfile(os.path.join(path, net["file"]))
        assert net["inputs"] and net["outputs"]
    decoder_inputs = [i["name"] for i in m.nets["decoder"]["inputs"]]
    assert decoder_inputs[:4] == ["inputs_embeds", "seqlens_k", "total_sequence_length", "query_seqlens"]
    assert m.nets["vision"]["outputs"][0]["shape"][1:] == [256, 128]
    for cfg in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert cfg in os.listdir(os.path.join(path, "config")) and f"config/{cfg}" in m.files
    assert m.options["quantize"] == "w4bf16" and m.options["seq_length"] == 2048 and m.options["do_sample"]
    assert m.source["format"] == "original" and m.source["dtype"] == "BF16"
    from internvl_edge.tokenizer import TextTokenizer

    assert m.model["tokens"]["img_context"] == TextTokenizer(m.source["path"]).img_context_id
    # the sections parsed once, as the run side reads them
    assert m.facts.hidden_size == m.model["hidden_size"] == 128 and m.facts.tokens == m.model["tokens"]
    assert (m.settings.quantize, m.settings.seq_length, m.settings.do_sample) == ("w4bf16", 2048, True)
    assert m.settings.kv_capacity == m.options["kv_capacity"] and m.settings.dynamic is True
    assert (m.platform.chip, m.platform.backend, m.platform.is_cpu) == ("cpu", "onnxruntime", True)
    assert "facts" not in json.loads(m.to_json())  # derived, not written
    # every decoder layer linear is a 4-bit MatMulNBits, lm_head an 8-bit one (the w4 default)
    import onnx

    graph = onnx.load(os.path.join(path, "decoder.onnx"), load_external_data=False).graph
    bits = {n.name: dict((a.name, a.i) for a in n.attribute)["bits"] for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits.pop("/lm_head/MatMulNBits") == 8 and m.options["lm_head_bits"] == 8
    assert len(bits) == 4 * 2 and set(bits.values()) == {4}
    assert not [n.name for n in graph.node if n.op_type == "MatMul"]


def test_awq_keeps_float16_and_its_4bit_values(bundle):
    m = load_manifest(bundle("tiny_awq", "w4bf16"))
    assert m.options["quantize"] == "w4f16"  # as TPU-MLIR: AWQ checkpoints keep their f16 tensors
    assert m.source["awq"]["group_size"] == 128


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_damaged_and_foreign_bundles_are_refused(bundle, tmp_path):
    path = _copy(bundle("tiny_bf16", "f32"), tmp_path / "b")
    load_manifest(path)  # fine, and now stamped as verified
    data = os.path.join(path, "decoder.data")
    with open(data, "r+b") as f:  # flip one byte, same size
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(UserError, match="fails its checksum"):
        load_manifest(path)
    os.truncate(data, 100)
    with pytest.raises(UserError, match="bytes, expected"):
        load_manifest(path)
    os.remove(data)
    with pytest.raises(UserError, match="missing"):
        load_manifest(path)
    with pytest.raises(UserError, match="not an internvl-edge bundle"):
        load_manifest(str(tmp_path))
    manifest = json.loads(open(os.path.join(path, MANIFEST)).read())
    manifest["version"] = 99
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(UserError, match="newer"):
        load_manifest(path)
    manifest["version"] = 1
    del manifest["model"]["num_layers"]
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(UserError, match=r"lacks 'num_layers'; convert again"):
        load_manifest(path)
    manifest["model"]["num_layers"] = "two"
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(UserError, match="malformed entry .*convert again"):
        load_manifest(path)
    with open(os.path.join(path, MANIFEST), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_manifest(path)


def test_failed_conversion_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    import internvl_edge.convert as conv

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(conv, "build_decoder", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        convert(ConvertOptions(checkpoint("tiny_bf16"), str(out), seq_length=256), progress=QUIET)
    assert os.listdir(tmp_path) == []


def test_failed_reconversion_keeps_the_old_bundle(bundle, checkpoint, tmp_path, monkeypatch):
    import internvl_edge.convert as conv

    path = _copy(bundle("tiny_bf16", "f32"), tmp_path / "b")
    before = load_manifest(path).files
    monkeypatch.setattr(conv, "build_decoder", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError):
        convert(ConvertOptions(checkpoint("tiny_bf16"), path, seq_length=256), progress=QUIET)
    assert load_manifest(path).files == before
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_refuses_to_overwrite_a_user_folder(checkpoint, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an internvl-edge bundle"):
        convert(ConvertOptions(checkpoint("tiny_bf16"), str(folder), seq_length=256), progress=QUIET)
    assert (folder / "notes.txt").read_text() == "keep me"


def _edited_checkpoint(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    edit(cfg)
    json.dump(cfg, open(path, "w"))
    return str(dst)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c.update(architectures=["LlavaForConditionalGeneration"], model_type="llava"),
            "unsupported checkpoint",
        ),
        (
            lambda c: c["llm_config"].update(architectures=["InternLM2ForCausalLM"], model_type="internlm2"),
            "not supported",
        ),
        (
            lambda c: c["llm_config"].update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"),
            "Qwen3MoeForCausalLM is a mixture-of-experts",
        ),
        (
            lambda c: c["llm_config"].update(architectures=["GptOssForCausalLM"], model_type="gpt_oss"),
            "GptOssForCausalLM is a mixture-of-experts",
        ),
        (lambda c: c["llm_config"].update(quantization_config={"quant_method": "gptq", "bits": 4}), "gptq"),
        (lambda c: c["llm_config"].update(rope_scaling={"rope_type": "yarn", "factor": 4}), "yarn"),
        (lambda c: c.update(ps_version="v9"), "ps_version"),
        (lambda c: c.pop("llm_config"), "llm_config"),
    ],
)
def test_unsupported_checkpoints_are_one_line_errors(checkpoint, tmp_path, edit, message):
    src = _edited_checkpoint(checkpoint("tiny_bf16"), tmp_path / "ckpt", edit)
    with pytest.raises(UserError, match=message) as e:
        convert(ConvertOptions(src, str(tmp_path / "out"), seq_length=256), progress=QUIET)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_missing_pieces_are_one_line_errors(checkpoint, tmp_path):
    with pytest.raises(UserError, match="not found"):
        Checkpoint(str(tmp_path / "nothing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        Checkpoint(str(empty))
    src = _edited_checkpoint(checkpoint("tiny_bf16"), tmp_path / "bin", lambda c: None)
    os.rename(os.path.join(src, "model.safetensors"), os.path.join(src, "pytorch_model.bin"))
    with pytest.raises(UserError, match="only safetensors"):
        Checkpoint(src)
    cut = _edited_checkpoint(checkpoint("tiny_bf16"), tmp_path / "cut", lambda c: None)
    weights = os.path.join(cut, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    with pytest.raises(UserError, match="truncated"):
        convert(ConvertOptions(cut, str(tmp_path / "out"), seq_length=256), progress=QUIET)
    with pytest.raises(UserError, match="max_position_embeddings"):
        convert(ConvertOptions(checkpoint("tiny_bf16"), str(tmp_path / "o2"), seq_length=10**6), progress=QUIET)


def test_sharded_checkpoint_with_index(checkpoint, tmp_path):
    from internvl_edge.checkpoint.factory import make_checkpoint

    sharded = make_checkpoint(str(tmp_path / "sharded"), size="tiny", weights="bf16", seed=0, shard_bytes=300_000)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    one, many = Checkpoint(checkpoint("tiny_bf16")), Checkpoint(sharded)
    for name in ("language_model.lm_head.weight", "vision_model.encoder.layers.1.attn.qkv.weight", "mlp1.3.bias"):
        assert np.array_equal(one.f32(name), many.f32(name))


def test_checkpoint_saved_by_transformers_converts(checkpoint, tmp_path):
    """transformers' own save_pretrained output (its current key names) converts and matches it."""
    from reference import load_reference

    ref = load_reference(checkpoint("tiny_hf"))
    saved = tmp_path / "saved"
    ref.save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(checkpoint("tiny_hf"), name), saved / name)
    out = convert(ConvertOptions(str(saved), str(tmp_path / "b"), seq_length=256, quantize="f32"), progress=QUIET)
    model = load(out.path)
    ids = [5, 17, 99, 250, 3]
    prepared = model.prepare("hi")  # any text; we feed ids directly below
    cache = model.backend.new_cache(1)
    from internvl_edge.generate import prefill

    ours = prefill(model.backend, cache, model.backend.embed(np.array([ids]))[0])
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(ours - theirs).max() < 1e-3
    assert prepared.input_ids


def test_int8_vision_encoder_is_recorded_and_close_to_float(bundle, images):
    """--vision-bits 8 (DynamicQuantizeMatMul: int8 weights per column, int8 activations per call)
    costs about 1% of the image embeddings' RMS on these models; recorded in the manifest."""
    exact, fast = load(bundle("odd_bf16", "f32")), load(bundle("odd_bf16", "f32", vision_bits=8))
    assert fast.manifest.options["vision_bits"] == 8 and exact.manifest.options["vision_bits"] == 0
    px = exact.images_to_media([images["wide"]]).pixel_values
    a, b = exact.backend.encode_images(px), fast.backend.encode_images(px)
    rel = np.sqrt(((a - b) ** 2).mean() / (a**2).mean())
    assert 0 < rel < 0.05, rel
    import onnx

    ops = {n.op_type for n in onnx.load(fast.manifest.net_path("vision"), load_external_data=False).graph.node}
    assert "DynamicQuantizeMatMul" in ops


@pytest.mark.parametrize("group", [0, 32])
def test_4bit_block_size_default_and_flag(bundle, group):
    """-g picks the 4-bit block of the weights we quantise; without it the CPU target uses 128."""
    import onnx

    options = {"q_group_size": group} if group else {}
    model = load(bundle("tiny_bf16", "w4bf16", **options))
    expected = group or 128
    assert model.manifest.options["q_group_size"] == expected
    graph = onnx.load(model.manifest.net_path("decoder"), load_external_data=False).graph
    blocks = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "block_size" and any(b.name == "bits" and b.i == 4 for b in n.attribute)
    }
    assert blocks == {expected}


def test_large_tensors_are_converted_in_chunks_with_the_same_result(monkeypatch):
    """lm_head and the embedding table are quantised / rounded a block of rows at a time from the
    stored bf16 (so an 8B conversion never holds them whole in float32): the result is the same as
    converting the whole float32 matrix at once."""
    from internvl_edge.checkpoint.safetensors import RawTensor, bf16_bits
    from internvl_edge.nets import quant
    from internvl_edge.nets.linear import stored, stored_rows

    rng = np.random.default_rng(0)
    w = rng.standard_normal((301, 256)).astype(np.float32)
    raw = RawTensor("BF16", bf16_bits(w))
    whole = {bits: quant.quantize(raw.to_float32(), bits, 128) for bits in (4, 8)}
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 256 * 40)  # 40 rows at a time: 8 chunks, the last short
    for bits, expected in whole.items():
        chunked = quant.quantize(raw, bits, 128)
        for field in ("packed", "scales", "zero_points"):
            assert np.array_equal(getattr(chunked, field), getattr(expected, field)), (bits, field)
    for store in ("bf16", "f16", "f32"):
        got, elem = stored_rows(raw, store, rows=37)
        want, want_elem = stored(raw.to_float32(), store)
        assert elem == want_elem and got.dtype == want.dtype and np.array_equal(got, want)
