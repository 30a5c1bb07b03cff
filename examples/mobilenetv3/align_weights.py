"""Steps 1 and 2 of the migration: check the port's structure and convert the weights.

The one script that needs both frameworks (it builds both models): it compares their parameters,
writes the table to ``tables/structure.txt``, converts ``model.pth`` to ``model.pdparams`` and exits
non-zero when the structures differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # paddle warns at import about a missing ccache
    import paddle

import paddle_model
import torch
import torch_model
from config import BUGS, DROPOUT, IMAGE_SIZE, NUM_CLASSES

from reprod.align import (
    compare_settings,
    compare_structure,
    convert,
    trace_settings,
    write_pdparams,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--inject-bug", default=None)
    args = parser.parse_args()
    paddle.set_device("cpu")

    t_model = torch_model.mobilenet_v3_small(num_classes=NUM_CLASSES, dropout=DROPOUT)
    p_model = paddle_model.mobilenet_v3_small(num_classes=NUM_CLASSES, dropout=DROPOUT)
    if args.inject_bug:
        paddle_model.inject_bug(p_model, args.inject_bug)
    report = compare_structure(t_model, p_model)
    os.makedirs(os.path.join(args.out, "tables"), exist_ok=True)
    with open(os.path.join(args.out, "tables", "structure.txt"), "w", encoding="utf-8") as f:
        f.write(report.to_table(layers=True) + "\n")
    # what each layer computes beyond its weights: an epsilon, a stride, a pool's ceil_mode; and
    # what either model's code applies as a function (F.hardsigmoid(x, slope=...)), traced through
    # one forward pass of each on any input of the right shape
    x = np.random.default_rng(0).standard_normal((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    t_model.eval()
    p_model.eval()
    with torch.no_grad(), trace_settings(t_model) as t_trace:
        t_model(torch.from_numpy(x))
    with paddle.no_grad(), trace_settings(p_model) as p_trace:
        p_model(paddle.to_tensor(x))
    settings = compare_settings(t_model, p_model, traces=(t_trace, p_trace))
    with open(os.path.join(args.out, "tables", "settings.txt"), "w", encoding="utf-8") as f:
        f.write(str(settings) + "\n")
    with open(os.path.join(args.out, "tables", "structure.json"), "w", encoding="utf-8") as f:
        tensors = sum(r.status in ("ok", "transposed") for r in report.rows)
        json.dump({"ok": report.ok, "tensors": tensors, "summary": report.summary_line(),
                   "settings": {"passed": settings.passed, "layers": settings.compared,
                                "calls": settings.calls,
                                "differ": [d.line() for d in settings.differ],
                                "unpaired": list(settings.unpaired)}}, f)

    conversion = convert(os.path.join(args.out, "model.pth"), model=t_model)
    converted = conversion.weights
    if args.inject_bug == "no-transpose":
        name = BUGS["no-transpose"][0] + ".weight"
        # the classic slip: reshape where a transpose was needed; shapes fit, values are scrambled
        converted[name] = np.ascontiguousarray(converted[name].T).reshape(converted[name].shape)
    write_pdparams(os.path.join(args.out, "model.pdparams"), converted)
    print(f"  convert: {conversion.summary_line()}", flush=True)
    print(f"  structure: {report.summary_line()}", flush=True)
    print(f"  settings: {str(settings).splitlines()[0]}"
          + (f" (and {len(settings.differ) - 1} more)" if len(settings.differ) > 1 else ""),
          flush=True)
    for line in settings.unpaired:  # a kind the two models apply a different number of times
        print(f"  settings: not paired by order: {line}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
