"""reprod.save / reprod.load: exact round trips through both formats, lazy mmap reads, the native
layout (64-byte aligned payloads, readable by plain ``numpy.load``) and atomic writes.

The references are numpy itself: the bytes of the array that went in, ``numpy.load`` and
``zipfile`` reading the native file without reprod.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reprod
from reprod import DumpFormatError, ReprodError
from reprod.storage import ArraySpec, Dump

NUMERIC_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128,
]  # fmt: skip

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4), (64, 33)]


def _values(dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """Awkward values: extremes, NaN/Inf/-0.0 for floats, random bits for the rest."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    rng = np.random.default_rng(n)
    if dt.kind == "b":
        return (rng.integers(0, 2, n) == 1).reshape(shape)
    raw = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).view(dt)
    if dt.kind in "fc" and n >= 4:
        raw[:4] = [np.nan, np.inf, -np.inf, -0.0]
    if dt.kind in "iu" and n >= 2:
        raw[:2] = [np.iinfo(dt).min, np.iinfo(dt).max]
    return raw.reshape(shape)


def _mmap_base(arr: np.ndarray) -> object:
    """Follow ``.base`` (and memoryview ``.obj``) down to the object that owns the bytes."""
    obj: object = arr
    for _ in range(32):
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None:
            return obj
        obj = nxt
    return obj


def _tmp_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".tmp") or n.startswith(".")]


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_and_shape_round_trips_exactly(tmp_path, fmt, dtype, assert_same_tree) -> None:
    data = {f"s{i}": _values(dtype, s) for i, s in enumerate(SHAPES)}
    p = reprod.save(tmp_path / f"d.{fmt}", data)
    with reprod.load(p) as d:
        assert_same_tree(d, data)
        for k in data:
            assert d.source_dtype(k) is None


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.T,
        lambda a: a[::2, ::-3],
        lambda a: np.asfortranarray(a),
        lambda a: a.astype(a.dtype.newbyteorder(">")),
        lambda a: np.asfortranarray(a.astype(a.dtype.newbyteorder(">"))),
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["transposed", "strided", "fortran", "big-endian", "fortran-big-endian", "broadcast"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.complex128, np.float16])
def test_layouts_round_trip_with_values_and_dtype(tmp_path, fmt, make, dtype) -> None:
    a = make(_values(dtype, (20, 30)))
    p = reprod.save(tmp_path / f"d.{fmt}", {"a": a})
    got = reprod.load(p)["a"]
    assert got.dtype == a.dtype  # byte order included
    assert got.shape == a.shape
    np.testing.assert_array_equal(got, a)
    assert got.tobytes() == a.tobytes()


def test_key_order_and_nesting_kept(tmp_path, fmt, assert_same_tree) -> None:
    data = {
        "zeta": np.ones(3),
        "alpha": {"z": np.arange(4), "a": {"deep": np.float32(2.0)}, "m": np.zeros((0, 2))},
        "mid": np.arange(5, dtype=np.uint8),
    }
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", data))
    assert isinstance(d["alpha"], Dump) and isinstance(d["alpha"]["a"], Dump)
    assert_same_tree(
        d, {**data, "alpha": {**data["alpha"], "a": {"deep": np.array(2.0, np.float32)}}}
    )


def test_empty_nested_dict_is_kept(tmp_path, fmt) -> None:
    """reprod_log's .npy keeps ``{"grads": {}}``; the native format must not drop the key."""
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", {"a": np.ones(1), "grads": {}, "z": 1}))
    assert list(d) == ["a", "grads", "z"]
    assert isinstance(d["grads"], Mapping) and len(d["grads"]) == 0


WEIRD_KEYS = ["__reprod_1", "a/b", "layer.0.weight", "中文", "with space", "..", "../../evil", "",
              "x.npy", "__reprod__.json", "CON", "\x00nul", "a" * 300]  # fmt: skip


def test_awkward_key_names_round_trip(tmp_path, fmt) -> None:
    """A key with '/' stays one key; names that are unsafe as zip members (or collide with the
    fallback member names) must still come back with their own values."""
    data = {k: np.full(3, i, dtype=np.int16) for i, k in enumerate(WEIRD_KEYS)}
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", data))
    assert list(d) == WEIRD_KEYS
    for i, k in enumerate(WEIRD_KEYS):
        np.testing.assert_array_equal(d[k], np.full(3, i), err_msg=f"key {k!r}")
    assert not (tmp_path / "evil").exists()
    assert sorted(os.listdir(tmp_path)) == [f"d.{fmt}"]


