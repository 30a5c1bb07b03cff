"""``reprod.align.fold_conv_biases``: the step a refusal by order asks for where the reference
holds a convolution bias before a BatchNorm that the port folded away (timm's ResNeSt and HRNet
against PaddleClas's; ``tests/realworld/test_paddleclas_ports_real.py`` holds ResNeSt50)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, fold_conv_biases, load_into_paddle  # noqa: E402
from reprod.errors import ReprodError  # noqa: E402

tnn, pnn = torch.nn, paddle.nn
X = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)


def _reference() -> torch.nn.Module:
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4), tnn.ReLU(),
                        tnn.Conv2d(4, 4, 3), tnn.BatchNorm2d(4), tnn.Conv2d(4, 2, 1))
    with torch.no_grad():
        for m in (tm[1], tm[4]):
            m.running_mean.copy_(torch.randn(4) * 0.3)
            m.running_var.copy_(torch.rand(4) + 0.5)
    return tm.eval()


def _port() -> paddle.nn.Layer:
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3, bias_attr=False), pnn.BatchNorm2D(4), pnn.ReLU(),
                        pnn.Conv2D(4, 4, 3, bias_attr=False), pnn.BatchNorm2D(4),
                        pnn.Conv2D(4, 2, 1))
    pm.eval()
    return pm


def test_the_biases_before_norms_fold_and_the_port_then_loads_and_passes():
    tm = _reference()
    x = torch.from_numpy(X)
    manual = copy.deepcopy(tm)  # the fold by hand, as the refusal describes it
    with torch.no_grad():
        before = tm(x)
        for conv, norm in ((manual[0], manual[1]), (manual[3], manual[4])):
            norm.running_mean.sub_(conv.bias)
            conv.bias = None
    with pytest.raises(ReprodError) as refused:
        load_into_paddle(_port(), tm, by_order=True)
    assert "reprod.align.fold_conv_biases(torch_model, x) does" in str(refused.value)

    assert fold_conv_biases(tm, x) == ["0.bias", "3.bias"]
    assert tm[0].bias is None and tm[3].bias is None and tm[5].bias is not None  # no norm after
    assert tm.state_dict().keys() == manual.state_dict().keys()
    for key, value in manual.state_dict().items():
        torch.testing.assert_close(tm.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), before, rtol=1e-5, atol=1e-6)
    pm = _port()
    load_into_paddle(pm, tm, by_order=True)
    assert align_forward(tm, pm, X, by_order=True, calibrate=True).passed


class _Residual(tnn.Module):
    """The convolution's output goes to the norm and to a residual: its bias cannot fold."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 3, 3, padding=1)
        self.bn = tnn.BatchNorm2d(3)
        self.other = tnn.Conv2d(3, 3, 1)
        self.bn2 = tnn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.other(x))


def test_a_bias_whose_output_is_read_elsewhere_too_is_not_folded_and_nothing_changes():
    torch.manual_seed(0)
    tm = _Residual().train()  # the mode it was in comes back
    with torch.no_grad():
        tm.bn.running_mean.copy_(torch.randn(3))
    state = copy.deepcopy(tm.state_dict())
    with pytest.raises(ReprodError) as e:
        fold_conv_biases(tm, torch.from_numpy(X))
    text = str(e.value)
    assert text.startswith("fold_conv_biases: folding 2 bias(es) (conv.bias, other.bias) moves "
                           "the model's outputs: a convolution's output is read elsewhere too")
    assert "\n" not in text and tm.training
    assert tm.state_dict().keys() == state.keys() and tm.conv.bias is not None
    for key, value in state.items():
        torch.testing.assert_close(tm.state_dict()[key], value, rtol=0, atol=0)


def test_a_norm_without_running_statistics_is_left_alone_and_the_mode_comes_back():
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4, track_running_stats=False),
                        tnn.Conv2d(4, 4, 1), tnn.BatchNorm2d(4)).train()
    assert fold_conv_biases(tm, torch.from_numpy(X)) == ["2.bias"]
    assert tm[0].bias is not None and tm[2].bias is None and tm.training


