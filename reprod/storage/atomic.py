"""Atomic file replacement: write beside the target, rename into place only when complete."""

from __future__ import annotations

import _thread
import errno
import os
import re
import stat
import time
from typing import Any, BinaryIO, Optional

from ..errors import write_error

try:  # the C module behind ``signal``, loaded at start-up: ``signal`` costs ~0.6 ms to import
    import _signal
except ImportError:  # pragma: no cover - an implementation without it
    import signal as _signal

try:  # POSIX: a writer holds a lock on its temporary file while it lives
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["AtomicFile", "STALE_TMP_SECONDS", "remove_stale_temporaries"]

# A temporary file left by a killed writer is removed by the next save to the same path once it is
# this old and no live process holds its lock. Where locks cannot be checked (Windows, a file
# system without flock) the age alone decides, and it must be a day.
STALE_TMP_SECONDS = 3600
STALE_TMP_SECONDS_UNLOCKED = 24 * 3600
# temporary names: "." + target name + "." + 8 random characters + ".tmp" (tempfile.mkstemp's
# characters, so that files left by earlier versions, which used mkstemp, are recognised too)
_RANDOM = r"^[a-z0-9_]{8}$"  # compiled by re at first use (import time is every save's)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_OPEN_FLAGS = (
    os.O_RDWR | os.O_CREAT | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
)


_FSYNC = os.environ.get("REPROD_FSYNC", "0") not in ("", "0", "false", "no")


