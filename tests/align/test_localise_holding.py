"""align_forward(by_order=True) names the block whose own code differs where the innermost blocks
holding the two leaves around the gap hold other leaves on each side: Hugging Face's MPNet
computes its attention in ``attention.attn`` (q, k, v, o) and adds and normalises in
``attention``, PaddleNLP's one ``attention`` holds q, k, v, o and the norm. No two blocks hold
the same leaves, and a bug between v and o was said to lie "between the two, outside the
recorded layers". The reference's innermost block is now set against the port's (inputs by
value, its output, o's, against the port's o) and named, with the port's block."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

D = 16


class TorchInner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(D, D)
        self.v = torch.nn.Linear(D, D)
        self.o = torch.nn.Linear(D, D)

    def forward(self, x):
        weights = torch.softmax(self.q(x) @ x.transpose(-1, -2), dim=-1)
        return self.o(weights @ self.v(x))


class TorchAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TorchInner()
        self.norm = torch.nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x + self.inner(x))


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(8, D)
        self.blocks = torch.nn.Sequential(TorchAttention(), TorchAttention())
        self.head = torch.nn.Linear(D, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class PaddleAttention(paddle.nn.Layer):
    """The port: one block holds q, v, o and the norm. ``inside`` scales what o reads (a bug in
    the attention's code), ``after`` the residual the norm reads (a bug in the block's own add)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = paddle.nn.Linear(D, D)
        self.v = paddle.nn.Linear(D, D)
        self.o = paddle.nn.Linear(D, D)
        self.norm = paddle.nn.LayerNorm(D)
        self.inside = 1.0
        self.after = 1.0

    def forward(self, x):
        weights = paddle.nn.functional.softmax(self.q(x) @ x.transpose([0, 2, 1]), axis=-1)
        h = (weights @ self.v(x)) * self.inside
        return self.norm(x * self.after + self.o(h))


class PaddleNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.embed = paddle.nn.Linear(8, D)
        self.layers = paddle.nn.LayerList([PaddleAttention(), PaddleAttention()])
        self.out = paddle.nn.Linear(D, 4)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def _pair() -> tuple[TorchNet, PaddleNet]:
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchNet().eval(), PaddleNet()
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    return tm, pm


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)


def test_the_port_aligns_as_it_is():
    tm, pm = _pair()
    r = align_forward(tm, pm, _x(), by_order=True, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("calibrate", [False, True])
def test_a_bug_between_two_leaves_is_named_at_the_reference_s_innermost_block(block, calibrate):
    tm, pm = _pair()
    pm.layers[block].inside = 1.1
    r = align_forward(tm, pm, _x(), by_order=True, calibrate=calibrate)
    div = r.options["divergence"]
    assert (div["layer"], div["port_layer"]) == (f"blocks.{block}.inner", f"layers.{block}"), div
    message = div["message"]
    assert message.startswith(f"diverges at blocks.{block}.inner (TorchInner vs PaddleAttention; "
                              f"the port's layers.{block}): input aligned (max "), message
    assert message.endswith(f"; inside it, the input of blocks.{block}.inner.o already differs "
                            f"({message.split('already differs (')[1].split(')')[0]}) while its "
                            "recorded sublayers before that align, so the cause is "
                            f"blocks.{block}.inner's own forward code"), message
    # its output is o's, set against the port's o: the figure is theirs, computed here apart
    outs = {}
    tm.blocks[block].inner.o.register_forward_hook(lambda m, i, o: outs.setdefault("t", o))
    pm.layers[block].o.register_forward_post_hook(lambda m, i, o: outs.setdefault("p", o))
    with torch.no_grad():
        tm(torch.from_numpy(_x()))
    pm(paddle.to_tensor(_x()))
    gap = float(np.max(np.abs(outs["t"].numpy().astype(np.float64) - outs["p"].numpy())))
    assert f"output max diff {gap:.3e}" in message, (gap, message)


def test_before_it_the_gap_was_left_between_the_leaves(monkeypatch):
    from reprod.align import localise

    monkeypatch.setattr(localise, "_block_holding", lambda *args: None)
    tm, pm = _pair()
    pm.layers[1].inside = 1.1
    div = align_forward(tm, pm, _x(), by_order=True).options["divergence"]
    assert div["layer"] == "blocks.1.inner.o" and "outside the recorded layers" in div["message"]


def test_a_bug_in_the_block_that_holds_the_same_leaves_is_still_named_there():
    # after o: the innermost blocks holding o and the norm (blocks.1, layers.1) hold the same
    # leaves, and pair as before
    tm, pm = _pair()
    pm.layers[1].after = 1.1
    div = align_forward(tm, pm, _x(), by_order=True).options["divergence"]
    assert (div["layer"], div["port_layer"]) == ("blocks.1", "layers.1"), div
    assert "the input of blocks.1.norm already differs" in div["message"], div["message"]


def test_a_bug_in_a_leaf_is_still_named_at_the_leaf():
    tm, pm = _pair()
    with paddle.no_grad():
        w = pm.layers[1].o.weight
        w.set_value(w * 1.05)
    div = align_forward(tm, pm, _x(), by_order=True).options["divergence"]
    assert div["layer"] == "blocks.1.inner.o" and "input aligned" in div["message"], div


class TorchOutput(torch.nn.Module):
    """HF's BERT-style output block: its dense layer, then the residual handed in, normed."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(2 * D, D)
        self.norm = torch.nn.LayerNorm(D)

    def forward(self, hidden, residual):
        return self.norm(self.dense(hidden) + residual)


class TorchFeedForward(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(D, D)
        self.up = torch.nn.Linear(D, 2 * D)
        self.output = TorchOutput()

    def forward(self, x):
        y = self.pre(x)  # the residual is computed inside the block, as an attention's output
        return self.output(torch.relu(self.up(y)), y)


class PaddleFeedForward(paddle.nn.Layer):
    """The port: one layer holds it all, the residual added in its own code."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = paddle.nn.Linear(D, D)
        self.linear1 = paddle.nn.Linear(D, 2 * D)
        self.linear2 = paddle.nn.Linear(2 * D, D)
        self.norm = paddle.nn.LayerNorm(D)
        self.residual = True

    def forward(self, x):
        y = self.pre(x)
        h = self.linear2(paddle.nn.functional.relu(self.linear1(y)))
        return self.norm(h + y if self.residual else h)


def _feed_forward_pair() -> tuple[Any, Any]:
    torch.manual_seed(0)
    paddle.seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(8, D), TorchFeedForward()).eval()
    pm = paddle.nn.Sequential(paddle.nn.Linear(8, D), PaddleFeedForward())
    with torch.no_grad():
        tm[1].output.norm.weight.uniform_(0.5, 1.5)
        tm[1].output.norm.bias.uniform_(-0.5, 0.5)
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    return tm, pm


def test_a_block_whose_inputs_the_port_computes_inside_its_own_is_named() -> None:
    """The reference block's inputs (the feed-forward's hidden state, the residual) are values
    the port computes inside its one block: they are looked for there, and a dropped residual
    is named at the reference's output block, not "outside the recorded layers"."""
    tm, pm = _feed_forward_pair()
    assert align_forward(tm, pm, _x(), by_order=True).passed
    pm[1].residual = False
    div = align_forward(tm, pm, _x(), by_order=True).options["divergence"]
    assert (div["layer"], div["port_layer"]) == ("1.output", "1"), div["message"]
    assert "input aligned" in div["message"] and "own forward code" in div["message"], \
        div["message"]
