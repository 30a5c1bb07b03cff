"""first_divergence on comparisons of hand-made captures (framework-free)."""

from __future__ import annotations

import numpy as np
import pytest

import reprod
from reprod.capture import Divergence, first_divergence

BASE = np.linspace(-1.0, 1.0, 6, dtype=np.float32)


def chain(*layers: str) -> dict:
    """A capture of a chain of layers: each one's input is the previous one's output."""
    data = {}
    value = BASE
    for i, name in enumerate(layers):
        data[f"{name}.in"] = value
        value = value * (i + 2)
        data[f"{name}.out"] = value
    return data


def changed(data: dict, key: str, delta: float = 1e-2) -> dict:
    out = dict(data)
    out[key] = data[key] + delta
    return out


def compare(ref: dict, other: dict):
    return reprod.compare(ref, other, method="max", threshold=1e-5)


def test_aligned_captures_have_no_divergence():
    ref = chain("a", "b", "c")
    assert first_divergence(compare(ref, dict(ref))) is None


def test_a_failing_user_key_is_not_a_layer_divergence():
    ref = {**chain("a"), "loss": np.float32(1.0)}
    other = {**ref, "loss": np.float32(2.0)}
    result = compare(ref, other)
    assert not result.passed
    assert first_divergence(result) is None


def test_output_differs_with_aligned_input():
    ref = chain("a", "b", "c")
    other = changed(changed(ref, "b.out"), "c.in")
    other["c.out"] = other["c.in"] * 4  # everything after b follows b's change
    div = first_divergence(compare(ref, other), layer_types={"b": "Hardswish"})
    assert isinstance(div, Divergence)
    assert (div.layer, div.layer_type, div.direction, div.previous) == ("b", "Hardswish", "forward", "a")
    assert div.input_aligned is True
    assert div.input is not None and div.input.key == "b.in"
    assert div.output.key == "b.out"
    assert div.message == (
        "diverges at b (Hardswish): input aligned (max 0.000e+00), output max diff 1.000e-02"
    )


def test_input_already_differs_points_between_the_layers():
    ref = chain("a", "b", "c")
    other = changed(changed(ref, "c.in", 0.5), "c.out", 2.0)
    div = first_divergence(compare(ref, other))
    assert div is not None
    assert (div.layer, div.previous, div.input_aligned) == ("c", "b", False)
    assert div.input is not None and div.input.key == "c.in"
    assert div.message == (
        "diverges before c: input already differs (max diff 5.000e-01) although b aligns, so the "
        "cause lies between the two, outside the recorded layers; output max diff 2.000e+00"
    )


def test_input_of_the_first_layer_differs():
    ref = chain("a", "b")
    other = changed(changed(ref, "a.in", 0.5), "a.out", 0.5)
    div = first_divergence(compare(ref, other))
    assert div is not None and div.previous is None
    assert "the input of the first recorded layer already differs (max diff 5.000e-01)" in div.message


def test_layer_without_recorded_inputs():
    ref = {k: v for k, v in chain("a", "b").items() if k.endswith(".out")}
    div = first_divergence(compare(ref, changed(ref, "b.out")))
    assert div is not None and div.input is None and div.input_aligned is None
    assert div.message == "diverges at b: input not recorded, output max diff 1.000e-02"


def test_the_failing_item_of_a_tuple_output_is_named():
    ref = {"m.in": BASE, "m.out[0]": BASE, "m.out[1]": BASE * 2, "n.in": BASE, "n.out": BASE}
    div = first_divergence(compare(ref, changed(ref, "m.out[1]")))
    assert div is not None and div.output.key == "m.out[1]"
    assert [r.key for r in div.outputs] == ["m.out[0]", "m.out[1]"]
    assert div.message.endswith("output out[1] max diff 1.000e-02")


