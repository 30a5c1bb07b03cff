"""reprod.diff.tolerance: which methods judge a key and against which thresholds.

The reference for method names is reprod_log's ``check_print_diff`` (``"all"`` means min, max, mean
in that order; a list keeps its order); per-key rules are exact names or ``fnmatch`` globs, and the
most specific rule wins (an exact name over any glob, then the glob with more literal characters).
"""

from __future__ import annotations

import fnmatch

import pytest

from reprod import ReprodError
from reprod.diff.tolerance import Policy, normalize_methods


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
    p = Policy.build("all", 1e-5, None)
    assert p.for_key("anything") == {"min": 1e-5, "max": 1e-5, "mean": 1e-5}
    assert list(p.for_key("anything")) == ["min", "max", "mean"]


def test_threshold_none_checks_nothing() -> None:
    assert Policy.build("mean", None, None).for_key("x") == {}


def test_exact_name_beats_every_glob() -> None:
    p = Policy.build("mean", 1e-6, {"*": 1.0, "fc.*": 2.0, "*.weight": 3.0, "fc.weight": 4.0})
    assert p.for_key("fc.weight") == {"mean": 4.0}


def test_glob_with_more_literal_characters_wins() -> None:
    rules = {"*": 1.0, "fc.*": 2.0, "*.weight": 3.0}
    p = Policy.build("mean", 1e-6, rules)
    assert p.for_key("fc.weight") == {"mean": 3.0}  # "*.weight" has 7 literals, "fc.*" 3
    assert p.for_key("fc.bias") == {"mean": 2.0}
    assert p.for_key("conv.bias") == {"mean": 1.0}
    # the order the user wrote the rules in does not matter
    p_rev = Policy.build("mean", 1e-6, dict(reversed(list(rules.items()))))
    for key in ("fc.weight", "fc.bias", "conv.bias"):
        assert p_rev.for_key(key) == p.for_key(key)


def test_key_without_matching_rule_keeps_the_defaults() -> None:
    p = Policy.build(["mean", "max"], 1e-6, {"head.*": 1e-3})
    assert p.for_key("backbone.conv") == {"mean": 1e-6, "max": 1e-6}
    assert p.for_key("head.fc") == {"mean": 1e-3, "max": 1e-3}


def test_rules_are_fnmatch_globs() -> None:
    rules = {"layer[12].*": 0.5, "bn?.running_*": 0.25}
    p = Policy.build("mean", 1e-6, rules)
    for key in ("layer1.w", "layer3.w", "bn1.running_mean", "bn12.running_var"):
        matching = [pat for pat in rules if fnmatch.fnmatchcase(key, pat)]
        want = {"mean": rules[matching[0]]} if matching else {"mean": 1e-6}
        assert p.for_key(key) == want, key


def test_dict_rule_sets_the_threshold_of_each_method_it_names() -> None:
    p = Policy.build("mean", 1e-6, {"loss": {"mean": 1e-4, "max": 1e-3}})
    assert p.for_key("loss") == {"mean": 1e-4, "max": 1e-3}
    assert p.for_key("other") == {"mean": 1e-6}


def test_dict_rule_accepts_all_and_rejects_unknown_methods() -> None:
    p = Policy.build("mean", 1e-6, {"x": {"all": 0.5}})
    assert p.for_key("x") == {"min": 0.5, "max": 0.5, "mean": 0.5}
    with pytest.raises(ReprodError, match="unknown diff method"):
        Policy.build("mean", 1e-6, {"x": {"median": 0.5}})


def test_per_key_threshold_works_when_default_threshold_is_off() -> None:
    p = Policy.build("max", None, {"w*": 0.1})
    assert p.for_key("w1") == {"max": 0.1}
    assert p.for_key("b1") == {}
