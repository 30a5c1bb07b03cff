"""The batch path: thousands of small keys of two mapped dumps in one kernel call.

A dump of thousands of small keys spent most of its time around the statistics (viewing two
arrays, a kernel call, a result object per key). Here the plain cases (two float32/float64 arrays
of one shape, both viewable in place in two mapped dumps) are described by byte offsets and
computed in one call of the compiled kernel (``stats_many``), split over two threads; single
numbers of reprod_log files (pickled ints and floats, numpy scalars) go in a second call, from
their values. Anything unusual (NaN, Inf, sums that overflow, Fortran order, other loaders, bf16)
is left to the per-key path, which gives identical results (``tests/diff/test_batch_paths.py``
and ``tests/diff/test_many_keys.py`` check every field). Results are ``RowKeyResult``s: their
fields are built from the kernel's rows when read.
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .. import _native
from .. import messages as msg
from ..storage.lazy import REMEMBER_VERIFIED, ArraySpec, Dump
from . import metrics
from .criteria import Criteria
from .pairing import Pair, dtype_name
from .progress import Progress
from .result import _FIELD_NAMES, STAT_OF_METHOD, KeyResult, RowKeyResult
from .verdict import judge, judged

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
    scalars = _Scalars()
    # the members' CRC checks (small .npz members, as Dump.__getitem__ does them) go into the
    # kernel call too: each member is checksummed just before its statistics, while in cache
    for i, p in enumerate(pairs):
        rt, ot = p.ref_tree, p.other_tree
        if p.kind != "leaf" or type(rt) is not Dump or type(ot) is not Dump:
            continue
        leaf = p.path[-1]
        rs, os_ = rt.in_file(leaf), ot.in_file(leaf)
        if rs is None or os_ is None:
            if rs is None and os_ is None:
                _scalar_job(i, p, rt, ot, leaf, policy, scalars)
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
        if rc is not None and rc[1] >= REMEMBER_VERIFIED:
            checks.append((len(todo), 0, rc[0]))
        if oc is not None and oc[1] >= REMEMBER_VERIFIED:
            checks.append((len(todo), 1, oc[0]))
        todo.append((i, p, rs, os_, n, a, r))
        jobs += (rs.offset, os_.offset, n, rk + (ok >> 1), check_close, *(rc or _NO_CHECK),
                 *(oc or _NO_CHECK))
        tols += (float(a or 0.0), float(r or 0.0))
    if not todo and not scalars.todo:
        return out
    rows = np.empty((0, len(metrics.ROW_COLUMNS)))
    if todo:
        assert ref_mf is not None and other_mf is not None
        rows = _stats_many(kernel, ref_mf.buffer(), other_mf.buffer(), jobs, tols, policy)
    if scalars.todo:
        # numbers a reprod_log file holds as pickle ints/floats or numpy scalars: their values,
        # in float64 (exact: ints beyond 2**53 stay on the per-key path), as two small buffers
        srows = _stats_many(kernel, np.array(scalars.ref), np.array(scalars.other), scalars.jobs,
                            scalars.tols, policy)
        rows = np.concatenate([rows, srows])
        todo += scalars.todo
    col = metrics.COL
    crc_ok = (rows[:, col["crc_ref"]] != 0.0) & (rows[:, col["crc_other"]] != 0.0)  # -1: unchecked
    if checks:
        assert ref_mf is not None and other_mf is not None
        if not crc_ok.all():
            checks = [c for c in checks if crc_ok[c[0]]]
        # every Dump of one side (nested ones too) shares that side's mapped file and its record
        ref_mf.verified.update(c[2] for c in checks if c[1] == 0)
        other_mf.verified.update(c[2] for c in checks if c[1] == 1)
    # rows _finish would give a second pass, or whose CRC failed (the general path raises the
    # error naming the key), go the general way
    plain, table = metrics.finish_rows(rows, np.array([t[4] for t in todo], dtype=np.float64))
    plain &= crc_ok
    keep = np.flatnonzero(plain)
    if not len(keep):
        return out
    rows_kept = [todo[j] for j in keep.tolist()]
    window = _Window(policy, [t[1].key for t in rows_kept],
                     {j: t[1].path for j, t in enumerate(rows_kept)
                      if len(t[1].path) != 1 or t[1].path[0] != t[1].key},
                     _Coded([(t[2].shape, t[2].dtype, t[3].shape, t[3].dtype) for t in rows_kept]),
                     [t[5] is not None or t[6] is not None for t in rows_kept], table[keep])
    idx = _INDICES
    for j, (i, _p, rs, os_, n, _a, _r) in enumerate(rows_kept):
        out[i] = RowKeyResult._at(window, idx[j] if j < _N_INDICES else j)
        if bar is not None:
            bar.advance(n * (rs.dtype.itemsize + os_.dtype.itemsize))
    return out


# the statistics' columns of finish_rows' table, by the name a method judges
_TABLE_COL = {"mean_abs": 0, "max_abs": 1, "min_abs": 2, "mean_rel": 3, "max_rel": 4, "cosine": 5,
              "rel_l2": 6, "max_scaled": 7}


_STATUS_WORDS = ("passed", "mismatch", "failed")
# a fields dict's values after key, passed and status (a row's own), in declaration order
_ROW_FIELDS = operator.itemgetter(*_FIELD_NAMES[3:])
_METHODS = operator.itemgetter("thresholds", "checks")
# a layout's ref shape, ref dtype, other shape, other dtype
_ITEM0, _ITEM1, _ITEM2, _ITEM3 = map(operator.itemgetter, range(4))


def _braces(text: str) -> str:
    """``text`` as the literal part of a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")
