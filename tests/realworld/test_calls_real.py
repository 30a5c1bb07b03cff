"""Settings of what real models apply as functions (``reprod.align.calls``): torchvision's models
against paddle.vision's ports, traced through one forward pass each.

- paddle.vision's inception_v3 keeps BatchNorm2D's epsilon of 1e-5 in all 94 of its
  BatchNorms, where torchvision's BasicConv2d sets 1e-3, and its dropout is p 0.2 in
  ``downscale_in_infer`` mode (outputs scaled by 0.8 in evaluation) where torchvision's is p 0.5
  scaled in training: the layer settings name each. Set as torchvision's, the port is otherwise
  correct, and the tests below start from it.
- torchvision's inception_v3 applies its branch pools as ``F.avg_pool2d`` / ``F.max_pool2d``
  calls (11), paddle.vision's holds them as layers; mobilenet_v2 pools by ``F.adaptive_avg_pool2d``
  and its ReLU6 layers call ``F.hardtanh`` in torch, ``F.relu6`` in Paddle. Each call pairs with
  the other side's call or layer of its kind, and in these correct ports none differs.
- The classic inception port: its pools written as Paddle's ``F.avg_pool2d(x, 3, 1, 1)``, whose
  ``exclusive=True`` does not count the padding where torch's does. Injected in one block
  (``exclusive=True`` on its pool layer): named at that block.
- paddle.vision's squeezenet1_1 calls one max-pool layer three times, which the layer settings
  cannot pair with torchvision's three: by call they pair, and its ceil_mode differs.
- The fluid-era hardsigmoid slope of 0.2 in one squeeze-excitation of mobilenet_v3_small (called
  as a function in the port, ``models._bug_hardsigmoid_slope``): named there, with its value.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from models import build_paddle, build_pair, build_torch, make_inputs  # noqa: E402

from reprod.align import align_forward, compare_settings, trace_settings  # noqa: E402


def _traced(tm, pm, size=224):
    x = make_inputs(0, 1, size)
    with torch.no_grad(), trace_settings(tm) as tt:
        tm(torch.from_numpy(x))
    with paddle.no_grad(), trace_settings(pm) as pt:
        pm(paddle.to_tensor(x))
    assert tt.unread == [] and pt.unread == []
    return tt, pt


def _inception_as_torchvision(pm):
    """paddle.vision's inception_v3 with torchvision's BatchNorm epsilon (1e-3 in its
    BasicConv2d; paddle.vision keeps BatchNorm2D's 1e-5) and dropout (p 0.5 scaled in training;
    paddle.vision's is p 0.2 scaled by 0.8 in inference)."""
    for layer in pm.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._epsilon = 1e-3
        if isinstance(layer, paddle.nn.Dropout):
            layer.p, layer.mode = 0.5, "upscale_in_train"
    return pm


def test_paddle_vision_s_inception_keeps_another_epsilon_and_dropout():
    tm, pm = build_torch("inception_v3"), build_paddle("inception_v3")
    diffs = compare_settings(tm, pm, by_order=True).differ
    eps = [d for d in diffs if d.setting == "epsilon"]
    assert len(eps) == 94
    assert all(d.torch_value == pytest.approx(1e-3) and d.paddle_value == pytest.approx(1e-5)
               for d in eps)
    assert [d.line() for d in diffs if d not in eps] == [
        "dropout: p 0.5 in torch, 0.2 in Paddle",
        "dropout: mode 'upscale_in_train' in torch, 'downscale_in_infer' in Paddle"]
    assert compare_settings(tm, _inception_as_torchvision(pm), by_order=True).passed


# inception_v3: its 11 pool calls (the stem's two max-pools, two torch layers against one Paddle
# layer called twice, pair by call as layers and count as layers)
@pytest.mark.parametrize("name,calls", [("inception_v3", 11), ("mobilenet_v2", 36),
                                        ("mobilenet_v3_small", 9), ("densenet121", 1)])
def test_correct_ports_differ_in_no_call(name, calls):
    tm, pm = build_torch(name).eval(), build_paddle(name)
    if name == "inception_v3":
        _inception_as_torchvision(pm)
    pm.eval()
    tt, pt = _traced(tm, pm, 299 if name == "inception_v3" else 224)
    report = compare_settings(tm, pm, by_order=True, traces=(tt, pt))
    assert report.differ == (), str(report)
    assert report.calls == calls
    # the kinds the layers alone could not pair are paired through the calls
    assert not any(u.startswith(("avgpool", "maxpool", "adaptiveavgpool"))
                   for u in report.unpaired), report.unpaired


def test_inception_s_pool_that_does_not_count_the_padding_is_named_at_its_block():
    pair = build_pair("inception_v3", 0)
    pm = _inception_as_torchvision(pair.paddle())
    pm.inception_block_list[4].branch_pool.exclusive = True  # torchvision's Mixed_6b
    x = make_inputs(0, 1, 299)
    r = align_forward(pair.torch32, pm, {"x": x}, by_order=True, localise=False)
    key = "settings/inception_block_list.4.branch_pool/count_include_pad"
    assert [k.key for k in r.failed if k.status == "setting"] == [key]
    assert r.options["findings"][-1].endswith(
        "inception_block_list.4.branch_pool (torch Mixed_6b:avg_pool2d): count_include_pad True "
        "in torch, False in Paddle")
    # and it is a real difference: the outputs move
    assert not r["logits"].passed


def test_mobilenet_v3_s_fluid_hardsigmoid_slope_is_named_with_its_value():
    pair = build_pair("mobilenet_v3_small", 0)
    pm = pair.paddle("hardsigmoid_slope")
    target = "features.6.block.2"
    tt, pt = _traced(pair.torch32, pm)
    report = compare_settings(pair.torch32, pm, by_order=True, traces=(tt, pt))
    (d,) = report.differ
    assert (d.setting, d.paddle_value) == ("slope", pytest.approx(0.2))
    assert d.torch_value == pytest.approx(1 / 6)
    assert d.torch_layer == f"{target}.scale_activation:hardsigmoid"
    assert d.paddle_layer.startswith(pair.paddle_name(target) + ".")
    assert np.isfinite(d.torch_value)


def test_squeezenet_s_one_pool_layer_called_three_times_pairs_by_call():
    """paddle.vision's squeezenet1_1 calls one MaxPool2D three times where torchvision has three
    MaxPool2d: by layer they cannot pair (the report says so); by call they do, and its
    ``ceil_mode`` (False) differs from torchvision's (True) at each. At 224 px no size changes,
    so no value shows it."""
    from models import squeezenet_as_torchvision

    tm, pm = build_torch("squeezenet1_1").eval(), build_paddle("squeezenet1_1")
    pm.eval()
    assert compare_settings(tm, pm, by_order=True).unpaired == ("maxpool: 3 in torch, 1 in Paddle",)
    tt, pt = _traced(tm, pm)
    report = compare_settings(tm, pm, by_order=True, traces=(tt, pt))
    assert report.unpaired == ()
    assert [d.line() for d in report.differ if d.kind == "maxpool"] == [
        f"_pool{call} (torch features.{i}): ceil_mode True in torch, False in Paddle"
        for call, i in (("", 2), ("#2", 5), ("#3", 8))]
    squeezenet_as_torchvision(pm)
    tt, pt = _traced(tm, pm)
    assert compare_settings(tm, pm, by_order=True, traces=(tt, pt)).passed


# torchvision's transformers, which paddle.vision has no port of: the trace reads what they apply
# as functions and tensor methods (swin's F.pad, F.softmax and F.dropout in each window attention,
# maxvit's attention softmax) and changes no value; convnext's LayerNorm2d derives from
# nn.LayerNorm, and is read as one, its own F.layer_norm call no event
@pytest.mark.parametrize("name,kinds", [
    ("swin_t", {"pad": 15, "softmax": 12, "dropout": 24}),
    ("convnext_tiny", {}),
    ("maxvit_t", {"softmax": 22}),
])
def test_the_trace_reads_torchvision_s_transformers_and_changes_no_value(name, kinds):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.from_numpy(make_inputs(0, 1))
    with torch.no_grad():
        plain = model(x)
        with trace_settings(model) as trace:
            traced = model(x)
    assert torch.equal(plain, traced)
    assert trace.unread == []
    calls = [e for e in trace.events if not e.layer]
    assert {k: sum(e.kind == k for e in calls) for k in kinds} == kinds
    assert {e.kind for e in calls} == set(kinds)
    if name == "convnext_tiny":
        norms = [e for e in trace.events if e.layer and e.op == "LayerNorm2d"]
        assert len(norms) == 5 and {e.settings["epsilon"] for e in norms} == {1e-6}
    if name == "swin_t":  # every window attention normalises over its keys, the last axis
        assert {e.settings["axis"] for e in calls if e.kind == "softmax"} == {3}
