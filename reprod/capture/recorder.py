"""The framework-free part of layer capture: which layers, which keys, in which order.

A backend (``_torch``, ``_paddle``) knows how to walk a model and attach hooks; the Recorder
decides what each hook writes. Hooks hand tensors straight to ``ReprodLogger.add``, which copies
them to numpy at once (``reprod.adapters.to_numpy``): an in-place op later in the forward pass
cannot change what was recorded, and no tensor, hence no autograd graph, is kept alive.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Protocol, Union

from ..logger import ReprodLogger
from .naming import ROOT, layer_key, param_key

__all__ = ["Backend", "Recorder", "Patterns"]

Patterns = Union[str, Sequence[str], None]
Items = tuple[Any, ...]
# called with the positional and keyword arguments of a layer call
PreHook = Callable[[tuple[Any, ...], dict[str, Any]], None]


class Backend(Protocol):
    """What a framework module provides to the Recorder."""

    def named_layers(self, model: Any) -> list[tuple[str, Any]]: ...  # root first, as ""

    def is_leaf(self, layer: Any) -> bool: ...

    def is_tensor(self, value: Any) -> bool: ...

    def wants_grad(self, tensor: Any) -> bool: ...

    def trainable_parameters(self, model: Any) -> list[tuple[str, Any]]: ...

    def add_pre_hook(self, layer: Any, fn: PreHook) -> Any: ...

    def add_post_hook(self, layer: Any, fn: Callable[[Any], None]) -> Any: ...

    # a handle to remove, or None where holding one would keep a transient tensor alive
    def add_grad_hook(self, tensor: Any, fn: Callable[[Any], None], *, persistent: bool) -> Any: ...

    def layer_types(self, model: Any) -> dict[str, str]: ...


def _patterns(p: Patterns) -> Optional[tuple[str, ...]]:
    if p is None:
        return None
    return (p,) if isinstance(p, str) else tuple(p)


def _selected(name: str, include: Optional[tuple[str, ...]], exclude: tuple[str, ...]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def flatten(
    value: Any, is_tensor: Callable[[Any], bool], prefix: Items = ()
) -> Iterator[tuple[Items, Any]]:
    """(items, tensor) for every tensor in a tensor / tuple / list / dict structure; others skipped."""
    if is_tensor(value):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from flatten(v, is_tensor, prefix + (k,))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from flatten(v, is_tensor, prefix + (i,))


class Recorder:
    """Hooks one model's layers into one logger for the life of a ``record`` block."""

    def __init__(
        self,
        backend: Backend,
        model: Any,
        logger: ReprodLogger,
        *,
        forward: bool,
        backward: bool,
        inputs: bool,
        include: Patterns,
        exclude: Patterns,
        containers: bool,
    ) -> None:
        self.backend = backend
        self.model = model
        self.logger = logger
        self.forward = forward
        self.backward = backward
        self.inputs = inputs
        self._include = _patterns(include)
        self._exclude = _patterns(exclude) or ()
        self.containers = containers
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._open: dict[str, list[int]] = {}  # layer name -> calls entered, not yet left
        self._param_calls: dict[str, int] = {}
        self._lock = threading.Lock()  # backward hooks may run on autograd's worker threads
        self.active = False

    # --- which layers --------------------------------------------------------------------------
    def layers(self) -> list[tuple[str, Any]]:
        chosen = []
        for name, layer in self.backend.named_layers(self.model):
            name = name or ROOT
            if not (self.containers or self.backend.is_leaf(layer)):
                continue
            if _selected(name, self._include, self._exclude):
                chosen.append((name, layer))
        return chosen

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.active = True
        try:
            for name, layer in self.layers():
                self._handles.append(self.backend.add_pre_hook(layer, self._pre(name)))
                self._handles.append(self.backend.add_post_hook(layer, self._post(name)))
            if self.backward:
                for name, param in self.backend.trainable_parameters(self.model):
                    owner = name.rpartition(".")[0] or ROOT
                    if _selected(owner, self._include, self._exclude):
                        hook = self._param(name)
                        self._handles.append(
                            self.backend.add_grad_hook(param, hook, persistent=True)
                        )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Gradient hooks on activations may outlive the block (a graph kept for a later
        # backward): disarm them all first, then remove every handle we hold.
        self.active = False
        handles, self._handles = self._handles, []
        for h in handles:
            if h is not None:
                h.remove()

    # --- hooks ---------------------------------------------------------------------------------
    def _add(self, key: str, value: Any) -> None:
        with self._lock:
            if self.active:
                self.logger.add(key, value)

    def _pre(self, name: str) -> PreHook:
        def hook(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active:
                return
            call = self._calls.get(name, 0) + 1
            self._calls[name] = call
            self._open.setdefault(name, []).append(call)
            if not (self.inputs and self.forward) and not self.backward:
                return
            for items, t in self._inputs(args, kwargs):
                if self.inputs and self.forward:
                    self._add(layer_key(name, call, "in", items), t)
                if self.backward and self.backend.wants_grad(t):
                    self._grad_hook(t, layer_key(name, call, "grad_in", items))

        return hook

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Items, Any]]:
        found = list(flatten(dict(enumerate(args), **kwargs), self.backend.is_tensor))
        # one tensor-carrying first argument is "in", not "in[0]": non-tensor extras such as
        # flags, which one framework passes and the other does not, leave the key alone
        if found and all(items[0] == 0 for items, _ in found):
            return [(items[1:], t) for items, t in found]
        return found

    def _post(self, name: str) -> Callable[[Any], None]:
        def hook(output: Any) -> None:
            if not self.active:
                return
            stack = self._open.get(name)
            call = stack.pop() if stack else self._calls.get(name, 1)
            for items, t in flatten(output, self.backend.is_tensor):
                if self.forward:
                    self._add(layer_key(name, call, "out", items), t)
                if self.backward and self.backend.wants_grad(t):
                    self._grad_hook(t, layer_key(name, call, "grad_out", items))

        return hook

    def _grad_hook(self, tensor: Any, key: str) -> None:
        def hook(grad: Any) -> None:
            if grad is not None:
                self._add(key, grad)

        handle = self.backend.add_grad_hook(tensor, hook, persistent=False)
        if handle is not None:
            self._handles.append(handle)

    def _param(self, name: str) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            if grad is None or not self.active:
                return
            with self._lock:
                call = self._param_calls.get(name, 0) + 1
                self._param_calls[name] = call
            self._add(param_key(name, call), grad)

        return hook