# a window's row numbers, one int object each for every window: a result holds its row's, and
# a fresh int per key is 28 bytes of a million-key comparison's ~80 a key
_N_INDICES = 4096
_INDICES = tuple(range(_N_INDICES))


_N_COLS = 12  # finish_rows' table: the 8 statistics, worst index, worst values, mismatched
_ROWS_PER_BLOCK = 4  # 384 bytes: under the 512 that Python's small-object allocator takes
_ROW = struct.Struct(f"={_N_COLS}d")  # one row of a block, as the table's float64s (native order)


class _Coded:
    """A list of values that repeat (a window's statuses, its keys' shapes and dtypes) as one byte
    each, indexing the distinct values; a plain list where there are more than 256 of those."""

    __slots__ = ("values", "codes")

    def __init__(self, items: list[Any]) -> None:
        index: dict[Any, int] = {}
        codes = [index.setdefault(v, len(index)) for v in items]
        if len(index) <= 256:
            self.values: Any = tuple(index)
            self.codes: Any = bytes(codes)
        else:
            self.values, self.codes = items, None

    @classmethod
    def of_codes(cls, values: tuple[Any, ...], codes: np.ndarray) -> _Coded:
        """The coded list whose j-th item is ``values[codes[j]]``."""
        if len(values) > 256:
            return cls([values[c] for c in codes.tolist()])
        obj = object.__new__(cls)
        obj.values, obj.codes = values, codes.astype(np.uint8).tobytes()
        return obj

    def __getitem__(self, j: int) -> Any:
        codes = self.codes
        return self.values[j] if codes is None else self.values[codes[j]]

    def __len__(self) -> int:
        return len(self.values) if self.codes is None else len(self.codes)


