"""Saving over an earlier dump of 1 MiB or more: the two names exchanged (renameat2
RENAME_EXCHANGE, by the kernel) instead of a rename over the old file, which on ext4 allocates and
starts writing the new file inside the rename. The guarantees are those of the rename: the path
holds the old complete dump or the new one, other hard links keep the old, the mode is kept, a
symlink is written through, nothing is left beside it; where an exchange cannot be made, the
rename does the work as before."""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger, _native
from reprod.storage import atomic

KERNEL = _native.built()
pytestmark = pytest.mark.skipif(
    KERNEL is None or not hasattr(KERNEL, "rename_exchange") or not sys.platform.startswith("linux"),
    reason="the exchange needs the compiled kernel on Linux")

BIG = {"a": np.arange(300_000, dtype=np.float64)}  # 2.4 MB
BIG2 = {"a": -np.arange(300_000, dtype=np.float64), "b": np.ones(3)}


class _Kernel:
    """The kernel, recording ``rename_exchange``'s calls; ``before`` runs first (a race, a failure)."""

    def __init__(self, before: Any = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.before = before

    def rename_exchange(self, a: str, b: str) -> None:
        self.calls.append((a, b))
        if self.before is not None:
            self.before(a, b)
        KERNEL.rename_exchange(a, b)

    def __getattr__(self, name: str) -> Any:
        return getattr(KERNEL, name)


@pytest.fixture
def spy(monkeypatch) -> _Kernel:
    k = _Kernel()
    monkeypatch.setattr(_native, "kernel", lambda: k)
    monkeypatch.setattr(atomic, "_EXCHANGE", [True])
    return k


def _left(folder: Any) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_a_dump_over_an_earlier_one_is_exchanged_and_the_old_removed(tmp_path, spy, suffix) -> None:
    p = tmp_path / f"run{suffix}"
    reprod.save(p, BIG)
    os.chmod(p, 0o640)
    other = tmp_path / "backup"
    os.link(p, other)
    held = open(p, "rb")  # a reader of the old dump keeps reading it
    try:
        reprod.save(p, BIG2)
        assert len(spy.calls) == 1 and spy.calls[0][1] == str(p)
        back = reprod.load(p)
        np.testing.assert_array_equal(back["a"], BIG2["a"])
        assert list(back) == ["a", "b"]
        np.testing.assert_array_equal(reprod.load(other)["a"], BIG["a"])  # the other name: the old
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        assert held.read() == other.read_bytes()
    finally:
        held.close()
    assert _left(tmp_path) == ["backup", f"run{suffix}"]  # the old dump's temporary name is gone


def test_a_symlinked_target_and_a_stream_are_exchanged_too(tmp_path, spy) -> None:
    real = tmp_path / "store" / "run.npz"
    real.parent.mkdir()
    reprod.save(real, BIG)
    link = tmp_path / "run.npz"
    os.symlink(real, link)
    reprod.save(link, BIG2)
    assert link.is_symlink() and spy.calls == [(spy.calls[0][0], str(real))]
    np.testing.assert_array_equal(reprod.load(real)["a"], BIG2["a"])
    with ReprodLogger(stream_to=real) as log:
        log.add("s", np.arange(200_000.0))
    assert len(spy.calls) == 2
    np.testing.assert_array_equal(reprod.load(link)["s"], np.arange(200_000.0))
    assert _left(real.parent) == ["run.npz"]


def test_small_new_and_kernel_less_saves_rename(tmp_path, spy) -> None:
    reprod.save(tmp_path / "small.npz", {"a": np.ones(10)})
    reprod.save(tmp_path / "small.npz", {"a": np.zeros(10)})  # both under 1 MiB
    reprod.save(tmp_path / "new.npz", BIG)  # nothing there before
    assert spy.calls == []
    was = _native.set_enabled(False)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_native, "kernel", lambda: None)
            reprod.save(tmp_path / "new.npz", BIG2)
    finally:
        _native.set_enabled(was)
    assert spy.calls == []
    np.testing.assert_array_equal(reprod.load(tmp_path / "new.npz")["a"], BIG2["a"])
    assert reprod.load(tmp_path / "small.npz")["a"].tolist() == [0.0] * 10
    assert _left(tmp_path) == ["new.npz", "small.npz"]


@pytest.mark.parametrize("code, kept", [(errno.EINVAL, False), (errno.ENOSYS, False),
                                        (errno.EACCES, True)])
def test_a_refused_exchange_falls_back_to_the_rename(tmp_path, spy, code, kept) -> None:
    def refuse(a: str, b: str) -> None:
        raise OSError(code, os.strerror(code), a, None, b)

    spy.before = refuse
    p = tmp_path / "run.npz"
    reprod.save(p, BIG)
    reprod.save(p, BIG2)
    np.testing.assert_array_equal(reprod.load(p)["a"], BIG2["a"])
    assert _left(tmp_path) == ["run.npz"]
    assert atomic._EXCHANGE[0] is kept  # no exchanges on this system: not tried again
    spy.before = None
    reprod.save(p, BIG)
    assert len(spy.calls) == (2 if kept else 1)
    np.testing.assert_array_equal(reprod.load(p)["a"], BIG["a"])


def test_a_directory_that_takes_the_targets_place_is_put_back(tmp_path, spy) -> None:
    p = tmp_path / "run.npz"
    reprod.save(p, BIG)

    def race(a: str, b: str) -> None:  # between the check and the exchange
        if len(spy.calls) == 1:
            os.unlink(b)
            os.mkdir(b)
            (tmp_path / "run.npz" / "keep").write_text("mine")

    spy.before = race
    with pytest.raises(OSError):  # what a rename of a file over a directory raises
        reprod.save(p, BIG2)
    assert p.is_dir() and (p / "keep").read_text() == "mine"
    assert _left(tmp_path) == ["run.npz"]


def test_the_kernels_exchange_swaps_two_names_and_names_them_in_errors(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    KERNEL.rename_exchange(str(a), str(b))
    assert (a.read_bytes(), b.read_bytes()) == (b"second", b"first")
    with pytest.raises(FileNotFoundError) as info:
        KERNEL.rename_exchange(str(a), str(tmp_path / "missing"))
    assert info.value.filename == os.fsencode(a) and info.value.filename2 == os.fsencode(tmp_path / "missing")
    assert a.read_bytes() == b"second"
