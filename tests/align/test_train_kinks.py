"""align_train(calibrate=True) explains kink crossings: gradients that differ only because a ReLU
input sits within noise of 0, on opposite sides in torch and in a correct Paddle port.

The twins: fc0 (identity) -> fc1 -> act (ReLU) -> fc2, written once per framework. fc1 sums its
three products in an order set per model (as tests/capture/test_kinks.py): for the first sample's
first unit the products are 1, 3e-8 and -1, so torch's order ((1 - 1) + 3e-8) gives the exact
3e-8, like float64, while the port's ((1 + 3e-8) - 1) rounds it to 0: a correct float32 result on
the other side of ReLU's kink. The ReLU then passes the gradient of that element in torch and
stops it in Paddle, and the gradients of fc1 and fc0 (and the weights updated with them) differ by
far more than float32 noise, while fc2's gradients and every forward key align.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_train, load_into_paddle  # noqa: E402
from reprod.storage import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "capture"))
from ordered_linear import PaddleOrderedLinear, TorchOrderedLinear  # noqa: E402

X = np.array([[1.0, 3e-8, -1.0], [0.3, -0.7, 0.9]], dtype=np.float32)
W1 = np.array([[1.0, 1.0, 1.0], [0.5, -1.2, 0.8], [-0.9, 0.4, 0.3], [0.7, 0.2, -1.1]], np.float32)
W2 = np.array([[0.6, -0.3, 0.9, 0.2], [-0.4, 0.8, 0.1, 0.5]], np.float32)
LOSS_W = np.array([[1.0, -2.0], [0.5, 1.5]], np.float32)
ACCURATE, NAIVE = (0, 2, 1), (0, 1, 2)
LR = 0.5

# the keys the crossing reaches in step 0: the gradients of the layers called before the ReLU,
# and those parameters after the update
UPSTREAM = {"step0/grad/fc0.weight", "step0/grad/fc1.weight",
            "step0/param/fc0.weight", "step0/param/fc1.weight"}


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0 = torch.nn.Linear(3, 3, bias=False)
        self.fc1 = TorchOrderedLinear(W1, ACCURATE)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.fc0.weight.copy_(torch.eye(3))
            self.fc2.weight.copy_(torch.from_numpy(W2))
            self.fc2.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.fc0(x))))


class PaddleNet(paddle.nn.Layer):
    def __init__(self, *, functional_relu: bool = False) -> None:
        super().__init__()
        self.fc0 = paddle.nn.Linear(3, 3, bias_attr=False)
        self.fc1 = PaddleOrderedLinear(W1, NAIVE)
        self.act = None if functional_relu else paddle.nn.ReLU()
        self.fc2 = paddle.nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(self.fc0(x))
        h = paddle.nn.functional.relu(h) if self.act is None else self.act(h)
        return self.fc2(h)


def _torch_loss(out):  # no labels: called with the outputs alone
    return (out * torch.from_numpy(LOSS_W).to(out.dtype)).sum()


def _paddle_loss(out):
    return (out * paddle.to_tensor(LOSS_W)).sum()


def _optimizers(tm, pm, opt: str, **paddle_kw):
    """The two optimizers of a run: SGD, SGD with momentum, Adam; ``paddle_kw`` sets the port's
    hyperparameters apart from the reference's (an injected optimizer bug)."""
    if opt == "sgd":
        return (torch.optim.SGD(tm.parameters(), lr=LR),
                paddle.optimizer.SGD(learning_rate=LR, parameters=pm.parameters()))
    if opt == "momentum":
        return (torch.optim.SGD(tm.parameters(), lr=LR, momentum=0.9),
                paddle.optimizer.Momentum(learning_rate=LR, parameters=pm.parameters(),
                                          **{"momentum": 0.9, **paddle_kw}))
    return (torch.optim.Adam(tm.parameters(), lr=0.05),
            paddle.optimizer.Adam(learning_rate=0.05, parameters=pm.parameters(), **paddle_kw))


