"""Many small keys (issues 20 and 23): what a key costs in memory, the batch's lazily built
results, the JSON written a key at a time, and reprod_log files of small, shared or int-keyed
arrays viewed in place."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import pickle
import random
import tracemalloc

import numpy as np
import pytest

import reprod
from reprod import _native
from reprod.cli import main
from reprod.diff.result import KeyResult, RowKeyResult
from reprod.report.data import _jsonable, iter_json, to_json
from reprod.storage.pickle_stubs import _Memo

needs_kernel = pytest.mark.skipif(_native.kernel() is None, reason="compiled kernel not built")


def _pair(n: int, size: int = 2, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    vals = rng.standard_normal((n, size)).astype(np.float32)
    ref = {f"block{i // 100}/layer{i % 100}.out": vals[i] for i in range(n)}
    bad = vals.copy()
    bad[7::50] *= np.float32(1 + 1e-3)
    other = {k: bad[i] for i, k in enumerate(ref)}
    return ref, other


def _write(tmp_path, ref: dict, other: dict, fmt: str) -> tuple[str, str]:
    a, b = str(tmp_path / f"a.{fmt}"), str(tmp_path / f"b.{fmt}")
    if fmt == "npy":  # reprod_log's own format: np.save of the dict
        np.save(a, ref, allow_pickle=True)
        np.save(b, other, allow_pickle=True)
    else:
        reprod.save(a, ref)
        reprod.save(b, other)
    return a, b


@needs_kernel
@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_lazy_results_equal_the_per_key_path(tmp_path, monkeypatch, fmt):
    from reprod.diff import batch

    ref, other = _pair(300)
    a, b = _write(tmp_path, ref, other, fmt)
    for opts in ({}, {"method": ["max", "mean_rel"], "atol": 1e-4},
                 {"per_key": {"block1/*": 1e-2, "block2/layer7.out": {"max": 1e-9}}}):
        fast = reprod.compare(a, b, progress=False, **opts)
        monkeypatch.setattr(batch, "_BATCH_MAX", 0)
        slow = reprod.compare(a, b, progress=False, **opts)
        monkeypatch.undo()
        assert sum(type(r) is RowKeyResult for r in fast) == 300  # every key batched
        assert not any(type(r) is RowKeyResult for r in slow)
        assert list(fast) == list(slow)
        # the creation time is the only field that may differ (two runs a second apart)
        fd, sd = fast.to_dict(), slow.to_dict()
        fd.pop("created", None), sd.pop("created", None)
        assert fd == sd
        assert fast.summary() == slow.summary()
        for x, y in zip(fast, slow):
            assert (x.key, x.status, x.passed, x.reason) == (y.key, y.status, y.passed, y.reason)
            assert vars(x) == vars(y)
            # what code building on a result gets is a plain KeyResult with the same fields
            for made in (dataclasses.replace(x), pickle.loads(pickle.dumps(x)), copy.copy(x),
                         copy.deepcopy(x)):
                assert type(made) is KeyResult and made == y
            assert type(dataclasses.replace(x, reason="r")) is KeyResult
            with pytest.raises(dataclasses.FrozenInstanceError):
                x.reason = "changed"  # type: ignore[misc]
            with pytest.raises(TypeError):
                hash(x)  # as a dataclass with dict fields: unhashable


@needs_kernel
def test_memory_per_key_is_small(tmp_path):
    """Two opened reprod_log dumps and their comparison hold well under a KiB a key (a plain
    KeyResult alone held ~1.5 KiB; a key of a loaded dump ~700 bytes): the growth from 2,000 to
    8,000 keys, so that fixed costs (imports, caches, the kernel's scratch) do not count."""
    held = []
    for n in (2000, 8000):
        a, b = _write(tmp_path, *_pair(n), "npy")
        reprod.compare(a, b, progress=False)  # warm: imports and caches
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
    per_key = (held[1] - held[0]) / 6000
    assert per_key < 800, per_key


def test_json_pieces_are_the_whole_document(tmp_path):
    ref, other = _pair(40, size=5)
    other["block0/layer3.out"] = np.array([np.nan, 1, 2, 3, np.inf], np.float32)
    ref["only_ref"] = np.ones(2)
    other["nest"] = {"x": np.zeros(1)}
    for opts in ({}, {"method": "all", "atol": 1e-3, "per_key": {"block0/*": {"max": np.inf}}}):
        result = reprod.compare(ref, other, progress=False, **opts)
        for indent in (2, 4, 0, None):
            whole = json.dumps(_jsonable(result.to_dict()), indent=indent, allow_nan=False)
            assert "".join(iter_json(result, indent=indent)) == whole
            assert to_json(result, indent=indent) == whole


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_cli_json_output_is_written_a_key_at_a_time(tmp_path, capsys, fmt):
    a, b = _write(tmp_path, *_pair(500), fmt)
    out = tmp_path / "out.json"
    assert main([a, b, "--format", "json", "--output", str(out), "--quiet"]) == 1
    result = reprod.compare(a, b, progress=False)
    doc = json.loads(out.read_text())
    assert doc["summary"] == result.summary() and len(doc["keys"]) == 500
    text = to_json(result) + "\n"
    created = json.loads(text)["created"]
    assert out.read_text() == text.replace(created, doc["created"])


def test_legacy_small_shared_and_int_keyed_arrays_are_viewed_in_place(tmp_path):
    """reprod_log files whose arrays are tiny (a scalar loss, a 2-element vector), shared by many
    keys (the pickle's memo), or keyed by ints (``add(3, x)``): each key views the file, so the
    batch takes it, with numpy's values."""
    x = np.arange(3, dtype=np.float32)
    data = {0: x, 1: x, 2: np.float64(2.5) * np.ones(1), "s": np.array([1.5], np.float32),
            3: np.arange(4, dtype=np.float64).reshape(2, 2)}
    p = str(tmp_path / "d.npy")
    np.save(p, data, allow_pickle=True)
    d = reprod.load(p)
    assert list(d) == ["0", "1", "2", "s", "3"]
    for k, v in zip(d, data.values()):
        assert d.in_file(k) is not None, k  # no loader: a view of the file
        np.testing.assert_array_equal(d[k], v)
        assert d[k].dtype == v.dtype
    # one payload, as the pickle shares it: the same bytes of the file, and one copy in to_dict
    assert d.spec("0") == d.spec("1") and d.spec("0").offset != d.spec("2").offset
    copied = d.to_dict()
    assert copied["0"] is copied["1"] and copied["0"] is not copied["2"]


def test_int_keyed_dump_compares_like_reprod_log(tmp_path):
    rl = pytest.importorskip("reprod_log")
    rng = np.random.default_rng(3)
    ref = {i: rng.standard_normal(3).astype(np.float32) for i in range(200)}
    other = {i: v * np.float32(1 + (1e-3 if i % 17 == 0 else 0)) for i, v in ref.items()}
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, ref, allow_pickle=True)
    np.save(b, other, allow_pickle=True)
    result = reprod.compare(a, b, method="max", threshold=1e-5, progress=False)
    helper = rl.ReprodDiffHelper()
    helper.compare_info(helper.load_info(a), helper.load_info(b))
    expected = {str(k) for k, v in helper.diff_dict.items() if v["max"] > 1e-5}
    assert {r.key for r in result if not r.passed} == expected == {str(i) for i in range(0, 200, 17)}


