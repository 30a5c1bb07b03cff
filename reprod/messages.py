"""Every sentence reprod writes about a comparison: numbers, reasons, failure lines and hints.

``diff/`` decides verdicts without words and asks this module for the reason it stores on each
``KeyResult``; ``reprod.testing``'s failure messages, the table's first-failure block and the log
renderer read their words from here too, so a statistic is named and printed one way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .diff.result import DiffResult, KeyResult

__all__ = [
    "fmt_num",
    "fmt_shape",
    "fmt_multiple",
    "METHOD_LABEL",
    "TRANSPOSE_HINT",
    "format_failure",
    "format_failures",
]

# the most common port bug of all: paddle's Linear weight is [in, out], torch's [out, in]
TRANSPOSE_HINT = ("other is the transpose of ref (a Linear weight? paddle stores [in, out], "
                  "torch [out, in]): transpose one side")


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    """Scientific notation with a fixed number of digits: ``3.100e-04``; ``-`` for a missing value."""
    if type(x) is float and digits == 3 and x - x == 0.0:  # finite: the common case, formatted once
        return f"{x:.3e}"
    if x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}e}"


def fmt_shape(shape: Optional[tuple[int, ...]]) -> str:
    """``(2, 3)`` as ``[2, 3]``; ``-`` when the key has no array on that side."""
    if shape is None:
        return "-"
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def fmt_multiple(x: Optional[float]) -> str:
    """A noise multiple as a reader compares them: ``2.4x``, ``48x``, ``4,800x``."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "inf" if x > 0 else "nan"
    if x < 10:
        return f"{x:.2g}x" if x >= 0.01 else ("0x" if x == 0 else f"{x:.1e}x")
    digits = 3 if x < 1e15 else 1
    return f"{float(f'{x:.{digits}g}'):,.0f}x" if x < 1e15 else f"{x:.1e}x"


# --- reasons stored on KeyResult (the engine decides the verdict, these say it) -------------------

def reason_one_sided(kind: str) -> str:
    return "key only in ref (missing from other)" if kind == "missing" else "key only in other (not in ref)"


REASON_TYPE = "a nested dict on one side, an array on the other"
REASON_BOTH_EMPTY = "both empty"
SIZE_ONE_AXES_STRICT = "shapes differ only by axes of size 1 (strict_shape: a failure)"


def shape_str(s: Optional[tuple[int, ...]]) -> str:
    """``(2, 3)``, ``(5,)``; ``-`` when there is no array."""
    if s is None:
        return "-"
    return "(" + ", ".join(str(x) for x in s) + ("," if len(s) == 1 else "") + ")"


def note_dtypes(rdt: str, odt: str) -> str:
    return f"dtypes differ ({rdt} vs {odt}), compared by value"


def note_size_one_axes(ref_shape: tuple[int, ...], other_shape: tuple[int, ...]) -> str:
    return (f"shapes differ only by axes of size 1 ({shape_str(ref_shape)} vs "
            f"{shape_str(other_shape)}), compared element by element")


def reason_empty(ref_shape: tuple[int, ...], other_shape: tuple[int, ...]) -> str:
    return f"one side is empty (ref {shape_str(ref_shape)}, other {shape_str(other_shape)})"


def reason_shape(ref_shape: tuple[int, ...], other_shape: tuple[int, ...], hint: str) -> str:
    return (f"shape {shape_str(other_shape)} does not match ref {shape_str(ref_shape)}"
            + (f"; {hint}" if hint else ""))


def reason_nan(unmatched: int, ref_nan: int, other_nan: int, equal_nan: bool) -> str:
    return (f"{unmatched} NaN position(s) (ref {ref_nan} NaN, other {other_nan} NaN)"
            + ("" if equal_nan else "; NaN never passes unless equal_nan=True"))


def reason_inf(unmatched: int, ref_inf: int, other_inf: int) -> str:
    return (f"{unmatched} Inf position(s) without an equal Inf on the other side "
            f"(ref {ref_inf} Inf, other {other_inf} Inf)")


