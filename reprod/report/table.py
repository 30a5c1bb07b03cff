"""Human-readable text of a DiffResult: the per-key table and the first failure in detail."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from ..diff.result import ALL_METHODS, STAT_OF_METHOD, DiffResult, KeyResult
from ..messages import fmt_multiple, fmt_num, fmt_shape

__all__ = [
    "render_table",
    "render_first_failure",
    "table_columns",
    "table_rows",
    "statistics_for",
    "FIRST_MARK",
    "FAIL_MARK",
]

# The first failing key is the one to debug first (later keys often fail only because of it), so
# it gets its own marker; the other failures get a plain one.
FIRST_MARK = ">>"
FAIL_MARK = "!"


# every statistic a KeyResult carries, in the order a detailed report lists them
_STATISTICS = ("noise_multiple", "mean_abs", "max_abs", "min_abs", "mean_rel", "max_rel", "rel_l2",
               "max_scaled", "cosine", "mismatched")


def _as_list(methods: Any) -> list[str]:
    if methods is None:
        return []
    if isinstance(methods, str):
        return [m.strip() for m in methods.split(",") if m.strip()]
    return [str(m) for m in methods]


def statistics_for(result: DiffResult, methods: Optional[Iterable[str]] = None) -> list[str]:
    """The statistic columns a report shows: the judged methods' statistics, then ``max_abs``.

    ``methods`` may hold reprod_log method names (``"mean"``, ``"all"``, ``"max_rel"``) or
    statistic names (``"cosine"``). Without it, the methods the result was judged with are used,
    and ``mismatched`` is added when a key was judged with atol/rtol.

    >>> statistics_for(result, ["mean"])
    ['mean_abs', 'max_abs']
    """
    names = _as_list(methods)
    auto = not names
    if auto:
        names = _as_list(result.options.get("methods", result.options.get("method")))
        for r in result.results:
            names.extend(m for m in r.methods if m not in names)
        if not names:
            names = ["mean"]  # reprod_log's default
    stats: list[str] = []
    for name in names:
        for m in ALL_METHODS if name == "all" else (name,):
            stat = STAT_OF_METHOD.get(m, m)
            if stat not in _STATISTICS:
                known = ", ".join([*STAT_OF_METHOD, "all", *_STATISTICS])
                raise ValueError(f"unknown method or statistic {m!r}; known: {known}")
            if stat not in stats:
                stats.append(stat)
    if "max_abs" not in stats:
        stats.append("max_abs")
    if auto and "mismatched" not in stats and any(r.mismatched is not None for r in result.results):
        stats.append("mismatched")
    return stats


def _pair(ref: str, other: str, ref_missing: bool, other_missing: bool) -> str:
    # a missing or extra key has one side only; its verdict already says which
    if other_missing or ref == other:
        return ref
    if ref_missing:
        return other
    return f"{ref}->{other}"


def _shape_cell(r: KeyResult) -> str:
    return _pair(
        fmt_shape(r.ref_shape), fmt_shape(r.other_shape), r.ref_shape is None, r.other_shape is None
    )


def _dtype_cell(r: KeyResult) -> str:
    return _pair(
        r.ref_dtype or "-", r.other_dtype or "-", r.ref_dtype is None, r.other_dtype is None
    )


def _stat_cell(r: KeyResult, stat: str) -> str:
    if stat == "mismatched":
        return "-" if r.mismatched is None else f"{r.mismatched}/{r.size}"
    if stat == "noise_multiple":  # "2.4x" against "4,800x": the calibrated verdict at a glance
        return fmt_multiple(r.noise_multiple)
    return fmt_num(getattr(r, stat))


def _threshold_cell(r: KeyResult) -> str:
    if "noise" in r.thresholds:
        return f"{fmt_multiple(r.thresholds['noise'])} noise"
    if r.thresholds:
        values = list(r.thresholds.values())
        if all(v == values[0] for v in values):
            return fmt_num(values[0])
        return " ".join(f"{m}={fmt_num(v)}" for m, v in r.thresholds.items())
    if r.atol is not None or r.rtol is not None:
        return f"atol={fmt_num(r.atol)} rtol={fmt_num(r.rtol)}"
    return "-"


def verdict(r: KeyResult) -> str:
    """``ok`` for a passing key, else its status upper-cased (``FAILED``, ``NAN``, ``SHAPE``);
    ``KINK`` for a key that passes only as downstream of a kink crossing (``explain_kinks``),
    ``KNOWN`` for one whose difference a known framework difference explains."""
    if r.status in ("kink", "known"):
        return r.status.upper()
    return "ok" if r.passed else r.status.upper()


def table_columns(stats: Sequence[str]) -> list[str]:
    """Column headers of the table for the given statistic columns (the first is the marker)."""
    return ["", "key", "shape", "dtype", *stats, "threshold", "verdict"]


def table_rows(
    result: DiffResult, stats: Sequence[str], *, failed_only: bool = False
) -> list[list[str]]:
    """One row of formatted cells per key, in the result's order, matching ``table_columns``."""
    first = result.first_failure
    rows = []
    for r in result.results:
        if failed_only and r.passed:
            continue
        mark = "" if r.passed else FIRST_MARK if r is first else FAIL_MARK
        rows.append(
            [
                mark,
                r.key,
                _shape_cell(r),
                _dtype_cell(r),
                *(_stat_cell(r, s) for s in stats),
                _threshold_cell(r),
                verdict(r),
            ]
        )
    return rows


