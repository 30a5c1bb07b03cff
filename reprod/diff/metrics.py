"""Every statistic of one array pair, computed in one block-wise pass with float64 accumulation.

Peak extra memory is a few blocks, whatever the tensor size: |other - ref| is never materialised
for a whole tensor. Integers are compared exactly (no wrap-around), NaN and Inf are counted on
each side and never hidden by a statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["Stats", "compute_stats", "BLOCK"]

BLOCK = 1 << 16  # elements per block: fits L2 with every temporary, amortises numpy call overhead


@dataclass
class Stats:
    size: int = 0
    counted: int = 0  # elements that entered the statistics
    mean_abs: Optional[float] = None
    max_abs: Optional[float] = None
    min_abs: Optional[float] = None
    mean_rel: Optional[float] = None
    max_rel: Optional[float] = None
    cosine: Optional[float] = None
    worst_flat: Optional[int] = None
    worst_ref: Optional[float] = None
    worst_other: Optional[float] = None
    mismatched: Optional[int] = None
    ref_nan: int = 0
    ref_inf: int = 0
    other_nan: int = 0
    other_inf: int = 0
    nan_unmatched: int = 0  # positions where a NaN is not excused by equal_nan
    inf_unmatched: int = 0  # positions where an Inf has no equal Inf on the other side


def _as_float(block: np.ndarray) -> np.ndarray:
    if block.dtype.kind == "c":
        return block.astype(np.complex128, copy=False)
    return block.astype(np.float64, copy=False)


def _int_absdiff(r: np.ndarray, o: np.ndarray) -> np.ndarray:
    """|o - r| for integer blocks without wrap-around, exact wherever the difference is < 2**62."""
    if r.dtype.itemsize < 8 and o.dtype.itemsize < 8:
        return np.abs(o.astype(np.int64) - r.astype(np.int64)).astype(np.float64)
    approx = np.abs(o.astype(np.float64) - r.astype(np.float64))
    safe = approx < 2.0**62
    if safe.all() and not (r.dtype.kind == "u" and o.dtype.kind == "u"):
        with np.errstate(over="ignore"):
            exact = np.abs(o.astype(np.int64) - r.astype(np.int64))
        return exact.astype(np.float64)
    with np.errstate(over="ignore"):
        if r.dtype.kind == "u" and o.dtype.kind == "u":
            ru, ou = r.astype(np.uint64), o.astype(np.uint64)
            exact = np.where(ou >= ru, ou - ru, ru - ou).astype(np.float64)
        else:
            exact = np.abs(o.astype(np.int64) - r.astype(np.int64)).astype(np.float64)
    return np.where(safe, exact, approx)


def compute_stats(ref: np.ndarray, other: np.ndarray, *, atol: Optional[float] = None,
                  rtol: Optional[float] = None, equal_nan: bool = False, block: int = BLOCK) -> Stats:
    """Compare two arrays of the same size element by element (C order of ``ref``'s shape)."""
    r_flat = ref.reshape(-1)
    o_flat = other.reshape(-1)
    n = int(r_flat.size)
    st = Stats(size=n)
    if n == 0:
        return st
    check_close = atol is not None or rtol is not None
    a_tol = float(atol or 0.0)
    r_tol = float(rtol or 0.0)
    integer = r_flat.dtype.kind in "biu" and o_flat.dtype.kind in "biu"
    total = 0.0
    total_rel = 0.0
    dot = rr = oo = 0.0
    counted = 0
    max_abs = -1.0
    min_abs = math.inf
    max_rel = -1.0
    worst = -1
    mismatched = 0
    for start in range(0, n, block):
        rb = r_flat[start : start + block]
        ob = o_flat[start : start + block]
        if integer:
            if rb.dtype.kind == "b":
                rb = rb.astype(np.int8)
            if ob.dtype.kind == "b":
                ob = ob.astype(np.int8)
            d = _int_absdiff(rb, ob)
            rf = rb.astype(np.float64)
            of = ob.astype(np.float64)
            valid = None
        else:
            rf = _as_float(rb)
            of = _as_float(ob)
            r_fin = np.isfinite(rf)
            o_fin = np.isfinite(of)
            if r_fin.all() and o_fin.all():
                valid = None
            else:
                r_nan, o_nan = np.isnan(rf), np.isnan(of)
                st.ref_nan += int(r_nan.sum())
                st.other_nan += int(o_nan.sum())
                st.ref_inf += int((~r_fin & ~r_nan).sum())
                st.other_inf += int((~o_fin & ~o_nan).sum())
                any_nan = r_nan | o_nan
                both_nan = r_nan & o_nan
                nan_bad = any_nan & ~both_nan if equal_nan else any_nan
                st.nan_unmatched += int(nan_bad.sum())
                inf_pos = (~r_fin | ~o_fin) & ~any_nan
                with np.errstate(invalid="ignore"):
                    inf_matched = inf_pos & (rf == of)
                inf_bad = inf_pos & ~inf_matched
                st.inf_unmatched += int(inf_bad.sum())
                if check_close:
                    mismatched += int(nan_bad.sum())
                # statistics see finite pairs and unmatched infs (as an infinite difference)
                valid = ~any_nan & ~inf_matched
                rf = rf[valid]
                of = of[valid]
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.abs(of - rf)
        m = int(d.size)
        if m == 0:
            continue
        counted += m
        with np.errstate(over="ignore", invalid="ignore"):
            total += float(d.sum())
            i = int(d.argmax())
            bmax = float(d[i])
            if bmax > max_abs:
                max_abs = bmax
                if valid is None:
                    worst = start + i
                else:
                    worst = start + int(np.flatnonzero(valid)[i])
            bmin = float(d.min())
            if bmin < min_abs:
                min_abs = bmin
            ar = np.abs(rf)
            with np.errstate(divide="ignore"):
                rel = np.divide(d, ar, out=np.zeros_like(d), where=(ar != 0) | (d != 0))
            if valid is not None:
                rel[np.isinf(d)] = np.inf  # an unmatched Inf is an infinite relative error, not inf/inf
            total_rel += float(rel.sum())
            bmr = float(rel.max())
            if bmr > max_rel:
                max_rel = bmr
            if check_close:
                mismatched += int((d > a_tol + r_tol * ar).sum())
            if rf.dtype.kind == "c":
                dot += float(np.vdot(rf, of).real)
                rr += float(np.vdot(rf, rf).real)
                oo += float(np.vdot(of, of).real)
            else:
                dot += float(np.dot(rf, of))
                rr += float(np.dot(rf, rf))
                oo += float(np.dot(of, of))
    st.counted = counted
    if check_close:
        st.mismatched = mismatched
    if counted == 0:
        return st
    st.max_abs = max_abs
    st.min_abs = min_abs
    st.max_rel = max_rel
    if math.isinf(total) and math.isfinite(max_abs):
        total = _scaled_sum(r_flat, o_flat, block)  # differences near float max: sum without overflow
    st.mean_abs = total / counted
    st.mean_rel = total_rel / counted
    if math.isfinite(rr) and math.isfinite(oo) and math.isfinite(dot):
        if rr == 0.0 and oo == 0.0:
            st.cosine = 1.0
        elif rr > 0.0 and oo > 0.0:
            st.cosine = max(-1.0, min(1.0, dot / (math.sqrt(rr) * math.sqrt(oo))))
        else:
            st.cosine = 0.0
    if worst >= 0:
        st.worst_flat = worst
        st.worst_ref = _scalar(r_flat[worst])
        st.worst_other = _scalar(o_flat[worst])
    return st


def _scaled_sum(r: np.ndarray, o: np.ndarray, block: int) -> float:
    scale = 2.0**-64
    acc = 0.0
    for s in range(0, r.size, block):
        rf = _as_float(r[s : s + block]) * scale
        of = _as_float(o[s : s + block]) * scale
        with np.errstate(invalid="ignore"):
            d = np.abs(of - rf)
        acc += float(d[np.isfinite(d)].sum())
    return acc / scale


def _scalar(x: np.generic) -> float:
    v = x.item()
    if isinstance(v, complex):
        return v.real if v.imag == 0 else abs(v)
    return float(v)
