"""``align_train`` says where a failing run first goes wrong, and why (``options["findings"]``).

Each test injects one porting mistake into the Paddle twin of a small network and checks the
finding against what was injected: a LayerNorm epsilon (the forward, localised layer by layer),
an activation whose backward is wrong and a detached branch (the backward, localised layer by
layer), a summed loss, a weight decay, another learning rate for one parameter group, another
momentum. Before, a failing run named its first failing key only, and for a backward bug that
was the first parameter in definition order, whatever was wrong.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest

import reprod

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from align_twins import make_batch, twins  # noqa: E402

from reprod.align import align_train  # noqa: E402

LR, MU = 0.1, 0.9


def _train(tm, pm, *, steps=2, popt=None, ploss=None, topt=None, **kw):
    tm.train()
    pm.train()
    topt = topt or torch.optim.SGD(tm.parameters(), lr=LR, momentum=MU)
    popt = popt or paddle.optimizer.Momentum(learning_rate=LR, momentum=MU,
                                             parameters=pm.parameters())
    return align_train(tm, pm, [make_batch(i) for i in range(steps)],
                       torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=ploss or paddle.nn.CrossEntropyLoss(),
                       torch_optimizer=topt, paddle_optimizer=popt, steps=steps, **kw)


def _forward(pm, act=None, detach=False):
    """The Paddle twin's forward with its ReLU after fc1 replaced, or its embedding detached."""
    act = act or paddle.nn.functional.relu

    def forward(self, x, ids):
        h = paddle.nn.functional.relu(self.bn(self.conv(x))).mean(axis=(2, 3))
        e = self.emb(ids).mean(axis=1)
        h = h + (e.detach() if detach else e)
        h = self.norm(act(self.fc1(h)))
        return self.head(self.drop(h))

    pm.forward = types.MethodType(forward, pm)


def test_a_correct_port_has_only_the_known_batchnorm_difference() -> None:
    r = _train(*twins(0))
    assert r.passed and "findings" not in r.options
    assert {k.key for k in r if k.status == "known"} == {
        "step0/stat/bn._variance", "step1/stat/bn._variance"}


def test_a_forward_bug_is_localised_at_its_layer_with_its_cause() -> None:
    tm, pm = twins(0)
    pm.norm._epsilon = 1e-3
    r = _train(tm, pm)
    assert r.first_failure.key == "step0/logits"
    found = r.options["findings"]
    assert found[0].startswith("diverges at norm (LayerNorm): input aligned"), found
    assert found[1] == "likely cause at norm: LayerNorm epsilon: port uses ~1e-3, reference 1e-5"
    assert r.options["divergence"]["layer"] == "norm"


