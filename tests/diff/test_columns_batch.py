"""The column path (``diff/columns_batch.py``) gives exactly what the general paths give.

Two flat dumps with the same keys in the same order skip ``walk_pairs`` and the per-key batch:
every KeyResult field must equal what the per-pair batch (``compare_batch``) and the per-key path
(``_compare_pair``) give on the same files, whatever the dtypes, values, rules and checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_batch_paths import _dumps as _mixed_dumps  # tests/diff, on sys.path under pytest

import reprod
from reprod.diff import batch, columns_batch, engine, metrics
from reprod.diff.result import RowKeyResult
from reprod.errors import DumpChangedError, DumpFormatError

needs_kernel = pytest.mark.skipif(not metrics.kernel_available(), reason="compiled kernel not built")


def _pairs(rng: np.random.Generator) -> tuple[dict, dict]:
    """test_batch_paths' pairs (every kind the batch takes or hands back) made flat, with equal
    key lists, and a few more: empty arrays, large keys, integers and float16."""
    ref, other = _mixed_dumps(rng)
    for k in ("nested", "only_ref", "only_other"):
        ref.pop(k, None)
        other.pop(k, None)
    other = {k: other[k] for k in ref}  # the reference's order
    extra = [(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)),
             (np.ones(70_000, np.float32), np.ones(70_000, np.float32) * 1.5),
             (np.arange(100, dtype=np.int64), np.arange(100, dtype=np.int64) + 1),
             (np.arange(12, dtype=np.float16), np.arange(12, dtype=np.float16))]
    for i, (a, b) in enumerate(extra):
        ref[f"extra{i}/out"], other[f"extra{i}/out"] = a, b
    return ref, other


# the option sets change what the batch decides per key: tolerances per dtype pair or per rule,
# the mismatch count, NaN matching, no statistic at all
OPTIONS = [{}, {"method": "all", "atol": 1e-6, "rtol": 1e-5},
           {"method": "max", "threshold": 1e-4,
            "per_key": {"k00*": 1e-2, "k01*": {"max": 1e-9, "atol": 0.1}}},
           {"equal_nan": True, "rtol": 1e-3}, {"threshold": None, "atol": 0.0}]


def _fields(r: reprod.DiffResult) -> list[dict]:
    return [dataclasses.asdict(k) for k in r]


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the keys the column path's kernel call returned results for."""
    taken: list[int] = []
    real = columns_batch._batch

    def counting(kernel, cp, a, b, policy, start, stop, keys, out):
        real(kernel, cp, a, b, policy, start, stop, keys, out)
        taken.append(sum(type(r) is RowKeyResult for r in out))

    monkeypatch.setattr(columns_batch, "_batch", counting)
    return taken


@needs_kernel
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_column_path_equals_the_general_paths(tmp_path, monkeypatch, suffix):
    ref, other = _pairs(np.random.default_rng(5))
    a, b = str(tmp_path / f"ref{suffix}"), str(tmp_path / f"other{suffix}")
    reprod.save(a, ref)
    reprod.save(b, other)
    for opts in OPTIONS:
        with monkeypatch.context() as m:
            taken = _counting(m)
            fast = reprod.compare(a, b, progress=False, **opts)
        assert taken and taken[0] >= 40, opts  # the column path ran and took most keys
        with monkeypatch.context() as m:
            m.setattr(engine, "column_pairs", lambda *_: None)  # the per-pair batch
            pairwise = reprod.compare(a, b, progress=False, **opts)
        with monkeypatch.context() as m:
            m.setattr(batch, "_BATCH_MAX", 0)  # no batch at all: one key at a time
            per_key = reprod.compare(a, b, progress=False, **opts)
        assert not any(type(r) is RowKeyResult for r in per_key)
        assert _fields(fast) == _fields(pairwise) == _fields(per_key), opts
        assert fast.passed == per_key.passed and [k.status for k in fast] == [k.status for k in per_key]
        for x, y in zip(fast, per_key):
            assert x == y, x.key


@needs_kernel
def test_windows_releases_and_page_drops(tmp_path, monkeypatch):
    """Many windows (a small window size): results in key order, each window's rows released
    from the dumps the comparison opened, and equal to the general path's."""
    rng = np.random.default_rng(1)
    ref = {f"k{i}": rng.standard_normal(3 + i % 5).astype(np.float32) for i in range(103)}
    other = {k: v * (1 + 1e-3 * (i % 7 == 0)) for i, (k, v) in enumerate(ref.items())}
    other["k50"] = other["k50"].astype(np.float64)
    reprod.save(tmp_path / "a.npz", ref)
    reprod.save(tmp_path / "b.npz", other)
    monkeypatch.setattr(engine, "_WINDOW", 10)
    monkeypatch.setattr(engine, "_DROP_EVERY", 2)
    released = []
    real = engine._compare_columns

    def spy(cp, policy, owned, results, names):
        real(cp, policy, owned, results, names)
        released.append([sum(v is None for v in d._tree._rows.values()) for d in (cp.ref, cp.other)])

    monkeypatch.setattr(engine, "_compare_columns", spy)
    r = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False)
    assert released == [[103, 103]]
    assert r.keys() == list(ref)
    assert [k.key for k in r if not k.passed] == [f"k{i}" for i in range(0, 103, 7)]
    monkeypatch.setattr(engine, "column_pairs", lambda *_: None)
    assert _fields(r) == _fields(reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False))


