"""reprod.testing: the failure message (exact text), dtype defaults, and assert_aligned end to end."""

from __future__ import annotations

import os

import numpy as np
import pytest

import reprod
from reprod.diff.result import DiffResult, KeyResult
from reprod.testing import (
    DEFAULT_TOLERANCES,
    Tolerance,
    assert_aligned,
    default_tolerance,
    format_failure,
    format_failures,
)

# --------------------------------------------------------------------------------------------
# message builder: hand-built KeyResults, exact expected text
# --------------------------------------------------------------------------------------------


def _mismatch(**kw: object) -> KeyResult:
    base: dict[str, object] = dict(
        key="logits",
        passed=False,
        status="mismatch",
        reason="12 elements outside atol+rtol*|ref|",
        path=("logits",),
        ref_shape=(4, 250),
        other_shape=(4, 250),
        ref_dtype="float32",
        other_dtype="float32",
        size=1000,
        mean_abs=2.5e-6,
        max_abs=3.1e-4,
        min_abs=0.0,
        worst_index=(2, 7),
        worst_ref=0.1234,
        worst_other=0.1237,
        mismatched=12,
        atol=1e-5,
        rtol=1.3e-6,
    )
    base.update(kw)
    return KeyResult(**base)  # type: ignore[arg-type]


def test_mismatch_line_exact() -> None:
    assert format_failure(_mismatch()) == (
        "logits: 12 / 1000 elements (1.2%) outside atol+rtol*|ref| (atol 1.000e-05, rtol 1.300e-06)"
        "; max abs diff 3.100e-04 at index (2, 7) (ref 1.234e-01, other 1.237e-01)"
    )


def test_failed_max_merges_the_worst_element_into_the_check() -> None:
    kr = KeyResult(
        key="logits",
        passed=False,
        status="failed",
        reason="max_abs 3.100e-04 > 1.000e-05",
        ref_shape=(4, 250),
        other_shape=(4, 250),
        size=1000,
        mean_abs=2e-6,
        max_abs=3.1e-4,
        worst_index=(2, 7),
        worst_ref=0.1234,
        worst_other=0.1237,
        methods=("max",),
        thresholds={"max": 1e-5},
        checks={"max": False},
    )
    assert format_failure(kr) == (
        "logits: max abs diff 3.100e-04 > 1.000e-05 at index (2, 7) (ref 1.234e-01, other 1.237e-01)"
    )


def test_failed_mean_lists_only_failing_methods_then_the_worst_element() -> None:
    kr = KeyResult(
        key="backbone/conv1.weight",
        path=("backbone", "conv1.weight"),
        passed=False,
        status="failed",
        reason="mean_abs 4.000e-06 > 1.000e-06",
        ref_shape=(8,),
        other_shape=(8,),
        size=8,
        mean_abs=4e-6,
        max_abs=2e-5,
        min_abs=0.0,
        worst_index=(5,),
        worst_ref=-1.5,
        worst_other=-1.50002,
        methods=("min", "max", "mean"),
        thresholds={"min": 1e-4, "max": 1e-4, "mean": 1e-6},
        checks={"min": True, "max": True, "mean": False},
    )
    assert format_failure(kr) == (
        "backbone/conv1.weight: mean abs diff 4.000e-06 > 1.000e-06"
        "; max abs diff 2.000e-05 at index (5,) (ref -1.50000e+00, other -1.50002e+00)"
    )


def test_several_failing_methods_each_get_a_clause() -> None:
    kr = KeyResult(
        key="loss",
        passed=False,
        status="failed",
        reason="",
        ref_shape=(),
        other_shape=(1,),
        size=1,
        mean_abs=0.5,
        max_abs=0.5,
        min_abs=0.5,
        worst_index=(),
        worst_ref=1.0,
        worst_other=1.5,
        methods=("min", "max", "mean"),
        thresholds={"min": 1e-6, "max": 1e-6, "mean": 1e-6},
        checks={"min": False, "max": False, "mean": False},
        note="shapes () and (1,) compared element by element",
    )
    # a 0-d value has no index worth printing
    assert format_failure(kr) == (
        "loss: min abs diff 5.000e-01 > 1.000e-06"
        "; max abs diff 5.000e-01 > 1.000e-06 (ref 1.000e+00, other 1.500e+00)"
        "; mean abs diff 5.000e-01 > 1.000e-06"
        "; shapes () and (1,) compared element by element"
    )


