"""explain_kinks: gradients that differ only because a ReLU input sits within noise of 0, on
opposite sides in the reference and a correct port.

The model is torch only: fc0 -> fc1 -> act (ReLU) -> fc2. fc1 sums its three products in an
order set per side; for the first sample's first unit the products are 1, 3e-8 and -1, so the
reference's order ((1 - 1) + 3e-8) gives the exact 3e-8, like float64, while the port's
((1 + 3e-8) - 1) rounds it to 0: a correct float32 result on the other side of ReLU's kink.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ordered_linear import TorchOrderedLinear  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import (  # noqa: E402
    explain_kinks,
    find_kink_crossings,
    first_divergence,
    layer_types,
    param_key,
    record,
)

X = np.array([[1.0, 3e-8, -1.0], [0.3, -0.7, 0.9]], dtype=np.float32)
W1 = np.array([[1.0, 1.0, 1.0], [0.5, -1.2, 0.8], [-0.9, 0.4, 0.3], [0.7, 0.2, -1.1]], np.float32)
W2 = np.array([[0.6, -0.3, 0.9, 0.2], [-0.4, 0.8, 0.1, 0.5]], np.float32)
LOSS_W = np.array([[1.0, -2.0], [0.5, 1.5]], np.float32)


class DoubledReLUGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * 2


class BadReLU(torch.nn.Module):
    def forward(self, x):
        return DoubledReLUGrad.apply(x)


class Net(torch.nn.Module):
    def __init__(self, order: tuple[int, ...], *, fc0_scale: float = 1.0, bad_relu: bool = False):
        super().__init__()
        self.fc0 = torch.nn.Linear(3, 3, bias=False)
        self.fc1 = TorchOrderedLinear(W1, order)
        self.act = BadReLU() if bad_relu else torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.fc0.weight.copy_(torch.eye(3) * fc0_scale)
            self.fc2.weight.copy_(torch.from_numpy(W2))
            self.fc2.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.fc0(x))))


ACCURATE, NAIVE = (0, 2, 1), (0, 1, 2)


def capture(model, dtype=torch.float32, *, steps: int = 1, **kw) -> dict:
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with record(model, backward=True, **kw) as log:
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss = (model(torch.from_numpy(X).to(dtype)) * torch.from_numpy(LOSS_W).to(dtype)).sum()
            loss.backward()
            if steps > 1:
                opt.step()
                for name, p in model.named_parameters():
                    log.add(f"step{step}/weight/{name}", p.detach())
    return dict(log.data)


@pytest.fixture(scope="module")
def runs() -> dict:
    return {
        "ref": capture(Net(ACCURATE)),
        "ref64": capture(Net(ACCURATE), torch.float64),
        "port": capture(Net(NAIVE)),
        "bug_fc0": capture(Net(NAIVE, fc0_scale=1.001)),
        "bad_relu": capture(Net(NAIVE, bad_relu=True)),
    }


TYPES = layer_types(Net(ACCURATE))
UPSTREAM = {  # every gradient the crossing reaches: the ReLU's input and everything before it
    "act.grad_in", "fc1.grad_out", "param.fc1.weight.grad", "fc1.grad_in", "fc0.grad_out",
    "param.fc0.weight.grad",
}


def test_the_port_crosses_the_kink_and_its_upstream_gradients_fail(runs):
    assert runs["ref"]["act.in"][0, 0] > 0 and runs["ref64"]["act.in"][0, 0] > 0
    assert runs["port"]["act.in"][0, 0] == 0
    result = reprod.compare(runs["ref"], runs["port"], noise=runs["ref64"])
    assert result["act.in"].passed and result["fc1.out"].passed  # forward: within noise
    assert {r.key for r in result.failed} == UPSTREAM
    # without explain_kinks the ReLU's backward is blamed
    div = first_divergence(result, layer_types=TYPES)
    assert div is not None and div.layer == "act" and div.direction == "backward"


def test_explain_kinks_labels_exactly_the_upstream_gradients(runs):
    result = reprod.compare(runs["ref"], runs["port"], noise=runs["ref64"])
    explained = explain_kinks(result, runs["ref"], runs["port"], runs["ref64"], layer_types=TYPES)
    kink = {r.key for r in explained if r.status == "kink"}
    assert kink == UPSTREAM
    assert explained.passed and not explained.failed
    for key in UPSTREAM:
        r = explained[key]
        assert r.passed and r.noise_multiple == result[key].noise_multiple  # statistics kept
        assert r.reason.startswith(
            "downstream of the kink crossing at act (ReLU): 1 element within noise of 0 on "
            "opposite sides"
        ), r.reason
    # the rest keeps its verdict, the crossing's input carries a note
    for r in explained:
        if r.key not in UPSTREAM:
            assert r.status == result[r.key].status == "passed"
    assert "kink crossing at act (ReLU)" in explained["act.in"].note
    (crossing,) = explained.options["kink_crossings"]
    assert crossing["layer"] == "act" and crossing["elements"] == 1
    assert crossing["explained"] == len(UPSTREAM)
    assert first_divergence(explained, layer_types=TYPES) is None
    assert explained.summary()["statuses"]["kink"] == len(UPSTREAM)
    table = explained.to_table()
    assert "KINK" in table and "FAILED" not in table


def test_layer_types_are_recognised_from_the_data(runs):
    result = reprod.compare(runs["ref"], runs["port"], noise=runs["ref64"])
    explained = explain_kinks(result, runs["ref"], runs["port"])  # no types, no noise dump
    assert {r.key for r in explained if r.status == "kink"} == UPSTREAM
    assert explained.options["kink_crossings"][0]["layer_type"] == "ReLU"


def test_a_bug_before_the_kink_is_still_a_failure(runs):
    result = reprod.compare(runs["ref"], runs["bug_fc0"], noise=runs["ref64"])
    explained = explain_kinks(result, runs["ref"], runs["bug_fc0"], runs["ref64"], layer_types=TYPES)
    assert not explained["act.in"].passed  # the ReLU input differs: a divergence, no crossing
    assert explained.options["kink_crossings"] == []
    assert [r.key for r in explained.failed] == [r.key for r in result.failed]
    div = first_divergence(explained, layer_types=TYPES)
    assert div is not None and div.layer == "fc0" and div.direction == "forward"


def test_a_wrong_backward_in_the_kinked_layer_is_not_explained(runs):
    # the port's ReLU doubles its gradient: its grad_in fails away from the crossing element too
    result = reprod.compare(runs["ref"], runs["bad_relu"], noise=runs["ref64"])
    explained = explain_kinks(result, runs["ref"], runs["bad_relu"], runs["ref64"], layer_types=TYPES)
    assert not explained.passed
    assert not any(r.status == "kink" for r in explained)
    div = first_divergence(explained, layer_types=TYPES)
    assert div is not None and div.layer == "act"


def test_plain_thresholds_use_a_few_ulps_of_the_input(runs):
    result = reprod.compare(runs["ref"], runs["port"], method="max", threshold=1e-6)
    assert {r.key for r in result.failed} == UPSTREAM
    explained = explain_kinks(result, runs["ref"], runs["port"], layer_types=TYPES)
    assert explained.passed
    (crossing,) = find_kink_crossings(result, runs["ref"], runs["port"], layer_types=TYPES)
    assert crossing.layer == "act" and crossing.kinks == (0.0,) and crossing.explained == 0
    assert crossing.message == "kink crossing at act (ReLU): 1 element within noise of 0 on opposite sides"
    # no kink layers: nothing to explain
    none = explain_kinks(result, runs["ref"], runs["port"], layer_types=TYPES, kinks={"act": None})
    assert [r.key for r in none.failed] == [r.key for r in result.failed]


def test_steps_after_a_kinked_step_are_downstream_too():
    ref = capture(Net(ACCURATE), steps=2)
    ref64 = capture(Net(ACCURATE), torch.float64, steps=2)
    port = capture(Net(NAIVE), steps=2)
    result = reprod.compare(ref, port, noise=ref64)
    step2 = [r.key for r in result.failed if "#2" in r.key or r.key.startswith("step2/")]
    assert step2  # the second step starts from weights that differ
    explained = explain_kinks(result, ref, port, ref64, layer_types=TYPES, updates="step*/weight/*")
    assert explained.passed, explained.to_table(failed_only=True)
    for key in step2:
        assert explained[key].reason.startswith("after the kink crossing at act (ReLU)")
    if not result["step1/weight/fc1.weight"].passed:
        assert explained["step1/weight/fc1.weight"].status == "kink"
    # without ``updates`` the step-1 weights are not known to come from the gradients
    plain = explain_kinks(result, ref, port, ref64, layer_types=TYPES)
    assert {r.key for r in plain.failed} <= {f"step1/weight/{n}" for n in ("fc0.weight", "fc1.weight")}


def test_order_places_layers_the_capture_left_out(runs):
    def act_only(data: dict, model_grads: dict) -> dict:
        out = {k: v for k, v in data.items() if k.startswith("act.")}
        out.update(model_grads)
        return out

    def grads(data: dict) -> dict:
        return {param_key(n): data[param_key(n)] for n in ("fc0.weight", "fc1.weight", "fc2.weight")}

    ref = act_only(runs["ref"], grads(runs["ref"]))
    ref64 = act_only(runs["ref64"], grads(runs["ref64"]))
    port = act_only(runs["port"], grads(runs["port"]))
    result = reprod.compare(ref, port, noise=ref64)
    failing = {r.key for r in result.failed}
    assert failing == {"act.grad_in", "param.fc0.weight.grad", "param.fc1.weight.grad"}
    blind = explain_kinks(result, ref, port, ref64, layer_types=TYPES)
    assert {r.key for r in blind.failed} == failing - {"act.grad_in"}  # fc0 / fc1: where?
    placed = explain_kinks(result, ref, port, ref64, layer_types=TYPES,
                           order=["fc0", "fc1", "act", "fc2"])
    assert placed.passed


def test_a_max_pool_tie_picked_differently():
    # window 2, stride 2: ref picks element 1 of the first window, the port element 0
    x_ref = np.array([[[1.0, np.nextafter(np.float32(1), np.float32(2)), 0.2, 0.3]]], np.float32)
    x_port = x_ref[..., [1, 0, 2, 3]]
    grad = np.array([[[2.0, -1.0]]], np.float32)

    def side(x):
        return {
            "conv.in": np.ones((1, 1, 4), np.float32),
            "conv.out": x,
            "pool.in": x,
            "pool.out": np.maximum(x[..., ::2], x[..., 1::2]),
            "pool.grad_out": grad,
            "pool.grad_in": np.where(x == np.maximum(x[..., ::2], x[..., 1::2]).repeat(2, -1),
                                     grad.repeat(2, -1), 0).astype(np.float32),
            "conv.grad_out": np.zeros((1, 1, 4), np.float32),
        }

    ref, port = side(x_ref), side(x_port)
    port["conv.grad_out"] = port["pool.grad_in"]
    ref["conv.grad_out"] = ref["pool.grad_in"]
    result = reprod.compare(ref, port, noise={k: v.astype(np.float64) for k, v in ref.items()})
    assert {r.key for r in result.failed} == {"pool.grad_in", "conv.grad_out"}
    explained = explain_kinks(result, ref, port)  # recognised as a max-pool from its values
    assert explained.passed
    (crossing,) = explained.options["kink_crossings"]
    assert crossing["layer_type"] == "MaxPool" and crossing["kinks"] == "max"
    assert "picked differently" in explained["conv.grad_out"].reason


def test_kink_keys_read_as_passing_in_the_log_and_are_counted_in_the_summary() -> None:
    from reprod.diff.result import DiffResult, KeyResult

    kr = KeyResult(key="fc.grad_in[0]", passed=True, status="kink", reason="downstream of a kink",
                   methods=("max",), thresholds={"max": 1e-6}, checks={"max": False},
                   ref_dtype="float32", other_dtype="float32", max_abs=1e-3, size=4)
    r = DiffResult(results=(kr,))
    assert "max diff: check passed: True" in r.to_log() and r.to_log().endswith("diff check passed")
    assert "1 passed (1 only across a kink crossing)" in r.summary_line()
