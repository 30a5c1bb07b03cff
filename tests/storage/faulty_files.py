"""A file object for write-fault tests (imported by test files of this folder, which pytest puts
on sys.path)."""

from __future__ import annotations

import errno
from typing import Any, Union


class FailingFile:
    """A file whose writes fail (a full disk) once ``budget`` bytes have been written (a list of
    one int: a budget shared with other writers, see ``fail_atomic_writes``)."""

    def __init__(self, f: Any, budget: Union[int, list[int]]) -> None:
        self._f = f
        self._left = budget if isinstance(budget, list) else [budget]

    def write(self, data: Any) -> int:
        _spend(self._left, len(memoryview(data).cast("B")))
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _spend(left: list[int], n: int) -> None:
    if n > left[0]:
        raise OSError(errno.ENOSPC, "No space left on device")
    left[0] -= n


def fail_atomic_writes(monkeypatch: Any, modules: tuple[Any, ...], budget: int) -> None:
    """Every ``AtomicFile`` the ``modules`` open (each imports the name) writes through a
    ``FailingFile``, and the savers' descriptor writes (``_pipe``'s ``writev``s, which bypass the
    file object) draw on the same ``budget`` of bytes."""
    from reprod.storage import _pipe

    real = modules[0].AtomicFile
    left = [budget]

    class Failing(real):  # type: ignore[misc, valid-type]
        def __init__(self, p: str) -> None:
            super().__init__(p)
            self.file = FailingFile(self.file, left)

    for module in modules:
        monkeypatch.setattr(module, "AtomicFile", Failing)
    real_writev = _pipe._writev_all

    def writev(fd: int, buffers: list[Any]) -> None:
        _spend(left, sum(len(memoryview(b).cast("B")) for b in buffers))
        real_writev(fd, buffers)

    monkeypatch.setattr(_pipe, "_writev_all", writev)


def assert_the_earlier_file_is_kept(error: OSError, path: Any, earlier: bytes) -> None:
    """A failed save raised the disk's error and left ``path`` as it was, with no temporary
    file beside it."""
    assert error.errno in (errno.ENOSPC, errno.EIO)
    assert path.read_bytes() == earlier
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
