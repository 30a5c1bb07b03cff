"""What the half-precision alone check and the code between the layers add to ``align_forward``
on a faithful bfloat16 port of a real model, against the forwards it has to run.

    OMP_NUM_THREADS=1 .venv-real/bin/python benchmarks/half_alone.py     # resnet18, mobilenet
    .venv-real/bin/python benchmarks/half_alone.py --model resnet18 --reprod DIR   # another checkout

Needs torch, torchvision and paddle (the real-model environment of tests/realworld). The models
are built as tests/realworld/test_half_alone_real.py builds them: torchvision's with seeded
random weights against paddle.vision's own, the port computing as a bfloat16 GPU kernel would
(``_emulated``), input (2, 3, 64, 64). Each round calls, one after the other,
``align_forward(calibrate=True, precision="bfloat16")`` (by order for mobilenet) three ways:
(b) with ``local_layers`` returning None (no layer judged alone; by order, the blocks' capture
made for it still runs), (c) with only the between pass off (``half_local._between`` giving
nothing), (a) as it is; the figures are the medians of ``--rounds``, after one untimed call.
(a) also times what it spends inside ``local_layers`` and, of that, the two ``_between`` calls
(summed per call, median): the same costs read directly, not as the difference of two noisy
wall times.
Its floor is one forward each of the bfloat16 torch reference, the float32 torch model and the
emulated port, measured in the same run (median of ``--rounds``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Callable

from _realmodels import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DT = "bfloat16"


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

    torch.set_num_threads(1)
    print(f"reprod from {os.path.dirname(os.path.dirname(reprod.__file__))}")
    print("| model | floor forwards (ref bf16 / twin f32 / port) | without alone (b) "
          "| alone, without between (c) | full (a) | alone's cost (a-b) | between's cost (a-c) "
          "| timed inside (a): local_layers / of it _between |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.model or ["resnet18", "mobilenet_v3_small"]:
        print(_row(name, args.rounds), flush=True)


def _row(name: str, rounds: int) -> str:
    import paddle
    import torch
    from test_half_alone_real import X, _emulated, _vision

    import reprod.align.forward as forward
    import reprod.align.half_local as half_local
    from reprod.align import align_forward

    tm, pm = _vision(name)
    port = _emulated(copy.deepcopy(pm))
    by_order = name.startswith("mobilenet")
    ref = copy.deepcopy(tm).to(torch.bfloat16)
    tx = torch.from_numpy(X)
    tx16 = tx.to(torch.bfloat16)
    tx32 = tx16.float()  # the input rounded, as the twin is given it
    px = paddle.to_tensor(X)
    with torch.no_grad():
        ref(tx16), tm(tx32)  # warm: the first call of a model pays one-off setup
        t_ref = median_seconds(lambda: ref(tx16), rounds)
        t_twin = median_seconds(lambda: tm(tx32), rounds)
    with paddle.no_grad():
        port(px)
        t_port = median_seconds(lambda: port(px), rounds)
    floor = t_ref + t_twin + t_port

    alone: dict[str, Any] = {}

    def full() -> None:
        r = align_forward(tm, port, X, calibrate=True, precision=DT, by_order=by_order)
        assert r.passed, r.to_table()
        alone.update(r.options.get("layers", {}).get("alone") or {})

    def patched(module: Any, attr: str, value: Any) -> Callable[[], None]:
        def run() -> None:
            was = getattr(module, attr)
            setattr(module, attr, value)
            try:
                full()
            finally:
                setattr(module, attr, was)
        return run

    inside: dict[str, list[float]] = {"local_layers": [], "_between": []}

    def timed(module: Any, attr: str) -> Callable[..., Any]:
        fn = getattr(module, attr)

        def run(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside[attr][-1] += time.perf_counter() - t
        return run

    def timed_full() -> None:  # (a), with the time spent inside the two summed per call
        for spent in inside.values():
            spent.append(0.0)
        was = forward.local_layers, half_local._between
        forward.local_layers = timed(forward, "local_layers")
        half_local._between = timed(half_local, "_between")
        try:
            full()
        finally:
            forward.local_layers, half_local._between = was

    variants = {
        "b": patched(forward, "local_layers", lambda *a, **k: None),
        "c": patched(half_local, "_between", lambda *a, **k: ({}, set())),
        "a": timed_full,
    }
    full()  # warm, untimed: the first call pays the lazy imports; and it must pass
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):  # interleaved: the machine's load falls on all three alike
        for key, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    a, b, c = (statistics.median(times[k]) for k in "abc")
    in_local, in_between = (statistics.median(v) for v in inside.values())
    assert alone.get("passed"), alone
    return (f"| {name} | {t_ref:.3f} / {t_twin:.3f} / {t_port:.3f} s (sum {floor:.3f} s) "
            f"| {b:.3f} s | {c:.3f} s | {a:.3f} s | {a - b:.3f} s ({(a - b) / floor:.1f}x) "
            f"| {a - c:.3f} s ({(a - c) / floor:.1f}x) "
            f"| {in_local:.3f} / {in_between:.3f} s ({in_between / floor:.1f}x) |")


if __name__ == "__main__":
    main()
