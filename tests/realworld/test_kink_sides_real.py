"""A correct port whose Hardswish input sits 1 ulp below 3 on both sides passes
(``reprod.capture.kinks.SIDES``): torchvision's mobilenet_v3_small against paddle.vision's, train
mode, SGD with momentum and weight decay 1e-4 on both sides, seed 0, batch 2 at 224 px, 2 steps.

In step 1 one element of a Hardswish input (features.9.block.0.2, its second call) is held alike
by both ports at 3 - 1 ulp. Paddle's kernel tests ``fl32(x + 3) >= 6`` and gives it the gradient
1.0; torch's tests ``x >= 3`` and gives 1.5. With ``x > k`` on both sides no crossing was found
and the run failed, 188 keys, the first conv's gradient at 297x noise (session 17's survey). With
each framework's own test the crossing is found and the counterfactual check, which moves that
element onto Paddle's side in the float64 rerun, aligns every gradient it labels.
"""

from __future__ import annotations

import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from models import (  # noqa: E402
    build_pair,
    make_inputs,
    make_labels,
    squeezenet_as_torchvision,
    train_copies,
)

from reprod.align import align_train  # noqa: E402
from reprod.capture.kinks import SIDES  # noqa: E402

_PAIR: list = []


def _run():
    if not _PAIR:
        _PAIR.append(build_pair("mobilenet_v3_small", 0))
    tm, pm, batches = train_copies(_PAIR[0], 0)
    return align_train(
        tm, pm, batches, steps=2, by_order=True, calibrate=True,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4),
        paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters(),
                                                   weight_decay=1e-4),
    )


def test_a_hardswish_input_held_alike_at_3_minus_1_ulp_is_a_crossing():
    r = _run()
    assert r.passed, r.to_table(failed_only=True)
    hardswish = [c for c in r.options["kink_crossings"]
                 if c["layer_type"] == "Hardswish" and c["kinks"] == [3.0]]
    assert hardswish and all(c["pass"] == 1 for c in hardswish), r.options["kink_crossings"]
    check = r.options["counterfactual"]["step1"]
    assert check["failed"] == 0 and check["aligned"] > 50 and check["worst"] < 20, check


_PLAIN: list = []


def _without_paddles_test():
    """The run with ``x > k`` on Paddle's side too, once."""
    if not _PLAIN:
        saved = SIDES["paddle"].pop("hardswish")
        try:
            _PLAIN.append(_run())
        finally:
            SIDES["paddle"]["hardswish"] = saved
    return _PLAIN[0]


def _held_alike_or_skip():
    """Where this CPU's kernels leave the two ports' element on either side of 3, ``x > k``
    finds the crossing by itself and neither check below has anything to show (measured on an
    AVX2 CPU; the element was held alike at 3 - 1 ulp on an AVX-512 one)."""
    crossings = _without_paddles_test().options.get("kink_crossings", [])
    if any(c["layer_type"] == "Hardswish" for c in crossings):
        pytest.skip("the two ports hold the Hardswish input on either side of 3 on this CPU: "
                    "x > k finds the crossing without Paddle's own test")


def test_without_paddles_own_test_the_same_port_fails():
    _held_alike_or_skip()
    r = _without_paddles_test()
    assert not r.passed
    assert r.first_failure.key.startswith("step1/grad/")
    assert not any(c["layer_type"] == "Hardswish" for c in r.options.get("kink_crossings", []))


def test_the_counterfactual_needs_the_element_moved_onto_paddles_side(monkeypatch):
    import reprod.align.counterfactual as cf

    _held_alike_or_skip()
    monkeypatch.setattr(cf, "onto_side", lambda x, *args: x)
    r = _run()
    check = r.options["counterfactual"]["step1"]
    assert check["failed"] > 0 and not r.passed, check


def test_a_functional_relu_in_the_port_pairs_with_its_convs_output():
    """paddle.vision's squeezenet1_1 applies ``F.relu`` to each conv's output where torchvision
    has ReLU modules: 6 kink layer calls against 58 in two steps, so nothing paired and a correct
    port failed (eval, seed 2: 275 keys, the first conv's gradient at 2,120x noise, from a ReLU
    crossing in features.11's squeeze activation). Each torch ReLU fed a conv's very output now
    pairs with the output of the Paddle conv that conv's weight pairs with."""
    p = build_pair("squeezenet1_1", 2)
    tm, pm = copy.deepcopy(p.torch32), p.paddle()
    squeezenet_as_torchvision(pm)
    tm.eval()
    pm.eval()
    r = align_train(
        tm, pm, [(make_inputs(2, 2), make_labels(2, 2))], steps=1, by_order=True, calibrate=True,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9),
        paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters()),
    )
    assert r.passed, r.to_table(failed_only=True)
    assert "skipped" not in r.options["kinks"] and r.options["kinks"]["layer_calls"] == 29
    relu = {c["layer"]: c["paddle_layer"] for c in r.options["kink_crossings"]
            if c["layer_type"] == "ReLU"}
    assert relu == {"features.11.squeeze_activation": "_conv7._conv._conv"}, relu
    check = r.options["counterfactual"]["step0"]
    assert check["failed"] == 0 and check["aligned"] > 30, check
