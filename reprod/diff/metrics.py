"""Every statistic of one array pair, computed in one block-wise pass with float64 accumulation.

Peak extra memory is a few blocks per thread, whatever the tensor size: |other - ref| is never
materialised for a whole tensor. Integers are compared exactly (no wrap-around), NaN and Inf are
counted on each side and never hidden by a statistic.

Large arrays are cut into chunks that a small thread pool works on together (the compiled kernel
and numpy both release the GIL); the partial statistics of the chunks are merged in chunk order, so
the result does not depend on how many threads ran. Real float32/float64 pairs go through the
compiled kernel (``reprod._native``) when it is built, else through the numpy path below; both
give the same statistics to float64 rounding (``tests/diff/test_metrics_blocks.py``).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .. import _native
from . import second_pass as sp
from .numpy_path import numpy_chunk
from .partial import COL, FIELDS, ROW_COLUMNS, Options, Partial

__all__ = ["Stats", "compute_stats", "finish_rows", "BLOCK", "CHUNK", "ROW_COLUMNS", "COL",
           "kernel_available", "set_threads"]

# Elements per block. The numpy path's float64 scratch buffers of a block stay in L2, and its
# np.dot calls stay below OpenBLAS's 10,000-element threshold for threading: above it each dot
# wakes the BLAS threads and a 16K block ran 7x slower on 2 busy cores (benchmarks/README.md).
BLOCK = 1 << 13
# Elements per chunk, the unit of work of one thread. Measured on 2 x 2 GiB float32 with two
# threads: 64K elements 0.64 s, 256K 0.50 s, 1M 0.45 s, 4M 0.44 s (fewer hand-offs, longer
# sequential runs for the prefetcher and the page-fault-around); 1M still splits a 4 MiB key.
CHUNK = 1 << 20

_KERNEL_CODES = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}


def kernel_available() -> bool:
    """Whether float32/float64 pairs go through the compiled kernel (``REPROD_KERNEL=0`` disables it)."""
    return _native.kernel() is not None


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


def _kernel_chunk(r: np.ndarray, o: np.ndarray, lo: int, hi: int, opt: Options) -> Partial:
    out = _native.built().stats(r[lo:hi], _KERNEL_CODES[r.dtype], o[lo:hi], _KERNEL_CODES[o.dtype],
                        opt.block, opt.check_close, opt.atol, opt.rtol, opt.equal_nan)
    return Partial.from_tuple(out, lo)


# --- threads ---------------------------------------------------------------------------------------


def _default_threads() -> int:
    """``REPROD_THREADS``: a number, or ``auto`` (every CPU this process may use); unset, the CPUs
    this process may use, at most 8. Anything else is ignored with a warning (it is read at
    import, where an exception would make ``import reprod`` fail)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        n = os.cpu_count() or 1
    env = os.environ.get("REPROD_THREADS", "").strip()
    if env:
        if env.lower() == "auto":
            return max(1, n)
        try:
            return max(1, int(env))
        except ValueError:
            import warnings

            warnings.warn(f"REPROD_THREADS={env[:40]!r} is neither a number nor 'auto'; ignored",
                          RuntimeWarning, stacklevel=2)
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


def threads() -> int:
    """How many threads a large comparison uses (``set_threads``, ``REPROD_THREADS``)."""
    return _threads