class _HalfGradReLU(paddle.autograd.PyLayer):
    """ReLU whose backward passes half the gradient: a custom op ported wrongly."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return paddle.nn.functional.relu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        return grad * (x > 0).astype(grad.dtype) * 0.5


class _Act(paddle.nn.Layer):
    def forward(self, x):
        return _HalfGradReLU.apply(x)


@pytest.mark.parametrize("calibrate", [False, True])
def test_a_backward_bug_is_localised_at_its_layer(calibrate) -> None:
    tm, pm = twins(0)
    tm.act = torch.nn.ReLU()  # the same ReLU as a layer on both sides: the bug is in its backward

    def torch_forward(self, x, ids):
        h = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        h = h + self.emb(ids).mean(dim=1)
        return self.head(self.drop(self.norm(self.act(self.fc1(h)))))

    tm.forward = types.MethodType(torch_forward, tm)
    pm.act = _Act()
    _forward(pm, act=pm.act)
    r = _train(tm, pm, calibrate=calibrate)
    # the outputs and the loss align; the gradients of everything before the ReLU do not
    assert r["step0/logits"].passed and r["step0/loss"].passed
    assert not r["step0/grad/fc1.weight"].passed and r["step0/grad/head.weight"].passed
    found = r.options["findings"]
    assert found[0].startswith("backward diverges at act (ReLU vs _Act): incoming gradient "
                               "aligned"), found
    assert r.options["divergence"] == {**r.options["divergence"], "layer": "act",
                                       "direction": "backward"}


def test_a_detached_branch_is_named_where_the_gradient_stops() -> None:
    tm, pm = twins(0)
    _forward(pm, detach=True)
    r = _train(tm, pm)
    assert r.first_failure.key == "step0/grad/emb.weight"
    assert r.options["findings"] == [
        "backward diverges at emb (Embedding): the reference's gradient reaches it and the "
        "port's does not (its output is detached, stop_gradient, on the port's side, or its "
        "parameters are frozen)"]
    # and named as any divergence is, for a script that reads it (before: no divergence)
    assert r.options["divergence"] == {"layer": "emb", "kind": "layer",
                                       "message": r.options["findings"][0], "hint": None,
                                       "direction": "backward", "step": 0}


def test_a_summed_loss_is_named_by_the_batch_size() -> None:
    r = _train(*twins(0), ploss=paddle.nn.CrossEntropyLoss(reduction="sum"))
    assert r.first_failure.key == "step0/loss"
    assert r.options["findings"] == [
        "the loss differs although the outputs align (step0/logits): the loss functions differ "
        "(the port's loss is 4x the reference's, the batch size: a sum against a mean, "
        "reduction)",
        # the loss functions' calls, traced in step 0, say which setting: said, not failed on
        # its own (a port may divide the sum itself), as what to check where the loss differs
        "the port's loss reduces otherwise: CrossEntropyLoss:cross_entropy: reduction 'mean' in "
        "torch, 'sum' in Paddle; a reduction alone is no difference (a sum the port divides by "
        "the count kept is the mean), but the loss differs: check that the port's loss is "
        "divided as the reference's"]
    assert not any(k.key.startswith("settings/") for k in r.failed)


def test_a_sum_the_port_divides_itself_is_the_mean_and_passes() -> None:
    """Paddle's cross entropy with ignore_index divides its mean by every label; the port's
    workaround takes the sum and divides by the labels kept, exactly torch's mean. Every value
    aligned and the run failed on "reduction 'mean' in torch, 'sum' in Paddle"."""
    summed = paddle.nn.CrossEntropyLoss(reduction="sum")

    def loss(logits, labels):
        return summed(logits, labels) / labels.shape[0]

    r = _train(*twins(0), ploss=loss)
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["settings"]["reduction"] == [
        "CrossEntropyLoss:cross_entropy: reduction 'mean' in torch, 'sum' in Paddle"]
    assert not any("reduces otherwise" in f for f in r.options.get("findings", ()))


@pytest.mark.parametrize("decay", [0.01, 1e-4])
def test_a_weight_decay_on_one_side_is_named_with_its_coefficient(decay) -> None:
    """A small decay moves the update by far less than a thousandth of it: it was called "the
    port's update is 1x the reference's (a learning rate ...)" until the two terms were fitted
    together."""
    tm, pm = twins(0)
    popt = paddle.optimizer.Momentum(learning_rate=LR, momentum=MU, parameters=pm.parameters(),
                                     weight_decay=decay)
    r = _train(tm, pm, popt=popt)
    assert all(k.passed for k in r if k.key.startswith("step0/grad/"))
    assert any(k.key.startswith("step0/param/") for k in r.failed)
    line, setting = r.options["findings"]
    assert (f"the optimizers differ: the port's update takes {decay:g} x the learning rate x the "
            "weights more off (a weight decay one side applies and the other does not, or "
            "applies otherwise)") in line, line
    # conv.bias, before the BatchNorm, gets a gradient of noise: where the decay moves it past
    # its threshold (0.01, not 1e-4), it is left out of the fit, and said
    assert line.endswith("applies otherwise)") == (decay < 0.01), line
    if decay >= 0.01:
        assert "(and 1 more, left out of the fit: its gradients are noise on both sides" in line
    assert "x the reference's" not in line
    # the hyperparameters, read: the same decay, named as the likely cause
    assert setting.endswith(f"optimizer: weight_decay 'none' in torch, 'L2 {decay:g}' in "
                            "Paddle; the optimizers' settings that differ are the likely cause")


def test_a_parameter_group_with_another_learning_rate_is_named_by_the_ratio() -> None:
    tm, pm = twins(0)
    head = [p for n, p in tm.named_parameters() if n.startswith("head.")]
    rest = [p for n, p in tm.named_parameters() if not n.startswith("head.")]
    topt = torch.optim.SGD([{"params": rest}, {"params": head, "lr": 2 * LR}], lr=LR,
                           momentum=MU)
    r = _train(tm, pm, topt=topt)
    (line,) = r.options["findings"]
    assert "updated parameters do not (2 of them)" in line
    assert line.endswith("the port's update is 0.5x the reference's (a learning rate, or an "
                         "update scaled otherwise)"), line


def test_another_momentum_is_named_at_the_second_step() -> None:
    tm, pm = twins(0)
    popt = paddle.optimizer.Momentum(learning_rate=LR, momentum=0.8, parameters=pm.parameters())
    r = _train(tm, pm, popt=popt)
    found = r.options["findings"]
    assert found[0].startswith("step 1 is the first whose outputs, gradients or weights differ "
                               "(param, opt), first at step1/param/"), found
    assert "the optimizers' state differs (momentum" in found[1]


def test_localising_leaves_the_models_as_training_left_them() -> None:
    states = []
    for localise in (False, True):
        tm, pm = twins(0)
        pm.norm._epsilon = 1e-3
        r = _train(tm, pm, localise=localise, check_settings=False)
        assert ("findings" in r.options) is localise
        states.append(({k: v.detach().numpy().copy() for k, v in tm.state_dict().items()},
                       {k: v.numpy().copy() for k, v in pm.state_dict().items()}))
    for a, b in zip(states[0], states[1]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _keep_first_weight(linear) -> None:
    """A Paddle Linear computing with the weight it saw first (a cache never refreshed), the
    gradient still reaching its weight: step 0 is exact, later steps are not."""

    def stale(self, x):
        if not hasattr(self, "_first"):
            self._first = self.weight.detach().clone()
        w = self.weight + (self._first - self.weight).detach()
        return paddle.matmul(x, w) + self.bias

    linear.forward = types.MethodType(stale, linear)


def test_a_bug_showing_from_the_second_step_is_localised_there() -> None:
    """A port layer that keeps the weight it saw first (a cache never refreshed): step 0 aligns
    in full, step 1's outputs differ. Step 1 is run again from the weights each side recorded
    after step 0, and the layer is named."""
    tm, pm = twins(0)
    _keep_first_weight(pm.fc1)
    r = _train(tm, pm, steps=3)
    assert all(k.passed for k in r if k.key.startswith("step0/") and "/stat/" not in k.key)
    assert r.first_failure.key.startswith(("step0/stat/", "step1/"))
    found = r.options["findings"]
    assert found[0].startswith("step 1 is the first whose outputs, gradients or weights differ "
                               "(logits, loss, grad, param"), found
    assert found[1].startswith("diverges at fc1 (Linear): input aligned"), found
    assert r.options["divergence"]["step"] == 1


def test_a_later_step_is_named_without_a_layer_where_its_state_was_not_recorded() -> None:
    tm, pm = twins(0)
    _keep_first_weight(pm.fc1)
    r = _train(tm, pm, steps=2, stats=False)  # the BatchNorm statistics are not recorded
    (line,) = r.options["findings"]
    assert line.startswith("step 1 is the first whose outputs, gradients or weights differ")
    assert "divergence" not in r.options


def test_paddles_cross_entropy_clip_at_64_is_noted_where_the_logits_reach_it() -> None:
    """Paddle clips each shifted logit at -64, torch does not (checked here on both): a model
    whose logits blow up fails its loss with no bug in the port; the note says why, and only
    where the reference's logits reach below -64."""
    logits = np.array([[100.0, 0.0, 0.0], [50.0, 0.0, 0.0]], np.float32)
    y = np.array([1, 1])
    t = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y),
                                          reduction="none").numpy()
    p = paddle.nn.functional.cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(y),
                                           reduction="none").numpy().ravel()
    np.testing.assert_allclose(t, [100, 50])
    np.testing.assert_allclose(p, [64, 50])  # the clip this note stands on
    tm, pm = twins(0)
    with torch.no_grad():
        tm.head.weight.mul_(400.0)
    pm.head.weight.set_value(tm.head.weight.detach().numpy().T)
    r = _train(tm, pm, steps=1, calibrate=True)  # logits this large pass by their own noise
    loss = r["step0/loss"]
    # over its noise, and passing as the known difference it is (the port's loss is at most 64)
    assert loss.status == "known" and loss.noise_multiple > 20 and loss.worst_other <= 64
    assert "clips each sample's shifted logit (the logit less the sample's largest) at -64" in \
        loss.note
    assert r.first_failure is None or r.first_failure.key != "step0/loss"
    # a loss the clip cannot make (a sum over the batch: above 64) keeps failing, with the note
    from reprod.align.results import _with_notes

    doubled = {"step0/loss": np.float32(loss.worst_other * 40)}
    ref = {"step0/loss": np.float32(loss.worst_ref * 40), "step0/logits": np.array(
        [[100.0, 0.0, 0.0]], np.float32)}
    again = _with_notes(reprod.compare(ref, doubled), ref, doubled)["step0/loss"]
    assert not again.passed and "-64" in again.note
    tm, pm = twins(0)
    r = _train(tm, pm, steps=1, ploss=paddle.nn.CrossEntropyLoss(label_smoothing=0.1))
    assert not r["step0/loss"].passed and "-64" not in (r["step0/loss"].note or "")


