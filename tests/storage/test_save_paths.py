"""Every path the system takes can be saved to, as ``np.save`` (reprod_log) saves to it.

A name up to the file system's limit (255 bytes here), in both formats, streamed too: the
temporary file beside it, ``.<name>.<random>.tmp``, would be 14 bytes over it, so a long name's
is cut and marked (``storage.atomic._tmp_prefix``) and stale ones are still found. Paths given as
bytes or ``pathlib`` objects, as ``open`` takes them.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger, WriteError
from reprod.storage import atomic


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_a_name_as_long_as_the_file_system_takes_is_saved(tmp_path, suffix):
    limit = _name_max(tmp_path)
    name = "k" * (limit - len(suffix)) + suffix
    value = {"x": np.arange(5.0)}
    with open(tmp_path / "probe", "wb") as f:  # np.save's own reach: the system takes the name
        np.save(f, 1)
    os.replace(tmp_path / "probe", tmp_path / name)
    os.unlink(tmp_path / name)
    for save in (lambda p: reprod.save(p, value), _logger_save(value)):
        path = save(tmp_path / name)
        assert os.path.basename(path) == name
        with reprod.load(path) as d:
            assert np.array_equal(d["x"], value["x"])
        os.unlink(path)
    assert os.listdir(tmp_path) == []


def _logger_save(value):
    def save(p):
        lg = ReprodLogger()
        for k, v in value.items():
            lg.add(k, v)
        return lg.save(p)
    return save


def test_a_long_name_is_streamed_and_its_temporary_name_fits(tmp_path):
    limit = _name_max(tmp_path)
    path = tmp_path / ("s" * (limit - 4) + ".npz")
    lg = ReprodLogger(stream_to=path)
    lg.add("a", np.ones(4))
    (tmp,) = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(os.fsencode(tmp)) <= limit and tmp.startswith(".sss")
    lg.close()
    with reprod.load(path) as d:
        assert list(d) == ["a"]
    assert os.listdir(tmp_path) == [path.name]


def test_a_long_names_stale_temporary_is_removed_and_no_other_targets(tmp_path):
    limit = _name_max(tmp_path)
    a = tmp_path / ("a" * (limit - 4) + ".npz")
    b = tmp_path / ("a" * (limit - 5) + "b.npz")  # the same cut, another target
    prefix_a = atomic._tmp_prefix(str(tmp_path), a.name)
    prefix_b = atomic._tmp_prefix(str(tmp_path), b.name)
    assert prefix_a != prefix_b and len(os.fsencode(prefix_a)) + 12 <= limit
    old = time.time() - 2 * atomic.STALE_TMP_SECONDS
    left = []
    for prefix in (prefix_a, prefix_b):
        p = tmp_path / (prefix + "abcdefgh.tmp")
        p.write_bytes(b"left by a killed writer")
        os.utime(p, (old, old))
        left.append(p)
    assert atomic.remove_stale_temporaries(str(a)) == [str(left[0])]
    assert left[1].exists() and not left[0].exists()
    reprod.save(b, {"x": np.ones(2)})  # the next save to b removes b's
    assert sorted(os.listdir(tmp_path)) == [b.name]


def test_a_name_past_the_limit_is_one_line_naming_it(tmp_path):
    name = "n" * (_name_max(tmp_path) + 1 - 4) + ".npz"
    with pytest.raises(WriteError) as info:
        reprod.save(tmp_path / name, {"x": np.ones(2)})
    assert info.value.errno == errno.ENAMETOOLONG
    assert str(info.value) == (f"{tmp_path / name}: cannot create the file: "
                               f"{os.strerror(errno.ENAMETOOLONG)} (errno {errno.ENAMETOOLONG})")
    assert os.listdir(tmp_path) == []


def test_a_short_names_temporary_name_is_as_before(tmp_path):
    assert atomic._tmp_prefix(str(tmp_path), "run.npz") == ".run.npz."


@pytest.mark.parametrize("suffix", [".npy", ".npz", ""])
def test_bytes_and_pathlib_paths_save_where_str_ones_do(tmp_path, suffix):
    value = {"x": np.arange(3.0)}
    for kind, make in (("bytes", lambda p: os.fsencode(p)), ("path", Path)):
        target = str(tmp_path / f"{kind}{suffix}")
        written = reprod.save(make(target), value)
        assert written == target + (".npy" if not suffix else "")
        assert _logger_save(value)(make(target)) == written
        with reprod.load(written) as d:
            assert np.array_equal(d["x"], value["x"])
    stream = tmp_path / "stream.npz"
    lg = ReprodLogger(stream_to=os.fsencode(stream))
    lg.add("x", np.ones(2))
    assert lg.save(os.fsencode(stream)) == str(stream)
