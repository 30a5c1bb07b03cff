"""The batch path of a whole-mapping ``.npz`` save (``NpzWriter.add_mapping``, the kernel's
``npz_pack`` and ``join_texts``): byte for byte the file the Python path writes key by key, for
every kind of value and key, switching between the two in the middle of a mapping; read back
equal by numpy and by reprod; no partial file after an error; the same bytes without the kernel.

The two paths read the clock each on its own: the files are compared with the members' DOS time
and date fixed (``npz_members._FIXED_DOS``); ``test_members_carry_the_time_of_writing`` checks
the clock's.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
from faulty_files import assert_the_earlier_file_is_kept, fail_atomic_writes

import reprod
from reprod import ReprodLogger, _native
from reprod.errors import ReprodError
from reprod.storage import npz_keylog, npz_members, npz_writer
from reprod.storage.npz_format import META_NAME

KERNEL = _native.built()
needs_kernel = pytest.mark.skipif(KERNEL is None or not hasattr(KERNEL, "npz_pack"),
                                  reason="the compiled kernel is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


FIXED = (10 << 11 | 30 << 5 | 7, 44 << 9 | 6 << 5 | 15)  # 2024-06-15 10:30:14


@pytest.fixture(autouse=True)
def _kernel_on_and_fixed_clock(monkeypatch):
    """Every test starts with the kernel on where it is built (another test may switch it) and
    every member dated ``FIXED``."""
    monkeypatch.setattr(npz_members, "_FIXED_DOS", FIXED)
    previous = _native.set_enabled(True)
    yield
    _native.set_enabled(previous)


class _Spy:
    """The kernel, counting the members ``npz_pack`` writes, its calls and its writes."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.taken = 0
        self.calls = 0
        self.chunks = 0  # the kernel's calls of the file's write

    def npz_pack(self, *args: Any) -> Any:
        args_ = list(args)
        write = args_[20]  # after it: the optional descrs

        def counted(data: bytes) -> Any:
            self.chunks += 1
            return write(data)

        args_[20] = counted
        out = self.kernel.npz_pack(*args_)
        self.calls += 1
        self.taken += out[2]  # (next, written, count, rows, texts)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kernel, name)


@pytest.fixture
def spy(monkeypatch) -> _Spy:
    s = _Spy(KERNEL)
    real = _native.kernel
    monkeypatch.setattr(_native, "kernel", lambda: s if real() is not None else None)
    return s


def _python_path(fn: Any, *args: Any) -> Any:
    previous = _native.set_enabled(False)
    try:
        return fn(*args)
    finally:
        _native.set_enabled(previous)


def _streamed_alike(tmp_path: Any, stream: Any) -> str:
    """``stream(path)`` run with the kernel and on the Python path: the same bytes; the first
    file's path."""
    fast, slow = str(tmp_path / "s-fast.npz"), str(tmp_path / "s-py.npz")
    stream(fast)
    _python_path(stream, slow)
    with open(fast, "rb") as f, open(slow, "rb") as g:
        assert f.read() == g.read()
    return fast


def _both(tmp_path, tree: Mapping[str, Any], source_dtypes: Any = None, name: str = "t") -> tuple[str, str]:
    """The file the current path writes and the one the Python path writes: the same bytes."""
    fast, slow = str(tmp_path / f"{name}-fast.npz"), str(tmp_path / f"{name}-py.npz")
    npz_writer.write_npz(fast, tree, source_dtypes)
    _python_path(npz_writer.write_npz, slow, tree, source_dtypes)
    with open(fast, "rb") as f, open(slow, "rb") as g:
        a, b = f.read(), g.read()
    assert a == b
    with zipfile.ZipFile(fast) as zf:  # dated as fixed, in both headers of every member
        assert a.count(struct.pack("<HH", *FIXED)) >= 2 * len(zf.infolist())
    return fast, slow


