"""``reprod_log.utils`` under its own path: ``from reprod.utils import torch2np, check_print_diff``.

Same names, arguments and printed lines as reprod_log 1.0.1, with reprod's rules where a value is
judged: a NaN never passes, and each method line carries its own verdict. torch and paddle are
imported only inside the function that needs them (``np2torch``, ``np2paddle``); ``torch2np`` and
``paddle2np`` take tensors of either framework (on any device, bfloat16 too) and return copies.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import numpy as np

from .diff.result import ALL_METHODS as METHODS  # reprod_log's three, in its order
from .errors import ReprodError, UnsupportedValueError

__all__ = ["init_logger", "np2torch", "np2paddle", "paddle2np", "torch2np", "check_print_diff"]

_MARK = "_reprod_init_logger"  # set on the handlers init_logger adds, so a second call replaces them


def init_logger(log_file: Optional[str] = None, name: str = "root",
                log_level: int = logging.DEBUG) -> logging.Logger:
    """reprod_log's logger: ``[%Y/%m/%d %H:%M:%S] <name> <LEVEL>: <message>`` on the sys.stdout of
    this moment and, with ``log_file``, in that file (overwritten, parent folder created).

    Unlike reprod_log, calling it again replaces the handlers an earlier call added instead of
    adding more (reprod_log printed every line once per call made so far).
    """
    logger = logging.getLogger(name)
    for h in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(h)
        h.close()
    formatter = logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s",
                                  datefmt="%Y/%m/%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(stream=sys.stdout)]
    if log_file is not None:
        folder = os.path.dirname(log_file)
        if folder:
            os.makedirs(folder, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, "w"))
    for h in handlers:
        h.setFormatter(formatter)
        setattr(h, _MARK, True)
        logger.addHandler(h)
    logger.setLevel(log_level)
    return logger


def _need_dict(data: Any, fn: str) -> None:
    if not isinstance(data, Mapping):
        raise UnsupportedValueError(f"{fn} needs a dict of key -> value, got {type(data).__name__}")


def np2torch(data: Mapping[str, Any]) -> dict[str, Any]:
    """Every numpy array of ``data`` as ``torch.Tensor(v)`` (float32, as reprod_log made them);
    other values as they are."""
    _need_dict(data, "np2torch")
    import torch

    return {k: torch.Tensor(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}


def np2paddle(data: Mapping[str, Any]) -> dict[str, Any]:
    """Every numpy array of ``data`` as ``paddle.Tensor(v)`` (its dtype kept, as reprod_log made
    them); other values as they are."""
    _need_dict(data, "np2paddle")
    import paddle

    return {k: paddle.Tensor(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}


def _to_np(data: Any) -> dict[str, Any]:
    from .adapters import to_tree

    if isinstance(data, Mapping):
        return {k: to_tree(v, key=str(k))[0] for k, v in data.items()}
    if data is None:
        raise UnsupportedValueError("no tensor given (None)")
    return {"output": to_tree(data, key="output")[0]}


def paddle2np(data: Any = None) -> dict[str, Any]:
    """A tensor -> ``{"output": array}``; a dict of tensors -> a dict of arrays (copies; nested
    dicts, GPU tensors and bfloat16, widened to float32, accepted)."""
    return _to_np(data)


def torch2np(data: Any = None) -> dict[str, Any]:
    """A tensor -> ``{"output": array}``; a dict of tensors -> a dict of arrays (detached copies;
    nested dicts, GPU tensors, ``requires_grad`` and bfloat16, widened to float32, accepted)."""
    return _to_np(data)


def _methods(diff_method: Union[str, list[str], tuple[str, ...]]) -> list[str]:
    asked = [diff_method] if isinstance(diff_method, str) else list(diff_method)
    out: list[str] = []
    for m in asked:
        if m not in ("all",) + METHODS:
            raise ReprodError(f"diff_method {m!r}: expected one of 'mean', 'max', 'min', 'all' "
                              "or a list of them")
        for x in (METHODS if m == "all" else (m,)):
            if x not in out:
                out.append(x)
    return out


def _is_leaf(v: Any) -> bool:
    return isinstance(v, Mapping) and len(v) == 3 and all(m in v for m in METHODS)


def check_print_diff(diff_dict: Mapping[str, Any], diff_method: Union[str, list[str]] = "mean",
                     diff_threshold: float = 1e-6, print_func: Callable[[str], Any] = print,
                     indent: str = "\t", level: int = 0) -> bool:
    """Print reprod_log's lines for a ``compute_diff`` dict (``<key>: ``, then ``<indent><method>
    diff: check passed: <bool>, value: <v>`` per method; nested keys indented) and return whether
    every check passed. A check fails when the value is above ``diff_threshold`` or NaN."""
    methods = _methods(diff_method)
    all_passed = True
    cur = indent * level
    for k, v in diff_dict.items():
        if _is_leaf(v):
            print_func(f"{cur}{k}: ")
            for m in methods:
                value = v[m]
                ok = not (float(value) > diff_threshold) and float(value) == float(value)
                all_passed = all_passed and ok
                print_func(f"{cur}{indent}{m} diff: check passed: {ok}, value: {value}")
        elif isinstance(v, Mapping):
            print_func(f"{cur}{k}")
            sub = check_print_diff(v, methods, diff_threshold, print_func, indent, level + 1)
            all_passed = all_passed and sub
        else:
            raise ReprodError(f"check_print_diff: key {k!r} holds a {type(v).__name__}, not a dict "
                              "of 'mean'/'max'/'min' (what compute_diff returns)")
    return all_passed
