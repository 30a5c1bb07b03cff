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


def fail_atomic_writes(monkeypatch: Any, modules: tuple[Any, ...], budget: int) -> None:
    """Every ``AtomicFile`` the ``modules`` open (each imports the name) writes through a
    ``FailingFile`` of ``budget`` bytes."""
    real = modules[0].AtomicFile

    class Failing(real):  # type: ignore[misc, valid-type]
        def __init__(self, p: str) -> None:
            super().__init__(p)
            self.file = FailingFile(self.file, budget)

    for module in modules:
        monkeypatch.setattr(module, "AtomicFile", Failing)


def assert_the_earlier_file_is_kept(error: OSError, path: Any, earlier: bytes) -> None:
    """A failed save raised the disk's error and left ``path`` as it was, with no temporary
    file beside it."""
    assert error.errno in (errno.ENOSPC, errno.EIO)
    assert path.read_bytes() == earlier
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
