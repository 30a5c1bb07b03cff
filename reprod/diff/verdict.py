"""The pass rule: per-method checks and a status from the statistics, then the words for them.

``judge`` decides without text (reprod_log's rule: a check fails only when its statistic is over
the threshold, or NaN); ``judged`` adds the reason from :mod:`reprod.messages`; ``rejudge`` applies
other thresholds to a finished result without reading data again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Optional

from .. import messages as msg
from .criteria import Criteria, MethodArg, PerKey
from .result import STAT_OF_METHOD, DiffResult

__all__ = ["judge", "judged", "rejudge"]


def judge(values: Mapping[str, Optional[float]], thresholds: Mapping[str, float], *,
          mismatched: Optional[int]) -> tuple[str, dict[str, bool]]:
    """The pass rule for a finite comparison: (status, per-method checks). A check fails only
    when the statistic is over its threshold (reprod_log's rule) or NaN."""
    checks: dict[str, bool] = {}
    ok = True
    for m, t in thresholds.items():
        v = values[STAT_OF_METHOD[m]]
        ok &= checks.setdefault(m, v is None or not (v > t or v != v))
    if ok and not mismatched:
        return "passed", checks
    return ("failed" if not ok else "mismatch"), checks


def judged(values: Mapping[str, Optional[float]], thresholds: Mapping[str, float], *,
            mismatched: Optional[int], size: int, atol: Optional[float], rtol: Optional[float],
            worst_index: Optional[tuple[int, ...]], worst_ref: Optional[float],
            worst_other: Optional[float]) -> tuple[str, str, dict[str, bool]]:
    """(status, reason, checks): the verdict, then the words for it."""
    status, checks = judge(values, thresholds, mismatched=mismatched)
    reason = msg.reason_judged(status, values, thresholds, checks, mismatched=mismatched, size=size,
                               atol=atol, rtol=rtol, worst_index=worst_index, worst_ref=worst_ref,
                               worst_other=worst_other)
    return status, reason, checks


def rejudge(result: DiffResult, *, method: MethodArg = "mean", threshold: Optional[float] = 1e-6,
            per_key: PerKey = None) -> DiffResult:
    """The same statistics judged with other methods/thresholds (no data is read again)."""
    policy = Criteria(methods=method, threshold=threshold, per_key=per_key)
    out = []
    for kr in result:
        thresholds = policy.thresholds_for(kr.key)
        methods = tuple(thresholds) or policy.methods
        if kr.status in ("passed", "failed", "mismatch") and kr.size:
            values = {s: getattr(kr, s) for s in STAT_OF_METHOD.values()}
            status, reason, checks = judged(values, thresholds, mismatched=kr.mismatched,
                                             size=kr.size, atol=kr.atol, rtol=kr.rtol,
                                             worst_index=kr.worst_index, worst_ref=kr.worst_ref,
                                             worst_other=kr.worst_other)
            kr = replace(kr, status=status, reason=reason, checks=checks, passed=status == "passed",
                         methods=methods, thresholds=thresholds)
        else:
            kr = replace(kr, methods=methods, thresholds=thresholds,
                         checks={m: kr.passed for m in thresholds})
        out.append(kr)
    options = dict(result.options, methods=list(policy.methods), threshold=policy.threshold)
    return replace(result, results=tuple(out), options=options)
