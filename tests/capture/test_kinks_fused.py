"""Kink crossings at a Paddle layer with a built-in activation: torch's ``BatchNorm2d`` then
``ReLU`` against Paddle's ``BatchNorm(4, act="relu")`` (reprod.capture.kinks.fused, and its use
in ``align_train``).

The twins: fc0 (identity) -> fc1 -> bn (train mode) -> ReLU -> fc2, on 3 samples. fc1 sums its
three products in an order set per model (as test_kinks.py): for the first sample's first unit
the products are 1, 3e-8 and -1, so torch's order gives 3e-8, like float64, and the port's rounds
it to 0. The other two samples give that unit exactly 1 and -1 in either order, so the batch mean
of channel 0 is ~0 and the first sample's normalised value is ~2e-8 in torch (and float64) and
exactly 0 in Paddle: a correct float32 result on the other side of ReLU's kink, inside Paddle's
fused layer, where no layer's input or output shows it. The ReLU then passes that element's
gradient in torch and stops it in Paddle, and the gradients of bn.bias, fc1 and fc0 (and the
weights updated with them) differ by ~1e7 times the noise.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from ordered_linear import PaddleOrderedLinear, TorchOrderedLinear  # noqa: E402

from reprod.align import align_train, load_into_paddle  # noqa: E402
from reprod.capture.kinks.fused import fused_activations, record_sites  # noqa: E402
from reprod.logger import ReprodLogger  # noqa: E402

X = np.array([[1.0, 3e-8, -1.0], [0.5, 0.25, 0.25], [-0.5, -0.25, -0.25]], dtype=np.float32)
W1 = np.array([[1.0, 1.0, 1.0], [0.5, -1.2, 0.8], [-0.9, 0.4, 0.3], [0.7, 0.2, -1.1]], np.float32)
W2 = np.array([[0.6, -0.3, 0.9, 0.2], [-0.4, 0.8, 0.1, 0.5]], np.float32)
LOSS_W = np.array([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.7]], np.float32)
ACCURATE, NAIVE = (0, 2, 1), (0, 1, 2)
LR = 0.5

# what the crossing reaches in step 0: the gradients of the layers called before the ReLU (bn's
# weight gradient sums g * x_hat, and x_hat is ~0 at the crossing element: it aligns), and those
# parameters after the update
UPSTREAM = {"step0/grad/fc0.weight", "step0/grad/fc1.weight", "step0/grad/bn.bias",
            "step0/param/fc0.weight", "step0/param/fc1.weight", "step0/param/bn.bias"}


class TorchNet(torch.nn.Module):
    def __init__(self, *, functional_relu: bool = False, extra_bn: bool = False) -> None:
        super().__init__()
        self.fc0 = torch.nn.Linear(3, 3, bias=False)
        self.fc1 = TorchOrderedLinear(W1, ACCURATE)
        # a norm the port does not have: the fused layer's pairing by order fails
        self.pre = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False) if extra_bn else None
        self.bn = torch.nn.BatchNorm2d(4)
        self.act = None if functional_relu else torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.fc0.weight.copy_(torch.eye(3))
            self.fc2.weight.copy_(torch.from_numpy(W2))
            self.fc2.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x):
        h = self.fc0(x)
        if self.pre is not None:
            h = h + 0.0 * self.pre(h)
        h = self.bn(self.fc1(h).reshape(-1, 4, 1, 1))
        h = torch.nn.functional.relu(h) if self.act is None else self.act(h)
        return self.fc2(h.flatten(1))


class PaddleNet(paddle.nn.Layer):
    def __init__(self, *, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.fc0 = paddle.nn.Linear(3, 3, bias_attr=False)
        self.fc1 = PaddleOrderedLinear(W1, NAIVE)
        self.bn = paddle.nn.BatchNorm(4, act="relu", epsilon=epsilon)
        self.fc2 = paddle.nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn(self.fc1(self.fc0(x)).reshape([-1, 4, 1, 1]))
        return self.fc2(h.flatten(1))


def _torch_loss(out):  # no labels: called with the outputs alone
    return (out * torch.from_numpy(LOSS_W).to(out.dtype)).sum()


def _paddle_loss(out):
    return (out * paddle.to_tensor(LOSS_W)).sum()


def _models(*, epsilon: float = 1e-5, **torch_kw):
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchNet(**torch_kw), PaddleNet(epsilon=epsilon)
    load_into_paddle(pm, tm)
    tm.train()
    pm.train()
    return tm, pm


def _train(*, steps: int = 1, epsilon: float = 1e-5, grad_bug: str | None = None,
           torch_kw: dict | None = None, **kw):
    tm, pm = _models(epsilon=epsilon, **(torch_kw or {}))
    if grad_bug is not None:  # a wrong backward for one parameter of the port
        dict(pm.named_parameters())[grad_bug].register_hook(lambda g: g * 1.01)
    return align_train(
        tm, pm, [(X, None)], steps=steps,
        torch_loss_fn=_torch_loss, paddle_loss_fn=_paddle_loss,
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=LR),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=LR, parameters=pm.parameters()),
        **{"calibrate": True, **kw},
    )


# --- the capture of a fused layer's pre-activation ----------------------------------------------


def test_fused_activations_lists_the_paddle_layers_with_a_kink_activation() -> None:
    class OwnForward(paddle.nn.BatchNorm):  # may use _act its own way: not taken apart
        def forward(self, x):
            return super().forward(x)

    model = paddle.nn.Sequential(
        paddle.nn.BatchNorm(4, act="relu"), paddle.nn.BatchNorm(4, act="relu6"),
        paddle.nn.BatchNorm(4, act="hard_swish"), paddle.nn.BatchNorm(4, act="sigmoid"),
        paddle.nn.BatchNorm(4), paddle.nn.BatchNorm2D(4), paddle.nn.ReLU(),
        OwnForward(4, act="relu"),
    )
    assert fused_activations(model) == {"0": "ReLU", "1": "ReLU6", "2": "Hardswish"}
    assert fused_activations(TorchNet()) == {}


def test_the_site_records_the_value_before_the_activation_and_changes_nothing() -> None:
    _, pm = _models()
    x = paddle.to_tensor(X, stop_gradient=False)
    plain = pm(x)
    (gx_plain,) = paddle.grad(_paddle_loss(plain), x)
    log = ReprodLogger()
    with record_sites(pm, log, {"bn": "bn+relu"}):
        assert pm.bn._act is None  # the hook applies it instead
        x2 = paddle.to_tensor(X, stop_gradient=False)
        out = pm(x2)
        (gx,) = paddle.grad(_paddle_loss(out), x2)
    assert pm.bn._act == "relu"
    # the same output and input gradient, bit for bit: the same operators ran
    np.testing.assert_array_equal(out.numpy(), plain.numpy())
    np.testing.assert_array_equal(gx.numpy(), gx_plain.numpy())
    pre = log.data["bn+relu.in"]
    assert pre.shape == (3, 4, 1, 1) and pre.min() < 0  # before the ReLU
    pm.bn._act = None  # the layer without its activation computes the recorded value
    np.testing.assert_array_equal(pm.bn(pm.fc1(pm.fc0(paddle.to_tensor(X))).reshape([-1, 4, 1, 1]))
                                  .numpy(), pre)
    pm.bn._act = "relu"
    with pytest.raises(RuntimeError), record_sites(pm, ReprodLogger(), {"bn": "bn+relu"}):
        raise RuntimeError("the block fails")
    assert pm.bn._act == "relu" and not pm.bn._forward_post_hooks


def test_the_twins_put_the_normalised_element_on_opposite_sides_of_0() -> None:
    """What the align_train tests below rest on, read from the sites of both sides."""
    tm, pm = _models()
    seen = {}
    for side, model, x in (("torch", tm, torch.from_numpy(X)),
                           ("torch64", _models()[0].double(), torch.from_numpy(X).double()),
                           ("paddle", pm, paddle.to_tensor(X))):
        log = ReprodLogger()
        with record_sites(model, log, {"bn": "bn+relu"}):
            model(x)
        seen[side] = np.asarray(log.data["bn+relu.in"])
    assert seen["torch"][0, 0, 0, 0] > 0 and seen["torch64"][0, 0, 0, 0] > 0
    assert seen["paddle"][0, 0, 0, 0] == 0
    assert np.max(np.abs(seen["torch"] - seen["paddle"])) < 1e-6  # yet the values align


# --- align_train ----------------------------------------------------------------------------------


def test_without_the_explanation_the_gradients_upstream_of_the_fused_layer_fail() -> None:
    r = _train(kinks=False)
    assert {k.key for k in r.failed} == UPSTREAM, r.to_table(failed_only=True)
    for key in ("step0/logits", "step0/loss", "step0/grad/fc2.weight", "step0/grad/bn.weight"):
        assert r[key].passed, key


def test_the_crossing_inside_the_fused_layer_explains_them() -> None:
    r = _train()
    assert r.passed, r.to_table(failed_only=True)
    assert {k.key for k in r if k.status == "kink"} == UPSTREAM
    (crossing,) = r.options["kink_crossings"]
    # the torch ReLU that takes bn's output stands for the activation inside Paddle's bn
    assert (crossing["layer"], crossing["paddle_layer"], crossing["elements"]) == ("act", "bn", 1)
    assert crossing["message"] == "kink crossing at act (ReLU): 1 element within noise of 0 on opposite sides"
    assert r.options["kinks"] == {"explained": 6, "crossings": 1, "layer_calls": 1}
    assert r["step0/grad/fc1.weight"].reason.startswith(f"downstream of the {crossing['message']}")
    # the captures stay out of the result
    assert not any("+relu" in k.key or k.key.startswith("act") for k in r)


def test_after_a_functional_relu_the_site_is_the_norm_layers_own() -> None:
    """torchvision's DenseNet applies F.relu after its last norm: no torch layer takes the
    output, and the site is a layer of its own, placed right after the norm."""
    r = _train(torch_kw={"functional_relu": True})
    assert r.passed, r.to_table(failed_only=True)
    assert {k.key for k in r if k.status == "kink"} == UPSTREAM
    (crossing,) = r.options["kink_crossings"]
    assert (crossing["layer"], crossing["paddle_layer"]) == ("bn+relu", "bn")


def test_a_second_step_carries_the_difference_and_is_explained_as_later() -> None:
    r = _train(steps=2)
    assert r.passed, r.to_table(failed_only=True)
    later = [k for k in r if k.status == "kink" and k.key.startswith("step1/")]
    assert later and all("in an earlier step" in k.reason for k in later)
    assert r.options["kinks"]["layer_calls"] == 2


def test_a_wrong_epsilon_in_the_fused_layer_is_not_explained_away() -> None:
    r = _train(epsilon=1e-3)
    assert not r.passed
    assert [k.key for k in r if k.status == "kink"] == []
    assert r.options["kink_crossings"] == []  # its normalised values differ: no crossing
    # bn.bias's gradient does not depend on the epsilon: run in float64 the port's is the
    # reference's, and its float32 difference is the port's rounding across the ReLU
    assert r["step0/grad/bn.bias"].status == "known"
    assert "the port's float32 rounding" in r["step0/grad/bn.bias"].reason
    assert UPSTREAM - {"step0/grad/bn.bias", "step0/param/bn.bias"} <= {k.key for k in r.failed}
    assert not r["step0/logits"].passed


def test_a_wrong_gradient_after_the_fused_layer_keeps_failing() -> None:
    r = _train(grad_bug="fc2.weight")
    assert {k.key for k in r.failed} == {"step0/grad/fc2.weight", "step0/param/fc2.weight"}
    assert r.first_failure.key == "step0/grad/fc2.weight"
    assert {k.key for k in r if k.status == "kink"} == UPSTREAM


def test_norm_layers_that_do_not_pair_by_order_fail_closed(monkeypatch) -> None:
    r = _train(torch_kw={"extra_bn": True})
    assert r.options["kinks"]["explained"] == 0
    assert "batch-norm layers in torch" in r.options["kinks"]["skipped"]
    # the crossing is rounding all the same: the port run in float64 is the reference's (the
    # extra norm adds 0 x its output), which the kink pairing does not need
    assert r.passed and all(r[k].status == "known" for k in UPSTREAM), r.to_table()
    from reprod.align import steps

    monkeypatch.setattr(steps.port_rounding, "needed", lambda result: False)
    r = _train(torch_kw={"extra_bn": True})
    assert UPSTREAM <= {k.key for k in r.failed}
