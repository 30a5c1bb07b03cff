"""Issue 20: a comparison drops the specs of the dumps it opened itself as it goes (never those of a
dump the caller passed), and the batch's results keep what they need without the specs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_many_keys import _write as write_pair

import reprod
import reprod.storage as storage
from reprod import _native
from reprod.diff import batch
from reprod.diff.result import RowKeyResult
from reprod.storage.lazy import Dump

needs_kernel = pytest.mark.skipif(_native.kernel() is None, reason="compiled kernel not built")


def _dumps(tmp_path, fmt: str, n: int = 600) -> tuple[str, str]:
    rng = np.random.default_rng(1)
    ref = {f"b{i // 100}/k{i}": rng.standard_normal(3).astype(np.float32) for i in range(n)}
    ref["nested"] = {"x": np.arange(4.0), "y": np.ones((2, 2), np.float32)}
    other = {k: (v * np.float32(1.001) if isinstance(v, np.ndarray) and k.endswith("7") else v)
             for k, v in ref.items()}
    return write_pair(tmp_path, ref, other, fmt)


def _recording_load() -> tuple[list[Dump], Any, Any]:
    """(the dumps opened so far, storage.load, a load that records what it opens)."""
    opened: list[Dump] = []
    real = storage.load

    def recording(*args: Any, **kw: Any) -> Dump:
        d = real(*args, **kw)
        opened.append(d)
        return d

    return opened, real, recording


@needs_kernel
@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_dumps_opened_from_paths_are_released_as_compared(tmp_path, monkeypatch, fmt):
    a, b = _dumps(tmp_path, fmt)
    opened, real, recording = _recording_load()
    # the caller's dumps: compared, never changed
    with reprod.load(a) as da, reprod.load(b) as db:
        given = reprod.compare(da, db, progress=False)
        assert all(isinstance(da[k], (np.ndarray, Dump)) for k in da)
        assert all(type(db.spec(k)).__name__ in ("ArraySpec", "Dump") for k in db)
        assert np.array_equal(db["nested"]["x"], np.arange(4.0))
    monkeypatch.setattr(storage, "load", recording)
    owned = reprod.compare(a, b, progress=False)
    assert len(opened) == 2
    # every leaf compared was dropped from the dumps the comparison opened (the keys stay)
    for d in opened:
        assert len(d) == 601
        assert all(d._tree[k] is None for k in d if k != "nested")
        assert all(v is None for v in d._tree["nested"].values())
    assert owned.to_dict()["keys"] == given.to_dict()["keys"]
    assert sum(type(r) is RowKeyResult for r in owned) >= 600


@needs_kernel
def test_released_dumps_with_extra_and_missing_keys(tmp_path):
    ref = {f"k{i}": np.full(2, i, np.float32) for i in range(5000)}
    other = {k: v for k, v in ref.items() if k != "k4500"}
    other["zz"] = np.zeros(3)
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, ref, allow_pickle=True)
    np.save(b, other, allow_pickle=True)
    r = reprod.compare(a, b, progress=False)
    with reprod.load(a) as da, reprod.load(b) as db:
        assert r.to_dict()["keys"] == reprod.compare(da, db, progress=False).to_dict()["keys"]
    assert [k.key for k in r if k.status in ("missing", "extra")] == ["k4500", "zz"]


@needs_kernel
def test_window_of_many_distinct_shapes_equals_the_per_key_path(tmp_path, monkeypatch):
    """More than 256 distinct (shape, dtype) layouts in one window: the window keeps them as a
    list, not as byte codes; every field is as the per-key path gives it."""
    rng = np.random.default_rng(2)
    ref = {f"k{i}": rng.standard_normal(i + 1).astype(np.float32 if i % 2 else np.float64)
           for i in range(400)}
    other = {k: v * v.dtype.type(1.0001) for k, v in ref.items()}
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    reprod.save(a, ref)
    reprod.save(b, other)
    fast = reprod.compare(a, b, progress=False, atol=1e-5)
    monkeypatch.setattr(batch, "_BATCH_MAX", 0)
    slow = reprod.compare(a, b, progress=False, atol=1e-5)
    assert sum(type(r) is RowKeyResult for r in fast) == 400
    assert list(fast) == list(slow)
    for x, y in zip(fast, slow):
        assert vars(x) == vars(y)


def test_coded_values():
    c = batch._Coded(["a", "b", "a", "c"])
    assert [c[i] for i in range(4)] == ["a", "b", "a", "c"] and len(c) == 4
    assert isinstance(c.codes, bytes)
    many = [(i,) for i in range(300)] + [(0,)]
    c = batch._Coded(many)
    assert c.codes is None and [c[i] for i in range(301)] == many and len(c) == 301


@needs_kernel
def test_results_keep_no_specs(tmp_path):
    """What a comparison of many small keys keeps once it returns: its results, ~280 bytes a key
    (the key, a row of statistics, a result object); the dumps' specs are not among them (they
    were 570 a key when the windows held both sides' specs). Growth from 2,000 to 8,000 keys."""
    import gc
    import tracemalloc

    held = []
    for n in (2000, 8000):
        rng = np.random.default_rng(0)
        vals = rng.standard_normal((n, 2)).astype(np.float32)
        ref = {f"block{i // 100}/layer{i % 100}.out": vals[i] for i in range(n)}
        other = {k: v * np.float32(1.001) if i % 50 == 7 else v for i, (k, v) in enumerate(ref.items())}
        a, b = str(tmp_path / f"a{n}.npy"), str(tmp_path / f"b{n}.npy")
        np.save(a, ref, allow_pickle=True)
        np.save(b, other, allow_pickle=True)
        reprod.compare(a, b, progress=False)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            result = reprod.compare(a, b, progress=False)
            held.append(tracemalloc.get_traced_memory()[0] - before)
        finally:
            tracemalloc.stop()
        assert len(result) == n and not result.passed
        del result
    assert (held[1] - held[0]) / 6000 < 400


