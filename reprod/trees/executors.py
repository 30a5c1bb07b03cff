"""Where the pairs run: serially in this process, on a local process pool (a pool broken by a
dying process is retried, then run one pair at a time), or on a Dask cluster; each reports
every pair's outcome and advances one progress bar over the pairs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

from ..errors import ReprodError
from .tasks import _lost, _Outcome, _Task

ProgressArg = Union[bool, None, Callable[[int, int, str], None]]


class ClusterError(ReprodError, ConnectionError):
    """The Dask scheduler cannot be reached, or its workers cannot run reprod's tasks."""


class _PairProgress:
    """Pairs done out of the total: a bar on stderr (reprod's Progress, counting pairs and the
    bytes of their files), or a callback ``(done, total, rel)``."""

    def __init__(self, tasks: Sequence[_Task], progress: ProgressArg) -> None:
        self.total = len(tasks)
        self.done = 0
        self.callback: Optional[Callable[[int, int, str], None]] = None
        self.bar: Any = None
        if callable(progress) and not isinstance(progress, bool):
            self.callback = progress
            return
        from ..diff.progress import Progress, progress_enabled

        class _Bar(Progress):
            def line(self, now: Optional[float] = None) -> str:
                return super().line(now).replace(" keys ", " file pairs ", 1)

        if progress_enabled(progress):
            self.bar = _Bar(total_keys=self.total, total_bytes=sum(t.nbytes for t in tasks))

    def pair_done(self, task: _Task) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total, task.rel)
        elif self.bar is not None:
            self.bar.advance(task.nbytes)
            self.bar.key_done()  # the bar's "keys" are the pairs here

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


TaskFn = Callable[[_Task], _Outcome]


def _run_serial(tasks: Sequence[_Task], fn: TaskFn, bar: _PairProgress,
                errors: str) -> dict[int, _Outcome]:
    out: dict[int, _Outcome] = {}
    for t in tasks:
        o = fn(t)
        out[t.index] = o
        bar.pair_done(t)
        if o.error is not None and errors == "raise":
            break
    return out


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _init_pool_worker(threads: Optional[int]) -> None:
    if threads is not None:
        from ..diff.metrics import set_threads

        set_threads(threads)


_PRELOAD = ["reprod.trees", "reprod.diff.engine", "reprod.storage"]


def _pool_context() -> Any:
    """forkserver (never fork: this process may hold threads), its server importing reprod once
    so that each pool process starts ready; spawn where there is no forkserver."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():  # pragma: no cover - Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver  # type: ignore[attr-defined]
        have = list(getattr(server, "_preload_modules", ["__main__"]))
        if getattr(server, "_forkserver_pid", None) is None and not set(_PRELOAD) <= set(have):
            ctx.set_forkserver_preload(have + [m for m in _PRELOAD if m not in have])
    except Exception:  # pragma: no cover - a Python without these internals: start unloaded
        pass
    return ctx


def _run_pool(tasks: Sequence[_Task], fn: TaskFn, jobs: int, bar: _PairProgress,
              errors: str) -> dict[int, _Outcome]:
    """A local process pool. A process that dies breaks the whole pool (every pair in flight
    fails with it): those pairs run again in a fresh pool, and pairs that broke that one too run
    one at a time, so that only a pair whose process dies while it runs alone is reported, as an
    error pair naming both files; no pair is dropped."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = _pool_context()
    # the pool's processes share the CPUs: each one's threads for large arrays, unless set
    threads = None if os.environ.get("REPROD_THREADS") else max(1, _cpu_count() // jobs)
    out: dict[int, _Outcome] = {}

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(threads,))

    def done(t: _Task, o: _Outcome) -> bool:
        """Record an outcome; True when the run must stop (an unreadable file, errors="raise")."""
        out[t.index] = o
        bar.pair_done(t)
        return o.error is not None and errors == "raise"

    pending = list(tasks)
    for _round in range(2):  # all pairs, then the pairs whose pool broke, in parallel
        died: list[_Task] = []
        stop = False
        with new_pool(min(jobs, len(pending))) as pool:
            futures = {pool.submit(fn, t): t for t in pending}
            waiting = set(futures)
            try:
                while waiting and not stop:
                    finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for f in sorted(finished, key=lambda f: futures[f].index):
                        try:
                            o = f.result()
                        except BrokenProcessPool:
                            died.append(futures[f])
                            continue
                        stop = done(futures[f], o) or stop
            finally:
                for f in waiting:
                    f.cancel()
        if stop:
            return out
        pending = sorted(died, key=lambda t: t.index)
        if not pending:
            return out
    pool = new_pool(1)  # then one at a time: a pool that breaks now names its pair
    try:
        for t in pending:
            try:
                o = pool.submit(fn, t).result()
            except BrokenProcessPool:
                pool.shutdown(wait=True)
                pool = new_pool(1)
                o = _lost(t, f"the process comparing {t.ref_name} and {t.other_name} died "
                             "(killed, out of memory?), three times; not compared")
            if done(t, o):
                break
    finally:
        pool.shutdown(wait=True)
    return out


def _connect(address: str, timeout: float) -> Any:
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError(f"scheduler {address}: Dask is not installed "
                           "(pip install \"dask[distributed]\")") from None
    for attempt in (1, 2):
        try:
            return Client(address, timeout=timeout, set_as_default=False)
        except AssertionError as exc:
            # distributed's handshake asserts it reads one message; on a loaded machine it was
            # seen to read more (distributed 2026.8, client.py `assert len(msg) == 1`): once more
            if attempt == 2:
                raise ClusterError(f"cannot connect to the Dask scheduler at {address}: its "
                                   f"handshake failed twice ({type(exc).__name__})") from None
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            text = " ".join(str(exc).split()) or type(exc).__name__
            raise ClusterError(f"cannot reach the Dask scheduler at {address} "
                               f"(waited {timeout:g} s): {text}") from None
    raise AssertionError("unreachable")


def _run_dask(tasks: Sequence[_Task], fn: TaskFn, client: Any, bar: _PairProgress,
              errors: str) -> dict[int, _Outcome]:
    """One Dask task per pair. A worker that dies is replaced and its task rerun by the scheduler
    (``distributed.scheduler.allowed-failures`` times); past that the pair is an error pair."""
    import uuid

    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    run = uuid.uuid4().hex[:8]
    futures = client.map(fn, list(tasks), key=[f"reprod-pair-{run}-{t.index}" for t in tasks],
                         pure=False)
    by_key = {f.key: t for f, t in zip(futures, tasks)}
    out: dict[int, _Outcome] = {}
    # results come back as they finish, fetched concurrently (not one round trip a pair)
    done = as_completed(futures, loop=client.loop, with_results=True, raise_errors=False)
    try:
        for f, value in done:
            t = by_key[f.key]
            if f.status == "error":
                exc = value[1]
                if isinstance(exc, ImportError):
                    raise ClusterError(f"the Dask workers cannot run reprod ({exc}): install "
                                       "reprod-align on every worker") from None
                if not isinstance(exc, KilledWorker):
                    raise exc
                o = _lost(t, f"the Dask worker comparing {t.ref_name} and {t.other_name} died "
                             f"on each of {exc.allowed_failures + 1} tries (KilledWorker); "
                             "not compared")
            else:
                o = value
            f.release()  # the worker may drop it now
            out[t.index] = o
            bar.pair_done(t)
            if o.error is not None and errors == "raise":
                break
    finally:
        client.cancel([f for f in futures if not f.done()])
    return out
