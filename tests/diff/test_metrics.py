"""reprod.diff.metrics.compute_stats: every statistic equals a plain whole-array float64 computation.

The reference below never walks blocks: it upcasts the whole array to float64 (integers go through
exact Python ints first, so nothing wraps), applies the DESIGN.md pass rule masks (NaN never enters a
statistic, an Inf matched by an equal Inf is left out, an unmatched Inf is an infinite difference)
and computes each statistic with one numpy call. ``mismatched`` is checked against
``numpy.isclose``. Hypothesis draws shapes, every integer and float dtype (full value range, so
uint8/int64 pairs that would wrap in their own dtype are common), NaN, +-Inf, subnormals and values
near the float64 limits, and block sizes that split the array at awkward places.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from oracle import reference

from reprod import _native
from reprod.diff import metrics
from reprod.diff.metrics import BLOCK, Stats, compute_stats

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ALL_DTYPES = INT_DTYPES + FLOAT_DTYPES

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# the reference: whole-array float64, no blocks
# ---------------------------------------------------------------------------------------------



def _assert_matches(st_: Stats, want: dict[str, Any]) -> None:
    __tracebackhide__ = True
    for name in ("size", "ref_nan", "ref_inf", "other_nan", "other_inf"):
        assert getattr(st_, name) == want[name], f"{name}: {getattr(st_, name)!r} != {want[name]!r}"
    approx = want["huge"] > 0  # integer differences >= 2**62: rounding may differ by an ulp
    if want["mismatched"] is None:
        assert st_.mismatched is None
    elif approx:
        assert st_.mismatched is not None
        assert want["mismatched"] <= st_.mismatched <= want["mismatched"] + want["huge"]
    else:
        assert st_.mismatched == want["mismatched"], (
            f"mismatched: {st_.mismatched} != {want['mismatched']}"
        )
    for name in ("max_abs", "min_abs", "max_rel", "worst_flat", "worst_ref", "worst_other"):
        got, exp = getattr(st_, name), want[name]
        if exp is None or not approx:
            assert got == exp, f"{name}: {got!r} != {exp!r}"
        elif name == "worst_flat":
            assert got is not None  # ties may break differently; the value is checked below
        elif name in ("worst_ref", "worst_other"):
            assert got is not None
        else:
            np.testing.assert_allclose(got, exp, rtol=2.0**-50, err_msg=name)
    for name in ("mean_abs", "mean_rel"):
        got, exp = getattr(st_, name), want[name]
        if exp is None:
            assert got is None, f"{name}: {got!r} != None"
        else:
            np.testing.assert_allclose(got, exp, rtol=1e-12, err_msg=name)
    if want["cosine"] is None:
        assert st_.cosine is None, f"cosine: {st_.cosine!r} != None"
    else:
        # normalised: rounding of the block-wise dot products is absolute in [-1, 1]
        assert st_.cosine is not None
        np.testing.assert_allclose(
            st_.cosine, want["cosine"], rtol=1e-12, atol=1e-12, err_msg="cosine"
        )


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


def elements(dtype: type) -> st.SearchStrategy[Any]:
    """Values of ``dtype`` with its edge cases drawn often: NaN, +-Inf, +-0, the largest and the
    smallest values, subnormals; integers include both ends of the range (which wrap when
    subtracted in the native dtype)."""
    dt = np.dtype(dtype)
    if dt.kind == "f":
        fi = np.finfo(dt)
        w = dt.itemsize * 8
        special = [
            math.nan,
            math.inf,
            -math.inf,
            0.0,
            -0.0,
            1.0,
            -1.0,
            float(fi.max),
            -float(fi.max),
            float(fi.tiny),
            float(fi.smallest_subnormal),
        ]
        return st.one_of(
            st.sampled_from(special), st.floats(width=w), st.floats(-8.0, 8.0, width=w)
        )
    info = np.iinfo(dt)
    ends = [int(info.min), int(info.max), 0, 1, int(info.max) - 1]
    return st.one_of(
        st.sampled_from(ends),
        st.integers(int(info.min), int(info.max)),
        st.integers(max(int(info.min), -100), 100),
    )


def filled(dtype: type, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Every element drawn on its own (hnp.arrays mostly repeats one fill value)."""
    n = int(np.prod(shape))
    return st.lists(elements(dtype), min_size=n, max_size=n).map(
        lambda xs: np.array(xs, dtype=dtype).reshape(shape)
    )


