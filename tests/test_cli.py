"""The command line as a user drives it: convert, run --json, chat through a pipe and on a terminal,
and one-line errors with a non-zero exit for bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import picture

from internvl_edge.api import load

CLI = [sys.executable, "-m", "internvl_edge"]


def with_sigint(disposition: str, cmd: list) -> list:
    """`cmd` started with SIGINT "default" or "ignored", whatever this process has: a CI runner that starts
    the tests with `&` (no job control) leaves it ignored, a terminal leaves the default. An exec wrapper,
    not preexec_fn: that runs Python between fork and exec, unsafe in a process with threads."""
    handler = {"default": "SIG_DFL", "ignored": "SIG_IGN"}[disposition]
    code = (
        f"import os, signal, sys; signal.signal(signal.SIGINT, signal.{handler}); os.execvp(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code, *map(str, cmd)]


def cli(*args, stdin: str | None = None, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", **(env or {}))
    return subprocess.run(
        CLI + [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("[load]", "[convert]"))]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_convert_cli_shows_progress_and_writes_a_bundle(checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = cli("convert", "-m", checkpoint("tiny_bf16"), "-s", 512, "-q", "w4bf16", "-c", "cpu", "--out_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "decoder layer 2/2" in proc.stderr and "wrote" in proc.stdout
    assert (out / "manifest.json").is_file()


def test_run_json(bundle, images):
    b = bundle("tiny_bf16", "w4bf16")
    flags = ("--json", "--logprobs", 3, "--max-new-tokens", 6)
    proc = cli("run", "-m", b, "-p", "Describe the image.", "--image", images["wide"], *flags)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"prompt_token_ids", "token_ids", "text", "logprobs", "timings"}
    assert len(out["token_ids"]) == 6 and len(out["logprobs"]) == 6
    assert all(len(step) == 3 and step[0][1] >= step[1][1] for step in out["logprobs"])
    assert set(out["timings"]) >= {"ftl_s", "decode_tps", "vision_s"} and out["timings"]["vision_s"] > 0
    # the same request through the Python API gives the same tokens
    api = load(b).generate("Describe the image.", images=[images["wide"]], max_new_tokens=6)
    assert api.token_ids == out["token_ids"] and api.prompt_token_ids == out["prompt_token_ids"]
    assert out["prompt_token_ids"].count(load(b).tokens["img_context"]) == 3 * 256


def test_run_streams_text_and_reports_speed(bundle):
    proc = cli("run", "-m", bundle("tiny_bf16", "w4bf16"), "-p", "Hello", "--max-new-tokens", 5)
    assert proc.returncode == 0, proc.stderr
    assert "FTL:" in proc.stderr and "TPS:" in proc.stderr and "token/s" in proc.stderr


def test_chat_through_a_pipe(bundle, images):
    script = "\n".join(["Describe the image.", images["square"], "clear", "And now?", "", "exit"]) + "\n"
    proc = cli("chat", "-m", bundle("tiny_bf16", "w4bf16"), "--max-new-tokens", 4, stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Question:") == 4  # question, `clear`, question, `exit`
    assert proc.stdout.count("Image or Video Path: ") == 2
    assert proc.stdout.count("FTL:") == 2 and proc.stdout.count("TPS:") == 2
    assert "New chat session created." in proc.stdout


def test_chat_survives_bad_input_and_ends_at_eof(bundle, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    script = "\n".join(["What is this?", str(fake), "What is that?", str(tmp_path / "missing.jpg"), "Hi", ""]) + "\n"
    proc = cli("chat", "-m", bundle("tiny_bf16", "w4bf16"), "--max-new-tokens", 3, stdin=script)  # no `exit`: EOF
    assert proc.returncode == 0
    assert "not an image" in proc.stderr and "not found" in proc.stderr
    assert proc.stdout.count("FTL:") == 1


def test_chat_on_a_terminal(bundle, images):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        CLI[0],
        CLI[1:] + ["chat", "-m", bundle("tiny_bf16", "w4bf16"), "--max-new-tokens", "4"],
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect("Question: ")
        child.sendline("Describe the image.")
        child.expect("Image or Video Path: ")
        child.sendline(images["square"])
        child.expect("TPS: [0-9.]+ token/s")
        child.expect("Question: ")
        child.sendline("q")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_bad_input_gives_one_line_errors(bundle, checkpoint, tmp_path):
    b = bundle("tiny_bf16", "w4bf16")
    fake = tmp_path / "fake.jpg"
    fake.write_text("text, not a JPEG")
    buf = io.BytesIO()
    picture(400, 300).save(buf, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[:1500])
    assert_one_line_error(cli("run", "-m", b, "-p", "x", "--image", tmp_path / "nope.png"), "not found")
    assert_one_line_error(cli("run", "-m", b, "-p", "x", "--image", fake), "not an image")
    assert_one_line_error(cli("run", "-m", b, "-p", "x", "--image", truncated), "cannot be decoded")
    assert_one_line_error(cli("run", "-m", tmp_path / "no_bundle", "-p", "x"), "not found")
    assert_one_line_error(cli("run", "-m", checkpoint("tiny_bf16"), "-p", "x"), "not an internvl-edge bundle")
    assert_one_line_error(cli("run", "-m", b, "-p", "word " * 3000), "seq_length")
    assert_one_line_error(cli("run", "-m", b, "-p", "x", "--do_sample", "--top_p", "1.5"), "top_p")
    assert_one_line_error(cli("run", "-m", b, "-p", "x", "-d", "zero"), "devid")
    assert_one_line_error(cli("convert", "-m", tmp_path / "nothing", "--out_dir", tmp_path / "o"), "not found")
    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    assert_one_line_error(cli("convert", "-m", ckpt, "--out_dir", tmp_path / "o"), "unsupported checkpoint")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(cli("toolchain", "install", "--wheel", tmp_path / "missing.whl"), "no such file")


def test_images_too_many_for_the_context(bundle, images):
    b = bundle("tiny_bf16", "w4bf16", seq_length=512)
    proc = cli("run", "-m", b, "-p", "x", "--image", images["large"])  # 5 tiles = 1280 tokens > 512
    assert_one_line_error(proc, "fewer tiles")


def test_make_checkpoint_cli(tmp_path):
    out = tmp_path / "ck"
    proc = cli("make-checkpoint", out, "--weights", "awq")
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["architectures"] == ["InternVLChatModel"]
        and cfg["llm_config"]["quantization_config"]["quant_method"] == "awq"
    )
    assert_one_line_error(cli("make-checkpoint", out), "exists")
