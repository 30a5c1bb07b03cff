"""Learning-rate schedules compared far past the steps trained (``reprod.align.lr_schedule``).

Each schedule pair is stepped on alone from where training left it, from the rate both hold when
it ends (step ``done``). A pair that computes the same rates is no difference; one that differs at
step k (a cosine's ``T_max``, a warmup's length, a milestone) is one difference at the first step
where the rates part, its values checked against the schedule's closed form or against each
framework's own scheduler stepped in a plain training loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_train  # noqa: E402
from reprod.align.lr_schedule import compare_schedules  # noqa: E402

TS, PS = torch.optim.lr_scheduler, paddle.optimizer.lr


def _pair(make_torch, make_paddle, lr=0.1, done=3):
    """Both schedules, each stepped ``done`` times as training would have."""
    tm, pm = torch.nn.Linear(2, 2), paddle.nn.Linear(2, 2)
    topt = torch.optim.SGD(tm.parameters(), lr=lr)
    tsched = make_torch(topt)
    psched = make_paddle(lr)
    popt = paddle.optimizer.SGD(psched if psched is not None else lr, parameters=pm.parameters())
    for _ in range(done):
        topt.step()
        if tsched is not None:
            tsched.step()
        if psched is not None:
            psched.step()
    return tsched, topt, psched, popt


def _cosine(k, lr, t_max, eta_min=0.0):
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * k / t_max)) / 2


def test_the_same_cosine_is_no_difference_and_nothing_is_stepped():
    ts, to, ps, po = _pair(lambda o: TS.CosineAnnealingLR(o, T_max=2000),
                           lambda lr: PS.CosineAnnealingDecay(lr, T_max=2000))
    before = (ts.last_epoch, to.param_groups[0]["lr"], ps.last_epoch, ps.last_lr)
    diffs, info = compare_schedules(ts, to, ps, po, done=3)
    assert diffs == [] and info == {"horizon": 4010, "from_step": 3}
    # the schedulers and the optimizer are where they were
    assert (ts.last_epoch, to.param_groups[0]["lr"], ps.last_epoch, ps.last_lr) == before


@pytest.mark.parametrize("t_port", [1999, 20000])
def test_a_cosine_of_another_length_parts_where_its_rates_do(t_port):
    ts, to, ps, po = _pair(lambda o: TS.CosineAnnealingLR(o, T_max=2000),
                           lambda lr: PS.CosineAnnealingDecay(lr, T_max=t_port))
    (d,), info = compare_schedules(ts, to, ps, po, done=3)
    k = info["part_at"]
    assert d.setting == f"lr_at_step_{k}" and d.key == f"settings/optimizer/lr_at_step_{k}"
    # the values are each cosine's closed form at step k, and they part there first
    assert d.torch_value == pytest.approx(_cosine(k, 0.1, 2000), rel=1e-9)
    assert d.paddle_value == pytest.approx(_cosine(k, 0.1, t_port), rel=1e-9)
    assert not math.isclose(d.torch_value, d.paddle_value, rel_tol=1e-6)
    if k > 3:  # the step before, where simulated, agrees
        assert math.isclose(_cosine(k - 1, 0.1, 2000), _cosine(k - 1, 0.1, t_port),
                            rel_tol=1e-6)
    # where the closed forms first part beyond the tolerance, from the first step not trained
    assert k == next(j for j in range(3, 10_000) if not math.isclose(
        _cosine(j, 0.1, 2000), _cosine(j, 0.1, t_port), rel_tol=1e-6))


def test_a_warmup_is_compared_with_its_length():
    """torch's LinearLR warmup against Paddle's LinearWarmup around a constant rate."""
    def torch_warmup(o):
        return TS.LinearLR(o, start_factor=0.1, total_iters=100)

    same = _pair(torch_warmup, lambda lr: PS.LinearWarmup(lr, warmup_steps=100, start_lr=0.01,
                                                          end_lr=lr))
    assert compare_schedules(*same, done=3)[0] == []
    shorter = _pair(torch_warmup, lambda lr: PS.LinearWarmup(lr, warmup_steps=90,
                                                             start_lr=0.01, end_lr=lr))
    (d,), info = compare_schedules(*shorter, done=3)
    # the slopes differ from the first step on: the first not trained is step 3
    assert info["part_at"] == 3
    assert d.torch_value == pytest.approx(0.1 * (0.1 + 0.9 * 3 / 100))
    assert d.paddle_value == pytest.approx(0.01 + 0.09 * 3 / 90)


def test_a_milestone_past_the_steps_trained_is_found():
    ts, to, ps, po = _pair(lambda o: TS.MultiStepLR(o, milestones=[3000, 6000], gamma=0.1),
                           lambda lr: PS.MultiStepDecay(lr, milestones=[3000, 6500], gamma=0.1))
    (d,), info = compare_schedules(ts, to, ps, po, done=3)
    assert info["part_at"] == 6000 and info["horizon"] == 13010
    assert (d.torch_value, d.paddle_value) == (pytest.approx(1e-3), pytest.approx(1e-2))


def test_no_schedule_on_either_side_is_the_constant_rate():
    # a rate no scheduler moves is the one of every step trained, step 0's included
    assert compare_schedules(*_pair(lambda o: None, lambda lr: None), done=3) == (
        [], {"horizon": 1000, "from_step": 0})


def _rates_used(make_torch, make_paddle, n, lr=0.1):
    """The rate each side's optimizer uses at steps 0..n-1, from each framework's own scheduler
    stepped in a plain loop (no reprod): the reference the check's numbering must meet."""
    topt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)
    tsched, torch_rates = make_torch(topt), []
    psched, paddle_rates = make_paddle(lr), []
    for _ in range(n):
        torch_rates.append(topt.param_groups[0]["lr"])
        topt.step()
        tsched.step()
        paddle_rates.append(psched())
        psched.step()
    return torch_rates, paddle_rates


