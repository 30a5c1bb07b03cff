"""Cost of ``reprod.align.trace_settings`` on the example's model against its floor, the forward
pass alone.

    python benchmarks/settings_trace.py                   # torch and paddle, 9 rounds
    python benchmarks/settings_trace.py --frameworks torch --rounds 15 --batch 8

MobileNetV3-Small from examples/mobilenetv3/ (eval, no_grad, 224x224, CPU). For each framework,
each round runs the plain forward pass and the traced one (the trace entered and left around it,
as ``align_forward`` does once), interleaved; the figure is the median. The ratio is traced over
plain. The trace runs once per ``align_forward`` or ``align_train`` call, so its cost is paid once
per check, not per step. No figure is asserted anywhere; results go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(framework: str, rounds: int, batch: int) -> dict[str, float]:
    import numpy as np

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "examples", "mobilenetv3"))
    from reprod.align import trace_settings

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if framework == "torch":
        import torch
        from torch_model import mobilenet_v3_small

        torch.set_num_threads(1)
        model, inp, no_grad = mobilenet_v3_small().eval(), torch.from_numpy(x), torch.no_grad
    else:
        import paddle
        from paddle_model import mobilenet_v3_small

        paddle.set_device("cpu")
        model, inp, no_grad = mobilenet_v3_small(), paddle.to_tensor(x), paddle.no_grad
        model.eval()
    events = 0

    def plain() -> None:
        with no_grad():
            model(inp)

    def traced() -> None:
        nonlocal events
        with no_grad(), trace_settings(model) as trace:
            model(inp)
        events = len(trace.events)

    times: dict[str, list[float]] = {"plain": [], "traced": []}
    plain(), traced()  # warm-up
    for _ in range(rounds):
        for name, fn in (("plain", plain), ("traced", traced)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["events"] = events
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frameworks", nargs="+", default=["torch", "paddle"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"| framework | plain | traced | ratio | events |  (batch {args.batch}, median of "
          f"{args.rounds})")
    print("|---|---|---|---|---|")
    for fw in args.frameworks:
        r = _run(fw, args.rounds, args.batch)
        print(f"| {fw} | {r['plain'] * 1e3:.1f} ms | {r['traced'] * 1e3:.1f} ms | "
              f"{r['traced'] / r['plain']:.2f}x | {r['events']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
