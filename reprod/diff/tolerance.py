"""Which statistics judge a key, and against which thresholds: the run's defaults, overridden per
key by exact name or glob pattern (the most specific pattern wins)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from ..errors import ReprodError
from .result import STAT_OF_METHOD

__all__ = ["Policy", "normalize_methods"]

_ELEMENTWISE = ("atol", "rtol")

MethodArg = Union[str, Sequence[str], None]
PerKey = Optional[Mapping[str, Union[float, Mapping[str, float]]]]


def normalize_methods(method: MethodArg) -> tuple[str, ...]:
    """reprod_log's ``diff_method``: a name, ``"all"`` (min, max, mean, in reprod_log's order) or a list."""
    if method is None:
        return ()
    names = [method] if isinstance(method, str) else list(method)
    out: list[str] = []
    for m in names:
        for part in ([m] if m != "all" else ["min", "max", "mean"]):
            if part not in STAT_OF_METHOD:
                raise ReprodError(
                    f"unknown diff method {part!r}; choose from {', '.join(STAT_OF_METHOD)} or 'all'"
                )
            if part not in out:
                out.append(part)
    return tuple(out)


def _specificity(pattern: str) -> tuple[int, int]:
    """Exact names beat patterns; among patterns, more literal characters win."""
    wild = sum(pattern.count(c) for c in "*?[")
    return (1 if wild == 0 else 0, len(pattern) - wild)


@dataclass(frozen=True)
class Policy:
    methods: tuple[str, ...]
    threshold: Optional[float]
    per_key: tuple[tuple[str, dict[str, float]], ...] = ()

    @classmethod
    def build(cls, method: MethodArg, threshold: Optional[float], per_key: PerKey) -> Policy:
        methods = normalize_methods(method)
        rules: list[tuple[str, dict[str, float]]] = []
        for pattern, value in (per_key or {}).items():
            if isinstance(value, Mapping):
                # "atol"/"rtol" entries set the element-wise rule for matching keys
                spec = {k: float(v) for k, v in value.items() if k in _ELEMENTWISE}
                spec.update({m: float(v) for k, v in value.items() if k not in _ELEMENTWISE
                             for m in normalize_methods(k)})
            else:
                spec = {"*": float(value)}
            rules.append((pattern, spec))
        rules.sort(key=lambda r: _specificity(r[0]), reverse=True)
        return cls(methods=methods, threshold=None if threshold is None else float(threshold),
                   per_key=tuple(rules))

    def _rule(self, key: str) -> Optional[dict[str, float]]:
        for pattern, spec in self.per_key:
            if key == pattern or fnmatch.fnmatchcase(key, pattern):
                return spec
        return None

    def for_key(self, key: str) -> dict[str, float]:
        """method -> threshold for ``key``."""
        out = {m: self.threshold for m in self.methods} if self.threshold is not None else {}
        if not self.per_key:  # no rules (the common case): the run's thresholds, nothing to match
            return out
        spec = self._rule(key)
        if spec is not None:
            if "*" in spec:
                out = {m: spec["*"] for m in (self.methods or ("mean",))}
            else:
                out.update({m: t for m, t in spec.items() if m not in _ELEMENTWISE})
        return {m: t for m, t in out.items() if t is not None}

    def tolerance_for(self, key: str, atol: Optional[float], rtol: Optional[float]
                      ) -> tuple[Optional[float], Optional[float]]:
        """(atol, rtol) for ``key``: the run's, overridden by the most specific per-key rule."""
        spec = self._rule(key)
        if spec is None:
            return atol, rtol
        return spec.get("atol", atol), spec.get("rtol", rtol)