def test_a_second_call_is_named_with_its_call_index():
    ref = {"a.in": BASE, "a.out": BASE, "b.in": BASE, "b.out": BASE, "a#2.in": BASE, "a#2.out": BASE}
    div = first_divergence(compare(ref, changed(ref, "a#2.out")), layer_types={"a": "Linear"})
    assert div is not None and (div.layer, div.layer_type, div.previous) == ("a#2", "Linear", "b")


def test_a_layer_called_twice_is_not_named_at_both_ends_of_the_gap():
    # XLNet's one dropout runs on the word embeddings, then on the positional encoding the
    # model's own forward builds between the two calls: the cause is between those calls
    ref = {"drop.in": BASE, "drop.out": BASE, "drop#2.in": BASE * 2, "drop#2.out": BASE * 2}
    other = changed(changed(ref, "drop#2.in", 0.5), "drop#2.out", 0.5)
    div = first_divergence(compare(ref, other), layer_types={"drop": "Dropout"})
    assert div is not None and (div.layer, div.previous) == ("drop#2", "drop")
    assert div.message == (
        "diverges before drop#2 (Dropout): input already differs (max diff 5.000e-01) although "
        "its call before, drop#1, aligns, so the cause lies between the two calls of drop, in "
        "the code that calls it, outside the recorded layers; output max diff 5.000e-01"
    )


def test_calls_of_a_layer_called_more_often_on_one_side_are_not_paired_by_number():
    # diffusers shares one SiLU ("act") across its blocks: its 2nd call is block a's; the port
    # gives each block its own and calls its "act" once, at the end: act#2 is no counterpart
    ref = {"act.in": BASE, "act.out": BASE, "a.in": BASE, "a.out": BASE * 2,
           "act#2.in": BASE * 2, "act#2.out": BASE * 2, "b.in": BASE * 2, "b.out": BASE * 3,
           "act#3.in": BASE * 3, "act#3.out": BASE * 3}
    other = {"act.in": BASE, "act.out": BASE, "a.in": BASE, "a.out": BASE * 2,
             "act#2.in": BASE * 3, "act#2.out": BASE * 3, "b.in": BASE * 2, "b.out": BASE * 3}
    other = changed(other, "b.out")  # the bug: in b
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "b" and div.input_aligned, div


def test_a_call_with_an_input_only_one_side_records_is_still_judged():
    # OPT's position embedding takes a second input in Hugging Face's forward only
    ref = {"pos.in.0": BASE, "pos.in.1": BASE, "pos.out": BASE * 2, "b.in": BASE * 2,
           "b.out": BASE * 3}
    other = {k: v for k, v in ref.items() if k != "pos.in.1"}
    div = first_divergence(compare(ref, changed(changed(other, "pos.out"), "b.in")))
    assert div is not None and div.layer == "pos", div


def test_call_order_is_the_order_outputs_appear_in():
    # a container (recorded with containers=True) ends after its children: a failing child is
    # named, not the container whose input came first
    ref = {"blk.in": BASE, "blk.conv.in": BASE, "blk.conv.out": BASE, "blk.out": BASE}
    other = changed(changed(ref, "blk.conv.out"), "blk.out")
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "blk.conv"


def test_keys_on_one_side_only_are_skipped():
    ref = chain("a", "b", "c")
    other = {k: v for k, v in changed(ref, "c.out").items() if not k.startswith("b.")}
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "c" and div.previous == "a"


def test_a_shape_verdict_is_described_by_its_reason():
    ref = chain("a", "b")
    other = dict(ref)
    other["b.out"] = np.zeros((2, 3), dtype=np.float32)
    result = compare(ref, other)
    div = first_divergence(result)
    assert div is not None and div.output.status == "shape"
    assert div.message.endswith("output " + result["b.out"].reason)


