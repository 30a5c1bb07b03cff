"""``reprod.align.forcing``: torch optimizer state carried into Paddle's accumulators, and Paddle's
float32 Adam bias corrections, each checked against what the two frameworks compute."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import load_into_paddle  # noqa: E402
from reprod.align.forcing import (  # noqa: E402
    Unsupported,
    _float32_rate,
    adam_betas,
    load_paddle_optimizer,
)
from reprod.align.framework import _torch_params_plan  # noqa: E402

X = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


class PaddleNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


def _pair():
    torch.manual_seed(0)
    tm, pm = TorchNet(), PaddleNet()
    load_into_paddle(pm, tm)
    return tm, pm


def _steps(tm, pm, topt, popt, n):
    """``n`` steps of each side on X, loss sum(out^2) (gradients differ from step to step)."""
    for _ in range(n):
        topt.zero_grad()
        (tm(torch.from_numpy(X)) ** 2).sum().backward()
        topt.step()
        popt.clear_grad()
        (pm(paddle.to_tensor(X)) ** 2).sum().backward()
        popt.step()


OPTIMIZERS = {
    "momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                 lambda p: paddle.optimizer.Momentum(0.1, 0.9, parameters=p)),
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01),
             lambda p: paddle.optimizer.Adam(0.01, parameters=p)),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
              lambda p: paddle.optimizer.AdamW(0.01, parameters=p, weight_decay=0.01)),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_torch_state_becomes_the_accumulators_paddle_made_itself(kind) -> None:
    """After two identical steps each side holds its own state; torch's, loaded into Paddle,
    is what Paddle computed itself (to float32 rounding: moments in Paddle's own weighting, beta
    powers bit for bit), the Linear weight's transposed."""
    tm, pm = _pair()
    make_t, make_p = OPTIMIZERS[kind]
    topt, popt = make_t(tm.parameters()), make_p(pm.parameters())
    _steps(tm, pm, topt, popt, 2)
    own = {(a, p): np.array(t.numpy()) for a, d in popt._accumulators.items()
           for p, t in d.items()}
    assert own
    for t in (t for d in popt._accumulators.values() for t in d.values()):
        t.set_value(np.zeros(t.shape, np.float32))  # nothing of Paddle's own is left
    load_paddle_optimizer(popt, copy.deepcopy(topt.state_dict()), topt, tm, pm,
                          _torch_params_plan(tm, None))
    for (a, p), value in own.items():
        got = popt._accumulators[a][p].numpy()
        if a.endswith("_pow_acc"):
            np.testing.assert_array_equal(got, value, err_msg=f"{a} {p}")
        else:
            np.testing.assert_allclose(got, value, rtol=2e-6, atol=1e-9, err_msg=f"{a} {p}")


def test_state_without_a_counterpart_is_refused() -> None:
    """Paddle's Momentum against torch's plain SGD: the velocity has no torch counterpart, and
    left as it was it would carry the port's own history into the step."""
    tm, pm = _pair()
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    popt = paddle.optimizer.Momentum(0.1, 0.9, parameters=pm.parameters())
    _steps(tm, pm, topt, popt, 1)
    with pytest.raises(Unsupported, match="velocity"):
        load_paddle_optimizer(popt, topt.state_dict(), topt, tm, pm, _torch_params_plan(tm, None))
    tm, pm = _pair()
    topt = torch.optim.Adam(tm.parameters(), lr=0.01, amsgrad=True)
    popt = paddle.optimizer.Adam(0.01, parameters=pm.parameters())
    _steps(tm, pm, topt, popt, 1)
    with pytest.raises(Unsupported, match="max_exp_avg_sq"):
        load_paddle_optimizer(popt, topt.state_dict(), topt, tm, pm, _torch_params_plan(tm, None))


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.99), (0.9, 0.98)])
def test_paddle_adam_update_over_torch_is_the_float32_rate(betas) -> None:
    """From the same weights and the same gradients, Paddle's k-th Adam update is R_k times
    torch's: exactly at the first, then R - 1 of a few 1e-6 (the ratio measured on a parameter
    whose gradient is the same every step, so that both sides' moments stay equal)."""
    b1, b2 = betas
    tp = torch.nn.Parameter(torch.full((64,), 0.5))
    pp = paddle.create_parameter([64], "float32",
                                 default_initializer=paddle.nn.initializer.Constant(0.5))
    topt = torch.optim.Adam([tp], lr=0.01, betas=betas)
    popt = paddle.optimizer.Adam(0.01, beta1=b1, beta2=b2, parameters=[pp])
    g = np.linspace(0.5, 2.0, 64).astype(np.float32)
    assert adam_betas(popt) == (b1, b2, 0)
    for k in range(1, 5):
        # each update from 0: its float32 value resolves it to 1e-7 (from 0.5, to 6e-6)
        with torch.no_grad():
            tp.zero_()
        pp.set_value(np.zeros(64, np.float32))
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        pp.grad = paddle.to_tensor(g)  # noqa: B010 - set as paddle's backward does
        popt.step()
        ratio = float(np.median(pp.numpy().astype(np.float64) / tp.detach().numpy()))
        r = _float32_rate(b1, b2, k)
        assert abs(ratio - r) < 3e-7, (k, ratio, r)  # two float32 roundings of 0.01
        if k == 1:
            assert r == pytest.approx(1.0, abs=1e-15)
        elif betas == (0.9, 0.999):  # torch's defaults: more than float32 weights resolve
            assert abs(r - 1.0) > 1e-6
    assert adam_betas(popt) == (b1, b2, 4)


