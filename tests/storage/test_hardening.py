"""Hardening, round two: files that are not regular files, folder comparisons that passed without
comparing, bounded work per byte of a file, errors that escaped as tracebacks, outputs that
replaced what was there, re-added keys in a stream, and reprod_log files the readers refused.

Each test names the promise of README.md or SECURITY.md it holds reprod to.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import DumpFormatError, ReprodLogger
from reprod.cli import main as diff_main
from reprod.errors import UnsupportedValueError
from reprod.storage import NonNumericValue
from reprod.storage.atomic import AtomicFile

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and signals")

ROOT = Path(__file__).resolve().parents[2]


class _Hang(Exception):
    pass


class _deadline:
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def on_alarm(signum: int, frame: Any) -> None:
            raise _Hang(f"still running after {self.seconds} s")

        self.old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def _npy_object_header() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, np.lib.format.header_data_from_array_1_0(np.empty((), dtype=object)))
    return buf.getvalue()


def _one_line(exc: BaseException, path: Any) -> str:
    msg = str(exc)
    assert msg.isprintable() and str(path) in msg, repr(msg)
    return msg


# --- 1. non-regular files ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pdparams", ".pth"])
def test_a_fifo_is_refused_at_once(tmp_path, suffix) -> None:
    fifo = tmp_path / f"dump{suffix}"
    os.mkfifo(fifo)
    from reprod.storage.framework_files import load_weights_as_dump

    read = reprod.load if suffix in (".npy", ".npz") else load_weights_as_dump
    if suffix == ".pth":
        pytest.importorskip("torch")
    with _deadline(20), pytest.raises(DumpFormatError) as info:
        read(fifo)
    assert "FIFO" in _one_line(info.value, fifo)


def test_reprod_diff_on_fifos_and_devices_does_not_wait(tmp_path, capsys) -> None:
    ok = reprod.save(tmp_path / "ok.npy", {"a": np.ones(3)})
    fifo = tmp_path / "f.npy"
    os.mkfifo(fifo)
    with _deadline(20):
        assert diff_main([str(fifo), ok, "--quiet"]) == 2
        assert diff_main(["/dev/zero", ok, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{fifo}: is a FIFO" in err and "/dev/zero: is a character device" in err


def test_folder_walk_lists_regular_files_only(tmp_path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        reprod.save(d / "x.npy", {"v": np.ones(3)})
    os.mkfifo(a / "pipe.npy")  # not a dump: not listed (reading it would wait forever)
    os.mkfifo(b / "pipe.npy")
    with _deadline(20):
        assert diff_main([str(a), str(b), "--quiet"]) == 0
    from reprod.trees import dump_files as _dump_files

    assert _dump_files(str(a)) == ["x.npy"]


def test_a_partner_that_is_a_fifo_is_an_error_not_a_wait(tmp_path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    reprod.save(a / "x.npy", {"v": np.ones(3)})
    os.mkfifo(b / "x.npy")
    with _deadline(20):
        assert diff_main([str(a), str(b), "--quiet"]) == 2
    assert f"{b / 'x.npy'}: is a FIFO" in capsys.readouterr().err


# --- 2. folder mode: no vacuous passes -------------------------------------------------------------


def test_upper_case_suffixes_are_dumps(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for d, v in ((a, 1.0), (b, 2.0)):
        raw = open(reprod.save(d / "x.npy", {"v": np.full(3, v)}), "rb").read()
        os.unlink(d / "x.npy")
        (d / "OUT.NPY").write_bytes(raw)
        raw = open(reprod.save(d / "y.npz", {"w": np.full(3, v)}), "rb").read()
        os.unlink(d / "y.npz")
        (d / "Run.Npz").write_bytes(raw)
    assert diff_main([str(a), str(b), "--quiet"]) == 1  # compared, and different


def test_symlinked_sub_folders_are_followed_once(tmp_path) -> None:
    """A folder pair whose differing dumps sit under a symlinked sub-folder fails like the
    direct comparison; a symlink loop is walked once."""
    real_a, real_b = tmp_path / "real_a", tmp_path / "real_b"
    for d, v in ((real_a, 1.0), (real_b, 2.0)):
        d.mkdir()
        reprod.save(d / "x.npy", {"v": np.full(3, v)})
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.symlink(real_a, a / "sub")
    os.symlink(real_b, b / "sub")
    os.symlink(a, a / "loop")  # a loop back to the top
    os.symlink(b, b / "loop")
    assert diff_main([str(real_a), str(real_b), "--quiet"]) == 1
    with _deadline(20):
        assert diff_main([str(a), str(b), "--quiet"]) == 1
    from reprod.trees import dump_files as _dump_files

    assert _dump_files(str(a)) == ["sub/x.npy"]


# --- 3. bounded work per byte ------------------------------------------------------------------------


def _array_ops(n_floats: int) -> bytes:
    g = b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93"
    nd = b"\x8c\x05numpy\x8c\x07ndarray\x93"
    dt = (b"\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f8\x89\x88\x87R(K\x03\x8c\x01<NNN"
          b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    payload = b"\0" * (8 * n_floats)
    return (g + nd + b"K\x00\x85C\x01b\x87R(K\x01J" + struct.pack("<i", n_floats) + b"\x85" + dt
            + b"\x89B" + struct.pack("<I", len(payload)) + payload + b"tb")


def _aliasing_npy(path: Path, n_floats: int, keys: int) -> Path:
    """``{"k0": a, "k1": a, ...}``: one payload (in the pickle's memo) under ``keys`` keys."""
    body = bytearray(b"}(\x8c\x02k0" + _array_ops(n_floats) + b"\x94")
    memo = 0
    for i in range(1, keys):
        key = f"k{i}".encode()
        body += b"\x8c" + bytes([len(key)]) + key + b"j" + struct.pack("<I", memo)
    body += b"u"
    path.write_bytes(_npy_object_header() + b"\x80\x04" + body + b".")
    return path


def test_keys_aliasing_one_payload_are_refused_legacy(tmp_path) -> None:
    """8 MiB of payload under 10,000 keys would be 78 GiB of comparison."""
    p = _aliasing_npy(tmp_path / "alias.npy", 1 << 20, 10_000)
    assert p.stat().st_size < 9 << 20
    t0 = time.perf_counter()
    with pytest.raises(DumpFormatError) as info:
        reprod.load(p)
    assert "aliased payloads" in _one_line(info.value, p)
    assert time.perf_counter() - t0 < 5
    from reprod.storage.framework_files import read_pdparams

    pd = tmp_path / "alias.pdparams"
    pd.write_bytes(p.read_bytes()[len(_npy_object_header()):])
    with pytest.raises(DumpFormatError, match="aliased payloads"):
        read_pdparams(pd)


def test_keys_aliasing_one_member_are_refused_npz(tmp_path) -> None:
    raw = open(reprod.save(tmp_path / "ok.npz", {"big": np.zeros(1 << 20)}), "rb").read()
    out = tmp_path / "alias.npz"
    meta = {"format": "reprod-npz", "version": 1,
            "keys": [{"path": [f"k{i}"], "member": "big.npy"} for i in range(10_000)]}
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w") as dst:
        dst.writestr("big.npy", src.read("big.npy"))
        dst.writestr("__reprod__.json", json.dumps(meta))
    with pytest.raises(DumpFormatError) as info:
        reprod.load(out)
    assert "aliased payloads" in _one_line(info.value, out)


def test_aliasing_under_the_bound_shares_one_copy(tmp_path) -> None:
    """Below the bound, ``to_dict`` (what ``reprod.save(path, dump)`` and ``read_pdparams`` use)
    gives aliased keys one shared copy, as ``pickle.load`` would: memory stays the file's."""
    p = _aliasing_npy(tmp_path / "alias.npy", 1 << 17, 40)  # 1 MiB under 40 keys
    from reprod.storage.framework_files import read_pdparams

    pd = tmp_path / "alias.pdparams"
    pd.write_bytes(p.read_bytes()[len(_npy_object_header()):])
    for read in (lambda: reprod.load(p).to_dict(), lambda: read_pdparams(pd)):
        tracemalloc.start()
        try:
            got = read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(got) == 40 and got["k39"].shape == (1 << 17,)
        assert peak < 8 << 20, peak


def test_long_npy_headers_and_dtype_strings_follow_numpys_limit(tmp_path) -> None:
    """numpy refuses headers longer than 10,000 bytes from a file it does not trust; so does
    reprod (a header just under 1 MiB took 1.5 s to parse), and dtype strings in a pickle too."""
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }".ljust(10_001) + "\n"
    p = tmp_path / "long.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 16)
    with pytest.raises(DumpFormatError, match="numpy's limit of 10000"):
        reprod.load(p)
    ok = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }".ljust(9_999) + "\n"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(ok)) + ok.encode() + b"\0" * 16)
    assert reprod.load(p)["long"].tolist() == [0.0, 0.0]
    # a memoized dtype whose descr is a 1 MB string, used by many arrays
    descr = b"f" * 1_000_000
    dt = b"\x8c\x05numpy\x8c\x05dtype\x93\x8d" + struct.pack("<Q", len(descr)) + descr + b"\x89\x88\x87R\x94"
    body = b"}" + dt + b"0(" + b"".join(b"\x8c\x02k%c" % (65 + i) + b"K\x01" for i in range(20)) + b"u"
    q = tmp_path / "descr.npy"
    q.write_bytes(_npy_object_header() + b"\x80\x04" + body + b".")
    t0 = time.perf_counter()
    with pytest.raises(DumpFormatError, match="dtype string of 1000000 characters"):
        reprod.load(q)
    assert time.perf_counter() - t0 < 2


