"""A weight decay the port leaves out, at a learning rate where one update moves each weight by
less than its float32 resolution (session 16's P3): torchvision's squeezenet1_1 against
paddle.vision's, eval mode, by call order, calibrated, one SGD step (lr 0.01, momentum 0.9,
torch's weight_decay 1e-4, the port's none), batch 2 at 224 px.

The weights pass key by key: 1e-6 of each weight is within their noise; the decay each side's
update fits over a parameter's elements (``reprod.align.decay``) tells. The momentum buffers,
recorded after the step as ``step0/opt/<name>.velocity``, hold g + 1e-4 w against the port's g,
and fail; the finding names the decay, and so do the optimizers' settings
(``settings/optimizer/weight_decay``). The same decay on both sides passes. About 4 s.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import torch  # noqa: E402
from models import (  # noqa: E402
    build_pair,
    make_inputs,
    make_labels,
    squeezenet_as_torchvision,
)

from reprod.align import align_train  # noqa: E402

_PAIRS: dict = {}


def _run(paddle_wd, optimizer_state=True, check_settings=True):
    if "pair" not in _PAIRS:
        _PAIRS["pair"] = build_pair("squeezenet1_1", 0)
    p = _PAIRS["pair"]
    tm, pm = copy.deepcopy(p.torch32).eval(), p.paddle()
    pm.eval()
    squeezenet_as_torchvision(pm)
    return align_train(
        tm, pm, [(make_inputs(0, 2), make_labels(0, 2))], steps=1, by_order=True,
        calibrate=True, optimizer_state=optimizer_state, check_settings=check_settings,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9,
                                        weight_decay=1e-4),
        paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters(),
                                                   weight_decay=paddle_wd),
    )


def test_the_weights_alone_show_the_missing_decay_only_by_its_fit(monkeypatch):
    # each key of the weights is within its noise; the decay each side's update fits is not
    from reprod.align import steps

    # (the optimizers' settings, which name the decay outright, left out: the numbers alone)
    r = _run(None, optimizer_state=False, check_settings=False)
    assert not r.passed
    assert all(k.key.startswith("step0/param/") and k.reason.startswith("the weight decays differ")
               for k in r.failed), r.to_table(failed_only=True)
    fit = r.options["decay"]["_conv.weight"]
    assert abs(fit["reference"] - 1e-4) < 1e-6 and abs(fit["port"]) < 1e-6
    monkeypatch.setattr(steps.decay, "decay_checked", lambda result, *args, **kw: result)
    assert _run(None, optimizer_state=False, check_settings=False).passed


def test_the_momentum_buffers_show_it_and_the_finding_names_it():
    r = _run(None)
    assert not r.passed
    assert all(k.key.startswith("step0/opt/") and k.key.endswith(".velocity")
               for k in r.failed if k.status != "setting"), r.to_table(failed_only=True)
    assert all(k.passed for k in r if k.key.startswith(("step0/param/", "step0/grad/")))
    finding, setting = r.options["findings"]
    assert "the momentum buffers are apart by 0.0001 x the weights, the reference's the " \
           "larger: a weight decay" in finding, finding
    # the hyperparameters read: the decay on all 52 parameters, one key
    assert [k.key for k in r.failed if k.status == "setting"] == [
        "settings/optimizer/weight_decay"]
    assert "optimizer: weight_decay 'L2 0.0001' in torch, 'none' in Paddle" in setting
    assert r.options["settings"]["optimizer"]["weight_decay"] == {
        "parameters": 52, "differ": 52, "torch": "L2 0.0001", "paddle": "none"}


def test_the_same_decay_on_both_sides_passes():
    assert _run(1e-4).passed
