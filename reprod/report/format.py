"""How numbers are printed in every human-readable report, so a reader can compare them by eye."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["fmt_num", "fmt_shape"]


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    """Scientific notation with a fixed number of digits: ``3.100e-04``; ``-`` for a missing value."""
    if type(x) is float and digits == 3 and x - x == 0.0:  # finite: the common case, formatted once
        return f"{x:.3e}"
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}e}"


def fmt_shape(shape: Optional[tuple[int, ...]]) -> str:
    """``(2, 3)`` as ``[2, 3]``; ``-`` when the key has no array on that side."""
    if shape is None:
        return "-"
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
