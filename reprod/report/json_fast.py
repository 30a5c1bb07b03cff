"""A KeyResult's JSON text without ``dataclasses.asdict`` or the pure-Python encoder.

``json.dumps`` with an indent runs the pure-Python encoder (its C one takes no indent), and
``KeyResult.to_dict`` (``asdict``: a deep copy through ~35 getattrs) cost ~90 us a key on its own:
a million keys took two minutes to write. Here a key's fields are read as they are and each value
is encoded by the function its exact type maps to (``float.__repr__``, ``int.__repr__``,
``encode_basestring_ascii``: what the encoder itself calls), applied through ``map`` so that a
scalar costs no Python frame; containers are written with the indentation ``json.dumps`` gives at
their depth. Any value of another type (a numpy scalar, a str or int subclass, a non-str dict key)
or a KeyResult subclass raises ``Unsupported``: the caller then writes that key the general way.
``tests/report/test_json_fast.py`` compares the two byte for byte.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from json.encoder import encode_basestring_ascii
from typing import Any, Optional

from .._native import float_texts
from ..diff.result import _FIELD_NAMES, KeyResult, RowKeyResult
from .fields import field_columns, field_values, methods_columns, methods_values

__all__ = ["Unsupported", "KeyEncoder", "layout", "field_values", "field_columns", "methods_values",
           "methods_columns"]

# operator.call (3.11+) keeps the per-value call in C; older Pythons pay a lambda frame
_call: Callable[[Callable[[Any], str], Any], str] = getattr(operator, "call", None) or (lambda f, v: f(v))

# float.__repr__ of a non-finite float; to_dict (_json_safe) writes it as this string instead
_NON_FINITE = {"nan": '"nan"', "inf": '"inf"', "-inf": '"-inf"'}
_NON_FINITE_KEYS = _NON_FINITE.keys()



def layout(indent: Optional[int], level: int) -> tuple[str, str, str]:
    """(after the opening bracket, between items, before the closing one) of a non-empty
    container whose bracket is at depth ``level``, as ``json.dumps(indent=indent)`` writes them."""
    if indent is None:
        return "", ", ", ""
    unit = " " * indent
    inner = "\n" + unit * (level + 1)
    return inner, "," + inner, "\n" + unit * level


class Unsupported(KeyError):
    """A value (or a result type) the fast path does not write; a KeyError so that the dispatch
    tables' own misses (``dict.__getitem__`` of an unknown type) are the same signal."""


