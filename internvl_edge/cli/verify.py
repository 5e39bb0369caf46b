"""`internvl-edge verify`: the bundle against its source checkpoint in float32 (see verify.py)."""

from __future__ import annotations

import json
import sys

from ..errors import UserError
from ..verify import DEFAULT_STEPS, REFERENCES, format_report, verify
from ..verify_probes import read_prompts
from .common import int_at_least
from .names import resolve_bundle


def add_arguments(p) -> None:
    p.add_argument(
        "-m",
        "--model_path",
        required=True,
        help="bundle folder written by `internvl-edge convert`, or a bundle's name (see `internvl-edge list`)",
    )
    p.add_argument("--checkpoint", required=True, help="the checkpoint folder the bundle was converted from")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="your own image, added to the built-in probes (repeat; default: none)",
    )
    p.add_argument(
        "--prompts", default=None, help="a file of your own prompts, one per line, added to the probes (default: none)"
    )
    p.add_argument("--no-builtin", dest="builtin", action="store_false", help="only your --image and --prompts probes")
    p.add_argument(
        "--steps",
        type=int_at_least(1),
        default=DEFAULT_STEPS,
        help=f"answer tokens compared per probe (default {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--max-tiles",
        dest="max_tiles",
        type=int_at_least(1),
        default=None,
        help="tiles per image (default: the bundle's)",
    )
    p.add_argument(
        "--reference",
        default="onnxruntime",
        choices=REFERENCES,
        help="onnxruntime: our float32 graphs, one layer at a time (default); transformers: its model, "
        "if torch and transformers are installed (needs the whole model in float32)",
    )
    p.add_argument(
        "--min-agreement",
        dest="min_agreement",
        type=float,
        default=None,
        help="exit with status 1 when top-1 agreement is below this fraction (0..1), for CI (default: none)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available cores)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def check_min_agreement(value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise UserError(f"--min-agreement {value} is not a fraction between 0 and 1 (e.g. 0.9)")


def main(args) -> int:
    check_min_agreement(args.min_agreement)
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    prompts = read_prompts(args.prompts) if args.prompts else []
    report = verify(
        resolve_bundle(args.model_path),
        args.checkpoint,
        images=args.image,
        prompts=prompts,
        steps=args.steps,
        reference=args.reference,
        max_tiles=args.max_tiles,
        threads=args.threads,
        builtin=args.builtin,
    )
    print(json.dumps(report, ensure_ascii=False) if args.json else format_report(report))
    agreement = report["summary"]["top1_agreement"]
    if args.min_agreement is not None and agreement < args.min_agreement:
        sys.stdout.flush()
        print(f"error: top-1 agreement {agreement:.3f} is below --min-agreement {args.min_agreement}", file=sys.stderr)
        return 1
    return 0
