"""A port that leaves a layer out (BlenderbotSmall's embedding LayerNorm replaced by an
``Identity``): the localisation said "diverges at layernorm_embedding (LayerNorm vs Linear):
input aligned", pairing the reference's LayerNorm with the port's next Linear, which sees the
same input. Layers of one kind now pair first, and the message names the layer the port left
out."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod import KeyMismatchError  # noqa: E402
from reprod.align import align_forward, load_into_paddle, pair_weights_by_order  # noqa: E402

D, FF, VOCAB = 16, 32, 50


class TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
        self.ln1 = torch.nn.LayerNorm(D)
        self.fc1, self.fc2 = torch.nn.Linear(D, FF), torch.nn.Linear(FF, D)
        self.ln2 = torch.nn.LayerNorm(D)

    def forward(self, x):
        x = self.ln1(x + self.out(torch.tanh(self.q(x))))
        return self.ln2(x + self.fc2(torch.relu(self.fc1(x))))


class TorchModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.ln_emb = torch.nn.LayerNorm(D)
        self.blocks = torch.nn.ModuleList([TorchBlock(), TorchBlock()])

    def forward(self, ids):
        x = self.ln_emb(self.emb(ids))
        for b in self.blocks:
            x = b(x)
        return x


class PaddleBlock(paddle.nn.Layer):
    """Defined in Paddle's TransformerEncoderLayer order (LayerNorms last), called as the
    reference's: by order the LayerNorms do not pair, and nothing anchors the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = paddle.nn.Linear(D, D), paddle.nn.Linear(D, D)
        self.fc1, self.fc2 = paddle.nn.Linear(D, FF), paddle.nn.Linear(FF, D)
        self.ln1, self.ln2 = paddle.nn.LayerNorm(D), paddle.nn.LayerNorm(D)

    def forward(self, x):
        x = self.ln1(x + self.out(paddle.tanh(self.q(x))))
        return self.ln2(x + self.fc2(paddle.nn.functional.relu(self.fc1(x))))


class PaddleModel(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.emb = paddle.nn.Embedding(VOCAB, D)
        self.ln_emb = paddle.nn.LayerNorm(D)
        self.blocks = paddle.nn.LayerList([PaddleBlock(), PaddleBlock()])

    def forward(self, ids):
        x = self.ln_emb(self.emb(ids))
        for b in self.blocks:
            x = b(x)
        return x


def test_a_layer_the_port_leaves_out_is_named_not_paired_with_the_next_linear():
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchModel().eval(), PaddleModel()
    pm.eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    load_into_paddle(pm, tm, by_order=True)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    assert align_forward(tm, pm, ids, by_order=True).passed

    pm.ln_emb = paddle.nn.Identity()  # the bug: the port leaves the embedding LayerNorm out
    with pytest.raises(KeyMismatchError):  # nothing anchors the calls: the shapes decide
        pair_weights_by_order(tm, pm)
    r = align_forward(tm, pm, ids, by_order=True, check_settings=False)
    assert not r.passed
    div = r.options["divergence"]
    # the reference's data runs through it from the call before to the call after: judged
    # where the port has nothing
    assert div["layer"] == "ln_emb", div
    assert div["message"].startswith(
        "diverges at ln_emb (LayerNorm vs nothing in the port: its data passes unchanged): "
        "input aligned"), div
    assert div["hint"] is None  # no LayerNorm parameter set against a Linear's


def test_a_left_out_layer_the_data_reaches_through_forward_code_is_named_between():
    """BlenderbotSmall's embedding LayerNorm reads the embeddings plus positions, summed in the
    model's forward code; a port that does not call it: the port's next layer's input already
    differs, and the message names the LayerNorm nothing in the port pairs with, between the
    two aligned calls ("the cause lies between the two, outside the recorded layers" before)."""
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = SummingTorch().eval(), SummingPaddle()
    pm.eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    load_into_paddle(pm, tm, by_order=True)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
    assert align_forward(tm, pm, ids, by_order=True).passed
    pm.skip_ln = True  # the bug: the port's forward does not call its LayerNorm
    r = align_forward(tm, pm, ids, by_order=True, check_settings=False)
    div = r.options["divergence"]
    assert div["layer"] == "blocks.0.q", div
    assert "vs Linear" not in div["message"]
    assert ("although pos aligns; between the two the reference calls ln_emb (LayerNorm), "
            "which nothing in the port pairs with: a layer the port leaves out, or computes "
            "where nothing records it") in div["message"]


class SummingTorch(TorchModel):
    def __init__(self) -> None:
        super().__init__()
        self.pos = torch.nn.Embedding(VOCAB, D)

    def forward(self, ids):
        x = self.ln_emb(self.emb(ids) + self.pos(ids))
        for b in self.blocks:
            x = b(x)
        return x


class SummingPaddle(PaddleModel):
    def __init__(self) -> None:
        super().__init__()
        self.pos = paddle.nn.Embedding(VOCAB, D)
        self.skip_ln = False

    def forward(self, ids):
        x = self.emb(ids) + self.pos(ids)
        x = x if self.skip_ln else self.ln_emb(x)
        for b in self.blocks:
            x = b(x)
        return x
