"""align_forward's localisation where a faithful port lays its layers out otherwise: a scale applied
inside a layer on one side and after it on the other (HF's MBart embedding against PaddleNLP's),
and a sublayer handed the same values with two axes swapped (HF's Llama-family rotary embedding
gets [B, H, L, D], PaddleNLP's [B, L, H, D])."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402
from reprod.align.localise import _permuted  # noqa: E402

VOCAB, LENGTH, WIDTH, CLASSES = 13, 6, 16, 5
SCALE = 4.0  # sqrt(WIDTH), as MBart scales by sqrt(d_model)


# --- a scale inside the embedding layer against one after it ------------------------------------


class _ScaledEmbedding(torch.nn.Embedding):
    """HF's MBartScaledWordEmbedding: the scale is part of the layer's output."""

    def __init__(self, num: int, dim: int, scale: float) -> None:
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.scale


class _TorchEmbedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = _ScaledEmbedding(VOCAB, WIDTH, SCALE)
        self.pos = torch.nn.Embedding(LENGTH, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.fc1 = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = torch.nn.Linear(2 * WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids) + self.pos(torch.arange(ids.shape[1])))
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


class _PaddleEmbedNet(paddle.nn.Layer):
    """PaddleNLP's MBart: a plain embedding, scaled by the model after it."""

    def __init__(self, scale: float = SCALE) -> None:
        super().__init__()
        self.scale = scale
        self.embed = paddle.nn.Embedding(VOCAB, WIDTH)
        self.pos = paddle.nn.Embedding(LENGTH, WIDTH)
        self.norm = paddle.nn.LayerNorm(WIDTH)
        self.fc1 = paddle.nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = paddle.nn.Linear(2 * WIDTH, WIDTH)
        self.head = paddle.nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        h = self.norm(self.embed(ids) * self.scale + self.pos(paddle.arange(ids.shape[1])))
        return self.head(h + self.fc2(paddle.nn.functional.relu(self.fc1(h))))


def _embed_twins(scale: float = SCALE) -> tuple[_TorchEmbedNet, _PaddleEmbedNet]:
    torch.manual_seed(0)
    tm, pm = _TorchEmbedNet().eval(), _PaddleEmbedNet(scale)
    load_into_paddle(pm, tm)
    return tm, pm


def _ids() -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, size=(3, LENGTH)).astype(np.int64)


def _scaled(layer: paddle.nn.Layer, name: str, factor: float) -> None:
    p = getattr(layer, name)
    p.set_value(p.numpy() * factor)


@pytest.mark.parametrize("by_order", [True, False])
def test_a_scale_moved_out_of_the_embedding_is_not_blamed_for_a_later_bug(by_order: bool) -> None:
    tm, pm = _embed_twins()
    assert align_forward(tm, pm, {"ids": _ids()}, by_order=by_order).passed
    _scaled(pm.fc2, "weight", 1.05)
    r = align_forward(tm, pm, {"ids": _ids()}, by_order=by_order)
    div = r.options["divergence"]
    assert not r.passed and div["layer"] == "fc2"
    assert div["message"].startswith("diverges at fc2 (Linear): input aligned")
    # the embedding's outputs do differ, by the scale alone, and the message says it was passed
    assert "passed over before it: embed (_ScaledEmbedding vs Embedding): output off by a " \
           f"constant factor {SCALE}" in div["message"]


