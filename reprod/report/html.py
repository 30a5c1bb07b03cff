"""A DiffResult as one self-contained HTML page: verdict, findings, per-step summary, error chart,
sortable table (failing keys first), key detail.

The page needs no network at view time: CSS, JavaScript and data are inline, and the chart is drawn
by the page's own small script on a canvas. The result travels as one JSON blob stored column by
column (a 10,000-key result stays a few MB); no tensor is embedded, only per-key statistics and,
when the caller has them, per-key histograms of element-wise differences.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, Optional

from ..diff.result import STAT_OF_METHOD, DiffResult, KeyResult
from ..messages import fmt_multiple, fmt_num
from ..storage.atomic import AtomicFile

__all__ = ["render_html", "write_html"]

Histogram = tuple[Sequence[float], Sequence[int]]

# Every KeyResult field the page shows, in the order the JSON blob stores them.
_COLUMNS = (
    "key", "passed", "status", "reason", "path", "ref_shape", "other_shape", "ref_dtype",
    "other_dtype", "size", "mean_abs", "max_abs", "min_abs", "mean_rel", "max_rel", "cosine",
    "rel_l2", "max_scaled", "noise_multiple", "noise_l2", "noise_max",
    "worst_index", "worst_ref", "worst_other", "mismatched", "ref_nan", "ref_inf", "other_nan",
    "other_inf", "methods", "thresholds", "checks", "atol", "rtol", "note",
)  # fmt: skip

# Embedded JSON may contain any user text (key names, file names); escaping these characters
# means no "</script>", "<!--" or "]]>" can end or confuse the script element that holds it.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}

_PLACEHOLDER = re.compile(r"/\*@(TITLE|HEADER|STEPS|DATA)@\*/")

# a group name that reads as a training step: step_1, step1, iter_3, epoch-2, iteration10
_STEP_NAME = re.compile(r"^(?:step|iter|iteration|epoch|batch)[_\-.]?\d+$", re.I)
_MAX_GROUPS = 200  # more groups than this is not a summary any more


def render_html(
    result: DiffResult,
    *,
    title: Optional[str] = None,
    histograms: Optional[Mapping[str, Histogram]] = None,
    findings: Sequence[str] = (),
) -> str:
    """The report as one HTML document (a string) that opens offline in any browser.

    ``findings`` are one-line sentences shown at the very top of the page, above everything else:
    where the two sides part ways (``reprod.capture.first_divergence(result).message``), what a
    replay found. They are text (escaped), never HTML.

    When every key belongs to a group (``KeyResult.path[0]``, or the text before the key's first
    ``/``: ``step_1/loss``, ``forward/logits``) and there are several groups, a per-step table
    (keys, passed, failed, worst noise multiple or max |diff|, first failing key) opens the page.

    ``histograms`` maps a key to ``(bin_edges, counts)`` of its element-wise differences; the
    page draws it in the key's detail panel. ``numpy.histogram``'s ``(counts, bin_edges)`` is
    accepted as is: the edges are the sequence with one element more.

    >>> page = render_html(reprod.compare("torch.npy", "paddle.npy"), title="MobileNetV3 forward")
    >>> page.startswith("<!DOCTYPE html>")
    True
    """
    if title is None:
        title = f"reprod diff: {result.ref_name} vs {result.other_name}"
    lines = _findings(findings)
    steps = _step_summary(result)
    payload = {
        "version": 1,
        "title": title,
        "passed": result.passed,
        "summary": result.summary(),
        "ref": result.ref_name,
        "other": result.other_name,
        "created": result.created,
        "options": _json_value(dict(result.options)),
        "chart_stat": _chart_stat(result),
        "findings": lines,
        "steps": steps,
        "keys": _columns(result.results),
        "histograms": _histograms(result, histograms),
    }
    fills = {
        "TITLE": html.escape(title),
        "HEADER": _header(result, title, lines),
        "STEPS": _steps_html(steps),
        "DATA": _script_json(payload),
    }
    # one pass, so text inserted for one placeholder is never scanned for another
    return _PLACEHOLDER.sub(lambda m: fills[m.group(1)], _template())


def write_html(
    result: DiffResult,
    path: str | os.PathLike[str],
    *,
    title: Optional[str] = None,
    histograms: Optional[Mapping[str, Histogram]] = None,
    findings: Sequence[str] = (),
) -> str:
    """Write :func:`render_html` to ``path`` atomically and return the absolute path written.

    An earlier report at ``path`` stays intact if anything fails before the final rename.

    >>> write_html(reprod.compare("torch.npy", "paddle.npy"), "report.html")
    '/home/me/run/report.html'
    """
    page = render_html(result, title=title, histograms=histograms, findings=findings)
    data = page.encode("utf-8", "backslashreplace")  # lone surrogates (non-UTF-8 names) escaped
    # a failed write raises the WriteError naming ``path`` (not the hidden temporary file)
    with AtomicFile(os.fspath(path)) as f:
        f.file.write(data)
    return f.path


# --- pieces ---------------------------------------------------------------------------------------


def _template() -> str:
    return resources.files(__package__).joinpath("_html_template.html").read_text(encoding="utf-8")


def _json_value(v: Any) -> Any:
    """JSON has no inf/nan: they travel as the strings "inf", "-inf", "nan" (as in to_dict)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return v