def test_another_number_of_rows_is_said_to_be_a_selection_upstream():
    # a Mixtral expert's input: the tokens its router sent it, 41 in the port and 39 in the
    # reference where a near tie went the other way
    rows = np.arange(39 * 4, dtype=np.float32).reshape(39, 4)
    ref = {"gate.in": BASE, "gate.out": BASE, "expert.in": rows, "expert.out": rows}
    other = dict(ref, **{"expert.in": np.zeros((41, 4), np.float32),
                         "expert.out": np.zeros((41, 4), np.float32)})
    div = first_divergence(compare(ref, other))
    assert div.layer == "expert"
    assert "shape (41, 4) does not match ref (39, 4): another number of rows, as a selection " \
        "upstream gives that chose otherwise (a router's top-k" in div.message, div.message
    # a shape that differs otherwise says no such thing
    other["expert.in"] = other["expert.out"] = np.zeros((39, 5), np.float32)
    assert "another number of rows" not in first_divergence(compare(ref, other)).message


# --- backward ---------------------------------------------------------------------------------


def with_grads(fwd: dict) -> dict:
    """Gradients as a capture records them: reverse call order, params after their layer's grad_out."""
    data = dict(fwd)
    data.update({
        "c.grad_out": BASE, "c.grad_in": BASE * 2, "param.c.weight.grad": BASE,
        "b.grad_out": BASE * 2, "b.grad_in": BASE * 3, "param.b.weight.grad": BASE,
        "a.grad_out": BASE * 3, "param.a.weight.grad": BASE,
    })
    return data


def test_forward_divergence_comes_before_backward():
    ref = with_grads(chain("a", "b", "c"))
    other = changed(changed(ref, "c.out"), "param.a.weight.grad")
    div = first_divergence(compare(ref, other))
    assert div is not None and (div.layer, div.direction) == ("c", "forward")


def test_backward_divergence_at_a_layers_input_gradient():
    ref = with_grads(chain("a", "b", "c"))
    other = changed(changed(ref, "b.grad_in"), "a.grad_out")
    div = first_divergence(compare(ref, other), layer_types={"b": "Conv2d"})
    assert div is not None
    assert (div.layer, div.direction, div.previous) == ("b", "backward", "c")
    assert div.input is not None and div.input.key == "b.grad_out"
    assert div.output.key == "b.grad_in"
    assert div.message == (
        "backward diverges at b (Conv2d): incoming gradient aligned (max 0.000e+00), gradient of "
        "its input (a total over every use of that input) max diff 1.000e-02"
    )


def test_backward_divergence_at_a_parameter_gradient():
    ref = with_grads(chain("a", "b", "c"))
    div = first_divergence(compare(ref, changed(ref, "param.b.weight.grad")))
    assert div is not None and (div.layer, div.direction) == ("b", "backward")
    assert div.output.key == "param.b.weight.grad"
    assert "gradient of param b.weight max diff 1.000e-02" in div.message


def test_a_shared_input_s_gradient_is_not_blamed_on_its_last_reader():
    # h = stem(x); first(h) + second(h): the hooks on h see the total over both readers, so
    # second (walked first) sees its input's gradient differ for a bug in first's backward
    ref = {"stem.in": BASE, "stem.out": BASE * 2, "first.in": BASE * 2, "first.out": BASE * 3,
           "second.in": BASE * 2, "second.out": BASE * 4,
           "second.grad_out": BASE, "second.grad_in": BASE * 5, "param.second.weight.grad": BASE,
           "first.grad_out": BASE, "first.grad_in": BASE * 5, "param.first.weight.grad": BASE,
           "stem.grad_out": BASE * 5, "param.stem.weight.grad": BASE}
    other = ref
    for key in ("second.grad_in", "first.grad_in", "param.first.weight.grad", "stem.grad_out",
                "param.stem.weight.grad"):
        other = changed(other, key)
    div = first_divergence(compare(ref, other))
    assert div is not None and (div.layer, div.direction) == ("first", "backward"), div
    assert div.input_aligned
    # with no reader whose own gradients differ, the first whose input's gradient does is named
    other = changed(changed(ref, "second.grad_in"), "first.grad_in")
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "second"


