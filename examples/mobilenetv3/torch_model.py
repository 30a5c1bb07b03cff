"""PyTorch MobileNetV3-Small, the reference side of the example.

Written out here in the shape of torchvision's ``mobilenet_v3_small`` (same module tree, attribute
names, defaults and initialisation) because torchvision is not a dependency. Parameter names are
therefore torchvision's, e.g. ``features.4.block.2.fc1.weight``.

>>> model = mobilenet_v3_small(num_classes=1000)
>>> model(torch.zeros(1, 3, 224, 224)).shape
torch.Size([1, 1000])
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from config import BN_EPS, BN_MOMENTUM_TORCH, BlockConfig, make_divisible, small_blocks
from torch import nn

__all__ = ["MobileNetV3", "mobilenet_v3_small"]


class Conv2dNormActivation(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation, as ``torchvision.ops.misc.Conv2dNormActivation``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = nn.BatchNorm2d,
        activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                groups=groups,
                bias=norm_layer is None,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            # torchvision builds its activations in place; the capture step must cope with that
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation with ReLU and Hardsigmoid, as ``torchvision.ops.SqueezeExcitation``."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        scale = self.scale_activation(scale)
        return scale * x


class InvertedResidual(nn.Module):
    def __init__(self, cnf: BlockConfig, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation_layer = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: list[nn.Module] = []
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class MobileNetV3(nn.Module):
    def __init__(
        self,
        blocks: list[BlockConfig],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.BatchNorm2d, eps=BN_EPS, momentum=BN_MOMENTUM_TORCH)
        first = blocks[0].input_channels
        layers: list[nn.Module] = [
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
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_out, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v3_small(*, num_classes: int = 1000, dropout: float = 0.2) -> MobileNetV3:
    """torchvision's ``mobilenet_v3_small`` (random weights; torchvision's initialisation)."""
    return MobileNetV3(small_blocks(), 1024, num_classes=num_classes, dropout=dropout)
