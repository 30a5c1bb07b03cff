"""NpzWriter.overlap_crcs: a large member's CRC computed on a helper thread while its bytes are
written, the local header patched afterwards (issue 23, the streamed step's writer thread on a
GPU machine). The dump must be the one written without it: zipfile (an independent reader)
checks each member's bytes against the central directory's CRC, and the local headers are read
raw here."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger, _native
from reprod.storage import npz_background, npz_writer
from reprod.storage.npz_writer import NpzWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(_native.kernel() is None, reason="overlap_crcs needs the kernel")


def _values() -> list[tuple[str, np.ndarray, object]]:
    rng = np.random.default_rng(5)
    big = rng.standard_normal(1_500_000).astype(np.float32)  # 6 MiB: overlapped
    return [
        ("small", rng.standard_normal(10), None),
        ("big", big, None),
        ("big_again", big, None),  # the keys of one tensor share its CRC (capture's hand-over)
        ("mid", rng.standard_normal(40_000), None),  # 320 KB: writev, CRC first
        ("ints", rng.integers(0, 1 << 30, (3, 700_000), dtype=np.int64), None),  # 16 MiB
        ("bf16", rng.standard_normal(2_200_000).astype(np.float32), "bfloat16"),  # 4.4 MB as bf16
        ("exact", np.ones(npz_writer._OVERLAP_FROM // 8), None),  # the threshold, header aside
    ]


def _write(path, overlap: bool) -> bool:
    w = NpzWriter(str(path))
    on = w.overlap_crcs() if overlap else False
    crcs: dict[bytes, int] = {}
    for key, value, src in _values():
        w.add_array(key, value, src, crcs if key.startswith("big") else None)
    w.close()
    return on


def _local_crcs(path) -> dict[str, tuple[int, int]]:
    """name -> (the local header's CRC, the central directory's)."""
    raw = open(path, "rb").read()
    with zipfile.ZipFile(path) as z:
        return {i.filename: (struct.unpack_from("<I", raw, i.header_offset + 14)[0], i.CRC)
                for i in z.infolist()}


class _CountingHelper:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self) -> _CountingHelper:
        return self

    def submit(self, fn, data, *args):
        if fn is npz_writer.crc32:  # not the chunk pipe's writes
            self.sizes.append(len(data))
        return _REAL_HELPER().submit(fn, data, *args)


_REAL_HELPER = npz_writer._helper


def test_the_overlapped_dump_is_the_plain_one(tmp_path, monkeypatch) -> None:
    pool = _CountingHelper()
    monkeypatch.setattr(npz_writer, "_helper", pool)
    assert _write(tmp_path / "plain.npz", overlap=False) is False
    assert pool.sizes == []
    assert _write(tmp_path / "overlap.npz", overlap=True) is True
    # big (once: big_again takes its CRC), ints, bf16, exact; not the small ones
    assert pool.sizes == [6_000_000, 16_800_000, 4_400_000, npz_writer._OVERLAP_FROM]
    a, b = tmp_path / "plain.npz", tmp_path / "overlap.npz"
    with zipfile.ZipFile(a) as x, zipfile.ZipFile(b) as y:
        assert x.namelist() == y.namelist()
        assert y.testzip() is None  # every member against its central CRC
        for name in x.namelist():
            assert x.read(name) == y.read(name), name
            assert x.getinfo(name).CRC == y.getinfo(name).CRC, name
    for name, (local, central) in _local_crcs(b).items():
        assert local == central, name
    d = reprod.load(b, verify=True)
    for key, value, src in _values():
        if src is None:  # bfloat16's bits: the same bytes as the plain dump's, above
            np.testing.assert_array_equal(d[key], value, err_msg=key)
    assert os.path.getsize(a) == os.path.getsize(b)


def test_a_failed_write_waits_for_its_crc_and_keeps_the_earlier_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "run.npz"
    reprod.save(path, {"earlier": np.ones(2)})
    before = path.read_bytes()
    submitted = []

    class Pool:
        def submit(self, fn, *args):
            fut = _REAL_HELPER().submit(fn, *args)
            submitted.append(fut)
            return fut

    monkeypatch.setattr(npz_writer, "_helper", Pool)

    def full_disk(f, prefix, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(npz_writer, "_write_large", full_disk)
    lg = ReprodLogger(stream_to=path)
    assert lg._writer.overlap_crcs()
    with pytest.raises(OSError, match="No space left"):
        with lg:
            lg._put("big", np.ones(2_000_000))
    assert len(submitted) == 1 and submitted[0].done()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["run.npz"]


def test_the_writer_thread_overlaps_where_cores_are_spare(tmp_path, monkeypatch) -> None:
    big = np.arange(1_200_000, dtype=np.float32)
    for cores, on in ((1, True), (10**6, False)):
        monkeypatch.setattr(npz_background, "OVERLAP_CORES", cores)
        path = tmp_path / f"run{cores}.npz"
        lg = ReprodLogger(stream_to=path)
        lg._put_later("a", big)
        lg._put_later("b", big * 2)
        assert lg._writer._overlap is on
        lg.close()
        d = reprod.load(path, verify=True)
        np.testing.assert_array_equal(d["b"], big * 2)
        assert all(local == central for local, central in _local_crcs(path).values())


def test_no_overlap_without_the_kernel(tmp_path) -> None:
    was = _native.set_enabled(False)
    try:
        w = NpzWriter(str(tmp_path / "run.npz"))
        assert w.overlap_crcs() is False
        w.abort()
    finally:
        _native.set_enabled(was)


_CHILD = r"""
import os, sys
import numpy as np
from reprod.storage import npz_writer
from reprod.storage.npz_writer import NpzWriter
folder = sys.argv[1]
npz_writer._helper()  # the parent's helper thread exists before the fork
pid = os.fork()
if pid == 0:
    w = NpzWriter(os.path.join(folder, "child.npz"))
    assert w.overlap_crcs()
    w.add_array("big", np.ones(1_000_000))  # with the parent's pool this would wait forever
    w.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", status, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_makes_its_own_helper_thread(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "child 0", p.stderr[-2000:]
    d = reprod.load(tmp_path / "child.npz", verify=True)
    np.testing.assert_array_equal(d["big"], np.ones(1_000_000))


@pytest.mark.parametrize("cores", [1, 2])
def test_save_computes_crcs_beside_writes_where_two_cores_are(tmp_path, monkeypatch, cores) -> None:
    helper = _CountingHelper()
    monkeypatch.setattr(npz_writer, "_helper", helper)
    monkeypatch.setattr(npz_writer, "cores", lambda: cores)
    tree = {key: value for key, value, src in _values() if src is None}
    reprod.save(tmp_path / "d.npz", tree)
    # the members from 512 KiB (no CRC cache shared by keys here)
    want = [6_000_000, 6_000_000, 16_800_000, npz_writer._OVERLAP_FROM]
    assert helper.sizes == (want if cores >= 2 else [])
    for name, (local, central) in _local_crcs(tmp_path / "d.npz").items():
        assert local == central, name
    d = reprod.load(tmp_path / "d.npz", verify=True)
    for key, value in tree.items():
        np.testing.assert_array_equal(d[key], value, err_msg=key)
