"""Calibrated comparison against a plain one on few-large-like dumps (issue 23).

    python benchmarks/calibrated.py                    # 4 x float32 [8, 1024, 4096] (scale 0.5)
    python benchmarks/calibrated.py --scale 1 --rounds 7 --json out.json
    python benchmarks/calibrated.py --scale 1 --against ../before   # and another checkout's reprod

Writes (once, seeded, into the git-ignored benchmarks/data/calibrated@<scale>x<keys>/)
``ref.npz`` and ``other.npz`` (float32; ``other`` is ``ref`` with one-ulp noise) and
``noise.npz``, the float64 run that ``ref`` is the rounding of, as ``reprod.compare(...,
noise=)`` gets it in real use (tests/realworld/calibrated.py: torch float64 beside torch
float32). Then, in interleaved rounds, each in a fresh interpreter from the page cache:

- ``plain``: ``reprod.compare(ref, other)`` (two arrays a key);
- ``calibrated``: ``reprod.compare(ref, other, noise=noise)``: the key's statistics and its
  noise in one pass (the kernel's ``stats3``);
- ``two-pass``: the same with the one pass switched off (``noise._one_pass`` returning ``None``):
  what a calibrated comparison cost before issue 23, ref read a second time for the noise.

and the read floors, in the same rounds: ``read 2``, every byte of ref and other read once
(mapped as ``compare`` maps them, on its threads, with an int64 sum), and ``read 3``, the same
with noise: the memory traffic each comparison cannot go under. It prints, per variant, the
median wall time of the process and of ``compare`` inside it, the ratios to ``plain`` and the
ratio to the variant's read floor. ``--against DIR`` runs every variant with DIR's ``reprod``
as well (a checkout of the commit before a change, built in place), in the same interleaved
rounds, and prints its table too: before and after under the same load. Peak memory needs
~2 x the float32 side plus the float64 side of page
cache (scale 0.5: 2 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("plain", "calibrated", "two-pass")
# the read floors (the machine's memory bandwidth, not a comparison): every byte a plain pass
# reads (ref, other) and every byte a calibrated one reads (and noise), read once
FLOORS = ("read 2", "read 3")
FLOOR_OF = {"plain": "read 2", "calibrated": "read 3", "two-pass": "read 3"}


def _shapes(scale: float, keys: int) -> list[tuple[str, tuple[int, int, int]]]:
    seq = max(64, round(2048 * scale))
    return [(f"decoder.layers.{i}.hidden_states", (8, seq, 4096)) for i in range(keys)]


def _write(folder: str, scale: float, keys: int) -> dict[str, str]:
    """The three dumps, written one side at a time (at most one side in memory)."""
    import numpy as np

    import reprod

    paths = {side: os.path.join(folder, f"{side}.npz") for side in ("ref", "other", "noise")}
    stamp = os.path.join(folder, "spec.json")
    spec = {"scale": scale, "keys": keys, "version": 1}
    if os.path.exists(stamp) and json.load(open(stamp)) == spec and all(map(os.path.exists, paths.values())):
        return paths
    os.makedirs(folder, exist_ok=True)
    for side in ("noise", "ref", "other"):
        tree = {}
        for i, (key, shape) in enumerate(_shapes(scale, keys)):
            rng = np.random.default_rng([23, i])
            hi = rng.standard_normal(shape)  # the float64 run
            if side == "noise":
                tree[key] = hi
                continue
            ref = hi.astype(np.float32)  # the float32 run: its rounding
            if side == "other":  # a correct port: one ulp here and there
                flip = rng.integers(-1, 2, size=shape, dtype=np.int8).astype(np.float32)
                ref = ref + flip * np.spacing(ref)
            tree[key] = ref
        reprod.save(paths[side], tree)
        del tree
    json.dump(spec, open(stamp, "w"))
    return paths


def _read_floor(paths: list[str]) -> float:
    """The seconds to read every byte of ``paths``' arrays once, as ``compare`` reads them (the
    dumps mapped by ``reprod.load``, 1 Mi-element chunks on ``reprod``'s threads), with the
    cheapest reduction numpy has (an int64 sum: ~18 GB/s on one core here, faster than a float
    sum and free of the denormal slow path that float bits read as float64 would hit)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import reprod
    from reprod.diff import metrics

    t0 = time.perf_counter()
    chunks = []
    for path in paths:
        dump = reprod.load(path)
        for key in dump:
            flat = np.asarray(dump[key]).reshape(-1).view(np.uint8)
            words = flat[: flat.size // 8 * 8].view(np.int64)
            step = 1 << 20
            chunks += [words[lo : lo + step] for lo in range(0, words.size, step)]
    with ThreadPoolExecutor(metrics.threads()) as pool:
        list(pool.map(np.sum, chunks))
    return time.perf_counter() - t0


def _child(variant: str, ref: str, other: str, noise: str) -> int:
    """One timed comparison; prints the seconds inside ``compare`` as JSON."""
    if variant in FLOORS:
        t = _read_floor([ref, other] + ([noise] if variant == "read 3" else []))
        print(json.dumps({"import": 0.0, "compare": t, "passed": True}))
        return 0
    t0 = time.perf_counter()
    import reprod
    from reprod.diff import noise as noise_mod

    if variant == "two-pass":
        noise_mod._one_pass = lambda *a, **k: None  # type: ignore[assignment]
    t1 = time.perf_counter()
    result = reprod.compare(ref, other, noise=None if variant == "plain" else noise)
    t2 = time.perf_counter()
    if variant != "plain":
        assert all(r.noise_multiple is not None for r in result.results), "a key was not calibrated"
    print(json.dumps({"import": t1 - t0, "compare": t2 - t1, "passed": result.passed}))
    return 0


def _warm(paths: dict[str, str]) -> None:
    """Read every file once, so that every run reads from the page cache."""
    for p in paths.values():
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def _run_once(variant: str, paths: dict[str, str], root: str = ROOT) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, paths["ref"],
           paths["other"], paths["noise"]]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    inside = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall": wall, "compare": inside["compare"]}


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.5, help="sequence length / 2048 (default 0.5)")
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default=os.path.join(HERE, "data"))
    p.add_argument("--json", help="write the raw times here")
    p.add_argument("--against", metavar="DIR", help="also run every variant with DIR's reprod")
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "REF", "OTHER", "NOISE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(*args.child)
    folder = os.path.join(args.data, f"calibrated@{args.scale:g}x{args.keys}")
    paths = _write(folder, args.scale, args.keys)
    sizes = {k: os.path.getsize(v) / 2**30 for k, v in paths.items()}
    _warm(paths)
    roots = [ROOT] + ([os.path.abspath(args.against)] if args.against else [])
    runs = [(root, v) for root in roots for v in VARIANTS] + [(ROOT, f) for f in FLOORS]
    times: dict[str, dict[str, list[dict[str, float]]]] = {
        root: {v: [] for v in VARIANTS + (FLOORS if root == ROOT else ())} for root in roots}
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[: r % len(runs)]  # interleaved, each first in turn
        for root, v in order:
            times[root][v].append(_run_once(v, paths, root))
    load = os.getloadavg()
    shape = _shapes(args.scale, args.keys)[0][1]
    print(f"{args.keys} x float32 {list(shape)}: ref {sizes['ref']:.2f} GiB, other {sizes['other']:.2f} GiB, "
          f"noise (float64) {sizes['noise']:.2f} GiB; {args.rounds} interleaved rounds; "
          f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for root in roots:
        if args.against:
            print(f"\nreprod from {root}:")
        _table(times[root], times[ROOT])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "sizes_gib": sizes, "times": times[ROOT], "load": load,
                       "against_times": times[roots[-1]] if args.against else None}, f, indent=1)
    return 0


