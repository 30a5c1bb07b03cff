"""What the checks share: float64 views, the relative residual a fit is judged by, the first
checks every fit makes of its arrays, the number format of the hints, and the guard that turns a
value no check can read into no hint."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar, cast

import numpy as np

# a fit is accepted when what it leaves unexplained is under this share of the difference it explains
FIT_TOL = 0.05

_UNREADABLE = (TypeError, ValueError, FloatingPointError)
_Check = TypeVar("_Check", bound=Callable[..., Optional[str]])


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _rel_residual(residual: np.ndarray, scale: np.ndarray) -> float:
    s = float(np.linalg.norm(scale))
    if not math.isfinite(s) or s == 0.0:
        return math.inf
    r = float(np.linalg.norm(residual)) / s
    return r if math.isfinite(r) else math.inf


def _fmt(x: float) -> str:
    """``1e-3``, ``2.5e-4``, ``0.1``: a value as a porter writes it."""
    if x == 0 or not math.isfinite(x):
        return repr(x)
    # the boundary on the value as shown: a fitted 0.00999999 and 0.0100001 (two CPUs' roundings
    # of one epsilon) both read 1e-2
    if 1e-2 < abs(float(f"{x:.3g}")) < 1e3:
        return f"{x:.3g}"
    mant, exp = f"{x:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _comparable(arrays: Sequence[np.ndarray], min_size: int) -> bool:
    """What every fit asks of its arrays first: one shape, at least ``min_size`` elements (more
    than the fit has unknowns, or anything fits), every value finite."""
    first = arrays[0]
    if any(a.shape != first.shape for a in arrays) or first.size < min_size:
        return False
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _no_hint_on_error(check: _Check) -> _Check:
    """``check`` answering ``None`` (no hint) where a value is one no check can read (a ragged
    list, a string, an overflow) instead of raising: the key's verdict stands without a hint."""

    @functools.wraps(check)
    def guarded(*args: Any, **kwargs: Any) -> Optional[str]:
        try:
            return check(*args, **kwargs)
        except _UNREADABLE:
            return None

    return cast(_Check, guarded)
