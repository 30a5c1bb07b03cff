"""The port run again over the same steps in float64 (``port_rounding.paddle_float64_run``) and
the later steps it explains (``rescued_later``).

Run free, Adam carries each side's float32 rounding from step to step: a faithful BERT port's
step-3 logits were 28x the reference's float64 distance, a GPT-2 port's LayerNorm gradients 24x
(tests/realworld/test_survey_fixes_real.py pins both). Where the port's own float64 run agrees
with the reference's, the two float32 runs part by their rounding; a bug stays in the float64
runs at full size.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod import compare  # noqa: E402
from reprod.align import align_train, load_into_paddle  # noqa: E402
from reprod.align import port_rounding as pr  # noqa: E402
from reprod.align.forcing import Unsupported  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((8, 16)).astype(np.float32)
Y = RNG.integers(0, 3, 8)


def _pair():
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    pm = paddle.nn.Sequential(paddle.nn.Linear(16, 32), paddle.nn.Tanh(), paddle.nn.Linear(32, 3))
    load_into_paddle(pm, tm)
    return tm, pm


def _adam(pm, **kw):
    return paddle.optimizer.Adam(1e-2, parameters=pm.parameters(), **kw)


def _steps(pm, opt, n, dtype=np.float32):
    out = []
    for _ in range(n):
        loss = paddle.nn.functional.cross_entropy(pm(paddle.to_tensor(X.astype(dtype))),
                                                  paddle.to_tensor(Y))
        loss.backward()
        opt.step()
        opt.clear_grad()
        out.append(float(loss))
    return out


def test_the_float64_run_trains_in_float64_and_puts_model_and_optimizer_back():
    tm, pm = _pair()
    opt = _adam(pm)
    _steps(pm, opt, 2)
    state = {k: v.numpy().copy() for k, v in pm.state_dict().items()}
    accs = {(a, p): v.numpy().copy() for a, d in opt._accumulators.items() for p, v in d.items()}
    start = {k: v.numpy().copy() for k, v in _pair()[1].state_dict().items()}
    seen = {}

    def run():
        seen["dtype"] = str(pm[0].weight.dtype)
        seen["losses"] = _steps(pm, opt, 3, np.float64)
        seen["moment"] = str(opt._accumulators["moment1"][pm[0].weight.name].dtype)

    pr.paddle_float64_run(pm, opt, start, run)
    assert seen["dtype"] == "paddle.float64" and seen["moment"] == "paddle.float64"
    # the float64 run is the same training in float64: torch's float64 run of it agrees
    t64 = _torch_float64_losses(3)
    np.testing.assert_allclose(seen["losses"], t64, rtol=1e-10)
    # and both are as they were: the next float32 step is the one it would have been
    assert str(pm[0].weight.dtype) == "paddle.float32"
    for k, v in pm.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
    for (a, p), v in accs.items():
        got = opt._accumulators[a][p]
        assert str(got.dtype) == "paddle.float32"
        np.testing.assert_array_equal(got.numpy(), v, err_msg=f"{a} {p}")
    twin_tm, twin_pm = _pair()
    twin_opt = _adam(twin_pm)
    _steps(twin_pm, twin_opt, 2)
    assert _steps(pm, opt, 1) == _steps(twin_pm, twin_opt, 1)


def _torch_float64_losses(n):
    tm = _pair()[0].double()
    # Paddle's Adam holds its betas' 1 - beta in float32 (1.3e-5 apart for 0.999): not in
    # float64, which takes the attribute as it is
    opt = torch.optim.Adam(tm.parameters(), lr=1e-2, eps=1e-8)
    out = []
    for _ in range(n):
        loss = torch.nn.functional.cross_entropy(tm(torch.from_numpy(X).double()),
                                                 torch.from_numpy(Y))
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(float(loss))
    return out


def test_a_model_holding_half_tensors_is_not_cast():
    _, pm = _pair()
    pm[2].to(dtype="float16")
    with pytest.raises(Unsupported, match="float16"):
        pr.paddle_float64_run(pm, _adam(pm), {}, lambda: None)


def _result(keys):
    return compare({k: v[0] for k, v in keys.items()}, {k: v[1] for k, v in keys.items()},
                   noise={k: v[2] for k, v in keys.items()})


def test_rescued_later_needs_both_float64_runs_to_agree_within_the_reference_s_noise():
    rng = np.random.default_rng(1)
    t64 = rng.standard_normal(100)
    t32 = t64 + 1e-7 * rng.standard_normal(100)  # the reference's float32 noise
    p32 = t64 + 5e-6 * rng.standard_normal(100)  # the port's: 50x it
    close = t64 + 1e-9 * rng.standard_normal(100)  # the port's float64 run: the reference's
    off = t64 * 1.0001  # another function in float64 too
    keys = {f"step{s}/grad/{n}": (t32, p32, t64) for s in (0, 2, 3) for n in ("a", "b")}
    r = _result(keys)
    assert all(not kr.passed for kr in r.results)
    port64 = {k: (off if k.endswith("/b") else close) for k in keys}
    ref, other, noise = ({k: v[i] for k, v in keys.items()} for i in range(3))
    out = pr.rescued_later(r, ref, other, noise, port64, forced={3})
    status = {kr.key: kr.status for kr in out.results}
    assert status == {"step0/grad/a": "failed", "step0/grad/b": "failed",  # step 0: its own check
                      "step2/grad/a": "known", "step2/grad/b": "failed",
                      "step3/grad/a": "failed", "step3/grad/b": "failed"}  # 3: judged forced
    assert "run in float64 over the same steps, it agrees with the reference's float64" in \
        out["step2/grad/a"].reason
    # a key the float64 run did not record keeps its verdict
    out = pr.rescued_later(r, ref, other, noise, {}, forced=set())
    assert [kr.status for kr in out.results] == [kr.status for kr in r.results]


def _train(tm, pm, popt, **kw):
    topt = torch.optim.Adam(tm.parameters(), lr=1e-2)
    return align_train(tm, pm, [(X, Y)], steps=3, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(), torch_optimizer=topt,
                       paddle_optimizer=popt, calibrate=True, check_settings=False, **kw)


def test_a_later_step_s_bug_is_not_put_down_to_rounding(monkeypatch):
    """Adam's epsilon 1e-6 for 1e-8: no update of step 0 shows it (each element moves by about
    lr), later ones do; the port's float64 run holds it too."""
    calls = []
    real = pr.paddle_float64_run

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pr, "paddle_float64_run", counted)
    tm, pm = _pair()
    r = _train(tm, pm, _adam(pm, epsilon=1e-3))
    assert not r.passed
    assert calls and r.options["port_rounding"]["later"] == {"known": 0}, \
        r.options.get("port_rounding")
    assert not any(kr.status == "known" and "over the same steps" in kr.reason
                   for kr in r.results)


def test_an_optimizer_that_trained_before_is_said_not_run_again(monkeypatch):
    tm, pm = _pair()
    popt = _adam(pm, epsilon=1e-3)
    _steps(pm, popt, 1)  # its state before align_train: no fresh start to run again from
    load_into_paddle(pm, tm)
    r = _train(tm, pm, popt)
    later = r.options["port_rounding"]["later"]
    assert later["skipped"].startswith("the Paddle optimizer held state before training")


def test_no_later_key_failing_runs_nothing(monkeypatch):
    monkeypatch.setattr(pr, "paddle_float64_run",
                        lambda *a, **k: pytest.fail("ran with nothing to explain"))
    tm, pm = _pair()
    r = _train(tm, pm, _adam(pm))
    assert r.passed and "later" not in r.options.get("port_rounding", {})

