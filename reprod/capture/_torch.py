"""torch side of layer capture: module hooks and tensor gradient hooks.

Gradients are taken with tensor hooks, not ``register_full_backward_hook``: a full backward hook
wraps the module's outputs in a custom autograd function, and the next in-place op on them
(``ReLU(inplace=True)``, ``x += shortcut``, both in stock torchvision models) then fails with
"Output 0 of BackwardHookFunction is a view and is being modified inplace". A tensor hook
registered before an in-place op receives the gradient of the value before that op, which is
what the layer produced. torch is imported by whoever made the model, never here.
"""

from __future__ import annotations

from typing import Any, Callable

from .recorder import PreHook

__all__ = ["BACKEND"]


class _TorchBackend:
    name = "torch"

    def named_layers(self, model: Any) -> list[tuple[str, Any]]:
        return list(model.named_modules())

    def is_leaf(self, layer: Any) -> bool:
        # a module with weights of its own computes something even when it has children
        has_children = next(iter(layer.children()), None) is not None
        return not has_children or any(True for _ in layer.parameters(recurse=False))

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


BACKEND = _TorchBackend()