@pytest.mark.parametrize("side", ["torch", "Paddle"])
def test_a_bias_one_side_alone_holds_is_named_with_its_layer(side):
    """timm's LCNet head convolution holds a bias, PaddleClas's ``last_conv`` none, and no norm
    follows to fold it into: the refusal listed three shifted positions."""
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4), tnn.ReLU(),
                        tnn.Conv2d(4, 8, 1, bias=side == "torch"), tnn.Flatten(),
                        tnn.Linear(8 * 100, 3)).eval()
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3), pnn.BatchNorm2D(4), pnn.ReLU(),
                        pnn.Conv2D(4, 8, 1, bias_attr=None if side == "Paddle" else False),
                        pnn.Flatten(), pnn.Linear(8 * 100, 3))
    with pytest.raises(ReprodError) as e:
        load_into_paddle(pm, tm, by_order=True)
    text = str(e.value)
    if side == "torch":
        said = ("the torch side's 3 has a bias [8] where the port's 3 has none: the two compute "
                "otherwise unless that bias is zero. Give the layer without one a bias (torch's "
                "bias=True, Paddle's bias_attr) to compute the same; where the bias is zero, say "
                'so: rules=ConversionRules(skip=[r"^3\\.bias$"]); the positions: #7 3.bias [8] '
                "vs nothing")
    else:
        said = ("the port's 3 has a bias [8] where the torch side's 3 has none: the two compute "
                "otherwise unless that bias is zero. Give the layer without one a bias (torch's "
                "bias=True, Paddle's bias_attr) to compute the same; where the bias is zero, say "
                'so: rules=ConversionRules(port_only=[r"^3\\.bias$"]); the positions: #7 nothing '
                "vs 3.bias [8]")
    assert said in text, text
    # said so (a zero bias), the rest loads
    from reprod.align import ConversionRules

    rules = ConversionRules(**({"skip": [r"^3\.bias$"]} if side == "torch"
                               else {"port_only": [r"^3\.bias$"]}))
    with torch.no_grad():
        if side == "torch":
            tm[3].bias.zero_()
    if side == "Paddle":
        pm[3].bias.set_value(np.zeros(8, np.float32))
    load_into_paddle(pm, tm, by_order=True, rules=rules)
    pm.eval()
    assert align_forward(tm, pm, X, by_order=True, calibrate=True, rules=rules).passed


def test_a_tensor_in_another_layout_is_said_to_be_the_same_values():
    """TNT's ``pixel_pos`` is [1, 24, 4, 4] in timm and [1, 16, 24] in PaddleClas: the same
    values, which no rule reshapes and permutes by itself."""

    class T(tnn.Module):
        def __init__(self):
            super().__init__()
            self.pos = tnn.Parameter(torch.randn(1, 24, 4, 4))
            self.fc = tnn.Linear(24, 2)

    class Pd(pnn.Layer):
        def __init__(self):
            super().__init__()
            self.pos = self.create_parameter([1, 16, 24])
            self.fc = pnn.Linear(24, 2)

    with pytest.raises(ReprodError) as e:
        load_into_paddle(Pd(), T(), by_order=True)
    assert str(e.value).endswith(
        "#0 pos [1, 24, 4, 4] vs pos [1, 16, 24] (the same 384 values in another layout: convert "
        "it yourself, reshaped or permuted as the port reads it, and leave it out here: "
        'rules=ConversionRules(skip=[r"^pos$"], port_only=[r"^pos$"]))'), str(e.value)
    from reprod.align import ConversionRules

    rules = ConversionRules(skip=[r"^pos$"], port_only=[r"^pos$"])
    load_into_paddle(Pd(), T(), by_order=True, rules=rules)  # the rest loads
