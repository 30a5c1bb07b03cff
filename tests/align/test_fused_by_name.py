"""A port holding its norm and the ReLU after it in one layer (Paddle's ``BatchNorm(act="relu")``,
as PaddleClas's and paddle.vision's models do), paired with the reference by name.

By order the fused layer was set against the reference's ReLU output; by name it was set
against the norm's, so a faithful port named as the reference failed its layers
(``align_forward(calibrate=True)``: ``layers/bn.out``, the ReLU's negative half apart), and a
bug in the norm was described as the ReLU's difference. By name the fused layer is now read as
by order.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

X = np.random.default_rng(3).standard_normal((2, 3, 10, 10)).astype(np.float32)


class _Torch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.relu = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), \
            torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.relu(self.bn(self.conv1(x))))


class _Port(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = paddle.nn.Conv2D(3, 8, 3), paddle.nn.BatchNorm(8, act="relu")
        self.conv2 = paddle.nn.Conv2D(8, 4, 3)

    def forward(self, x):
        return self.conv2(self.bn(self.conv1(x)))


def _pair(bug=1.0):
    torch.manual_seed(0)
    t = _Torch().eval()
    with torch.no_grad():  # every tensor matters, and the ReLU cuts about half the values
        for name, v in t.named_parameters():
            v.normal_(1.0 if name == "bn.weight" else 0.0, 0.3)
        t.bn.running_mean.normal_(0.0, 0.3)
        t.bn.running_var.uniform_(0.5, 2.0)
    p = _Port()
    load_into_paddle(p, t, by_order=True)
    p.bn.weight.set_value(p.bn.weight.numpy() * np.float32(bug))
    return t, p.eval()


def test_a_faithful_port_named_as_the_reference_passes_its_layers():
    t, p = _pair()
    r = align_forward(t, p, X, calibrate=True)  # the layers judged although the outputs pass
    assert r.passed, r.to_table()
    layers = r.options["layers"]
    assert layers["passed"] and "not_failed" not in layers, layers


def test_a_bug_in_the_fused_norm_is_named_at_the_norm_and_its_relu():
    t, p = _pair(1.02)
    r = align_forward(t, p, X, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "relu", div
    assert div["message"].startswith(
        "diverges at bn (BatchNorm2d vs BatchNorm) + relu (ReLU), one layer in the port: "
        "input aligned")