def _memoized_long_descr_file(path: Path, arrays: int) -> Path:
    """Many arrays sharing one memoized dtype whose string is 9,000 characters long (under the
    limit; 3,000 fields): the first array builds it, every other one refers to it."""
    descr = b"i1," * 2999 + b"i1"
    g = b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93\x94"  # memo 0
    nd = b"\x8c\x05numpy\x8c\x07ndarray\x93\x94"  # memo 1
    dt = (b"\x8c\x05numpy\x8c\x05dtype\x93X" + struct.pack("<I", len(descr)) + descr
          + b"\x89\x88\x87R\x94")  # memo 2
    data = b"C\x08" + b"\0" * 8
    first = g + nd + b"K\x00\x85C\x01b\x87R(K\x01K\x01\x85" + dt + b"\x89" + data + b"tb"
    arr = b"h\x00h\x01K\x00\x85C\x01b\x87R(K\x01K\x01\x85h\x02\x89" + data + b"tb"
    body = b"}(\x8c\x05k0000" + first + b"".join(b"\x8c\x05k%04d" % i + arr for i in range(1, arrays))
    path.write_bytes(_npy_object_header() + b"\x80\x04" + body + b"u.")
    return path


def test_a_memoized_dtype_is_parsed_once(tmp_path) -> None:
    """Each of 5,000 arrays met the dtype's 9,000-character string again (a 1 MB one took 1-2 s
    an array): it is parsed once per memo entry now."""
    p = _memoized_long_descr_file(tmp_path / "memo.npy", 5000)
    assert p.stat().st_size < 1 << 20
    t0 = time.perf_counter()
    with reprod.load(p) as d:
        values = [d[k] for k in d]
    assert time.perf_counter() - t0 < 2
    assert len(values) == 5000 and all(isinstance(v, NonNumericValue) for v in values)
    assert "structured" in values[0].what or "dtype" in values[0].what
    assert len(values[0].what) < 120


