"""Where the dumps of a tree are: every ``.npy``/``.npz`` file below a folder (links followed,
each folder walked once), and the rank and step a relative path names."""

from __future__ import annotations

import os
import re
from typing import Optional

__all__ = ["DUMP_SUFFIXES", "dump_files", "rank_and_step"]

DUMP_SUFFIXES = (".npy", ".npz")


def dump_files(folder: str) -> list[str]:
    """Relative paths (with "/") of every dump under ``folder``, sorted.

    Dumps are regular files whose suffix is ``.npy`` or ``.npz`` in any case (a FIFO named
    ``x.npy`` is not listed: reading it could wait forever). Symlinks are followed, to files and to
    folders alike; a folder reached twice (a symlink loop, two links to one folder) is walked once,
    by its (device, inode)."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(folder, "")]
    while stack:  # no recursion: a deep tree cannot hit the recursion limit
        path, rel = stack.pop()
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[tuple[str, str]] = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
                is_file = not is_dir and e.is_file()  # a regular file (S_ISREG), link followed
            except OSError:
                continue
            name = f"{rel}{e.name}"
            if is_dir:
                subdirs.append((e.path, name + "/"))
            elif is_file and e.name.lower().endswith(DUMP_SUFFIXES):
                found.append(name)
        stack.extend(reversed(subdirs))
    return sorted(found)


_RANK = re.compile(r"(?<![a-z0-9])(?:rank|worker)[_-]?(\d+)(?![0-9])", re.IGNORECASE)
_STEP = re.compile(r"(?<![a-z0-9])(?:step|iter(?:ation)?)[_-]?(\d+)(?![0-9])", re.IGNORECASE)


def rank_and_step(rel: str) -> tuple[Optional[int], Optional[int]]:
    """The rank and the step a relative path names (``None`` where it names none): ``rank_3``,
    ``rank3``, ``rank-3``, ``worker_3``; ``step_12``, ``step12``, ``iter_12``, ``iteration_12``,
    in any case, in a folder or a file name (the first one from the left counts).

    >>> rank_and_step("rank_3/step_12/forward.npz"), rank_and_step("out_worker7_iter2.npy")
    ((3, 12), (7, 2))
    """
    r = _RANK.search(rel)
    s = _STEP.search(rel)
    return (int(r.group(1)) if r else None, int(s.group(1)) if s else None)
