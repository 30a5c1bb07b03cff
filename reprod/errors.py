"""The ReprodError tree: every problem with the user's input is one of these, with a one-line message."""

from __future__ import annotations

import builtins
import os
import sys
from collections.abc import Sequence
from errno import EISDIR as _EISDIR
from errno import ENAMETOOLONG as _ENAMETOOLONG
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
    "WriteError",
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


class WriteError(ReprodError, OSError):
    """A file reprod writes (a dump, a stream, a report) could not be written: a full disk, a
    folder that cannot be written to, a file-size limit. The message names the file, the key being
    written where one is known, and the problem; ``errno``, ``strerror`` and ``filename`` (the
    target, never the temporary file) are kept, and the system's own error is ``__cause__``.
    Nothing was replaced: an earlier file at the path is as it was (a FIFO or device, written to
    directly, may have received part of it). Where the system's error was a subclass of
    ``OSError`` (``PermissionError``, ``FileNotFoundError``, ...) this is one too, so that code
    catching that still does."""

    # the message as given, not OSError's "[Errno n] strerror" once errno is set
    __str__ = BaseException.__str__

    def __init__(self, message: str, errno: Optional[int] = None, strerror: Optional[str] = None,
                 filename: Optional[str] = None) -> None:
        super().__init__(message)
        self.errno, self.strerror, self.filename = errno, strerror, filename

    def __reduce__(self) -> tuple[object, ...]:  # pickles (multiprocessing) as it was raised
        mro = type(self).__mro__
        cls = mro[1] if type(self) in _MADE else mro[0]  # the class as written, and its OSError
        base = next((c for c in mro if c in _OS_SUBCLASSES), OSError)
        return (_rebuild_write_error, (cls, base, str(self), self.errno, self.strerror,
                                       self.filename))


def write_error(exc: BaseException, path: str, key: Optional[str] = None, *,
                cls: Optional[type[WriteError]] = None, creating: bool = False,
                ours: bool = False, direct: bool = False) -> BaseException:
    """``exc``, raised while writing ``path`` (and ``key``, where known), as the one-line
    ``WriteError`` that names them; ``exc`` itself where it is not a system error of the write (a
    ``ReprodError`` already, an interrupt, another file's error). ``creating``: raised while
    making the file (its folder, its temporary file), whatever file the error names; ``ours``:
    the caller knows the file the error names is one of the write's own; ``direct``: the file is
    written in place (a FIFO, a device), so what was written may have arrived."""
    if isinstance(exc, ReprodError) or not isinstance(exc, Exception):
        return exc
    where = f"{path}: key {key!r}" if key is not None else path
    if not isinstance(exc, OSError):
        if type(exc).__module__ != "sqlite3":
            return exc
        # the key index of a stream past 20,000 keys (npz_keylog), in a temporary database: a
        # full disk there is this write's too ("database or disk is full")
        return _chained((cls or WriteError)(
            f"{where}: writing failed: the key index: {' '.join(str(exc).split())}; nothing was "
            "replaced", None, None, os.fspath(path)), exc)
    native = sys.modules.get("reprod._native")  # not loaded: nothing raised its read faults
    if native is not None and isinstance(exc, native.MappedReadError):
        return exc  # a source array's file truncated while it was read: not the write's fault
    name = exc.filename
    if name is not None and not (creating or ours) and not _names_target(os.fsdecode(name), path):
        return exc  # about another file (one being read while saving): its own error says so
    if exc.strerror:
        problem = f"{exc.strerror} (errno {exc.errno})" if exc.errno is not None else exc.strerror
    else:
        problem = " ".join(str(exc).split()) or type(exc).__name__
    if creating and exc.errno in (_ENAMETOOLONG, _EISDIR):  # the path itself: no folder to blame
        message = f"{where}: cannot create the file: {problem}"
    elif creating:
        folder = os.fsdecode(name) if name is not None and \
            not _names_target(os.fsdecode(name), path) else os.path.dirname(os.path.abspath(path))
        message = f"{where}: cannot create the file ({folder}: {problem})"
    else:
        message = f"{where}: writing failed: {problem}" + ("" if direct else "; nothing was replaced")
    return _chained(_write_error_class(type(exc), cls or WriteError)(
        message, exc.errno, exc.strerror, os.fspath(path)), exc)


def _chained(err: WriteError, exc: BaseException) -> WriteError:
    err.__cause__ = exc  # and __suppress_context__, as "raise err from exc" sets them
    err.__suppress_context__ = True
    return err


def _names_target(name: str, path: str) -> bool:
    """Whether an error's file name is ``path`` or its temporary file: ``.<name>.<8>.tmp``, or
    ``.<name cut>~<8 hex>.<8>.tmp`` for a long name (``storage.atomic._tmp_prefix``)."""
    a, b = os.path.abspath(name), os.path.abspath(path)
    if a == b or os.path.dirname(a) != os.path.dirname(b):
        return a == b
    base, target = os.path.basename(a), os.path.basename(b)
    if not (base.startswith(".") and base.endswith(".tmp")) or len(base) < 14:
        return False
    stem = base[1:-13]  # less "." before, and ".<8 random>.tmp" after
    cut = stem.rfind("~")
    return stem == target or (cut > 0 and len(stem) - cut == 9 and target.startswith(stem[:cut]))


# the OSError subclasses a WriteError keeps (each with its own class here, made on first use)
_OS_SUBCLASSES = frozenset(c for c in vars(builtins).values()
                           if isinstance(c, type) and issubclass(c, OSError) and c is not OSError)
_WRITE_ERROR_CLASSES: dict[tuple[type, type], type] = {}
_MADE: set[type] = set()


def _write_error_class(os_class: type, cls: type[WriteError]) -> type[WriteError]:
    if os_class not in _OS_SUBCLASSES:
        return cls
    made = _WRITE_ERROR_CLASSES.get((os_class, cls))
    if made is None:
        made = type(cls.__name__, (cls, os_class), {"__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__})
        _WRITE_ERROR_CLASSES[(os_class, cls)] = made
        _MADE.add(made)
    return made  # type: ignore[return-value]


def _rebuild_write_error(cls: type[WriteError], base: type, message: str, errno: Optional[int],
                         strerror: Optional[str], filename: Optional[str]) -> WriteError:
    return _write_error_class(base, cls)(message, errno, strerror, filename)


class StreamWriteError(WriteError):
    """A streaming dump's background writer failed (a full disk): raised by the logger's next
    ``add``/``keys``/``close``, naming the file, the key being written and the problem (the
    original exception is its ``__cause__``; an ``OSError``'s ``errno`` is kept). The dump is
    abandoned: its temporary file is gone and any earlier file at the path is untouched."""


class MissingDependencyError(ReprodError, ImportError):
    """A file or value needs a framework that is not installed (torch for a ``.pth``); the
    message names the extra to install."""