def _train(*, steps: int = 1, bug: str | None = None, functional_relu: bool = False,
           opt: str = "sgd", paddle_opt_kw=None, **kw):
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchNet(), PaddleNet(functional_relu=functional_relu)
    load_into_paddle(pm, tm)
    if bug == "fc0":  # a wrong weight before the ReLU: its input differs, no crossing
        pm.fc0.weight.set_value(pm.fc0.weight.numpy() * 1.001)
    elif bug == "fc2":  # after it: the crossing is still there, the logits differ
        pm.fc2.weight.set_value(pm.fc2.weight.numpy() * 1.001)
    elif bug == "grad_fc0":  # before it, in the backward pass only
        pm.fc0.weight.register_hook(lambda g: g * 1.5)
    return align_train(
        tm, pm, [(X, None)], steps=steps,
        torch_loss_fn=_torch_loss, paddle_loss_fn=_paddle_loss,
        **dict(zip(("torch_optimizer", "paddle_optimizer"),
                   _optimizers(tm, pm, opt, **(paddle_opt_kw or {})))),
        **{"calibrate": True, "stats": False, **kw},
    )


def test_the_port_crosses_the_kink_and_fails_upstream_without_the_explanation() -> None:
    r = _train(kinks=False)
    assert {k.key for k in r.failed} == UPSTREAM, r.to_table(failed_only=True)
    assert all(k.status == "failed" for k in r.failed)
    assert "kinks" not in r.options and "kink_crossings" not in r.options
    # the forward pass and fc2's gradient align: the difference starts at the ReLU's backward
    for key in ("step0/logits", "step0/loss", "step0/grad/fc2.weight", "step0/grad/fc2.bias"):
        assert r[key].passed, key


def test_calibrate_explains_the_crossing_and_passes() -> None:
    plain = _train(kinks=False)
    r = _train()  # kinks defaults to calibrate
    assert r.passed, r.to_table(failed_only=True)
    assert {k.key for k in r if k.status == "kink"} == UPSTREAM
    for key in UPSTREAM:
        k = r[key]
        assert k.passed and k.noise_multiple == plain[key].noise_multiple  # statistics kept
        assert "kink crossing at act (ReLU): 1 element within noise of 0 on opposite sides" in (
            k.reason
        ), k.reason
    assert r["step0/param/fc1.weight"].reason.startswith(
        "updated with step0/grad/fc1.weight, downstream of the kink crossing at act (ReLU)"
    )
    # every other key keeps its verdict, and only align_train's keys are in the result
    assert [k.key for k in r] == [k.key for k in plain]
    for k in r:
        if k.key not in UPSTREAM:
            assert k.status == plain[k.key].status == "passed", k.key
    assert r.options["kinks"] == {"explained": len(UPSTREAM), "crossings": 1, "layer_calls": 1}
    (crossing,) = r.options["kink_crossings"]
    assert crossing["layer"] == "act" and crossing["paddle_layer"] == "act"
    assert crossing["elements"] == 1 and crossing["explained"] == len(UPSTREAM)


def test_a_second_step_after_the_crossing_is_explained_as_later(tmp_path) -> None:
    plain = _train(steps=2, kinks=False)
    r = _train(steps=2, out_dir=tmp_path, verbose=False)
    assert r.passed, r.to_table(failed_only=True)
    later = {k.key for k in plain.failed if k.key.startswith("step1/")}
    assert later, "the weights of step 1 carry step 0's difference"
    for key in later:
        assert r[key].status == "kink", key
        assert r[key].reason.startswith("after the kink crossing at act (ReLU)"), r[key].reason
        # confirmed: step 1 run again on both sides from the reference's state aligns
        assert "; from the reference's state after step 0 the step aligns (" in r[key].reason
    assert r.options["forcing"] == {"steps": [1], "failed": 0}
    # the dumps keep the documented keys only: the layer captures are gone
    for name in ("train_torch.npy", "train_paddle.npy", "train_torch64.npy"):
        keys = list(load(str(tmp_path / name)).keys())
        assert keys and all(k.startswith(("step0/", "step1/")) for k in keys), (name, keys)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_a_correct_optimizer_after_the_crossing_passes_step_by_step(opt) -> None:
    """The momentum buffer and Adam's moments and step count reach the port: a correct port's
    later steps, each from the reference's state, align."""
    r = _train(steps=3, opt=opt)
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["forcing"] == {"steps": [1, 2], "failed": 0}