class AtomicFile:
    """A binary file that appears at ``path`` only on ``commit()``; ``abort()`` leaves no trace.

    The temporary file ``.<name>.<random>.tmp`` lives in the target's folder so that the final
    ``os.replace`` is a rename on one file system (atomic on POSIX and Windows): a reader sees the
    old dump or the new one, never half of one, and a failure mid-write leaves any earlier dump
    untouched. With ``REPROD_FSYNC=1`` its data is also flushed to the disk (fsync) before the
    rename, which guards against power loss too; it is off by default because the rename alone
    already protects against a crashed or killed process, and fsync made saving a 1 GiB dump
    about 35% slower (benchmarks/README.md). A writer killed outright
    (SIGKILL, power loss) leaves its temporary file behind; the next ``AtomicFile`` for the same
    path removes such leftovers (see ``remove_stale_temporaries``). SIGTERM (in the main thread,
    where no other handler is set) ends the process as Ctrl-C does, removing the temporary file.

    What is already at ``path`` is respected:

    - a symlink is written through: the file it points to is replaced (atomically, in its folder)
      and the link stays;
    - a FIFO, a device or a socket (``/dev/null``, ``>(cat)``, ``/dev/stdout``) is written to
      directly and never replaced (``direct`` is True; nothing can then be undone by ``abort``);
      a FIFO that no process reads fails at once with ``ENXIO`` instead of waiting;
    - a replaced file's permission bits are kept (a 0600 dump stays 0600); a new file gets those
      of a plain ``open()`` (0666 less the umask);
    - a file with other hard links is replaced like any other: this name gets the new dump, the
      other names keep the old one (the alternative, writing in place, would let a reader see half
      a dump and crash a process that has the old one mapped).
    """

    def __init__(self, path: str) -> None:
        target = os.path.abspath(path)
        self.path = target
        self.direct = False
        self.tmp_path: Optional[str] = None
        self._mode: Optional[int] = None
        self._done = False
        self._given = path  # what errors name: the path as the caller gave it
        try:
            self._open(target)
        except OSError as exc:  # a folder that cannot be written to, a path through a file, ...
            raise write_error(exc, path, creating=True)  # noqa: B904 - write_error chains it

    def _open(self, target: str) -> None:
        try:
            st: Optional[os.stat_result] = os.stat(target)  # through symlinks
        except FileNotFoundError:  # nothing there (or a dangling symlink)
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), target)
            self._open_direct(target)
            return
        if os.path.islink(target):
            # write through the link: the temporary file and the rename go where the data lives
            target = os.path.realpath(target)
        if st is not None:
            self._mode = stat.S_IMODE(st.st_mode)
        self._target = target
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(target)
        main = _sigterm_hold()
        if main:  # SIGTERM waits until the temporary file is registered for its handler
            _critical[0] += 1
        try:
            fd, tmp = _mkstemp(folder, _tmp_prefix(folder, os.path.basename(target)))
            _live_temporaries.add(tmp)
            self.tmp_path = tmp
        except BaseException:
            _sigterm_release()
            raise
        finally:
            if main:
                _critical[0] -= 1
        if main and _term_state["pending"]:
            _terminate(_signal.SIGTERM)  # one came meanwhile: removes the file, raises SystemExit
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # no locks on this file system: stale files then go by age alone
        # a 1 MiB buffer: dumps of thousands of small keys are written in KiB pieces (a system call
        # each with the default 8 KiB); large payloads bypass it
        self.file: BinaryIO = os.fdopen(fd, "w+b", buffering=1 << 20)

    def _open_direct(self, target: str) -> None:
        """Open a FIFO, device or socket for writing, as the shell's ``>`` would (no truncation
        matters there); O_NONBLOCK only for the open, so that a FIFO without a reader fails."""
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(target, flags | getattr(os, "O_NONBLOCK", 0))
        try:
            if fcntl is not None:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        except BaseException:
            os.close(fd)
            raise
        self.direct = True

    def commit(self) -> str:
        if self._done:
            return self.path
        if self.tmp_path is not None and self.tmp_path in _removed_by_sigterm:
            # SIGTERM came mid-save and the program caught its SystemExit: nothing to put in place
            self.abort()
            raise write_error(OSError(errno.EINTR, "interrupted by SIGTERM, whose cleanup removed "
                                      "the temporary file"), self._given)
        if self.direct:
            self._done = True
            try:
                self.file.close()  # flushes; a write error shows here
            except OSError as exc:
                raise self._error(exc)  # noqa: B904 - write_error chains it
            return self.path
        try:
            self.file.flush()
            if _FSYNC:
                os.fsync(self.file.fileno())
            self.file.close()
            mode = self._mode
            if mode is None:
                # mkstemp creates 0600; give the dump the permissions a plain open() would have
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            assert self.tmp_path is not None
            os.chmod(self.tmp_path, mode)
            if _exchange(self.tmp_path, self._target):
                try:
                    os.unlink(self.tmp_path)  # the earlier dump, under the temporary name now
                except OSError:
                    pass  # gone already (a stale-file sweep elsewhere): the save is done
            else:
                os.replace(self.tmp_path, self._target)
            _live_temporaries.discard(self.tmp_path)
        except BaseException as exc:
            # a full disk often shows only here, when the last buffered bytes are flushed
            self.abort()
            raise self._error(exc)  # noqa: B904 - write_error chains it
        self._done = True
        _sigterm_release()
        return self.path

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.file.close()
        except OSError:
            pass  # closing flushes; on a full disk that fails, and the file goes anyway
        finally:
            if self.tmp_path is not None:
                try:
                    os.unlink(self.tmp_path)
                except FileNotFoundError:
                    pass
                finally:
                    _live_temporaries.discard(self.tmp_path)
                    _removed_by_sigterm.discard(self.tmp_path)
                    _sigterm_release()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
            return
        self.abort()
        if isinstance(exc, OSError):  # a full disk, named: the file and the problem
            err = self._error(exc)
            if err is not exc:
                raise err

    def _error(self, exc: BaseException, key: Optional[str] = None,
               cls: Optional[type] = None) -> BaseException:
        """``exc`` as ``write_error`` names it, where it is about this write (no file, or ours):
        with ``key`` where one was being written, as ``cls`` (a ``WriteError`` class)."""
        name = getattr(exc, "filename", None)
        ours = name is not None and os.fsdecode(name) in (self.tmp_path, self.path,
                                                          getattr(self, "_target", None))
        return write_error(exc, self._given, key, cls=cls, ours=ours, direct=self.direct)


