"""The batch path for two flat dumps held as columns, with no object per key until the results.

Two dumps of thousands of small arrays (reprod_log's dict, a native ``.npz`` of single names)
open as ``storage.columns.ColumnTree``s: per key a row of offsets and a layout code. When both
sides hold the same keys in the same order (a reference and its port, dumped by one script), the
pairing, the eligibility tests of ``batch.compare_batch``, the kernel's jobs and the CRC bookkeeping
are computed a window at a time on those columns with numpy, per distinct pair of layouts rather
than per key. The per-key path of ``compare_batch`` made a ``Pair``, two ``ArraySpec``s, a
tolerance lookup, two check lookups and a job tuple for every key (~8 us a key). Rows the kernel
cannot finish (NaN, Inf, overflowing sums, a failed CRC) and keys it cannot take (other dtypes,
Fortran order, shapes that differ, large keys) go through the caller's per-key function, so every
result is the general path's (``tests/diff/test_columns_batch.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import count, islice, repeat
from operator import eq
from typing import Any, Optional

import numpy as np

from .. import _native
from ..storage.columns import ColumnTree
from ..storage.lazy import REMEMBER_VERIFIED, VERIFY_SMALL_BYTES, Dump
from . import batch, metrics
from .batch import _BATCH_KINDS, _INDICES, _N_INDICES, _Coded, _stats_many, _Window
from .criteria import Criteria
from .pairing import Pair, dtype_name
from .result import KeyResult, RowKeyResult

__all__ = ["column_pairs", "compare_columns"]

_NO_CHECK = np.array([0, -1, 0], dtype=np.int64)


class ColumnPairs:
    """Two column dumps with the same keys in the same order, each key at row i of both: ``n``
    keys, handed out a window at a time by ``window`` (no list of a million keys is held)."""

    __slots__ = ("ref", "other", "n", "_keys")

    def __init__(self, ref: Dump, other: Dump, n: int) -> None:
        self.ref, self.other, self.n = ref, other, n
        self._keys = iter(ref._tree._rows)  # type: ignore[union-attr]

    def window(self, size: int) -> list[str]:
        """The next ``size`` keys (the keys are handed out in order, once)."""
        return list(islice(self._keys, size))


def column_pairs(ref: Any, other: Any) -> Optional[ColumnPairs]:
    """The pairing of two dumps when both are column tables over mapped files with equal key
    lists (what ``walk_pairs`` gives then: every key a leaf pair, in that order), each key at
    the row of its rank (a fresh table's), else None. Compared streaming, in C's loops."""
    if type(ref) is not Dump or type(other) is not Dump:
        return None
    ta, tb = ref._tree, other._tree
    if type(ta) is not ColumnTree or type(tb) is not ColumnTree or ref.mapped_file is None \
            or other.mapped_file is None:
        return None
    n = len(ta)
    if not n or n != len(tb) or not all(map(eq, ta._rows, tb._rows)):
        return None
    # a released key's row is None: such a dump was compared before, take the general way
    if not all(map(eq, ta._rows.values(), count())) or not all(map(eq, tb._rows.values(), count())):
        return None
    return ColumnPairs(ref, other, n)


class _Side:
    """One side's columns and, per layout code, what the batch needs to know of it."""

    def __init__(self, dump: Dump) -> None:
        tree: ColumnTree = dump._tree  # type: ignore[assignment]
        self.dump = dump
        self.tree = tree
        self.mf = dump.mapped_file
        self.offsets = np.frombuffer(tree._offsets, dtype=np.int64) if len(tree._offsets) \
            else np.zeros(0, np.int64)
        self.codes = np.frombuffer(tree._codes, dtype=np.uint32) if len(tree._codes) \
            else np.zeros(0, np.uint32)
        self.layouts = tree._layouts
        lay = self.layouts
        # -1: not a kind the kernel takes here (other dtypes, a bfloat16 source)
        self.kind = np.array([_BATCH_KINDS.get(dt, -1) if src is None else -1
                              for dt, _s, _f, src in lay], dtype=np.int64)
        self.size = np.array([math.prod(s) for _d, s, _f, _src in lay], dtype=np.int64)
        self.itemsize = np.array([dt.itemsize for dt, _s, _f, _src in lay], dtype=np.int64)
        cs = tree._cstart
        self.checks = None if cs is None else (
            np.frombuffer(cs, dtype=np.int64) if len(cs) else np.zeros(0, np.int64),
            np.frombuffer(tree._clen, dtype=np.int64) if len(tree._clen) else np.zeros(0, np.int64),
            np.frombuffer(tree._ccrc, dtype=np.uint32) if len(tree._ccrc) else np.zeros(0, np.uint32))

    def pending(self, rows: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """``Dump.pending_check`` of ``rows``: (wanted mask, start, length, CRC), or None."""
        if self.checks is None:
            return None
        start, length, crc = (c[rows] for c in self.checks)
        verify = self.dump._verify
        if verify:
            want = np.ones(len(rows), dtype=bool)
        elif verify is None:
            want = length < VERIFY_SMALL_BYTES
        else:
            return None
        verified = self.mf.verified  # type: ignore[union-attr]
        if verified:
            want &= ~np.isin(start, np.fromiter(verified, np.int64, len(verified)))
        return want, start, length, crc


def compare_columns(cp: ColumnPairs, policy: Criteria, start: int, keys: list[str],
                    slow: Callable[[Pair], KeyResult],
                    sides: Optional[tuple[_Side, _Side]] = None) -> list[KeyResult]:
    """The results of ``keys``, rows ``start:start + len(keys)`` of ``cp``, in order;
    ``slow(pair)`` gives those the kernel cannot (the engine's per-key path)."""
    kernel = _native.kernel()
    stop = start + len(keys)
    out: list[Optional[KeyResult]] = [None] * len(keys)
    if kernel is not None:
        a, b = sides if sides is not None else (_Side(cp.ref), _Side(cp.other))
        _batch(kernel, cp, a, b, policy, start, stop, keys, out)
    ref, other = cp.ref, cp.other
    for j, kr in enumerate(out):
        if kr is None:
            key = keys[j]
            out[j] = slow(Pair((key,), "leaf", ref, other, key))
    return out  # type: ignore[return-value]


def sides_of(cp: ColumnPairs) -> tuple[_Side, _Side]:
    """Each side's per-layout tables, built once for every window of a comparison."""
    return _Side(cp.ref), _Side(cp.other)


def _batch(kernel: Any, cp: ColumnPairs, a: _Side, b: _Side, policy: Criteria, start: int,
           stop: int, keys: list[str], out: list[Optional[KeyResult]]) -> None:
    ra = rb = np.arange(start, stop)
    ca, cb = a.codes[ra].astype(np.int64), b.codes[rb].astype(np.int64)
    # what compare_batch decides per key depends on the two layouts only: decide it per distinct
    # pair of layouts (a dump of thousands of keys has a few dozen)
    pair_code, inv = np.unique(ca * max(1, len(b.layouts)) + cb, return_inverse=True)
    inv = inv.reshape(-1)
    n_pairs = len(pair_code)
    lay_a, lay_b = pair_code // max(1, len(b.layouts)), pair_code % max(1, len(b.layouts))
    ok = np.zeros(n_pairs, dtype=bool)
    kind = np.zeros(n_pairs, dtype=np.int64)
    tol = np.zeros((n_pairs, 2))
    close = np.zeros(n_pairs, dtype=bool)
    values: list[Any] = []
    per_key = bool(policy.per_key)
    most = batch._BATCH_MAX  # read here: tests switch the batch off by setting it to 0
    for u, (la, lb) in enumerate(zip(lay_a.tolist(), lay_b.tolist())):
        dta, sha, fa, _ = a.layouts[la]
        dtb, shb, fb, _ = b.layouts[lb]
        values.append((sha, dta, shb, dtb))
        rk, okind = int(a.kind[la]), int(b.kind[lb])
        if rk < 0 or okind < 0 or sha != shb or (len(sha) > 1 and (fa or fb)) \
                or not 0 < a.size[la] <= most:
            continue
        ok[u] = True
        kind[u] = rk + (okind >> 1)
        if not per_key:
            at, rt = policy.tolerance_for("", dtype_name(dta), dtype_name(dtb))
            close[u] = at is not None or rt is not None
            tol[u] = (float(at or 0.0), float(rt or 0.0))
    n = a.size[lay_a][inv]
    offs_a, offs_b = a.offsets[ra], b.offsets[rb]
    # a truncated file: the general path raises the error that names it
    elig = ok[inv] & (offs_a + n * a.itemsize[lay_a][inv] <= a.mf.size) \
        & (offs_b + n * b.itemsize[lay_b][inv] <= b.mf.size)  # type: ignore[union-attr]
    rows_idx = np.flatnonzero(elig)
    m = len(rows_idx)
    if not m:
        return
    if per_key:  # a rule may name any key: its tolerance is looked up key by key
        rule_tol = np.zeros((m, 2))
        close_rows = np.zeros(m, dtype=bool)
        for j, i in enumerate(rows_idx.tolist()):
            va = values[inv[i]]
            at, rt = policy.tolerance_for(keys[i], dtype_name(va[1]), dtype_name(va[3]))
            close_rows[j] = at is not None or rt is not None
            rule_tol[j] = (float(at or 0.0), float(rt or 0.0))
    else:
        rule_tol = tol[inv[rows_idx]]
        close_rows = close[inv[rows_idx]]
    jobs = np.empty((m, 11), dtype=np.int64)
    jobs[:, 0] = offs_a[rows_idx]
    jobs[:, 1] = offs_b[rows_idx]
    jobs[:, 2] = n[rows_idx]
    jobs[:, 3] = kind[inv[rows_idx]]
    jobs[:, 4] = close_rows
    jobs[:, 5:8] = _NO_CHECK
    jobs[:, 8:11] = _NO_CHECK
    remember = []
    for side, col, rows in ((a, 5, ra), (b, 8, rb)):
        pend = side.pending(rows[rows_idx])
        if pend is None:
            remember.append(None)
            continue
        want, cstart, clen, ccrc = pend
        w = np.flatnonzero(want)
        jobs[w, col] = cstart[w]
        jobs[w, col + 1] = clen[w]
        jobs[w, col + 2] = ccrc[w]
        # as compare_batch: only members from REMEMBER_VERIFIED bytes are remembered as checked
        remember.append((w[clen[w] >= REMEMBER_VERIFIED], cstart))
    assert a.mf is not None and b.mf is not None
    rows = _stats_many(kernel, a.mf.buffer(), b.mf.buffer(), jobs.reshape(-1), rule_tol.reshape(-1),
                       policy)
    col = metrics.COL
    crc_ok = (rows[:, col["crc_ref"]] != 0.0) & (rows[:, col["crc_other"]] != 0.0)  # -1: unchecked
    for side, rem in zip((a, b), remember):
        if rem is not None and len(rem[0]):
            w, cstart = rem
            side.mf.verified.update(cstart[w[crc_ok[w]]].tolist())  # type: ignore[union-attr]
    plain, table = metrics.finish_rows(rows, n[rows_idx].astype(np.float64))
    plain &= crc_ok
    keep = np.flatnonzero(plain)
    if not len(keep):
        return
    kept = rows_idx[keep]
    kept_list = kept.tolist()
    window = _Window(policy, [keys[i] for i in kept_list], {},
                     _Coded.of_codes(tuple(values), inv[kept]), close_rows[keep], table[keep])
    k = len(kept_list)
    idx: Sequence[int] = _INDICES[:k] if k <= _N_INDICES else range(k)
    results = list(map(RowKeyResult._at, repeat(window, k), idx))
    if k == len(out):
        out[:] = results
    else:
        for i, kr in zip(kept_list, results):
            out[i] = kr
