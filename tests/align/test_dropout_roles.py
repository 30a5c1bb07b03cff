"""Dropouts paired by their role: Hugging Face's BERT drops its attention probabilities with a
Dropout layer of its self-attention, Paddle's ``TransformerEncoderLayer`` with a rate its
``MultiHeadAttention`` holds, and holds an activation dropout (PaddleNLP sets it to 0) that
BERT has not. Where the port's attention rate was 0, the rate was not an event at all: BERT's
attention dropout paired with the port's activation dropout or its residual one, and the
difference named the wrong counterpart ("encoder.layers.0.dropout (torch
encoder.layer.0.attention.output.dropout)"), sending a porter to the wrong config knob. Now the
attention's rate is an event even at 0, a dropout whose input holds probabilities (a softmax's
rows) is the attention's, and of pairs costing alike those of one input shape win.
``tests/realworld/test_fourth_batch_real.py`` checks it on HF's LayoutLM against PaddleNLP's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

E, H, F = 16, 2, 64
X = np.random.default_rng(0).standard_normal((2, 5, E)).astype("float32")


class SelfAttention(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(E, E) for _ in range(3))
        self.dropout = torch.nn.Dropout(p)

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, H, E // H).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / (E // H) ** 0.5, -1)
        return (self.dropout(probs) @ v).transpose(1, 2).reshape(b, n, E)


class BertLayer(torch.nn.Module):
    """Defined in the order of Paddle's layer's tensors, so the weights pair by order."""

    def __init__(self, p_attn: float, p_hidden: float) -> None:
        super().__init__()
        self.attention = SelfAttention(p_attn)
        self.attention_out = torch.nn.Linear(E, E)
        self.intermediate = torch.nn.Linear(E, F)
        self.output = torch.nn.Linear(F, E)
        self.norm1, self.norm2 = torch.nn.LayerNorm(E), torch.nn.LayerNorm(E)
        self.attention_dropout = torch.nn.Dropout(p_hidden)
        self.output_dropout = torch.nn.Dropout(p_hidden)

    def forward(self, x):
        x = self.norm1(x + self.attention_dropout(self.attention_out(self.attention(x))))
        return self.norm2(x + self.output_dropout(self.output(torch.relu(self.intermediate(x)))))


class Encoder(torch.nn.Module):
    def __init__(self, p_attn: float = 0.1, p_hidden: float = 0.1) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([BertLayer(p_attn, p_hidden) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _port(p_attn: float, p_hidden: float):
    paddle.seed(0)
    pm = paddle.nn.TransformerEncoder(paddle.nn.TransformerEncoderLayer(
        E, H, F, dropout=p_hidden, activation="relu", attn_dropout=p_attn, act_dropout=0.0), 2)
    pm.eval()
    return pm


def _differ(p_attn: float, p_hidden: float) -> list[str]:
    torch.manual_seed(0)
    tm = Encoder().eval()
    pm = _port(p_attn, p_hidden)
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True)
    assert r.options["settings"]["differ"] or r.passed  # the values themselves agree
    assert not [k.key for k in r.failed if not k.key.startswith("settings/")], r.summary_line()
    return r.options["settings"]["differ"]


def test_the_faithful_port_s_dropouts_all_pair():
    assert _differ(0.1, 0.1) == []


def test_an_attention_rate_of_0_is_named_against_the_reference_s_attention_dropout():
    differ = _differ(0.0, 0.1)
    assert differ == [
        f"layers.{i}.self_attn:dropout (torch layers.{i}.attention.dropout): "
        "p 0.1 in torch, 0 in Paddle" for i in (0, 1)], differ


def test_residual_rates_of_0_are_named_against_the_reference_s_residual_dropouts():
    differ = _differ(0.1, 0.0)
    assert differ == [
        f"layers.{i}.{port} (torch layers.{i}.{ref}): p 0.1 in torch, 0 in Paddle"
        for i in (0, 1)
        for port, ref in (("dropout1", "attention_dropout"), ("dropout2", "output_dropout"))
    ], differ