def test_the_clip_is_on_the_shifted_logit_so_a_many_class_loss_passes_64() -> None:
    """A 1,000-class sample whose label sits 100 below its largest logit: Paddle's loss is
    64 + log(sum(exp(shifted logits))), over 64 (a diverging mobilenet_v3_small's correct mean
    loss was 64.04, and failed while the clip was taken to cap the loss at 64)."""
    from reprod.align.results import _with_notes

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 1000)) * 3).astype(np.float32)
    logits[:, 0] = logits[:, 1:].max(axis=1) - 100.0
    y = np.array([0, 0])
    t = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    p = float(paddle.nn.functional.cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(y)))
    assert t > 100 and 64.5 < p < 70
    ref = {"step0/loss": np.float32(t), "step0/logits": logits}
    other = {"step0/loss": np.float32(p)}
    loss = _with_notes(reprod.compare(ref, other), ref, other)["step0/loss"]
    assert loss.status == "known" and "shifted logit at -64" in loss.reason, loss.reason
    # a port's loss over what the clip can make keeps failing, with the note
    over = {"step0/loss": np.float32(p + 0.01)}
    loss = _with_notes(reprod.compare(ref, over), ref, over)["step0/loss"]
    assert not loss.passed and "-64" in loss.note


def test_a_linear_weight_copied_without_its_transpose_is_named_with_the_cause() -> None:
    """The weight holds the reference's values in torch's order, reshaped to Paddle's shape:
    ``diagnose`` reads layer outputs and had no hint; the models' own weights say it."""
    from reprod.align import align_forward

    for train in (False, True):
        tm, pm = twins(0)
        w = tm.fc1.weight.detach().numpy()  # (16, 8)
        pm.fc1.weight.set_value(w.reshape(8, 16))
        if train:
            found = _train(tm, pm, steps=1).options["findings"]
        else:
            found = align_forward(tm.eval(), pm.eval(), make_batch(0)[0]).options["findings"]
        assert found[0].startswith("diverges at fc1 (Linear): input aligned"), found
        assert found[1] == (
            "likely cause at fc1: Linear weight not transposed: the port's weight holds the "
            "reference's values in the reference's order, reshaped to [8, 16]; torch stores "
            "(out_features, in_features), Paddle (in_features, out_features): transpose it when "
            "converting")
    tm, pm = twins(0)
    pm.fc1.weight.set_value(pm.fc1.weight.numpy() * 1.5)  # another bug in the same layer
    found = align_forward(tm.eval(), pm.eval(), make_batch(0)[0]).options["findings"]
    assert found[0].startswith("diverges at fc1") and len(found) == 2, found
    # not the transpose: the weight's own values differ, and that is said
    w = tm.fc1.weight.detach().numpy()
    assert found[1] == (f"likely cause at fc1: its own parameter weight (max diff "
                        f"{float(np.max(np.abs(w * 0.5))):.3g}) differs from the reference's: "
                        "the weights, not the code"), found