def test_nan_line_counts_both_sides() -> None:
    kr = _mismatch(
        status="nan",
        ref_nan=0,
        other_nan=3,
        mismatched=3,
        max_abs=1e-7,
        worst_index=(0, 0),
        worst_ref=1.0,
        worst_other=1.0000001,
    )
    assert format_failure(kr) == (
        "logits: NaN: 0 in ref, 3 in other"
        "; 3 / 1000 elements (0.3%) outside atol+rtol*|ref| (atol 1.000e-05, rtol 1.300e-06)"
        "; max abs diff 1.000e-07 at index (0, 0) (ref 1.0000000e+00, other 1.0000001e+00)"
    )


def test_worst_values_get_the_digits_that_tell_them_apart() -> None:
    # 3 digits would print 1.000e+00 twice; the full float is noise: the fewest that differ
    kr = _mismatch(worst_ref=1.0, worst_other=1.00001, worst_index=(0, 1))
    assert "at index (0, 1) (ref 1.00000e+00, other 1.00001e+00)" in format_failure(kr)
    kr = _mismatch(worst_ref=float("nan"), worst_other=1.0)
    assert "(ref nan, other 1.000e+00)" in format_failure(kr)


def test_nan_on_both_sides_hints_equal_nan() -> None:
    kr = KeyResult(key="x", passed=False, status="nan", reason="", size=4, ref_nan=1, other_nan=1)
    assert format_failure(kr) == (
        "x: NaN: 1 in ref, 1 in other (equal_nan=True lets NaN at the same positions pass)"
    )


def test_inf_line() -> None:
    kr = KeyResult(key="x", passed=False, status="inf", reason="", size=4, ref_inf=1, other_inf=0)
    assert format_failure(kr) == "x: Inf: 1 in ref, 0 in other"


@pytest.mark.parametrize(
    ("status", "ref_shape", "other_shape", "expected"),
    [
        ("shape", (2, 3), (6,), "w: shape mismatch: ref [2, 3], other [6]; a transpose?"),
        ("missing", (2, 3), None, "w: missing in other (ref shape [2, 3]); a transpose?"),
        ("extra", None, (4,), "w: extra key, not in ref (other shape [4]); a transpose?"),
        ("empty", (0, 3), (2, 3), "w: empty array: ref [0, 3], other [2, 3]; a transpose?"),
    ],
)
def test_structural_lines(
    status: str, ref_shape: object, other_shape: object, expected: str
) -> None:
    kr = KeyResult(
        key="w",
        passed=False,
        status=status,
        reason="engine words",
        ref_shape=ref_shape,
        other_shape=other_shape,
        note="a transpose?",
    )  # type: ignore[arg-type]
    assert format_failure(kr) == expected


def test_transposed_shape_says_so() -> None:
    kr = KeyResult(
        key="fc.weight",
        passed=False,
        status="shape",
        reason="",
        ref_shape=(10, 64),
        other_shape=(64, 10),
    )
    assert format_failure(kr) == (
        "fc.weight: shape mismatch: ref [10, 64], other [64, 10] (other is the transpose of ref (a "
        "Linear weight? paddle stores [in, out], torch [out, in]): transpose one side)"
    )


def test_transpose_hint_appears_once_in_an_assert_aligned_message() -> None:
    with pytest.raises(AssertionError) as info:
        assert_aligned({"fc.weight": np.ones((10, 64))}, {"fc.weight": np.ones((64, 10))})
    from reprod.messages import TRANSPOSE_HINT

    assert str(info.value).count(TRANSPOSE_HINT) == 1 and str(info.value).count("transpose of ref") == 1
    square = KeyResult(
        key="w", passed=False, status="shape", reason="", ref_shape=(3,), other_shape=(3, 1)
    )
    assert format_failure(square) == "w: shape mismatch: ref [3], other [3, 1]"


