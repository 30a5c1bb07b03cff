"""Pairing weights by the order layers run (``reprod.align.call_order``).

A port defining two sibling layers of one shape in another order than the reference (a
hand-written port's ``self.c`` before ``self.b``; InceptionV4's branches) pairs them crossed by
definition order, without a word: the port is loaded with the wrong weights, and its run failed
"before head ... outside the recorded layers", blaming code that is right. Now:

- ``inputs=`` pairs by call order (``pair_weights_by_order``, ``by_order_rules``,
  ``load_into_paddle``), and ``align_forward`` anchors the captures on the pairing the port's
  weights hold, so the port loaded so passes, and a bug elsewhere is named at its layer;
- loaded by definition order, the failing run says the pairing is the cause where loading by
  call order makes every other layer align, and the port's weights are given back.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import (  # noqa: E402
    align_forward,
    by_order_rules,
    load_into_paddle,
    pair_weights_by_order,
    torch_to_paddle,
)
from reprod.align.call_order import first_calls_of, in_call_order  # noqa: E402
from reprod.errors import ReprodError  # noqa: E402

X = np.random.RandomState(0).randn(2, 3, 8, 8).astype("float32")
HINT = "not the port's code but the pairing of its weights by definition order"


class Ref(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([self.a(x), self.b(x), self.c(x)], 1).mean((2, 3)))


class Port(paddle.nn.Layer):
    """Defines br3 before br2; calls them as the reference calls b and c."""

    def __init__(self, scale: float = 1.0, calls_swapped: bool = False) -> None:
        super().__init__()
        self.conv0 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.br1 = paddle.nn.Conv2D(8, 8, 3, padding=1)
        self.br3 = paddle.nn.Conv2D(8, 8, 1)
        self.br2 = paddle.nn.Conv2D(8, 8, 1)
        self.fc = paddle.nn.Linear(24, 5)
        self.scale = scale

    def forward(self, x):
        x = paddle.nn.functional.relu(self.conv0(x))
        y = paddle.concat([self.br1(x), self.br2(x), self.br3(x)], 1).mean((2, 3))
        return self.fc(y * self.scale)


class SameOrderPort(paddle.nn.Layer):
    """Defines its branches as the reference does and calls the last before the second,
    concatenating in the reference's order: right by definition order, crossed by call order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.br1 = paddle.nn.Conv2D(8, 8, 3, padding=1)
        self.br2 = paddle.nn.Conv2D(8, 8, 1)
        self.br3 = paddle.nn.Conv2D(8, 8, 1)
        self.fc = paddle.nn.Linear(24, 5)

    def forward(self, x):
        x = paddle.nn.functional.relu(self.conv0(x))
        y1 = self.br1(x)
        y3 = self.br3(x)
        y = paddle.concat([y1, self.br2(x), y3], 1).mean((2, 3))
        return self.fc(y)


def _pair(port: type = Port, **kw):
    torch.manual_seed(0)
    paddle.seed(0)
    return Ref().eval(), port(**kw)


def _outputs(tm, pm):
    with torch.no_grad():
        t = tm(torch.from_numpy(X)).numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(X)).numpy()
    return t, p


def _state(pm):
    return {k: v.numpy().copy() for k, v in pm.state_dict().items()}


def test_by_definition_order_the_siblings_pair_crossed_and_by_call_order_as_they_run():
    tm, pm = _pair()
    assert pair_weights_by_order(tm, pm)["b.weight"] == "br3.weight"  # the silent crossing
    by_calls = pair_weights_by_order(tm, pm, inputs=X)
    assert by_calls == {"stem.weight": "conv0.weight", "stem.bias": "conv0.bias",
                        "a.weight": "br1.weight", "a.bias": "br1.bias",
                        "b.weight": "br2.weight", "b.bias": "br2.bias",
                        "c.weight": "br3.weight", "c.bias": "br3.bias",
                        "head.weight": "fc.weight", "head.bias": "fc.bias"}
    rules = by_order_rules(tm, pm, inputs=X)
    assert set(torch_to_paddle(tm, rules=rules)) == set(pm.state_dict())


def test_loaded_by_call_order_the_port_computes_the_reference_and_passes():
    tm, pm = _pair()
    load_into_paddle(pm, tm, by_order=True, inputs=X)
    t, p = _outputs(tm, pm)  # independent of reprod's judging: the numbers themselves
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-6)
    for name, layer in (("b", "br2"), ("c", "br3")):
        np.testing.assert_array_equal(getattr(pm, layer).weight.numpy(),
                                      getattr(tm, name).weight.detach().numpy())
    # layers judged too (calibrate): the captures pair as the weights were loaded
    r = align_forward(tm, pm, X, by_order=True, calibrate=True, layers=True)
    assert r.passed, r.summary_line()


