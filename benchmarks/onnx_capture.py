"""Cost of ``reprod.capture.record_onnx`` on the example's model against its floors (issue 23).

    python benchmarks/onnx_capture.py                       # batch 8, 224 px, 7 rounds
    python benchmarks/onnx_capture.py --batch 2 --size 64 --rounds 5

MobileNetV3-Small from examples/mobilenetv3/ (seeded weights, BatchNorms moved off their
defaults), exported with ``torch.onnx.export(dynamo=True)`` to a temporary file, run on the CPU
with onnxruntime's graph optimisations off (``record_onnx``'s default). ``record_onnx`` makes every
value it logs a graph output, builds a session of that graph and runs it once; the floors are
measured on the same graph, which the warm-up takes from the session ``record_onnx`` builds:

- ``run``: ``session.run`` of the exported graph on an open session (outputs only);
- ``run, values out``: ``session.run`` of ``record_onnx``'s graph on an open session;
- ``session + run, values out``: a new session of that graph from its bytes, then one run: what
  any one-off run of it costs, the floor;
- ``record_onnx``: from the file's path to the filled ``ReprodLogger``.

Every variant runs once per round, rounds interleaved; the figures are medians, wall time and
the process's CPU time. No figure is asserted anywhere; results go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, "examples", "mobilenetv3")
sys.path.insert(0, ROOT)

VARIANTS = ["run", "run, values out", "session + run, values out", "record_onnx"]
FLOOR = "session + run, values out"


def _model() -> Any:
    import torch

    sys.path.insert(0, EXAMPLE)
    import torch_model

    torch.manual_seed(0)
    model = torch_model.mobilenet_v3_small(num_classes=10)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from reprod.capture import record_onnx

    model = _model()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
    feeds_np = x.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mbv3.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=True)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        plain = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {plain.get_inputs()[0].name: feeds_np}

        # the graph record_onnx runs: taken from the session it builds, in the warm-up
        seen: list[bytes] = []
        real = ort.InferenceSession

        def spying(model_bytes: Any, *a: Any, **k: Any) -> Any:
            if isinstance(model_bytes, bytes):
                seen.append(model_bytes)
            return real(model_bytes, *a, **k)

        ort.InferenceSession = spying  # type: ignore[misc]
        try:
            logged = record_onnx(path, feeds_np, torch_model=model)
        finally:
            ort.InferenceSession = real  # type: ignore[misc]
        probe = seen[-1]
        valued = ort.InferenceSession(probe, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in valued.get_outputs()]

        def fresh() -> Any:
            s = ort.InferenceSession(probe, opts, providers=["CPUExecutionProvider"])
            return s.run(names, feed)

        runs: dict[str, Callable[[], Any]] = {
            "run": lambda: plain.run(None, feed),
            "run, values out": lambda: valued.run(names, feed),
            "session + run, values out": fresh,
            "record_onnx": lambda: record_onnx(path, feeds_np, torch_model=model),
        }
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                times[v].append(_timed(runs[v]))
        size = sum(np.asarray(v).nbytes for v in logged.data.values())
    print(f"MobileNetV3-Small, batch {args.batch}, {args.size} px, {len(logged.data)} values "
          f"logged ({size / 2**20:.0f} MiB), {len(names)} graph outputs; onnxruntime "
          f"{ort.__version__}, {torch.get_num_threads()} threads; median of {args.rounds}")
    print()
    print("| variant | wall | CPU | wall / floor | CPU / floor |")
    print("|---|---|---|---|---|")
    med = {v: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
           for v, ts in times.items()}
    for v in VARIANTS:
        w, c = med[v]
        print(f"| {v} | {w * 1e3:.1f} ms | {c * 1e3:.1f} ms | {w / med[FLOOR][0]:.2f}x | "
              f"{c / med[FLOOR][1]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
