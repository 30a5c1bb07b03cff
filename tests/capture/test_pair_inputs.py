"""Inputs one side passes by keyword and the other by position (``reprod.capture.pair_inputs``):
Hugging Face calls ``self_attn(hidden_states=...)``, PaddleNLP ``self_attn(x, ...)``, so the
call's input is ``in[hidden_states]`` on one side and ``in[0]`` on the other. Paired by their
values, the layer's input is shown to align and a divergence in its own code is named at it, not
at the block around it.

These tests build captures by hand (numpy only, so they run where torch does not install);
test_pair_inputs_models.py runs a torch block whose attention is called with a keyword against
a Paddle port calling it positionally, and tests/realworld runs Hugging Face's models against
PaddleNLP's.
"""

from __future__ import annotations

import numpy as np

from reprod.capture import first_divergence, pair_inputs
from reprod.diff.engine import compare

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 5, 8)).astype(np.float32)
COS = RNG.standard_normal((2, 5, 4)).astype(np.float32)


def test_a_keyword_input_pairs_with_the_positional_one_holding_its_values() -> None:
    ref = {"attn.in[hidden_states]": X, "attn.in[cos]": COS, "attn.out": X}
    port = {"attn.in[0]": X + 1e-6, "attn.in[1]": COS, "attn.out": X}
    got = pair_inputs(ref, port)
    assert list(got) == ["attn.in[hidden_states]", "attn.in[cos]", "attn.out"]
    assert got["attn.in[hidden_states]"] is port["attn.in[0]"]
    assert got["attn.in[cos]"] is port["attn.in[1]"]


def test_inputs_that_differ_or_are_not_floats_stay_unpaired() -> None:
    """An input already differing, an additive mask in another convention of the same shape,
    integer position ids: none is set against a tensor it may not be."""
    mask = np.zeros((2, 1, 5, 5), np.float32)
    mask[..., 3:] = np.finfo(np.float32).min
    ids = np.arange(10).reshape(2, 5)
    ref = {"attn.in[hidden_states]": X, "attn.in[mask]": mask, "attn.in[ids]": ids}
    port = {"attn.in[0]": X * 1.1, "attn.in[1]": (mask != 0).astype(np.float32),
            "attn.in[2]": ids}
    assert pair_inputs(ref, port) == port


def test_keys_that_pair_already_and_other_calls_are_left_alone() -> None:
    ref = {"a.in": X, "b.in[x]": X, "b.out": X}
    port = {"a.in": X, "c.in[0]": X, "b.out": X}  # c: a call the reference does not make
    assert list(pair_inputs(ref, port)) == list(port)


def test_one_tensor_under_several_keywords_pairs_in_order() -> None:
    other = X[::-1].copy()
    ref = {"attn.in[query]": X, "attn.in[key]": X, "attn.in[value]": other}
    port = {"attn.in[0]": X, "attn.in[1]": X, "attn.in[2]": other}
    got = pair_inputs(ref, port)
    assert list(got) == ["attn.in[query]", "attn.in[key]", "attn.in[value]"]


def test_an_input_s_gradient_follows_its_input_even_where_it_differs() -> None:
    g = RNG.standard_normal(X.shape).astype(np.float32)
    ref = {"attn.in[hidden_states]": X, "attn.grad_in[hidden_states]": g,
           "attn#2.in[hidden_states]": X}
    port = {"attn.in[0]": X, "attn.grad_in[0]": g * 3, "attn#2.in[0]": X}
    got = pair_inputs(ref, port)
    assert set(got) == set(ref)
    assert got["attn.grad_in[hidden_states]"] is port["attn.grad_in[0]"]


def test_the_divergence_is_named_at_the_layer_whose_input_now_aligns() -> None:
    out = X + 1.0
    ref = {"block.in": X, "block.attn.in[hidden_states]": X, "block.attn.o.in": X,
           "block.attn.o.out": out, "block.attn.out": out, "block.out": out}
    port = {"block.in": X, "block.attn.in[0]": X, "block.attn.o.in": X * 2,
            "block.attn.o.out": out * 2, "block.attn.out": out * 2, "block.out": out * 2}
    before = first_divergence(compare(ref, port, threshold=1e-5))
    assert before is not None and before.layer == "block"
    div = first_divergence(compare(ref, pair_inputs(ref, port), threshold=1e-5))
    assert div is not None and div.layer == "block.attn"
    assert "cause is block.attn's own forward code" in div.message


# --- an input handed in another shape on each side: a form, not a value ------------------------