def test_loaded_by_definition_order_the_failure_names_the_pairing_and_the_fix():
    tm, pm = _pair()
    load_into_paddle(pm, tm, by_order=True)
    before = _state(pm)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert not r.passed
    said = [f for f in r.options["findings"] if HINT in f]
    assert len(said) == 1, r.options["findings"]
    assert "the port's br2 took c's weights where it runs as b" in said[0]
    assert "the port's br3 took b's weights where it runs as c" in said[0]
    assert "load_into_paddle(paddle_model, torch_model, by_order=True, inputs=" in said[0]
    after = _state(pm)  # the counterfactual load is given back
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_a_bug_beside_the_crossing_is_named_at_its_layer_not_at_the_pairing():
    # loaded by call order: the captures anchor on the pairing the weights hold
    tm, pm = _pair(scale=1.05)
    load_into_paddle(pm, tm, by_order=True, inputs=X)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert not r.passed
    assert not any(HINT in f for f in r.options["findings"])
    assert r.options["divergence"]["layer"] == "head", r.options["divergence"]
    # loaded by definition order with the same bug: loading by call order mends nothing, so
    # the pairing is not blamed
    tm, pm = _pair(scale=1.05)
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert not r.passed
    assert not any(HINT in f for f in r.options["findings"])


def test_a_port_calling_siblings_in_another_order_is_loaded_right_by_definition():
    """The reverse case: definition order is right, call order crosses. The run passes and no
    pairing is blamed; loading it by call order would be the wrong thing, and fails."""
    tm, pm = _pair(SameOrderPort)
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True, layers=True)
    assert r.passed, r.summary_line()
    load_into_paddle(pm, tm, by_order=True, inputs=X)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert not r.passed
    assert not any(HINT in f for f in r.options["findings"])


def test_in_call_order_keeps_containers_and_uncalled_leaves_in_their_places():
    keys = ["cls_token", "x.weight", "x.bias", "pos", "y.weight", "z.weight", "w.weight"]
    calls = {"y": 0, "x": 1, "w": 2}  # z never ran; cls_token and pos belong to no leaf
    assert in_call_order(keys, calls) == ["cls_token", "y.weight", "x.weight", "pos",
                                          "x.bias", "z.weight", "w.weight"]
    assert in_call_order(keys, None) == keys


def test_the_hooks_are_removed_and_a_failing_run_is_one_line():
    tm, pm = _pair()
    order = first_calls_of(tm, lambda: tm(torch.from_numpy(X)))
    assert order == {"stem": 0, "a": 1, "b": 2, "c": 3, "head": 4}
    assert all(not m._forward_pre_hooks for m in tm.modules())
    with pytest.raises(ReprodError, match="running the models on the inputs failed: "
                                          "RuntimeError"):
        pair_weights_by_order(tm, pm, inputs=np.zeros((2, 5, 8, 8), np.float32))
    assert all(not m._forward_pre_hooks for m in tm.modules())
    assert all(not layer._forward_pre_hooks for layer in pm.sublayers(include_self=True))


def test_inputs_need_both_models_and_by_order():
    tm, pm = _pair()
    with pytest.raises(ReprodError, match="needs the two models themselves"):
        pair_weights_by_order(tm.state_dict(), pm, inputs=X)
    with pytest.raises(ReprodError, match="inputs= pairs by call order, with by_order=True"):
        load_into_paddle(pm, tm, inputs=X)
    with pytest.raises(ReprodError, match="inputs= pairs by call order"):
        load_into_paddle(pm, tm.state_dict(), by_order=True, inputs=X)


class Stem(paddle.nn.Layer):
    """Defines its downsampling before its stem, as PaddleClas's ConvNeXt defines them all
    before its stages; runs them in the reference's order."""

    def __init__(self) -> None:
        super().__init__()
        self.down = paddle.nn.Conv2D(8, 16, 2, stride=2)
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.mix = paddle.nn.Conv2D(16, 16, 1)

    def forward(self, x):
        return self.mix(self.down(self.conv(x)))


def test_a_refusal_where_only_the_order_differs_says_to_pair_by_call_order():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 2, 2),
                             torch.nn.Conv2d(16, 16, 1)).eval()
    pm = Stem()
    pm.eval()
    with pytest.raises(ReprodError) as refused:
        load_into_paddle(pm, tm, by_order=True)
    assert "inputs=x" in str(refused.value), str(refused.value)
    load_into_paddle(pm, tm, by_order=True, inputs=X)
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-6)