class KeyEncoder:
    """Writes a KeyResult as ``json.dumps(_jsonable(kr.to_dict()), indent=indent)`` would at
    nesting depth ``level`` (its ``{`` at the caller's position, its lines indented ``level``
    steps more), the text ``iter_json`` writes it with.

    >>> KeyEncoder(2, 2).encode(result.results[0])[:20]  # a key of a document's "keys"
    '{\\n      "key": "con'
    """

    def __init__(self, indent: Optional[int], level: int) -> None:
        if indent is not None and type(indent) is not int:
            raise TypeError("indent: an int or None")
        self.indent = indent
        self.level = level
        self._tables: list[dict[type, Callable[[Any], str]]] = []
        open_, sep, close = self.layout(level)
        names = [encode_basestring_ascii(n) + ": %s" for n in _FIELD_NAMES]
        # the key's object: one % of its encoded values into the fixed field layout
        self._template = "{" + open_ + sep.join(names) + close + "}"
        self._names = [encode_basestring_ascii(n) + ": " for n in _FIELD_NAMES]
        self._fields = self.table(level + 1)

    def layout(self, level: int) -> tuple[str, str, str]:
        return layout(self.indent, level)

    def table(self, level: int) -> dict[type, Callable[[Any], str]]:
        """The encoder of each exact type for a value at depth ``level``."""
        while len(self._tables) <= level:
            self._tables.append(self._make_table(len(self._tables)))
        return self._tables[level]

    def _make_table(self, level: int) -> dict[type, Callable[[Any], str]]:
        open_, sep, close = self.layout(level)
        seq_open, seq_close, map_open, map_close = "[" + open_, close + "]", "{" + open_, close + "}"
        inner: Optional[dict[type, Callable[[Any], str]]] = None  # the next depth's, when needed

        # closures over their depth's layout: a container of a key costs one Python frame, and
        # the usual one of one item (a path, a shape, a threshold) no list or join
        def seq(v: Sequence[Any]) -> str:
            nonlocal inner
            if inner is None:
                inner = self.table(level + 1)
            if len(v) == 1:
                x = v[0]
                text = inner[type(x)](x)
                return f"{seq_open}{_NON_FINITE.get(text, text)}{seq_close}"
            if not v:
                return "[]"
            return f"{seq_open}{sep.join(_encoded(v, inner))}{seq_close}"

        def mapping(v: dict[Any, Any]) -> str:
            nonlocal inner
            if inner is None:
                inner = self.table(level + 1)
            if len(v) == 1:
                ((k, x),) = v.items()
                # _jsonable writes str(k) for a key: the same text only where k is a str itself
                if type(k) is not str:
                    raise Unsupported(type(k).__name__)
                text = inner[type(x)](x)
                return f"{map_open}{encode_basestring_ascii(k)}: {_NON_FINITE.get(text, text)}{map_close}"
            if not v:
                return "{}"
            keys = map(_call, map(_KEY_TABLE.__getitem__, map(type, v)), v)
            items = map("{}: {}".format, keys, _encoded(v.values(), inner))
            return f"{map_open}{sep.join(items)}{map_close}"

        return {
            str: encode_basestring_ascii, float: float.__repr__, int: int.__repr__,
            bool: ("false", "true").__getitem__, type(None): {None: "null"}.__getitem__,
            tuple: seq, list: seq, dict: mapping,
        }

    def encode_many(self, batch: Sequence[KeyResult]) -> list[str]:
        """``[self.encode(kr) for kr in batch]``, a field at a time over the batch
        (``field_columns``): the batch's keys are written through one ``%`` template whose
        literal text holds what every key of the batch writes alike (a window's dtypes, its
        thresholds, the nulls, the brackets of each tuple and dict of one shape), and whose slots
        take the rest, each column's values written by one ``map`` of their type's encoder.
        ``Unsupported`` where ``encode`` would raise it for some key."""
        n = len(batch)
        if not n:
            return []
        if not _PLAIN_TYPES.issuperset(map(type, batch)):
            raise Unsupported("a KeyResult subclass")
        open_, sep, close = self.layout(self.level)
        parts: list[Any] = ["{" + open_]  # literal text (str) and slots (a list of n texts)
        try:
            for i, (name, col) in enumerate(zip(self._names, field_columns(batch))):
                parts.append(name if not i else sep + name)
                self._flatten(col, self.level + 1, parts)
        except KeyError as e:
            raise Unsupported(*e.args) from None
        parts.append(close + "}")
        # each key's text joined from its pieces: a literal repeated, a slot's text, ... (join
        # copies each piece once; a % template scans itself for every key: 2.5x slower)
        pieces: list[Any] = []
        literal: list[str] = []
        for p in parts:
            if type(p) is str:
                literal.append(p)
            else:
                if literal:
                    pieces.append(repeat("".join(literal), n))
                    literal = []
                pieces.append(p)
        if len(pieces) == 0:
            return ["".join(literal)] * n
        if literal:
            pieces.append(repeat("".join(literal), n))
        return list(map("".join, zip(*pieces)))

    def _flatten(self, col: list[Any], level: int, parts: list[Any]) -> None:
        """Append to ``parts`` the text of a column of values at depth ``level`` (brackets
        there), as ``_encoded`` writes each: one literal where every value writes the same text,
        a tuple's or dict's items where all have one length or the same keys, else one slot."""
        n = len(col)
        types = set(map(type, col))
        if len(types) != 1:
            parts.append(_encoded(col, self.table(level)))
            return
        t = types.pop()
        if t is float:  # no literal: 0.0 == -0.0 and nan != nan, though their texts differ
            out = float_texts(col)  # float.__repr__'s texts, by the kernel where it is on
            if not _NON_FINITE_KEYS.isdisjoint(out):
                out = [_NON_FINITE.get(s, s) for s in out]
            parts.append(out)
            return
        scalar = _SCALAR.get(t)
        if scalar is not None:
            # one exact type: equal values write equal texts
            parts.append(scalar(col[0]) if col.count(col[0]) == n else list(map(scalar, col)))
            return
        if t is not tuple and t is not list and t is not dict:
            raise Unsupported(t.__name__)
        distinct = len(set(map(id, col)))
        if distinct == 1:
            parts.append(self._by_object(col[:1], level)[0])
            return
        if 2 * distinct <= n:
            parts.append(self._by_object(col, level))
            return
        open_, sep, close = self.layout(level)
        if t is dict:
            if len(set(map(tuple, col))) != 1 or not _STR_ONLY.issuperset(
                    map(type, chain.from_iterable(col))):
                parts.append(self._by_object(col, level))
                return
            names = list(col[0])
            if not names:
                parts.append("{}")
                return
            parts.append("{" + open_)
            for i, k in enumerate(names):
                text = encode_basestring_ascii(k) + ": "
                parts.append(text if not i else sep + text)
                self._flatten(list(map(operator.itemgetter(k), col)), level + 1, parts)
            parts.append(close + "}")
            return
        lengths = set(map(len, col))
        if len(lengths) != 1:
            parts.append(self._by_object(col, level))
            return
        if not lengths.pop():
            parts.append("[]")
            return
        parts.append("[" + open_)
        for i, items in enumerate(zip(*col)):
            if i:
                parts.append(sep)
            self._flatten(list(items), level + 1, parts)
        parts.append(close + "]")

    def _by_object(self, col: list[Any], level: int) -> list[str]:
        """Each distinct object of ``col`` written once (a window's keys share their shape,
        thresholds and methods objects); by identity, as equal values may differ in text
        (``(1,)`` and ``(True,)``)."""
        ids = list(map(id, col))
        table = self.table(level)
        distinct = dict(zip(ids, col))
        text = dict(zip(distinct, _encoded(distinct.values(), table)))
        return list(map(text.__getitem__, ids))

    def encode(self, kr: KeyResult) -> str:
        """The key's text; ``Unsupported`` (a KeyError) where a value or the result's type is
        not one this writes exactly."""
        t = type(kr)
        if t is not RowKeyResult and t is not KeyResult:
            # asdict reads fields(kr): a subclass may have fields of its own
            raise Unsupported(t.__name__)
        try:
            return self._template % tuple(_encoded(field_values(kr), self._fields))
        except KeyError as e:  # a type's miss in a table
            raise Unsupported(*e.args) from None


def _encoded(items: Any, table: dict[type, Callable[[Any], str]]) -> list[str]:
    out = list(map(_call, map(table.__getitem__, map(type, items)), items))
    # only a float's repr is bare nan/inf: strings are quoted, containers bracketed
    if not _NON_FINITE_KEYS.isdisjoint(out):
        out = [_NON_FINITE.get(s, s) for s in out]
    return out


_KEY_TABLE: dict[type, Callable[[Any], str]] = {str: encode_basestring_ascii}
# the encoder of a column of one scalar type (floats take their own, for nan and inf)
_SCALAR: dict[type, Callable[[Any], str]] = {
    str: encode_basestring_ascii, int: int.__repr__, bool: ("false", "true").__getitem__,
    type(None): {None: "null"}.__getitem__}
_PLAIN_TYPES = frozenset([KeyResult, RowKeyResult])
_STR_ONLY = frozenset([str])