@pytest.mark.parametrize("kind", ["momentum", "adam", "adamw"])
def test_replayed_is_the_reference_optimizers_own_step(kind) -> None:
    """One step of a copy of the torch optimizer over one parameter, from a saved state, gives
    bit for bit what the optimizer itself gave that parameter (Linear weight in Paddle's
    layout)."""
    from reprod.align.forcing import replayed

    tm, pm = _pair()
    topt = OPTIMIZERS[kind][0](tm.parameters())
    plan = _torch_params_plan(tm, None)
    for _ in range(2):
        topt.zero_grad()
        (tm(torch.from_numpy(X)) ** 2).sum().backward()
        if _ == 1:
            state = copy.deepcopy(topt.state_dict())
            before = {n: p.detach().numpy().copy() for n, p in tm.named_parameters()}
            grads = {n: p.grad.numpy().copy() for n, p in tm.named_parameters()}
        topt.step()
    kept = copy.deepcopy(before)
    for name, p in tm.named_parameters():
        kp = plan[name]
        t = (lambda a: a.T) if kp.action == "transpose" else (lambda a: a)
        got = replayed(topt, state, tm, kp, t(before[name]), t(grads[name]))
        np.testing.assert_array_equal(got, t(p.detach().numpy()), err_msg=name)
        # the weights it starts from stay as they were: a Linear weight's transposed view was
        # handed to torch as it lay and stepped in place, moving the copy localisation starts
        # from (and the decay fit's weights before training)
        np.testing.assert_array_equal(before[name], kept[name], err_msg=name)
    assert plan["fc.weight"].action == "transpose"


def _result(statuses: dict):
    from reprod.diff.result import DiffResult, KeyResult

    return DiffResult(results=tuple(
        KeyResult(key=k, passed=s in ("passed", "known", "kink"), status=s, reason="")
        for k, s in statuses.items()))


def test_the_first_step_failing_only_in_its_updates_is_forced_under_adam() -> None:
    from reprod.align.forcing import steps_to_force

    base = {"step0/grad/w": "passed", "step0/param/w": "passed", "step1/grad/w": "passed",
            "step1/param/w": "failed", "step1/opt/w.moment2": "failed",
            "step2/grad/w": "failed", "step2/param/w": "failed"}
    r = _result(base)
    assert steps_to_force(r) == []  # nothing explained earlier: the free run's verdicts stand
    assert steps_to_force(r, normalised=True) == [1, 2]
    # a failing gradient in that step is no update of an aligned gradient: nothing forced
    assert steps_to_force(_result(dict(base, **{"step1/grad/w": "failed"})), normalised=True) == []
    # nor a failing loss
    assert steps_to_force(_result(dict(base, **{"step1/loss": "failed"})), normalised=True) == []
    # an explanation in step 0 forces the steps after it, as before
    explained = dict(base, **{"step0/param/w": "kink"})
    assert steps_to_force(_result(explained)) == [1, 2]
    assert steps_to_force(_result(explained), normalised=True) == [1, 2]
    # step 0 started from one state on both sides: there is nothing to judge it again from
    assert steps_to_force(_result({"step0/grad/w": "passed", "step0/param/w": "failed"}),
                          normalised=True) == []
