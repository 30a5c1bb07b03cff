"""The direct writer of reprod_log's ``.npy`` dict format against numpy's own ``np.save``.

``write_npy_dict`` must produce what ``np.save(f, tree, allow_pickle=True)`` produces: the same
bytes where the pickle has no second frame, the same opcodes (frame boundaries aside) otherwise,
and files that ``np.load``, ``reprod.load`` and reprod_log's ``load_info`` read back exactly. Also
the ``ReprodLogger.add`` fast path, checked against ``adapters.to_tree``.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import ReprodError, ReprodLogger
from reprod.adapters import to_tree
from reprod.storage import _npy_writer
from reprod.storage._npy_writer import write_npy_dict

NUMERIC = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
           np.uint64, np.float16, np.float32, np.float64, np.longdouble, np.complex64,
           np.complex128, np.clongdouble]


def _mine(tree: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    assert write_npy_dict(buf, tree) is True
    return buf.getvalue()


def _numpy(tree: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tree, allow_pickle=True)
    return buf.getvalue()


def _ops(npy: bytes) -> list[tuple[str, Any]]:
    """The pickle's opcodes and arguments, FRAME opcodes left out (their placement may differ)."""
    start = npy.index(b"\n") + 1
    return [(op.name, arg) for op, arg, _ in pickletools.genops(npy[start:]) if op.name != "FRAME"]


def _frames_between_arrays(npy: bytes) -> bool:
    """Every FRAME after the first comes right before a key or right after a payload's bytes."""
    ops = list(pickletools.genops(npy[npy.index(b"\n") + 1 :]))
    frames = [i for i, (op, _, _) in enumerate(ops) if op.name == "FRAME"][1:]
    return bool(frames) and all(
        ops[i + 1][0].name == "SHORT_BINUNICODE" or "BINBYTES" in ops[i - 1][0].name for i in frames
    )


def _first_op(pickled: bytes) -> bytes:
    """The bytes of a pickle's first opcode after PROTO and FRAME."""
    ops = [(op.name, pos) for op, _, pos in pickletools.genops(pickled)]
    i = next(i for i, (name, _) in enumerate(ops) if name not in ("PROTO", "FRAME"))
    return pickled[ops[i][1] : ops[i + 1][1]]