def test_slash_key_next_to_nested_key(tmp_path, fmt) -> None:
    d = reprod.load(
        reprod.save(tmp_path / f"d.{fmt}", {"a": {"b": np.ones(1)}, "a/b": np.zeros(1)})
    )
    assert list(d) == ["a", "a/b"]
    np.testing.assert_array_equal(d["a"]["b"], [1.0])
    np.testing.assert_array_equal(d["a/b"], [0.0])


def test_tensors_and_python_values_are_converted_on_save(torch, tmp_path, fmt) -> None:
    data = {"t": torch.arange(6).reshape(2, 3).T, "f": 1.5, "l": [1, 2], "n": {"b": True}}
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", data))
    np.testing.assert_array_equal(d["t"], np.arange(6).reshape(2, 3).T)
    assert d["t"].dtype == np.int64
    assert d["f"] == 1.5 and d["f"].dtype == np.float64
    np.testing.assert_array_equal(d["l"], [1, 2])
    assert d["n"]["b"] == np.True_


def test_bfloat16_round_trips(torch, paddle, tmp_path) -> None:
    tb = torch.tensor([[1.5, -2.25, 3.0e38], [1e-40, float("inf"), -0.0]], dtype=torch.bfloat16)
    pb = paddle.to_tensor(tb.float().numpy(), dtype="bfloat16")
    data = {"torch": tb, "paddle": pb, "n": {"t": tb.T}, "f32": tb.float()}
    want = tb.float().numpy()
    d = reprod.load(reprod.save(tmp_path / "d.npz", data))
    for k, v in (("torch", d["torch"]), ("paddle", d["paddle"]), ("n/t", d["n"]["t"])):
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(v, want.T if k == "n/t" else want)
        assert np.signbit(v).tolist() == np.signbit(want.T if k == "n/t" else want).tolist()
    assert d.source_dtype("torch") == d.source_dtype("paddle") == "bfloat16"
    assert d["n"].source_dtype("t") == "bfloat16"
    assert d.source_dtype("f32") is None
    assert d.spec("torch").display_dtype == "bfloat16"
    # the member holds the 2-byte bit patterns, not a widened float32 copy
    with np.load(tmp_path / "d.npz") as z:
        assert z["torch"].dtype == np.uint16
    # reprod_log's .npy has no place for the original dtype: the exact float32 values are kept
    legacy = reprod.load(reprod.save(tmp_path / "d.npy", data))
    np.testing.assert_array_equal(legacy["paddle"], want)
    assert legacy.source_dtype("torch") is None


def test_source_dtypes_argument(tmp_path) -> None:
    vals = np.array([1.0, -0.5, 256.0], dtype=np.float32)  # exact bfloat16 numbers
    d = reprod.load(reprod.save(tmp_path / "d.npz", {"a": vals}, source_dtypes={"a": "bfloat16"}))
    assert d.source_dtype("a") == "bfloat16"
    np.testing.assert_array_equal(d["a"], vals)


def test_saving_a_loaded_dump_converts_between_formats(tmp_path, assert_same_tree) -> None:
    data = {"a": np.arange(100.0), "n": {"b": np.int8(3)}}
    want = {"a": data["a"], "n": {"b": np.array(3, dtype=np.int8)}}
    p1 = reprod.save(tmp_path / "one.npy", data)
    p2 = reprod.save(tmp_path / "two.npz", reprod.load(p1))
    p3 = reprod.save(tmp_path / "three.npy", reprod.load(p2))
    assert_same_tree(reprod.load(p3), want)
    # overwriting the very file that is open (and mapped) works too
    reprod.save(p3, reprod.load(p3))
    assert_same_tree(reprod.load(p3), want)


def test_plain_numpy_files_load(tmp_path) -> None:
    np.save(tmp_path / "arr.npy", np.arange(5))
    d = reprod.load(tmp_path / "arr.npy")
    assert list(d) == ["arr"]
    np.testing.assert_array_equal(d["arr"], np.arange(5))
    np.savez(tmp_path / "s.npz", x=np.ones(2), y=np.arange(3))
    np.savez_compressed(tmp_path / "c.npz", x=np.ones(2), y=np.arange(300))
    for name, n in (("s.npz", 3), ("c.npz", 300)):
        d = reprod.load(tmp_path / name)
        assert list(d) == ["x", "y"]
        np.testing.assert_array_equal(d["y"], np.arange(n))
        assert d["y"].flags.writeable is False


# ---------------------------------------------------------------------------------------------
# property test: random dtypes, shapes, byte orders and key names
# ---------------------------------------------------------------------------------------------

