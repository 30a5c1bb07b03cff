"""align_forward / align_train with calibrate=True: a float64 copy of the torch model is the noise
reference, and every key is judged as a multiple of the float32 reference's own rounding noise."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from align_twins import PaddleNet, make_batch, twins  # noqa: E402

import reprod  # noqa: E402
from reprod.align import align_forward, align_train, load_into_paddle, noise_multiples  # noqa: E402
from reprod.align.calibration import _float64_optimizer  # noqa: E402
from reprod.capture import first_divergence, record  # noqa: E402
from reprod.diff.noise import DEFAULT_NOISE_FACTOR  # noqa: E402

LR, MU = 0.1, 0.9


class EpsPort(PaddleNet):
    """The classic slip: a BatchNorm built with another epsilon (1e-4 where torch uses 1e-5)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.bn = paddle.nn.BatchNorm2D(8, epsilon=1e-4)


class LeakyPort(PaddleNet):
    """A wrong activation slope: leaky_relu(0.01) where torch has relu."""

    def forward(self, x, ids):
        f = paddle.nn.functional
        h = f.leaky_relu(self.bn(self.conv(x)), 0.01).mean(axis=(2, 3))
        h = h + self.emb(ids).mean(axis=1)
        h = self.norm(f.relu(self.fc1(h)))
        return self.head(self.drop(h))


def _port(cls: type, tm: torch.nn.Module) -> paddle.nn.Layer:
    pm = cls()
    load_into_paddle(pm, tm)
    return pm


def _train(tm, pm, *, steps=3, topt=None, popt=None, **kw):
    tm.train()
    pm.train()
    if topt is None:
        topt = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MU)
    if popt is None:
        popt = paddle.optimizer.Momentum(learning_rate=LR, momentum=MU, parameters=pm.parameters())
    kw.setdefault("torch_loss_fn", torch.nn.CrossEntropyLoss())
    kw.setdefault("paddle_loss_fn", paddle.nn.CrossEntropyLoss())
    return align_train(
        tm,
        pm,
        [make_batch(i) for i in range(steps)],
        torch_optimizer=topt,
        paddle_optimizer=popt,
        steps=steps,
        **kw,
    )


# --- forward -----------------------------------------------------------------------------------


def test_forward_calibrated_passes_a_correct_port_that_the_plain_threshold_fails(tmp_path) -> None:
    tm, _ = twins(seed=0)
    with torch.no_grad():  # logits near 1e3: float32 rounding alone is above 1e-5
        tm.head.weight.mul_(1000.0)
        tm.head.bias.mul_(1000.0)
    pm = _port(PaddleNet, tm)
    inputs, _ = make_batch(7)
    plain = align_forward(tm, pm, inputs)
    assert not plain.passed and plain["logits"].mean_abs > 1e-5
    r = align_forward(tm, pm, inputs, calibrate=True, out_dir=tmp_path)
    assert r.passed, r.to_table()
    kr = r["logits"]
    assert kr.methods == ("noise",) and kr.noise_multiple <= 5
    assert r.options["noise_factor"] == DEFAULT_NOISE_FACTOR
    worst = {"forward": {"multiple": kr.noise_multiple, "key": "logits"}}
    assert r.options["noise_multiple"] == worst
    # the noise reference is the torch model run in float64, recomputed here independently
    tm64 = copy.deepcopy(tm).double().eval()
    with torch.no_grad():
        want = tm64(torch.from_numpy(inputs["x"]).double(), torch.from_numpy(inputs["ids"])).numpy()
    hi = reprod.load(tmp_path / "forward_torch64.npy")["logits"]
    assert hi.dtype == np.float64
    np.testing.assert_array_equal(hi, want)
    # the three files reproduce the verdict, and the log carries the calibrated check
    again = reprod.compare(tmp_path / "forward_torch.npy", tmp_path / "forward_paddle.npy",
                           noise=tmp_path / "forward_torch64.npy")
    assert again.passed and again["logits"].noise_multiple == pytest.approx(kr.noise_multiple)
    log = (tmp_path / "forward_diff.log").read_text().splitlines()
    assert "noise diff: check passed: True" in log[1] and log[-1].endswith("diff check passed")
    # the torch model is left as it was: float32, in its mode
    assert all(p.dtype == torch.float32 for p in tm.parameters()) and tm.training


