"""A flat level of a dump held as columns: what a million-key dump's tree costs per key.

Every value of such a level is an array whose bytes lie in the mapped file (no loader), so what
tells one key from another is only its byte offset, its (dtype, shape, order, source dtype) out
of a few distinct ones, and, for a zip member, the range and CRC its checksum covers. Those live
in ``array`` columns (8-24 bytes a key); the ``ArraySpec`` a reader asks for is built when it asks.
Per key that leaves the key itself, its dict entry and its row number: a million keys a side held
~220 bytes each as specs (.npy) and ~350 (.npz: the zip directory's tuples too); now ~150.
"""

from __future__ import annotations

from array import array
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from typing import Any, Optional

import numpy as np

from .lazy import ArraySpec

__all__ = ["ColumnTree", "ColumnBuilder", "columns_of"]

# (dtype, shape, fortran, source dtype) of a layout
Layout = tuple[np.dtype, tuple[int, ...], bool, Optional[str]]


class ColumnTree(Mapping[str, ArraySpec]):
    """A read-only mapping key -> ``ArraySpec`` whose specs are built on access from columns.

    Iteration follows the order the keys were added; ``len``, ``in`` and lookups are a dict's.
    Two lookups of one key give equal specs, not the same object: code that shares work between
    keys naming one payload keys it by what the spec holds (``Dump.to_dict`` does)."""

    __slots__ = ("_rows", "_offsets", "_codes", "_layouts", "_cstart", "_clen", "_ccrc")

    def __init__(self, rows: dict[str, int], offsets: array, codes: array, layouts: list[Layout],
                 checks: Optional[tuple[array, array, array]] = None) -> None:
        self._rows = rows
        self._offsets = offsets
        self._codes = codes
        self._layouts = layouts
        self._cstart, self._clen, self._ccrc = checks if checks is not None else (None, None, None)

    def __getitem__(self, key: str) -> ArraySpec:
        return self._spec(self._rows[key])

    def release(self, key: str) -> None:
        """Forget ``key``'s row (it stays a key, whose value is ``None``), as ``Dump._release``
        drops a dict tree's spec: the row number is 32 bytes of a key compared already. The dict
        keeps its size, so a walk iterating it meanwhile goes on."""
        rows = self._rows
        if key in rows:
            rows[key] = None

    def _spec(self, i: Optional[int]) -> ArraySpec:
        if i is None:  # released
            return None  # type: ignore[return-value]
        dt, shape, fortran, src = self._layouts[self._codes[i]]
        cs = self._cstart
        check = None if cs is None else (cs[i], self._clen[i], self._ccrc[i])  # type: ignore[index]
        return ArraySpec.in_file(dt, shape, self._offsets[i], fortran, src, check)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def items(self) -> ItemsView[str, ArraySpec]:
        return _Items(self)

    def values(self) -> ValuesView[ArraySpec]:
        return _Values(self)

    @property
    def nbytes_per_key(self) -> float:
        """What the columns hold per key (bytes), for the benchmarks' per-key figure."""
        cols = [self._offsets, self._codes] + ([] if self._cstart is None else
                                               [self._cstart, self._clen, self._ccrc])
        return sum(c.itemsize for c in cols)  # type: ignore[union-attr]


class _Items(ItemsView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[tuple[str, ArraySpec]]:
        tree: ColumnTree = self._mapping  # type: ignore[attr-defined]
        spec = tree._spec
        for key, i in tree._rows.items():
            yield key, spec(i)


class _Values(ValuesView):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[ArraySpec]:
        tree: ColumnTree = self._mapping  # type: ignore[attr-defined]
        spec = tree._spec
        for i in tree._rows.values():
            yield spec(i)


class ColumnBuilder:
    """Collects the rows of a ``ColumnTree``: ``add`` per key, ``build`` once."""

    __slots__ = ("rows", "offsets", "codes", "layouts", "index", "checks")

    def __init__(self, rows: Optional[dict[str, Any]] = None, checks: bool = False) -> None:
        # ``rows``: a dict to fill in place (the reader's own, whose values become row numbers)
        self.rows: dict[str, Any] = {} if rows is None else rows
        self.offsets = array("q")
        self.codes = array("I")
        self.layouts: list[Layout] = []
        self.index: dict[Any, int] = {}
        self.checks = (array("q"), array("q"), array("I")) if checks else None

    def code(self, layout: Layout) -> int:
        c = self.index.get(layout)
        if c is None:
            c = self.index[layout] = len(self.layouts)
            self.layouts.append(layout)
        return c

    def build(self) -> ColumnTree:
        return ColumnTree(self.rows, self.offsets, self.codes, self.layouts, self.checks)


def columns_of(tree: dict[str, Any]) -> Optional[ColumnTree]:
    """``tree`` (a reader's dict of key -> spec) as a ``ColumnTree``, converted in place (its
    values become row numbers, each spec going as its row is written), or ``None`` where a value
    is not an in-file array (a nested dict, a loader, a non-numeric value), with ``tree`` as it was."""
    checked = 0
    for v in tree.values():
        if type(v) is not ArraySpec or v.loader is not None:
            return None
        checked += v.check is not None
    if checked and checked != len(tree):
        return None
    has_checks = checked > 0
    b = ColumnBuilder(tree, checks=has_checks)
    offsets, codes, code = b.offsets, b.codes, b.code
    cs = b.checks
    for i, (k, v) in enumerate(tree.items()):
        offsets.append(v.offset)
        codes.append(code((v.dtype, v.shape, v.fortran, v.source_dtype)))
        if cs is not None:
            c = v.check
            cs[0].append(c[0])
            cs[1].append(c[1])
            cs[2].append(c[2])
        tree[k] = i  # replacing a value keeps the dict's size: the iteration goes on
    return b.build()
