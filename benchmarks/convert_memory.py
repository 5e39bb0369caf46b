"""Time and memory of one `internvl-edge convert`, run as a child process and sampled from /proc.

    python benchmarks/convert_memory.py CKPT B [convert flags ...]

e.g. `python benchmarks/convert_memory.py CKPT B -s 2048 -q w4bf16`. Prints one JSON object:
wall seconds, and the child's peak memory three ways, in GB (10^9 bytes):
- `peak_rss_gb`: the kernel's high-water mark of the resident set (VmHWM, = `/usr/bin/time -v`'s
  "Maximum resident set size"): private memory plus the pages of memory-mapped files it touched;
- `peak_anon_gb`: the largest private (anonymous) part seen (RssAnon, sampled every 50 ms): what the
  converter itself holds, which a machine must have free;
- `peak_file_gb`: the largest file-backed part seen (RssFile): mapped checkpoint pages, which the
  kernel can drop under pressure and read again.
Linux only (/proc). The bundle folder B is replaced if it exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

FIELDS = ("VmHWM", "RssAnon", "RssFile")


def sample(pid: int) -> dict[str, int]:
    """The FIELDS of /proc/pid/status in bytes ({} once the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    ckpt, out, flags = argv[0], argv[1], argv[2:]
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "internvl_edge", "convert", "-m", ckpt, "--out_dir", out, *flags]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = dict.fromkeys(FIELDS, 0)
    while proc.poll() is None:
        for key, value in sample(proc.pid).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    if proc.returncode:
        print(f"convert failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)
    print(
        json.dumps(
            {
                "command": " ".join(["internvl-edge", *cmd[3:]]),
                "wall_s": round(wall, 1),
                "peak_rss_gb": round(peak["VmHWM"] / 1e9, 2),
                "peak_anon_gb": round(peak["RssAnon"] / 1e9, 2),
                "peak_file_gb": round(peak["RssFile"] / 1e9, 2),
                "bundle_gb": round(size / 1e9, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
