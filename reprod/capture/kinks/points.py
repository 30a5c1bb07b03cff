"""Which layers have kinks, and where: the kink points of each non-smooth layer class, the
overrides a caller gives, and the non-smooth function a layer computes, recognised from its
recorded input and output when no layer types are given."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

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

# Which side of each kink an implementation takes an element to, where that is not ``x > k``:
# the test its backward kernel makes, in its own arithmetic. Two correct implementations can
# disagree on an input they hold identically: Paddle's Hardswish tests ``fl32(x + 3) >= 6``, so
# an input 1 ulp below 3 gets the gradient 1.0 there and 1.5 (``x < 3``) in torch; Paddle's
# Hardsigmoid bends at ``x * 0.1666667 + 0.5`` = 0 and 1, 2-3 ulps inside torch's -3 and 3. Each
# entry is one test per kink point of ``KINK_POINTS`` (True: the upper side), on the values in
# the capture's dtype. Measured on torch 2.13 / 2.14 and Paddle 3.3 CPU kernels over every
# float32 within 300 ulps of each kink (tests/capture/test_kink_sides.py).
Side = Callable[[np.ndarray], np.ndarray]


def _gt(k: float) -> Side:
    return lambda x: x > x.dtype.type(k)


def _ge(k: float) -> Side:
    return lambda x: x >= x.dtype.type(k)


def _shifted(scale: float, offset: float, k: float, inclusive: bool) -> Side:
    def side(x: np.ndarray) -> np.ndarray:
        t = x.dtype.type
        y = (x * t(scale) if scale != 1.0 else x) + t(offset)  # rounded as the kernel rounds
        return y >= t(k) if inclusive else y > t(k)
    return side


SIDES: dict[str, dict[str, tuple[Side, ...]]] = {
    "torch": {
        "relu6": (_gt(0.0), _ge(6.0)),
        "hardswish": (_gt(-3.0), _ge(3.0)),
        "hardsigmoid": (_gt(-3.0), _ge(3.0)),
        "hardtanh": (_gt(-1.0), _ge(1.0)),
    },
    "paddle": {
        "relu6": (_gt(0.0), _ge(6.0)),
        "leakyrelu": (_ge(0.0),),
        "hardswish": (_shifted(1.0, 3.0, 0.0, False), _shifted(1.0, 3.0, 6.0, True)),
        "hardsigmoid": (_shifted(0.1666667, 0.5, 0.0, False), _shifted(0.1666667, 0.5, 1.0, True)),
        "hardtanh": (_gt(-1.0), _ge(1.0)),
    },
}
FRAMEWORKS = tuple(SIDES)


def _native(x: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    """``x`` (float64 holding a capture's values) in the arithmetic its kernels test it in:
    float32 for float32 and the half types (computed in float32 by both frameworks' CPU
    kernels), float64 otherwise."""
    if str(dtype) in ("float32", "float16", "bfloat16"):
        return x.astype(np.float32)
    return x.astype(np.float64, copy=False)


def sides(spec: tuple[float, ...], layer_type: Optional[str], framework: Optional[str],
          x: np.ndarray, dtype: Optional[str]) -> list[np.ndarray]:
    """For each kink point of ``spec``, where ``framework``'s kernel for ``layer_type`` takes
    the elements of ``x`` (a capture's values, as float64; ``dtype`` the capture's) to the upper
    side. A framework or class without a measured test, or kink points other than the class's
    own (a caller's override), test ``x > k``."""
    rules = SIDES.get(str(framework), {}).get(str(layer_type).lower())
    if rules is None or KINK_POINTS.get(str(layer_type).lower()) != spec:
        return [x > k for k in spec]
    native = _native(x, dtype)
    return [np.asarray(rule(native), dtype=bool) for rule in rules]


def onto_side(x: np.ndarray, spec: tuple[float, ...], layer_type: Optional[str],
              framework: Optional[str], dtype: Optional[str], twin: Optional[str]) -> np.ndarray:
    """``x`` (values ``framework`` computed, in ``dtype``) as float64 with each element that
    ``twin``'s float64 kernel would take to the other side of a kink moved onto ``framework``'s
    side, by the least it takes (to the kink point or the float64 next to it): what a float64
    rerun needs to take every kink as the port took it. ``x`` itself where nothing moves."""
    want = sides(spec, layer_type, framework, x, dtype)
    have = sides(spec, layer_type, twin, x.astype(np.float64, copy=False), "float64")
    out: Optional[np.ndarray] = None
    for i, k in enumerate(spec):
        differ = want[i] != have[i]
        if not differ.any():
            continue
        out = np.array(x, dtype=np.float64) if out is None else out
        for up in (True, False):
            at = differ & (want[i] == up)
            if at.any():
                # the kink point itself where twin's test puts it on the wanted side, else the
                # float64 next to it on that side
                point = np.array([k], dtype=np.float64)
                if sides(spec, layer_type, twin, point, "float64")[i][0] != up:
                    point = np.nextafter(point, np.inf if up else -np.inf)
                out[at] = point[0]
    return x if out is None else out


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
