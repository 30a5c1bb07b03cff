"""Weights copied the wrong way: a Linear weight without the (out, in) -> (in, out) transpose."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .fit import _f64


def untransposed_linear(ref_w: Any, other_w: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> Optional[str]:
    """Is ``other_w`` ``ref_w`` transposed: a Linear weight copied without the (out, in) -> (in, out)
    transpose (or transposed twice)? Square weights count only when they are not symmetric."""
    r, o = _f64(ref_w), _f64(other_w)
    if r.ndim != 2 or o.shape != r.shape[::-1] or r.size == 0:
        return None
    if r.shape[0] == r.shape[1] and np.allclose(r, o, rtol=rtol, atol=atol):
        return None
    if not np.allclose(o, r.T, rtol=rtol, atol=atol):
        return None
    return (
        "Linear weight not transposed: torch stores (out_features, in_features), Paddle "
        "(in_features, out_features); the port's values equal the reference's transposed"
    )
