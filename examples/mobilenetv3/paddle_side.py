"""The port's side of a migration: runs the Paddle model on the same data and dumps the same keys.

Run by ``run.py`` in its own process, as a real migration runs it: torch is never imported here.
Reads ``model.pdparams`` (written by ``align_weights.py``) and writes ``<step>_paddle.npy``. With
``--float64``, runs only the backward and training steps, in float64, and writes
``<step>_paddle64.npy``: ``run.py`` asks for it when a float32 gradient check fails, to tell
rounding (a kink flip, gone in float64) from a bug (still there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # paddle warns at import about a missing ccache
    import paddle
    from paddle import nn
# said at every training-mode BatchNorm call; the README explains the running statistics
warnings.filterwarnings("ignore", message="When training, we now always track")

from config import (  # noqa: E402
    DROPOUT,
    LR,
    MOMENTUM,
    NUM_CLASSES,
    SEED,
    WEIGHT_DECAY,
)
from paddle_model import inject_bug, mobilenet_v3_small  # noqa: E402

from reprod import ReprodLogger  # noqa: E402
from reprod.align import load_into_paddle, save_settings  # noqa: E402
from reprod.capture import layer_types, record  # noqa: E402


def dump(path: str, values: dict[str, Any]) -> None:
    logger = ReprodLogger()
    for key, value in values.items():
        logger.add(key, value)
    logger.save(path)


def grads_of(model: nn.Layer) -> dict[str, Any]:
    # BatchNorm statistics are parameters in Paddle, with stop_gradient: they have no gradient
    return {n: p.grad for n, p in model.named_parameters() if not p.stop_gradient}


def build(bug: str | None, pdparams: str, dtype: str = "float32") -> nn.Layer:
    model = mobilenet_v3_small(num_classes=NUM_CLASSES, dropout=DROPOUT)
    if bug:
        inject_bug(model, bug)
    # unlike set_state_dict, refuses a missing key or a wrong shape instead of warning
    load_into_paddle(model, pdparams)
    if dtype != "float32":
        model.to(dtype=dtype)
    return model


def backward(model: nn.Layer, x: Any, y: Any) -> dict[str, Any]:
    """5. One training-mode pass (BatchNorm normalises with batch statistics), every gradient."""
    model.train()
    nn.CrossEntropyLoss()(model(x), y).backward()
    return grads_of(model)


def train(model: nn.Layer, x: Any, y: Any, steps: int, settings: str | None = None
          ) -> tuple[ReprodLogger, dict[str, Any]]:
    """6. Momentum with L2 weight decay under a cosine schedule: each step's loss, lr, gradients
    and updated weights, and the running variances after the last step. ``settings``: where to
    save the optimizer's hyperparameters and schedule, for run.py to compare with the
    reference's."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    sched = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=LR, T_max=steps)
    opt = paddle.optimizer.Momentum(
        learning_rate=sched,
        momentum=MOMENTUM,
        parameters=model.parameters(),
        weight_decay=WEIGHT_DECAY,  # a float is L2Decay, torch SGD's weight_decay
    )
    if settings is not None:
        save_settings(model, settings, optimizer=opt, scheduler=sched)
    log = ReprodLogger()
    variances: dict[str, Any] = {}
    for step in range(1, steps + 1):
        lr = opt.get_lr()
        loss = criterion(model(x), y)
        loss.backward()
        # copied now: clear_grad() zeroes the gradients in place
        grads = {k: v.numpy() for k, v in grads_of(model).items()}
        opt.step()
        opt.clear_grad()
        sched.step()
        weights = {k: v.numpy() for k, v in model.state_dict().items()}
        # running variances are compared on their own (see run.py): Paddle updates them differently
        variances = {k: weights.pop(k) for k in list(weights) if k.endswith("._variance")}
        log.add(
            f"step_{step}",
            {"loss": loss, "lr": np.float64(lr), "grad": grads, "weight": weights},
        )
    return log, variances


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--inject-bug", default=None)
    parser.add_argument(
        "--float64", action="store_true", help="only backward and training, in float64"
    )
    args = parser.parse_args()
    out = args.out
    paddle.set_device("cpu")
    paddle.seed(SEED)

    x = paddle.to_tensor(np.load(os.path.join(out, "fake_data.npy")))
    y = paddle.to_tensor(np.load(os.path.join(out, "fake_label.npy")))
    pdparams = os.path.join(out, "model.pdparams")

    if args.float64:
        x64 = x.astype("float64")
        model = build(args.inject_bug, pdparams, dtype="float64")
        dump(os.path.join(out, "backward_paddle64.npy"), backward(model, x64, y))
        log, _ = train(build(args.inject_bug, pdparams, dtype="float64"), x64, y, args.steps)
        log.save(os.path.join(out, "train_paddle64.npy"))
        print("  paddle: backward and training dumped in float64", flush=True)
        return 0

    model = build(args.inject_bug, pdparams)
    dump(os.path.join(out, "weights_paddle.npy"), model.state_dict())

    # 3. forward, 7. every layer's output: eval mode, as in inference
    model.eval()
    with paddle.no_grad():
        dump(os.path.join(out, "forward_paddle.npy"), {"logits": model(x)})
        with record(model) as layers:
            model(x[:1])
        layers.save(os.path.join(out, "layers_paddle.npy"))
    # the port's layer classes, for the localisation message (run.py imports no framework)
    with open(os.path.join(out, "layers_paddle_types.json"), "w", encoding="utf-8") as f:
        json.dump(layer_types(model), f, indent=1)

    # 4. loss: one training-mode pass (BatchNorm normalises with batch statistics), float32
    model = build(args.inject_bug, pdparams)
    model.train()
    with paddle.no_grad():
        dump(os.path.join(out, "loss_paddle.npy"), {"loss": nn.CrossEntropyLoss()(model(x), y)})

    # 5. backward and 6. training, float32 like everything else: the torch side's float64 run
    # calibrates the verdicts
    dump(os.path.join(out, "backward_paddle.npy"), backward(build(args.inject_bug, pdparams), x, y))
    print("  paddle: forward, layers, loss, backward dumped", flush=True)
    log, variances = train(build(args.inject_bug, pdparams), x, y, args.steps,
                           os.path.join(out, "optimizer_paddle.json"))
    log.save(os.path.join(out, "train_paddle.npy"))
    dump(os.path.join(out, "bn_variance_paddle.npy"), variances)
    print(f"  paddle: {args.steps} training steps dumped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
