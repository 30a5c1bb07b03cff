"""Paddle port of ``torch_model.py``: the same module tree and attribute names, so every parameter
and every layer has the same qualified name on both sides (``features.4.block.2.fc1.weight``).

The differences a porter has to get right, each marked where it happens:
BatchNorm momentum is ``1 - torch's`` and epsilon must be passed (Paddle's default is 1e-5),
Linear weights are stored ``[in, out]``, and Paddle has no ``inplace`` activations.

>>> model = mobilenet_v3_small(num_classes=1000)
>>> model.set_state_dict(paddle.load("model.pdparams"))
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import paddle
import paddle.nn.functional as F
from config import BN_EPS, BN_MOMENTUM_PADDLE, BUGS, BlockConfig, make_divisible, small_blocks
from paddle import nn

__all__ = ["MobileNetV3", "mobilenet_v3_small", "inject_bug"]


class Conv2dNormActivation(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Optional[Callable[..., nn.Layer]] = nn.BatchNorm2D,
        activation_layer: Optional[Callable[..., nn.Layer]] = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Layer] = [
            nn.Conv2D(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                groups=groups,
                # torch's bias=False; Paddle spells "no bias" as bias_attr=False
                bias_attr=None if norm_layer is None else False,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer())
        super().__init__(*layers)


class SqueezeExcitation(nn.Layer):
    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2D(1)
        self.fc1 = nn.Conv2D(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2D(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        scale = self.scale_activation(scale)
        return scale * x


class InvertedResidual(nn.Layer):
    def __init__(self, cnf: BlockConfig, norm_layer: Callable[..., nn.Layer]) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Layer] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(
                Conv2dNormActivation(
                    cnf.input_channels,
                    cnf.expanded_channels,
                    kernel_size=1,
                    norm_layer=norm_layer,
                    activation_layer=activation_layer,
                )
            )
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels,
                cnf.expanded_channels,
                kernel_size=cnf.kernel,
                stride=cnf.stride,
                groups=cnf.expanded_channels,
                norm_layer=norm_layer,
                activation_layer=activation_layer,
            )
        )
        if cnf.use_se:
            squeeze_channels = make_divisible(cnf.expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(cnf.expanded_channels, squeeze_channels))
        layers.append(
            Conv2dNormActivation(
                cnf.expanded_channels,
                cnf.out_channels,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=None,
            )
        )
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = result + x
        return result


class MobileNetV3(nn.Layer):
    def __init__(
        self,
        blocks: list[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        # torch BatchNorm2d(eps=1e-3, momentum=0.01) == paddle BatchNorm2D(epsilon=1e-3, momentum=0.99)
        norm_layer = partial(nn.BatchNorm2D, epsilon=BN_EPS, momentum=BN_MOMENTUM_PADDLE)
        first = blocks[0].input_channels
        layers: list[nn.Layer] = [
            Conv2dNormActivation(
                3,
                first,
                kernel_size=3,
                stride=2,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        ]
        layers.extend(InvertedResidual(cnf, norm_layer) for cnf in blocks)
        last_in = blocks[-1].out_channels
        last_out = 6 * last_in
        layers.append(
            Conv2dNormActivation(
                last_in,
                last_out,
                kernel_size=1,
                norm_layer=norm_layer,
                activation_layer=nn.Hardswish,
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2D(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_out, last_channel),  # weight [in, out], torch's is [out, in]
            nn.Hardswish(),
            nn.Dropout(p=dropout),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = paddle.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v3_small(*, num_classes: int = 1000, dropout: float = 0.2) -> MobileNetV3:
    """The port of torchvision's ``mobilenet_v3_small``; load converted weights before use."""
    return MobileNetV3(small_blocks(), 1024, num_classes=num_classes, dropout=dropout)


# --- deliberate bugs, for --inject-bug: each replaces one layer with a plausible porting mistake ---


class _HardswishOldSlope(nn.Layer):
    """x * hardsigmoid(x) with slope 0.2, the default of Paddle 1.x's ``hard_sigmoid``."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * F.hardsigmoid(x, slope=0.2, offset=0.5)


def _replace(model: nn.Layer, name: str, layer: nn.Layer) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model
    for part in parent_name.split("."):
        parent = parent._sub_layers[part]
    if child not in parent._sub_layers:
        raise KeyError(f"{name}: no such layer to replace")
    parent._sub_layers[child] = layer


def inject_bug(model: MobileNetV3, bug: str) -> str:
    """Break the layer ``BUGS[bug]`` names in the Paddle port; returns that layer's name.

    ``no-transpose`` is a conversion bug, not a port bug: it is injected in ``align_weights.py``.
    """
    layer_name = BUGS[bug][0]
    if bug == "hardswish":
        _replace(model, layer_name, _HardswishOldSlope())
    elif bug == "bn-eps":
        bn = model
        for part in layer_name.split("."):
            bn = bn._sub_layers[part]
        # forgetting epsilon=: Paddle's default 1e-5 rather than torchvision's 1e-3
        _replace(model, layer_name, nn.BatchNorm2D(bn._num_features, momentum=BN_MOMENTUM_PADDLE))
    return layer_name
