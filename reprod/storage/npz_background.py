"""A streaming dump written from a thread of its own: ``BackgroundWriter`` takes the values a
streaming ``ReprodLogger`` is handed and writes them into its ``NpzWriter`` in the order given,
while the caller goes on (the model computes the next layers while the last ones reach the page
cache, which on one thread is what a streamed ``record`` block spent most of its time on).
Opt-in (``ReprodLogger(stream_queue_bytes=N)``): it pays where a CPU core is idle, and costs
where the framework's threads take every core (torch's OpenMP workers spin between operators,
and a third thread delays their next parallel region); benchmarks/README.md has the figures.

What the caller hands over must never change afterwards: ``reprod.capture`` hands over its own
copies (reused only once written: the writer drops its reference then, and the pool goes by
reference counts), ``ReprodLogger.add`` a copy of the value. The queue is bounded in bytes, so
memory stays bounded however far the caller runs ahead: ``put`` waits for room.

A failure of the thread (a full disk) abandons the dump as a failure in ``NpzWriter`` does (its
temporary file goes, an earlier file at the path stays) and is raised, as ``StreamWriteError``
naming the file, the key and the problem, by the next ``put``/``drain``/``close``; what was
handed over after it is dropped, and every later call raises too, so nothing is lost silently.

Threads and processes: the thread starts with the first ``put`` and ends in ``close``/``abort``
(joined), or when the writer is dropped or the interpreter exits unclosed (then the dump is
abandoned, as an unclosed ``NpzWriter`` is). A fork waits for the item being written to reach the
file, so that the child inherits no lock held by a thread it does not have; in the child the
stream is its parent's: every call refuses, and nothing there touches the parent's file.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from typing import Any, Callable, Optional

from ..errors import ReprodError, StreamWriteError
from .npz_writer import MAX_KEY_CHARS, NpzWriter, cores

__all__ = ["BackgroundWriter", "QUEUE_BYTES"]

# A queue bound for callers that name none: enough to ride over the uneven pace of a model's
# layers (a 6.4 MiB activation takes ~2 ms to write), small next to what a streamed step writes
# (813 MiB for MobileNetV3-Small's training step at batch 8).
QUEUE_BYTES = 64 << 20

# (key, value, source dtypes, CRC cache): a key's value as NpzWriter.add / add_array take it,
# and the wait for the value's last write (a device's copy into it) or None
_Item = tuple[str, Any, Any, Optional[dict[bytes, int]], Optional[Callable[[], None]]]


class _State:
    """What the thread shares with its ``BackgroundWriter``. The thread holds this, never the
    ``BackgroundWriter``, so that dropping that stops the thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cond = threading.Condition(threading.Lock())
        # held by the thread while it writes an item; a fork takes it first (see _before_fork)
        self.io = threading.Lock()
        self.items: deque[tuple[_Item, int]] = deque()
        self.queued = 0  # bytes of the items queued or being written
        self.busy = False  # the thread holds an item taken off the queue
        self.stop = False
        self.error: Optional[tuple[str, BaseException]] = None  # (key, what the thread raised)
        self.pid = os.getpid()

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's thread is not here, its locks may be held by it."""
        self.cond = threading.Condition(threading.Lock())
        self.io = threading.Lock()
        self.items.clear()
        self.queued = 0
        self.busy = False
        self.stop = True


def _run(state: _State, writer: NpzWriter) -> None:
    cond = state.cond
    while True:
        with cond:
            while not state.items and not state.stop:
                cond.wait()
            if not state.items:
                return
            item, nbytes = state.items.popleft()
            state.busy = True
        key = item[0]
        failed = _write_one(state, writer, item)
        item = None  # the value goes back to whoever pooled it as soon as it is written
        with cond:
            state.queued -= nbytes
            state.busy = False
            if failed is not None:
                # NpzWriter has abandoned the dump (its temporary file is gone): what waits is
                # dropped unwritten, and every later call raises this
                state.error = (key, failed)
                state.items.clear()
                state.queued = 0
            cond.notify_all()
            if failed is not None:
                return


def _write_one(state: _State, writer: NpzWriter, item: _Item) -> Optional[BaseException]:
    """Write one item once its wait has returned; what failed (the dump then abandoned), or None."""
    key, value, dtypes, crcs, ready = item
    try:
        if ready is not None:
            try:
                ready()  # a device error surfaces here
            except BaseException:
                with state.io:
                    writer.abort()  # as NpzWriter does on a failure of its own
                raise
        with state.io:
            if type(value) is not dict:
                writer.add_array(key, value, dtypes, crcs)
            else:
                writer.add(key, value, dtypes)
    except BaseException as exc:  # noqa: BLE001 - kept for the caller, raised by its next call
        return exc
    return None


def _stop(state: _State, thread: threading.Thread) -> None:
    """The writer was dropped or the interpreter is exiting, unclosed: drop what is queued and
    end the thread; the dump is then abandoned by ``NpzWriter``'s own finalizer."""
    if os.getpid() != state.pid:
        return
    with state.cond:
        state.items.clear()
        state.queued = 0
        state.stop = True
        state.cond.notify_all()
    if thread is not threading.current_thread():
        thread.join()