def _milestones(t, p):
    return (lambda o: TS.MultiStepLR(o, milestones=t, gamma=0.1),
            lambda lr: PS.MultiStepDecay(lr, milestones=p, gamma=0.1))


def test_a_milestone_at_the_first_step_not_trained_is_found_there():
    """After 3 steps (0, 1, 2) torch's milestone 3 and Paddle's 4 part at step 3 only: the rate
    both schedulers hold when training ends, which no step's lr key compares."""
    make_t, make_p = _milestones([3], [4])
    torch_rates, paddle_rates = _rates_used(make_t, make_p, 8)
    assert torch_rates[:3] == paddle_rates[:3]
    assert (torch_rates[3], paddle_rates[3]) == (pytest.approx(0.01), pytest.approx(0.1))
    assert torch_rates[4:] == pytest.approx(paddle_rates[4:])

    (d,), info = compare_schedules(*_pair(make_t, make_p, done=3), done=3)
    assert info["from_step"] == 3 and info["part_at"] == 3
    assert d.key == "settings/optimizer/lr_at_step_3"
    assert (d.torch_value, d.paddle_value) == (pytest.approx(torch_rates[3]),
                                               pytest.approx(paddle_rates[3]))


@pytest.mark.parametrize("done", [0, 3, 5])
def test_the_same_milestone_is_no_difference_at_any_step(done):
    make_t, make_p = _milestones([3], [3])
    torch_rates, paddle_rates = _rates_used(make_t, make_p, 8)
    assert torch_rates == pytest.approx(paddle_rates)
    assert compare_schedules(*_pair(make_t, make_p, done=done), done=done)[0] == []


@pytest.mark.parametrize("t, p", [([4], [5]), ([5], [6]), ([6], [5])])
def test_a_milestone_later_is_found_at_the_step_it_moves(t, p):
    make_t, make_p = _milestones(t, p)
    torch_rates, paddle_rates = _rates_used(make_t, make_p, 10)
    first = next(k for k, (a, b) in enumerate(zip(torch_rates, paddle_rates))
                 if not math.isclose(a, b, rel_tol=1e-6))
    (d,), info = compare_schedules(*_pair(make_t, make_p, done=3), done=3)
    assert info["part_at"] == first == min(t + p)
    assert (d.torch_value, d.paddle_value) == (pytest.approx(torch_rates[first]),
                                               pytest.approx(paddle_rates[first]))


def test_a_constant_rate_that_differs_is_named_at_step_0():
    ts, to, _, _ = _pair(lambda o: None, lambda lr: None, lr=0.1)
    _, _, ps, po = _pair(lambda o: None, lambda lr: None, lr=0.2)
    (d,), info = compare_schedules(ts, to, ps, po, done=3)
    assert info == {"horizon": 1000, "from_step": 0, "part_at": 0}
    assert d.line() == "optimizer: lr_at_step_0 0.1 in torch, 0.2 in Paddle"


def test_a_constant_rate_against_a_schedule_is_named_no_later_than_training_ends():
    """Paddle's StepDecay from 0.2 against torch's constant 0.1: they differ from step 0, which
    each step's lr key compares; of a scheduled rate only the current one is known."""
    ts, to, _, _ = _pair(lambda o: None, lambda lr: None, lr=0.1)
    _, _, ps, po = _pair(lambda o: None, lambda lr: PS.StepDecay(lr, step_size=1000), lr=0.2)
    (d,), info = compare_schedules(ts, to, ps, po, done=3)
    assert info["part_at"] == 3 and (d.torch_value, d.paddle_value) == (0.1, pytest.approx(0.2))


