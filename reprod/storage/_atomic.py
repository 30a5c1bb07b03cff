"""Atomic file replacement: write beside the target, rename into place only when complete."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO

__all__ = ["AtomicFile"]


class AtomicFile:
    """A binary file that appears at ``path`` only on ``commit()``; ``abort()`` leaves no trace.

    The temporary file lives in the target's folder so that the final ``os.replace`` is a rename on
    one file system (atomic on POSIX and Windows): a reader sees the old dump or the new one, never
    half of one, and a failure mid-write leaves any earlier dump untouched.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        fd, self.tmp_path = tempfile.mkstemp(
            prefix="." + os.path.basename(self.path) + ".", suffix=".tmp", dir=folder
        )
        self.file: BinaryIO = os.fdopen(fd, "w+b")
        self._done = False

    def commit(self) -> str:
        if self._done:
            return self.path
        self.file.flush()
        self.file.close()
        # mkstemp creates 0600; give the dump the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_path, 0o666 & ~umask)
        os.replace(self.tmp_path, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self.file.close()
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
