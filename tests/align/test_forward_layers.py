"""``align_forward`` judging the layers where the outputs pass: a network with random weights
shrinks what an early bug does to its outputs (a squeeze-excitation weight 1% off moves the
example MobileNetV3's logits by 4e-9, below their float32 rounding), so the outputs alone passed
a port with a bug; calibrated, its layers are judged against the float64 twin's noise too."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mobilenetv3"
BUGGED = "features.6.block.2.fc2"  # a squeeze-excitation's second 1x1 convolution


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import paddle_model
        import torch_model
    finally:
        sys.path.remove(str(EXAMPLE))
    torch.manual_seed(0)
    tm = torch_model.mobilenet_v3_small(num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every BatchNorm's statistics and affine matter
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    tm.eval()
    pm = paddle_model.mobilenet_v3_small(num_classes=10)
    load_into_paddle(pm, tm)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    return tm, pm, x


def _bugged(pm):
    layer = dict(pm.named_sublayers())[BUGGED]
    saved = layer.weight.numpy().copy()
    layer.weight.set_value(paddle.to_tensor(saved * np.float32(1.01)))
    return layer, saved


def test_a_faithful_port_passes_with_its_layers_judged(example):
    tm, pm, x = example
    r = align_forward(tm, pm, x, calibrate=True)
    assert r.passed, r.options.get("findings")
    assert r.options["layers"]["passed"] and r.options["layers"]["judged"] > 300
    assert [k.key for k in r] == ["logits"]  # a passing layer adds no key


def test_an_early_bug_the_outputs_hide_fails_at_its_layer(example):
    tm, pm, x = example
    layer, saved = _bugged(pm)
    try:
        outputs_only = align_forward(tm, pm, x, calibrate=True, layers=False)
        assert outputs_only.passed  # the point: the outputs cannot see it
        r = align_forward(tm, pm, x, calibrate=True)
    finally:
        layer.weight.set_value(paddle.to_tensor(saved))
    assert not r.passed and r["logits"].passed
    assert [k.key for k in r.failed] == [f"layers/{BUGGED}.out"]
    assert r[f"layers/{BUGGED}.out"].noise_multiple > 1000
    assert r.options["divergence"]["layer"] == BUGGED
    assert r.options["findings"][0].startswith(
        f"the outputs align, but not the layers inside: diverges at {BUGGED} (Conv2d): "
        "input aligned"), r.options["findings"]
    assert r.options["layers"] == {"judged": r.options["layers"]["judged"], "passed": False}


def test_uncalibrated_the_outputs_alone_are_judged_unless_asked(example):
    """At an absolute threshold a layer's float32 rounding could fail a faithful port: the
    layers are judged there only when asked for."""
    tm, pm, x = example
    layer, saved = _bugged(pm)
    try:
        plain = align_forward(tm, pm, x)
        asked = align_forward(tm, pm, x, layers=True, method="max", threshold=1e-3)
    finally:
        layer.weight.set_value(paddle.to_tensor(saved))
    assert plain.passed and "layers" not in plain.options
    assert not asked.passed and asked.options["divergence"]["layer"] == BUGGED
