"""The fast paths for dumps of many small keys give exactly what the general paths give.

* the engine's batch (``batch.compare_batch`` + ``_kernel.stats_many``) against the per-key
  path (``_compare_pair`` + ``compute_stats``), every KeyResult field;
* the walker's compiled item scanner (``_kernel.scan_items``) against its Python loop: same tree,
  same step count, or the same error, on valid and on mutated files.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import zlib

import numpy as np
import pytest

import reprod
from reprod import _native
from reprod._gc import gc_paused
from reprod.diff import batch, engine, metrics
from reprod.errors import DumpFormatError
from reprod.storage import legacy, npy_header, pickle_walker
from reprod.storage.lazy import ArraySpec, MappedFile

needs_kernel = pytest.mark.skipif(not metrics.kernel_available(), reason="compiled kernel not built")


def _dumps(rng: np.random.Generator) -> tuple[dict, dict]:
    """Pairs of every kind the batch takes or must hand back: dtypes, shapes, noise, NaN, Inf,
    overflow, underflow, zeros, Fortran order, mixed precision, nested keys."""
    ref: dict = {}
    other: dict = {}
    i = 0

    def add(a: np.ndarray, b: np.ndarray) -> None:
        nonlocal i
        ref[f"k{i:03d}"], other[f"k{i:03d}"] = a, b
        i += 1

    for dt in (np.float32, np.float64):
        for shape in [(), (1,), (64,), (100,), (3, 70), (2, 3, 40), (2, 2, 3, 20), (5000,)]:
            a = rng.standard_normal(shape).astype(dt)
            add(a, a.copy())
            add(a, (a * (1 + 1e-6)).astype(dt))
            add(a, (a + rng.standard_normal(shape) * 1e-3).astype(dt))
            add(a, (a + 1e-4).astype(np.float64 if dt == np.float32 else np.float32))
    base = rng.standard_normal((40, 30)).astype(np.float32)
    add(np.asfortranarray(base), base + 1e-4)
    add(base, np.asfortranarray(base + 1e-4))
    for pos, val in (((3, 4), np.nan), ((-1, -1), np.inf), ((0, 0), -np.inf)):
        b = base.copy()
        b[pos] = val
        add(base, b)
        c = base.copy()
        c[pos] = val
        add(c, b.copy())
    add(np.full(100, 1e308), np.full(100, -1e308))
    add(np.full(100, 1e200), np.full(100, 1.1e200))
    add(np.full(100, 1e-200), np.full(100, 1.1e-200))
    add(np.full(100, 3e38, np.float32), np.full(100, -3e38, np.float32))
    add(np.zeros(100, np.float32), np.zeros(100, np.float32))
    add(np.zeros(100, np.float32), np.ones(100, np.float32))
    add(np.ones(100, np.float32), np.zeros(100, np.float32))
    add(np.ones((10, 10), np.float32), np.ones((100,), np.float32))
    add(np.ones((10, 10), np.float32), np.ones((10, 11), np.float32))
    add(np.arange(100, dtype=np.int64), np.arange(100, dtype=np.int64))
    add(np.arange(100, dtype=np.float32).astype(">f4"), np.arange(100, dtype=np.float32))
    ref["nested"] = {"a": rng.standard_normal(300), "b": {"c": rng.standard_normal(77).astype(np.float32)}}
    other["nested"] = {"a": ref["nested"]["a"] * 1.001, "b": {"c": ref["nested"]["b"]["c"].copy()}}
    ref["only_ref"] = np.ones(300)
    other["only_other"] = np.ones(300)
    return ref, other


OPTIONS = [
    {},
    {"method": "all", "threshold": 1e-5, "atol": 1e-6, "rtol": 1e-5},
    {"method": ["max_rel", "mean"], "per_key": {"k00*": 1e-2, "nested/*": {"max": 1e-9, "atol": 0.1}}},
    {"equal_nan": True, "atol": 0.0, "rtol": 0.0},
    {"threshold": None},
]


@needs_kernel
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_batch_equals_general_path(tmp_path, monkeypatch, suffix):
    ref, other = _dumps(np.random.default_rng(3))
    a, b = str(tmp_path / f"ref{suffix}"), str(tmp_path / f"other{suffix}")
    reprod.save(a, ref)
    reprod.save(b, other)
    batched = []
    real = batch.compare_batch

    def counting(pairs, *args, **kw):
        out = real(pairs, *args, **kw)
        batched.append(sum(r is not None for r in out))
        return out

    for opts in OPTIONS:
        monkeypatch.setattr(engine, "compare_batch", counting)
        fast = reprod.compare(a, b, progress=False, **opts)
        monkeypatch.undo()
        monkeypatch.setattr(batch, "_BATCH_MAX", 0)
        slow = reprod.compare(a, b, progress=False, **opts)
        monkeypatch.undo()
        assert fast.keys() == slow.keys()
        for x, y in zip(fast, slow):
            assert x == y, x.key
            assert list(x.__dict__) == [f.name for f in dataclasses.fields(x)]
    # the batch took most keys (not the ones with NaN, Inf, huge or odd values)
    assert len(batched) == len(OPTIONS) and min(batched) >= 50


@needs_kernel
def test_batch_takes_nothing_it_cannot_view(tmp_path, monkeypatch):
    """In-memory mappings, bf16 (a loader widens it) and keys above the batch size go the general
    way; results are the same either way."""
    monkeypatch.setattr(batch, "_BATCH_MAX", 100)
    ref = {"big": np.arange(1000, dtype=np.float32), "small": np.arange(50, dtype=np.float32)}
    other = {k: v + 1e-3 for k, v in ref.items()}
    r = reprod.compare(ref, other, progress=False)
    assert [k.status for k in r] == ["failed", "failed"]
    reprod.save(tmp_path / "a.npz", ref)
    reprod.save(tmp_path / "b.npz", other)
    d = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False)
    for x, y in zip(r, d):
        assert dataclasses.replace(x) == y


@needs_kernel
def test_stats_many_refuses_ranges_outside_its_buffers():
    buf = np.zeros(16, np.float32).tobytes()
    out = np.empty((1, len(metrics.ROW_COLUMNS)))
    tols = np.zeros((1, 2))
    none = [0, -1, 0]

    def run(job, jobs=None):
        jobs = np.array(job + none + none if len(job) == 5 else job, np.int64) if jobs is None else jobs
        _native.built().stats_many(buf, buf, jobs, tols, out, 8192, False)

    for job in ([0, 0, 17, 0, 0], [-4, 0, 1, 0, 0], [0, 60, 2, 0, 0], [0, 0, 1, 4, 0], [0, 0, 9, 3, 0],
                [0, 0, 4, 0, 0, 60, 8, 0] + none, [0, 0, 4, 0, 0] + none + [-1, 4, 0],
                [0, 0, 4, 0, 0, 0, 65, 0] + none):
        with pytest.raises(ValueError):
            run(job)
    with pytest.raises(ValueError):  # jobs and out disagree on the number of pairs
        run(None, jobs=np.zeros(10, np.int64))
    run([0, 0, 16, 0, 0])
    assert out[0, 0] == 16 and out[0, 6] == 0.0 and list(out[0, metrics.COL["crc_ref"]:]) == [-1.0, -1.0]
    good = zlib.crc32(buf[8:40])
    run([0, 0, 16, 0, 0, 8, 32, good, 8, 32, good ^ 1])
    assert list(out[0, metrics.COL["crc_ref"]:]) == [1.0, 0.0]


@needs_kernel
def test_kernel_crc32_is_zlibs():
    """Every length up to a few folds, odd offsets, running values, both loops."""
    data = np.random.default_rng(9).integers(0, 256, 70_000, dtype=np.uint8).tobytes()
    crc32 = _native.built().crc32
    for n in [*range(0, 200), 255, 256, 1000, 4095, 4096, 5000, 65536, 65537, 69_990]:
        for off in (0, 1, 5, 15):
            chunk = data[off : off + n]
            for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
                expected = zlib.crc32(chunk, value)
                assert crc32(chunk, value) == expected, (n, off, value)
                assert crc32(chunk, value, False) == expected, (n, off, value)
    assert crc32(memoryview(data)[3:], 7) == zlib.crc32(data[3:], 7)


@needs_kernel
@pytest.mark.parametrize("batched", [True, False])
def test_member_crcs_are_checked(tmp_path, monkeypatch, batched):
    """A flipped byte in one small member of a many-key .npz: compare names that key, whether the
    checksums run in the batch kernel call or in Dump.__getitem__; good members are recorded as
    verified where they are large enough for that to pay (a small one is checked again when read
    again)."""
    if not batched:
        monkeypatch.setattr(batch, "_BATCH_MAX", 0)
    rng = np.random.default_rng(2)
    tree = {f"k{i}": rng.standard_normal(200 + i).astype(np.float32) for i in range(50)}
    # 10 members over REMEMBER_VERIFIED bytes (float32: 4 bytes an element)
    tree.update({f"big{i}": rng.standard_normal(1100 + i).astype(np.float32) for i in range(10)})
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    reprod.save(a, tree)
    reprod.save(b, tree)
    assert reprod.compare(a, b, progress=False).passed
    d = reprod.load(b)
    reprod.compare(reprod.load(a), d, progress=False)
    starts = {d.spec(f"big{i}").check[0] for i in range(10)}
    assert d.mapped_file.verified == starts
    raw = bytearray(b.read_bytes())
    at = raw.index(tree["k17"].tobytes()[100:140])
    raw[at] ^= 0x10
    b.write_bytes(bytes(raw))
    with pytest.raises(DumpFormatError, match=r"b\.npz: key 'k17': checksum mismatch"):
        reprod.compare(a, b, progress=False)
    # without checks the flipped byte is only a (tiny) numeric difference
    r = reprod.compare(reprod.load(a), reprod.load(b, verify=False), progress=False, threshold=None)
    assert r["k17"].max_abs > 0 and r["k16"].max_abs == 0


def _walk(path: str) -> tuple:
    """(tree as comparable data, steps) from the walker, or the error text."""
    mf = MappedFile(path)
    try:
        d = legacy.read_npy(mf, "x")
        return "ok", _plain(d._tree)
    except DumpFormatError as exc:
        return "error", str(exc)
    finally:
        mf.close()


def _plain(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _plain(v)
        else:
            assert isinstance(v, ArraySpec)
            out[k] = (str(v.dtype), v.shape, v.offset if v.loader is None else
                      v.materialize(None).tobytes(), v.fortran)
    return out


def _legacy_dump(path: str, rng: np.random.Generator) -> None:
    tree = {}
    for i in range(60):
        dt = [np.float32, np.float64, np.int64, np.float16, ">f4", np.uint8, np.complex64][i % 7]
        shape = [(), (5,), (70,), (3, 100), (2, 3, 50), (2, 2, 2, 40), (0,)][(i // 7) % 7]
        a = (rng.standard_normal(shape) * 10).astype(dt)
        if i % 11 == 3:
            a = np.asfortranarray(a)
        key = [f"k{i}", f"ü-{i}", "x" * 300 + str(i), f"\udcff{i}"][i % 4]
        tree[key] = a
    tree["nested"] = {"a": np.ones(100), "b": 3.5}
    np.save(path, tree, allow_pickle=True)


@needs_kernel
def test_scanner_and_python_walk_agree(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    path = str(tmp_path / "d.npy")
    _legacy_dump(path, rng)
    fast = _walk(path)
    assert fast[0] == "ok" and len(fast[1]) == 61
    monkeypatch.setattr(_native, "_enabled", False)
    assert _walk(path) == fast


@needs_kernel
def test_scanner_and_python_walk_agree_on_mutated_files(tmp_path, monkeypatch):
    """One-byte mutations (and truncations) of a legacy dump: the scanner path and the Python path
    load the same tree or raise the same error."""
    rng = np.random.default_rng(11)
    src = str(tmp_path / "d.npy")
    _legacy_dump(src, rng)
    data = open(src, "rb").read()
    mutated = str(tmp_path / "m.npy")
    for trial in range(300):
        b = bytearray(data)
        if trial % 10 == 9:
            b = b[: int(rng.integers(200, len(b)))]
        else:
            # mostly the opcode region around the first arrays, where the patterns are
            pos = int(rng.integers(128, min(len(b), 6000))) if trial % 2 else int(rng.integers(128, len(b)))
            b[pos] = int(rng.integers(0, 256))
        with open(mutated, "wb") as f:
            f.write(bytes(b))
        monkeypatch.setattr(_native, "_enabled", True)
        fast = _walk(mutated)
        monkeypatch.setattr(_native, "_enabled", False)
        slow = _walk(mutated)
        assert fast == slow, trial


@needs_kernel
def test_scanner_steps_match(tmp_path, monkeypatch):
    """The expansion budget counts opcodes: both paths count the same number."""
    path = str(tmp_path / "d.npy")
    np.save(path, {f"k{i}": np.arange(i % 50 + 1, dtype=np.float32) for i in range(500)}, allow_pickle=True)
    steps = []
    for on in (True, False):
        monkeypatch.setattr(_native, "_enabled", on)
        mf = MappedFile(path)
        buf = mf.buffer()
        _, _, _, off = npy_header.parse_npy_header(buf, 0, mf.size, path)
        w = pickle_walker._PickleWalker(buf, off, mf.size, path)
        w.run()
        steps.append(w.steps)
        mf.close()
    assert steps[0] == steps[1] > 500 * 20


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with gc_paused():
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_kernel_off_still_compares(tmp_path):
    """REPROD_KERNEL=0 in a fresh process: neither the batch nor the scanner runs, same verdicts."""
    import subprocess
    import sys

    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, {"x": np.arange(300, dtype=np.float32), "y": np.ones(400)}, allow_pickle=True)
    np.save(b, {"x": np.arange(300, dtype=np.float32) + 1, "y": np.ones(400)}, allow_pickle=True)
    code = ("import reprod, sys; r = reprod.compare(sys.argv[1], sys.argv[2], progress=False); "
            "print([k.status for k in r], r['x'].max_abs)")
    outs = []
    for flag in ("0", "1"):
        env = dict(os.environ, REPROD_KERNEL=flag)
        outs.append(subprocess.run([sys.executable, "-c", code, str(a), str(b)], env=env,
                                   capture_output=True, text=True, check=True).stdout)
    assert outs[0] == outs[1] == "['failed', 'passed'] 1.0\n"


def test_array_spec_in_file_is_what_init_builds():
    dt = np.dtype(np.float32)
    fast = ArraySpec.in_file(dt, (2, 3), 128, True, "bfloat16", (64, 88, 12345))
    slow = ArraySpec(dtype=dt, shape=(2, 3), offset=128, fortran=True, source_dtype="bfloat16",
                     check=(64, 88, 12345))
    assert fast == slow and hash(fast) == hash(slow)
    # slotted (a dump holds one per key): every field set, to what __init__ sets
    assert not hasattr(fast, "__dict__")
    names = [f.name for f in dataclasses.fields(ArraySpec)]
    assert [getattr(fast, n) for n in names] == [getattr(slow, n) for n in names]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.offset = 0  # type: ignore[misc]


def test_crc_mismatch_names_the_key_and_closing_releases_the_mapping(tmp_path):
    path = tmp_path / "d.npz"
    reprod.save(path, {"a": np.arange(1000, dtype=np.float32), "b": np.ones(10)})
    raw = bytearray(path.read_bytes())
    at = raw.index(np.arange(1000, dtype=np.float32).tobytes()[40:60])
    raw[at] ^= 1
    path.write_bytes(bytes(raw))
    d = reprod.load(path)
    assert d["b"].sum() == 10
    with pytest.raises(DumpFormatError, match=r"key 'a': checksum mismatch"):
        d["a"]
    d.close()
    assert d.mapped_file is not None and d.mapped_file.mm is None


@needs_kernel
def test_batch_with_progress_bar_and_key_filter(tmp_path, monkeypatch):
    """The batch under a (forced) progress bar and with --keys globs gives the plain results, and
    the bar counts every byte it was promised."""
    from reprod.diff import progress as progress_mod

    rng = np.random.default_rng(4)
    tree = {f"layer{i}": {"out": rng.standard_normal(300).astype(np.float32)} for i in range(300)}
    other = {k: {"out": v["out"] * 1.0001} for k, v in tree.items()}
    reprod.save(tmp_path / "a.npz", tree)
    reprod.save(tmp_path / "b.npz", other)
    done = []
    real_advance = progress_mod.Progress.advance

    def advance(self, nbytes):
        done.append(nbytes)
        return real_advance(self, nbytes)

    monkeypatch.setattr(progress_mod.Progress, "advance", advance)
    plain = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False)
    barred = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=True)
    assert [k.to_dict() for k in plain] == [k.to_dict() for k in barred]
    assert sum(done) == 300 * 300 * 8
    some = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", progress=False, keys="layer1*/out")
    assert some.keys() == [k for k in plain.keys() if k.startswith("layer1")]
    assert all(x == plain[x.key] for x in some)


@needs_kernel
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_window_columns_are_its_rows_fields(tmp_path, suffix):
    """``_Window.columns`` (what the report writers read of a million keys) holds, field by
    field, what ``field_values`` reads of each key one at a time: passing and failing keys,
    every option set, runs starting and ending anywhere in a window."""
    from reprod.diff.criteria import Criteria
    from reprod.report.fields import field_columns, field_values

    ref, other = _dumps(np.random.default_rng(11))
    a, b = str(tmp_path / f"ref{suffix}"), str(tmp_path / f"other{suffix}")
    reprod.save(a, ref)
    reprod.save(b, other)
    options = [*OPTIONS, {"method": ["rel_l2", "max_scaled", "min"], "threshold": 1e-3},
               {"threshold": float("inf"), "atol": 1e-3},
               {"criteria": Criteria(dtype_tolerances=True)},
               {"method": "max", "per_key": {"k01*": {"atol": 1e-3}}}]
    for opts in options:
        result = reprod.compare(a, b, progress=False, **opts)
        keys = list(result.results)
        assert sum(type(k) is batch.RowKeyResult for k in keys) >= 50, opts
        want = [repr(field_values(k)) for k in keys]
        for size in (len(keys), 1, 7, 64):
            got = []
            for start in range(0, len(keys), size):
                cols = field_columns(keys[start : start + size])
                assert len(cols) == len(dataclasses.fields(reprod.KeyResult))
                got += [repr(row) for row in zip(*cols)]
            assert got == want, (opts, size)