_leaf = hnp.arrays(
    dtype=st.sampled_from(NUMERIC_DTYPES).flatmap(
        lambda t: st.sampled_from([np.dtype(t), np.dtype(t).newbyteorder(">")])
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
)
_tree = st.recursive(
    _leaf,
    lambda inner: st.dictionaries(st.text(max_size=8), inner, min_size=1, max_size=4),
    max_leaves=8,
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=st.dictionaries(st.text(max_size=12), _tree, max_size=6),
    suffix=st.sampled_from(["npy", "npz"]),
)
def test_random_trees_round_trip(assert_same_tree, data, suffix) -> None:
    with tempfile.TemporaryDirectory() as folder:
        p = reprod.save(os.path.join(folder, f"d.{suffix}"), data)
        with reprod.load(p) as d:
            assert_same_tree(d, data)
        assert os.listdir(folder) == [f"d.{suffix}"]


# ---------------------------------------------------------------------------------------------
# lazy loading
# ---------------------------------------------------------------------------------------------


def test_arrays_are_read_only_views_of_an_mmap(tmp_path, fmt) -> None:
    data = {"big": np.arange(1000, dtype=np.float32), "f": np.asfortranarray(np.ones((16, 8))),
            "n": {"x": np.arange(64, dtype=np.int32)}, "small": np.arange(3)}  # fmt: skip
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", data))
    for arr in (d["big"], d["f"], d["n"]["x"], d["small"]):
        assert arr.flags.writeable is False
        with pytest.raises(ValueError):
            arr[...] = 0
    for arr in (d["big"], d["f"], d["n"]["x"]):  # >= 256 bytes: viewed in place
        assert arr.nbytes >= 256
        assert isinstance(_mmap_base(arr), mmap.mmap), type(_mmap_base(arr))
    copy = d.to_dict()
    assert copy["big"].flags.writeable and not isinstance(_mmap_base(copy["big"]), mmap.mmap)


def test_dump_is_a_read_only_mapping(tmp_path, fmt) -> None:
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", {"a": np.ones(2), "b": {"c": np.ones(1)}}))
    assert len(d) == 2 and "a" in d and "zz" not in d and list(d.keys()) == ["a", "b"]
    with pytest.raises(TypeError):
        d["a"] = np.zeros(2)  # type: ignore[index]
    with pytest.raises(KeyError):
        d["zz"]
    assert "2 keys" in repr(d)


def test_spec_gives_shape_and_dtype_without_reading(tmp_path, fmt, monkeypatch) -> None:
    data = {"w": np.ones((4, 5), dtype=np.float16), "n": {"b": np.zeros(7, dtype=">i8")}}
    d = reprod.load(reprod.save(tmp_path / f"d.{fmt}", data))

    def no_read(self, mf):  # noqa: ARG001
        raise AssertionError("spec/iteration read array data")

    monkeypatch.setattr(ArraySpec, "materialize", no_read)
    s = d.spec("w")
    assert isinstance(s, ArraySpec)
    assert s.shape == (4, 5) and s.dtype == np.float16 and s.nbytes == 40
    assert s.display_dtype == "float16"
    nested = d.spec("n")
    assert isinstance(nested, Dump)
    assert nested.spec("b").shape == (7,) and nested.spec("b").dtype == np.dtype(">i8")
    assert list(d) == ["w", "n"] and len(d) == 2


def test_arrays_outlive_close(tmp_path, fmt) -> None:
    d = reprod.load(
        reprod.save(tmp_path / f"d.{fmt}", {"a": np.arange(500.0), "b": np.arange(500.0)})
    )
    a = d["a"]
    d.close()
    np.testing.assert_array_equal(a, np.arange(500.0))
    with pytest.raises(DumpFormatError):
        d["b"]


# ---------------------------------------------------------------------------------------------
# the native layout, checked with zipfile and numpy.load rather than reprod
# ---------------------------------------------------------------------------------------------


def test_npz_payload_offsets_are_multiples_of_64(tmp_path) -> None:
    data = {name: np.arange(n, dtype=dt)
            for name, n, dt in [("a", 1, np.int8), ("bb", 33, np.float64), ("c" * 37, 5, np.int16),
                                ("deep", 1000, np.float32), ("z", 0, np.float32)]}  # fmt: skip
    data["nested"] = {"x" * 11: np.ones((3, 3)), "y": np.arange(7, dtype=np.uint8)}
    p = reprod.save(tmp_path / "d.npz", data)
    raw = (tmp_path / "d.npz").read_bytes()
    seen = 0
    with zipfile.ZipFile(p) as zf:
        for zi in zf.infolist():
            if not zi.filename.endswith(".npy"):
                continue
            assert zi.compress_type == zipfile.ZIP_STORED
            n, e = struct.unpack_from("<HH", raw, zi.header_offset + 26)
            start = zi.header_offset + 30 + n + e
            f = io.BytesIO(raw[start : start + zi.file_size])
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)  # fmt: skip
            read_header(f)  # numpy's own header parser
            assert (start + f.tell()) % 64 == 0, zi.filename
            seen += 1
    assert seen == 7
    d = reprod.load(p)
    assert all(d.spec(k).offset % 64 == 0 for k in d if k != "nested")


