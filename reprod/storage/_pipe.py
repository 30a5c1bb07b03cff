"""The savers' helper thread and their writes on a file's descriptor.

``NpzWriter`` hands a member's CRC (``overlap_crcs``) or ``npz_pack``'s chunks (``_ChunkPipe``) to
one daemon helper thread, and the ``.npy`` writer its pickle frames (``WritevPipe``), so that the
kernel packs the next piece while the last one is written: both release the GIL. A small module of
its own, so that the ``.npy`` writer does not import the ``.npz`` one (~1.5 ms of a process's first
save)."""

from __future__ import annotations

import _thread
import os
from collections import deque
from typing import Any, Callable, Optional, Union


def _write_rest(fd: int, rest: memoryview) -> None:
    while rest:
        rest = rest[os.write(fd, rest):]


class _Job:
    """A call handed to the helper thread; ``result`` waits for it (a lock held until it ran:
    concurrent.futures would cost ~5 ms of imports on the first save of a process)."""

    __slots__ = ("fn", "args", "value", "error", "_lock")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as exc:  # noqa: BLE001 - raised by result(), in the caller's thread
            self.error = exc
        self.fn = self.args = None  # the data goes as soon as it is written
        self._lock.release()

    def done(self) -> bool:
        return not self._lock.locked()

    def wait(self) -> None:
        with self._lock:
            pass

    def result(self) -> Any:
        self.wait()
        if self.error is not None:
            raise self.error
        return self.value


_HELPERS: list[_Helper] = []


class _Helper:
    """One daemon thread running ``_Job``s in the order submitted."""

    def __init__(self) -> None:
        # the C modules under queue and threading: importing those two (and heapq with them) was
        # ~1.8 ms of a process's first save; a thread _thread starts is a daemon thread (never
        # joined at exit), and 3.12 refuses it at shutdown with the same RuntimeError
        import _queue

        self._jobs: Any = _queue.SimpleQueue()
        _thread.start_new_thread(self._main, (self._jobs,))

    @staticmethod
    def _main(jobs: Any) -> None:
        while True:
            jobs.get().run()

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
        self._jobs.put(job)
        return job


