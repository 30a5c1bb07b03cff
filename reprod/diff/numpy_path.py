"""The numpy path of the one-pass statistics: a block of any dtype pair, exactly as the compiled
kernel computes it (integers without wrap-around, complex numbers, NaN/Inf with the pass rule's
masks); the fallback where the kernel is not built and the path for everything it does not take."""

from __future__ import annotations

import math
import threading
from typing import Optional

import numpy as np

from .partial import Options, Partial

__all__ = ["numpy_chunk", "as_float", "int_absdiff"]


class _Scratch(threading.local):
    """Per-thread float64 buffers of one block, reused so a block allocates nothing."""

    size = 0

    def get(self, n: int) -> tuple[np.ndarray, ...]:
        if n > self.size:
            self.size = n
            self.bufs = tuple(np.empty(n) for _ in range(5)) + (np.empty(n, dtype=bool),)
        return tuple(b[:n] for b in self.bufs)


_scratch = _Scratch()


def as_float(block: np.ndarray) -> np.ndarray:
    if block.dtype.kind == "c":
        return block.astype(np.complex128, copy=False)
    return block.astype(np.float64, copy=False)


def int_absdiff(r: np.ndarray, o: np.ndarray) -> np.ndarray:
    """|o - r| for integer blocks without wrap-around, exact wherever the difference is < 2**62."""
    if r.dtype.itemsize < 8 and o.dtype.itemsize < 8:
        return np.abs(o.astype(np.int64) - r.astype(np.int64)).astype(np.float64)
    approx = np.abs(o.astype(np.float64) - r.astype(np.float64))
    safe = approx < 2.0**62
    if safe.all() and not (r.dtype.kind == "u" and o.dtype.kind == "u"):
        exact = np.abs(o.astype(np.int64) - r.astype(np.int64))
        return exact.astype(np.float64)
    if r.dtype.kind == "u" and o.dtype.kind == "u":
        ru, ou = r.astype(np.uint64), o.astype(np.uint64)
        exact = np.where(ou >= ru, ou - ru, ru - ou).astype(np.float64)
    else:
        exact = np.abs(o.astype(np.int64) - r.astype(np.int64)).astype(np.float64)
    return np.where(safe, exact, approx)


def _fast_float_block(rb: np.ndarray, ob: np.ndarray, start: int, p: Partial, opt: Options) -> bool:
    """A block of real floats in ~12 numpy passes; False (nothing recorded) when the block holds a
    non-finite value, which the masked path then handles."""
    m = rb.size
    rf_buf, of_buf, d, ar, rel, flags = _scratch.get(m)
    rf = rb if rb.dtype == np.float64 else _cast(rb, rf_buf)
    of = ob if ob.dtype == np.float64 else _cast(ob, of_buf)
    np.subtract(of, rf, out=d)
    np.abs(d, out=d)
    total = float(np.add.reduce(d))
    # one sum answers "is everything finite?": a NaN or Inf on either side makes it non-finite
    if not math.isfinite(total):
        if bool(np.isfinite(rf).all()) and bool(np.isfinite(of).all()):
            total = math.inf  # finite inputs whose differences overflow: still the fast path
        else:
            return False
    i = int(np.argmax(d))
    bmax = float(d[i])
    if bmax > p.max_abs:
        p.max_abs = bmax
        p.worst = start + i
    bmin = float(np.minimum.reduce(d))
    if bmin < p.min_abs:
        p.min_abs = bmin
    np.abs(rf, out=ar)
    bref = float(np.maximum.reduce(ar))
    if bref > p.max_ref:
        p.max_ref = bref
    np.divide(d, ar, out=rel)
    total_rel = float(np.add.reduce(rel))
    if total_rel != total_rel:  # a 0/0 somewhere: the relative error of equal zeros is 0
        np.isnan(rel, out=flags)
        np.copyto(rel, 0.0, where=flags)
        total_rel = float(np.add.reduce(rel))
    bmr = float(np.maximum.reduce(rel))
    if bmr > p.max_rel:
        p.max_rel = bmr
    if opt.check_close:
        np.multiply(ar, opt.rtol, out=ar)
        np.add(ar, opt.atol, out=ar)
        np.greater(d, ar, out=flags)
        p.mismatched += int(np.count_nonzero(flags))
    p.counted += m
    p.total += total
    p.total_rel += total_rel
    p.dot += float(np.dot(rf, of))
    p.rr += float(np.dot(rf, rf))
    p.oo += float(np.dot(of, of))
    p.dd += float(np.dot(d, d))
    return True


