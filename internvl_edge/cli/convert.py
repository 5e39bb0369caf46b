"""`internvl-edge convert`: flags of Sophgo's llm_convert.py."""

from __future__ import annotations

import os
import sys

from ..bundle import MANIFEST
from ..convert import CHIPS, QUANTIZE_MODES, ConvertOptions, convert
from ..errors import UserError
from .common import expand_path, int_at_least
from .names import bundle_home, check_name, describe, human_bytes


def add_arguments(p) -> None:
    p.add_argument(
        "-m", "--model_path", required=True, help="checkpoint folder (original InternVL or transformers format)"
    )
    p.add_argument(
        "-s", "--seq_length", type=int_at_least(32), default=2048, help="maximum context length (default 2048)"
    )
    p.add_argument(
        "-q", "--quantize", default="w4bf16", choices=QUANTIZE_MODES, help="weight precision (default w4bf16)"
    )
    p.add_argument(
        "-c",
        "--chip",
        default="cpu",
        help=f"target chip: {', '.join(CHIPS)} (default cpu). Not to be confused with `run -c`, the config folder",
    )
    p.add_argument(
        "--out_dir", "-o", default=None, help="bundle folder to write (default: NAME in the bundle home with --name)"
    )
    p.add_argument(
        "--name",
        default=None,
        help="write the bundle into the bundle home ($INTERNVL_EDGE_HOME) under this name, for `-m NAME` "
        "(default: none; give --name or --out_dir)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle at the destination")
    p.add_argument(
        "-g",
        "--q_group_size",
        type=int_at_least(0),
        default=0,
        help="4-bit block size when quantising float weights (default: 128 on the CPU, 64 on Sophgo chips)",
    )
    p.add_argument(
        "--do_sample", action="store_true", help="add the sampling head (the seed's; CPU bundles sample without it too)"
    )
    p.add_argument("--use_block_with_kv", action="store_true", help="keep multi-turn history as KV cache")
    p.add_argument(
        "--max_input_length", type=int_at_least(0), default=0, help="longest single prefill (default seq_length/4)"
    )
    p.add_argument(
        "--max_prefill_kv_length",
        type=int_at_least(0),
        default=0,
        help="history a prefill may see (default seq_length)",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="shapes follow the real input length (the CPU's default; on Sophgo chips: prefill rows follow the prompt)",
    )
    p.add_argument(
        "--static",
        action="store_true",
        help="CPU: pad every prefill to --max_input_length rows and feed one tile per vision call "
        "(fixed shapes, for export to compilers and NPUs; Sophgo chips are static unless --dynamic)",
    )
    p.add_argument(
        "--max-tiles",
        dest="max_tiles",
        type=int_at_least(1),
        default=4,
        help="default image tiles per image (default 4)",
    )
    p.add_argument(
        "--lm-head-bits",
        dest="lm_head_bits",
        type=int,
        default=None,
        choices=(0, 4, 8),
        help="lm_head precision: 8 or 4 bits, 0 = float (default: 8 for w4 modes, float otherwise)",
    )
    p.add_argument(
        "--accuracy_level",
        type=int,
        default=4,
        choices=(1, 4),
        help="4-bit matmuls: 4 quantises activations to int8 (fast, default), 1 keeps them float32 (exact)",
    )
    p.add_argument(
        "--tpu-mlir",
        dest="tpu_mlir",
        default=None,
        help="Sophgo targets: TPU-MLIR's tpu_mlir folder "
        "(default: TPUC_ROOT, then `internvl-edge toolchain install`'s copy)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after converting, run `internvl-edge verify` against the checkpoint and store its summary "
        "in the manifest (shown by run --json and bench)",
    )
    p.add_argument(
        "--vision-bits",
        dest="vision_bits",
        type=int,
        default=0,
        choices=(0, 8),
        help="8: quantise the vision encoder's linears to 8 bits (default 0: as the checkpoint)",
    )


def destination(args) -> str:
    """--out_dir or --name's folder; an existing bundle there is replaced only with --force."""
    if bool(args.out_dir) == bool(args.name):
        raise UserError("give where to write the bundle: --out_dir FOLDER or --name NAME (one of them)")
    out_dir = expand_path(args.out_dir) if args.out_dir else os.path.join(bundle_home(), check_name(args.name))
    if os.path.isfile(os.path.join(out_dir, MANIFEST)) and not args.force:
        raise UserError(f"{args.out_dir or args.name} already holds a bundle ({out_dir}); pass --force to replace it")
    return out_dir


def main(args) -> int:
    out_dir = destination(args)
    replaced = describe(out_dir) if os.path.isdir(out_dir) else None
    opts = ConvertOptions(
        model_path=expand_path(args.model_path),
        out_dir=out_dir,
        seq_length=args.seq_length,
        quantize=args.quantize,
        chip=args.chip,
        q_group_size=args.q_group_size,
        max_input_length=args.max_input_length,
        max_prefill_kv_length=args.max_prefill_kv_length,
        use_block_with_kv=args.use_block_with_kv,
        dynamic=args.dynamic,
        static=args.static,
        do_sample=args.do_sample,
        max_tiles=args.max_tiles,
        lm_head_bits=args.lm_head_bits,
        vision_bits=args.vision_bits,
        accuracy_level=args.accuracy_level,
        tpu_mlir=args.tpu_mlir,
    )
    manifest = convert(opts)
    if replaced:
        print(
            f"replaced the bundle at {out_dir} ({replaced['mode']} {replaced['target']}, from {replaced['source']}, "
            f"{human_bytes(replaced['bytes'])}, {replaced['date']})"
        )
    bmodel = manifest.platform.bmodel
    if bmodel:
        mb = manifest.files[bmodel]["bytes"] / 1e6
        print(f"wrote {manifest.path} ({bmodel}, {mb:.1f} MB)")
    else:
        mb = manifest.weight_bytes / 1e6
        shapes = "dynamic" if opts.dynamic else "static"
        print(
            f"wrote {manifest.path} ({opts.quantize}, seq_length {opts.seq_length}, {shapes} shapes, "
            f"{mb:.1f} MB of weights)"
        )
    if args.verify:
        from ..verify import record, summary_line, verify

        sys.stdout.flush()
        report = verify(manifest.path, opts.model_path)
        record(manifest.path, report)
        print(summary_line(report["summary"]))
    return 0
