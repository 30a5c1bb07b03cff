"""Constants a model computes with that one side keeps in its state dict and the other not:
PaddleNLP's GPT-J registers its causal mask (``bias``, float) and ``masked_bias`` (a float
scalar) as persistable buffers, Hugging Face's holds neither; a reference may save a constant
its port computes. Neither is a weight: loading, pairing by order and the structure check leave
each model its own. Before, the faithful GPT-J port was refused by name ("missing 4 keys") and
by order (every position after the first mask shifted), and ``compare_settings(by_order=True)``
raised the same error. tests/realworld/test_more_transformers_real.py runs the real pair."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from reprod.align import (  # noqa: E402
    align_forward,
    compare_settings,
    compare_structure,
    load_into_paddle,
    pair_weights_by_order,
)

E, L = 8, 5
X = np.random.default_rng(0).standard_normal((2, L, E)).astype(np.float32)


class TorchMasked(tnn.Module):
    """Hugging Face's way: the causal mask built in the forward pass, nothing registered."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = tnn.LayerNorm(E)
        self.q, self.k = tnn.Linear(E, E), tnn.Linear(E, E)
        self.out = tnn.Linear(E, E)

    def forward(self, x):
        h = self.norm(x)
        w = self.q(h) @ self.k(h).transpose(1, 2)
        causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
        w = torch.where(causal, w, torch.tensor(-1e9))
        return self.out(torch.softmax(w, -1) @ h)


class PaddleMasked(pnn.Layer):
    """PaddleNLP GPT-J's way: the mask and the fill value registered as persistable buffers,
    between the norm and the projections."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = pnn.LayerNorm(E)
        self.register_buffer("bias", paddle.tril(paddle.ones([1, 1, L, L])).astype("float32"))
        self.register_buffer("masked_bias", paddle.to_tensor(-1e9, dtype="float32"))
        self.q, self.k = pnn.Linear(E, E), pnn.Linear(E, E)
        self.out = pnn.Linear(E, E)

    def forward(self, x):
        h = self.norm(x)
        w = paddle.matmul(self.q(h), self.k(h), transpose_y=True)
        w = paddle.where(self.bias[0, 0].astype("bool"), w, self.masked_bias)
        return self.out(paddle.matmul(PF.softmax(w, -1), h))


PF = paddle.nn.functional


def _pair():
    torch.manual_seed(0)
    paddle.seed(0)
    tm = TorchMasked().eval()
    with torch.no_grad():
        tm.norm.weight.add_(torch.randn(E) * 0.1)
        tm.norm.bias.add_(torch.randn(E) * 0.1)
    pm = PaddleMasked()
    pm.eval()
    return tm, pm


def _outputs(tm, pm):
    with torch.no_grad():
        t = tm(torch.from_numpy(X)).numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(X)).numpy()
    return t, p


@pytest.mark.parametrize("by_order", [True, False])
def test_the_port_s_buffers_are_its_own_and_the_weights_load(by_order) -> None:
    tm, pm = _pair()
    mask = pm.bias.numpy().copy()
    load_into_paddle(pm, tm, by_order=by_order)
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pm.bias.numpy(), mask)
    assert float(pm.masked_bias) == -1e9
    if by_order:  # the buffers sit between the norm and q: pairing skips them
        assert pair_weights_by_order(tm, pm)["q.weight"] == "q.weight"


@pytest.mark.parametrize("by_order", [True, False])
def test_the_structure_shows_them_as_the_port_s_own(by_order) -> None:
    tm, pm = _pair()
    report = compare_structure(tm, pm, by_order=by_order)
    assert report.ok, report.to_table()
    own = {r.paddle_name: r.note for r in report.rows_with("own")}
    assert set(own) == {"bias", "masked_bias"}
    assert own["bias"] == "own: the port's constant (a buffer), kept on load"
    assert report.torch_total == report.paddle_total == sum(p.numel() for p in tm.parameters())


def test_the_settings_check_by_order_no_longer_raises_and_finds_a_wrong_epsilon() -> None:
    tm, pm = _pair()
    load_into_paddle(pm, tm, by_order=True)
    assert compare_settings(tm, pm, by_order=True).passed
    pm.norm._epsilon = 1e-3
    report = compare_settings(tm, pm, by_order=True)
    assert [(d.paddle_layer, d.setting) for d in report.differ] == [("norm", "epsilon")]
    r = align_forward(tm, pm, {"x": X}, by_order=True)
    assert "settings/norm/epsilon" in {k.key for k in r.failed}


class TorchSaving(tnn.Module):
    """A reference that saves a constant (a persistent float buffer) its port computes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = tnn.Linear(E, E)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        return self.fc(x) * self.scale


class PaddleComputing(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = pnn.Linear(E, E)

    def forward(self, x):
        return self.fc(x) * 0.5


class PaddleSaving(PaddleComputing):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("scale", paddle.to_tensor(scale, dtype="float32"))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("by_order", [True, False])
def test_a_constant_the_reference_saves_and_the_port_computes_is_not_missing(by_order) -> None:
    torch.manual_seed(0)
    tm, pm = TorchSaving().eval(), PaddleComputing()
    load_into_paddle(pm, tm, by_order=by_order)
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-6, atol=1e-6)
    report = compare_structure(tm, pm, by_order=by_order)
    assert report.ok, report.to_table()
    assert [(r.torch_name, r.note) for r in report.rows_with("own")] == [
        ("scale", "own: the reference's constant, not in the port")]


def test_a_constant_both_sides_hold_still_loads() -> None:
    # held by both (same count), it pairs as before: the port gets the reference's value
    torch.manual_seed(0)
    tm, pm = TorchSaving().eval(), PaddleSaving(scale=1.0)
    load_into_paddle(pm, tm, by_order=True)
    assert float(pm.scale) == 0.5
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-6, atol=1e-6)
