"""Settings the layers' own pairing cannot reach, checked all the same, and never an all-clear
that compared nothing:

- a port whose weights do not pair by order (a conv's ``groups`` changes its weight's shape;
  SqueezeBERT's port) or by name (every layer renamed) pairs its layers with parameters by
  definition order, kind by kind, and says so; before, ``compare_settings(by_order=True)``
  raised the shape error and never said "groups", and by name it passed on "0 paired layers";
- a report that paired none of the models' layers does not pass;
- where the two passes apply different numbers of dropouts, they are aligned in call order: a
  dropout of p 0 may go unpaired, any other is a difference where it is (a port's dropout set
  to 0, or one it lacks). Before, the kind was only listed as unpaired (MBart's port: 22
  against 16), and no key failed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from reprod.align import align_forward, compare_settings, load_into_paddle, trace_settings  # noqa: E402
from reprod.errors import KeyMismatchError  # noqa: E402

C, L = 8, 6


class TorchSqueeze(tnn.Module):
    """SqueezeBERT's way: grouped 1x1 convolutions over channels, a LayerNorm after."""

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.conv = tnn.Conv1d(C, C, 1, groups=groups)
        self.norm = tnn.LayerNorm(C)

    def forward(self, x):
        return self.norm(self.conv(x).transpose(1, 2))