class _Window:
    """The batched keys of one kernel call, as their ``RowKeyResult``s read them: key and status
    now (the verdict needs no words), every other field built from the row when asked for (the
    last one built is kept: a renderer reads a key's fields one after another). Per key it holds
    the key, its status and its shapes and dtypes as one byte each (codes into a few shared
    values; not the dumps' specs, which the engine drops once a window is compared), its row
    (96 bytes) and its path where that is not ``(key,)``. A million keys held ~150 bytes each
    here, most of it in memory asked of the system while the released specs' memory sat free."""

    __slots__ = ("policy", "table", "keys", "paths", "layouts", "statuses", "_last")

    def __init__(self, policy: Criteria, keys: list[str], paths: dict[int, tuple[str, ...]],
                 layouts: _Coded, close: Any, table: np.ndarray) -> None:
        """``keys``, ``layouts`` ((ref shape, ref dtype, other shape, other dtype)) and ``close``
        (whether the key has an atol/rtol rule) per row of ``table`` (``finish_rows``'); ``paths``
        the rows whose path is not ``(key,)``."""
        self.policy = policy
        self.table = table
        self.keys = keys
        self.paths = paths
        self.layouts = layouts
        self.statuses = _Coded(self._statuses(close))
        # kept as blocks of _ROWS_PER_BLOCK rows, each a bytes object small enough for Python's
        # own allocator: they fill the memory the engine frees as it drops the dumps' specs,
        # where one numpy table per window asked the system for new memory (96 bytes a key)
        step = _ROWS_PER_BLOCK * table.shape[1] * 8
        raw = table.tobytes()
        self.table = [raw[k : k + step] for k in range(0, len(raw), step)]
        self._last: tuple[int, dict[str, Any]] = (-1, {})

    def _statuses(self, close: list[bool]) -> list[str]:
        """``verdict.judge`` of every row: vectorized where every key has the run's thresholds."""
        policy, table = self.policy, self.table
        mism = np.array(close, dtype=bool) & (table[:, 11] > 0)
        if policy.per_key:
            out = []
            for key, row, m in zip(self.keys, table[:, :8].tolist(), mism.tolist()):
                values = dict(zip(_TABLE_COL, row))
                out.append(judge(values, policy.thresholds_for(key), mismatched=m)[0])
            return out
        ok = np.ones(len(close), dtype=bool)
        with np.errstate(invalid="ignore"):
            for m, t in policy.thresholds_for("").items():
                c = _TABLE_COL.get(STAT_OF_METHOD[m])
                if c is not None:  # a statistic the batch has not (noise): None, which passes
                    col = table[:, c]
                    ok &= ~((col > t) | (col != col))
        # the three words themselves, not one new str per key from numpy
        code = np.where(ok & ~mism, 0, np.where(ok, 1, 2)).tolist()
        return [_STATUS_WORDS[c] for c in code]

    def fields(self, j: int) -> dict[str, Any]:
        last = self._last
        if last[0] == j:
            return last[1]
        key, layout = self.keys[j], self.layouts[j]
        path = self.paths.get(j) or (key,)
        shape = layout[0]
        a, r = self.policy.tolerance_for(key, dtype_name(layout[1]), dtype_name(layout[3]))
        block, at = divmod(j, _ROWS_PER_BLOCK)
        *stats, worst, worst_ref, worst_other, mismatched = _ROW.unpack_from(self.table[block],
                                                                             at * _ROW.size)
        d = _finite_fields(key, path, self.policy, math.prod(shape), a, r, stats,
                           unravel(int(worst), shape), worst_ref, worst_other,
                           int(mismatched) if (a is not None or r is not None) else None, layout)
        self._last = (j, d)
        return d

    def _shared_thresholds(self) -> Optional[dict[str, float]]:
        """The thresholds every key of the window has (no per-key rule), where each method's
        statistic is a column of the table; else None (each row as ``fields`` builds it)."""
        policy = self.policy
        if policy.per_key:
            return None
        thresholds = policy.thresholds_for("")
        if not all(STAT_OF_METHOD.get(m) in _TABLE_COL for m in thresholds):
            return None
        return thresholds

    def method_columns(self, start: int, stop: int) -> tuple[list[Any], list[Any]]:
        """``columns``' thresholds and checks alone (a CSV's columns are read from every key's
        methods before its rows are written)."""
        thresholds = self._shared_thresholds()
        if thresholds is None:
            rows = [_METHODS(self.fields(j)) for j in range(start, stop)]
            return [r[0] for r in rows], [r[1] for r in rows]
        statuses = self.statuses
        codes = statuses.codes
        status = (statuses.values[start:stop] if codes is None
                  else map(statuses.values.__getitem__, codes[start:stop]))
        checks = dict.fromkeys(thresholds, True)  # a passing key's: every check passed
        return [thresholds] * (stop - start), [
            checks if s == "passed" else self.fields(j)["checks"]
            for j, s in zip(range(start, stop), status)]

    def _dtype_fields(self, rd: np.dtype, od: np.dtype) -> tuple[Any, ...]:
        """What a passing key's fields hold for its two dtypes: their names, atol, rtol, whether
        there is an element-wise rule, the note, the reason's atol/rtol clause."""
        rdt, odt = dtype_name(rd), dtype_name(od)
        a, r = self.policy.tolerance_for("", rdt, odt)
        close = a is not None or r is not None
        return (rdt, odt, a, r, close, None if rdt == odt else msg.note_dtypes(rdt, odt),
                f"; all elements within atol={a or 0:g}, rtol={r or 0:g}" if close else "")

    def columns(self, start: int, stop: int) -> list[list[Any]]:
        """The fields of rows ``start:stop`` as one list per KeyResult field (declaration order):
        ``[[fields(j)[name] for j in rows] for name in fields]``, with ``key``, ``passed`` and
        ``status`` as the rows' own (a ``RowKeyResult``'s properties). A writer of a million
        keys spent ~9 us a key in ``fields`` (a dict, a reason, a judge, four dtype names);
        here what a window's keys share (layouts, thresholds, tolerances, the passing keys'
        checks) is worked out once and the rest a column at a time. Objects equal to a
        ``fields`` value may be shared between rows (one thresholds dict, one shape tuple):
        readers must not change them. Rows not passing, or any run with per-key rules, take
        ``fields`` itself (``tests/diff/test_batch_paths.py`` compares the two)."""
        keys = self.keys[start:stop]
        n = len(keys)
        statuses = self.statuses
        codes = statuses.codes
        status = list(statuses.values[start:stop] if codes is None
                      else map(statuses.values.__getitem__, codes[start:stop]))
        passed = list(map("passed".__eq__, status))
        policy = self.policy
        thresholds = self._shared_thresholds()
        if thresholds is None or not n:
            # a rule may name any key (its thresholds and tolerances are the key's own), or a
            # method the batch has no column for: every row as fields builds it
            rows = [(k, p, s, *_ROW_FIELDS(self.fields(j)))
                    for j, k, p, s in zip(range(start, stop), keys, passed, status)]
            return [list(c) for c in zip(*rows)] if rows else [[] for _ in _FIELD_NAMES]
        paths = self.paths
        path = [paths.get(j) or (k,) for j, k in zip(range(start, stop), keys)] if paths \
            else list(zip(keys))
        layouts = self.layouts
        lcodes = layouts.codes
        layout = list(layouts.values[start:stop] if lcodes is None
                      else map(layouts.values.__getitem__, lcodes[start:stop]))
        # what _finite_fields derives from a layout (no per-key rule here): from its shapes, a
        # column at a time (a window of keys of many shapes has about as many layouts); from its
        # pair of dtypes, once per pair (a window has one or a few)
        ref_shape = list(map(_ITEM0, layout))
        other_shape = list(map(_ITEM2, layout))
        size = list(map(math.prod, ref_shape))
        rdts, odts = list(map(_ITEM1, layout)), list(map(_ITEM3, layout))
        if len(set(map(id, rdts))) == 1 and len(set(map(id, odts))) == 1:
            (rdt_col, odt_col, atol, rtol, close, note, within) = (
                [v] * n for v in self._dtype_fields(rdts[0], odts[0]))
        else:
            by_pair: dict[tuple[int, int], tuple[Any, ...]] = {}
            for rd, od in zip(rdts, odts):
                if (id(rd), id(od)) not in by_pair:
                    by_pair[(id(rd), id(od))] = self._dtype_fields(rd, od)
            (rdt_col, odt_col, atol, rtol, close, note, within) = (list(c) for c in zip(
                *map(by_pair.__getitem__, zip(map(id, rdts), map(id, odts)))))
        b0, b1 = start // _ROWS_PER_BLOCK, (stop - 1) // _ROWS_PER_BLOCK + 1
        block = np.frombuffer(b"".join(self.table[b0:b1]), dtype=np.float64).reshape(-1, _N_COLS)
        off = start - b0 * _ROWS_PER_BLOCK
        (mean_abs, max_abs, min_abs, mean_rel, max_rel, cosine, rel_l2, max_scaled, worst,
         worst_ref, worst_other, mism) = block[off : off + n].T.tolist()
        stats = (mean_abs, max_abs, min_abs, mean_rel, max_rel, cosine, rel_l2, max_scaled)
        if set(map(len, ref_shape)) == {1}:
            worst_index = list(zip(map(int, worst)))
        else:
            worst_index = [(int(w),) if len(s) == 1 else unravel(int(w), s)
                           for w, s in zip(worst, ref_shape)]
        mismatched = [int(m) if c else None for m, c in zip(mism, close)] if any(close) \
            else [None] * n
        # a passing key's reason: "<method> <value> <= <threshold>" per method (fmt_num of a value
        # at or under its threshold: never NaN, so its ".3e" text), then the atol/rtol clause
        if thresholds:
            stat_cols = [_TABLE_COL[STAT_OF_METHOD[m]] for m in thresholds]
            template = "; ".join(
                f"{_braces(m)} {{{i}:.3e}} <= {_braces(msg._fmt_threshold(t))}"
                for i, (m, t) in enumerate(thresholds.items()))
            reason = list(map(template.format, *(stats[c] for c in stat_cols)))  # type: ignore[index]
        else:
            reason = ["compared (no statistic checked)"] * n
        if any(close):
            reason = list(map(str.__add__, reason, within))
        methods = tuple(thresholds) or policy.methods
        checks = dict.fromkeys(thresholds, True)
        none, zero = [None] * n, [0] * n
        out = [keys, passed, status, reason, path, ref_shape, other_shape, rdt_col, odt_col, size,
               *stats, none, none[:], none[:], worst_index, worst_ref, worst_other, mismatched, zero,
               zero[:], zero[:], zero[:], [methods] * n, [thresholds] * n, [checks] * n, atol,
               rtol, note]
        if not all(passed):
            # failing keys (a few in a run): their reasons and checks as fields words them
            for i, p in enumerate(passed):
                if not p:
                    for c, v in zip(out[3:], _ROW_FIELDS(self.fields(start + i))):
                        c[i] = v
        return out


