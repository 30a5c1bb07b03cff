"""Compare two trees of dumps file pair by file pair: serially, on a local process pool, or on a
Dask cluster; then read the verdicts by training step and by rank.

>>> t = reprod.compare_trees("torch_dumps", "paddle_dumps", jobs=4)
>>> print("\\n".join(t.summary_lines()))
>>> for rel, result in t.pairs: ...          # what reprod-diff's folder mode renders
>>> t.first_divergence()                     # earliest step, lowest rank, then file and key order

A distributed training run dumps one tree per rank and step (``rank_0/step_1/out.npz`` ...,
``rank3``, ``worker_3``; ``step_12``, ``step12``, ``iter_12``, anywhere in the relative path).
Every file pair is one task: it opens its two files where it runs (on a cluster, a worker reads
them from shared storage; no array crosses the network) and sends back only its ``KeyResult``s
(with ``failed_only=True``: the failing ones plus the counts). The merged result is the serial
one, key for key, in the same order, whichever way it was computed.

Dask is optional (``pip install "dask[distributed]"``): it is imported only when a ``client``,
a ``scheduler`` address or ``REPROD_SCHEDULER`` is given. The local pool uses the standard
library's ``concurrent.futures``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .errors import ReprodError
from .tree_result import (
    Divergence,
    StepReport,
    TreeEntry,
    TreeResult,
)

if TYPE_CHECKING:
    from .diff.criteria import Criteria
    from .diff.result import DiffResult

__all__ = [
    "compare_trees",
    "TreeResult",
    "TreeEntry",
    "StepReport",
    "Divergence",
    "ClusterError",
    "dump_files",
    "rank_and_step",
]

DUMP_SUFFIXES = (".npy", ".npz")
SCHEDULER_ENV = "REPROD_SCHEDULER"
# with jobs=None, trees smaller than this (both sides) are compared serially: on small files a
# pair's comparison costs about what running it in another process does (benchmarks/README.md)
AUTO_SERIAL_BYTES = 64 * 2**20

ProgressArg = Union[bool, None, Callable[[int, int, str], None]]


class ClusterError(ReprodError, ConnectionError):
    """The Dask scheduler cannot be reached, or its workers cannot run reprod's tasks."""


# --- listing and naming ----------------------------------------------------------------------------