def test_type_line_uses_the_engine_reason() -> None:
    kr = KeyResult(
        key="blk", passed=False, status="type", reason="a nested mapping in ref, an array in other"
    )
    assert format_failure(kr) == "blk: a nested mapping in ref, an array in other"


@pytest.mark.parametrize(
    ("mismatched", "size", "share"),
    [
        (1, 3, "33.3%"),
        (999_999, 1_000_000, "99.9%"),
        (1, 10**8, "1e-06%"),
        (5, 5, "100%"),
        (1, 1_000_000, "0.0001%"),
    ],
)
def test_share_never_rounds_to_all(mismatched: int, size: int, share: str) -> None:
    line = format_failure(_mismatch(mismatched=mismatched, size=size))
    assert f"{mismatched} / {size} elements ({share})" in line


def test_failures_list_every_failing_key_then_a_summary() -> None:
    ok = KeyResult(key="a", passed=True, status="passed", reason="", size=3, max_abs=0.0)
    nan = KeyResult(key="loss", passed=False, status="nan", reason="", size=1, other_nan=1)
    missing = KeyResult(key="head", passed=False, status="missing", reason="", ref_shape=(2,))
    result = DiffResult(
        results=(ok, _mismatch(), nan, missing), ref_name="torch.npz", other_name="paddle.npz"
    )
    assert format_failures(result) == "\n".join(
        [
            "logits: 12 / 1000 elements (1.2%) outside atol+rtol*|ref| (atol 1.000e-05, rtol 1.300e-06)"
            "; max abs diff 3.100e-04 at index (2, 7) (ref 1.234e-01, other 1.237e-01)",
            "loss: NaN: 0 in ref, 1 in other",
            "head: missing in other (ref shape [2])",
            "3 of 4 keys not aligned (mismatch 1, nan 1, missing 1); ref: torch.npz, other: paddle.npz",
        ]
    )


def test_passing_result_says_so() -> None:
    ok = KeyResult(key="a", passed=True, status="passed", reason="", size=3, max_abs=0.0)
    assert (
        format_failures(DiffResult(results=(ok,))) == "the 1 key aligned; ref: ref, other: other"
    )


# --------------------------------------------------------------------------------------------
# dtype defaults
# --------------------------------------------------------------------------------------------


def test_default_table_matches_torch_testing() -> None:
    torch = pytest.importorskip("torch")
    from torch.testing._comparison import _DTYPE_PRECISIONS  # the table this one starts from

    for name in ("float16", "bfloat16", "float32", "float64", "complex64"):
        rtol, atol = _DTYPE_PRECISIONS[getattr(torch, name)]
        assert DEFAULT_TOLERANCES[name] == Tolerance(rtol=rtol, atol=atol), name


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        (("float32",), Tolerance(rtol=1.3e-6, atol=1e-5)),
        (("float32", "float16"), Tolerance(rtol=1e-3, atol=1e-5)),
        (("float64", "float32"), Tolerance(rtol=1.3e-6, atol=1e-5)),
        (("bfloat16", "float32"), Tolerance(rtol=1.6e-2, atol=1e-5)),
        (("int64", "uint8"), Tolerance(rtol=0.0, atol=0.0)),
        (("bool", None), Tolerance(rtol=0.0, atol=0.0)),
        (("int32", "float64"), Tolerance(rtol=1e-7, atol=1e-7)),
        (("longdouble",), Tolerance(rtol=1e-7, atol=1e-7)),
        (("complex128",), Tolerance(rtol=1e-7, atol=1e-7)),
    ],
)
def test_default_tolerance_takes_the_looser(dtypes: tuple[str, ...], expected: Tolerance) -> None:
    assert default_tolerance(*dtypes) == expected


def test_default_tolerance_refuses_non_numeric() -> None:
    with pytest.raises(ValueError, match="'U5'"):
        default_tolerance("U5")


# --------------------------------------------------------------------------------------------
# assert_aligned end to end (through reprod.compare), against numpy and torch.testing
# --------------------------------------------------------------------------------------------


