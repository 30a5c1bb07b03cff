"""The capture key scheme, rename rules and pairing by call order (framework-free)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reprod.capture import CaptureKey, layer_key, param_key, parse_key, rename, rename_by_order
from reprod.errors import KeyMismatchError, UnsupportedValueError

# layer names as torch/paddle make them: dotted attribute names and indices
_word = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}|[0-9]{1,2}", fullmatch=True)
layer_names = st.lists(_word, min_size=1, max_size=5).map(".".join)
items = st.lists(st.one_of(st.integers(0, 20), st.from_regex(r"[A-Za-z_. ]{1,6}", fullmatch=True)), max_size=3)


@pytest.mark.parametrize(
    "key, expected",
    [
        ("conv.out", CaptureKey("conv", 1, "out")),
        ("features.3.block.2#2.out[0]", CaptureKey("features.3.block.2", 2, "out", ("0",))),
        ("res.in[1]", CaptureKey("res", 1, "in", ("1",))),
        ("head.out.out", CaptureKey("head.out", 1, "out")),  # a layer attribute named "out"
        ("m.out[out]", CaptureKey("m", 1, "out", ("out",))),  # a dict output keyed "out"
        ("m.out[0][a.b]", CaptureKey("m", 1, "out", ("0", "a.b"))),
        ("fc.grad_out", CaptureKey("fc", 1, "grad_out")),
        ("param.fc.weight.grad", CaptureKey("fc.weight", 1, "grad")),
        ("param.fc.weight#3.grad", CaptureKey("fc.weight", 3, "grad")),
        ("<model>.out", CaptureKey("<model>", 1, "out")),
        ("param.out", CaptureKey("param", 1, "out")),  # layers may be called "param"
        ("param.x.in", CaptureKey("param.x", 1, "in")),
    ],
)
def test_parse_known_keys(key, expected):
    parsed = parse_key(key)
    assert parsed == expected
    assert str(parsed) == key


@pytest.mark.parametrize(
    "key", ["loss", "logits", "conv.weight", "fc.grad", "param..grad", "conv#0.out", ".out", "x.out[a"]
)
def test_keys_outside_the_scheme_do_not_parse(key):
    assert parse_key(key) is None


@given(layer_names, st.integers(1, 5), st.sampled_from(["in", "out", "grad_out", "grad_in"]), items)
def test_layer_key_round_trips(name, call, what, its):
    key = layer_key(name, call, what, its)
    parsed = parse_key(key)
    assert parsed is not None
    assert (parsed.name, parsed.call, parsed.what) == (name, call, what)
    assert parsed.items == tuple(str(i) for i in its)
    assert (call == 1) == ("#" not in key)


@given(layer_names, st.integers(1, 5))
def test_param_key_round_trips(name, call):
    parsed = parse_key(param_key(name, call))
    assert parsed is not None and parsed.is_param
    assert (parsed.name, parsed.call) == (name, call)


def test_brackets_in_item_names_cannot_break_the_key():
    key = layer_key("m", 1, "out", ("a[1]",))
    assert parse_key(key) == CaptureKey("m", 1, "out", ("a(1)",))


def test_layer_key_refuses_unknown_parts():
    with pytest.raises(ValueError):
        layer_key("m", 1, "grad")


# --- rename --------------------------------------------------------------------------------------

DATA = {
    "blocks.0.conv.in": 1,
    "blocks.0.conv.out": 2,
    "blocks.0.conv#2.out[0]": 3,
    "param.blocks.0.conv.weight.grad": 4,
    "loss": 5,
}


def test_rename_with_regex_rules_renames_layers_and_their_parameters():
    out = rename(DATA, [(r"^blocks\.(\d+)", lambda m: f"features.{int(m.group(1)) + 1}")])
    assert list(out) == [
        "features.1.conv.in",
        "features.1.conv.out",
        "features.1.conv#2.out[0]",
        "param.features.1.conv.weight.grad",
        "loss",
    ]
    assert list(out.values()) == [1, 2, 3, 4, 5]


def test_rename_first_matching_rule_wins():
    out = rename({"a.b.out": 0}, [(r"^a", "x"), (r"b", "y")])
    assert list(out) == ["x.b.out"]


def test_rename_with_a_dict_maps_names_and_whole_keys():
    out = rename(DATA, {"blocks.0.conv": "stem", "loss": "total_loss", "blocks.0.conv.in": "image"})
    assert list(out) == ["image", "stem.out", "stem#2.out[0]", "param.stem.weight.grad", "total_loss"]


def test_rename_dict_entries_cover_what_lies_under_them_longest_first():
    rules = {"blocks": "features", "blocks.0": "stem", "blocks.0.se.fc": "se.squeeze"}
    keys = ["blocks.0.conv.out", "blocks.1.conv.out", "blocks.0.se.fc.out", "blocks.0.se.fc2.out", "blocksx.out"]
    assert list(rename(dict.fromkeys(keys), rules)) == [
        "stem.conv.out",
        "features.1.conv.out",
        "se.squeeze.out",
        "stem.se.fc2.out",  # "fc2" is not under "fc"
        "blocksx.out",
    ]


def test_rename_with_a_callable_none_keeps_the_name():
    out = rename(DATA, lambda name: name.upper() if name == "loss" else None)
    assert list(out) == list(DATA)[:-1] + ["LOSS"]


def test_rename_collision_names_both_keys():
    with pytest.raises(KeyMismatchError, match=r"'a\.out'.*'b\.out'.*'c\.out'"):
        rename({"a.out": 1, "b.out": 2}, {"a": "c", "b": "c"})


def test_rename_rejects_malformed_rules():
    with pytest.raises(UnsupportedValueError, match="regex pattern, replacement"):
        rename({"a.out": 1}, ["not-a-pair"])


def test_rename_accepts_compiled_patterns():
    out = rename({"Blocks.out": 1}, [(re.compile("blocks", re.I), "features")])
    assert list(out) == ["features.out"]


# --- pairing by call order -------------------------------------------------------------------


def _arr(*shape):
    return np.zeros(shape, dtype=np.float32)


def test_rename_by_order_pairs_renamed_layers_and_their_parameter_grads():
    ref = {
        "stem.in": _arr(1, 3), "stem.out": _arr(1, 4),
        "features.1.in": _arr(1, 4), "features.1.out": _arr(1, 6),
        "features.1#2.in": _arr(1, 4), "features.1#2.out": _arr(1, 6),
        "param.features.1.weight.grad": _arr(6, 4),
        "loss": _arr(),
    }
    other = {
        "conv.in": _arr(1, 3), "conv.out": _arr(1, 4),
        "blocks.0.in": _arr(1, 4), "blocks.0.out": _arr(1, 6),
        "blocks.0#2.in": _arr(1, 4), "blocks.0#2.out": _arr(1, 6),
        "param.blocks.0.weight.grad": _arr(4, 6),  # transposed, as paddle's Linear keeps it
        "loss": _arr(),
    }
    paired = rename_by_order(ref, other)
    assert list(paired) == list(ref)
    assert all(paired[k] is other[o] for k, o in zip(ref, other))


def test_rename_by_order_skips_a_layer_only_one_side_has():
    ref = {"a.out": _arr(2), "b.out": _arr(3), "c.out": _arr(4), "d.out": _arr(5)}
    other = {"w.out": _arr(2), "x.out": _arr(3), "extra.out": _arr(9), "y.out": _arr(4), "z.out": _arr(5)}
    paired = rename_by_order(ref, other)
    assert list(paired) == ["a.out", "b.out", "extra.out", "c.out", "d.out"]


def test_pair_by_order_is_a_deprecated_alias_of_rename_by_order():
    import reprod.capture as capture

    ref = {"a.out": _arr(2), "b.out": _arr(3)}
    other = {"x.out": _arr(2), "y.out": _arr(3)}
    with pytest.warns(DeprecationWarning, match="rename_by_order"):
        assert capture.pair_by_order(ref, other) == rename_by_order(ref, other)


def test_rename_by_order_leaves_shape_mismatches_unpaired():
    ref = {"a.out": _arr(2), "b.out": _arr(3)}
    other = {"x.out": _arr(2), "y.out": _arr(7)}
    assert list(rename_by_order(ref, other)) == ["a.out", "y.out"]


def test_rename_by_order_uses_forward_shapes_even_when_a_gradient_is_missing():
    ref = {"a.out": _arr(2), "a.grad_out": _arr(2), "b.out": _arr(3), "b.grad_out": _arr(3)}
    other = {"x.out": _arr(2), "y.out": _arr(3), "y.grad_out": _arr(3)}
    assert list(rename_by_order(ref, other)) == ["a.out", "b.out", "b.grad_out"]


def test_importing_capture_loads_no_framework():
    code = (
        "import sys, reprod.capture\n"
        "heavy = [m for m in ('torch', 'paddle', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rename_by_order_never_lets_an_unpaired_key_take_a_paired_name():
    ref = {"a.out": _arr(2), "b.out": _arr(3)}
    other = {"a.out": _arr(4), "x.out": _arr(2)}  # "x" is "a", and "a" is new
    paired = rename_by_order(ref, other)
    # x pairs with a; the other side's "a" pairs with nothing and must not keep the name "a"
    assert list(paired) == ["unpaired:a.out", "a.out"]
    assert paired["a.out"] is other["x.out"] and paired["unpaired:a.out"] is other["a.out"]
