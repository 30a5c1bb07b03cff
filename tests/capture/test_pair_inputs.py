"""Inputs one side passes by keyword and the other by position (``reprod.capture.pair_inputs``):
Hugging Face calls ``self_attn(hidden_states=...)``, PaddleNLP ``self_attn(x, ...)``, so the
call's input is ``in[hidden_states]`` on one side and ``in[0]`` on the other. Paired by their
values, the layer's input is shown to align and a divergence in its own code is named at it, not
at the block around it.

The unit tests build captures by hand; the model tests run a torch block whose attention is
called with a keyword against a Paddle port calling it positionally, by name and by order, and
tests/realworld/test_split_ports_real.py runs Hugging Face's Phi-3 against PaddleNLP's LLaMA.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from reprod.capture import first_divergence, match_by_order, pair_inputs
from reprod.diff.engine import compare

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 5, 8)).astype(np.float32)
COS = RNG.standard_normal((2, 5, 4)).astype(np.float32)


def test_a_keyword_input_pairs_with_the_positional_one_holding_its_values() -> None:
    ref = {"attn.in[hidden_states]": X, "attn.in[cos]": COS, "attn.out": X}
    port = {"attn.in[0]": X + 1e-6, "attn.in[1]": COS, "attn.out": X}
    got = pair_inputs(ref, port)
    assert list(got) == ["attn.in[hidden_states]", "attn.in[cos]", "attn.out"]
    assert got["attn.in[hidden_states]"] is port["attn.in[0]"]
    assert got["attn.in[cos]"] is port["attn.in[1]"]


def test_inputs_that_differ_or_are_not_floats_stay_unpaired() -> None:
    """An input already differing, an additive mask in another convention of the same shape,
    integer position ids: none is set against a tensor it may not be."""
    mask = np.zeros((2, 1, 5, 5), np.float32)
    mask[..., 3:] = np.finfo(np.float32).min
    ids = np.arange(10).reshape(2, 5)
    ref = {"attn.in[hidden_states]": X, "attn.in[mask]": mask, "attn.in[ids]": ids}
    port = {"attn.in[0]": X * 1.1, "attn.in[1]": (mask != 0).astype(np.float32),
            "attn.in[2]": ids}
    assert pair_inputs(ref, port) == port


def test_keys_that_pair_already_and_other_calls_are_left_alone() -> None:
    ref = {"a.in": X, "b.in[x]": X, "b.out": X}
    port = {"a.in": X, "c.in[0]": X, "b.out": X}  # c: a call the reference does not make
    assert list(pair_inputs(ref, port)) == list(port)


def test_one_tensor_under_several_keywords_pairs_in_order() -> None:
    other = X[::-1].copy()
    ref = {"attn.in[query]": X, "attn.in[key]": X, "attn.in[value]": other}
    port = {"attn.in[0]": X, "attn.in[1]": X, "attn.in[2]": other}
    got = pair_inputs(ref, port)
    assert list(got) == ["attn.in[query]", "attn.in[key]", "attn.in[value]"]


def test_an_input_s_gradient_follows_its_input_even_where_it_differs() -> None:
    g = RNG.standard_normal(X.shape).astype(np.float32)
    ref = {"attn.in[hidden_states]": X, "attn.grad_in[hidden_states]": g,
           "attn#2.in[hidden_states]": X}
    port = {"attn.in[0]": X, "attn.grad_in[0]": g * 3, "attn#2.in[0]": X}
    got = pair_inputs(ref, port)
    assert set(got) == set(ref)
    assert got["attn.grad_in[hidden_states]"] is port["attn.grad_in[0]"]


def test_the_divergence_is_named_at_the_layer_whose_input_now_aligns() -> None:
    out = X + 1.0
    ref = {"block.in": X, "block.attn.in[hidden_states]": X, "block.attn.o.in": X,
           "block.attn.o.out": out, "block.attn.out": out, "block.out": out}
    port = {"block.in": X, "block.attn.in[0]": X, "block.attn.o.in": X * 2,
            "block.attn.o.out": out * 2, "block.attn.out": out * 2, "block.out": out * 2}
    before = first_divergence(compare(ref, port, threshold=1e-5))
    assert before is not None and before.layer == "block"
    div = first_divergence(compare(ref, pair_inputs(ref, port), threshold=1e-5))
    assert div is not None and div.layer == "block.attn"
    assert "cause is block.attn's own forward code" in div.message


# --- a torch block calling its attention by keyword, a Paddle port calling it positionally ----

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

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


# --- an input handed in another shape on each side: a form, not a value ------------------------

def test_a_mask_in_another_shape_beside_an_aligned_input_is_not_held_against_the_layer() -> None:
    """GPT-J's attention gets HF's causal mask [B, 1, L, L + 1] and PaddleNLP's padding mask
    [B, 1, 1, L]: compared, the shapes differ, and its input was said to differ, the
    divergence inside it put at the gap before out_proj."""
    out = X + 1.0
    ref = {"attn.in[hidden_states]": X, "attn.in[attention_mask]": np.zeros((2, 1, 5, 6)),
           "attn.o.in": X, "attn.o.out": out, "attn.out": out}
    port = {"attn.in[hidden_states]": X, "attn.in[attention_mask]": np.zeros((2, 1, 1, 5)),
            "attn.o.in": X * 2, "attn.o.out": out * 2, "attn.out": out * 2}
    div = first_divergence(compare(ref, port, threshold=1e-5))
    assert div is not None and div.layer == "attn" and div.input_aligned, div
    assert [r.key for r in div.unlike] == ["attn.in[attention_mask]"]
    assert "not judged: its input[attention_mask] ([2, 1, 5, 6] in the reference, " \
           "[2, 1, 1, 5] in the port)" in div.message


def test_a_lone_input_of_another_shape_or_other_rows_still_differs() -> None:
    """The call's only input of another shape is what differs; a Mixtral expert handed other
    rows (a router choosing otherwise) differs beside any other input."""
    lone_ref = {"a.in": X, "a.out": X}
    lone_port = {"a.in": X[:, :, :4], "a.out": X * 2}
    div = first_divergence(compare(lone_ref, lone_port, threshold=1e-5))
    assert div is not None and div.input_aligned is False and not div.unlike
    rows_ref = {"e.in[0]": X[0], "e.in[1]": X[1], "e.out": X}
    rows_port = {"e.in[0]": X[0, :3], "e.in[1]": X[1], "e.out": X * 2}
    div = first_divergence(compare(rows_ref, rows_port, threshold=1e-5))
    assert div is not None and div.input_aligned is False and not div.unlike