def test_memo_behaves_as_a_dict():
    rnd = random.Random(0)
    for _ in range(200):
        memo, ref = _Memo(), {}
        for _ in range(60):
            op = rnd.random()
            if op < 0.6:
                v = object()
                memo.add(v)
                ref[len(ref)] = v
            elif op < 0.8:
                i = rnd.choice([len(ref), rnd.randrange(-2, len(ref) + 3)])
                v = object()
                memo[i] = v
                ref[i] = v
            else:
                i = rnd.randrange(-2, len(ref) + 3)
                assert (i in memo) == (i in ref)
                assert memo.get(i) is ref.get(i)
                if i in ref:
                    assert memo[i] is ref[i]
                else:
                    with pytest.raises(KeyError):
                        memo[i]
            assert len(memo) == len(ref)


def test_npz_metadata_is_read_when_asked_for(tmp_path):
    p = str(tmp_path / "m.npz")
    reprod.save(p, {"a": np.ones(2), "b": {"c": np.zeros(3)}})
    d = reprod.load(p)
    meta = d.meta
    assert meta["format"] == "reprod-npz" and [e["path"] for e in meta["keys"]] == [["a"], ["b", "c"]]
    assert d["b"].meta == meta and d.meta is meta


@needs_kernel
def test_single_numbers_batched_equal_the_per_key_path(tmp_path, monkeypatch):
    """A reprod_log file's Python ints and floats and numpy scalars (0-d arrays behind a loader)
    go through the kernel as float64 values: every field equal to the per-key path's, in JSON
    too (int-valued statistics stay floats either way)."""
    from reprod.diff import batch

    rng = np.random.default_rng(5)
    ref, other = {}, {}
    for i in range(900):
        kind = i % 9
        if kind == 0:
            a = int(rng.integers(-1000, 1000))
            b = a + int(i % 7 == 0)
        elif kind == 1:
            a = float(rng.standard_normal())
            b = a * (1 + 1e-7 * (i % 5))
        elif kind == 2:
            a = np.float32(rng.standard_normal())
            b = np.float32(a * np.float32(1 + 1e-3 * (i % 3 == 0)))
        elif kind == 3:
            a, b = np.int64(rng.integers(-5, 5)), np.int32(3)
        elif kind == 4:
            a, b = 0, 0
        elif kind == 5:
            a, b = 0.0, 1e-9
        elif kind == 6:  # NaN and ints beyond 2**53: the per-key path
            a = b = float("nan") if i % 2 else 2**60
        elif kind == 7:
            a, b = np.uint8(200), np.int8(-3)
        else:
            a, b = True, False
        ref[i], other[i] = a, b
    pa, pb = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(pa, ref, allow_pickle=True)
    np.save(pb, other, allow_pickle=True)
    for opts in ({}, {"method": ["max", "mean_rel", "rel_l2", "max_scaled", "min"], "atol": 1e-6,
                      "rtol": 1e-3},
                 {"per_key": {"1*": 1e-2}, "equal_nan": True}):
        fast = reprod.compare(pa, pb, progress=False, **opts)
        monkeypatch.setattr(batch, "_BATCH_MAX", 0)
        slow = reprod.compare(pa, pb, progress=False, **opts)
        monkeypatch.undo()
        assert sum(type(r) is RowKeyResult for r in fast) >= 500
        assert list(fast) == list(slow)
        # the creation time is the only field that may differ (two runs a second apart)
        fd, sd = fast.to_dict(), slow.to_dict()
        fd.pop("created", None), sd.pop("created", None)
        assert json.dumps(fd) == json.dumps(sd)
