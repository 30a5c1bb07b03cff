"""Per-rank dump trees: reprod.compare_trees serially, on a local process pool and on a Dask
LocalCluster, plus the per-byte cost of one large in-process comparison (docs/scale.md).

    python benchmarks/trees.py              # 64 ranks x 4 steps, small and medium trees
    python benchmarks/trees.py --quick      # 16 ranks x 2 steps
    python benchmarks/trees.py --rounds 5 --json out.json

The trees are generated (seeded, with ``reprod.save``) under benchmarks/data/trees/ (git-ignored)
and reused while their description is unchanged: ``rank_{r}/step_{s}/fwd.npz`` per side,
*small* (40 float32 keys of 1-4 KiB a file, ~100 KiB) and *medium* (8 float32 keys of 512 KiB
a file, 4 MiB). ``other`` is ``ref`` moved by one ulp everywhere (passes the default check)
except one key of one rank at step 3 (or the last step), scaled by 1 + 1e-3 (fails it), so each
tree reports "step 3: rank 17 fails, 63 ranks pass".

Every run reads from the page cache (one warm-up comparison first). Figures: median wall time of
``compare_trees`` per mode over the rounds (rounds interleave the modes), the cluster's start-up
separately, and pairs / MiB compared per second. The merged results of every mode are checked
equal, KeyResult for KeyResult, before any timing is printed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import reprod  # noqa: E402
from reprod.trees import TreeResult, compare_trees  # noqa: E402

DATA = os.path.join(HERE, "data", "trees")

KINDS = {
    # name: (keys a file, elements of each key: (low, high) drawn, or a fixed shape)
    "small": {"keys": 40, "elements": (256, 1024)},
    "medium": {"keys": 8, "shape": (256, 512)},
}


def _spec(kind: str, ranks: int, steps: int) -> dict[str, Any]:
    bad_step = min(3, steps)
    bad_rank = min(17, ranks - 1)
    return {"kind": kind, **KINDS[kind], "ranks": ranks, "steps": steps, "seed": 2026,
            "bad": [bad_step, bad_rank], "version": 1}


def generate(kind: str, ranks: int, steps: int) -> tuple[str, str, int]:
    """The two trees of one workload (written unless present with the same spec); bytes a side."""
    spec = _spec(kind, ranks, steps)
    root = os.path.join(DATA, f"{kind}-{ranks}x{steps}")
    stamp = os.path.join(root, "spec.json")
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    try:
        with open(stamp) as f:
            if json.load(f) == spec:
                return a, b, _tree_bytes(a)
    except (OSError, ValueError):
        pass
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        for r in range(ranks):
            rng = np.random.default_rng([spec["seed"], s, r])
            ref: dict[str, np.ndarray] = {}
            for k in range(spec["keys"]):
                if "shape" in spec:
                    shape = tuple(spec["shape"])
                else:
                    shape = (int(rng.integers(*spec["elements"], endpoint=True)),)
                ref[f"layer{k:02d}.out"] = rng.standard_normal(shape, dtype=np.float32)
            other = {k: np.nextafter(v, np.float32(np.inf)) for k, v in ref.items()}
            if [s, r] == spec["bad"]:
                key = f"layer{spec['keys'] // 2:02d}.out"
                other[key] = (ref[key] * np.float32(1 + 1e-3)).astype(np.float32)
            for side, data in ((a, ref), (b, other)):
                d = os.path.join(side, f"rank_{r}", f"step_{s}")
                os.makedirs(d, exist_ok=True)
                reprod.save(os.path.join(d, "fwd.npz"), data)
    with open(stamp, "w") as f:
        json.dump(spec, f)
    print(f"# generated {kind} {ranks}x{steps} in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return a, b, _tree_bytes(a)


def _tree_bytes(root: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def _same(x: TreeResult, y: TreeResult) -> None:
    assert [r for r, _ in x.pairs] == [r for r, _ in y.pairs]
    for (rel, d1), (_, d2) in zip(x.pairs, y.pairs):
        assert d1.results == d2.results, rel
        assert (d1.ref_name, d1.other_name, d1.options) == (d2.ref_name, d2.other_name, d2.options)


def bench_trees(kinds: list[str], ranks: int, steps: int, rounds: int, jobs: int) -> list[dict[str, Any]]:
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                           dashboard_address=None, silence_logs=50)
    client = Client(cluster, set_as_default=False)
    startup = time.perf_counter() - t0
    rows = []
    try:
        for kind in kinds:
            a, b, nbytes = generate(kind, ranks, steps)
            modes = {
                "serial (jobs=1)": lambda a=a, b=b: compare_trees(a, b, jobs=1, progress=False),
                f"local pool (jobs={jobs})": lambda a=a, b=b: compare_trees(
                    a, b, jobs=jobs, progress=False),
                "Dask LocalCluster (2 workers)": lambda a=a, b=b: compare_trees(
                    a, b, client=client, progress=False),
            }
            ref = modes["serial (jobs=1)"]()  # warm-up: every file in the page cache
            for fn in modes.values():
                _same(fn(), ref)
            times: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(rounds):
                for m, fn in modes.items():
                    t = time.perf_counter()
                    fn()
                    times[m].append(time.perf_counter() - t)
            serial = statistics.median(times["serial (jobs=1)"])
            for m, ts in times.items():
                med = statistics.median(ts)
                rows.append({"tree": kind, "pairs": len(ref), "keys": ref.summary()["keys"],
                             "mib_per_side": nbytes / 2**20, "mode": m, "median_s": med,
                             "min_s": min(ts), "max_s": max(ts), "rounds": len(ts),
                             "pairs_per_s": len(ref) / med,
                             "mib_per_s": 2 * nbytes / 2**20 / med, "vs_serial": serial / med,
                             "verdict": ref.summary_lines()[2] if len(ref.summary_lines()) > 2
                             else ref.summary_lines()[0]})
    finally:
        client.close()
        cluster.close()
    for r in rows:
        r["cluster_startup_s"] = startup
    return rows


def bench_per_byte(mib_per_side: int, rounds: int) -> list[dict[str, Any]]:
    """One pair of ``mib_per_side`` MiB a side (4 float32 keys), compared in-process: the
    per-byte cost of reprod.compare, with the default threads and with one."""
    from reprod.diff.metrics import set_threads, threads

    root = os.path.join(DATA, f"per-byte-{mib_per_side}")
    a, b = os.path.join(root, "a.npz"), os.path.join(root, "b.npz")
    if not (os.path.exists(a) and os.path.exists(b)):
        os.makedirs(root, exist_ok=True)
        rng = np.random.default_rng(7)
        n = mib_per_side * 2**20 // 4 // 4
        ref = {f"act{i}": rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024)
               for i in range(4)}
        reprod.save(a, ref)
        reprod.save(b, {k: np.nextafter(v, np.float32(np.inf)) for k, v in ref.items()})
    nbytes = os.path.getsize(a)
    rows = []
    default = threads()
    try:
        for n in (default, 1):
            set_threads(n)
            reprod.compare(a, b, progress=False)  # warm: page cache
            ts, cpu = [], []
            for _ in range(rounds):
                t, c = time.perf_counter(), time.process_time()
                r = reprod.compare(a, b, progress=False)
                ts.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            assert r.passed
            med, cmed = statistics.median(ts), statistics.median(cpu)
            rows.append({"mib_per_side": nbytes / 2**20, "threads": n, "median_s": med,
                         "cpu_s": cmed, "gb_per_s_both_sides": 2 * nbytes / 1e9 / med,
                         "gb_per_s_per_side": nbytes / 1e9 / med,
                         "gb_per_cpu_s_both_sides": 2 * nbytes / 1e9 / cmed})
    finally:
        set_threads(default)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 ranks x 2 steps")
    ap.add_argument("--ranks", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--trees", nargs="+", choices=sorted(KINDS), default=["small", "medium"])
    ap.add_argument("--per-byte-mib", type=int, default=256,
                    help="MiB a side of the in-process per-byte pair (0: skip)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()
    ranks = args.ranks or (16 if args.quick else 64)
    steps = args.steps or (2 if args.quick else 4)

    from reprod import _native

    info = {"date": _dt.date.today().isoformat(), "python": platform.python_version(),
            "numpy": np.__version__, "cpus": os.cpu_count(),
            "kernel": "compiled" if getattr(_native, "_enabled", False) else "numpy path",
            "machine": platform.processor() or platform.machine()}
    try:
        import distributed

        info["distributed"] = distributed.__version__
    except ImportError:
        sys.exit("benchmarks/trees.py needs dask distributed: pip install \"dask[distributed]\"")
    info["loadavg_before"] = os.getloadavg()[0]
    rows = bench_trees(args.trees, ranks, steps, args.rounds, args.jobs)
    per_byte = bench_per_byte(args.per_byte_mib, max(3, args.rounds)) if args.per_byte_mib else []

    info["loadavg_after"] = os.getloadavg()[0]
    print(f"Python {info['python']}, numpy {info['numpy']}, distributed {info['distributed']}, "
          f"{info['cpus']} CPUs, {info['kernel']} kernel, {info['date']}; {ranks} ranks x "
          f"{steps} steps, median of {args.rounds} interleaved rounds, page cache warm; "
          f"cluster start-up {rows[0]['cluster_startup_s']:.1f} s (not in the figures); "
          f"1-minute load average {info['loadavg_before']:.1f} before, "
          f"{info['loadavg_after']:.1f} after\n")
    print("| tree | pairs (keys) | MiB a side | mode | wall (median) | min-max | pairs/s | "
          "MiB/s (both sides) | vs serial |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tree']} | {r['pairs']} ({r['keys']:,}) | {r['mib_per_side']:.0f} | "
              f"{r['mode']} | {r['median_s']:.2f} s | {r['min_s']:.2f}-{r['max_s']:.2f} s | "
              f"{r['pairs_per_s']:.0f} | {r['mib_per_s']:.0f} | {r['vs_serial']:.2f}x |")
    if rows:
        print(f"\nverdict (every mode): {rows[0]['verdict']}")
    if per_byte:
        print("\n| one pair in-process | threads | wall (median) | CPU time (median) | "
              "GB/s both sides (wall) | GB/s a side (wall) | GB per CPU-second (both sides) |")
        print("|---|---|---|---|---|---|---|")
        for r in per_byte:
            print(f"| {r['mib_per_side']:.0f} MiB a side | {r['threads']} | {r['median_s']:.3f} s "
                  f"| {r['cpu_s']:.3f} s | {r['gb_per_s_both_sides']:.2f} | "
                  f"{r['gb_per_s_per_side']:.2f} | {r['gb_per_cpu_s_both_sides']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "trees": rows, "per_byte": per_byte}, f, indent=2)


if __name__ == "__main__":
    main()
