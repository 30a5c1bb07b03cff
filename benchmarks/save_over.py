"""Saving over an earlier dump: what ``reprod.save`` costs where a file is already at the path,
against the same save to a new name (the floor) and against reprod_log's ``np.save``.

    python benchmarks/save_over.py [--mib 256] [--rounds 5] [--loop 7] [--against DIR] [--dir /tmp]

Two ways a dump is replaced:

- *synced*: the earlier dump is on the disk (``os.sync()`` after each save), as when a script is
  run again later;
- *cached*: the saves follow each other, the earlier dump still in the page cache, as in a loop
  that saves to one path every step.

Each case runs in its own process: 8 float64 arrays (``--mib`` in all), one save to the path
before the clock starts, then ``--rounds`` timed saves over it (``new name``: each to a path
with nothing there; ``reprod_log``: ``np.save`` of the dict, as reprod_log's ``save``).
``--against`` times another checkout's reprod too (imported from there, its kernel as built
there). On ext4, a rename over an existing file allocates and starts writing the new file
inside the rename (``auto_da_alloc``); reprod exchanges the names instead (``storage/atomic.py``).
A second table: ``ReprodLogger`` with the many-small workload (5,000 keys of 1-10 KiB, 27 MiB)
saved to one path ``--loop`` times after a first save, for reprod in both formats and reprod_log.
Prints the medians and the ranges (ms), and the load averages at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_CHILD = r"""
import json, os, sys, time
tool, mode, mib, rounds, folder, tree_root = sys.argv[1:7]
mib, rounds = int(mib), int(rounds)
sys.path.insert(0, tree_root)  # before the current folder, which python -c puts first
import numpy as np
tree = {f"k{i}": np.random.default_rng(i).standard_normal((mib << 20) // 64) for i in range(8)}
if tool == "reprod_log":
    save = lambda p: np.save(p, tree, allow_pickle=True)
else:
    import reprod
    assert reprod.__file__.startswith(tree_root), reprod.__file__
    save = lambda p: reprod.save(p, tree)
path = os.path.join(folder, f"save_over_{os.getpid()}.npy")
made = [path]
save(path)
os.sync()
times = []
for r in range(rounds):
    target = path
    if mode == "new name":
        target = os.path.join(folder, f"save_over_{os.getpid()}_{r}.npy")
        made.append(target)
    t0 = time.perf_counter()
    save(target)
    times.append(time.perf_counter() - t0)
    if mode != "cached":
        os.sync()
for p in made:
    os.remove(p)
os.sync()
print(json.dumps(times))
"""


# the logger over one path in a loop: many-small (5,000 keys of 1-10 KiB, 27 MiB), each save after
# the first timed
_LOOP = r"""
import json, os, sys, time
tool, fmt, rounds, folder, tree_root, here = sys.argv[1:7]
sys.path.insert(0, tree_root)
sys.path.insert(0, here)
import workloads
data = dict(workloads._arrays(workloads.many_small(1.0), 0, False))
if tool == "reprod_log":
    from reprod_log import ReprodLogger
else:
    import reprod
    assert reprod.__file__.startswith(tree_root), reprod.__file__
    from reprod import ReprodLogger
log = ReprodLogger()
for k, v in data.items():
    log.add(k, v)
path = os.path.join(folder, f"save_over_loop_{os.getpid()}.{fmt}")
log.save(path)
times = []
for r in range(int(rounds)):
    t0 = time.perf_counter()
    log.save(path)
    times.append(time.perf_counter() - t0)
os.remove(path)
print(json.dumps(times))
"""


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against", help="another checkout (its reprod is imported from there)")
    ap.add_argument("--loop", type=int, default=7, help="timed saves of the logger loop")
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/tmp"), help="where the dumps go")
    args = ap.parse_args()
    trees = [("reprod", ROOT)] + ([("reprod " + os.path.basename(os.path.abspath(args.against)),
                                    os.path.abspath(args.against))] if args.against else [])
    cases = [(name, tree, mode) for mode in ("synced", "cached", "new name") for name, tree in trees]
    cases += [("reprod_log", ROOT, mode) for mode in ("synced", "cached", "new name")]
    print(f"load average at start: {_load()}")
    print(f"| case | replaced | median ms | range ms |  ({args.mib} MiB, {args.rounds} saves each)")
    print("|---|---|---|---|")
    for name, tree, mode in cases:
        env = dict(os.environ, PYTHONPATH=tree)
        tool = "reprod_log" if name == "reprod_log" else "reprod"
        out = subprocess.run([sys.executable, "-c", _CHILD, tool, mode, str(args.mib), str(args.rounds),
                              args.dir, tree], env=env, capture_output=True, text=True, check=True).stdout
        ms = [t * 1e3 for t in json.loads(out.strip().splitlines()[-1])]
        print(f"| {name} | {mode} | {statistics.median(ms):.0f} | {min(ms):.0f}-{max(ms):.0f} |")
    print()
    print(f"| logger, many-small, over one path in a loop | format | median ms | range ms |  ({args.loop} saves each)")
    print("|---|---|---|---|")
    loops = [(name, tree, fmt) for fmt in ("npy", "npz") for name, tree in trees]
    loops.append(("reprod_log", ROOT, "npy"))
    for name, tree, fmt in loops:
        tool = "reprod_log" if name == "reprod_log" else "reprod"
        out = subprocess.run([sys.executable, "-c", _LOOP, tool, fmt, str(args.loop), args.dir, tree, HERE],
                             env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True,
                             check=True).stdout
        ms = [t * 1e3 for t in json.loads(out.strip().splitlines()[-1])]
        print(f"| {name} | {fmt} | {statistics.median(ms):.1f} | {min(ms):.1f}-{max(ms):.1f} |")
    print(f"load average at end: {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
