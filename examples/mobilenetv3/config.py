"""Settings both sides share: architecture table, data, training, precision, injectable bugs.

Standard library only, so that the torch side, the Paddle side and the driver can all import it
without pulling in a framework.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM_TORCH",
    "BN_MOMENTUM_PADDLE",
    "BATCH",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SEED",
    "LR",
    "MOMENTUM",
    "WEIGHT_DECAY",
    "DROPOUT",
    "NOISE_FACTOR",
    "BUGS",
    "BlockConfig",
    "make_divisible",
    "small_blocks",
]

# torchvision's MobileNetV3 BatchNorm; paddle's momentum is the weight of the old statistic
BN_EPS = 1e-3
BN_MOMENTUM_TORCH = 0.01
BN_MOMENTUM_PADDLE = 1.0 - BN_MOMENTUM_TORCH

# Fixed synthetic batch: small enough that the whole run stays well under two minutes on 2 cores
BATCH = 4
IMAGE_SIZE = 224
NUM_CLASSES = 1000
SEED = 2024

# Training comparison: SGD with momentum and weight decay, cosine learning-rate schedule
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 4e-5

# Dropout masks come from each framework's own random generator and never match element for
# element, so the aligned models are built without dropout (torchvision trains with 0.2).
DROPOUT = 0.0

# Every step runs in float32, the precision the model runs in. Backward and training are judged
# against the reference's own float32 noise: the torch side also runs them on a float64 copy of the
# model, and a key passes when the port differs from torch by at most NOISE_FACTOR times torch's
# own distance from float64 (reprod.compare(..., noise=...)). None: reprod's default (measured on
# torchvision models: correct ports stay near 10, bugs start near 50).
NOISE_FACTOR = None

# What --inject-bug can break, and where (the layer a correct localisation must name)
BUGS = {
    "hardswish": (
        "features.4.block.0.2",
        "Paddle port: this Hardswish is written as x * hardsigmoid(x) with Paddle's old default "
        "slope 0.2 instead of 1/6",
    ),
    "bn-eps": (
        "features.9.block.1.1",
        "Paddle port: this BatchNorm2D keeps Paddle's default epsilon 1e-5 instead of 1e-3",
    ),
    "no-transpose": (
        "classifier.0",
        "weight conversion: the first Linear weight is reshaped from [out, in] to [in, out] "
        "instead of transposed (the shapes fit, so Paddle loads it without complaint)",
    ),
}


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block, torchvision's ``InvertedResidualConfig`` (width 1.0)."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hs: bool
    stride: int


def make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without going more than 10% down (torchvision)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def small_blocks() -> list[BlockConfig]:
    """torchvision's ``mobilenet_v3_small`` block table."""
    rows = [
        # in, k, exp, out, SE, HS, stride
        (16, 3, 16, 16, True, False, 2),
        (16, 3, 72, 24, False, False, 2),
        (24, 3, 88, 24, False, False, 1),
        (24, 5, 96, 40, True, True, 2),
        (40, 5, 240, 40, True, True, 1),
        (40, 5, 240, 40, True, True, 1),
        (40, 5, 120, 48, True, True, 1),
        (48, 5, 144, 48, True, True, 1),
        (48, 5, 288, 96, True, True, 2),
        (96, 5, 576, 96, True, True, 1),
        (96, 5, 576, 96, True, True, 1),
    ]
    return [BlockConfig(*row) for row in rows]
