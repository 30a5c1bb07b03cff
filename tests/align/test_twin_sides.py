"""The float64 twin on the reference's side of each kink (``reprod.align.twin_sides``).

The twins: a Linear, a ReLU, a head. One element of the ReLU's input is 0 in float32 and 1e-6 in
float64 (the model adds an offset only a float64 run keeps: what a rounding that falls on either
side of 0 does), so the reference's float64 twin passes that element's gradient back into the
Linear and the float32 reference does not. The port computes as the float32 reference. Without the
twin moved onto the reference's side, the Linear's gradient "noise" holds that element's whole
gradient, and the port's Linear gradient scaled by 1.5 passes; with it, that noise is rounding,
and the scaled gradient fails, named.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_train, twin_sides  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((4, 6)).astype(np.float32)
Y = np.array([0, 1, 2, 0])


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        # element (0, 0) pinned to 0 (its gradient still reaches fc), plus 1e-6 in float64 only
        offset = torch.zeros_like(h)
        if h.dtype == torch.float64:
            offset[0, 0] = 1e-6
        pin = torch.ones_like(h)
        pin[0, 0] = 0.0
        h = h * pin + (h - h.detach()) * (1 - pin) + offset
        return self.head(self.act(h))


class PaddleNet(paddle.nn.Layer):
    def __init__(self, grad_scale: float = 1.0) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(6, 8)
        self.act = paddle.nn.ReLU()
        self.head = paddle.nn.Linear(8, 3)
        if grad_scale != 1.0:
            self.fc.weight.register_hook(lambda g: g * grad_scale)

    def forward(self, x):
        h = self.fc(x)
        pin = paddle.ones_like(h)
        pin[0, 0] = 0.0
        h = h * pin + (h - h.detach()) * (1 - pin)
        return self.head(self.act(h))


def _train(grad_scale: float = 1.0, **kw):
    torch.manual_seed(0)
    tm, pm = TorchNet(), PaddleNet(grad_scale)
    pm.set_state_dict({k: v.detach().numpy().T if v.ndim == 2 else v.detach().numpy()
                       for k, v in tm.state_dict().items()})
    kw.setdefault("steps", 1)
    return align_train(tm, pm, [(X, Y)], calibrate=True, **kw,
                       torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                       torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                       paddle_optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()))


def test_a_correct_port_passes_and_the_twin_took_the_reference_s_side():
    r = _train()
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["twin_sides"] == {"step": 0, "layers": ["act"], "elements": 1,
                                       "gradients": 4}


def test_a_scaled_gradient_under_the_crossing_fails_with_it_and_passed_without(monkeypatch):
    r = _train(grad_scale=1.5)
    assert not r.passed
    assert [k.key for k in r.failed if k.key.startswith("step0/grad/")] == [
        "step0/grad/fc.weight"]
    assert r["step0/grad/fc.weight"].noise_multiple > 1000
    # the twin on its own side: the element's gradient is in the noise, and the bug hides in it
    monkeypatch.setattr(twin_sides, "moved_inputs", lambda *a, **k: ({}, 0))
    hidden = _train(grad_scale=1.5)
    assert "twin_sides" not in hidden.options
    assert hidden["step0/grad/fc.weight"].passed, hidden["step0/grad/fc.weight"]


def test_moved_inputs_moves_only_the_elements_on_the_other_side():
    x32 = np.array([[0.0, 1.0, -2.0], [3.0, -1e-7, 0.5]], np.float32)
    x64 = x32.astype(np.float64)
    x64[0, 0], x64[1, 1] = 1e-9, 2e-7  # across 0: two elements; the rest as the reference's
    ref = {"act.in": x32, "act#2.in": x32, "other.in": x32}
    twin = {"act.in": x64, "act#2.in": x64.copy(), "other.in": x64}
    # act is called twice a pass: its call 2 is pass 0's second call, its call 3 would be pass 1
    moved, n = twin_sides.moved_inputs(ref, twin, {"act": "ReLU", "other": "MaxPool2d"},
                                       {"act": 2, "other": 1}, 0)
    assert sorted(moved) == ["act", "act#2"] and n == 4
    expected = x64.copy()
    expected[0, 0], expected[1, 1] = 0.0, np.float64(np.float32(-1e-7))
    np.testing.assert_array_equal(moved["act"], expected)
    assert moved["act"].dtype == np.float64
    # max-pool ties are not read from inputs; a pass other than the one asked for is left
    assert twin_sides.moved_inputs(ref, twin, {"act": "ReLU"}, {"act": 2}, 1) == ({}, 0)
    assert twin_sides.moved_inputs(ref, {"act.in": x32.astype(np.float64)}, {"act": "ReLU"},
                                   {"act": 2}, 0) == ({}, 0)


def test_verbose_says_what_moved_and_every_step_is_judged(capfd):
    """Three steps: only step 0's twin is moved (a later step's starts from its own weights)."""
    r = _train(steps=3, verbose=True)
    out = capfd.readouterr().out
    assert ("the float64 twin took 1 element of act to the other side of a kink at step 0: "
            "step 0's gradients are judged by the twin run again on the reference's side") in out
    assert {k.key.split("/")[0] for k in r} == {"step0", "step1", "step2"}
    assert r.options["twin_sides"]["step"] == 0
