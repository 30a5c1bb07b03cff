"""reprod_log's log lines, from a DiffResult: ``<key>: `` then ``\\t<method> diff: check passed:
<bool>, value: <v>`` per method, nested parents bare, and ``diff check passed|failed`` last.

Values print as reprod_log printed them, a numpy scalar of the difference's dtype (float32 inputs
give float32 values), so logs read the same as before a migration. Two deliberate differences:
each method line carries that method's own verdict (reprod_log let one failure mark the later
methods of a key failed too), and keys reprod_log could not handle (missing, extra, shape, NaN)
get a line saying why instead of an exception or a silent pass.
"""

from __future__ import annotations

import logging
import operator
import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, repeat
from typing import Any, Optional

import numpy as np

from .._native import float_texts
from ..diff.result import _FIELD_NAMES, STAT_OF_METHOD, DiffResult, KeyResult, RowKeyResult
from .fields import field_columns

__all__ = ["render_log", "iter_log_lines", "iter_log_text", "format_value", "emit_log_lines",
           "LOGGER_NAME"]

_FORMAT = "[%(asctime)s] root %(levelname)s: %(message)s"  # reprod_log logs through the root logger
_DATEFMT = "%Y/%m/%d %H:%M:%S"
LOGGER_NAME = "reprod.report"


def _np_dtype(name: Optional[str]) -> Optional[np.dtype]:
    if name is None:
        return None
    if name == "bfloat16":
        return np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        return None


def difference_dtype(ref_dtype: Optional[str], other_dtype: Optional[str]) -> Optional[np.dtype]:
    """The dtype of reprod_log's ``np.abs(a - b)`` for the two sides (bool as int8, complex as its
    real part's float), or None where a side has no numpy dtype."""
    a, b = _np_dtype(ref_dtype), _np_dtype(other_dtype)
    if a is None or b is None:
        return None
    if a.kind == "b":
        a = np.dtype(np.int8)
    if b.kind == "b":
        b = np.dtype(np.int8)
    dt = np.result_type(a, b)
    if dt.kind == "c":
        dt = np.dtype(np.float32) if dt.itemsize <= 8 else np.dtype(np.float64)
    return dt


def format_value(kr: KeyResult, method: str) -> str:
    """One statistic as reprod_log would have printed it (``"{}".format`` of a numpy scalar)."""
    return _value_text(kr.stat(method), difference_dtype(kr.ref_dtype, kr.other_dtype),
                       STAT_OF_METHOD.get(method, method))


def _value_text(v: Any, dt: Optional[np.dtype], stat: str) -> str:
    """``format_value`` of the value ``v`` of statistic ``stat``, ``dt`` the difference's dtype."""
    if v is None:
        return "None"
    if dt is None:
        return f"{np.float64(v)}"
    if dt.kind in "iu":
        if stat in ("max_abs", "min_abs"):
            return str(int(v))
        return f"{np.float64(v)}"
    with np.errstate(over="ignore"):
        # reprod_log formats with "{}", which prints a float32 through Python's float repr
        return f"{dt.type(v)}"


def render_log(result: DiffResult, *, indent: str = "\t") -> list[str]:
    """The lines reprod_log's ``report`` logs (without the logging prefix)."""
    return list(iter_log_lines(result, indent=indent))


def iter_log_lines(result: DiffResult, *, indent: str = "\t") -> Iterator[str]:
    """``render_log``'s lines as they are made (a million keys' lines are not held at once)."""
    for lines in _line_batches(result, indent):
        yield from lines


def iter_log_text(result: DiffResult, *, indent: str = "\t") -> Iterator[str]:
    """``"\n".join(render_log(result))`` in pieces of a batch of keys' lines each."""
    first = True
    for lines in _line_batches(result, indent):
        if lines:
            yield "\n".join(lines) if first else "\n" + "\n".join(lines)
            first = False


