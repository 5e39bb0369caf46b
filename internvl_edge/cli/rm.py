"""`internvl-edge rm NAME`: delete a bundle from the bundle home (never any other folder)."""

from __future__ import annotations

import os
import shutil

from ..errors import UserError
from .names import bundle_home, check_name, describe, human_bytes


def add_arguments(p) -> None:
    p.add_argument("names", nargs="+", metavar="NAME", help="bundle name(s), as `internvl-edge list` shows them")


def main(args) -> int:
    targets = []
    for name in dict.fromkeys(args.names):  # all checked before anything is deleted; each once
        check_name(name)
        path = os.path.join(bundle_home(), name)
        info = describe(path)
        if info is None:
            what = "is not an internvl-edge bundle" if os.path.exists(path) else "does not exist"
            raise UserError(f"no bundle named {name}: {path} {what} (see `internvl-edge list`)")
        targets.append((name, path, info))
    for name, path, info in targets:
        shutil.rmtree(path)
        print(f"removed {name} ({human_bytes(info['bytes'])}, {info['mode']} {info['target']}, from {info['source']})")
    return 0
