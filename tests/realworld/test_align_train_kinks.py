"""``align_train(calibrate=True, by_order=True)`` on a real model with a kink crossing: torchvision's
mobilenet_v3_small against paddle.vision's port, seed 2 (or the first of ``SEEDS`` that crosses on
this CPU), 2 SGD steps (training mode, dropout p=0,
batch 2, as test_align_by_order.py's training test, which uses seed 0: no crossing there).

In step 1 one element of the input of ``features.3.block.1.2`` (a ReLU; ``blocks.2.
bottleneck_conv.2`` in the port) lies within noise of 0 and lands on opposite sides in torch and in
the port (MEASUREMENTS.md, "Kinks"). Without the kink explanation every gradient upstream of it
fails, and the weights updated with them, and step 2 after them; with it (the default under
``calibrate``), those keys are labelled ``kink`` and the run passes: the BN running variances
pass as the known difference they fit, each with its note. About 10 s single-threaded.
"""

from __future__ import annotations

import copy
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibrated as C  # noqa: E402
import paddle  # noqa: E402
import torch  # noqa: E402
from models import build_pair, make_inputs, make_labels  # noqa: E402

from reprod.align import align_train  # noqa: E402

MODEL, BATCH = "mobilenet_v3_small", 2
# which seed crosses is the CPU's rounding: seed 2 (at CROSSING, step 1) on an AVX-512 CPU, seed 1
# (a Hardswish input, step 2) on an AVX2 one, where seed 2 crossed nothing; the first of these
# whose run fails without the explanation is taken
SEEDS = (2, 1, 0, 3)
CROSSING = "features.3.block.1.2"  # seed 2's ReLU whose input crosses 0 (MEASUREMENTS.md)
# the torch modules called before it: the gradients its crossing reaches in step 1
UPSTREAM = ("features.0.", "features.1.", "features.2.", "features.3.block.0.",
            "features.3.block.1.0.", "features.3.block.1.1.")
VARIANCE = re.compile(r"step[01]/stat/.*\._variance")
pytestmark = pytest.mark.xdist_group("realworld-mobilenet")

_RUNS: dict = {}


def pair(seed: int):
    if ("pair", seed) not in _RUNS:
        _RUNS[("pair", seed)] = build_pair(MODEL, seed)
    return _RUNS[("pair", seed)]


def _align(seed: int, kinks: bool = True, paddle_loss_fn=None):
    """align_train on fresh train-mode copies."""
    p = pair(seed)
    tm, pm = copy.deepcopy(p.torch32), p.paddle()
    for m in (tm, pm):
        C._no_dropout(m)
        m.train()
    batch = (make_inputs(seed, BATCH), make_labels(seed, BATCH))
    return align_train(
        tm, pm, [batch], steps=2, by_order=True, calibrate=True, kinks=kinks,
        torch_loss_fn=torch.nn.CrossEntropyLoss(),
        paddle_loss_fn=paddle_loss_fn or paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9),
        paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters()),
    )


def _plain_failures(r) -> list:
    return [k for k in r.failed if not VARIANCE.fullmatch(k.key)]


def crossing_seed() -> int:
    """The first of SEEDS whose run fails without the kink explanation (a crossing there)."""
    if "seed" not in _RUNS:
        for seed in SEEDS:
            plain = _align(seed, kinks=False)
            if _plain_failures(plain):
                _RUNS["seed"], _RUNS[(False, seed)] = seed, plain
                break
            _RUNS.clear()
        else:
            pytest.fail(f"no seed of {SEEDS} crosses a kink on this CPU")
    return _RUNS["seed"]


def trained(kinks: bool):
    """``_align`` of the crossing seed, run once per setting."""
    seed = crossing_seed()
    if (kinks, seed) not in _RUNS:
        _RUNS[(kinks, seed)] = _align(seed, kinks)
    return _RUNS[(kinks, seed)]


def test_without_the_explanation_gradients_upstream_of_the_crossing_fail():
    r = trained(kinks=False)
    step = trained(kinks=True).options["kink_crossings"][0]["pass"]
    others = _plain_failures(r)
    assert any(k.key.startswith(f"step{step}/grad/") for k in others), \
        r.to_table(failed_only=True)
    assert "kinks" not in r.options


def test_with_it_the_run_passes_with_the_running_variance_known():
    r, plain = trained(kinks=True), trained(kinks=False)
    assert r.passed, r.to_table(failed_only=True)
    for k in r:
        if k.status == "known":
            assert VARIANCE.fullmatch(k.key), k.key
            assert "biased batch variance" in (k.note or ""), (k.key, k.note)
    # exactly what failed otherwise, minus the known difference, is labelled; nothing else moved
    kink = {k.key for k in r if k.status == "kink"}
    assert kink == {k.key for k in plain.failed if not VARIANCE.fullmatch(k.key)}
    assert r.options["kinks"]["explained"] == len(kink)
    assert [k.key for k in r] == [k.key for k in plain]
    for k in r:
        if k.key not in kink:
            assert (k.status, k.passed) == (plain[k.key].status, plain[k.key].passed), k.key


def test_the_labels_name_the_crossing_and_reach_only_its_upstream():
    r, seed = trained(kinks=True), crossing_seed()
    first = r.options["kink_crossings"][0]
    step, layer = first["pass"], first["layer"]
    assert first["elements"] >= 1 and first["paddle_layer"], first
    message = first["message"]
    assert message.startswith(f"kink crossing at {layer} ({first['layer_type']}): "), message
    measured = (seed, layer) == (2, CROSSING)  # the crossing of MEASUREMENTS.md
    if measured:
        assert (first["pass"], first["elements"]) == (0, 1), first
        assert first["paddle_layer"] == pair(seed).paddle_name("features.3.block.1") + ".2"
    for k in r:
        if k.status != "kink":
            continue
        assert message in k.reason, (k.key, k.reason)
        s, kind, name = k.key.split("/", 2)
        if int(s[4:]) == step:  # gradients of layers called before the crossing, and updates
            # gradients, and the weights and momentum buffers updated with them
            assert kind in ("grad", "param", "opt"), k.key
            if measured:
                if kind == "opt":
                    name = name.rpartition(".")[0]
                assert pair(seed).torch_key(name).startswith(UPSTREAM), k.key
        else:  # a later step starts from the weights that carry the difference
            assert int(s[4:]) > step, k.key
            assert k.reason.startswith(f"after the {message}, in an earlier step"), k.reason


def test_no_key_of_a_step_whose_loss_differs_is_put_down_to_a_crossing():
    """A summed loss on the port's side doubles the loss and every gradient of every step; the
    crossing of step 1 made its gradients upstream read "kink" although the loss itself, which
    no crossing changes, differs. Found by a survey of real model pairs (184-389 gradients so
    labelled on resnet18, mobilenet_v2, shufflenet, squeezenet)."""
    r = _align(crossing_seed(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(reduction="sum"))
    assert not r["step0/loss"].passed and not r["step1/loss"].passed
    assert [k.key for k in r if k.status == "kink"] == []
    assert r.options["findings"][0].startswith("the loss differs although the outputs align")