# --- SIGTERM while a temporary file exists ---------------------------------------------------------
# Ctrl-C (KeyboardInterrupt) unwinds through the writers' cleanup and removes their temporary
# files; SIGTERM's default action ends the process on the spot and left hundreds of MB behind. While
# at least one AtomicFile holds a temporary file, SIGTERM (in the main thread, where Python runs
# signal handlers) removes every temporary file of this process's live AtomicFiles and raises
# SystemExit(143): the writers' cleanup then runs as for Ctrl-C, finding nothing left to remove,
# and the process exits with status 128 + 15. Removing the files in the handler itself closes the
# windows where an exception would escape a cleanup (between creating the file and entering the
# ``with`` block); the handler waits while a temporary file is being created and registered. This
# happens only where SIGTERM has its default action: a handler the program set, or SIG_IGN, is
# left alone. The default action is put back when the last such file is committed or aborted.
# Written with _thread and _signal, which every process has loaded, instead of threading and
# signal, which a process that only saves has not: "the main thread" is the one that installed the
# handler (only it can: elsewhere signal.signal raises ValueError), as that is the thread where
# the handler runs.
_term_lock = _thread.allocate_lock()  # what threading.Lock() is
_term_holders = [0]
_term_state: dict[str, Any] = {"installed": False, "terminating": False, "pending": False,
                               "thread": None,  # the ident of the thread that installed it
                               "raised": None}  # the SystemExit the handler raised last
_live_temporaries: set[str] = set()  # temporary files of live AtomicFiles, for the handler
_removed_by_sigterm: set[str] = set()  # those the handler removed, until their writer ends
_critical = [0]  # > 0 while the main thread creates and registers a temporary file


def _on_sigterm(signum: int, frame: Any) -> None:
    if _term_state["terminating"]:
        return  # a second SIGTERM while the first unwinds: let the cleanup finish
    if _critical[0]:
        _term_state["pending"] = True  # raised as soon as the new file is registered
        return
    _terminate(signum)


def _terminate(signum: int) -> None:
    _term_state["terminating"] = True
    _term_state["pending"] = False
    for path in list(_live_temporaries):
        try:
            os.unlink(path)
        except OSError:
            pass
        _removed_by_sigterm.add(path)
    exc = SystemExit(128 + signum)
    _term_state["raised"] = exc
    _unraisable_ends_the_process()
    raise exc


# A handler runs wherever the main thread is when the signal comes, and Python cannot let an
# exception out of some of those places: a __del__, a weakref callback, a buffered file closed as
# it is collected. There it prints "Exception ignored in" and goes on, and SIGTERM's SystemExit was
# lost: a save loop kept saving after a SIGTERM (seen once in CI, under load). SIGTERM's default
# action is never weakened: a SystemExit lost that way ends the process by the signal, as the
# default action would (the temporary files are gone already). One the program catches is its
# own to handle, as any SystemExit; the save it interrupted then fails on commit, and says why.
def _unraisable_ends_the_process() -> None:
    import sys  # built in, loaded at start-up

    hook = sys.unraisablehook
    if getattr(hook, "__name__", "") == "_unraisable_sigterm":
        return

    def _unraisable_sigterm(args: Any, _previous: Any = hook) -> None:
        exc = _term_state.get("raised")
        if exc is None or args.exc_value is not exc:
            _previous(args)
            return
        _die(exc.code)

    sys.unraisablehook = _unraisable_sigterm


def _die(status: int) -> None:
    """End the process by the signal behind ``status`` (128 + its number), with its default action,
    as though no handler had been set; ``os._exit(status)`` where that does not end it."""
    try:
        _signal.signal(status - 128, _signal.SIG_DFL)
        os.kill(os.getpid(), status - 128)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no such signal here
        pass
    os._exit(status)


