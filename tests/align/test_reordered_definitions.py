"""A port that defines its layers in another order and names them otherwise (PaddleClas's
ConvNeXt defines every downsampling layer before the stages, timm's each in its stage), loaded
with the porter's own pairs (``ConversionRules.from_pairs``):

- the settings check paired the layers with parameters by definition order, kind by kind, a
  depthwise convolution with a downsampling one, and failed the faithful port with invented
  differences (stride, padding, groups); now each kind pairs by its weights' shapes;
- a LayerNorm written by hand (``ChannelsFirstLayerNorm``) was no layer of a known kind, and
  its epsilon went unchecked;
- the localisation ignored the rules and gave up ("layer names do not pair")."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import (  # noqa: E402
    ConversionRules,
    align_forward,
    align_train,
    compare_settings,
    load_into_paddle,
)


class TorchChannelsFirstLayerNorm(torch.nn.Module):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / torch.sqrt(s + self.eps) + \
            self.bias[:, None, None]


class ChannelsFirstLayerNorm(paddle.nn.Layer):
    """PaddleClas's, as written there: its epsilon an attribute ``epsilon``."""

    def __init__(self, c: int, epsilon: float = 1e-6) -> None:
        super().__init__()
        self.weight = self.create_parameter([c], default_initializer=paddle.nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([c], is_bias=True)
        self.epsilon = epsilon

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / paddle.sqrt(s + self.epsilon) + \
            self.bias[:, None, None]


def _block_t(c: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Conv2d(c, c, 7, padding=3, groups=c),
                               torch.nn.Conv2d(c, c, 1))


def _block_p(c: int) -> paddle.nn.Sequential:
    return paddle.nn.Sequential(paddle.nn.Conv2D(c, c, 7, padding=3, groups=c),
                                paddle.nn.Conv2D(c, c, 1))


class TorchNet(torch.nn.Module):
    """timm's order: each downsampling layer inside its stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 2, stride=2),
                                        TorchChannelsFirstLayerNorm(8))
        self.stage0 = _block_t(8)
        self.down1 = torch.nn.Conv2d(8, 16, 2, stride=2)
        self.stage1 = _block_t(16)

    def forward(self, x):
        return self.stage1(self.down1(self.stage0(self.stem(x))))


class PaddleNet(paddle.nn.Layer):
    """PaddleClas's order: every downsampling layer first."""

    def __init__(self) -> None:
        super().__init__()
        self.downsample_layers = paddle.nn.LayerList([
            paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 2, stride=2), ChannelsFirstLayerNorm(8)),
            paddle.nn.Conv2D(8, 16, 2, stride=2)])
        self.stages = paddle.nn.LayerList([_block_p(8), _block_p(16)])

    def forward(self, x):
        x = self.stages[0](self.downsample_layers[0](x))
        return self.stages[1](self.downsample_layers[1](x))


PAIRS = {"stem.0.weight": "downsample_layers.0.0.weight", "stem.0.bias": "downsample_layers.0.0.bias",
         "stem.1.weight": "downsample_layers.0.1.weight", "stem.1.bias": "downsample_layers.0.1.bias",
         "down1.weight": "downsample_layers.1.weight", "down1.bias": "downsample_layers.1.bias"}
for _i in range(2):
    for _j in range(2):
        for _t in ("weight", "bias"):
            PAIRS[f"stage{_i}.{_j}.{_t}"] = f"stages.{_i}.{_j}.{_t}"


def models() -> tuple[TorchNet, PaddleNet, ConversionRules]:
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchNet().eval(), PaddleNet()
    pm.eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    rules = ConversionRules.from_pairs(PAIRS)
    load_into_paddle(pm, tm, rules=rules)
    return tm, pm, rules


def image() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype("float32")


@pytest.mark.parametrize("by_order", [True, False])
def test_the_faithful_port_s_layers_pair_by_their_weights_shapes(by_order: bool):
    tm, pm, _ = models()
    report = compare_settings(tm, pm, by_order=by_order)
    assert report.passed, str(report)
    assert report.compared >= 6  # four convolutions, the stem's and the downsampling one, a norm
    r = align_forward(tm, pm, image(), by_order=by_order)
    assert r.passed, r.options.get("findings")


def test_a_hand_written_layer_norm_s_epsilon_is_a_setting():
    tm, pm, rules = models()
    pm.downsample_layers[0][1].epsilon = 1e-4
    report = compare_settings(tm, pm, rules=rules)
    assert [(d.torch_layer, d.paddle_layer, d.setting, d.torch_value, d.paddle_value)
            for d in report.differ] == [("stem.1", "downsample_layers.0.1", "epsilon", 1e-6, 1e-4)]


def test_the_rules_the_weights_were_loaded_with_pair_the_layer_captures():
    tm, pm, rules = models()
    w = pm.stages[1][1].weight
    w.set_value(w * 1.05)
    r = align_forward(tm, pm, image(), rules=rules)
    assert not r.passed
    div = r.options["divergence"]
    assert div["kind"] == "layer" and div["layer"] == "stage1.1", div
    assert div["message"].startswith(
        "diverges at stage1.1 (Conv2d; the port's stages.1.1): input aligned")
    assert div["port_layer"] == "stages.1.1"  # where to look in the port

    tm.train()
    pm.train()
    rng = np.random.default_rng(1)
    batches = [(image(), rng.standard_normal((2, 16, 4, 4)).astype("float32"))]
    r = align_train(tm, pm, batches, steps=1, rules=rules,
                    torch_loss_fn=torch.nn.MSELoss(), paddle_loss_fn=paddle.nn.MSELoss(),
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                    paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1,
                                                          parameters=pm.parameters()))
    assert not r.passed
    assert r.options["divergence"]["layer"] == "stage1.1", r.options["divergence"]
    assert r.options["divergence"]["port_layer"] == "stages.1.1"
