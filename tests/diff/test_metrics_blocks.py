"""The streamed statistics equal a whole-array numpy computation, whatever the blocks and threads.

``compute_stats`` walks each pair in blocks, cuts large arrays into chunks that threads share, and
sends float32/float64 pairs through the compiled kernel (AVX2 or 2-lane loop) when it is built,
else through numpy. Every one of those paths is checked here against ``whole_array``: one numpy
computation over the whole array in float64, with no blocks, no chunks and no threads. Extremes,
positions and counts must be equal; sums (means, cosine) equal to float64 rounding.

The block grid and the chunk size are made small so that a few thousand elements cross many
block and chunk boundaries, with NaN and Inf placed on them and in the last, partial block.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import reference, scale_aware

from reprod import _native
from reprod.diff import metrics
from reprod.diff.metrics import compute_stats
from reprod.diff.progress import Progress, progress_enabled

IMPLS = ["numpy"]
if _native.built() is not None:
    IMPLS.append("kernel-base")
    try:
        previous = _native.built().set_isa("avx2")
        _native.built().set_isa(previous)
        IMPLS.append("kernel-avx2")
    except ValueError:  # no AVX2 on this CPU, or not an x86-64 build
        pass



@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once per path: numpy, and the compiled kernel's loops where built."""
    name = request.param
    monkeypatch.setattr(_native, "_enabled", name != "numpy")
    if name == "numpy":
        yield name
        return
    previous = _native.built().set_isa(name.split("-")[1])
    try:
        yield name
    finally:
        _native.built().set_isa(previous)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 1,000 elements, so small arrays take the multi-chunk, multi-thread path."""
    monkeypatch.setattr(metrics, "CHUNK", 1000)


@pytest.fixture(params=[1, 3])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = metrics.set_threads(request.param)
    yield request.param
    metrics.set_threads(previous)


# --- the reference: the whole array at once ---------------------------------------------------------


def whole_array(ref: np.ndarray, other: np.ndarray, *, atol: Optional[float] = None,
                rtol: Optional[float] = None, equal_nan: bool = False) -> dict[str, Any]:
    """The float64 oracle (tests/diff/oracle.py) on the whole array at once."""
    return reference(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan)


EXACT = ("size", "counted", "ref_nan", "other_nan", "ref_inf", "other_inf", "nan_unmatched",
         "inf_unmatched", "mismatched", "max_abs", "min_abs", "max_rel", "worst_flat", "worst_ref",
         "worst_other")


def assert_same(got: metrics.Stats, want: dict[str, Any]) -> None:
    __tracebackhide__ = True
    for name in EXACT:
        assert getattr(got, name) == want[name], f"{name}: {getattr(got, name)!r} != {want[name]!r}"
    for name in ("mean_abs", "mean_rel", "cosine", "rel_l2", "max_scaled"):
        g, w = getattr(got, name), want[name]
        if w is None or g is None:
            assert g is w, f"{name}: {g!r} != {w!r}"
        else:
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 if name == "cosine" else 0.0,
                                       err_msg=name)


def pair(n: int, dtype: Any = np.float32, *, seed: int = 0, other_dtype: Any = None,
         zeros: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n).astype(dtype)
    other = (ref.astype(np.float64) + rng.standard_normal(n) * 1e-4).astype(other_dtype or dtype)
    if zeros:  # equal zeros (0/0 is a relative error of 0) and zeros against non-zeros (x/0 = inf)
        ref[::7] = 0
        other[::14] = 0
    return ref, other


# --- block and chunk boundaries ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 999, 1000, 1001, 2999, 4097])
@pytest.mark.parametrize("block", [1, 3, 4, 8, 100, metrics.BLOCK])
def test_sizes_and_blocks_match_whole_array(impl: str, small_chunks: None, n: int, block: int) -> None:
    ref, other = pair(n, seed=n)
    got = compute_stats(ref, other, atol=1e-5, rtol=1e-3, block=block)
    assert_same(got, whole_array(ref, other, atol=1e-5, rtol=1e-3))


@pytest.mark.parametrize(("rdt", "odt"), [(np.float32, np.float32), (np.float64, np.float64),
                                          (np.float32, np.float64), (np.float64, np.float32),
                                          (np.float16, np.float32)])
def test_dtype_pairs_match_whole_array(impl: str, small_chunks: None, threads: int, rdt: Any,
                                       odt: Any) -> None:
    ref, other = pair(5003, rdt, other_dtype=odt, seed=3, zeros=True)
    for atol, rtol in ((None, None), (0.0, 1e-3), (1e-4, 0.0)):
        got = compute_stats(ref, other, atol=atol, rtol=rtol, block=64)
        assert_same(got, whole_array(ref, other, atol=atol, rtol=rtol))


@pytest.mark.parametrize("where", ["last", "first", "boundary", "spread"])
@pytest.mark.parametrize("equal_nan", [False, True])
def test_nan_and_inf_anywhere_match_whole_array(impl: str, small_chunks: None, threads: int,
                                                where: str, equal_nan: bool) -> None:
    n, block = 3001, 64  # 47 blocks, the last one of 57 elements; chunks of 960
    ref, other = pair(n, seed=5)
    pos = {"last": [n - 1, n - 2, n - 3, n - 5, n - 8], "first": [0, 1, 2, 3, 4],
           "boundary": [63, 64, 959, 960, 1919], "spread": [10, 700, 1500, 2200, 2990]}[where]
    ref[pos[0]] = other[pos[0]] = np.nan  # matched NaN: excused only with equal_nan
    other[pos[1]] = np.nan  # a NaN on one side
    ref[pos[2]] = other[pos[2]] = -np.inf  # matched Inf: left out of the statistics
    ref[pos[3]] = np.inf  # an unmatched Inf: an infinite difference
    other[pos[4]] = -np.inf
    for atol, rtol in ((None, None), (1e-3, 1e-3)):
        got = compute_stats(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan, block=block)
        assert_same(got, whole_array(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan))
    assert got.max_abs == math.inf and got.worst_flat == min(pos[3], pos[4])


def test_first_maximum_wins_across_blocks_chunks_and_threads(impl: str, small_chunks: None,
                                                            threads: int) -> None:
    ref = np.zeros(5000, np.float32)
    other = np.zeros(5000, np.float32)
    other[[4999, 1500, 2500, 999]] = [3.0, -3.0, 3.0, 2.0]  # the first 3.0 is at 1500, in chunk 2
    for block in (1, 7, 64, metrics.BLOCK):
        got = compute_stats(ref, other, block=block)
        assert (got.worst_flat, got.max_abs, got.worst_other) == (1500, 3.0, -3.0)


def test_thread_count_changes_no_bit(impl: str, small_chunks: None) -> None:
    ref, other = pair(20_011, np.float64, seed=9, zeros=True)
    results = []
    for n in (1, 2, 4):
        previous = metrics.set_threads(n)
        try:
            results.append(compute_stats(ref, other, atol=1e-5, rtol=1e-4, block=32))
        finally:
            metrics.set_threads(previous)
    assert results[0] == results[1] == results[2]  # merged in chunk order: the same sums


def test_overflowing_differences_and_sums(impl: str, small_chunks: None) -> None:
    # finite values whose difference overflows to inf, and finite differences whose sum does
    ref = np.array([1e308, 0.0, 1.0, -1e308] * 300)
    other = np.array([-1e308, 0.0, 1.0, 1e308] * 300)
    assert_same(compute_stats(ref, other, atol=0.0, block=7), whole_array(ref, other, atol=0.0))
    ref = np.zeros(2500)
    other = np.full(2500, 1.5e308)
    got = compute_stats(ref, other, block=64)
    assert_same(got, whole_array(ref, other))
    assert got.mean_abs == pytest.approx(1.5e308, rel=1e-15)


def test_unaligned_and_strided_inputs(impl: str, small_chunks: None) -> None:
    # a legacy .npy payload may start at any byte; a caller may pass a strided view
    ref, other = pair(3000, seed=11)
    raw_r = b"\0" + ref.tobytes()
    raw_o = b"\0\0\0" + other.tobytes()
    ur = np.frombuffer(raw_r, dtype=np.float32, offset=1)
    uo = np.frombuffer(raw_o, dtype=np.float32, offset=3)
    assert not ur.flags.aligned and not uo.flags.aligned
    assert_same(compute_stats(ur, uo, atol=0.0, block=64), whole_array(ref, other, atol=0.0))
    big_r, big_o = pair(6000, np.float64, seed=12)
    assert_same(compute_stats(big_r[::2], big_o[1::2], block=64),
                whole_array(big_r[::2], big_o[1::2]))
    fr = np.asfortranarray(big_r.reshape(60, 100))
    assert_same(compute_stats(fr, big_o.reshape(60, 100)), whole_array(fr, big_o.reshape(60, 100)))


def test_progress_hook_counts_every_element(impl: str, small_chunks: None, threads: int) -> None:
    seen: list[int] = []
    ref, other = pair(4321, seed=13)
    compute_stats(ref, other, block=64, on_progress=seen.append)
    assert sum(seen) == 4321
    assert len(seen) == math.ceil(4321 / 960)  # one call per chunk of 15 blocks


# --- every path against the reference on random data ------------------------------------------------

SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-310, 3.4e38, -3.4e38]


@st.composite
def noisy_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 2500))
    rdt = draw(st.sampled_from([np.float32, np.float64]))
    odt = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 1e3]))).astype(rdt)
    other = (ref.astype(np.float64) + rng.standard_normal(n) * 1e-3).astype(odt)
    k = draw(st.integers(0, 6))
    for _ in range(k):  # special values on either or both sides, often in the last block
        i = draw(st.one_of(st.integers(0, n - 1), st.integers(max(0, n - 70), n - 1)))
        v = draw(st.sampled_from(SPECIAL))
        side = draw(st.sampled_from(["ref", "other", "both"]))
        with np.errstate(over="ignore"):
            if side in ("ref", "both"):
                ref[i] = v
            if side in ("other", "both"):
                other[i] = v
    return ref, other


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(p=noisy_pairs(), block=st.sampled_from([1, 5, 64, 1000, metrics.BLOCK]),
       tol=st.sampled_from([(None, None), (0.0, 0.0), (1e-3, 1e-3)]), equal_nan=st.booleans())
def test_random_pairs_match_whole_array(impl: str, small_chunks: None, p: tuple[np.ndarray, np.ndarray],
                                        block: int, tol: tuple[Optional[float], Optional[float]],
                                        equal_nan: bool) -> None:
    ref, other = p
    got = compute_stats(ref, other, atol=tol[0], rtol=tol[1], equal_nan=equal_nan, block=block)
    assert_same(got, whole_array(ref, other, atol=tol[0], rtol=tol[1], equal_nan=equal_nan))


def test_kernel_and_numpy_paths_agree_on_a_large_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    if _native.built() is None:
        pytest.skip("the compiled kernel is not built")
    ref, other = pair(3 * metrics.CHUNK + 12_345, seed=21, zeros=True)
    other[-3] = np.nan
    want = whole_array(ref, other, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(_native, "_enabled", True)
    assert_same(compute_stats(ref, other, atol=1e-5, rtol=1e-5), want)
    monkeypatch.setattr(_native, "_enabled", False)
    assert_same(compute_stats(ref, other, atol=1e-5, rtol=1e-5), want)


def test_kernel_rejects_bad_buffers() -> None:
    if _native.built() is None:
        pytest.skip("the compiled kernel is not built")
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError):
        _native.built().stats(a, "f", np.zeros(3, np.float32), "f", 8, False, 0.0, 0.0, False)
    with pytest.raises(ValueError):
        _native.built().stats(a, "i", a, "f", 8, False, 0.0, 0.0, False)
    with pytest.raises(ValueError):
        _native.built().set_isa("sse9")


# --- the progress bar -------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_in_place_and_erases_itself() -> None:
    out = FakeTTY()
    bar = Progress(total_keys=4, total_bytes=4000, stream=out, delay=0.0, interval=0.0)
    bar.advance(1000)
    bar.key_done()
    bar.advance(1000)
    text = out.getvalue()
    assert text.startswith("\r") and "\n" not in text
    assert "1/4 keys" in text and "50%" in text and "2.0 KiB/3.9 KiB" in text
    bar.close()
    assert out.getvalue().endswith("\r") and out.getvalue().split("\r")[-2].strip() == ""


def test_progress_waits_for_its_delay_and_can_be_off() -> None:
    out = FakeTTY()
    bar = Progress(total_keys=1, total_bytes=10, stream=out, delay=60.0)
    bar.advance(5)
    bar.close()
    assert out.getvalue() == ""  # a comparison shorter than the delay draws nothing
    off = Progress(total_keys=1, total_bytes=10, stream=out, enabled=False, delay=0.0)
    off.advance(10)
    off.close()
    assert out.getvalue() == ""


def test_progress_is_on_only_for_terminals(monkeypatch: pytest.MonkeyPatch) -> None:
    assert progress_enabled(None, io.StringIO()) is False
    assert progress_enabled(None, FakeTTY()) is True
    assert progress_enabled(False, FakeTTY()) is False
    assert progress_enabled(True, io.StringIO()) is True
    monkeypatch.setenv("REPROD_PROGRESS", "0")
    assert progress_enabled(None, FakeTTY()) is False


def test_compare_with_progress_reports_on_stderr(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from reprod.diff import progress as progress_mod
    from reprod.diff.engine import compare

    monkeypatch.setattr(metrics, "CHUNK", 1000)
    original = progress_mod.Progress.__init__

    def eager(self: Progress, **kw: Any) -> None:
        original(self, **{**kw, "delay": 0.0, "interval": 0.0})

    monkeypatch.setattr(progress_mod.Progress, "__init__", eager)
    ref = {"a": np.zeros(5000, np.float32), "b": np.ones(10)}
    other = {"a": np.zeros(5000, np.float32), "b": np.ones(10)}
    result = compare(ref, other, progress=True)
    assert result.passed
    err = capsys.readouterr().err
    assert "2/2 keys" in err or "1/2 keys" in err
    assert "/39.2 KiB" in err  # 5000 float32 + 10 float64 on each side
    compare(ref, other, progress=False)
    assert capsys.readouterr().err == ""


def test_numpy_fallback_when_the_extension_is_missing() -> None:
    # a fresh interpreter where importing reprod._kernel fails, as on a machine without a
    # C compiler: reprod imports, says so, and computes the same statistics
    code = (
        "import sys, json, numpy as np\n"
        "sys.modules['reprod._kernel'] = None\n"
        "from reprod.diff import metrics\n"
        "rng = np.random.default_rng(0)\n"
        "r = rng.standard_normal(3001).astype(np.float32); o = r + np.float32(1e-3); o[-1] = np.nan\n"
        "s = metrics.compute_stats(r, o, atol=0.0)\n"
        "print(json.dumps([metrics.kernel_available(), s.max_abs, s.worst_flat, s.mismatched,"
        " s.mean_abs, s.nan_unmatched]))\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})
    available, max_abs, worst, mismatched, mean_abs, nan_bad = json.loads(out.stdout)
    rng = np.random.default_rng(0)
    r = rng.standard_normal(3001).astype(np.float32)
    o = r + np.float32(1e-3)
    o[-1] = np.nan
    want = whole_array(r, o, atol=0.0)
    assert available is False
    assert (max_abs, worst, mismatched, nan_bad) == (want["max_abs"], want["worst_flat"],
                                                     want["mismatched"], want["nan_unmatched"])
    np.testing.assert_allclose(mean_abs, want["mean_abs"], rtol=1e-12)


# --- the scale-aware statistics: rel_l2 and max_scaled -----------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float64),
                                    (np.float32, np.float64), (np.int32, np.int32)])
def test_rel_l2_and_max_scaled_match_whole_array(impl: str, small_chunks: None, threads: int,
                                                 n: int, dtypes: tuple[Any, Any]) -> None:
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n) * 50
    ref = base.astype(dtypes[0])
    other = (base + rng.standard_normal(n) * 1e-3 * (1 + 9 * (dtypes[0] is np.int32))).astype(dtypes[1])
    st_ = metrics.compute_stats(ref, other, block=100)
    l2, scaled = scale_aware(ref, other)
    assert st_.rel_l2 == pytest.approx(l2, rel=1e-12, abs=0.0)
    assert st_.max_scaled == pytest.approx(scaled, rel=1e-15, abs=0.0)


@pytest.mark.parametrize("case", ["zeros", "ref_zero", "huge", "tiny", "nan_matched", "inf_unmatched"])
def test_rel_l2_and_max_scaled_edge_cases(impl: str, case: str) -> None:
    ref, other = {
        "zeros": (np.zeros(5), np.zeros(5)),                      # 0/0 = 0
        "ref_zero": (np.zeros(5), np.full(5, 1e-3)),              # x/0 = inf
        "huge": (np.full(4, 1e300), np.full(4, 1e300) * (1 + 1e-6)),   # squares overflow
        "tiny": (np.full(4, 1e-300), np.full(4, 1e-300) * (1 + 1e-6)),  # squares underflow
        "nan_matched": (np.array([1.0, np.nan, 2.0]), np.array([1.5, np.nan, 2.0])),
        "inf_unmatched": (np.array([1.0, np.inf]), np.array([1.0, 1.0])),
    }[case]
    st_ = metrics.compute_stats(ref, other, equal_nan=True)
    l2, scaled = scale_aware(ref, other)
    assert st_.rel_l2 == pytest.approx(l2, rel=1e-9) and st_.max_scaled == pytest.approx(scaled, rel=1e-9)
    if case in ("huge", "tiny"):
        assert st_.rel_l2 == pytest.approx(1e-6, rel=1e-6)


def test_scale_aware_methods_judge_keys_and_agree_between_batch_and_per_key(tmp_path: Any) -> None:
    import reprod

    rng = np.random.default_rng(3)
    ref = {f"k{i}": (rng.standard_normal(64) * 10 ** (i % 5)).astype(np.float32) for i in range(200)}
    other = {k: v * np.float32(1 + 1e-6) for k, v in ref.items()}
    other["k7"] = ref["k7"] * np.float32(1.01)
    reprod.save(tmp_path / "a.npz", ref)
    reprod.save(tmp_path / "b.npz", other)
    on_disk = reprod.compare(tmp_path / "a.npz", tmp_path / "b.npz", method=["rel_l2", "max_scaled"],
                             threshold=1e-4)  # the batch kernel path
    in_memory = reprod.compare(ref, other, method=["rel_l2", "max_scaled"], threshold=1e-4)
    assert [k.key for k in on_disk.failed] == ["k7"]
    for a, b in zip(on_disk, in_memory):
        assert (a.rel_l2, a.max_scaled, a.checks) == (b.rel_l2, b.max_scaled, b.checks)
        want = scale_aware(ref[a.key], other[a.key])
        assert a.rel_l2 == pytest.approx(want[0], rel=1e-12)


@pytest.mark.skipif(_native.built() is None, reason="the compiled kernel is not built")
def test_kernel_row_columns_are_the_python_names() -> None:
    assert tuple(_native.built().ROW_COLUMNS) == metrics.ROW_COLUMNS
    assert len(_native.built().stats(np.ones(2), "d", np.ones(2), "d", 8, False, 0.0, 0.0, False)) == \
        metrics.COL["max_ref"] + 1
