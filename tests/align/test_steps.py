"""align_forward / align_train on a model written twice: what aligns, what is caught, what is refused."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from align_twins import PaddleNet, TorchNet, make_batch, twins  # noqa: E402

import reprod  # noqa: E402
from reprod.align import align_forward, align_train  # noqa: E402

LR, MU = 0.1, 0.9


def _train(tm, pm, *, steps=3, batches=None, torch_sched=None, paddle_sched=None, popt=None, **kw):
    tm.train()
    pm.train()
    topt = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MU)
    if popt is None:
        popt = paddle.optimizer.Momentum(learning_rate=LR, momentum=MU, parameters=pm.parameters())
    return align_train(
        tm,
        pm,
        batches if batches is not None else [make_batch(i) for i in range(steps)],
        torch_loss_fn=torch.nn.CrossEntropyLoss(),
        paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=topt,
        paddle_optimizer=popt,
        torch_scheduler=torch_sched(topt) if torch_sched else None,
        paddle_scheduler=paddle_sched,
        steps=steps,
        **kw,
    )


# --- forward -----------------------------------------------------------------------------------


def test_forward_aligns_within_1e5_and_restores_modes(tmp_path) -> None:
    tm, pm = twins(seed=0)
    tm.train()
    pm.train()
    inputs, _ = make_batch(7)
    r = align_forward(tm, pm, inputs, out_dir=tmp_path)
    assert r.passed and r.keys() == ["logits"]
    assert r["logits"].max_abs < 1e-5
    assert tm.training and pm.training and tm.bn.training and pm.bn.training
    # the dumps hold what each framework computes in eval mode, independently recomputed here
    tm.eval()
    with torch.no_grad():
        want = tm(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    np.testing.assert_array_equal(reprod.load(tmp_path / "forward_torch.npy")["logits"], want)
    log = (tmp_path / "forward_diff.log").read_text().splitlines()
    assert log[0].endswith("root INFO: logits: ")
    assert "mean diff: check passed: True" in log[1]
    assert log[-1].endswith("diff check passed")


def test_forward_catches_a_weight_that_was_not_copied() -> None:
    tm, pm = twins(seed=1)
    w = pm.norm.weight.numpy()
    w[3] += 0.5
    pm.norm.weight.set_value(w)
    r = align_forward(tm, pm, make_batch(0)[0])
    assert not r.passed and r.first_failure.key == "logits"


def test_forward_flattens_tuple_and_dict_outputs() -> None:
    tm, pm = twins(seed=2)

    class TWrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tm

        def forward(self, x, ids):
            out = self.net(x, ids)
            return out, {"prob": out.softmax(-1)}

    class PWrap(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.net = pm

        def forward(self, x, ids):
            out = self.net(x, ids)
            return out, {"prob": paddle.nn.functional.softmax(out, -1)}

    inputs, _ = make_batch(3)
    r = align_forward(TWrap(), PWrap(), (inputs["x"], inputs["ids"]))
    assert r.keys() == ["logits/0", "logits/1/prob"] and r.passed


# --- training ----------------------------------------------------------------------------------


def test_three_momentum_steps_align_in_loss_grads_and_weights(tmp_path) -> None:
    tm, pm = twins(seed=3)
    r = _train(tm, pm, out_dir=tmp_path)
    groups = {}
    for k in r:
        step, kind = k.key.split("/")[:2]
        groups.setdefault(kind, set()).add(step)
    assert set(groups) == {"logits", "loss", "lr", "grad", "param", "opt", "stat"}
    assert all(v == {"step0", "step1", "step2"} for v in groups.values())
    params = {n for n, _ in pm.named_parameters() if not _.stop_gradient}
    assert {k.key.split("/", 2)[2] for k in r if "/grad/" in k.key} == params
    for k in r:
        if "/stat/" not in k.key:
            assert k.passed, (k.key, k.reason)
    # both dumps follow SGD with momentum, v = mu*v + g; p -= lr*v, recomputed in numpy
    for side in ("torch", "paddle"):
        d = reprod.load(tmp_path / f"train_{side}.npy")
        for name in params:
            g0, g1, g2 = (d[f"step{i}/grad/{name}"].astype(np.float64) for i in range(3))
            p0, p1, p2 = (d[f"step{i}/param/{name}"].astype(np.float64) for i in range(3))
            v1 = MU * g0 + g1
            np.testing.assert_allclose(p1, p0 - LR * v1, atol=2e-6, err_msg=f"{side} {name}")
            # the momentum buffer (torch) and velocity (Paddle) after each step, as one key
            for i, v in enumerate((g0, v1, MU * v1 + g2)):
                np.testing.assert_allclose(d[f"step{i}/opt/{name}.velocity"], v, rtol=1e-5,
                                           atol=1e-6, err_msg=f"{side} {name} step {i}")
            np.testing.assert_allclose(
                p2, p1 - LR * (MU * v1 + g2), atol=2e-6, err_msg=f"{side} {name}"
            )


def test_batchnorm_running_variance_difference_is_found_and_explained(tmp_path) -> None:
    tm, pm = twins(seed=4)
    x = torch.from_numpy(make_batch(0)[0]["x"])
    with torch.no_grad():
        z = tm.conv(x)
    rv0 = tm.bn.running_var.detach().numpy().astype(np.float64)
    n = z.shape[0] * z.shape[2] * z.shape[3]
    biased = z.double().var(dim=(0, 2, 3), unbiased=False).numpy()
    r = _train(tm, pm, steps=1, out_dir=tmp_path)
    # the difference is there, over the threshold, and passes as the known difference it is
    var = r["step0/stat/bn._variance"]
    assert r.passed and var.passed and var.status == "known"
    assert var.mean_abs > 1e-5 and not var.checks["mean"]
    assert "biased batch variance" in var.note and "known framework difference" in var.reason
    assert "1 by a known framework difference" in r.summary_line() and "KNOWN" in r.to_table()
    assert "check passed: True" in (tmp_path / "train_diff.log").read_text().split(
        "bn._variance")[1].splitlines()[1]
    t = reprod.load(tmp_path / "train_torch.npy")["step0/stat/bn._variance"]
    p = reprod.load(tmp_path / "train_paddle.npy")["step0/stat/bn._variance"]
    np.testing.assert_allclose(t, 0.9 * rv0 + 0.1 * biased * n / (n - 1), rtol=1e-5)
    np.testing.assert_allclose(p, 0.9 * rv0 + 0.1 * biased, rtol=1e-5)
    tm2, pm2 = twins(seed=4)
    assert _train(tm2, pm2, steps=1, stats=False).passed


def test_step_decay_learning_rate_aligns_per_step() -> None:
    tm, pm = twins(seed=5)
    sched = paddle.optimizer.lr.StepDecay(learning_rate=LR, step_size=2, gamma=0.5)
    popt = paddle.optimizer.Momentum(learning_rate=sched, momentum=MU, parameters=pm.parameters())
    r = _train(
        tm,
        pm,
        steps=5,
        batches=[make_batch(0), make_batch(1)],
        popt=popt,
        paddle_sched=sched,
        torch_sched=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        stats=False,
    )
    assert r.passed, r.summary_line()
    assert [r[f"step{i}/lr"].passed for i in range(5)] == [True] * 5


def test_a_mismatched_schedule_is_caught_at_the_step_it_diverges(tmp_path) -> None:
    tm, pm = twins(seed=5)
    sched = paddle.optimizer.lr.StepDecay(learning_rate=LR, step_size=2, gamma=0.1)
    popt = paddle.optimizer.Momentum(learning_rate=sched, momentum=MU, parameters=pm.parameters())
    r = _train(
        tm,
        pm,
        steps=3,
        popt=popt,
        paddle_sched=sched,
        stats=False,
        out_dir=tmp_path,
        torch_sched=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )
    assert r.first_failure.key == "step2/lr"
    assert "StepDecay/StepLR" in r.first_failure.note
    lrs = [float(reprod.load(tmp_path / "train_torch.npy")[f"step{i}/lr"]) for i in range(3)]
    assert lrs == pytest.approx([0.1, 0.1, 0.05])
    assert float(reprod.load(tmp_path / "train_paddle.npy")["step2/lr"]) == pytest.approx(0.01)


def test_a_wrong_momentum_passes_step0_and_fails_from_step1() -> None:
    tm, pm = twins(seed=6)
    popt = paddle.optimizer.Momentum(learning_rate=LR, momentum=0.5, parameters=pm.parameters())
    r = _train(tm, pm, steps=2, popt=popt, stats=False)
    assert all(
        k.passed for k in r if k.key.startswith("step0/")
    )  # the first update is lr*g either way
    assert r.first_failure.key.startswith("step1/param/")


def test_train_logs_and_dumps_are_written_and_read_by_reprod_log(tmp_path) -> None:
    import reprod_log

    tm, pm = twins(seed=7)
    r = _train(tm, pm, steps=1, out_dir=tmp_path, stats=False)
    assert r.passed
    log = (tmp_path / "train_diff.log").read_text().splitlines()
    assert sum(line.endswith("root INFO: step0/loss: ") for line in log) == 1
    assert log[-1].endswith("diff check passed")
    helper = reprod_log.ReprodDiffHelper()
    a = helper.load_info(str(tmp_path / "train_torch.npy"))
    b = helper.load_info(str(tmp_path / "train_paddle.npy"))
    assert list(a) == list(b) == r.keys()


def test_loss_returning_reprod_log_style_dict_is_accepted() -> None:
    tm, pm = twins(seed=8)
    tm.train()
    pm.train()
    ce_t, ce_p = torch.nn.CrossEntropyLoss(), paddle.nn.CrossEntropyLoss()
    r = align_train(
        tm,
        pm,
        [make_batch(0)],
        steps=2,
        stats=False,
        torch_loss_fn=lambda out, y: {"loss": ce_t(out, y)},
        paddle_loss_fn=lambda out, y: {"loss": ce_p(out, y)},
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=LR),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=LR, parameters=pm.parameters()),
    )
    assert r.passed and "step1/loss" in r.keys()


# --- bad input ---------------------------------------------------------------------------------


def _one_line_reprod_error(exc_info, *needles: str) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_non_scalar_loss_is_refused() -> None:
    tm, pm = twins()
    tm.train()
    pm.train()
    with pytest.raises(reprod.ReprodError) as info:
        align_train(
            tm,
            pm,
            [make_batch(0)],
            torch_loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
            paddle_loss_fn=paddle.nn.CrossEntropyLoss(reduction="none"),
            torch_optimizer=torch.optim.SGD(tm.parameters(), lr=LR),
            paddle_optimizer=paddle.optimizer.SGD(learning_rate=LR, parameters=pm.parameters()),
        )
    _one_line_reprod_error(info, "torch_loss_fn", "shape [4]", "scalar")


def test_active_dropout_in_train_mode_is_refused() -> None:
    tm, pm = twins(dropout=0.3)
    with pytest.raises(reprod.ReprodError) as info:
        _train(tm, pm, steps=1)
    _one_line_reprod_error(info, "torch drop (p=0.3)", "paddle drop (p=0.3)", "dropout")
    # eval mode: dropout is off, nothing to refuse
    tm.eval()
    pm.eval()
    r = align_train(
        tm,
        pm,
        [make_batch(0)],
        torch_loss_fn=torch.nn.CrossEntropyLoss(),
        paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=LR),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=LR, parameters=pm.parameters()),
    )
    assert r.passed


def test_random_forward_without_a_dropout_layer_is_detected() -> None:
    class Noisy(TorchNet):
        def forward(self, x, ids):
            return torch.nn.functional.dropout(super().forward(x, ids), 0.5, self.training)

    torch.manual_seed(0)
    tm, pm = Noisy(), PaddleNet()
    tm.train()
    pm.train()
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    with pytest.raises(reprod.ReprodError) as info:
        _train(tm, pm, steps=1)
    _one_line_reprod_error(info, "torch model gives different outputs", "random")
    for k, v in tm.state_dict().items():  # the probe left the BatchNorm statistics as they were
        assert torch.equal(v, before[k]), k


def test_models_in_different_modes_are_refused() -> None:
    tm, pm = twins()
    tm.train()
    pm.eval()
    with pytest.raises(reprod.ReprodError) as info:
        align_train(
            tm,
            pm,
            [make_batch(0)],
            torch_loss_fn=torch.nn.CrossEntropyLoss(),
            paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
            torch_optimizer=torch.optim.SGD(tm.parameters(), lr=LR),
            paddle_optimizer=paddle.optimizer.SGD(learning_rate=LR, parameters=pm.parameters()),
        )
    _one_line_reprod_error(info, "torch model is in train mode", "Paddle model in eval mode")


def test_a_port_that_does_not_mirror_the_model_is_refused_before_training() -> None:
    class Short(PaddleNet):
        def __init__(self) -> None:
            super().__init__()
            self.norm = paddle.nn.LayerNorm(16, weight_attr=False, bias_attr=False)

    tm = TorchNet()
    with pytest.raises(reprod.KeyMismatchError) as info:
        _train(tm, Short(), steps=1)
    _one_line_reprod_error(info, "norm.weight (missing in paddle)", "norm.bias (missing in paddle)")


@pytest.mark.parametrize("batches", [[], [make_batch(0)[0]], "abc"])
def test_malformed_batches_are_refused(batches) -> None:
    tm, pm = twins()
    with pytest.raises(reprod.ReprodError):
        _train(tm, pm, steps=1, batches=batches)


# --- the optimizers' state after each step --------------------------------------------------------


def _one_step(make_optimizers, **kw):
    """One calibrated training step of the twins; ``make_optimizers(tm, pm)`` gives the two
    optimizers."""
    tm, pm = twins(seed=0)
    tm.train()
    pm.train()
    topt, popt = make_optimizers(tm, pm)
    return align_train(
        tm, pm, [make_batch(0)], steps=1, calibrate=True,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=topt, paddle_optimizer=popt, **kw)


def _wd_run(*, torch_wd=1e-4, paddle_wd=None, momentum=MU, **kw):
    return _one_step(lambda tm, pm: (
        torch.optim.SGD(tm.parameters(), lr=0.01, momentum=momentum, weight_decay=torch_wd),
        paddle.optimizer.Momentum(learning_rate=0.01, momentum=momentum,
                                  parameters=pm.parameters(), weight_decay=paddle_wd)), **kw)


def test_a_weight_decay_below_the_weights_resolution_shows_in_the_momentum_buffers() -> None:
    """torch's SGD with weight decay 1e-4 at lr 0.01 against a port that leaves the decay out:
    one step moves the weights by 1e-6 x themselves, within their calibrated noise, and the
    weights pass key by key; the momentum buffer holds g + 1e-4 w against the port's g, and
    fails. Without the buffers, the decay each side's update fits (``reprod.align.decay``)
    tells."""
    blind = _wd_run(optimizer_state=False)
    assert not blind.passed and blind.options["decay"]
    assert all(k.key.startswith("step0/param/") and k.noise_multiple < 20 for k in blind.failed
               if k.status != "setting")
    r = _wd_run()
    assert not r.passed
    assert all(k.passed for k in r if "/opt/" not in k.key and k.status != "setting"), \
        r.to_table(failed_only=True)
    failed = [k.key for k in r.failed if k.status != "setting"]
    assert failed and all(k.startswith("step0/opt/") and k.endswith(".velocity") for k in failed)
    finding, setting = r.options["findings"]
    assert "the momentum buffers are apart by 0.0001 x the weights, the reference's the larger: " \
           "a weight decay" in finding, finding
    # and the optimizers' settings say it outright
    assert [k.key for k in r.failed if k.status == "setting"] == ["settings/optimizer/weight_decay"]
    assert "optimizer: weight_decay 'L2 0.0001' in torch, 'none' in Paddle" in setting
    assert _wd_run(paddle_wd=1e-4).passed  # the same decay on both sides


def test_state_only_one_side_keeps_is_left_out() -> None:
    """torch's SGD keeps no momentum buffer at momentum 0; Paddle's Momentum keeps a velocity
    (of the same update): nothing to pair, no key, and the run passes."""
    r = _wd_run(torch_wd=0.0, momentum=0.0)
    assert r.passed and not any("/opt/" in k.key for k in r), r.keys()


def _adam_run(*, torch_kw=None, paddle_kw=None, **kw):
    """One Adam step, lr 1e-3; ``*_kw`` set one side's optimizer."""
    return _one_step(lambda tm, pm: (
        torch.optim.Adam(tm.parameters(), lr=1e-3, **(torch_kw or {})),
        paddle.optimizer.Adam(1e-3, parameters=pm.parameters(), **(paddle_kw or {}))), **kw)