def _logits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 250)).astype(np.float32)
    y = x.copy()
    y[2, 7] += np.float32(3e-4)
    y[0, :11] += np.float32(1e-4)
    return x, y


def test_single_arrays_pass_and_return_the_result() -> None:
    x, _ = _logits()
    result = assert_aligned(x, x.copy())
    assert result.passed
    assert result.keys() == ["value"]
    assert result["value"].mismatched == 0


def test_failure_message_counts_what_numpy_isclose_counts() -> None:
    x, y = _logits()
    with pytest.raises(AssertionError) as info:
        assert_aligned(x, y)
    tol = DEFAULT_TOLERANCES["float32"]
    expected_bad = int(np.count_nonzero(~np.isclose(y, x, rtol=tol.rtol, atol=tol.atol)))
    worst = np.unravel_index(np.argmax(np.abs(y.astype(np.float64) - x)), x.shape)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        f"value: {expected_bad} / 1000 elements ({expected_bad / 10:g}%) outside atol+rtol*|ref| "
        "(atol 1.000e-05, rtol 1.300e-06); max abs diff "
    )
    assert f"at index {tuple(int(i) for i in worst)} (ref " in lines[0]
    assert lines[1] == "1 of 1 keys not aligned (mismatch 1); ref: ref, other: other"


def test_every_failing_key_is_listed_with_its_own_dtype_default() -> None:
    x, y = _logits()
    ref = {"logits": x, "labels": np.array([0, 1, 2]), "half": x.astype(np.float16), "ok": x}
    other = {"logits": y, "labels": np.array([0, 1, 3]), "half": y.astype(np.float16), "ok": x}
    with pytest.raises(AssertionError) as info:
        assert_aligned(ref, other)
    lines = str(info.value).splitlines()
    # float16's rtol 1e-3 absorbs the 3e-4 perturbation; float32's does not; ints are exact
    assert [line.split(":", 1)[0] for line in lines[:-1]] == ["logits", "labels"]
    assert "(atol 1.000e-05, rtol 1.300e-06)" in lines[0]
    assert lines[1] == (
        "labels: 1 / 3 elements (33.3%) outside atol+rtol*|ref| (atol 0.000e+00, rtol 0.000e+00)"
        "; max abs diff 1.000e+00 at index (2,) (ref 2.000e+00, other 3.000e+00)"
    )
    assert lines[-1] == "2 of 4 keys not aligned (mismatch 2); ref: ref, other: other"


def test_mixed_dtypes_use_the_looser_tolerance() -> None:
    x, y = _logits()
    # float16 values against float32 ones: float16's rounding error must not fail the port
    assert_aligned(x, x.astype(np.float16))
    with pytest.raises(AssertionError):
        assert_aligned(x, x.astype(np.float16).astype(np.float32))


def test_result_keeps_reference_key_order_across_tolerance_groups() -> None:
    x, _ = _logits()
    ref = {"a": x, "b": np.arange(3), "c": x.astype(np.float16), "d": {"e": x, "f": np.arange(2)}}
    result = assert_aligned(ref, ref)
    assert result.keys() == ["a", "b", "c", "d/e", "d/f"]
    assert [(r.atol, r.rtol) for r in result] == [
        (1e-5, 1.3e-6),
        (0.0, 0.0),
        (1e-5, 1e-3),
        (1e-5, 1.3e-6),
        (0.0, 0.0),
    ]


def test_missing_extra_and_odd_key_names_survive_grouping() -> None:
    x, _ = _logits()
    ref = {"w[0]*": x, "n": np.arange(3), "gone": x}
    other = {"w[0]*": x, "n": np.arange(3), "new": np.arange(2)}
    with pytest.raises(AssertionError) as info:
        assert_aligned(ref, other)
    assert str(info.value).splitlines() == [
        "gone: missing in other (ref shape [4, 250])",
        "new: extra key, not in ref (other shape [2])",
        "2 of 4 keys not aligned (missing 1, extra 1); ref: ref, other: other",
    ]


_TORCH_DTYPES = ("float16", "bfloat16", "float32", "float64")