def _same(a: Any, b: Any) -> None:
    """Equal trees: same keys in the same order, same dtype, shape and values.

    The byte order may differ: numpy's unpickling turns a big-endian array native (values kept),
    for np.save's files as for these."""
    if isinstance(b, dict):
        assert isinstance(a, (dict, reprod.storage.Dump)) or hasattr(a, "keys")
        assert list(a.keys()) == list(b.keys())
        for k in b:
            _same(a[k], b[k])
        return
    a = np.asarray(a)
    assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def _flat(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        out += _flat(v, prefix + k + "/") if isinstance(v, dict) else [(prefix + k, v)]
    return out


def _dtype_tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tree: dict[str, Any] = {}
    for t in NUMERIC:
        dt = np.dtype(t)
        vals = rng.standard_normal(12) * 100
        a = (vals > 0) if dt.kind == "b" else vals.astype(dt) if dt.kind != "c" else (vals + 1j * vals[::-1]).astype(dt)
        tree[dt.str] = a
        tree[dt.str + "/2d"] = a.reshape(3, 4)
        tree[dt.str + "/big-endian"] = a.astype(dt.newbyteorder(">"))
        tree[dt.str + "/0d"] = a[3:4].reshape(())
        tree[dt.str + "/empty"] = a[:0].reshape(0, 5)
    return tree


def _shape_tree() -> dict[str, Any]:
    base = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    return {
        "c": base,
        "fortran": np.asfortranarray(base),
        "fortran2d": np.asfortranarray(base[0, 0]),
        "strided": base[:, ::2, 1:, ::3],
        "transposed": base.transpose(2, 0, 3, 1),
        "1d": base.reshape(-1),
        "wide": np.ones((1, 300, 1), np.float32),  # a dimension >= 256 (BININT2)
        "long": np.zeros(70_000, np.int8),  # a dimension >= 65536 (BININT); payload >= 64 KiB
        "one-byte": np.array([98], np.int8),  # b"b": CPython's shared one-byte object
        "one-byte-again": np.array([98], np.uint8),
        "other-byte": np.array([True]),
        "empty-a": np.zeros(0),
        "empty-b": np.zeros((0, 3), np.int32),
        "payload255": np.ones(255, np.uint8),  # SHORT_BINBYTES's largest
        "payload256": np.ones(256, np.uint8),  # BINBYTES
        "payload-below-frame": np.ones(65535, np.uint8),
        "payload-at-frame": np.ones(65536, np.uint8),  # written unframed, as the pickler does
        "big-fortran": np.asfortranarray(np.ones((300, 300))),
        "nested": {"a": {"b": {"c": np.arange(3)}}, "empty": {}},
    }


def _key_tree() -> dict[str, Any]:
    return {
        "": np.ones(2),
        "|": np.ones(2, np.int8),  # the same one-character object as dtype("O")'s byte order
        "<": np.ones(2),
        "ü日本\U0001F600": np.ones(2),
        "lone\ud800surrogate": np.ones(2),
        "x" * 300: np.ones(2),  # BINUNICODE
        "a.b/c d\n": np.ones(2),
    }


@pytest.mark.parametrize("make", [_dtype_tree, _shape_tree, _key_tree], ids=["dtypes", "shapes", "keys"])
def test_bytes_equal_np_save_and_values_round_trip(make) -> None:
    tree = make()
    mine = _mine(tree)
    assert mine == _numpy(tree)
    back = np.load(io.BytesIO(mine), allow_pickle=True).item()
    _same(back, tree)
    ref = np.load(io.BytesIO(_numpy(tree)), allow_pickle=True).item()
    assert [(k, v.dtype.str) for k, v in _flat(back)] == [(k, v.dtype.str) for k, v in _flat(ref)]
    # Fortran-ordered arrays come back Fortran-ordered, as from np.save
    if "fortran" in tree:
        assert back["fortran"].flags.f_contiguous and not back["fortran"].flags.c_contiguous


@pytest.mark.parametrize("n", [1, 2, 999, 1000, 1001, 2000, 2345])
def test_setitems_batches_as_the_pickler(n) -> None:
    tree = {f"k{i}": np.full(3, i, np.int32) for i in range(n)}
    mine, ref = _mine(tree), _numpy(tree)
    if len(ref) < 64 * 1024:
        assert mine == ref
    else:  # past one frame the pickler may close a frame inside an array; this writer never does
        assert _ops(mine) == _ops(ref)
        assert _frames_between_arrays(mine)


def test_many_small_arrays_past_the_frame_size() -> None:
    rng = np.random.default_rng(1)
    tree = {f"step{i:03d}.layer.{j}": rng.standard_normal(int(rng.integers(256, 2561))).astype(np.float32)
            for i in range(60) for j in range(25)}
    tree["nested"] = {f"p{i}": rng.standard_normal(100) for i in range(1500)}
    mine, ref = _mine(tree), _numpy(tree)
    assert len(mine) > 10 * 64 * 1024
    assert _ops(mine) == _ops(ref)
    assert _frames_between_arrays(mine)
    _same(np.load(io.BytesIO(mine), allow_pickle=True).item(), tree)


def test_repeated_objects_are_memoised_like_the_pickler() -> None:
    a = np.arange(4.0)
    sub = {"w": np.ones(3)}
    tree = {"x": a, "y": a, "z": {"again": a}, "s1": sub, "s2": sub}
    mine = _mine(tree)
    assert mine == _numpy(tree)
    back = np.load(io.BytesIO(mine), allow_pickle=True).item()
    assert back["x"] is back["y"] and back["s1"] is back["s2"]


def test_opcode_encoders_match_pickle() -> None:
    for v in [0, 1, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, 2**40, -(2**40), 2**63]:
        assert _npy_writer._int(v) == _first_op(pickle.dumps(v, protocol=4)), v
    for n in [0, 255, 256, 2**32 - 1]:
        assert _npy_writer._bytes_header(n) == (
            b"C" + bytes((n,)) if n < 256 else b"B" + struct.pack("<I", n)
        )
    # a payload of 4 GiB or more: BINBYTES8, an 8-byte length (pickle's own reading of it)
    assert _npy_writer._bytes_header(2**32) == b"\x8e" + struct.pack("<Q", 2**32)
    assert pickle.loads(b"\x80\x04\x8e" + struct.pack("<Q", 3) + b"abc.") == b"abc"
    for s in ["", "a", "ü" * 200, "x" * 255, "x" * 256, "\ud800"]:
        assert _npy_writer._str_op(s) == _first_op(pickle.dumps(s, protocol=4)), s


@pytest.mark.parametrize(
    "tree",
    [
        {"a": [1, 2]},
        {"a": np.array(["text"])},
        {"a": np.array([object()], dtype=object)},
        {"a": np.ones(2).view(np.recarray)},
        {"a": np.ma.masked_array([1.0, 2.0])},
        {1: np.ones(2)},
        {"a": {"b": np.float64(1.0)}},
        {"a": np.zeros(2, "datetime64[s]")},
    ],
    ids=["list", "str-dtype", "object", "subclass", "masked", "int-key", "numpy-scalar", "datetime"],
)
def test_what_it_does_not_reproduce_is_left_to_np_save(tree) -> None:
    buf = io.BytesIO()
    assert write_npy_dict(buf, tree) is False
    assert buf.getvalue() == b""


def test_reprod_save_writes_the_same_file_as_np_save(tmp_path) -> None:
    tree = {**_shape_tree(), **_key_tree()}
    path = reprod.save(tmp_path / "d.npy", tree)
    np.save(tmp_path / "ref.npy", tree, allow_pickle=True)
    assert (tmp_path / "d.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    dump = reprod.load(path)
    try:
        _same(dump, tree)
    finally:
        dump.close()


def test_reprod_load_reads_it(tmp_path) -> None:
    tree = {**_dtype_tree(), "nested": {"x": np.ones((2, 2), np.float32)}}
    path = tmp_path / "d.npy"
    with open(path, "wb") as f:
        assert write_npy_dict(f, tree)
    dump = reprod.load(path)
    try:
        _same(dump, tree)
    finally:
        dump.close()


def test_reprod_log_reads_it(tmp_path) -> None:
    pytest.importorskip("paddle")  # reprod_log imports paddle at import time
    reprod_log = pytest.importorskip("reprod_log")
    rng = np.random.default_rng(3)
    tree = {f"k{i}": rng.standard_normal((4, 5)).astype(np.float32) for i in range(50)}
    path = reprod.save(tmp_path / "d.npy", tree)
    back = reprod_log.ReprodDiffHelper().load_info(path)
    _same(back, tree)


# ---------------------------------------------------------------------------------------------
# ReprodLogger.add's fast path gives what the general conversion gives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(24).reshape(2, 3, 4)[:, ::2, 1:],
        np.arange(4, dtype=">i4"),
        np.array(2.5),
        np.zeros((0, 3), np.complex64),
        1.5, 7, True, -(2**63), 2**64 - 1,
    ],
    ids=lambda v: type(v).__name__ + (f"-{v.dtype.str}-{v.shape}" if isinstance(v, np.ndarray) else f"-{v}"),
)
def test_logger_add_fast_path_matches_to_tree(value) -> None:
    log = ReprodLogger()
    log.add("k", value)
    got = log.data["k"]
    want, _ = to_tree(value, key="k")
    assert type(got) is np.ndarray and got.flags.c_contiguous and got.flags.writeable
    _same(got, want)
    if isinstance(value, np.ndarray):
        assert not np.shares_memory(got, value)
        if value.size:
            value.reshape(-1)[0] += 1  # a later in-place update must not change the log
            _same(got, want)