def test_a_schedule_on_a_metric_is_skipped_and_said():
    ts, to, ps, po = _pair(lambda o: TS.ReduceLROnPlateau(o), lambda lr: None, done=0)
    assert compare_schedules(ts, to, ps, po) == ([], {
        "skipped": "a schedule on a metric (ReduceLROnPlateau) steps on what training "
                   "measures, not on the step"})


def test_align_train_fails_a_schedule_its_steps_cannot_show():
    """Three steps of a cosine over 5,000 against one over 500 (the epochs for the
    iterations): every rate of the three steps passes within its noise; the schedules part."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.integers(0, 6, 4)

    def run(t_port):
        tm = torch.nn.Sequential(torch.nn.Linear(6, 6))
        pm = paddle.nn.Sequential(paddle.nn.Linear(6, 6))
        pm[0].weight.set_value(tm[0].weight.detach().numpy().T)
        pm[0].bias.set_value(tm[0].bias.detach().numpy())
        topt = torch.optim.SGD(tm.parameters(), lr=0.01)
        psched = PS.CosineAnnealingDecay(0.01, T_max=t_port)
        return align_train(
            tm, pm, [(x, y)], steps=3, torch_loss_fn=torch.nn.CrossEntropyLoss(),
            paddle_loss_fn=paddle.nn.CrossEntropyLoss(), torch_optimizer=topt,
            paddle_optimizer=paddle.optimizer.SGD(psched, parameters=pm.parameters()),
            torch_scheduler=TS.CosineAnnealingLR(topt, T_max=5000), paddle_scheduler=psched)

    r = run(500)
    (failed,) = [k for k in r.failed]
    assert failed.key.startswith("settings/optimizer/lr_at_step_") and failed.status == "setting"
    assert all(k.passed for k in r.results if k.key.endswith("/lr"))
    assert r.options["settings"]["optimizer"]["lr_schedule"]["part_at"] == int(
        failed.key.rpartition("_")[2])
    assert run(5000).passed


def _train(torch_sched, paddle_sched, torch_lr=0.1, paddle_lr=0.1):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.integers(0, 6, 4)
    tm = torch.nn.Sequential(torch.nn.Linear(6, 6))
    pm = paddle.nn.Sequential(paddle.nn.Linear(6, 6))
    pm[0].weight.set_value(tm[0].weight.detach().numpy().T)
    pm[0].bias.set_value(tm[0].bias.detach().numpy())
    topt = torch.optim.SGD(tm.parameters(), lr=torch_lr)
    tsched = None if torch_sched is None else torch_sched(topt)
    psched = None if paddle_sched is None else paddle_sched(paddle_lr)
    popt = paddle.optimizer.SGD(psched if psched is not None else paddle_lr,
                                parameters=pm.parameters())
    return align_train(
        tm, pm, [(x, y)], steps=3, torch_loss_fn=torch.nn.CrossEntropyLoss(),
        paddle_loss_fn=paddle.nn.CrossEntropyLoss(), torch_optimizer=topt,
        paddle_optimizer=popt, torch_scheduler=tsched, paddle_scheduler=psched)


def test_align_train_fails_a_milestone_at_the_step_after_training():
    """The tester's MPNet case on a small model: 3 steps, milestones 3 and 4. Every step
    trained agrees; the rate of step 3 is 0.01 in torch, 0.1 in Paddle."""
    r = _train(*_milestones([3], [4]))
    assert [k.key for k in r.failed] == ["settings/optimizer/lr_at_step_3"]
    assert r.options["settings"]["optimizer"]["lr_schedule"] == {
        "horizon": 1000, "from_step": 3, "part_at": 3}
    assert _train(*_milestones([3], [3])).passed


def test_align_train_names_a_constant_rate_2x_at_step_0():
    r = _train(None, None, paddle_lr=0.2)
    failed = [k.key for k in r.failed]
    assert "step0/lr" in failed and "settings/optimizer/lr_at_step_0" in failed
    assert not any(k.startswith("settings/optimizer/lr_at_step_") and k != (
        "settings/optimizer/lr_at_step_0") for k in failed)


def test_each_script_saves_its_schedule_and_the_files_compare(tmp_path):
    from reprod.align import compare_settings, save_settings
    from reprod.errors import ReprodError

    tm, pm = torch.nn.Linear(2, 2), paddle.nn.Linear(2, 2)
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    a = save_settings(tm, tmp_path / "t.json", optimizer=topt,
                      scheduler=TS.CosineAnnealingLR(topt, T_max=2000))
    files = {}
    for t_max in (2000, 1999):
        sched = PS.CosineAnnealingDecay(0.1, T_max=t_max)
        files[t_max] = save_settings(pm, tmp_path / f"p{t_max}.json", scheduler=sched,
                                     optimizer=paddle.optimizer.SGD(sched,
                                                                    parameters=pm.parameters()))
    assert compare_settings(a, files[2000]).passed
    (d,) = compare_settings(a, files[1999]).differ
    # saved before training: the first rate saved is step 1's
    k = next(j for j in range(1, 10_000) if not math.isclose(
        _cosine(j, 0.1, 2000), _cosine(j, 0.1, 1999), rel_tol=1e-6))
    assert d.line() == (f"optimizer: lr_at_step_{k} {_cosine(k, 0.1, 2000):g} in torch, "
                        f"{_cosine(k, 0.1, 1999):g} in Paddle")
    # a script that names no scheduler says nothing of its schedule: not compared
    b = save_settings(pm, tmp_path / "plain.json",
                      optimizer=paddle.optimizer.SGD(0.5, parameters=pm.parameters()))
    assert compare_settings(a, b).passed
    bad = tmp_path / "bad.json"
    bad.write_text(open(files[2000]).read().replace('"lrs": [', '"lrs": ["x", '))
    with pytest.raises(ReprodError, match=r"bad\.json: its lr_schedule is not \{lrs: \[rate, "
                                          r"\.\.\.\]\}"):
        compare_settings(a, str(bad))


def _hf_linear(step, *, num_warmup_steps, num_training_steps):
    # Hugging Face's get_linear_schedule_with_warmup: a LambdaLR of a partial of this
    if step < num_warmup_steps:
        return step / max(1, num_warmup_steps)
    return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))


def _paddlenlp_linear(lr, total_steps, warmup):
    # PaddleNLP's LinearDecayWithWarmup: a LambdaDecay of a closure over its lengths
    def lr_lambda(step):
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return PS.LambdaDecay(lr, lr_lambda)


@pytest.mark.parametrize("port_total", [100_000, 50_000])
def test_schedules_of_functions_are_stepped_as_far_as_the_lengths_they_hold(port_total):
    """A LambdaLR/LambdaDecay names no length: the two linear warmups of 2,000 steps, decaying
    over 100,000 against 50,000, were compared to step 1,000 only, and passed."""
    from functools import partial

    ts, to, ps, po = _pair(
        lambda o: TS.LambdaLR(o, partial(_hf_linear, num_warmup_steps=2000,
                                         num_training_steps=100_000)),
        lambda lr: _paddlenlp_linear(lr, port_total, 2000))
    diffs, info = compare_schedules(ts, to, ps, po, done=3)
    assert info["horizon"] == 100_000  # twice the longest length held, at most 100,000
    if port_total == 100_000:
        assert diffs == []
        return
    (d,) = diffs

    def rate(k, total):
        return _hf_linear(k, num_warmup_steps=2000, num_training_steps=total)

    # independently: where the two formulas' rates first part by more than 1e-6 of them
    k = next(k for k in range(3, 100_000) if abs(rate(k, 100_000) - rate(k, port_total)) >
             1e-6 * rate(k, 100_000))
    assert d.setting == f"lr_at_step_{k}" and info["part_at"] == k == 2001


@pytest.mark.parametrize("warmup", [False, True])
def test_a_peak_rate_2x_is_named_by_its_ratio_at_every_step(warmup):
    """The same schedule from another peak rate: every step's rate is 2x the reference's (a
    warmup from 0 has no ratio at step 0, and is passed over), named as such instead of "their
    kind, step size, decay, or how often each is stepped"."""
    if warmup:
        def ramp(k):
            return min(1.0, k / 2)
        r = _train(lambda o: TS.LambdaLR(o, ramp), lambda lr: PS.LambdaDecay(lr, ramp),
                   paddle_lr=0.2)
    else:
        r = _train(lambda o: TS.StepLR(o, 2, 0.5), lambda lr: PS.StepDecay(lr, 2, 0.5),
                   paddle_lr=0.2)
    steps = 2 if warmup else 3  # the steps either side has a rate at
    line = next(f for f in r.options["findings"] if "learning rate differs" in f)
    assert line.endswith(f"; the port's rate is 2x the reference's at each of the {steps} steps "
                         "with a rate: the same schedule from another peak (or initial) learning "
                         "rate"), line
    # a schedule that differs otherwise is not read as a ratio
    other = _train(lambda o: TS.StepLR(o, 2, 0.5), lambda lr: PS.StepDecay(lr, 1, 0.5))
    line = next(f for f in other.options["findings"] if "learning rate differs" in f)
    assert "x the reference's at each" not in line
