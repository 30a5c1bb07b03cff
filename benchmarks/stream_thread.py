"""The streaming writer thread against its write floor (issue 23, round 7).

On a GPU machine a streamed ``record`` block hands every tensor's pinned copy to the logger's
writer thread, and the step lasts as long as that thread writes (benchmarks/README.md, "The GPU
checks, run"). This times the thread alone, framework-free, on arrays sized like a streamed
MobileNetV3-Small step's (a few large activations, many mid-sized, some small):

- ``write floor``: the same bytes written by ``os.write`` from the arrays, one pass;
- ``thread``: ``ReprodLogger(stream_to=...)._put_later`` of every array (capture's hand-over),
  then ``close()``, the large members' CRCs computed before their writes on the thread;
- ``thread, CRC beside``: the same with ``NpzWriter.overlap_crcs`` on (what the thread does
  where ``npz_background.OVERLAP_CORES`` cores are available): the CRC on a helper thread while
  the member is written.

    PYTHONPATH=. python benchmarks/stream_thread.py [--mib 512] [--rounds 5] [--dir /tmp]

Medians of ``--rounds``, interleaved, each after a warm-up round; prints a table and one JSON line.
Meaningful only on a quiet machine (nothing else on its cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

from reprod import ReprodLogger, _native  # noqa: E402
from reprod.storage import npz_background  # noqa: E402


def arrays(mib: int) -> list[np.ndarray]:
    """About ``mib`` MiB: 60 % in 6.4 MiB arrays, 35 % in 800 KiB ones, 5 % in 50 KiB ones."""
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = []
    for share, nbytes in ((0.60, 6_422_528), (0.35, 802_816), (0.05, 50_176)):
        for _ in range(max(1, int(mib * 2**20 * share / nbytes))):
            out.append(rng.standard_normal(nbytes // 4, dtype=np.float32))
    return out


def write_floor(values: list[np.ndarray], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for v in values:
            mv = memoryview(v).cast("B")
            while mv:
                mv = mv[os.write(fd, mv):]
    finally:
        os.close(fd)


def thread(values: list[np.ndarray], path: str, overlap: bool) -> None:
    cores = npz_background.OVERLAP_CORES
    npz_background.OVERLAP_CORES = 1 if overlap else 1 << 30
    try:
        lg = ReprodLogger(stream_to=path)
        for i, v in enumerate(values):
            lg._put_later(f"layer{i}.out", v)
        assert lg._writer._overlap is overlap
        lg.close()
    finally:
        npz_background.OVERLAP_CORES = cores


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the files go (default: the temporary folder)")
    args = ap.parse_args(argv)
    if _native.kernel() is None:
        print("stream_thread: the kernel is not built (python setup.py build_ext --inplace)")
        return 2
    values = arrays(args.mib)
    total = sum(v.nbytes for v in values)
    folder = tempfile.mkdtemp(prefix="stream_thread_", dir=args.dir)
    variants = {
        "write floor": lambda p: write_floor(values, p),
        "thread": lambda p: thread(values, p, False),
        "thread, CRC beside": lambda p: thread(values, p, True),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds + 1):
        names = list(variants)
        names = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            path = os.path.join(folder, "run.npz")
            t0 = time.perf_counter()
            variants[name](path)
            dt = time.perf_counter() - t0
            os.remove(path)
            if r:
                times[name].append(dt)
    os.rmdir(folder)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    floor = ms["write floor"]
    print(f"{len(values)} arrays, {total / 2**20:.0f} MiB, {os.cpu_count()} cores, "
          f"median of {args.rounds}")
    print("| variant | ms | GB/s | / write floor |\n|---|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.0f} | {total / v / 1e6:.2f} | {v / floor:.2f}x |")
    print(json.dumps({"arrays": len(values), "MiB": round(total / 2**20), "ms": {k: round(v, 1) for k, v in ms.items()},
                      "ratios": {k: round(v / floor, 3) for k, v in ms.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
