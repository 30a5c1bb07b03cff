"""Every statistic of one array pair, computed in one block-wise pass with float64 accumulation.

Peak extra memory is a few blocks per thread, whatever the tensor size: |other - ref| is never
materialised for a whole tensor. Integers are compared exactly (no wrap-around), NaN and Inf are
counted on each side and never hidden by a statistic.

Large arrays are cut into chunks that a small thread pool works on together (the compiled kernel
and numpy both release the GIL); the partial statistics of the chunks are merged in chunk order, so
the result does not depend on how many threads ran. Real float32/float64 pairs go through the
compiled kernel ``reprod.diff._kernel`` when it is built, else through the numpy path below; both
give the same statistics to float64 rounding (``tests/test_metrics_blocks.py``).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["Stats", "compute_stats", "BLOCK", "CHUNK", "kernel_available", "set_threads"]

# Elements per block. The numpy path's float64 scratch buffers of a block stay in L2, and its
# np.dot calls stay below OpenBLAS's 10,000-element threshold for threading: above it each dot
# wakes the BLAS threads and a 16K block ran 7x slower on 2 busy cores (benchmarks/README.md).
BLOCK = 1 << 13
# Elements per chunk, the unit of work of one thread. Measured on 2 x 2 GiB float32 with two
# threads: 64K elements 0.64 s, 256K 0.50 s, 1M 0.45 s, 4M 0.44 s (fewer hand-offs, longer
# sequential runs for the prefetcher and the page-fault-around); 1M still splits a 4 MiB key.
CHUNK = 1 << 20

try:  # the optional compiled kernel (setup.py builds it; the numpy path is the fallback)
    from . import _kernel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _kernel = None

_KERNEL_CODES = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
_use_kernel = _kernel is not None and os.environ.get("REPROD_KERNEL", "1") != "0"


def kernel_available() -> bool:
    """Whether float32/float64 pairs go through the compiled kernel (``REPROD_KERNEL=0`` disables it)."""
    return _use_kernel


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
    rel_l2: Optional[float] = None  # ||other - ref||_2 / ||ref||_2
    max_scaled: Optional[float] = None  # max|other - ref| / max|ref|
    diff_l2: Optional[float] = None  # ||other - ref||_2
    ref_l2: Optional[float] = None  # ||ref||_2
    ref_max: Optional[float] = None  # max|ref|
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


# --- partial statistics of one chunk ---------------------------------------------------------------

# The kernel's row (stats_many) and, its first 19 columns, stats()' tuple: named in the kernel,
# which the numpy path must match (a test checks this copy against the compiled one).
ROW_COLUMNS = ("counted", "total", "total_rel", "dot", "rr", "oo", "max_abs", "worst", "min_abs",
               "max_rel", "mismatched", "ref_nan", "ref_inf", "other_nan", "other_inf",
               "nan_unmatched", "inf_unmatched", "dd", "max_ref", "worst_ref", "worst_other",
               "crc_ref", "crc_other")
if _kernel is not None:
    ROW_COLUMNS = tuple(_kernel.ROW_COLUMNS)
COL = {name: i for i, name in enumerate(ROW_COLUMNS)}
_FIELDS = ROW_COLUMNS[: COL["max_ref"] + 1]  # a partial's fields, in stats()' order


class _Partial:
    """Sums, extremes and counts of a run of elements; merged left to right, so ties in the
    maximum keep the earliest position (numpy's argmax)."""

    __slots__ = _FIELDS

    def __init__(self) -> None:
        self.counted = 0
        self.total = self.total_rel = self.dot = self.rr = self.oo = 0.0
        self.max_abs = -1.0
        self.worst = -1
        self.min_abs = math.inf
        self.max_rel = -1.0
        self.mismatched = 0
        self.ref_nan = self.ref_inf = self.other_nan = self.other_inf = 0
        self.nan_unmatched = self.inf_unmatched = 0
        self.dd = 0.0
        self.max_ref = 0.0

    @classmethod
    def from_tuple(cls, values: Sequence[Any], offset: int) -> _Partial:
        p = cls()
        for name, v in zip(_FIELDS, values):
            setattr(p, name, v)
        if p.worst >= 0:
            p.worst += offset
        return p

    def merge(self, b: _Partial) -> None:
        self.counted += b.counted
        self.total += b.total
        self.total_rel += b.total_rel
        self.dot += b.dot
        self.rr += b.rr
        self.oo += b.oo
        if b.max_abs > self.max_abs:
            self.max_abs = b.max_abs
            self.worst = b.worst
        if b.min_abs < self.min_abs:
            self.min_abs = b.min_abs
        if b.max_rel > self.max_rel:
            self.max_rel = b.max_rel
        self.mismatched += b.mismatched
        self.ref_nan += b.ref_nan
        self.ref_inf += b.ref_inf
        self.other_nan += b.other_nan
        self.other_inf += b.other_inf
        self.nan_unmatched += b.nan_unmatched
        self.inf_unmatched += b.inf_unmatched
        self.dd += b.dd
        if b.max_ref > self.max_ref:
            self.max_ref = b.max_ref


@dataclass(frozen=True)
class _Options:
    check_close: bool
    atol: float
    rtol: float
    equal_nan: bool
    block: int


# --- the numpy path --------------------------------------------------------------------------------


class _Scratch(threading.local):
    """Per-thread float64 buffers of one block, reused so a block allocates nothing."""

    size = 0

    def get(self, n: int) -> tuple[np.ndarray, ...]:
        if n > self.size:
            self.size = n
            self.bufs = tuple(np.empty(n) for _ in range(5)) + (np.empty(n, dtype=bool),)
        return tuple(b[:n] for b in self.bufs)


_scratch = _Scratch()


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
        exact = np.abs(o.astype(np.int64) - r.astype(np.int64))
        return exact.astype(np.float64)
    if r.dtype.kind == "u" and o.dtype.kind == "u":
        ru, ou = r.astype(np.uint64), o.astype(np.uint64)
        exact = np.where(ou >= ru, ou - ru, ru - ou).astype(np.float64)
    else:
        exact = np.abs(o.astype(np.int64) - r.astype(np.int64)).astype(np.float64)
    return np.where(safe, exact, approx)


def _fast_float_block(rb: np.ndarray, ob: np.ndarray, start: int, p: _Partial, opt: _Options) -> bool:
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


def _general_block(rb: np.ndarray, ob: np.ndarray, start: int, p: _Partial, opt: _Options) -> None:
    """Any block: integers exactly, complex numbers, and NaN/Inf with the pass rule's masks."""
    both_fin: Optional[np.ndarray] = None
    valid: Optional[np.ndarray] = None
    if rb.dtype.kind in "biu" and ob.dtype.kind in "biu":
        if rb.dtype.kind == "b":
            rb = rb.astype(np.int8)
        if ob.dtype.kind == "b":
            ob = ob.astype(np.int8)
        d = _int_absdiff(rb, ob)
        rf = rb.astype(np.float64)
        of = ob.astype(np.float64)
    else:
        rf = _as_float(rb)
        of = _as_float(ob)
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


def _numpy_chunk(r: np.ndarray, o: np.ndarray, lo: int, hi: int, opt: _Options) -> _Partial:
    p = _Partial()
    fast = r.dtype.kind == "f" and o.dtype.kind == "f"
    with np.errstate(all="ignore"):
        for s in range(lo, hi, opt.block):
            rb = r[s : min(s + opt.block, hi)]
            ob = o[s : min(s + opt.block, hi)]
            if not (fast and _fast_float_block(rb, ob, s, p, opt)):
                _general_block(rb, ob, s, p, opt)
    return p


def _kernel_chunk(r: np.ndarray, o: np.ndarray, lo: int, hi: int, opt: _Options) -> _Partial:
    out = _kernel.stats(r[lo:hi], _KERNEL_CODES[r.dtype], o[lo:hi], _KERNEL_CODES[o.dtype],
                        opt.block, opt.check_close, opt.atol, opt.rtol, opt.equal_nan)
    return _Partial.from_tuple(out, lo)


# --- threads ---------------------------------------------------------------------------------------


def _default_threads() -> int:
    env = os.environ.get("REPROD_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_threads = _default_threads()
_pool: Any = None
_pool_lock = threading.Lock()


def set_threads(n: Optional[int]) -> int:
    """Threads that work on one large array (``None``: the CPUs this process may use, at most 8;
    environment: ``REPROD_THREADS``). Returns the previous value. Results do not depend on it."""
    global _threads, _pool
    old = _threads
    with _pool_lock:
        _threads = _default_threads() if n is None else max(1, int(n))
        if _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None
    return old


def _executor() -> Any:
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max_workers=_threads - 1, thread_name_prefix="reprod-stats")
        return _pool


def _run_chunks(work: Callable[[int, int], _Partial], n: int, chunk: int,
                on_progress: Optional[Callable[[int], None]]) -> _Partial:
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(bounds) == 1 or _threads == 1:
        total = _Partial()
        for lo, hi in bounds:
            total.merge(work(lo, hi))
            if on_progress is not None:
                on_progress(hi - lo)
        return total
    parts: list[Optional[_Partial]] = [None] * len(bounds)
    ticket = itertools.count()  # next() on a count is atomic under the GIL
    lock = threading.Lock()

    def worker() -> None:
        for i in ticket:
            if i >= len(bounds):
                return
            lo, hi = bounds[i]
            parts[i] = work(lo, hi)
            if on_progress is not None:
                with lock:
                    on_progress(hi - lo)

    helpers = [_executor().submit(worker) for _ in range(min(_threads, len(bounds)) - 1)]
    worker()  # the calling thread works too
    for f in helpers:
        f.result()
    total = _Partial()
    for part in parts:
        assert part is not None
        total.merge(part)
    return total


# --- the public entry point ------------------------------------------------------------------------


def compute_stats(ref: np.ndarray, other: np.ndarray, *, atol: Optional[float] = None,
                  rtol: Optional[float] = None, equal_nan: bool = False, block: int = BLOCK,
                  on_progress: Optional[Callable[[int], None]] = None) -> Stats:
    """Compare two arrays of the same size element by element (C order of ``ref``'s shape).

    ``block``: elements per step (memory per thread is a few float64 blocks); it changes no
    statistic beyond float64 rounding of the sums. ``on_progress(n)`` is called as each run of
    ``n`` elements is done (the progress bar's hook).

    >>> s = compute_stats(np.zeros(3), np.array([0.0, 1e-3, -2e-3]))
    >>> s.max_abs, s.worst_flat
    (0.002, 2)
    """
    r_flat = ref.reshape(-1)
    o_flat = other.reshape(-1)
    n = int(r_flat.size)
    if n == 0:
        return Stats(size=0)
    block = max(1, int(block))
    check_close = atol is not None or rtol is not None
    a_tol, r_tol, equal_nan = float(atol or 0.0), float(rtol or 0.0), bool(equal_nan)
    r_code = _KERNEL_CODES.get(r_flat.dtype) if _use_kernel else None
    o_code = _KERNEL_CODES.get(o_flat.dtype) if r_code is not None else None
    kernel = o_code is not None
    if kernel:
        # a reshape(-1) that could not be a view already copied; a strided 1-D view is copied here
        if not r_flat.flags.c_contiguous:
            r_flat = np.ascontiguousarray(r_flat)
        if not o_flat.flags.c_contiguous:
            o_flat = np.ascontiguousarray(o_flat)
        if n <= CHUNK:  # most keys of a dump: one call, no thread hand-off
            values = _kernel.stats(r_flat, r_code, o_flat, o_code, block, check_close, a_tol, r_tol,
                                   equal_nan)
            if on_progress is not None:
                on_progress(n)
            return _finish(n, values, r_flat, o_flat, check_close, block)
    opt = _Options(check_close=check_close, atol=a_tol, rtol=r_tol, equal_nan=equal_nan, block=block)
    chunk = max(1, CHUNK // block) * block  # whole blocks, so the block grid is the same
    if kernel:
        def work(lo: int, hi: int) -> _Partial:
            return _kernel_chunk(r_flat, o_flat, lo, hi, opt)
    else:
        def work(lo: int, hi: int) -> _Partial:
            return _numpy_chunk(r_flat, o_flat, lo, hi, opt)

    p = _run_chunks(work, n, chunk, on_progress)
    return _finish(n, tuple(getattr(p, f) for f in _FIELDS), r_flat, o_flat, check_close, block)


def _finish(n: int, values: Sequence[Any], r: np.ndarray, o: np.ndarray, check_close: bool,
            block: int) -> Stats:
    (counted, total, total_rel, dot, rr, oo, max_abs, worst, min_abs, max_rel, mismatched,
     ref_nan, ref_inf, other_nan, other_inf, nan_unmatched, inf_unmatched, dd, max_ref) = values
    st = Stats(size=n, counted=int(counted), mismatched=int(mismatched) if check_close else None,
               ref_nan=int(ref_nan), ref_inf=int(ref_inf), other_nan=int(other_nan),
               other_inf=int(other_inf), nan_unmatched=int(nan_unmatched),
               inf_unmatched=int(inf_unmatched))
    if counted == 0:
        return st
    st.max_abs = float(max_abs)
    st.min_abs = float(min_abs)
    st.max_rel = float(max_rel)
    st.mean_abs = total / counted
    st.mean_rel = total_rel / counted
    if (math.isinf(total) and math.isfinite(max_abs)) or \
            (math.isinf(total_rel) and math.isfinite(max_rel)):
        # finite terms whose sum overflows (values near the float64 limit): the mean is finite
        mean_abs, mean_rel = _scaled_means(r, o, block)
        if math.isfinite(max_abs):
            st.mean_abs = mean_abs
        if math.isfinite(max_rel):
            st.mean_rel = mean_rel
    if math.isinf(max_abs) and inf_unmatched == 0 and nan_unmatched == 0:
        # two finite values more than the float64 maximum apart: |o - r| rounds to inf (right for
        # the absolute statistics) but the relative error is finite; recompute it without overflow
        st.mean_rel, st.max_rel = _overflow_safe_rel(r, o, block)
    st.max_scaled = _ratio(float(max_abs), float(max_ref))
    st.ref_max = float(max_ref)
    if _squares_lost(dd, rr, 0.0, max_abs) and not (dd == 0.0 and max_abs == 0.0):
        st.rel_l2, st.diff_l2, st.ref_l2 = _scaled_rel_l2(r, o, block, float(max_abs), float(max_ref))
    else:
        st.diff_l2, st.ref_l2 = math.sqrt(dd), math.sqrt(rr)
        st.rel_l2 = _ratio(st.diff_l2, st.ref_l2)
    if _squares_lost(rr, oo, dot, max_abs):
        dot, rr, oo = _scaled_dot(r, o, block)
    if math.isfinite(rr) and math.isfinite(oo) and math.isfinite(dot):
        if rr == 0.0 and oo == 0.0:
            st.cosine = 1.0
        elif rr > 0.0 and oo > 0.0:
            st.cosine = max(-1.0, min(1.0, dot / (math.sqrt(rr) * math.sqrt(oo))))
        else:
            st.cosine = 0.0
    if worst >= 0:
        st.worst_flat = int(worst)
        st.worst_ref = _scalar_at(r, worst)
        st.worst_other = _scalar_at(o, worst)
    return st


def finish_rows(rows: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_finish`` for many pairs at once, from rows of ``_kernel.stats_many`` (the fields of
    ``_FIELDS``, then the ref and other values at the worst position): a mask of the rows that
    need nothing else (every element counted, no sum that overflowed, no lost square; the others
    need ``_finish``'s second passes), and per row mean_abs, max_abs, min_abs, mean_rel, max_rel,
    cosine, worst position, worst ref, worst other, mismatched."""
    counted, total, total_rel, dot, rr, oo, max_abs = rows[:, :7].T
    dd, max_ref = rows[:, COL["dd"]], rows[:, COL["max_ref"]]
    with np.errstate(all="ignore"):
        finite = np.isfinite(rr) & np.isfinite(oo) & np.isfinite(dot) & np.isfinite(dd)
        zero = (rr == 0.0) & (oo == 0.0) & (max_abs == 0.0)
        tiny = (rr < _TINY) | (oo < _TINY) | ((dd < _TINY) & (max_abs > 0.0))
        lost = ~finite | (rr > _HUGE) | (oo > _HUGE) | (dd > _HUGE) | (~zero & tiny)
        plain = (counted == sizes) & (total < math.inf) & (total_rel < math.inf) & \
            (max_abs < math.inf) & ~lost
        cosine = np.where((rr == 0.0) & (oo == 0.0), 1.0, np.where(
            (rr > 0.0) & (oo > 0.0), np.clip(dot / (np.sqrt(rr) * np.sqrt(oo)), -1.0, 1.0), 0.0))
        rel_l2 = _ratios(np.sqrt(dd), np.sqrt(rr))
        max_scaled = _ratios(max_abs, max_ref)
        c = COL
        table = np.column_stack([total / sizes, max_abs, rows[:, c["min_abs"]], total_rel / sizes,
                                 rows[:, c["max_rel"]], cosine, rel_l2, max_scaled,
                                 rows[:, c["worst"]], rows[:, c["worst_ref"]],
                                 rows[:, c["worst_other"]], rows[:, c["mismatched"]]])
    return plain, table


def _ratio(num: float, den: float) -> float:
    """num / den with 0/0 = 0 and x/0 = inf (the relative error's convention); an infinite
    difference is an infinite ratio, whatever the reference holds."""
    if num == math.inf:
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _ratios(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where((den == 0.0) | (num == np.inf), np.where(num == 0.0, 0.0, np.inf),
                    num / np.where(den == 0.0, 1.0, den))


def _scaled_rel_l2(r: np.ndarray, o: np.ndarray, block: int, max_abs: float,
                   max_ref: float) -> tuple[float, float, float]:
    """(||o - r|| / ||r||, ||o - r||, ||r||) with each sum of squares taken in a domain scaled by a
    power of two near its largest term (exact), so that neither overflow nor underflow loses the
    ratio (a norm beyond the float64 range is inf). A rare second pass."""
    kd = math.frexp(max_abs)[1] if 0.0 < max_abs < math.inf else 0
    kr = math.frexp(max_ref)[1] if 0.0 < max_ref < math.inf else 0
    dd = rr = 0.0
    with np.errstate(all="ignore"):
        for s in range(0, r.size, block):
            rb, ob = r[s : s + block], o[s : s + block]
            if rb.dtype.kind in "biu" and ob.dtype.kind in "biu":
                d = _int_absdiff(rb.astype(np.int64) if rb.dtype.kind == "b" else rb,
                                 ob.astype(np.int64) if ob.dtype.kind == "b" else ob)
                ar = np.abs(rb.astype(np.float64))
            else:
                rf, of = _kept(rb, ob)
                d, ar = np.abs(of - rf), np.abs(rf)
            d, ar = np.ldexp(d, -kd), np.ldexp(ar, -kr)
            dd += float(np.dot(d, d))
            rr += float(np.dot(ar, ar))
    norms = (_ldexp(math.sqrt(dd), kd), _ldexp(math.sqrt(rr), kr))
    ratio = _ratio(math.sqrt(dd), math.sqrt(rr))
    if not 0.0 < ratio < math.inf:
        return (ratio, *norms)
    # a difference beyond the float64 range times the reference's norm: inf
    return (_ldexp(ratio, kd - kr), *norms)


def _ldexp(x: float, k: int) -> float:
    try:
        return math.ldexp(x, k)
    except OverflowError:
        return math.inf


def _scaled_means(r: np.ndarray, o: np.ndarray, block: int) -> tuple[float, float]:
    """Means of |o - r| and of the relative error summed in a scaled domain (a rare second pass)."""
    scale = 2.0**-64
    acc = acc_rel = 0.0
    counted = 0
    with np.errstate(all="ignore"):
        for s in range(0, r.size, block):
            rb, ob = r[s : s + block], o[s : s + block]
            if rb.dtype.kind in "biu" and ob.dtype.kind in "biu":
                d = _int_absdiff(rb.astype(np.int64) if rb.dtype.kind == "b" else rb,
                                 ob.astype(np.int64) if ob.dtype.kind == "b" else ob)
                rf = rb.astype(np.float64)
            else:
                rf, of = _kept(rb, ob)
                d = np.abs(of - rf)
            rel = _rel(d, np.abs(rf))
            counted += d.size
            acc += float((d * scale).sum())
            acc_rel += float((rel * scale).sum())
    return acc / counted / scale, acc_rel / counted / scale


_TINY = 2.0**-900  # sums of squares below this may have lost values to underflow
_HUGE = 2.0**900


def _squares_lost(rr: float, oo: float, dot: float, max_abs: float) -> bool:
    """Whether the unscaled dot products may have overflowed or underflowed (values beyond about
    1e154 or below about 1e-135): then the cosine needs a scaled second pass."""
    if not (math.isfinite(rr) and math.isfinite(oo) and math.isfinite(dot)):
        return True
    if rr > _HUGE or oo > _HUGE:
        return True
    if rr == 0.0 and oo == 0.0 and max_abs == 0.0:
        return False  # identical (zero or underflowing) arrays: cosine 1 either way
    return rr < _TINY or oo < _TINY


def _rel(d: np.ndarray, ar: np.ndarray) -> np.ndarray:
    """|other - ref| / |ref| with 0/0 = 0 and x/0 = inf; an infinite difference is an infinite
    relative error (not inf/inf)."""
    rel = np.divide(d, ar, out=np.zeros_like(d), where=(ar != 0) | (d != 0))
    rel[np.isinf(d)] = np.inf
    return rel


def _kept(rb: np.ndarray, ob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 pairs that enter the statistics: no NaN, no matched Inf."""
    rf, of = _as_float(rb), _as_float(ob)
    keep = ~(np.isnan(rf) | np.isnan(of)) & ~(np.isinf(rf) & (rf == of))
    return rf[keep], of[keep]


def _scaled_dot(r: np.ndarray, o: np.ndarray, block: int) -> tuple[float, float, float]:
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


def _overflow_safe_rel(r: np.ndarray, o: np.ndarray, block: int) -> tuple[float, float]:
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


def _scalar_at(a: np.ndarray, i: int) -> float:
    """``a[i]`` as a float (a complex one by its modulus unless it is real), without the numpy
    scalar in between."""
    v = a.item(i)
    if isinstance(v, complex):
        return v.real if v.imag == 0 else abs(v)
    return float(v)
