"""`internvl-edge make-checkpoint`: a random-weight InternVL3 / InternVL3.5 checkpoint in the real file formats."""

from __future__ import annotations

import os

from ..checkpoint.factory import FORMATS, SIZES, WEIGHT_KINDS, make_checkpoint
from ..errors import UserError
from ..progress import Progress


def add_arguments(p) -> None:
    p.add_argument("out_dir", help="folder to create")
    p.add_argument(
        "--size",
        default="tiny",
        choices=list(SIZES),
        help="tiny (tests, demo) or InternVL3's published shapes; 3.5-*: InternVL3.5's (default tiny)",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        default="original",
        choices=FORMATS,
        help="OpenGVLab original or transformers (hf) (default original)",
    )
    p.add_argument(
        "--weights", default="bf16", choices=WEIGHT_KINDS, help="bf16, f16 or awq (int4 decoder linears) (default bf16)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing folder")


def main(args) -> int:
    if os.path.exists(args.out_dir) and not args.force:
        raise UserError(f"{args.out_dir} exists; pass --force to replace it")
    if args.fmt == "hf" and args.weights == "awq":
        raise UserError("AWQ checkpoints are published in the original format only")
    progress = Progress("[make-checkpoint] ")
    progress.step(f"{args.size} {args.fmt} {args.weights} tensors")
    make_checkpoint(
        args.out_dir,
        size=args.size,
        fmt=args.fmt,
        weights=args.weights,
        seed=args.seed,
        overwrite=args.force,
        progress=lambda d, t, n: progress.update(d, t),
    )
    progress.done()
    print(f"wrote {args.out_dir}")
    return 0
