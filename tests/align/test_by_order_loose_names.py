"""Pairing weights by definition order where the port defines its blocks in another order and
names its norms otherwise: PaddleNLP's LUKE defines ``encoder`` before ``embeddings`` and calls
HF's ``LayerNorm`` ``layer_norm``. The names both sides share paired by name, the six norms left
over (all of one shape) were paired in each side's order: HF's ``embeddings.LayerNorm`` with the
port's ``encoder.layer.0...layer_norm``, and so on, loaded without a word, the outputs 1.2
apart. Names alike but for case and underscores now pair first."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import load_into_paddle, pair_weights_by_order  # noqa: E402

H = 8


class TorchEmbeddings(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = torch.nn.Embedding(50, H)
        self.LayerNorm = torch.nn.LayerNorm(H)


class TorchLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(H, H)
        self.LayerNorm = torch.nn.LayerNorm(H)


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = TorchEmbeddings()
        self.encoder = torch.nn.ModuleList([TorchLayer(), TorchLayer()])

    def forward(self, ids):
        x = self.embeddings.LayerNorm(self.embeddings.word(ids))
        for layer in self.encoder:
            x = layer.LayerNorm(x + layer.dense(x))
        return x


class PaddleEmbeddings(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.word = paddle.nn.Embedding(50, H)
        self.layer_norm = paddle.nn.LayerNorm(H)


class PaddleLayer(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.dense = paddle.nn.Linear(H, H)
        self.layer_norm = paddle.nn.LayerNorm(H)


class PaddleNet(paddle.nn.Layer):
    """The port: the encoder defined first, its norms ``layer_norm``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = paddle.nn.LayerList([PaddleLayer(), PaddleLayer()])
        self.embeddings = PaddleEmbeddings()

    def forward(self, ids):
        x = self.embeddings.layer_norm(self.embeddings.word(ids))
        for layer in self.encoder:
            x = layer.layer_norm(x + layer.dense(x))
        return x


def _models() -> tuple[TorchNet, PaddleNet]:
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchNet().eval(), PaddleNet()
    pm.eval()
    with torch.no_grad():  # every norm its own weights, so a norm loaded elsewhere shows
        for m in tm.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return tm, pm


def test_norms_named_otherwise_pair_with_their_own_block_s() -> None:
    tm, pm = _models()
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["embeddings.LayerNorm.weight"] == "embeddings.layer_norm.weight"
    for i in range(2):
        assert pairs[f"encoder.{i}.LayerNorm.bias"] == f"encoder.{i}.layer_norm.bias"
    assert pairs["embeddings.word.weight"] == "embeddings.word.weight"


def test_the_port_loaded_by_order_computes_the_reference_s_numbers() -> None:
    tm, pm = _models()
    load_into_paddle(pm, tm, by_order=True)
    ids = np.random.default_rng(0).integers(0, 50, (2, 6))
    with torch.no_grad():
        want = tm(torch.from_numpy(ids)).numpy()
    got = pm(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_names_alike_for_several_keys_are_left_to_order() -> None:
    """A loose name two keys of one side share says nothing of which is which."""
    from reprod.align.by_order import _loose_names

    assert _loose_names(["a.LayerNorm.weight", "a.layer_norm.weight", "b.Norm.bias"]) == {
        "b.norm.bias": "b.Norm.bias"}