def test_a_bug_in_the_embedding_weights_is_still_named_at_the_embedding() -> None:
    tm, pm = _embed_twins()
    w = pm.embed.weight.numpy()
    # one token's row, moved unevenly (LayerNorm would take back a shift of the whole row)
    w[_ids()[0, 0]] += np.linspace(-0.5, 0.5, WIDTH, dtype=np.float32)
    pm.embed.weight.set_value(w)
    r = align_forward(tm, pm, {"ids": _ids()}, by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "embed"
    assert div["message"].startswith("diverges at embed (_ScaledEmbedding vs Embedding): input "
                                     "aligned")
    assert "constant factor" not in div["message"] and "passed over" not in div["message"]
    # all of it twice too large: a constant factor like the scale moved, but no other layer
    # explains the sum after it that differs
    tm, pm = _embed_twins()
    _scaled(pm.embed, "weight", 2.0)
    div = align_forward(tm, pm, {"ids": _ids()}, by_order=True).options["divergence"]
    assert div["layer"] == "embed"
    assert "outputs differ by a constant factor 2.0" in div["message"]


def test_a_bug_beside_the_scaled_embedding_is_named_where_it_is() -> None:
    # the sum reading the embedding differs now, through the position table called after it:
    # the embedding, given the reference's output, would not mend that sum; the table would
    tm, pm = _embed_twins()
    w = pm.pos.weight.numpy()
    w[2] += np.linspace(-0.5, 0.5, WIDTH, dtype=np.float32)
    pm.pos.weight.set_value(w)
    r = align_forward(tm, pm, {"ids": _ids()}, by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "pos"
    assert div["message"].startswith("diverges at pos (Embedding): input aligned")
    assert "passed over before it: embed" in div["message"]


def test_a_port_that_drops_the_scale_is_named_at_the_embedding_with_the_factor() -> None:
    # the layer outputs differ as in the faithful port, but now the sum reading them does too
    tm, pm = _embed_twins(scale=1.0)
    r = align_forward(tm, pm, {"ids": _ids()}, by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "embed"
    assert f"outputs differ by a constant factor {SCALE} (the reference's output is {SCALE} " \
           "times the port's" in div["message"]


# --- a sublayer handed [B, H, L, D] in torch, [B, L, H, D] in Paddle ----------------------------

HEADS, HEAD_DIM = 2, 8
EMBED = HEADS * HEAD_DIM


def _rotate_half(x: Any, concat: Callable[[list[Any], int], Any]) -> Any:
    half = x.shape[-1] // 2
    return concat([-x[..., half:], x[..., :half]], -1)


def _angles(length: int, base: float) -> np.ndarray:
    inv = 1.0 / base ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    freqs = np.outer(np.arange(length), inv)
    return np.concatenate([freqs, freqs], -1).astype(np.float32)  # [L, D]


class _TorchRotary(torch.nn.Module):
    """Rotates [B, H, L, D] by position, as HF's Llama-family attention lays it out."""

    def __init__(self, base: float = 1e4) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.from_numpy(_angles(x.shape[2], self.base))
        return x * a.cos() + _rotate_half(x, torch.cat) * a.sin()


class _PaddleRotary(paddle.nn.Layer):
    """The same rotation of [B, L, H, D], as PaddleNLP's lays it out."""

    def __init__(self, base: float = 1e4) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = paddle.to_tensor(_angles(x.shape[1], self.base))[:, None, :]  # [L, 1, D]
        return x * a.cos() + _rotate_half(x, paddle.concat) * a.sin()


class _TorchAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(EMBED, EMBED)
        self.k_proj = torch.nn.Linear(EMBED, EMBED)
        self.v_proj = torch.nn.Linear(EMBED, EMBED)
        self.rotary = _TorchRotary()
        self.o_proj = torch.nn.Linear(EMBED, EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, HEADS, HEAD_DIM).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        q, k = self.rotary(q), self.rotary(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), -1) @ v
        return self.o_proj(att.transpose(1, 2).reshape(b, n, EMBED))


class _PaddleAttention(paddle.nn.Layer):
    def __init__(self, q_scale: float = 1.0) -> None:
        super().__init__()
        self.q_scale = q_scale
        self.q_proj = paddle.nn.Linear(EMBED, EMBED)
        self.k_proj = paddle.nn.Linear(EMBED, EMBED)
        self.v_proj = paddle.nn.Linear(EMBED, EMBED)
        self.rotary = _PaddleRotary()
        self.o_proj = paddle.nn.Linear(EMBED, EMBED)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        b, n, _ = x.shape

        def heads(t: paddle.Tensor) -> paddle.Tensor:
            return t.reshape([b, n, HEADS, HEAD_DIM])

        q = heads(self.q_proj(x) * self.q_scale)
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        q, k = self.rotary(q), self.rotary(k)
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))
        att = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / math.sqrt(HEAD_DIM),
                                           -1) @ v
        return self.o_proj(att.transpose([0, 2, 1, 3]).reshape([b, n, EMBED]))


class _TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _TorchAttention()
        self.norm = torch.nn.LayerNorm(EMBED)
        self.head = torch.nn.Linear(EMBED, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x + self.attn(x)))


class _PaddleBlock(paddle.nn.Layer):
    def __init__(self, q_scale: float = 1.0) -> None:
        super().__init__()
        self.attn = _PaddleAttention(q_scale)
        self.norm = paddle.nn.LayerNorm(EMBED)
        self.head = paddle.nn.Linear(EMBED, CLASSES)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.norm(x + self.attn(x)))


