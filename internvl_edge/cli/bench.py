"""`internvl-edge bench`: load, vision, prefill, decode, FTL, peak memory and the decode roofline."""

from __future__ import annotations

import json

from .common import int_at_least


def add_arguments(p) -> None:
    p.add_argument("-m", "--model_path", required=True, help="bundle folder or name (see `internvl-edge list`)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="CPU threads (default: all available cores)")
    p.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=3,
        help="measured runs per figure, after one warm-up; the median is reported (default 3)",
    )
    p.add_argument(
        "--decode-tokens",
        dest="decode_tokens",
        type=int_at_least(2),
        default=32,
        help="tokens decoded per decode-speed run (default 32)",
    )
    p.add_argument("--quick", action="store_true", help="skip the long prompts and contexts")
    p.add_argument("--profile", action="store_true", help="also break one decode step down by operator")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def main(args) -> int:
    from ..bench import as_dict, format_result, run_bench
    from .names import resolve_bundle

    result = run_bench(
        resolve_bundle(args.model_path),
        threads=args.threads,
        repeats=args.repeats,
        decode_tokens=args.decode_tokens,
        quick=args.quick,
        profile=args.profile,
    )
    print(json.dumps(as_dict(result), indent=2) if args.json else format_result(result))
    return 0