@needs_kernel
@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_flat_dumps_held_as_columns_are_released_as_compared(tmp_path, monkeypatch, fmt):
    """A flat dump is held as columns (storage/columns.py): the comparison forgets each compared
    key's row, keeps the keys (an extra key is still found after the walk), and gives the results
    the caller's own open dumps give."""
    from reprod.storage.columns import ColumnTree

    rng = np.random.default_rng(4)
    ref = {f"k{i}": rng.standard_normal(3).astype(np.float32) for i in range(5000)}
    other = {k: v * np.float32(1.001) if k.endswith("7") else v for k, v in ref.items() if k != "k10"}
    other["zz"] = np.zeros(2, np.float32)
    a, b = write_pair(tmp_path, ref, other, fmt)
    opened, real, recording = _recording_load()
    monkeypatch.setattr(storage, "load", recording)
    owned = reprod.compare(a, b, progress=False)
    monkeypatch.setattr(storage, "load", real)
    assert [type(d._tree) for d in opened] == [ColumnTree, ColumnTree]
    ref_rows, other_rows = (d._tree._rows for d in opened)
    assert all(v is None for k, v in ref_rows.items() if k != "k10")
    assert ref_rows["k10"] is None or isinstance(ref_rows["k10"], int)
    assert other_rows["zz"] is not None  # extra: never compared, never released
    with reprod.load(a) as da, reprod.load(b) as db:
        given = reprod.compare(da, db, progress=False)
        assert all(type(da._tree._rows[k]) is int for k in da)  # the caller's: untouched
    assert owned.to_dict()["keys"] == given.to_dict()["keys"]
    assert [r.key for r in owned if r.status in ("missing", "extra")] == ["k10", "zz"]
    assert sum(r.status == "failed" for r in owned) == sum(k.endswith("7") for k in ref if k != "k10")
