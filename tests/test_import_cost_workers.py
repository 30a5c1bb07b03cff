"""What replaced two imports on the hot paths (project issue 23) behaves as what it replaced:
``metrics.executor()``, once a ``ThreadPoolExecutor``, now reprod's own helper threads; and the
SIGTERM cleanup of ``AtomicFile``, now armed through ``_signal`` and ``_thread``."""

from __future__ import annotations

import _signal
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from reprod.diff import metrics
from reprod.storage import atomic
from reprod.storage.atomic import AtomicFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(code: str, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def four_threads():
    previous = metrics.set_threads(4)
    yield
    metrics.set_threads(previous)


# --- the helper threads ------------------------------------------------------------------------------


def test_submit_returns_the_value_and_raises_the_exception(four_threads) -> None:
    pool = metrics.executor()
    assert pool is metrics.executor()  # one per setting, started once
    futures = [pool.submit(pow, i, 2) for i in range(50)]
    assert [f.result() for f in futures] == [i * i for i in range(50)]
    boom = ValueError("from the helper")

    def fail() -> None:
        raise boom

    f = pool.submit(fail)
    with pytest.raises(ValueError, match="from the helper") as info:
        f.result()
    assert info.value is boom
    assert pool.submit(int, "7").result() == 7  # the thread that raised serves on


def test_at_most_threads_minus_one_helpers_and_none_left_by_a_new_setting() -> None:
    previous = metrics.set_threads(3)
    try:
        gate = threading.Event()
        pool = metrics.executor()
        futures = [pool.submit(gate.wait, 30) for _ in range(6)]
        time.sleep(0.2)
        mine = list(pool._threads)
        assert [t.name for t in mine] == ["reprod-stats_0", "reprod-stats_1"]
        assert all(t.is_alive() for t in mine)
        gate.set()
        assert all(f.result() is True for f in futures)
        metrics.set_threads(2)  # the old helpers end once their work is done
        assert metrics.executor() is not pool
        for t in mine:
            t.join(10)
            assert not t.is_alive()
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(int)
    finally:
        metrics.set_threads(previous)


def test_many_callers_at_once_get_the_single_threaded_statistics() -> None:
    rng = np.random.default_rng(5)
    pairs = []
    for i in range(8):
        r = rng.standard_normal(3 * metrics.CHUNK + 1000 * i).astype(np.float32)
        o = r + rng.standard_normal(r.size).astype(np.float32) * np.float32(1e-6)
        pairs.append((r, o))
    previous = metrics.set_threads(1)
    try:
        want = [metrics.compute_stats(r, o, atol=1e-5, rtol=1e-5) for r, o in pairs]
        metrics.set_threads(4)
        got: list = [None] * len(pairs)
        errors: list = []

        def run(i: int) -> None:
            try:
                got[i] = metrics.compute_stats(*pairs[i], atol=1e-5, rtol=1e-5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        callers = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
        for t in callers:
            t.start()
        for t in callers:
            t.join(120)
        assert not errors, errors
        assert got == want
        assert 1 <= len(metrics.executor()._threads) <= 3  # threads() - 1 at most, however many callers
    finally:
        metrics.set_threads(previous)


def test_an_exception_in_a_helper_reaches_the_comparison(four_threads, monkeypatch) -> None:
    helper_ran = threading.Event()

    def flaky(real):
        def chunk(*args):
            if threading.current_thread().name.startswith("reprod-stats"):
                helper_ran.set()
                raise MemoryError("helper out of memory")
            helper_ran.wait(30)  # the calling thread leaves the other chunks to the helpers
            return real(*args)
        return chunk

    monkeypatch.setattr(metrics, "_kernel_chunk", flaky(metrics._kernel_chunk))
    monkeypatch.setattr(metrics, "numpy_chunk", flaky(metrics.numpy_chunk))
    r = np.ones(3 * metrics.CHUNK, np.float32)
    with pytest.raises(MemoryError, match="helper out of memory"):
        metrics.compute_stats(r, r.copy())
    assert helper_ran.is_set()


def test_work_in_flight_finishes_before_the_interpreter_exits(tmp_path) -> None:
    """ThreadPoolExecutor joined its threads at exit; so do the helpers (and idle ones never
    keep a process alive)."""
    out = _child(
        """
        import time
        from reprod.diff import metrics
        metrics.set_threads(3)
        metrics.executor().submit(int, "1").result()  # an idle helper from now on

        def slow():
            time.sleep(0.5)
            open("done", "w").close()

        metrics.executor().submit(slow)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "done").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_gets_helpers_of_its_own(tmp_path) -> None:
    """A copied pool would queue the child's work for threads the child does not have."""
    out = _child(
        """
        import os
        from reprod.diff import metrics
        metrics.set_threads(2)
        assert metrics.executor().submit(int, "1").result() == 1  # the parent's helper, idle
        pid = os.fork()
        if pid == 0:
            import signal
            signal.alarm(20)  # a hang fails the child instead of the test run
            ok = metrics.executor().submit(int, "42").result() == 42
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """,
        tmp_path,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])


# --- SIGTERM, armed through _signal and _thread ------------------------------------------------------------


def test_the_handler_is_armed_and_put_back_as_signal_would(tmp_path) -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with AtomicFile(str(tmp_path / "a.bin")) as af:
        assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm
        with AtomicFile(str(tmp_path / "b.bin")):  # nested: armed once, put back after both
            pass
        assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm
        af.file.write(b"x")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert (tmp_path / "a.bin").read_bytes() == b"x"


@pytest.mark.parametrize("handler", ["dfl", "ign", "own", "zero", "one"])
def test_default_means_what_signal_getsignal_says(handler) -> None:
    value = {"dfl": signal.SIG_DFL, "ign": signal.SIG_IGN, "own": lambda *a: None, "zero": 0,
             "one": 1}[handler]
    old = signal.signal(signal.SIGTERM, value)
    try:
        raw = _signal.getsignal(_signal.SIGTERM)
        assert atomic._is_default(raw) == (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_helper_threads_file_neither_arms_nor_disarms(tmp_path) -> None:
    """Only the main thread can set a handler, and it is the thread the handler runs in."""
    seen: dict = {}

    def in_thread() -> None:
        with AtomicFile(str(tmp_path / "t.bin")):
            seen["during"] = signal.getsignal(signal.SIGTERM)
        seen["after"] = signal.getsignal(signal.SIGTERM)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join(30)
    assert seen == {"during": signal.SIG_DFL, "after": signal.SIG_DFL}
    # armed by the main thread, released last by the helper: it stays until the main thread's next
    af = AtomicFile(str(tmp_path / "m.bin"))
    gate, done = threading.Event(), threading.Event()

    def holder() -> None:
        with AtomicFile(str(tmp_path / "h.bin")):
            gate.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert gate.wait(30)
    af.commit()
    assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm  # the helper's file still lives
    done.set()
    t.join(30)
    assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm  # released, not in the main thread
    with AtomicFile(str(tmp_path / "m2.bin")):
        pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_during_a_write_removes_the_temporary(tmp_path) -> None:
    target = tmp_path / "x.npy"
    target.write_bytes(b"old")
    with pytest.raises(SystemExit) as info:
        with AtomicFile(str(target)) as af:
            af.file.write(b"new, half written")
            signal.raise_signal(signal.SIGTERM)
    assert info.value.code == 143
    assert sorted(os.listdir(tmp_path)) == ["x.npy"] and target.read_bytes() == b"old"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_in_a_fresh_process_that_only_saves(tmp_path) -> None:
    """The path issue 23 made lighter: no ``signal`` module imported, the cleanup as before."""
    out = _child(
        """
        import os, sys
        import numpy as np
        from reprod import ReprodLogger
        from reprod.storage import atomic
        lg = ReprodLogger()
        lg.add("x", np.ones(10))
        real = atomic.AtomicFile.commit

        def commit(self):
            assert "signal" not in sys.modules
            os.kill(os.getpid(), 15)  # as if sent from outside, mid-save
            return real(self)

        atomic.AtomicFile.commit = commit
        lg.save("out.npy")
        print("not reached")
        """,
        tmp_path,
    )
    assert out.returncode == 143, (out.returncode, out.stderr[-3000:])
    assert "not reached" not in out.stdout and "Traceback" not in out.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_after_a_fork_from_a_helper_thread_the_child_guards_its_files(tmp_path) -> None:
    """threading.main_thread() of a child forked by another thread is that thread; so is the
    thread the cleanup counts as the handler's."""
    out = _child(
        """
        import _thread, os, threading
        from reprod.storage import atomic
        af = atomic.AtomicFile("a.bin")  # the main thread arms the handler
        result = {}

        def fork() -> None:
            pid = os.fork()
            if pid == 0:
                ok = atomic._sigterm_hold() and atomic._term_state["thread"] == _thread.get_ident()
                os._exit(0 if ok else 3)
            result["status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        t = threading.Thread(target=fork)
        t.start()
        t.join()
        af.abort()
        raise SystemExit(result["status"])
        """,
        tmp_path,
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
