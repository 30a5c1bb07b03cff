"""The reference side of a migration: runs the PyTorch model and dumps what the port must match.

Run by ``run.py`` in its own process, as a real migration runs it: paddle is never imported here.
Writes into ``--out``: ``model.pth`` (seeded random weights) and one ReprodLogger dump per step,
``<step>_torch.npy``; for the calibrated steps (backward, training) also ``<step>_torch64.npy``,
the same keys computed by a float64 copy of the model: the reference's own float32 noise.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any

import numpy as np
import torch
from config import (
    BN_MOMENTUM_TORCH,
    DROPOUT,
    LR,
    MOMENTUM,
    NUM_CLASSES,
    SEED,
    WEIGHT_DECAY,
)
from torch import nn
from torch_model import mobilenet_v3_small

from reprod import ReprodLogger
from reprod.align import linear_weight_names, plan_conversion, save_settings, torch_to_paddle
from reprod.capture import record


def dump(path: str, values: dict[str, Any]) -> None:
    logger = ReprodLogger()
    for key, value in values.items():
        logger.add(key, value)
    logger.save(path)


@torch.no_grad()
def make_weights(model: nn.Module, calibration: torch.Tensor) -> None:
    """Seeded random weights that behave like trained ones.

    torchvision's init leaves every BatchNorm at mean 0, variance 1, scale 1, shift 0, which Paddle's
    init also produces: a conversion that dropped the BN statistics would pass unnoticed. So the
    statistics come from one pass over a calibration batch, and scale and shift are drawn at random.
    Its classifier starts at N(0, 0.01), which gives logits near 0.01 where a 1e-5 check means
    little; torch's default Linear init gives logits of order 1, as a trained model has.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.copy_(torch.empty_like(bn.weight).uniform_(0.5, 1.5, generator=gen))
        bn.bias.copy_(torch.empty_like(bn.bias).normal_(0.0, 0.2, generator=gen))
        bn.momentum = 1.0  # take this batch's statistics outright
    model.train()
    model(calibration)
    for bn in bns:
        bn.momentum = BN_MOMENTUM_TORCH
        bn.num_batches_tracked.zero_()


def paddle_layout(model: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors named like ``model``'s state dict in Paddle's names and layouts, by the same plan as
    the weight conversion, so both sides' dumps have the same keys and shapes.

    ``torch_to_paddle(..., model=model)`` insists on a complete state dict; gradients are not one.
    """
    plan = plan_conversion(
        {k: tuple(v.shape) for k, v in named.items()}, linear_weights=linear_weight_names(model)
    )
    out = {}
    for p in plan:
        if p.paddle_name is not None:
            array = named[p.torch_name].detach().numpy()
            # a copy: the optimizer may reuse the gradient's memory before the dump is written
            out[p.paddle_name] = np.array(array.T if p.action == "transpose" else array, order="C")
    return out


def grads_of(model: nn.Module) -> dict[str, np.ndarray]:
    return paddle_layout(model, {n: p.grad for n, p in model.named_parameters()})


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """5. One training-mode pass (BatchNorm normalises with batch statistics), every gradient."""
    model.zero_grad(set_to_none=True)
    model.train()
    nn.CrossEntropyLoss()(model(x), y).backward()
    return grads_of(model)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, settings: str | None = None
) -> tuple[ReprodLogger, dict[str, np.ndarray]]:
    """6. SGD with momentum and weight decay under a cosine schedule: each step's loss, lr,
    gradients and updated weights, and the running variances after the last step. ``settings``:
    where to save the optimizer's hyperparameters and schedule, for run.py to compare with the
    port's."""
    model.zero_grad(set_to_none=True)
    model.train()
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if settings is not None:
        save_settings(model, settings, optimizer=opt, scheduler=sched)
    log = ReprodLogger()
    variances: dict[str, np.ndarray] = {}
    for step in range(1, steps + 1):
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        grads = grads_of(model)
        opt.step()
        sched.step()
        weights = torch_to_paddle(model.state_dict(), model=model)
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
    args = parser.parse_args()
    out = args.out
    torch.manual_seed(SEED)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    x = torch.from_numpy(np.load(os.path.join(out, "fake_data.npy")))
    y = torch.from_numpy(np.load(os.path.join(out, "fake_label.npy")))
    # BatchNorm statistics come from a batch of their own, so they are not the test batch's
    calibration = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(SEED + 2))
    criterion = nn.CrossEntropyLoss()

    model = mobilenet_v3_small(num_classes=NUM_CLASSES, dropout=DROPOUT)
    make_weights(model, calibration)
    pth = os.path.join(out, "model.pth")
    torch.save(model.state_dict(), pth)
    dump(os.path.join(out, "weights_torch.npy"), torch_to_paddle(model.state_dict(), model=model))
    print("  torch: model.pth saved", flush=True)

    # 3. forward, 7. every layer's output: eval mode, as in inference
    model.eval()
    with torch.no_grad():
        dump(os.path.join(out, "forward_torch.npy"), {"logits": model(x)})
        # one image is enough to localise a layer, and keeps the capture (every layer's input
        # and output) a quarter the size
        with record(model) as layers:
            model(x[:1])
        layers.save(os.path.join(out, "layers_torch.npy"))

    # 4. loss: one training-mode pass (BatchNorm normalises with batch statistics), float32
    model.load_state_dict(torch.load(pth, weights_only=True))
    model.train()
    with torch.no_grad():
        dump(os.path.join(out, "loss_torch.npy"), {"loss": criterion(model(x), y)})

    # 5. backward and 6. training, in float32 as the model runs, and once more in float64: the
    # calibration. A float64 copy of the model (weights and BatchNorm statistics cast) on the same
    # batch cast to float64 gives every key the value float32 only approximates; how far the
    # float32 dump is from it is the reference's own rounding noise, and run.py judges the port's
    # difference as a multiple of that noise (reprod.compare(..., noise=...)).
    model.load_state_dict(torch.load(pth, weights_only=True))
    dump(os.path.join(out, "backward_torch.npy"), backward(model, x, y))
    print("  torch: forward, layers, loss, backward dumped", flush=True)
    model.load_state_dict(torch.load(pth, weights_only=True))
    log, variances = train(model, x, y, args.steps, os.path.join(out, "optimizer_torch.json"))
    log.save(os.path.join(out, "train_torch.npy"))
    dump(os.path.join(out, "bn_variance_torch.npy"), variances)
    print(f"  torch: {args.steps} training steps dumped", flush=True)

    model.load_state_dict(torch.load(pth, weights_only=True))
    model64 = copy.deepcopy(model).double()
    x64 = x.double()
    dump(os.path.join(out, "backward_torch64.npy"), backward(model64, x64, y))
    model64.load_state_dict(torch.load(pth, weights_only=True))  # cast to float64 on loading
    log, _ = train(model64, x64, y, args.steps)
    log.save(os.path.join(out, "train_torch64.npy"))
    print("  torch: backward and training again in float64, the calibration", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
