"""`internvl-edge` command line: parse flags, call one function per subcommand.

Every subcommand module has `add_arguments(parser)` and `main(args) -> int`. User mistakes surface as
a one-line `error: ...` and exit status 2; an unexpected failure as one line too (the traceback only
with INTERNVL_EDGE_DEBUG=1), never a bare traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import UserError
from ..version import __version__

# subcommand -> (module, help)
COMMANDS = {
    "convert": ("convert", "convert a Hugging Face checkpoint into a bundle"),
    "run": ("run", "answer one question (optionally about images or a video)"),
    "chat": ("chat", "interactive chat, as the seed's pipeline.py"),
    "serve": ("serve", "serve a bundle over an OpenAI-compatible HTTP API, many clients at once"),
    "ray-config": ("ray_config", "write a Ray Serve config file (serve deploy) for serving a bundle on a Ray cluster"),
    "bench": ("bench", "measure load, vision, prefill, decode, first-token latency, memory and the roofline"),
    "verify": ("verify", "measure what the bundle's quantisation costs against its source checkpoint in float32"),
    "toolchain": ("toolchain", "install or show TPU-MLIR, the compiler and chip simulator of the Sophgo targets"),
    "make-checkpoint": (
        "make_checkpoint",
        "write a random-weight InternVL3 or 3.5 checkpoint (tests, demo, benchmarks)",
    ),
    "list": ("list_bundles", "list the named bundles in the bundle home ($INTERNVL_EDGE_HOME)"),
    "rm": ("rm", "delete named bundles from the bundle home"),
    "demo": ("demo", "make a tiny model, convert it and ask it about an image, in one go"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit 2), as every other user mistake is reported."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def add_spelling_aliases(parser: argparse.ArgumentParser) -> None:
    """Every long flag answers to both spellings: the seed's (`--max_input_length`, `--out_dir`) and
    the dashed one (`--max-tiles`), whichever a command declares; help lists both."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if not option.startswith("--"):
                continue
            body = option[2:]
            other = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
            if other != option and other not in parser._option_string_actions:
                action.option_strings.append(other)
                parser._option_string_actions[other] = action


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="internvl-edge", description="Convert InternVL3 and 3.5 checkpoints and chat with them on edge hardware."
    )
    parser.add_argument("--version", action="version", version=f"internvl-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(f".{module}", __name__).add_arguments(p)
        add_spelling_aliases(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(f".{args._module}", __name__)
    try:
        return int(module.main(args) or 0)
    except UserError as e:
        _flush()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        _flush()
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `internvl-edge run ... | head -1`
        sys.stderr.close()
        return 0
    except Exception as e:  # a bug: still one line, with a way to get the traceback
        if os.environ.get("INTERNVL_EDGE_DEBUG"):
            raise
        _flush()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"error: internal error ({type(e).__name__}: {first}); rerun with INTERNVL_EDGE_DEBUG=1 for details",
            file=sys.stderr,
        )
        return 1


def _flush() -> None:
    try:
        sys.stdout.flush()
    except Exception:
        pass


def entry() -> None:
    sys.exit(main())
