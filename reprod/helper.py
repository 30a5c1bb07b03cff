"""ReprodDiffHelper: reprod_log's comparison front door, same names, arguments, defaults and lines."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

from .errors import DumpNotFoundError, ReprodError
from .report.log import emit_log_lines
from .storage import load

__all__ = ["ReprodDiffHelper"]


class ReprodDiffHelper:
    """Drop-in for ``reprod_log.ReprodDiffHelper``.

    >>> helper = ReprodDiffHelper()
    >>> a = helper.load_info("result/forward_torch.npy")
    >>> b = helper.load_info("result/forward_paddle.npy")
    >>> helper.compare_info(a, b)
    >>> helper.diff_dict["logits"]["mean"]
    >>> helper.report(path="result/log/forward_diff.log", diff_threshold=1e-5)
    True

    ``load_info`` returns a plain ``dict`` (nested dicts for nested keys) of writable numpy arrays,
    as reprod_log's did, but reads nothing: the arrays view a private copy-on-write mapping of the
    file (editing one never changes the file), and no pickle is run. ``diff_dict`` is reprod_log's
    ``{key: {"mean", "max", "min"}}`` after ``compare_info``; ``result`` holds the full
    :class:`reprod.DiffResult` after ``report``.

    Differences from reprod_log, each deliberate: a missing file raises ``DumpNotFoundError`` (a
    ``FileNotFoundError``) instead of ``AssertionError``; ``compare_info`` reports missing and
    extra keys as failed checks instead of asserting; ``report`` returns True/False, never passes
    a NaN, never silently transposes, and does not add handlers to the root logger (so calling it
    twice prints each line once).
    """

    def __init__(self) -> None:
        self._base: Any = None
        self._calibrated: Optional[tuple[Any, Any, Any, Any]] = None
        self._diff_dict: Optional[dict[str, Any]] = None
        self._own_diff_dict = True  # False once the caller assigns diff_dict (report then uses it)
        self.result: Any = None

    def load_info(self, path: str) -> dict[str, Any]:
        p = os.fspath(path)
        if not os.path.exists(p):
            raise DumpNotFoundError(p)
        dump = load(p)
        try:
            return dump.to_writable_dict()
        finally:
            dump.close()  # the arrays keep their own (copy-on-write) mapping

    def compare_info(self, info1: Mapping[str, Any], info2: Mapping[str, Any], *,
                     noise: Any = None, other_noise: Any = None) -> None:
        """reprod_log's ``compare_info``. Beyond it: ``noise``, the reference run in float64
        (a dict from ``load_info`` or a path), makes ``report`` judge each key found there by
        the reference's own noise (``reprod.compare``'s ``noise``), whatever ``diff_threshold``
        says; ``other_noise``, the port run in float64 too, passes a key both sides' rounding
        makes (``reprod.compare``'s ``other_noise``)."""
        if not isinstance(info1, Mapping) or not isinstance(info2, Mapping):
            raise ReprodError(
                f"compare_info needs two dicts (what load_info returns), got "
                f"{type(info1).__name__} and {type(info2).__name__}"
            )
        from .compare import str_keys
        from .diff.engine import compare

        # every statistic is computed once here; report() only judges them
        if other_noise is not None and noise is None:
            raise ReprodError("compare_info(other_noise=...) needs noise= (the reference run in "
                              "float64)")
        a, b = str_keys(info1), str_keys(info2)
        self._base = compare(a, b, method="all", threshold=None)
        self._calibrated = None if noise is None else (
            a, b, *(str_keys(x) if isinstance(x, Mapping) else x for x in (noise, other_noise)))
        self._diff_dict = None
        self._own_diff_dict = True

    @property
    def diff_dict(self) -> dict[str, Any]:
        """reprod_log's diff dict of the last ``compare_info``: ``{key: {"mean": v, "max": v,
        "min": v}}``, nested as the dumps are (built on first access). A key that has no
        statistics (NaN, shape, missing or extra key) holds NaN values."""
        if self._diff_dict is None:
            if self._base is None:
                raise AttributeError("'ReprodDiffHelper' object has no attribute 'diff_dict' "
                                     "(call compare_info first)")
            from .compare import diff_tree

            self._diff_dict = diff_tree(self._base)
        return self._diff_dict

    @diff_dict.setter
    def diff_dict(self, value: dict[str, Any]) -> None:
        # reprod_log's report judges whatever diff_dict holds; a dict assigned here is what it reports
        self._diff_dict = value
        self._own_diff_dict = False

    def report(self, diff_method: Union[str, list[str]] = "mean", diff_threshold: float = 1e-6,
               path: Optional[str] = "./diff.txt") -> bool:
        if not self._own_diff_dict:
            from .utils import check_print_diff

            lines: list[str] = []
            passed = check_print_diff(self.diff_dict, diff_method=diff_method,
                                      diff_threshold=diff_threshold, print_func=lines.append)
            lines.append("diff check passed" if passed else "diff check failed")
            emit_log_lines(lines, path)
            return passed
        if self._base is None:
            raise ReprodError("report() called before compare_info()")
        from .diff.verdict import rejudge
        from .report.log import render_log

        if self._calibrated is not None:  # the noise judges each key: the data is read again
            from .diff.engine import compare

            a, b, noise, other_noise = self._calibrated
            self.result = compare(a, b, method=diff_method, threshold=diff_threshold,
                                  noise=noise, other_noise=other_noise)
        else:
            self.result = rejudge(self._base, method=diff_method, threshold=diff_threshold)
        emit_log_lines(render_log(self.result), path)
        return bool(self.result.passed)