def render_table(
    result: DiffResult,
    *,
    methods: Optional[Iterable[str]] = None,
    failed_only: bool = False,
    tablefmt: str = "simple",
    max_rows: Optional[int] = None,
) -> str:
    """One row per key and the summary line below; the first failing key is marked ``>>``, the
    other failures ``!``. ``failed_only`` leaves out the passing keys; ``max_rows`` shows the
    first ``max_rows`` rows and then a ``... N more rows`` line (the summary still counts every
    key).

    >>> print(render_table(reprod.compare("torch.npy", "paddle.npy")))
        key     shape    dtype    mean_abs   max_abs    threshold  verdict
    --  ------  -------  -------  ---------  ---------  ---------  -------
        logits  [2, 10]  float32  1.192e-07  4.768e-07  1.000e-06  ok
    ...
    """
    stats = statistics_for(result, methods)
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be 0 or more, got {max_rows}")
    rows = table_rows(result, stats, failed_only=failed_only)
    if not rows:
        return result.summary_line()
    more = ""
    if max_rows is not None and len(rows) > max_rows:
        hidden = len(rows) - max_rows
        more = f"... {hidden} more row{'' if hidden == 1 else 's'}\n"
        rows = rows[:max_rows]
        if not rows:
            return more + result.summary_line()
    # numbers right-aligned so that exponents line up down a column
    align = ["left"] * 4 + ["right"] * (len(stats) + 1) + ["left"]
    headers = table_columns(stats)
    table = _simple_table(rows, headers, align) if tablefmt == "simple" else None
    if table is None:
        from tabulate import tabulate  # only the table needs it

        # disable_numparse: the cells are already formatted; tabulate must not re-format "1.000e-06"
        table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True,
                         colalign=align)
    return table + "\n" + more + result.summary_line()


def _simple_table(rows: Sequence[Sequence[str]], headers: Sequence[str],
                  align: Sequence[str]) -> Optional[str]:
    """tabulate's "simple" table of plain ASCII cells, character for character: tabulate spent
    ~4 us a cell (0.18 s on a 5,000-key dump, longer than the comparison); ``None`` when a cell
    is anything but printable ASCII (wide characters, newlines), which tabulate then lays out.
    Cells are stripped; each column is as wide as its widest cell or its header plus two; columns
    are joined by two spaces; lines carry no trailing blanks (tests/report/test_report_renderers.py
    compares it with tabulate on random tables)."""
    if not all(type(h) is str and h.isascii() and h.isprintable() for h in headers):
        return None
    widths = [len(h) + 2 for h in headers]
    stripped = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if type(cell) is not str or not (cell.isascii() and cell.isprintable()):
                return None
            cell = cell.strip()  # tabulate strips the blanks around a cell's text (not a header's)
            if len(cell) > widths[i]:
                widths[i] = len(cell)
            cells.append(cell)
        stripped.append(cells)
    right = [a == "right" for a in align]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(cells, widths, right)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, stripped)])


def _value(x: Optional[float]) -> str:
    # the two values at the worst element in full precision: 3 digits often print them equal
    return "-" if x is None else repr(float(x))


def render_first_failure(result: DiffResult) -> str:
    """The first failing key in detail: verdict, reason, shapes, dtypes, the worst element and
    every statistic; ``all keys passed`` when none fails.

    >>> print(render_first_failure(result))
    first failure: fc.weight (FAILED)
      reason:    mean_abs 3.100e-04 > threshold 1.000e-06
    ...
    """
    r = result.first_failure
    if r is None:
        return f"all keys passed ({len(result.results)} compared)"
    lines = [
        f"first failure: {r.key} ({verdict(r)})",
        f"  reason:    {r.reason}",
        f"  shape:     {fmt_shape(r.ref_shape)} (ref), {fmt_shape(r.other_shape)} (other)",
        f"  dtype:     {r.ref_dtype or '-'} (ref), {r.other_dtype or '-'} (other)",
    ]
    if r.worst_index is not None:
        index = "(" + ", ".join(str(int(i)) for i in r.worst_index) + ")"
        lines.append(
            f"  worst:     index {index}: ref {_value(r.worst_ref)}, other {_value(r.worst_other)}"
        )
    for stat in _STATISTICS:
        if stat == "mismatched":
            if r.mismatched is not None:
                share = fmt_num(r.mismatch_ratio)
                lines.append(f"  {stat + ':':<10} {r.mismatched} / {r.size} ({share})")
            continue
        if stat in ("rel_l2", "max_scaled", "noise_multiple") and getattr(r, stat) is None:
            continue  # uncalibrated keys, results written before these statistics existed
        if stat == "noise_multiple":
            lines.append(f"  noise:     {fmt_multiple(r.noise_multiple)} the reference's own noise "
                         f"(L2 {fmt_num(r.noise_l2)}, max {fmt_num(r.noise_max)})")
            continue
        lines.append(f"  {stat + ':':<10} {fmt_num(getattr(r, stat))}")
    if r.ref_nan or r.ref_inf or r.other_nan or r.other_inf:
        lines.append(
            f"  nan/inf:   ref {r.ref_nan} nan, {r.ref_inf} inf; "
            f"other {r.other_nan} nan, {r.other_inf} inf"
        )
    if r.thresholds:
        lines.append(f"  threshold: {_threshold_cell(r)}")
    if r.checks:
        checks = ", ".join(f"{m} {'passed' if ok else 'failed'}" for m, ok in r.checks.items())
        lines.append(f"  checks:    {checks}")
    if r.atol is not None or r.rtol is not None:
        lines.append(f"  tolerance: atol {fmt_num(r.atol)}, rtol {fmt_num(r.rtol)}")
    if r.note:
        lines.append(f"  note:      {r.note}")
    failed = len(result.failed)
    if failed > 1:
        lines.append(f"  ({failed - 1} more failing key{'s' if failed > 2 else ''} after this one)")
    return "\n".join(lines)