@pytest.mark.parametrize("ref_dtype", _TORCH_DTYPES)
@pytest.mark.parametrize("other_dtype", _TORCH_DTYPES)
@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_verdict_agrees_with_torch_testing(ref_dtype: str, other_dtype: str, scale: float) -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(64, generator=gen, dtype=torch.float64)
    tol = default_tolerance(ref_dtype, other_dtype)
    # a perturbation well inside (0.1x) or well outside (10x) the tolerance of some elements
    ref = base.to(getattr(torch, ref_dtype))
    allowed = tol.atol + tol.rtol * ref.to(torch.float64).abs()
    noise = torch.randn(64, generator=gen, dtype=torch.float64) * scale * allowed
    other = (ref.to(torch.float64) + noise).to(getattr(torch, other_dtype))
    try:
        torch.testing.assert_close(other, ref, check_dtype=False)
        expected = True
    except AssertionError:
        expected = False
    try:
        assert_aligned(ref, other)
        got = True
    except AssertionError:
        got = False
    assert got == expected
    assert expected == (scale < 1)  # the case is far from the boundary, as intended


def test_torch_against_paddle() -> None:
    torch = pytest.importorskip("torch")
    paddle = pytest.importorskip("paddle")
    x, y = _logits()
    assert_aligned(torch.from_numpy(x), paddle.to_tensor(x))
    with pytest.raises(AssertionError, match=r"^value: \d+ / 1000 elements"):
        assert_aligned(torch.from_numpy(x), paddle.to_tensor(y))


def test_bfloat16_from_a_dump_gets_the_bfloat16_default(tmp_path: os.PathLike) -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    path = reprod.save(os.path.join(tmp_path, "bf.npz"), {"h": x.to(torch.bfloat16)})
    # the float32 values are within bfloat16's rounding of the stored ones, far outside float32's
    result = assert_aligned(path, {"h": x})
    assert (result["h"].ref_dtype, result["h"].rtol) == ("bfloat16", 1.6e-2)
    with pytest.raises(AssertionError, match="rtol 1.300e-06"):
        assert_aligned({"h": x.to(torch.bfloat16).float()}, {"h": x})


@pytest.mark.parametrize("method", ["mean", "max"])
def test_threshold_uses_reprod_log_semantics(method: str) -> None:
    x, y = _logits()
    value = float(getattr(np, method)(np.abs(y.astype(np.float64) - x)))
    # the threshold itself passes (reprod_log fails only when value > threshold)
    result = assert_aligned(x, y, method=method, threshold=value)
    assert result["value"].checks == {method: True}
    assert result["value"].atol is None
    with pytest.raises(AssertionError, match=rf"^value: {method} abs diff .* > "):
        assert_aligned(x, y, method=method, threshold=value * 0.999)


def test_threshold_alone_defaults_to_the_mean() -> None:
    x, y = _logits()
    result = assert_aligned(x, y, threshold=1e-3)
    assert result["value"].methods == ("mean",)


def test_explicit_atol_only_means_rtol_zero() -> None:
    x, y = _logits()
    with pytest.raises(AssertionError) as info:
        assert_aligned(x, y, atol=2e-4)
    assert (
        "1 / 1000 elements (0.1%) outside atol+rtol*|ref| (atol 2.000e-04, rtol 0.000e+00)"
        in str(info.value)
    )
    assert_aligned(x, y, atol=4e-4)


def test_nan_fails_unless_equal_nan() -> None:
    a = np.array([1.0, np.nan, 3.0])
    with pytest.raises(AssertionError, match=r"^value: NaN: 1 in ref, 1 in other \(equal_nan"):
        assert_aligned(a, a.copy())
    assert_aligned(a, a.copy(), equal_nan=True)


def test_keys_select_and_msg_is_put_above() -> None:
    x, y = _logits()
    assert_aligned({"a": x, "b": y}, {"a": x, "b": x}, keys=["a"])
    with pytest.raises(AssertionError) as info:
        assert_aligned({"a": x, "b": y}, {"a": x, "b": x}, keys="b", msg="epoch 3")
    assert str(info.value).splitlines()[0] == "epoch 3"
    assert str(info.value).splitlines()[1].startswith("b: ")