# --- 4. errors that escaped as tracebacks -----------------------------------------------------------


def test_a_key_longer_than_a_zip_name_streams_and_keeps_earlier_adds(tmp_path) -> None:
    p = tmp_path / "run.npz"
    lg = ReprodLogger(stream_to=p)
    lg.add("before", np.ones(2))
    lg.add("k" * 70_000, np.arange(3))  # a zip name holds 65,535 bytes: stored in the metadata
    with pytest.raises(UnsupportedValueError) as info:
        lg.add("x" * (1 << 21), 1)  # refused before anything is written; the stream goes on
    assert "\n" not in str(info.value)
    lg.add("after", 2)
    lg.close()
    with reprod.load(p, verify=True) as d:
        assert [k[:6] for k in d] == ["before", "kkkkkk", "after"]
        assert d["k" * 70_000].tolist() == [0, 1, 2] and d["after"] == 2
    assert zipfile.ZipFile(p).testzip() is None
    in_memory = ReprodLogger()
    in_memory.add("k" * 70_000, np.arange(3))
    in_memory.save(tmp_path / "mem.npz")
    assert reprod.load(tmp_path / "mem.npz")["k" * 70_000].tolist() == [0, 1, 2]


@pytest.mark.parametrize("value,threads", [("auto", None), ("3", 3), ("junk", "default"), ("0", 1)])
def test_reprod_threads_environment(value, threads) -> None:
    src = "import reprod, reprod.diff.metrics as m, os; print(m._threads, len(os.sched_getaffinity(0)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REPROD_THREADS": value}
    r = subprocess.run([sys.executable, "-W", "default", "-c", src], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got, cpus = map(int, r.stdout.split())
    want = {None: cpus, "default": min(cpus, 8)}.get(threads, threads)  # type: ignore[arg-type]
    assert got == want
    assert ("REPROD_THREADS" in r.stderr) == (value == "junk")


# --- 5. outputs that respect what is there --------------------------------------------------------


@pytest.fixture
def two_dumps(tmp_path) -> tuple[str, str]:
    return (reprod.save(tmp_path / "a.npy", {"v": np.ones(3)}),
            reprod.save(tmp_path / "b.npy", {"v": np.ones(3)}))


def test_output_to_a_device_writes_it_and_never_replaces_it(two_dumps) -> None:
    assert diff_main([*two_dumps, "--output", "/dev/null", "--html", "/dev/null", "--quiet"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_to_a_fifo_is_written_to_its_reader(tmp_path, two_dumps) -> None:
    fifo = tmp_path / "report.pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    time.sleep(0.2)
    with _deadline(20):
        assert diff_main([*two_dumps, "--output", str(fifo), "--format", "json", "--quiet"]) == 0
    reader.join(20)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still the FIFO
    assert json.loads(got[0])["passed"] is True
    # a FIFO nobody reads fails at once (ENXIO) instead of waiting
    lonely = tmp_path / "lonely.pipe"
    os.mkfifo(lonely)
    with _deadline(20), pytest.raises(OSError):
        AtomicFile(str(lonely))


def test_output_dash_is_stdout(two_dumps, capsys) -> None:
    assert diff_main([*two_dumps, "--output", "-", "--format", "json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True


def test_writes_go_through_symlinks_and_keep_the_mode(tmp_path) -> None:
    real = tmp_path / "store" / "run.npy"
    real.parent.mkdir()
    reprod.save(real, {"v": np.ones(2)})
    os.chmod(real, 0o600)
    link = tmp_path / "run.npy"
    os.symlink(real, link)
    reprod.save(link, {"v": np.zeros(3)})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert reprod.load(real)["v"].tolist() == [0.0, 0.0, 0.0]
    assert stat.S_IMODE(real.stat().st_mode) == 0o600  # a private dump stays private
    with ReprodLogger(stream_to=tmp_path / "s.npz") as lg:
        lg.add("a", 1)
    os.chmod(tmp_path / "s.npz", 0o640)
    with ReprodLogger(stream_to=tmp_path / "s.npz") as lg:
        lg.add("a", 2)
    assert stat.S_IMODE((tmp_path / "s.npz").stat().st_mode) == 0o640
    assert sorted(os.listdir(real.parent)) == ["run.npy"]  # no temporary left beside either


def test_a_hard_linked_dump_is_replaced_not_rewritten(tmp_path) -> None:
    """The documented choice (SECURITY.md): the name saved to gets the new dump, other links keep
    the old one, which a process may still have mapped; the write stays atomic."""
    p, other = tmp_path / "run.npy", tmp_path / "backup.npy"
    reprod.save(p, {"v": np.ones(2)})
    os.link(p, other)
    reprod.save(p, {"v": np.zeros(2)})
    assert reprod.load(p)["v"].tolist() == [0.0, 0.0]
    assert reprod.load(other)["v"].tolist() == [1.0, 1.0]


# --- 6. SIGTERM: see tests/storage/test_write_faults.py; the handler's life here ----------------------------


def test_the_sigterm_handler_lives_only_while_a_temporary_exists(tmp_path) -> None:
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    af = AtomicFile(str(tmp_path / "x.bin"))
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    af.commit()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    mine = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        with AtomicFile(str(tmp_path / "y.bin")):
            assert signal.getsignal(signal.SIGTERM) is handler  # a program's own handler stays
    finally:
        signal.signal(signal.SIGTERM, mine)


# --- 7. streaming re-adds ------------------------------------------------------------------------------


def test_re_adding_one_key_does_not_grow_the_stream(tmp_path) -> None:
    p = tmp_path / "run.npz"
    value = np.arange(256, dtype=np.float64)  # 2 KiB
    with ReprodLogger(stream_to=p) as lg:
        lg.add("other", np.ones(4))
        for i in range(5000):
            lg.add("act", value + i)
            lg.add("step", i)
    assert p.stat().st_size < 64 << 10, p.stat().st_size  # was 50 MiB for 10 KiB of data
    with zipfile.ZipFile(p) as zf:
        assert sorted(zf.namelist()) == ["__reprod__.json", "act.npy", "other.npy", "step.npy"]
        assert zf.testzip() is None
    with np.load(p) as z:
        assert z["act"][0] == 4999 and z["step"] == 4999
    with reprod.load(p, verify=True) as d:
        assert list(d) == ["other", "act", "step"] and d["act"][0] == 4999


def test_re_added_keys_of_changing_shapes_and_nesting(tmp_path, assert_same_tree) -> None:
    p = tmp_path / "run.npz"
    rng = np.random.default_rng(3)
    want: dict[str, Any] = {}
    with ReprodLogger(stream_to=p) as lg:
        for i in range(400):
            key = f"k{int(rng.integers(0, 6))}"
            n = int(rng.integers(0, 300))
            value: Any = np.full(n, float(i), np.float32)
            if rng.random() < 0.3:
                value = {"a": value, "b": {"c": np.full(3, i)}, "e": {}}
            lg.add(key, value)
            want[key] = value
    with reprod.load(p, verify=True) as d:
        got = d.to_dict()
    assert set(got) == set(want)
    for k in want:
        assert_same_tree(got[k], want[k])
    assert p.stat().st_size < 200 << 10


# --- 8. reprod_log files the readers refused --------------------------------------------------------


def test_int_keys_load_as_their_str(tmp_path) -> None:
    p = tmp_path / "int.npy"
    np.save(p, {3: np.ones(2), "n": {1: np.zeros(1)}}, allow_pickle=True)
    with reprod.load(p) as d:
        assert list(d) == ["3", "n"] and list(d["n"]) == ["1"]
        assert d["3"].tolist() == [1.0, 1.0]
    np.save(p, {3: np.ones(2), "3": np.zeros(2)}, allow_pickle=True)
    with pytest.raises(DumpFormatError, match="appears twice"):
        reprod.load(p)


def test_a_str_none_or_list_value_is_a_marker_not_a_refusal(tmp_path) -> None:
    """``Dump[key]`` gives a ``NonNumericValue`` for that key (the engine's ``type`` verdict,
    with ``what`` as the reason); every other key loads."""
    p = tmp_path / "mixed.npy"
    np.save(p, {"w": np.ones(2), "name": "resnet", "none": None, "lr": [0.1, [2]]},
            allow_pickle=True)
    with reprod.load(p) as d:
        assert d["w"].tolist() == [1.0, 1.0]
        for k, words in (("name", "str ('resnet')"), ("none", "None"), ("lr", "list of 2")):
            v = d[k]
            assert isinstance(v, NonNumericValue) and words in v.what and d.spec(k) is v
        plain = d.to_writable_dict()  # what reprod_log's load_info gave: the plain values
        assert plain["name"] == "resnet" and plain["none"] is None and plain["lr"] == [0.1, [2]]


def _py2_pickle(tree: dict[str, Any]) -> bytes:
    """The pickle Python 2's ``np.save(path, dict)`` wrote (protocol 2): str as SHORT_BINSTRING /
    BINSTRING (latin-1 bytes), unicode as BINUNICODE, arrays and dtypes as numpy 1.x reduced
    them, the dict inside a 0-d object array."""
    out = bytearray(b"\x80\x02")

    def py2str(raw: bytes) -> None:
        out.extend((b"U" + bytes([len(raw)])) if len(raw) < 256 else
                   (b"T" + struct.pack("<i", len(raw))))
        out.extend(raw)

    def glob(module: bytes, name: bytes) -> None:
        out.extend(b"c" + module + b"\n" + name + b"\n")

    def dtype(dt: np.dtype) -> None:
        glob(b"numpy", b"dtype")
        py2str(dt.str[1:].encode() if dt.kind != "O" else b"O8")
        out.extend(b"K\x00K\x01\x87R(K\x03")
        py2str(dt.str[0].encode() if dt.kind != "O" else b"|")
        out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK" + bytes([dt.flags]) + b"tb")

    def array_head(dt: np.dtype, shape: tuple[int, ...]) -> None:
        glob(b"numpy.core.multiarray", b"_reconstruct")
        glob(b"numpy", b"ndarray")
        out.extend(b"K\x00\x85")
        py2str(b"b")
        out.extend(b"\x87R(K\x01(")
        for s in shape:
            out.extend(b"J" + struct.pack("<i", s))
        out.extend(b"t")
        dtype(dt)
        out.extend(b"\x89")

    def value(v: Any) -> None:
        if isinstance(v, dict):
            out.extend(b"}(")
            for k, x in v.items():
                if isinstance(k, str) and not k.isascii():
                    raw = k.encode("utf-8")
                    out.extend(b"X" + struct.pack("<I", len(raw)) + raw)  # a py2 unicode key
                else:
                    py2str(str(k).encode("latin1"))
                value(x)
            out.extend(b"u")
        elif isinstance(v, bytes):  # a py2 str value
            py2str(v)
        elif isinstance(v, float):
            out.extend(b"G" + struct.pack(">d", v))
        else:
            arr = np.asarray(v)
            array_head(arr.dtype, arr.shape)
            py2str(arr.tobytes())
            out.extend(b"tb")

    array_head(np.dtype(object), ())
    out.extend(b"](")
    value(tree)
    out.extend(b"etb.")
    return bytes(out)


def test_a_python2_np_save_dict_loads(tmp_path) -> None:
    tree = {"logits": np.arange(100, dtype=np.float32).reshape(4, 25),  # BINSTRING payload
            "loss": np.array(0.25), "small": np.arange(3, dtype=np.int16),  # SHORT_BINSTRING
            "nested": {"w": np.ones((2, 2))}, "caf\xe9": np.zeros(1), "\u4e2d": np.ones(1),
            "lr": 0.1, "name": b"resnet"}
    p = tmp_path / "py2.npy"
    p.write_bytes(_npy_object_header() + _py2_pickle(tree))
    ref = np.load(p, encoding="latin1", allow_pickle=True).item()  # numpy's own reading of it
    assert ref["name"] == "resnet" and "caf\xe9" in ref
    with reprod.load(p) as d:
        assert list(d) == list(ref)
        for k in ("logits", "loss", "small", "caf\xe9", "\u4e2d"):
            np.testing.assert_array_equal(d[k], ref[k])
            assert d[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(d["nested"]["w"], ref["nested"]["w"])
        assert d["lr"] == 0.1
        assert isinstance(d["name"], NonNumericValue) and d["name"].value == "resnet"


def test_resaving_a_dump_with_non_numeric_values(tmp_path) -> None:
    """``reprod.save("copy.npy", reprod.load("old.npy"))`` keeps a str or None as np.save did; a
    ``.npz`` holds numeric data only, and says which key it cannot keep."""
    p = tmp_path / "old.npy"
    np.save(p, {"a": np.ones(3), "name": "resnet", "n": {"x": None, "y": np.zeros(1)}},
            allow_pickle=True)
    with reprod.load(p) as d:
        reprod.save(tmp_path / "copy.npy", d)
        with pytest.raises(UnsupportedValueError, match="'name'.*str"):
            reprod.save(tmp_path / "copy.npz", d)
    got = np.load(tmp_path / "copy.npy", allow_pickle=True).item()
    assert got["name"] == "resnet" and got["n"]["x"] is None and got["a"].tolist() == [1.0] * 3
