"""`internvl-edge chat`: the seed's interactive loop (pipeline.py), on a terminal or through a pipe.

    Question: <text>          `clear` / `new` start over; `q` / `quit` / `exit` leave
    Image or Video Path: <path, empty for text only>
    Answer: <streamed>
    FTL: x s
    TPS: y token/s
"""

from __future__ import annotations

import os
import sys

from ..errors import UserError
from .common import add_generation_arguments, add_model_arguments, generation_kwargs, load_model

QUIT = {"q", "quit", "exit", "/q", "/quit", "/exit"}
CLEAR = {"clear", "new", "/clear", "/new", "/c"}
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".mpeg", ".mpg", ".m4v")


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_generation_arguments(p)
    p.add_argument("--video-frames", dest="video_frames", type=int, default=8, help="frames sampled from a video (default 8)")


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def main(args) -> int:
    model = load_model(args)
    session = model.chat(system=args.system)
    gen = generation_kwargs(args)
    history_note = "kept as KV cache" if session.keeps_history else "not kept (each question stands alone)"
    print("\n=================================================================")
    print("1. To quit, enter one of: q, quit, exit")
    print("2. To start a new conversation, enter one of: clear, new")
    print("3. At 'Image or Video Path:', press Enter for a text-only question")
    print(f"   History is {history_note}.")
    print("=================================================================")
    while True:
        question = _ask("\nQuestion: ")
        if question is None:
            print()
            return 0
        question = question.strip()
        if question in QUIT:
            return 0
        if question in CLEAR:
            session.clear()
            print("New chat session created.")
            continue
        if not question:
            print("Sorry: your question is empty!")
            continue
        path = _ask("Image or Video Path: ")
        if path is None:
            print()
            return 0
        path = path.strip().strip("'\"")
        try:
            media = None
            if path:
                if not os.path.exists(path):
                    raise UserError(f"media file not found: {path}")
                if path.lower().endswith(VIDEO_EXTENSIONS):
                    media = model.video_to_media(path, frames=args.video_frames)
                else:
                    media = model.images_to_media([path], args.max_tiles)
            print("\nAnswer: ", end="", flush=True)
            stats = None
            for chunk in session.stream(question, media=media, on_notice=_notice, **gen):
                print(chunk.text, end="", flush=True)
                stats = chunk.stats or stats
            print()
            print(f"FTL: {stats.ftl_s:.3f} s")
            print(f"TPS: {stats.decode_tps:.3f} token/s")
        except UserError as e:
            print(f"\nerror: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n(interrupted)")


def _notice(message: str) -> None:
    print(f"\nWarning: {message}", flush=True)
