"""Dropouts as many on both sides but placed otherwise: PaddleClas's Swin drops after its patch
embedding (``pos_drop``), timm's before its head (``head.drop``, p 0). In call order every
dropout paired with the next one's counterpart, and the difference was named at the far end
("layers.1.blocks.1.mlp.drop#2 (torch head.drop)"). And timm's ViT head dropout (p 0.1, outside
any block) paired with a block's dropout of the port rather than being said to have none."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

D = 8


class TorchBlock(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc, self.drop = torch.nn.Linear(D, D), torch.nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.fc(x)))


class PaddleBlock(paddle.nn.Layer):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc, self.drop = paddle.nn.Linear(D, D), paddle.nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(paddle.tanh(self.fc(x)))


class TorchNet(torch.nn.Module):
    """timm's Swin: no dropout after the embedding, one (p 0) before the head."""

    def __init__(self, block_p: float = 0.1, head_p: float = 0.0) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([TorchBlock(block_p), TorchBlock(block_p)])
        self.head_drop, self.head = torch.nn.Dropout(head_p), torch.nn.Linear(D, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.head_drop(x))


class PaddleNet(paddle.nn.Layer):
    """PaddleClas's Swin: a dropout after the embedding, none before the head."""

    def __init__(self, pos_p: float = 0.1, block_p: float = 0.1) -> None:
        super().__init__()
        self.pos_drop = paddle.nn.Dropout(pos_p)
        self.blocks = paddle.nn.LayerList([PaddleBlock(block_p), PaddleBlock(block_p)])
        self.head = paddle.nn.Linear(D, 3)

    def forward(self, x):
        x = self.pos_drop(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _differ(tm, pm) -> list[str]:
    torch.manual_seed(0)
    load_into_paddle(pm, tm)
    x = np.random.default_rng(0).standard_normal((2, D)).astype("float32")
    return align_forward(tm, pm, x).options["settings"]["differ"]


def test_as_many_dropouts_placed_otherwise_name_the_one_the_reference_lacks():
    assert _differ(TorchNet(), PaddleNet()) == [
        "pos_drop (Paddle only): p no dropout in torch, 0.1 in Paddle"]


def test_a_head_dropout_outside_any_block_is_not_paired_with_a_block_s():
    # timm's ViT drop_rate: the head's dropout only; the port's: the blocks'
    assert _differ(TorchNet(block_p=0.0, head_p=0.1), PaddleNet(pos_p=0.0)) == [
        "head_drop (torch only): p 0.1 in torch, no dropout in Paddle",
        "blocks.0.drop: p 0 in torch, 0.1 in Paddle",
        "blocks.1.drop: p 0 in torch, 0.1 in Paddle"]
