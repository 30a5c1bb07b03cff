"""A streaming logger's writer thread (``reprod.storage.npz_background``): the dump it writes is
the one written on the caller's thread, byte for byte; its queue stays within its bound; its
failures reach the caller; it never outlives the logger; a forked child leaves it alone."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger
from reprod.errors import ReprodError, StreamWriteError, UnsupportedValueError
from reprod.storage import npz_background, npz_writer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("reprod stream")]


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _values() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    big = rng.standard_normal(50_000).astype(np.float32)  # 200 KB: written past the file's buffer
    return [
        ("a", rng.standard_normal((4, 5))),
        ("big", big),
        ("big_again", big),  # same bytes under a second key, as capture hands them over
        ("ints", np.arange(7, dtype=np.int16)),
        ("empty", np.zeros((0, 3), np.float32)),
        ("scalar", np.array(2.5)),
        ("a", np.full(3, 9.0)),  # re-added: last value, first place
        ("x/y", np.ones(2)),
        ("k" * 2000, np.ones(1)),  # a numbered member, its name in the metadata
    ]


def _stream(path, *, background: bool, queue_bytes: int = 64 << 20) -> ReprodLogger:
    lg = ReprodLogger(stream_to=path, stream_queue_bytes=queue_bytes)
    crcs: dict[bytes, int] = {}
    for key, value in _values():
        if background:
            # capture's hand-over: the keys of one array share its CRC cache
            lg._put_later(key, value, None, crcs if key.startswith("big") else None)
        else:
            lg._put(key, value)
    lg.add("nested", {"b": np.ones(3), "e": {}})
    lg.add("n", 3)
    return lg


def _same_dump(got, want) -> None:
    with zipfile.ZipFile(got) as a, zipfile.ZipFile(want) as b:
        assert a.namelist() == b.namelist()
        assert a.read("__reprod__.json") == b.read("__reprod__.json")
        assert a.testzip() is None
        for name in b.namelist():
            assert a.read(name) == b.read(name), name
    x, y = np.load(got), np.load(want)
    assert x.files == y.files
    for name in y.files:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    d, e = reprod.load(got, verify=True), reprod.load(want, verify=True)
    assert list(d) == list(e)


@pytest.mark.parametrize("queue_bytes", [64 << 20, 1, 300_000])
def test_the_thread_writes_the_dump_the_callers_thread_writes(tmp_path, queue_bytes) -> None:
    want = _stream(tmp_path / "sync.npz", background=False).close()
    lg = _stream(tmp_path / "thread.npz", background=True, queue_bytes=queue_bytes)
    assert len(_threads()) == 1
    assert lg.keys()[:3] == ["a", "big", "big_again"]
    got = lg.close()
    assert _threads() == []
    _same_dump(got, want)
    d = reprod.load(got)
    np.testing.assert_array_equal(d["a"], np.full(3, 9.0))
    assert list(d["nested"]) == ["b", "e"] and d["n"] == 3


def test_add_queues_a_copy_behind_the_handed_over_values(tmp_path) -> None:
    lg = ReprodLogger(stream_to=tmp_path / "run.npz")
    lg._put_later("first", np.zeros(10))
    value = np.ones(10)
    lg.add("second", value)
    value[:] = 5  # changed after add: the dump has what was added
    lg._put_later("third", np.full(10, 3.0))
    lg.close()
    d = reprod.load(tmp_path / "run.npz")
    assert list(d) == ["first", "second", "third"]
    np.testing.assert_array_equal(d["second"], np.ones(10))


def test_bad_values_and_keys_are_refused_at_once_and_the_stream_goes_on(tmp_path) -> None:
    lg = ReprodLogger(stream_to=tmp_path / "run.npz")
    lg._put_later("a", np.zeros(3))
    with pytest.raises(UnsupportedValueError, match="not a tensor|cannot log"):
        lg.add("s", "not a tensor")
    with pytest.raises(UnsupportedValueError, match="characters long"):
        lg._put_later("k" * (npz_writer.MAX_KEY_CHARS + 1), np.zeros(1))
    with pytest.raises(UnsupportedValueError, match="characters long"):
        lg.add("d", {"k" * npz_writer.MAX_KEY_CHARS: np.zeros(1)})
    lg._put_later("b", np.ones(3))
    lg.close()
    assert list(reprod.load(tmp_path / "run.npz")) == ["a", "b"]


def test_queue_bytes_zero_starts_no_thread_and_a_negative_bound_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="stream_queue_bytes"):
        ReprodLogger(stream_to=tmp_path / "x.npz", stream_queue_bytes=-1)
    lg = ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=0)
    lg.add("a", np.ones(3))
    assert _threads() == [] and lg._background is None
    lg.close()


# --- the bound --------------------------------------------------------------------------------


class _Gate:
    """An NpzWriter.add_array that waits for ``open`` and notes how many bytes were queued
    (the value being written included) each time."""

    def __init__(self, monkeypatch) -> None:
        self.open = threading.Event()
        self.queued: list[int] = []
        self.logger: ReprodLogger = None  # type: ignore[assignment]
        real = npz_writer.NpzWriter.add_array
        gate = self

        def add_array(writer, key, arr, src=None, crcs=None):
            gate.open.wait()
            gate.queued.append(gate.logger._background._state.queued)
            real(writer, key, arr, src, crcs)

        monkeypatch.setattr(npz_writer.NpzWriter, "add_array", add_array)


def test_the_queue_holds_at_most_its_bound(tmp_path, monkeypatch) -> None:
    gate = _Gate(monkeypatch)
    block = 10_000 * 8  # one value's bytes
    lg = gate.logger = ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=3 * block)
    lg._put_later("v0", np.zeros(10_000))
    producer = threading.Thread(
        target=lambda: [lg._put_later(f"v{i}", np.full(10_000, float(i))) for i in range(1, 20)])
    producer.start()
    state = lg._background._state
    for _ in range(10_000):  # until the producer waits for room (or it would be done)
        with state.cond:
            # the thread holds v0 (it may not have taken it yet when the queue first fills)
            if state.queued == 3 * block and state.busy:
                break
        producer.join(0.001)
    assert producer.is_alive()  # waiting for room: three values queued, the first being written
    with state.cond:
        assert state.queued == 3 * block and len(state.items) == 2
    gate.open.set()
    producer.join()
    lg.close()
    assert max(gate.queued) <= 3 * block
    d = reprod.load(tmp_path / "run.npz")
    assert list(d) == [f"v{i}" for i in range(20)] and d["v19"][0] == 19


def test_a_value_larger_than_the_bound_waits_alone(tmp_path, monkeypatch) -> None:
    gate = _Gate(monkeypatch)
    gate.open.set()
    lg = gate.logger = ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=100)
    lg._put_later("small", np.zeros(4))
    lg._put_later("large", np.zeros(1000))
    lg._put_later("small2", np.zeros(4))
    lg.close()
    assert gate.queued[1] == 8000
    assert list(reprod.load(tmp_path / "run.npz")) == ["small", "large", "small2"]


# --- failures ---------------------------------------------------------------------------------


def _full_disk_after(monkeypatch, n: int) -> None:
    """The n-th member written by any NpzWriter from now on fails as a full disk does."""
    real = npz_writer.NpzWriter._write_member
    count = [0]

    def write_member(self, *args, **kwargs):
        count[0] += 1
        if count[0] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(npz_writer.NpzWriter, "_write_member", write_member)


@pytest.mark.parametrize("surfaces_in", ["add", "put", "keys", "close"])
def test_a_failure_of_the_thread_names_file_key_and_problem(tmp_path, monkeypatch,
                                                             assert_one_line_error,
                                                             surfaces_in) -> None:
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()
    _full_disk_after(monkeypatch, 2)
    lg = ReprodLogger(stream_to=path)
    lg._put_later("k0", np.zeros(3))
    lg._put_later("k1", np.ones(3))
    state = lg._background._state
    with state.cond:  # the thread has failed on k1
        while state.error is None:
            state.cond.wait()
    call = {"add": lambda: lg.add("k2", np.ones(1)), "put": lambda: lg._put_later("k2", np.ones(1)),
            "keys": lg.keys, "close": lg.close}[surfaces_in]
    with pytest.raises(StreamWriteError) as info:
        call()
    err = info.value
    assert_one_line_error(err, path)
    assert "'k1'" in str(err) and "No space left on device" in str(err)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert isinstance(err.__cause__, OSError)
    with pytest.raises(StreamWriteError, match="'k1'"):  # and again: nothing passes silently
        lg.close()
    assert path.read_bytes() == before and _files(tmp_path) == ["run.npz"]
    assert _threads() == []


def test_values_handed_over_after_the_failure_are_not_written(tmp_path, monkeypatch) -> None:
    _full_disk_after(monkeypatch, 1)
    lg = ReprodLogger(stream_to=tmp_path / "run.npz", stream_queue_bytes=1 << 20)
    lg._put_later("k0", np.zeros(3))
    with pytest.raises(StreamWriteError, match="'k0'"):
        # raises at the first call after the thread failed: at the latest when the queue is
        # full, as put waits for room until the thread has failed
        for i in range(1, 100_000):
            lg._put_later(f"k{i}", np.zeros(3))
    with pytest.raises(StreamWriteError):
        lg.close()
    assert _files(tmp_path) == [] and _threads() == []


def test_with_block_exception_drops_the_queue_and_keeps_the_earlier_dump(tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()
    gate = _Gate(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        with ReprodLogger(stream_to=path) as lg:
            gate.logger = lg
            lg._put_later("k0", np.zeros(3))
            lg._put_later("k1", np.zeros(3))
            gate.open.set()
            raise RuntimeError("boom")
    assert _threads() == []
    assert path.read_bytes() == before and _files(tmp_path) == ["run.npz"]
    with pytest.raises(ReprodError, match="abandoned|closed"):
        lg.add("late", 1)


def test_close_twice_and_after_close(tmp_path) -> None:
    lg = ReprodLogger(stream_to=tmp_path / "run.npz")
    lg._put_later("a", np.zeros(3))
    assert lg.close() == lg.close()
    with pytest.raises(ReprodError, match="closed"):
        lg._put_later("b", np.zeros(3))
    assert list(reprod.load(tmp_path / "run.npz")) == ["a"] and _threads() == []


# --- threads and processes --------------------------------------------------------------------

_SCRIPT = r"""
import gc, os, sys, threading
import numpy as np
from reprod import ReprodLogger
from reprod.errors import ReprodError
path, how = sys.argv[1], sys.argv[2]
lg = ReprodLogger(stream_to=path)
for i in range(50):
    lg._put_later(f"k{i}", np.full(30_000, float(i)))
