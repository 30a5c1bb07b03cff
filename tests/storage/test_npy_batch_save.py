"""The kernel's path of the ``.npy`` dict writer (``_kernel.npy_pack`` for runs of a mapping's
common-case keys, ``_kernel.npy_check`` for the tree's check): byte for byte the file the Python
path (``_Writer.item`` key by key, ``_check``) writes, for every numeric dtype, the shapes and
sizes at the opcodes' and the frame's boundaries, every kind of key, mappings that switch between
the two paths, SETITEMS batches; the same as ``np.save`` where the pickle is one frame, its
opcodes otherwise; read back equal by numpy, reprod and reprod_log; nothing left after a write
error; the same bytes in a process without the kernel.

The reference runs switch the kernel off with ``monkeypatch`` (``_native.kernel`` returning
None); a spy around the kernel records which keys ``npy_pack`` took, checked against the rule
it documents, stated here on its own (``_takes``).
"""

from __future__ import annotations

import errno
import io
import os
import pickletools
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from faulty_files import assert_the_earlier_file_is_kept, fail_atomic_writes

import reprod
from reprod import ReprodLogger, _native
from reprod.storage import _npy_writer

KERNEL = _native.built()
needs_kernel = pytest.mark.skipif(KERNEL is None or not hasattr(KERNEL, "npy_pack"),
                                  reason="the compiled kernel is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAME = 64 * 1024
KERNEL_KEYS = _npy_writer._KERNEL_KEYS  # the default, before the fixture below sets it to 0

NUMERIC = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
           np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128]


class _Spy:
    """The kernel, recording the keys ``npy_pack`` took (the pairs it drew and did not hand back)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.taken: list[Any] = []
        self.calls = 0
        self.checks = 0

    def npy_pack(self, items: Iterator[Any], *args: Any) -> Any:
        drawn: list[Any] = []

        def recorded() -> Iterator[Any]:
            for pair in items:
                drawn.append(pair[0])
                yield pair

        out = self.kernel.npy_pack(recorded(), *args)
        self.calls += 1
        taken = drawn[: out[0]]
        assert len(drawn) - len(taken) == (out[3] is not None)  # at most the one handed back
        self.taken += taken
        return out

    def npy_check(self, *args: Any) -> Any:
        self.checks += 1
        return self.kernel.npy_check(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kernel, name)


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    """The kernel on where it is built (another test may switch it) and loaded for any tree."""
    monkeypatch.setattr(_npy_writer, "_KERNEL_KEYS", 0)
    previous = _native.set_enabled(True)
    yield
    _native.set_enabled(previous)


@pytest.fixture
def spy(monkeypatch) -> _Spy:
    _npy_writer._pack(_npy_writer._get_prefix(), KERNEL)  # the self-test's keys are not counted
    s = _Spy(KERNEL)
    real = _native.kernel
    monkeypatch.setattr(_native, "kernel", lambda: s if real() is not None else None)
    return s


def _python(tree: dict[str, Any]) -> bytes:
    """The Python path's bytes: the kernel switched off for the call."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_native, "kernel", lambda: None)
        buf = io.BytesIO()
        assert _npy_writer.write_npy_dict(buf, tree) is True
        return buf.getvalue()


