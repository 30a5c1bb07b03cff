"""What a comparison judges, and against what: one frozen ``Criteria``, resolved per key.

Every front door (``reprod.compare``, ``reprod-diff``, ``assert_aligned``, the pytest plugin,
``reprod.align``) builds one and hands it to the engine; the engine asks it, per pair, for that
key's thresholds and element-wise tolerance. Per-key rules are looked up by exact name first (a
dict), then by glob (the most specific pattern wins), so thousands of exact-name rules cost one
lookup a key. Dtype-default tolerances (torch.testing's table) are resolved from the pair's two
dtypes, not expanded into one rule per key.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import numpy as np

from ..errors import ReprodError
from .result import ALL_METHODS, STAT_OF_METHOD

__all__ = [
    "Criteria",
    "CriteriaError",
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "default_tolerance",
    "normalize_methods",
]

MethodArg = Union[str, Sequence[str], None]
PerKey = Optional[Mapping[str, Union[float, Mapping[str, float]]]]

_ELEMENTWISE = ("atol", "rtol")


class CriteriaError(ReprodError, ValueError):
    """A method, threshold or tolerance that cannot judge anything (unknown, NaN, negative)."""


def normalize_methods(method: MethodArg) -> tuple[str, ...]:
    """reprod_log's ``diff_method``: a name, ``"all"`` (min, max, mean, in reprod_log's order) or a list."""
    if method is None:
        return ()
    names = [method] if isinstance(method, str) else list(method)
    out: list[str] = []
    for m in names:
        for part in ([m] if m != "all" else ALL_METHODS):
            if part == "noise":
                raise CriteriaError("'noise' is not a method to choose: give compare(noise=...) a "
                                    "float64 run of the reference and calibrated keys use it")
            if part not in STAT_OF_METHOD:
                raise CriteriaError(
                    f"unknown diff method {part!r}; choose from "
                    f"{', '.join(m for m in STAT_OF_METHOD if m != 'noise')} or 'all'"
                )
            if part not in out:
                out.append(part)
    return tuple(out)


def _limit(value: Any, what: str) -> float:
    """A threshold or tolerance as a float; NaN or negative would pass or fail everything."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CriteriaError(f"{what}: {value!r} is not a number") from None
    if math.isnan(v) or v < 0:
        raise CriteriaError(f"{what}: {v!r} is not a usable limit (a number >= 0 is needed; "
                            "NaN would pass every difference, a negative one fail every key)")
    return v


def _optional_limit(value: Any, what: str) -> Optional[float]:
    return None if value is None else _limit(value, what)


# --- dtype-default tolerances (torch.testing's table) ----------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Elementwise tolerance: ``|other - ref| <= atol + rtol * |ref|``."""

    rtol: float
    atol: float

    def looser(self, other: Tolerance) -> Tolerance:
        return Tolerance(rtol=max(self.rtol, other.rtol), atol=max(self.atol, other.atol))


_EXACT = Tolerance(rtol=0.0, atol=0.0)

DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "float16": Tolerance(rtol=1e-3, atol=1e-5),
    "bfloat16": Tolerance(rtol=1.6e-2, atol=1e-5),
    "float32": Tolerance(rtol=1.3e-6, atol=1e-5),
    "float64": Tolerance(rtol=1e-7, atol=1e-7),
    "complex64": Tolerance(rtol=1.3e-6, atol=1e-5),
    "complex128": Tolerance(rtol=1e-7, atol=1e-7),
    "complex32": Tolerance(rtol=1e-3, atol=1e-5),  # torch's half-precision complex
    "int": _EXACT,  # every signed and unsigned integer width
    "bool": _EXACT,
}


