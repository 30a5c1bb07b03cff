"""reprod.compare_trees: per-rank, per-step dump trees compared serially, on a local process pool
and on a Dask cluster (a 2-process LocalCluster on loopback), with identical results."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import fields

import numpy as np
import pytest

import reprod
from reprod import trees
from reprod.errors import ReprodError
from reprod.trees import compare_trees, dump_files, rank_and_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the cluster tests share one LocalCluster: keep this module on one xdist worker
pytestmark = pytest.mark.xdist_group("tests/test_trees.py")

KEYS = ("embed.out", "block.0.out", "block.1.out", "head.out", "loss")


def _dump(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.out": rng.standard_normal((4, 8)).astype(np.float32),
        "block.0.out": rng.standard_normal((4, 8)).astype(np.float32),
        "block.1.out": rng.standard_normal((4, 8)).astype(np.float32),
        "head.out": rng.standard_normal((4, 3)).astype(np.float32),
        "loss": np.float32(rng.random()),
    }


def make_trees(root, ranks=4, steps=3, bad=(), layout="rank_{r}/step_{s}", files=("fwd.npz",)):
    """Two trees ``root/a`` and ``root/b``; ``bad``: (step, rank, file, key) the other side
    scales by 1 + 1e-2 (every other key equal to the bit)."""
    a, b = root / "a", root / "b"
    for s in range(1, steps + 1):
        for r in range(ranks):
            for i, name in enumerate(files):
                rel = f"{layout.format(r=r, s=s)}/{name}"
                ref = _dump(s * 100_000 + r * 10 + i)
                other = {k: v.copy() for k, v in ref.items()}
                for bs, br, bf, bk in bad:
                    if (bs, br, bf) == (s, r, name):
                        other[bk] = (other[bk] * np.float32(1.01)).astype(np.float32)
                for side, data in ((a, ref), (b, other)):
                    (side / rel).parent.mkdir(parents=True, exist_ok=True)
                    reprod.save(str(side / rel), data)
    return str(a), str(b)


def assert_same(got, want) -> None:
    """Same pairs in the same order; every DiffResult field but the clock, every KeyResult field."""
    assert [rel for rel, _ in got.pairs] == [rel for rel, _ in want.pairs]
    for (rel, g), (_, w) in zip(got.pairs, want.pairs):
        assert (g.ref_name, g.other_name, g.options) == (w.ref_name, w.other_name, w.options), rel
        assert len(g.results) == len(w.results), rel
        for gk, wk in zip(g.results, w.results):
            for f in fields(gk):
                gv, wv = getattr(gk, f.name), getattr(wk, f.name)
                same = gv == wv or (isinstance(gv, float) and np.isnan(gv) and np.isnan(wv))
                assert same, (rel, gk.key, f.name, gv, wv)
    assert [(e.status, e.rank, e.step, e.keys, e.passed_keys) for e in got.entries] == \
        [(e.status, e.rank, e.step, e.keys, e.passed_keys) for e in want.entries]


# --- naming and listing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "want"),
    [
        ("rank_3/step_12/fwd.npz", (3, 12)),
        ("rank3/step12/fwd.npz", (3, 12)),
        ("worker_3/iter_12/fwd.npz", (3, 12)),
        ("run/Rank-7/ITER12.npy", (7, 12)),
        ("step_2/rank_10.npz", (10, 2)),
        ("dumps/forward_worker5_iteration_40.npz", (5, 40)),
        ("local_rank_1/global_step_9/x.npz", (1, 9)),
        ("fwd.npz", (None, None)),
        ("ranks/steps/frank2/stepper3.npz", (None, None)),  # words that merely contain them
        ("rank_0/out.npz", (0, None)),
    ],
)
def test_rank_and_step_layouts(rel, want) -> None:
    assert rank_and_step(rel) == want


def test_dump_files_walks_symlinks_once_and_lists_dumps_in_any_case(tmp_path) -> None:
    (tmp_path / "rank_0").mkdir()
    with open(tmp_path / "rank_0" / "A.NPY", "wb") as f:
        np.save(f, np.ones(2))
    np.save(tmp_path / "rank_0" / "b.npy", np.ones(2))
    (tmp_path / "rank_0" / "notes.txt").write_text("x")
    (tmp_path / "rank_0" / "loop").symlink_to(tmp_path)  # a loop back to the root
    (tmp_path / "rank_1").symlink_to(tmp_path / "rank_0")  # one folder reached twice
    os.mkfifo(tmp_path / "rank_0" / "pipe.npy")  # not a regular file: never listed
    files = dump_files(str(tmp_path))
    assert files == ["rank_0/A.NPY", "rank_0/b.npy"]


# --- serial and local pool -------------------------------------------------------------------------


def test_pool_equals_serial_key_for_key(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=4, steps=2, files=("bwd.npz", "fwd.npz"),
                      bad=[(2, 1, "fwd.npz", "head.out")])
    os.remove(os.path.join(b, "rank_3/step_1/bwd.npz"))  # missing in other
    reprod.save(os.path.join(b, "rank_0/step_2/extra.npz"), _dump(7))  # only in other
    noise = tmp_path / "noise" / "rank_0" / "step_1"
    noise.mkdir(parents=True)
    reprod.save(str(noise / "fwd.npz"),
                {k: v.astype(np.float64) for k, v in _dump(100_000 + 1).items()})
    crit = reprod.Criteria(methods=["mean", "max"], threshold=1e-5)
    serial = compare_trees(a, b, criteria=crit, noise=str(tmp_path / "noise"), jobs=1)
    pooled = compare_trees(a, b, criteria=crit, noise=str(tmp_path / "noise"), jobs=2)
    assert serial.mode == "serial" and pooled.mode == "2 processes"
    assert_same(pooled, serial)
    rels = [rel for rel, _ in serial.pairs]
    assert rels[-1] == "rank_0/step_2/extra.npz"  # the other tree's own files come last
    assert rels[:-1] == sorted(rels[:-1])
    assert serial.pairs[rels.index("rank_0/step_1/fwd.npz")][1]["loss"].noise_multiple is not None


def test_serial_equals_reprod_compare_of_each_pair(tmp_path) -> None:
    """.pairs (what reprod-diff's folder mode renders): each pair is reprod.compare of its two
    files, and a file on one side only fails every key, naming the absent file."""
    a, b = make_trees(tmp_path, ranks=2, steps=2, bad=[(1, 1, "fwd.npz", "loss")])
    os.remove(os.path.join(a, "rank_0/step_2/fwd.npz"))
    crit = reprod.Criteria()
    got = compare_trees(a, b, criteria=crit, jobs=1)
    rels = [rel for rel, _ in got.pairs]
    assert rels[-1] == "rank_0/step_2/fwd.npz" and rels[:-1] == sorted(rels[:-1])
    for rel, g in got.pairs[:-1]:
        w = reprod.compare(os.path.join(a, rel), os.path.join(b, rel), criteria=crit)
        assert g.results == w.results, rel
        assert (g.ref_name, g.other_name) == (os.path.join(a, rel), os.path.join(b, rel))
    missing = got.pairs[-1][1]
    assert not missing.passed and all("does not exist" in kr.reason for kr in missing)


def test_by_step_then_rank_one_bad_rank_against_every_rank(tmp_path) -> None:
    bad = [(2, 5, "fwd.npz", "block.1.out"), (2, 5, "fwd.npz", "head.out"),
           (2, 7, "fwd.npz", "loss")]
    bad += [(3, r, "fwd.npz", "block.0.out") for r in range(12)]
    a, b = make_trees(tmp_path, ranks=12, steps=3, bad=bad)
    t = compare_trees(a, b, jobs=1)
    reports = t.by_step()
    assert [r.step for r in reports] == [1, 2, 3]
    assert list(reports[0].ranks) == list(range(12))  # numeric: rank_10 after rank_2
    assert reports[0].passed and not reports[0].disagree
    assert reports[1].failing_ranks == [5, 7] and reports[1].disagree
    assert reports[1].line() == "step 2: ranks 5, 7 fail, 10 ranks pass"
    assert reports[2].line() == "step 3: every rank fails (12 ranks)"
    first = t.first_divergence()
    assert (first.step, first.rank, first.rel) == (2, 5, "rank_5/step_2/fwd.npz")
    assert first.key.key == "block.1.out"  # call order within the file, not the worst key
    lines = t.summary_lines()
    assert lines[0].startswith("36 file pairs (3 steps x 12 ranks), 22 passed, 14 failed")
    assert lines[0].endswith(": FAILED")
    assert lines[1].startswith("first divergence: step 2, rank 5: rank_5/step_2/fwd.npz, "
                               "key 'block.1.out': ")
    assert "step 2: ranks 5, 7 fail, 10 ranks pass" in lines
    assert "step 1: every pair passes" in lines


def test_one_bad_rank_line_and_passing_tree(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=4, steps=1, bad=[(1, 2, "fwd.npz", "loss")],
                      layout="worker{r}/iter_{s}")
    t = compare_trees(a, b, jobs=1)
    assert t.by_step()[0].line() == "step 1: rank 2 fails, 3 ranks pass"
    ok = compare_trees(a, a, jobs=1)
    assert ok.passed and ok.first_divergence() is None
    assert ok.summary_lines() == ["4 file pairs (1 step x 4 ranks), 4 passed, 0 failed; "
                                  "20 keys, 0 failed: PASSED"]


def test_file_missing_on_one_side_is_a_missing_pair(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=2, steps=2)
    os.remove(os.path.join(b, "rank_1/step_2/fwd.npz"))
    os.remove(os.path.join(a, "rank_0/step_1/fwd.npz"))
    t = compare_trees(a, b, jobs=2)
    by_rel = {e.rel: e for e in t.entries}
    gone_b, gone_a = by_rel["rank_1/step_2/fwd.npz"], by_rel["rank_0/step_1/fwd.npz"]
    assert (gone_b.status, gone_b.absent) == ("missing", "other")
    assert (gone_a.status, gone_a.absent) == ("missing", "ref")
    assert {k.status for k in gone_b.result} == {"missing"}
    assert {k.status for k in gone_a.result} == {"extra"}
    assert all("does not exist" in k.reason for k in gone_b.result)
    assert len(t.missing) == 2 and not t.passed
    assert any(line.startswith("rank_1/step_2/fwd.npz: missing in the other tree")
               for line in t.summary_lines())


def test_unreadable_file_raises_or_is_reported(tmp_path, assert_one_line_error) -> None:
    a, b = make_trees(tmp_path, ranks=2, steps=1)
    broken = os.path.join(b, "rank_1/step_1/fwd.npz")
    with open(broken, "r+b") as f:
        f.truncate(40)
    for jobs in (1, 2):
        with pytest.raises(ReprodError) as info:
            compare_trees(a, b, jobs=jobs)
        assert_one_line_error(info.value, "fwd.npz")
        t = compare_trees(a, b, jobs=jobs, errors="report")
        e = t.entries[1]
        assert e.status == "error" and not e.passed and "fwd.npz" in e.reason
        assert t.entries[0].passed


def test_progress_counts_pairs_and_failed_only_keeps_counts(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=3, steps=2, bad=[(1, 0, "fwd.npz", "loss")])
    seen: list[tuple[int, int, str]] = []
    t = compare_trees(a, b, jobs=2, failed_only=True, progress=lambda *x: seen.append(x))
    assert [d for d, _, _ in seen] == list(range(1, 7)) and {n for _, n, _ in seen} == {6}
    assert sorted(rel for _, _, rel in seen) == [rel for rel, _ in t.pairs]
    assert [len(r) for _, r in t.pairs] == [1, 0, 0, 0, 0, 0]
    assert t.entries[0].keys == 5 and t.entries[0].failed_keys == 1
    assert t.summary()["keys"] == 30 and t.summary()["failed_keys"] == 1
    # the stderr bar counts pairs too
    import io

    from reprod.diff.progress import Progress

    bar = trees._PairProgress([], False)
    bar.bar = type("B", (Progress,), {"line": lambda s, now=None: Progress.line(s, now).replace(
        " keys ", " file pairs ", 1)})(total_keys=2, total_bytes=0, stream=io.StringIO(),
                                       delay=0.0, interval=0.0)
    task = trees._Task(0, "x.npz", "a", "b", "a", "b", None)
    bar.pair_done(task)
    assert "1/2 file pairs" in bar.bar.stream.getvalue()


# A pool process that dies: the first attempt of the first pair kills its own process.
def _die_once(task):
    marker = (task.ref or "") + ".died"
    if task.index == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return trees._run_task(task)


def _die_always(task):
    if task.index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return trees._run_task(task)


def _run(a, b, task_fn, **kw):
    opts = dict(criteria=None, noise=None, client=None, jobs=2, scheduler=None, keys=None,
                verify=False, failed_only=False, errors="raise", progress=False,
                connect_timeout=5.0)
    opts.update(kw)
    return trees._compare_trees(a, b, task_fn=task_fn, **opts)


def test_pool_process_killed_once_is_retried(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=2, steps=2, bad=[(1, 1, "fwd.npz", "loss")])
    t = _run(a, b, _die_once)
    assert os.path.exists(os.path.join(a, "rank_0/step_1/fwd.npz.died"))
    assert_same(t, compare_trees(a, b, jobs=1))


def test_pool_process_killed_every_time_is_a_failed_pair(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=2, steps=2)
    t = _run(a, b, _die_always)
    serial = compare_trees(a, b, jobs=1)
    assert len(t.entries) == 4
    dead = t.entries[1]
    assert dead.status == "error" and not dead.passed
    assert dead.rel in dead.reason and "died" in dead.reason and b in dead.reason
    assert [e.status for e in t.entries] == ["compared", "error", "compared", "compared"]
    for i in (0, 2, 3):
        assert t.entries[i].result.results == serial.entries[i].result.results


def test_import_and_serial_path_never_import_dask(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=2, steps=1)
    code = textwrap.dedent(f"""
        import json, sys
        import reprod
        seen = [m for m in ("dask", "distributed") if m in sys.modules]
        if __name__ == "__main__":
            t1 = reprod.compare_trees({a!r}, {b!r}, jobs=1)
            t2 = reprod.compare_trees({a!r}, {b!r}, jobs=2)
            assert t1.passed and t2.passed
            seen += [m for m in ("dask", "distributed") if m in sys.modules]
            print(json.dumps(seen))
    """)
    script = tmp_path / "run.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("REPROD_SCHEDULER", None)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_scheduler_without_dask_installed_is_one_line_error(tmp_path) -> None:
    a, b = make_trees(tmp_path, ranks=1, steps=1)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["distributed"] = None  # as if not installed
        import reprod
        try:
            reprod.compare_trees({a!r}, {b!r}, scheduler="tcp://127.0.0.1:8786")
        except reprod.ReprodError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == ('scheduler tcp://127.0.0.1:8786: Dask is not installed '
                                  '(pip install "dask[distributed]")')


def test_default_jobs_pool_for_large_trees_serial_for_small(tmp_path, monkeypatch) -> None:
    a, b = make_trees(tmp_path, ranks=2, steps=2)
    assert compare_trees(a, b).mode == "serial"  # a few KiB: no pool to start
    monkeypatch.setattr(trees, "AUTO_SERIAL_BYTES", 0)
    monkeypatch.setattr(trees, "_cpu_count", lambda: 3)
    assert compare_trees(a, b).mode == "3 processes"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        compare_trees(".", ".", jobs=0)
    with pytest.raises(ValueError):
        compare_trees(".", ".", errors="ignore")
    with pytest.raises(ReprodError, match="no such folder"):
        compare_trees("/nonexistent/a", "/nonexistent/b", jobs=1)


# --- on a Dask cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip(
        "distributed", reason="dask distributed is not installed (pip install 'dask[distributed]')")
    import dask

    # one task per worker thread at a time: a killed worker takes down only the task it ran
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
        lc = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      dashboard_address=None, silence_logs=50)
    client = distributed.Client(lc, set_as_default=False)
    try:
        yield lc, client
    finally:
        client.close()
        lc.close()


def test_cluster_equals_serial(cluster, tmp_path, monkeypatch) -> None:
    lc, client = cluster
    a, b = make_trees(tmp_path, ranks=4, steps=3, files=("bwd.npz", "fwd.npz"),
                      bad=[(2, 3, "bwd.npz", "embed.out"), (3, 0, "fwd.npz", "loss")])
    os.remove(os.path.join(a, "rank_2/step_1/fwd.npz"))
    crit = reprod.Criteria(methods="max", threshold=1e-4, per_key={"loss": 1e-9})
    serial = compare_trees(a, b, criteria=crit, jobs=1)
    on_client = compare_trees(a, b, criteria=crit, client=client)
    assert on_client.mode.startswith("dask tcp://127.0.0.1:")
    assert_same(on_client, serial)
    by_address = compare_trees(a, b, criteria=crit, scheduler=lc.scheduler_address)
    assert_same(by_address, serial)
    monkeypatch.setenv("REPROD_SCHEDULER", lc.scheduler_address)
    by_env = compare_trees(a, b, criteria=crit, failed_only=True)
    assert by_env.mode == on_client.mode
    assert [(e.rel, e.keys, e.passed_keys) for e in by_env.entries] == \
        [(e.rel, e.keys, e.passed_keys) for e in serial.entries]
    assert by_env.summary_lines() == serial.summary_lines()


def test_cluster_lists_trees_the_caller_cannot_see_on_a_worker(cluster, tmp_path,
                                                               monkeypatch) -> None:
    _, client = cluster
    a, b = make_trees(tmp_path, ranks=2, steps=2, bad=[(1, 1, "fwd.npz", "loss")])
    serial = compare_trees(a, b, jobs=1)
    monkeypatch.setattr(trees, "_visible", lambda *roots: False)  # as if on another machine
    assert_same(compare_trees(a, b, client=client), serial)


def test_cluster_worker_killed_mid_task_is_retried(cluster, tmp_path) -> None:
    _, client = cluster
    a, b = make_trees(tmp_path, ranks=3, steps=2, bad=[(2, 2, "fwd.npz", "head.out")])
    marker = str(tmp_path / "killed")

    def die_once(task):  # pickled by value: runs on the worker
        if task.index == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return trees._run_task(task)

    t = _run(a, b, die_once, client=client, jobs=None)
    assert os.path.exists(marker)  # a worker did die
    assert_same(t, compare_trees(a, b, jobs=1))
    client.wait_for_workers(2, timeout=30)


def test_cluster_worker_killed_every_time_is_a_failed_pair(cluster, tmp_path) -> None:
    lc, client = cluster
    a, b = make_trees(tmp_path, ranks=2, steps=2)
    client.wait_for_workers(2, timeout=30)

    def die_always(task):
        if task.index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return trees._run_task(task)

    lc.scheduler.allowed_failures = 1  # two deaths, then KilledWorker (the default is 3)
    try:
        t = _run(a, b, die_always, client=client, jobs=None)
    finally:
        lc.scheduler.allowed_failures = 3
    serial = compare_trees(a, b, jobs=1)
    assert [e.status for e in t.entries] == ["compared", "error", "compared", "compared"]
    dead = t.entries[1]
    assert "rank_0/step_2/fwd.npz" in dead.reason and "KilledWorker" in dead.reason
    assert dead.result.results[0].status == "error"
    for i in (0, 2, 3):
        assert t.entries[i].result.results == serial.entries[i].result.results
    assert any(line.startswith("rank_0/step_2/fwd.npz: not compared: the Dask worker")
               for line in t.summary_lines())
    client.wait_for_workers(2, timeout=30)


def test_unreachable_scheduler_is_a_quick_one_line_error(tmp_path) -> None:
    pytest.importorskip("distributed", reason="dask distributed is not installed")
    a, b = make_trees(tmp_path, ranks=1, steps=1)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(trees.ClusterError) as info:
        compare_trees(a, b, scheduler=f"tcp://127.0.0.1:{port}", connect_timeout=0.5)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    assert isinstance(info.value, ReprodError)


def test_a_failed_scheduler_handshake_is_tried_once_more_then_one_line(monkeypatch) -> None:
    """distributed's Client asserts its handshake reads one message; under load it read more once
    (a CI run beside a real-model run): reprod tries once more, then says so in one line."""
    distributed = pytest.importorskip("distributed", reason="dask distributed is not installed")
    from reprod.trees import executors

    calls = []

    def flaky(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise AssertionError
        return "client"

    monkeypatch.setattr(distributed, "Client", flaky)
    assert executors._connect("tcp://127.0.0.1:1", 1.0) == "client" and len(calls) == 2

    def broken(*args, **kwargs):
        raise AssertionError

    monkeypatch.setattr(distributed, "Client", broken)
    with pytest.raises(trees.ClusterError) as info:
        executors._connect("tcp://127.0.0.1:1", 1.0)
    assert str(info.value) == ("cannot connect to the Dask scheduler at tcp://127.0.0.1:1: its "
                               "handshake failed twice (AssertionError)")
