"""``align_forward`` on a failing port of a real model, against the forwards it has to run.

    .venv-real/bin/python benchmarks/localise.py                    # resnet50, mobilenet_v3_small
    .venv-real/bin/python benchmarks/localise.py --model resnet50 --reprod DIR   # another checkout

Needs torch, torchvision and paddle (the real-model environment of tests/realworld). The port is
paddle.vision's own, with a BatchNorm epsilon bug (tests/realworld/models.py); the figure is the
median of ``--rounds`` calls of ``align_forward(calibrate=True, by_order=True)``, which compares
the outputs, captures both models and the float64 twin layer by layer, pairs, judges and
diagnoses. Its floor is the forwards it runs, each measured in the same run (median of
``--rounds``): the torch model twice (the outputs, the capture), its float64 twin twice (the
outputs' noise, the capture's) and the port twice.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from _realmodels import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reprod", default=ROOT, help="the checkout whose reprod is measured")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.reprod))
    sys.path.insert(1, os.path.join(ROOT, "tests", "realworld"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import reprod
    from reprod.align import align_forward

    torch.set_num_threads(1)
    print(f"reprod from {os.path.dirname(os.path.dirname(reprod.__file__))}")
    print("| model | torch forward | float64 twin forward | port forward | floor "
          "(2 of each) | align_forward | ratio to floor | named |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.model or ["resnet50", "mobilenet_v3_small"]:
        print(_row(name, args.rounds, align_forward))


def _row(name: str, rounds: int, align_forward: Any) -> str:
    import paddle
    import torch
    from models import build_pair, make_inputs

    pair = build_pair(name, seed=0)
    port = pair.paddle("bn_eps")
    x = make_inputs(0, 2)
    tx, tx64, px = torch.from_numpy(x), torch.from_numpy(x.astype("float64")), paddle.to_tensor(x)
    with torch.no_grad():
        t32 = median_seconds(lambda: pair.torch32(tx), rounds)
        t64 = median_seconds(lambda: pair.torch64(tx64), rounds)
    with paddle.no_grad():
        p32 = median_seconds(lambda: port(px), rounds)
    floor = 2 * (t32 + t64 + p32)
    found: list[str] = []

    def run() -> None:
        r = align_forward(pair.torch32, port, x, calibrate=True, by_order=True)
        found[:] = r.options.get("findings") or []

    t = median_seconds(run, rounds)
    where = found[0].split(":")[0] if found else "-"
    return (f"| {name} | {t32:.3f} s | {t64:.3f} s | {p32:.3f} s | {floor:.3f} s | {t:.3f} s "
            f"| {t / floor:.1f}x | {where} |")


if __name__ == "__main__":
    main()
