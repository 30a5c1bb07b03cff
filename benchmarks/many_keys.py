"""Many keys: memory and time per key (project issues 20 and 23), each run in a fresh process.

    python benchmarks/many_keys.py                  # 1M-key pairs, 150,000 int keys, 5,000 keys
    python benchmarks/many_keys.py --keys 100000    # smaller big pairs (a quicker look)
    python benchmarks/many_keys.py --only small     # only the 5,000-key rows and the save rows

Workloads (seeded, written once under benchmarks/data/many_keys/, git-ignored):

- *1M keys*: 1,000,000 keys ``block{i // 1000}/layer{i % 1000}.out`` (flat names), each a float32
  array of 2 elements; ``other`` is ``ref`` with one key in 1,000 scaled by 1 + 1e-3 (they fail).
  Written as reprod_log's ``.npy`` (``np.save`` of the dict: a pickle) and as reprod's ``.npz``.
- *150k int keys*: ``{i: i}`` for 150,000 Python ints (``ReprodLogger.add(3, x)`` as reprod_log
  users write it; a 1.2 MiB pickle of ints), ``other`` with one value in 1,000 changed.
- *5,000 small keys*: float32 arrays of 16 elements, both formats, against the floor of starting
  Python and importing numpy (``python -c "import numpy"``).
- *save*: ``ReprodLogger.add`` of 5,000 small keys then ``save``, reprod_log against reprod in both
  formats, with numpy's own ``np.save(dict)`` and ``np.savez(**dict)`` as the floor.

Figures: median wall seconds from process start to exit; peak RSS (``VmHWM``) and peak private
memory (``RssAnon``) sampled from ``/proc/<pid>/status`` every 2 ms (``run.measure``). RSS counts
the dumps' mapped pages (clean page cache); RssAnon is what the process allocated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from run import PY, _mib, measure  # noqa: E402

DATA = os.path.join(HERE, "data", "many_keys")

_GEN = r"""
import os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import reprod
kind, n, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(0)
if kind == "int":
    ref = {i: i for i in range(n)}
    other = {i: (i + 1 if i % 1000 == 7 else i) for i in range(n)}
    np.save(os.path.join(out, "ref.npy"), ref, allow_pickle=True)
    np.save(os.path.join(out, "other.npy"), other, allow_pickle=True)
    raise SystemExit(0)
size = 2 if kind == "big" else 16
vals = rng.standard_normal((n, size)).astype(np.float32)
ref = {f"block{i // 1000}/layer{i % 1000}.out": vals[i] for i in range(n)}
bad = vals.copy()
bad[7::1000] *= np.float32(1 + 1e-3)
other = {f"block{i // 1000}/layer{i % 1000}.out": bad[i] for i in range(n)}
np.save(os.path.join(out, "ref.npy"), ref, allow_pickle=True)
np.save(os.path.join(out, "other.npy"), other, allow_pickle=True)
reprod.save(os.path.join(out, "ref.npz"), ref)
reprod.save(os.path.join(out, "other.npz"), other)
"""

_SAVE = r"""
import sys, time, os
import numpy as np
sys.path.insert(0, sys.argv[1])
tool, out, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(0)
arrays = [(f"step{i // 50}/layer{i % 50}.out", rng.standard_normal(16).astype(np.float32)) for i in range(n)]
if tool == "reprod_log":
    from reprod_log import ReprodLogger
elif tool == "reprod":
    from reprod import ReprodLogger
t0 = time.perf_counter()
if tool == "np.save":
    np.save(out, dict(arrays), allow_pickle=True)
elif tool == "np.savez":
    np.savez(out, **dict(arrays))
else:
    log = ReprodLogger()
    for k, v in arrays:
        log.add(k, v)
    log.save(out)