def _columns(results: Sequence[KeyResult]) -> dict[str, list[Any]]:
    """Column-major storage: one list per field, so field names are not repeated per key, and a
    field that is empty for every key (say ``note``) is left out entirely."""
    cols: dict[str, list[Any]] = {}
    for name in _COLUMNS:
        if name == "path":  # most keys are flat: their path is just (key,), not worth repeating
            values = [None if r.path in ((), (r.key,)) else list(r.path) for r in results]
        else:
            values = [_json_value(getattr(r, name)) for r in results]
        if name == "key" or any(v not in (None, {}, [], "") for v in values):
            cols[name] = values
    return cols


def _chart_stat(result: DiffResult) -> str:
    """The statistic the chart opens on: the noise multiple when the result is calibrated (at
    least half of the keys with statistics carry one); else max_abs, unless every key is judged on
    another statistic (reprod_log's default ``mean``), where plotting max_abs against a mean
    threshold would put passing keys above the threshold line. The page lets the reader switch."""
    measured = [r for r in result.results if r.max_abs is not None or r.noise_multiple is not None]
    calibrated = sum(r.noise_multiple is not None for r in measured)
    if calibrated and 2 * calibrated >= len(measured):
        return "noise_multiple"
    methods = [m for r in result.results for m in r.methods if m != "noise"]
    if not methods or "max" in methods:
        return "max_abs"
    return STAT_OF_METHOD.get(methods[0], "max_abs")


def _histograms(
    result: DiffResult, histograms: Optional[Mapping[str, Histogram]]
) -> dict[str, dict[str, list[Any]]]:
    if not histograms:
        return {}
    known = set(result.keys())
    out: dict[str, dict[str, list[Any]]] = {}
    for key, (edges, counts) in histograms.items():
        if key not in known:
            raise ValueError(f"histograms: key {key!r} is not in the result")
        if len(counts) == len(edges) + 1:  # numpy.histogram order
            edges, counts = counts, edges
        e = [float(x) for x in edges]
        c = [int(x) for x in counts]
        if len(e) != len(c) + 1 or not c:
            raise ValueError(
                f"histograms: key {key!r} has {len(e)} bin edges for {len(c)} counts "
                "(expected at least one bin and one edge more than counts)"
            )
        if any(not math.isfinite(x) for x in e) or any(b < a for a, b in zip(e, e[1:])):
            raise ValueError(f"histograms: key {key!r} bin edges must be finite and increasing")
        if any(x < 0 for x in c):
            raise ValueError(f"histograms: key {key!r} has a negative count")
        out[key] = {"edges": e, "counts": c}
    return out


def _script_json(payload: Any) -> str:
    text = json.dumps(
        payload, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str
    )
    for ch, esc in _SCRIPT_UNSAFE.items():
        text = text.replace(ch, esc)
    return text


def _findings(findings: Any) -> list[str]:
    """The findings as plain one-line strings; a lone string is one finding, an object with a
    ``message`` (a ``Divergence``) gives its message."""
    if findings is None:
        return []
    if isinstance(findings, str):
        findings = (findings,)
    out = []
    for f in findings:
        if f is None:
            continue
        text = str(getattr(f, "message", f))
        text = " ".join(text.split())  # one line, however it was written
        if text:
            out.append(text)
    return out


def _group_of(r: KeyResult) -> Optional[str]:
    if len(r.path) >= 2 and r.path[0]:
        return r.path[0]
    head, sep, _ = r.key.partition("/")
    return head if sep and head else None


def _worst(values: list[float]) -> Optional[float]:
    if not values:
        return None
    nan = [v for v in values if math.isnan(v)]
    return nan[0] if nan else max(values)