class _Inline:
    """``_Helper``'s stand-in where no thread can be started: each job runs in the caller."""

    @staticmethod
    def submit(fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
        job.run()
        return job


def _helper() -> Union[_Helper, _Inline]:
    """The helper thread of ``overlap_crcs``, ``_ChunkPipe`` and ``WritevPipe`` (one for the
    process, made on first use), or ``_Inline`` where a thread cannot be started: a save in an ``atexit``
    handler (Python 3.12 refuses new threads at shutdown), or no threads left."""
    if not _HELPERS:
        with _HELPER_LOCK:
            if not _HELPERS:
                try:
                    _HELPERS.append(_Helper())
                except RuntimeError:
                    return _Inline()
    return _HELPERS[0]


_HELPER_LOCK = _thread.allocate_lock()


def _after_fork_in_child() -> None:  # a child has none of its parent's threads
    global _HELPER_LOCK
    _HELPERS.clear()
    _HELPER_LOCK = _thread.allocate_lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class _ChunkPipe:
    """``npz_pack``'s write on a flushed file's descriptor: each chunk but the first written by the
    helper thread while the kernel packs the next (it releases the GIL for that, and
    ``os.write`` does), at most two chunks in flight. ``finish`` waits for them and raises the
    first failure (a failure also surfaces at the next call); ``wait`` waits for them and drops
    their failures."""

    def __init__(self, fd: int) -> None:
        self._write = _direct_write(fd)
        self._pending: deque[Any] = deque()
        self._first = True

    def __call__(self, chunk: bytes) -> int:
        if self._first:
            # written here: a dump of one chunk (most small saves) never starts the thread
            self._first = False
            return self._write(chunk)
        pending = self._pending
        if len(pending) >= 2:
            pending.popleft().result()
        pending.append(_helper().submit(self._write, chunk))
        return len(chunk)

    def wait(self) -> None:
        """Wait for every chunk in flight, their failures dropped (the caller is raising)."""
        _drain(self._pending, raise_first=False)

    def finish(self) -> None:
        _drain(self._pending, raise_first=True)


def _drain(pending: deque[_Job], raise_first: bool) -> None:
    """Wait for every job in ``pending``, oldest first, emptying it; then raise the first failure
    (``raise_first``) or none."""
    failed: Optional[BaseException] = None
    while pending:
        job = pending.popleft()
        job.wait()
        failed = failed or job.error
    if failed is not None and raise_first:
        raise failed


def _direct_write(fd: int) -> Callable[[bytes], int]:
    """``write`` of a buffered file already flushed, on its descriptor (a short write goes on
    where it stopped). Only absolute seeks follow on the buffered file (see _write_large)."""
    def write(data: bytes) -> int:
        done = os.write(fd, data)
        if done < len(data):
            _write_rest(fd, memoryview(data)[done:])
        return len(data)
    return write


_WRITEV = getattr(os, "writev", None)
# WritevPipe: what one writev carries at most (Linux's IOV_MAX is 1024), and from how many bytes a
# gathered run goes (the .npz chunk's size: 256 KiB; 1 MiB and 4 MiB were slower there)
_MAX_BUFFERS = 512
_GATHER = 256 << 10


def _writev_all(fd: int, buffers: list[Any]) -> None:
    """Every byte of ``buffers`` (bytes-like, one byte an item) to ``fd``, in order, through
    ``writev`` calls of up to ``_MAX_BUFFERS`` buffers; a short write goes on where it stopped."""
    if _WRITEV is None:  # pragma: no cover - Windows
        for b in buffers:
            _write_rest(fd, memoryview(b))
        return
    i = 0
    while i < len(buffers):
        run = buffers[i:i + _MAX_BUFFERS]
        done = _WRITEV(fd, run)
        for b in run:
            n = len(b)
            if done >= n:
                done -= n
                i += 1
                continue
            _write_rest(fd, memoryview(b)[done:])  # a short write: this buffer's rest, then on
            i += 1
            break


class WritevPipe:
    """``write`` for a flushed file's descriptor that gathers what it is given (bytes, bytearrays
    nobody changes any more, uint8 memoryviews of arrays that stay alive and unchanged) into
    ``writev`` calls of ``_GATHER`` bytes, each but the first written by the helper thread (with
    ``threaded``) while the caller produces the next, at most two in flight. ``finish`` writes
    the rest, waits for everything and raises the first failure (a failure also surfaces at a
    later ``write``); ``wait`` waits for what is in flight, failures dropped (the caller is
    raising): the file may not be closed while the helper writes to its descriptor."""

    def __init__(self, fd: int, threaded: bool) -> None:
        self._fd = fd
        self._threaded = threaded
        self._buffers: list[Any] = []
        self._size = 0
        self._pending: deque[_Job] = deque()
        self._first = True

    def write(self, data: Any) -> int:
        n = len(data)
        self._buffers.append(data)
        self._size += n
        if self._size >= _GATHER or len(self._buffers) >= _MAX_BUFFERS:
            self._send()
        return n

    def _send(self) -> None:
        if not self._buffers:
            return
        pending = self._pending
        if len(pending) >= 2:
            pending.popleft().result()  # a failure raised here leaves these buffers unsent
        buffers, self._buffers, self._size = self._buffers, [], 0
        if not self._threaded or self._first:
            # the first run written here: a dump of one run never starts the thread
            self._first = False
            _writev_all(self._fd, buffers)
            return
        pending.append(_helper().submit(_writev_all, self._fd, buffers))

    def wait(self) -> None:
        self._buffers, self._size = [], 0
        _drain(self._pending, raise_first=False)

    def finish(self) -> None:
        try:
            self._send()
        except BaseException:
            self.wait()
            raise
        _drain(self._pending, raise_first=True)