@pytest.mark.parametrize("opt, paddle_kw, bad", [
    ("momentum", {"momentum": 0.5}, "momentum"),
    ("adam", {"beta1": 0.5}, "beta1"),
])
def test_an_optimizer_bug_after_the_crossing_is_not_put_down_to_it(opt, paddle_kw, bad) -> None:
    """The first update of SGD with momentum and of Adam does not show the momentum or beta1;
    free-running, every key of step 1 differs after step 0's crossing and was put down to it
    (the run passed). Each step judged from the reference's state fails the port's weights."""
    ok = _train(steps=2, opt=opt)
    r = _train(steps=2, opt=opt, paddle_opt_kw=paddle_kw)
    assert ok.passed and not r.passed
    if bad == "beta1":
        # Adam's first moment after the first update is (1 - beta1) g: the optimizer state
        # shows the wrong beta1 at step 0, where the weights cannot
        assert r.first_failure.key.startswith("step0/opt/"), r.to_table(failed_only=True)
        assert r.first_failure.key.endswith(".moment1")
        assert all(k.passed for k in r if k.key.startswith(("step0/param/", "step0/grad/")))
        r = _train(steps=2, opt=opt, paddle_opt_kw=paddle_kw, optimizer_state=False)
        assert not r.passed
    assert r.first_failure.key.startswith("step1/param/"), r.to_table(failed_only=True)
    first = r.first_failure
    assert first.reason.startswith("from the reference's state after step 0 (weights, "
                                   "statistics, optimizer state): "), first.reason
    assert "free-running: after the kink crossing at act (ReLU)" in first.note, first.note
    assert r.options["forcing"] == {"steps": [1], "failed": 1}
    # step 1's gradients, computed from the same weights, align: the update rule differs
    assert all(k.passed for k in r if k.key.startswith("step1/grad/"))
    assert "the optimizers' state differs" not in " ".join(r.options["findings"])
    assert "hyperparameters differ" in " ".join(r.options["findings"]), r.options["findings"]


@pytest.mark.parametrize("bug", ["fc0", "fc2"])
def test_a_real_bug_still_fails_with_the_explanation_on(bug) -> None:
    r = _train(bug=bug)
    assert not r.passed
    assert not r["step0/logits"].passed and r["step0/logits"].status == "failed"
    if bug == "fc0":  # the ReLU's input differs: a divergence, no crossing, nothing relabelled
        assert r.options["kink_crossings"] == [] and r.options["kinks"]["explained"] == 0
        assert not any(k.status == "kink" for k in r)
        assert r.first_failure.key == "step0/logits"
        assert "step0/grad/fc1.weight" in {k.key for k in r.failed}
        # fc0's gradient does not depend on fc0's weight: run in float64 the port's equals the
        # reference's, and its float32 difference is the port's rounding across the ReLU
        g = r["step0/grad/fc0.weight"]
        assert g.status == "known" and "the port's float32 rounding" in g.reason, g.reason
        assert r.options["port_rounding"]["step0"]["known"] == 1
    else:  # the crossing explains what is upstream of it; the bug's own keys keep failing
        assert r["step0/param/fc2.weight"].status == "failed"
        assert r["step0/loss"].status == "failed"


def test_uncalibrated_kinks_use_a_few_rounding_units_of_the_input() -> None:
    plain = _train(calibrate=False, method="max", threshold=1e-6)  # kinks follows calibrate: off
    assert {k.key for k in plain.failed} == UPSTREAM and "kinks" not in plain.options
    r = _train(calibrate=False, method="max", threshold=1e-6, kinks=True)
    assert r.passed and {k.key for k in r if k.status == "kink"} == UPSTREAM


