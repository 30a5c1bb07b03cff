"""Atomic file replacement: write beside the target, rename into place only when complete."""

from __future__ import annotations

import os
import re
import time
from typing import BinaryIO, Optional

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
_RANDOM = re.compile(r"^[a-z0-9_]{8}$")
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
    path removes such leftovers (see ``remove_stale_temporaries``).
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(self.path)
        fd, self.tmp_path = _mkstemp(folder, "." + os.path.basename(self.path) + ".")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # no locks on this file system: stale files then go by age alone
        # a 1 MiB buffer: dumps of thousands of small keys are written in KiB pieces (a system call
        # each with the default 8 KiB); large payloads bypass it
        self.file: BinaryIO = os.fdopen(fd, "w+b", buffering=1 << 20)
        self._done = False

    def commit(self) -> str:
        if self._done:
            return self.path
        try:
            self.file.flush()
            if _FSYNC:
                os.fsync(self.file.fileno())
            self.file.close()
            # mkstemp creates 0600; give the dump the permissions a plain open() would have
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp_path, 0o666 & ~umask)
            os.replace(self.tmp_path, self.path)
        except BaseException:
            # a full disk often shows only here, when the last buffered bytes are flushed
            self.abort()
            raise
        self._done = True
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
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


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
    prefix = "." + name + "."
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not (e.name.startswith(prefix) and e.name.endswith(".tmp")
                and _RANDOM.match(e.name[len(prefix) : -4])):
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
