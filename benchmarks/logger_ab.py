"""``ReprodLogger.add`` + ``save`` of a workload in fresh processes: reprod_log, reprod (.npy and
.npz) and the floor (every array's bytes written), interleaved, with reprod from two checkouts.

    python benchmarks/logger_ab.py --before ../before --rounds 11 many-small

Each case runs ``benchmarks/_child.py logger`` in a new process, the cases in a new random order
each round (seeded by the round: reversing the order every other round put the second case right after
reprod_log's process in half the rounds, and there `.npy` measured 5-7 ms slower than when run
alone);
the figures are medians, the ratio is reprod_log's add+save over the case's
(above 1: faster than reprod_log). ``--before`` defaults to this checkout (a plain run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", nargs="?", default="many-small")
    ap.add_argument("--before", default=ROOT, help="a checkout of the commit before a change, built in place")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--scale", default="1")
    ap.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "logger_ab"))
    args = ap.parse_args()
    before, after = os.path.abspath(args.before), ROOT
    cases = [("reprod_log", "npy", after, ""), ("reprod", "npy", after, "")]
    if before != after:
        cases += [("reprod", "npy", before, "before"), ("reprod", "npz", before, "before")]
    cases += [("reprod", "npz", after, ""), ("floor", "bin", after, "")]
    times: dict[tuple[str, str, str, str], list[tuple[float, float]]] = {c: [] for c in cases}
    for r in range(args.rounds):
        order = list(cases)
        random.Random(r).shuffle(order)
        for case in order:
            tool, fmt, tree, _ = case
            cmd = [sys.executable, os.path.join(tree, "benchmarks", "_child.py"), "logger", tool, fmt,
                   args.workload, args.scale, args.out]
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            d = json.loads(out.strip().splitlines()[-1])
            times[case].append((d["add"], d["save"]))
    base = statistics.median(a + s for a, s in times[cases[0]])
    print("| case | add ms | save ms | add+save ms | speed vs reprod_log |")
    print("|---|---|---|---|---|")
    for (tool, fmt, _, tag), v in times.items():
        total = statistics.median(a + s for a, s in v)
        print(f"| {tool} .{fmt} {tag} | {statistics.median(a for a, _ in v) * 1e3:.1f} | "
              f"{statistics.median(s for _, s in v) * 1e3:.1f} | {total * 1e3:.1f} | {base / total:.2f}x |")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
