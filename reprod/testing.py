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
from .diff.result import DiffResult
from .messages import format_failure, format_failures

__all__ = [
    "assert_aligned",
    "format_failure",
    "format_failures",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "default_tolerance",
]


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


def criteria_for(*, method: Any = None, threshold: Optional[float] = None,
                 atol: Optional[float] = None, rtol: Optional[float] = None, per_key: Any = None,
                 equal_nan: bool = False, noise_factor: Optional[float] = None) -> Criteria:
    """The :class:`reprod.Criteria` of an ``assert_aligned`` call (its precedence rules, below)."""
    if method is not None or threshold is not None or per_key:
        # reprod_log semantics: a statistic against a threshold (plus atol/rtol when given)
        return Criteria(methods="mean" if method is None else method,
                        threshold=1e-6 if threshold is None else threshold, atol=atol, rtol=rtol,
                        per_key=per_key, equal_nan=equal_nan, noise_factor=noise_factor)
    if atol is not None or rtol is not None:
        return Criteria(methods=None, threshold=None, atol=atol or 0.0, rtol=rtol or 0.0,
                        equal_nan=equal_nan, noise_factor=noise_factor)
    # torch.testing's tolerances for each pair's two dtypes, resolved by the engine per key
    return Criteria(methods=None, threshold=None, equal_nan=equal_nan, dtype_tolerances=True,
                    noise_factor=noise_factor)


def _check(ref: Any, other: Any, *, kind: str, reference: Optional[str], criteria: Criteria,
           keys: Any = None, noise: Any = None, msg: Optional[str] = None,
           other_name: Optional[str] = None, other_noise: Any = None) -> DiffResult:
    __tracebackhide__ = True
    from .diff.engine import compare

    result = compare(_as_mapping(ref), _as_mapping(other), keys=keys, criteria=criteria,
                     noise=None if noise is None else _as_mapping(noise),
                     other_noise=None if other_noise is None else _as_mapping(other_noise))
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
    noise: Any = None,
    noise_factor: Optional[float] = None,
    other_noise: Any = None,
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

    ``noise``: the reference computed in float64 (same keys): each key found there passes when
    its difference is within ``noise_factor`` (default 20) times the reference's own noise,
    whatever the tolerances above say (see ``reprod.compare``). ``other_noise``: the port
    computed in float64 too: a calibrated key that fails passes where the two float64 runs agree
    (the port's own rounding, ``reprod.compare``'s ``other_noise``).

    >>> assert_aligned(torch_out, paddle_out)                    # float32: rtol 1.3e-6, atol 1e-5
    >>> assert_aligned("fwd_torch.npy", "fwd_paddle.npy", threshold=1e-5)
    """
    __tracebackhide__ = True
    criteria = criteria_for(method=method, threshold=threshold, atol=atol, rtol=rtol,
                            per_key=per_key, equal_nan=equal_nan, noise_factor=noise_factor)
    return _check(ref, other, kind="assert_aligned", reference=None, criteria=criteria, keys=keys,
                  noise=noise, msg=msg, other_noise=other_noise)
