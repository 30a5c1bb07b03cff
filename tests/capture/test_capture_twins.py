"""The same network in torch and paddle: captures align, and each injected bug is found where
it was put."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("paddle")

import capture_twins as twins  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import first_divergence, layer_types, parse_key, rename, rename_by_order  # noqa: E402


@pytest.fixture(scope="module")
def torch_model():
    return twins.torch_net()


@pytest.fixture(scope="module")
def torch_log(torch_model):
    return twins.run_torch(torch_model)


def paddle_log(torch_model, bug=None):
    model = twins.paddle_net(bug)
    twins.copy_weights(torch_model, model, bug=bug)
    return model, twins.run_paddle(model)


def compare(torch_log, paddle_data):
    return reprod.compare(torch_log.data, twins.torch_layout(paddle_data), method="max", threshold=1e-5)


def test_forward_and_backward_align_key_by_key(torch_model, torch_log):
    _, log = paddle_log(torch_model)
    assert sorted(log.keys()) == sorted(torch_log.keys())
    forward = [k for k in torch_log.keys() if parse_key(k).what in ("in", "out")]
    assert [k for k in log.keys() if k in forward] == forward  # same call order
    # forward, gradients through every layer (the model and the container se included), and
    # every parameter gradient (not BN statistics)
    assert len(forward) == 37
    assert sum(k.endswith(".grad_out") for k in log.keys()) == 18
    assert sorted(k for k in log.keys() if k.startswith("param.")) == sorted(
        f"param.{n}.grad" for n, _ in torch_model.named_parameters()
    )
    result = compare(torch_log, log.data)
    assert result.passed, result.summary_line()
    assert first_divergence(result) is None


@pytest.mark.parametrize("bug", twins.BUGS)
def test_first_divergence_names_the_changed_layer(torch_model, torch_log, bug):
    model, log = paddle_log(torch_model, bug)
    result = compare(torch_log, log.data)
    assert not result.passed
    div = first_divergence(result, layer_types=layer_types(model))
    assert div is not None
    assert (div.layer, div.direction, div.input_aligned) == (twins.BUG_LAYER[bug], "forward", True)
    assert div.output.max_abs is not None and div.output.max_abs > 1e-4
    assert div.input is not None and div.input.max_abs is not None and div.input.max_abs <= 1e-5
    expected_type = type(getattr(model, twins.BUG_LAYER[bug])).__name__
    assert div.message.startswith(f"diverges at {twins.BUG_LAYER[bug]} ({expected_type}): input aligned")


def test_a_bug_between_recorded_layers_is_located_between_them(torch_model, torch_log):
    # SqueezeExcitation adds its scale instead of multiplying: code of a container, not a leaf
    model, log = paddle_log(torch_model, "se_add")
    div = first_divergence(compare(torch_log, log.data), layer_types=layer_types(model))
    assert div is not None and (div.layer, div.input_aligned, div.own_code) == ("se", True, True)
    # recorded without containers, the gap between two leaf layers is named
    leaf_ref = twins.run_torch(torch_model, containers=False)
    leaf = twins.run_paddle(model, containers=False)
    div = first_divergence(compare(leaf_ref, leaf.data), layer_types=layer_types(model))
    assert div is not None
    assert (div.layer, div.previous, div.input_aligned) == ("conv2", "se.gate", False)
    assert "although se.gate aligns, so the cause lies between the two" in div.message


def test_a_backward_only_bug_is_found_in_the_backward_pass(torch_model, torch_log):
    # the residual add computes the right sum but doubles the shortcut's gradient
    model, log = paddle_log(torch_model, "residual_backward")
    result = compare(torch_log, log.data)
    forward = [r for r in result.results if parse_key(r.key).what in ("in", "out")]
    assert len(forward) == 37 and all(r.passed for r in forward)
    div = first_divergence(result, layer_types=layer_types(model))
    assert div is not None
    assert (div.layer, div.direction, div.layer_type) == ("res", "backward", "Residual")
    assert div.output.key == "res.grad_in[1]" and div.input_aligned


def test_renamed_port_pairs_by_rules_and_by_order(torch_model, torch_log):
    _, log = paddle_log(torch_model)
    # a port that renamed layers, as if its attributes had other names
    ported = rename(log.data, {"se": "squeeze", "conv2": "proj.conv", "bn2": "proj.bn"})
    assert "squeeze.fc1.out" in ported and "param.proj.conv.weight.grad" in ported
    back = rename(ported, [(r"^squeeze\b", "se"), (r"^proj\.(conv|bn)", lambda m: m.group(1) + "2")])
    assert list(back) == list(log.data)
    by_order = rename_by_order(torch_log.data, ported)
    assert sorted(by_order) == sorted(log.data)
    result = compare(torch_log, by_order)
    assert result.passed, result.summary_line()


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_divergence_from_saved_dumps(torch_model, torch_log, tmp_path, suffix):
    _, log = paddle_log(torch_model, "bn_eps")
    ref = torch_log.save(tmp_path / f"torch{suffix}")
    other = reprod.save(tmp_path / f"paddle{suffix}", twins.torch_layout(log.data))
    result = reprod.compare(ref, other, method="max", threshold=1e-5)
    assert first_divergence(result).layer == "bn"
    assert np.isclose(first_divergence(result).output.max_abs, compare(torch_log, log.data)["bn.out"].max_abs)
