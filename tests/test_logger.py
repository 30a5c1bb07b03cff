"""ReprodLogger: reprod_log's API, any framework's tensors, copies at add, and the streaming mode.

Deliberate differences from reprod_log (each asserted below): values are copied at ``add``
(reprod_log keeps a reference), and bad keys or values raise ``ReprodError`` (reprod_log asserts
only that the value is an ndarray and accepts any key).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import reprod
from reprod import ReprodError, ReprodLogger


@pytest.fixture(scope="module")
def reprod_log():
    pytest.importorskip("paddle")  # reprod_log imports paddle at import time
    return pytest.importorskip("reprod_log")


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# add: what is accepted and how it is stored
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, want",
    [
        (np.arange(6, dtype=np.int16).reshape(2, 3), np.arange(6, dtype=np.int16).reshape(2, 3)),
        (np.float32(1.5), np.array(1.5, dtype=np.float32)),
        (np.uint8(7), np.array(7, dtype=np.uint8)),
        (3, np.array(3)),
        (2.5, np.array(2.5)),
        (True, np.array(True)),
        ([1, 2, 3], np.array([1, 2, 3])),
        ((0.5, 1.5), np.array([0.5, 1.5])),
        ([[1.0, 2.0], [3.0, 4.0]], np.array([[1.0, 2.0], [3.0, 4.0]])),
    ],
    ids=["ndarray", "np-f32", "np-u8", "int", "float", "bool", "list", "tuple", "nested-list"],
)
def test_add_numpy_and_python_values(value, want, assert_same_tree) -> None:
    lg = ReprodLogger()
    lg.add("k", value)
    assert list(lg.data) == ["k"]
    assert_same_tree(lg.data["k"], want)


def test_add_torch_tensors(torch, assert_same_tree) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    lg = ReprodLogger()
    lg.add("grad", (base * 1).requires_grad_(True) * 2)
    lg.add("t", base.T)
    lg.add("half", base.half())
    lg.add("bf16", torch.tensor([1.5, -3.0, 1e30], dtype=torch.bfloat16))
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_same_tree(
        lg.data,
        {"grad": want * 2, "t": want.T.copy(), "half": want.astype(np.float16),
         "bf16": torch.tensor([1.5, -3.0, 1e30], dtype=torch.bfloat16).float().numpy()},
    )  # fmt: skip
    assert lg.source_dtypes == {"bf16": "bfloat16"}


def test_add_paddle_tensors(paddle, assert_same_tree) -> None:
    base = paddle.arange(12, dtype="float32").reshape([3, 4])
    x = base.clone()
    x.stop_gradient = False
    lg = ReprodLogger()
    lg.add("grad", x * 2)
    lg.add("t", base.t())
    lg.add("half", base.astype("float16"))
    lg.add("bf16", paddle.to_tensor([1.5, -3.0, 1e30], dtype="bfloat16"))
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_same_tree(
        lg.data,
        {"grad": want * 2, "t": want.T.copy(), "half": want.astype(np.float16),
         "bf16": paddle.to_tensor([1.5, -3.0, 1e30], dtype="bfloat16").astype("float32").numpy()},
    )  # fmt: skip
    assert lg.source_dtypes == {"bf16": "bfloat16"}


def test_add_nested_dict_keeps_nesting(assert_same_tree) -> None:
    lg = ReprodLogger()
    lg.add("layer", {"w": np.ones((2, 2)), "sub": {"b": [1.0, 2.0]}})
    assert_same_tree(lg.data, {"layer": {"w": np.ones((2, 2)), "sub": {"b": np.array([1.0, 2.0])}}})


def test_re_adding_a_key_replaces_it_in_place_like_a_dict(reprod_log) -> None:
    ours, theirs = ReprodLogger(), reprod_log.ReprodLogger()
    for lg in (ours, theirs):
        lg.add("a", np.zeros(1))
        lg.add("b", np.zeros(1))
        lg.add("a", np.ones(1))
    assert list(ours.data) == list(theirs.data) == ["a", "b"]
    np.testing.assert_array_equal(ours.data["a"], theirs.data["a"])


# ---------------------------------------------------------------------------------------------
# copies at add (reprod_log keeps a reference: an in-place update changed what it saved)
# ---------------------------------------------------------------------------------------------


def test_numpy_value_copied_at_add(reprod_log) -> None:
    a = np.zeros(3)
    ours, theirs = ReprodLogger(), reprod_log.ReprodLogger()
    ours.add("a", a)
    theirs.add("a", a)
    a += 1
    np.testing.assert_array_equal(ours.data["a"], np.zeros(3))
    np.testing.assert_array_equal(theirs.data["a"], np.ones(3))  # the behaviour we differ from


def test_torch_value_copied_at_add(torch) -> None:
    t = torch.zeros(3)
    lg = ReprodLogger()
    lg.add("t", t)
    lg.add("nested", {"t": t})
    t.relu_().add_(5)
    np.testing.assert_array_equal(lg.data["t"], np.zeros(3))
    np.testing.assert_array_equal(lg.data["nested"]["t"], np.zeros(3))


def test_paddle_value_copied_at_add(paddle) -> None:
    t = paddle.zeros([3])
    lg = ReprodLogger()
    lg.add("t", t)
    t.add_(paddle.ones([3]))
    np.testing.assert_array_equal(lg.data["t"], np.zeros(3))


# ---------------------------------------------------------------------------------------------
# refused keys and values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, ("a",), b"k", 1.5, True], ids=repr)
def test_non_str_key_is_refused(key) -> None:
    lg = ReprodLogger()
    with pytest.raises(ReprodError) as info:
        lg.add(key, np.ones(1))
    assert repr(key) in str(info.value) and type(key).__name__ in str(info.value)
    assert lg.data == {}


@pytest.mark.parametrize("key", [3, np.int64(3), np.uint8(3)], ids=repr)
def test_int_key_is_stored_as_its_str(key, tmp_path) -> None:
    """reprod_log took any key; an integer one (``add(step, loss)``) is kept, as ``str(key)``."""
    lg = ReprodLogger()
    lg.add(key, np.ones(2))
    lg.add("x", np.zeros(1))
    assert list(lg.data) == ["3", "x"] and lg.keys() == ["3", "x"]
    lg.add(3, np.full(2, 7.0))  # the same key: replaced in place
    assert list(lg.data) == ["3", "x"]
    np.testing.assert_array_equal(lg.data["3"], np.full(2, 7.0))
    lg.remove(3)
    assert list(lg.data) == ["x"]
    lg.add(key, np.ones(2))
    for path in (tmp_path / "a.npy", tmp_path / "a.npz"):
        lg.save(path)
        assert list(reprod.load(path)) == ["x", "3"]


def test_int_key_streams_as_its_str(tmp_path) -> None:
    with ReprodLogger(stream_to=tmp_path / "s.npz") as lg:
        lg.add(0, np.ones(2))
        lg.add(1, {"loss": 0.5})
        assert lg.keys() == ["0", "1"]
    d = reprod.load(tmp_path / "s.npz")
    assert list(d) == ["0", "1"] and float(d["1"]["loss"]) == 0.5


@pytest.mark.parametrize(
    "value, type_name",
    [("hello", "str"), (None, "NoneType"), (np.array([1, "a"], dtype=object), "object"),
     ({"inner": None}, "NoneType"), (object(), "object")],
    ids=["str", "None", "object-array", "nested-None", "object"],
)  # fmt: skip
def test_non_numeric_value_is_refused_naming_key_and_type(value, type_name: str) -> None:
    lg = ReprodLogger()
    with pytest.raises(ReprodError) as info:
        lg.add("layer1.out", value)
    msg = str(info.value)
    assert "layer1.out" in msg and type_name in msg and "\n" not in msg
    assert lg.data == {}


# ---------------------------------------------------------------------------------------------
# remove / clear / data / save
# ---------------------------------------------------------------------------------------------


def test_remove_missing_key_prints_reprod_logs_message(reprod_log, capsys) -> None:
    ours, theirs = ReprodLogger(), reprod_log.ReprodLogger()
    for lg in (ours, theirs):
        lg.add("a", np.zeros(1))
        lg.add("b", np.zeros(1))
    theirs.remove("nope")
    want = capsys.readouterr().out
    ours.remove("nope")
    assert capsys.readouterr().out == want == "nope is not in dict_keys(['a', 'b'])\n"
    ours.remove("a")
    assert list(ours.data) == ["b"] and capsys.readouterr().out == ""


def test_clear_and_data(torch) -> None:
    lg = ReprodLogger()
    lg.add("x", torch.ones(2, dtype=torch.bfloat16))
    lg.add("y", 1.0)
    assert isinstance(lg.data, dict) and list(lg.data) == ["x", "y"]
    lg.clear()
    assert lg.data == {} and lg.source_dtypes == {}
    lg.add("z", 2.0)
    assert list(lg.data) == ["z"]


def test_save_without_suffix_writes_npy_like_reprod_log(reprod_log, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ours, theirs = ReprodLogger(), reprod_log.ReprodLogger()
    for lg in (ours, theirs):
        lg.add("logits", np.arange(4.0))
    theirs.save("theirs")
    written = ours.save("foo")
    assert _files(tmp_path) == ["foo.npy", "theirs.npy"]
    assert os.path.abspath(written) == str(tmp_path / "foo.npy")
    got = reprod_log.ReprodDiffHelper().load_info("foo.npy")
    np.testing.assert_array_equal(got["logits"], np.arange(4.0))


def test_save_creates_parent_folders(tmp_path, fmt, assert_same_tree) -> None:
    lg = ReprodLogger()
    lg.add("a", [1, 2])
    path = tmp_path / "result" / "deep" / f"forward.{fmt}"
    lg.save(path)
    assert_same_tree(reprod.load(path), {"a": np.array([1, 2])})


def test_save_native_keeps_bfloat16_source_dtype(torch, tmp_path) -> None:
    lg = ReprodLogger()
    bf = torch.tensor([[1.5, -2.0], [3e38, 1e-38]], dtype=torch.bfloat16)
    lg.add("bf", bf)
    lg.add("n", {"bf": bf, "f": torch.ones(2)})
    d = reprod.load(lg.save(tmp_path / "x.npz"))
    assert d.source_dtype("bf") == "bfloat16"
    assert d["n"].source_dtype("bf") == "bfloat16" and d["n"].source_dtype("f") is None
    np.testing.assert_array_equal(d["bf"], bf.float().numpy())
    assert d["bf"].dtype == np.float32


def test_save_returns_written_path_and_data_survives(tmp_path) -> None:
    lg = ReprodLogger()
    lg.add("a", 1.0)
    p = lg.save(str(tmp_path / "x.npy"))
    assert os.path.exists(p)
    assert list(lg.data) == ["a"]  # saving does not clear


# ---------------------------------------------------------------------------------------------
# streaming mode
# ---------------------------------------------------------------------------------------------


def test_stream_file_appears_only_on_save(tmp_path, assert_same_tree) -> None:
    p = tmp_path / "run.npz"
    lg = ReprodLogger(stream_to=p)
    lg.add("a", np.arange(3))
    lg.add("n", {"x": 1.5})
    assert not p.exists()
    assert lg.data == {} and lg.keys() == ["a", "n"]
    assert os.path.abspath(lg.save()) == str(p)
    assert _files(tmp_path) == ["run.npz"]
    assert_same_tree(reprod.load(p), {"a": np.arange(3), "n": {"x": np.array(1.5)}})


def test_stream_close_and_with_block(tmp_path, assert_same_tree) -> None:
    p = tmp_path / "run.npz"
    with ReprodLogger(stream_to=str(p)) as lg:
        lg.add("a", [1.0])
        assert not p.exists()
    assert_same_tree(reprod.load(p), {"a": np.array([1.0])})
    q = tmp_path / "closed.npz"
    lg = ReprodLogger(stream_to=q)
    lg.add("b", 2)
    lg.close()
    assert_same_tree(reprod.load(q), {"b": np.array(2)})


def test_stream_exception_leaves_no_file_and_no_temp_files(tmp_path) -> None:
    p = tmp_path / "run.npz"
    with pytest.raises(RuntimeError, match="boom"):
        with ReprodLogger(stream_to=p) as lg:
            lg.add("a", np.ones(1000))
            raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_stream_bad_value_inside_with_leaves_no_file(tmp_path) -> None:
    with pytest.raises(ReprodError):
        with ReprodLogger(stream_to=tmp_path / "run.npz") as lg:
            lg.add("a", np.ones(3))
            lg.add("b", "not a tensor")
    assert _files(tmp_path) == []


def test_stream_failure_keeps_earlier_file(tmp_path) -> None:
    p = tmp_path / "run.npz"
    with ReprodLogger(stream_to=p) as lg:
        lg.add("old", np.ones(3))
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with ReprodLogger(stream_to=p) as lg:
            lg.add("new", np.zeros(3))
            raise RuntimeError
    assert p.read_bytes() == before and _files(tmp_path) == ["run.npz"]


def test_stream_re_add_keeps_last_value_and_first_position(tmp_path, assert_same_tree) -> None:
    p = tmp_path / "run.npz"
    with ReprodLogger(stream_to=p) as lg:
        lg.add("a", 1)
        lg.add("b", 2)
        lg.add("a", 3)
    assert_same_tree(reprod.load(p).to_dict(), {"a": np.array(3), "b": np.array(2)})


def test_stream_keeps_bfloat16(torch, tmp_path) -> None:
    p = tmp_path / "run.npz"
    with ReprodLogger(stream_to=p) as lg:
        lg.add("bf", torch.tensor([1.5, 2.5], dtype=torch.bfloat16))
    d = reprod.load(p)
    assert d.source_dtype("bf") == "bfloat16"
    np.testing.assert_array_equal(d["bf"], [1.5, 2.5])


def test_stream_remove_and_foreign_save_path_are_refused(tmp_path) -> None:
    lg = ReprodLogger(stream_to=tmp_path / "run.npz")
    lg.add("a", 1)
    with pytest.raises(ReprodError, match="'a'"):
        lg.remove("a")
    with pytest.raises(ReprodError, match="run.npz"):
        lg.save(tmp_path / "other.npz")
    assert lg.save(tmp_path / "run.npz")  # the stream's own path is fine
    assert _files(tmp_path) == ["run.npz"]


def test_stream_holds_nothing_in_memory(tmp_path) -> None:
    p = tmp_path / "big.npz"
    block = np.empty(1 << 20, dtype=np.float32)  # 4 MiB
    with ReprodLogger(stream_to=p) as lg:
        for i in range(200):
            block.fill(i)
            lg.add(f"act{i}", block)
            assert len(lg.data) == 0
    try:
        d = reprod.load(p)
        assert len(d) == 200
        for i in (0, 117, 199):
            a = d[f"act{i}"]
            assert a.shape == (1 << 20,) and a[0] == a[-1] == i
        d.close()
    finally:
        p.unlink()


def _bytes_per_streamed_key(path, value, warm, name):
    """Memory (tracemalloc) a streaming logger holds per key for 20,000 keys ``name(i)`` added
    after ``warm`` others; returns the logger, still open, and the figure."""
    import tracemalloc

    lg = ReprodLogger(stream_to=path)
    for i in range(warm):
        lg.add(f"warm{i}", value)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(20000):
            lg.add(name(i), value)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return lg, sum(s.size_diff for s in after.compare_to(before, "filename")) / 20000


def test_streaming_state_per_key_is_small(tmp_path):
    """What a streaming logger keeps per key (directory entry, metadata, names) stays a few hundred
    bytes, whatever the data: 20,000 keys of 64 bytes each."""
    lg, per_key = _bytes_per_streamed_key(tmp_path / "s.npz", np.ones(16, np.float32), 500,
                                          lambda i: f"step{i // 50:05d}/layer{i % 50:02d}/activation")
    assert per_key < 700, per_key
    lg.close()
    d = reprod.load(tmp_path / "s.npz")
    assert len(d) == 20500 and d["step00399/layer49/activation"].sum() == 16


def test_streaming_metadata_keeps_order_and_replacement(tmp_path):
    lg = ReprodLogger(stream_to=tmp_path / "s.npz")
    lg.add("a", np.ones(2))
    lg.add("b", {"c": np.zeros(1), "e": {}})
    lg.add("\udcffodd", 3)
    lg.add("a", np.zeros(5))  # replaces, keeps its place
    assert lg.keys() == ["a", "b", "\udcffodd"]
    lg.close()
    d = reprod.load(tmp_path / "s.npz")
    assert list(d) == ["a", "b", "\udcffodd"]
    assert d["a"].shape == (5,) and list(d["b"]) == ["c", "e"] and d["\udcffodd"] == 3


def _stream_sequence(lg: ReprodLogger) -> None:
    rng = np.random.default_rng(5)
    for i in range(40):
        lg.add(f"k{i}", rng.standard_normal(3).astype(np.float32))
        if i == 3:
            lg.add("nested", {"a": np.ones(2), "e": {}, "b": {"c": np.zeros(1)}})
        if i == 20:
            lg.add("k2", np.full(4, 2.0))  # re-added after the spill
            lg.add("\udcffodd", 7)  # a lone surrogate after the spill
        if i == 30:
            lg.add("k25", np.full(2, 25.0))  # a key first added after the spill, re-added
            lg.add("k2", np.full(5, 3.0))


def test_stream_spilled_to_disk_writes_the_same_dump(tmp_path, monkeypatch):
    """Past _KeyLog.spill keys (and past _CENTRAL_SPILL bytes of directory) the writer keeps its
    per-key state on disk; the dump is the one it writes with everything in memory."""
    import zipfile

    from reprod.storage import npz_writer

    lg = ReprodLogger(stream_to=tmp_path / "mem.npz")
    _stream_sequence(lg)
    mem_keys = lg.keys()
    lg.close()
    monkeypatch.setattr(npz_writer._KeyLog, "spill", 5)
    monkeypatch.setattr(npz_writer, "_CENTRAL_SPILL", 300)
    lg = ReprodLogger(stream_to=tmp_path / "disk.npz")
    _stream_sequence(lg)
    assert lg._writer._keys.db is not None and lg._writer._central_file is not None
    assert lg.keys() == mem_keys
    lg.close()
    with zipfile.ZipFile(tmp_path / "mem.npz") as a, zipfile.ZipFile(tmp_path / "disk.npz") as b:
        assert a.namelist() == b.namelist()
        assert a.read("__reprod__.json") == b.read("__reprod__.json")
        assert b.testzip() is None
    x, y = reprod.load(tmp_path / "mem.npz", verify=True), reprod.load(tmp_path / "disk.npz", verify=True)
    assert list(x) == list(y) == mem_keys
    assert y["k2"].tolist() == [3.0] * 5 and y["k25"].tolist() == [25.0, 25.0] and y["\udcffodd"] == 7
    assert list(y["nested"]) == ["a", "e", "b"]


def test_stream_memory_stays_flat_past_the_spill(tmp_path, monkeypatch):
    """Keys past the spill cost the writer (almost) no memory: 20,000 of them add < 60 bytes each."""
    from reprod.storage import npz_writer

    monkeypatch.setattr(npz_writer._KeyLog, "spill", 1000)
    monkeypatch.setattr(npz_writer, "_CENTRAL_SPILL", 1 << 16)
    lg, per_key = _bytes_per_streamed_key(tmp_path / "s.npz", np.ones(4, np.float32), 2000,
                                          lambda i: f"step{i // 50:05d}/layer{i % 50:02d}")
    assert per_key < 60, per_key
    lg.close()
    d = reprod.load(tmp_path / "s.npz")
    assert len(d) == 22000 and list(d)[1999:2001] == ["warm1999", "step00000/layer00"]


def test_stream_spill_from_another_thread_and_without_sqlite(tmp_path, monkeypatch):
    import builtins
    import threading

    from reprod.storage import npz_writer

    monkeypatch.setattr(npz_writer._KeyLog, "spill", 3)
    lg = ReprodLogger(stream_to=tmp_path / "t.npz")
    for i in range(5):
        lg.add(f"a{i}", i)
    worker = threading.Thread(target=lambda: [lg.add(f"b{i}", i) for i in range(5)])
    worker.start()
    worker.join()
    lg.close()
    assert list(reprod.load(tmp_path / "t.npz")) == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    real_import = builtins.__import__

    def no_sqlite(name, *args, **kwargs):
        if name == "sqlite3":
            raise ImportError("no sqlite3 here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sqlite)
    lg = ReprodLogger(stream_to=tmp_path / "u.npz")
    for i in range(6):
        lg.add(f"c{i}", i)
    assert lg._writer._keys.db is None and lg.keys() == [f"c{i}" for i in range(6)]
    lg.close()
    assert reprod.load(tmp_path / "u.npz")["c5"] == 5