def test_logger_add_large_array_copies_into_its_own_memory(tmp_path) -> None:
    value = np.asfortranarray(np.arange(2 * 700_000, dtype=np.float64).reshape(700_000, 2))  # 11 MB
    log = ReprodLogger()
    log.add("big", value)
    got = log.data["big"]
    assert got.flags.c_contiguous and got.flags.writeable and not np.shares_memory(got, value)
    _same(got, value)
    value[0, 0] = -1.0
    assert got[0, 0] == 0.0
    got[1, 1] = 5.0  # the logged copy is an ordinary writable array
    path = log.save(tmp_path / "big.npy")
    back = np.load(path, allow_pickle=True).item()
    _same(back["big"], got)


@pytest.mark.parametrize("value", [2**70, np.array(["a"]), np.array([None], dtype=object)])
def test_logger_add_fast_path_still_rejects(value) -> None:
    with pytest.raises(ReprodError):
        ReprodLogger().add("k", value)


def test_logger_add_replaces_source_dtype_of_an_earlier_value() -> None:
    torch = pytest.importorskip("torch")
    log = ReprodLogger()
    log.add("k", torch.ones(2, dtype=torch.bfloat16))
    assert log.source_dtypes == {"k": "bfloat16"}
    log.add("k", np.ones(2, np.float32))
    assert log.source_dtypes == {}