@pytest.mark.parametrize(("port", "at_least"), [(EpsPort, 100.0), (LeakyPort, 1e4)])
def test_forward_calibrated_catches_a_bug_by_many_times_the_noise(port, at_least) -> None:
    tm, _ = twins(seed=3)
    r = align_forward(tm, _port(port, tm), make_batch(7)[0], calibrate=True)
    assert not r.passed
    assert r["logits"].noise_multiple > at_least
    assert "noise >" in r["logits"].reason


def test_noise_factor_is_passed_on_and_needs_calibrate() -> None:
    tm, _ = twins(seed=3)
    pm = _port(EpsPort, tm)
    inputs, _ = make_batch(7)
    r = align_forward(tm, pm, inputs, calibrate=True, noise_factor=1e6, check_settings=False)
    assert r.passed and r.options["noise_factor"] == 1e6
    assert r["logits"].thresholds == {"noise": 1e6}
    with pytest.raises(reprod.ReprodError, match="calibrate=True"):
        align_forward(tm, pm, inputs, noise_factor=5)


def test_verbose_prints_the_worst_multiple(capsys) -> None:
    tm, pm = twins(seed=1)
    align_forward(tm, pm, make_batch(0)[0], calibrate=True, verbose=True)
    out = capsys.readouterr().out
    assert "worst noise multiple" in out and "forward" in out and "(logits)" in out


def test_a_model_that_cannot_be_deep_copied_is_refused_in_one_line() -> None:
    tm, pm = twins(seed=1)
    tm.lock = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(reprod.ReprodError) as info:
        align_forward(tm, pm, make_batch(0)[0], calibrate=True)
    assert "deepcopy" in str(info.value) and "\n" not in str(info.value)


# --- training ----------------------------------------------------------------------------------


def test_train_calibrated_passes_a_correct_port_with_small_multiples(tmp_path) -> None:
    tm, pm = twins(seed=3)
    before = copy.deepcopy(tm.state_dict())
    r = _train(tm, pm, stats=False, calibrate=True, out_dir=tmp_path / "cal")
    assert r.passed, r.to_table(failed_only=True)
    assert all(kr.methods == ("noise",) and kr.noise_multiple is not None for kr in r)
    worst = r.options["noise_multiple"]
    assert set(worst) == {"step0", "step1", "step2"}
    assert all(w["multiple"] <= DEFAULT_NOISE_FACTOR / 2 for w in worst.values()), worst
    assert worst == noise_multiples(r)
    # the same keys in float64 beside the float32 dumps
    lo = reprod.load(tmp_path / "cal" / "train_torch.npy")
    hi = reprod.load(tmp_path / "cal" / "train_torch64.npy")
    assert list(lo) == list(hi) == r.keys()
    assert hi["step1/grad/fc1.weight"].dtype == np.float64
    assert lo["step1/grad/fc1.weight"].dtype == np.float32
    # the float32 run is what it is without calibration: the float64 copy changes nothing in it
    tm2, pm2 = twins(seed=3)
    plain = _train(tm2, pm2, stats=False, out_dir=tmp_path / "plain")
    assert plain.passed
    same = reprod.load(tmp_path / "plain" / "train_torch.npy")
    for k in r.keys():
        np.testing.assert_array_equal(lo[k], same[k], err_msg=k)
    # the float32 model trained, in float32
    assert all(p.dtype == torch.float32 for p in tm.parameters())
    assert not torch.equal(before["fc1.weight"], tm.state_dict()["fc1.weight"])


def test_train_calibrated_catches_a_bug_from_the_first_step() -> None:
    tm, _ = twins(seed=5)
    r = _train(tm, _port(EpsPort, tm), stats=False, calibrate=True)
    assert not r.passed
    assert r.first_failure.key.startswith("step0/")
    assert all(w["multiple"] > 100 for w in r.options["noise_multiple"].values())


def test_batchnorm_variance_keeps_its_known_difference_and_note() -> None:
    tm, pm = twins(seed=4)
    r = _train(tm, pm, steps=1, calibrate=True)
    var = r["step0/stat/bn._variance"]
    # over its noise by far, and passing as the known difference it is
    assert r.passed and var.status == "known" and var.noise_multiple > 20
    assert "biased batch variance" in var.note
    assert r["step0/stat/bn._mean"].noise_multiple is not None and r["step0/stat/bn._mean"].passed


