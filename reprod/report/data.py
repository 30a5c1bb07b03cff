"""A DiffResult as data: JSON (round-trips), CSV (one row per key) and a GitHub Markdown table."""

from __future__ import annotations

import csv
import io
import json
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from itertools import repeat
from json.encoder import encode_basestring_ascii
from typing import Any, Optional

import numpy as np

from .._native import float_texts
from ..diff.result import _FIELD_NAMES, DiffResult, KeyResult, _json_safe
from .fields import field_columns, field_values, methods_columns
from .json_fast import KeyEncoder, _call, layout
from .table import statistics_for, table_columns, table_rows

__all__ = [
    "to_json",
    "iter_json",
    "from_json",
    "to_csv",
    "files_to_csv",
    "files_to_dict",
    "files_to_json",
    "to_markdown",
    "flat_columns",
    "flat_record",
    "key_records",
    "files_from_json",
]

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _jsonable(x: Any) -> Any:
    """Strict JSON has no inf/nan: write them as the strings "inf", "-inf", "nan" (as
    ``KeyResult.to_dict`` does for its own fields), also inside nested thresholds and options."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def _restore(x: Any) -> Any:
    if isinstance(x, str):
        return _NON_FINITE.get(x, x)
    if isinstance(x, dict):
        return {k: _restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore(v) for v in x]
    return x


def to_json(result: DiffResult, *, indent: Optional[int] = 2) -> str:
    """The result as a strict JSON document (``result.to_dict()``): top-level ``"passed"``,
    ``"summary"`` and ``"keys"``; inf and nan are written as strings.

    >>> doc = json.loads(to_json(result))
    >>> doc["passed"], doc["summary"]["first_failure"]
    (False, 'fc.weight')
    """
    return "".join(iter_json(result, indent=indent))


def iter_json(result: DiffResult, *, indent: Optional[int] = 2) -> Iterator[str]:
    """``to_json``'s text in pieces, many keys at a time: writing them one after another gives
    the same bytes, and a million keys never exist as one document (a dict per key, then one
    string) at once."""
    if not _fast_indent(indent):
        yield from _iter_json_reference(result, indent=indent)
        return
    yield from _result_pieces(result, indent, 0)


def _fast_indent(indent: Any) -> bool:
    # what json_fast lays out; any other indent (a str, a bool) keeps the general path's text
    # and errors
    return indent is None or type(indent) is int


# keys per piece: ~1 MB of text at indent=2, one write for the CLI's writer
_KEYS_PER_PIECE = 1024


def _head(result: DiffResult, indent: Optional[int]) -> str:
    """The document without its keys, as ``json.dumps`` writes it."""
    doc = {
        "passed": result.passed,
        "summary": result.summary(),
        "ref": result.ref_name,
        "other": result.other_name,
        "options": _json_safe(dict(result.options)),
        "created": result.created,
    }
    return json.dumps(_jsonable(doc), indent=indent, allow_nan=False)


def _result_pieces(result: DiffResult, indent: Optional[int], level: int) -> Iterator[str]:
    """``json.dumps(_jsonable(result.to_dict()), indent=indent)`` as it is nested ``level``
    deep (``files_to_json`` puts results at 2), in pieces: the keys through ``KeyEncoder``,
    any key it cannot write exactly the general way."""
    head = _head(result, indent)
    open1, sep1, close0 = layout(indent, level)
    if close0:  # no raw newline inside json's strings: every one is a line break
        head = head.replace("\n", close0)
    # the head's closing brace off, "keys" (to_dict's last entry) after its other entries
    head = head[: len(head) - len(close0) - 1] + sep1 + '"keys": '
    results = result.results
    if not isinstance(results, (tuple, list)):
        results = tuple(results)
    if not results:
        yield head + "[]" + close0 + "}"
        return
    open2, sep2, close1 = layout(indent, level + 1)
    encoder = KeyEncoder(indent, level + 2)
    encode = encoder.encode
    lead = head + "[" + open2
    for start in range(0, len(results), _KEYS_PER_PIECE):
        batch = results[start : start + _KEYS_PER_PIECE]
        try:
            texts = encoder.encode_many(batch)
        except KeyError:  # json_fast.Unsupported somewhere in the batch
            texts = [_key_text(kr, encode, indent, level + 2) for kr in batch]
        yield lead + sep2.join(texts)
        lead = sep2
    yield close1 + "]" + close0 + "}"


def _key_text(kr: KeyResult, encode: Any, indent: Optional[int], level: int) -> str:
    try:
        return encode(kr)
    except KeyError:
        # a value KeyEncoder does not write exactly (a numpy scalar, a subclass): the general
        # way, which raises what it raised before where the key cannot be written at all
        text = json.dumps(_jsonable(kr.to_dict()), indent=indent, allow_nan=False)
        return text if indent is None else text.replace("\n", "\n" + " " * indent * level)


def _iter_json_reference(result: DiffResult, *, indent: Optional[int] = 2) -> Iterator[str]:
    """``iter_json`` through ``json.dumps`` and ``to_dict`` (the pure-Python encoder: ~120 us a
    key): the text ``iter_json`` must equal byte for byte, and its path for any other indent."""
    if indent is None or not result.results:
        yield json.dumps(_jsonable(result.to_dict()), indent=indent, allow_nan=False)
        return
    head = _head(result, indent)
    pad = " " * indent
    # json.dumps's "keys" entry, the last of the document: each key indented two levels deeper
    yield head[:-2] + f',\n{pad}"keys": [\n'
    sep = ""
    for kr in result.results:
        text = json.dumps(_jsonable(kr.to_dict()), indent=indent, allow_nan=False)
        yield sep + pad + pad + text.replace("\n", "\n" + pad + pad)
        sep = ",\n"
    yield f"\n{pad}]\n}}"


def from_json(text: str) -> DiffResult:
    """Read back what ``to_json`` wrote (inf and nan included).

    >>> from_json(to_json(result)).to_dict() == result.to_dict()
    True
    """
    return _from_doc(json.loads(text))


def _from_doc(doc: dict[str, Any]) -> DiffResult:
    for key in doc.get("keys", []):
        # KeyResult.from_dict restores its own float fields; the nested threshold values are ours
        if isinstance(key.get("thresholds"), dict):
            key["thresholds"] = _restore(key["thresholds"])
    if isinstance(doc.get("options"), dict):
        doc["options"] = _restore(doc["options"])
    return DiffResult.from_dict(doc)


def files_to_dict(results: Mapping[str, DiffResult]) -> dict[str, Any]:
    """Several results (one per compared file) as one document:
    ``{"passed": bool, "files": {relpath: result.to_dict()}}``.

    >>> files_to_dict({"forward.npy": result})["passed"]
    False
    """
    return {
        "passed": all(r.passed for r in results.values()),
        "files": {name: r.to_dict() for name, r in results.items()},
    }


def files_to_json(results: Mapping[str, DiffResult], *, indent: Optional[int] = 2) -> str:
    """``files_to_dict`` as strict JSON (inf and nan as strings, as in ``to_json``)."""
    if not _fast_indent(indent) or any(type(name) is not str for name in results):
        return _files_to_json_reference(results, indent=indent)
    return "".join(_files_pieces(results, indent))


def _files_pieces(results: Mapping[str, DiffResult], indent: Optional[int]) -> Iterator[str]:
    open1, sep1, close0 = layout(indent, 0)
    passed = all(r.passed for r in results.values())
    yield "{" + open1 + '"passed": ' + ("true" if passed else "false") + sep1 + '"files": '
    if not results:
        yield "{}" + close0 + "}"
        return
    open2, sep2, close1 = layout(indent, 1)
    lead = "{" + open2
    for name, result in results.items():
        yield lead + encode_basestring_ascii(name) + ": "
        yield from _result_pieces(result, indent, 2)
        lead = sep2
    yield close1 + "}" + close0 + "}"


def _files_to_json_reference(results: Mapping[str, DiffResult], *,
                             indent: Optional[int] = 2) -> str:
    """``files_to_json`` through ``json.dumps``: the text it must equal, and its other indents."""
    return json.dumps(_jsonable(files_to_dict(results)), indent=indent, allow_nan=False)


def files_from_json(text: str) -> dict[str, DiffResult]:
    """Read back what ``files_to_json`` wrote: relpath -> DiffResult."""
    doc = json.loads(text)
    return {name: _from_doc(d) for name, d in doc["files"].items()}


_FLATTENED = ("thresholds", "checks")
_PREFIX = {"thresholds": "threshold_", "checks": "check_"}
_I_THR, _I_CHK = _FIELD_NAMES.index("thresholds"), _FIELD_NAMES.index("checks")
assert _I_CHK == _I_THR + 1
_BEFORE, _AFTER = _FIELD_NAMES[:_I_THR], _FIELD_NAMES[_I_CHK + 1 :]


def _nested_names(results: Iterable[KeyResult], attr: str) -> list[str]:
    names: list[str] = []
    for r in results:
        names.extend(m for m in getattr(r, attr) if m not in names)
    return names


def _method_names(results: Iterable[KeyResult]) -> Optional[tuple[list[str], list[str]]]:
    """``_nested_names`` of thresholds and of checks, reading each key once (a batch row's
    fields are built per read: the two passes built them twice), a batch of keys at a time
    (``methods_columns``: a window's keys share their thresholds dict), each distinct dict
    once; ``None`` where a value is not a dict or a method not a str, for the general path
    (and its errors)."""
    thr_names: list[str] = []
    chk_names: list[str] = []
    thr_seen: set[str] = set()
    chk_seen: set[str] = set()
    results = _as_sequence(results)
    for start in range(0, len(results), _CSV_PIECE_ROWS):
        thr_col, chk_col = methods_columns(results[start : start + _CSV_PIECE_ROWS])
        for col, names, seen in ((thr_col, thr_names, thr_seen), (chk_col, chk_names, chk_seen)):
            for d in _distinct(col):
                if type(d) is not dict or not _STR_ONLY.issuperset(map(type, d)):
                    return None
                if not d.keys() <= seen:
                    names.extend(m for m in d if m not in seen)
                    seen.update(d)
    return thr_names, chk_names


def _distinct(col: list[Any]) -> Iterable[Any]:
    """The distinct objects of ``col`` (by identity), in order of first appearance."""
    return dict(zip(map(id, col), col)).values()


_STR_ONLY = frozenset([str])


def _columns(thr_names: list[str], chk_names: list[str]) -> list[str]:
    return [*_BEFORE, *("threshold_" + m for m in thr_names), *("check_" + m for m in chk_names),
            *_AFTER]


def flat_columns(result: DiffResult) -> list[str]:
    """Every KeyResult field in declaration order, with ``thresholds`` and ``checks`` spread into
    ``threshold_<method>`` and ``check_<method>`` columns (methods in order of first use).

    >>> flat_columns(result)[:4]
    ['key', 'passed', 'status', 'reason']
    """
    names = _method_names(result.results)
    if names is None:
        return _flat_columns_reference(result)
    return _columns(*names)


def _flat_columns_reference(result: DiffResult) -> list[str]:
    columns: list[str] = []
    for f in fields(KeyResult):
        if f.name in _FLATTENED:
            prefix = _PREFIX[f.name]
            columns.extend(prefix + m for m in _nested_names(result.results, f.name))
        else:
            columns.append(f.name)
    return columns


def flat_record(r: KeyResult) -> dict[str, Any]:
    """One key as a flat mapping over (a subset of) ``flat_columns``: values unchanged, tuples
    kept as tuples, the nested thresholds/checks spread into prefixed entries."""
    values = field_values(r)
    record = dict(zip(_BEFORE, values))
    # no field name starts with a prefix: the spread entries never replace a field's
    record.update({"threshold_" + m: v for m, v in values[_I_THR].items()})
    record.update({"check_" + m: v for m, v in values[_I_CHK].items()})
    record.update(zip(_AFTER, values[_I_CHK + 1 :]))
    return record


def _flat_record_reference(r: KeyResult) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for f in fields(KeyResult):
        value = getattr(r, f.name)
        if f.name in _FLATTENED:
            record.update({_PREFIX[f.name] + m: v for m, v in value.items()})
        else:
            record[f.name] = value
    return record


def key_records(result: DiffResult) -> list[dict[str, Any]]:
    """``flat_record`` of every key, in the result's order (the rows of ``to_frame``/``to_csv``)."""
    return [flat_record(r) for r in result.results]


def _csv_cell(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return repr(x)  # shortest text that parses back to the same float; "inf", "nan"
    if isinstance(x, tuple):
        return json.dumps([v.item() if isinstance(v, np.generic) else v for v in x])
    return str(x)


# json.dumps (C encoder, default separators) of a tuple's items, for the items written the same
# way whatever json's float options (a float item takes _csv_cell)
_TUPLE_ITEM = {str: encode_basestring_ascii, int: int.__repr__, bool: ("false", "true").__getitem__,
               type(None): {None: "null"}.__getitem__}


def _csv_tuple(x: tuple[Any, ...]) -> str:
    try:
        items = list(map(_call, map(_TUPLE_ITEM.__getitem__, map(type, x)), x))
    except KeyError:
        return _csv_cell(x)
    return "[" + ", ".join(items) + "]"


# _csv_cell of a value of each exact type, without its isinstance chain; any other type (numpy
# scalars, subclasses) takes _csv_cell itself
_CELL = {type(None): {None: ""}.__getitem__, bool: ("false", "true").__getitem__,
         float: float.__repr__, int: int.__repr__, str: str, tuple: _csv_tuple}
_ANY_CELL = repeat(_csv_cell)


class _Slow(Exception):
    """A key the fast CSV rows do not cover (a method not among the columns, or not a str)."""


def _csv_rows(groups: list[tuple[Optional[str], Sequence[KeyResult]]],
              names: list[tuple[list[str], list[str]]], every: int) -> Iterator[str]:
    """``_csv`` of the groups' ``flat_record``s (with a leading ``file`` column where the
    groups are named), in pieces of ``every`` rows (0: one piece), given each group's
    ``_method_names``: a batch of keys at a time (``field_columns``), each CSV column's cells
    by one ``map`` of their type's text, a column's cell that every key writes alike once (see
    ``_csv_batch``). ``_Slow`` where a key has a method its group's names lack."""
    columns: list[str] = []
    for group_names in names:
        columns.extend(c for c in _columns(*group_names) if c not in columns)
    files = groups[0][0] is not None
    if files:
        columns = ["file", *columns]
    # where each column's cells come from: the file name, a field, a method of thresholds/checks
    field_at = {n: i for i, n in enumerate(_FIELD_NAMES) if n not in _FLATTENED}
    sources: list[tuple[str, Any]] = []
    for c in columns:
        if c == "file" and files:
            sources.append(("file", None))
        elif c in field_at:
            sources.append(("field", field_at[c]))
        elif c.startswith("threshold_"):
            sources.append(("thr", c[len("threshold_") :]))
        else:
            sources.append(("chk", c[len("check_") :]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    out = [buf.getvalue()]
    size = every or _CSV_PIECE_ROWS
    for (name, results), (thr_names, chk_names) in zip(groups, names):
        thr_seen, chk_seen = set(thr_names), set(chk_names)
        for start in range(0, len(results), size):
            cols = field_columns(results[start : start + size])
            for col, seen in ((cols[_I_THR], thr_seen), (cols[_I_CHK], chk_seen)):
                for d in _distinct(col):
                    if type(d) is not dict or not d.keys() <= seen \
                            or not _STR_ONLY.issuperset(map(type, d)):
                        raise _Slow(d)
            cells: list[Any] = []
            for kind, at in sources:
                if kind == "file":
                    cells.append(_csv_cell(name))
                elif kind == "field":
                    cells.append(_csv_cells(cols[at]))
                else:
                    col = cols[_I_THR if kind == "thr" else _I_CHK]
                    cells.append(_csv_cells(list(map(dict.get, col, repeat(at)))))
            out.append(_csv_batch(cells, len(cols[0]), writer, buf))
            if every:
                yield "".join(out)
                out = []
    if out:
        yield "".join(out)


class _Written(list):  # type: ignore[type-arg]
    """A column's cells as the CSV holds them: texts that need no quoting (a number's repr) or
    are quoted already (their texts before in ``raw``); ``_csv_batch`` writes them as they are."""

    raw: list[str]


def _csv_cells(col: list[Any]) -> Any:
    """``_csv_cell`` of each value of a column: one text where every value writes the same,
    else the list of texts (a ``_Written`` where they are the cells' final text)."""
    types = set(map(type, col))
    if len(types) != 1:
        return list(map(_call, map(_CELL.get, map(type, col), _ANY_CELL), col))
    t = types.pop()
    if t is float:  # no single text: 0.0 == -0.0 and nan != nan, though their texts differ
        return _Written(float_texts(col))  # float.__repr__'s, by the kernel where it is on
    if t is type(None):
        return ""
    if t is str or t is int or t is bool:
        # one exact type: equal values write equal texts
        cell = _CELL[t]
        if col.count(col[0]) == len(col):
            return cell(col[0])
        return list(map(cell, col)) if t is str else _Written(map(cell, col))
    if t is tuple:
        if 2 * len(set(map(id, col))) <= len(col):  # a window's shapes, its methods: shared
            ids = list(map(id, col))
            text = {i: _csv_tuple(v) for i, v in dict(zip(ids, col)).items()}
            return list(map(text.__getitem__, ids))
        lengths = set(map(len, col))
        if len(lengths) == 1:
            k = lengths.pop()
            items = [list(c) for c in zip(*col)]
            if k and all(len(set(map(type, c))) == 1 and type(c[0]) in _TUPLE_ITEM for c in items):
                # json.dumps of the items ("[1, 2]", '["a"]'): each item column at once
                texts = [list(map(_TUPLE_ITEM[type(c[0])], c)) for c in items]
                cells = map(("[" + ", ".join(["{}"] * k) + "]").format, *texts)
                if k == 1 and type(items[0][0]) is not str:
                    return _Written(cells)  # "[3]", "[true]": nothing to quote
                # a comma between items, a string's quotes (JSON's escapes leave no line
                # break or NUL in it): every cell quoted
                raw = list(cells)
                quoted = _Written(map('"{}"'.format, map(str.replace, raw, repeat('"'),
                                                         repeat('""'))))
                quoted.raw = raw  # the cells' texts, for a row csv.writer writes
                return quoted
    return list(map(_call, map(_CELL.get, map(type, col), _ANY_CELL), col))


# a cell holding one of these is quoted (delimiter, quote char); a row with a cell holding one of
# _RAW is left to csv.writer itself (line breaks and NUL: what its rules for them are differs
# between Python versions)
_QUOTED = (",", '"')
_RAW = ("\n", "\r", "\x00")


def _csv_batch(cells: list[Any], n: int, writer: Any, buf: io.StringIO) -> str:
    """The CSV lines of ``n`` rows whose columns are ``cells`` (a text every row has, or the
    rows' texts), as ``csv.writer`` (minimal quoting, ``"\n"`` line ends) writes them: the
    rows are joined from pieces, each run of shared text (separators, one-text columns) one
    piece."""
    pieces: list[Any] = []
    literal: list[str] = []
    raw_rows: set[int] = set()
    for i, c in enumerate(cells):
        if i:
            literal.append(",")
        if type(c) is str:
            if not any(map(c.__contains__, _RAW)):
                literal.append('"' + c.replace('"', '""') + '"' if any(map(c.__contains__, _QUOTED))
                               else c)
                continue
            c = [c] * n
        if type(c) is not _Written:
            joined = "".join(c)
            if any(map(joined.__contains__, _RAW)):
                raw_rows.update(j for j, text in enumerate(c) if any(map(text.__contains__, _RAW)))
            if any(map(joined.__contains__, _QUOTED)):
                need = list(map(operator.or_, map(str.__contains__, c, repeat(",")),
                                map(str.__contains__, c, repeat('"'))))
                c = [('"' + text.replace('"', '""') + '"') if q else text
                     for text, q in zip(c, need)]
        if literal:
            pieces.append(repeat("".join(literal), n))
            literal = []
        pieces.append(c)
    literal.append("\n")
    pieces.append(repeat("".join(literal), n))
    lines = list(map("".join, zip(*pieces)))
    if raw_rows:
        raw = [repeat(c, n) if type(c) is str else getattr(c, "raw", c) for c in cells]
        rows = list(zip(*raw))
        for j in raw_rows:
            buf.seek(0)
            buf.truncate()
            writer.writerow(rows[j])
            lines[j] = buf.getvalue()
    return "".join(lines)


def _csv_fast(groups: list[tuple[Optional[str], Sequence[KeyResult]]],
              names: list[tuple[list[str], list[str]]]) -> str:
    """``_csv_rows`` as one text (``_Slow`` as there)."""
    return "".join(_csv_rows(groups, names, 0))


_CSV_PIECE_ROWS = 4096


def iter_csv(result: DiffResult) -> Iterator[str]:
    """``to_csv``'s text in pieces of a few thousand rows, made as they are taken (a million keys'
    text is not held at once): the columns from every key first, then the rows."""
    results = _as_sequence(result.results)
    names = _method_names(results)
    if names is None:  # the general path, whole
        yield to_csv(result)
        return
    started = False
    try:
        for piece in _csv_rows([(None, results)], [names], _CSV_PIECE_ROWS):
            started = True
            yield piece
    except _Slow:
        if started:  # a key's fields read otherwise than the first pass read them
            raise RuntimeError("a key's thresholds changed while the CSV was written") from None
        yield _to_csv_reference(result)


def _csv_of(groups: list[tuple[Optional[str], Sequence[KeyResult]]]) -> Optional[str]:
    """``_csv_fast`` with every group's methods, from its first key (one pass, where every key
    has the first one's, as a comparison's keys do) or else from all of them; ``None`` where the
    keys need the general path."""
    firsts = [_method_names(results[:1]) for _, results in groups]
    if all(n is not None for n in firsts):
        try:
            return _csv_fast(groups, firsts)  # type: ignore[arg-type]
        except _Slow:
            pass
    names = [_method_names(results) for _, results in groups]
    if any(n is None for n in names):
        return None
    try:
        return _csv_fast(groups, names)  # type: ignore[arg-type]
    except _Slow:  # a key's fields changed between two reads: the general path's text
        return None


def _as_sequence(results: Iterable[KeyResult]) -> Sequence[KeyResult]:
    return results if isinstance(results, (tuple, list)) else tuple(results)


def to_csv(result: DiffResult) -> str:
    """A header and one row per key with every field (``flat_columns``) in full precision:
    floats as Python's shortest round-trip text (``inf``, ``nan``), booleans ``true``/``false``,
    tuples (shapes, index, path, methods) as JSON arrays, absent values empty.

    >>> rows = list(csv.DictReader(io.StringIO(to_csv(result))))
    >>> float(rows[0]["mean_abs"])
    0.00031
    """
    text = _csv_of([(None, _as_sequence(result.results))])
    return _to_csv_reference(result) if text is None else text


def _to_csv_reference(result: DiffResult) -> str:
    """``to_csv`` through ``flat_record`` and ``_csv_cell``: the text it must equal."""
    return _csv(_flat_columns_reference(result),
                (_flat_record_reference(r) for r in result.results))


def _csv(columns: list[str], records: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_csv_cell(record.get(c)) for c in columns])
    return buf.getvalue()


def files_to_csv(results: dict[str, DiffResult]) -> str:
    """Several results (one per compared file) as one CSV with a leading ``file`` column."""
    text = None
    if results and all(type(name) is str for name in results):
        text = _csv_of([(name, _as_sequence(r.results)) for name, r in results.items()])
    return _files_to_csv_reference(results) if text is None else text


def _files_to_csv_reference(results: dict[str, DiffResult]) -> str:
    columns: list[str] = []
    for result in results.values():
        columns.extend(c for c in _flat_columns_reference(result) if c not in columns)
    records = (
        {"file": name, **_flat_record_reference(r)}
        for name, result in results.items()
        for r in result.results
    )
    return _csv(["file", *columns], records)


def _md_cell(text: str) -> str:
    # a "|" inside a key name would end the cell
    return text.replace("\\", "\\\\").replace("|", "\\|")


def to_markdown(
    result: DiffResult, *, methods: Optional[Iterable[str]] = None, failed_only: bool = False
) -> str:
    """The table of ``render_table`` as a GitHub Markdown table, then the summary line.

    >>> print(to_markdown(result))
    |    | key    | shape   | dtype   | mean_abs  | max_abs   | threshold | verdict |
    |----|--------|---------|---------|-----------|-----------|-----------|---------|
    |    | logits | [2, 10] | float32 | 1.192e-07 | 4.768e-07 | 1.000e-06 | ok      |
    ...
    """
    stats = statistics_for(result, methods)
    rows = [
        [_md_cell(c) for c in row] for row in table_rows(result, stats, failed_only=failed_only)
    ]
    summary = _md_cell(result.summary_line())
    if not rows:
        return summary
    headers = table_columns(stats)
    widths = [max(3, len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(row) for row in rows)
    return "\n".join(out) + "\n\n" + summary