if how == "fork":
    pid = os.fork()
    if pid == 0:  # the child: the stream is its parent's
        for call in (lambda: lg.add("child", 1), lambda: lg._put_later("child", np.ones(1)),
                     lg.keys, lg.close):
            try:
                call()
                print("child wrote", flush=True)
            except ReprodError as exc:
                assert "forked child" in str(exc), exc
        sys.exit(0)  # a normal exit: finalizers run
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    for i in range(50, 60):
        lg._put_later(f"k{i}", np.full(30_000, float(i)))
    lg.close()
elif how == "dropped":
    del lg
    gc.collect()
    names = [t.name for t in threading.enumerate() if t.name.startswith("reprod stream")]
    folder = os.path.dirname(os.path.abspath(path))
    print(len(names), "threads", sum(n.endswith(".tmp") for n in os.listdir(folder)), "temporaries",
          flush=True)
elif how == "exit":
    pass  # the interpreter exits with the thread running and the stream unclosed
"""


def _run(tmp_path, how: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "run.npz"), how],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_refuses_the_parents_stream_and_leaves_it_whole(tmp_path) -> None:
    p = _run(tmp_path, "fork")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "child wrote" not in p.stdout and "never closed" not in p.stderr
    d = reprod.load(tmp_path / "run.npz", verify=True)
    assert list(d) == [f"k{i}" for i in range(60)]
    assert all(d[f"k{i}"][0] == i for i in range(60))
    assert _files(tmp_path) == ["run.npz"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_fork_waits_for_the_value_being_written(tmp_path, monkeypatch) -> None:
    """The thread holds the file's buffer lock while it writes: a child forked meanwhile would
    inherit it held, by a thread it does not have."""
    gate = _Gate(monkeypatch)
    lg = gate.logger = ReprodLogger(stream_to=tmp_path / "run.npz")
    lg._put_later("k0", np.zeros(3))
    state = lg._background._state
    with state.cond:
        while not state.busy:  # the thread is inside add_array, held at the gate
            state.cond.wait(0.01)
    forked = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        forked.append(len(gate.queued))  # values written when the fork went ahead
        os.waitpid(pid, 0)

    forker = threading.Thread(target=fork)
    forker.start()
    forker.join(0.5)
    assert forker.is_alive() and forked == []  # waiting for the value being written
    gate.open.set()
    forker.join()
    assert forked == [1]
    lg._put_later("k1", np.ones(3))
    lg.close()
    assert list(reprod.load(tmp_path / "run.npz")) == ["k0", "k1"]


@pytest.mark.parametrize("how", ["dropped", "exit"])
def test_an_unclosed_stream_ends_its_thread_and_leaves_no_temporary(tmp_path, how) -> None:
    p = _run(tmp_path, how)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "was never closed, so nothing was written" in p.stderr
    if how == "dropped":
        assert p.stdout.strip() == "0 threads 0 temporaries"
    assert _files(tmp_path) == []


def test_the_metadata_is_the_synchronous_streams(tmp_path) -> None:
    """Source dtypes and nested trees take the thread's general path."""
    sync = ReprodLogger(stream_to=tmp_path / "sync.npz")
    thread = ReprodLogger(stream_to=tmp_path / "thread.npz")
    thread._put_later("first", np.zeros(2))  # starts the thread: the adds below queue
    sync._put("first", np.zeros(2))
    for lg in (sync, thread):
        lg._put("bf", np.ones(3, np.float32), "bfloat16") if lg is sync else \
            lg._put_later("bf", np.ones(3, np.float32), "bfloat16")
        lg.add("tree", {"a": np.ones(2), "b": {"c": 1.0}})
    sync.close()
    thread.close()
    _same_dump(tmp_path / "thread.npz", tmp_path / "sync.npz")
    assert reprod.load(tmp_path / "thread.npz").source_dtype("bf") == "bfloat16"


