"""A correct Adam port whose update is at the mercy of a gradient at its noise level passes:
torchvision's squeezenet1_1 against paddle.vision's, train mode, Adam (lr 1e-3), seed 1, batch 2
at 224 px, 2 steps.

In step 0 a ReLU silences input channel 208 of the classifier conv for the whole batch: that
weight's gradient is exactly 0 on every side, and so are its moments. In step 1 its gradient is
1.9e-8 in torch and 9.3e-9 in Paddle, both within the key's noise (1.6e-5); Adam divides the first
moment by the root of the second, and the two updates are 0.43 and 0.29 of the learning rate:
the weight differs at 682x its noise. Step 0 passed plainly, so step 1 was judged free-running
only, and failed ("the optimizers' state differs"). Now the first failing step that fails only in
updated weights and optimizer state whose gradients align is judged again from the reference's
state, where torch's Adam given the port's gradient makes the port's update; a wrong beta1 or
epsilon still fails at step 0.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import torch  # noqa: E402
from models import build_pair, train_copies  # noqa: E402

from reprod.align import align_train  # noqa: E402

_PAIR: list = []


def _run(beta1: float = 0.9):
    if not _PAIR:
        _PAIR.append(build_pair("squeezenet1_1", 1))
    tm, pm, batches = train_copies(_PAIR[0], 1)
    return align_train(
        tm, pm, batches, steps=2, by_order=True, calibrate=True,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.Adam(tm.parameters(), lr=1e-3),
        paddle_optimizer=paddle.optimizer.Adam(1e-3, beta1=beta1, parameters=pm.parameters()),
    )


def test_an_update_of_a_gradient_at_its_noise_level_is_judged_from_the_same_state():
    r = _run()
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["forcing"]["steps"] == [1], r.options["forcing"]
    w = r["step1/param/_conv9.weight"]
    assert w.status == "kink" and w.noise_multiple > 100, (w.status, w.noise_multiple)
    assert "from the reference's state after step 0 the step aligns" in w.reason, w.reason


def test_a_wrong_beta1_still_fails():
    r = _run(beta1=0.8)
    assert not r.passed
    assert r.first_failure.key.startswith("step0/opt/") and "beta1" in " ".join(r.options["findings"])
