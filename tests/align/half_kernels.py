"""Paddle layers computing as a GPU half-precision kernel does, for the half-precision tests:
half weights and inputs widened to float32, the result rounded to the input's dtype (tests only;
Paddle has no float16 or bfloat16 kernels for these operations on the CPU)."""

from __future__ import annotations

import paddle

F = paddle.nn.functional


def rounded(x: paddle.Tensor, dtype) -> paddle.Tensor:
    """``x`` rounded to ``dtype`` and held in float32."""
    return x.astype(dtype).astype("float32")


class HalfLinear(paddle.nn.Linear):
    """``unfused``: the bias added to the rounded product and rounded again (another correct
    kernel)."""

    unfused = False

    def forward(self, x):
        w = self.weight.astype("float32")
        b = None if self.bias is None else self.bias.astype("float32")
        if self.unfused and b is not None:
            y = rounded(F.linear(x.astype("float32"), w), x.dtype)
            return (y + b).astype(x.dtype)
        return F.linear(x.astype("float32"), w, b).astype(x.dtype)


class HalfLayerNorm(paddle.nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.astype("float32"), self._normalized_shape,
                            self.weight.astype("float32"), self.bias.astype("float32"),
                            self._epsilon).astype(x.dtype)


class HalfGELU(paddle.nn.GELU):
    def forward(self, x):
        return F.gelu(x.astype("float32"), approximate=self._approximate).astype(x.dtype)