def _sigterm_hold() -> bool:
    """Count one more temporary file, installing the handler where SIGTERM has its default action;
    True when the handler is installed and runs in this thread (which then guards its file's
    creation with ``_critical``)."""
    me = _thread.get_ident()
    with _term_lock:
        _term_holders[0] += 1
        if not _term_state["installed"]:
            try:
                if _is_default(_signal.getsignal(_signal.SIGTERM)):
                    _signal.signal(_signal.SIGTERM, _on_sigterm)  # ValueError but in the main thread
                    _term_state["installed"] = True
                    _term_state["thread"] = me
            except (ValueError, OSError, AttributeError):  # not the main thread, or no signals here
                pass
        return _term_state["installed"] and _term_state["thread"] == me


def _is_default(handler: Any) -> bool:
    """``signal.getsignal(SIGTERM) is signal.SIG_DFL`` for ``_signal.getsignal``'s raw value: a
    stored handler that is not callable (nor None, one set outside Python) equals SIG_IGN or
    SIG_DFL, as ``signal.signal`` enforces, and ``signal.getsignal`` maps it to that member."""
    return handler is not None and not callable(handler) and handler == _signal.SIG_DFL


def _sigterm_release() -> None:
    with _term_lock:
        _term_holders[0] = max(0, _term_holders[0] - 1)
        if _term_holders[0] or not _term_state["installed"]:
            return
        if _thread.get_ident() != _term_state["thread"]:
            return  # put back by the next release in the main thread
        try:
            if _signal.getsignal(_signal.SIGTERM) is _on_sigterm:
                _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        except (ValueError, OSError):  # pragma: no cover
            pass
        _term_state["installed"] = False
        _term_state["terminating"] = _term_state["pending"] = False


def _after_fork_in_child() -> None:
    # a forked child's one thread is its main thread now (threading.main_thread() says so too).
    # The temporary files it inherits the names of are its parent's: a SIGTERM in the child (a
    # DataLoader worker stopped) must not remove them, so they are forgotten here and SIGTERM
    # gets its default action back until the child makes a temporary file of its own
    _term_state["thread"] = _thread.get_ident()
    _live_temporaries.clear()
    _term_holders[0] = 0
    _term_state["terminating"] = _term_state["pending"] = False
    _removed_by_sigterm.clear()
    if _term_state["installed"]:
        _term_state["installed"] = False
        try:
            if _signal.getsignal(_signal.SIGTERM) is _on_sigterm:
                _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        except (ValueError, OSError):  # pragma: no cover
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- Replacing an earlier dump -----------------------------------------------------------------------
# os.replace over an existing file costs ext4 more than the write: its auto_da_alloc heuristic
# allocates and starts writing the new file's blocks inside the rename (170-180 ms for 256 MiB on
# this project's VM, against 65 ms for the write). Where a regular file is at the target, the two
# names are exchanged instead (renameat2 RENAME_EXCHANGE, atomic as a rename: a reader sees the old
# dump or the new one), and the old file, now under the temporary name, is removed before commit
# returns (freeing its blocks is the rest of the rename's cost: ~150 ms for 256 MiB on a disk
# mounted with discard; on the helper thread it could outlive a process that SIGTERM ends, leaving
# the old dump behind under a temporary name). The heuristic's other effect, the new data forced
# to the disk before the rename commits, is what REPROD_FSYNC=1 gives on every file system;
# without it a dump reaches the disk with the system's usual writeback, as a first save to a new
# name always did.
_EXCHANGE: list[bool] = [True]  # False once the system or a file system refused an exchange
# exchanged from this many bytes (the old and new file together): below, the rename's extra work
# is a fraction of a millisecond, less than loading the kernel for the exchange
_EXCHANGE_FROM = 1 << 20