def _stats_many(kernel: Any, rb: Any, ob: Any, jobs: list[int], tols: list[float],
                policy: Criteria) -> np.ndarray:
    m = len(tols) // 2
    rows = np.empty((m, len(metrics.ROW_COLUMNS)))
    job_rows = np.array(jobs, dtype=np.int64).reshape(m, -1)
    tol_rows = np.array(tols).reshape(m, 2)
    args = (metrics.BLOCK, policy.equal_nan)
    if metrics.threads() > 1 and m >= 64:
        # the kernel releases the GIL: a second core takes the second half of the rows
        h = m // 2
        late = metrics.executor().submit(kernel.stats_many, rb, ob, job_rows[h:], tol_rows[h:],
                                          rows[h:], *args)
        kernel.stats_many(rb, ob, job_rows[:h], tol_rows[:h], rows[:h], *args)
        late.result()
    else:
        kernel.stats_many(rb, ob, job_rows, tol_rows, rows, *args)
    return rows


class _Scalars:
    """The single numbers of a window (see ``_scalar_job``): their values and kernel jobs."""

    __slots__ = ("todo", "ref", "other", "jobs", "tols")

    def __init__(self) -> None:
        self.todo: list[Any] = []
        self.ref: list[float] = []
        self.other: list[float] = []
        self.jobs: list[int] = []
        self.tols: list[float] = []