@needs_kernel
def test_dumps_held_by_the_caller_are_not_released(tmp_path):
    tree = {f"k{i}": np.arange(i + 1, dtype=np.float32) for i in range(20)}
    reprod.save(tmp_path / "a.npy", tree)
    reprod.save(tmp_path / "b.npy", tree)
    a, b = reprod.load(tmp_path / "a.npy"), reprod.load(tmp_path / "b.npy")
    first = reprod.compare(a, b, progress=False)
    second = reprod.compare(a, b, progress=False)  # the same opened dumps, compared again
    assert first.passed and second.passed and len(second.results) == 20
    assert _fields(first) == _fields(second)
    assert np.array_equal(a["k7"], tree["k7"])


@needs_kernel
def test_other_key_orders_take_the_general_path(tmp_path, monkeypatch):
    tree = {f"k{i}": np.arange(i + 1, dtype=np.float32) for i in range(30)}
    reprod.save(tmp_path / "a.npz", tree)
    reprod.save(tmp_path / "b.npz", dict(reversed(tree.items())))
    reprod.save(tmp_path / "c.npz", {**tree, "extra": np.ones(3, np.float32)})
    taken = _counting(monkeypatch)
    r = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False)
    assert r.passed and r.keys() == list(tree)
    r = reprod.compare(tmp_path / "a.npz", tmp_path / "c.npz", progress=False)
    assert [k.status for k in r][-1] == "extra"
    assert taken == []  # neither pair has equal key lists
    r = reprod.compare(tmp_path / "a.npz", tmp_path / "a.npz", progress=False, keys="k1*")
    assert taken == [] and r.keys() == ["k1"] + [f"k{i}" for i in range(10, 20)]


@needs_kernel
def test_many_distinct_layouts(tmp_path):
    """More than 256 distinct (shape, dtype) pairs: the window's layout codes no longer fit a
    byte each; results are still the general path's."""
    ref = {f"k{i}": np.linspace(1, 2, i + 1, dtype=np.float32) for i in range(300)}
    other = {k: v + 1e-7 * (int(k[1:]) % 3) for k, v in ref.items()}
    reprod.save(tmp_path / "a.npy", ref)
    reprod.save(tmp_path / "b.npy", other)
    fast = reprod.compare(tmp_path / "a.npy", tmp_path / "b.npy", progress=False, method="max")
    assert all(type(k) is RowKeyResult for k in fast)
    assert fast.keys() == list(ref) and [k.ref_shape for k in fast] == [(i + 1,) for i in range(300)]
    for k in fast:
        assert k.max_abs == pytest.approx(float(np.max(np.abs(other[k.key].astype(np.float64) - ref[k.key]))))


@needs_kernel
@pytest.mark.parametrize("verify", [None, True, False])
def test_member_checksums(tmp_path, verify):
    """A flipped byte in a member: named by the column path as by ``Dump.__getitem__``; members
    that pass are remembered as verified where they are large enough for that to pay."""
    rng = np.random.default_rng(4)
    tree = {f"k{i}": rng.standard_normal(100 + i).astype(np.float32) for i in range(40)}
    tree.update({f"big{i}": rng.standard_normal(1100 + i).astype(np.float32) for i in range(5)})
    reprod.save(tmp_path / "a.npz", tree)
    reprod.save(tmp_path / "b.npz", tree)
    d = reprod.load(tmp_path / "b.npz", verify=verify)
    assert reprod.compare(reprod.load(tmp_path / "a.npz"), d, progress=False).passed
    big = {d.spec(f"big{i}").check[0] for i in range(5)}
    assert d.mapped_file.verified == (set() if verify is False else big)
    raw = bytearray((tmp_path / "b.npz").read_bytes())
    raw[raw.index(tree["k17"].tobytes()[40:80])] ^= 0x10
    (tmp_path / "b.npz").write_bytes(bytes(raw))
    d = reprod.load(tmp_path / "b.npz", verify=False) if verify is False else None
    if verify is False:  # no check: a tiny numeric difference, no error
        r = reprod.compare(tmp_path / "a.npz", d, progress=False, threshold=None)
        assert r.passed and r["k17"].max_abs > 0
    else:
        with pytest.raises(DumpFormatError, match=r"b\.npz: key 'k17': checksum mismatch"):
            reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False)


@needs_kernel
def test_a_truncated_file_is_named(tmp_path):
    tree = {f"k{i}": np.arange(50, dtype=np.float32) + i for i in range(10)}
    reprod.save(tmp_path / "a.npy", tree)
    reprod.save(tmp_path / "b.npy", tree)
    a, b = reprod.load(tmp_path / "a.npy"), reprod.load(tmp_path / "b.npy")
    # the last key's bytes now run past the end of the mapping: its row is left to the per-key
    # path, which says which file and key
    b._tree._offsets[9] = b.mapped_file.size - 8
    with pytest.raises((DumpFormatError, DumpChangedError), match=r"b\.npy.*k9"):
        reprod.compare(a, b, progress=False)