def test_plain_numpy_load_reads_a_native_dump(tmp_path) -> None:
    data = {"logits": np.arange(12.0).reshape(3, 4), "loss": np.float32(0.5),
            "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)), "be": np.arange(4, dtype=">f8")}  # fmt: skip
    p = reprod.save(tmp_path / "d.npz", data)
    with np.load(p) as z:
        assert [f for f in z.files if not f.startswith("__reprod")] == list(data)
        for k, v in data.items():
            np.testing.assert_array_equal(z[k], v)
            assert z[k].dtype == np.asarray(v).dtype


def test_npz_has_metadata_with_format_and_versions(tmp_path) -> None:
    import json

    p = reprod.save(tmp_path / "d.npz", {"a": np.ones(1)})
    with zipfile.ZipFile(p) as zf:
        meta = json.loads(zf.read("__reprod__.json"))
    assert meta["format"] == "reprod-npz" and meta["version"] == 1
    assert meta["writer"]["numpy"] == np.__version__
    assert reprod.load(p).meta["format"] == "reprod-npz"


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def test_failed_save_keeps_earlier_file_unsupported_value(tmp_path, fmt) -> None:
    p = tmp_path / f"d.{fmt}"
    reprod.save(p, {"old": np.arange(10)})
    before = p.read_bytes()
    with pytest.raises(ReprodError, match="'b'"):
        reprod.save(p, {"a": np.zeros(1000), "b": "not an array", "c": np.ones(3)})
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == [p.name]


def test_failed_native_write_midway_keeps_earlier_file(tmp_path, monkeypatch) -> None:
    from reprod import _native
    from reprod.storage import npz_writer

    # the key-by-key path (the kernel's batch writes these keys without _write_member: its
    # failures are in test_npz_batch_save.py)
    monkeypatch.setattr(_native, "kernel", lambda: None)
    p = tmp_path / "d.npz"
    reprod.save(p, {"old": np.arange(10)})
    before = p.read_bytes()
    real = npz_writer.NpzWriter._write_member
    calls = []

    def flaky(self, *args, **kwargs):
        if calls:
            raise OSError("disk full")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(npz_writer.NpzWriter, "_write_member", flaky)
    with pytest.raises(OSError, match="disk full"):
        reprod.save(p, {"a": np.zeros(1000), "b": np.ones(1000)})
    assert calls == [1]
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == [p.name]


def test_failed_legacy_write_midway_keeps_earlier_file(tmp_path, monkeypatch) -> None:
    p = tmp_path / "d.npy"
    reprod.save(p, {"old": np.arange(10)})
    before = p.read_bytes()
    from reprod.storage import _npy_writer  # write_legacy's writer (np.save only as fallback)

    real_write = _npy_writer.write_npy_dict

    def half_then_fail(file, tree, fd=None):
        buf = io.BytesIO()
        assert real_write(buf, tree)
        file.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(_npy_writer, "write_npy_dict", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        reprod.save(p, {"a": np.zeros(1000)})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == [p.name]


def test_save_creates_parents_appends_npy_and_uses_normal_permissions(tmp_path) -> None:
    p = reprod.save(tmp_path / "a" / "b" / "forward", {"x": np.ones(1)})
    assert p.endswith("forward.npy") and os.path.exists(p)
    q = reprod.save(str(tmp_path / "c" / "x.npz"), {"x": np.ones(1)})
    assert os.path.exists(q)
    umask = os.umask(0)
    os.umask(umask)
    for path in (p, q):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert not _tmp_files(tmp_path / "a" / "b") and not _tmp_files(tmp_path / "c")


def test_save_refuses_non_mapping_and_non_str_keys(tmp_path, fmt) -> None:
    with pytest.raises(ReprodError, match="mapping"):
        reprod.save(tmp_path / f"d.{fmt}", [np.ones(1)])  # type: ignore[arg-type]
    with pytest.raises(ReprodError, match=r"key 1\.0 is a float"):
        reprod.save(tmp_path / f"d.{fmt}", {1.0: np.ones(1)})
    assert os.listdir(tmp_path) == []  # an int key is its str, as ReprodLogger.add takes it
    assert list(reprod.load(reprod.save(tmp_path / f"d.{fmt}", {1: np.ones(1)}))) == ["1"]
