"""Real models through reprod itself (collected only where torchvision and paddle import, see
conftest.py): torchvision resnet50 / mobilenet_v3_large / mobilenet_v3_small against
paddle.vision's own ports, judged by ``reprod.compare(ref, port, noise=ref64)``
(tests/realworld/calibrated.py has the scenarios, MEASUREMENTS.md the numbers).

- A correct port fails no key in float32, forward, per layer and over 2 SGD steps, apart from the
  known difference (BN running_var, biased against unbiased; checked to be exactly that) and the
  gradients ``explain_kinks`` labels ``"kink"``.
- Each injected bug fails, and ``first_divergence`` names the layer it was put in; BN momentum,
  which only acts in training, fails that layer's running_mean.

mobilenet_v3_small (seed 2) is the fast one with a kink crossing in the first step on a correct
port; mobilenet_v3_large's seed 0 has one in the second.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibrated as C  # noqa: E402
from models import TARGETS, bugs_for, build_pair  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import first_divergence  # noqa: E402

SEEDS = {"resnet50": 0, "mobilenet_v3_large": 0, "mobilenet_v3_small": 2}
# which scenarios each model runs on a correct port, and on each bug
CORRECT = {"resnet50": ("forward", "layers", "train"),
           "mobilenet_v3_large": ("forward", "layers", "train"),
           "mobilenet_v3_small": ("layers", "train")}
BUGGED = {"resnet50": ("forward", "layers"),
          "mobilenet_v3_large": ("forward", "layers", "train"),
          "mobilenet_v3_small": ()}
# under pytest-xdist each worker takes one group (tests/conftest.py runs --dist loadgroup)
GROUP = {"resnet50": "realworld-resnet50", "mobilenet_v3_large": "realworld-mobilenet",
         "mobilenet_v3_small": "realworld-mobilenet"}


def _param(model: str, *rest: str):
    return pytest.param(model, *rest, marks=pytest.mark.xdist_group(GROUP[model]),
                        id="-".join((model, *rest)))


_PAIRS: dict[str, object] = {}


def pair_of(model: str):
    """One model pair at a time, built once: conftest.py runs a model's tests one after the
    other, and the torch captures cached for it (~2 GB) go when the next model comes."""
    if model not in _PAIRS:
        _PAIRS.clear()
        C.clear_cache()
        _PAIRS[model] = build_pair(model, SEEDS[model])
    return _PAIRS[model]


def judged(scenario: str, run: C.Run) -> reprod.DiffResult:
    return C.explained(run) if scenario == "train" else run.compare()


@pytest.mark.parametrize("model, scenario", [_param(m, sc) for m in CORRECT for sc in CORRECT[m]])
def test_a_correct_port_fails_nothing_but_known_differences_and_kinks(model, scenario):
    run = C.run(scenario, pair_of(model), SEEDS[model])
    assert not run.notes, run.notes  # every key paired
    result = judged(scenario, run)
    assert C.verdict_failures(result) == [], result.to_table(failed_only=True)
    assert run.plain("max").failed  # what an absolute threshold makes of it
    known = [r.key for r in result.failed]
    if scenario == "train":
        assert known and all(k.endswith("running_var") for k in known)
    for r in result:
        if r.status == "kink":
            assert "kink crossing at " in r.reason, r.reason
    assert first_divergence(result) is None


@pytest.mark.parametrize("model, scenario, bug",
                         [_param(m, sc, b) for m in BUGGED for sc in BUGGED[m] for b in bugs_for(m)])
def test_a_bug_fails_and_is_found_in_its_layer(model, scenario, bug):
    result = judged(scenario, C.run(scenario, pair_of(model), SEEDS[model], bug))
    target = TARGETS[model][bug]
    if bug == "bn_momentum":
        if scenario != "train":  # running statistics are not updated in eval mode
            assert result.passed
            return
        failing = C.verdict_failures(result)
        assert f"step1/buffer/{target}.running_mean" in failing
        assert all(k.endswith(f"{target}.running_mean") for k in failing), failing
        return
    assert C.verdict_failures(result), f"{bug} not caught in {scenario}"
    if scenario == "forward":
        return
    div = first_divergence(result)
    assert div is not None and div.direction == "forward", result.summary_line()
    if bug == "bn_eps":
        assert (div.layer, div.input_aligned) == (target, True), div.message
    elif bug == "hardsigmoid_slope":  # the SE block's gate
        assert (div.layer, div.input_aligned) == (f"{target}.scale_activation", True), div.message
    elif bug == "no_residual":  # the add lies in the block's own forward, between leaf layers
        assert div.input_aligned is False and div.previous.startswith(f"{target}."), div.message


def _corrected(values: list[np.ndarray], initial: np.ndarray, n: int, momentum: float) -> list:
    """torch's running_var after each step as paddle computes it: with the biased batch variance
    (n - 1)/n times the unbiased one torch uses. From torch's
    ``rv_s = (1 - m) rv_{s-1} + m var_s``: ``rv'_s = (n-1)/n rv_s + (1 - m)(rv'_{s-1} - (n-1)/n rv_{s-1})``."""
    prev, prev_c, out = initial.astype(np.float64), initial.astype(np.float64), []
    for v in values:
        v = v.astype(np.float64)
        c = v * (n - 1) / n + (1 - momentum) * (prev_c - prev * (n - 1) / n)
        out.append(c)
        prev, prev_c = v, c
    return out


@pytest.mark.parametrize("model", [_param(m) for m in ("resnet50", "mobilenet_v3_large")])
def test_running_var_is_the_biased_variance(model):
    """The known difference is only the known difference: corrected by n/(n-1), each running_var
    aligns within noise (those downstream of a kink crossing in an earlier step left out)."""
    pair = pair_of(model)
    run = C.run("train", pair, SEEDS[model])
    result = C.explained(run)
    bns = {n: m for n, m in pair.torch32.named_modules() if type(m).__name__ == "BatchNorm2d"}
    ref, ref64, port = {}, {}, {}
    for name, bn in bns.items():
        keys = [f"step{s}/buffer/{name}.running_var" for s in (1, 2)]
        x = run.ref[f"{name}.in"]  # the BN's input in step 1: n values per channel
        n = x.size // x.shape[1]
        init = bn.running_var.detach().numpy()
        c32 = _corrected([run.ref[k] for k in keys], init, n, bn.momentum)
        c64 = _corrected([run.ref64[k] for k in keys], init, n, bn.momentum)
        for k, a, b in zip(keys, c32, c64):
            if result[k].status != "kink":
                ref[k], ref64[k], port[k] = a.astype(np.float32), b, run.port[k]
    assert len(ref) >= len(bns)
    assert not reprod.compare(run.ref, run.port, noise=run.ref64, keys=list(ref)).passed
    corrected = reprod.compare(ref, port, noise=ref64)
    assert corrected.passed, corrected.to_table(failed_only=True)
