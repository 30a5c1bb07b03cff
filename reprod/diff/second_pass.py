"""Rare second passes of the statistics: sums that overflow or underflow in float64 (values near
the float64 limits) are taken again in a domain scaled by powers of two, so that no statistic is
lost to the range; and the ratio conventions (0/0 = 0, x/0 = inf)."""

from __future__ import annotations

import math

import numpy as np

from .numpy_path import as_float, int_absdiff

__all__ = ["ratio", "ratios", "scaled_rel_l2", "scaled_means", "squares_lost", "scaled_dot",
           "overflow_safe_rel", "TINY", "HUGE"]


def ratio(num: float, den: float) -> float:
    """num / den with 0/0 = 0 and x/0 = inf (the relative error's convention); an infinite
    difference is an infinite ratio, whatever the reference holds."""
    if num == math.inf:
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def ratios(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where((den == 0.0) | (num == np.inf), np.where(num == 0.0, 0.0, np.inf),
                    num / np.where(den == 0.0, 1.0, den))


def scaled_rel_l2(r: np.ndarray, o: np.ndarray, block: int, max_abs: float,
                   max_ref: float) -> tuple[float, float, float]:
    """(||o - r|| / ||r||, ||o - r||, ||r||) with each sum of squares taken in a domain scaled by a
    power of two near its largest term (exact), so that neither overflow nor underflow loses the
    ratio (a norm beyond the float64 range is inf). A rare second pass."""
    kd = math.frexp(max_abs)[1] if 0.0 < max_abs < math.inf else 0
    kr = math.frexp(max_ref)[1] if 0.0 < max_ref < math.inf else 0
    dd = rr = 0.0
    with np.errstate(all="ignore"):
        for s in range(0, r.size, block):
            d, ar = _diffs(r[s : s + block], o[s : s + block])
            d, ar = np.ldexp(d, -kd), np.ldexp(ar, -kr)
            dd += float(np.dot(d, d))
            rr += float(np.dot(ar, ar))
    norms = (_ldexp(math.sqrt(dd), kd), _ldexp(math.sqrt(rr), kr))
    scaled = ratio(math.sqrt(dd), math.sqrt(rr))
    if not 0.0 < scaled < math.inf:
        return (scaled, *norms)
    # a difference beyond the float64 range times the reference's norm: inf
    return (_ldexp(scaled, kd - kr), *norms)


def _diffs(rb: np.ndarray, ob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|o - r| and |r| of the elements that enter the statistics (integers exactly)."""
    if rb.dtype.kind in "biu" and ob.dtype.kind in "biu":
        d = int_absdiff(rb.astype(np.int64) if rb.dtype.kind == "b" else rb,
                        ob.astype(np.int64) if ob.dtype.kind == "b" else ob)
        return d, np.abs(rb.astype(np.float64))
    rf, of = _kept(rb, ob)
    return np.abs(of - rf), np.abs(rf)


def _ldexp(x: float, k: int) -> float:
    try:
        return math.ldexp(x, k)
    except OverflowError:
        return math.inf


def scaled_means(r: np.ndarray, o: np.ndarray, block: int) -> tuple[float, float]:
    """Means of |o - r| and of the relative error summed in a scaled domain (a rare second pass)."""
    scale = 2.0**-64
    acc = acc_rel = 0.0
    counted = 0
    with np.errstate(all="ignore"):
        for s in range(0, r.size, block):
            d, ar = _diffs(r[s : s + block], o[s : s + block])
            rel = _rel(d, ar)
            counted += d.size
            acc += float((d * scale).sum())
            acc_rel += float((rel * scale).sum())
    return acc / counted / scale, acc_rel / counted / scale


TINY = 2.0**-900  # sums of squares below this may have lost values to underflow
HUGE = 2.0**900


def squares_lost(rr: float, oo: float, dot: float, max_abs: float) -> bool:
    """Whether the unscaled dot products may have overflowed or underflowed (values beyond about
    1e154 or below about 1e-135): then the cosine needs a scaled second pass."""
    if not (math.isfinite(rr) and math.isfinite(oo) and math.isfinite(dot)):
        return True
    if rr > HUGE or oo > HUGE:
        return True
    if rr == 0.0 and oo == 0.0 and max_abs == 0.0:
        return False  # identical (zero or underflowing) arrays: cosine 1 either way
    return rr < TINY or oo < TINY


def _rel(d: np.ndarray, ar: np.ndarray) -> np.ndarray:
    """|other - ref| / |ref| with 0/0 = 0 and x/0 = inf; an infinite difference is an infinite
    relative error (not inf/inf)."""
    rel = np.divide(d, ar, out=np.zeros_like(d), where=(ar != 0) | (d != 0))
    rel[np.isinf(d)] = np.inf
    return rel


def _kept(rb: np.ndarray, ob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 pairs that enter the statistics: no NaN, no matched Inf."""
    rf, of = as_float(rb), as_float(ob)
    keep = ~(np.isnan(rf) | np.isnan(of)) & ~(np.isinf(rf) & (rf == of))
    return rf[keep], of[keep]


def scaled_dot(r: np.ndarray, o: np.ndarray, block: int) -> tuple[float, float, float]:
    """dot(r, o), dot(r, r), dot(o, o) with each side scaled by a power of two near its largest
    magnitude (exact), so that neither overflow nor underflow loses them; the cosine is unchanged
    by the scaling. A rare second (and third) pass."""
    er = eo = None
    with np.errstate(all="ignore"):
        for s in range(0, r.size, block):
            rf, of = _kept(r[s : s + block], o[s : s + block])
            rf, of = np.abs(rf.real), np.abs(of.real)
            rf, of = rf[np.isfinite(rf)], of[np.isfinite(of)]
            if rf.size:
                m = float(rf.max())
                er = m if er is None else max(er, m)
            if of.size:
                m = float(of.max())
                eo = m if eo is None else max(eo, m)
        kr = math.frexp(er)[1] if er else 0
        ko = math.frexp(eo)[1] if eo else 0
        dot = rr = oo = 0.0
        for s in range(0, r.size, block):
            rf, of = _kept(r[s : s + block], o[s : s + block])
            rf, of = np.ldexp(rf.real, -kr), np.ldexp(of.real, -ko)
            dot += float(np.dot(rf, of))
            rr += float(np.dot(rf, rf))
            oo += float(np.dot(of, of))
    return dot, rr, oo


def overflow_safe_rel(r: np.ndarray, o: np.ndarray, block: int) -> tuple[float, float]:
    """(mean_rel, max_rel) where differences overflow: those elements use halved operands
    (exact at that magnitude); the others keep the plain quotient."""
    total = 0.0
    mx = 0.0
    counted = 0
    with np.errstate(all="ignore"):
        for s in range(0, r.size, block):
            rf, of = _kept(r[s : s + block], o[s : s + block])
            d = np.abs(of - rf)
            ar = np.abs(rf)
            rel = _rel(d, ar)
            over = np.isinf(d) & np.isfinite(rf) & np.isfinite(of)
            if over.any():
                rel[over] = np.abs(of[over] / 2 - rf[over] / 2) / (ar[over] / 2)
            counted += d.size
            total += float((rel * 2.0**-64).sum())
            if rel.size:
                mx = max(mx, float(rel.max()))
    return (total / counted / 2.0**-64 if counted else 0.0), mx


