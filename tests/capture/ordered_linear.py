"""Linear layers that add their products in a fixed order, once per framework: two orders give
two correctly rounded results, which the kink tests put on opposite sides of a kink."""

from __future__ import annotations

import numpy as np
import torch

try:  # test_kinks.py runs where paddle is not installed
    import paddle
except ImportError:
    paddle = None


class TorchOrderedLinear(torch.nn.Module):
    """A bias-free linear layer that adds its products in a fixed order."""

    def __init__(self, weight: np.ndarray, order: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weight.copy()))
        self.order = order

    def forward(self, x):
        terms = [x[:, j : j + 1] * self.weight[:, j] for j in range(x.shape[1])]
        out = terms[self.order[0]]
        for j in self.order[1:]:
            out = out + terms[j]
        return out


if paddle is not None:

    class PaddleOrderedLinear(paddle.nn.Layer):
        def __init__(self, weight: np.ndarray, order: tuple[int, ...]) -> None:
            super().__init__()
            self.weight = self.create_parameter(
                list(weight.shape), default_initializer=paddle.nn.initializer.Assign(weight)
            )
            self.order = order

        def forward(self, x):
            terms = [x[:, j : j + 1] * self.weight[:, j] for j in range(x.shape[1])]
            out = terms[self.order[0]]
            for j in self.order[1:]:
                out = out + terms[j]
            return out
