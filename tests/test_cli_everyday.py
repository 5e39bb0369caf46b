"""The everyday command line: help texts with defaults, both flag spellings, out-of-range values and bad
inputs refused on one line before the bundle loads, `convert --force`, bundle names (`--name`, `-m NAME`,
`list`, `rm`), notices about answers (cut by the context, no visible text) and video frames fitted to
the context."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
from test_cli import assert_one_line_error, cli
from test_video import write_video

from internvl_edge.api import load
from internvl_edge.cli import build_parser
from internvl_edge.errors import UserError


def subparsers():
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_has_help_with_its_default():
    missing = []
    for name, sub in subparsers().items():
        for a in sub._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            needs_default = a.option_strings and not flag and not a.required
            if not a.help or (needs_default and "default" not in a.help.lower()):
                missing.append(f"{name} {a.option_strings or a.dest}")
    assert not missing, missing


def test_both_spellings_and_the_seeds_meaning_of_c():
    subs = subparsers()
    run, convert = subs["run"], subs["convert"]
    args = run.parse_args(["-m", "b", "-p", "x", "--max_tiles", "2", "--max-new-tokens", "3", "--top-k", "5"])
    assert (args.max_tiles, args.max_new_tokens, args.top_k) == (2, 3, 5)
    args = convert.parse_args(["-m", "ck", "--out-dir", "o", "--max-input-length", "64", "--max_tiles", "2"])
    assert (args.out_dir, args.max_input_length, args.max_tiles) == ("o", 64, 2)
    assert run.parse_args(["-m", "b", "-p", "x", "-c", "cfg"]).config_path == "cfg"  # the seed's config folder
    assert "config folder" in run.format_help() and "Not the chip" in run.format_help()
    assert convert.parse_args(["-m", "ck", "-o", "o", "-c", "bm1684x"]).chip == "bm1684x"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "-m", "b", "-p", "x", "--max-tiles", "0"], "--max-tiles"),
        (["run", "-m", "b", "-p", "x", "--top_p", "1.5"], "--top_p"),
        (["run", "-m", "b", "-p", "x", "--temperature", "-1"], "--temperature"),
        (["run", "-m", "b", "-p", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["run", "-m", "b", "-p", "x", "--video-frames", "0"], "--video-frames"),
        (["run", "-m", "b", "-p", "x", "--logprobs", "3"], "--logprobs needs --json"),
        (["chat", "-m", "b", "--threads", "0"], "--threads"),
        (["convert", "-m", "ck", "-o", "o", "--max-tiles", "0"], "--max-tiles"),
        (["convert", "-m", "ck", "-o", "o", "-s", "8"], "--seq_length"),
        (["serve", "-m", "b", "--parallel", "0"], "--parallel"),
        (["run", "-m", "b", "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_out_of_range_values_are_refused_on_one_line(argv, needle):
    assert_one_line_error(cli(*argv), needle)


def test_inputs_are_checked_before_the_bundle_loads(tmp_path):
    missing_bundle = tmp_path / "never_loaded"  # a missing bundle would be the error if it were loaded first
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(
        cli("run", "-m", missing_bundle, "-p", "x", "--image", tmp_path / "cat.jpg"), "cat.jpg: image not found"
    )
    assert_one_line_error(cli("run", "-m", missing_bundle, "-p", "x", "--image", text), "notes.txt: not an image")
    assert_one_line_error(
        cli("run", "-m", missing_bundle, "-p", "x", "--image", "https://example.com/a.jpg"), "URLs are not fetched"
    )
    assert_one_line_error(
        cli("run", "-m", missing_bundle, "-p", "x", "--video", tmp_path / "clip.mp4"), "clip.mp4: video not found"
    )
    proc = cli("run", "-m", missing_bundle, "-p", "x", "--video", text)
    assert_one_line_error(proc, "notes.txt is not a video file")
    assert "Errno" not in proc.stderr and "avcodec" not in proc.stderr
    assert_one_line_error(
        cli("run", "-m", missing_bundle, "--prompt-file", tmp_path / "q.txt"), "q.txt: file not found"
    )
    assert_one_line_error(cli("run", "-m", missing_bundle), "-p TEXT or --prompt-file")


def test_prompt_file_and_tilde_paths(bundle, images, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(images["square"], home / "pic.png")
    (home / "q.txt").write_text("Describe the image.")
    env = {"HOME": str(home)}
    b = bundle("tiny_bf16", "w4bf16")
    proc = cli(
        "run", "-m", b, "--prompt-file", "~/q.txt", "--image", "~/pic.png", "--max-new-tokens", 2, "--json", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads(proc.stdout)["prompt_token_ids"].count(load(bundle("tiny_bf16", "w4bf16")).tokens["img_context"])
        == 256
    )


def test_api_refuses_http_urls_in_its_own_words(bundle):
    model = load(bundle("tiny_bf16", "w4bf16"))
    with pytest.raises(UserError, match="not fetched from http"):
        model.generate("x", images=["https://example.com/cat.jpg"], max_new_tokens=1)


def test_an_answer_the_context_cut_says_so(bundle):
    b = bundle("tiny_bf16", "w4bf16", seq_length=64)
    proc = cli("run", "-m", b, "-p", "Hello", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["finish_reason"] == "length" and "end of the bundle's context" in out["notice"]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "context" in notes[0]
    result = load(b).generate("Hello", ignore_eos=True)
    assert result.finish_reason == "length" and "context" in result.notice
    # max_new_tokens ending it is what was asked: no notice
    limited = load(b).generate("Hello", ignore_eos=True, max_new_tokens=3)
    assert limited.finish_reason == "length" and limited.notice is None
    proc = cli("run", "-m", b, "-p", "Hello", "--ignore-eos", "--max-new-tokens", 3)
    assert proc.returncode == 0 and "note:" not in proc.stderr


def test_convert_over_a_bundle_needs_force(checkpoint, tmp_path):
    out = tmp_path / "b"
    assert cli("convert", "-m", checkpoint("tiny_bf16"), "-s", 64, "--out_dir", out).returncode == 0
    proc = cli("convert", "-m", checkpoint("tiny_bf16"), "-s", 64, "--out_dir", out)
    assert_one_line_error(proc, "--force")
    assert str(out) in proc.stderr
    proc = cli("convert", "-m", checkpoint("tiny_bf16"), "-s", 128, "-q", "bf16", "--out_dir", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert "replaced the bundle" in proc.stdout and "w4bf16" in proc.stdout  # what was there before
    assert json.loads((out / "manifest.json").read_text())["options"]["seq_length"] == 128


def test_bundle_names(checkpoint, tmp_path):
    env = {"INTERNVL_EDGE_HOME": str(tmp_path / "home")}
    proc = cli("list", env=env)
    assert proc.returncode == 0 and "no bundles" in proc.stdout
    proc = cli("convert", "-m", checkpoint("tiny_bf16"), "-s", 64, "--name", "tiny-64", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "home" / "tiny-64" / "manifest.json").is_file()
    proc = cli("list", env=env)
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    assert header.split() == ["NAME", "SOURCE", "MODE", "TARGET", "SIZE", "CONTEXT", "DATE"]
    assert row.split()[:4] == ["tiny-64", "ckpt_tiny_bf16", "w4bf16", "cpu"] and " 64 " in row
    listed = json.loads(cli("list", "--json", env=env).stdout)
    assert [b["name"] for b in listed] == ["tiny-64"] and listed[0]["context"] == 64
    proc = cli("run", "-m", "tiny-64", "-p", "Hello", "--max-new-tokens", 2, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) == 2
    assert_one_line_error(cli("run", "-m", "tiny-65", "-p", "x", env=env), "no bundle named tiny-65")
    assert_one_line_error(cli("convert", "-m", checkpoint("tiny_bf16"), "--name", "a/b", env=env), "bundle name")
    assert_one_line_error(
        cli("convert", "-m", checkpoint("tiny_bf16"), "-s", 64, "--name", "tiny-64", env=env), "--force"
    )
    assert_one_line_error(cli("rm", "nothing", env=env), "no bundle named nothing")
    proc = cli("rm", "tiny-64", env=env)
    assert proc.returncode == 0 and "removed tiny-64" in proc.stdout
    assert not (tmp_path / "home" / "tiny-64").exists()
    assert "no bundles" in cli("list", env=env).stdout


def test_video_frames_fitted_to_the_context(bundle, tmp_path):
    """The README's example on a default -s 2048 bundle: no count means as many frames as fit (7 of 8:
    8 x 256 image tokens alone fill 2048) with one line saying so; a count that does not fit is refused
    with the largest one that does."""
    b = bundle("tiny_bf16", "w4bf16")  # the default -s 2048
    clip = write_video(tmp_path / "clip.mp4", "libx264", 64)
    ask = ("run", "-m", b, "-p", "What happens in this video?", "--video", clip)
    proc = cli(*ask, "--max-new-tokens", 2)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: video:")]
    assert len(notes) == 1 and "7 evenly spaced frames" in notes[0] and "seq_length 2048" in notes[0], proc.stderr
    model = load(b)
    assert model.video_prompt_tokens("What happens in this video?", 7) < 2048 - 128
    assert model.video_prompt_tokens("What happens in this video?", 8) >= 2048
    for asked in (8, 64):
        assert_one_line_error(cli(*ask, "--video-frames", asked), "use --video-frames 7 or fewer")
    proc = cli(*ask, "--video-frames", 7, "--max-new-tokens", 2, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["video_frames"] == 7
    assert json.loads(proc.stdout)["prompt_token_ids"].count(model.tokens["img_context"]) == 7 * 256


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_random_answers_of_the_published_vocabulary_are_visible_text(tmp_path, tied):
    """The 1b/2b/8b factory path (a 151,674-id vocabulary and its tokenizer) on tiny layers: a random
    answer decodes to text, where an 837-token tokenizer left almost every id blank. Tied as the 1b
    size and InternVL3.5's small ones: a tied head at the embeddings' unit scale repeated the prompt's
    last token ("\n") and answered blank."""
    from internvl_edge.checkpoint.factory import SIZES, make_checkpoint, shapes_with

    size = shapes_with("tiny", vocab_size=SIZES["1b"].vocab_size, tie_word_embeddings=tied)
    ckpt = make_checkpoint(str(tmp_path / "ck"), size=size)
    out = tmp_path / "b"
    assert cli("convert", "-m", ckpt, "-s", 128, "--out_dir", out).returncode == 0
    proc = cli("run", "-m", out, "-p", "Describe the image.", "--max-new-tokens", 8, "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert len(answer["token_ids"]) == 8 and len(answer["text"].strip()) >= 8, answer["text"]
    assert "no visible text" not in proc.stderr


def test_an_answer_without_visible_text_is_explained(bundle, tmp_path):
    """A bundle whose tokenizer lacks most of the model's ids (as random checkpoints had): `run` says why
    the answer is blank."""
    from internvl_edge.checkpoint.factory import make_checkpoint, shapes_with
    from internvl_edge.checkpoint.synthetic_tokenizer import build_tokenizer, write_tokenizer_files

    ckpt = make_checkpoint(str(tmp_path / "ck"), size=shapes_with("tiny", vocab_size=60000), seed=5)
    write_tokenizer_files(build_tokenizer(1000), ckpt)  # the old, small tokenizer (837 of 60,000 ids)
    out = tmp_path / "b"
    assert cli("convert", "-m", ckpt, "-s", 128, "--out_dir", out).returncode == 0
    proc = cli("run", "-m", out, "-p", "Hello", "--max-new-tokens", 6, "--ignore-eos")
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.strip()  # seed 5's answer: ids beyond the tokenizer only
    notes = [line for line in proc.stderr.splitlines() if "no visible text" in line]
    assert len(notes) == 1 and "does not have" in notes[0], proc.stderr


def test_a_broken_config_file_is_named_in_words(bundle, tmp_path):
    """`run -c` (the seed's config folder) with a generation_config.json that is not JSON: one line naming
    the file and what is wrong with it, no parser internals."""
    config = tmp_path / "config"
    shutil.copytree(os.path.join(bundle("tiny_bf16", "w4bf16"), "config"), config)
    (config / "generation_config.json").write_text('{"temperature": 0.7,')
    proc = cli("run", "-m", bundle("tiny_bf16", "w4bf16"), "-c", config, "-p", "x")
    assert_one_line_error(proc, "generation_config.json: not valid JSON (line 1")
    assert "Errno" not in proc.stderr
