"""Recurrent layers ported: torch's LSTM, GRU and RNN against Paddle's LSTM, GRU and SimpleRNN.

Paddle's recurrent layers list each weight twice in their state dict, under torch's name
(``weight_ih_l0``) and under their cell's (``0.cell_fw.weight_ih``): one tensor, two keys. The
structure check, the weight conversion and loading, pairing by order and ``align_train``'s
records read each tensor once. Their settings are read as one layer's (Paddle's hold a layer per
direction and depth): torch's ``batch_first`` defaults to False (time first), Paddle's
``time_major`` to False (batch first), the classic port bug of a recurrent model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import (  # noqa: E402
    align_forward,
    align_train,
    check_fits,
    compare_settings,
    compare_structure,
    load_into_paddle,
    pair_weights_by_order,
)

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 5, 4)).astype(np.float32)  # batch, time, features
Y = np.array([0, 2, 1])

KINDS = {"lstm": (torch.nn.LSTM, paddle.nn.LSTM), "gru": (torch.nn.GRU, paddle.nn.GRU),
         "rnn": (torch.nn.RNN, paddle.nn.SimpleRNN)}


class _T(torch.nn.Module):
    def __init__(self, kind, **kw):
        super().__init__()
        self.rnn = KINDS[kind][0](4, 8, num_layers=2, bidirectional=True, **kw)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _P(paddle.nn.Layer):
    def __init__(self, kind, **kw):
        super().__init__()
        self.rnn = KINDS[kind][1](4, 8, num_layers=2, direction="bidirect", **kw)
        self.head = paddle.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _pair(kind, torch_kw=None, paddle_kw=None):
    torch.manual_seed(0)
    tm = _T(kind, **({"batch_first": True} if torch_kw is None else torch_kw))
    pm = _P(kind, **(paddle_kw or {}))
    return tm, pm


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_recurrent_port_loads_by_name_and_computes_the_same(kind):
    tm, pm = _pair(kind)
    assert len(pm.state_dict()) == 2 * len(tm.rnn.state_dict()) + 2  # each weight twice
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Paddle warns of each key it is not given
        load_into_paddle(pm, tm)
    # the cells' names are the same tensors: loaded too
    sd = pm.state_dict()
    np.testing.assert_array_equal(sd["rnn.0.cell_fw.weight_ih"].numpy(),
                                  tm.rnn.weight_ih_l0.detach().numpy())
    with torch.no_grad():
        ref = tm(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(pm(paddle.to_tensor(X)).numpy(), ref, rtol=1e-5, atol=1e-6)
    assert align_forward(tm, pm, {"x": X}, calibrate=True).passed
    # pairing by order sees each tensor once
    pairs = pair_weights_by_order(tm, pm)
    assert list(pairs.values()) == [k for k in sd if ".cell" not in k]


def test_weights_holding_both_names_fit_as_a_paddle_file_holds_them():
    tm, pm = _pair("lstm")
    load_into_paddle(pm, tm)
    saved = {k: v.numpy() for k, v in pm.state_dict().items()}  # what paddle.save writes
    check_fits(pm, saved)
    load_into_paddle(pm, saved)
    saved["rnn.weight_ih_l0"] = saved["rnn.weight_ih_l0"][:, :2]
    with pytest.raises(Exception, match=r"rnn\.weight_ih_l0 \[32, 2\] vs model \[32, 4\]"):
        check_fits(pm, saved)


def test_each_framework_s_default_layout_is_a_setting_that_differs():
    """torch's LSTM without batch_first reads its input time first; Paddle's without
    time_major, batch first: the port computes another function on the same array."""
    tm, pm = _pair("lstm", torch_kw={})
    assert [d.line() for d in compare_settings(tm, pm).differ] == [
        "rnn: batch_first False in torch, True in Paddle"]
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X}, calibrate=True)
    assert not r.passed
    assert r.options["divergence"]["layer"] == "rnn"
    assert r["settings/rnn/batch_first"].status == "setting"
    assert r.options["findings"][-1].endswith(
        "rnn is the layer where the values first differ: the likely cause")
    # Paddle's time_major=True is torch's default
    assert compare_settings(tm, _P("lstm", time_major=True)).passed


def test_recurrent_settings_each_framework_spells_its_way():
    tm = _T("rnn", batch_first=True, nonlinearity="relu", dropout=0.1)
    same = _P("rnn", activation="relu", dropout=0.1)
    assert compare_settings(tm, same).passed
    other = _P("rnn", dropout=0.1)
    assert [d.line() for d in compare_settings(tm, other).differ] == [
        "rnn: nonlinearity 'relu' in torch, 'tanh' in Paddle"]
    # dropout between stacked layers only: one layer has none to differ
    one_t = torch.nn.Sequential(torch.nn.GRU(4, 8, batch_first=True))
    one_p = paddle.nn.Sequential(paddle.nn.GRU(4, 8, dropout=0.5))
    assert compare_settings(one_t, one_p).passed


def test_align_train_records_each_recurrent_weight_once():
    tm, pm = _pair("gru")
    load_into_paddle(pm, tm)
    r = align_train(tm.train(), pm.train(), [(X, Y)], steps=2, calibrate=True,
                    torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.Adam(tm.parameters(), lr=1e-3),
                    paddle_optimizer=paddle.optimizer.Adam(1e-3, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    assert not any(".cell" in k for k in r.keys())
    assert "step1/param/rnn.weight_hh_l1_reverse" in r.keys()