@st.composite
def array_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=7))
    kind = draw(st.sampled_from(["int", "float", "same", "mixed"]))
    if kind == "int":
        rdt, odt = draw(st.sampled_from(INT_DTYPES)), draw(st.sampled_from(INT_DTYPES))
    elif kind == "float":
        rdt, odt = draw(st.sampled_from(FLOAT_DTYPES)), draw(st.sampled_from(FLOAT_DTYPES))
    elif kind == "same":
        rdt = odt = draw(st.sampled_from(ALL_DTYPES))
    else:
        rdt, odt = draw(st.sampled_from(ALL_DTYPES)), draw(st.sampled_from(ALL_DTYPES))
    ref = draw(filled(rdt, shape))
    other = draw(filled(odt, shape))
    if np.can_cast(rdt, odt, "safe"):
        # equal values (and NaN/Inf at the same positions) at a random subset of positions
        same = draw(hnp.arrays(np.bool_, shape))
        other = np.where(same, ref.astype(odt), other).astype(odt)
    return np.asarray(ref), np.asarray(other)


tolerances = st.sampled_from([None, 0.0, 1e-3, 0.5, 100.0])


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def engine_setup(*, kernel: bool, threads: int, chunk: int) -> Iterator[None]:
    """Run compute_stats through the compiled kernel or the numpy path, on ``threads`` threads
    with ``chunk`` elements per unit of work (so tiny arrays are split and merged too)."""
    saved = (_native.set_enabled(kernel), metrics.CHUNK)
    metrics.CHUNK = chunk
    old_threads = metrics.set_threads(threads)
    try:
        yield
    finally:
        _native.set_enabled(saved[0])
        metrics.CHUNK = saved[1]
        metrics.set_threads(old_threads)


setups = st.fixed_dictionaries(
    {
        "kernel": st.booleans(),
        "threads": st.sampled_from([1, 2]),
        "chunk": st.sampled_from([metrics.CHUNK, 1, 10]),
    }
)


@PROPERTY
@given(
    pair=array_pairs(),
    atol=tolerances,
    rtol=tolerances,
    equal_nan=st.booleans(),
    block=st.sampled_from([1, 7, BLOCK]),
    setup=setups,
)
def test_every_statistic_equals_whole_array_float64_reference(
    pair: tuple[np.ndarray, np.ndarray],
    atol: Optional[float],
    rtol: Optional[float],
    equal_nan: bool,
    block: int,
    setup: dict[str, Any],
) -> None:
    ref, other = pair
    with engine_setup(**setup):
        got = compute_stats(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan, block=block)
    want = reference(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan)
    _assert_matches(got, want)


@PROPERTY
@given(pair=array_pairs(), block=st.integers(1, 9), setup=setups)
def test_block_size_threads_and_path_never_change_a_statistic(
    pair: tuple[np.ndarray, np.ndarray], block: int, setup: dict[str, Any]
) -> None:
    ref, other = pair
    with engine_setup(**setup):
        small = compute_stats(ref, other, atol=1e-3, rtol=1e-3, block=block)
    with engine_setup(kernel=False, threads=1, chunk=metrics.CHUNK):
        whole = compute_stats(ref, other, atol=1e-3, rtol=1e-3)
    for name in (
        "size",
        "counted",
        "max_abs",
        "min_abs",
        "max_rel",
        "worst_flat",
        "worst_ref",
        "worst_other",
        "mismatched",
        "ref_nan",
        "ref_inf",
        "other_nan",
        "other_inf",
        "nan_unmatched",
        "inf_unmatched",
    ):
        assert getattr(small, name) == getattr(whole, name), name
    for name in ("mean_abs", "mean_rel", "cosine"):
        a, b = getattr(small, name), getattr(whole, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 if name == "cosine" else 0)


@PROPERTY
@given(
    dtype=st.sampled_from(INT_DTYPES),
    data=st.data(),
)
def test_small_integer_mismatch_count_is_numpy_isclose(dtype: type, data: st.DataObject) -> None:
    # below 2**52 every value and difference is exact in float64, so numpy.isclose itself is the
    # reference; the full-range property above covers the rest with exact Python-int differences
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -(2**51)), min(info.max, 2**51)
    elems = st.integers(int(lo), int(hi))
    shape = data.draw(hnp.array_shapes(max_dims=2, max_side=9))
    ref = data.draw(hnp.arrays(dtype, shape, elements=elems))
    other = data.draw(hnp.arrays(dtype, shape, elements=elems))
    atol = data.draw(st.sampled_from([0.0, 1.0, 3.0, 200.0]))
    rtol = data.draw(st.sampled_from([0.0, 0.01, 0.5]))
    got = compute_stats(ref, other, atol=atol, rtol=rtol, block=7)
    want = int(
        (~np.isclose(other.astype(np.float64), ref.astype(np.float64), atol=atol, rtol=rtol)).sum()
    )
    assert got.mismatched == want


