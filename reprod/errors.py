"""The ReprodError tree: every problem with the user's input is one of these, with a one-line message."""

from __future__ import annotations

from collections.abc import Sequence
from errno import ENOENT as _ENOENT
from typing import Optional

__all__ = [
    "ReprodError",
    "DumpFormatError",
    "DumpNotFoundError",
    "DumpChangedError",
    "UnsafeDumpError",
    "KeyMismatchError",
    "UnsupportedValueError",
    "MissingDependencyError",
    "StreamWriteError",
]


class ReprodError(Exception):
    """Base class of every error reprod raises for bad input (never for its own bugs)."""


class DumpFormatError(ReprodError, ValueError):
    """A file is missing, truncated, corrupt or not a dump reprod can read."""


class DumpNotFoundError(DumpFormatError, FileNotFoundError):
    """No file at the path given: a ``DumpFormatError`` that ``except FileNotFoundError`` also
    catches (reprod_log's ``load_info`` raised ``AssertionError`` there; code written for it often
    guards the load with ``except FileNotFoundError``)."""

    def __init__(self, path: str, message: str = "") -> None:
        super().__init__(message or f"{path}: no such file")
        self.errno = _ENOENT
        self.strerror = "No such file or directory"
        self.filename = path

    def __str__(self) -> str:  # OSError would print "[Errno 2] ..."; keep the one-line message
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[object, ...]:  # pickles (multiprocessing) as it was raised
        return (type(self), (self.filename, str(self)))


class DumpChangedError(DumpFormatError):
    """A dump changed on disk while it was being compared: another process truncated it while
    reprod had it mapped. The compiled kernel catches the SIGBUS its reads then raise (the numpy
    path cannot: there the process still dies of it; SECURITY.md)."""

    @classmethod
    def sigbus(cls, key: str, files: Sequence[Optional[str]], argument: int) -> DumpChangedError:
        """The one-line error for ``key``, whose read faulted in the kernel buffer ``argument``
        (0-based; -1: unknown); ``files``: the file each buffer argument came from, in order."""
        if 0 <= argument < len(files) and files[argument]:
            where = str(files[argument])
        else:  # the fault carried no address: every file that was being read
            where = " or ".join(dict.fromkeys(str(f) for f in files if f))
        return cls(f"{where}: key {key!r}: the file was truncated while being read (SIGBUS)")


class UnsafeDumpError(DumpFormatError):
    """A legacy pickle dump asks for something other than arrays, scalars and plain containers."""


class KeyMismatchError(ReprodError, KeyError):
    """Two dumps do not hold the keys an operation needs."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0]) if self.args else ""


class UnsupportedValueError(ReprodError, TypeError):
    """A value handed to reprod is not numeric data (a string, None, an object array, ...)."""


class StreamWriteError(ReprodError, OSError):
    """A streaming dump's background writer failed (a full disk): raised by the logger's next
    ``add``/``keys``/``close``, naming the file, the key being written and the problem (the
    original exception is its ``__cause__``; an ``OSError``'s ``errno`` is kept). The dump is
    abandoned: its temporary file is gone and any earlier file at the path is untouched."""

    # the message as given, not OSError's "[Errno n] strerror" once errno is set
    __str__ = BaseException.__str__


class MissingDependencyError(ReprodError, ImportError):
    """A file or value needs a framework that is not installed (torch for a ``.pth``); the
    message names the extra to install."""