def test_step0_batchnorm_notes_are_checked_from_the_statistics_before_training() -> None:
    """Step 0's statistics had no previous step, so their notes read "possible: ... (not
    checked)"; the statistics before training make them checkable: the biased variance is said
    where it fits, and a momentum given in torch's convention is named at step 0."""
    from reprod.diagnose import VAR_BIAS_HINT

    r = _train(*twins(4), steps=1)
    assert r.passed
    bad = r["step0/stat/bn._variance"]
    # checked: the fit reads n = 4 samples x 6 x 6 positions, the batch behind the update
    assert bad.status == "known" and bad.note.startswith(VAR_BIAS_HINT)
    assert bad.note.endswith("[fits: n ≈ 144, momentum 0.1]"), bad.note
    tm, pm = twins(4)
    pm.bn._momentum = 0.1  # torch's value in Paddle's convention (it should be 0.9)
    r = _train(tm, pm, steps=1)
    mean = r["step0/stat/bn._mean"]
    assert not mean.passed and "momentum" in mean.note and "possible" not in mean.note, mean.note
    # the port's bug: neither statistic passes as a known difference
    assert {k.key for k in r.failed} == {"step0/stat/bn._mean", "step0/stat/bn._variance",
                                         "settings/bn/momentum"}
    assert r["settings/bn/momentum"].reason.startswith(
        "bn: momentum 0.1 in torch, 0.1 in Paddle, where it weighs the running statistics"
    ), r["settings/bn/momentum"].reason
    assert r.options["findings"][0].startswith(
        "only BatchNorm statistics differ first (step0/stat, 2 keys): bn fits a momentum in the "
        "other framework's convention (check BatchNorm momentum"), r.options["findings"]


