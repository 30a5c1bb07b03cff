"""Layer settings on real pairs (``reprod.align.settings``): torchvision's models against
paddle.vision's ports, paired by order.

- Correct ports: no setting differs. Paddle's legacy ``BatchNorm`` (densenet) says
  ``use_global_stats=False`` for BatchNorm2D's None, and densenet's transition pools differ in
  ``count_include_pad`` without padding to count: neither is a difference.
- paddle.vision's squeezenet1_1 pads its first conv by 1 where torchvision's does not, and
  scales its dropout in inference: both named.
- paddle.vision's alexnet keeps its dropout in ``downscale_in_infer`` mode (its outputs scaled by
  1 - p in evaluation): torchvision's scales in training. A difference, named.
- A BatchNorm epsilon of 1e-6 for 1e-5 in the middle of resnet18 (layer3.0.bn1): its outputs
  move by less than float32 rounding, and ``align_train(calibrate=True)`` passed every value key
  (measured, seed 0, train mode, batch 2, one step). The setting fails, alone. About 25 s.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from models import (  # noqa: E402
    build_paddle,
    build_pair,
    build_torch,
    squeezenet_as_torchvision,
    train_copies,
)

from reprod.align import align_train  # noqa: E402
from reprod.align.settings import compare_settings  # noqa: E402


def _settings(tm, pm):
    report = compare_settings(tm, pm, by_order=True)
    return list(report.differ), report.unpaired


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x1_0",
                                  "mobilenet_v2", "densenet121", "vgg11"])
def test_correct_ports_differ_in_no_setting(name):
    diffs, _ = _settings(build_torch(name), build_paddle(name))
    assert diffs == [], [d.line() for d in diffs]


def test_paddle_vision_s_squeezenet_pads_its_first_conv_and_scales_its_dropout_otherwise():
    """What an earlier session found by hand, value by value (models.squeezenet_as_torchvision
    undoes both): named at once."""
    tm, pm = build_torch("squeezenet1_1"), build_paddle("squeezenet1_1")
    diffs, _ = _settings(tm, pm)
    assert [d.line() for d in diffs] == [
        "_conv (torch features.0): padding (0, 0) in torch, (1, 1) in Paddle",
        "_drop (torch classifier.0): mode 'upscale_in_train' in torch, 'downscale_in_infer' in "
        "Paddle"]
    assert _settings(tm, squeezenet_as_torchvision(pm))[0] == []


def test_paddle_vision_s_alexnet_scales_its_dropout_otherwise():
    diffs, _ = _settings(build_torch("alexnet"), build_paddle("alexnet"))
    assert [(d.setting, d.torch_value, d.paddle_value) for d in diffs] == [
        ("mode", "upscale_in_train", "downscale_in_infer")] * 2


def test_a_sub_noise_batchnorm_epsilon_fails_as_its_setting_alone():
    pair = build_pair("resnet18", 0)
    tm, pm, batches = train_copies(pair, 0, steps=1)
    target = "layer3.0.bn1"
    pair.paddle_layer(pm, target)._epsilon = 1e-6
    r = align_train(tm, pm, batches, steps=1, by_order=True, calibrate=True,
                    torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9),
                    paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9,
                                                               parameters=pm.parameters()))
    key = f"settings/{pair.paddle_name(target)}/epsilon"
    assert [k.key for k in r.failed] == [key], r.to_table(failed_only=True)
    assert "1e-05 in torch, 1e-06 in Paddle" in r[key].reason
    assert "divergence" not in r.options
