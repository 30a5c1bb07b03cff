"""DiffResult and KeyResult: the immutable data every renderer reads and every test asserts on."""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Protocol

from .. import messages as msg

__all__ = ["KeyResult", "DiffResult", "STAT_OF_METHOD", "ALL_METHODS", "STATUSES"]

# reprod_log's diff_method names -> the statistic each one judges
STAT_OF_METHOD: dict[str, str] = {
    "mean": "mean_abs",
    "max": "max_abs",
    "min": "min_abs",
    "mean_rel": "mean_rel",
    "max_rel": "max_rel",
    "rel_l2": "rel_l2",  # ||other - ref||_2 / ||ref||_2: scale-aware, robust to one outlier
    "max_scaled": "max_scaled",  # max|other - ref| / max|ref|: scale-aware worst element
    "noise": "noise_multiple",  # calibrated keys (compare(noise=...)): difference / own noise
}

# reprod_log's diff_method="all": these three, in this order
ALL_METHODS = ("min", "max", "mean")

# status words, in the order a report lists them
STATUSES = ("passed", "kink", "known", "failed", "mismatch", "nan", "inf", "shape", "missing", "extra", "empty", "type",
            "setting", "nothing", "error")


_NONFINITE = ("inf", "-inf", "nan")


def _json_safe(x: Any) -> Any:
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass(frozen=True, eq=False)
class KeyResult:
    """The comparison of one key: verdict, reason, and every statistic.

    ``status`` is one word: passed, failed (a statistic over its threshold), mismatch (elements outside
    atol + rtol*|ref|), nan, inf (non-finite values not matched on the other side), shape, missing (in
    ref only), extra (in other only), empty (an empty array against a non-empty one), type (a nested
    mapping against an array); and, relabelled after the comparison, kink (passed: over its
    threshold only downstream of a kink crossing, ``explain_kinks``) and known (passed: a known
    framework difference its numbers fit, ``align_train``'s running variances); and setting (a
    layer setting that differs between the two models, ``reprod.align.settings``: a key of its
    own, ``settings/<layer>/<setting>``, without values).
    """

    key: str
    passed: bool
    status: str
    reason: str
    path: tuple[str, ...] = ()
    ref_shape: Optional[tuple[int, ...]] = None
    other_shape: Optional[tuple[int, ...]] = None
    ref_dtype: Optional[str] = None
    other_dtype: Optional[str] = None
    size: int = 0
    mean_abs: Optional[float] = None
    max_abs: Optional[float] = None
    min_abs: Optional[float] = None
    mean_rel: Optional[float] = None
    max_rel: Optional[float] = None
    cosine: Optional[float] = None
    rel_l2: Optional[float] = None
    max_scaled: Optional[float] = None
    noise_multiple: Optional[float] = None
    noise_l2: Optional[float] = None
    noise_max: Optional[float] = None
    worst_index: Optional[tuple[int, ...]] = None
    worst_ref: Optional[float] = None
    worst_other: Optional[float] = None
    mismatched: Optional[int] = None
    ref_nan: int = 0
    ref_inf: int = 0
    other_nan: int = 0
    other_inf: int = 0
    methods: tuple[str, ...] = ()
    thresholds: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    atol: Optional[float] = None
    rtol: Optional[float] = None
    note: Optional[str] = None

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> KeyResult:
        """The engine's hot loop: ``d`` holds every field, in declaration order. A frozen
        dataclass's ``__init__`` sets its 30 fields one ``object.__setattr__`` at a time, which
        cost more than computing the statistics of a small key; this is the same object."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "__dict__", d)
        return obj

    # equality and hashing by value over every field, as the dataclass's own would be, but between
    # a KeyResult and a RowKeyResult too (the batch's lazy results equal the per-key path's)
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyResult):
            return NotImplemented
        return _all_fields(self) == _all_fields(other)

    def __hash__(self) -> int:  # a TypeError, as the dataclass's (thresholds and checks are dicts)
        return hash(_all_fields(self))

    def __repr__(self) -> str:
        # the dataclass repr lists ~35 fields; this is the line a reader wants in a REPL or a log
        reason = self.reason if len(self.reason) <= 100 else self.reason[:97] + "..."
        return f"<KeyResult {self.key!r} {self.status}" + (f": {reason}>" if reason else ">")

    def stat(self, method: str) -> Optional[float]:
        """The statistic a reprod_log ``diff_method`` name judges (``"mean"`` -> ``mean_abs``)."""
        return getattr(self, STAT_OF_METHOD.get(method, method))

    @property
    def mismatch_ratio(self) -> Optional[float]:
        if self.mismatched is None or not self.size:
            return None
        return self.mismatched / self.size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("path", "ref_shape", "other_shape", "worst_index", "methods"):
            if d[k] is not None:
                d[k] = list(d[k])
        return _json_safe(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KeyResult:
        kw = dict(d)
        for k in ("path", "ref_shape", "other_shape", "worst_index", "methods"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        for f in fields(cls):
            v = kw.get(f.name)
            if f.name in ("key", "status", "reason", "note", "ref_dtype", "other_dtype", "path"):
                continue
            if isinstance(v, str) and v in _NONFINITE:
                kw[f.name] = float(v)
            elif isinstance(v, dict):
                kw[f.name] = {k: float(x) if isinstance(x, str) and x in _NONFINITE else x for k, x in v.items()}
        kw = {k: v for k, v in kw.items() if k in {f.name for f in fields(cls)}}
        return cls(**kw)


_FIELD_NAMES = tuple(f.name for f in fields(KeyResult))
_all_fields = operator.attrgetter(*_FIELD_NAMES)
_STATUS = operator.attrgetter("status")
_PASSED = operator.attrgetter("passed")


class RowSource(Protocol):
    """What a ``RowKeyResult`` reads: the keys and statuses of its rows at once, every other field
    built on demand (``fields(i)``: a dict of every field, in declaration order)."""

    keys: Sequence[str]
    statuses: Sequence[str]

    def fields(self, i: int) -> dict[str, Any]: ...


class RowKeyResult(KeyResult):
    """A ``KeyResult`` whose fields are built when read, from a row of a batch (the engine's
    thousands of small keys): ``key``, ``status`` and ``passed`` are stored, the statistics stay in
    the batch's row arrays and the reason is formatted only when asked for. A million keys held
    ~1.5 KiB each as plain KeyResults (35 fields, a reason, a checks dict); this holds ~80 bytes.

    It is a ``KeyResult`` in every way a caller can see: the same fields and values, equal to the
    plain one, ``dataclasses.replace``/``asdict``, ``vars()``, pickling and copying give plain
    KeyResults or their fields."""

    __slots__ = ("_src", "_i")
    _src: RowSource
    _i: int

    def __new__(cls, *args: Any, **kw: Any) -> KeyResult:  # type: ignore[misc]
        # called only by code building one from fields (dataclasses.replace): a plain KeyResult
        return KeyResult(*args, **kw)

    @classmethod
    def _at(cls, src: RowSource, i: int) -> RowKeyResult:
        obj = object.__new__(cls)
        _SET_SRC(obj, src)
        _SET_I(obj, i)
        return obj

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self._src.fields(self._i))

    def __reduce__(self) -> Any:
        return (KeyResult._from_fields, (dict(self._src.fields(self._i)),))


def _lazy_field(name: str) -> property:
    def get(self: RowKeyResult) -> Any:
        return self._src.fields(self._i)[name]

    return property(get)


for _name in _FIELD_NAMES:
    setattr(RowKeyResult, _name, _lazy_field(_name))
RowKeyResult.key = property(lambda self: self._src.keys[self._i])  # type: ignore[assignment]
RowKeyResult.status = property(lambda self: self._src.statuses[self._i])  # type: ignore[assignment]
RowKeyResult.passed = property(  # type: ignore[assignment]
    lambda self: self._src.statuses[self._i] == "passed")
_SET_SRC = RowKeyResult.__dict__["_src"].__set__
_SET_I = RowKeyResult.__dict__["_i"].__set__
del _name


@dataclass(frozen=True)
class DiffResult:
    """The comparison of two dumps: one KeyResult per key, in the reference's key order
    (keys only in ``other`` come last).

    >>> r = reprod.compare("torch.npy", "paddle.npy", threshold=1e-5)
    >>> r.passed, r.first_failure
    """

    results: tuple[KeyResult, ...]
    ref_name: str = "ref"
    other_name: str = "other"
    options: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    # --- verdict -------------------------------------------------------------------------------
    @property
    def passed(self) -> bool:
        return all(map(_PASSED, self.results))

    @property
    def failed(self) -> list[KeyResult]:
        return [r for r in self.results if not r.passed]

    @property
    def first_failure(self) -> Optional[KeyResult]:
        for r in self.results:
            if not r.passed:
                return r
        return None

    def __repr__(self) -> str:
        # one line, not the dataclass repr of every KeyResult (kilobytes); to_table() shows them
        n = len(self.results)
        failed = sum(not r.passed for r in self.results)
        head = f"<DiffResult {n} key{'' if n == 1 else 's'}"
        if not n:
            return head + ">"
        if not failed:
            return head + ": all passed>" if n > 1 else head + ": passed>"
        first = self.first_failure
        key = "" if first is None else f"; first failure {first.key}"
        return f"{head}: {n - failed} passed, {failed} failed{key}>"

    def __bool__(self) -> bool:  # truthiness would be ambiguous (empty vs passed): say it
        raise TypeError("use DiffResult.passed, not bool(DiffResult)")

    def __iter__(self) -> Iterator[KeyResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, key: str) -> KeyResult:
        for r in self.results:
            if r.key == key:
                return r
        raise KeyError(key)

    def keys(self) -> list[str]:
        return [r.key for r in self.results]

    def summary(self) -> dict[str, Any]:
        # each field read once a key, in C's loops: at a million keys the three Python loops
        # here cost ~2 us a key, as much as writing a key's JSON
        results = self.results
        counts = dict(Counter(map(_STATUS, results)))
        passed = list(map(_PASSED, results))
        first = self.first_failure
        return {
            "compared": len(results),
            "passed": sum(passed),
            "failed": sum(map(operator.not_, passed)),
            "statuses": counts,
            "first_failure": None if first is None else first.key,
            "first_failure_reason": None if first is None else first.reason,
        }

    def summary_line(self) -> str:
        s = self.summary()
        noun = "key" if s["compared"] == 1 else "keys"
        kinks, known = s["statuses"].get("kink", 0), s["statuses"].get("known", 0)
        why = ([f"{kinks} only across a kink crossing"] if kinks else []) + \
            ([f"{known} by a known framework difference"] if known else [])
        passed = f"{s['passed']} passed" + (f" ({', '.join(why)})" if why else "")
        head = f"{s['compared']} {noun} compared, {passed}, {s['failed']} failed"
        left = self.options.get("left_out") or {}
        if left.get("ref") or left.get("other"):
            head += f" ({msg.summary_left_out(left.get('ref', 0), left.get('other', 0))})"
        skipped, unpaired = self.options.get("replay_skipped"), self.options.get("replay_unpaired")
        if skipped or unpaired:
            port = len({s.get("layer") for s in skipped or ()})
            head += f" ({msg.summary_not_replayed(port, len(unpaired or ()))})"
        unc = self.options.get("not_calibrated")
        if unc:
            head += f" ({msg.summary_uncalibrated(unc['keys'], unc['why'])})"
        if s["first_failure"] is None:
            return head + ": PASSED"
        return head + f": FAILED; first failure {s['first_failure']}: {s['first_failure_reason']}"

    # --- data ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "ref": self.ref_name,
            "other": self.other_name,
            "options": _json_safe(dict(self.options)),
            "created": self.created,
            "keys": [r.to_dict() for r in self.results],
        }

    # --- renderers: each imports its module (and pandas/tabulate) only when called ----------------
    def to_table(self, *, methods: Any = None, failed_only: bool = False,
                 tablefmt: str = "simple") -> str:
        """One row per key (tabulate), the first failure marked ``>>``, then the summary line."""
        from ..report.table import render_table

        return render_table(self, methods=methods, failed_only=failed_only, tablefmt=tablefmt)

    def to_frame(self) -> Any:
        """A pandas DataFrame, one row per key, every statistic a column."""
        from ..report.frame import to_frame as _frame

        return _frame(self)

    def to_json(self, *, indent: Optional[int] = 2) -> str:
        from ..report.data import to_json as _json

        return _json(self, indent=indent)

    def to_csv(self) -> str:
        from ..report.data import to_csv as _csv

        return _csv(self)

    def to_markdown(self) -> str:
        from ..report.data import to_markdown as _md

        return _md(self)

    def to_log(self) -> str:
        """reprod_log's log lines (without the logging prefix)."""
        from ..report.log import render_log

        return "\n".join(render_log(self))

    def to_html(self, path: Optional[str] = None, *, title: Optional[str] = None,
                findings: tuple[str, ...] | list[str] = ()) -> str:
        """The self-contained HTML report: written to ``path`` (returned) or returned as text.

        ``findings``: one-line sentences shown at the top of the page, e.g.
        ``[reprod.capture.first_divergence(result).message]``."""
        from ..report.html import render_html, write_html

        if path is None:
            return render_html(self, title=title, findings=findings)
        return write_html(self, path, title=title, findings=findings)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffResult:
        return cls(
            results=tuple(KeyResult.from_dict(k) for k in d["keys"]),
            ref_name=d.get("ref", "ref"),
            other_name=d.get("other", "other"),
            options=dict(d.get("options", {})),
            created=d.get("created", ""),
        )