class Dilated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=4, dilation=4)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([self.b(x), self.c(x)], 1).mean((2, 3)))


class DilatedPort(paddle.nn.Layer):
    """An ASPP-like port defining its dilation-4 branch before its dilation-2 one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.br3 = paddle.nn.Conv2D(8, 8, 3, padding=4, dilation=4)
        self.br2 = paddle.nn.Conv2D(8, 8, 3, padding=2, dilation=2)
        self.fc = paddle.nn.Linear(16, 5)

    def forward(self, x):
        x = paddle.nn.functional.relu(self.conv0(x))
        return self.fc(paddle.concat([self.br2(x), self.br3(x)], 1).mean((2, 3)))


def test_the_settings_pair_the_layers_as_the_port_s_weights_hold_them():
    """Loaded by call order, the faithful port's crossed branches were paired by definition
    order for the settings check, which failed four invented differences ("br3 (torch b):
    dilation (2, 2) in torch, (4, 4) in Paddle")."""
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = Dilated().eval(), DilatedPort()
    pm.eval()
    x = np.random.RandomState(0).randn(2, 3, 12, 12).astype("float32")
    load_into_paddle(pm, tm, by_order=True, inputs=x)
    r = align_forward(tm, pm, x, by_order=True, calibrate=True, layers=True)
    assert r.passed, r.summary_line()
    assert r.options["weights_paired"] == "by call order"
    # a real difference of setting is still one, named against the branch it runs as
    pm.br2._dilation = [3, 3]
    pm.br2._updated_padding = [3, 3]
    r = align_forward(tm, pm, x, by_order=True, calibrate=True)
    assert "br2 (torch b): dilation (2, 2) in torch, (3, 3) in Paddle" in \
        r.options["settings"]["differ"], r.options["settings"]["differ"]
    # loaded by definition order: the pairing is the weights', and the likely cause says so
    load_into_paddle(pm, tm, by_order=True)
    pm.br2._dilation, pm.br2._updated_padding = [2, 2], [2, 2]
    r = align_forward(tm, pm, x, by_order=True, calibrate=True)
    assert "weights_paired" not in r.options
    assert any(HINT in f for f in r.options["findings"]), r.options["findings"]


def test_align_train_pairs_the_gradients_as_the_port_s_weights_hold_them():
    """Loaded by call order, align_train paired the weights by definition order: each crossed
    branch's gradient, weight and optimizer state were set against the other's."""
    from reprod.align import align_train

    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = Dilated(), DilatedPort()
    rng = np.random.default_rng(1)
    batches = [(rng.standard_normal((2, 3, 12, 12)).astype("float32"),
                rng.standard_normal((2, 5)).astype("float32")) for _ in range(2)]
    load_into_paddle(pm, tm, by_order=True, inputs=batches[0][0])

    def train(tm, pm):
        return align_train(tm, pm, batches, by_order=True, calibrate=True,
                           torch_loss_fn=torch.nn.MSELoss(), paddle_loss_fn=paddle.nn.MSELoss(),
                           torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                           paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1,
                                                                 parameters=pm.parameters()))

    r = train(tm, pm)
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["weights_paired"] == "by call order"
    assert "step0/grad/br2.weight" in r.keys()
    # loaded by definition order, the failing training run names the pairing as align_forward
    # does (its localisation pairs the weights itself, not from the step's plan)
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = Ref(), Port()
    load_into_paddle(pm, tm, by_order=True)
    batches[:] = [(rng.standard_normal((2, 3, 8, 8)).astype("float32"),
                   rng.standard_normal((2, 5)).astype("float32")) for _ in range(2)]
    r = train(tm, pm)
    assert not r.passed and "weights_paired" not in r.options
    assert any(HINT in f for f in r.options["findings"]), r.options["findings"]


def test_compare_structure_shows_the_pairs_by_call_order():
    from reprod.align import compare_structure

    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 2, 2),
                             torch.nn.Conv2d(16, 16, 1)).eval()
    pm = Stem()
    assert not compare_structure(tm, pm, by_order=True).ok  # by definition: shapes disagree
    report = compare_structure(tm, pm, by_order=True, inputs=X)
    assert report.ok, report.to_table(only_problems=True)
    assert {(r.torch_name, r.paddle_name) for r in report.rows if r.torch_name} >= {
        ("0.weight", "conv.weight"), ("1.weight", "down.weight"), ("2.weight", "mix.weight")}
    with pytest.raises(ReprodError, match="inputs= pairs by call order"):
        compare_structure(tm, pm, inputs=X)
