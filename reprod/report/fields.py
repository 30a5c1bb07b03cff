"""A KeyResult's fields as the report writers read them: one key's (``field_values``) or a
batch's, one list per field (``field_columns``), without the per-read dict a batch row builds.

Kept apart from the JSON encoder: the log writer reads fields too, and importing ``json`` costs
~1.5 ms of a command line that writes no JSON.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from ..diff.result import _FIELD_NAMES, KeyResult, RowKeyResult

__all__ = ["field_values", "field_columns", "methods_values", "methods_columns"]

# what asdict reads of a RowKeyResult: these three from its own properties, the rest from its row
_OWN = ("key", "passed", "status")
assert _FIELD_NAMES[:3] == _OWN
_ROW_FIELDS = operator.itemgetter(*_FIELD_NAMES[3:])
_ALL_FIELDS = operator.attrgetter(*_FIELD_NAMES)
_ROW_METHODS = operator.itemgetter("thresholds", "checks")
_ROW_ONLY = frozenset([RowKeyResult])
_SRC = operator.attrgetter("_src")
_ROW_I = operator.attrgetter("_i")


def field_values(kr: KeyResult) -> tuple[Any, ...]:
    """Every KeyResult field of ``kr`` in declaration order, as ``getattr`` gives them."""
    if type(kr) is RowKeyResult:
        # a row's getattr is src.fields(i)[name] (the one dict, cached): read once, not 35
        # times; key, passed and status are the result's own properties
        return (kr.key, kr.passed, kr.status, *_ROW_FIELDS(kr._src.fields(kr._i)))
    return _ALL_FIELDS(kr)


def field_columns(batch: Sequence[KeyResult]) -> list[list[Any]]:
    """``field_values`` of every key of ``batch``, as one list per field: runs of a batch
    window's rows (``RowKeyResult``s of one source, in row order) from the source's
    ``columns`` (a million keys' fields cost ~9 us each one by one), any other key from
    ``field_values``. Values may be shared between keys: not to be changed."""
    parts = [src.columns(first, after) if src is not None else list(zip(*map(field_values, keys)))
             for src, first, after, keys in _segments(batch)]
    if len(parts) == 1:
        return [c if type(c) is list else list(c) for c in parts[0]]
    cols: list[list[Any]] = [[] for _ in _FIELD_NAMES]
    for part in parts:
        for c, values in zip(cols, part):
            c += values
    return cols


def methods_columns(batch: Sequence[KeyResult]) -> tuple[list[Any], list[Any]]:
    """``methods_values`` of every key of ``batch``: its thresholds and its checks, as two
    lists (``field_columns``' two, read alone)."""
    thr: list[Any] = []
    chk: list[Any] = []
    for src, first, after, keys in _segments(batch):
        if src is not None:
            t, c = src.method_columns(first, after)
        else:
            t, c = zip(*map(methods_values, keys))  # type: ignore[assignment]
        thr += t
        chk += c
    return thr, chk


def _segments(batch: Sequence[KeyResult]) -> list[tuple[Any, int, int, list[KeyResult]]]:
    """``batch`` as runs, in order: (source, first row, row after, []) for consecutive rows of
    a source that has ``columns``, (None, 0, 0, keys) for the keys between them."""
    if _ROW_ONLY.issuperset(map(type, batch)) and len(set(map(_SRC, batch))) == 1:
        # the usual batch: rows of one window, in order (checked in C's loops)
        rows = list(map(_ROW_I, batch))
        src = batch[0]._src  # type: ignore[attr-defined]
        if rows == list(range(rows[0], rows[0] + len(rows))) \
                and getattr(src, "columns", None) is not None:
            return [(src, rows[0], rows[0] + len(rows), [])]
    out: list[tuple[Any, int, int, list[KeyResult]]] = []
    keys: list[KeyResult] = []
    src = None
    first = after = 0
    for kr in batch:
        if type(kr) is RowKeyResult:
            s, i = kr._src, kr._i
            if s is src and i == after:
                after += 1
                continue
            if getattr(s, "columns", None) is not None:
                if src is not None:
                    out.append((src, first, after, []))
                elif keys:
                    out.append((None, 0, 0, keys))
                    keys = []
                src, first, after = s, i, i + 1
                continue
        if src is not None:
            out.append((src, first, after, []))
            src = None
        keys.append(kr)
    if src is not None:
        out.append((src, first, after, []))
    elif keys:
        out.append((None, 0, 0, keys))
    return out


def methods_values(kr: KeyResult) -> tuple[Any, Any]:
    """``kr``'s thresholds and checks, as ``getattr`` gives them (a row's built once)."""
    if type(kr) is RowKeyResult:
        return _ROW_METHODS(kr._src.fields(kr._i))
    return kr.thresholds, kr.checks