def test_a_functional_activation_in_the_port_pairs_with_its_layers_output() -> None:
    # the port calls relu as a function on fc1's output: torch's act (fed fc1's very output) pairs
    # with the output of the Paddle layer fc1.weight pairs with
    r = _train(functional_relu=True)
    assert r.passed, r.to_table(failed_only=True)
    assert {k.key for k in r if k.status == "kink"} >= UPSTREAM
    (crossing,) = r.options["kink_crossings"]
    assert crossing["layer"] == "act" and crossing["paddle_layer"] == "fc1", crossing
    assert r.options["counterfactual"]["step0"]["failed"] == 0
    # a backward bug before it is still not put down to it
    bad = _train(functional_relu=True, bug="grad_fc0")
    assert not bad.passed and bad["step0/grad/fc0.weight"].status == "failed"


def test_kink_layers_that_do_not_pair_are_not_explained() -> None:
    from reprod.align.kinks import KinkCapture

    # torch's act is fed by a layer no Paddle parameter pairs with: nothing to record in Paddle
    tm, pm = TorchNet(), PaddleNet(functional_relu=True)
    kink = KinkCapture(tm, pm, {"fc0.weight": "fc0.weight"})
    kink.order, kink.fed = ["<model>", "fc0", "fc1", "act", "fc2"], {"act": "fc1"}
    kink._pair_functional()
    assert kink.out_sites == {} and kink.functional == set()
    why = kink._check([("act", 1)], [], None, {})
    assert why is not None and "called 1 times" in why
    # fed by fc1, which pairs: fc1's output is recorded as the site act pairs with
    kink = KinkCapture(tm, pm, {"fc1.weight": "fc1.weight"})
    kink.order, kink.fed = ["<model>", "fc0", "fc1", "act", "fc2"], {"act": "fc1"}
    kink._pair_functional()
    assert kink.out_sites == {"fc1": "fc1+relu"} and kink.site_layer == {"fc1+relu": "act"}
    assert kink._check([("act", 1)], [("fc1+relu", 1)], None, {}) is None
    assert "called 0 times" in kink._check([("act", 1)], [], None, {})
    # an input that is not the layer's very output (fed: None) pairs nothing
    kink = KinkCapture(tm, pm, {"fc1.weight": "fc1.weight"})
    kink.order, kink.fed = ["<model>", "fc0", "fc1", "act", "fc2"], {"act": None}
    kink._pair_functional()
    assert kink.out_sites == {}


def test_the_call_order_records_which_layer_feeds_each_kink_call() -> None:
    from reprod.align.kinks import _call_order

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(2, 2, 1)
            self.relu = torch.nn.ReLU(inplace=True)
            self.pool = torch.nn.MaxPool1d(2)
            self.lin = torch.nn.Linear(2, 2)
            self.act = torch.nn.ReLU()
            self.act2 = torch.nn.ReLU()

        def forward(self, x):
            h = self.pool(self.relu(self.conv(x)))  # pool takes relu's (in-place) output
            y = self.act(self.lin(h.mean(-1)))
            return self.act2(y * 2)  # a product, no layer's output

    order: list[str] = []
    fed: dict = {}
    net = Net()
    with _call_order(net, order, fed, frozenset({"relu", "pool", "act", "act2"})):
        net(torch.ones(1, 2, 4))
    assert fed == {"relu": "conv", "pool": None, "act": "lin", "act2": None}
    assert order == ["<model>", "conv", "relu", "pool", "lin", "act", "act2"]


def test_verbose_prints_the_kink_line(capsys) -> None:
    _train(verbose=True)
    out = capsys.readouterr().out
    assert "kink crossings: 4 keys explained (kink crossing at act (ReLU)" in out
    # printed once, after the labels were checked against the counterfactual
    assert out.count("kink crossings:") == 1
    assert ("; checked against the reference with the port's side of each crossing: 2 gradients "
            "align, 0 do not") in out, out


