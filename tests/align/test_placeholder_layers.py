"""timm's ViT against PaddleClas's: ``cls_token`` and ``pos_embed`` defined the other way round
under the same names; 18 ``nn.Identity`` placeholders (``q_norm``, ``ls1``, ``norm_pre``...) the
port does without; an attention whose scale is its own forward code. Pairing by order was
refused, the localisation said "layer names do not pair" (the placeholders counted as
unpaired calls), and by order a bug in the attention's own code was put at the model's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle, pair_weights_by_order  # noqa: E402

D, T = 8, 5


class TorchAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.q_norm, self.k_norm = torch.nn.Identity(), torch.nn.Identity()
        self.attn_drop = torch.nn.Dropout(0.1)
        self.proj = torch.nn.Linear(D, D)
        self.scale = D ** -0.5

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = self.attn_drop(torch.softmax(self.q_norm(q) @ self.k_norm(k).transpose(1, 2)
                                         * self.scale, dim=-1))
        return self.proj(a @ v)


class TorchViT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, D))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, T + 1, D))
        self.embed = torch.nn.Linear(D, D)
        self.norm_pre = torch.nn.Identity()
        self.blocks = torch.nn.ModuleList([TorchAttention(), TorchAttention()])
        self.ls = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        self.fc_norm = torch.nn.Identity()
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        for block, ls in zip(self.blocks, self.ls):
            x = x + ls(block(x))
        return self.head(self.fc_norm(x[:, 0]))


class Attention(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = paddle.nn.Linear(D, 3 * D)
        self.attn_drop = paddle.nn.Dropout(0.1)
        self.proj = paddle.nn.Linear(D, D)
        self.scale = D ** -0.5

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, axis=-1)
        a = self.attn_drop(paddle.nn.functional.softmax(
            q @ k.transpose([0, 2, 1]) * self.scale, axis=-1))
        return self.proj(a @ v)


class PaddleViT(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = self.create_parameter([1, T + 1, D])  # defined first, as PaddleClas
        self.cls_token = self.create_parameter([1, 1, D])
        self.embed = paddle.nn.Linear(D, D)
        self.blocks = paddle.nn.LayerList([Attention(), Attention()])
        self.head = paddle.nn.Linear(D, 3)

    def forward(self, x):
        x = self.embed(x)
        x = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), x], axis=1) + self.pos_embed
        for block in self.blocks:
            x = x + block(x)
        return self.head(x[:, 0])


@pytest.fixture
def models():
    torch.manual_seed(0)
    tm, pm = TorchViT().eval(), PaddleViT()
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def image() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, T, D)).astype("float32")


def test_tensors_named_alike_pair_by_name_where_their_order_differs(models):
    tm, pm = models
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["cls_token"] == "cls_token" and pairs["pos_embed"] == "pos_embed"
    np.testing.assert_array_equal(pm.cls_token.numpy(), tm.cls_token.detach().numpy())
    assert align_forward(tm, pm, image(), by_order=True).passed


@pytest.mark.parametrize("by_order", [False, True])
def test_placeholder_layers_the_port_does_without_do_not_unpair_the_rest(models, by_order):
    tm, pm = models
    w = pm.blocks[1].proj.weight
    w.set_value(w * 1.05)
    div = align_forward(tm, pm, image(), by_order=by_order).options["divergence"]
    assert div["kind"] == "layer" and div["layer"] == "blocks.1.proj", div
    assert "port_layer" not in div  # the port names it alike


def test_by_order_a_block_s_own_code_is_named_at_the_block(models):
    tm, pm = models
    pm.blocks[0].scale = D ** -0.25  # the port's attention scales otherwise: its own code
    div = align_forward(tm, pm, image(), by_order=True).options["divergence"]
    assert div["layer"] == "blocks.0", div
    assert div["message"].endswith("so the cause is blocks.0's own forward code"), div
