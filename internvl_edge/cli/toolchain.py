"""`internvl-edge toolchain install|info`: TPU-MLIR, the compiler and chip simulator of the Sophgo targets."""

from __future__ import annotations

import json
import os

from ..errors import UserError
from ..progress import Progress
from ..sophgo import toolchain


def add_arguments(p) -> None:
    p.add_argument(
        "action", choices=("install", "info"), help="install: fetch and prepare TPU-MLIR; info: what is found"
    )
    p.add_argument(
        "--tpu-mlir",
        dest="tpu_mlir",
        default=None,
        help="an existing TPU-MLIR tpu_mlir folder to check (info; default: TPUC_ROOT, then the installed copy)",
    )
    p.add_argument("--force", action="store_true", help="install again even if a working copy is there")
    p.add_argument(
        "--wheel",
        default=None,
        help=f"install from this {toolchain.WHEEL} instead of downloading it (default: download)",
    )
    p.add_argument("--json", action="store_true", help="info as one JSON object")


def main(args) -> int:
    if args.action == "install":
        if args.tpu_mlir:
            raise UserError(
                "--tpu-mlir names an existing TPU-MLIR: nothing to install (use `toolchain info --tpu-mlir PATH`)"
            )
        if args.wheel and not os.path.isfile(args.wheel):
            raise UserError(f"--wheel {args.wheel}: no such file")
        tc = toolchain.install(Progress("[toolchain] "), force=args.force, wheel=args.wheel)
        print(f"TPU-MLIR {toolchain.VERSION} ready in {tc.root}")
        return 0
    tc = toolchain.locate(args.tpu_mlir)
    if tc is None:
        info = {"found": False, "expected": toolchain.install_dir(), "install": toolchain.INSTALL_COMMAND}
    else:
        problems = toolchain.check(tc)
        info = {
            "found": True,
            **tc.describe(),
            "works": not problems,
            "problems": problems,
            "simulators": {c: toolchain.SIMULATOR[c] for c in toolchain.SIMULATOR},
        }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info.get("works") else 1
    if not info["found"]:
        where = info["expected"]
        print(f"TPU-MLIR {toolchain.VERSION}: not installed (expected in {where}); run `{toolchain.INSTALL_COMMAND}`")
        return 1
    print(f"TPU-MLIR: {info['root']} ({info['origin']}, {info['version']})")
    print(f"simulators: {', '.join(f'{c} ({lib})' for c, lib in info['simulators'].items())}")
    print("status: works" if info["works"] else f"status: does not work here: {'; '.join(problems)}")
    return 0 if info["works"] else 1
