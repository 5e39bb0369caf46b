"""`chat` as a person uses it, in a pseudo-terminal (pexpect): readline editing with the arrow keys, a
history file kept across runs, slash commands (/image with two images, /set, /stats, /system, /help),
`~` in paths, Ctrl-C stopping an answer; and the same loop through a pipe."""

from __future__ import annotations

import os
import shutil

import pytest
from test_cli import CLI, cli, with_sigint
from test_video import write_video

pexpect = pytest.importorskip("pexpect")

LEFT, UP = "\x1b[D", "\x1b[A"


def spawn(bundle_dir: str, home, *extra: str, sigint: str = "default"):
    """`chat` in a pseudo-terminal, started with SIGINT "default" (as from a terminal) or "ignored"."""
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), TERM="xterm")
    env.pop(HISTORY, None)
    cmd = with_sigint(sigint, [*CLI, "chat", "-m", bundle_dir, *extra])
    return pexpect.spawn(cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=90, dimensions=(40, 200))


HISTORY = "INTERNVL_EDGE_HISTORY"


def leave(child) -> None:
    child.expect("Question: ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_line_editing_and_history_across_runs(bundle, tmp_path):
    b = bundle("tiny_bf16", "w4bf16")
    home = tmp_path / "home"
    home.mkdir()
    child = spawn(b, home)
    child.expect("Question: ")
    child.send("/set top_k 5" + LEFT + "4\r")  # the cursor moved left: 4 lands before the 5
    child.expect("top_k = 45")
    leave(child)
    history = home / ".cache" / "internvl-edge" / "history"
    assert "/set top_k 45" in history.read_text()
    child = spawn(b, home)  # a second run recalls the first run's line with the up arrow
    child.expect("Question: ")
    child.send(UP + UP + "\r")  # /exit was the last line, /set the one before
    child.expect("top_k = 45")
    leave(child)


def test_two_images_settings_and_stats(bundle, images, tmp_path):
    b = bundle("tiny_bf16", "w4bf16")
    home = tmp_path / "home"
    (home / "my pictures").mkdir(parents=True)
    shutil.copy(images["square"], home / "my pictures" / "a cat.png")
    shutil.copy(images["square"], home / "b.png")
    child = spawn(b, home, "--max-new-tokens", "3")
    try:
        child.expect("Question: ")
        child.sendline("/stats")
        child.expect("no answer yet")
        child.expect("Question: ")
        child.sendline('/image "~/my pictures/a cat.png", $HOME/b.png')
        child.expect("2 images for the next question")
        child.expect("Question: ")
        child.sendline("/set temperature 0.7")
        child.expect("temperature = 0.7")
        child.expect("sampling on")
        child.expect("Question: ")
        child.sendline("/set top_p 2")
        child.expect("error: /set top_p: must be above 0.0 and at most 1.0")
        child.expect("Question: ")
        child.sendline("Compare the images.")  # no path prompt: the images are attached already
        child.expect("TPS: [0-9.]+ token/s")
        child.expect("Question: ")
        child.sendline("/stats")
        child.expect(
            r"FTL: [0-9.]+ s\s+TPS: [0-9.]+ token/s\s+prompt tokens: (\d+)\s+answer tokens: (\d+)\s+image tiles: 2"
        )
        assert int(child.match.group(1)) > 512 and 1 <= int(child.match.group(2)) <= 3
        child.expect("Question: ")
        child.sendline("/image ~/missing.png")
        child.expect("error: ~/missing.png: image not found")  # the path as typed
        child.expect("Question: ")
        child.sendline("/nonsense")
        child.expect("unknown command /nonsense")
        child.expect("Question: ")
        child.sendline("/help")
        child.expect("/system TEXT")
        child.expect("Question: ")
        child.sendline("Describe it.")
        child.expect("Image or Video Path: ")
        child.sendline("~/b.png")  # the seed's prompt takes ~ paths too
        child.expect("TPS: ")
        child.sendline("/stats")
        child.expect("image tiles: 1")
        child.expect("Question: ")
        child.sendcontrol("d")  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_an_answer(bundle, tmp_path, inherited):
    # the tiny model's whole context (32768): its answer runs for tens of seconds, so Ctrl-C lands in it even
    # when the machine is loaded (a 2048-token answer ended within 2 s, before the interrupt arrived).
    # "ignored": started with SIGINT ignored, as a shell without job control starts `cmd &` (CI runners do)
    b = bundle("tiny_bf16", "w4bf16", seq_length=32768)
    home = tmp_path / "home"
    home.mkdir()
    # --ignore-eos: it would run to the end of the context
    child = spawn(b, home, "--ignore-eos", sigint=inherited)
    try:
        child.expect("Question: ")
        child.sendline("Tell a long story.")
        child.expect("Image or Video Path: ")
        child.sendline("")
        child.expect("Answer: ")
        child.expect(".{20}")  # some of it has streamed
        child.sendintr()
        child.expect(r"\(stopped\)")
        child.expect("Question: ")
        child.sendline("q")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_slash_commands_through_a_pipe(bundle, images, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", "libx264", 20)
    lines = [f"/image {images['square']},{images['wide']}", "Compare them.", "/stats"]
    lines += ["/set max-tokens 2", "Hello", "", "/stats"]
    lines += [f"/video {clip} {clip}", f"/video {clip}", "What happens?", "/stats", "exit"]
    script = "\n".join(lines) + "\n"
    proc = cli("chat", "-m", bundle("tiny_bf16", "w4bf16"), "--max-new-tokens", 4, stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "2 images for the next question" in proc.stdout and "image tiles: 4" in proc.stdout  # 1 + (2 + 1)
    assert "max-tokens = 2" in proc.stdout and "answer tokens: 2" in proc.stdout
    assert proc.stdout.count("Image or Video Path: ") == 1  # asked only when nothing is attached
    assert "video: 7 evenly spaced frames" in proc.stdout and "image tiles: 7" in proc.stdout  # fitted to -s 2048
    assert "/video takes one video path, not 2" in proc.stderr
