"""ReprodDiffHelper: reprod_log's comparison front door, same names, arguments, defaults and lines."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional, Union

from .errors import DumpFormatError, ReprodError
from .storage import Dump, load

__all__ = ["ReprodDiffHelper", "emit_log_lines", "LOGGER_NAME"]

_FORMAT = "[%(asctime)s] root %(levelname)s: %(message)s"  # reprod_log logs through the root logger
_DATEFMT = "%Y/%m/%d %H:%M:%S"
LOGGER_NAME = "reprod.report"


class ReprodDiffHelper:
    """Drop-in for ``reprod_log.ReprodDiffHelper``.

    >>> helper = ReprodDiffHelper()
    >>> a = helper.load_info("result/forward_torch.npy")
    >>> b = helper.load_info("result/forward_paddle.npy")
    >>> helper.compare_info(a, b)
    >>> helper.report(path="result/log/forward_diff.log", diff_threshold=1e-5)
    True

    Differences from reprod_log, each deliberate: ``load_info`` returns a lazy read-only mapping
    (no pickle is run; arrays are read when compared); ``compare_info`` reports missing and extra keys
    as failed checks instead of asserting; ``report`` returns True/False, never passes a NaN, never
    silently transposes, and does not add handlers to the root logger (so calling it twice prints
    each line once). ``result`` holds the full :class:`reprod.DiffResult` after ``report``.
    """

    def __init__(self) -> None:
        self._info: Optional[tuple[Any, Any]] = None
        self._base: Any = None
        self.result: Any = None

    def load_info(self, path: str) -> Dump:
        if not os.path.exists(path):
            raise DumpFormatError(f"{path}: no such file")
        return load(path)

    def compare_info(self, info1: Mapping[str, Any], info2: Mapping[str, Any]) -> None:
        if not isinstance(info1, Mapping) or not isinstance(info2, Mapping):
            raise ReprodError(
                f"compare_info needs two dicts (what load_info returns), got "
                f"{type(info1).__name__} and {type(info2).__name__}"
            )
        from .diff.engine import compare

        # every statistic is computed once here; report() only judges them
        self._base = compare(info1, info2, method="all", threshold=None)
        self.diff_dict = self._base  # reprod_log exposes diff_dict; keep the attribute

    def report(self, diff_method: Union[str, list[str]] = "mean", diff_threshold: float = 1e-6,
               path: Optional[str] = "./diff.txt") -> bool:
        if self._base is None:
            raise ReprodError("report() called before compare_info()")
        from .diff.engine import rejudge
        from .report.log import render_log

        self.result = rejudge(self._base, method=diff_method, threshold=diff_threshold)
        emit_log_lines(render_log(self.result), path)
        return bool(self.result.passed)


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