def test_backward_gradient_already_different_when_it_arrives():
    ref = with_grads(chain("a", "b", "c"))
    other = changed(changed(ref, "c.grad_out"), "c.grad_in")  # e.g. the loss differs
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "c" and div.input_aligned is False
    assert div.message.startswith(
        "backward diverges before c: the incoming gradient of the first recorded layer already differs"
    )


def test_backward_only_capture_walks_gradients_in_the_order_they_were_recorded():
    ref = with_grads({})
    div = first_divergence(compare(ref, changed(ref, "b.grad_in")))
    assert div is not None and (div.layer, div.previous) == ("b", "c")


def test_gradient_of_a_root_parameter_is_attributed_to_the_model():
    ref = {"<model>.in": BASE, "<model>.out": BASE, "<model>.grad_out": BASE, "param.scale.grad": BASE}
    div = first_divergence(compare(ref, changed(ref, "param.scale.grad")), layer_types={"<model>": "Net"})
    assert div is not None and (div.layer, div.layer_type) == ("<model>", "Net")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_divergence_round_trips_through_the_result_json(direction):
    ref = with_grads(chain("a", "b", "c"))
    key = "b.out" if direction == "forward" else "param.b.weight.grad"
    other = changed(ref, key)
    if direction == "forward":
        other = changed(changed(other, "c.in"), "c.out")
    result = compare(ref, other)
    again = reprod.DiffResult.from_dict(result.to_dict())
    assert first_divergence(again) == first_divergence(result)


def block(*, inner_in: float = 0.0, own: float = 0.0) -> tuple[dict, dict]:
    """``<model>`` calls ``blk`` (sublayers ``blk.a``, ``blk.b``), then ``c``: a reference capture
    and one whose ``blk`` code changes ``blk.b``'s input (``inner_in``) or its own output
    after its last sublayer (``own``); everything downstream follows."""
    ref = {
        "<model>.in": BASE,
        "blk.in": BASE,
        "blk.a.in": BASE,
        "blk.a.out": BASE * 2,
        "blk.b.in": BASE * 2,
        "blk.b.out": BASE * 3,
        "blk.out": BASE * 3,
        "c.in": BASE * 3,
        "c.out": BASE * 4,
        "<model>.out": BASE * 4,
    }
    other = dict(ref)
    shift = inner_in + own
    for key in ("blk.b.in", "blk.b.out") if inner_in else ():
        other[key] = ref[key] + inner_in
    for key in ("blk.out", "c.in", "c.out", "<model>.out") if shift else ():
        other[key] = ref[key] + shift
    return ref, other


def test_code_of_an_enclosing_container_is_named_at_the_container():
    ref, other = block(inner_in=0.5)
    div = first_divergence(compare(ref, other), layer_types={"blk": "Block"})
    assert div is not None and (div.layer, div.layer_type, div.input_aligned) == ("blk", "Block", True)
    assert div.output.key == "blk.out" and div.previous == "blk.a"
    assert div.inner is not None and (div.inner.layer, div.inner.input_aligned) == ("blk.b", False)
    assert div.message == (
        "diverges at blk (Block): input aligned (max 0.000e+00), output max diff 5.000e-01; inside "
        "it, the input of blk.b already differs (max diff 5.000e-01) while its recorded sublayers "
        "before that align, so the cause is blk's own forward code"
    )


def test_a_container_whose_sublayers_align_is_named_for_its_own_code():
    ref, other = block(own=0.25)
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "blk" and div.inner is None and div.own_code
    assert div.message.endswith("its recorded sublayers align, so the cause is its own forward code")