def executor() -> Any:
    """The helper threads of this process (``threads() - 1`` of them, started as work comes):
    ``executor().submit(fn, *args)`` runs ``fn(*args)`` on one; ``.result()`` of what it returns
    waits for it and returns its value or raises its exception."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _Workers(_threads - 1)
        return _pool


# What ThreadPoolExecutor did for the two callers (submit, result, shutdown(wait=False), threads
# joined at exit), without importing concurrent.futures: with logging, ~5 ms of every
# ``reprod-diff`` on small dumps, whose batch hands half of its rows to a second thread.


class _Future:
    __slots__ = ("_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: Optional[BaseException] = None

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Workers:
    def __init__(self, n: int) -> None:
        self._n = n
        self._cond = threading.Condition(threading.Lock())
        self._work: collections.deque[tuple[_Future, Callable[..., Any], tuple[Any, ...]]] = \
            collections.deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Future:
        fut = _Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self._work.append((fut, fn, args))
            if len(self._work) > self._idle and len(self._threads) < self._n:
                t = threading.Thread(target=self._serve, name=f"reprod-stats_{len(self._threads)}",
                                     daemon=True)  # joined at exit (_join_at_exit) all the same
                t.start()
                self._threads.append(t)
                _live_threads.add(t)
            else:
                self._cond.notify()
        return fut

    def shutdown(self, wait: bool = True) -> None:
        """No new work; the threads finish what was submitted, then end (``wait``: this returns
        then)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        if wait:
            me = threading.current_thread()
            for t in threads:
                if t is not me:
                    t.join()

    def _serve(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._work and not self._closed:
                        self._idle += 1
                        try:
                            self._cond.wait()
                        finally:
                            self._idle -= 1
                    if not self._work:
                        return
                    fut, fn, args = self._work.popleft()
                try:
                    fut._value = fn(*args)
                except BaseException as exc:
                    fut._error = exc
                fut._done.set()
                del fut, fn, args  # the arrays are not kept until the next piece of work
        finally:
            _live_threads.discard(threading.current_thread())


_exiting = False
_live_threads: set[threading.Thread] = set()


def _join_at_exit() -> None:
    """Before the interpreter exits: no new work, and the helper threads finish theirs."""
    global _exiting
    with _pool_lock:
        _exiting = True
        if _pool is not None:
            _pool.shutdown(wait=False)
    for t in list(_live_threads):
        t.join()


def _forget_in_child() -> None:
    # a forked child has none of the parent's threads: a fresh pool (a copied one would queue work
    # for threads that do not exist), and a fresh lock (another thread may have held it)
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()
    _live_threads.clear()


try:  # where ThreadPoolExecutor joins its threads: before the non-daemon ones are waited for
    threading._register_atexit(_join_at_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - a Python without it, or exiting
    pass
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _run_chunks(work: Callable[[int, int], Partial], n: int, chunk: int,
                on_progress: Optional[Callable[[int], None]]) -> Partial:
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if len(bounds) == 1 or _threads == 1:
        total = Partial()
        for lo, hi in bounds:
            total.merge(work(lo, hi))
            if on_progress is not None:
                on_progress(hi - lo)
        return total
    parts: list[Optional[Partial]] = [None] * len(bounds)
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

    helpers = [executor().submit(worker) for _ in range(min(_threads, len(bounds)) - 1)]
    worker()  # the calling thread works too
    for f in helpers:
        f.result()
    total = Partial()
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
    kernel = _native.kernel()
    r_code = _KERNEL_CODES.get(r_flat.dtype) if kernel is not None else None
    o_code = _KERNEL_CODES.get(o_flat.dtype) if r_code is not None else None
    use_kernel = o_code is not None
    if use_kernel:
        # a reshape(-1) that could not be a view already copied; a strided 1-D view is copied here
        if not r_flat.flags.c_contiguous:
            r_flat = np.ascontiguousarray(r_flat)
        if not o_flat.flags.c_contiguous:
            o_flat = np.ascontiguousarray(o_flat)
        if n <= CHUNK:  # most keys of a dump: one call, no thread hand-off
            values = kernel.stats(r_flat, r_code, o_flat, o_code, block, check_close, a_tol,  # type: ignore[union-attr]
                                  r_tol, equal_nan)
            if on_progress is not None:
                on_progress(n)
            return _finish(n, values, r_flat, o_flat, check_close, block)
    opt = Options(check_close=check_close, atol=a_tol, rtol=r_tol, equal_nan=equal_nan, block=block)
    chunk = max(1, CHUNK // block) * block  # whole blocks, so the block grid is the same
    if use_kernel:
        def work(lo: int, hi: int) -> Partial:
            return _kernel_chunk(r_flat, o_flat, lo, hi, opt)
    else:
        def work(lo: int, hi: int) -> Partial:
            return numpy_chunk(r_flat, o_flat, lo, hi, opt)

    p = _run_chunks(work, n, chunk, on_progress)
    return _finish(n, tuple(getattr(p, f) for f in FIELDS), r_flat, o_flat, check_close, block)


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
        mean_abs, mean_rel = sp.scaled_means(r, o, block)
        if math.isfinite(max_abs):
            st.mean_abs = mean_abs
        if math.isfinite(max_rel):
            st.mean_rel = mean_rel
    if math.isinf(max_abs) and inf_unmatched == 0:
        # two finite values more than the float64 maximum apart: |o - r| rounds to inf (right for
        # the absolute statistics) but the relative error is finite; recompute it without overflow.
        # NaNs, excused or not, enter no statistic (hypothesis found the maximum against its
        # negative among NaNs compared with equal_nan=False reading inf)
        st.mean_rel, st.max_rel = sp.overflow_safe_rel(r, o, block)
    st.max_scaled = sp.ratio(float(max_abs), float(max_ref))
    st.ref_max = float(max_ref)
    if sp.squares_lost(dd, rr, 0.0, max_abs) and not (dd == 0.0 and max_abs == 0.0):
        st.rel_l2, st.diff_l2, st.ref_l2 = sp.scaled_rel_l2(r, o, block, float(max_abs), float(max_ref))
    else:
        st.diff_l2, st.ref_l2 = math.sqrt(dd), math.sqrt(rr)
        st.rel_l2 = sp.ratio(st.diff_l2, st.ref_l2)
    if sp.squares_lost(rr, oo, dot, max_abs):
        dot, rr, oo = sp.scaled_dot(r, o, block)
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
    """``_finish`` for many pairs at once, from rows of the kernel's ``stats_many`` (the fields of
    ``FIELDS``, then the ref and other values at the worst position): a mask of the rows that
    need nothing else (every element counted, no sum that overflowed, no lost square; the others
    need ``_finish``'s second passes), and per row mean_abs, max_abs, min_abs, mean_rel, max_rel,
    cosine, worst position, worst ref, worst other, mismatched."""
    counted, total, total_rel, dot, rr, oo, max_abs = rows[:, :7].T
    dd, max_ref = rows[:, COL["dd"]], rows[:, COL["max_ref"]]
    with np.errstate(all="ignore"):
        finite = np.isfinite(rr) & np.isfinite(oo) & np.isfinite(dot) & np.isfinite(dd)
        zero = (rr == 0.0) & (oo == 0.0) & (max_abs == 0.0)
        tiny = (rr < sp.TINY) | (oo < sp.TINY) | ((dd < sp.TINY) & (max_abs > 0.0))
        lost = ~finite | (rr > sp.HUGE) | (oo > sp.HUGE) | (dd > sp.HUGE) | (~zero & tiny)
        plain = (counted == sizes) & (total < math.inf) & (total_rel < math.inf) & \
            (max_abs < math.inf) & ~lost
        cosine = np.where((rr == 0.0) & (oo == 0.0), 1.0, np.where(
            (rr > 0.0) & (oo > 0.0), np.clip(dot / (np.sqrt(rr) * np.sqrt(oo)), -1.0, 1.0), 0.0))
        rel_l2 = sp.ratios(np.sqrt(dd), np.sqrt(rr))
        max_scaled = sp.ratios(max_abs, max_ref)
        c = COL
        table = np.column_stack([total / sizes, max_abs, rows[:, c["min_abs"]], total_rel / sizes,
                                 rows[:, c["max_rel"]], cosine, rel_l2, max_scaled,
                                 rows[:, c["worst"]], rows[:, c["worst_ref"]],
                                 rows[:, c["worst_other"]], rows[:, c["mismatched"]]])
    return plain, table


def _scalar_at(a: np.ndarray, i: int) -> float:
    """``a[i]`` as a float (a complex one by its modulus unless it is real), without the numpy
    scalar in between."""
    v = a.item(i)
    if isinstance(v, complex):
        if v.imag == 0:
            return v.real
        # abs(v) raises OverflowError for components near the float64 limit; hypot gives inf
        return math.hypot(v.real, v.imag)
    return float(v)

