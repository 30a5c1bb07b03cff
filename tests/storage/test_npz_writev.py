"""Large members go to the file in one writev from the array's memory (npz_writer._write_large):
the same bytes as through the file's buffer, after short writes too, and after a re-added key's
member went back into a free region (seeks)."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pytest

import reprod
from reprod.storage import _pipe, npz_members, npz_writer
from reprod.storage.npz_writer import NpzWriter


def _write(path, crcs: bool = True) -> bytes:
    rng = np.random.default_rng(3)
    w = NpzWriter(str(path))
    for i, n in enumerate((10, 70_000, 300_000, 5, 1 << 20, 300_000)):
        w.add_array(f"k{i}", rng.standard_normal(n).astype(np.float32))
    same = rng.standard_normal(400_000).astype(np.float32)
    cache: Optional[dict[bytes, int]] = {} if crcs else None
    w.add_array("s0", same, None, cache)  # one array's bytes under two keys: one CRC
    w.add_array("s1", same, None, cache)
    w.add_array("k2", np.ones(300_000, np.float32))  # re-added: its old region is reused
    w.add_array("k9", np.zeros(70_000, np.float32))
    w.add("tree", {"a": np.arange(100_000.0)})
    w.close()
    return path.read_bytes()


@pytest.fixture
def fixed_time(monkeypatch) -> None:
    monkeypatch.setattr(npz_members, "_FIXED_DOS", (0, 33))


def test_writev_writes_what_the_buffered_file_writes(tmp_path, monkeypatch, fixed_time) -> None:
    with monkeypatch.context() as m:
        m.setattr(npz_writer, "_WRITEV_FROM", 1 << 62)  # every member through the buffer
        want = _write(tmp_path / "buffered.npz", crcs=False)
    assert _write(tmp_path / "writev.npz") == want
    d = reprod.load(tmp_path / "writev.npz", verify=True)
    assert list(d) == ["k0", "k1", "k2", "k3", "k4", "k5", "s0", "s1", "k9", "tree"]
    np.testing.assert_array_equal(d["k2"], np.ones(300_000, np.float32))


@pytest.mark.parametrize("short", [7, 40, 1000, 200_000])
def test_short_writes_are_finished(tmp_path, monkeypatch, fixed_time, short) -> None:
    """A writev that stops early (a pipe, a signal) at ``short`` bytes, in the header or in the
    data: the rest follows."""
    with monkeypatch.context() as m:
        m.setattr(npz_writer, "_WRITEV_FROM", 1 << 62)
        want = _write(tmp_path / "buffered.npz")
    calls = []

    def writev(fd, buffers):
        data = b"".join(bytes(b) for b in buffers)
        calls.append(len(data))
        return os.write(fd, data[:short])

    monkeypatch.setattr(_pipe, "_WRITEV", writev)  # _write_large's writev_all
    assert _write(tmp_path / "short.npz") == want
    assert calls and all(n >= npz_writer._WRITEV_FROM for n in calls)


def test_without_writev(tmp_path, monkeypatch, fixed_time) -> None:
    with monkeypatch.context() as m:
        m.setattr(npz_writer, "_WRITEV_FROM", 1 << 62)
        want = _write(tmp_path / "buffered.npz")
    monkeypatch.setattr(npz_writer, "_WRITEV", None)  # Windows
    assert _write(tmp_path / "plain.npz") == want


def test_the_file_extended_ahead_is_cut_back_to_its_end(tmp_path, monkeypatch, fixed_time) -> None:
    """Members are written within the temporary file's size (extended ahead, sparse); the dump
    is the bytes written without that, its end where the zip ends."""
    real_init = NpzWriter.__init__

    def no_growth(self, path):
        real_init(self, path)
        self._grow = False

    with monkeypatch.context() as m:
        m.setattr(NpzWriter, "__init__", no_growth)
        want = _write(tmp_path / "grown_as_written.npz")
    sizes = []
    real_reserve = NpzWriter._reserve

    def reserve(self, end):
        real_reserve(self, end)
        sizes.append((end, os.fstat(self._file.fileno()).st_size))

    monkeypatch.setattr(NpzWriter, "_reserve", reserve)
    got = _write(tmp_path / "reserved.npz")
    if os.name == "posix":
        assert sizes and all(size > end for end, size in sizes)
    assert got == want
    assert reprod.load(tmp_path / "reserved.npz", verify=True)["k4"].shape == (1 << 20,)


def test_a_zip64_dump_is_cut_back_to_its_end_records(tmp_path, monkeypatch, fixed_time) -> None:
    """Past 65,535 members the end records are zip64 ones: the cut is after them."""
    w = NpzWriter(str(tmp_path / "many.npz"))
    w.add_array("big", np.ones(10 << 20, np.float32))  # 40 MiB: the file extended to 80 MiB
    one = np.zeros(1, np.uint8)
    for i in range(70_000):
        w.add_array(f"k{i}", one)
    assert w._reserved > w._pos + (10 << 20) or os.name != "posix"  # room left for the directory
    w.close()
    import zipfile

    with zipfile.ZipFile(tmp_path / "many.npz") as z:
        assert len(z.namelist()) == 70_002 and z.testzip() is None
    assert (tmp_path / "many.npz").read_bytes()[-22:-18] == b"PK\x05\x06"
