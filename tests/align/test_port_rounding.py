"""``align_train(calibrate=True)`` and the port's own float32 rounding (``reprod.align.port_rounding``).

The twins: a Linear over 8 x 4,096 rows, averaged over the rows, then a head. Written the same way in
both frameworks, the port is correct; yet Paddle's CPU kernel sums the Linear's bias gradient over
the 32,768 rows ~550x less exactly than torch's, and a plain calibrated check failed that
gradient, and the weights, momentum and Adam moments updated from it. Each failing
key is now run again in float64 on the port's side: it agrees with the reference's float64 twin
there, so its float32 difference is rounding. A bug is another function in float64 too.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod import compare  # noqa: E402
from reprod.align import align_train  # noqa: E402
from reprod.align import port_rounding as pr  # noqa: E402
from reprod.align import steps as steps_module  # noqa: E402
from reprod.align.forcing import Unsupported  # noqa: E402

ROWS, WIDTH = 4096, 64
RNG = np.random.default_rng(0)
X = RNG.standard_normal((8, ROWS, WIDTH)).astype(np.float32)
Y = RNG.integers(0, 3, 8)
BIAS = "step0/grad/fc.bias"


class TorchWide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, 3)

    def forward(self, x):
        return self.head(self.fc(x).mean(1))


class PaddleWide(paddle.nn.Layer):
    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.fc = paddle.nn.Linear(WIDTH, WIDTH)
        self.head = paddle.nn.Linear(WIDTH, 3)
        self.half = half

    def forward(self, x):
        h = self.fc(x)
        if self.half:  # a precision the port's own code lowers: float64 keeps the cast
            h = h.astype("float16").astype(x.dtype)
        return self.head(h.mean(1))


def _pair(half: bool = False):
    torch.manual_seed(0)
    tm, pm = TorchWide(), PaddleWide(half=half)
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0.0, 0.05)
    pm.set_state_dict({k: v.detach().numpy().T if v.ndim == 2 else v.detach().numpy()
                       for k, v in tm.state_dict().items()})
    return tm, pm


def _train(tm, pm, *, steps: int = 1, opt: str = "momentum", paddle_kw=None, **kw):
    paddle_kw = paddle_kw or {}
    if opt == "momentum":
        topt = torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9,
                               weight_decay=kw.pop("weight_decay", 0.0))
        popt = paddle.optimizer.Momentum(0.1, 0.9, parameters=pm.parameters(), **paddle_kw)
    elif opt == "sgd":
        topt = torch.optim.SGD(tm.parameters(), lr=0.01)
        popt = paddle.optimizer.SGD(0.01, parameters=pm.parameters())
    else:
        topt = torch.optim.Adam(tm.parameters(), lr=1e-3)
        popt = paddle.optimizer.Adam(1e-3, parameters=pm.parameters(), **paddle_kw)
    return align_train(tm, pm, [(X, Y)], steps=steps, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(), torch_optimizer=topt,
                       paddle_optimizer=popt, **{"calibrate": True, **kw})


def test_a_correct_ports_long_bias_reduction_passes_as_its_own_rounding() -> None:
    r = _train(*_pair(), steps=2)
    assert r.passed, r.to_table(failed_only=True)
    g = r[BIAS]
    # far over the reference's noise, and over any factor a plain calibrated check allows
    assert g.status == "known" and g.noise_multiple > 200, (g.noise_multiple, g.reason)
    assert "the port's float32 rounding" in g.reason
    assert "run again in float64 from the same state, it agrees" in g.reason
    # the weights and momentum updated from it: the reference's optimizer given the port's own
    # gradient makes them
    for key in ("step0/param/fc.bias", "step0/opt/fc.bias.velocity"):
        assert r[key].status == "known" and "of the port's own gradient" in r[key].reason, key
    assert r.options["port_rounding"]["step0"]["known"] >= 1
    from reprod.align.results import _rounding_summary

    (line,) = _rounding_summary(r)
    assert line.startswith("the port's own float32 rounding (run again in float64 from the same "
                           "state): 2 keys"), line
    # step 1 is judged from the reference's state, its rounding checked from that state too
    assert r.options["forcing"]["steps"] == [1]
    assert r.options["port_rounding"]["step1"]["known"] >= 1
    assert r["step1/grad/fc.bias"].passed


def test_each_later_step_is_judged_from_the_references_state_and_passes() -> None:
    # plain SGD: step 0's weights pass plainly, its gradient by the port's rounding; steps 1 and
    # 2 carry that rounding, are judged from the reference's state, and pass there (step 2 used
    # to keep failing as "step 1's difference, carried" though step 1 passed forced)
    r = _train(*_pair(), steps=3, opt="sgd")
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["forcing"] == {"steps": [1, 2], "failed": 0}
    for s in (1, 2):
        g = r[f"step{s}/grad/fc.bias"]
        assert g.status == "known" and g.noise_multiple > 200, (g.status, g.reason)
        assert "the port's float32 rounding" in g.reason


def test_without_the_float64_rerun_the_correct_port_fails(monkeypatch) -> None:
    monkeypatch.setattr(steps_module.port_rounding, "needed", lambda result: False)
    r = _train(*_pair())
    assert not r.passed and r.first_failure.key == BIAS, r.to_table(failed_only=True)
    assert r[BIAS].noise_multiple > 200
    assert "port_rounding" not in r.options


def test_the_ports_float64_run_is_the_references_and_leaves_the_port_as_it_was() -> None:
    tm, pm = _pair()
    hooked = []
    pm.fc.weight.register_hook(lambda g: hooked.append(1) or g)
    before = {k: v.numpy().copy() for k, v in pm.state_dict().items()}
    got = pr.paddle_float64(pm, None, (X, Y), paddle.nn.CrossEntropyLoss(), stats=True)
    # an independent float64 reference: the torch model in float64
    t64 = tm.double()
    loss = torch.nn.CrossEntropyLoss()(t64(torch.from_numpy(X).double()), torch.from_numpy(Y))
    loss.backward()
    np.testing.assert_allclose(got["step0/loss"], loss.item(), rtol=1e-12)
    np.testing.assert_allclose(got[BIAS], t64.fc.bias.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["step0/grad/fc.weight"], t64.fc.weight.grad.numpy().T,
                               rtol=1e-9, atol=1e-12)
    assert all(v.dtype == np.float64 for v in got.values())
    # cast in place and back: the tensors' hooks (the port's code) ran, and stay
    assert hooked == [1]
    assert all(str(v.dtype) == "paddle.float32" for v in pm.state_dict().values())
    assert all(np.array_equal(v.numpy(), before[k]) for k, v in pm.state_dict().items())
    (pm(paddle.to_tensor(X[:1])).sum()).backward()
    assert hooked == [1, 1]


def test_a_backward_bug_smaller_than_paddles_rounding_still_fails() -> None:
    tm, pm = _pair()
    # 1e-5 of the gradient: ~30x below Paddle's own rounding of this key, ~100x over torch's
    pm.fc.bias.register_hook(lambda g: g * (1 + 1e-5))
    r = _train(tm, pm)
    assert not r.passed
    g = r[BIAS]
    assert g.status == "failed" and "rounding" not in g.reason, g.reason
    assert r.options["port_rounding"]["step0"] == {"known": 0}


def test_a_float16_intermediate_in_the_port_is_not_its_rounding() -> None:
    r = _train(*_pair(half=True))
    assert not r.passed
    assert r["step0/logits"].status == "failed" and "rounding" not in r["step0/logits"].reason


def test_a_missing_weight_decay_fails_though_the_gradients_are_rounding() -> None:
    r = _train(*_pair(), weight_decay=1e-3)
    assert not r.passed
    assert r[BIAS].status == "known"  # the gradients do not see the decay
    failed = {k.key for k in r.failed}
    assert "step0/opt/fc.weight.velocity" in failed and "step0/param/fc.weight" in failed


def test_adam_moments_of_a_rounded_gradient_pass_and_a_wrong_beta2_fails() -> None:
    ok = _train(*_pair(), opt="adam")
    assert ok.passed, ok.to_table(failed_only=True)
    for acc in ("moment1", "moment2"):
        m = ok[f"step0/opt/fc.bias.{acc}"]
        assert m.status == "known" and m.noise_multiple > 200, (m.noise_multiple, m.reason)
    bad = _train(*_pair(), opt="adam", paddle_kw={"beta2": 0.99})
    assert not bad.passed
    assert bad["step0/opt/fc.bias.moment2"].status == "failed"


def test_a_port_that_cannot_run_in_float64_keeps_its_verdict(monkeypatch) -> None:
    def no_kernel(*args, **kwargs):
        raise RuntimeError("(NotFound) The kernel with key (CPU, NCHW, float64) of kernel "
                           "`fancy_op` is not registered\n  [Hint: ...]")

    monkeypatch.setattr(pr, "paddle_float64", no_kernel)
    r = _train(*_pair())
    assert not r.passed and r[BIAS].status == "failed"
    why = r.options["port_rounding"]["step0"]["skipped"]
    assert why.startswith("the Paddle model does not run in float64 (RuntimeError: (NotFound)")
    assert "\n" not in why


def test_a_port_holding_half_precision_tensors_is_not_cast() -> None:
    _, pm = _pair()
    pm.head.to(dtype="float16")
    with pytest.raises(Unsupported, match="float16"):
        pr.paddle_float64(pm, None, (X, Y), paddle.nn.CrossEntropyLoss(), stats=False)


def _result(ref, other, hi):
    return compare({"step0/grad/w": ref}, {"step0/grad/w": other}, noise={"step0/grad/w": hi})


def test_rescued_needs_both_float64_runs_to_agree_within_the_references_noise() -> None:
    rng = np.random.default_rng(1)
    t64 = rng.standard_normal(1000)
    t32 = (t64 + rng.standard_normal(1000) * 1e-7).astype(np.float32)
    p32 = (t64 + rng.standard_normal(1000) * 1e-5).astype(np.float32)  # rounds 100x more
    r = _result(t32, p32, t64)
    assert not r.passed
    key = "step0/grad/w"
    ref, other, noise = {key: t32}, {key: p32}, {key: t64}
    same = pr.rescued(r, ref, other, noise, {key: t64 + 1e-13})
    assert same.passed and same[key].status == "known"
    assert "the port's float32 rounding" in same[key].reason
    # the port's float64 value another function's: 1e-6 apart, over the reference's noise
    assert not pr.rescued(r, ref, other, noise, {key: t64 + 1e-6}).passed
    # a key the float64 run did not make, or one holding a NaN, is left as it is
    assert pr.rescued(r, ref, other, noise, {}) is r
    nan = p32.copy()
    nan[0] = np.nan
    assert pr.rescued(r, ref, {key: nan}, noise, {key: t64}) is r
    assert pr.needed(r) and not pr.needed(same)
    from reprod.diff.noise import _norms

    assert _norms(np.zeros(0)) == (0.0, 0.0) and _norms(np.array([3.0, -4.0])) == (5.0, 4.0)


class PaddleWideMasked(PaddleWide):
    """A port holding what is no float: a bool mask it selects with (PaddleNLP's CodeGen and
    GPT-J) and an int64 buffer it indexes with (PaddleNLP's ``position_ids``), one persistable,
    one not."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("keep", paddle.ones([WIDTH], dtype="bool"), persistable=False)
        self.register_buffer("order", paddle.arange(WIDTH, dtype="int64"))

    def forward(self, x):
        h = paddle.where(self.keep, self.fc(x), paddle.zeros_like(x))
        return self.head(paddle.index_select(h, self.order, axis=-1).mean(1))


def test_the_float64_run_casts_only_floating_tensors_and_a_failing_port_is_localised() -> None:
    # Layer.to(dtype=...) cast the bool and int64 buffers too and back as float32: the port then
    # failed in paddle.where, or its restore asserted (and the model stayed half cast)
    tm, _ = _pair()
    pm = PaddleWideMasked()
    pm.set_state_dict({k: v.detach().numpy().T if v.ndim == 2 else v.detach().numpy()
                       for k, v in tm.state_dict().items()})
    got = pr.paddle_float64(pm, None, (X, Y), paddle.nn.CrossEntropyLoss(), stats=False)
    assert got["step0/loss"].dtype == np.float64
    assert (pm.keep.dtype, pm.order.dtype) == (paddle.bool, paddle.int64)
    assert all(str(v.dtype) == "paddle.float32" for v in pm.parameters())
    # a bug at step 0: calibrated, the float64 rerun runs, and the localisation after it too
    pm.fc.bias.set_value(pm.fc.bias * 1.05)
    r = _train(tm, pm)
    assert not r.passed
    assert (pm.keep.dtype, pm.order.dtype) == (paddle.bool, paddle.int64)
    assert r.options["divergence"]["layer"] == "fc", r.options.get("divergence")


def test_a_port_that_cannot_be_put_back_is_never_passed_over(monkeypatch) -> None:
    _, pm = _pair()
    real = pr._cast_floating

    def fails_back(model, dtype):
        if dtype == "float32":
            raise RuntimeError("out of memory")
        real(model, dtype)

    monkeypatch.setattr(pr, "_cast_floating", fails_back)
    with pytest.raises(pr.NotRestored, match="could not be put back.*out of memory"):
        _train(*_pair()[:1], pm)