# keys per batch: their lines are made a column at a time
_KEYS_PER_BATCH = 2048
# the statuses whose method lines carry the statistic and the method's own check
_JUDGED = frozenset(["passed", "failed", "mismatch"])
# statuses of keys that pass while a statistic is over its threshold: the difference is explained
_EXPLAINED = frozenset(["kink", "known"])
# the statuses whose lines say why there is no value, and those whose value is the status word
_NO_VALUE = frozenset(["missing", "extra", "shape", "type", "empty", "setting"])
_NON_FINITE = frozenset(["nan", "inf"])
_PLAIN_TYPES = frozenset([KeyResult, RowKeyResult])
_STAT_FIELDS = frozenset(_FIELD_NAMES)
# (difference dtype, float type) for the float dtypes whose values print as Python's float repr
# of the value in that dtype: a column is cast at once
_FLOAT_KINDS = {np.dtype(np.float16): np.float16, np.dtype(np.float32): np.float32,
                np.dtype(np.float64): np.float64}


def _line_batches(result: DiffResult, indent: str) -> Iterator[list[str]]:
    """``_iter_log_lines_reference``'s lines, a list for each batch of keys: what the keys of a
    batch write alike (their methods, the difference dtype of each pair of dtypes) worked out
    once, each method's values and verdicts a column at a time (``field_columns``); a key
    whose methods name no field of its own (or a KeyResult subclass) goes key by key."""
    results = result.results
    if not isinstance(results, (tuple, list)):
        results = tuple(results)
    state: list[Any] = [()]  # the open path: parents already written
    for start in range(0, len(results), _KEYS_PER_BATCH):
        batch = results[start : start + _KEYS_PER_BATCH]
        try:
            lines = _batch_lines(batch, indent, state)
        except Exception:
            # a value the reference words key by key (or raises on, at its key): that way
            lines = None
        if lines is None:
            for kr in batch:  # each key's lines before the next is read, as the reference
                yield _key_lines(kr, indent, state)
        else:
            yield lines
    yield ["diff check passed" if result.passed else "diff check failed"]


def _key_lines(kr: KeyResult, indent: str, state: list[Any]) -> list[str]:
    """One key's lines, read from the key field by field (``state[0]``: the open path, the
    parents already written; updated)."""
    out: list[str] = []
    path = kr.path or (kr.key,)
    parents = path[:-1]
    open_path = state[0]
    common = 0
    while common < min(len(parents), len(open_path)) and parents[common] == open_path[common]:
        common += 1
    for depth in range(common, len(parents)):
        out.append(f"{indent * depth}{parents[depth]}")
    state[0] = parents
    level = len(parents)
    out.append(f"{indent * level}{path[-1]}: ")
    methods = kr.methods or tuple(kr.thresholds) or ("mean",)
    for m in methods:
        if kr.status in _EXPLAINED:  # beyond noise only across a kink or a known difference
            ok = True
        elif kr.status not in ("passed", "failed", "mismatch"):
            ok = kr.checks.get(m, kr.passed) and kr.passed
        else:
            ok = kr.checks.get(m, kr.passed)
        if kr.status in ("nan", "inf"):
            value = kr.status
        elif kr.status in _NO_VALUE:
            value = f"None ({kr.status}: {kr.reason})"
        else:
            value = format_value(kr, m)
        out.append(f"{indent * (level + 1)}{m} diff: check passed: {ok}, value: {value}")
    return out