def test_a_batchnorm_epsilon_in_training_mode_is_diagnosed_from_the_batch_variance() -> None:
    """In training mode BatchNorm normalises with the batch's variance, not its running one:
    the epsilon fit reads it from the layer's recorded input."""
    tm, pm = twins(0)
    pm.bn._epsilon = 0.1
    found = _train(tm, pm, steps=1).options["findings"]
    assert found[0].startswith("diverges at bn (BatchNorm2d): input aligned"), found
    assert found[1].startswith("likely cause at bn: BN epsilon: port uses ~0.1"), found


def _adam_first_step(g: np.ndarray, lr: float = 1e-3, eps: float = 1e-8) -> np.ndarray:
    """Adam's first update with bias correction: m/(sqrt(v)+eps) = g/(|g|+eps)."""
    return -lr * g / (np.abs(g) + eps)


def test_an_adam_step_apart_only_where_the_gradients_signs_differ_is_not_called_an_optimizer_bug(
) -> None:
    """Found on correct Adam ports of torchvision models: a gradient element within float32 noise
    of 0 takes the other sign in the port, and Adam's first step (lr * sign(g)) moves it the other
    way; the finding says so instead of "the optimizers differ". The reference is numpy's own
    Adam step; another epsilon, which changes every small element's step, is still an optimizer
    difference."""
    import reprod
    from reprod.align.train_localise import update_finding

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(1000)
    g = rng.standard_normal(1000) * 1e-3
    g[:3] = [3e-6, -2e-6, 1e-6]  # small: within float32 noise of 0 in a deep model
    g_port = g * (1 + 1e-7)
    g_port[:3] = -g[:3]  # float32 noise took the other sign
    ref = {"step0/grad/w": g, "step0/param/w": w0 + _adam_first_step(g)}
    port = {"step0/grad/w": g_port, "step0/param/w": w0 + _adam_first_step(g_port)}
    r = reprod.compare(ref, port, method="max", threshold=1e-5)
    assert [k.key for k in r.failed] == ["step0/param/w"]
    line = update_finding(r, ref, port, {"w": w0}, 1e-3)
    assert "apart only at the 3 elements whose two gradients have opposite signs" in line, line
    assert "by up to 0.002 " in line or "by up to 0.00199" in line, line  # 2 * lr, near enough
    assert "not an optimizer difference" in line
    port = {"step0/grad/w": g_port, "step0/param/w": w0 + _adam_first_step(g_port, eps=1e-3)}
    r = reprod.compare(ref, port, method="max", threshold=1e-5)
    line = update_finding(r, ref, port, {"w": w0}, 1e-3)
    assert "the optimizers differ" in line and "opposite signs" not in line, line


