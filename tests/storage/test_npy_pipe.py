"""The ``.npy`` writer on a file's descriptor (``_pipe.WritevPipe``): its pickle frames and large
payloads gathered into ``writev`` calls, written by the helper thread where two cores are free,
while the kernel packs the next frames (``npy_copy`` releases the GIL for that). The file is the
same bytes as ``np.save``'s and as the buffered path's; a failed write anywhere keeps the earlier
file, and nothing writes to the descriptor once the save has raised."""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from typing import Any

import numpy as np
import pytest
from faulty_files import assert_the_earlier_file_is_kept

import reprod
from reprod import ReprodLogger, _native
from reprod.storage import _npy_writer, _pipe, atomic


def _tree(seed: int = 3) -> dict[str, Any]:
    """Thousands of small keys (the kernel's frames), some of 64 KiB and more (unframed payloads
    from the arrays' own memory), a nested dict, a Fortran-ordered and a strided array (the
    Python path's copies), repeated arrays and dtypes (memo references)."""
    rng = np.random.default_rng(seed)
    tree: dict[str, Any] = {}
    for i in range(3000):
        n = int(rng.integers(2, 700))
        dt = (np.float32, np.float64, np.int64, np.float16)[i % 4]
        tree[f"step{i // 100}/layer{i % 100}"] = rng.standard_normal(n).astype(dt)
        if i % 500 == 7:
            tree[f"big{i}"] = rng.standard_normal(20_000 + i)  # 160 KB and more
    tree["nested"] = {"a": np.arange(12.0).reshape(3, 4), "b": {"c": np.ones(3, np.int8)}}
    tree["fortran"] = np.asfortranarray(rng.standard_normal((40, 30)))
    tree["strided"] = rng.standard_normal(5000)[::3]
    tree["again"] = tree["step0/layer1"]
    tree["one"] = np.zeros(1, np.uint8)
    return tree


def _copies(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _copies(v) if isinstance(v, dict) else v.copy() for k, v in tree.items()}


def _numpy(tree: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tree, allow_pickle=True)
    return buf.getvalue()


def _buffered(tree: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    assert _npy_writer.write_npy_dict(buf, tree) is True
    return buf.getvalue()


@pytest.fixture
def pipes(monkeypatch) -> list[_pipe.WritevPipe]:
    made: list[_pipe.WritevPipe] = []
    real = _pipe.WritevPipe

    def make(fd: int, threaded: bool) -> _pipe.WritevPipe:
        made.append(real(fd, threaded))
        return made[-1]

    monkeypatch.setattr(_pipe, "WritevPipe", make)
    return made


@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("kernel_on", [True, False])
@pytest.mark.parametrize("via", ["save", "logger"])
def test_the_file_is_np_saves_and_the_buffered_paths(tmp_path, monkeypatch, pipes, cores,
                                                     kernel_on, via) -> None:
    tree = _tree()
    monkeypatch.setattr(_pipe, "cores", lambda: cores)
    monkeypatch.setattr(_npy_writer, "_KERNEL_KEYS", 0)  # the kernel for any tree, where it is on
    was = _native.set_enabled(kernel_on)
    try:
        path = tmp_path / "d.npy"
        if via == "save":
            reprod.save(path, tree)
        else:
            log = ReprodLogger()
            for k, v in tree.items():
                log.add(k, v)
            log.save(path)
        # the logger keeps copies (C-ordered, each its own object): the file of those
        expected = _buffered(tree if via == "save" else _copies(tree))
    finally:
        _native.set_enabled(was)
    assert [p._threaded for p in pipes] == [cores >= 2]  # the descriptor's path was taken
    raw = path.read_bytes()
    assert raw == expected
    if via == "save":
        # np.save closes a frame wherever it crosses 64 KiB, the writer only before a key: the
        # same opcodes, so the same object back
        back = np.load(path, allow_pickle=True).item()
        assert list(back) == list(tree)
        np.testing.assert_array_equal(back["fortran"], tree["fortran"])
        np.testing.assert_array_equal(back["big7"], tree["big7"])
    small = {k: v for k, v in list(tree.items())[:20]}
    reprod.save(tmp_path / "small.npy", small)
    assert (tmp_path / "small.npy").read_bytes() == _numpy(small)  # under 64 KiB: byte for byte


def test_a_fifo_is_written_through_the_file_object(tmp_path, pipes) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader before the save opens it
    keep = os.open(fifo, os.O_WRONLY)  # and a writer, so that no read sees an end before the save's
    os.set_blocking(rfd, True)
    got: list[bytes] = []

    def drain() -> None:
        while True:
            b = os.read(rfd, 1 << 16)
            if not b:
                return
            got.append(b)

    reader = threading.Thread(target=drain)
    reader.start()
    tree = _tree()
    try:
        reprod.save(fifo, tree)
    finally:
        os.close(keep)
        reader.join(20)
        os.close(rfd)
    got = [b"".join(got)]
    assert pipes == [] and got == [_buffered(tree)]


def _writev_failing_at(monkeypatch, fail_at: int, slow: float) -> list[float]:
    """``writev`` fails as a full disk from the ``fail_at``-th call on; returns when each call
    ended (each takes ``slow``; those after the failing one 0.3 s, so that one still in flight
    when the failure surfaces ends well after a close that did not wait for it)."""
    real = _pipe._writev_all
    ended: list[float] = []
    lock = threading.Lock()

    def writev(fd: int, buffers: list[Any]) -> None:
        with lock:
            n = len(ended) + 1
        time.sleep(slow if n <= fail_at else 0.3)
        try:
            if n >= fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd, buffers)
        finally:
            with lock:
                ended.append(time.monotonic())

    monkeypatch.setattr(_pipe, "_writev_all", writev)
    return ended