def _cast(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.copyto(out, src, casting="unsafe")
    return out


def _general_block(rb: np.ndarray, ob: np.ndarray, start: int, p: Partial, opt: Options) -> None:
    """Any block: integers exactly, complex numbers, and NaN/Inf with the pass rule's masks."""
    both_fin: Optional[np.ndarray] = None
    valid: Optional[np.ndarray] = None
    if rb.dtype.kind in "biu" and ob.dtype.kind in "biu":
        if rb.dtype.kind == "b":
            rb = rb.astype(np.int8)
        if ob.dtype.kind == "b":
            ob = ob.astype(np.int8)
        d = int_absdiff(rb, ob)
        rf = rb.astype(np.float64)
        of = ob.astype(np.float64)
    else:
        rf = as_float(rb)
        of = as_float(ob)
        r_fin = np.isfinite(rf)
        o_fin = np.isfinite(of)
        if not (r_fin.all() and o_fin.all()):
            r_nan, o_nan = np.isnan(rf), np.isnan(of)
            p.ref_nan += int(r_nan.sum())
            p.other_nan += int(o_nan.sum())
            p.ref_inf += int((~r_fin & ~r_nan).sum())
            p.other_inf += int((~o_fin & ~o_nan).sum())
            any_nan = r_nan | o_nan
            nan_bad = any_nan & ~(r_nan & o_nan) if opt.equal_nan else any_nan
            p.nan_unmatched += int(nan_bad.sum())
            inf_pos = (~r_fin | ~o_fin) & ~any_nan
            inf_matched = inf_pos & (rf == of)
            inf_bad = inf_pos & ~inf_matched
            p.inf_unmatched += int(inf_bad.sum())
            if opt.check_close:
                # numpy.isclose: a NaN or an unmatched Inf is never close, whatever atol and rtol
                p.mismatched += int(nan_bad.sum()) + int(inf_bad.sum())
            # the statistics see finite pairs and unmatched infs (as an infinite difference)
            valid = ~any_nan & ~inf_matched
            both_fin = (r_fin & o_fin)[valid]
            rf = rf[valid]
            of = of[valid]
        d = np.abs(of - rf)
    m = int(d.size)
    if m == 0:
        return
    p.counted += m
    p.total += float(d.sum())
    i = int(d.argmax())
    bmax = float(d[i])
    if bmax > p.max_abs:
        p.max_abs = bmax
        p.worst = start + (i if valid is None else int(np.flatnonzero(valid)[i]))
    bmin = float(d.min())
    if bmin < p.min_abs:
        p.min_abs = bmin
    ar = np.abs(rf)
    bref = float(ar.max())
    if bref > p.max_ref:
        p.max_ref = bref
    p.dd += float(np.dot(d, d))
    rel = np.divide(d, ar, out=np.zeros_like(d), where=(ar != 0) | (d != 0))
    if valid is not None:
        rel[np.isinf(d)] = np.inf  # an unmatched Inf is an infinite relative error, not inf/inf
    p.total_rel += float(rel.sum())
    bmr = float(rel.max())
    if bmr > p.max_rel:
        p.max_rel = bmr
    if opt.check_close:
        outside = d > opt.atol + opt.rtol * ar
        if both_fin is not None:
            outside &= both_fin  # unmatched Infs were counted above
        p.mismatched += int(outside.sum())
    if rf.dtype.kind == "c":
        p.dot += float(np.vdot(rf, of).real)
        p.rr += float(np.vdot(rf, rf).real)
        p.oo += float(np.vdot(of, of).real)
    else:
        p.dot += float(np.dot(rf, of))
        p.rr += float(np.dot(rf, rf))
        p.oo += float(np.dot(of, of))


def numpy_chunk(r: np.ndarray, o: np.ndarray, lo: int, hi: int, opt: Options) -> Partial:
    p = Partial()
    fast = r.dtype.kind == "f" and o.dtype.kind == "f"
    with np.errstate(all="ignore"):
        for s in range(lo, hi, opt.block):
            rb = r[s : min(s + opt.block, hi)]
            ob = o[s : min(s + opt.block, hi)]
            if not (fast and _fast_float_block(rb, ob, s, p, opt)):
                _general_block(rb, ob, s, p, opt)
    return p


