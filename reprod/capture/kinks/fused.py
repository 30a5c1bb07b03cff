"""Kink activations inside another layer: Paddle's ``BatchNorm(num_channels, act="relu")``
normalises and applies a ReLU in one layer where torch has two (``BatchNorm2d`` then ``ReLU``, or
``F.relu`` after the norm, as torchvision's DenseNet does after its last one). The kink is the
same, but its input, the normalised value, is no layer's input or output on the Paddle side.

A *site* is such an activation seen as a layer of its own, named ``<norm layer>+<activation>``
(``features.norm5+relu``), whose input is the norm layer's output before the activation.
``record_sites`` records it as the site's ``in`` key, in ``record``'s scheme
(``features.norm5+relu#2.in`` for the second call):

- on the Paddle side the activation is taken out of the layer for the block (``layer._act =
  None``) and the hook applies it to the layer's output with the function the layer's own
  ``forward`` calls: the model's output is computed by the same operators, with the same
  gradients, and the value recorded is the one Paddle's batch-norm operator produced. (A
  recomputation from the recorded input and the batch statistics would round differently, and
  an element that crosses a kink lies, by definition, within rounding of it.)
- on the torch side the norm layer's output is recorded as it is: it is the input of the ReLU
  that follows.

>>> fused_activations(paddle_densenet)["conv1_func._batch_norm"]
'ReLU'
>>> with record_sites(paddle_densenet, log, {"conv1_func._batch_norm": "conv1_func._batch_norm+relu"}):
...     paddle_densenet(x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

from ...logger import ReprodLogger
from ..naming import ROOT, layer_key

__all__ = ["FUSED_ACTIVATIONS", "NORM_LAYERS", "fused_activations", "record_sites", "site_name"]

# Paddle's ``act=`` names whose function has a kink -> the activation class whose KINK_POINTS
# apply. Measured on Paddle 3.3's legacy operators, which a fused layer calls with their default
# attributes: relu6 clips at 6, hard_swish bends at -3 and 3. Left out: hard_sigmoid (slope 0.2,
# bends at -2.5 and 2.5, not torch's Hardsigmoid) and leaky_relu (a fused layer with it fails
# in Paddle's own forward).
FUSED_ACTIVATIONS: dict[str, str] = {"relu": "ReLU", "relu6": "ReLU6", "hard_swish": "Hardswish"}

# the batch-norm classes of both frameworks (lower case), the layers a Paddle fused one stands for
NORM_LAYERS = frozenset({
    "batchnorm", "batchnorm1d", "batchnorm2d", "batchnorm3d", "syncbatchnorm",
    "lazybatchnorm1d", "lazybatchnorm2d", "lazybatchnorm3d",
})


def site_name(layer: str, activation: str) -> str:
    """The name of the activation that follows ``layer``'s output: ``features.norm5+relu``."""
    return f"{layer}+{activation.lower()}"


def _applier(layer: Any) -> Optional[tuple[str, Callable[..., Any]]]:
    """``(act, apply)`` for a Paddle BatchNorm with a kink activation and Paddle's own forward
    (a subclass with another forward may use ``_act`` differently: not taken apart)."""
    act = getattr(layer, "_act", None)
    if not isinstance(act, str) or act not in FUSED_ACTIVATIONS:
        return None
    if "paddle" not in {c.__module__.split(".", 1)[0] for c in type(layer).__mro__}:
        return None
    import paddle
    from paddle.nn.layer import norm

    if not isinstance(layer, paddle.nn.BatchNorm) or type(layer).forward is not paddle.nn.BatchNorm.forward:
        return None
    # the very function BatchNorm.forward applies its activation with
    apply = getattr(getattr(norm, "dygraph_utils", None), "_append_activation_in_dygraph", None)
    return None if apply is None else (act, apply)


def fused_activations(model: Any) -> dict[str, str]:
    """Layer name -> activation class (``"ReLU"``) for each layer of a Paddle model that applies
    a kink activation to its own output (``paddle.nn.BatchNorm(act="relu")``); empty for a torch
    model. The model itself is left out (it has no upstream)."""
    if not hasattr(model, "named_sublayers"):
        return {}
    out = {}
    for name, layer in model.named_sublayers(include_self=True):
        found = _applier(layer)
        if found is not None and name and name != ROOT:
            out[name] = FUSED_ACTIVATIONS[found[0]]
    return out


@contextlib.contextmanager
def record_sites(model: Any, logger: ReprodLogger, sites: Mapping[str, str]) -> Iterator[None]:
    """Record, while the block runs, the input of each site: for each call of a layer named in
    ``sites`` (layer name -> site name), its output before a built-in activation (a Paddle fused
    layer) or its output (any other layer), under ``layer_key(site, call, "in")``. The layers'
    activations and the hooks are put back when the block ends, also when it raises."""
    from .. import _backend

    backend = _backend(model)
    layers = dict(backend.named_layers(model))
    calls: dict[str, int] = {}
    handles: list[Any] = []
    restore: list[tuple[Any, str]] = []

    def hook(site: str, fused: Optional[tuple[str, Callable[..., Any]]]) -> Callable[[Any], Any]:
        def record_one(output: Any) -> Any:
            calls[site] = calls.get(site, 0) + 1
            logger.add(layer_key(site, calls[site], "in"), output)  # a copy, taken now
            if fused is None:
                return None
            act, apply = fused
            return apply(output, act=act)

        return record_one

    try:
        for name, site in sites.items():
            layer = layers.get("" if name == ROOT else name)
            if layer is None:
                continue
            fused = _applier(layer)
            handles.append(backend.add_post_hook(layer, hook(site, fused)))
            if fused is not None:
                restore.append((layer, fused[0]))
                layer._act = None
        yield
    finally:
        for h in handles:
            h.remove()
        for layer, act in restore:
            layer._act = act
