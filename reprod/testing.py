"""``assert_aligned``: one assertion for tests and scripts, with dtype-aware default tolerances.

>>> from reprod.testing import assert_aligned
>>> assert_aligned(torch_logits, paddle_logits)              # tolerances from the dtypes
>>> assert_aligned("fwd_torch.npy", "fwd_paddle.npy", threshold=1e-5)   # reprod_log semantics

The engine (``reprod.compare``) computes every statistic; this module only chooses tolerances,
turns failing ``KeyResult``s into one message shape, and tells the pytest plugin about each check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Callable, Optional

from .diff.criteria import DEFAULT_TOLERANCES, Criteria, Tolerance, default_tolerance
from .diff.result import DiffResult, KeyResult
from .report.format import fmt_num, fmt_shape

__all__ = [
    "assert_aligned",
    "format_failure",
    "format_failures",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "default_tolerance",
]


# --------------------------------------------------------------------------------------------
# the message: a pure function of KeyResults
# --------------------------------------------------------------------------------------------

_METHOD_LABEL = {
    "mean": "mean abs diff",
    "max": "max abs diff",
    "min": "min abs diff",
    "mean_rel": "mean rel diff",
    "max_rel": "max rel diff",
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
        if kr.ref_shape and len(kr.ref_shape) >= 2 and kr.other_shape == kr.ref_shape[::-1]:
            # the most common port bug of all: paddle's Linear weight is [in, out], torch's [out, in]
            text += " (a transpose: paddle stores Linear weights as [in, out], torch as [out, in])"
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
            label = _METHOD_LABEL.get(method, f"{method} diff")
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
        return f"all {len(result)} keys aligned; {where}"
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


# --------------------------------------------------------------------------------------------
# assert_aligned
# --------------------------------------------------------------------------------------------

# The pytest plugin listens here; only the innermost session (the last pushed) hears a check,
# so a pytest run nested in another (pytester) does not leak its checks to the outer one.
_listeners: list[Callable[[DiffResult, str, Optional[str]], None]] = []


def _push_listener(fn: Callable[[DiffResult, str, Optional[str]], None]) -> None:
    _listeners.append(fn)


def _pop_listener(fn: Callable[[DiffResult, str, Optional[str]], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _as_mapping(value: Any) -> Any:
    """A path or mapping as given; a single array/tensor/number as the one key ``"value"``."""
    if isinstance(value, (str, os.PathLike, Mapping)):
        return value
    return {"value": value}


def _check(
    ref: Any,
    other: Any,
    *,
    kind: str,
    reference: Optional[str],
    method: Any,
    threshold: Optional[float],
    atol: Optional[float],
    rtol: Optional[float],
    per_key: Any,
    keys: Any = None,
    equal_nan: bool = False,
    msg: Optional[str] = None,
    other_name: Optional[str] = None,
) -> DiffResult:
    __tracebackhide__ = True
    ref, other = _as_mapping(ref), _as_mapping(other)
    if method is not None or threshold is not None or per_key:
        from .diff.engine import compare

        # reprod_log semantics: a statistic against a threshold (plus atol/rtol when given)
        result = compare(
            ref,
            other,
            method="mean" if method is None else method,
            threshold=1e-6 if threshold is None else threshold,
            atol=atol,
            rtol=rtol,
            per_key=per_key,
            keys=keys,
            equal_nan=equal_nan,
        )
    elif atol is not None or rtol is not None:
        from .diff.engine import compare

        result = compare(
            ref,
            other,
            method=None,
            threshold=None,
            atol=atol or 0.0,
            rtol=rtol or 0.0,
            keys=keys,
            equal_nan=equal_nan,
        )
    else:
        from .diff.engine import compare

        # torch.testing's tolerances for each pair's two dtypes, resolved by the engine per key
        result = compare(ref, other, keys=keys, criteria=Criteria(
            methods=None, threshold=None, equal_nan=equal_nan, dtype_tolerances=True))
    if other_name is not None:
        result = replace(result, other_name=other_name)
    if _listeners:
        _listeners[-1](result, kind, reference)
    if not result.passed:
        text = format_failures(result)
        raise AssertionError(text if msg is None else f"{msg}\n{text}")
    return result


def assert_aligned(
    ref: Any,
    other: Any,
    *,
    method: Any = None,
    threshold: Optional[float] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_key: Any = None,
    keys: Any = None,
    equal_nan: bool = False,
    msg: Optional[str] = None,
) -> DiffResult:
    """Pass silently (returning the ``DiffResult``) or raise ``AssertionError`` listing every
    failing key, one :func:`format_failure` line each, then a summary line.

    ``ref``/``other``: dump paths, (nested) mappings of arrays/tensors, or single arrays/tensors
    of any supported framework (compared as the one key ``"value"``).

    Tolerances, in order of precedence:

    - ``method``/``threshold``/``per_key`` given: reprod_log semantics, as ``reprod.compare``
      (``method="mean"``, ``threshold=1e-6`` when one of them is left out); ``atol``/``rtol``, if
      also given, add the element-wise rule.
    - only ``atol`` and/or ``rtol``: ``|other - ref| <= atol + rtol*|ref|`` for every element (the
      one left out is 0).
    - nothing: that rule with each key's defaults from :data:`DEFAULT_TOLERANCES` by dtype (the
      looser of the two sides; integers and bool exact).

    ``equal_nan=True`` lets NaN at the same positions pass; ``msg`` is put above the report.

    >>> assert_aligned(torch_out, paddle_out)                    # float32: rtol 1.3e-6, atol 1e-5
    >>> assert_aligned("fwd_torch.npy", "fwd_paddle.npy", threshold=1e-5)
    """
    __tracebackhide__ = True
    return _check(
        ref,
        other,
        kind="assert_aligned",
        reference=None,
        method=method,
        threshold=threshold,
        atol=atol,
        rtol=rtol,
        per_key=per_key,
        keys=keys,
        equal_nan=equal_nan,
        msg=msg,
    )
