"""reprod.diff.criteria: which methods judge a key and against which thresholds.

The reference for method names is reprod_log's ``check_print_diff`` (``"all"`` means min, max, mean
in that order; a list keeps its order); per-key rules are exact names or ``fnmatch`` globs, and the
most specific rule wins (an exact name over any glob, then the glob with more literal characters).
"""

from __future__ import annotations

import fnmatch

import pytest

from reprod import ReprodError
from reprod.diff.criteria import Criteria, normalize_methods


@pytest.mark.parametrize(
    ("method", "want"),
    [
        ("mean", ("mean",)),
        ("max", ("max",)),
        ("min", ("min",)),
        ("all", ("min", "max", "mean")),  # reprod_log's order
        (["max", "mean"], ("max", "mean")),
        (("mean", "min"), ("mean", "min")),
        (["mean", "all"], ("mean", "min", "max")),  # duplicates dropped, first position kept
        ("mean_rel", ("mean_rel",)),
        (["max_rel", "mean_rel"], ("max_rel", "mean_rel")),
        (None, ()),
    ],
)
def test_normalize_methods(method: object, want: tuple[str, ...]) -> None:
    assert normalize_methods(method) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["avg", ["mean", "median"], "MEAN"])
def test_unknown_method_is_a_reprod_error_naming_it(bad: object) -> None:
    with pytest.raises(ReprodError, match="unknown diff method") as info:
        normalize_methods(bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_default_policy_applies_the_run_threshold_to_every_method() -> None:
    p = Criteria(methods="all", threshold=1e-5, per_key=None)
    assert p.thresholds_for("anything") == {"min": 1e-5, "max": 1e-5, "mean": 1e-5}
    assert list(p.thresholds_for("anything")) == ["min", "max", "mean"]


def test_threshold_none_checks_nothing() -> None:
    assert Criteria(methods="mean", threshold=None, per_key=None).thresholds_for("x") == {}


def test_exact_name_beats_every_glob() -> None:
    p = Criteria(methods="mean", threshold=1e-6, per_key={"*": 1.0, "fc.*": 2.0, "*.weight": 3.0, "fc.weight": 4.0})
    assert p.thresholds_for("fc.weight") == {"mean": 4.0}


def test_glob_with_more_literal_characters_wins() -> None:
    rules = {"*": 1.0, "fc.*": 2.0, "*.weight": 3.0}
    p = Criteria(methods="mean", threshold=1e-6, per_key=rules)
    assert p.thresholds_for("fc.weight") == {"mean": 3.0}  # "*.weight" has 7 literals, "fc.*" 3
    assert p.thresholds_for("fc.bias") == {"mean": 2.0}
    assert p.thresholds_for("conv.bias") == {"mean": 1.0}
    # the order the user wrote the rules in does not matter
    p_rev = Criteria(methods="mean", threshold=1e-6, per_key=dict(reversed(list(rules.items()))))
    for key in ("fc.weight", "fc.bias", "conv.bias"):
        assert p_rev.thresholds_for(key) == p.thresholds_for(key)


def test_key_without_matching_rule_keeps_the_defaults() -> None:
    p = Criteria(methods=["mean", "max"], threshold=1e-6, per_key={"head.*": 1e-3})
    assert p.thresholds_for("backbone.conv") == {"mean": 1e-6, "max": 1e-6}
    assert p.thresholds_for("head.fc") == {"mean": 1e-3, "max": 1e-3}


def test_rules_are_fnmatch_globs() -> None:
    rules = {"layer[12].*": 0.5, "bn?.running_*": 0.25}
    p = Criteria(methods="mean", threshold=1e-6, per_key=rules)
    for key in ("layer1.w", "layer3.w", "bn1.running_mean", "bn12.running_var"):
        matching = [pat for pat in rules if fnmatch.fnmatchcase(key, pat)]
        want = {"mean": rules[matching[0]]} if matching else {"mean": 1e-6}
        assert p.thresholds_for(key) == want, key


def test_dict_rule_sets_the_threshold_of_each_method_it_names() -> None:
    p = Criteria(methods="mean", threshold=1e-6, per_key={"loss": {"mean": 1e-4, "max": 1e-3}})
    assert p.thresholds_for("loss") == {"mean": 1e-4, "max": 1e-3}
    assert p.thresholds_for("other") == {"mean": 1e-6}


def test_dict_rule_accepts_all_and_rejects_unknown_methods() -> None:
    p = Criteria(methods="mean", threshold=1e-6, per_key={"x": {"all": 0.5}})
    assert p.thresholds_for("x") == {"min": 0.5, "max": 0.5, "mean": 0.5}
    with pytest.raises(ReprodError, match="unknown diff method"):
        Criteria(methods="mean", threshold=1e-6, per_key={"x": {"median": 0.5}})


def test_per_key_threshold_works_when_default_threshold_is_off() -> None:
    p = Criteria(methods="max", threshold=None, per_key={"w*": 0.1})
    assert p.thresholds_for("w1") == {"max": 0.1}
    assert p.thresholds_for("b1") == {}


# --- the Criteria object itself ----------------------------------------------------------------

import math  # noqa: E402

import numpy as np  # noqa: E402

import reprod  # noqa: E402
from reprod.diff.criteria import CriteriaError, default_tolerance  # noqa: E402
from reprod.errors import ReprodError as _ReprodError  # noqa: E402


@pytest.mark.parametrize("field", ["threshold", "atol", "rtol"])
@pytest.mark.parametrize("bad", [math.nan, -1e-6, -math.inf, "x"])
def test_nan_negative_or_non_numeric_limits_are_usage_errors(field: str, bad: object) -> None:
    with pytest.raises(CriteriaError) as info:
        Criteria(**{field: bad})
    assert isinstance(info.value, ValueError) and isinstance(info.value, _ReprodError)
    assert field in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("rule", [math.nan, {"max": math.nan}, {"atol": -1.0}, {"rtol": math.nan}])
def test_nan_or_negative_per_key_limits_are_usage_errors(rule: object) -> None:
    with pytest.raises(CriteriaError, match="'w'"):
        Criteria(per_key={"w": rule})


def test_nan_threshold_never_passes_a_large_difference_through_compare() -> None:
    a, b = {"x": np.zeros(4)}, {"x": np.full(4, 1e6)}
    for kw in ({"threshold": math.nan}, {"atol": math.nan}, {"rtol": math.nan},
               {"per_key": {"x": math.nan}}):
        with pytest.raises(ValueError):
            reprod.compare(a, b, **kw)


def test_dtype_tolerances_are_resolved_from_the_pair_of_dtypes() -> None:
    c = Criteria(methods=None, threshold=None, dtype_tolerances=True)
    assert c.tolerance_for("k", "float32", "float32") == (1e-5, 1.3e-6)
    assert c.tolerance_for("k", "float32", "float16") == (1e-5, 1e-3)  # the looser side
    assert c.tolerance_for("k", "int64", "int64") == (0.0, 0.0)
    assert c.tolerance_for("k", "bfloat16", None) == (1e-5, 1.6e-2)
    tol = default_tolerance("float64", "float64")
    assert c.tolerance_for("k", "float64", "float64") == (tol.atol, tol.rtol)


def test_given_tolerances_and_rules_take_precedence_over_dtype_defaults() -> None:
    c = Criteria(methods=None, threshold=None, dtype_tolerances=True, per_key={"w": {"atol": 0.5}})
    assert c.tolerance_for("w", "float32", "float32") == (0.5, None)
    assert Criteria(atol=1e-3, dtype_tolerances=True).tolerance_for("k", "float16", "float16") == (1e-3, None)


def test_exact_rules_are_looked_up_by_name_not_by_scanning() -> None:
    rules = {f"layer.{i}.weight": float(i) for i in range(5000)}
    rules["layer.*"] = 0.5
    c = Criteria(methods="max", threshold=1e-6, per_key=rules)
    assert c.thresholds_for("layer.4321.weight") == {"max": 4321.0}
    assert c.thresholds_for("layer.x") == {"max": 0.5}
    assert len(c._globs) == 1  # every exact name went to the dict


def test_compare_takes_criteria_and_keyword_shortcuts_override_it() -> None:
    a, b = {"x": np.zeros(3)}, {"x": np.full(3, 1e-4)}
    crit = reprod.Criteria(methods="max", threshold=1e-3)
    r = reprod.compare(a, b, criteria=crit)
    assert r.passed and r["x"].methods == ("max",) and r["x"].thresholds == {"max": 1e-3}
    r = reprod.compare(a, b, criteria=crit, threshold=1e-5)
    assert not r.passed and r["x"].thresholds == {"max": 1e-5}
    # the same result as the keyword form, field for field
    kw = reprod.compare(a, b, method="max", threshold=1e-3)
    assert [k.to_dict() for k in kw] == [k.to_dict() for k in reprod.compare(a, b, criteria=crit)]


def test_criteria_replace_validates_again() -> None:
    c = Criteria(methods="max", threshold=1e-5)
    assert c.replace(threshold=1e-3).threshold == 1e-3
    with pytest.raises(CriteriaError):
        c.replace(atol=-1.0)
