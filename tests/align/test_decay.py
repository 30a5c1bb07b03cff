"""Plain SGD's weight decay, fitted from each side's updates (``reprod.align.decay``).

At lr 0.01 a weight decay of 1e-5 moves each weight by 1e-7 of itself, a unit of its float32
resolution: a port without it passed every key of every step, within 1.3x its noise. The slope of
(w_before - w_after) / lr - grad against w_before, over a parameter's elements, is each side's decay.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_train  # noqa: E402
from reprod.align.decay import Z_LIMIT, fitted_decay  # noqa: E402

RNG = np.random.default_rng(3)
X = RNG.standard_normal((256, 64)).astype(np.float32)
Y = RNG.integers(0, 4, 256)


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


class PaddleNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(64, 64)
        self.head = paddle.nn.Linear(64, 4)

    def forward(self, x):
        return self.head(paddle.tanh(self.fc(x)))


def _train(torch_wd: float, paddle_wd, *, lr: float = 0.01, momentum: float = 0.0,
           steps: int = 3, **kw):
    torch.manual_seed(0)
    tm, pm = TorchNet(), PaddleNet()
    pm.set_state_dict({k: v.detach().numpy().T if v.ndim == 2 else v.detach().numpy()
                       for k, v in tm.state_dict().items()})
    topt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=momentum, weight_decay=torch_wd)
    if momentum:
        popt = paddle.optimizer.Momentum(lr, momentum, parameters=pm.parameters(),
                                         weight_decay=paddle_wd)
    else:
        popt = paddle.optimizer.SGD(lr, parameters=pm.parameters(), weight_decay=paddle_wd)
    return align_train(tm, pm, [(X, Y)], steps=steps, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(), torch_optimizer=topt,
                       paddle_optimizer=popt, **{"calibrate": True, **kw})


def test_the_fit_is_the_least_squares_slope_and_finds_a_decay_of_one_rounding_unit() -> None:
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(5000).astype(np.float32)
    lr, wd = 0.01, 1e-5
    data, w = {}, w0
    for s in range(2):
        g = rng.standard_normal(5000).astype(np.float32) * 1e-2
        after = (w - np.float32(lr) * (g + np.float32(wd) * w)).astype(np.float32)
        # the decay moves each element by a unit in its last place at most: within its noise
        plain = (w - np.float32(lr) * g).astype(np.float32)
        assert np.all(np.abs(after - plain) <= 2 * np.spacing(np.abs(w)))
        data.update({f"step{s}/param/w": after, f"step{s}/grad/w": g, f"step{s}/lr": lr})
        w = after
    fit = fitted_decay(data, "w", [0, 1], w0)
    # an independent reference: numpy's least squares through the origin
    before = np.concatenate([w0, data["step0/param/w"]]).astype(np.float64)
    d = np.concatenate([(before[:5000] - data["step0/param/w"]) / lr - data["step0/grad/w"],
                        (before[5000:] - data["step1/param/w"]) / lr - data["step1/grad/w"]])
    (slope,), *_ = np.linalg.lstsq(before[:, None], d, rcond=None)
    assert fit is not None and fit.n == 10000
    assert fit.value == pytest.approx(slope, rel=1e-9)
    assert abs(fit.value - wd) < 5 * fit.error and fit.error < wd / 50


@pytest.mark.parametrize("wd", [0.0, 1e-4])
def test_equal_decays_pass(wd) -> None:
    r = _train(wd, wd or None)
    assert r.passed, r.to_table(failed_only=True)
    assert "decay" not in r.options


def test_paddles_l2decay_regularizer_is_torchs_weight_decay() -> None:
    r = _train(1e-4, paddle.regularizer.L2Decay(1e-4))
    assert r.passed and "decay" not in r.options


def test_a_missing_decay_under_every_keys_resolution_fails() -> None:
    r = _train(1e-5, None)
    assert not r.passed
    fits = r.options["decay"]
    assert set(fits) >= {"fc.weight", "head.weight"}
    assert fits["fc.weight"]["reference"] == pytest.approx(1e-5, rel=0.01)
    assert abs(fits["fc.weight"]["port"]) < 1e-7 and fits["fc.weight"]["z"] > Z_LIMIT
    key = r["step0/param/fc.weight"]
    assert key.status == "failed" and key.reason.startswith("the weight decays differ"), key.reason
    # over the plain check, every key of the parameter's updates was within its noise
    assert key.noise_multiple < 20
    assert r.first_failure.key.startswith("step0/param/")


def test_verbose_says_which_decays_differ_and_what_the_ports_rounding_explained(capsys) -> None:
    r = _train(1e-5, None, verbose=True)
    out = capsys.readouterr().out
    assert "weight decays differ (fitted from each side's updates): fc.weight 9.98e-06 against" in out
    # the finding the failing weights lead to names the decay, at its fitted size
    finding, setting = r.options["findings"]
    assert "1.01e-05 x the learning rate x the weights" in finding and "weight decay" in finding
    assert "optimizer: weight_decay 'L2 1e-05' in torch, 'none' in Paddle" in setting


def test_optimizers_with_state_are_left_to_it() -> None:
    r = _train(1e-5, None, momentum=0.9)
    assert not r.passed and "decay" not in r.options
    assert any(k.key.endswith(".velocity") for k in r.failed)
