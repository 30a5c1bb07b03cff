"""Which layers have kinks, and where: the kink points of each non-smooth layer class, the
overrides a caller gives, and the non-smooth function a layer computes, recognised from its
recorded input and output when no layer types are given."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

MAX = "max"  # a max-pool: its "kink" is a tie between the largest elements of a window
KinkSpec = Union[tuple[float, ...], str]

# class name (lower case: torch's MaxPool2d and paddle's MaxPool2D are one entry) -> kink points
KINK_POINTS: dict[str, KinkSpec] = {
    "relu": (0.0,),
    "relu6": (0.0, 6.0),
    "leakyrelu": (0.0,),
    "prelu": (0.0,),
    "rrelu": (0.0,),
    "selu": (0.0,),
    "hardswish": (-3.0, 3.0),
    "hardsigmoid": (-3.0, 3.0),
    "hardtanh": (-1.0, 1.0),
    "hardshrink": (-0.5, 0.5),
    "softshrink": (-0.5, 0.5),
    "abs": (0.0,),
    "maxpool": MAX,
    "maxpool1d": MAX,
    "maxpool2d": MAX,
    "maxpool3d": MAX,
    "adaptivemaxpool1d": MAX,
    "adaptivemaxpool2d": MAX,
    "adaptivemaxpool3d": MAX,
}

_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def _eps(dtype: Optional[str]) -> float:
    return _EPS.get(str(dtype), _EPS["float32"])

def _spec(name: str, layer_type: Optional[str],
          kinks: Optional[Mapping[str, Any]]) -> Optional[KinkSpec]:
    if kinks:
        for pattern, value in kinks.items():
            if fnmatch.fnmatchcase(name, pattern) or (
                layer_type is not None and pattern.lower() == layer_type.lower()
            ):
                if value is None or value == ():
                    return None
                return MAX if value == MAX else tuple(float(v) for v in value)
    if layer_type is None:
        return None
    return KINK_POINTS.get(layer_type.lower())


_SAMPLE = 4096


def _matches(x: np.ndarray, y: np.ndarray, fn: Any, tol: Any) -> bool:
    for part in (slice(0, _SAMPLE), slice(None)):  # a cheap rejection first
        xs, ys = x.reshape(-1)[part], y.reshape(-1)[part]
        want = fn(xs)
        if not np.all(np.abs(ys - want) <= tol(xs, want)):
            return False
    return True


def _infer_type(x: np.ndarray, y: np.ndarray) -> Optional[str]:
    """The non-smooth function a layer computes, recognised from its reference input and output
    (``None``: none of them). Used when no ``layer_types`` are given."""
    if x.size == 0:
        return None
    if x.shape != y.shape:
        return "MaxPool" if _looks_like_max_pool(x, y) else None
    if not np.any(x < 0):  # an identity on non-negative values is no ReLU
        return None
    exact = lambda xs, want: 0.0  # noqa: E731
    eps = _EPS["float32"]
    if np.any(x > 6) and _matches(x, y, lambda v: np.clip(v, 0.0, 6.0), exact):
        return "ReLU6"
    if _matches(x, y, lambda v: np.maximum(v, 0.0), exact):
        return "ReLU"
    gate = lambda v: np.clip(v / 6.0 + 0.5, 0.0, 1.0)  # noqa: E731
    if _matches(x, y, gate, lambda xs, want: 4 * eps):
        return "Hardsigmoid"
    if _matches(x, y, lambda v: v * gate(v), lambda xs, want: 8 * eps * (np.abs(xs) + 1.0)):
        return "Hardswish"
    neg = x < 0
    if np.any(x > 0) and np.array_equal(y[~neg], x[~neg]):
        slope = float(np.median(y[neg] / x[neg]))
        if 0.0 < abs(slope) < 1.0 and np.all(
            np.abs(y[neg] - slope * x[neg]) <= 4 * eps * np.abs(x[neg])
        ):
            return "LeakyReLU"
    return None


def _looks_like_max_pool(x: np.ndarray, y: np.ndarray) -> bool:
    if x.ndim < 3 or y.ndim != x.ndim or y.shape[:2] != x.shape[:2] or y.size >= x.size:
        return False
    xp, yp = _planes(x), _planes(y)
    return all(bool(np.all(np.isin(yp[p], xp[p]))) for p in range(min(len(xp), 4)))


def _planes(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0] * a.shape[1], -1)
