"""paddle side of layer capture: layer pre/post hooks and tensor gradient hooks.

paddle's tensor-hook handle keeps a strong reference to its tensor, so handles of activation
hooks are not kept (that would hold every activation until the block ends); those hooks are
disarmed by the Recorder instead and die with the step's graph. paddle is imported by whoever
made the model, never here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ..adapters import Converted, empty_array, to_numpy
from .recorder import HostArrays, PreHook

__all__ = ["BACKEND"]

_NUMPY_DTYPES = frozenset(["float16", "float32", "float64", "complex64", "complex128", "bool",
                           "uint8", "int8", "int16", "int32", "int64"])


class _PaddleBackend:
    name = "paddle"
    # paddle's accumulation of gradients is not known to count in inplace_version: every
    # gradient is copied on its own
    shares_gradients = False

    def named_layers(self, model: Any) -> list[tuple[str, Any]]:
        return list(model.named_sublayers(include_self=True))

    def is_leaf(self, layer: Any) -> bool:
        has_children = next(iter(layer.children()), None) is not None
        return not has_children or any(
            True for _ in layer.named_parameters(include_sublayers=False)
        )

    def is_tensor(self, value: Any) -> bool:
        return type(value).__module__.split(".", 1)[0] == "paddle" and hasattr(
            value, "stop_gradient"
        )

    def wants_grad(self, tensor: Any) -> bool:
        return not tensor.stop_gradient

    def trainable_parameters(self, model: Any) -> list[tuple[str, Any]]:
        # BatchNorm's _mean/_variance are parameters with stop_gradient=True: skipped here
        return [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]

    def add_pre_hook(self, layer: Any, fn: PreHook) -> Any:
        return layer.register_forward_pre_hook(
            lambda lay, args, kwargs: fn(args, kwargs), with_kwargs=True
        )

    def add_post_hook(self, layer: Any, fn: Callable[[Any], None]) -> Any:
        return layer.register_forward_post_hook(lambda lay, args, output: fn(output))

    def add_grad_hook(self, tensor: Any, fn: Callable[[Any], None], *, persistent: bool) -> Any:
        def hook(grad: Any) -> None:
            fn(grad)

        handle = tensor.register_hook(hook)
        # a parameter lives as long as the model, so its handle may be kept and removed at exit
        return handle if persistent else None

    def layer_types(self, model: Any) -> dict[str, str]:
        return {name: type(lay).__name__ for name, lay in model.named_sublayers(include_self=True)}

    def version(self, tensor: Any) -> Optional[int]:
        try:
            return int(tensor.inplace_version)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return None

    def host_view(self, tensor: Any, key: str) -> Converted:
        return to_numpy(tensor, key=key, copy=False)

    def host_copy(self, tensor: Any, key: str, buffers: HostArrays) -> tuple[Converted, bool]:
        dtype = str(tensor.dtype).replace("paddle.", "")
        if dtype not in _NUMPY_DTYPES or not tensor.place.is_cpu_place():
            return to_numpy(tensor, key=key), False  # paddle's own copy to host, synchronous
        try:
            # a view of the tensor's memory (.numpy() would copy it into fresh pages first)
            src = np.from_dlpack(tensor.detach())
        except (BufferError, RuntimeError, TypeError, ValueError, AttributeError):
            return to_numpy(tensor, key=key), False
        arr = buffers.take(src.shape, src.dtype)
        if arr is None:
            arr = empty_array(src.shape, src.dtype)
            buffers.keep(arr)
        np.copyto(arr, src)
        return Converted(arr), False

    def synchronize(self) -> None:
        pass  # copies off the CPU go through paddle's synchronous .numpy()

    def on_device(self, tensor: Any) -> bool:
        return False  # host_copy never leaves a copy pending

    def copy_ready(self, tensor: Any) -> Callable[[], None]:
        return _done


def _done() -> None:
    pass


BACKEND = _PaddleBackend()
