"""The head count of an attention written by hand (timm's and PaddleClas's ``Attention``,
Hugging Face's ``BertSelfAttention``) is a setting, as torch's ``MultiheadAttention``'s is: 4
heads for 2 load the same weights and compute another function, and only the values said so
("the cause is attn's own forward code"). Each library names it its way (``num_heads``,
``num_attention_heads``, ``n_head``...). The attention's sublayers keep their own settings (its
dropout), where a built-in attention's projections have none apart from it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, compare_settings, load_into_paddle  # noqa: E402

X = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)


class Attention(torch.nn.Module):
    """timm's ViT attention, trimmed."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.attn_drop = torch.nn.Dropout(0.1)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        a = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(-1))
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class PaddleAttention(paddle.nn.Layer):
    """PaddleClas's ViT attention, trimmed."""

    def __init__(self, dim, num_heads, drop=0.1):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = paddle.nn.Linear(dim, dim * 3)
        self.attn_drop = paddle.nn.Dropout(drop)
        self.proj = paddle.nn.Linear(dim, dim)

    def forward(self, x):
        n, c = x.shape[1:]
        qkv = self.qkv(x).reshape((-1, n, 3, self.num_heads, c // self.num_heads))
        q, k, v = qkv.transpose((2, 0, 3, 1, 4)).unbind(0)
        a = paddle.nn.functional.softmax(q.matmul(k.transpose((0, 1, 3, 2))) * self.scale, -1)
        return self.proj(self.attn_drop(a).matmul(v).transpose((0, 2, 1, 3)).reshape((-1, n, c)))


class _T(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.head = Attention(16, 4), torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x))


class _P(paddle.nn.Layer):
    def __init__(self, heads=4, drop=0.1):
        super().__init__()
        self.attn, self.head = PaddleAttention(16, heads, drop), paddle.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x))


def _pair(heads=4, drop=0.1):
    torch.manual_seed(0)
    tm, pm = _T().eval(), _P(heads, drop)
    pm.eval()
    load_into_paddle(pm, tm)
    return tm, pm


def test_a_faithful_hand_written_attention_has_no_setting_apart():
    tm, pm = _pair()
    assert compare_settings(tm, pm).passed
    assert align_forward(tm, pm, X, calibrate=True).passed


def test_a_head_count_that_differs_is_the_likely_cause():
    tm, pm = _pair(heads=2)
    assert [d.line() for d in compare_settings(tm, pm).differ] == [
        "attn: num_heads 4 in torch, 2 in Paddle"]
    r = align_forward(tm, pm, X, calibrate=True)
    assert not r.passed and not r["settings/attn/num_heads"].passed
    assert r.options["divergence"]["layer"] == "attn"
    assert r.options["findings"][-1].endswith(
        "attn: num_heads 4 in torch, 2 in Paddle; attn is the layer where the values first "
        "differ: the likely cause"), r.options["findings"]


def test_the_attention_s_own_dropout_is_still_compared():
    tm, pm = _pair(drop=0.0)
    assert [d.line() for d in compare_settings(tm, pm).differ] == [
        "attn.attn_drop: p 0.1 in torch, 0 in Paddle"]


def test_hugging_face_s_spelling_against_paddle_s_built_in_attention():
    """``num_attention_heads`` on one side, Paddle's ``MultiHeadAttention.num_heads`` on the
    other (PaddleNLP's BERT): the two attentions pair by order and their head counts compare."""

    class BertSelfAttention(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.num_attention_heads = heads
            self.attention_head_size = 16 // heads
            self.query = torch.nn.Linear(16, 16)
            self.key = torch.nn.Linear(16, 16)
            self.value = torch.nn.Linear(16, 16)

    class Layer(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.attention = BertSelfAttention(heads)
            self.dense = torch.nn.Linear(16, 16)

    class PaddleLayer(paddle.nn.Layer):
        def __init__(self, heads):
            super().__init__()
            self.attention = paddle.nn.MultiHeadAttention(16, heads)

    assert compare_settings(Layer(4), PaddleLayer(4)).passed
    assert [d.line() for d in compare_settings(Layer(4), PaddleLayer(8)).differ] == [
        "attention: num_heads 4 in torch, 8 in Paddle"]

    # a stack of them: each pairs with its own (the second differs)
    class Stack(torch.nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer(h) for h in heads)

    class PaddleStack(paddle.nn.Layer):
        def __init__(self, heads):
            super().__init__()
            self.layers = paddle.nn.LayerList([PaddleLayer(h) for h in heads])

    assert [d.line() for d in compare_settings(Stack([4, 4, 4]), PaddleStack([4, 2, 4])).differ] == [
        "layers.1.attention: num_heads 4 in torch, 2 in Paddle"]


def test_a_dropout_the_attention_applies_as_a_function_still_pairs_by_call():
    """timm's fused attention applies its dropout inside ``scaled_dot_product_attention``
    (``dropout_p``), PaddleClas's calls its ``attn_drop`` layer. Read as a layer of its own
    kind, a hand-written attention must not swallow the calls it makes: the two dropouts pair
    by call, where "attn.attn_drop (Paddle only): p no dropout in torch, 0.1 in Paddle" failed
    a faithful port."""

    class FusedAttention(Attention):  # timm's fused path
        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(
                2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            return self.proj(y.transpose(1, 2).reshape(b, n, c))

    tm, pm = _pair()
    tm.attn.__class__ = FusedAttention
    r = align_forward(tm, pm, X, calibrate=True)
    assert r.passed, r.options.get("findings")