def _exchange(tmp: str, target: str) -> bool:
    """Swap ``tmp`` (the new dump) with the regular file at ``target`` where the two are
    ``_EXCHANGE_FROM`` bytes or more together; False, with nothing changed, where there is no such
    file, the two are smaller, or an exchange is not available."""
    if not _EXCHANGE[0]:
        return False
    try:
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode) or st.st_size + os.stat(tmp).st_size < _EXCHANGE_FROM:
            return False
    except OSError:
        return False  # nothing at the target (any more): a plain rename
    from .. import _native  # here: a small save does not load the kernel for this

    swap = getattr(_native.kernel(), "rename_exchange", None)
    if swap is None:
        return False
    try:
        swap(tmp, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            _EXCHANGE[0] = False  # no renameat2, or a file system without exchanges
        return False  # anything else: os.replace decides, as before
    if stat.S_ISREG(os.lstat(tmp).st_mode):
        return True
    # something other than a file came to the target between the two calls: put it back (an
    # error here aborts the save, as a failed rename would)
    swap(tmp, target)
    return False


def _tmp_prefix(folder: str, name: str) -> str:
    """The start of the temporary names of target ``name``: ``.<name>.``, then 8 random
    characters and ``.tmp``. Where that would be longer than a file name may be (a target name of
    242 bytes or more, where the limit is 255), the name is cut and a checksum of it added,
    ``.<name cut>~<8 hex digits>.``, so that every name the system takes can be saved to, and
    each target still has temporary names of its own."""
    prefix = "." + name + "."
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    except (OSError, ValueError):
        limit = 255
    if limit <= 0 or len(os.fsencode(prefix)) + 12 <= limit:
        return prefix
    import zlib  # here only: names this long are rare

    raw = os.fsencode(name)
    tag = f"~{zlib.crc32(raw):08x}."
    keep = max(limit - 12 - len(tag) - 1, 1)
    # cut on a character boundary: surrogate-escaped bytes stay whole
    cut = os.fsdecode(raw[:keep])
    while len(os.fsencode(cut)) > keep:
        cut = cut[:-1]
    return "." + cut + tag


def _mkstemp(folder: str, prefix: str) -> tuple[int, str]:
    """``tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)`` without importing tempfile,
    which (with shutil and random) costs ~15 ms on the first save of a process."""
    for _ in range(100):
        name = "".join(_CHARS[b % len(_CHARS)] for b in os.urandom(8))
        path = os.path.join(folder, prefix + name + ".tmp")
        try:
            return os.open(path, _OPEN_FLAGS, 0o600), path
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: no free temporary name for {prefix}*.tmp")


def remove_stale_temporaries(path: str, *, now: Optional[float] = None) -> list[str]:
    """Remove the temporary files that killed writers left beside ``path``; return their names.

    Only reprod's own names for this target (``.<name>.<8 random chars>.tmp``) are candidates, and
    one goes only when no live writer holds its lock and it is ``STALE_TMP_SECONDS`` old (a day
    where locks cannot be checked), so a save running in another process is never disturbed.

    >>> remove_stale_temporaries("result/run.npz")
    []
    """
    folder, name = os.path.split(os.path.abspath(path))
    prefix = _tmp_prefix(folder, name)
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(".tmp")
                and re.match(_RANDOM, e.name[len(prefix) : -4])):
            continue
        try:
            age = now - e.stat(follow_symlinks=False).st_mtime
            if not e.is_file(follow_symlinks=False) or age < STALE_TMP_SECONDS:
                continue
            if _owner_alive(e.path, age):
                continue
            os.unlink(e.path)
            removed.append(e.path)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _owner_alive(path: str, age: float) -> bool:
    if fcntl is None:
        return age < STALE_TMP_SECONDS_UNLOCKED
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # a live writer holds it
    except OSError:
        return age < STALE_TMP_SECONDS_UNLOCKED  # no working locks here: go by age
    finally:
        os.close(fd)  # closing drops our lock too
    return False
