"""The float64 test oracle of the comparison statistics: the whole array at once, in plain numpy
(integers exactly, through Python ints; the scale-aware norms in long double), against which both
the kernel and the numpy block path are checked (tests/diff/test_metrics.py,
tests/diff/test_metrics_blocks.py)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

__all__ = ["reference", "scale_aware"]


def _scaled(v: np.ndarray) -> np.ndarray:
    """``v`` times a power of two near 1/max|v| (exact): dot products neither overflow nor underflow."""
    m = float(np.abs(v).max()) if v.size else 0.0
    return np.ldexp(v, -math.frexp(m)[1]) if m and math.isfinite(m) else v


def _finite_rel(rv: np.ndarray, ov: np.ndarray, d: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Differences of finite values that overflow float64 still have a finite relative error."""
    over = np.isinf(d) & np.isfinite(rv) & np.isfinite(ov)
    rel = rel.copy()
    rel[np.isinf(d) & ~over] = np.inf
    with np.errstate(all="ignore"):
        rel[over] = np.abs(ov[over] / 2 - rv[over] / 2) / (np.abs(rv[over]) / 2)
    return rel


def _true_mean(x: np.ndarray) -> float:
    """Mean of non-negative float64 values; a sum that overflows while every term is finite is
    taken in a scaled domain, because the mean of finite numbers is finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = float(x.sum())
    if math.isinf(s) and bool(np.isfinite(x).all()):
        scale = 2.0**-64
        return float((x * scale).sum()) / x.size / scale
    return s / x.size


def reference(
    ref: np.ndarray,
    other: np.ndarray,
    *,
    atol: Optional[float],
    rtol: Optional[float],
    equal_nan: bool,
) -> dict[str, Any]:
    r = ref.reshape(-1)
    o = other.reshape(-1)
    out: dict[str, Any] = {"size": r.size}
    both_int = r.dtype.kind in "iu" and o.dtype.kind in "iu"
    rf = r.astype(np.float64)
    of = o.astype(np.float64)
    check_close = atol is not None or rtol is not None
    a_tol, r_tol = float(atol or 0.0), float(rtol or 0.0)
    if both_int:
        # exact differences through Python ints, then one rounding to float64
        exact = [abs(b - a) for a, b in zip(r.tolist(), o.tolist())]
        d_all = np.array([float(x) for x in exact], dtype=np.float64)
        valid = np.ones(r.size, dtype=bool)
        out.update(ref_nan=0, ref_inf=0, other_nan=0, other_inf=0, nan_unmatched=0, inf_unmatched=0)
        outside = d_all > a_tol + r_tol * np.abs(rf)
        # compute_stats is exact below 2**62 (its docstring); above, it may round differently
        huge = np.array([x >= 2**62 for x in exact], dtype=bool)
        out["huge"] = int(huge.sum())
        mismatched = int((outside & ~huge).sum())
    else:
        r_nan, o_nan = np.isnan(rf), np.isnan(of)
        r_inf, o_inf = np.isinf(rf), np.isinf(of)
        out.update(
            ref_nan=int(r_nan.sum()),
            ref_inf=int(r_inf.sum()),
            other_nan=int(o_nan.sum()),
            other_inf=int(o_inf.sum()),
        )
        any_nan = r_nan | o_nan
        with np.errstate(invalid="ignore"):
            matched_inf = (r_inf | o_inf) & ~any_nan & (rf == of)
        valid = ~any_nan & ~matched_inf
        nan_bad = any_nan & ~(r_nan & o_nan) if equal_nan else any_nan
        out.update(nan_unmatched=int(nan_bad.sum()),
                   inf_unmatched=int(((r_inf | o_inf) & ~any_nan & ~matched_inf).sum()))
        with np.errstate(over="ignore", invalid="ignore"):
            d_all = np.abs(of - rf)
        # numpy.isclose is |other - ref| <= atol + rtol*|ref|: ref is its second argument
        with np.errstate(over="ignore", invalid="ignore"):
            close = np.isclose(of, rf, rtol=r_tol, atol=a_tol, equal_nan=equal_nan)
        # DESIGN's rule where numpy 2 differs: an Inf is close only to the same Inf, even when
        # rtol*|ref| overflows to inf (numpy 2 then calls 1.8e308 close to inf)
        close &= ~((r_inf | o_inf) & (rf != of))
        mismatched = int((~close).sum())
        out["huge"] = 0
    out["mismatched"] = mismatched if check_close else None
    out["counted"] = int(valid.sum())
    d = d_all[valid]
    rv, ov = rf[valid], of[valid]
    if d.size == 0:
        out.update(
            mean_abs=None,
            max_abs=None,
            min_abs=None,
            mean_rel=None,
            max_rel=None,
            cosine=None,
            rel_l2=None,
            max_scaled=None,
            worst_flat=None,
            worst_ref=None,
            worst_other=None,
        )
        return out
    out["max_abs"] = float(d.max())
    out["min_abs"] = float(d.min())
    out["mean_abs"] = _true_mean(d)
    ar = np.abs(rv)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.where(ar == 0, np.where(d == 0, 0.0, np.inf), d / ar)  # 0/0 = 0, x/0 = inf
    rel = _finite_rel(rv, ov, d, rel)  # an infinite difference of non-finite values: inf
    out["mean_rel"] = _true_mean(rel)
    out["max_rel"] = float(rel.max())
    with np.errstate(over="ignore", invalid="ignore"):
        sr, so = _scaled(rv.astype(np.float64)), _scaled(ov.astype(np.float64))
        dot, rr, oo = float(np.dot(sr, so)), float(np.dot(sr, sr)), float(np.dot(so, so))
    if not (math.isfinite(dot) and math.isfinite(rr) and math.isfinite(oo)):
        out["cosine"] = None
    elif rr == 0.0 and oo == 0.0:
        out["cosine"] = 1.0
    elif rr > 0.0 and oo > 0.0:
        out["cosine"] = min(1.0, max(-1.0, dot / (math.sqrt(rr) * math.sqrt(oo))))
    else:
        out["cosine"] = 0.0
    out["rel_l2"], out["max_scaled"] = scale_aware(ref, other)
    # the first position of the largest difference
    worst = int(np.flatnonzero(valid)[int(np.argmax(d))])
    out.update(worst_flat=worst, worst_ref=float(r[worst]), worst_other=float(o[worst]))
    return out


def scale_aware(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """float64 (long double where it helps) whole-array values of ||o - r|| / ||r|| and
    max|o - r| / max|r| over the elements that enter the statistics (no NaN, no matched Inf)."""
    r, o = ref.astype(np.longdouble).ravel(), other.astype(np.longdouble).ravel()
    keep = ~(np.isnan(r) | np.isnan(o)) & ~(np.isinf(r) & (r == o))
    r, o = r[keep], o[keep]
    d = np.abs(o - r)
    num, den = float(np.sqrt((d * d).sum())), float(np.sqrt((r * r).sum()))
    l2 = 0.0 if num == den == 0.0 else (math.inf if den == 0.0 or math.isinf(num) else num / den)
    mx, mr = float(d.max()), float(np.abs(r).max())
    scaled = 0.0 if mx == mr == 0.0 else (math.inf if mr == 0.0 or math.isinf(mx) else mx / mr)
    return l2, scaled