def test_a_mask_in_another_shape_beside_an_aligned_input_is_not_held_against_the_layer() -> None:
    """GPT-J's attention gets HF's causal mask [B, 1, L, L + 1] and PaddleNLP's padding mask
    [B, 1, 1, L]: compared, the shapes differ, and its input was said to differ, the
    divergence inside it put at the gap before out_proj."""
    out = X + 1.0
    ref = {"attn.in[hidden_states]": X, "attn.in[attention_mask]": np.zeros((2, 1, 5, 6)),
           "attn.o.in": X, "attn.o.out": out, "attn.out": out}
    port = {"attn.in[hidden_states]": X, "attn.in[attention_mask]": np.zeros((2, 1, 1, 5)),
            "attn.o.in": X * 2, "attn.o.out": out * 2, "attn.out": out * 2}
    div = first_divergence(compare(ref, port, threshold=1e-5))
    assert div is not None and div.layer == "attn" and div.input_aligned, div
    assert [r.key for r in div.unlike] == ["attn.in[attention_mask]"]
    assert "not judged: its input[attention_mask] ([2, 1, 5, 6] in the reference, " \
           "[2, 1, 1, 5] in the port)" in div.message


def test_a_lone_input_of_another_shape_or_other_rows_still_differs() -> None:
    """The call's only input of another shape is what differs; a Mixtral expert handed other
    rows (a router choosing otherwise) differs beside any other input."""
    lone_ref = {"a.in": X, "a.out": X}
    lone_port = {"a.in": X[:, :, :4], "a.out": X * 2}
    div = first_divergence(compare(lone_ref, lone_port, threshold=1e-5))
    assert div is not None and div.input_aligned is False and not div.unlike
    rows_ref = {"e.in[0]": X[0], "e.in[1]": X[1], "e.out": X}
    rows_port = {"e.in[0]": X[0, :3], "e.in[1]": X[1], "e.out": X * 2}
    div = first_divergence(compare(rows_ref, rows_port, threshold=1e-5))
    assert div is not None and div.input_aligned is False and not div.unlike


def test_a_lone_output_pairs_with_the_first_of_several_of_its_shape() -> None:
    """HF's MegatronBERT attention returns its context alone, PaddleNLP's the context and its
    weights: ``out`` against ``out[0]`` (and ``out[1]``). Unpaired, neither was judged and a
    bug in the attention's code was put outside the recorded layers."""
    weights = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)
    ref = {"attn.in[hidden_states]": X, "attn.out": X * 2, "attn.grad_out": X}
    port = {"attn.in[0]": X, "attn.out[0]": X * 2.2, "attn.out[1]": weights,
            "attn.grad_out[0]": X}
    got = pair_inputs(ref, port)
    assert list(got) == ["attn.in[hidden_states]", "attn.out", "attn.out[1]", "attn.grad_out"]
    assert got["attn.out"] is port["attn.out[0]"]  # paired though its values differ
    div = first_divergence(compare(ref, got, threshold=1e-5))
    assert div is not None and div.layer == "attn" and div.input_aligned, div.message
    # and the other way round: the reference returns several, the port one
    back = pair_inputs(port, ref)
    assert "attn.out[0]" in back and back["attn.out[0]"] is ref["attn.out"]


def test_outputs_of_other_shapes_or_keyed_alike_already_stay_as_they_are() -> None:
    ref = {"a.out": X, "b.out": X, "c.out": X, "c.out[0]": X}
    port = {"a.out[0]": X[0], "b.out": X, "b.out[0]": X, "c.out[0]": X}
    assert pair_inputs(ref, port) == port


def test_an_input_keyed_otherwise_that_holds_other_values_is_said_not_compared() -> None:
    """HF hands BlenderbotSmall's attention an additive mask, PaddleNLP a 0/1 one where 1 is
    masked: no value pairs them, and the attention was said to have its input aligned without a
    word of the mask."""
    additive = np.zeros((2, 1, 5, 5), np.float32)
    additive[1, ..., 3:] = np.finfo(np.float32).min
    ones = np.zeros((2, 1, 5, 5), np.float32)
    ones[1, ..., 3:] = 1.0
    ref = {"attn.in[hidden_states]": X, "attn.in[attention_mask]": additive, "attn.out": X}
    port = {"attn.in[0]": X, "attn.in[1]": ones, "attn.out": X * 1.1}
    div = first_divergence(compare(ref, pair_inputs(ref, port), threshold=1e-5))
    assert div is not None and div.layer == "attn" and div.input_aligned
    assert div.unmatched == (("in[attention_mask]",), ("in[1]",))
    assert div.message.endswith(
        "; not compared: its input[attention_mask] holds other values than any input the port "
        "keys otherwise (input[1]): most often a mask each side writes its own way (additive "
        "against 1 = masked), which the layer's outputs then judge"), div.message
    # an argument only the reference passes (HF's cache_position) has nothing to be held against
    lone = {"attn.in[hidden_states]": X, "attn.in[cache_position]": np.arange(5.0),
            "attn.out": X}
    div = first_divergence(compare(lone, pair_inputs(lone, {"attn.in[0]": X, "attn.out": X * 1.1}),
                                   threshold=1e-5))
    assert div is not None and div.unmatched == ((), ()) and "not compared" not in div.message
