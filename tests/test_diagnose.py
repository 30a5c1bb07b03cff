"""reprod.diagnose: a known-difference hint appears only where the magnitudes fit."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reprod  # noqa: E402
from reprod.diagnose import (  # noqa: E402
    activation_mismatch,
    bn_epsilon,
    diagnose,
    layernorm_epsilon,
    momentum_swap,
    running_var_bias,
    untransposed_linear,
)


def _torch_bn_step(x: np.ndarray, prev_mean, prev_var, m: float = 0.1):
    """One training forward of a real torch BatchNorm (1d for 2-D input, 2d for 4-D) from the
    given running statistics: the running mean and variance after the update."""
    c = x.shape[1]
    bn = torch.nn.BatchNorm1d(c, momentum=m) if x.ndim == 2 else torch.nn.BatchNorm2d(c, momentum=m)
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(prev_mean.astype(np.float32)))
        bn.running_var.copy_(torch.from_numpy(prev_var.astype(np.float32)))
    bn.train()
    bn(torch.from_numpy(x))
    return bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()


def _paddle_bn_step(x: np.ndarray, prev_mean, prev_var, paddle_momentum: float = 0.9):
    """Paddle's update (python/paddle/nn/functional/norm.py, batch_norm kernel): running =
    momentum * running + (1 - momentum) * batch, with the biased batch variance; in float32."""
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    xx = x.astype(np.float64)
    mu, var = xx.mean(axis=axes), xx.var(axis=axes)
    pm = np.float32(paddle_momentum)
    new_mean = pm * prev_mean.astype(np.float32) + (1 - pm) * mu.astype(np.float32)
    new_var = pm * prev_var.astype(np.float32) + (1 - pm) * var.astype(np.float32)
    return new_mean.astype(np.float32), new_var.astype(np.float32)


def _batch(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[1]
    scale = rng.uniform(0.5, 3.0, size=c).reshape([1, c] + [1] * (len(shape) - 2))
    shift = rng.uniform(-2, 2, size=c).reshape([1, c] + [1] * (len(shape) - 2))
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def _prev(c, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, c).astype(np.float32), rng.uniform(0.5, 2.0, c).astype(np.float32)


@pytest.mark.parametrize("shape", [(16, 6), (4, 8, 5, 5)])
def test_running_variance_bias_fits_a_real_torch_batchnorm(shape) -> None:
    x = _batch(shape)
    pm, pv = _prev(shape[1])
    n = x.size // shape[1]
    _, tv = _torch_bn_step(x, pm, pv)
    _, qv = _paddle_bn_step(x, pm, pv)
    hint = running_var_bias(tv, qv, n, momentum=0.1, prev_var=pv)
    assert hint is not None and "biased batch variance" in hint and f"n ≈ {n}" in hint
    # n and the momentum estimated from the numbers alone
    est = running_var_bias(tv, qv, prev_var=pv)
    assert est is not None and f"n ≈ {n}" in est and "momentum 0.1" in est
    # the wrong n, or no previous statistics: no hint
    assert running_var_bias(tv, qv, n * 4, momentum=0.1, prev_var=pv) is None
    assert running_var_bias(tv, qv, n) is None


def _later_step(drift: float, seed: int = 0, twin_drift: Optional[float] = None):
    """A second training step of a large batch (2 x 16 x 28 x 28: n = 1568, a bias of 6.4e-4):
    each side's running variance after step 0 (torch's unbiased, Paddle's biased), then step 1
    on inputs each side computed from its own drifted weights (per channel, ``drift`` relative;
    the twin's ``twin_drift``, ``drift`` by default), and the float64 twin's step 1: (torch,
    port, torch before, port before, twin)."""
    rng = np.random.default_rng(seed)
    x0, x1 = _batch((2, 16, 28, 28), seed), _batch((2, 16, 28, 28), seed + 1)
    pm, pv = _prev(16, seed)
    tm0, tv0 = _torch_bn_step(x0, pm, pv)
    qm0, qv0 = _paddle_bn_step(x0, pm, pv)

    def drifted(x, d=drift):
        return (x * (1 + d * rng.standard_normal((1, 16, 1, 1)))).astype(np.float32)

    _, tv = _torch_bn_step(x1, tm0, tv0)
    _, qv = _paddle_bn_step(drifted(x1), qm0, qv0)
    bn = torch.nn.BatchNorm2d(16, momentum=0.1).double().train()
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(tm0.astype(np.float64)))
        bn.running_var.copy_(torch.from_numpy(tv0.astype(np.float64)))
    bn(torch.from_numpy(drifted(x1, drift if twin_drift is None else twin_drift).astype(np.float64)))
    return tv, qv, tv0, qv0, bn.running_var.numpy()


def test_a_large_batchs_bias_is_fitted_within_the_variances_noise() -> None:
    # the port's inputs drift by rounding (3e-5 per channel, the twin's 1e-5): its batch
    # variances move by a twentieth of the bias, so the relative residual is over FIT_TOL while
    # the port's value is within noise of the fitted update and the key itself 45x noise away
    tv, qv, tv0, qv0, twin = _later_step(3e-5, 0, 1e-5)
    noise = float(np.max(np.abs(tv.astype(np.float64) - twin)))
    assert np.max(np.abs(tv.astype(np.float64) - qv)) > 20 * noise
    assert running_var_bias(tv, qv, prev_var=tv0, other_prev_var=qv0) is None
    hint = running_var_bias(tv, qv, prev_var=tv0, other_prev_var=qv0, noise=noise)
    assert hint is not None and "biased batch variance" in hint and "n ≈ 15" in hint
    assert running_var_bias(tv, qv, 1568, momentum=0.1, prev_var=tv0, other_prev_var=qv0,
                            noise=noise) is not None
    # the wrong n is not fitted within noise
    assert running_var_bias(tv, qv, 1568 * 4, momentum=0.1, prev_var=tv0, other_prev_var=qv0,
                            noise=noise) is None
    from reprod.diagnose.batchnorm import NOISE_FACTOR
    from reprod.diff.noise import DEFAULT_NOISE_FACTOR

    assert NOISE_FACTOR == DEFAULT_NOISE_FACTOR  # the default the comparison judges by
    # nor a difference the bias does not make: the port's inputs 1e-3 apart
    tv, qv, tv0, qv0, twin = _later_step(1e-3, 0, 1e-5)
    noise = float(np.max(np.abs(tv.astype(np.float64) - twin)))
    assert running_var_bias(tv, qv, prev_var=tv0, other_prev_var=qv0, noise=noise) is None


def test_momentum_swap_is_not_called_the_variance_difference_and_vice_versa() -> None:
    x = _batch((8, 6, 3, 3), seed=3)
    pm, pv = _prev(6, seed=4)
    tm, tv = _torch_bn_step(x, pm, pv, m=0.1)
    # the porter copied torch's momentum=0.1 to Paddle: it keeps 0.1 of the old statistics
    qm, qv = _paddle_bn_step(x, pm, pv, paddle_momentum=0.1)
    mu = x.astype(np.float64).mean(axis=(0, 2, 3))
    swap = momentum_swap(tm, qm, pm, mu, 0.1)
    assert swap is not None and "1 - momentum" in swap
    assert momentum_swap(tm, qm, pm) is not None  # batch mean and momentum from the numbers
    assert running_var_bias(tv, qv, prev_var=pv) is None
    assert running_var_bias(tv, qv, 72, momentum=0.1, prev_var=pv) is None
    # the right momentum: the variance difference, and no momentum hint on the means
    qm2, qv2 = _paddle_bn_step(x, pm, pv, paddle_momentum=0.9)
    assert momentum_swap(tm, qm2, pm) is None
    assert momentum_swap(tm, qm2, pm, mu, 0.1) is None
    assert running_var_bias(tv, qv2, 72, momentum=0.1, prev_var=pv) is not None


def test_random_differences_get_no_hint() -> None:
    rng = np.random.default_rng(7)
    pm, pv = _prev(8, seed=8)
    tv = rng.uniform(0.5, 2, 8)
    qv = tv + rng.normal(0, 1e-2, 8)
    assert running_var_bias(tv, qv, prev_var=pv) is None
    assert momentum_swap(tv, qv, pm) is None
    x = rng.standard_normal((4, 8, 3, 3))
    assert bn_epsilon(x, x + rng.normal(0, 1e-2, x.shape), np.ones(8)) is None
    assert activation_mismatch(x, x, x + rng.normal(0, 1e-2, x.shape)) is None
    w = rng.standard_normal((5, 3))
    assert untransposed_linear(w, rng.standard_normal((3, 5))) is None
    assert layernorm_epsilon(x.reshape(48, 6), x.reshape(48, 6), x.reshape(48, 6) * 1.01) is None


def test_bn_epsilon_is_estimated_from_a_real_torch_batchnorm() -> None:
    rng = np.random.default_rng(2)
    c = 6
    var = np.geomspace(1e-4, 1.0, c).astype(np.float32)
    x = torch.from_numpy(_batch((4, c, 5, 5), seed=5))
    outs = []
    for eps in (1e-5, 1e-3):
        bn = torch.nn.BatchNorm2d(c, eps=eps).eval()
        with torch.no_grad():
            bn.running_var.copy_(torch.from_numpy(var))
            bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32)))
            bn.bias.copy_(torch.from_numpy(np.linspace(-1, 1, c).astype(np.float32)))
            outs.append(bn(x).numpy())
        rng = np.random.default_rng(2)  # the same weights for both
    beta = np.linspace(-1, 1, c)
    hint = bn_epsilon(outs[0], outs[1], var, 1e-5, beta=beta)
    assert hint == "BN epsilon: port uses ~1e-3, reference 1e-5"
    assert bn_epsilon(outs[0], outs[0], var, 1e-5, beta=beta) is None


def test_layernorm_epsilon_is_estimated_from_the_input() -> None:
    x = torch.from_numpy((np.random.default_rng(3).standard_normal((6, 16)) * 0.02).astype(np.float32))
    ref = torch.nn.functional.layer_norm(x, (16,), eps=1e-5).numpy()
    oth = torch.nn.functional.layer_norm(x, (16,), eps=1e-6).numpy()
    hint = layernorm_epsilon(x.numpy(), ref, oth, 1e-5)
    assert hint == "LayerNorm epsilon: port uses ~1e-6, reference 1e-5"


def test_hardsigmoid_slope_and_gelu_tanh_are_recognised_from_the_recorded_input() -> None:
    x = torch.linspace(-6, 6, 301)
    ref = torch.nn.functional.hardsigmoid(x).numpy()
    port = np.clip(0.2 * x.numpy() + 0.5, 0, 1)  # the slope of Paddle's fluid hard_sigmoid
    hint = activation_mismatch(x.numpy(), ref, port)
    assert hint == "activation: reference Hardsigmoid (slope 1/6), port Hardsigmoid (slope 0.2)"
    g = torch.nn.functional.gelu(x).numpy()
    gt = torch.nn.functional.gelu(x, approximate="tanh").numpy()
    assert activation_mismatch(x.numpy(), g, gt) == (
        "activation: reference GELU (exact, erf), port GELU (tanh approximation)"
    )
    sig = torch.sigmoid(x).numpy()
    assert "port Sigmoid" in activation_mismatch(x.numpy(), ref, sig)
    assert activation_mismatch(x.numpy(), g, g) is None


def test_a_channels_first_layernorm_s_epsilon_is_estimated_over_its_weight_s_axis() -> None:
    # SqueezeBERT's LayerNorm: [N, C, W] in and out, normalised over C
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 16, 5)) * 0.02).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, 16).astype(np.float32), rng.normal(0, 0.1, 16).astype(np.float32)

    def ln(eps: float) -> np.ndarray:
        t = torch.from_numpy(x).transpose(1, 2)
        out = torch.nn.functional.layer_norm(t, (16,), torch.from_numpy(w), torch.from_numpy(b),
                                             eps=eps)
        return out.transpose(1, 2).numpy()

    hint = layernorm_epsilon(x, ln(1e-5), ln(1e-3), 1e-5, weight=w, bias=b)
    assert hint == "LayerNorm epsilon: port uses ~1e-3, reference 1e-5"


def test_quick_gelu_is_recognised_against_gelu() -> None:
    # CLIP's QuickGELU (x * sigmoid(1.702 x)) ported as a GELU: named, not only placed
    x = torch.linspace(-6, 6, 301)
    quick = (x * torch.sigmoid(1.702 * x)).numpy()
    g = torch.nn.functional.gelu(x).numpy()
    assert activation_mismatch(x.numpy(), quick, g) == (
        "activation: reference QuickGELU, port GELU (exact, erf)")
    assert activation_mismatch(x.numpy(), quick, quick) is None


def test_erf_in_numpy_agrees_with_math_erf() -> None:
    import math

    from reprod.diagnose.activations import _erf

    x = np.concatenate([np.linspace(-8, 8, 20001), [0.0, -0.0, 1e-12, -1e-300, 30.0, -30.0]])
    want = np.array([math.erf(v) for v in x])
    assert np.max(np.abs(_erf(x) - want)) < 1.5e-7


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "hardswish", "leaky"])
def test_activations_of_large_outputs_are_recognised_on_every_element(act) -> None:
    """A layer output of a million elements is first tried on a sample: a candidate fitting the
    sample must still fit every element (one wrong element outside the sample: no match)."""
    x = torch.randn(4, 64, 64, 64, generator=torch.Generator().manual_seed(0)) * 3
    f = {"gelu": torch.nn.functional.gelu,
         "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
         "hardswish": torch.nn.functional.hardswish,
         "leaky": lambda t: torch.nn.functional.leaky_relu(t, 0.1)}[act]
    ref = torch.relu(x).numpy()
    port = f(x).numpy()
    hint = activation_mismatch(x.numpy(), ref, port)
    name = {"gelu": "GELU (exact, erf)", "gelu_tanh": "GELU (tanh approximation)",
            "hardswish": "Hardswish (slope 1/6)", "leaky": "LeakyReLU (slope 0.1)"}[act]
    assert hint == f"activation: reference ReLU, port {name}"
    odd = port.copy()
    odd.reshape(-1)[1] += 0.5  # index 1 lies between the sample's first two elements
    assert activation_mismatch(x.numpy(), ref, odd) is None
    odd_ref = ref.copy()
    odd_ref.reshape(-1)[1] += 0.5
    assert activation_mismatch(x.numpy(), odd_ref, port) is None


def test_untransposed_linear() -> None:
    lin = torch.nn.Linear(3, 5)
    w = lin.weight.detach().numpy()
    assert "not transposed" in untransposed_linear(w.T, w)
    assert untransposed_linear(w.T, w.T) is None


def test_diagnose_attaches_hints_only_where_they_fit_and_names_both_layer_types() -> None:
    x = torch.linspace(-5, 5, 64).reshape(4, 16)
    ref = {
        "act.in[0]": x.numpy(),
        "act.out": torch.nn.functional.hardsigmoid(x).numpy(),
        "noise.in[0]": x.numpy(),
        "noise.out": x.numpy(),
        "fc.weight": np.arange(15, dtype=np.float32).reshape(3, 5),
    }
    other = {
        "act.in[0]": x.numpy(),
        "act.out": torch.sigmoid(x).numpy(),
        "noise.in[0]": x.numpy(),
        "noise.out": x.numpy() + 0.1,
        "fc.weight": np.arange(15, dtype=np.float32).reshape(3, 5).T.copy(),
    }
    r = reprod.compare(ref, other)
    d = diagnose(r, ref, other, layer_types={"act": ("Hardsigmoid", "Sigmoid")})
    assert d["act.out"].note.startswith("Hardsigmoid vs Sigmoid: activation: reference Hardsigmoid")
    assert d["noise.out"].note is None
    assert "not transposed" in d["fc.weight"].note


def test_align_run_stat_notes_are_checked_by_magnitude() -> None:
    """_with_notes on an align-style dump: the biased variance is named where step1 fits it, a
    momentum swap is named on the means and the variances, and step-0-only runs say 'possible'."""
    from reprod.align.results import _with_notes

    x0, x1 = _batch((8, 6, 3, 3), seed=10), _batch((8, 6, 3, 3), seed=11)
    pm, pv = _prev(6, seed=12)

    def run(paddle_momentum):
        t, p = {}, {}
        tm, tv, qm, qv = pm, pv, pm, pv
        for i, x in enumerate((x0, x1)):
            tm, tv = _torch_bn_step(x, tm, tv)
            qm, qv = _paddle_bn_step(x, qm, qv, paddle_momentum)
            t[f"step{i}/stat/bn._mean"], t[f"step{i}/stat/bn._variance"] = tm, tv
            p[f"step{i}/stat/bn._mean"], p[f"step{i}/stat/bn._variance"] = qm, qv
        return t, p

    t, p = run(0.9)
    r = _with_notes(reprod.compare(t, p), t, p)
    # fitted at its own step: passes as known; fitted only at another step of the layer: fails
    assert [k.key for k in r.failed] == ["step0/stat/bn._variance"]
    assert r["step1/stat/bn._variance"].status == "known"
    assert "biased batch variance" in r["step1/stat/bn._variance"].note
    assert "(checked at step1)" in r["step0/stat/bn._variance"].note
    step0_only = {k: v for k, v in t.items() if k.startswith("step0")}
    r0 = _with_notes(reprod.compare(step0_only, p), step0_only, p)
    assert r0["step0/stat/bn._variance"].note.startswith("possible: ")
    assert "not checked" in r0["step0/stat/bn._variance"].note

    t, p = run(0.1)
    r = _with_notes(reprod.compare(t, p), t, p)
    for key in ("step1/stat/bn._mean", "step1/stat/bn._variance", "step0/stat/bn._mean"):
        assert "1 - momentum" in r[key].note, key
        assert "biased batch variance" not in r[key].note
    assert not any(k.status == "known" for k in r)
    # a difference that fits neither: no hint
    q = {k: v + np.float32(0.05) * np.arange(6, dtype=np.float32) ** 2 for k, v in t.items()}
    r = _with_notes(reprod.compare(t, q), t, q)
    assert all(k.note is None for k in r.failed) and len(r.failed) == 4


@pytest.mark.parametrize("same_batch", [False, True])
def test_align_train_names_the_variance_bias_or_the_momentum_bug_by_magnitude(same_batch) -> None:
    """A real align_train run: a correct port's variances get the biased-variance hint (checked),
    a port with torch's momentum copied gets the momentum hint and not the variance one."""
    import sys
    from pathlib import Path

    import paddle

    sys.path.insert(0, str(Path(__file__).parent / "align"))
    from align_twins import make_batch, twins

    from reprod.align import align_train

    def train(tm, pm):
        tm.train()
        pm.train()
        batches = [make_batch(0)] if same_batch else [make_batch(i) for i in range(3)]
        return align_train(
            tm, pm, batches, steps=3,
            torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
            torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.05),
            paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.05, parameters=pm.parameters()),
        )

    r = train(*twins(seed=4))
    known = [k for k in r if k.status == "known"]
    assert r.passed and [k.key for k in known] == [f"step{i}/stat/bn._variance" for i in range(3)]
    assert all("biased batch variance" in k.note and "n ≈ 144" in k.note for k in known)
    assert not any("possible" in k.note for k in known)

    tm, pm = twins(seed=4)
    pm.bn._momentum = 0.1  # torch's momentum copied as it is
    r = train(tm, pm)
    stats = [k for k in r.failed if "/stat/" in k.key]
    assert {k.key.split("/")[-1] for k in stats} == {"bn._mean", "bn._variance"}
    for k in stats:
        assert "1 - momentum" in k.note and "biased batch variance" not in k.note, k.key
    assert not any(k.status == "known" for k in r)


def test_an_epsilon_too_small_to_read_back_is_said_so_not_guessed():
    """GPT-J's LayerNorm in a port at 1e-12 against HF's 1e-5 was read as "~5.7e-10": below
    what float32 outputs resolve the fit gives rounding, not the port's value."""
    from reprod.diagnose.epsilon import layernorm_epsilon

    x = (np.random.default_rng(0).standard_normal((64, 32)) * 0.03).astype(np.float32)
    centred = x - x.mean(axis=-1, keepdims=True)
    var = x.astype(np.float64).var(axis=-1, keepdims=True)

    def normed(eps: float) -> np.ndarray:
        return (centred / np.sqrt(var + eps)).astype(np.float32)

    said = layernorm_epsilon(x, normed(1e-5), normed(1e-12), 1e-5)
    assert said is not None and said.startswith("LayerNorm epsilon: port uses far less (under ~")
    assert said.endswith("too small to read back), reference 1e-5"), said
    # one it can read: its value
    assert layernorm_epsilon(x, normed(1e-5), normed(1e-4), 1e-5) == \
        "LayerNorm epsilon: port uses ~1e-4, reference 1e-5"
