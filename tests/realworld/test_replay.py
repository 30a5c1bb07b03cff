"""reprod.capture.replay on torchvision models against paddle.vision's own ports, paired by call
order with no hand-written rule: a correct port replays every leaf layer within float32 rounding,
and every injected bug fails in its own layer and nowhere else, several in one run; with
containers, a dropped residual add fails at its block."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import TARGETS, build_pair, make_inputs, torch_input  # noqa: E402

from reprod.capture import first_divergence, record, replay  # noqa: E402

# one layer replayed alone on the reference's input: the two frameworks' kernels round
# differently, by a few float32 ulps of the output (measured: rel L2 <= 5e-7 on all three models).
# resnet50's randomised BatchNorms give its convolutions outputs near 100, whose rounding reached
# 1.3e-4 on an AVX-512 CPU and 2.6e-4 on an AVX2 one (near-cancelling sums: not relative to the
# element); the injected bugs move their layers by 2e-2 and more
CHECK = {"method": "max", "threshold": 1e-3}
MODELS = ("resnet50", "mobilenet_v3_small")
SEEDS = {"resnet50": 0, "mobilenet_v3_small": 2}  # as test_calibrated.py: its pair is reused
# test_calibrated.py's groups: under pytest-xdist one worker holds one model at a time
GROUP = {"resnet50": "realworld-resnet50", "mobilenet_v3_small": "realworld-mobilenet"}
_CACHE: dict[str, tuple] = {}


def _reference(model: str):
    if model not in _CACHE:
        _CACHE.clear()
        pair = build_pair(model, SEEDS[model])
        x = make_inputs(SEEDS[model], 2)
        with record(pair.torch32) as ref, torch.no_grad():
            pair.torch32(torch_input(x))
        _CACHE[model] = (pair, dict(ref.data))
    return _CACHE[model]


def _param(model: str):
    return pytest.param(model, marks=pytest.mark.xdist_group(GROUP[model]), id=model)


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_a_correct_port_replays_every_leaf_layer(model):
    pair, ref = _reference(model)
    result = replay(pair.paddle(), ref, by_order=True, **CHECK)
    assert result.passed, result.to_table(failed_only=True)
    assert result.options["replay_skipped"] == [] and result.options["replay_unpaired"] == []
    # every leaf layer of the reference is replayed once per call, under the reference's names
    leaves = {k for k in ref if k.endswith(".out") and not k.startswith("<model>")}
    assert set(result.keys()) <= leaves and len(result) >= 100
    worst = max(r.rel_l2 or 0.0 for r in result)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_two_bugs_in_one_port_are_both_found_in_their_layers(model):
    pair, ref = _reference(model)
    from models import BUGS

    port = pair.paddle()
    BUGS["bn_eps"](pair, port)
    wanted = {f"{TARGETS[model]['bn_eps']}.out"}
    if "hardsigmoid_slope" in TARGETS[model]:
        BUGS["hardsigmoid_slope"](pair, port)
        wanted.add(f"{TARGETS[model]['hardsigmoid_slope']}.scale_activation.out")
    else:  # resnet50 has no hardsigmoid: a second BN epsilon, in another stage
        bn = pair.paddle_layer(port, "layer4.1.bn1")
        bn._epsilon = 1e-3
        wanted.add("layer4.1.bn1.out")
    result = replay(port, ref, by_order=True, **CHECK)
    assert {r.key for r in result.failed} == wanted, result.to_table(failed_only=True)
    div = first_divergence(result)
    assert div is not None and f"{div.layer}.out" == min(wanted, key=result.keys().index)
    # the numbers, not only the verdicts: the broken layers differ by orders of magnitude more
    passing = max(r.rel_l2 or 0.0 for r in result if r.passed)
    assert min(result[k].rel_l2 for k in wanted) > 100 * passing
    assert np.isfinite(passing)


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_by_order_with_containers_a_dropped_residual_fails_at_its_block(model):
    """Containers pair by the leaf layers they hold (before, none paired by order, and the
    missing add failed nowhere); the float64 twin's capture is the noise reference."""
    pair, ref = _reference(model)
    x = make_inputs(SEEDS[model], 2)
    with record(pair.torch64) as hi, torch.no_grad():
        pair.torch64(torch_input(x, torch.float64))
    correct = replay(pair.paddle(), ref, by_order=True, containers=True, noise=dict(hi.data))
    assert correct.passed, correct.to_table(failed_only=True)
    assert correct.options["replay_skipped"] == []
    target = TARGETS[model]["no_residual"]
    assert f"{target}.out" in correct.keys()
    bug = replay(pair.paddle("no_residual"), ref, by_order=True, containers=True,
                 noise=dict(hi.data))
    failed = {k.key for k in bug.failed}
    # the block, and what holds it; no leaf fails
    assert f"{target}.out" in failed and "<model>.out" in failed, failed
    assert all(target.startswith(k[: -len(".out")] + ".") or k in (f"{target}.out", "<model>.out")
               for k in failed), failed