def reason_nothing(ref: str, other: str, filtered: bool) -> str:
    what = "no key matches the key filter" if filtered else "neither side holds an array"
    return f"nothing to compare: {what} (ref {ref}, other {other})"


def reason_non_numeric(sides: list[str]) -> str:
    return "; ".join(sides) + ", not numeric data"


def note_uncalibrated(why: str) -> str:
    return f"no noise calibration ({why}): judged by the plain threshold"


def note_flips(rows: int, total: int) -> str:
    return (f"{rows} of {total} rows set apart: there the reference's float64 run took another "
            "branch than its float32 run (a router's choice, an argmax or a top-k near a tie), "
            "and either side may; the other rows judged against their own noise")


def why_coarser_port(other: str, ref: str) -> str:
    return (f"other is {other}, ref {ref}: this noise measures {ref} rounding, not {other}'s; "
            f"compare the reference run in {other} against other, with the {ref} run as the noise")


def note_half_values(sides: list[tuple[str, str, str]]) -> str:
    """``sides``: (side, precision, dtype) of each side holding half-precision values."""
    if len(sides) == 2 and sides[0][1:] == sides[1][1:]:
        return f"both hold {sides[0][1]} values in {sides[0][2]}"
    return "; ".join(f"{side} holds {p} values in {dt}" for side, p, dt in sides)


def note_half_side(side: str, precision: str, dtype: str, other: str) -> str:
    """A failing key whose ``side`` holds ``precision`` values (in ``dtype``) and the other
    side not: uncalibrated, the difference may be that rounding alone."""
    held = "" if dtype == precision else f" held in {dtype}"
    return (f"{side} holds {precision} values{held}, {other} does not: a {precision} run "
            f"differs from a float32 one by its rounding; compare the reference run in "
            f"{precision} against it, with the float32 run as --noise")


def summary_left_out(ref: int, other: int) -> str:
    """What a pairing left out of each side (``compare(pair=...)``), for the summary line."""
    parts = [f"{n} {side} {'key' if n == 1 else 'keys'}" for n, side in
             ((ref, "reference"), (other, "other")) if n]
    return " and ".join(parts) + " with no counterpart left out"


def reason_replay_raised(layer: str, why: str) -> str:
    return f"not replayed: port layer {layer} cannot run on the reference's input ({why})"


def reason_replay_unpaired(layer: str, cls: str, tensors: int, why: str) -> str:
    held = f"{tensors} parameter or buffer tensor{'' if tensors == 1 else 's'}"
    return (f"port layer {layer} ({cls}, {held}) was not replayed: {why}; its weights are checked "
            "nowhere (a layer the reference lacks, or one too broken to pair: rename= pairs it)")


def note_derived(op: str) -> str:
    return (f"set against the {op} of the reference's output: the port's layer applies the "
            f"{op} the reference calls as a function after it, which no reference layer records")


def summary_not_replayed(port: int, ref: int) -> str:
    """Layers ``replay`` ran on neither side, for the summary line: never a silent gap."""
    parts = [f"{n} {side} {'layer' if n == 1 else 'layers'}" for n, side in
             ((port, "port"), (ref, "reference")) if n]
    return (" and ".join(parts) + " not replayed: options['replay_skipped'] and "
            "['replay_unpaired'] say which")


def summary_uncalibrated(n: int, why: str) -> str:
    return f"{n} {'key' if n == 1 else 'keys'} not calibrated: {why}"


# the same few thresholds are printed in every key's reason
_THRESHOLD_TEXT: dict[float, str] = {}


def _fmt_threshold(t: float) -> str:
    text = _THRESHOLD_TEXT.get(t)
    if text is None:
        text = fmt_num(t)
        # not zero: -0.0 == 0.0 as a key but prints differently
        if type(t) is float and t != 0.0 and len(_THRESHOLD_TEXT) < 256:
            _THRESHOLD_TEXT[t] = text
    return text


def _check_text(method: str, value: Optional[float], threshold: float, op: str) -> str:
    if method == "noise":  # "2.4x noise <= 10x"
        return f"{fmt_multiple(value)} noise {op} {fmt_multiple(threshold)}"
    return f"{method} {fmt_num(value)} {op} {_fmt_threshold(threshold)}"