_EXACT = float(1 << 53)  # every int up to this converts to float64 exactly
_F64_KIND = _BATCH_KINDS[np.dtype(np.float64)]


def _scalar_job(i: int, p: Pair, rt: Dump, ot: Dump, leaf: str, policy: Criteria,
                scalars: _Scalars) -> None:
    """Queue a pair of single numbers of two reprod_log dumps (a pickled Python int or float, a
    numpy scalar: each a 0-d array behind a loader, so not in the file) for the kernel, as
    float64 values: for one element, of an integer or float dtype, every statistic is then what
    the per-key path computes from the arrays themselves (150,000 such keys took ~70 us each
    there). Anything else (bool, complex, ints beyond 2**53) is left to the per-key path."""
    if rt.format != "npy-dict" or ot.format != "npy-dict":
        return
    rs, os_ = rt._tree[leaf], ot._tree[leaf]
    if type(rs) is not ArraySpec or type(os_) is not ArraySpec or rs.shape != () \
            or os_.shape != () or rs.source_dtype is not None or os_.source_dtype is not None \
            or rs.dtype.kind not in "iuf" or os_.dtype.kind not in "iuf" \
            or rs.dtype.itemsize > 8 or os_.dtype.itemsize > 8 or _BATCH_MAX < 1:
        return
    rv, ov = rt[leaf].item(), ot[leaf].item()
    if type(rv) is int:
        if abs(rv) > _EXACT:
            return
        rv = float(rv)
    if type(ov) is int:
        if abs(ov) > _EXACT:
            return
        ov = float(ov)
    a, r = policy.tolerance_for(p.key, dtype_name(rs.dtype), dtype_name(os_.dtype))
    k = len(scalars.ref)
    scalars.ref.append(rv)
    scalars.other.append(ov)
    scalars.todo.append((i, p, rs, os_, 1, a, r))
    scalars.jobs += (8 * k, 8 * k, 1, _F64_KIND + (_F64_KIND >> 1), a is not None or r is not None,
                     *_NO_CHECK, *_NO_CHECK)
    scalars.tols += (float(a or 0.0), float(r or 0.0))


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


