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
import os
import sys
from collections.abc import Iterator
from typing import Optional

import numpy as np

from ..diff.result import STAT_OF_METHOD, DiffResult, KeyResult

__all__ = ["render_log", "iter_log_lines", "format_value", "emit_log_lines", "LOGGER_NAME"]

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
    v = kr.stat(method)
    if v is None:
        return "None"
    dt = difference_dtype(kr.ref_dtype, kr.other_dtype)
    if dt is None:
        return f"{np.float64(v)}"
    if dt.kind in "iu":
        if STAT_OF_METHOD.get(method, method) in ("max_abs", "min_abs"):
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
    open_path: tuple[str, ...] = ()
    for kr in result:
        path = kr.path or (kr.key,)
        parents = path[:-1]
        common = 0
        while common < min(len(parents), len(open_path)) and parents[common] == open_path[common]:
            common += 1
        for depth in range(common, len(parents)):
            yield f"{indent * depth}{parents[depth]}"
        open_path = parents
        level = len(parents)
        yield f"{indent * level}{path[-1]}: "
        methods = kr.methods or tuple(kr.thresholds) or ("mean",)
        for m in methods:
            if kr.status == "kink":  # beyond noise only downstream of a kink crossing: passes
                ok = True
            elif kr.status not in ("passed", "failed", "mismatch"):
                ok = kr.checks.get(m, kr.passed) and kr.passed
            else:
                ok = kr.checks.get(m, kr.passed)
            if kr.status in ("nan", "inf"):
                value = kr.status
            elif kr.status in ("missing", "extra", "shape", "type", "empty"):
                value = f"None ({kr.status}: {kr.reason})"
            else:
                value = format_value(kr, m)
            yield f"{indent * (level + 1)}{m} diff: check passed: {ok}, value: {value}"
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
    if path is not None:
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fh = logging.FileHandler(path, "w", encoding="utf-8")
        fh.setFormatter(formatter)
        handlers.append(fh)
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