def reason_judged(status: str, values: Mapping[str, Optional[float]], thresholds: Mapping[str, float],
                  checks: Mapping[str, bool], *, mismatched: Optional[int], size: int,
                  atol: Optional[float], rtol: Optional[float],
                  worst_index: Optional[tuple[int, ...]], worst_ref: Optional[float],
                  worst_other: Optional[float]) -> str:
    """The reason of a finite comparison: every check that decided it, and the worst element."""
    from .diff.result import STAT_OF_METHOD

    if status == "passed":
        reason = "; ".join([_check_text(m, values[STAT_OF_METHOD[m]], t, "<=")
                            for m, t in thresholds.items()]) or "compared (no statistic checked)"
        if mismatched == 0:
            reason += f"; all elements within atol={atol or 0:g}, rtol={rtol or 0:g}"
        return reason
    at = ""
    if worst_index is not None and worst_ref is not None and worst_other is not None:
        at = f" at index {worst_index} (ref {worst_ref:.6g}, other {worst_other:.6g})"
    if status == "failed":
        return "; ".join(_check_text(m, values[STAT_OF_METHOD[m]], thresholds[m], ">")
                         for m, good in checks.items() if not good) + at
    assert mismatched
    return (f"{mismatched} / {size} elements ({100.0 * mismatched / size:.3g}%) outside "
            f"atol+rtol*|ref| (atol={atol or 0:g}, rtol={rtol or 0:g}){at}")


# --- failure lines (assert_aligned, the pytest plugin) ---------------------------------------------

METHOD_LABEL = {
    "mean": "mean abs diff",
    "max": "max abs diff",
    "min": "min abs diff",
    "mean_rel": "mean rel diff",
    "max_rel": "max rel diff",
    "rel_l2": "relative L2 diff",
    "max_scaled": "max diff / max |ref|",
    "noise": "noise multiple",
}


def _percent(part: int, whole: int) -> str:
    pct = 100.0 * part / whole
    text = f"{pct:.3g}"
    # %g never rounds a non-zero share to "0", but it does round 99.9999 up to "100"
    if text == "100" and part < whole:
        text = "99.9"
    return text + "%"


def _index(index: tuple[int, ...]) -> str:
    return repr(tuple(int(i) for i in index))


def _worst(kr: KeyResult, head: str) -> str:
    """``<head> at index (2, 7) (ref 1.234e-01, other 1.237e-01)``, leaving out what is unknown."""
    text = head
    if kr.worst_index is not None and len(kr.worst_index) > 0:
        text += f" at index {_index(kr.worst_index)}"
    if kr.worst_ref is not None or kr.worst_other is not None:
        ref, other = _distinct(kr.worst_ref, kr.worst_other)
        text += f" (ref {ref}, other {other})"
    return text


def _distinct(a: Optional[float], b: Optional[float]) -> tuple[str, str]:
    """Both values with the fewest digits (3 at least) that print them differently: the worst
    element of a close comparison often agrees in its first four digits."""
    for digits in range(3, 17):
        ta, tb = fmt_num(a, digits), fmt_num(b, digits)
        if ta != tb:
            break
    return ta, tb


def _structural(kr: KeyResult) -> str:
    if kr.status == "shape":
        text = f"shape mismatch: ref {fmt_shape(kr.ref_shape)}, other {fmt_shape(kr.other_shape)}"
        if kr.ref_shape and len(kr.ref_shape) >= 2 and kr.other_shape == kr.ref_shape[::-1] \
                and TRANSPOSE_HINT not in (kr.note or ""):  # the engine's note carries it already
            text += f" ({TRANSPOSE_HINT})"
        return text
    if kr.status == "missing":
        return f"missing in other (ref shape {fmt_shape(kr.ref_shape)})"
    if kr.status == "extra":
        return f"extra key, not in ref (other shape {fmt_shape(kr.other_shape)})"
    if kr.status == "empty":
        return f"empty array: ref {fmt_shape(kr.ref_shape)}, other {fmt_shape(kr.other_shape)}"
    return kr.reason  # "type": a nested mapping against an array; the engine says which side


