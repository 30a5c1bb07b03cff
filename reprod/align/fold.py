"""Folding a convolution's bias into the BatchNorm after it, as ports often do.

timm's ResNeSt (``SplitAttn.fc1``) and HRNet (its heads) hold a convolution bias right before a
BatchNorm; PaddleClas's ports of them have none. A norm takes the mean of its input away, so in
training the bias cancels, and in evaluation its running mean holds it: ``running_mean -=
bias`` and no bias computes the same numbers, and then the weights pair by order. Pairing by
order refuses such a pair and names the biases (``by_order._biases_before_norms``); this is the
step it asks for.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ReprodError

__all__ = ["fold_conv_biases"]


def fold_conv_biases(torch_model: Any, *inputs: Any, **kwargs: Any) -> list[str]:
    """Fold each convolution bias of ``torch_model`` whose output goes straight into a BatchNorm
    into that norm's running mean, in place, and drop the bias; return the folded biases' names
    (``layer1.0.conv2.fc1.bias``).

    The model runs once on ``inputs`` (and ``kwargs``), in evaluation mode and without
    gradients, to see which norm reads which convolution's output; then again after folding,
    and where its outputs moved by more than float32 rounding (a convolution's output read
    elsewhere too, as by a residual) nothing is folded and a ``ReprodError`` says so. A norm
    without running statistics (``track_running_stats=False``) is left alone.

    >>> fold_conv_biases(timm_resnest, x)          # then
    >>> load_into_paddle(paddle_resnest, timm_resnest, by_order=True)
    """
    import torch

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
    names = {id(m): n for n, m in torch_model.named_modules()}
    # id of a conv's output tensor -> the conv and the tensor, held so that no later tensor
    # takes its id
    made: dict[int, tuple[str, Any]] = {}
    reads: list[tuple[str, str]] = []  # (conv, norm) where the norm read that output
    handles = []

    def conv_hook(module: Any, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            made[id(out)] = (names[id(module)], out)

    def norm_hook(module: Any, args: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in made:
            reads.append((made[id(args[0])][0], names[id(module)]))

    for m in torch_model.modules():
        if isinstance(m, convs) and m.bias is not None:
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, norms) and m.track_running_stats and m.running_mean is not None:
            handles.append(m.register_forward_pre_hook(norm_hook))
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            before = _flat(torch_model(*inputs, **kwargs))
    finally:
        for h in handles:
            h.remove()
        made.clear()
    modules = dict(torch_model.named_modules())
    pairs = list(dict.fromkeys(reads))  # a block called twice reads the same pair twice
    convs_read = [c for c, _ in pairs]
    # a conv read by two norms, or a norm reading two convs, is no one fold
    pairs = [(c, n) for c, n in pairs
             if convs_read.count(c) == 1 and sum(n == m for _, m in pairs) == 1]
    held = {c: modules[c].bias for c, _ in pairs}
    means = {n: modules[n].running_mean.detach().clone() for _, n in pairs}
    try:
        with torch.no_grad():
            for conv, norm in pairs:
                modules[norm].running_mean.sub_(held[conv].detach().to(
                    modules[norm].running_mean.dtype))
                modules[conv].register_parameter("bias", None)
            after = _flat(torch_model(*inputs, **kwargs))
        moved = [i for i, (a, b) in enumerate(zip(before, after)) if not _close(a, b)]
        if moved or len(before) != len(after):
            raise ReprodError(
                f"fold_conv_biases: folding {len(pairs)} bias(es) "
                f"({', '.join(c + '.bias' for c, _ in pairs[:3])}{', ...' if len(pairs) > 3 else ''})"
                " moves the model's outputs: a convolution's output is read elsewhere too (a "
                "residual?), so its bias cannot go into the norm; nothing was folded")
    except BaseException:
        with torch.no_grad():
            for conv, norm in pairs:
                modules[conv].register_parameter("bias", held[conv])
                modules[norm].running_mean.copy_(means[norm])
        raise
    finally:
        torch_model.train(was_training)
    return [f"{c}.bias" for c, _ in pairs]


def _flat(out: Any) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out.detach().float().cpu().numpy()]
    if isinstance(out, dict):
        return [a for v in out.values() for a in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [a for v in out for a in _flat(v)]
    return []


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to float32 rounding at the values' scale (the bias leaves the sum at another
    point, which rounds otherwise)."""
    if a.shape != b.shape:
        return False
    scale = float(np.abs(a).max(initial=0.0))
    return bool(np.abs(a.astype(np.float64) - b).max(initial=0.0) <= 1e-5 * max(scale, 1.0))
