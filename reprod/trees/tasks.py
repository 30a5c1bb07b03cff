"""One file pair: the picklable task every executor runs (it opens its two files where it runs
and sends back only the verdicts), and the outcome that travels back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ReprodError

if TYPE_CHECKING:
    from ..diff.result import DiffResult


@dataclass(frozen=True)
class _Task:
    """One file pair, as a worker needs it: plain, picklable, small."""

    index: int
    rel: str
    ref: Optional[str]  # the path to open; None: the file is absent on this side
    other: Optional[str]
    ref_name: str  # the names results carry (as the caller gave the roots)
    other_name: str
    noise: Optional[str]  # None: no noise tree; "": a noise tree without this file
    nbytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # criteria, keys, verify, failed_only


@dataclass(frozen=True)
class _Outcome:
    index: int
    result: Optional[DiffResult]
    keys: int = 0
    passed_keys: int = 0
    error: Optional[BaseException] = None  # a ReprodError from reading the pair
    lost: str = ""  # why the pair was not compared (its worker died), "" when it was


def _open(path: str, verify: bool) -> Any:
    if verify:
        from ..storage import load

        return load(path, verify=True)
    return path


def _unpaired(result: DiffResult, missing_path: str) -> DiffResult:
    """A file without a partner: every key it holds fails, the reason naming the absent file
    (reprod-diff's folder mode, key for key)."""
    from ..diff.result import KeyResult

    reason = f"{missing_path} does not exist"
    keys = tuple(replace(kr, reason=reason) for kr in result.results)
    if not keys:  # an empty dump still must not pass for an absent partner
        status = "missing" if result.other_name == missing_path else "extra"
        keys = (KeyResult(key=os.path.basename(missing_path), passed=False, status=status,
                          reason=reason),)
    return replace(result, results=keys)


def _compare_task(task: _Task) -> DiffResult:
    from ..diff.engine import compare

    verify = bool(task.options.get("verify"))
    opts: dict[str, Any] = {"criteria": task.options.get("criteria"),
                            "keys": task.options.get("keys"), "progress": False,
                            "pair": task.options.get("pair")}
    if task.noise is not None:
        opts["noise"] = _open(task.noise, verify) if task.noise else {}
    if task.ref is not None and task.other is not None:
        result = compare(_open(task.ref, verify), _open(task.other, verify), **opts)
        return replace(result, ref_name=task.ref_name, other_name=task.other_name)
    if task.ref is not None:
        result = replace(compare(_open(task.ref, verify), {}, **opts),
                         ref_name=task.ref_name, other_name=task.other_name)
        return _unpaired(result, task.other_name)
    assert task.other is not None
    result = replace(compare({}, _open(task.other, verify), **opts),
                     ref_name=task.ref_name, other_name=task.other_name)
    return _unpaired(result, task.ref_name)


def _run_task(task: _Task) -> _Outcome:
    """Compare one pair where this runs; only the verdicts travel back."""
    try:
        result = _compare_task(task)
    except ReprodError as exc:
        return _Outcome(task.index, None, error=exc)
    n = len(result.results)
    passed = sum(r.passed for r in result.results)
    if task.options.get("failed_only") and passed:
        result = replace(result, results=tuple(r for r in result.results if not r.passed))
    return _Outcome(task.index, result, keys=n, passed_keys=passed)


def _error_result(task: _Task, reason: str) -> DiffResult:
    """A pair that could not be compared: one failing key named after the file, status "error"."""
    from ..diff.result import DiffResult, KeyResult

    key = KeyResult(key=os.path.basename(task.rel), passed=False, status="error", reason=reason)
    return DiffResult(results=(key,), ref_name=task.ref_name, other_name=task.other_name)


def _lost(task: _Task, reason: str) -> _Outcome:
    return _Outcome(task.index, _error_result(task, reason), keys=1, lost=reason)
