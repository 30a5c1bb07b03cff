"""``ReprodLogger.add`` + ``save`` of many small keys to ``.npy``: this checkout against another
(a build of the parent commit, say), reprod_log and the floors, interleaved round by round.

    python benchmarks/save_against.py --against /path/to/other/checkout [--rounds 9]

Every round runs each case in a fresh process, in an order reversed every other round (a change
of load hits every case alike):

- *many-small* (``workloads.many_small(1)``: 5,000 float32 keys of 1-10 KiB, 27 MiB): ``_child.py
  logger`` with reprod from this checkout and from ``--against``, with reprod_log, and its floor
  (every array's bytes written to one file, ``_child.py logger floor``);
- *5,000 float32[16]*: ``many_keys._SAVE`` (add + save timed together) with reprod from both
  checkouts, reprod_log and ``np.save`` of the dict.

Each checkout's reprod is imported from it (``PYTHONPATH``; its compiled kernel as built there),
the benchmark scripts are this checkout's. Prints the medians and ranges (ms) and the load
averages at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from many_keys import _SAVE  # noqa: E402


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _run(cmd: list[str], root: str) -> str:
    env = {**os.environ, "PYTHONPATH": root, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise SystemExit(f"{cmd}: {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, help="the other checkout (its reprod is imported from there)")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    other = os.path.abspath(args.against)
    child = os.path.join(HERE, "_child.py")
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        # label -> (command, checkout, kind): kind "logger" prints add and save, "total" seconds
        cases = {
            "many-small: reprod (this)": ([py, child, "logger", "reprod", "npy", "many-small", "1", out], ROOT, "logger"),
            "many-small: reprod (against)": ([py, child, "logger", "reprod", "npy", "many-small", "1", out], other, "logger"),
            "many-small: reprod_log": ([py, child, "logger", "reprod_log", "npy", "many-small", "1", out], ROOT, "logger"),
            "many-small: floor": ([py, child, "logger", "floor", "npy", "many-small", "1", out], ROOT, "logger"),
            "5,000 x f32[16]: reprod (this)": ([py, "-c", _SAVE, ROOT, "reprod", out + ".npy", "5000"], ROOT, "total"),
            "5,000 x f32[16]: reprod (against)": ([py, "-c", _SAVE, other, "reprod", out + ".npy", "5000"], other, "total"),
            "5,000 x f32[16]: reprod_log": ([py, "-c", _SAVE, ROOT, "reprod_log", out + ".npy", "5000"], ROOT, "total"),
            "5,000 x f32[16]: np.save": ([py, "-c", _SAVE, ROOT, "np.save", out + ".npy", "5000"], ROOT, "total"),
        }
        got: dict[str, dict[str, list[float]]] = {k: {} for k in cases}
        loads = [_load()]
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for label in order:
                cmd, root, kind = cases[label]
                line = _run(cmd, root)
                if kind == "logger":
                    d = json.loads(line)
                    vals = {"add": d["add"], "save": d["save"], "add+save": d["add"] + d["save"]}
                else:
                    vals = {"add+save": float(line)}
                for k, v in vals.items():
                    got[label].setdefault(k, []).append(1e3 * v)
            print(f"round {r + 1}/{args.rounds} done, load {_load()}", file=sys.stderr, flush=True)
        loads.append(_load())
    print(f"load average at start: {loads[0]}; at end: {loads[1]}; {args.rounds} rounds, median (range), ms\n")
    print("| case | add | save | add+save |")
    print("|---|---|---|---|")
    for label, cols in got.items():
        cells = []
        for k in ("add", "save", "add+save"):
            v = cols.get(k)
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for w in ("many-small", "5,000 x f32[16]"):
        rl = statistics.median(got[f"{w}: reprod_log"]["add+save"])
        for side in ("this", "against"):
            mine = statistics.median(got[f"{w}: reprod ({side})"]["add+save"])
            print(f"\n{w}: reprod ({side}) add+save at {rl / mine:.2f}x reprod_log's speed", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