def test_a_model_without_kink_layers_records_nothing_and_says_so() -> None:
    # align_twins calls relu as a function on both sides: there is no layer to capture
    from align_twins import make_batch, twins

    tm, pm = twins(0)
    tm.train()
    pm.train()
    kw = dict(
        steps=1, calibrate=True, stats=False,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
    )
    r = align_train(tm, pm, [make_batch(0)], kinks=True,
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                    paddle_optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()), **kw)
    assert r.passed
    assert r.options["kinks"]["explained"] == 0
    assert "no layer of a class with kinks" in r.options["kinks"]["skipped"]
    assert all(k.key.startswith("step0/") for k in r)


# --- the crossing's claim checked: the reference's backward with the port's side of the kink ---


def test_the_counterfactual_is_the_float64_backward_with_the_ports_side_of_the_kink() -> None:
    """Against numpy in float64: the twin's gradients with the ReLU's input replaced by the
    port's (the crossing element 0.0 where torch has 3e-8, every other element as the port
    rounded it), so that the ReLU stops that element's gradient as the port's does."""
    from reprod.align.counterfactual import counterfactual_grads
    from reprod.align.framework import _torch_params_plan

    tm = TorchNet()
    plan = _torch_params_plan(tm, None)
    names = {kp.paddle_name for kp in plan.values()}
    x, w1 = X.astype(np.float64), W1.astype(np.float64)
    w2, lw = W2.astype(np.float64), LOSS_W.astype(np.float64)
    h1 = x @ w1.T  # fc0 is the identity
    assert h1[0, 0] > 0  # float64 has the element above the kink, as torch's float32
    port = h1.astype(np.float32)
    port[0, 0] = 0.0  # the port's value
    grads, why = counterfactual_grads(
        tm, tm.state_dict(), (X, None), loss_fn=_torch_loss, seed=0, plan=plan,
        inputs={"act": port}, sites={}, names=names)
    assert why is None and set(grads) == names

    p = port.astype(np.float64)
    a = np.maximum(p, 0.0)
    d_h1 = (lw @ w2) * (p > 0)
    expected = {"fc0.weight": (d_h1 @ w1).T @ x, "fc1.weight": d_h1.T @ x,
                "fc2.weight": lw.T @ a, "fc2.bias": lw.sum(0)}
    for tname, kp in plan.items():
        want = expected[tname].T if kp.action == "transpose" else expected[tname]
        np.testing.assert_allclose(grads[kp.paddle_name], want, rtol=1e-12, atol=1e-15)
    # the port's side changed what a plain float64 backward computes: fc1's first row
    assert not np.allclose(expected["fc1.weight"][0], ((lw @ w2) * (h1 > 0)).T[0] @ x)


def test_a_counterfactual_that_cannot_be_built_says_why() -> None:
    from reprod.align.counterfactual import counterfactual_grads
    from reprod.align.framework import _torch_params_plan

    tm = TorchNet()
    plan = _torch_params_plan(tm, None)
    kw = dict(loss_fn=_torch_loss, seed=0, plan=plan, sites={}, names={"fc1.weight"})
    value = np.zeros((2, 4), np.float32)
    for inputs, why in (({"act#2": value}, "the float64 twin did not call act#2"),
                        ({"act": np.zeros(3, np.float32)}, "not of the recorded"),
                        ({"nowhere": value}, "no layer nowhere in the float64 twin")):
        grads, got = counterfactual_grads(tm, tm.state_dict(), (X, None), inputs=inputs, **kw)
        assert grads == {} and why in got, got