def _batch_lines(batch: Sequence[KeyResult], indent: str, state: list[Any]) -> Optional[list[str]]:
    """The lines of a batch of keys (``state[0]``: the open path, updated once they are
    made), or None where a key needs ``_key_lines``."""
    if not _PLAIN_TYPES.issuperset(map(type, batch)):
        return None  # a subclass may word its fields (stat, checks) otherwise
    col = dict(zip(_FIELD_NAMES, field_columns(batch)))
    key, passed, status, path = col["key"], col["passed"], col["status"], col["path"]
    methods, thresholds, checks = col["methods"], col["thresholds"], col["checks"]
    n = len(key)
    if not _STR_ONLY.issuperset(map(type, status)) or not _DICT_ONLY.issuperset(map(type, checks)):
        return None
    # each key's methods (one tuple where the batch's keys share their methods and thresholds)
    if _one(methods) and _one(thresholds):
        eff = [methods[0] or tuple(thresholds[0]) or ("mean",)] * n
    else:
        eff = [ms or tuple(t) or ("mean",) for ms, t in zip(methods, thresholds)]
    names = list(chain.from_iterable(_distinct(eff)))
    if not _STR_ONLY.issuperset(map(type, names)):
        return None
    stats = {m: STAT_OF_METHOD.get(m, m) for m in names}
    if not _STAT_FIELDS.issuperset(stats.values()):
        return None  # kr.stat(m) reads some other attribute: the key's own way
    judged = _JUDGED.issuperset(status)
    # the keys whose method lines print their statistic (the others: why there is none)
    valued = range(n) if judged else \
        [i for i, s in enumerate(status) if s not in _NON_FINITE and s not in _NO_VALUE]
    rdt, odt = col["ref_dtype"], col["other_dtype"]
    pairs: dict[Any, Optional[np.dtype]] = {}
    for i in valued:
        if (rdt[i], odt[i]) not in pairs:
            pairs[(rdt[i], odt[i])] = difference_dtype(rdt[i], odt[i])
    dts = [pairs[(rdt[i], odt[i])] for i in valued]
    ok_text: dict[str, list[str]] = {}
    value_text: dict[str, list[str]] = {}
    for m, stat in stats.items():
        got = list(map(dict.get, checks, repeat(m), passed))
        if not judged:
            got = [True if s in _EXPLAINED else g if s in _JUDGED else g and p
                   for g, s, p in zip(got, status, passed)]
        ok_text[m] = list(map(format, got))
        values = col[stat]
        texts = _values_text([values[i] for i in valued] if not judged else values, dts, stat)
        if not judged:
            filled = [s if s in _NON_FINITE else f"None ({s}: {r})"
                      for s, r in zip(status, col["reason"])]
            for i, t in zip(valued, texts):
                filled[i] = t
            texts = filled
        value_text[m] = texts
    if n and len(set(eff)) == 1 and set(map(len, path)) == {1}:
        # every key at the top level, with the same methods: "<key>: " then its method lines
        inner = _braces(indent)
        line_cols = [list(map("{}: ".format, map(_LAST, path)))]
        for m in eff[0]:
            template = f"{inner}{_braces(f'{m}')} diff: check passed: {{}}, value: {{}}"
            line_cols.append(list(map(template.format, ok_text[m], value_text[m])))
        state[0] = ()
        return list(chain.from_iterable(zip(*line_cols)))
    out: list[str] = []
    open_path = state[0]
    for i in range(n):
        p = path[i] or (key[i],)
        parents = p[:-1]
        common = 0
        while common < min(len(parents), len(open_path)) and parents[common] == open_path[common]:
            common += 1
        for depth in range(common, len(parents)):
            out.append(f"{indent * depth}{parents[depth]}")
        open_path = parents
        level = len(parents)
        out.append(f"{indent * level}{p[-1]}: ")
        pad = indent * (level + 1)
        for m in eff[i]:
            out.append(f"{pad}{m} diff: check passed: {ok_text[m][i]}, value: {value_text[m][i]}")
    state[0] = open_path
    return out


