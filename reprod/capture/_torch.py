"""torch side of layer capture: module hooks and tensor gradient hooks.

Gradients are taken with tensor hooks, not ``register_full_backward_hook``: a full backward hook
wraps the module's outputs in a custom autograd function, and the next in-place op on them
(``ReLU(inplace=True)``, ``x += shortcut``, both in stock torchvision models) then fails with
"Output 0 of BackwardHookFunction is a view and is being modified inplace". A tensor hook
registered before an in-place op receives the gradient of the value before that op, which is
what the layer produced. torch is imported by whoever made the model, never here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ..adapters import Converted, empty_array, to_numpy
from .recorder import HostArrays, PreHook

__all__ = ["BACKEND"]

# from this size a copy goes through torch's copy_, which splits it over torch's threads
_THREADED_COPY_FROM = 128 << 10
_NUMPY_DTYPES: Optional[dict[Any, np.dtype]] = None


def _numpy_dtype(torch: Any, dtype: Any) -> Optional[np.dtype]:
    """The numpy dtype holding a torch dtype as is; None for the ones ``to_numpy`` converts."""
    global _NUMPY_DTYPES
    if _NUMPY_DTYPES is None:
        names = ["float16", "float32", "float64", "complex64", "complex128", "bool", "uint8",
                 "int8", "int16", "int32", "int64"]
        _NUMPY_DTYPES = {getattr(torch, n): np.dtype(n) for n in names}
    return _NUMPY_DTYPES.get(dtype)


class _TorchBackend:
    name = "torch"
    # autograd sums a second contribution into a gradient in place with add_, which counts
    shares_gradients = True

    def named_layers(self, model: Any) -> list[tuple[str, Any]]:
        return list(model.named_modules())

    def is_leaf(self, layer: Any) -> bool:
        # a module with weights of its own computes something even when it has children
        has_children = next(iter(layer.children()), None) is not None
        if not has_children:
            return True
        own = getattr(layer, "_parameters", None)
        if isinstance(own, dict):  # what parameters(recurse=False) walks, without its generators
            return any(p is not None for p in own.values())
        return any(True for _ in layer.parameters(recurse=False))

    def is_tensor(self, value: Any) -> bool:
        return type(value).__module__.split(".", 1)[0] == "torch" and hasattr(value, "detach")

    def wants_grad(self, tensor: Any) -> bool:
        return bool(tensor.requires_grad)

    def trainable_parameters(self, model: Any) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def add_pre_hook(self, layer: Any, fn: PreHook) -> Any:
        return layer.register_forward_pre_hook(
            lambda m, args, kwargs: fn(args, kwargs), with_kwargs=True
        )

    def add_post_hook(self, layer: Any, fn: Callable[[Any], None]) -> Any:
        return layer.register_forward_hook(lambda m, args, output: fn(output))

    def add_grad_hook(self, tensor: Any, fn: Callable[[Any], None], *, persistent: bool) -> Any:
        # the handle holds only a weak reference to the tensor's hook table: safe to keep
        return tensor.register_hook(lambda grad: fn(grad))

    def layer_types(self, model: Any) -> dict[str, str]:
        return {name: type(m).__name__ for name, m in model.named_modules()}

    def version(self, tensor: Any) -> Optional[int]:
        try:
            return int(tensor._version)
        except (AttributeError, RuntimeError):  # inference-mode tensors keep no counter
            return None

    def host_view(self, tensor: Any, key: str) -> Converted:
        import torch

        t = tensor.detach()
        if (t.device.type == "cpu" and t.layout == torch.strided and not t.is_conj()
                and not t.is_neg() and _numpy_dtype(torch, t.dtype) is not None):
            return Converted(t.numpy())  # to_numpy's answer for these, without its walk
        return to_numpy(t, key=key, copy=False)

    def host_copy(self, tensor: Any, key: str, buffers: HostArrays) -> tuple[Converted, bool]:
        import torch  # already imported by whoever made ``tensor``

        t = tensor.detach()
        dtype = _numpy_dtype(torch, t.dtype)
        device = t.device.type
        if (dtype is None or t.layout != torch.strided or device not in ("cpu", "cuda")
                or t.is_conj() or t.is_neg()):
            return to_numpy(t, key=key), False  # the general path, rare dtypes and layouts
        shape = tuple(t.shape)
        pinned = device == "cuda"
        arr = buffers.take(shape, dtype, pinned)
        if arr is None:
            if pinned:
                # the array's base is the pinned tensor: a device-to-host copy into it can run
                # without blocking the host
                arr = torch.empty(shape, dtype=t.dtype, pin_memory=True).numpy()
            else:
                arr = empty_array(shape, dtype)
            buffers.keep(arr, pinned)
        if pinned:
            arr.base.copy_(t, non_blocking=True)
            return Converted(arr), True
        if arr.nbytes >= _THREADED_COPY_FROM:
            torch.from_numpy(arr).copy_(t)
        else:
            np.copyto(arr, t.numpy())
        return Converted(arr), False

    def synchronize(self) -> None:
        import torch

        # every device: a model may be spread over several, each copy on its tensor's stream
        if torch.cuda.is_available():
            for device in range(torch.cuda.device_count()):
                torch.cuda.synchronize(device)

    def on_device(self, tensor: Any) -> bool:
        return tensor.device.type == "cuda"

    def copy_ready(self, tensor: Any) -> Callable[[], None]:
        import torch

        # host_copy enqueued the copy on the current stream of the tensor's device (a gradient
        # hook runs in autograd's device thread, where that is the backward's stream); the
        # event's wait releases the GIL
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        return event.synchronize


BACKEND = _TorchBackend()
