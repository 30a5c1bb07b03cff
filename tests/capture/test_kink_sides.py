"""Each framework's own kink test (``reprod.capture.kinks.SIDES``): where its backward kernel takes
an element to the upper side of each kink, measured here against the real kernels, and what
that changes: a torch port and a Paddle port holding an activation input at 3 - 1 ulp alike
compute different gradients there (Paddle's Hardswish tests ``fl32(x + 3) >= 6``, torch's
``x >= 3``), which ``explain_kinks(frameworks=("torch", "paddle"))`` finds as a crossing and the
plain ``x > k`` test cannot."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import reprod  # noqa: E402
from reprod.capture import explain_kinks, find_kink_crossings, layer_types, record  # noqa: E402
from reprod.capture.kinks import KINK_POINTS, SIDES  # noqa: E402
from reprod.capture.kinks.points import onto_side, sides  # noqa: E402

F32 = np.float32


def _window(k: float, n: int = 300) -> np.ndarray:
    """Every float32 within n ulps of k, and 20,000 random values around it."""
    lo = hi = F32(k)
    out = [F32(k)]
    for _ in range(n):
        lo, hi = np.nextafter(lo, F32(-np.inf)), np.nextafter(hi, F32(np.inf))
        out += [lo, hi]
    rand = np.random.default_rng(0).normal(k, 0.1, 20_000)
    return np.concatenate([np.array(out, F32), rand.astype(F32)])


def _grad(framework: str, fn, x: np.ndarray) -> np.ndarray:
    if framework == "torch":
        t = torch.tensor(x, requires_grad=True)
        fn(t).sum().backward()
        return t.grad.numpy()
    p = paddle.to_tensor(x, stop_gradient=False)
    fn(p).sum().backward()
    return p.grad.numpy()


def _upper(kind: str, i: int, g: np.ndarray) -> np.ndarray:
    """The upper side of kink i, read from the gradient: which segment's formula was used."""
    if kind == "leakyrelu":
        return g == 1.0
    if kind == "hardswish":
        return g != 0 if i == 0 else g == 1.0
    return g != 0 if i == 0 else g == 0  # relu6 / hardtanh / hardsigmoid: flat above the top


def _functions(framework: str) -> dict:
    if framework == "torch":
        f = torch.nn.functional
        return {"relu6": f.relu6, "hardswish": f.hardswish, "hardsigmoid": f.hardsigmoid,
                "hardtanh": f.hardtanh, "leakyrelu": lambda x: f.leaky_relu(x, 0.01)}
    f = paddle.nn.functional
    return {"relu6": f.relu6, "hardswish": paddle.nn.Hardswish(), "hardsigmoid": paddle.nn.Hardsigmoid(),
            "hardtanh": f.hardtanh, "leakyrelu": lambda x: f.leaky_relu(x, 0.01)}


CASES = [(fw, kind) for fw in ("torch", "paddle") for kind in
         ("relu6", "hardswish", "hardsigmoid", "hardtanh", "leakyrelu")]


@pytest.mark.parametrize("framework,kind", CASES)
def test_each_side_rule_is_its_kernels_own(framework, kind):
    spec = KINK_POINTS[kind]
    for i, k in enumerate(spec):
        x = _window(k)
        g = _grad(framework, _functions(framework)[kind], x.copy())
        got = sides(spec, kind, framework, x.astype(np.float64), "float32")[i]
        want = _upper(kind, i, g)
        wrong = np.nonzero(got != want)[0]
        assert wrong.size == 0, (f"{framework} {kind} at {k}: {wrong.size} elements on the other "
                                 f"side, e.g. x - k = {x[wrong[:3]].astype(np.float64) - k}")


def test_the_frameworks_differ_where_the_table_says():
    just_below = np.array([np.nextafter(F32(3), F32(0))], np.float64)
    t = sides(KINK_POINTS["hardswish"], "Hardswish", "torch", just_below, "float32")[1]
    p = sides(KINK_POINTS["hardswish"], "Hardswish", "paddle", just_below, "float32")[1]
    assert not t[0] and p[0]
    assert set(SIDES) == {"torch", "paddle"}
    # a class without a measured rule, or a caller's own kink points, test x > k
    x = np.array([-1.0, 0.0, 1e-30], np.float64)
    assert [list(s) for s in sides((0.0,), "ReLU", "paddle", x, "float32")] == [[False, False, True]]
    assert [list(s) for s in sides((1.0,), "Hardswish", "paddle", x, "float32")] == [
        [False, False, False]]


