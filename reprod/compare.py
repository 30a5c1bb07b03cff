# ``reprod.compare`` is two things at once, and both keep working:
#   - the function ``reprod.compare(ref, other, ...)`` (reprod.diff.engine.compare): this module's
#     object is callable, with the engine's signature and docstring;
#   - the module ``reprod_log.compare`` under reprod's name: ``from reprod.compare import
#     compute_diff, check_data, compare_forward, compare_loss_and_backward`` (and the converters
#     reprod_log.compare re-exports from its utils), with reprod's rules where values are judged:
#     NaN never passes, integers never wrap around, shapes are never silently transposed, and
#     missing or extra keys fail instead of raising.
# torch and paddle are imported only inside compare_forward / compare_loss_and_backward.

from __future__ import annotations

import importlib
import inspect
import math
import sys
import types
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

from .diff import engine as _engine
from .errors import KeyMismatchError
from .utils import check_print_diff, np2paddle, np2torch, paddle2np, torch2np

__all__ = [
    "check_data",
    "compute_diff",
    "compare_forward",
    "compare_loss_and_backward",
    "np2torch",
    "np2paddle",
    "paddle2np",
    "torch2np",
    "check_print_diff",
]


def check_data(data1: Mapping[str, Any], data2: Mapping[str, Any]) -> None:
    """Raise ``KeyMismatchError`` (a ``ReprodError`` and ``KeyError``) naming the keys found on
    one side only (reprod_log raised ``AssertionError`` with a message naming none)."""
    only1 = [k for k in data1 if k not in data2]
    only2 = [k for k in data2 if k not in data1]
    if only1 or only2:
        parts = []
        if only1:
            parts.append(f"in data1 only: {_names(only1)}")
        if only2:
            parts.append(f"in data2 only: {_names(only2)}")
        raise KeyMismatchError("keys differ; " + "; ".join(parts))