def _kernel(tree: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    assert _npy_writer.write_npy_dict(buf, tree) is True
    return buf.getvalue()


def _numpy(tree: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tree, allow_pickle=True)
    return buf.getvalue()


def _ops(npy: bytes) -> list[tuple[str, Any]]:
    """The pickle's opcodes and arguments, FRAME opcodes left out (their placement may differ)."""
    start = npy.index(b"\n") + 1
    return [(op.name, arg) for op, arg, _ in pickletools.genops(npy[start:]) if op.name != "FRAME"]


def _frames(npy: bytes) -> list[int]:
    """The lengths of the pickle's frames, checking that every FRAME after the first comes right
    before a key (a string or a memo get of one) or right after a payload of 64 KiB or more
    (written unframed)."""
    ops = list(pickletools.genops(npy[npy.index(b"\n") + 1 :]))
    lengths = [arg for op, arg, _ in ops if op.name == "FRAME"]
    for i, (op, _, _) in enumerate(ops):
        if op.name == "FRAME" and i > 1:
            before, after = ops[i - 1], ops[i + 1][0].name
            if before[0].name in ("BINBYTES", "BINBYTES8") and len(before[1]) >= FRAME:
                assert after == "MEMOIZE"
            else:
                assert after in ("SHORT_BINUNICODE", "BINUNICODE", "BINGET", "LONG_BINGET")
    return lengths


def _takes(tree: dict[str, Any]) -> list[str]:
    """The keys npy_pack may take, by its documented rule (an independent statement of it): a str
    key and an exact ndarray, C-contiguous, of 2 bytes to 64 KiB - 1, whose dtype object was
    written before (by an earlier array, depth first) and which was not."""
    seen_dtypes: set[int] = set()
    seen_arrays: set[int] = set()
    out: list[str] = []

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
                continue
            if (id(v.dtype) in seen_dtypes and v.flags.c_contiguous and 1 < v.nbytes < FRAME
                    and id(v) not in seen_arrays):
                out.append(k)
            seen_dtypes.add(id(v.dtype))
            seen_arrays.add(id(v))

    walk(tree)
    return out


def _leaves(tree: dict[str, Any]) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for v in tree.values():
        out += _leaves(v) if isinstance(v, dict) else [v]
    return out


def _both(tree: dict[str, Any], spy: _Spy) -> bytes:
    """The kernel's file and the Python path's: the same bytes; every key the kernel took is one
    the rule lets it take. The tree is written once more with every array referred to again at
    its end: a memo index or counter gone wrong anywhere shows in those BINGETs."""
    before = len(spy.taken)
    fast = _kernel(tree)
    slow = _python(tree)
    assert fast == slow
    taken = spy.taken[before:]
    allowed = _takes(tree)
    assert set(map(id, taken)) <= set(map(id, allowed))
    again = {"tree": tree, "refs": {f"r{i}": v for i, v in enumerate(_leaves(tree))}}
    assert _kernel(again) == _python(again)
    spy.taken[before:] = taken
    return fast


def _reads_back(raw: bytes, tree: dict[str, Any], tmp_path: Any) -> None:
    """np.load and reprod.load read the file back equal to the tree."""
    back = np.load(io.BytesIO(raw), allow_pickle=True).item()
    _same(back, tree)
    path = tmp_path / "back.npy"
    path.write_bytes(raw)
    d = reprod.load(path)
    try:
        _same(d, tree)
    finally:
        d.close()


def _same(a: Any, b: Any) -> None:
    if isinstance(b, dict):
        assert list(a.keys()) == list(b.keys())
        for k in b:
            _same(a[k], b[k])
        return
    a = np.asarray(a)
    assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
    assert a.shape == b.shape
    assert a.tobytes() == b.astype(a.dtype).tobytes()


def _values(dt: np.dtype, n: int, rng: np.random.Generator) -> np.ndarray:
    raw = rng.standard_normal(n) * 100
    if dt.kind == "b":
        return raw > 0
    if dt.kind == "c":
        return (raw + 1j * raw[::-1]).astype(dt)
    return raw.astype(dt)


def _sized(dt: np.dtype, nbytes: int, rng: np.random.Generator) -> np.ndarray:
    """A 1-d array of about nbytes bytes (exactly where the itemsize divides it)."""
    return _values(dt, max(1, nbytes // dt.itemsize), rng)


def _dtype_tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tree: dict[str, Any] = {}
    for t in NUMERIC:
        dt = np.dtype(t)
        s = dt.str
        tree[s] = _values(dt, 12, rng)  # the dtype's first array: the Python path
        tree[s + "/0d"] = _values(dt, 1, rng).reshape(())
        tree[s + "/1d"] = _values(dt, 7, rng)
        tree[s + "/2d"] = _values(dt, 12, rng).reshape(3, 4)
        tree[s + "/3d"] = _values(dt, 24, rng).reshape(2, 3, 4)
        tree[s + "/5d"] = _values(dt, 24, rng).reshape(2, 1, 3, 4, 1)  # MARK ... TUPLE
        tree[s + "/wide"] = _values(dt, 300, rng).reshape(1, 300)  # a dimension >= 256
        for nbytes in (1, 2, 255, 256, FRAME - dt.itemsize, FRAME):
            tree[f"{s}/{nbytes}B"] = _sized(dt, nbytes, rng)
        tree[s + "/big-endian"] = _values(dt, 5, rng).astype(dt.newbyteorder(">"))
        tree[s + "/big-endian-again"] = tree[s + "/big-endian"].copy()  # the same dtype object
        tree[s + "/fortran"] = np.asfortranarray(_values(dt, 12, rng).reshape(3, 4))
        tree[s + "/strided"] = _values(dt, 24, rng)[::2]
        tree[s + "/empty"] = _values(dt, 0, rng).reshape(0, 3)
        tree[s + "/view"] = tree[s + "/2d"][1]  # a contiguous view into another array
        tree[s + "/again"] = tree[s + "/1d"]  # the same array object: BINGET, Python path
    u8 = np.dtype(np.uint8)
    tree["u8-65535-4d"] = np.ones((3, 5, 17, 257), u8)  # 64 KiB - 1 in four dimensions
    tree["u8-dims-65535"] = np.ones((1, 65535), u8)  # a dimension at BININT2's largest
    tree["u8-255-255"] = np.ones(255, u8)
    tree["u8-256-256"] = np.ones(256, u8)
    return tree


@needs_kernel
def test_every_dtype_shape_and_size_matches_the_python_path(tmp_path, spy) -> None:
    tree = _dtype_tree()
    raw = _both(tree, spy)
    assert len(spy.taken) > 0.9 * len(_takes(tree))  # the rest: item() after back-offs
    taken = set(spy.taken)
    for s in (np.dtype(t).str for t in NUMERIC):
        assert {s + "/5d", f"{s}/{FRAME - np.dtype(s).itemsize}B"} <= taken
        assert (s + "/0d" in taken) == (np.dtype(s).itemsize > 1)
        assert not {s, f"{s}/{FRAME}B", s + "/fortran", s + "/strided", s + "/again"} & taken
    assert _ops(raw) == _ops(_numpy(tree))
    _frames(raw)
    _reads_back(raw, tree, tmp_path)


@needs_kernel
@pytest.mark.parametrize("t", NUMERIC, ids=lambda t: np.dtype(t).name)
def test_each_dtype_alone_equals_np_save(t, spy) -> None:
    """Small trees (one frame): the kernel's bytes are np.save's, and it took every key after
    the dtype's first."""
    rng = np.random.default_rng(1)
    dt = np.dtype(t)
    tree = {"first": _values(dt, 3, rng), "1d": _values(dt, 9, rng),
            "0d": _values(dt, 1, rng).reshape(()), "4d": _values(dt, 16, rng).reshape(2, 2, 2, 2),
            "2B": _sized(dt, 2, rng), "256B": _sized(dt, 256, rng), "k" * 300: _values(dt, 2, rng)}
    raw = _kernel(tree)
    assert raw == _numpy(tree) == _python(tree)
    assert spy.taken == [k for k in _takes(tree)]
    assert "4d" in spy.taken and ("0d" in spy.taken) == (dt.itemsize > 1)


def _key_tree() -> dict[str, Any]:
    rng = np.random.default_rng(2)
    shared = "shared-key"
    late = "late"
    tree: dict[str, Any] = {"seed": rng.standard_normal(4)}
    for key in ["", "a", "|", "<", "b" * 255, "c" * 256, "x" * 300, "é" * 200, "日" * 86,
                "ü日本\U0001F600", "lone\ud800surrogate", "a.b/c d\n", shared]:
        tree[key] = rng.standard_normal(3)
    tree["nested"] = {shared: rng.standard_normal(2), "inner": {shared: rng.standard_normal(5)}}
    # past 256 memo entries a repeated key is LONG_BINGET
    tree["many"] = {f"m{i}": rng.standard_normal(2) for i in range(300)}
    tree[late] = rng.standard_normal(2)
    tree["last"] = {late: rng.standard_normal(2), shared: rng.standard_normal(3)}
    return tree


@needs_kernel
def test_keys_of_every_form(tmp_path, spy) -> None:
    tree = _key_tree()
    raw = _both(tree, spy)
    assert raw == _numpy(tree)  # one frame
    assert {"", "|", "x" * 300, "é" * 200, "日" * 86, "lone\ud800surrogate", "late"} <= set(spy.taken)
    names = [arg for name, arg in _ops(raw) if name in ("SHORT_BINUNICODE", "BINUNICODE")]
    assert names.count("shared-key") == 1 and names.count("late") == 1  # memoised, then got
    assert any(name == "LONG_BINGET" for name, _ in _ops(raw))
    _reads_back(raw, tree, tmp_path)


@needs_kernel
def test_a_mapping_switches_between_the_kernel_and_python(tmp_path, spy) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal(8).astype(np.float32)
    tree: dict[str, Any] = {}
    for i in range(400):
        r = i % 8
        if r == 0:
            tree[f"k{i}"] = {"w": rng.standard_normal(4).astype(np.float32), "b": {"c": np.zeros(2, np.float32)}}
        elif r == 1:
            tree[f"k{i}"] = np.asfortranarray(rng.standard_normal((3, 4)))
        elif r == 2:
            tree[f"k{i}"] = np.array([i % 2 == 0])  # one byte: CPython's shared bytes objects
        elif r == 3:
            tree[f"k{i}"] = a  # the same object each time
        elif r == 4:
            tree[f"k{i}"] = np.zeros(i, np.dtype("<i4").newbyteorder(">"))  # a new dtype object each time
        else:
            tree[f"k{i}"] = rng.standard_normal(r * 5).astype(np.float32)
        tree[f"k{i}.big"] = np.ones(FRAME // 8, np.float64) if i % 50 == 0 else np.ones(3, np.float16)
    raw = _both(tree, spy)
    assert len(spy.taken) > 200 and spy.calls > 50
    assert _ops(raw) == _ops(_numpy(tree))
    assert len(_frames(raw)) > 5  # closed before each payload of 64 KiB
    _reads_back(raw, tree, tmp_path)


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 999, 1000, 1001, 2000, 2001])
def test_setitems_batches_as_the_pickler(n, spy) -> None:
    tree = {f"k{i}": np.full(3, i, np.int32) for i in range(n)}
    nested = {"outer": {f"k{i}": np.full(2, i, np.int16) for i in range(n)}, "x": np.ones(2)}
    for t in (tree, nested):
        raw = _both(t, spy)
        ref = _numpy(t)
        if len(ref) < FRAME:
            assert raw == ref
        else:
            assert _ops(raw) == _ops(ref)
            _frames(raw)
        # MARK ... SETITEMS every 1000 pairs, an empty one after a multiple of 1000
        marks = sum(1 for name, _ in _ops(raw) if name == "SETITEMS")
        assert marks == sum(len(d) // 1000 + 1 for d in _dicts(t) if len(d) > 1)
    assert len(spy.taken) == 2 * (n - 1)  # all but the dtypes' first keys


def _dicts(tree: dict[str, Any]) -> list[dict[str, Any]]:
    out = [tree]
    for v in tree.values():
        if isinstance(v, dict):
            out += _dicts(v)
    return out


@needs_kernel
def test_frames_cross_64_kib_where_the_python_path_closes_them(spy) -> None:
    rng = np.random.default_rng(4)
    tree = {f"step{i:03d}.layer{j:02d}": rng.standard_normal(int(rng.integers(256, 2561))).astype(np.float32)
            for i in range(20) for j in range(25)}
    tree["sizes"] = {f"s{n}": np.ones(n, np.uint8) for n in range(2, 3000, 7)}
    raw = _both(tree, spy)
    lengths = _frames(raw)
    assert len(lengths) > 40
    assert all(n >= FRAME for n in lengths[:-1])  # closed before the key once 64 KiB were written
    assert _ops(raw) == _ops(_numpy(tree))
    assert len(spy.taken) == len(_takes(tree))  # no back-off: every call took something


@needs_kernel
def test_the_same_array_twice_and_a_repeated_key_object(spy) -> None:
    a = np.arange(6, dtype=np.float32)
    key = "again"
    tree = {"seed": np.zeros(2, np.float32), "a": a, "b": a, key: a[1:4],
            "n": {key: np.ones(5, np.float32), "c": a}}
    raw = _both(tree, spy)
    assert raw == _numpy(tree)
    assert spy.taken == ["a", key, key]
    back = np.load(io.BytesIO(raw), allow_pickle=True).item()
    assert back["a"] is back["b"] is back["n"]["c"]


@needs_kernel
def test_self_test_runs_the_kernel(monkeypatch, spy) -> None:
    pre = _npy_writer._get_prefix()
    assert _npy_writer._self_test(pre, spy.npy_pack)
    assert len(spy.taken) >= 5
    assert "j\u00e9" * 90 in spy.taken and "key" in spy.taken  # BINUNICODE, then a BINGET key
    # a kernel that writes the sample otherwise is not used: the Python path writes everything
    monkeypatch.setattr(_npy_writer, "_pack_checked", None)

    def wrong(*args: Any) -> Any:
        taken, n, out, pending = KERNEL.npy_pack(*args)
        return taken, n + 1, out, pending

    assert _npy_writer._pack(pre, type("K", (), {"npy_pack": staticmethod(wrong)})()) is None
    assert _npy_writer._pack_checked is False
    monkeypatch.setattr(_npy_writer, "_pack_checked", None)
    assert _npy_writer._pack(pre, KERNEL) is KERNEL.npy_pack


def _check_trees() -> list[tuple[str, Any]]:
    a = np.ones(3, np.float32)
    deep: dict[str, Any] = {"x": a}
    for _ in range(200):
        deep = {"d": deep}
    deeper = {"d": deep}

    class Sub(np.ndarray):
        pass

    return [
        ("flat", {"a": a, "b": np.ones(2), "c": a.astype(">f8")}),
        ("nested", {"a": {"b": {"c": a}}, "e": {}, "f": np.zeros(0, np.int8)}),
        ("int key", {"a": a, 3: a}),
        ("nested int key", {"a": {3: a}}),
        ("str subclass key", {type("S", (str,), {})("k"): a}),
        ("object", {"a": a, "o": np.array([None])}),
        ("structured", {"s": np.zeros(2, [("a", "<i4")])}),
        ("datetime", {"t": np.zeros(2, "M8[s]")}),
        ("subclass", {"m": a.view(Sub)}),
        ("scalar", {"f": np.float32(1)}),
        ("list", {"l": [a]}),
        ("200 deep", deep),
        ("201 deep", deeper),
        ("dict subclass", {"d": type("D", (dict,), {})(x=a)}),
        ("longdouble", {"g": np.ones(2, np.longdouble)}),
    ]


@needs_kernel
@pytest.mark.parametrize("name,tree", _check_trees(), ids=[n for n, _ in _check_trees()])
def test_npy_check_is_check(name, tree) -> None:
    want: dict[int, Any] = {}
    got: dict[int, Any] = {}
    ok = _npy_writer._check(tree, want)
    assert KERNEL.npy_check(tree, np.ndarray, got) is ok
    assert ok == (name in ("flat", "nested", "200 deep", "longdouble"))
    if ok:
        assert list(got.items()) == list(want.items())


@needs_kernel
def test_npy_pack_hands_back_what_it_does_not_take() -> None:
    """Called directly: each pair outside the rule comes back untouched, nothing written for it."""
    f32 = np.ones(4, np.float32)

    class Sub(np.ndarray):
        pass

    pre = _npy_writer._get_prefix()
    cases = [("int key", (3, f32)), ("str subclass", (type("S", (str,), {})("k"), f32)),
             ("subclass", ("k", f32.view(Sub))), ("dict", ("k", {"a": f32})),
             ("new dtype", ("k", np.ones(4, np.float64))), ("one byte", ("k", np.ones(1, np.int8))),
             ("frame", ("k", np.ones(FRAME // 4, np.float32))),
             ("fortran", ("k", np.asfortranarray(np.ones((2, 3), np.float32)))),
             ("strided", ("k", np.ones(8, np.float32)[::2])), ("memoised", ("k", f32)),
             ("not a pair", ("k",))]
    for name, pair in cases:
        memo = {id(np.dtype(np.float32)): 40, id(np.dtype(np.int8)): 39}
        if name == "memoised":
            memo[id(f32)] = 41
        before = dict(memo)
        out = bytearray(b"xy")
        taken, n, got, pending = KERNEL.npy_pack(iter([pair, ("z", f32)]), 2, out, memo, 50,
                                                 np.ndarray, pre.head, None, FRAME)
        assert (taken, n, bytes(got), memo) == (0, 50, b"xy", before), name
        assert pending is pair, name
    with pytest.raises(ValueError):
        KERNEL.npy_pack(iter([]), 1, bytearray(), {}, 0, np.ndarray, b"", None, 2)
    with pytest.raises(TypeError):
        KERNEL.npy_pack([("k", f32)], 1, bytearray(), {}, 0, np.ndarray, b"", None, FRAME)


@needs_kernel
def test_npy_pack_writes_what_item_writes() -> None:
    """One pair at a time against _Writer.item on the same state: the opcodes, the memo and the
    counter after each, for every dtype, shape and size form and every key form (the memo
    indices crossing BINGET's 255 along the way)."""
    pre = _npy_writer._get_prefix()
    rng = np.random.default_rng(5)
    keys = ["k", "é" * 130, "x" * 256, "", "|", "lone\ud800", "日本" * 50, "y" * 255]
    shapes: list[tuple[int, ...]] = [(), (1,), (7,), (3, 1), (2, 3, 4), (2, 1, 3, 1, 2), (1, 300), (1, 2, 1, 1)]
    dtypes = [np.dtype(t) for t in NUMERIC]
    pairs: list[tuple[str, np.ndarray]] = []
    for i in range(200):
        dt = dtypes[i % len(dtypes)]
        shape = shapes[i % len(shapes)]
        pairs.append((keys[i % len(keys)] if i % 5 else f"new{i}", _values(dt, int(np.prod(shape)), rng).reshape(shape)))
    for nbytes in (2, 255, 256, FRAME - 1):
        pairs.append((f"size{nbytes}", np.ones(nbytes, np.uint8)))
    pairs.append(("size-2d", np.ones((255, 257), np.uint8)))
    w = _npy_writer._Writer(io.BytesIO(), pre)
    for j, dt in enumerate(dtypes):
        # BINGET and LONG_BINGET of the dtypes, at the boundary too
        w.memo[id(dt)] = {5: 255, 6: 256}.get(j, 3 * j if j < 5 else 300 + j)
    w.n = 180
    out = bytearray()
    memo, n = dict(w.memo), w.n
    for k, v in pairs:
        if v.nbytes <= 1:
            continue
        w.out = bytearray()  # item() commits past 64 KiB; compared item by item here
        out = bytearray()
        w.item(k, v)
        taken, n, out, pending = KERNEL.npy_pack(iter([(k, v)]), 1, out, memo, n, np.ndarray,
                                                 pre.head, None, FRAME)
        assert (taken, pending) == (1, None), k
        assert bytes(out) == bytes(w.out) and n == w.n and memo == w.memo, (k, v.dtype, v.shape)
    assert n > 1000


@pytest.mark.parametrize("budget", [0, 100, 70_000, 300_000, 10**9])
@pytest.mark.parametrize("kernel_on", [True, False])
@pytest.mark.parametrize("via", ["save", "logger"])
def test_a_write_error_leaves_the_earlier_file(tmp_path, monkeypatch, budget, kernel_on, via) -> None:
    _native.set_enabled(kernel_on)
    path = tmp_path / "d.npy"
    path.write_bytes(b"the earlier dump")
    from reprod.storage import atomic

    fail_atomic_writes(monkeypatch, (atomic,), budget)
    rng = np.random.default_rng(6)
    tree = {f"k{i}": rng.standard_normal(int(rng.integers(64, 2048))).astype(np.float32) for i in range(300)}
    if budget > 10**8:  # the last frame's write fails
        monkeypatch.setattr(_npy_writer._Writer, "commit",
                            lambda self: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError) as info:
        if via == "save":
            reprod.save(path, tree)
        else:
            log = ReprodLogger()
            for k, v in tree.items():
                log.add(k, v)
            log.save(path)
    assert_the_earlier_file_is_kept(info.value, path, b"the earlier dump")


@needs_kernel
def test_reprod_save_and_the_logger_write_the_python_paths_file(tmp_path, monkeypatch, spy) -> None:
    rng = np.random.default_rng(7)
    log = ReprodLogger()
    tree = {}
    for i in range(700):
        tree[f"step{i // 50}/layer{i % 50}.out"] = rng.standard_normal(16).astype(np.float32)
        log.add(f"step{i // 50}/layer{i % 50}.out", tree[f"step{i // 50}/layer{i % 50}.out"])
    log.add("nested", {"a": np.arange(3), "b": {"c": 1.5}})
    tree["nested"] = log.data["nested"]
    fast = log.save(tmp_path / "logger.npy")
    saved = reprod.save(tmp_path / "save.npy", tree)
    assert len(spy.taken) >= 2 * 698
    monkeypatch.setattr(_native, "kernel", lambda: None)
    with open(log.save(tmp_path / "python.npy"), "rb") as f:
        raw = f.read()
    with open(fast, "rb") as f, open(saved, "rb") as g:
        assert f.read() == raw == g.read()
    _reads_back(raw, log.data, tmp_path)


def test_reprod_log_reads_it(tmp_path) -> None:
    pytest.importorskip("paddle")  # reprod_log imports paddle at import time
    reprod_log = pytest.importorskip("reprod_log")
    rng = np.random.default_rng(8)
    tree = {f"k{i}": rng.standard_normal((4, int(rng.integers(1, 600)))).astype(np.float32) for i in range(600)}
    path = reprod.save(tmp_path / "d.npy", tree)
    back = reprod_log.ReprodDiffHelper().load_info(path)
    _same(back, tree)


def test_small_logger_saves_do_not_load_the_kernel(tmp_path, monkeypatch) -> None:
    """Below _KERNEL_KEYS top-level keys, where nothing imported the kernel yet, the save does not
    (its import costs more than it saves there); from there on it does."""
    src = textwrap.dedent("""
        import sys
        import numpy as np
        from reprod import ReprodLogger
        n = int(sys.argv[1])
        log = ReprodLogger()
        for i in range(n):
            log.add(f"k{i}", np.full(4, i, np.float32))
        log.save(sys.argv[2])
        print("reprod._native" in sys.modules)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    for n, loaded in ((KERNEL_KEYS - 1, False), (KERNEL_KEYS, True)):
        r = subprocess.run([sys.executable, "-c", src, str(n), str(tmp_path / f"{n}.npy")], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split()[-1] == str(loaded)


def test_the_kernel_less_process_writes_the_same_bytes(tmp_path) -> None:
    """REPROD_KERNEL=0 in a fresh process: the Python path alone, the same file."""
    src = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from reprod import _native
        assert _native.kernel() is None
        import reprod
        from test_npy_batch_save import _dtype_tree, _key_tree
        reprod.save(sys.argv[1], {"d": _dtype_tree(), "k": _key_tree()})
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "REPROD_KERNEL": "0"}
    slow = str(tmp_path / "nokernel.npy")
    r = subprocess.run([sys.executable, "-c", src, slow, os.path.dirname(os.path.abspath(__file__))],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    fast = reprod.save(str(tmp_path / "here.npy"), {"d": _dtype_tree(), "k": _key_tree()})
    with open(fast, "rb") as f, open(slow, "rb") as g:
        assert f.read() == g.read()


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS on truncated mmaps: Linux")
def test_a_truncated_mapped_source_raises_and_writes_nothing(tmp_path) -> None:
    """Arrays viewing a mapped file that is truncated meanwhile: the kernel's copies are guarded
    (MappedReadError, an OSError) and nothing is left at the path. The first keys are in memory:
    the Python path's copy has no guard."""
    src = textwrap.dedent("""
        import mmap, os, sys
        import numpy as np
        import reprod
        folder = sys.argv[1]
        data = os.path.join(folder, "data.bin")
        with open(data, "wb") as f:
            f.write(np.arange(1 << 16, dtype=np.float32).tobytes())
        with open(data, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        flat = np.frombuffer(mm, np.float32)
        tree = {"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}
        tree.update({f"k{i}": flat[i * 16 : i * 16 + 16] for i in range(3000)})
        os.truncate(data, 0)
        out = os.path.join(folder, "out.npy")
        try:
            reprod.save(out, tree)
        except OSError as exc:
            print(type(exc).__name__, os.path.exists(out), sorted(os.listdir(folder)))
            sys.exit(3)
        print("no error")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "REPROD_KERNEL": "1"}  # the kernel's guard is tested
    r = subprocess.run([sys.executable, "-c", src, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.split()[:2] == ["MappedReadError", "False"]
    assert sorted(os.listdir(tmp_path)) == ["data.bin"]
