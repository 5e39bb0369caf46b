"""Flags shared by the commands that run a bundle (run, chat, bench, serve)."""

from __future__ import annotations

import sys

from ..errors import UserError


def add_model_arguments(p) -> None:
    p.add_argument("-m", "--model_path", required=True, help="bundle folder written by `internvl-edge convert`")
    p.add_argument("-c", "--config_path", default=None, help="tokenizer/config folder (default: the bundle's config/)")
    p.add_argument("-d", "--devid", default="0", help="device id(s), e.g. 0 or 0,1 (the CPU target uses none)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")


def add_generation_arguments(p) -> None:
    p.add_argument("--system", default=None, help="system prompt (default: the model's)")
    p.add_argument("--max-tiles", dest="max_tiles", type=int, default=None, help="tiles per image (default: the bundle's, 4)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--do_sample", "--do-sample", dest="do_sample", action="store_true", help="sample (--temperature, --top_k, --top_p, --repetition_penalty, --seed)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=None)
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--repetition_penalty", "--repetition-penalty", dest="repetition_penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="random seed for --do_sample")
    p.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", help="keep generating past end-of-turn tokens")


def generation_kwargs(args) -> dict:
    kw = {k: getattr(args, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                          "repetition_penalty", "seed", "ignore_eos")}  # fmt: skip
    return kw


def load_model(args, quiet: bool = False):
    from ..api import load
    from ..progress import Progress

    progress = Progress("[load] ", enabled=not quiet)
    progress.step(f"bundle {args.model_path}")
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    model = load(args.model_path, threads=args.threads, device=args.devid, config_path=args.config_path,
                 log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    progress.done()
    return model