def test_logger_save_npy_equals_np_save_of_its_data(tmp_path) -> None:
    log = ReprodLogger()
    for k, v in _shape_tree().items():
        log.add(k, v)
    written = log.save(tmp_path / "run")  # ".npy" appended, as np.save does
    assert written.endswith("run.npy")
    np.save(tmp_path / "ref.npy", log.data, allow_pickle=True)
    assert (tmp_path / "run.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()


# ---------------------------------------------------------------------------------------------
# a failure part-way through the direct writer leaves the earlier dump (write_legacy is atomic)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["frame", "large-payload"])
def test_failure_midway_keeps_the_earlier_dump(tmp_path, monkeypatch, where) -> None:
    p = tmp_path / "d.npy"
    reprod.save(p, {"old": np.arange(10)})
    before = p.read_bytes()
    calls = []
    if where == "frame":
        real_commit = _npy_writer._Writer.commit

        def commit(self) -> None:
            real_commit(self)
            calls.append(1)
            raise OSError("disk full")

        monkeypatch.setattr(_npy_writer._Writer, "commit", commit)
        tree = {f"k{i}": np.ones(1000) for i in range(20)}  # 160 KB in frames
    else:
        def raw(a):
            calls.append(1)
            raise OSError("disk full")

        monkeypatch.setattr(_npy_writer, "_raw", raw)
        tree = {"small": np.ones(10), "large": np.ones(100_000)}  # header written, then the payload fails
    with pytest.raises(OSError, match="disk full"):
        reprod.save(p, tree)
    assert calls
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == [p.name]


def test_own_opcode_reader_reads_numpys_prefix_as_pickletools() -> None:
    # the writer reads numpy's pickle of a 0-d object array without importing pickletools
    holder = np.empty((), dtype=object)
    holder[()] = {"k": np.arange(3)}
    for value in ({}, holder[()]):
        holder[()] = value
        raw = pickle.dumps(holder, protocol=4)
        try:
            ours = [(op.name, arg, pos) for op, arg, pos in _npy_writer._genops(raw)]
        except ValueError:  # an opcode the prefix never holds (the dict's items): refused
            assert value
            continue
        assert ours == [(op.name, arg, pos) for op, arg, pos in pickletools.genops(raw)]
    assert _npy_writer.npy_dict_bytes_supported()
    with pytest.raises(ValueError):
        _npy_writer._genops(b"\x80\x04\xff")
