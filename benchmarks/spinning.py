"""What ONNX Runtime's spinning threads cost the net that runs next in another session.

A session's intra-op pool keeps its threads spinning after a run returns (ORT's default), ready for
the next parallel part. On 2 cores those spinners take a core from whatever runs next in another
session: the decoder after the vision net, a bandwidth read after a decode step, and the other way
round. internvl_edge/backends/ort.py sets `session.force_spinning_stop` (threads spin during a run, stop
when it returns). This loads a bundle in a child process per setting, with that entry (as shipped)
and without it (ORT's default, the runtime's options patched for the comparison), and times, round
after round: a 256 MiB read (bench.ReadProbe, same setting) right after a decode step and after a
pause, and a decode step right after a read and after a pause. Medians. Not part of CI.

    python benchmarks/spinning.py --bundle B --rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, sys, time
import internvl_edge
from internvl_edge.backends import ort
from internvl_edge.bench import ReadProbe, _greedy_steps, _prefilled
bundle, stop, rounds, pause = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), float(sys.argv[4])
if not stop:  # ORT's default: the entry left out
    made = ort.OrtBackend._options
    def spinning(self, *a, **k):
        so = made(self, *a, **k)
        so.add_session_config_entry("session.force_spinning_stop", "0")
        return so
    ort.OrtBackend._options = spinning
model = internvl_edge.load(bundle, threads=2)
probe = ReadProbe(2, 0.25, stop_spinning=stop)
cache, token = _prefilled(model, 300)
out = {"read right after a step": [], "read after a pause": [], "step right after a read": [], "step after a pause": []}
for _ in range(rounds):
    for wait in (0.0, pause):
        cache.lengths[:] = 300
        token = _greedy_steps(model.backend, cache, token, 1)
        time.sleep(wait)
        out["read right after a step" if not wait else "read after a pause"].append(probe.read())
        time.sleep(pause)
        probe.read()
        time.sleep(wait)
        t0 = time.perf_counter()
        token = _greedy_steps(model.backend, cache, token, 1)
        out["step right after a read" if not wait else "step after a pause"].append((time.perf_counter() - t0) * 1000)
        time.sleep(pause)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--pause", type=float, default=0.1, help="seconds of the pause")
    args = ap.parse_args()
    rows = {}
    for stop in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, args.bundle, stop, str(args.rounds), str(args.pause)],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise SystemExit(f"error: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        rows[stop] = json.loads(proc.stdout.strip().splitlines()[-1])
    cases = list(rows["1"])
    print(
        "| session.force_spinning_stop | "
        + " | ".join(f"{c} ({'GB/s' if c.startswith('read') else 'ms'})" for c in cases)
        + " |"
    )
    print("|---|" + "---:|" * len(cases))
    for stop, figures in rows.items():
        print(
            f"| {'1 (the runtime)' if stop == '1' else '0 (ORT default)'} | "
            + " | ".join(f"{statistics.median(figures[c]):.1f}" for c in cases)
            + " |"
        )


if __name__ == "__main__":
    main()