def _names(keys: list[Any], limit: int = 10) -> str:
    text = ", ".join(repr(k) for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def compute_diff(data1: Mapping[str, Any], data2: Mapping[str, Any]) -> dict[str, Any]:
    """reprod_log's ``{key: {"mean": .., "max": .., "min": ..}}`` of ``|data1 - data2|`` (nested
    for nested dicts), computed by reprod's engine.

    Values are numpy scalars of the inputs' dtype as reprod_log's were (float32 for float32
    data), accumulated in float64. A key that cannot be judged by its statistics (NaN, a shape
    that does not match, a key on one side only, one side empty) gets NaN values, which
    ``check_print_diff`` fails, and a warning with the reason; an unmatched Inf gives Inf.
    """
    result = _engine.compare(str_keys(data1), str_keys(data2), method="all", threshold=None)
    return diff_tree(result, warn=True)


def str_keys(tree: Any) -> Any:
    """``tree`` with every non-str key of its plain dicts (reprod_log took ``add(3, x)``) as its
    ``str``; the same object when every key is a str already (no array is copied either way)."""
    if type(tree) is not dict or all(type(k) is str and type(v) is not dict for k, v in tree.items()):
        return tree
    return {k if type(k) is str else str(k): str_keys(v) for k, v in tree.items()}


_NO_STATS = frozenset({"nan", "shape", "missing", "extra", "type", "empty", "setting"})


def diff_tree(result: Any, *, warn: bool = False) -> dict[str, Any]:
    """A ``DiffResult`` as reprod_log's nested diff dict (what ``compute_diff`` returns and
    ``ReprodDiffHelper.diff_dict`` holds)."""
    out: dict[str, Any] = {}
    for kr in result:
        path = kr.path or (kr.key,)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _stats(kr)
        if warn and kr.status in _NO_STATS | {"inf"}:
            warnings.warn(f"compute_diff: key {kr.key!r}: {kr.reason}", stacklevel=3)
    return out


def _stats(kr: Any) -> dict[str, Any]:
    if kr.status in _NO_STATS:
        nan = np.float64(math.nan)
        return {"mean": nan, "max": nan, "min": nan}
    mean_t, ext_t = _scalar_types(kr.ref_dtype, kr.other_dtype)
    if not kr.size:  # both empty
        return {"mean": mean_t(0), "max": ext_t(0), "min": ext_t(0)}
    return {"mean": mean_t(kr.mean_abs), "max": ext_t(kr.max_abs), "min": ext_t(kr.min_abs)}


def _scalar_types(ref_dtype: Optional[str], other_dtype: Optional[str]) -> tuple[Any, Any]:
    """The numpy scalar types reprod_log's ``np.abs(a - b)`` statistics had: (mean, max/min)."""
    from .report.log import difference_dtype

    dt = difference_dtype(ref_dtype, other_dtype)
    if dt is None:
        return np.float64, np.float64
    if dt.kind in "iu":
        return np.float64, _int_scalar
    return _float_scalar(dt.type), _float_scalar(dt.type)


def _float_scalar(t: Any) -> Any:
    def make(v: float) -> Any:
        with np.errstate(over="ignore"):
            return t(v)

    return make


def _int_scalar(v: float) -> Any:
    if v != v or v in (math.inf, -math.inf):
        return np.float64(v)
    n = int(v)
    return np.int64(n) if n < 2**63 else np.uint64(min(n, 2**64 - 1))


def _check_and_print(ref: Mapping[str, Any], other: Mapping[str, Any], diff_method: Any,
                     diff_threshold: float) -> bool:
    return check_print_diff(compute_diff(ref, other), diff_method=diff_method,
                            diff_threshold=diff_threshold, print_func=print)


def compare_forward(torch_model: Any, paddle_model: Any, input_dict: Mapping[str, Any],
                    diff_threshold: float = 1e-6, diff_method: Union[str, list[str]] = "mean") -> bool:
    """Run both models (in eval mode) on ``input_dict`` and print reprod_log's lines for their
    outputs (torch is data1), then ``diff check passed|failed``; returns the verdict."""
    torch_input = np2torch(input_dict)
    paddle_input = np2paddle(input_dict)
    torch_model.eval()
    paddle_model.eval()
    torch_out = torch_model(**torch_input)
    paddle_out = paddle_model(**paddle_input)
    passed = _check_and_print(torch2np(torch_out), paddle2np(paddle_out), diff_method, diff_threshold)
    print("diff check passed" if passed else "diff check failed")
    return passed


def compare_loss_and_backward(torch_model: Any, paddle_model: Any, torch_loss: Any, paddle_loss: Any,
                              input_dict: Mapping[str, Any], lr: float = 1e-3, steps: int = 10,
                              diff_threshold: float = 1e-6,
                              diff_method: Union[str, list[str]] = "mean") -> bool:
    """reprod_log's loop: ``steps`` SGD steps (learning rate ``lr``) of both models; after each,
    the loss and every parameter gradient are compared (paddle is data1) and reprod_log's lines
    printed, ``diff check passed|failed in iter <i>``; stops at the first failed step. Each loss
    callable gets ``(inputs, outputs)`` and returns a dict with a ``"loss"`` tensor. Returns the
    verdict."""
    import paddle
    import torch

    torch_input = np2torch(input_dict)
    paddle_input = np2paddle(input_dict)
    torch_model.eval()
    paddle_model.eval()
    torch_optim = torch.optim.SGD(params=torch_model.parameters(), lr=lr)
    paddle_optim = paddle.optimizer.SGD(parameters=paddle_model.parameters(), learning_rate=lr)
    for i in range(steps):
        paddle_loss_value = paddle_loss(paddle_input, paddle_model(**paddle_input))
        paddle_loss_value["loss"].backward()
        paddle_optim.step()
        paddle_grads = {"loss": paddle_loss_value["loss"]}
        for name, p in paddle_model.named_parameters():
            if not p.stop_gradient and p.grad is not None:
                paddle_grads[name] = p.grad
        paddle_grads = paddle2np(paddle_grads)
        paddle_optim.clear_grad()

        torch_loss_value = torch_loss(torch_input, torch_model(**torch_input))
        torch_loss_value["loss"].backward()
        torch_optim.step()
        torch_grads = {"loss": torch_loss_value["loss"]}
        for name, p in torch_model.named_parameters():
            if p.requires_grad and p.grad is not None:
                torch_grads[name] = p.grad
        torch_grads = torch2np(torch_grads)
        torch_optim.zero_grad()

        if _check_and_print(paddle_grads, torch_grads, diff_method, diff_threshold):
            print(f"diff check passed in iter {i}")
        else:
            print(f"diff check failed in iter {i}")
            return False
    print("diff check passed")
    return True


class _CallableModule(types.ModuleType):
    """The module ``reprod.compare``, which calling runs ``reprod.diff.engine.compare``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _engine.compare(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (multiprocessing) by name, as the function did
        return (importlib.import_module, (self.__name__,))


# what inspect.signature, help() and IDEs show for reprod.compare: the engine function's
__signature__ = inspect.signature(_engine.compare)
__doc__ = _engine.compare.__doc__
sys.modules[__name__].__class__ = _CallableModule