def test_the_thread_writes_a_value_only_once_its_wait_has_returned(tmp_path) -> None:
    # capture's hand-over of a device copy still in flight: ``ready`` is the wait for it, and
    # the thread runs it right before writing that value (never before the values ahead of it)
    path = tmp_path / "run.npz"
    lg = ReprodLogger(stream_to=path)
    value = np.zeros(1000, np.float32)
    order: list[str] = []
    gate = threading.Event()

    def ready() -> None:
        order.append("ready")
        gate.wait(10)
        value[:] = 7  # the copy lands

    lg._put_later("before", np.ones(3))
    lg._put_later("late", value, None, None, ready)
    lg._put_later("after", np.full(2, 3.0))
    assert not gate.is_set()
    gate.set()
    lg.close()
    d = reprod.load(path, verify=True)
    assert list(d) == ["before", "late", "after"] and order == ["ready"]
    np.testing.assert_array_equal(d["late"], np.full(1000, 7, np.float32))


def test_a_failed_wait_abandons_the_dump_naming_file_and_key(tmp_path, assert_one_line_error) -> None:
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()

    def ready() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    lg = ReprodLogger(stream_to=path)
    lg._put_later("ok", np.zeros(2))
    lg._put_later("copy", np.zeros(2), None, None, ready)
    with pytest.raises(StreamWriteError) as info:
        lg.close()
    assert_one_line_error(info.value, path)
    assert "'copy'" in str(info.value) and "illegal memory access" in str(info.value)
    assert path.read_bytes() == before and _files(tmp_path) == ["run.npz"]
    assert _threads() == []


def test_without_a_thread_put_writes_each_value_itself(tmp_path, monkeypatch) -> None:
    def refuse(self) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(npz_background.BackgroundWriter, "_start", refuse)
    want = _stream(tmp_path / "sync.npz", background=False).close()
    got = _stream(tmp_path / "inline.npz", background=True).close()
    _same_dump(got, want)
    assert _threads() == []
    landed = np.zeros(3)
    lg = ReprodLogger(stream_to=tmp_path / "waited.npz")
    lg._put_later("a", landed, None, None, lambda: landed.__setitem__(slice(None), 4.0))
    lg.close()
    np.testing.assert_array_equal(reprod.load(tmp_path / "waited.npz")["a"], np.full(3, 4.0))
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()
    lg = ReprodLogger(stream_to=path)
    lg._put_later("a", np.ones(3))

    def broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(StreamWriteError, match="'b'.*illegal memory access"):
        lg._put_later("b", np.zeros(3), None, None, broken)
    with pytest.raises(StreamWriteError, match="'b'"):
        lg.close()
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["inline.npz", "run.npz", "sync.npz", "waited.npz"]
