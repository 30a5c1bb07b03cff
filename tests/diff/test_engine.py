"""reprod.compare and rejudge: pairing, the one pass rule (DESIGN.md section 3) and every verdict.

Numbers are checked against numpy computed here; reprod_log's own ``compute_diff`` is the reference
for what reprod deliberately does differently (uint8 wrap-around).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import DiffResult, KeyResult, compare
from reprod.diff.verdict import rejudge

# ---------------------------------------------------------------------------------------------
# NaN and Inf
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "other"),
    [
        ([1.0, np.nan], [1.0, np.nan]),  # same position on both sides
        ([1.0, np.nan], [1.0, 2.0]),  # NaN in ref only
        ([1.0, 2.0], [np.nan, 2.0]),  # NaN in other only
    ],
)
def test_nan_fails_the_key_by_default(ref: list[float], other: list[float]) -> None:
    r = compare({"x": np.array(ref)}, {"x": np.array(other)}, method="all", threshold=1e9)
    kr = r["x"]
    assert not kr.passed and kr.status == "nan"
    assert kr.checks == {"min": False, "max": False, "mean": False}
    assert (kr.ref_nan, kr.other_nan) == (int(np.isnan(ref).sum()), int(np.isnan(other).sum()))
    assert "equal_nan" in kr.reason
    assert not r.passed


def test_equal_nan_passes_nans_at_the_same_positions_only() -> None:
    ref = np.array([1.0, np.nan, 3.0, np.nan])
    same = np.array([1.0, np.nan, 3.0 + 5e-7, np.nan])
    moved = np.array([np.nan, 2.0, 3.0, np.nan])
    r = compare({"x": ref}, {"x": same}, equal_nan=True)
    assert r["x"].passed and r["x"].status == "passed"
    # matched NaNs are left out of the statistics: mean over the two finite pairs
    assert r["x"].mean_abs == pytest.approx(5e-7 / 2, rel=1e-9)
    r = compare({"x": ref}, {"x": moved}, equal_nan=True)
    assert not r["x"].passed and r["x"].status == "nan"


@pytest.mark.parametrize(
    ("ref", "other", "passed"),
    [
        ([np.inf, 1.0], [np.inf, 1.0], True),
        ([-np.inf, 1.0], [-np.inf, 1.0], True),
        ([np.inf, 1.0], [-np.inf, 1.0], False),  # opposite sign
        ([np.inf, 1.0], [1.0, np.inf], False),  # different positions
        ([np.inf, 1.0], [5.0, 1.0], False),  # Inf against a finite value, either side
        ([5.0, 1.0], [np.inf, 1.0], False),
    ],
)
def test_inf_passes_only_matched_with_same_sign(
    ref: list[float], other: list[float], passed: bool
) -> None:
    r = compare({"x": np.array(ref)}, {"x": np.array(other)}, method="all", threshold=1.0)
    kr = r["x"]
    assert kr.passed is passed
    assert kr.status == ("passed" if passed else "inf")
    assert (kr.ref_inf, kr.other_inf) == (int(np.isinf(ref).sum()), int(np.isinf(other).sum()))
    if passed:  # the matched Inf is left out: every statistic is over the finite pair
        assert (kr.mean_abs, kr.max_abs, kr.min_abs) == (0.0, 0.0, 0.0)


def test_min_cannot_hide_an_unmatched_inf() -> None:
    r = compare({"x": np.array([1.0, 1.0])}, {"x": np.array([1.0, np.inf])}, method="min")
    assert r["x"].min_abs == 0.0
    assert not r["x"].passed and r["x"].status == "inf"


# ---------------------------------------------------------------------------------------------
# keys: missing, extra, nested, filters, order
# ---------------------------------------------------------------------------------------------


def test_missing_and_extra_keys_are_failed_verdicts_in_order() -> None:
    ref = {"a": np.ones(2), "b": np.ones((2, 3)), "c": np.ones(1)}
    other = {"e": np.ones(4, dtype=np.float32), "c": np.ones(1), "a": np.ones(2), "d": np.ones(3)}
    r = compare(ref, other)
    assert r.keys() == ["a", "b", "c", "e", "d"]  # ref order, then extras in other's order
    assert [k.status for k in r] == ["passed", "missing", "passed", "extra", "extra"]
    b, e = r["b"], r["e"]
    assert not b.passed and b.ref_shape == (2, 3) and b.other_shape is None and b.size == 6
    assert (
        not e.passed
        and e.other_shape == (4,)
        and e.other_dtype == "float32"
        and e.ref_shape is None
    )
    assert r.first_failure is not None and r.first_failure.key == "b"


def test_nested_dicts_give_slash_keys_and_path_tuples() -> None:
    ref = {
        "out": {"logits": np.ones(3), "aux": {"x": np.zeros(2)}},
        "loss": np.array(1.0),
        "a/b": np.ones(1),
    }
    other = {
        "out": {"logits": np.ones(3), "aux": {"x": np.zeros(2) + 1.0}},
        "loss": np.array(1.0),
        "a/b": np.ones(1),
    }
    r = compare(ref, other)
    assert r.keys() == ["out/logits", "out/aux/x", "loss", "a/b"]
    assert r["out/aux/x"].path == ("out", "aux", "x")
    assert r["a/b"].path == ("a/b",)  # a key containing "/" stays one element
    assert r["out/aux/x"].status == "failed" and r["out/logits"].passed
    assert r.first_failure is not None and r.first_failure.path == ("out", "aux", "x")


def test_nested_missing_branch_lists_each_leaf() -> None:
    ref = {"a": {"x": np.ones(1), "y": np.ones(1)}}
    r = compare(ref, {})
    assert r.keys() == ["a/x", "a/y"]
    assert all(k.status == "missing" for k in r)


def test_dict_against_array_is_a_type_verdict() -> None:
    r = compare({"a": {"x": np.ones(1)}}, {"a": np.ones(1)})
    assert [k.status for k in r] == ["type"]
    assert not r.passed


def test_first_failure_follows_reference_order_not_other_order() -> None:
    ref = {"a": np.zeros(2), "b": np.zeros(2), "c": np.zeros(2)}
    other = {"c": np.ones(2), "b": np.ones(2), "a": np.zeros(2)}
    r = compare(ref, other)
    assert r.first_failure is not None and r.first_failure.key == "b"
    assert [k.key for k in r.failed] == ["b", "c"]


@pytest.mark.parametrize(
    ("keys", "want"),
    [
        ("fc.*", ["fc.weight", "fc.bias"]),
        (["*.bias", "conv*"], ["conv.weight", "fc.bias", "gone.bias"]),
        ("net/*", ["net/x"]),
        ("nothing*", ["(nothing compared)"]),
    ],
)
def test_keys_glob_selects_keys(keys: Any, want: list[str]) -> None:
    ref = {
        "conv.weight": np.ones(1),
        "fc.weight": np.ones(1),
        "fc.bias": np.ones(1),
        "gone.bias": np.ones(1),
        "net": {"x": np.ones(1)},
    }
    other = {k: v for k, v in ref.items() if k != "gone.bias"}
    r = compare(ref, other, keys=keys)
    assert r.keys() == want
    # a missing key fails; so does a filter that selects nothing (comparing nothing proves nothing)
    assert ("gone.bias" in want or not r.results[0].path) is (not r.passed)


def test_comparing_nothing_is_a_failure_with_its_own_verdict() -> None:
    for ref, other in (({}, {}), ({"a": {}}, {"b": {}})):
        r = compare(ref, other)
        assert not r.passed and [kr.status for kr in r] == ["nothing"]
        assert "nothing to compare" in r.results[0].reason


# ---------------------------------------------------------------------------------------------
# shapes, dtypes, empty arrays
# ---------------------------------------------------------------------------------------------


def test_shape_mismatch_is_a_shape_verdict() -> None:
    r = compare({"x": np.ones((2, 3))}, {"x": np.ones((2, 4))})
    kr = r["x"]
    assert not kr.passed and kr.status == "shape"
    assert (kr.ref_shape, kr.other_shape) == ((2, 3), (2, 4))
    assert "(2, 3)" in kr.reason and "(2, 4)" in kr.reason
    assert kr.mean_abs is None


def test_transpose_fails_with_a_hint() -> None:
    w = np.arange(6.0).reshape(2, 3)
    r = compare({"fc.weight": w}, {"fc.weight": w.T.copy()})
    kr = r["fc.weight"]
    assert not kr.passed and kr.status == "shape"
    assert "transpose" in kr.reason


# numpy broadcasts each of these pairs element by element (leading axes of size 1)
@pytest.mark.parametrize(
    ("a", "b"), [((1,), ()), ((), (1,)), ((1, 3), (3,)), ((1, 1, 2, 3), (2, 3))]
)
def test_shapes_differing_only_by_size_one_axes_pass_with_a_note(a: tuple, b: tuple) -> None:
    ref = np.arange(int(np.prod(a)), dtype=np.float32).reshape(a) + 0.5
    other = ref.reshape(b).copy()
    r = compare({"loss": ref}, {"loss": other})
    kr = r["loss"]
    assert kr.passed and kr.status == "passed"
    assert kr.note is not None and "size 1" in kr.note
    assert (kr.ref_shape, kr.other_shape) == (a, b)


def test_size_one_axes_compare_element_by_element() -> None:
    ref = np.array([[1.0, 2.0, 3.0]])
    other = np.array([1.0, 2.5, 3.0])
    kr = compare({"x": ref}, {"x": other}, method="max", threshold=1.0)["x"]
    assert kr.max_abs == 0.5 and kr.worst_index == (0, 1) and kr.size == 3


def test_broadcast_that_is_not_elementwise_is_a_shape_verdict() -> None:
    # DESIGN.md: "any other broadcast ((3, 1) against (1, 3), which reprod_log silently turns into
    # a 3x3 cross product) is a shape verdict"; (3, 1) against (3,) holds the same three elements
    # in the same order (reprod_log's lr lists) and is compared element by element.
    a = np.array([[1.0], [2.0], [3.0]])
    assert np.broadcast_shapes(a.shape, (1, 3)) == (3, 3)
    kr = compare({"x": a}, {"x": a.reshape(1, 3)})["x"]
    assert not kr.passed and kr.status == "shape"
    kr = compare({"x": a}, {"x": a.reshape(3)})["x"]
    assert kr.passed and kr.size == 3 and "axes of size 1" in kr.note


def test_both_empty_with_equal_shapes_pass() -> None:
    r = compare({"x": np.zeros((0, 3))}, {"x": np.zeros((0, 3))}, method="all")
    assert r["x"].passed and r["x"].size == 0


@pytest.mark.parametrize(("a", "b"), [((0,), (3,)), ((2, 3), (2, 0))])
def test_one_side_empty_is_an_empty_verdict(a: tuple, b: tuple) -> None:
    kr = compare({"x": np.zeros(a)}, {"x": np.zeros(b)})["x"]
    assert not kr.passed
    assert kr.status == "empty"  # KeyResult: "empty (an empty array against a non-empty one)"


def test_different_dtypes_are_compared_by_value_with_a_note() -> None:
    ref = np.array([0.1, 0.2, 0.3], dtype=np.float64)
    other = ref.astype(np.float32)
    kr = compare({"x": ref}, {"x": other}, method="max", threshold=1e-7)["x"]
    assert kr.passed
    assert (kr.ref_dtype, kr.other_dtype) == ("float64", "float32")
    assert kr.note is not None and "float64" in kr.note and "float32" in kr.note
    assert kr.max_abs == float(np.abs(other.astype(np.float64) - ref).max())


def test_int_against_float_compared_by_value() -> None:
    kr = compare({"x": np.array([1, 2, 3], dtype=np.int64)}, {"x": np.array([1.0, 2.0, 3.0])})["x"]
    assert kr.passed and kr.note is not None


def test_uint8_differences_do_not_wrap_unlike_reprod_log() -> None:
    pytest.importorskip("paddle")
    from reprod_log.compare import compute_diff

    ref = np.array([0, 10, 200], dtype=np.uint8)
    other = np.array([255, 10, 100], dtype=np.uint8)
    true = np.abs(other.astype(np.int64) - ref.astype(np.int64))  # [255, 0, 100]
    kr = compare({"x": ref}, {"x": other}, method="all", threshold=1.0)["x"]
    assert (kr.max_abs, kr.min_abs) == (255.0, 0.0)
    assert kr.mean_abs == pytest.approx(true.mean(), rel=1e-15)
    assert not kr.passed
    # reprod_log subtracts in uint8: 0 - 255 wraps to 1, and the key looks nearly aligned
    rl = compute_diff({"x": ref}, {"x": other})["x"]
    assert rl["max"] == 100 and rl["mean"] == pytest.approx((1 + 0 + 100) / 3)
    assert rl["max"] != kr.max_abs


# ---------------------------------------------------------------------------------------------
# methods and thresholds
# ---------------------------------------------------------------------------------------------

# |other - ref| = [0, 0.5, 1.0], |ref| = [1, 1, 2]: min 0, mean 0.5, max 1; rel [0, 0.5, 0.5]
REF = np.array([1.0, 1.0, 2.0])
OTHER = np.array([1.0, 1.5, 3.0])


@pytest.mark.parametrize(
    ("method", "checks"),
    [
        ("mean", {"mean": True}),  # 0.5 <= 0.5: the threshold itself passes
        ("max", {"max": False}),
        ("min", {"min": True}),
        ("all", {"min": True, "max": False, "mean": True}),
        (["max", "mean"], {"max": False, "mean": True}),
        ("mean_rel", {"mean_rel": True}),
        ("max_rel", {"max_rel": True}),
        (["mean", "min"], {"mean": True, "min": True}),
    ],
)
def test_methods_each_judge_their_own_statistic(method: Any, checks: dict[str, bool]) -> None:
    kr = compare({"x": REF}, {"x": OTHER}, method=method, threshold=0.5)["x"]
    assert kr.checks == checks
    assert list(kr.checks) == list(checks)  # reprod_log's printing order
    assert kr.methods == tuple(checks)
    assert kr.passed is all(checks.values())
    assert kr.status == ("passed" if kr.passed else "failed")
    assert (kr.min_abs, kr.mean_abs, kr.max_abs) == (0.0, 0.5, 1.0)
    assert kr.mean_rel == pytest.approx(1 / 3, rel=1e-15) and kr.max_rel == 0.5


@pytest.mark.parametrize("method", ["mean", "max", "min"])
def test_threshold_itself_passes_and_one_ulp_below_fails(method: str) -> None:
    d = 2.0**-10  # every difference the same: mean == max == min == d exactly
    ref = np.linspace(1.0, 2.0, 8)
    other = ref + d
    assert (np.abs(other - ref) == d).all()
    assert compare({"x": ref}, {"x": other}, method=method, threshold=d)["x"].passed
    below = np.nextafter(d, 0.0)
    kr = compare({"x": ref}, {"x": other}, method=method, threshold=below)["x"]
    assert not kr.passed and kr.status == "failed"


def test_failed_reason_names_method_value_threshold_and_worst_element() -> None:
    kr = compare({"x": REF}, {"x": OTHER}, method="max", threshold=0.5)["x"]
    assert "max" in kr.reason and "1.000e+00" in kr.reason and "5.000e-01" in kr.reason
    assert kr.worst_index == (2,) and (kr.worst_ref, kr.worst_other) == (2.0, 3.0)
    assert "(2,)" in kr.reason


def test_threshold_none_passes_finite_keys_but_still_fails_nan_and_shape() -> None:
    r = compare(
        {"a": np.zeros(2), "b": np.array([np.nan]), "c": np.ones(2)},
        {"a": np.ones(2) * 1e3, "b": np.array([np.nan]), "c": np.ones(3)},
        threshold=None,
    )
    assert [k.status for k in r] == ["passed", "nan", "shape"]
    assert r["a"].mean_abs == 1e3


def test_atol_rtol_count_mismatched_elements_like_numpy_isclose() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 30))
    other = ref + rng.normal(scale=1e-3, size=ref.shape)
    atol, rtol = 1e-3, 1e-3
    want = int((~np.isclose(other, ref, atol=atol, rtol=rtol)).sum())
    assert 0 < want < ref.size
    kr = compare({"x": ref}, {"x": other}, threshold=None, atol=atol, rtol=rtol)["x"]
    assert kr.mismatched == want and kr.status == "mismatch" and not kr.passed
    assert f"{want} / {ref.size}" in kr.reason
    kr = compare({"x": ref}, {"x": other}, threshold=None, atol=1.0)["x"]
    assert kr.mismatched == 0 and kr.passed


def test_unknown_method_raises_reprod_error() -> None:
    with pytest.raises(reprod.ReprodError):
        compare({"x": REF}, {"x": OTHER}, method="median")


# ---------------------------------------------------------------------------------------------
# per_key
# ---------------------------------------------------------------------------------------------


def test_per_key_exact_names_globs_and_most_specific_wins() -> None:
    diff = {"fc.weight": 0.05, "fc.bias": 0.005, "conv.weight": 0.02, "conv.bias": 0.5}
    ref = {k: np.zeros(4) for k in diff}
    other = {k: np.full(4, v) for k, v in diff.items()}
    per_key = {"*.weight": 1e-2, "fc.*": 1e-2, "fc.weight": 1e-1, "*": 1e-3}
    r = compare(ref, other, method="mean", threshold=1e-6, per_key=per_key)
    assert r["fc.weight"].thresholds == {"mean": 1e-1}  # exact name
    assert r["conv.weight"].thresholds == {"mean": 1e-2}  # "*.weight" beats "*"
    assert r["fc.bias"].thresholds == {"mean": 1e-2}  # "fc.*" beats "*"
    assert r["conv.bias"].thresholds == {"mean": 1e-3}  # only "*"
    assert {k.key: k.passed for k in r} == {
        "fc.weight": True,
        "fc.bias": True,
        "conv.weight": False,
        "conv.bias": False,
    }


def test_per_key_dict_values_set_method_thresholds() -> None:
    r = compare(
        {"loss": REF, "x": REF},
        {"loss": OTHER, "x": OTHER},
        method="mean",
        threshold=1.0,
        per_key={"lo*": {"mean": 0.4, "max": 1.0}},
    )
    assert r["loss"].thresholds == {"mean": 0.4, "max": 1.0}
    assert r["loss"].checks == {"mean": False, "max": True}
    assert r["x"].thresholds == {"mean": 1.0} and r["x"].passed


# ---------------------------------------------------------------------------------------------
# inputs: paths in both formats, dicts, torch and paddle tensors
# ---------------------------------------------------------------------------------------------

_REF = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.array([1.5, -2.0])}}
_OTHER = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3) + np.float32(0.25),
    "b": {"c": np.array([1.5, -1.0])},
}


def _stats(r: DiffResult) -> list[tuple[Any, ...]]:
    return [
        (k.key, k.path, k.status, k.ref_shape, k.ref_dtype, k.mean_abs, k.max_abs, k.min_abs)
        for k in r
    ]


def test_paths_in_both_formats_give_the_same_result_as_dicts(tmp_path: Any, fmt: str) -> None:
    want = _stats(compare(_REF, _OTHER, method="all", threshold=0.3))
    assert want[0][5:] == (0.25, 0.25, 0.25) and want[1][5:] == (0.5, 1.0, 0.0)
    ref_p = reprod.save(str(tmp_path / f"ref.{fmt}"), _REF)
    other_p = reprod.save(str(tmp_path / f"other.{fmt}"), _OTHER)
    r = compare(ref_p, other_p, method="all", threshold=0.3)
    assert _stats(r) == want
    assert (r.ref_name, r.other_name) == (ref_p, other_p)
    # os.PathLike works too
    assert (
        _stats(
            compare(tmp_path / f"ref.{fmt}", tmp_path / f"other.{fmt}", method="all", threshold=0.3)
        )
        == want
    )


def test_reprod_log_style_np_save_dict_is_read(tmp_path: Any) -> None:
    # what reprod_log's ReprodLogger.save writes: np.save of a pickled dict
    np.save(tmp_path / "ref.npy", _REF, allow_pickle=True)
    np.save(tmp_path / "other.npy", _OTHER, allow_pickle=True)
    r = compare(str(tmp_path / "ref.npy"), str(tmp_path / "other.npy"), method="all", threshold=0.3)
    assert _stats(r) == _stats(compare(_REF, _OTHER, method="all", threshold=0.3))


def test_torch_against_paddle_tensors(torch: Any, paddle: Any) -> None:
    ref = {"a": torch.tensor(_REF["a"]), "b": {"c": torch.tensor(_REF["b"]["c"])}}
    other = {"a": paddle.to_tensor(_OTHER["a"]), "b": {"c": paddle.to_tensor(_OTHER["b"]["c"])}}
    r = compare(ref, other, method="all", threshold=0.3)
    assert _stats(r) == _stats(compare(_REF, _OTHER, method="all", threshold=0.3))


def test_torch_bfloat16_is_compared_by_value_and_named(torch: Any) -> None:
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    kr = compare({"x": t}, {"x": t.float().numpy()}, method="max", threshold=0.0)["x"]
    assert kr.passed and kr.ref_dtype == "bfloat16" and kr.other_dtype == "float32"


def test_single_arrays_compare_as_one_key() -> None:
    r = compare(np.ones(3), np.ones(3))
    assert len(r) == 1 and r.passed


# ---------------------------------------------------------------------------------------------
# DiffResult data
# ---------------------------------------------------------------------------------------------


def _mixed_result() -> DiffResult:
    ref = {
        "ok": REF,
        "bad": REF,
        "inf": np.array([np.inf, 1.0]),
        "nan": np.array([np.nan]),
        "shape": np.ones((2, 3)),
        "gone": np.ones(1),
        "n": {"x": np.ones(2)},
    }
    other = {
        "ok": REF,
        "bad": OTHER,
        "inf": np.array([1.0, 1.0]),
        "nan": np.array([np.nan]),
        "shape": np.ones((3, 2)),
        "n": {"x": np.ones(2)},
        "new": np.ones(1),
    }
    return compare(
        ref, other, method=["mean", "max"], threshold=0.5, atol=0.1, rtol=0.0, per_key={"ok": 1e-3}
    )


def test_to_dict_from_dict_round_trip_through_json() -> None:
    r = _mixed_result()
    doc = json.loads(json.dumps(r.to_dict(), allow_nan=False))  # strict JSON: inf as a string
    assert doc["passed"] is False and doc["summary"]["first_failure"] == "bad"
    assert [k["key"] for k in doc["keys"]] == r.keys()
    back = DiffResult.from_dict(doc)
    assert back == r
    assert back["inf"].max_abs == float("inf")
    assert back["n/x"].path == ("n", "x")


def test_key_result_round_trip_keeps_tuples() -> None:
    kr = _mixed_result()["bad"]
    back = KeyResult.from_dict(json.loads(json.dumps(kr.to_dict())))
    assert back == kr and isinstance(back.worst_index, tuple) and isinstance(back.methods, tuple)


def test_summary_counts_statuses() -> None:
    s = _mixed_result().summary()
    assert s["statuses"] == {
        "passed": 2,
        "failed": 1,
        "inf": 1,
        "nan": 1,
        "shape": 1,
        "missing": 1,
        "extra": 1,
    }
    assert (s["compared"], s["passed"], s["failed"]) == (8, 2, 6)


# ---------------------------------------------------------------------------------------------
# rejudge
# ---------------------------------------------------------------------------------------------


_REJUDGE_REF = {
    "a": np.linspace(0.0, 1.0, 12).reshape(3, 4),
    "b": np.array([1.0, np.nan]),
    "c": np.array([np.inf, 2.0]),
    "c2": np.array([np.inf, 2.0]),
    "d": np.ones((2, 3)),
    "e": np.ones(2),
    "f": {"g": np.array([0.0, 0.0, 2.0]), "h": np.zeros(0)},
    "i": np.array([1.0, 2.0, 4.0]),
}
_REJUDGE_OTHER = {
    "a": np.linspace(0.0, 1.0, 12).reshape(3, 4) + np.linspace(0.0, 1e-3, 12).reshape(3, 4),
    "b": np.array([1.0, np.nan]),
    "c": np.array([1.0, 2.0]),
    "c2": np.array([np.inf, 2.0]),
    "d": np.ones((3, 2)),
    "f": {"g": np.array([0.0, 1e-5, 2.5]), "h": np.zeros(0)},
    "i": np.array([1.0, 2.0, 4.0]) + 2e-6,
    "j": np.ones(1),
}


@pytest.mark.parametrize(
    ("method", "threshold", "per_key"),
    [
        ("mean", 1e-6, None),
        ("max", 1e-3, None),
        ("min", 0.0, None),
        ("all", 5e-4, None),
        (["max", "mean"], 2e-6, None),
        ("mean_rel", 0.1, None),
        ("max_rel", 1e-6, {"f/*": 0.3}),
        ("mean", 1e-6, {"i": {"max": 3e-6, "min": 1e-6}, "a": 1e-3}),
        ("all", None, None),
    ],
)
def test_rejudge_gives_the_same_verdicts_as_compare(
    method: Any, threshold: Any, per_key: Any
) -> None:
    base = compare(_REJUDGE_REF, _REJUDGE_OTHER, method="all", threshold=None)
    again = rejudge(base, method=method, threshold=threshold, per_key=per_key)
    direct = compare(
        _REJUDGE_REF, _REJUDGE_OTHER, method=method, threshold=threshold, per_key=per_key
    )
    assert again.keys() == direct.keys()
    for got, want in zip(again, direct):
        assert (got.key, got.status, got.passed, got.methods, got.thresholds, got.reason) == (
            want.key,
            want.status,
            want.passed,
            want.methods,
            want.thresholds,
            want.reason,
        ), got.key
        if want.status in ("passed", "failed", "mismatch") and want.size:
            # keys judged on statistics; the others have their own test below
            assert got.checks == want.checks, got.key
    assert again.passed is direct.passed
    assert again.options["methods"] == direct.options["methods"]


@pytest.mark.parametrize("method", ["mean", "all", ["max", "min"]])
def test_rejudge_and_compare_agree_on_per_method_checks_of_every_key(method: Any) -> None:
    # keys with no statistic to judge (shape, missing, extra, both empty) and NaN/Inf keys: each
    # method's check is the key's verdict, whether the result came from compare or from rejudge
    base = compare(_REJUDGE_REF, _REJUDGE_OTHER, method="all", threshold=None)
    again = rejudge(base, method=method, threshold=1e-3)
    direct = compare(_REJUDGE_REF, _REJUDGE_OTHER, method=method, threshold=1e-3)
    assert {k.status for k in direct} >= {"shape", "missing", "extra", "nan", "inf"}
    for got, want in zip(again, direct):
        where = f"{got.key} ({got.status})"
        assert set(want.checks) == set(want.thresholds), where
        assert got.checks == want.checks, where
        if want.status not in ("passed", "failed", "mismatch"):
            assert not any(want.checks.values()), where


def test_rejudge_keeps_mismatch_verdicts_and_statistics() -> None:
    base = compare({"x": REF}, {"x": OTHER}, method="all", threshold=None, atol=0.1)
    assert base["x"].status == "mismatch"
    again = rejudge(base, method="max", threshold=10.0)
    assert again["x"].status == "mismatch" and again["x"].mismatched == 2
    assert again["x"].mean_abs == base["x"].mean_abs


def test_compare_changes_neither_its_inputs_nor_the_disk(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ref = {"x": REF.copy()}
    other = {"x": OTHER.copy()}
    compare(ref, other, method="all")
    np.testing.assert_array_equal(ref["x"], REF)
    np.testing.assert_array_equal(other["x"], OTHER)
    assert not os.listdir(tmp_path)
