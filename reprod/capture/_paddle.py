"""paddle side of layer capture: layer pre/post hooks and tensor gradient hooks.

paddle's tensor-hook handle keeps a strong reference to its tensor, so handles of activation
hooks are not kept (that would hold every activation until the block ends); those hooks are
disarmed by the Recorder instead and die with the step's graph. paddle is imported by whoever
made the model, never here.
"""

from __future__ import annotations

from typing import Any, Callable

from .recorder import PreHook

__all__ = ["BACKEND"]


class _PaddleBackend:
    name = "paddle"

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


BACKEND = _PaddleBackend()
