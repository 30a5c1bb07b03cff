"""Layer-by-layer capture of a torch or paddle model, and the first layer where two captures part.

>>> from reprod.capture import record, first_divergence, layer_types
>>> with record(torch_model, backward=True) as log:
...     torch_model(x).sum().backward()
>>> log.save("torch_layers.npz")

Every layer's inputs and outputs (and, with ``backward=True``, the gradients through them
and every parameter's gradient) are logged under keys named after the layer, in call order; the
key scheme is in ``reprod.capture.naming`` and docs/capture.md. ``explain_kinks`` relabels the
gradients that differ only because an activation's input sits within noise of its kink
(``reprod.capture.kinks``). torch and paddle are recognised
by the model's classes and imported by nobody here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from ..errors import UnsupportedValueError
from ..logger import ReprodLogger
from ._onnx import OnnxLayerCall, onnx_layers, pair_onnx, record_onnx
from .divergence import Divergence, first_divergence
from .kinks import KINK_POINTS, KinkCrossing, explain_kinks, find_kink_crossings
from .naming import (
    ROOT,
    CaptureKey,
    layer_key,
    match_by_order,
    pair_by_order,
    pair_inputs,
    param_key,
    parse_key,
    rename,
    rename_by_order,
)
from .recorder import Backend, Patterns, Recorder, release_buffers
from .replay import replay  # isolated per-layer replay

__all__ = [
    "record",
    "release_buffers",
    "record_onnx",
    "onnx_layers",
    "pair_onnx",
    "OnnxLayerCall",
    "layer_types",
    "first_divergence",
    "Divergence",
    "replay",
    "explain_kinks",
    "find_kink_crossings",
    "KinkCrossing",
    "KINK_POINTS",
    "rename",
    "rename_by_order",
    "match_by_order",
    "pair_inputs",
    "pair_by_order",  # deprecated: rename_by_order
    "parse_key",
    "layer_key",
    "param_key",
    "CaptureKey",
    "ROOT",
]


def _backend(model: Any) -> Backend:
    # A user's model class lives in the user's module: look at its bases for the framework.
    roots = {cls.__module__.split(".", 1)[0] for cls in type(model).__mro__}
    if "torch" in roots and hasattr(model, "named_modules"):
        from ._torch import BACKEND as torch_backend

        return torch_backend
    if "paddle" in roots and hasattr(model, "named_sublayers"):
        from ._paddle import BACKEND as paddle_backend

        return paddle_backend
    raise UnsupportedValueError(
        f"record: {type(model).__module__}.{type(model).__qualname__} is neither a "
        "torch.nn.Module nor a paddle.nn.Layer"
    )


@contextmanager
def record(
    model: Any,
    logger: Optional[ReprodLogger] = None,
    *,
    forward: bool = True,
    backward: bool = False,
    inputs: bool = True,
    include: Patterns = None,
    exclude: Patterns = None,
    containers: bool = True,
    reuse: bool = True,
) -> Iterator[ReprodLogger]:
    """Record what flows through ``model``'s layers while the block runs; yields the logger.

    ``model`` is a ``torch.nn.Module`` or a ``paddle.nn.Layer``. For every recorded layer call:
    its tensor inputs (``inputs=True``) and outputs (``forward=True``), and with
    ``backward=True`` the gradients arriving at its outputs and leaving through its inputs,
    plus every trainable parameter's gradient (each time backward reaches it). Every layer is
    recorded, containers and the model itself (``<model>``) included, so that
    ``first_divergence`` can name a container whose own ``forward`` code (a residual add, a
    reshape, a concatenation) differs; ``containers=False`` records leaf layers only (layers
    without sublayers, or with parameters of their own), about a third fewer values.
    ``include``/``exclude`` are glob patterns (one or
    a list) on layer names (``"features.*"``); parameters follow their layer. Values are copied
    to numpy at once, so a step's graph is not kept alive; with
    ``ReprodLogger(stream_to="run.npz")`` they go to disk as they come. Every hook is removed
    when the block ends, also when it raises.

    A tensor recorded under several keys unchanged (a layer's output is the next layer's input)
    is copied once: those keys share one read-only array. With ``reuse=True`` the copies go into
    host arrays of this model's previous ``record`` block that nobody holds any more (an array
    still held, by a logger or by anyone, is never written again); the model keeps them until
    its next block, ``release_buffers(model)``, or its end. CUDA tensors are copied to pinned
    memory without blocking; the block waits for those copies when it ends.

    >>> with record(model, backward=True) as log:
    ...     loss = criterion(model(x), y)
    ...     loss.backward()
    >>> log.keys()[:3]
    ['<model>.in', 'conv.in', 'conv.out']
    """
    backend = _backend(model)
    if logger is None:
        logger = ReprodLogger()
    recorder = Recorder(
        backend,
        model,
        logger,
        forward=forward,
        backward=backward,
        inputs=inputs,
        include=include,
        exclude=exclude,
        containers=containers,
        reuse=reuse,
    )
    recorder.start()
    try:
        yield logger
    finally:
        recorder.stop()


def layer_types(model: Any) -> dict[str, str]:
    """Layer name -> class name for every layer of a torch or paddle model (``<model>`` for the
    model itself), for ``first_divergence``'s messages.

    >>> layer_types(model)["features.3.block.2"]
    'SqueezeExcitation'
    """
    types = _backend(model).layer_types(model)
    return {(name or ROOT): cls for name, cls in types.items()}
