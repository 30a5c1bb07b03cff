"""Real models through ``reprod.align`` paired by order (collected only where torchvision and
paddle import, see conftest.py): torchvision models against paddle.vision's own ports, whose
layer names do not map (``features.7.block.0.1`` against ``blocks.6.expand_conv.1``).

- ``pair_weights_by_order`` pairs the weights exactly as models.py does by hand, and the ports
  get their weights through ``load_into_paddle(by_order=True)``;
- ``align_forward(calibrate=True, by_order=True)`` passes a correct port with no findings;
- on each injected bug (models.BUGS) it fails, names the bug's layer and, where the numbers fit,
  says why (BN epsilon, Hardsigmoid slope); a dropped residual add, which lies in a container's
  own code (by order only leaf layers are recorded, then the blocks around the first leaf whose
  input differs), is named at its block; BN momentum does not act in eval mode: every value passes,
  and the layer's setting fails (``reprod.align.settings``);
- without ``by_order`` the names do not pair and the localisation fails closed ("unpaired");
- ``align_train(by_order=True, calibrate=True)`` records Paddle names, and a correct port passes:
  only the BN running variances (biased against unbiased) are over their noise, each passing as
  a known difference with the note that says so;
- ``record``'s default captures (containers included) compared through ``match_by_order``: a
  correct port passes against the float64 twin's noise, a dropped residual is named at its block.

resnet50's names happen to pair (paddle.vision keeps torchvision's): by name and by order give
the same localisation there. The whole file takes ~70 s single-threaded on a shared 2-core
machine (MEASUREMENTS.md).
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import calibrated as C  # noqa: E402
import paddle  # noqa: E402
import torch  # noqa: E402
from models import TARGETS, bugs_for, build_pair, make_inputs, make_labels  # noqa: E402

import reprod  # noqa: E402
from reprod.align import align_forward, align_train, pair_weights_by_order  # noqa: E402

# seed 0 of mobilenet_v3_small has no kink crossing in the two training steps (seed 2 has one in
# the first: test_align_train_kinks.py checks that align_train explains it)
SEEDS = {"resnet50": 0, "mobilenet_v3_large": 0, "mobilenet_v3_small": 0}
MODELS = tuple(SEEDS)
TRAIN_MODEL = "mobilenet_v3_small"
BATCH = 2
COPIED_BY_REPROD = "reprod.align.load_into_paddle(by_order=True)"
GROUP = {"resnet50": "realworld-resnet50", "mobilenet_v3_large": "realworld-mobilenet",
         "mobilenet_v3_small": "realworld-mobilenet"}


def _param(model: str, *rest: str):
    return pytest.param(model, *rest, marks=pytest.mark.xdist_group(GROUP[model]),
                        id="-".join((model, *rest)))


_PAIRS: dict[str, object] = {}
_LOCALISED: dict[tuple[str, str], tuple[object, str]] = {}


def pair_of(model: str):
    """One model pair at a time (conftest.py runs a model's tests one after the other)."""
    if model not in _PAIRS:
        _PAIRS.clear()
        _LOCALISED.clear()
        _PAIRS[model] = build_pair(model, SEEDS[model])
    return _PAIRS[model]


def inputs_of(model: str):
    return make_inputs(SEEDS[model], BATCH)


def localised(model: str, bug: str):
    """``align_forward(calibrate=True, by_order=True)`` on the port with ``bug``, run once:
    (result, what the bug changed)."""
    key = (model, bug)
    if key not in _LOCALISED:
        pair = pair_of(model)
        port = pair.paddle(bug)
        result = align_forward(pair.torch32, port, inputs_of(model), calibrate=True,
                               by_order=True)
        _LOCALISED[key] = (result, pair.last_bug)
    return _LOCALISED[key]


def _fmt_eps(x: float) -> str:  # as the hint writes a round epsilon: 1e-3, 1e-5
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


# --- 1. the weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_weights_pair_by_order_as_by_hand(model):
    pair = pair_of(model)
    port = pair.paddle()
    assert pair.copied_with == COPIED_BY_REPROD  # not models.py's fallback copy
    got = pair_weights_by_order(pair.torch32, port)
    assert list(got.items()) == [(p.torch_key, p.paddle_key) for p in pair.pairs]
    # by the order the layers run: the same pairs, where both define them as they run them
    # (reprod.align.call_order)
    by_calls = pair_weights_by_order(pair.torch32, port, inputs=inputs_of(model))
    assert by_calls == got


# --- 2. a correct port ------------------------------------------------------------------------


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_a_correct_port_passes_with_no_findings(model):
    pair = pair_of(model)
    result = align_forward(pair.torch32, pair.paddle(), inputs_of(model), calibrate=True,
                           by_order=True)
    assert pair.copied_with == COPIED_BY_REPROD
    assert result.passed, result.to_table(failed_only=True)
    assert "findings" not in result.options and "divergence" not in result.options, result.options
    assert result.options["noise_multiple"]["forward"]["multiple"] < 20


# --- 3. each bug, localised -------------------------------------------------------------------


_BN_EPS = re.compile(r"BN epsilon: port uses ~(\S+), reference (\S+)$")


@pytest.mark.parametrize("model, bug", [_param(m, b) for m in MODELS for b in bugs_for(m)])
def test_a_bug_is_found_in_its_layer_and_explained(model, bug):
    pair = pair_of(model)
    result, changed = localised(model, bug)
    target = TARGETS[model][bug]
    if bug == "bn_momentum":
        # running statistics are not updated in eval mode: every value aligns, and the layer's
        # setting says what training would show
        key = f"settings/{pair.paddle_name(target)}/momentum"
        assert [k.key for k in result.failed] == [key], result.to_table(failed_only=True)
        assert "divergence" not in result.options
        line = result[key].reason.split(": the ")[0]
        assert result.options["findings"][-1].endswith(
            f"{line}; it acts in training only (a BatchNorm's momentum, a dropout): a port for "
            'inference waives it with check_settings=["*/momentum"]'), result.options["findings"]
        return
    assert not result.passed, f"{bug} not caught"
    div, findings = result.options["divergence"], result.options["findings"]
    assert div["kind"] == "layer", div
    assert findings[0] == div["message"]
    message, hint = div["message"], div["hint"]
    if bug == "bn_eps":
        assert div["layer"] == target, message
        assert message.startswith(f"diverges at {target} ") and "input aligned" in message
        m = _BN_EPS.search(hint or "")
        assert m is not None, hint
        port_eps = float(re.search(r"-> (\S+)$", changed).group(1))  # "BN epsilon 1e-05 -> 0.001"
        torch_eps = dict(pair.torch32.named_modules())[target].eps
        # the port's epsilon is estimated from the outputs: within float32 noise of the truth
        assert abs(math.log10(float(m.group(1)) / port_eps)) < math.log10(2), hint
        assert m.group(2) == _fmt_eps(torch_eps), hint
        assert findings[1] == f"likely cause at {target}: {m.group(0)}", findings
    elif bug == "hardsigmoid_slope":  # the SE block's gate, a leaf
        layer = f"{target}.scale_activation"
        assert div["layer"] == layer, message
        assert message.startswith(f"diverges at {layer} ") and "input aligned" in message
        why = "activation: reference Hardsigmoid (slope 1/6), port Hardsigmoid (slope 0.2)"
        assert hint is not None and hint.endswith(why), hint
        assert findings[1] == f"likely cause at {layer}: {why}", findings
    elif bug == "no_residual":
        # the add lies in the block's own forward, which by order records no key: the blocks
        # around the first leaf whose input differs are recorded and paired by the leaves they
        # hold, and the block is named as by name; where a sublayer reads the sum the add
        # made, what it reads on each side is the hint
        assert div["layer"] == target, message
        cls = _torch_class(pair, target)  # and the port's where it differs (BottleneckBlock)
        # with the port's name where it differs (paddle.vision's blocks.4 for features.5)
        assert re.match(rf"diverges at {re.escape(target)} \({cls}( vs \w+)?"
                        r"(; the port's [\w.]+)?\): input aligned \(max ", message), message
        port = div.get("port_layer")
        assert port is None or message.startswith(
            f"diverges at {target} ({cls}") and f"; the port's {port}): " in message, message
        if model == "resnet50":  # the add comes before the block's last leaf, its shared ReLU
            assert f"; inside it, the input of {target}.relu#3 already differs" in message
            assert message.endswith(f"so the cause is {target}'s own forward code"), message
            # what that ReLU reads on each side, from each side's own values: the residual
            assert hint == (
                f"{cls}: relu#3 reads bn3's output in the port, the block's input + bn3's "
                "output in the reference: the block adds or normalises in another order (a "
                "residual, pre-norm against post-norm)"), hint
            assert len(findings) == 2 and findings[1].startswith(
                f"likely cause at {target}: relu#3 reads bn3's output in the port"), findings
        else:  # MobileNetV3's InvertedResidual adds after its last leaf: no sublayer reads it
            assert message.endswith("; its recorded sublayers align, so the cause is its own "
                                    "forward code"), message
            assert hint is None and len(findings) == 1, findings


def _torch_class(pair, layer: str) -> str:
    return type(dict(pair.torch32.named_modules())[layer.split("#")[0]]).__name__


@pytest.mark.parametrize("model", [
    _param(m) for m in MODELS])
def test_the_findings_name_the_port_layer_classes_right(model):
    """A layer whose two classes are the same layer is labelled with one name (BatchNorm2d and
    BatchNorm2D are one): a port class shown beside it is a structural difference."""
    pair = pair_of(model)
    for bug in bugs_for(model):
        if bug == "bn_momentum":
            continue
        div = localised(model, bug)[0].options["divergence"]
        cls = _torch_class(pair, div["layer"])
        shown = re.search(rf"{re.escape(div['layer'])} \(([^()]*)\):", div["message"])
        assert shown is not None, (bug, div["message"])
        # one name, or the port's beside it where it is another class (a ResNet block is
        # Bottleneck in torchvision and BottleneckBlock in paddle.vision)
        label, _, named = shown.group(1).partition("; the port's ")
        # paired by order with a layer of another name, the message names it too
        assert named == (div.get("port_layer") or ""), (bug, div["message"])
        assert label == cls or (label.startswith(f"{cls} vs ")
                                and label[len(cls) + 4:].lower() != cls.lower()), (bug, label)
        if div["hint"] is not None:
            assert div["hint"].startswith(f"{cls}: "), (bug, div["hint"])


# --- 4. names that do not pair ----------------------------------------------------------------


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_by_name_the_localisation_fails_closed_where_names_do_not_pair(model):
    """paddle.vision's MobileNetV3 names its layers its own way: by name nothing is shown to
    align, and the localisation says so instead of naming a layer; the settings, paired by
    definition order where no name pairs, name the injected epsilon where it is (before, they
    compared nothing and said nothing). Its ResNet keeps torchvision's names: by name finds what
    by order finds."""
    pair = pair_of(model)
    result = align_forward(pair.torch32, pair.paddle("bn_eps"), inputs_of(model), calibrate=True)
    assert not result.passed
    div = result.options["divergence"]
    if model == "resnet50":
        by_order = localised(model, "bn_eps")[0].options
        assert div == by_order["divergence"] and result.options["findings"] == by_order["findings"]
        return
    assert (div["kind"], div["layer"], div["hint"]) == ("unpaired", "", None), div
    assert "layer names do not pair" in div["message"], div["message"]
    assert "pair them by call order" in div["message"], div["message"]
    unpaired, said = result.options["findings"]
    assert unpaired == f"{div['message']} (align_forward: by_order=True)"
    assert said.startswith("1 layer setting of the port differs from the reference's"), said
    assert f"(torch {TARGETS[model]['bn_eps']}): epsilon 0.001 in torch, 1e-05 in Paddle" \
        in said, said


# --- 5. training ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [_param(TRAIN_MODEL)])
def test_train_by_order_passes_with_the_running_variance_known(model):
    pair = pair_of(model)
    seed = SEEDS[model]
    tm = copy.deepcopy(pair.torch32)  # the cached pair stays as it is
    pm = pair.paddle()
    for m in (tm, pm):
        C._no_dropout(m)
        m.train()
    batch = (make_inputs(seed, BATCH), make_labels(seed, BATCH))
    result = align_train(
        tm, pm, [batch], steps=2, by_order=True, calibrate=True,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9),
        paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters()),
    )
    # every key under the Paddle model's own names
    names = set(pm.state_dict())
    trainable = {n for n, p in pm.named_parameters() if not p.stop_gradient}
    keys = [r.key for r in result]
    by_kind: dict[str, set] = {}
    for k in keys:
        step, kind, *rest = k.split("/", 2)
        assert step in ("step0", "step1"), k
        by_kind.setdefault(kind, set()).add(rest[0] if rest else None)
    assert by_kind["param"] | by_kind["stat"] == names
    assert by_kind["grad"] == trainable
    assert by_kind["stat"] == names - trainable
    # a correct port passes: only the known difference is over its threshold, and says what it is
    assert result.passed, result.to_table(failed_only=True)
    known = [r for r in result if r.status == "known"]
    assert known, "the biased running variance should show"
    for r in known:
        assert re.fullmatch(r"step[01]/stat/.*\._variance", r.key), r.key
        assert "biased batch variance" in (r.note or ""), (r.key, r.note)
    assert all(r.passed for r in result if r.key.endswith("._mean"))


