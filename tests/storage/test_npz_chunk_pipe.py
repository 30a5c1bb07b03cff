"""The kernel's ``.npz`` chunks written on the file's descriptor, by the helper thread while the
kernel packs the next chunk (``npz_writer._ChunkPipe``, where the process has two cores), or
inline (one core): the same members as through the buffered file, in the same order when runs of
kernel-packed keys alternate with keys the Python path writes, and a failed write leaves the
earlier file (nothing is written after the dump is abandoned)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from faulty_files import assert_the_earlier_file_is_kept

import reprod
from reprod import _native
from reprod.storage import _pipe, npz_writer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(_native.kernel() is None, reason="npz_pack needs the kernel")


def _tree() -> dict[str, np.ndarray]:
    """~3.6 MB in runs of small keys for the kernel (about five 256 KiB chunks each), broken by keys
    it leaves to Python: a non-contiguous array, a key longer than it takes, a byte-swapped
    dtype."""
    rng = np.random.default_rng(2)
    tree: dict[str, np.ndarray] = {}
    for run in range(3):
        for i in range(150):
            tree[f"run{run}/k{i}"] = rng.standard_normal(int(rng.integers(1000, 3000))).astype(np.float32)
        tree[f"run{run}/strided"] = rng.standard_normal((40, 40))[:, ::2]
        tree["L" * (npz_writer._BATCH_MAX_KEY + 1 + run)] = np.arange(run + 3.0)
        tree[f"run{run}/swapped"] = np.arange(run + 5, dtype=">f4")
    return tree


def _members(path) -> list[tuple[str, bytes, int]]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        return [(i.filename, z.read(i), i.CRC) for i in z.infolist()]


@pytest.mark.parametrize("cores", [1, 2])
def test_the_members_are_the_python_paths(tmp_path, monkeypatch, cores) -> None:
    tree = _tree()
    was = _native.set_enabled(False)  # the reference: Python's writes, through the buffered file
    try:
        reprod.save(tmp_path / "python.npz", tree)
    finally:
        _native.set_enabled(was)
    monkeypatch.setattr(npz_writer, "cores", lambda: cores)
    used: list[str] = []
    real_pipe, real_direct = npz_writer._ChunkPipe, npz_writer._direct_write
    monkeypatch.setattr(npz_writer, "_ChunkPipe", lambda fd: used.append("pipe") or real_pipe(fd))
    monkeypatch.setattr(npz_writer, "_direct_write",
                        lambda fd: used.append("direct") or real_direct(fd))
    reprod.save(tmp_path / "d.npz", tree)
    assert used[0] == ("pipe" if cores >= 2 else "direct")
    assert _members(tmp_path / "d.npz") == _members(tmp_path / "python.npz")
    d = reprod.load(tmp_path / "d.npz", verify=True)
    assert list(d) == list(tree)
    for key, value in tree.items():
        np.testing.assert_array_equal(d[key], value, err_msg=key[:40])


def _failing_direct_write(monkeypatch, fail_at: int, slow: float = 0.0) -> list[float]:
    """Descriptor writes fail as a full disk from the ``fail_at``-th chunk on; returns the
    times at which writes ended (each ``slow``, so that chunks are in flight together; those
    after the failing one 0.3 s, so that one still in flight when the failure surfaces ends
    well after an abort that did not wait for it)."""
    real = npz_writer._direct_write
    ended: list[float] = []
    lock = threading.Lock()

    def direct(fd: int):
        write = real(fd)

        def w(data: bytes) -> int:
            with lock:
                n = len(ended) + 1
            time.sleep(slow if n <= fail_at else 0.3)
            if n >= fail_at:
                with lock:
                    ended.append(time.monotonic())
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done = write(data)
            with lock:
                ended.append(time.monotonic())
            return done
        return w

    monkeypatch.setattr(npz_writer, "_direct_write", direct)  # one core: the writer's own writes
    monkeypatch.setattr(_pipe, "_direct_write", direct)  # two: _ChunkPipe's
    return ended


@pytest.mark.parametrize("cores", [1, 2])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failed_chunk_write_keeps_the_earlier_file(tmp_path, monkeypatch, cores, fail_at) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"the earlier dump")
    monkeypatch.setattr(npz_writer, "cores", lambda: cores)
    ended = _failing_direct_write(monkeypatch, fail_at, slow=0.01)
    real_abort = npz_writer.NpzWriter._abort
    aborted: list[float] = []

    def abort(self, exc):
        aborted.append(time.monotonic())
        return real_abort(self, exc)

    monkeypatch.setattr(npz_writer.NpzWriter, "_abort", abort)
    with pytest.raises(OSError) as info:
        reprod.save(path, _tree())
    assert_the_earlier_file_is_kept(info.value, path, b"the earlier dump")
    assert len(ended) >= fail_at and aborted
    npz_writer._helper().submit(lambda: None).result()  # the helper thread is idle now
    assert max(ended) <= aborted[0]  # every chunk in flight had ended before the abort


def test_finish_waits_for_every_chunk_and_raises_the_first_failure(tmp_path) -> None:
    fd = os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT)
    try:
        pipe = npz_writer._ChunkPipe(fd)
        calls: list[bytes] = []
        gate = threading.Event()

        def write(data: bytes) -> int:
            gate.wait(5)
            calls.append(data)
            if data == b"bad":
                raise OSError(errno.EIO, "I/O error")
            return len(data)

        pipe._write = write
        gate.set()
        assert pipe(b"zero") == 4 and calls == [b"zero"]  # the first chunk: written in the call
        gate.clear()
        assert pipe(b"one") == 3 and pipe(b"bad") == 3
        gate.set()
        assert pipe(b"three") == 5  # the oldest chunk, "one", was written
        with pytest.raises(OSError, match="I/O error"):
            pipe(b"four")  # the next oldest's failure surfaces at the next call
        pipe.finish()  # waits for "three"
        assert calls == [b"zero", b"one", b"bad", b"three"]
        pipe(b"bad")
        with pytest.raises(OSError, match="I/O error"):
            pipe.finish()
        pipe.finish()  # nothing left
    finally:
        os.close(fd)


def test_without_a_thread_the_jobs_run_inline(tmp_path, monkeypatch) -> None:
    def refuse(self) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(_pipe, "_HELPERS", [])
    monkeypatch.setattr(npz_writer._Helper, "__init__", refuse)
    monkeypatch.setattr(npz_writer, "cores", lambda: 2)
    tree = _tree()
    tree["big"] = np.arange(300_000, dtype=np.float64)  # 2.4 MB: its CRC a job too
    reprod.save(tmp_path / "d.npz", tree)
    assert _pipe._HELPERS == []  # not kept: a later save tries again
    d = reprod.load(tmp_path / "d.npz", verify=True)
    assert list(d) == list(tree)
    np.testing.assert_array_equal(d["big"], tree["big"])


_AT_EXIT = r"""
import atexit, sys
import numpy as np
import reprod