def _tolerance_of(dtype: str) -> Tolerance:
    if dtype in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"no default tolerance for dtype {dtype!r}; pass atol and rtol") from None
    if dt.kind in "iu":
        return DEFAULT_TOLERANCES["int"]
    if dt.kind == "b":
        return DEFAULT_TOLERANCES["bool"]
    if dt.kind == "f":  # longdouble is at least as precise as float64
        return DEFAULT_TOLERANCES["float64"] if dt.itemsize >= 8 else DEFAULT_TOLERANCES["float32"]
    if dt.kind == "c":
        return DEFAULT_TOLERANCES["complex128"] if dt.itemsize >= 16 else DEFAULT_TOLERANCES["complex64"]
    raise ValueError(f"no default tolerance for dtype {dtype!r}; pass atol and rtol")


def default_tolerance(*dtypes: Optional[str]) -> Tolerance:
    """The default tolerance for a pair (or more) of dtypes: the looser one where they differ.

    ``None`` entries (a side without an array) are skipped; with no dtype at all it is exact.

    >>> default_tolerance("float32", "float16")
    Tolerance(rtol=0.001, atol=1e-05)
    """
    tol = _EXACT
    for dt in dtypes:
        if dt is not None:
            tol = tol.looser(_tolerance_of(str(dt)))
    return tol


# --- the criteria ------------------------------------------------------------------------------------

Rule = tuple[tuple[str, float], ...]  # (method or "atol"/"rtol" or "*", value) pairs


def _rule(pattern: str, value: Any) -> Rule:
    if isinstance(value, Mapping):
        # "atol"/"rtol" entries set the element-wise rule for matching keys
        spec = {k: _limit(v, f"per-key rule {pattern!r}: {k}") for k, v in value.items() if k in _ELEMENTWISE}
        spec.update({m: _limit(v, f"per-key rule {pattern!r}: {k}") for k, v in value.items()
                     if k not in _ELEMENTWISE for m in normalize_methods(k)})
    else:
        spec = {"*": _limit(value, f"per-key rule {pattern!r}")}
    return tuple(spec.items())


def _specificity(pattern: str) -> tuple[int, int]:
    """Exact names beat patterns; among patterns, more literal characters win."""
    wild = sum(pattern.count(c) for c in "*?[")
    return (1 if wild == 0 else 0, len(pattern) - wild)