def test_onto_side_gives_the_float64_rerun_the_ports_gradient():
    # every float32 within 40 ulps of each kink, as the port (Paddle, float32) holds them
    for kind in ("hardswish", "hardsigmoid"):
        spec = KINK_POINTS[kind]
        x = np.concatenate([_window(k, 40)[:81] for k in spec]).astype(np.float64)
        moved = onto_side(x, spec, kind, "paddle", "float32", "torch")
        assert np.max(np.abs(moved - x)) <= 4 * np.spacing(F32(3))  # a few ulps at most
        changed = moved != x
        assert 0 < changed.sum() <= 6
        port = _grad("paddle", _functions("paddle")[kind], x.astype(F32))
        rerun = _grad("torch", _functions("torch")[kind], moved)  # float64
        # the rerun takes each element to the port's segment: the gradients agree to float32
        np.testing.assert_allclose(rerun, port, rtol=1e-6, atol=1e-7)
        unmoved = _grad("torch", _functions("torch")[kind], x)
        assert np.any(np.abs(unmoved - port) > 0.1)  # what it was without the move
    x = np.array([1.0, 2.0], np.float64)
    assert onto_side(x, (-3.0, 3.0), "Hardswish", "paddle", "float32", "torch") is x


class _TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = torch.nn.Linear(3, 3, bias=False)
        self.act = torch.nn.Hardswish()
        with torch.no_grad():
            self.fc0.weight.copy_(torch.eye(3))

    def forward(self, x):
        return self.act(self.fc0(x))


class _PaddleNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc0 = paddle.nn.Linear(3, 3, bias_attr=False)
        self.act = paddle.nn.Hardswish()
        self.fc0.weight.set_value(np.eye(3, dtype=F32))

    def forward(self, x):
        return self.act(self.fc0(x))


# the first sample's first element sits 1 ulp below Hardswish's upper kink in both ports
X = np.array([[np.nextafter(F32(3), F32(0)), 0.5, -1.0], [1.0, 2.0, -2.5]], F32)
LOSS_W = np.array([[1.0, -2.0, 0.5], [0.5, 1.5, -1.0]], F32)


def _capture(framework: str, dtype=None) -> dict:
    if framework == "torch":
        model = _TorchNet().to(dtype or torch.float32)
        with record(model, backward=True, inputs=True) as log:
            x = torch.from_numpy(X).to(dtype or torch.float32).requires_grad_(True)
            (model(x) * torch.from_numpy(LOSS_W).to(x.dtype)).sum().backward()
    else:
        model = _PaddleNet()
        with record(model, backward=True, inputs=True) as log:
            x = paddle.to_tensor(X, stop_gradient=False)
            (model(x) * paddle.to_tensor(LOSS_W)).sum().backward()
    # the weight gradients are transposed in Paddle's Linear: the activations' keys are compared
    return {k: v for k, v in log.data.items() if not k.startswith("param.")}


def test_a_crossing_both_ports_hold_alike_is_found_with_the_frameworks_named():
    ref, port, ref64 = _capture("torch"), _capture("paddle"), _capture("torch", torch.float64)
    assert ref["act.in"][0, 0] == port["act.in"][0, 0] == ref64["act.in"][0, 0]
    result = reprod.compare(ref, port, noise=ref64)
    assert result["act.in"].passed and result["act.out"].passed
    failing = {r.key for r in result.failed}
    assert "act.grad_in" in failing and failing <= {"act.grad_in", "fc0.grad_out", "fc0.grad_in",
                                                  "<model>.grad_in"}
    # x > k on both sides: no crossing, the Hardswish backward is left failing
    types = layer_types(_TorchNet())
    assert find_kink_crossings(result, ref, port, ref64, layer_types=types) == []
    assert not explain_kinks(result, ref, port, ref64, layer_types=types).passed
    explained = explain_kinks(result, ref, port, ref64, layer_types=types,
                              frameworks=("torch", "paddle"))
    assert explained.passed, explained.to_table(failed_only=True)
    (crossing,) = explained.options["kink_crossings"]
    assert crossing["layer"] == "act" and crossing["elements"] == 1 and crossing["kinks"] == [3.0]
    # a port that really differs is not covered by it: the gradient scaled away from the element
    bad = dict(port, **{"act.grad_in": port["act.grad_in"] * F32(1.01)})
    bad["fc0.grad_out"] = bad["act.grad_in"]
    again = reprod.compare(ref, bad, noise=ref64)
    assert not explain_kinks(again, ref, bad, ref64, layer_types=types,
                             frameworks=("torch", "paddle")).passed


def test_frameworks_are_checked():
    result = reprod.compare({"a": np.zeros(2, F32)}, {"a": np.zeros(2, F32)})
    with pytest.raises(ValueError, match="frameworks=.*'torch', 'paddle'"):
        explain_kinks(result, {}, {}, frameworks=("torch", "tensorflow"))
    with pytest.raises(ValueError, match="frameworks="):
        find_kink_crossings(result, {}, {}, frameworks="paddle")