def test_a_reference_that_diverges_to_nan_is_said_to_and_not_localised() -> None:
    """A learning rate of 1e25: both sides' loss is NaN from step 1, at the same places. That
    still fails (NaN never passes), but the finding no longer says the port differs there, nor
    localises a layer of the diverged step: the reference diverges too."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 8)).astype(np.float32), rng.integers(0, 3, 16)
    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    pm = paddle.nn.Sequential(paddle.nn.Linear(8, 16), paddle.nn.ReLU(), paddle.nn.Linear(16, 3))
    pm.set_state_dict({k: v.detach().numpy().T if v.ndim == 2 else v.detach().numpy()
                       for k, v in tm.state_dict().items()})
    r = align_train(tm, pm, [(x, y)], steps=3, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=1e25),
                    paddle_optimizer=paddle.optimizer.SGD(1e25, parameters=pm.parameters()),
                    calibrate=True)
    # which of step 1's keys holds NaN first depends on the CPU (an Inf logit or a NaN one):
    # the logits on one machine, only the loss on another
    first = r.first_failure
    assert not r.passed and first.key in ("step1/logits", "step1/loss"), first.key
    assert first.status == "nan" and first.ref_nan >= 1
    (line,) = r.options["findings"]
    assert line.startswith(f"the reference itself holds NaN at step 1 ({first.key}: "
                           f"{first.ref_nan} of its values, the port "), line
    assert "training diverges in the reference too" in line
    assert "steps=1" in line and "divergence" not in r.options
    assert all(k.passed for k in r if k.key.startswith("step0/"))


def test_a_mean_over_every_label_against_one_over_the_labels_kept_is_named() -> None:
    """Paddle's cross_entropy with ignore_index divides its mean by every label, the ignored
    ones included (paddle 3.3.1); torch's by those kept. The port's loss is the share kept
    times the reference's: 'reduction, label smoothing, class weights, ignore_index' named
    four candidates for one cause the labels show."""
    tm, pm = twins(0)
    tm.train()
    pm.train()
    inputs, labels = make_batch(0, n=8)
    labels[[1, 3, 4]] = -100
    # the independent reference: both frameworks' own losses on one array
    logits = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    t = float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
    p = float(paddle.nn.functional.cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(labels),
                                                 ignore_index=-100))
    assert p / t == pytest.approx(5 / 8, rel=1e-5)
    r = align_train(tm, pm, [(inputs, labels)], steps=1,
                    torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=LR),
                    paddle_optimizer=paddle.optimizer.SGD(LR, parameters=pm.parameters()))
    assert r.first_failure.key == "step0/loss"
    assert r.options["findings"][0] == (
        "the loss differs although the outputs align (step0/logits): the loss functions differ "
        "(the port's loss is 0.625x the reference's, the share of labels not ignored, 5 of 8: "
        "the port's mean divides by every label, the -100 ones included, the reference's by "
        "those kept; Paddle's cross_entropy with ignore_index does so: take its sum and divide "
        "by the labels kept)")


@pytest.mark.parametrize("port_decay", [0.0, 0.05])
def test_a_weight_decay_is_named_where_a_warmup_from_0_moves_nothing_at_step_0(port_decay) -> None:
    """Hugging Face's warmups start at lr 0: step 0 updates nothing on either side, so the two
    updates were never set against each other and a weight decay missing from the port read
    "the optimizers' hyperparameters differ (momentum, Adam's betas or epsilon, a weight decay)".
    The first step judged from the reference's state is fitted as step 0's would be."""
    tm, pm = twins(0)

    def ramp(k):
        return min(1.0, k / 2)

    topt = torch.optim.AdamW(tm.parameters(), lr=1e-2, weight_decay=0.01)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, ramp)
    psched = paddle.optimizer.lr.LambdaDecay(1e-2, ramp)
    popt = paddle.optimizer.AdamW(learning_rate=psched, parameters=pm.parameters(),
                                  weight_decay=port_decay)
    r = _train(tm, pm, steps=3, topt=topt, popt=popt, torch_scheduler=tsched,
               paddle_scheduler=psched, check_settings=False)
    assert not r.passed
    assert all(not k.key.startswith("step0/") for k in r.failed)
    line = next(f for f in r.options["findings"] if "run on both sides from the reference's" in f)
    side = "reference" if port_decay < 0.01 else "port"
    coef = abs(0.01 - port_decay)
    m = re.search(rf"the {side}'s update takes ([0-9.e-]+) x the learning rate x the weights "
                  r"more off \(a weight decay", line)
    assert m is not None, line
    assert float(m.group(1)) == pytest.approx(coef, rel=0.05)
    assert "hyperparameters differ" not in line


def test_a_later_step_named_at_a_layer_whose_weights_drifted_says_so(tmp_path) -> None:
    """A later step is localised from each side's own recorded weights: a layer whose input
    aligns and whose weights the steps before moved apart by rounding (each key passing) is
    named first, and read as a bug in its code (a faithful BERT's word embedding after three
    Adam steps, calibrated). The finding now says where the difference comes from."""
    tm, pm = twins(0)
    # the outputs of step 1 and every layer judged far under float32 rounding: what rounding
    # carried from step 0 fails there
    r = _train(tm, pm, steps=2, per_key={"step1/logits": 1e-12, "*.out*": 1e-12},
               out_dir=str(tmp_path))
    assert [k.key for k in r.failed] == ["step1/logits"]
    div = r.options["divergence"]
    assert div["layer"] == "conv" and div["step"] == 1
    drift = r.options["findings"][-1]
    assert drift.startswith("conv's own weights after step 0 already differ on the two sides "
                            "(max ")
    assert drift.endswith("the difference is carried from those steps, not made by the layer's "
                          "code")
    # independently: the largest gap of the two sides' recorded conv tensors after step 0
    t = reprod.load(str(tmp_path / "train_torch.npy"))
    p = reprod.load(str(tmp_path / "train_paddle.npy"))
    gap = max(float(np.abs(np.asarray(t[k], np.float64) - np.asarray(p[k], np.float64)).max())
              for k in ("step0/param/conv.weight", "step0/param/conv.bias"))
    assert 0 < gap < 1e-5
    assert f"(max {gap:.3e}, " in drift