def _step_summary(result: DiffResult) -> list[dict[str, Any]]:
    """One row per step (group) when every key belongs to one and there are several; else []."""
    groups: dict[str, list[KeyResult]] = {}
    for r in result.results:
        g = _group_of(r)
        if g is None:
            return []
        groups.setdefault(g, []).append(r)
    if not 2 <= len(groups) <= _MAX_GROUPS:
        return []
    rows = []
    for name, rs in groups.items():
        first = next((r for r in rs if not r.passed), None)
        noise = [r.noise_multiple for r in rs if r.noise_multiple is not None]
        max_abs = [r.max_abs for r in rs if r.max_abs is not None]
        rows.append({
            "step": name,
            "keys": len(rs),
            "passed": sum(r.passed for r in rs),
            "failed": sum(not r.passed for r in rs),
            "worst_noise_multiple": _json_value(_worst(noise)),
            "worst_max_abs": _json_value(_worst(max_abs)),
            "first_failure": None if first is None else first.key,
            "first_failure_reason": None if first is None else first.reason,
        })  # fmt: skip
    return rows


def _steps_html(steps: list[dict[str, Any]]) -> str:
    """The per-step table, rendered here so it reads even with JavaScript off."""
    if not steps:
        return ""
    e = html.escape
    word = "step" if all(_STEP_NAME.match(s["step"]) for s in steps) else "group"
    noise = any(s["worst_noise_multiple"] is not None for s in steps)
    head = [word, "keys", "passed", "failed"] + (["worst noise"] if noise else [])
    head += ["worst max |diff|", "first failing key"]
    out = [
        '<section class="panel" id="steps-section">',
        f"<h2>Per {word}</h2>",
        '<div class="stepswrap"><table class="steps" id="steps">',
        "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>",
    ]
    for s in steps:
        cells = [
            f'<td class="t mono step">{e(s["step"])}</td>',
            f"<td>{s['keys']:,}</td>",
            f"<td>{s['passed']:,}</td>",
            f'<td class="{"bad" if s["failed"] else ""}">{s["failed"]:,}</td>',
        ]
        if noise:
            cells.append(f"<td>{e(fmt_multiple(_num(s['worst_noise_multiple'])))}</td>")
        cells.append(f"<td>{e(_fmt_opt(_num(s['worst_max_abs'])))}</td>")
        ff = s["first_failure"]
        if ff is None:
            cells.append('<td class="t muted">-</td>')
        else:
            title = f"{ff}: {s['first_failure_reason'] or ''}"
            cells.append(
                f'<td class="t mono"><a href="#" data-key="{e(ff)}" title="{e(title)}">'
                f"{e(ff)}</a></td>"
            )
        cls = "fail" if s["failed"] else "pass"
        out.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div></section>")
    return "\n".join(out)


def _num(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, str) else v  # "inf"/"nan" as _json_value wrote them


def _fmt_opt(v: Optional[float]) -> str:
    return "-" if v is None else fmt_num(v)


def _header(result: DiffResult, title: str, findings: Sequence[str] = ()) -> str:
    """The verdict block, rendered here so it reads even with JavaScript off."""
    e = html.escape
    s = result.summary()
    verdict = "PASSED" if result.passed else "FAILED"
    cls = "pass" if result.passed else "fail"
    parts = [
        f'<div class="verdict {cls}" id="verdict">{verdict}</div>',
        '<div class="headtext">',
        f'<h1 id="title">{e(title)}</h1>',
    ]
    if findings:
        parts.append(f'<ul class="findings {cls}" id="findings">')
        parts.extend(f'<li class="finding">{e(f)}</li>' for f in findings)
        parts.append("</ul>")
    parts += [
        f'<p class="summary" id="summary-line">{e(result.summary_line())}</p>',
        '<dl class="meta">',
        f'<dt>ref</dt><dd class="file" id="ref-name">{e(result.ref_name)}</dd>',
        f'<dt>other</dt><dd class="file" id="other-name">{e(result.other_name)}</dd>',
    ]
    if result.created:
        parts.append(f'<dt>created</dt><dd id="created">{e(result.created)}</dd>')
    shown = {k: v for k, v in result.options.items() if v is not None}  # unset tolerances: noise
    if shown:
        opts = " ".join(
            f'<span class="opt"><b>{e(str(k))}</b>={e(_option_text(v))}</span>'
            for k, v in shown.items()
        )
        parts.append(f'<dt>options</dt><dd id="options">{opts}</dd>')
    parts.append("</dl>")
    if s["first_failure"] is not None:
        parts.append(
            '<p class="first-failure" id="first-failure">first failure: '
            f'<a href="#" data-key="{e(s["first_failure"])}">{e(s["first_failure"])}</a>'
            f' <span class="reason">{e(s["first_failure_reason"] or "")}</span></p>'
        )
    parts.append("</div>")
    return "\n".join(parts)


def _option_text(v: Any) -> str:
    if isinstance(v, float):
        return fmt_num(v) if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join(_option_text(x) for x in v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_option_text(x)}" for k, x in v.items()) + "}"
    return str(v)
