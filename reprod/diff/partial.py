"""Partial statistics of a run of elements: the sums, extremes and counts one pass collects,
in the kernel's column order, merged left to right."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import _native

__all__ = ["ROW_COLUMNS", "COL", "FIELDS", "Partial", "Options"]

# The kernel's row (stats_many) and, its first 19 columns, stats()' tuple: named in the kernel,
# which the numpy path must match (a test checks this copy against the compiled one).
ROW_COLUMNS = ("counted", "total", "total_rel", "dot", "rr", "oo", "max_abs", "worst", "min_abs",
               "max_rel", "mismatched", "ref_nan", "ref_inf", "other_nan", "other_inf",
               "nan_unmatched", "inf_unmatched", "dd", "max_ref", "worst_ref", "worst_other",
               "crc_ref", "crc_other")
if _native.built() is not None:
    ROW_COLUMNS = tuple(_native.built().ROW_COLUMNS)
COL = {name: i for i, name in enumerate(ROW_COLUMNS)}
FIELDS = ROW_COLUMNS[: COL["max_ref"] + 1]  # a partial's fields, in stats()' order


class Partial:
    """Sums, extremes and counts of a run of elements; merged left to right, so ties in the
    maximum keep the earliest position (numpy's argmax)."""

    __slots__ = FIELDS

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
    def from_tuple(cls, values: Sequence[Any], offset: int) -> Partial:
        p = cls()
        for name, v in zip(FIELDS, values):
            setattr(p, name, v)
        if p.worst >= 0:
            p.worst += offset
        return p

    def merge(self, b: Partial) -> None:
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
class Options:
    check_close: bool
    atol: float
    rtol: float
    equal_nan: bool
    block: int


