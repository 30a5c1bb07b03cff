"""Pairing by call order on many same-shaped calls: 1,500 layer calls a side, each (4, 16, 256)
in and out, as a deep transformer's blocks are; the port's values equal the reference's.

    python benchmarks/pairing_many_calls.py            # this checkout
    python benchmarks/pairing_many_calls.py DIR        # DIR's reprod (an archive of a commit)

Prints the time of one ``match_by_order``. No figure is asserted; results in benchmarks/README.md.
"""

from __future__ import annotations

import sys
import time

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])

import numpy as np  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import match_by_order  # noqa: E402


def main() -> int:
    rng = np.random.default_rng(0)
    ref, got = {}, {}
    x = rng.standard_normal((4, 16, 256)).astype(np.float32)
    for i in range(1500):
        y = np.tanh(x @ (rng.standard_normal((256, 256)).astype(np.float32) / 16))
        ref[f"layers.{i}.in"], ref[f"layers.{i}.out"] = x, y
        got[f"blocks.{i}.in"], got[f"blocks.{i}.out"] = x + 0, y + 0
        x = y
    start = time.perf_counter()
    a, b = match_by_order(ref, got)
    took = time.perf_counter() - start
    print(f"{reprod.__file__}: match_by_order {took:.2f} s, passed {reprod.compare(a, b).passed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