def _eligible(value: Any) -> bool:
    """What npz_pack takes, by its documented rule (an independent statement of it)."""
    if type(value) is not np.ndarray or not value.flags.c_contiguous:
        return False
    if not any(value.dtype is d for d in npz_writer._BATCH_DTYPES):
        return False
    return len(npz_members._npy_header(value)) + value.nbytes < npz_writer._ONE_WRITE


def _assert_reads_back(path: str, tree: Mapping[str, Any]) -> None:
    d = reprod.load(path)
    try:
        assert list(d) == list(tree)
        for k, v in tree.items():
            if isinstance(v, np.ndarray):
                got = np.asarray(d[k])
                assert got.dtype == v.dtype.newbyteorder("=") or got.dtype == v.dtype
                assert got.shape == v.shape
                np.testing.assert_array_equal(got, v)
    finally:
        d.close()


def _dtype_tree() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    tree: dict[str, Any] = {}
    kinds = ["?", "b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "e", "f", "d", "F", "D", "g"]
    shapes: list[tuple[int, ...]] = [(), (0,), (1,), (3,), (2, 3), (1, 1, 5), (4, 0, 2), (2, 1, 2, 1, 2)]
    for i, c in enumerate(kinds):
        for shape in shapes:
            raw = rng.standard_normal(shape) * 50 if shape else np.float64(rng.standard_normal() * 50)
            name = f"t{i}_{np.dtype(c).name}_{'x'.join(map(str, shape)) or 'scalar'}"
            tree[name] = np.asarray(raw).astype(c)
    tree["complex_parts"] = (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64)
    base = rng.standard_normal((6, 8)).astype(np.float32)
    tree.update({
        "big_endian_i4": np.arange(12, dtype=">i4").reshape(3, 4),
        "big_endian_f8": np.linspace(0, 1, 5).astype(">f8"),
        "little_explicit": np.arange(4, dtype="<i8"),
        "fortran": np.asfortranarray(base),
        "fortran_1d": np.asfortranarray(base[0]),  # also C-contiguous: the kernel takes it
        "strided": base[::2, ::3],
        "transposed": base.T,
        "column": base[:, :1],  # one column: not contiguous
        "row_view": base[2],  # a contiguous view into a larger buffer
        "offset_view": base.reshape(-1)[5:21],
        "readonly": np.frombuffer(base.tobytes(), np.float32).reshape(6, 8),
        "negative_stride": base[::-1],
        "metadata_dtype": np.zeros(3, dtype=np.dtype(np.float32, metadata={"unit": "m"})),
        "structured": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        "subarray_dtype": np.zeros(2, dtype=np.dtype(("<f4", (3,)))),
    })
    with warnings.catch_warnings():  # numpy's advice against np.matrix
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        tree["matrix_subclass"] = np.asmatrix(base[:2, :2])
    return tree


@needs_kernel
def test_every_dtype_and_shape_matches_the_python_path(tmp_path, spy) -> None:
    tree = _dtype_tree()
    with pytest.warns(UserWarning, match="metadata"):  # numpy's, for the metadata dtype, both ways
        fast, _ = _both(tmp_path, tree)
    assert spy.taken == sum(map(_eligible, tree.values())) > 100
    assert not _eligible(tree["big_endian_i4"]) and not _eligible(tree["metadata_dtype"])
    assert _eligible(tree["fortran_1d"]) and _eligible(tree["row_view"]) and _eligible(tree["readonly"])
    with np.load(fast) as z:
        assert set(z.files) == set(tree) | {META_NAME}
        for k, v in tree.items():
            got = z[k]
            assert got.dtype == v.dtype and got.shape == v.shape, k
            np.testing.assert_array_equal(got, np.asarray(v), err_msg=k)
    plain = {k: v for k, v in tree.items()
             if type(v) is np.ndarray and v.dtype.kind in "biufc" and v.dtype.names is None
             and v.dtype.subdtype is None and v.dtype.metadata is None and v.dtype.char != "g"}
    _assert_reads_back(_both(tmp_path, plain, name="plain")[0], plain)


def _key_cases() -> list[str]:
    return [
        "a", "Z9_", "_x", "9", "x-.", "a.b-c_d", "A" * 1024, "B" * 1025, "C" * 4096, "D" * 4097,
        "__reprod", "__reprodx", "__repro", "__reprod_0", "-x", ".x", "a/b", "/a", "a/", "a//b",
        "a\n", "\n", "a\n\n", "a\nb", "a\r", "", " ", "a b", "é", "ключ", "日本", "😀",
        'q"uote', "back\\slash", "\x00", "nul\x00mid", "\x1f", "\x7f", "tab\t", "\b\f",
        "x\ud800y",  # a lone surrogate (a file name decoded with surrogateescape)
    ]


@needs_kernel
def test_keys_at_the_clean_name_boundaries(tmp_path, spy) -> None:
    keys = _key_cases()
    tree = {k: np.full(3, i, np.int16) for i, k in enumerate(keys)}
    fast, _ = _both(tmp_path, tree)
    ascii_ok = [k for k in keys if k.isascii() and len(k) <= npz_writer._BATCH_MAX_KEY]
    assert spy.taken == len(ascii_ok)
    with zipfile.ZipFile(fast) as zf:
        names = zf.namelist()
    assert "a.npy" in names and "A" * 1024 + ".npy" in names and "B" * 1025 + ".npy" not in names
    assert "a\n.npy" in names  # re's "$" before a final newline: the Python rule, kept
    assert not any(n.startswith("__reprod.") or n.startswith("__reprodx") for n in names)
    d = reprod.load(fast)
    try:
        assert list(d) == keys
        for i, k in enumerate(keys):
            np.testing.assert_array_equal(d[k], np.full(3, i, np.int16))
    finally:
        d.close()


class _Pairs(Mapping):
    """A mapping whose items() repeat keys (a re-added key mid-mapping), as no dict can."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def __getitem__(self, key: str) -> Any:
        return dict(self.pairs)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(k for k, _ in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def items(self) -> Any:
        return list(self.pairs)


def _mixture() -> tuple[dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(3)
    header = len(npz_members._npy_header(np.zeros(10, np.uint8)))
    tree: dict[str, Any] = {}
    for i in range(40):
        tree[f"run{i}/plain"] = rng.standard_normal(i % 7 + 1).astype(np.float32)
        m = i % 10
        if m == 0:
            tree[f"run{i}/nested"] = {"w": np.arange(3), "deeper": {"b": np.ones(2, np.int8)}, "none": {}}
        elif m == 1:
            tree[f"run{i}/bf"] = rng.standard_normal(4).astype(np.float32)
        elif m == 2:  # at the one-write limit: header + data of 65,535 bytes, then 65,536
            tree[f"run{i}/edge"] = np.zeros(65535 - header - i // 10, np.uint8)
            tree[f"run{i}/over"] = np.zeros(65536 - header, np.uint8)
        elif m == 3:
            tree[f"run{i}/strided"] = np.arange(20.0)[::3]
        elif m == 4:
            tree[f"run{i}/scalar"] = np.float64(i)
            tree[f"run{i}/int"] = i
        elif m == 5:
            tree[f"run{i}/empty_dict"] = {}
        elif m == 6:
            tree[f"run{i}/big"] = rng.standard_normal(20_000)
        elif m == 7:
            tree[f"key {i} ключ"] = np.arange(2)
    dtypes = {k: "bfloat16" for k in tree if k.endswith("/bf")}
    dtypes["run0/plain"] = None  # an entry of None is no source dtype
    return tree, dtypes


@needs_kernel
def test_a_mapping_switches_between_the_kernel_and_python(tmp_path, spy) -> None:
    tree, dtypes = _mixture()
    fast, _ = _both(tmp_path, tree, dtypes)
    taken = sum(_eligible(v) and not dtypes.get(k) for k, v in tree.items()
                if k.isascii())
    assert spy.taken == taken and spy.calls > 20
    d = reprod.load(fast)
    try:
        assert list(d) == list(tree)
        for k, v in tree.items():
            if k.endswith("/bf"):
                assert d.spec(k).source_dtype == "bfloat16"
            elif isinstance(v, np.ndarray) or np.isscalar(v):
                np.testing.assert_array_equal(d[k], np.asarray(v))
        np.testing.assert_array_equal(d["run0/nested"]["deeper"]["b"], np.ones(2, np.int8))
    finally:
        d.close()
    with np.load(fast) as z:
        np.testing.assert_array_equal(z["__reprod_0.npy"[:-4]], tree["run0/plain"])


@needs_kernel
def test_small_batches_and_spilled_directory(tmp_path, spy, monkeypatch) -> None:
    monkeypatch.setattr(npz_writer, "_BATCH_BYTES", 3000)
    monkeypatch.setattr(npz_writer, "_CENTRAL_SPILL", 2000)
    tree, dtypes = _mixture()
    _both(tmp_path, tree, dtypes)
    plain = {f"p{i}": np.full(i % 9, i, np.float32) for i in range(2000)}
    spy.calls = spy.chunks = 0
    _both(tmp_path, plain, name="plain")
    assert spy.calls == 1 and spy.chunks > 2000 * 150 // 3000  # chunks of about 3,000 bytes
    monkeypatch.setattr(npz_writer, "_BATCH_BYTES", 1 << 30)  # 512 members laid out at most
    spy.calls = spy.chunks = 0
    _both(tmp_path, plain, name="plan")
    assert spy.calls == 1 and spy.chunks == 4
    monkeypatch.setattr(npz_writer, "_BATCH_ITEMS", 7)  # slices of the items
    spy.taken = 0
    _both(tmp_path, tree, dtypes, name="sliced")
    assert spy.taken == sum(_eligible(v) and not dtypes.get(k) for k, v in tree.items() if k.isascii())


@needs_kernel
def test_re_added_keys_keep_the_python_semantics(tmp_path, spy) -> None:
    a = np.arange(4, dtype=np.float32)
    pairs = [("x", a), ("y", a + 1), ("x", a + 2), ("z", np.arange(9.0)), ("y", np.arange(3)), ("w", a)]
    _both(tmp_path, _Pairs(pairs))
    # x, y and z: the re-added x and y go key by key, and the space y's first value leaves free
    # makes w go key by key too (it may take a free region; the kernel writes at the end only)
    assert spy.taken == 3

    def stream(path: str) -> None:  # add_mapping, then a streaming logger's re-adds
        w = npz_writer.NpzWriter(path)
        w.add_mapping({"p": a, "q": a * 2, "r": np.arange(5), "s/t": a})
        w.add("q", a * 3)  # same shape: back where it was
        w.add("p", np.arange(40.0))  # larger: a new member, p's space free
        w.add("u", a)  # fits p's old space
        w.add("s/t", {"nested": a})
        w.close()

    d = reprod.load(_streamed_alike(tmp_path, stream))
    try:
        assert list(d) == ["p", "q", "r", "s/t", "u"]
        np.testing.assert_array_equal(d["q"], a * 3)
        np.testing.assert_array_equal(d["p"], np.arange(40.0))
        np.testing.assert_array_equal(d["s/t"]["nested"], a)
    finally:
        d.close()


@needs_kernel
def test_keys_past_the_key_log_spill(tmp_path, spy, monkeypatch) -> None:
    monkeypatch.setattr(npz_keylog._KeyLog, "spill", 30)
    monkeypatch.setattr(npz_writer, "_BATCH_ITEMS", 25)
    tree, dtypes = _mixture()
    tree.update({f"late{i}": np.full(2, i) for i in range(100)})
    _both(tmp_path, tree, dtypes)
    assert spy.taken == sum(_eligible(v) and not dtypes.get(k) for k, v in tree.items() if k.isascii())
    # a mapping that is not a dict may repeat keys: past the spill it goes key by key
    spy.taken = 0
    pairs = _Pairs(list(tree.items())[:60] + [("late3", np.zeros(1))] + list(tree.items())[60:])
    _both(tmp_path, pairs, dtypes, name="pairs")
    assert 0 < spy.taken < 60

    def stream(path: str) -> None:  # a key re-added after add_mapping wrote it past the spill
        w = npz_writer.NpzWriter(path)
        w.add_mapping(tree, dtypes)
        w.add("late50", np.full(2, -1))
        w.add("late60", np.arange(30.0))
        w.close()

    d = reprod.load(_streamed_alike(tmp_path, stream))
    try:
        np.testing.assert_array_equal(d["late50"], np.full(2, -1))
        np.testing.assert_array_equal(d["late60"], np.arange(30.0))
        np.testing.assert_array_equal(d["late99"], np.full(2, 99))
        assert list(d) == list(tree)
    finally:
        d.close()


@needs_kernel
def test_offsets_past_the_zip64_limit(tmp_path, spy, monkeypatch) -> None:
    monkeypatch.setattr(npz_writer, "_ZIP64_LIMIT", 6000)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 6000)
    tree = {f"k{i}": np.full(i % 5 + 1, i, np.float64) for i in range(200)}
    fast, _ = _both(tmp_path, tree)
    assert 0 < spy.taken < 200  # the members after the limit go the Python path (zip64 fields)
    _assert_reads_back(fast, tree)


def test_join_texts_matches_python() -> None:
    rng = np.random.default_rng(11)
    alphabet = ["a", "\0", "é", "\xff", "ключ", "😀", '"', ", ", "\x7f", "\x80"]
    blocks = [[], [""], ["\0"], ["abc"], ["\0abc", "x\0\0y", ""]]
    for _ in range(200):
        blocks.append(["".join(rng.choice(alphabet, rng.integers(0, 6))) for _ in range(rng.integers(1, 6))])
    blocks.append(["ok\0", "x\ud800\0y"])
    blocks.append(["ok\0", "fine\0\ud800"])  # a surrogate after the NUL is cut off
    joins = [npz_members._join_texts]
    if KERNEL is not None and hasattr(KERNEL, "join_texts"):
        joins.append(KERNEL.join_texts)
    for block in blocks:
        want = ", ".join(t for t in (t.partition("\0")[0] for t in block) if t)
        try:
            expected: Any = want.encode("utf-8")
        except UnicodeEncodeError:
            expected = None
        for join in joins:
            assert join(block) == expected, (join, block)


def _metadata(path: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(META_NAME)


@pytest.mark.parametrize("surrogate", [False, True])
def test_metadata_is_json_dumps_of_itself(tmp_path, monkeypatch, surrogate) -> None:
    """The metadata, assembled from the keys' texts in blocks, kept or made twice, is what
    json.dumps writes of the document it holds (ASCII escapes where a key has a lone surrogate)."""
    monkeypatch.setattr(npz_members, "_KEEP_META", 2000)  # larger than this: made twice
    for n in (3, 5000):
        tree: dict[str, Any] = {f"k{i}": np.zeros(1) for i in range(n)}
        tree["ключ"] = {"日本": np.ones(1), "empty": {}}
        tree['q"\\'] = np.ones(2)
        if surrogate:
            tree["s\udcff"] = np.ones(1)
        path = str(tmp_path / f"m{n}.npz")
        for kernel_on in (True, False):
            _native.set_enabled(kernel_on)
            npz_writer.write_npz(path, tree)
            raw = _metadata(path)
            doc = json.loads(raw)
            assert raw == json.dumps(doc, ensure_ascii=surrogate).encode("utf-8")
            assert [e["path"][0] for e in doc["keys"]][: n + 1] == list(tree)[: n + 1]


@needs_kernel
def test_members_carry_the_time_of_writing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npz_members, "_FIXED_DOS", None)
    tree = {f"k{i}": np.zeros(3) for i in range(50)}
    before = time.time()
    path = npz_writer.write_npz(str(tmp_path / "t.npz"), tree)
    after = time.time()
    raw = open(path, "rb").read()
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        pos = zf.start_dir

    def dos(t: float) -> tuple[int, int]:
        y, mo, d, h, mi, s = time.localtime(int(t))[:6]
        return h << 11 | mi << 5 | s // 2, (y - 1980) << 9 | mo << 5 | d

    # the kernel reads time(NULL), which on Linux is the coarse clock: up to a tick behind
    # time.time(), so across a second's boundary it may still give the second before
    allowed = {dos(t) for t in np.arange(int(before) - 1, int(after) + 1)}
    for info in infos:
        local = struct.unpack_from("<HH", raw, info.header_offset + 10)
        central = struct.unpack_from("<HH", raw, pos + 12)
        assert local == central and local in allowed
        n, e, c = struct.unpack_from("<HHH", raw, pos + 28)
        pos += 46 + n + e + c


@pytest.mark.parametrize("budget", [0, 100, 5000, 10**9])
@pytest.mark.parametrize("kernel_on", [True, False])
def test_a_write_error_leaves_the_earlier_file(tmp_path, monkeypatch, budget, kernel_on) -> None:
    _native.set_enabled(kernel_on)
    path = tmp_path / "d.npz"
    path.write_bytes(b"the earlier dump")
    fail_atomic_writes(monkeypatch, (npz_writer,), budget)
    tree = {f"k{i}": np.full(40, i, np.float32) for i in range(300)}
    if budget > 10**8:  # the directory's write fails, at close
        tree["x"] = np.zeros(1)
        monkeypatch.setattr(npz_writer.NpzWriter, "_write_directory",
                            lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as info:
        reprod.save(path, tree)
    assert_the_earlier_file_is_kept(info.value, path, b"the earlier dump")


@needs_kernel
def test_an_error_inside_the_kernel_call_aborts(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npz_writer, "_BATCH_HEADERS", {})
    monkeypatch.setattr(npz_writer, "_BATCH_DESCRS", None)  # every header from the callback

    def broken(arr: np.ndarray) -> tuple[bytes, int]:
        if arr.shape == (7,):
            raise RuntimeError("no header")
        return npz_writer._header_and_crc.__wrapped__(arr)  # type: ignore[attr-defined]

    broken.__wrapped__ = npz_writer._header_and_crc  # type: ignore[attr-defined]
    monkeypatch.setattr(npz_writer, "_header_and_crc", broken)
    path = tmp_path / "d.npz"
    w = npz_writer.NpzWriter(str(path))
    with pytest.raises(RuntimeError, match="no header"):
        w.add_mapping({"a": np.zeros(3), "b": np.zeros(7)})
    with pytest.raises(ReprodError, match="abandoned"):
        w.add("c", np.zeros(1))
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError):  # a header maker that returns something else
        monkeypatch.setattr(npz_writer, "_header_and_crc", lambda arr: "not a pair")
        npz_writer.write_npz(str(path), {"a": np.zeros(5)})
    assert os.listdir(tmp_path) == []


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS on truncated mmaps: Linux")
def test_a_truncated_mapped_source_raises_and_writes_nothing(tmp_path) -> None:
    """Arrays viewing a mapped file that is truncated meanwhile: the kernel's copy is guarded
    (MappedReadError, an OSError), and nothing is left at the path."""
    src = textwrap.dedent("""
        import mmap, os, sys
        import numpy as np
        from reprod.storage import npz_writer
        folder = sys.argv[1]
        data = os.path.join(folder, "data.bin")
        with open(data, "wb") as f:
            f.write(np.arange(1 << 16, dtype=np.float32).tobytes())
        with open(data, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        flat = np.frombuffer(mm, np.float32)
        tree = {f"k{i}": flat[i * 16 : i * 16 + 16] for i in range(3000)}
        os.truncate(data, 0)
        out = os.path.join(folder, "out.npz")
        try:
            npz_writer.write_npz(out, tree)
        except OSError as exc:
            print(type(exc).__name__, os.path.exists(out), sorted(os.listdir(folder)))
            sys.exit(3)
        print("no error")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", src, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.split()[:2] == ["MappedReadError", "False"]
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]


def test_the_kernel_less_process_writes_the_same_bytes(tmp_path, monkeypatch) -> None:
    """REPROD_KERNEL=0 in a fresh process: the Python path alone, the same file (the writer's
    versions fixed too, as this process may have imported torch or paddle)."""
    monkeypatch.setattr(npz_members, "_writer_info", lambda: {"writer": "fixed"})
    src = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from reprod import _native
        assert _native.kernel() is None
        from test_npz_batch_save import _mixture
        from reprod.storage import npz_members, npz_writer
        npz_members._writer_info = lambda: {"writer": "fixed"}
        npz_members._FIXED_DOS = tuple(map(int, sys.argv[3:5]))
        tree, dtypes = _mixture()
        npz_writer.write_npz(sys.argv[1], tree, dtypes)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "REPROD_KERNEL": "0"}
    slow = str(tmp_path / "nokernel.npz")
    r = subprocess.run([sys.executable, "-c", src, slow, os.path.dirname(os.path.abspath(__file__)),
                        *map(str, FIXED)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    tree, dtypes = _mixture()
    fast = npz_writer.write_npz(str(tmp_path / "here.npz"), tree, dtypes)
    with open(fast, "rb") as f, open(slow, "rb") as g:
        assert f.read() == g.read()


def test_logger_save_writes_what_storage_save_writes(tmp_path) -> None:
    """ReprodLogger.save of a .npz calls the writer directly (no second check of its values):
    the same file as reprod.save of the same values."""
    rng = np.random.default_rng(5)
    log = ReprodLogger()
    for i in range(300):
        log.add(f"step{i // 50}/layer{i % 50}.out", rng.standard_normal(16).astype(np.float32))
    log.add("nested", {"a": np.arange(3), "b": {"c": 1.5}})
    log.add(7, np.int64(3))
    log._put("bf", np.ones(4, np.float32), "bfloat16")
    a = log.save(tmp_path / "logger.npz")
    b = reprod.save(tmp_path / "storage.npz", log.data, source_dtypes=log.source_dtypes)
    with open(a, "rb") as f, open(b, "rb") as g:
        assert f.read() == g.read()
    d = reprod.load(a)
    try:
        assert list(d) == list(log.data)
        assert d.spec("bf").source_dtype == "bfloat16"
        np.testing.assert_array_equal(d["nested"]["b"]["c"], 1.5)
    finally:
        d.close()


def test_the_first_npz_save_imports_no_reader_and_no_json(tmp_path) -> None:
    """A process's first ``.npz`` save imports the writer's modules only: not the reader
    (``storage.lazy``: mmap views, dataclasses) nor ``json`` (~2 ms each in a fresh process)."""
    src = textwrap.dedent("""
        import sys
        import numpy as np
        from reprod import ReprodLogger
        for name in ("json", "json.decoder", "json.encoder", "json.scanner"):  # were it imported
            sys.modules.pop(name, None)
        before = set(sys.modules)
        log = ReprodLogger()
        for i in range(50):
            log.add(f"k{i}", np.full(3, i, np.float32))
        log.add("nested", {"a": 1.5})
        log.save(sys.argv[1])
        new = sorted(set(sys.modules) - before)
        print(" ".join(new))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", src, str(tmp_path / "a.npz")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    new = r.stdout.split()
    assert "reprod.storage.npz_writer" in new
    assert not {"json", "reprod.storage.lazy", "dataclasses"} & set(new), new
    assert reprod.load(tmp_path / "a.npz")["nested"]["a"] == 1.5
