"""``reprod.capture.pair_inputs`` on models: a torch block calling its attention with a keyword
(``self.attn(hidden_states=...)``, as Hugging Face does) against a Paddle port calling it
positionally (as PaddleNLP does). A bug in the attention's own code, forward or backward only, is
named at the attention, by name, on captures paired by order, and in ``align_train``; unpaired,
the block around it was named. The captures are built by hand in test_pair_inputs.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from reprod.capture import first_divergence, match_by_order, pair_inputs
from reprod.diff.engine import compare

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

RNG = np.random.default_rng(0)

E = 8


class _TAttn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(E, E) for _ in range(4))

    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        q, k, v = self.q(hidden_states), self.k(hidden_states), self.v(hidden_states)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E) * scale, dim=-1)
        return self.o(w @ v)


class _TBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(E)
        self.attn = _TAttn()
        self.mlp = torch.nn.Linear(E, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(hidden_states=self.norm(x))
        return x + self.mlp(x)


class _TModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_TBlock() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


class _GradScaled(paddle.autograd.PyLayer):
    """The identity forward; its backward scales the gradient by 1.5 (a hand-written backward
    gone wrong)."""

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor) -> paddle.Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, g: paddle.Tensor) -> paddle.Tensor:
        return g * 1.5


class _PAttn(paddle.nn.Layer):
    def __init__(self, bug: Any = 1.0) -> None:
        super().__init__()
        self.bug = bug
        self.q, self.k, self.v, self.o = (paddle.nn.Linear(E, E) for _ in range(4))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scale = 1.0 if self.bug == "backward" else self.bug
        w = paddle.nn.functional.softmax(
            q @ k.transpose([0, 2, 1]) / math.sqrt(E) * scale, axis=-1)
        if self.bug == "backward":
            w = _GradScaled.apply(w)
        return self.o(w @ v)


class _PBlock(paddle.nn.Layer):
    def __init__(self, bug: Any = 1.0) -> None:
        super().__init__()
        self.norm = paddle.nn.LayerNorm(E)
        self.attn = _PAttn(bug)
        self.mlp = paddle.nn.Linear(E, E)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class _PModel(paddle.nn.Layer):
    def __init__(self, bug: Any = 1.0) -> None:
        super().__init__()
        self.blocks = paddle.nn.LayerList([_PBlock(bug if i == 1 else 1.0) for i in range(2)])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _pair(bug: Any = 1.0) -> tuple[_TModel, _PModel]:
    from reprod.align import load_into_paddle

    torch.manual_seed(0)
    tm = _TModel().eval()
    with torch.no_grad():  # LayerNorm starts at ones and zeros: every tensor should count
        for name, p in tm.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    pm = _PModel(bug)
    pm.eval()
    load_into_paddle(pm, tm)
    return tm, pm


INPUTS = {"x": RNG.standard_normal((2, 6, E)).astype(np.float32)}


def test_a_bug_in_the_port_s_attention_code_is_named_at_the_attention() -> None:
    from reprod.align import align_forward

    tm, pm = _pair()
    assert align_forward(tm, pm, INPUTS, calibrate=True).passed
    tm, pm = _pair(bug=1.5)
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "blocks.1.attn", div["message"]
    assert "input aligned" in div["message"]
    assert "the input of blocks.1.attn.o already differs" in div["message"]
    assert "cause is blocks.1.attn's own forward code" in div["message"]


def test_the_captures_paired_by_order_name_the_attention_too() -> None:
    """Two captures saved from the two scripts and paired by call order (``reprod-diff
    --by-order``): the attention's input pairs by value across its keyword and its position."""
    from reprod.capture import record

    tm, pm = _pair(bug=1.5)
    with record(tm) as ref_log, torch.no_grad():
        tm(torch.from_numpy(INPUTS["x"]))
    with record(pm) as port_log, paddle.no_grad():
        pm(paddle.to_tensor(INPUTS["x"]))
    assert "blocks.0.attn.in[hidden_states]" in ref_log.data
    assert "blocks.0.attn.in" in port_log.data
    ref, port = match_by_order(dict(ref_log.data), dict(port_log.data))
    assert port["blocks.0.attn.in[hidden_states]"] is port_log.data["blocks.0.attn.in"]
    div = first_divergence(compare(ref, port, threshold=1e-4))
    assert div is not None and div.layer == "blocks.1.attn", div.message
    assert div.input_aligned


def test_backward_the_attention_s_input_gradient_pairs_with_its_input() -> None:
    """Recorded with gradients: ``grad_in[hidden_states]`` against the port's ``grad_in``."""
    from reprod.capture import record

    tm, pm = _pair()
    x = torch.from_numpy(INPUTS["x"]).requires_grad_()
    with record(tm, backward=True) as ref_log:
        tm(x).square().sum().backward()
    xp = paddle.to_tensor(INPUTS["x"], stop_gradient=False)
    with record(pm, backward=True) as port_log:
        pm(xp).square().sum().backward()
    got = pair_inputs(dict(ref_log.data), dict(port_log.data))
    for call in ("blocks.0.attn", "blocks.1.attn"):
        assert f"{call}.grad_in[hidden_states]" in got
        np.testing.assert_allclose(got[f"{call}.grad_in[hidden_states]"],
                                   ref_log.data[f"{call}.grad_in[hidden_states]"],
                                   rtol=1e-4, atol=1e-5)


def test_a_backward_only_bug_in_the_attention_s_code_is_named_at_the_attention() -> None:
    """The forward aligns and the port's attention scales the gradient through its softmax
    weights: the attention's input gradient (``grad_in[hidden_states]`` against the port's
    ``grad_in``, paired with its input) differs while the gradient reaching its output aligns,
    so the attention is named in the backward pass."""
    from reprod.align import align_train

    tm, pm = _pair(bug="backward")
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(INPUTS, None)], steps=1, calibrate=True,
        torch_loss_fn=lambda out, *_: out.square().mean(),
        paddle_loss_fn=lambda out, *_: out.square().mean(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=1e-2),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=1e-2, parameters=pm.parameters()))
    assert not r.passed
    div = r.options["divergence"]
    assert (div["layer"], div["direction"], div["step"]) == ("blocks.1.attn", "backward", 0), \
        div["message"]


