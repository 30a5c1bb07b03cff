"""The pairs of two trees: planned from the two listings (which files pair, which paths each
task opens), and merged back, in plan order, into a ``TreeResult``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Optional

from ..errors import ReprodError
from .layout import DUMP_SUFFIXES, dump_files, rank_and_step
from .result import TreeEntry, TreeResult
from .tasks import _lost, _Outcome, _Task


def _plan(ref: str, other: str, noise: Optional[str], absolute: bool,
          options: dict[str, Any]) -> list[_Task]:
    """Every file pair of the two trees: the reference's files in sorted order, then the files
    only the other tree holds (reprod-diff's folder order). ``absolute``: tasks open absolute
    paths (a cluster worker's working directory is not the caller's)."""
    for root, what in ((ref, "reference"), (other, "other"), (noise, "noise")):
        if root is not None and not os.path.isdir(root):
            raise ReprodError(f"{root}: no such folder ({what} tree)")
    ref_files, other_files = dump_files(ref), dump_files(other)
    if not ref_files and not other_files:
        raise ReprodError(f"{ref}: no dump files ({', '.join(DUMP_SUFFIXES)}) in this folder "
                          f"nor in {other}")
    opener = os.path.abspath if absolute else (lambda p: p)
    other_set = set(other_files)
    tasks: list[_Task] = []

    def add(rel: str, in_ref: bool, in_other: bool) -> None:
        a, b = os.path.join(ref, rel), os.path.join(other, rel)
        nz: Optional[str] = None
        if noise is not None:
            path = os.path.join(noise, rel)
            nz = opener(path) if os.path.isfile(path) else ""
        size = 0
        for p, present in ((a, in_ref), (b, in_other)):
            if present:
                try:
                    size += os.stat(p).st_size
                except OSError:
                    pass
        tasks.append(_Task(index=len(tasks), rel=rel, ref=opener(a) if in_ref else None,
                           other=opener(b) if in_other else None, ref_name=a, other_name=b,
                           noise=nz, nbytes=size, options=options))

    for rel in ref_files:
        # a partner that exists but is no regular file (a FIFO, a folder) is an error naming it
        # when opened, not an absent partner
        add(rel, True, rel in other_set or os.path.exists(os.path.join(other, rel)))
    paired = set(ref_files)
    for rel in other_files:
        if rel not in paired:
            add(rel, False, True)
    return tasks


def _entry(task: _Task, o: _Outcome) -> TreeEntry:
    rank, step = rank_and_step(task.rel)
    assert o.result is not None
    if o.lost:
        return TreeEntry(task.rel, o.result, "error", rank, step, keys=1, passed_keys=0,
                         reason=o.lost)
    if task.ref is None or task.other is None:
        absent = "ref" if task.ref is None else "other"
        missing = task.ref_name if absent == "ref" else task.other_name
        return TreeEntry(task.rel, o.result, "missing", rank, step, keys=o.keys,
                         passed_keys=o.passed_keys, absent=absent,
                         reason=f"{missing} does not exist")
    return TreeEntry(task.rel, o.result, "compared", rank, step, keys=o.keys,
                     passed_keys=o.passed_keys)


def _merge(ref: str, other: str, tasks: Iterable[_Task], outcomes: dict[int, _Outcome],
           errors: str, mode: str, seconds: float) -> TreeResult:
    tasks = list(tasks)
    if errors == "raise":  # the first unreadable file in pair order, whichever finished first
        for t in tasks:
            o = outcomes.get(t.index)
            if o is not None and o.error is not None:
                raise o.error
    entries = []
    for t in tasks:
        o = outcomes.get(t.index)
        if o is None:  # cannot happen: every executor reports every pair; never drop one
            o = _lost(t, "no result came back")
        elif o.error is not None:
            o = _lost(t, " ".join(str(o.error).split()))
        entries.append(_entry(t, o))
    return TreeResult(ref=ref, other=other, entries=tuple(entries), mode=mode, seconds=seconds)