# --- 6. captures with containers, compared by order ----------------------------------------------


def _captured(model_obj, fw: str, x, float64: bool = False) -> dict:
    """``record(model)`` with its defaults (containers and the model included), one forward."""
    import numpy as np

    from reprod.capture import record

    if fw == "torch":
        t = torch.from_numpy(x.astype(np.float64) if float64 else x)
        with torch.no_grad(), record(model_obj) as log:
            model_obj(t)
    else:
        with paddle.no_grad(), record(model_obj) as log:
            model_obj(paddle.to_tensor(x))
    return dict(log.data)


@pytest.mark.parametrize("model", [_param(m) for m in MODELS])
def test_default_captures_compared_by_order_pass_a_correct_port_and_name_a_block_bug(model):
    """``record``'s default captures hold containers; paired by shapes alone a block paired with
    the Sequential inside it, and a correct MobileNetV3 port failed 38 (small) or 71 (large) keys
    with a wrong "diverges at" (measured before ``match_by_order``). Containers now pair by the
    leaves they hold; the float64 twin's capture is the noise reference."""
    from reprod.capture import first_divergence, match_by_order

    pair = pair_of(model)
    x = inputs_of(model)
    ref, hi = _captured(pair.torch32, "torch", x), _captured(pair.torch64, "torch", x, True)
    a, b = match_by_order(ref, _captured(pair.paddle(), "paddle", x))
    assert "<model>.out" in a and "<model>.out" in b
    r = reprod.compare(a, b, noise=hi)
    assert r.passed, r.to_table(failed_only=True)
    r = reprod.compare(*match_by_order(ref, _captured(pair.paddle("no_residual"), "paddle", x)),
                       noise=hi)
    div = first_divergence(r)
    target = TARGETS[model]["no_residual"]
    assert not r.passed and div is not None and div.layer == target, div and div.message
    assert div.input_aligned, div.message