@dataclass(frozen=True)
class Criteria:
    """The pass rule of a comparison, resolved per key by the engine.

    ``methods``: statistics judged against ``threshold`` (reprod_log's ``diff_method``: ``"mean"``,
    ``"max"``, ``"min"``, ``"all"``, ``"mean_rel"``, ``"max_rel"`` or a list; ``None`` for none).
    ``atol``/``rtol``: the element-wise rule ``|other - ref| <= atol + rtol*|ref|``.
    ``per_key``: name or glob -> a threshold, or a ``{method: threshold, "atol": .., "rtol": ..}``
    dict, overriding the run's values for matching keys (exact names first, then the most specific
    glob). ``dtype_tolerances``: keys left without atol/rtol get torch.testing's defaults for their
    two dtypes (the looser side). ``equal_nan``: NaN at the same positions pass. ``strict_shape``:
    shapes that differ only by axes of size 1 fail instead of being compared element by element.
    ``noise_factor``: with a noise reference (``compare(noise=...)``), a key passes when its
    difference is at most this many times the reference's own noise (default 20).

    >>> c = Criteria(methods="max", threshold=1e-5, per_key={"*.grad": 1e-4})
    >>> c.resolve("fc.grad").thresholds
    {'max': 0.0001}
    """

    methods: Any = ("mean",)
    threshold: Optional[float] = 1e-6
    atol: Optional[float] = None
    rtol: Optional[float] = None
    per_key: Any = None
    equal_nan: bool = False
    strict_shape: bool = False
    dtype_tolerances: bool = False
    noise_factor: Optional[float] = None
    _exact: dict[str, Rule] = field(default_factory=dict, init=False, repr=False, compare=False)
    _globs: tuple[tuple[str, Rule], ...] = field(default=(), init=False, repr=False, compare=False)
    _dtype_cache: dict[tuple[Optional[str], Optional[str]], tuple[float, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "methods", normalize_methods(self.methods))
        s(self, "threshold", _optional_limit(self.threshold, "threshold"))
        s(self, "atol", _optional_limit(self.atol, "atol"))
        s(self, "rtol", _optional_limit(self.rtol, "rtol"))
        s(self, "noise_factor", _optional_limit(self.noise_factor, "noise_factor"))
        raw = dict(self.per_key.items() if isinstance(self.per_key, Mapping) else (self.per_key or ()))
        s(self, "per_key", raw)
        rules = [(str(p), _rule(str(p), v)) for p, v in raw.items()]
        exact: dict[str, Rule] = {}
        globs: list[tuple[str, Rule]] = []
        for pattern, rule in rules:
            if _specificity(pattern)[0]:
                exact.setdefault(pattern, rule)
            else:
                globs.append((pattern, rule))
        globs.sort(key=lambda r: _specificity(r[0]), reverse=True)
        s(self, "_exact", exact)
        s(self, "_globs", tuple(globs))

    def replace(self, **changes: Any) -> Criteria:
        """A copy with some fields changed (validated as a new one is)."""
        return replace(self, **changes)

    def _rule_of(self, key: str) -> Optional[Rule]:
        rule = self._exact.get(key)
        if rule is not None:
            return rule
        for pattern, spec in self._globs:
            if key == pattern or fnmatch.fnmatchcase(key, pattern):
                return spec
        return None

    def thresholds_for(self, key: str) -> dict[str, float]:
        """method -> threshold for ``key`` (a fresh dict: results own it)."""
        out = {m: self.threshold for m in self.methods} if self.threshold is not None else {}
        if not self.per_key:
            return out  # type: ignore[return-value]
        rule = self._rule_of(key)
        if rule is not None:
            spec = dict(rule)
            if "*" in spec:
                out = {m: spec["*"] for m in (self.methods or ("mean",))}
            else:
                out.update({m: t for m, t in spec.items() if m not in _ELEMENTWISE})
        return {m: t for m, t in out.items() if t is not None}

    def tolerance_for(self, key: str, ref_dtype: Optional[str] = None,
                      other_dtype: Optional[str] = None) -> tuple[Optional[float], Optional[float]]:
        """(atol, rtol) for ``key``: the run's, overridden by the most specific per-key rule; with
        ``dtype_tolerances``, from the two dtypes where neither is set."""
        atol, rtol = self.atol, self.rtol
        if self.per_key:
            rule = self._rule_of(key)
            if rule is not None:
                spec = dict(rule)
                atol, rtol = spec.get("atol", atol), spec.get("rtol", rtol)
        if self.dtype_tolerances and atol is None and rtol is None:
            pair = (ref_dtype, other_dtype)
            got = self._dtype_cache.get(pair)
            if got is None:
                tol = default_tolerance(ref_dtype, other_dtype)
                got = self._dtype_cache[pair] = (tol.atol, tol.rtol)
            return got
        return atol, rtol

    def options(self) -> dict[str, Any]:
        """The criteria as the JSON report's ``options`` object shows them."""
        out: dict[str, Any] = {
            "methods": list(self.methods),
            "threshold": self.threshold,
            "atol": self.atol,
            "rtol": self.rtol,
            "equal_nan": self.equal_nan,
        }
        if self.per_key:
            out["per_key"] = {k: (dict(v) if isinstance(v, Mapping) else float(v))
                              for k, v in self.per_key.items()}
        if self.dtype_tolerances:
            out["tolerances"] = "dtype defaults per key"
        if self.noise_factor is not None:
            out["noise_factor"] = self.noise_factor
        return out


def build_criteria(criteria: Optional[Criteria] = None, **kwargs: Any) -> Criteria:
    """``criteria`` with the keyword shortcuts that were given applied over it, or a new one."""
    if criteria is None:
        return Criteria(**kwargs)
    if not isinstance(criteria, Criteria):
        raise CriteriaError(f"criteria must be a reprod.Criteria, got {type(criteria).__name__}")
    return criteria.replace(**kwargs) if kwargs else criteria