@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failed_write_keeps_the_earlier_file_and_ends_before_the_close(tmp_path, monkeypatch,
                                                                         cores, fail_at) -> None:
    path = tmp_path / "d.npy"
    path.write_bytes(b"the earlier dump")
    monkeypatch.setattr(_pipe, "cores", lambda: cores)
    ended = _writev_failing_at(monkeypatch, fail_at, slow=0.01)
    closed: list[float] = []
    real_abort = atomic.AtomicFile.abort

    def abort(self) -> None:
        closed.append(time.monotonic())
        real_abort(self)

    monkeypatch.setattr(atomic.AtomicFile, "abort", abort)
    with pytest.raises(OSError) as info:
        reprod.save(path, _tree())
    assert_the_earlier_file_is_kept(info.value, path, b"the earlier dump")
    assert len(ended) >= fail_at and closed
    _pipe._helper().submit(lambda: None).result()  # the helper thread is idle now
    assert max(ended) <= closed[0]  # every write in flight had ended before the file was closed


def test_an_error_while_packing_waits_for_the_writes_in_flight(tmp_path, monkeypatch) -> None:
    path = tmp_path / "d.npy"
    path.write_bytes(b"the earlier dump")
    monkeypatch.setattr(_pipe, "cores", lambda: 2)
    ended = _writev_failing_at(monkeypatch, 10**6, slow=0.05)
    calls = [0]
    real_commit = _npy_writer._Writer.commit

    def commit(self) -> None:  # the last frame, after writes were handed over
        calls[0] += 1
        if self.n > 10_000:
            raise OSError(errno.EIO, "I/O error")
        real_commit(self)

    monkeypatch.setattr(_npy_writer._Writer, "commit", commit)
    raised_at: list[float] = []
    with pytest.raises(OSError) as info:
        try:
            reprod.save(path, _tree())
        finally:
            raised_at.append(time.monotonic())
    assert_the_earlier_file_is_kept(info.value, path, b"the earlier dump")
    assert ended and max(ended) <= raised_at[0]


@pytest.mark.parametrize("threaded", [False, True])
def test_the_pipe_writes_in_order_through_short_writes(tmp_path, monkeypatch, threaded) -> None:
    rng = np.random.default_rng(9)
    pieces: list[Any] = []
    for i in range(2000):  # past _MAX_BUFFERS in one gathered run, and past _GATHER bytes
        n = int(rng.integers(0, 900))
        kind = i % 3
        data = rng.integers(0, 256, n, dtype=np.uint8)
        pieces.append(data.tobytes() if kind == 0 else bytearray(data.tobytes()) if kind == 1
                      else memoryview(data))
    pieces.append(memoryview(rng.integers(0, 256, 600_000, dtype=np.uint8)))
    real_writev = os.writev
    calls: list[int] = []

    def short(fd: int, buffers: Any) -> int:  # at most 1,000 bytes of what was asked
        calls.append(len(buffers))
        head = bytearray()
        for b in buffers:
            head += memoryview(b)[:1000 - len(head)]
            if len(head) >= 1000:
                break
        return real_writev(fd, [head])

    monkeypatch.setattr(_pipe, "_WRITEV", short)
    fd = os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        pipe = _pipe.WritevPipe(fd, threaded)
        for p in pieces:
            assert pipe.write(p) == len(p)
        pipe.finish()
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(bytes(p) for p in pieces)
    assert max(calls) <= _pipe._MAX_BUFFERS and len(calls) > 1


def test_finish_raises_the_first_failure_and_wait_drops_them(tmp_path, monkeypatch) -> None:
    gate = threading.Event()
    written: list[bytes] = []

    def writev(fd: int, buffers: list[Any]) -> None:
        gate.wait(5)
        data = b"".join(bytes(b) for b in buffers)
        written.append(data)
        if data.startswith(b"bad"):
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(_pipe, "_writev_all", writev)
    monkeypatch.setattr(_pipe, "_GATHER", 4)
    pipe = _pipe.WritevPipe(-1, True)
    gate.set()
    pipe.write(b"zero")  # the first run: written in the call
    assert written == [b"zero"]
    gate.clear()
    pipe.write(b"good")
    pipe.write(b"bad!")
    gate.set()
    pipe.write(b"next")  # waits for the oldest ("good")
    with pytest.raises(OSError, match="I/O error"):
        pipe.write(b"more")  # the next oldest's failure surfaces at the next hand-over
    pipe.finish()  # "next" and "more"
    assert written == [b"zero", b"good", b"bad!", b"next", b"more"]
    pipe.write(b"bad again")
    with pytest.raises(OSError, match="I/O error"):
        pipe.finish()
    gate.clear()
    pipe.write(b"bad, dropped")
    threading.Timer(0.1, gate.set).start()
    pipe.wait()  # waits, raises nothing
    assert written[-1] == b"bad, dropped"
    pipe.finish()  # nothing left