def dump_files(folder: str) -> list[str]:
    """Relative paths (with "/") of every dump under ``folder``, sorted.

    Dumps are regular files whose suffix is ``.npy`` or ``.npz`` in any case (a FIFO named
    ``x.npy`` is not listed: reading it could wait forever). Symlinks are followed, to files and to
    folders alike; a folder reached twice (a symlink loop, two links to one folder) is walked once,
    by its (device, inode)."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(folder, "")]
    while stack:  # no recursion: a deep tree cannot hit the recursion limit
        path, rel = stack.pop()
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs: list[tuple[str, str]] = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
                is_file = not is_dir and e.is_file()  # a regular file (S_ISREG), link followed
            except OSError:
                continue
            name = f"{rel}{e.name}"
            if is_dir:
                subdirs.append((e.path, name + "/"))
            elif is_file and e.name.lower().endswith(DUMP_SUFFIXES):
                found.append(name)
        stack.extend(reversed(subdirs))
    return sorted(found)


_RANK = re.compile(r"(?<![a-z0-9])(?:rank|worker)[_-]?(\d+)(?![0-9])", re.IGNORECASE)
_STEP = re.compile(r"(?<![a-z0-9])(?:step|iter(?:ation)?)[_-]?(\d+)(?![0-9])", re.IGNORECASE)


def rank_and_step(rel: str) -> tuple[Optional[int], Optional[int]]:
    """The rank and the step a relative path names (``None`` where it names none): ``rank_3``,
    ``rank3``, ``rank-3``, ``worker_3``; ``step_12``, ``step12``, ``iter_12``, ``iteration_12``,
    in any case, in a folder or a file name (the first one from the left counts).

    >>> rank_and_step("rank_3/step_12/forward.npz"), rank_and_step("out_worker7_iter2.npy")
    ((3, 12), (7, 2))
    """
    r = _RANK.search(rel)
    s = _STEP.search(rel)
    return (int(r.group(1)) if r else None, int(s.group(1)) if s else None)


# --- one file pair: the task every executor runs ----------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """One file pair, as a worker needs it: plain, picklable, small."""

    index: int
    rel: str
    ref: Optional[str]  # the path to open; None: the file is absent on this side
    other: Optional[str]
    ref_name: str  # the names results carry (as the caller gave the roots)
    other_name: str
    noise: Optional[str]  # None: no noise tree; "": a noise tree without this file
    nbytes: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # criteria, keys, verify, failed_only


@dataclass(frozen=True)
class _Outcome:
    index: int
    result: Optional[DiffResult]
    keys: int = 0
    passed_keys: int = 0
    error: Optional[BaseException] = None  # a ReprodError from reading the pair
    lost: str = ""  # why the pair was not compared (its worker died), "" when it was


def _open(path: str, verify: bool) -> Any:
    if verify:
        from .storage import load

        return load(path, verify=True)
    return path


def _unpaired(result: DiffResult, missing_path: str) -> DiffResult:
    """A file without a partner: every key it holds fails, the reason naming the absent file
    (reprod-diff's folder mode, key for key)."""
    from .diff.result import KeyResult

    reason = f"{missing_path} does not exist"
    keys = tuple(replace(kr, reason=reason) for kr in result.results)
    if not keys:  # an empty dump still must not pass for an absent partner
        status = "missing" if result.other_name == missing_path else "extra"
        keys = (KeyResult(key=os.path.basename(missing_path), passed=False, status=status,
                          reason=reason),)
    return replace(result, results=keys)


def _compare_task(task: _Task) -> DiffResult:
    from .diff.engine import compare

    verify = bool(task.options.get("verify"))
    opts: dict[str, Any] = {"criteria": task.options.get("criteria"),
                            "keys": task.options.get("keys"), "progress": False,
                            "pair": task.options.get("pair")}
    if task.noise is not None:
        opts["noise"] = _open(task.noise, verify) if task.noise else {}
    if task.ref is not None and task.other is not None:
        result = compare(_open(task.ref, verify), _open(task.other, verify), **opts)
        return replace(result, ref_name=task.ref_name, other_name=task.other_name)
    if task.ref is not None:
        result = replace(compare(_open(task.ref, verify), {}, **opts),
                         ref_name=task.ref_name, other_name=task.other_name)
        return _unpaired(result, task.other_name)
    assert task.other is not None
    result = replace(compare({}, _open(task.other, verify), **opts),
                     ref_name=task.ref_name, other_name=task.other_name)
    return _unpaired(result, task.ref_name)


def _run_task(task: _Task) -> _Outcome:
    """Compare one pair where this runs; only the verdicts travel back."""
    try:
        result = _compare_task(task)
    except ReprodError as exc:
        return _Outcome(task.index, None, error=exc)
    n = len(result.results)
    passed = sum(r.passed for r in result.results)
    if task.options.get("failed_only") and passed:
        result = replace(result, results=tuple(r for r in result.results if not r.passed))
    return _Outcome(task.index, result, keys=n, passed_keys=passed)


def _error_result(task: _Task, reason: str) -> DiffResult:
    """A pair that could not be compared: one failing key named after the file, status "error"."""
    from .diff.result import DiffResult, KeyResult

    key = KeyResult(key=os.path.basename(task.rel), passed=False, status="error", reason=reason)
    return DiffResult(results=(key,), ref_name=task.ref_name, other_name=task.other_name)


def _lost(task: _Task, reason: str) -> _Outcome:
    return _Outcome(task.index, _error_result(task, reason), keys=1, lost=reason)


# --- the plan: which pairs, which paths --------------------------------------------------------------


def _plan(ref: str, other: str, noise: Optional[str], absolute: bool,
          options: dict[str, Any]) -> list[_Task]:
    """Every file pair of the two trees: the reference's files in sorted order, then the files
    only the other tree holds (reprod-diff's folder order). ``absolute``: tasks open absolute
    paths (a cluster worker's working directory is not the caller's)."""
    for root, what in ((ref, "reference"), (other, "other"), (noise, "noise")):
        if root is not None and not os.path.isdir(root):
            raise ReprodError(f"{root}: no such folder ({what} tree)")
    ref_files, other_files = dump_files(ref), dump_files(other)
    if not ref_files and not other_files:
        raise ReprodError(f"{ref}: no dump files ({', '.join(DUMP_SUFFIXES)}) in this folder "
                          f"nor in {other}")
    opener = os.path.abspath if absolute else (lambda p: p)
    other_set = set(other_files)
    tasks: list[_Task] = []

    def add(rel: str, in_ref: bool, in_other: bool) -> None:
        a, b = os.path.join(ref, rel), os.path.join(other, rel)
        nz: Optional[str] = None
        if noise is not None:
            path = os.path.join(noise, rel)
            nz = opener(path) if os.path.isfile(path) else ""
        size = 0
        for p, present in ((a, in_ref), (b, in_other)):
            if present:
                try:
                    size += os.stat(p).st_size
                except OSError:
                    pass
        tasks.append(_Task(index=len(tasks), rel=rel, ref=opener(a) if in_ref else None,
                           other=opener(b) if in_other else None, ref_name=a, other_name=b,
                           noise=nz, nbytes=size, options=options))

    for rel in ref_files:
        # a partner that exists but is no regular file (a FIFO, a folder) is an error naming it
        # when opened, not an absent partner
        add(rel, True, rel in other_set or os.path.exists(os.path.join(other, rel)))
    paired = set(ref_files)
    for rel in other_files:
        if rel not in paired:
            add(rel, False, True)
    return tasks


# --- executors ---------------------------------------------------------------------------------------


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
        from .diff.progress import Progress, progress_enabled

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
        from .diff.metrics import set_threads

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
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ClusterError(f"cannot reach the Dask scheduler at {address} "
                           f"(waited {timeout:g} s): {text}") from None


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


def _entry(task: _Task, o: _Outcome) -> TreeEntry:
    rank, step = rank_and_step(task.rel)
    assert o.result is not None
    if o.lost:
        return TreeEntry(task.rel, o.result, "error", rank, step, keys=1, passed_keys=0,
                         reason=o.lost)
    if task.ref is None or task.other is None:
        absent = "ref" if task.ref is None else "other"
        missing = task.ref_name if absent == "ref" else task.other_name
        return TreeEntry(task.rel, o.result, "missing", rank, step, keys=o.keys,
                         passed_keys=o.passed_keys, absent=absent,
                         reason=f"{missing} does not exist")
    return TreeEntry(task.rel, o.result, "compared", rank, step, keys=o.keys,
                     passed_keys=o.passed_keys)


# --- the entry point --------------------------------------------------------------------------------


def compare_trees(
    a: Union[str, os.PathLike[str]],
    b: Union[str, os.PathLike[str]],
    *,
    criteria: Optional[Criteria] = None,
    noise: Optional[Union[str, os.PathLike[str]]] = None,
    client: Any = None,
    jobs: Optional[int] = None,
    scheduler: Optional[str] = None,
    keys: Optional[Union[str, Sequence[str]]] = None,
    verify: bool = False,
    failed_only: bool = False,
    errors: str = "raise",
    progress: ProgressArg = None,
    connect_timeout: float = 10.0,
    pair: Optional[Callable[[Any, Any], Any]] = None,
) -> TreeResult:
    """Compare every dump of tree ``a`` (the reference) with the file at the same relative path in
    tree ``b``; ``noise``: a third tree (the reference in float64), the file at the same path
    calibrating each pair (a pair without one is judged by the plain thresholds, each key noted).

    Where the pairs run: on ``client`` (a ``distributed.Client``) when given; else on the Dask
    scheduler at ``scheduler`` (``"tcp://host:8786"``; environment: ``REPROD_SCHEDULER``), a
    client connected for this call and closed after it (``connect_timeout`` seconds to reach it,
    else a one-line ``ClusterError``, a ``ReprodError``); else on a local pool of ``jobs``
    processes (default: the CPUs this process may use, or serially for trees under 64 MiB;
    ``jobs=1``: serially, in this process). The pool's processes start from a forkserver: a
    script that calls this must guard its top level with ``if __name__ == "__main__":``.
    On a cluster the workers open the files at the paths given (made absolute), so the trees
    must be on storage every worker sees at the same path; reprod must be installed there too.

    Every way gives the same result: ``.pairs`` in the same order, every ``KeyResult`` equal.
    ``criteria``, ``keys`` (globs) and ``verify`` (check every .npz member's CRC first) are
    ``reprod.compare``'s. ``failed_only``: each pair sends back only its failing keys (and the
    counts), for trees of millions of keys. A file present on one side only is a ``missing``
    pair (its keys fail as missing or extra). A file that cannot be read raises its
    ``ReprodError`` (``errors="report"``: the pair becomes an ``error`` pair and the rest go on).
    A pair whose worker process dies is run again (a fresh pool, or the Dask scheduler's retries),
    then reported as an ``error`` pair naming both files; no pair is ever dropped. ``progress``: a
    bar over the pairs on stderr (``None``: when stderr is a terminal), or a callable
    ``(done, total, relative_path)``. ``pair``: ``reprod.compare``'s renaming function, applied
    to every pair; it runs in this process only (``jobs=1``, no cluster).
    """
    if pair is not None and (client is not None or scheduler is not None or (jobs or 1) > 1):
        raise ReprodError("compare_trees: pair= runs in this process only (jobs=1, no cluster)")
    return _compare_trees(a, b, criteria=criteria, noise=noise, client=client,
                          jobs=1 if pair is not None else jobs, scheduler=scheduler, keys=keys,
                          verify=verify, failed_only=failed_only, errors=errors,
                          progress=progress, connect_timeout=connect_timeout, task_fn=_run_task,
                          pair=pair)


def _visible(*roots: str) -> bool:
    """Whether this process sees the trees (on a cluster, the workers may see what it does not)."""
    return all(os.path.isdir(r) for r in roots)


def _compare_trees(a: Any, b: Any, *, criteria: Any, noise: Any, client: Any, jobs: Optional[int],
                   scheduler: Optional[str], keys: Any, verify: bool, failed_only: bool,
                   errors: str, progress: ProgressArg, connect_timeout: float,
                   task_fn: TaskFn, pair: Any = None) -> TreeResult:
    if errors not in ("raise", "report"):
        raise ValueError(f"errors={errors!r}: 'raise' or 'report'")
    if jobs is not None and (isinstance(jobs, bool) or int(jobs) < 1):
        raise ValueError(f"jobs={jobs!r}: a number of processes >= 1")
    if criteria is None:
        from .diff.criteria import Criteria

        criteria = Criteria()
    ref, other = os.fspath(a), os.fspath(b)
    noise_root = None if noise is None else os.fspath(noise)
    if client is None and scheduler is None:
        scheduler = os.environ.get(SCHEDULER_ENV) or None
    cluster = client is not None or scheduler is not None
    options = {"criteria": criteria, "keys": keys, "verify": verify, "failed_only": failed_only}
    if pair is not None:
        options["pair"] = pair
    start = time.perf_counter()
    own_client = None
    try:
        if cluster and client is None:
            assert scheduler is not None
            client = own_client = _connect(scheduler, connect_timeout)
        if cluster and not _visible(ref, other):
            # the caller does not see the trees: list them where the workers do
            tasks = client.submit(_plan, ref, other, noise_root, True, options,
                                  pure=False).result()
        else:
            tasks = _plan(ref, other, noise_root, cluster, options)
        bar = _PairProgress(tasks, progress)
        try:
            if cluster:
                mode = f"dask {getattr(client.scheduler, 'address', scheduler) or scheduler}"
                outcomes = _run_dask(tasks, task_fn, client, bar, errors)
            else:
                n = min(_cpu_count() if jobs is None else int(jobs), len(tasks))
                if jobs is None and sum(t.nbytes for t in tasks) < AUTO_SERIAL_BYTES:
                    n = 1  # a pool's start and transfers cost more than it saves
                if n <= 1:
                    mode = "serial"
                    outcomes = _run_serial(tasks, task_fn, bar, errors)
                else:
                    mode = f"{n} processes"
                    outcomes = _run_pool(tasks, task_fn, n, bar, errors)
        finally:
            bar.close()
    finally:
        if own_client is not None:
            own_client.close()
    return _merge(ref, other, tasks, outcomes, errors, mode, time.perf_counter() - start)


def _merge(ref: str, other: str, tasks: Iterable[_Task], outcomes: dict[int, _Outcome],
           errors: str, mode: str, seconds: float) -> TreeResult:
    tasks = list(tasks)
    if errors == "raise":  # the first unreadable file in pair order, whichever finished first
        for t in tasks:
            o = outcomes.get(t.index)
            if o is not None and o.error is not None:
                raise o.error
    entries = []
    for t in tasks:
        o = outcomes.get(t.index)
        if o is None:  # cannot happen: every executor reports every pair; never drop one
            o = _lost(t, "no result came back")
        elif o.error is not None:
            o = _lost(t, " ".join(str(o.error).split()))
        entries.append(_entry(t, o))
    return TreeResult(ref=ref, other=other, entries=tuple(entries), mode=mode, seconds=seconds)