def _finite_fields(key: str, path: tuple[str, ...], policy: Criteria, n: int,
                   atol: Optional[float], rtol: Optional[float], stats: list[float],
                   worst_index: tuple[int, ...], worst_ref: float, worst_other: float,
                   mismatched: Optional[int], layout: tuple[Any, ...]) -> dict[str, Any]:
    """The fields of a batched pair's result (finite values, one shape), as _compare_pair builds
    them; ``layout``: (ref shape, ref dtype, other shape, other dtype)."""
    thresholds = policy.thresholds_for(key)
    ref_shape, other_shape = layout[0], layout[2]
    rdt, odt = dtype_name(layout[1]), dtype_name(layout[3])
    mean_abs, max_abs, min_abs, mean_rel, max_rel, cosine, rel_l2, max_scaled = stats
    values = {"mean_abs": mean_abs, "max_abs": max_abs, "min_abs": min_abs, "mean_rel": mean_rel,
              "max_rel": max_rel, "cosine": cosine, "rel_l2": rel_l2, "max_scaled": max_scaled}
    status, reason, checks = judged(values, thresholds, mismatched=mismatched, size=n, atol=atol,
                                     rtol=rtol, worst_index=worst_index, worst_ref=worst_ref,
                                     worst_other=worst_other)
    # every field, in declaration order (tests/diff/test_batch_paths.py checks both)
    return {
        "key": key, "passed": status == "passed", "status": status, "reason": reason,
        "path": path, "ref_shape": ref_shape, "other_shape": other_shape, "ref_dtype": rdt,
        "other_dtype": odt, "size": n, "mean_abs": mean_abs, "max_abs": max_abs,
        "min_abs": min_abs, "mean_rel": mean_rel, "max_rel": max_rel, "cosine": cosine,
        "rel_l2": rel_l2, "max_scaled": max_scaled, "noise_multiple": None, "noise_l2": None,
        "noise_max": None, "worst_index": worst_index, "worst_ref": worst_ref, "worst_other": worst_other,
        "mismatched": mismatched, "ref_nan": 0, "ref_inf": 0, "other_nan": 0, "other_inf": 0,
        "methods": tuple(thresholds) or policy.methods, "thresholds": thresholds,
        "checks": checks, "atol": atol, "rtol": rtol,
        "note": None if rdt == odt else msg.note_dtypes(rdt, odt),
    }