# ---------------------------------------------------------------------------------------------
# fixed cases: block boundaries, non-finite values, integer wrap-around, overflow
# ---------------------------------------------------------------------------------------------


def test_nan_and_inf_in_last_partial_block_are_counted_and_left_out() -> None:
    # 23 elements with block=7: blocks of 7, 7, 7 and a last one of 2 holding the NaN and the Inf
    ref = np.arange(23, dtype=np.float64)
    other = ref.copy()
    other[5] += 0.25  # the only finite difference, in the first block
    ref[21] = other[21] = np.inf  # matched Inf: left out of every statistic
    other[22] = np.nan
    st_ = compute_stats(ref, other, atol=0.0, rtol=0.0, block=7)
    assert (st_.ref_inf, st_.other_inf, st_.ref_nan, st_.other_nan) == (1, 1, 0, 1)
    assert st_.nan_unmatched == 1 and st_.inf_unmatched == 0
    assert st_.counted == 21
    assert st_.max_abs == 0.25 and st_.worst_flat == 5
    np.testing.assert_allclose(st_.mean_abs, 0.25 / 21, rtol=1e-15)
    assert st_.mismatched == 2  # the 0.25 difference and the NaN, as numpy.isclose counts them
    assert st_.mismatched == int((~np.isclose(other, ref, atol=0.0, rtol=0.0)).sum())


def test_worst_index_is_first_maximum_across_blocks() -> None:
    ref = np.zeros(20)
    other = np.zeros(20)
    other[[3, 9, 16]] = [-2.0, 2.0, 2.0]  # the first maximum is in block 0 with block=7
    for block in (1, 4, 7, 20, BLOCK):
        st_ = compute_stats(ref, other, block=block)
        assert st_.worst_flat == 3 and st_.worst_other == -2.0 and st_.max_abs == 2.0


@pytest.mark.parametrize(
    ("dtype", "r", "o", "diff"),
    [
        (np.uint8, 0, 255, 255),
        (np.int8, -128, 127, 255),
        (np.uint16, 1, 65535, 65534),
        (np.uint64, 0, 2**64 - 1, float(2**64 - 1)),
        (np.int64, -(2**63), 2**63 - 1, float(2**64 - 1)),
        (np.uint64, 2**63 + 7, 2**63 + 3, 4.0),  # beyond float64 precision, exact as integers
    ],
)
def test_integer_differences_do_not_wrap(dtype: type, r: int, o: int, diff: float) -> None:
    ref = np.array([r, r], dtype=dtype)
    other = np.array([o, r], dtype=dtype)
    st_ = compute_stats(ref, other, block=1)
    assert st_.max_abs == diff
    assert st_.min_abs == 0.0
    np.testing.assert_allclose(st_.mean_abs, diff / 2, rtol=1e-15)
    # the native dtype wraps in at least one order of subtraction
    assert np.abs(ref - other).max() != diff or np.abs(other - ref).max() != diff


def test_mixed_signed_unsigned_64_bit_difference_is_exact() -> None:
    ref = np.array([2**63 - 1], dtype=np.int64)
    other = np.array([2**63 + 5], dtype=np.uint64)
    st_ = compute_stats(ref, other)
    assert st_.max_abs == 6.0 and st_.worst_ref == float(2**63 - 1)


def test_mean_of_finite_differences_near_float_max_does_not_overflow() -> None:
    # every difference is finite (1.5e308), so is their mean; compute_stats promises a sum without
    # overflow for this case (_scaled_sum) but returns the unscaled total
    ref = np.zeros(4)
    other = np.full(4, 1.5e308)
    for block in (1, 3, BLOCK):
        st_ = compute_stats(ref, other, block=block)
        assert st_.max_abs == 1.5e308
        assert st_.mean_abs == pytest.approx(1.5e308, rel=1e-15)


