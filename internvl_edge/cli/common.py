"""Flags shared by the commands that run a bundle (run, chat, bench, serve), range-checked flag types,
and the checks of input files made before a bundle loads."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys

from ..errors import UserError


def int_at_least(low: int):
    """An argparse type: an integer >= low (`--max-tiles 0` is refused, not taken as 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: a float in [low, high] ((low, high] with `low_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or math.isnan(value):
            bound = f"above {low}" if low_open else f"at least {low}"
            raise argparse.ArgumentTypeError(
                f"must be {bound}{f' and at most {high}' if high is not None else ''}, got {text}"
            )
        return value

    return parse


def expand_path(path: str) -> str:
    """`~` and environment variables expanded, as a shell would (chat's prompts and quoted paths)."""
    return os.path.expandvars(os.path.expanduser(path.strip()))


def add_model_arguments(p) -> None:
    p.add_argument(
        "-m",
        "--model_path",
        required=True,
        help="bundle folder written by `internvl-edge convert`, or a bundle's name (see `internvl-edge list`)",
    )
    p.add_argument(
        "-c",
        "--config_path",
        default=None,
        help="the seed's config folder: tokenizer and generation_config.json (default: the bundle's "
        "config/). Not the chip: that is chosen once, by `convert -c`",
    )
    p.add_argument(
        "-d", "--devid", default="0", help="device id(s), e.g. 0 or 0,1 (default 0; the CPU target uses none)"
    )
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads (default: all available cores)")


def add_generation_arguments(p) -> None:
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    p.add_argument(
        "--max-tiles",
        dest="max_tiles",
        type=int_at_least(1),
        default=None,
        help="tiles per image, at least 1 (default: the bundle's, 4 unless converted otherwise)",
    )
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int_at_least(1),
        default=None,
        help="stop after this many tokens (default: none; the answer runs to its end of turn or to "
        "the end of the bundle's context)",
    )
    p.add_argument(
        "--do_sample",
        "--do-sample",
        dest="do_sample",
        action="store_true",
        help="sample instead of greedy decoding (--temperature, --top_k, --top_p, --repetition_penalty, --seed)",
    )
    p.add_argument(
        "--temperature",
        type=float_in(0.0),
        default=None,
        help="with --do_sample: softmax temperature, 0 or more (default: the bundle's "
        "generation_config.json, else 1.0)",
    )
    p.add_argument(
        "--top_k",
        "--top-k",
        dest="top_k",
        type=int_at_least(0),
        default=None,
        help="with --do_sample: keep the K most likely tokens, 0 for all (default: generation_config.json, else 50)",
    )
    p.add_argument(
        "--top_p",
        "--top-p",
        dest="top_p",
        type=float_in(0.0, 1.0, low_open=True),
        default=None,
        help="with --do_sample: keep the most likely tokens up to this probability mass, in (0, 1] "
        "(default: generation_config.json, else 1.0)",
    )
    p.add_argument(
        "--repetition_penalty",
        "--repetition-penalty",
        dest="repetition_penalty",
        type=float_in(0.0, low_open=True),
        default=None,
        help="with --do_sample: divide the scores of tokens already in the turn, above 0 "
        "(default: generation_config.json, else 1.0: none)",
    )
    p.add_argument(
        "--seed", type=int_at_least(0), default=None, help="random seed for --do_sample (default: a fresh one)"
    )
    p.add_argument(
        "--ignore-eos", dest="ignore_eos", action="store_true", help="keep generating past end-of-turn tokens"
    )


GENERATION_ARGUMENTS = "max_new_tokens do_sample temperature top_k top_p repetition_penalty seed ignore_eos".split()


def generation_kwargs(args) -> dict:
    """The generation flags (add_generation_arguments) as keyword arguments of Model.generate and stream."""
    return {k: getattr(args, k) for k in GENERATION_ARGUMENTS}


def local_file(path: str, flag: str, kind: str) -> tuple[str, str]:
    """(the name errors use, the expanded path) of a local file that exists and is not a folder."""
    name = f"{flag} {path}" if flag else path
    if "://" in path:
        raise UserError(f"{name}: give a local file; URLs are not fetched")
    full = expand_path(path)
    if not os.path.exists(full):
        raise UserError(f"{name}: {kind} not found")
    if os.path.isdir(full):
        raise UserError(f"{name}: is a folder, not a{'n' if kind[0] in 'aeiou' else ''} {kind}")
    return name, full


def check_image_file(path: str, flag: str = "--image") -> str:
    """A readable image file, checked before the bundle loads (seconds sooner than decoding it)."""
    from PIL import Image, UnidentifiedImageError

    name, full = local_file(path, flag, "image")
    try:
        with Image.open(full):
            pass
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except OSError:
        raise UserError(f"{name}: cannot be read (check its permissions)") from None
    return full


def check_video_file(path: str, flag: str = "--video") -> str:
    """A file PyAV opens as a video, checked before the bundle loads."""
    from ..video import probe

    _, full = local_file(path, flag, "video")
    probe(full)
    return full


def read_text_file(path: str, flag: str) -> str:
    name, full = f"{flag} {path}", expand_path(path)
    if not os.path.isfile(full):
        raise UserError(f"{name}: file not found")
    try:
        with open(full, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text") from None
    except OSError:
        raise UserError(f"{name}: cannot be read (check its permissions)") from None


def load_model(args, quiet: bool = False):
    from ..api import load
    from ..progress import Progress
    from .names import resolve_bundle

    path = resolve_bundle(args.model_path)
    progress = Progress("[load] ", enabled=not quiet)
    progress.step(f"bundle {path}")
    model = load(
        path,
        threads=args.threads,
        device=args.devid,
        config_path=args.config_path,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    progress.done()
    return model


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound here so that port 0 works and a busy port is a one-line error)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
