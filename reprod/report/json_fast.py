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
from json.encoder import encode_basestring_ascii
from typing import Any, Optional

from ..diff.result import _FIELD_NAMES, KeyResult, RowKeyResult

__all__ = ["Unsupported", "KeyEncoder", "layout", "field_values", "methods_values"]

# operator.call (3.11+) keeps the per-value call in C; older Pythons pay a lambda frame
_call: Callable[[Callable[[Any], str], Any], str] = getattr(operator, "call", None) or (lambda f, v: f(v))

# float.__repr__ of a non-finite float; to_dict (_json_safe) writes it as this string instead
_NON_FINITE = {"nan": '"nan"', "inf": '"inf"', "-inf": '"-inf"'}
_NON_FINITE_KEYS = _NON_FINITE.keys()

# what asdict reads of a RowKeyResult: these three from its own properties, the rest from its row
_OWN = ("key", "passed", "status")
assert _FIELD_NAMES[:3] == _OWN
_ROW_FIELDS = operator.itemgetter(*_FIELD_NAMES[3:])
_ALL_FIELDS = operator.attrgetter(*_FIELD_NAMES)
_ROW_METHODS = operator.itemgetter("thresholds", "checks")


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


def field_values(kr: KeyResult) -> tuple[Any, ...]:
    """Every KeyResult field of ``kr`` in declaration order, as ``getattr`` gives them."""
    if type(kr) is RowKeyResult:
        # a row's getattr is src.fields(i)[name] (the one dict, cached): read once, not 35
        # times; key, passed and status are the result's own properties
        return (kr.key, kr.passed, kr.status, *_ROW_FIELDS(kr._src.fields(kr._i)))
    return _ALL_FIELDS(kr)


def methods_values(kr: KeyResult) -> tuple[Any, Any]:
    """``kr``'s thresholds and checks, as ``getattr`` gives them (a row's built once)."""
    if type(kr) is RowKeyResult:
        return _ROW_METHODS(kr._src.fields(kr._i))
    return kr.thresholds, kr.checks


def _encoded(items: Any, table: dict[type, Callable[[Any], str]]) -> list[str]:
    out = list(map(_call, map(table.__getitem__, map(type, items)), items))
    # only a float's repr is bare nan/inf: strings are quoted, containers bracketed
    if not _NON_FINITE_KEYS.isdisjoint(out):
        out = [_NON_FINITE.get(s, s) for s in out]
    return out


_KEY_TABLE: dict[type, Callable[[Any], str]] = {str: encode_basestring_ascii}
