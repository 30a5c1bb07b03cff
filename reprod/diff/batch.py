"""The batch path: thousands of small keys of two mapped dumps in one kernel call.

A dump of thousands of small keys spent most of its time around the statistics (viewing two
arrays, a kernel call, a result object per key). Here the plain cases (two float32/float64 arrays
of one shape, both viewable in place in two mapped dumps) are described by byte offsets and
computed in one call of the compiled kernel (``stats_many``), split over two threads. Anything
unusual (NaN, Inf, sums that overflow, Fortran order, loaders, bf16) is left to the per-key path,
which gives identical results (``tests/diff/test_batch_paths.py`` checks every field).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .. import _native
from .. import messages as msg
from ..storage.lazy import Dump
from . import metrics
from .criteria import Criteria
from .pairing import Pair, dtype_name
from .progress import Progress
from .result import KeyResult
from .verdict import judged

__all__ = ["compare_batch", "unravel"]

# Keys up to this many elements go through the batch; larger ones through compute_stats, whose
# chunks run on several threads and report progress as they go.
_BATCH_MAX = 1 << 16
_BATCH_KINDS = {np.dtype(np.float32): 0, np.dtype(np.float64): 2}
_NO_CHECK = (0, -1, 0)  # a job's (start, length, CRC32) when its member needs no check


def compare_batch(pairs: Sequence[Pair], policy: Criteria, *, bar: Optional[Progress]
                   ) -> list[Optional[KeyResult]]:
    """The results of the pairs the batch kernel can take, ``None`` for the others.

    A dump of thousands of small keys spent most of its time around the statistics (viewing two
    arrays, a kernel call, a Stats object per key): here the plain cases (two float32/float64
    arrays of one shape, both viewable in place in two mapped dumps) are described by offsets and
    computed in one kernel call. Anything unusual (NaN, Inf, values where the sums overflow,
    Fortran order...) returns ``None`` and takes the general path, so results are identical.
    """
    out: list[Optional[KeyResult]] = [None] * len(pairs)
    kernel = _native.kernel()
    if kernel is None or not pairs:
        return out
    ref_mf = other_mf = None
    todo: list[tuple[int, Pair, Any, Any, int, Optional[float], Optional[float]]] = []
    checks: list[tuple[int, int, int]] = []  # (row, side, member start) verified by the kernel
    jobs: list[int] = []
    tols: list[float] = []
    kinds = _BATCH_KINDS
    # the members' CRC checks (small .npz members, as Dump.__getitem__ does them) go into the
    # kernel call too: each member is checksummed just before its statistics, while in cache
    for i, p in enumerate(pairs):
        rt, ot = p.ref_tree, p.other_tree
        if p.kind != "leaf" or type(rt) is not Dump or type(ot) is not Dump:
            continue
        leaf = p.path[-1]
        rs, os_ = rt.in_file(leaf), ot.in_file(leaf)
        if rs is None or os_ is None:
            continue
        shape = rs.shape
        rk, ok = kinds.get(rs.dtype), kinds.get(os_.dtype)
        if rk is None or ok is None or shape != os_.shape or (len(shape) > 1 and (rs.fortran or os_.fortran)):
            continue
        n = math.prod(shape)
        if not 0 < n <= _BATCH_MAX:
            continue
        if ref_mf is None:
            ref_mf, other_mf = rt.mapped_file, ot.mapped_file
        if rt.mapped_file is not ref_mf or ot.mapped_file is not other_mf:
            continue
        assert ref_mf is not None and other_mf is not None
        if rs.offset + n * rs.dtype.itemsize > ref_mf.size or os_.offset + n * os_.dtype.itemsize > other_mf.size:
            continue  # a truncated file: the general path raises the error that names it
        key = p.key
        a, r = policy.tolerance_for(key, dtype_name(rs.dtype), dtype_name(os_.dtype))
        check_close = a is not None or r is not None
        rc, oc = rt.pending_check(rs), ot.pending_check(os_)
        if rc is not None:
            checks.append((len(todo), 0, rc[0]))
        if oc is not None:
            checks.append((len(todo), 1, oc[0]))
        todo.append((i, p, rs, os_, n, a, r))
        jobs += (rs.offset, os_.offset, n, rk + (ok >> 1), check_close, *(rc or _NO_CHECK),
                 *(oc or _NO_CHECK))
        tols += (float(a or 0.0), float(r or 0.0))
    if not todo:
        return out
    assert ref_mf is not None and other_mf is not None
    m = len(todo)
    rows = np.empty((m, len(metrics.ROW_COLUMNS)))
    job_rows = np.array(jobs, dtype=np.int64).reshape(m, -1)
    tol_rows = np.array(tols).reshape(m, 2)
    args = (metrics.BLOCK, policy.equal_nan)
    rb, ob = ref_mf.buffer(), other_mf.buffer()
    if metrics.threads() > 1 and m >= 64:
        # the kernel releases the GIL: a second core takes the second half of the rows
        h = m // 2
        late = metrics.executor().submit(kernel.stats_many, rb, ob, job_rows[h:], tol_rows[h:],
                                          rows[h:], *args)
        kernel.stats_many(rb, ob, job_rows[:h], tol_rows[:h], rows[:h], *args)
        late.result()
    else:
        kernel.stats_many(rb, ob, job_rows, tol_rows, rows, *args)
    col = metrics.COL
    crc_ok = (rows[:, col["crc_ref"]] != 0.0) & (rows[:, col["crc_other"]] != 0.0)  # -1: unchecked
    if checks:
        if not crc_ok.all():
            checks = [c for c in checks if crc_ok[c[0]]]
        # every Dump of one side (nested ones too) shares that side's mapped file and its record
        ref_mf.verified.update(c[2] for c in checks if c[1] == 0)
        other_mf.verified.update(c[2] for c in checks if c[1] == 1)
    # rows _finish would give a second pass, or whose CRC failed (the general path raises the
    # error naming the key), go the general way
    plain, table = metrics.finish_rows(rows, np.array([t[4] for t in todo], dtype=np.float64))
    plain &= crc_ok
    for (i, p, rs, os_, n, a, r), ok, (*stats, worst, worst_ref, worst_other, mismatched) \
            in zip(todo, plain.tolist(), table.tolist()):
        if not ok:
            continue
        out[i] = _finite_result(p, policy, n, a, r, stats, unravel(int(worst), rs.shape),
                                worst_ref, worst_other,
                                int(mismatched) if (a is not None or r is not None) else None, rs, os_)
        if bar is not None:
            bar.advance(n * (rs.dtype.itemsize + os_.dtype.itemsize))
    return out


def unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``np.unravel_index(flat, shape)`` as ints; for the few dimensions of a key, plain integer
    arithmetic costs less than the numpy call (and than the statistics of a 1 KiB key)."""
    if len(shape) == 1:
        return (flat,)
    idx = []
    for s in reversed(shape):
        flat, q = divmod(flat, s)
        idx.append(q)
    return tuple(reversed(idx))