def test_the_innermost_container_with_an_aligned_input_is_named():
    ref, other = block(inner_in=0.5)
    # blk.b is itself a container around blk.b.conv; its own input differs too, blk's aligns
    def nest(data: dict) -> dict:
        out = {}
        for key, value in data.items():
            if key == "blk.b.out":
                out["blk.b.conv.out"] = value
            out[key] = value
            if key == "blk.b.in":
                out["blk.b.conv.in"] = value
        return out

    ref, other = nest(ref), nest(other)
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "blk"
    assert div.inner is not None and div.inner.layer == "blk.b.conv"


def test_an_enclosing_container_whose_output_aligns_is_not_blamed():
    ref, other = block(inner_in=0.5)
    for key in ("blk.out", "c.in", "c.out", "<model>.out"):
        other[key] = ref[key]
    div = first_divergence(compare(ref, other))
    assert div is not None and div.layer == "blk.b" and div.input_aligned is False
    assert "outside the recorded layers" in div.message


def test_a_backward_bug_in_a_sublayer_is_named_before_its_container():
    # blk's input gradient includes what blk.a sent back: blk.a is differentiated first
    ref = {
        "blk.in": BASE, "blk.a.in": BASE, "blk.a.out": BASE, "blk.out": BASE,
        "blk.grad_out": BASE, "blk.a.grad_out": BASE, "blk.a.grad_in": BASE, "blk.grad_in": BASE,
    }
    other = changed(changed(ref, "blk.a.grad_in"), "blk.grad_in")
    div = first_divergence(compare(ref, other))
    assert div is not None and (div.layer, div.direction, div.input_aligned) == ("blk.a", "backward", True)


def test_names_that_mostly_do_not_pair_give_an_unpaired_divergence():
    ref = chain("a", "b", "c", "d", "e")
    other = {k.replace(k[0], "x" + k[0], 1) if k[0] in "bcde" else k: v for k, v in ref.items()}
    result = compare(ref, other)
    div = first_divergence(result)
    assert isinstance(div, Divergence) and div.kind == "unpaired"
    assert (div.paired, div.calls, div.one_sided) == (1, 5, 16)
    assert div.layer == "" and div.output.status in ("missing", "extra")
    assert div.message == (
        "layer names do not pair: only 1 of 5 layer calls pair by name (16 capture keys on one "
        "side only), so nothing is shown to align; pair them by call order: "
        "compare(*reprod.capture.match_by_order(ref, other)), or reprod-diff --by-order"
    )
    # a numeric divergence among the few that paired is no answer either
    assert first_divergence(compare(ref, changed(other, "a.out"))).kind == "unpaired"


def test_a_few_one_sided_layers_keep_the_answer():
    ref = chain("a", "b", "c", "d", "e")
    other = {k: v for k, v in ref.items() if not k.startswith("c.")}
    assert first_divergence(compare(ref, other)) is None
    other = {k: v for k, v in ref.items() if not k.startswith(("c.", "d."))}
    assert first_divergence(compare(ref, other)) is None  # 3 of 5 pair
    other = {k: v for k, v in ref.items() if not k.startswith(("b.", "c.", "d."))}
    assert first_divergence(compare(ref, other)).kind == "unpaired"  # 2 of 5


def test_the_port_s_calls_inside_a_paired_call_leave_nothing_unpaired():
    """Paddle's attention calls its q, k, v and output Linears where torch's computes them as
    functions: four port calls inside one paired call, beside two other paired calls. Counted as
    unpaired, they made "layer names do not pair: only 3 of 3" the answer."""
    ref = chain("attn", "head")
    ref["<model>.in"], ref["<model>.out"] = ref["attn.in"], ref["head.out"]
    other = dict(ref)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        other[f"attn.{proj}.in"] = other[f"attn.{proj}.out"] = BASE
    div = first_divergence(compare(ref, changed(other, "attn.out")))
    assert div is not None and div.kind == "layer" and div.layer == "attn"
    # calls outside any paired call still count
    for name in ("x", "y", "z", "w"):
        other[f"{name}.in"] = other[f"{name}.out"] = BASE
    assert first_divergence(compare(ref, changed(other, "attn.out"))).kind == "unpaired"
