"""Pairing two layer captures by call order (``match_by_order``, ``reprod-diff --by-order``)
against comparing them, on a real model pair.

    .venv-real/bin/python benchmarks/pairing.py                    # resnet50, mobilenet_v3_small
    .venv-real/bin/python benchmarks/pairing.py --reprod DIR       # another checkout
    .venv-real/bin/python benchmarks/pairing.py --batch 8          # larger captures

Needs torch, torchvision and paddle (tests/realworld's environment). Both models of the pair
(torchvision's and paddle.vision's port, tests/realworld/models.py) are captured once with
``reprod.capture.record`` at batch 2 (``--batch``); the figures are medians of ``--rounds``. The floor is
``reprod.compare`` of the paired captures (the reads pairing's fingerprints also need), and one
``sum`` over every capture, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from _realmodels import check_env, median_seconds, revision, use_checkout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _row(name: str, rounds: int, batch: int) -> str:
    import numpy as np
    import paddle
    import torch
    from models import build_pair, make_inputs

    import reprod
    from reprod.capture import match_by_order, record

    pair = build_pair(name, seed=0)
    x = make_inputs(0, batch)
    with torch.no_grad(), record(pair.torch32) as t_log:
        pair.torch32(torch.from_numpy(x))
    port = pair.paddle()
    with paddle.no_grad(), record(port) as p_log:
        port(paddle.to_tensor(x))
    ref, other = dict(t_log.data), dict(p_log.data)
    arrays = [np.asarray(v) for v in [*ref.values(), *other.values()]]
    size = sum(a.nbytes for a in arrays)
    one_pass = median_seconds(lambda: [a.sum() for a in arrays if a.dtype.kind == "f"], rounds)
    paired: list[Any] = []
    pairing = median_seconds(lambda: paired.__setitem__(slice(None), match_by_order(ref, other)), rounds)
    comparing = median_seconds(lambda: reprod.compare(*paired, threshold=1e-5), rounds)
    return (f"| {name} | {size / 1e6:,.0f} MB | {len(paired[0])} | {one_pass:.3f} s | "
            f"{comparing:.3f} s | {pairing:.3f} s | {pairing / comparing:.1f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reprod", default=ROOT, help="the checkout whose reprod is measured")
    args = ap.parse_args()
    check_env("pairing.py")
    use_checkout(args.reprod)
    sys.path.insert(1, os.path.join(ROOT, "tests", "realworld"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    print(f"reprod from {os.path.abspath(args.reprod)} ({revision(args.reprod)})")
    print("| model | captures (both) | paired keys | one sum pass | compare | match_by_order | "
          "pairing / compare |")
    print("|---|---|---|---|---|---|---|")
    for name in args.model or ["resnet50", "mobilenet_v3_small"]:
        print(_row(name, args.rounds, args.batch))


if __name__ == "__main__":
    main()