class PaddleSqueeze(pnn.Layer):
    def __init__(self, groups: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        self.mix = pnn.Conv1D(C, C, 1, groups=groups)
        self.ln = pnn.LayerNorm(C, epsilon=eps)

    def forward(self, x):
        return self.ln(self.mix(x).transpose([0, 2, 1]))


def test_weights_that_cannot_pair_by_order_still_have_their_settings_compared() -> None:
    tm, pm = TorchSqueeze(groups=4), PaddleSqueeze(groups=2)
    with pytest.raises(KeyMismatchError):  # [8, 2, 1] against [8, 4, 1]
        load_into_paddle(pm, tm, by_order=True)
    report = compare_settings(tm, pm, by_order=True)
    assert [(d.torch_layer, d.paddle_layer, d.setting, d.torch_value, d.paddle_value)
            for d in report.differ] == [("conv", "mix", "groups", 4, 2)]
    assert report.unpaired[0].startswith(
        "layers with parameters: paired by definition order, kind by kind (their weights do not "
        "pair by order: "), report.unpaired
    assert not report.passed


def test_a_renamed_port_is_compared_by_definition_order_not_passed_on_nothing() -> None:
    tm = TorchSqueeze()
    report = compare_settings(tm, PaddleSqueeze())  # by name: no name pairs
    assert report.passed and report.compared == 2, str(report)
    assert "none paired through their weights" in report.unpaired[0]
    report = compare_settings(tm, PaddleSqueeze(eps=1e-3))
    assert [(d.paddle_layer, d.setting, d.torch_value, d.paddle_value)
            for d in report.differ] == [("ln", "epsilon", 1e-5, 1e-3)]


class PaddleTwoNorms(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.mix = pnn.Conv1D(C, C, 1, groups=4)
        self.conv2 = pnn.Conv1D(C, C, 1)
        self.a, self.b = pnn.LayerNorm(C), pnn.LayerNorm(C)

    def forward(self, x):
        return self.b(self.a(self.conv2(self.mix(x)).transpose([0, 2, 1])))


def test_a_report_that_paired_none_of_the_layers_does_not_pass() -> None:
    report = compare_settings(TorchSqueeze(), PaddleTwoNorms())
    assert not report.differ and report.compared == 0
    assert report.nothing_compared and not report.passed
    assert str(report).startswith("nothing compared: none of the 2 layers with settings paired")
    assert "conv: 1 in torch, 2 in Paddle" in report.unpaired


class TorchDrops(tnn.Module):
    """A Dropout layer, and a dropout the forward code applies as a function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(C, C), tnn.Linear(C, C)
        self.drop = tnn.Dropout(0.1)

    def forward(self, x):
        h = self.drop(self.fc1(x))
        return tnn.functional.dropout(self.fc2(h), p=0.2, training=self.training)


class PaddleDrops(pnn.Layer):
    def __init__(self, first: float = 0.1, second: float = 0.2, extra: float = 0.0,
                 lacks_second: bool = False, act: bool = True) -> None:
        super().__init__()
        self.fc1, self.fc2 = pnn.Linear(C, C), pnn.Linear(C, C)
        self.drop1, self.drop2 = pnn.Dropout(first), pnn.Dropout(second)
        self.act_drop = pnn.Dropout(extra)  # PaddleNLP's activation dropout, often p 0
        self.lacks_second, self.act = lacks_second, act

    def forward(self, x):
        h = self.drop1(self.fc1(x))
        h = self.act_drop(h) if self.act else h
        h = self.fc2(h)
        return h if self.lacks_second else self.drop2(h)


def _traced(port):
    torch.manual_seed(0)
    tm = TorchDrops().eval()
    load_into_paddle(port, tm, by_order=True)
    port.eval()
    x = np.ones((2, C), np.float32)
    with trace_settings(tm) as tt:
        tm(torch.from_numpy(x))
    with trace_settings(port) as tp:
        port(paddle.to_tensor(x))
    return tm, compare_settings(tm, port, by_order=True, traces=(tt, tp))


def _said(report):
    return [(d.torch_layer, d.paddle_layer, d.torch_value, d.paddle_value) for d in report.differ]


def test_a_port_s_extra_dropout_of_p_0_is_no_difference() -> None:
    _, report = _traced(PaddleDrops())
    assert report.passed and not report.unpaired, str(report)


def test_a_port_s_dropout_set_to_0_is_a_difference_where_it_is() -> None:
    # 2 dropouts against 3 (one of p 0): before, nothing paired, and nothing failed
    _, report = _traced(PaddleDrops(second=0.0))
    assert _said(report) == [("(model):dropout", "drop2", 0.2, 0.0)], str(report)


def test_a_dropout_the_port_lacks_is_a_difference() -> None:
    # as many dropouts on both sides, one of p 0: by order, 0.2 against 0
    _, report = _traced(PaddleDrops(lacks_second=True))
    assert _said(report) == [("(model):dropout", "act_drop", 0.2, 0.0)], str(report)
    # one fewer: the one missing is said
    _, report = _traced(PaddleDrops(lacks_second=True, act=False))
    (d,) = report.differ
    assert (d.torch_layer, d.paddle_value) == ("(model):dropout", "no dropout")
    assert d.line() == "(model):dropout (torch only): p 0.2 in torch, no dropout in Paddle"
    assert d.key == "settings/(none for torch (model):dropout)/p"


def test_a_dropout_only_the_port_applies_is_a_difference() -> None:
    # 0.1, 0.1, 0.2 against 0.1, 0.2: either 0.1 may be the extra one, and one is said
    _, report = _traced(PaddleDrops(extra=0.1))
    (said,) = _said(report)
    assert said in (("(none for Paddle act_drop)", "act_drop", "no dropout", 0.1),
                    ("(none for Paddle drop1)", "drop1", "no dropout", 0.1)), said
    # 0.1, 0.3, 0.2 against 0.1, 0.2: the 0.3 is the one
    _, report = _traced(PaddleDrops(extra=0.3))
    assert _said(report) == [("(none for Paddle act_drop)", "act_drop", "no dropout", 0.3)]


def test_align_forward_fails_the_dropout_and_says_when_nothing_was_compared() -> None:
    torch.manual_seed(0)
    tm, pm = TorchDrops().eval(), PaddleDrops(second=0.0)
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    x = np.ones((2, C), np.float32)
    r = align_forward(tm, pm, x, by_order=True)
    assert [k.key for k in r.failed] == ["settings/drop2/p"]
    # a port none of whose layers with settings pair: a finding says so, whatever the values
    tm2, pm2 = TorchSqueeze(), PaddleTwoNorms()
    r = align_forward(tm2, pm2, np.ones((2, C, L), np.float32), check_settings=True)
    assert any(f.startswith("no layer setting was checked: none of the 2 layers")
               for f in r.options.get("findings", ())), r.options.get("findings")
