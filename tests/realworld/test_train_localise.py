"""``align_train``'s localisation on a real model: torchvision's mobilenet_v3_small against
paddle.vision's port, by call order, calibrated, training mode (dropout p=0), batch 2, 2 SGD
steps, seed 0 (no kink crossing there: test_align_train_kinks.py uses seed 2).

A port whose Hardswish has a wrong backward (a custom op ported wrongly: slope x/3 + 0.6 inside
(-3, 3) instead of x/3 + 0.5) computes the same outputs and loss; every gradient before that
layer differs, and the first failing key is the first parameter's gradient, ``conv.0.weight``,
far from the bug. The finding names the layer: backward diverges at the 4th Hardswish
(``features.5.block.0.2``), its incoming gradient aligned. A correct port passes: its BatchNorm
running variances differ, and pass as the known difference they fit (status ``known``). ~5 s
single-threaded.
"""

from __future__ import annotations

import copy
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibrated as C  # noqa: E402
import paddle  # noqa: E402
import torch  # noqa: E402
from models import build_pair, make_inputs, make_labels  # noqa: E402

from reprod.align import align_train  # noqa: E402

pytestmark = pytest.mark.xdist_group("realworld-mobilenet")
_PAIR: dict = {}


class _WrongHardswish(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return paddle.nn.functional.hardswish(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        inside = paddle.where(x >= 3, paddle.ones_like(x), x / 3 + 0.6)
        return grad * paddle.where(x <= -3, paddle.zeros_like(x), inside)


def _run(bug: bool):
    if "pair" not in _PAIR:
        _PAIR["pair"] = build_pair("mobilenet_v3_small", 0)
    p = _PAIR["pair"]
    tm, pm = copy.deepcopy(p.torch32), p.paddle()
    for m in (tm, pm):
        C._no_dropout(m)
        m.train()
    if bug:
        _, layer = [(n, m) for n, m in pm.named_sublayers()
                    if type(m).__name__ == "Hardswish"][3]
        layer.forward = types.MethodType(lambda self, x: _WrongHardswish.apply(x), layer)
    return align_train(
        tm, pm, [(make_inputs(0, 2), make_labels(0, 2))], steps=2, by_order=True, calibrate=True,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9),
        paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters()),
    )


def test_a_correct_port_passes_with_its_batchnorm_variances_known():
    r = _run(bug=False)
    assert r.passed and "findings" not in r.options, r.to_table(failed_only=True)
    known = {k.key for k in r if k.status == "known"}
    assert known and all(k.endswith("._variance") and "/stat/" in k for k in known)


def test_a_wrong_backward_is_named_at_its_layer():
    r = _run(bug=True)
    assert r["step0/logits"].passed and r["step0/loss"].passed
    assert r.first_failure.key == "step0/grad/conv.0.weight"  # the key order: far from the bug
    hardswish = [n for n, m in _PAIR["pair"].torch32.named_modules()
                 if isinstance(m, torch.nn.Hardswish)]
    assert hardswish[3] == "features.5.block.0.2"
    found = r.options["findings"]
    assert found[0].startswith("backward diverges at features.5.block.0.2 (Hardswish; the port's "
                               "blocks.4.expand_conv.2): incoming gradient aligned"), found
    assert r.options["divergence"]["direction"] == "backward"