def _finite_result(p: Pair, policy: Criteria, n: int, atol: Optional[float], rtol: Optional[float],
                   stats: tuple[float, ...], worst_index: tuple[int, ...], worst_ref: float,
                   worst_other: float, mismatched: Optional[int], rs: Any, os_: Any) -> KeyResult:
    """The result of a batched pair (finite values, one shape), built as _compare_pair builds it."""
    key = p.key
    thresholds = policy.thresholds_for(key)
    rdt, odt = dtype_name(rs.dtype), dtype_name(os_.dtype)
    mean_abs, max_abs, min_abs, mean_rel, max_rel, cosine, rel_l2, max_scaled = stats
    values = {"mean_abs": mean_abs, "max_abs": max_abs, "min_abs": min_abs, "mean_rel": mean_rel,
              "max_rel": max_rel, "cosine": cosine, "rel_l2": rel_l2, "max_scaled": max_scaled}
    status, reason, checks = judged(values, thresholds, mismatched=mismatched, size=n, atol=atol,
                                     rtol=rtol, worst_index=worst_index, worst_ref=worst_ref,
                                     worst_other=worst_other)
    # every field, in declaration order (tests/diff/test_batch_paths.py checks both)
    return KeyResult._from_fields({
        "key": key, "passed": status == "passed", "status": status, "reason": reason,
        "path": p.path, "ref_shape": rs.shape, "other_shape": os_.shape, "ref_dtype": rdt,
        "other_dtype": odt, "size": n, "mean_abs": mean_abs, "max_abs": max_abs,
        "min_abs": min_abs, "mean_rel": mean_rel, "max_rel": max_rel, "cosine": cosine,
        "rel_l2": rel_l2, "max_scaled": max_scaled, "noise_multiple": None, "noise_l2": None,
        "noise_max": None, "worst_index": worst_index, "worst_ref": worst_ref, "worst_other": worst_other,
        "mismatched": mismatched, "ref_nan": 0, "ref_inf": 0, "other_nan": 0, "other_inf": 0,
        "methods": tuple(thresholds) or policy.methods, "thresholds": thresholds,
        "checks": checks, "atol": atol, "rtol": rtol,
        "note": None if rdt == odt else msg.note_dtypes(rdt, odt),
    })


