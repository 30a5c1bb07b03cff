"""``assert_aligned`` (dtype-default tolerances) against ``reprod.compare`` (fixed atol/rtol) on the
same keys, in one process, and the cost of many exact-name per-key rules.

    python benchmarks/criteria.py                 # 4,000 and 100,000 keys
    python benchmarks/criteria.py --keys 4000     # one size

Before ``reprod.Criteria`` the dtype defaults became one escaped glob rule per key that every key
scanned: 4,000 keys took 26 s against 0.15 s for ``compare``. Each figure is the median of
``--rounds`` runs over in-memory dicts of small float32 arrays (the engine, not the disk).
"""

from __future__ import annotations

import argparse
import os
import sys

from _realmodels import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import reprod  # noqa: E402
from reprod.testing import assert_aligned  # noqa: E402


def _dumps(n: int, path: str) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    ref = {f"layer{i}.weight": rng.standard_normal(64).astype(np.float32) for i in range(n)}
    other = {k: v + np.float32(1e-7) for k, v in ref.items()}
    a, b = os.path.join(path, f"ref{n}.npz"), os.path.join(path, f"other{n}.npz")
    reprod.save(a, ref)
    reprod.save(b, other)
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import tempfile

    print("| keys | compare(atol, rtol) | assert_aligned (dtype defaults) | ratio | compare + one exact rule per key | ratio |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.keys or [4000, 100000]:
            a, b = _dumps(n, tmp)
            rules = {f"layer{i}.weight": {"atol": 1e-5, "rtol": 1.3e-6} for i in range(n)}
            t_cmp = median_seconds(lambda: reprod.compare(a, b, method=None, threshold=None,  # noqa: B023
                                                   atol=1e-5, rtol=1.3e-6), args.rounds)
            t_assert = median_seconds(lambda: assert_aligned(a, b), args.rounds)  # noqa: B023
            t_rules = median_seconds(lambda: reprod.compare(a, b, method=None, threshold=None,  # noqa: B023
                                                     per_key=rules), args.rounds)  # noqa: B023
            print(f"| {n:,} | {t_cmp:.3f} s | {t_assert:.3f} s | {t_assert / t_cmp:.2f}x "
                  f"| {t_rules:.3f} s | {t_rules / t_cmp:.2f}x |")


if __name__ == "__main__":
    main()
