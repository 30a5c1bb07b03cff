"""A file object for write-fault tests (imported by test files of this folder, which pytest puts
on sys.path)."""

from __future__ import annotations

import errno
from typing import Any


class FailingFile:
    """A file whose writes fail (a full disk) once ``budget`` bytes have been written."""

    def __init__(self, f: Any, budget: int) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget -= n
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)
