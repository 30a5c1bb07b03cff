"""More torchvision models against paddle.vision's own ports, compared by call order
(``record``'s default captures through ``match_by_order``, the float64 twin's capture as the
noise). These pairs split layers differently from their reference (collected only where
torchvision and paddle import, see conftest.py):

- mobilenet_v2 and shufflenet_v2_x1_0: paddle.vision pools with an ``AdaptiveAvgPool2D`` layer,
  torchvision with the functional ``adaptive_avg_pool2d``;
- alexnet: torchvision records its ReLUs as layers, paddle.vision calls two of them as
  functions (and its Dropout scales at inference, ``downscale_in_infer``: set to torch's
  convention here, as it is a deliberate difference of that port, which reprod finds at
  ``classifier.0``).

- squeezenet1_1: torchvision records its ReLUs as layers, paddle.vision calls them as
  functions (and its first conv pads by 1 where torchvision's does not, which reprod finds at
  ``features.0`` as a shape; set to torchvision's here).

Measured before: a correct port failed 2 keys (mobilenet_v2), 2 (shufflenet_v2) and 16
(alexnet, values: a ReLU layer paired with the conv after the missing one).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import torch  # noqa: E402
from models import build_pair, make_inputs  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import first_divergence, match_by_order, record  # noqa: E402

# the BatchNorm a bug changes (its torch name), and the layer calls only one side makes
# (left out); and the reference's layers the port applies as functions between two paired layers,
# judged on what the port computed there (its ReLUs)
CASES = {
    "mobilenet_v2": ("features.7.conv.1.1", {"other": ["pool2d_avg"]}, {}),
    "shufflenet_v2_x1_0": ("stage3.2.branch2.4", {"other": ["_pool2d_avg"]}, {}),
    "alexnet": (None, {}, {"ref": ["features.7", "features.9"]}),
    # the expand ReLU feeds a concatenation, not the next paired layer: left out
    "squeezenet1_1": (None, {"ref": ["features.3.expand1x1_activation"]},
                      {"ref": ["features.1"]}),
}

_PAIRS: dict = {}


def pair_of(model: str):
    if model not in _PAIRS:
        _PAIRS.clear()
        _PAIRS[model] = build_pair(model, seed=0)
    return _PAIRS[model]


def port(pair, bn_eps: str | None = None) -> paddle.nn.Layer:
    m = pair.paddle()
    for _, layer in m.named_sublayers():
        if isinstance(layer, paddle.nn.Dropout) and layer.mode == "downscale_in_infer":
            layer.mode = "upscale_in_train"  # torch's convention (see the docstring)
    if pair.name == "squeezenet1_1":  # torchvision's first conv has no padding
        m._conv._padding, m._conv._updated_padding = 0, [0, 0]
        m._pool.ceil_mode = True  # and its max-pools round up (no size changes at 224 px)
    if bn_eps is not None:
        pair.paddle_layer(m, bn_eps)._epsilon = 1e-3
    return m


def captured(model, fw: str, x: np.ndarray, float64: bool = False) -> dict:
    if fw == "torch":
        with torch.no_grad(), record(model) as log:
            model(torch.from_numpy(x.astype(np.float64) if float64 else x))
    else:
        with paddle.no_grad(), record(model) as log:
            model(paddle.to_tensor(x))
    return dict(log.data)


@pytest.mark.parametrize("model", list(CASES))
def test_a_correct_port_passes_with_the_layers_one_side_lacks_left_out(model) -> None:
    pair = pair_of(model)
    x = make_inputs(0, 2)
    ref, hi = captured(pair.torch32, "torch", x), captured(pair.torch64, "torch", x, True)
    other = captured(port(pair), "paddle", x)
    r = reprod.compare(ref, other, pair=match_by_order, noise=hi)
    assert r.passed, r.to_table(failed_only=True)
    assert "with no counterpart left out): PASSED" in r.summary_line()
    a, b = match_by_order(ref, other)
    for side, layers in CASES[model][1].items():
        full, kept = (ref, a) if side == "ref" else (other, b)
        for layer in layers:  # recorded on that side, left out of the comparison
            assert f"{layer}.out" in full and f"{layer}.out" not in kept
    for layer in CASES[model][2].get("ref", ()):
        # recorded by the reference only, compared with the port's input of the layer after it
        key = f"{layer}.out"
        assert key not in other and key in a and key in b
        assert {k.key: k.passed for k in r.results}[key]


@pytest.mark.parametrize("model", [m for m, (bn, *_) in CASES.items() if bn])
def test_a_batchnorm_epsilon_bug_is_named_at_its_layer(model) -> None:
    pair = pair_of(model)
    x = make_inputs(0, 2)
    target = CASES[model][0]
    ref, hi = captured(pair.torch32, "torch", x), captured(pair.torch64, "torch", x, True)
    r = reprod.compare(ref, captured(port(pair, bn_eps=target), "paddle", x),
                       pair=match_by_order, noise=hi)
    div = first_divergence(r)
    assert not r.passed and div is not None and div.layer == target, div and div.message
    assert div.input_aligned


def test_densenet_fused_batchnorm_relu_names_the_bug_in_its_dense_layer() -> None:
    """paddle.vision's densenet121 uses ``BatchNorm(act="relu")``: one layer for torchvision's
    ``norm`` and ``relu``. Paired by weights with ``norm``, its output was set against the
    pre-activation and every bug was named at the first BatchNorm, ``features.norm0``; it is now
    set against the ReLU's output where the values say the port fused the two."""
    from reprod.align import align_forward

    pair = pair_of("densenet121")
    target = "features.denseblock2.denselayer3.norm2"
    m = port(pair, bn_eps=target)
    r = align_forward(pair.torch32, m, make_inputs(0, 2), calibrate=True, by_order=True)
    found = r.options["findings"]
    assert not r.passed and found
    assert found[0].startswith("diverges at features.denseblock2.denselayer3.norm2") or \
        found[0].startswith("diverges at features.denseblock2.denselayer3.relu2"), found[0]