def save() -> None:  # Python 3.12 refuses new threads here
    tree = {f"k{i}": np.full(2000, i, np.float32) for i in range(500)}
    tree["big"] = np.ones(1 << 20)
    reprod.save(sys.argv[1], tree)
    print("saved", len(reprod.load(sys.argv[1], verify=True)), flush=True)

atexit.register(save)
"""


def test_a_save_in_an_atexit_handler(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _AT_EXIT, str(tmp_path / "d.npz")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "saved 501", p.stderr[-2000:]


def _recording_saves(tmp_path, monkeypatch, keep: bool) -> tuple[list, list[bytes]]:
    """Two saves of ``_tree()`` on one core, every chunk the kernel hands to write recorded: the
    objects themselves where ``keep`` (a write that holds on to them), with a copy of their bytes
    at the time of the write."""
    monkeypatch.setattr(npz_writer, "cores", lambda: 1)
    seen: list = []
    texts: list[bytes] = []

    def direct_write(fd: int):
        real = _pipe._direct_write(fd)

        def write(chunk) -> int:
            texts.append(bytes(chunk))
            seen.append(chunk if keep else id(chunk))
            return real(chunk)
        return write

    monkeypatch.setattr(npz_writer, "_direct_write", direct_write)
    tree = _tree()
    for name in ("a.npz", "b.npz"):
        reprod.save(tmp_path / name, tree)
    return seen, texts


def test_chunks_a_write_holds_on_to_are_never_written_over(tmp_path, monkeypatch) -> None:
    # the kernel takes a chunk again only once nobody else holds it: here the write holds every
    # one, so each must still hold the bytes it was written with
    seen, texts = _recording_saves(tmp_path, monkeypatch, keep=True)
    assert len(seen) >= 20
    assert [bytes(c) for c in seen] == texts
    assert len({id(c) for c in seen}) == len(seen)
    assert _members(tmp_path / "a.npz") == _members(tmp_path / "b.npz")


def test_the_chunks_are_used_again_once_written(tmp_path, monkeypatch) -> None:
    # a new chunk was new memory, faulted in page by page: the kernel keeps a few, and the next
    # chunk, and the next save's, goes into one of them
    seen, texts = _recording_saves(tmp_path, monkeypatch, keep=False)
    assert len(seen) >= 20
    assert len(set(seen)) <= 4, len(set(seen))
    tree = _tree()
    was = _native.set_enabled(False)
    try:
        reprod.save(tmp_path / "python.npz", tree)
    finally:
        _native.set_enabled(was)
    assert _members(tmp_path / "a.npz") == _members(tmp_path / "python.npz")
    assert _members(tmp_path / "b.npz") == _members(tmp_path / "python.npz")



def test_chunks_held_elsewhere_do_not_pin_the_kept_ones(tmp_path, monkeypatch) -> None:
    # every chunk of two saves still held (a write that keeps them; in a test run, a failed
    # write's traceback waiting for the cycle collector): the kernel's kept chunks were all busy
    # for good, and every later chunk was fresh memory (30 chunks, 16 distinct, on CI once)
    (tmp_path / "held").mkdir()
    held, held_texts = _recording_saves(tmp_path / "held", monkeypatch, keep=True)
    seen, _ = _recording_saves(tmp_path, monkeypatch, keep=False)
    assert len(seen) >= 20
    assert len(set(seen)) <= 4, len(set(seen))
    # the chunks given up are still the holder's, with the bytes they were written with
    assert [bytes(c) for c in held] == held_texts
    assert _members(tmp_path / "held" / "a.npz") == _members(tmp_path / "a.npz")