@pytest.mark.parametrize("equal_nan", [False, True])
def test_unmatched_inf_in_ref_counts_as_mismatched_like_numpy_isclose(equal_nan: bool) -> None:
    # numpy.isclose(1.0, inf) is False whatever rtol is; atol + rtol*|inf| must not excuse it
    ref = np.array([np.inf, 1.0, -np.inf, 2.0])
    other = np.array([1.0, 1.0, -np.inf, np.inf])
    for rtol in (0.0, 1e-5):
        st_ = compute_stats(ref, other, atol=1e-8, rtol=rtol, equal_nan=equal_nan)
        want = int((~np.isclose(other, ref, atol=1e-8, rtol=rtol, equal_nan=equal_nan)).sum())
        assert want == 2
        assert st_.mismatched == want, f"rtol={rtol}"
        assert st_.inf_unmatched == 2


def test_relative_error_zero_over_zero_is_zero_and_x_over_zero_is_inf() -> None:
    ref = np.array([0.0, 0.0, 2.0])
    other = np.array([0.0, 1.0, 3.0])
    st_ = compute_stats(ref, other)
    assert st_.max_rel == math.inf and st_.mean_rel == math.inf
    st_ = compute_stats(ref[[0, 2]], other[[0, 2]])
    assert st_.max_rel == 0.5 and st_.mean_rel == 0.25


def test_unmatched_inf_has_infinite_relative_error_not_nan() -> None:
    st_ = compute_stats(np.array([np.inf, 1.0]), np.array([1.0, 1.0]), block=1)
    assert st_.max_rel == math.inf and st_.mean_rel == math.inf
    assert st_.max_abs == math.inf and st_.worst_flat == 0


def test_min_of_difference_with_an_unmatched_inf_is_not_hidden() -> None:
    # DESIGN.md: a min of |a - b| over [0, inf] is not a pass; the Inf is counted separately
    st_ = compute_stats(np.array([1.0, 1.0]), np.array([1.0, np.inf]))
    assert st_.min_abs == 0.0 and st_.inf_unmatched == 1 and st_.other_inf == 1


def test_all_non_finite_matched_leaves_no_statistic() -> None:
    ref = np.array([np.inf, -np.inf, np.nan])
    st_ = compute_stats(ref, ref.copy(), equal_nan=True, atol=0.0)
    assert st_.counted == 0 and st_.mean_abs is None and st_.worst_flat is None
    assert st_.nan_unmatched == 0 and st_.inf_unmatched == 0 and st_.mismatched == 0


def test_empty_arrays_have_no_statistics() -> None:
    st_ = compute_stats(np.zeros((0, 3)), np.zeros((0, 3)))
    assert st_.size == 0 and st_.mean_abs is None and st_.max_abs is None


def test_cosine_of_parallel_orthogonal_and_zero_vectors() -> None:
    assert compute_stats(np.array([1.0, 2.0]), np.array([2.0, 4.0])).cosine == pytest.approx(1.0)
    assert compute_stats(np.array([1.0, 0.0]), np.array([0.0, 3.0])).cosine == 0.0
    assert compute_stats(np.array([1.0, 2.0]), np.array([-1.0, -2.0])).cosine == pytest.approx(-1.0)
    assert compute_stats(np.zeros(3), np.zeros(3)).cosine == 1.0
    assert compute_stats(np.zeros(3), np.ones(3)).cosine == 0.0


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("equal_nan", [False, True])
def test_finite_values_whose_difference_overflows_among_nans_keep_a_finite_relative_error(
        kernel: bool, equal_nan: bool) -> None:
    """The float64 maximum against its negative among NaNs: the difference is inf, the relative
    error 2. With equal_nan=False the NaNs barred the overflow-safe recomputation and max_rel
    read inf (found by hypothesis on a CI run); NaNs enter no statistic either way."""
    if kernel and _native.built() is None:
        pytest.skip("the compiled kernel is not built")
    big = np.finfo(np.float64).max
    ref, other = np.full((4, 7, 7), np.nan), np.full((4, 7, 7), np.nan)
    ref.flat[136], other.flat[136] = big, -big
    with engine_setup(kernel=kernel, threads=1, chunk=1 << 20):
        got = compute_stats(ref, other, equal_nan=equal_nan, block=1)
    want = reference(ref, other, atol=None, rtol=None, equal_nan=equal_nan)
    assert want["max_rel"] == 2.0 and got.max_abs == math.inf
    _assert_matches(got, want)