def test_adam_with_a_scheduler_and_a_weighted_loss_module(tmp_path) -> None:
    """The float64 optimizer is built from the torch one (Adam: moments, step counts) and follows
    its learning rate step by step; a loss module's float32 class weights are cast too."""
    tm, pm = twins(seed=6)
    w = np.linspace(0.5, 1.5, 5).astype(np.float32)
    topt = torch.optim.Adam(tm.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(topt, step_size=1, gamma=0.5)
    psched = paddle.optimizer.lr.StepDecay(learning_rate=1e-2, step_size=1, gamma=0.5)
    popt = paddle.optimizer.Adam(learning_rate=psched, parameters=pm.parameters())
    r = _train(
        tm, pm, topt=topt, popt=popt, stats=False, calibrate=True, out_dir=tmp_path,
        torch_loss_fn=torch.nn.CrossEntropyLoss(weight=torch.from_numpy(w)),
        paddle_loss_fn=paddle.nn.CrossEntropyLoss(weight=paddle.to_tensor(w)),
        torch_scheduler=sched, paddle_scheduler=psched,
    )
    assert r.passed, r.to_table(failed_only=True)
    hi = reprod.load(tmp_path / "train_torch64.npy")
    assert [float(hi[f"step{i}/lr"]) for i in range(3)] == [1e-2, 5e-3, 2.5e-3]
    # the float64 run kept its own Adam state: the torch optimizer counted 3 steps, not 6
    assert all(int(s["step"]) == 3 for s in topt.state.values())


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_the_float64_optimizer_copies_and_casts_the_state(cls) -> None:
    tm, _ = twins(seed=2)
    kw = {"lr": 0.05, "weight_decay": 1e-3} | ({"momentum": MU} if cls is torch.optim.SGD else {})
    opt = cls(tm.parameters(), **kw)
    x, y = make_batch(0)
    loss = torch.nn.functional.cross_entropy(
        tm(torch.from_numpy(x["x"]), torch.from_numpy(x["ids"])), torch.from_numpy(y))
    loss.backward()
    opt.step()
    twin = copy.deepcopy(tm).double()
    opt64 = _float64_optimizer(opt, tm, twin)
    assert type(opt64) is cls and opt64.param_groups[0]["lr"] == 0.05
    assert opt64.defaults == opt.defaults
    for p, p64 in zip(tm.parameters(), twin.parameters()):
        s, s64 = opt.state[p], opt64.state[p64]
        assert set(s) == set(s64)
        for k, v in s.items():
            if k == "step":  # a copy: the float64 run does not count the float32 run's steps
                assert v is not s64[k] and float(v) == float(s64[k])
            else:
                assert s64[k].dtype == torch.float64
                np.testing.assert_array_equal(s64[k].numpy(), v.double().numpy())


# --- layer capture of a float64 model ------------------------------------------------------------


def test_record_works_on_a_float64_model_and_calibrates_a_layer_comparison() -> None:
    tm, _ = twins(seed=3)
    inputs, _ = make_batch(2)
    x, ids = torch.from_numpy(inputs["x"]), torch.from_numpy(inputs["ids"])
    tm.eval()
    tm64 = copy.deepcopy(tm).double()
    with record(tm, backward=True) as lo:
        tm(x, ids).sum().backward()
    with record(tm64, backward=True) as hi:
        tm64(x.double(), ids).sum().backward()
    assert list(lo.data) == list(hi.data)
    floats = [k for k, v in hi.data.items() if np.asarray(v).dtype.kind == "f"]
    assert floats and all(np.asarray(hi.data[k]).dtype == np.float64 for k in floats)
    assert "conv.out" in hi.data and "bn.out" in hi.data

    def capture(port: type) -> dict:
        pm = _port(port, tm)
        pm.eval()
        with record(pm) as log:
            pm(paddle.to_tensor(inputs["x"]), paddle.to_tensor(inputs["ids"]))
        return log.data

    forward_keys = [k for k in lo.data if k.endswith((".in", ".out"))]
    ref = {k: lo.data[k] for k in forward_keys}
    noise = {k: hi.data[k] for k in forward_keys}
    ok = reprod.compare(ref, capture(PaddleNet), noise=noise, keys=forward_keys)
    assert ok.passed, ok.to_table(failed_only=True)
    bad = reprod.compare(ref, capture(EpsPort), noise=noise, keys=forward_keys)
    d = first_divergence(bad)
    assert d is not None and d.layer == "bn"
    assert d.output.noise_multiple > 100 and d.input.passed
