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

Where each part lives: ``layout`` (finding the dumps, naming rank and step), ``tasks`` (one file
pair, as every executor runs it), ``pairs`` (the plan of pairs, and the merge back into a
``TreeResult``), ``executors`` (serial, process pool, Dask), ``result`` (``TreeResult``: the report
by step and rank); this module holds ``compare_trees`` and the choice of executor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..errors import ReprodError
from .executors import (
    ClusterError,
    ProgressArg,
    TaskFn,
    _connect,
    _cpu_count,
    _PairProgress,
    _run_dask,
    _run_pool,
    _run_serial,
)
from .layout import DUMP_SUFFIXES as DUMP_SUFFIXES  # re-exported: reprod.trees.DUMP_SUFFIXES
from .layout import dump_files, rank_and_step
from .pairs import _merge, _plan
from .result import Divergence, StepReport, TreeEntry, TreeResult
from .tasks import _Outcome as _Outcome  # re-exported: the task's pieces, for tests and tools
from .tasks import _run_task
from .tasks import _Task as _Task

if TYPE_CHECKING:
    from ..diff.criteria import Criteria

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

SCHEDULER_ENV = "REPROD_SCHEDULER"
# with jobs=None, trees smaller than this (both sides) are compared serially: on small files a
# pair's comparison costs about what running it in another process does (benchmarks/README.md)
AUTO_SERIAL_BYTES = 64 * 2**20


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
        from ..diff.criteria import Criteria

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
