"""A fused attention call (``scaled_dot_product_attention``) as the trace reads it: the softmax over
its keys and the dropout of its weights, which a hand-written attention applies as a call and a
layer. Hugging Face's sdpa attentions pass ``dropout_p=self.dropout_prob if self.training else
0.0``: out of training the rate is the one the layer holds. Before, such an attention held no
dropout and no softmax the trace could see, so ALBERT's 3 dropouts against PaddleNLP's 5 paired
none and a wrong attention dropout passed (tests/realworld/test_more_transformers_real.py runs the
real pair)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn
PF = paddle.nn.functional

from reprod.align import align_forward, compare_settings, load_into_paddle, trace_settings  # noqa: E402

E, NH, B, L = 8, 2, 2, 5
X = np.random.default_rng(0).standard_normal((B, L, E)).astype(np.float32)


class TorchSdpaAttention(tnn.Module):
    """As Hugging Face's ``AlbertSdpaAttention`` computes: the rate held as a number, passed to
    the fused call only in training."""

    def __init__(self, p: float = 0.1, hold_rate: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v = tnn.Linear(E, E), tnn.Linear(E, E), tnn.Linear(E, E)
        self.out, self.drop = tnn.Linear(E, E), tnn.Dropout(0.1)
        if hold_rate:
            self.dropout_prob = p
        else:
            self._rate = p  # a name the trace does not know

    def forward(self, x):
        def heads(t):
            return t.view(B, L, NH, E // NH).transpose(1, 2)

        rate = getattr(self, "dropout_prob", None)
        rate = self._rate if rate is None else rate
        a = tnn.functional.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
            dropout_p=rate if self.training else 0.0)
        return self.drop(self.out(a.transpose(1, 2).reshape(B, L, E)))


class PaddleAttention(pnn.Layer):
    """A hand-written port: softmax, then its weights' dropout as a layer."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.q, self.k, self.v = pnn.Linear(E, E), pnn.Linear(E, E), pnn.Linear(E, E)
        self.out, self.attn_drop, self.drop = pnn.Linear(E, E), pnn.Dropout(p), pnn.Dropout(0.1)

    def forward(self, x):
        def heads(t):
            return t.reshape([B, L, NH, E // NH]).transpose([0, 2, 1, 3])

        w = paddle.matmul(heads(self.q(x)), heads(self.k(x)), transpose_y=True)
        w = self.attn_drop(PF.softmax(w / float(np.sqrt(E // NH)), axis=-1))
        a = paddle.matmul(w, heads(self.v(x))).transpose([0, 2, 1, 3]).reshape([B, L, E])
        return self.drop(self.out(a))


class PaddleSdpaAttention(pnn.Layer):
    """A port through Paddle's own fused call, in its (batch, length, heads, dim) layout."""

    def __init__(self, p: float = 0.1, always_on: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = pnn.Linear(E, E), pnn.Linear(E, E), pnn.Linear(E, E)
        self.out, self.drop = pnn.Linear(E, E), pnn.Dropout(0.1)
        self.p, self.always_on = p, always_on

    def forward(self, x):
        def heads(t):
            return t.reshape([B, L, NH, E // NH])

        a = PF.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), dropout_p=self.p,
            training=self.always_on or self.training)
        return self.drop(self.out(a.reshape([B, L, E])))


def _traced(tm, pm, training: bool):
    tm.train(training)
    pm.train() if training else pm.eval()
    with trace_settings(tm) as tt:
        tm(torch.from_numpy(X))
    with trace_settings(pm) as tp:
        pm(paddle.to_tensor(X))
    return tt, tp, compare_settings(tm, pm, by_order=True, traces=(tt, tp))


def _pair(port):
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchSdpaAttention(), port
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("port", [PaddleAttention, PaddleSdpaAttention])
def test_the_fused_call_pairs_with_a_port_softmax_and_dropout(training, port) -> None:
    tm, pm = _pair(port())
    tt, tp, report = _traced(tm, pm, training)
    kinds = [e.kind for e in tt.events if not e.layer]
    assert kinds == ["softmax", "dropout"], tt.events
    dropouts = [e.settings["p"] for e in tt.events if e.kind == "dropout"]
    assert dropouts == [0.1, 0.1]  # the fused call's rate, in eval the one the layer holds
    assert report.passed, str(report)
    assert not report.unpaired, report.unpaired
    assert "2 paired calls" in str(report), str(report)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("port", [PaddleAttention, PaddleSdpaAttention])
def test_a_wrong_attention_dropout_rate_is_said_in_either_mode(training, port) -> None:
    tm, pm = _pair(port(p=0.2))
    _, _, report = _traced(tm, pm, training)
    assert not report.passed
    (d,) = report.differ
    assert (d.setting, d.torch_value, d.paddle_value) == ("p", 0.1, 0.2), str(report)
    assert "scaled_dot_product_attention" in d.torch_layer


def test_a_rate_the_layer_does_not_hold_by_a_known_name_is_not_judged_out_of_training() -> None:
    # the call passed 0.0 in eval and the layer's rate is under a name the trace does not read:
    # not "p 0 in torch", and not left out as a dropout of p 0 (it still pairs)
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchSdpaAttention(hold_rate=False), PaddleAttention(p=0.2)
    load_into_paddle(pm, tm, by_order=True)
    tt, _, report = _traced(tm, pm, False)
    (fused,) = [e for e in tt.events if e.kind == "dropout" and not e.layer]
    assert fused.settings["p"] == 0.0 and fused.settings["_rate_unread"] is True
    assert report.passed and not report.unpaired, str(report)
    # in training the call says the rate, and the difference is found
    _, _, report = _traced(tm, pm, True)
    assert [(d.setting, d.torch_value, d.paddle_value) for d in report.differ] == [("p", 0.1, 0.2)]


def test_a_fused_call_left_dropping_in_eval_is_found() -> None:
    # Paddle's call takes ``training`` itself: a port that passes True drops in evaluation
    tm, pm = _pair(PaddleSdpaAttention(always_on=True))
    _, _, report = _traced(tm, pm, False)
    assert [(d.setting, d.torch_value, d.paddle_value) for d in report.differ] == [
        ("training", False, True)], str(report)
    # and the outputs say so too: the forward pass fails on values, not only on the setting
    r = align_forward(tm, pm, {"x": X}, by_order=True, check_settings=False)
    assert not r.passed


def test_align_forward_checks_the_fused_call_s_settings() -> None:
    tm, pm = _pair(PaddleAttention(p=0.3))
    tm.eval()
    pm.eval()
    r = align_forward(tm, pm, {"x": X}, by_order=True)
    assert not r.passed
    assert [k.key for k in r.failed] == ["settings/attn_drop/p"], [k.key for k in r.failed]
    ok = align_forward(tm, pm, {"x": X}, by_order=True, check_settings=["*/p"])
    assert ok.passed