print(time.perf_counter() - t0)
"""


def _files(kind: str, n: int, log: Any) -> dict[str, str]:
    d = os.path.join(DATA, f"{kind}-{n}")
    names = ["ref.npy", "other.npy"] + ([] if kind == "int" else ["ref.npz", "other.npz"])
    files = {name: os.path.join(d, name) for name in names}
    if not all(os.path.exists(p) for p in files.values()):
        os.makedirs(d, exist_ok=True)
        log(f"generating {kind} x {n} in {d}")
        r = measure([PY, "-c", _GEN, ROOT, kind, str(n), d])
        if r["rc"]:
            raise SystemExit(f"generating {d} failed:\n{r['stderr'][-3000:]}")
    for p in files.values():  # into the page cache: every run reads from memory
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return files


def _row(label: str, runs: list[dict[str, Any]], floor: float | None = None) -> dict[str, Any]:
    bad = [r for r in runs if r["rc"] not in (0, 1)]
    if bad:  # a row saying so (an older reprod refused a 1M-key .npz), not the end of the run
        err = (bad[0]["stderr"].strip().splitlines() or ["?"])[-1][-120:]
        return {"run": f"{label}: exit {bad[0]['rc']} ({err})", "n": len(runs), "wall": math.nan,
                "rss": None, "anon": None, "floor": floor, "ratio": None}
    wall = statistics.median(r["wall"] for r in runs)
    return {"run": label, "n": len(runs), "wall": wall, "rss": max(r["rss"] for r in runs),
            "anon": max(r["anon"] for r in runs), "floor": floor,
            "ratio": None if not floor else wall / floor}


def _diff_rows(title: str, files: dict[str, str], rounds: int, tmp: str,
               floor: float | None = None) -> list[dict[str, Any]]:
    out = os.path.join(tmp, "out.json")
    runs: dict[str, list[str]] = {}
    for fmt in ("npy", "npz"):
        ref, other = files.get(f"ref.{fmt}"), files.get(f"other.{fmt}")
        if ref is None or other is None:
            continue
        runs[f"{title} .{fmt} --quiet"] = [PY, "-m", "reprod", ref, other, "--quiet"]
        runs[f"{title} .{fmt} --format json --output"] = [PY, "-m", "reprod", ref, other, "--format",
                                                          "json", "--output", out]
    got: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
    for _ in range(rounds):  # interleaved: a change of load hits every command alike
        for label, cmd in runs.items():
            got[label].append(measure(cmd))
    return [_row(label, rs, floor) for label, rs in got.items()]


def _floor(rounds: int) -> float:
    return statistics.median(measure([PY, "-c", "import numpy"])["wall"] for _ in range(rounds))


def _save_rows(n: int, rounds: int, tmp: str) -> list[dict[str, Any]]:
    rows = []
    cases = [("np.save", "np.save (floor)", "a.npy"), ("reprod_log", "reprod_log add+save .npy", "b.npy"),
             ("reprod", "reprod add+save .npy", "c.npy"), ("np.savez", "np.savez (floor)", "d.npz"),
             ("reprod", "reprod add+save .npz", "e.npz")]
    secs: dict[str, list[float]] = {label: [] for _, label, _ in cases}
    for _ in range(rounds):
        for tool, label, name in cases:
            r = measure([PY, "-c", _SAVE, ROOT, tool, os.path.join(tmp, name), str(n)])
            if r["rc"]:
                raise SystemExit(f"{label}: {r['stderr'][-2000:]}")
            secs[label].append(float(r["stdout"].strip().splitlines()[-1]))
    med = {label: statistics.median(v) for label, v in secs.items()}
    for _, label, _ in cases:
        floor = med["np.savez (floor)"] if label.endswith(".npz") or "savez" in label else med["np.save (floor)"]
        rl = med["reprod_log add+save .npy"]
        rows.append({"run": f"save {n} keys: {label}", "n": rounds, "wall": med[label], "rss": None,
                     "anon": None, "floor": floor, "ratio": med[label] / floor,
                     "vs_reprod_log": rl / med[label]})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | n | wall (median) | peak RSS | peak private (RssAnon) | floor | ratio to floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = "" if r["floor"] is None else f"{r['floor']:.3f} s"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if "vs_reprod_log" in r:
            ratio += f" ({r['vs_reprod_log']:.2f}x reprod_log's speed)"
        rss = "" if r["rss"] is None else _mib(r["rss"])
        anon = "" if r["anon"] is None else _mib(r["anon"])
        lines.append(f"| {r['run']} | {r['n']} | {r['wall']:.3f} s | {rss} | {anon} | {floor} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys of the big pair")
    ap.add_argument("--int-keys", type=int, default=150_000)
    ap.add_argument("--small-keys", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the big pairs")
    ap.add_argument("--small-rounds", type=int, default=7)
    ap.add_argument("--only", choices=("big", "int", "small", "save"), action="append")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    only = set(args.only or ("big", "int", "small", "save"))

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    with open("/proc/loadavg") as f:
        log(f"load average at start: {f.read().split()[:3]}")
    with tempfile.TemporaryDirectory() as tmp:
        if "small" in only:
            files = _files("small", args.small_keys, log)
            floor = _floor(args.small_rounds)
            rows += _diff_rows(f"{args.small_keys:,} small keys", files, args.small_rounds, tmp, floor)
            rows.insert(0, {"run": 'python -c "import numpy" (floor)', "n": args.small_rounds,
                            "wall": floor, "rss": None, "anon": None, "floor": None, "ratio": None})
        if "int" in only:
            rows += _diff_rows(f"{args.int_keys:,} int keys", _files("int", args.int_keys, log),
                               args.rounds, tmp)
        if "big" in only:
            rows += _diff_rows(f"{args.keys:,} keys", _files("big", args.keys, log), args.rounds, tmp)
        if "save" in only:
            rows += _save_rows(args.small_keys, args.small_rounds, tmp)
    with open("/proc/loadavg") as f:
        log(f"load average at end: {f.read().split()[:3]}")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