def _table(times: dict[str, list[dict[str, float]]], floors: dict[str, list[dict[str, float]]]) -> None:
    med = {v: {k: statistics.median(t[k] for t in ts) for k in ("wall", "compare")} for v, ts in times.items()}
    fmed = {f: statistics.median(t["compare"] for t in floors[f]) for f in FLOORS}
    # the ratio within each round as well: on a shared machine the load drifts between rounds,
    # and a round's runs are seconds apart
    per_round = {v: statistics.median(t["compare"] / p["compare"] for t, p in zip(times[v], times["plain"]))
                 for v in VARIANTS}
    print("\n| variant | process (median) | compare (median) | process / plain | compare / plain | "
          "compare / plain, median of rounds | read floor | compare / read floor |")
    print("|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        f = FLOOR_OF[v]
        print(f"| {v} | {med[v]['wall']:.3f} s | {med[v]['compare']:.3f} s | "
              f"{med[v]['wall'] / med['plain']['wall']:.2f}x | {med[v]['compare'] / med['plain']['compare']:.2f}x | "
              f"{per_round[v]:.2f}x | {f}: {fmed[f]:.3f} s | {med[v]['compare'] / fmed[f]:.2f}x |")
    print(f"| (floors) | | | | read 3 / read 2: {fmed['read 3'] / fmed['read 2']:.2f}x | | | |")

if __name__ == "__main__":
    sys.exit(main())