def _values_text(values: list[Any], dts: list[Optional[np.dtype]], stat: str) -> list[str]:
    """``_value_text`` of each value (its key's difference dtype in ``dts``): the values of a
    float dtype cast at once (``"{}".format`` of a numpy float prints Python's float repr of
    it: ``tests/report/test_batched_writers.py`` checks the two agree), any other one by one."""
    out: list[Optional[str]] = [None] * len(values)
    groups: dict[Optional[np.dtype], list[int]] = {}
    for i, dt in enumerate(dts):
        groups.setdefault(dt, []).append(i)
    for dt, rows in groups.items():
        vals = [values[i] for i in rows]
        ftype = np.float64 if dt is None else _FLOAT_KINDS.get(dt)
        if ftype is None and dt is not None and dt.kind in "iu" and stat not in ("max_abs", "min_abs"):
            ftype = np.float64
        if ftype is not None and _FLOAT_ONLY.issuperset(map(type, vals)):
            with np.errstate(over="ignore", invalid="ignore"):
                cast = np.array(vals, dtype=np.float64).astype(ftype).astype(np.float64)
            texts = float_texts(cast.tolist())  # float.__repr__'s, by the kernel where it is on
        else:
            texts = [_value_text(v, dt, stat) for v in vals]
        for i, t in zip(rows, texts):
            out[i] = t
    return out  # type: ignore[return-value]


_STR_ONLY = frozenset([str])
_DICT_ONLY = frozenset([dict])
_FLOAT_ONLY = frozenset([float])
_LAST = operator.itemgetter(-1)


def _one(col: list[Any]) -> bool:
    """Whether every item of ``col`` is one object."""
    return len(set(map(id, col))) <= 1


def _distinct(col: list[Any]) -> Iterable[Any]:
    return dict(zip(map(id, col), col)).values()


def _braces(text: str) -> str:
    """``text`` as the literal part of a ``str.format`` template."""
    return text.replace("{", "{{").replace("}", "}}")


def _iter_log_lines_reference(result: DiffResult, *, indent: str = "\t") -> Iterator[str]:
    """``iter_log_lines`` key by key (``_key_lines``): the lines it must equal."""
    state: list[Any] = [()]
    for kr in result:
        yield from _key_lines(kr, indent, state)
    yield "diff check passed" if result.passed else "diff check failed"


def emit_log_lines(lines: list[str], path: Optional[str], *, console: bool = True,
                   propagate: bool = True) -> None:
    """Log ``lines`` to the sys.stdout of this moment (``console``) and to ``path`` (overwritten),
    with reprod_log's prefix, through handlers that live only for this call.

    Records propagate to the root logger (so pytest's caplog and the user's own logging see them)
    unless ``propagate=False``: importing paddle installs a root handler on stderr, which would
    print every line a second time in a long run.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    formatter = logging.Formatter(_FORMAT, datefmt=_DATEFMT)
    handlers: list[logging.Handler] = []
    if console:
        stream = logging.StreamHandler(stream=sys.stdout)
        stream.setFormatter(formatter)
        handlers.append(stream)
    # the file is written through an AtomicFile, in place when complete: a logging.FileHandler
    # truncated the earlier log first, and on a full disk printed a traceback for every line
    # (logging's handleError) and went on as if it had written
    if path is None:
        _log_lines(logger, handlers, lines, propagate)
        return
    from ..storage.atomic import AtomicFile

    with AtomicFile(path) as af:  # a failure: one WriteError naming the file, the earlier log kept
        to_file = _ToFile(af.file)
        to_file.setFormatter(formatter)
        _log_lines(logger, [*handlers, to_file], lines, propagate)
        if to_file.error is not None:
            raise to_file.error  # after every line reached the console


def _log_lines(logger: logging.Logger, handlers: list[logging.Handler], lines: list[str],
               propagate: bool) -> None:
    for h in handlers:
        logger.addHandler(h)
    was = logger.propagate
    logger.propagate = propagate
    try:
        for line in lines:
            logger.info(line)
    finally:
        logger.propagate = was
        for h in handlers:
            logger.removeHandler(h)
            h.close()


class _ToFile(logging.Handler):
    """``logging.FileHandler``'s bytes (UTF-8, a newline after each record) into a file object;
    its first write error is kept, and nothing more is written, instead of logging's traceback a
    line."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.file = f
        self.error: Optional[OSError] = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is None:
            try:
                self.file.write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
            except OSError as exc:
                self.error = exc
