"""Containers are recorded by default, so a bug in a container's own ``forward`` code (a residual
add, a reshape, a transpose, a concatenation) is named at the container; a comparison whose
layer names did not pair says so instead of reporting nothing."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("paddle")

import capture_twins as twins  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import first_divergence, layer_types, rename, rename_by_order  # noqa: E402


@pytest.fixture(scope="module")
def torch_model():
    return twins.block_torch_net()


@pytest.fixture(scope="module")
def torch_data(torch_model):
    return twins.run_torch(torch_model).data


def paddle_data(torch_model, bug=None, **record_kw):
    model = twins.block_paddle_net(bug)
    twins.copy_block_weights(torch_model, model)
    data = dict(twins.run_paddle(model, **record_kw).data)
    if "param.head.weight.grad" in data:
        data["param.head.weight.grad"] = data["param.head.weight.grad"].T
    return model, data


def compare(ref, other):
    return reprod.compare(ref, other, method="max", threshold=1e-5)


def test_containers_and_the_model_are_recorded_by_default(torch_model, torch_data):
    assert list(torch_data)[:2] == ["<model>.in", "stem.in"]
    for key in ("block2.in", "block2.out", "<model>.out", "block2.norm.out", "block2.grad_in"):
        assert key in torch_data
    leaf_only = twins.run_torch(torch_model, containers=False).data
    assert not any(k.startswith(("<model>", "block1.in", "block2.out")) for k in leaf_only)
    assert "block2.norm.out" in leaf_only


def test_the_twins_align(torch_model, torch_data):
    _, other = paddle_data(torch_model)
    result = compare(torch_data, other)
    assert result.passed, result.summary_line()
    assert first_divergence(result) is None


@pytest.mark.parametrize("bug", twins.BLOCK_BUGS)
def test_a_bug_in_a_containers_forward_is_named_at_the_container(torch_model, torch_data, bug):
    model, other = paddle_data(torch_model, bug)
    div = first_divergence(compare(torch_data, other), layer_types=layer_types(model))
    assert div is not None and div.kind == "layer"
    assert (div.layer, div.layer_type, div.direction, div.input_aligned) == (
        "block2", "Block", "forward", True
    )
    assert div.message.startswith("diverges at block2 (Block): input aligned")
    assert div.output.key == "block2.out"
    if bug == "no_residual_add":
        # every sublayer aligns: the add after the last one is the block's own code
        assert div.inner is None and div.own_code
        assert div.message.endswith("its recorded sublayers align, so the cause is its own forward code")
    else:
        # the first sublayer fed by the wrong tensor, seen from inside
        inner = {"wrong_transpose": "block2.proj"}.get(bug, "block2.norm")
        assert div.inner is not None and div.inner.layer == inner
        assert div.inner.input_aligned is False
        assert f"inside it, the input of {inner} already differs" in div.message
        assert div.message.endswith("so the cause is block2's own forward code")


def test_leaf_only_capture_still_points_between_layers(torch_model):
    ref = twins.run_torch(torch_model, containers=False).data
    _, other = paddle_data(torch_model, "no_residual_add", containers=False)
    div = first_divergence(compare(ref, other))
    assert div is not None and (div.layer, div.previous, div.input_aligned) == (
        "pool", "block2.proj", False
    )
    assert "outside the recorded layers" in div.message


def test_a_container_bug_in_the_squeeze_excitation_twin_is_named():
    torch_model = twins.torch_net()
    ref = twins.run_torch(torch_model).data
    model = twins.paddle_net("se_add")
    twins.copy_weights(torch_model, model, bug="se_add")
    other = twins.torch_layout(twins.run_paddle(model).data)
    div = first_divergence(compare(ref, other), layer_types=layer_types(model))
    assert div is not None and div.message.startswith(
        "diverges at se (SqueezeExcitation): input aligned"
    )
    assert div.own_code


def test_a_backward_bug_in_a_leaf_is_not_blamed_on_its_containers():
    torch_model = twins.torch_net()
    ref = twins.run_torch(torch_model).data
    model = twins.paddle_net("residual_backward")
    twins.copy_weights(torch_model, model, bug="residual_backward")
    other = twins.torch_layout(twins.run_paddle(model).data)
    div = first_divergence(compare(ref, other), layer_types=layer_types(model))
    assert div is not None
    assert (div.layer, div.direction, div.layer_type) == ("res", "backward", "Residual")
    assert div.output.key == "res.grad_in[1]" and div.input_aligned


def test_names_that_do_not_pair_are_no_all_clear(torch_model, torch_data):
    _, other = paddle_data(torch_model, "no_residual_add")
    # a port whose layers are all called something else (the model itself still pairs)
    ported = rename(other, lambda name: None if name == "<model>" else f"net.{name}")
    result = compare(torch_data, ported)
    div = first_divergence(result)
    assert div is not None and div.kind == "unpaired"
    calls = sum(1 for k in torch_data if k.endswith(".out"))
    assert (div.paired, div.calls) == (1, calls)
    assert div.message.startswith(f"layer names do not pair: only 1 of {calls} layer calls pair")
    assert "match_by_order" in div.message and "reprod-diff --by-order" in div.message
    # paired by call order, the bug is found again
    by_order = first_divergence(compare(torch_data, rename_by_order(torch_data, ported)))
    assert by_order is not None and by_order.kind == "layer" and by_order.layer == "block2"


def test_a_sublayer_that_paired_with_nothing_is_not_cleared_as_the_container_s_own_code(
        torch_model, torch_data):
    """The port names block2's norm otherwise (``layer_norm``) and computes it wrong: compared
    by name, the norm's keys are on one side each, block2's other sublayers align and its
    output differs. Before, the message put the cause in block2's own forward code."""
    _, other = paddle_data(torch_model, "no_residual_add")
    renamed = {k.replace("block2.norm.", "block2.layer_norm."): v for k, v in other.items()}
    div = first_divergence(compare(torch_data, renamed), layer_types=layer_types(torch_model))
    assert div is not None and div.layer == "block2" and div.own_code
    assert div.unpaired_inside == ("block2.norm",)
    assert div.message.endswith(
        "its sublayers that paired align, but block2.norm paired with nothing in the port (their "
        "names differ: pair them by call order), so the cause is there or in its own forward code")
    # every sublayer paired: its own code, as before
    div = first_divergence(compare(torch_data, other))
    assert div.own_code and div.unpaired_inside == ()
