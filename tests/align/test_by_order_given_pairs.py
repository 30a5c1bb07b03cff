"""Pairs a porter gives (``ConversionRules(pairs=...)``) are kept when the rest pair by order:
HF's ConvBERT defines its attention's output Linear after its convolutions, PaddleNLP's before
them, and HF's LUKE lists its norms otherwise. ``pair_weights_by_order`` and ``align_forward(...,
by_order=True, rules=...)`` read only the rules' skips: the given pairs were dropped, the layers
paired by position (silently, where the shapes agree), and a bug named at the wrong layer."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import (  # noqa: E402
    ConversionRules,
    align_forward,
    load_into_paddle,
    pair_weights_by_order,
)

D = 8


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.out = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


class PaddleNet(paddle.nn.Layer):
    """The port defines its output layer first: by position each pairs with the other's."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_out = paddle.nn.Linear(D, D)
        self.proj_in = paddle.nn.Linear(D, D)

    def forward(self, x):
        return self.proj_out(paddle.tanh(self.proj_in(x)))


RULES = ConversionRules(pairs={"inp.weight": "proj_in.weight", "inp.bias": "proj_in.bias"})


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)


def _models() -> tuple[TorchNet, PaddleNet]:
    torch.manual_seed(0)
    paddle.seed(0)
    return TorchNet().eval(), PaddleNet()


def test_by_position_alone_the_two_cross_silently() -> None:
    tm, pm = _models()
    assert pair_weights_by_order(tm, pm)["inp.weight"] == "proj_out.weight"


def test_the_given_pairs_are_kept_and_the_rest_pair_by_order() -> None:
    tm, pm = _models()
    assert pair_weights_by_order(tm, pm, rules=RULES) == {
        "inp.weight": "proj_in.weight", "inp.bias": "proj_in.bias",
        "out.weight": "proj_out.weight", "out.bias": "proj_out.bias"}
    load_into_paddle(pm, tm, by_order=True, rules=RULES)
    with torch.no_grad():
        want = tm(torch.from_numpy(_x())).numpy()
    np.testing.assert_allclose(pm(paddle.to_tensor(_x())).numpy(), want, rtol=1e-5, atol=1e-6)


def test_align_forward_by_order_with_the_rules_names_the_bug_where_it_is() -> None:
    tm, pm = _models()
    load_into_paddle(pm, tm, by_order=True, rules=RULES)
    assert align_forward(tm, pm, _x(), by_order=True, rules=RULES).passed
    with paddle.no_grad():
        pm.proj_in.weight.set_value(pm.proj_in.weight * 1.05)
    r = align_forward(tm, pm, _x(), by_order=True, rules=RULES, check_settings=False)
    div = r.options["divergence"]
    assert div["layer"] == "inp" and div["port_layer"] == "proj_in", div["message"]
    assert "input aligned" in div["message"]


def test_a_given_pair_of_other_shapes_is_a_problem_named_with_both_keys() -> None:
    from reprod import KeyMismatchError

    tm, pm = _models()
    wrong = ConversionRules(pairs={"inp.weight": "proj_in.bias"})
    with pytest.raises(KeyMismatchError, match=r"inp\.weight \[8, 8\] vs proj_in\.bias \[8\]"):
        pair_weights_by_order(tm, pm, rules=wrong)
