"""A DiffResult as data: JSON (round-trips), CSV (one row per key) and a GitHub Markdown table."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any, Optional

import numpy as np

from ..diff.result import DiffResult, KeyResult, _json_safe
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
    """``to_json``'s text in pieces, a key at a time: writing them one after another gives the
    same bytes, and a million keys never exist as one document (a dict per key, then one string)
    at once. ``indent=None`` (one line) is one piece."""
    if indent is None or not result.results:
        yield json.dumps(_jsonable(result.to_dict()), indent=indent, allow_nan=False)
        return
    doc = {
        "passed": result.passed,
        "summary": result.summary(),
        "ref": result.ref_name,
        "other": result.other_name,
        "options": _json_safe(dict(result.options)),
        "created": result.created,
    }
    head = json.dumps(_jsonable(doc), indent=indent, allow_nan=False)
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
    return json.dumps(_jsonable(files_to_dict(results)), indent=indent, allow_nan=False)


def files_from_json(text: str) -> dict[str, DiffResult]:
    """Read back what ``files_to_json`` wrote: relpath -> DiffResult."""
    doc = json.loads(text)
    return {name: _from_doc(d) for name, d in doc["files"].items()}


_FLATTENED = ("thresholds", "checks")
_PREFIX = {"thresholds": "threshold_", "checks": "check_"}


def _nested_names(results: Iterable[KeyResult], attr: str) -> list[str]:
    names: list[str] = []
    for r in results:
        names.extend(m for m in getattr(r, attr) if m not in names)
    return names


def flat_columns(result: DiffResult) -> list[str]:
    """Every KeyResult field in declaration order, with ``thresholds`` and ``checks`` spread into
    ``threshold_<method>`` and ``check_<method>`` columns (methods in order of first use).

    >>> flat_columns(result)[:4]
    ['key', 'passed', 'status', 'reason']
    """
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


def to_csv(result: DiffResult) -> str:
    """A header and one row per key with every field (``flat_columns``) in full precision:
    floats as Python's shortest round-trip text (``inf``, ``nan``), booleans ``true``/``false``,
    tuples (shapes, index, path, methods) as JSON arrays, absent values empty.

    >>> rows = list(csv.DictReader(io.StringIO(to_csv(result))))
    >>> float(rows[0]["mean_abs"])
    0.00031
    """
    return _csv(flat_columns(result), (flat_record(r) for r in result.results))


def _csv(columns: list[str], records: Iterable[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_csv_cell(record.get(c)) for c in columns])
    return buf.getvalue()


def files_to_csv(results: dict[str, DiffResult]) -> str:
    """Several results (one per compared file) as one CSV with a leading ``file`` column."""
    columns: list[str] = []
    for result in results.values():
        columns.extend(c for c in flat_columns(result) if c not in columns)
    records = (
        {"file": name, **flat_record(r)} for name, result in results.items() for r in result.results
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