def _attention_twins(q_scale: float = 1.0) -> tuple[_TorchBlock, _PaddleBlock]:
    torch.manual_seed(0)
    tm, pm = _TorchBlock().eval(), _PaddleBlock(q_scale)
    with torch.no_grad():  # sharper attention, so that a difference in q shows in the outputs
        tm.attn.q_proj.weight.mul_(4.0)
    load_into_paddle(pm, tm)
    return tm, pm


def _hidden(batch: int) -> np.ndarray:
    # batch == HEADS: [B, H, L, D] and [B, L, H, D] fit two permutations, one of them wrong
    return np.random.default_rng(2).standard_normal((batch, LENGTH, EMBED)).astype(np.float32)


@pytest.mark.parametrize("batch", [HEADS, 3])
@pytest.mark.parametrize("by_order", [True, False])
def test_a_bug_inside_a_sublayer_laid_out_otherwise_is_named_at_it(batch: int,
                                                                   by_order: bool) -> None:
    tm, pm = _attention_twins()
    assert align_forward(tm, pm, _hidden(batch), by_order=by_order).passed
    pm.attn.rotary.base = 500.0
    r = align_forward(tm, pm, _hidden(batch), by_order=by_order)
    div = r.options["divergence"]
    assert not r.passed and div["layer"] == "attn.rotary"
    assert div["message"].startswith("diverges at attn.rotary (_TorchRotary vs _PaddleRotary): "
                                     "input aligned")
    assert "does not match" not in div["message"]


@pytest.mark.parametrize("batch", [HEADS, 3])
def test_a_bug_before_a_sublayer_laid_out_otherwise_is_placed_before_it(batch: int) -> None:
    tm, pm = _attention_twins(q_scale=1.1)  # between q_proj, which aligns, and the rotary
    r = align_forward(tm, pm, _hidden(batch), by_order=True)
    message = r.options["divergence"]["message"]
    assert not r.passed
    assert "input of attn.rotary already differs" in message or \
        message.startswith("diverges before attn.rotary")
    # the values differ, not the layout: the input's difference is a number, not its shape
    assert "does not match" not in message


def test_a_permutation_is_taken_only_where_the_values_then_agree() -> None:
    import reprod

    crit = reprod.Criteria(methods="max", threshold=1e-6)
    ref = np.random.default_rng(0).standard_normal((2, 2, 5, 8)).astype(np.float32)
    port = np.ascontiguousarray(ref.transpose(0, 2, 1, 3))  # [B, L, H, D] with B == H
    moved = _permuted({"x.in": ref}, {"x.in": port}, crit, None)["x.in"]
    assert np.array_equal(moved, ref)
    # a value off: no permutation makes it agree, so it stays as it was, to fail on its shape
    off = port.copy()
    off[0, 0, 0, 0] += 1.0
    assert _permuted({"x.in": ref}, {"x.in": off}, crit, None)["x.in"] is off


@pytest.mark.parametrize("heads", [4, 2])  # 2: B == H, the values decide between the layouts
def test_heads_split_off_one_axis_are_judged_in_the_reference_s_layout(heads: int) -> None:
    """PaddleNLP's BigBird projects its query with a ``Linear3D`` giving [B, H, L, D], HF's
    ``Linear`` [B, L, H * D]: the capture failed on its shape and every bug after it was put
    at layer 0's query."""
    import reprod

    crit = reprod.Criteria(methods="max", threshold=1e-6)
    rng = np.random.default_rng(heads)
    ref = rng.standard_normal((2, 5, heads * 3)).astype(np.float32)  # [B, L, H * D]
    port = np.ascontiguousarray(ref.reshape(2, 5, heads, 3).transpose(0, 2, 1, 3))
    got = _permuted({"q.out": ref}, {"q.out": port}, crit, None)["q.out"]
    assert got.shape == ref.shape and np.array_equal(got, ref)
    # the other way round: the reference splits, the port does not
    back = _permuted({"q.out": port}, {"q.out": ref}, crit, None)["q.out"]
    assert back.shape == port.shape and np.array_equal(back, port)
    # a value off in every layout stays as it was; beside one that agrees, it takes that layout
    off = port.copy()
    off[0, 0, 0, 0] += 1.0
    assert _permuted({"q.out": ref}, {"q.out": off}, crit, None)["q.out"] is off
    both = _permuted({"q.out": ref, "k.out": ref}, {"q.out": off, "k.out": port}, crit, None)
    assert both["q.out"].shape == ref.shape
    assert np.count_nonzero(both["q.out"] != ref) == 1