def format_failure(kr: KeyResult) -> str:
    """One line for one key, always in the same shape: ``<key>: <clause>; <clause>; ...``.

    The clauses, in this order and each only when it applies: unmatched NaN / Inf counts, every
    threshold check that failed (``mean abs diff 3.100e-04 > 1.000e-05``), the count of elements
    outside ``atol + rtol*|ref|``, the worst element (``max abs diff ... at index (2, 7) (ref ...,
    other ...)``, merged into the ``max`` check when that one failed), then the engine's note.
    Structural verdicts (shape, missing, extra, empty, type) give one clause naming both sides.

    >>> format_failure(result["logits"])
    'logits: 12 / 1000 elements (1.2%) outside atol+rtol*|ref| (atol 1.000e-05, rtol 1.300e-06); max abs diff 3.100e-04 at index (2, 7) (ref 1.234e-01, other 1.237e-01)'
    """
    if kr.status == "passed":
        return f"{kr.key}: passed"
    clauses: list[str] = []
    if kr.status in ("shape", "missing", "extra", "empty", "type"):
        clauses.append(_structural(kr))
    elif kr.status == "setting":  # a layer setting, no values: its reason says both sides
        return f"{kr.key}: {kr.reason}"
    else:
        if kr.status in ("nan", "inf"):
            if kr.ref_nan or kr.other_nan:
                nan = f"NaN: {kr.ref_nan} in ref, {kr.other_nan} in other"
                if kr.ref_nan and kr.other_nan:
                    nan += " (equal_nan=True lets NaN at the same positions pass)"
                clauses.append(nan)
            if kr.ref_inf or kr.other_inf:
                clauses.append(f"Inf: {kr.ref_inf} in ref, {kr.other_inf} in other")
        worst_told = False
        for method in kr.methods:
            if kr.checks.get(method, True):
                continue
            label = METHOD_LABEL.get(method, f"{method} diff")
            if method == "noise":
                check = f"{fmt_multiple(kr.stat(method))} noise > {fmt_multiple(kr.thresholds.get(method))}"
            else:
                check = f"{label} {fmt_num(kr.stat(method))} > {fmt_num(kr.thresholds.get(method))}"
            if method == "max":
                check = _worst(kr, check)
                worst_told = True
            clauses.append(check)
        if kr.mismatched and kr.size:
            clauses.append(
                f"{kr.mismatched} / {kr.size} elements ({_percent(kr.mismatched, kr.size)}) "
                f"outside atol+rtol*|ref| (atol {fmt_num(kr.atol or 0.0)}, rtol {fmt_num(kr.rtol or 0.0)})"
            )
        if not worst_told and kr.max_abs is not None:
            clauses.append(_worst(kr, f"max abs diff {fmt_num(kr.max_abs)}"))
        if not clauses:  # a verdict this module does not know yet: the engine's words
            clauses.append(kr.reason or kr.status)
    if kr.note:
        clauses.append(kr.note)
    return f"{kr.key}: " + "; ".join(clauses)


def _summary(result: DiffResult) -> str:
    failed = result.failed
    where = f"ref: {result.ref_name}, other: {result.other_name}"
    if not failed:
        return f"{'the 1 key' if len(result) == 1 else f'all {len(result)} keys'} aligned; {where}"
    counts: dict[str, int] = {}
    for kr in failed:
        counts[kr.status] = counts.get(kr.status, 0) + 1
    by_status = ", ".join(f"{status} {n}" for status, n in counts.items())
    return f"{len(failed)} of {len(result)} keys not aligned ({by_status}); {where}"


def format_failures(result: DiffResult) -> str:
    """Every failing key, one :func:`format_failure` line each, then one summary line.

    >>> print(format_failures(result))
    logits: 12 / 1000 elements (1.2%) outside atol+rtol*|ref| (atol 1.000e-05, rtol 1.300e-06); ...
    loss: NaN: 0 in ref, 1 in other
    2 of 3 keys not aligned (mismatch 1, nan 1); ref: torch.npz, other: paddle.npz
    """
    return "\n".join([format_failure(kr) for kr in result.failed] + [_summary(result)])


