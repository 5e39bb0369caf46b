"""`internvl-edge chat`: the seed's interactive loop (pipeline.py), on a terminal or through a pipe.

    Question: <text>          `clear` / `new` start over; `q` / `quit` / `exit` leave
    Image or Video Path: <paths, space- or comma-separated; empty for text only>
    Answer: <streamed>
    FTL: x s
    TPS: y token/s

On a terminal, lines are edited with readline (arrows, Ctrl-A/E, ...) and questions are kept in a
history file across runs. Slash commands (`/help` lists them) attach images or a video to the next
question, set the system prompt and sampling settings, and show the last answer's figures. Ctrl-C
stops an answer (or clears the line), Ctrl-D leaves.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys

from ..errors import UserError
from .common import (
    add_generation_arguments,
    add_model_arguments,
    check_image_file,
    check_video_file,
    expand_path,
    float_in,
    generation_kwargs,
    int_at_least,
    load_model,
)

QUIT = {"q", "quit", "exit", "/q", "/quit", "/exit", "/bye"}
CLEAR = {"clear", "new", "/clear", "/new", "/c"}
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".mpeg", ".mpg", ".m4v")
HISTORY_VARIABLE = "INTERNVL_EDGE_HISTORY"
HISTORY_LINES = 1000

# /set NAME VALUE: the setting, its generation keyword and how its value is read (argparse types: one rule)
SETTINGS = {
    "temperature": ("temperature", float_in(0.0)),
    "top_k": ("top_k", int_at_least(0)),
    "top_p": ("top_p", float_in(0.0, 1.0, low_open=True)),
    "repetition_penalty": ("repetition_penalty", float_in(0.0, low_open=True)),
    "seed": ("seed", int_at_least(0)),
    "max-tokens": ("max_new_tokens", int_at_least(1)),
    "max-tiles": ("max_tiles", int_at_least(1)),
    "sample": ("do_sample", None),
}
HELP = """commands:
  /image PATH...      images for the next question (space- or comma-separated; quote paths with spaces)
  /video PATH         a video for the next question
  /system TEXT        set the system prompt (starts a new conversation); /system alone shows it
  /set NAME VALUE     temperature, top_k, top_p, repetition_penalty, seed, max-tokens, max-tiles,
                      sample on|off; /set alone shows them all (a temperature above 0 turns sampling on)
  /clear              start a new conversation (also: clear, new)
  /stats              the last answer's FTL, TPS and token counts
  /help               this list
  /exit               leave (also: q, quit, exit, Ctrl-D); Ctrl-C stops an answer"""


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_generation_arguments(p)
    p.add_argument(
        "--video-frames",
        dest="video_frames",
        type=int_at_least(1),
        default=None,
        help="frames sampled from a video (default: as many as fit the context, up to 8)",
    )
    p.add_argument(
        "--history-file",
        dest="history_file",
        default=None,
        help="where a terminal session keeps its questions (default: $INTERNVL_EDGE_HISTORY, else "
        "~/.cache/internvl-edge/history; 'none' keeps none)",
    )


def history_path(flag: str | None) -> str | None:
    from ..bundle import user_cache_dir

    path = flag or os.environ.get(HISTORY_VARIABLE) or os.path.join(user_cache_dir(), "history")
    return None if path.lower() == "none" else expand_path(path)


class LineEditor:
    """input() with readline's editing and a history file when stdin is a terminal; plain input()
    through a pipe (no escape sequences, nothing written)."""

    def __init__(self, path: str | None):
        self.readline = None
        self.path = path
        if not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input
            return
        self.readline = readline
        readline.set_history_length(HISTORY_LINES)
        if path and os.path.isfile(path):
            try:
                readline.read_history_file(path)
            except OSError:
                pass  # an unreadable history is no reason to refuse to chat

    def ask(self, prompt: str) -> str | None:
        """A line, or None at end of input (Ctrl-D)."""
        try:
            return input(prompt)
        except EOFError:
            return None

    def save(self) -> None:
        if self.readline is None or not self.path:
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.readline.write_history_file(tmp)
            os.replace(tmp, self.path)  # atomically: two sessions never leave half a file
        except OSError as e:
            print(f"note: the chat history was not saved to {self.path} ({e.strerror or e})", file=sys.stderr)


def split_paths(line: str) -> list[str]:
    """`a.jpg b.jpg`, `a.jpg, b.jpg`, `"my cat.jpg" dog.jpg`, `my\\ cat.jpg` -> paths (`~` and $VARS are
    expanded when each is checked).
    A line that is one existing path as it stands (spaces and all) is that path, as the seed took it."""
    whole = line.strip().strip("'\"")
    if whole and os.path.exists(expand_path(whole)):
        return [whole]
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace += ","
    lexer.whitespace_split = True
    try:
        return list(lexer)  # expanded when checked, so that errors show the path as typed
    except ValueError as e:  # an unclosed quote
        raise UserError(f"cannot read the paths ({e}): {line.strip()}") from None


class Chat:
    def __init__(self, model, args):
        self.model = model
        self.args = args
        self.gen = generation_kwargs(args)
        self.max_tiles = args.max_tiles
        self.system = args.system
        self.session = model.chat(system=self.system)
        self.images: list[str] = []
        self.video: str | None = None
        self.last = None  # the last answer's Stats

    # -- media ----------------------------------------------------------------------------------------
    def attach(self, paths: list[str]) -> None:
        """Check and keep the media of the next question (one video, or images)."""
        videos = [p for p in paths if p.lower().endswith(VIDEO_EXTENSIONS)]
        if videos and len(paths) > 1:
            raise UserError("give one video, or images, not both")
        if videos:
            self.video, self.images = check_video_file(videos[0], flag=""), []
        else:
            self.images, self.video = [check_image_file(p, flag="") for p in paths], None

    def media(self, question: str):
        if self.video:
            frames, why = self.model.fit_video_frames(question, self.args.video_frames, self.system)
            print(why)
            return self.model.video_to_media(self.video, frames=frames)
        if self.images:
            return self.model.images_to_media(self.images, self.max_tiles)
        return None

    # -- commands -------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False: leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name == "/help" or name == "/?":
            print(HELP)
        elif name == "/image":
            if not rest:
                raise UserError("/image needs one or more image paths")
            self.attach(split_paths(rest))
            print(f"{len(self.images)} image{'s' if len(self.images) != 1 else ''} for the next question")
        elif name == "/video":
            if not rest:
                raise UserError("/video needs a video path")
            paths = split_paths(rest)
            if len(paths) > 1:
                raise UserError(f"/video takes one video path, not {len(paths)}: ask about each video in its own turn")
            self.video, self.images = check_video_file(paths[0], flag=""), []
            print("a video for the next question")
        elif name == "/system":
            if rest:
                self.system = rest
                self.session = self.model.chat(system=rest)
                print("system prompt set; new chat session created.")
            else:
                print(f"system prompt: {self.system or '(the model default)'}")
        elif name == "/set":
            self.set(rest)
        elif name == "/stats":
            self.stats()
        else:
            raise UserError(f"unknown command {name}; /help lists the commands")
        return True

    def set(self, rest: str) -> None:
        parts = rest.split()
        if not parts:
            for key, (kw, _) in SETTINGS.items():
                value = self.max_tiles if kw == "max_tiles" else self.gen.get(kw)
                print(f"  {key} = {'(default)' if value is None else value}")
            return
        key = parts[0].replace("-", "_") if parts[0].replace("-", "_") in SETTINGS else parts[0].replace("_", "-")
        if key not in SETTINGS or len(parts) != 2:
            raise UserError(f"/set {rest}: give one of {', '.join(SETTINGS)} and a value, e.g. /set temperature 0.7")
        kw, parse = SETTINGS[key]
        if parse is None:
            if parts[1].lower() not in ("on", "off", "true", "false", "1", "0"):
                raise UserError(f"/set {key} takes on or off")
            value = parts[1].lower() in ("on", "true", "1")
        else:
            try:
                value = parse(parts[1])
            except argparse.ArgumentTypeError as e:
                raise UserError(f"/set {key}: {e}") from None
        if kw == "max_tiles":
            self.max_tiles = value
        else:
            self.gen[kw] = value
        print(f"{key} = {value}")
        if kw == "temperature" and (value > 0) != bool(self.gen.get("do_sample")):
            self.gen["do_sample"] = value > 0
            print("sampling " + ("on" if value > 0 else "off (greedy)"))

    def stats(self) -> None:
        s = self.last
        if s is None:
            print("no answer yet")
            return
        print(
            f"FTL: {s.ftl_s:.3f} s  TPS: {s.decode_tps:.3f} token/s  prompt tokens: {s.prompt_tokens}  "
            f"answer tokens: {s.generated_tokens}  image tiles: {s.num_tiles}  vision: {s.vision_s:.3f} s"
        )

    # -- one question ---------------------------------------------------------------------------------
    def answer(self, question: str) -> None:
        try:
            media = self.media(question)
        finally:
            self.images, self.video = [], None  # media belong to one question, used or refused
        print("\nAnswer: ", end="", flush=True)
        stats = None
        chunks = self.session.stream(question, media=media, on_notice=_notice, **self.gen)
        try:
            for chunk in chunks:
                print(chunk.text, end="", flush=True)
                stats = chunk.stats or stats
                if chunk.notice:
                    print(f"\nnote: {chunk.notice}", end="")
        except KeyboardInterrupt:
            chunks.close()
            print("\n(stopped)" + ("; the conversation was cleared" if self.session.keeps_history else ""))
            self.session.clear()
            return
        print()
        self.last = stats
        print(f"FTL: {stats.ftl_s:.3f} s")
        print(f"TPS: {stats.decode_tps:.3f} token/s")


def catch_ctrl_c() -> None:
    """Ctrl-C on a terminal stops an answer even when this process started with SIGINT ignored, as a
    shell without job control starts a command run with `&`: Python then keeps the inherited SIG_IGN
    instead of raising KeyboardInterrupt (https://docs.python.org/3/library/signal.html, "General
    rules"), and the keys would do nothing. Through a pipe the inherited disposition is left alone."""
    if sys.stdin.isatty() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(args) -> int:
    catch_ctrl_c()
    model = load_model(args)
    chat = Chat(model, args)
    editor = LineEditor(history_path(args.history_file))
    history_note = "kept as KV cache" if chat.session.keeps_history else "not kept (each question stands alone)"
    print("\n=================================================================")
    print("1. To quit, enter one of: q, quit, exit (or press Ctrl-D)")
    print("2. To start a new conversation, enter one of: clear, new")
    print("3. At 'Image or Video Path:', press Enter for a text-only question;")
    print("   several images: a.jpg b.jpg (or a.jpg, b.jpg; quote paths with spaces)")
    print("4. /help lists the commands (/image, /video, /system, /set, /stats, ...)")
    print(f"   History is {history_note}.")
    print("=================================================================")
    try:
        while True:
            try:
                if not turn(chat, editor):
                    return 0
            except KeyboardInterrupt:  # at a prompt: drop the line, as a shell does
                print()
            except UserError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
    finally:
        editor.save()


def turn(chat: Chat, editor: LineEditor) -> bool:
    """One prompt: a command or a question with its media. False: leave."""
    line = editor.ask("\nQuestion: ")
    if line is None:
        print()
        return False
    line = line.strip()
    if line in QUIT:
        return False
    if line in CLEAR:
        chat.session.clear()
        chat.images, chat.video = [], None
        print("New chat session created.")
        return True
    if line.startswith("/"):
        return chat.command(line)
    if not line:
        print("Sorry: your question is empty!")
        return True
    if not chat.images and not chat.video:
        path = editor.ask("Image or Video Path: ")
        if path is None:
            print()
            return False
        if path.strip():
            chat.attach(split_paths(path))
    chat.answer(line)
    return True


def _notice(message: str) -> None:
    print(f"\nWarning: {message}", flush=True)