@pytest.mark.parametrize("steps", [1, 2])
def test_a_backward_bug_before_the_crossing_is_not_put_down_to_it(steps) -> None:
    """A port whose fc0 weight gradient is 1.5x the true one (a gradient hook; the forward pass
    is untouched): fc0 is called before the ReLU whose crossing explains the gradients of the
    layers before it, and the run used to pass. With the port's side of the crossing the
    reference computes fc1's gradient as the port does, and not fc0's."""
    ok = _train(steps=steps)
    r = _train(steps=steps, bug="grad_fc0")
    assert ok.passed and not r.passed
    first = r.first_failure
    assert first.key == "step0/grad/fc0.weight", r.to_table(failed_only=True)
    assert first.reason.startswith("not explained by the kink crossing at act (ReLU): 1 element "
                                   "within noise of 0 on opposite sides: with the port's side of "
                                   "each crossing of step 0, the reference's float64 gradient "
                                   "is still "), first.reason
    assert r["step0/param/fc0.weight"].reason.startswith(
        "updated with step0/grad/fc0.weight, which no kink crossing explains")
    fc1 = r["step0/grad/fc1.weight"]
    assert fc1.status == "kink" and "the reference's float64 gradient aligns (" in fc1.reason
    for run, failed in ((ok, 0), (r, 1)):
        check = run.options["counterfactual"]["step0"]
        assert (check["aligned"], check["failed"]) == (2 - failed, failed), check
    assert ok.options["counterfactual"]["step0"]["worst"] < 20
    assert r.options["counterfactual"]["step0"]["first"] == {
        "param": "fc0.weight", "layer": "fc0", "type": "Linear"}
    assert r.options["findings"][-1].startswith(
        "backward diverges at fc0 (Linear): the port's gradient of fc0.weight is "), \
        r.options["findings"]
    assert r.options["divergence"]["layer"] == "fc0"
    if steps == 2:  # step 1 is no longer "after the crossing": its difference starts at the bug
        assert not any(k.reason.startswith("after the kink crossing") for k in r), \
            r.to_table(failed_only=True)
        # run from the reference's state, step 1 computes fc1's gradient as the reference
        # does; free-running it differs, carrying step 0's bug, and fails saying so
        fc1 = r["step1/grad/fc1.weight"]
        assert not fc1.passed and fc1.reason.startswith(
            "after step0/grad/fc0.weight, which no kink crossing explains; "), fc1.reason
        assert "the step aligns: its difference is step 0's, carried" in fc1.reason
        assert {k.status for k in ok if k.key.startswith("step1/")} <= {"passed", "kink"}


class _TorchTwoReLUs(TorchNet):
    def __init__(self) -> None:
        super().__init__()
        self.act2 = torch.nn.ReLU()

    def forward(self, x):
        return self.act2(super().forward(x))


class _PaddleModuleAndFunctional(PaddleNet):
    def forward(self, x):  # the port's second ReLU is a function call
        return paddle.nn.functional.relu(super().forward(x))


def test_mixed_module_and_functional_relus_pass_by_the_ports_float64_run(monkeypatch) -> None:
    """Two ReLU modules against one module and one ``F.relu``: the calls do not pair (the kink
    explanation is all or nothing per class, and fails closed), yet the crossing is the port's
    rounding: run in float64 from the same state, its gradients are the reference's."""
    from reprod.align import steps

    def run():
        torch.manual_seed(0)
        paddle.seed(0)
        tm, pm = _TorchTwoReLUs(), _PaddleModuleAndFunctional()
        load_into_paddle(pm, tm)
        topt, popt = _optimizers(tm, pm, "sgd")
        return align_train(tm, pm, [(X, None)], steps=1, torch_loss_fn=_torch_loss,
                           paddle_loss_fn=_paddle_loss, torch_optimizer=topt,
                           paddle_optimizer=popt, calibrate=True, stats=False)

    r = run()
    assert "do not pair by order" in r.options["kinks"]["skipped"]
    assert r.passed and {k.key for k in r if k.status == "known"} == UPSTREAM, r.to_table()
    monkeypatch.setattr(steps.port_rounding, "needed", lambda result: False)
    assert {k.key for k in run().failed} == UPSTREAM