def test_adam_moments_are_recorded_as_paddle_weighs_them(tmp_path) -> None:
    """Paddle's Adam weighs each gradient into its moments by 1 - beta made in float32 (1.3e-5
    low for beta2 = 0.999); torch's moments are recorded with that weight, so a correct port's
    moments align, and both dumps hold Paddle's formula (numpy, float32 weights)."""
    r = _adam_run(out_dir=tmp_path)
    assert r.passed, r.to_table(failed_only=True)
    names = {k.split("/", 2)[2] for k in r.keys() if k.startswith("step0/grad/")}
    assert {k.split("/", 2)[2] for k in r.keys() if k.startswith("step0/opt/")} == {
        f"{n}.{m}" for n in names for m in ("moment1", "moment2")}
    w1 = float(np.float32(1.0) - np.float32(0.9))
    w2 = float(np.float32(1.0) - np.float32(0.999))
    for side in ("torch", "paddle"):
        d = reprod.load(tmp_path / f"train_{side}.npy")
        for n in names:
            g = d[f"step0/grad/{n}"].astype(np.float64)
            np.testing.assert_allclose(d[f"step0/opt/{n}.moment1"], w1 * g, rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(d[f"step0/opt/{n}.moment2"], w2 * g * g, rtol=1e-5,
                                       atol=1e-15)


def test_a_wrong_adam_beta1_is_named_from_the_first_moments() -> None:
    """beta1 0.8 against 0.9: the first update is lr * sign(g)-like on both sides (the weights
    align), the first moments are 0.2 g against 0.1 g: 2x, and the finding says beta1."""
    r = _adam_run(paddle_kw={"beta1": 0.8})
    assert not r.passed
    assert {k.key.rpartition(".")[2] for k in r.failed if k.status != "setting"} == {"moment1"}, \
        r.to_table(failed_only=True)
    assert r["settings/optimizer/betas"].reason.startswith(
        "optimizer: betas (0.9, 0.999) in torch, (0.8, 0.999) in Paddle")
    finding, _ = r.options["findings"]
    assert "the port's moment1 is 2x the reference's: the first moment is (1 - beta1) x the " \
           "gradient after the first update: Adam's beta1 differs" in finding, finding


def test_an_adam_weight_decay_the_port_leaves_out_is_named_from_the_first_moments() -> None:
    """torch's Adam adds 0.01 w to the gradient; the port adds nothing. Adam's normalised update
    hides it in the weights (no learning rate or decay fits their difference); the first
    moments are apart by (1 - beta1) 0.01 w."""
    r = _adam_run(torch_kw={"weight_decay": 0.01})
    assert not r.passed
    found = " ".join(r.options["findings"])
    assert "Adam's first moments are apart by 0.001 x the weights, the reference's the larger: " \
           "a weight decay" in found, r.options["findings"]


class _EpochScheduler:
    """timm's scheduler interface: ``step(epoch)`` and ``step_update(num_updates)``."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def step(self, epoch: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = LR / (epoch + 1)


def test_a_scheduler_that_cannot_be_stepped_alone_is_refused_in_one_line() -> None:
    from reprod import ReprodError

    tm, pm = twins(seed=5)
    with pytest.raises(ReprodError, match=r"^torch_scheduler: _EpochScheduler\.step\(\) after "
                                          r"step 0 failed \(.*epoch.*\); align_train steps a "
                                          r"scheduler once per training step"):
        _train(tm, pm, steps=2, stats=False, check_settings=False, torch_sched=_EpochScheduler)
