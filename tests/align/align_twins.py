"""One small network written twice, in torch and in Paddle, layer for layer (tests only)."""

from __future__ import annotations

import numpy as np
import paddle
import torch

NUM_CLASSES = 5
VOCAB = 11


def perturbed(model: torch.nn.Module, norm: str) -> torch.nn.Module:
    """``model`` with every tensor of its norms (whose names hold ``norm``) and every bias moved
    off its initial value (1 and 0), so that a weight loaded into the wrong one of two such
    tensors shows (seeded)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class TorchNet(torch.nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(16, NUM_CLASSES)

    def forward(self, x, ids):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        h = h + self.emb(ids).mean(dim=1)
        h = self.norm(torch.relu(self.fc1(h)))
        return self.head(self.drop(h))


class PaddleNet(paddle.nn.Layer):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(8)  # momentum 0.9 here is torch's 0.1
        self.emb = paddle.nn.Embedding(VOCAB, 8)
        self.fc1 = paddle.nn.Linear(8, 16)
        self.norm = paddle.nn.LayerNorm(16)
        self.drop = paddle.nn.Dropout(dropout)
        self.head = paddle.nn.Linear(16, NUM_CLASSES)

    def forward(self, x, ids):
        h = paddle.nn.functional.relu(self.bn(self.conv(x))).mean(axis=(2, 3))
        h = h + self.emb(ids).mean(axis=1)
        h = self.norm(paddle.nn.functional.relu(self.fc1(h)))
        return self.head(self.drop(h))


def make_batch(seed: int, n: int = 4) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 6, 6)).astype(np.float32)
    ids = rng.integers(0, VOCAB, size=(n, 7)).astype(np.int64)
    labels = rng.integers(0, NUM_CLASSES, size=(n,)).astype(np.int64)
    return {"x": x, "ids": ids}, labels


def twins(seed: int = 0, dropout: float = 0.0) -> tuple[TorchNet, PaddleNet]:
    """A torch net with random weights and a Paddle net holding the same weights."""
    from reprod.align import load_into_paddle

    torch.manual_seed(seed)
    paddle.seed(seed)
    tm, pm = TorchNet(dropout), PaddleNet(dropout)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong rename would show
        tm.bn.running_mean.uniform_(-0.5, 0.5)
        tm.bn.running_var.uniform_(0.5, 1.5)
    load_into_paddle(pm, tm)
    return tm, pm