_LIVE: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class BackgroundWriter:
    """Write values into ``writer`` from a thread, in the order ``put`` is called.

    ``max_bytes`` bounds the bytes of values waiting to be written (a value larger than that
    waits alone). ``drain`` waits until everything is written; ``close`` drains, ends the thread
    and finishes the dump; ``abort`` drops what waits, ends the thread and abandons the dump.
    """

    def __init__(self, writer: NpzWriter, max_bytes: int = QUEUE_BYTES) -> None:
        self.writer = writer
        if cores() >= OVERLAP_CORES:
            # a core for the model, one for this thread's writes, one for the CRCs beside them
            writer.overlap_crcs()
        self.max_bytes = max(int(max_bytes), 1)
        self._state = _State(writer.path)
        self._thread: Optional[threading.Thread] = None
        self._inline = False  # no thread could be started: put writes each value itself
        self._finalizer: Optional[weakref.finalize] = None

    def _check(self) -> _State:
        st = self._state
        if st.pid != os.getpid():
            raise ReprodError(f"{st.path}: this dump is streamed by process {st.pid}; a forked "
                              "child cannot write to it (open a logger of its own in the child)")
        if st.error is not None:
            self._raise(st.error)
        return st

    def _raise(self, error: tuple[str, BaseException]) -> None:
        from .lazy import _one_line  # the reader's module: imported only for this message

        key, exc = error
        if isinstance(exc, StreamWriteError):  # the writer's own: it names the file and the key
            raise exc
        err = StreamWriteError(f"{self._state.path}: writing key {key!r} failed "
                               f"({type(exc).__name__}: {_one_line(exc)}); the dump was abandoned, "
                               "nothing was written")
        if isinstance(exc, OSError):
            err.errno, err.strerror = exc.errno, exc.strerror
        raise err from exc

    def _start(self) -> None:
        st = self._state
        thread = threading.Thread(target=_run, args=(st, self.writer), daemon=True,
                                  name=f"reprod stream {os.path.basename(st.path)}")
        with _LIVE_LOCK:
            _register_fork_handlers()
            thread.start()
            self._thread = thread
            _LIVE.add(self)
        # created after the NpzWriter's own: at exit it runs first, ending the thread before the
        # dump is abandoned
        self._finalizer = weakref.finalize(self, _stop, st, thread)

    def put(self, key: str, value: Any, dtypes: Any = None,
            crcs: Optional[dict[bytes, int]] = None,
            ready: Optional[Callable[[], None]] = None) -> None:
        """Queue ``value`` (an array, or a tree of them, that nobody changes any more once
        ``ready()`` has returned, called by the thread before it writes) for ``key``; waits while
        the queue is full. Raises at once what ``NpzWriter.add`` would
        refuse before writing, and the thread's error if it has failed."""
        st = self._check()
        if st.stop:
            raise ReprodError(f"{st.path}: this dump is already closed")
        if type(value) is dict or dtypes is not None:
            self.writer.check(key, value, dtypes)
            nbytes = _tree_bytes(value)
        else:
            if len(key) > MAX_KEY_CHARS:
                self.writer.check(key, value)
            nbytes = value.nbytes
        if self._thread is None and not self._inline:
            try:
                self._start()
            except RuntimeError:
                # no thread can be started (an atexit handler on Python 3.12, none left): each
                # value is written here, in order, as a streaming logger without one writes it
                self._inline = True
        if self._inline:
            failed = _write_one(st, self.writer, (key, value, dtypes, crcs, ready))
            if failed is not None:
                st.error = (key, failed)
                self._raise(st.error)
            return
        cond = st.cond
        with cond:
            while st.queued and st.queued + nbytes > self.max_bytes and st.error is None:
                cond.wait()
            if st.error is None:
                st.items.append(((key, value, dtypes, crcs, ready), nbytes))
                st.queued += nbytes
                cond.notify_all()
        if st.error is not None:
            self._raise(st.error)

    def drain(self) -> None:
        """Wait until everything queued is written; raise the thread's error if it failed."""
        st = self._check()
        with st.cond:
            while st.items or st.busy:
                st.cond.wait()
        if st.error is not None:
            self._raise(st.error)

    def _end(self, *, discard: bool) -> None:
        st = self._state
        with st.cond:
            if discard:
                st.items.clear()
                st.queued = 0
            st.stop = True
            st.cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._finalizer is not None:
            self._finalizer.detach()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def close(self) -> str:
        """Write what is queued, end the thread and finish the dump; returns its path."""
        st = self._state
        if st.pid != os.getpid():
            self._check()
        self._end(discard=False)
        if st.error is not None:
            self._raise(st.error)
        return self.writer.close()

    def abort(self) -> None:
        """Drop what is queued, end the thread and abandon the dump (in a forked child: only
        forget the parent's stream)."""
        if self._state.pid != os.getpid():
            return
        self._end(discard=True)
        self.writer.abort()


# the cores from which the thread's large members get their CRCs computed beside their writes
OVERLAP_CORES = 4


def _tree_bytes(tree: Any) -> int:
    if isinstance(tree, dict):
        return sum(_tree_bytes(v) for v in tree.values())
    return int(getattr(tree, "nbytes", 0))


# --- fork -------------------------------------------------------------------------------------
_fork_handlers = [False]
_held: list[_State] = []


def _before_fork() -> None:
    # a child must not inherit the file's buffer lock held by a writer thread it will not have:
    # wait for the item being written (the thread takes no other item while this is held)
    with _LIVE_LOCK:
        states = [w._state for w in list(_LIVE)]
    for st in states:
        st.io.acquire()
        _held.append(st)


def _after_fork_in_parent() -> None:
    while _held:
        _held.pop().io.release()


def _after_fork_in_child() -> None:
    held, _held[:] = list(_held), []
    for st in held:
        st.reset_after_fork()
    global _LIVE_LOCK
    _LIVE_LOCK = threading.Lock()
    _LIVE.clear()


def _register_fork_handlers() -> None:
    if not _fork_handlers[0] and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _fork_handlers[0] = True