def test_densenet_correct_port_by_order_passes() -> None:
    """A correct densenet121 port compared by call order failed 369 of 736 keys (the fused
    BatchNorm+ReLU against the pre-activation, dense layers that return other things paired as
    blocks), then one: ``features.norm5``, whose ReLU torchvision calls as a function, so no
    reference layer records the value paddle's fused layer gives. It is set against the ReLU of
    the reference's output now (the noise derived alike), and a bug in norm5 fails there."""
    pair = pair_of("densenet121")
    x = make_inputs(0, 2)
    ref, hi = captured(pair.torch32, "torch", x), captured(pair.torch64, "torch", x, True)
    r = reprod.compare(ref, captured(port(pair), "paddle", x), pair=match_by_order, noise=hi)
    assert r.passed, r.to_table(failed_only=True)
    assert "relu of the reference's output" in r["features.norm5.out"].note
    assert r["features.denseblock2.denselayer3.relu2.out"].passed
    r = reprod.compare(ref, captured(port(pair, bn_eps="features.norm5"), "paddle", x),
                       pair=match_by_order, noise=hi)
    div = first_divergence(r)
    assert div is not None and div.layer == "features.norm5" and div.input_aligned, \
        div and div.message


def test_densenet_norm5_bug_is_named_and_diagnosed_by_align_forward() -> None:
    from reprod.align import align_forward

    pair = pair_of("densenet121")
    r = align_forward(pair.torch32, port(pair, bn_eps="features.norm5"), make_inputs(0, 2),
                      calibrate=True, by_order=True)
    found = r.options["findings"]
    assert found[0].startswith("diverges at features.norm5 (BatchNorm2d vs BatchNorm; the "
                               "port's batch_norm): input aligned"), found
    assert found[1] == "likely cause at features.norm5: BN epsilon: port uses ~1e-3, reference 1e-5"


def _fires_reordered(m: paddle.nn.Layer) -> paddle.nn.Layer:
    """paddle.vision's squeezenet with each Fire block calling its 3x3 path before its 1x1 path
    (concatenated as before): the same numbers."""
    import types

    def forward(self, inputs):
        s = self._conv(inputs)
        x2 = self._conv_path2(s)
        x1 = self._conv_path1(s)
        return paddle.concat([x1, x2], axis=1)

    for _, layer in m.named_sublayers():
        if type(layer).__name__ == "MakeFire":
            layer.forward = types.MethodType(forward, layer)
    return m


def test_squeezenet_siblings_called_the_other_way_round() -> None:
    """A correct port whose Fire blocks call expand3x3 first failed 16 keys by call order (each
    sibling paired with the other's reference); with a bias bug in one, ``align_forward``'s
    weight anchors crossed and it read "layer names do not pair". Both now pair, and the bug is
    named at its layer by every path."""
    from reprod.align import align_forward
    from reprod.capture import replay

    pair = pair_of("squeezenet1_1")
    x = make_inputs(0, 2)
    ref, hi = captured(pair.torch32, "torch", x), captured(pair.torch64, "torch", x, True)
    m = _fires_reordered(port(pair))
    r = reprod.compare(ref, captured(m, "paddle", x), pair=match_by_order, noise=hi)
    assert r.passed, r.to_table(failed_only=True)
    assert align_forward(pair.torch32, m, x, calibrate=True, by_order=True).passed

    target = "features.10.expand1x1"
    conv = pair.paddle_layer(m, target)
    conv.bias.set_value(conv.bias.numpy() + 0.5)
    r = reprod.compare(ref, captured(m, "paddle", x), pair=match_by_order, noise=hi)
    div = first_divergence(r)
    assert div is not None and div.layer == target and div.input_aligned, div and div.message
    found = align_forward(pair.torch32, m, x, calibrate=True, by_order=True).options["findings"]
    assert found[0].startswith(f"diverges at {target} (Conv2d; the port's "
                               "_conv6._conv_path1._conv): input aligned"), found
    r = replay(m, ref, by_order=True, noise=hi)
    assert [k.key for k in r.failed] == [f"{target}.out"], r.to_table(failed_only=True)
