"""Gradient clipping in the reference's training step (``align_train(torch_grad_clip=...)``).

A torch script clips between backward() and step() (``clip_grad_norm_``), which no torch
optimizer knows of, while a Paddle optimizer holds its clipping: a port that clipped faithfully
failed against a reference step that clipped nothing, and its settings said "grad_clip none in
torch". Each case here checks the updates against numpy's own clipping of the recorded
gradients, or torch's, as the independent reference.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import reprod  # noqa: E402
from reprod.align import align_train, compare_settings, save_settings  # noqa: E402
from reprod.align.grad_clip import GradClip, grad_clip_of  # noqa: E402
from reprod.errors import ReprodError  # noqa: E402

RNG = np.random.default_rng(11)
X = RNG.standard_normal((64, 32)).astype(np.float32)
Y = RNG.integers(0, 4, 64)
LIMIT = 0.05  # far under the gradients' global norm (about 0.4): every step clips


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


class PaddleNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(32, 32)
        self.head = paddle.nn.Linear(32, 4)

    def forward(self, x):
        return self.head(paddle.tanh(self.fc(x)))


def _pair():
    torch.manual_seed(0)
    tm, pm = TorchNet(), PaddleNet()
    pm.set_state_dict({k: v.detach().numpy().T if v.ndim == 2 else v.detach().numpy()
                       for k, v in tm.state_dict().items()})
    return tm, pm


def _train(torch_clip, paddle_clip, *, algo: str = "sgd", lr: float = 0.5, steps: int = 3,
           torch_wd: float = 0.0, paddle_wd: float = 0.0, **kw):
    tm, pm = _pair()
    if algo == "sgd":
        topt = torch.optim.SGD(tm.parameters(), lr=lr, weight_decay=torch_wd)
        popt = paddle.optimizer.SGD(lr, parameters=pm.parameters(), weight_decay=paddle_wd or None,
                                    grad_clip=paddle_clip)
    elif algo == "momentum":
        topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9)
        popt = paddle.optimizer.Momentum(lr, 0.9, parameters=pm.parameters(), grad_clip=paddle_clip)
    else:
        topt = torch.optim.AdamW(tm.parameters(), lr=lr, weight_decay=0.01)
        popt = paddle.optimizer.AdamW(lr, parameters=pm.parameters(), weight_decay=0.01,
                                      grad_clip=paddle_clip)
    return align_train(tm, pm, [(X, Y)], steps=steps, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(), torch_optimizer=topt,
                       paddle_optimizer=popt, torch_grad_clip=torch_clip, **kw)


def _dump(out: str, side: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in reprod.load(os.path.join(out, f"train_{side}.npy")).items()}


@pytest.mark.parametrize("spec", [LIMIT, functools.partial(torch.nn.utils.clip_grad_norm_,
                                                            max_norm=LIMIT)])
def test_a_port_clipping_as_the_reference_does_passes(tmp_path, spec) -> None:
    r = _train(spec, paddle.nn.ClipGradByGlobalNorm(LIMIT), out_dir=str(tmp_path))
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["settings"]["optimizer"]["torch"]["grad_clip"] == "global norm 0.05"
    # the reference's step 0, from numpy: the gradients recorded are before clipping, and the
    # update is lr times them scaled to a global norm of LIMIT
    ref = _dump(str(tmp_path), "torch")
    grads = {k[len("step0/grad/"):]: v.astype(np.float64) for k, v in ref.items()
             if k.startswith("step0/grad/")}
    total = np.sqrt(sum(float(np.sum(g ** 2)) for g in grads.values()))
    assert total > 5 * LIMIT
    _, pm = _pair()
    w0 = {k: v.numpy().astype(np.float64) for k, v in pm.state_dict().items()}
    for name, g in grads.items():
        want = w0[name] - 0.5 * g * LIMIT / total
        np.testing.assert_allclose(ref[f"step0/param/{name}"], want, rtol=1e-5, atol=1e-6)


def test_a_port_that_clips_alone_fails_and_names_the_setting() -> None:
    r = _train(None, paddle.nn.ClipGradByGlobalNorm(LIMIT))
    assert not r.passed
    assert r["settings/optimizer/grad_clip"].status == "setting"
    assert r["settings/optimizer/grad_clip"].reason.startswith(
        "optimizer: grad_clip 'none' in torch, 'global norm 0.05' in Paddle")
    assert not r["step0/param/fc.weight"].passed
    assert r["step0/grad/fc.weight"].passed  # both recorded before clipping
    # and the reverse: the reference clips, the port does not
    r = _train(LIMIT, None)
    assert r["settings/optimizer/grad_clip"].reason.startswith(
        "optimizer: grad_clip 'global norm 0.05' in torch, 'none' in Paddle")
    assert not r["step0/param/fc.weight"].passed


def test_another_limit_fails() -> None:
    r = _train(LIMIT, paddle.nn.ClipGradByGlobalNorm(2 * LIMIT))
    assert r["settings/optimizer/grad_clip"].reason.startswith(
        "optimizer: grad_clip 'global norm 0.05' in torch, 'global norm 0.1' in Paddle")
    assert not r["step0/param/fc.weight"].passed


def test_clipping_by_value_reads_and_compares() -> None:
    v = 0.002
    spec = functools.partial(torch.nn.utils.clip_grad_value_, clip_value=v)
    r = _train(spec, paddle.nn.ClipGradByValue(max=v))
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["settings"]["optimizer"]["torch"]["grad_clip"] == "value [-0.002, 0.002]"
    r = _train(spec, paddle.nn.ClipGradByGlobalNorm(LIMIT))
    assert r["settings/optimizer/grad_clip"].reason.startswith(
        "optimizer: grad_clip 'value [-0.002, 0.002]' in torch, 'global norm 0.05' in Paddle")


def test_another_norm_type_is_a_setting_paddle_has_not() -> None:
    spec = functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=LIMIT, norm_type=1.0)
    r = _train(spec, paddle.nn.ClipGradByGlobalNorm(LIMIT), steps=1)
    assert r["settings/optimizer/grad_clip"].reason.startswith(
        "optimizer: grad_clip 'global 1-norm 0.05' in torch, 'global norm 0.05' in Paddle")


def test_a_function_of_its_own_runs_and_is_said_not_compared() -> None:
    calls = []

    def own(params):
        params = list(params)
        calls.append(len(params))
        torch.nn.utils.clip_grad_norm_(params, LIMIT)

    r = _train(own, paddle.nn.ClipGradByGlobalNorm(LIMIT))
    assert calls == [4, 4, 4]
    assert r.passed, r.to_table(failed_only=True)
    opt = r.options["settings"]["optimizer"]
    assert "grad_clip" not in opt["torch"]
    assert any(line.startswith("grad_clip (the reference clips with a function reprod cannot read")
               for line in opt["not_compared"])


@pytest.mark.parametrize("algo", ["momentum", "adamw"])
def test_calibrated_runs_clip_the_float64_twin_and_the_replays_too(algo) -> None:
    # the twin, the per-step forcing and the kink replays each run the reference's step again:
    # one of them not clipping fails a faithful port
    lr = 0.05 if algo == "momentum" else 0.01
    r = _train(LIMIT, paddle.nn.ClipGradByGlobalNorm(LIMIT), algo=algo, lr=lr, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)
    bad = _train(LIMIT, None, algo=algo, lr=lr, calibrate=True)
    assert not bad.passed
    assert not bad["step1/param/fc.weight"].passed


def test_the_weight_decay_fit_sees_through_clipping() -> None:
    # plain SGD keeps no state: a decay missing from the port shows only in the fit of each
    # side's updates, whose gradient each step's clipping scaled by a factor neither records
    same = _train(LIMIT, paddle.nn.ClipGradByGlobalNorm(LIMIT), lr=0.01, torch_wd=1e-3,
                  paddle_wd=1e-3, calibrate=True)
    assert same.passed, same.to_table(failed_only=True)
    missing = _train(LIMIT, paddle.nn.ClipGradByGlobalNorm(LIMIT), lr=0.01, torch_wd=1e-3,
                     calibrate=True, check_settings=False)
    assert "fc.weight" in missing.options.get("decay", {})
    fit = missing.options["decay"]["fc.weight"]
    assert fit["reference"] == pytest.approx(1e-3, rel=0.05) and abs(fit["port"]) < 1e-4


def _grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in
            enumerate([(5, 7), (7,), (300,)])}


def _torch_params(grads: dict[str, np.ndarray]) -> list:
    ps = [torch.nn.Parameter(torch.zeros(g.shape)) for g in grads.values()]
    for p, g in zip(ps, grads.values()):
        p.grad = torch.from_numpy(g.copy())
    return ps


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_given_as_a_partial_replays_as_torch_clips(norm_type) -> None:
    grads = _grads(int(norm_type) if np.isfinite(norm_type) else 9)
    ps = _torch_params(grads)
    spec = functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=0.3, norm_type=norm_type)
    torch.nn.utils.clip_grad_norm_(ps, max_norm=0.3, norm_type=norm_type)
    got = grad_clip_of(spec).arrays(grads)
    for p, g in zip(ps, got.values()):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-6)
        assert g.dtype == np.float32
    value = GradClip("value", 0.5).arrays(grads)
    for k, g in grads.items():
        np.testing.assert_array_equal(value[k], torch.clamp(torch.from_numpy(g), -0.5, 0.5).numpy())
    assert GradClip("custom", fn=print).arrays(grads) is None


def test_a_number_clips_as_paddle_s_global_norm_does() -> None:
    # Paddle itself as the reference: its optimizer clips p.grad in place inside step()
    grads = _grads(4)
    clip = grad_clip_of(0.3)
    ps = _torch_params(grads)
    clip.apply(ps)
    replayed = clip.arrays(grads)
    pps = [paddle.create_parameter(list(g.shape), "float32") for g in grads.values()]
    for p, g in zip(pps, grads.values()):
        p.grad = paddle.to_tensor(g)
    opt = paddle.optimizer.SGD(0.0, parameters=pps, grad_clip=paddle.nn.ClipGradByGlobalNorm(0.3))
    opt.step()
    for p, q, g in zip(ps, pps, replayed.values()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=3e-7)
        np.testing.assert_allclose(g, q.grad.numpy(), rtol=3e-7)
    # torch's own clip_grad_norm_ is 1e-6 / norm apart: over float32's resolution here
    ts = _torch_params(grads)
    torch.nn.utils.clip_grad_norm_(ts, max_norm=0.3)
    assert np.abs(ts[2].grad.numpy() / q.grad.numpy() - 1).max() > 1e-7


@pytest.mark.parametrize("bad", ["1", True, -1.0, 0, float("nan"), float("inf"), [1.0],
                                 functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=-2)])
def test_a_bad_clip_is_one_line(bad) -> None:
    with pytest.raises(ReprodError) as e:
        grad_clip_of(bad)
    assert "\n" not in str(e.value) and str(e.value).startswith("torch_grad_clip")
    with pytest.raises(ReprodError):
        _train(bad, None, steps=1)


def test_two_scripts_save_their_clipping_and_the_files_compare(tmp_path) -> None:
    tm, pm = _pair()
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    a = save_settings(tm, tmp_path / "torch.json", optimizer=topt, grad_clip=1.0)
    b = save_settings(pm, tmp_path / "paddle.json", optimizer=paddle.optimizer.SGD(
        0.1, parameters=pm.parameters(), grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0)))
    assert compare_settings(a, b).passed
    assert json.loads(open(a).read())["optimizer"]["settings"]["grad_clip"] == "global norm 1"
    c = save_settings(pm, tmp_path / "paddle_none.json",
                      optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()))
    assert [d.line() for d in compare_settings(a, c).differ] == [
        "optimizer: grad_clip 'global norm 1' in torch, 'none' in Paddle"]
    with pytest.raises(ReprodError, match="a Paddle optimizer holds its clipping"):
        save_settings(pm, tmp_path / "x.json", optimizer=paddle.optimizer.SGD(
            0.1, parameters=pm.parameters()), grad_clip=1.0)
    with pytest.raises(ReprodError, match="give optimizer= too"):
        save_settings(tm, tmp_path / "y.json", grad_clip=1.0)
