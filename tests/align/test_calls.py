"""Settings of the operations a model applies as functions (``reprod.align.calls``): traced
through one forward pass of each framework, each kind paired by order with the other side's
calls and layers.

Each function is checked both ways, as the layer settings are: the same call spelled the two
frameworks' ways (their defaults included) is no difference, and a changed one, or a default that
differs between them, is exactly one difference with both values. The values of each pair are
also computed, so that a "same" pair that computed other numbers would show here as a broken
normalisation, not as a pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, align_train, compare_settings, save_settings  # noqa: E402
from reprod.align.calls import OpEvent, compare_events, trace_settings  # noqa: E402
from reprod.errors import ReprodError  # noqa: E402

TF, PF = torch.nn.functional, paddle.nn.functional
# imported by name, as some model code does: traced through the model module's own globals
from paddle.nn.functional import gelu as _pgelu  # noqa: E402
from torch.nn.functional import gelu as _tgelu  # noqa: E402

tnn, pnn = torch.nn, paddle.nn

RNG = np.random.default_rng(0)
X4 = RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)
X2 = RNG.standard_normal((4, 6)).astype(np.float32)
LABELS = RNG.integers(0, 6, 4)
GRID = RNG.uniform(-1, 1, (2, 5, 5, 2)).astype(np.float32)


class _Fn(tnn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class _PFn(pnn.Layer):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _run(tfn, pfn, xs):
    """Both calls traced in a module each: (torch events, Paddle events, torch out, Paddle out)."""
    tm, pm = _Fn(tfn), _PFn(pfn)
    with torch.no_grad(), trace_settings(tm) as tt:
        t_out = tm(*[torch.tensor(x) for x in xs])
    with paddle.no_grad(), trace_settings(pm) as pt:
        p_out = pm(*[paddle.to_tensor(x) for x in xs])
    assert tt.unread == [] and pt.unread == []
    return tt.events, pt.events, t_out, p_out


def _diffs(tfn, pfn, xs=(X4,)):
    te, pe, t_out, p_out = _run(tfn, pfn, xs)
    assert len(te) == len(pe) == 1, (te, pe)
    diffs, unpaired, compared, *_ = compare_events(te, pe)
    assert unpaired == [] and compared == 1
    return [(d.setting, d.torch_value, d.paddle_value) for d in diffs], t_out, p_out


SAME = [
    ("avg_pool2d without counting the padding", lambda x: TF.avg_pool2d(
        x, 3, 1, 1, count_include_pad=False), lambda x: PF.avg_pool2d(x, 3, 1, 1)),
    ("avg_pool2d counting it", lambda x: TF.avg_pool2d(x, 3, 1, 1),
     lambda x: PF.avg_pool2d(x, 3, 1, 1, exclusive=False)),
    ("max_pool2d stride None", lambda x: TF.max_pool2d(x, 2), lambda x: PF.max_pool2d(x, 2, 2)),
    ("max_pool2d ceil", lambda x: TF.max_pool2d(x, 3, 2, ceil_mode=True),
     lambda x: PF.max_pool2d(x, 3, 2, ceil_mode=True)),
    ("adaptive_avg_pool2d", lambda x: TF.adaptive_avg_pool2d(x, (2, 2)),
     lambda x: PF.adaptive_avg_pool2d(x, 2)),
    ("interpolate bilinear", lambda x: TF.interpolate(x, scale_factor=2, mode="bilinear"),
     lambda x: PF.interpolate(x, scale_factor=2, mode="bilinear")),
    ("interpolate aligned corners", lambda x: TF.interpolate(
        x, size=(5, 5), mode="bilinear", align_corners=True),
     lambda x: PF.interpolate(x, size=[5, 5], mode="BILINEAR", align_corners=True,
                              align_mode=1)),
    ("gelu", lambda x: TF.gelu(x), lambda x: PF.gelu(x)),
    ("gelu tanh", lambda x: TF.gelu(x, approximate="tanh"),
     lambda x: PF.gelu(x, approximate=True)),
    ("layer_norm", lambda x: TF.layer_norm(x, (8,), eps=1e-6),
     lambda x: PF.layer_norm(x, 8, epsilon=1e-6)),
    ("group_norm", lambda x: TF.group_norm(x, 2), lambda x: PF.group_norm(x, 2)),
    ("normalize", lambda x: TF.normalize(x, dim=-1), lambda x: PF.normalize(x, axis=3)),
    ("softmax last", lambda x: TF.softmax(x, dim=-1), lambda x: PF.softmax(x)),
    ("log_softmax", lambda x: TF.log_softmax(x, 1), lambda x: PF.log_softmax(x, axis=-3)),
    ("dropout in evaluation", lambda x: TF.dropout(x, 0.3, training=False),
     lambda x: PF.dropout(x, 0.3, training=False)),
    ("dropout of nothing", lambda x: TF.dropout(x, 0.0),
     lambda x: PF.dropout(x, 0.0, mode="downscale_in_infer")),
    ("leaky_relu", lambda x: TF.leaky_relu(x, 0.2), lambda x: PF.leaky_relu(x, 0.2)),
    ("hardsigmoid", lambda x: TF.hardsigmoid(x), lambda x: PF.hardsigmoid(x)),
    ("relu6 and hardtanh", lambda x: TF.relu6(x), lambda x: PF.hardtanh(x, 0.0, 6.0)),
    ("elu", lambda x: TF.elu(x, 0.5), lambda x: PF.elu(x, 0.5)),
    ("softplus", lambda x: TF.softplus(x, 2.0, 10.0), lambda x: PF.softplus(x, 2.0, 10.0)),
    ("pad reflect", lambda x: TF.pad(x, [1, 1, 2, 2], mode="reflect"),
     lambda x: PF.pad(x, [1, 1, 2, 2], mode="reflect")),
    # Paddle's list of 2 x ndim runs from the first axis, torch's from the last
    ("pad every axis", lambda x: TF.pad(x, [1, 2, 3, 0]),
     lambda x: PF.pad(x, [0, 0, 0, 0, 3, 0, 1, 2])),
    ("conv2d", lambda x: TF.conv2d(x, torch.ones(4, 2, 3, 3), stride=2, padding=1, groups=2),
     lambda x: PF.conv2d(x, paddle.ones([4, 2, 3, 3]), stride=[2, 2], padding=[1, 1],
                         groups=2)),
    ("conv2d padding pairs", lambda x: TF.conv2d(x, torch.ones(4, 4, 3, 3), padding=(1, 2)),
     lambda x: PF.conv2d(x, paddle.ones([4, 4, 3, 3]), padding=[[0, 0], [0, 0], [1, 1], [2, 2]])),
    ("pixel_shuffle", lambda x: TF.pixel_shuffle(x, 2), lambda x: PF.pixel_shuffle(x, 2)),
    # top-level functions and tensor methods
    ("softmax as a tensor method", lambda x: x.softmax(-1), lambda x: PF.softmax(x)),
    ("torch.softmax and paddle.softmax's implicit dim", lambda x: torch.softmax(x, 1),
     lambda x: paddle.softmax(x)),
    ("log_softmax as a tensor method", lambda x: x.log_softmax(dim=1),
     lambda x: PF.log_softmax(x, axis=1)),
    ("top-level layer_norm", lambda x: torch.layer_norm(x, (8,), None, None, 1e-6),
     lambda x: paddle.layer_norm(x, 8, epsilon=1e-6)),
    ("var as methods, population", lambda x: x.var(-1, unbiased=False),
     lambda x: x.var(-1, unbiased=False)),
    ("var over two axes, correction", lambda x: torch.var(x, dim=(2, 3), correction=0),
     lambda x: paddle.var(x, axis=[-2, -1], unbiased=False)),
    ("var_mean against var", lambda x: torch.var_mean(x, 1)[0], lambda x: paddle.var(x, 1)),
    ("var with Paddle's torch spellings", lambda x: torch.var(x, 1, True),
     lambda x: paddle.var(input=x, dim=1)),
    ("std over everything", lambda x: torch.std(x), lambda x: paddle.std(x, axis=[0, 1, 2, 3])),
]


@pytest.mark.parametrize("name,tfn,pfn", SAME, ids=[s[0] for s in SAME])
def test_the_same_call_spelled_each_framework_s_way_is_no_difference(name, tfn, pfn):
    diffs, t_out, p_out = _diffs(tfn, pfn)
    assert diffs == []
    # the normalisation is right: the two calls compute the same numbers
    np.testing.assert_allclose(p_out.numpy(), t_out.numpy(), rtol=1e-5, atol=1e-5)


DIFFERENT = [
    # torch counts the padding by default, Paddle's exclusive=True does not
    ("avg_pool2d defaults", lambda x: TF.avg_pool2d(x, 3, 1, 1),
     lambda x: PF.avg_pool2d(x, 3, 1, 1), ("count_include_pad", True, False)),
    ("max_pool2d ceil_mode", lambda x: TF.max_pool2d(x, 3, 2),
     lambda x: PF.max_pool2d(x, 3, 2, ceil_mode=True), ("ceil_mode", False, True)),
    ("interpolate align_mode", lambda x: TF.interpolate(x, scale_factor=2, mode="bilinear"),
     lambda x: PF.interpolate(x, scale_factor=2, mode="bilinear", align_mode=1),
     ("align_mode", 0, 1)),
    ("interpolate mode", lambda x: TF.interpolate(x, scale_factor=2),
     lambda x: PF.interpolate(x, scale_factor=2, mode="bilinear"),
     ("mode", "nearest", "bilinear")),
    ("gelu approximate", lambda x: TF.gelu(x), lambda x: PF.gelu(x, approximate=True),
     ("approximate", "none", "tanh")),
    ("layer_norm epsilon", lambda x: TF.layer_norm(x, (8,)),
     lambda x: PF.layer_norm(x, 8, epsilon=1e-6), ("epsilon", 1e-5, 1e-6)),
    ("softmax axis", lambda x: TF.softmax(x, dim=1), lambda x: PF.softmax(x), ("axis", 1, 3)),
    # fluid's hard_sigmoid had a slope of 0.2: a MobileNetV3 port carrying it over
    ("hardsigmoid slope", lambda x: TF.hardsigmoid(x), lambda x: PF.hardsigmoid(x, slope=0.2),
     ("slope", 1 / 6, 0.2)),
    ("leaky_relu slope", lambda x: TF.leaky_relu(x), lambda x: PF.leaky_relu(x, 0.1),
     ("negative_slope", 0.01, 0.1)),
    ("dropout mode", lambda x: TF.dropout(x, 0.3, training=False),
     lambda x: PF.dropout(x, 0.3, training=False, mode="downscale_in_infer"),
     ("mode", "upscale_in_train", "downscale_in_infer")),
    ("pad mode", lambda x: TF.pad(x, [1, 1, 1, 1], mode="reflect"),
     lambda x: PF.pad(x, [1, 1, 1, 1], mode="replicate"), ("mode", "reflect", "replicate")),
    ("conv2d dilation", lambda x: TF.conv2d(x, torch.ones(4, 4, 3, 3), padding=2, dilation=2),
     lambda x: PF.conv2d(x, paddle.ones([4, 4, 3, 3]), padding=2),
     ("dilation", (2, 2), (1, 1))),
    # a hand-written layer norm: torch's population variance, Paddle's var unbiased by default
    ("var's correction", lambda x: x.var(-1, keepdim=True, unbiased=False),
     lambda x: x.var(-1, keepdim=True), ("correction", 0.0, 1.0)),
    ("std_mean's correction", lambda x: torch.std_mean(x, 1, correction=0)[0],
     lambda x: paddle.std(x, 1), ("correction", 0.0, 1.0)),
    # attention's softmax as a method, against paddle.softmax's torch-like implicit dim
    ("softmax method axis", lambda x: x.softmax(dim=-1), lambda x: paddle.softmax(x),
     ("axis", 3, 1)),
]


@pytest.mark.parametrize("name,tfn,pfn,expected", DIFFERENT, ids=[s[0] for s in DIFFERENT])
def test_a_changed_call_is_one_difference_with_both_values(name, tfn, pfn, expected):
    diffs, t_out, p_out = _diffs(tfn, pfn)
    assert len(diffs) == 1
    setting, tv, pv = diffs[0]
    assert setting == expected[0]
    assert tv == pytest.approx(expected[1]) and pv == pytest.approx(expected[2])
    # and the two calls do compute other numbers (or shapes): the difference is real
    assert (t_out.shape != tuple(p_out.shape)
            or not np.allclose(p_out.numpy(), t_out.numpy(), rtol=1e-6, atol=1e-7))


def test_defaults_that_differ_between_the_frameworks_are_differences():
    """Each written the same way in both frameworks' code, each computing otherwise."""
    # grid_sample: torch aligns corners only when asked, Paddle by default
    diffs, t_out, p_out = _diffs(lambda x, g: TF.grid_sample(x, g),
                                 lambda x, g: PF.grid_sample(x, g), (X4, GRID))
    assert diffs == [("align_corners", False, True)]
    assert not np.allclose(t_out.numpy(), p_out.numpy(), atol=1e-4)
    # alpha_dropout is off by default in torch, on in Paddle
    diffs, _, _ = _diffs(lambda x: TF.alpha_dropout(x, 0.5), lambda x: PF.alpha_dropout(x, 0.5))
    assert diffs == [("training", False, True)]


def test_cross_entropy_over_a_class_axis_other_than_the_last():
    """A segmentation loss: torch's classes are axis 1, Paddle's the last unless told."""
    logits = RNG.standard_normal((2, 5, 3, 3)).astype(np.float32)
    labels = RNG.integers(0, 5, (2, 3, 3))
    te, pe, t_out, p_out = _run(lambda x, y: TF.cross_entropy(x, y),
                                lambda x, y: PF.cross_entropy(x, y.unsqueeze(1), axis=1),
                                (logits, labels))
    assert compare_events(te, pe)[0] == []
    np.testing.assert_allclose(float(p_out), float(t_out), rtol=1e-5)
    te, pe, _, _ = _run(lambda x, y: TF.cross_entropy(x, y, label_smoothing=0.1),
                        lambda x, y: PF.cross_entropy(x, y.unsqueeze(-1)), (X2, LABELS))
    assert [(d.setting, d.torch_value, d.paddle_value) for d in compare_events(te, pe)[0]] == [
        ("label_smoothing", 0.1, 0.0)]
    te, pe, _, _ = _run(lambda x, y: TF.cross_entropy(x.permute(0, 3, 1, 2), y),
                        lambda x, y: PF.cross_entropy(x, y.unsqueeze(-1), axis=-1),
                        (logits.transpose(0, 2, 3, 1).copy(), labels))
    assert compare_events(te, pe)[0] == []


# --- calls against layers, and what is not an event ------------------------------------------


class _TorchInception(tnn.Module):
    """torchvision's inception branch: the pool applied as a function."""

    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(TF.avg_pool2d(x, kernel_size=3, stride=1, padding=1))


class _PaddleInception(pnn.Layer):
    def __init__(self, exclusive):
        super().__init__()
        self.pool = pnn.AvgPool2D(3, 1, 1, exclusive=exclusive)
        self.conv = pnn.Conv2D(4, 4, 1)

    def forward(self, x):
        return self.conv(self.pool(x))


def _inception_pair(exclusive):
    torch.manual_seed(0)
    tm, pm = _TorchInception().eval(), _PaddleInception(exclusive)
    pm.eval()
    pm.conv.weight.set_value(tm.conv.weight.detach().numpy())
    pm.conv.bias.set_value(tm.conv.bias.detach().numpy())
    return tm, pm


def test_a_function_pairs_with_the_other_side_s_layer_of_its_kind():
    tm, pm = _inception_pair(exclusive=True)
    with torch.no_grad(), trace_settings(tm) as tt:
        tm(torch.tensor(X4))
    with paddle.no_grad(), trace_settings(pm) as pt:
        pm(paddle.to_tensor(X4))
    # the layers' own calls (torch's Conv2d calls F.conv2d) are not events beside them
    assert [(e.kind, e.name, e.layer) for e in tt.events] == [
        ("avgpool", "(model):avg_pool2d", False), ("conv", "conv", True)]
    assert [(e.kind, e.name, e.layer) for e in pt.events] == [
        ("avgpool", "pool", True), ("conv", "conv", True)]
    report = compare_settings(tm, pm, by_order=True, traces=(tt, pt))
    assert [d.line() for d in report.differ] == [
        "pool (torch (model):avg_pool2d): count_include_pad True in torch, False in Paddle"]
    assert report.calls == 1 and report.compared == 1  # the convs, as layers


def test_align_forward_names_the_call_whose_setting_differs():
    tm, pm = _inception_pair(exclusive=True)
    r = align_forward(tm, pm, {"x": X4}, by_order=True)
    assert not r.passed
    key = "settings/pool/count_include_pad"
    assert r.failed[-1].key == key and r.failed[-1].status == "setting"
    assert "the calls compute other functions" in r.failed[-1].reason
    assert r.options["settings"]["calls"] == {"compared": 1, "torch": 2, "paddle": 2}
    assert r.options["findings"][-1].endswith(
        "pool (torch (model):avg_pool2d): count_include_pad True in torch, False in Paddle")
    fixed = align_forward(*_inception_pair(exclusive=False), {"x": X4}, by_order=True)
    assert fixed.passed, fixed.to_table(failed_only=True)
    assert fixed.options["settings"] == {"differ": [],
                                         "calls": {"compared": 1, "torch": 2, "paddle": 2}}
    # off with the rest of the settings check
    off = align_forward(tm, pm, {"x": X4}, by_order=True, check_settings=False)
    assert not any(k.key.startswith("settings/") for k in off.results)


class _TorchLN(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(8, 8)

    def forward(self, x):
        return TF.layer_norm(self.fc(x), (8,), eps=1e-5)


class _PaddleLN(pnn.Layer):
    def __init__(self, eps):
        super().__init__()
        self.fc = pnn.Linear(8, 8)
        self.eps = eps

    def forward(self, x):
        return PF.layer_norm(self.fc(x), 8, epsilon=self.eps)


def test_a_functional_epsilon_below_the_noise_fails_as_its_setting_alone():
    """Outputs of large variance: an epsilon of 1e-6 for 1e-5 moves them by far less than float32
    rounding, and the calibrated values pass. The call's setting does not."""
    torch.manual_seed(0)
    tm, pm = _TorchLN().eval(), _PaddleLN(1e-6)
    pm.eval()
    pm.fc.weight.set_value(tm.fc.weight.detach().numpy().T)
    pm.fc.bias.set_value(tm.fc.bias.detach().numpy())
    x = (RNG.standard_normal((16, 8)) * 300).astype(np.float32)
    r = align_forward(tm, pm, {"x": x}, calibrate=True, by_order=True)
    assert [k.key for k in r.failed] == ["settings/(model):layer_norm/epsilon"]
    assert r.failed[0].reason.startswith(
        "(model):layer_norm: epsilon 1e-05 in torch, 1e-06 in Paddle")
    pm.eps = 1e-5
    assert align_forward(tm, pm, {"x": x}, calibrate=True, by_order=True).passed


class _TAttn(tnn.Module):
    def __init__(self):
        super().__init__()
        self.qk = tnn.Linear(6, 12)
        self.proj = tnn.Linear(6, 6)

    def forward(self, x):  # x: (batch, tokens, 6)
        q, k = self.qk(x).chunk(2, dim=-1)
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # a tensor method, as timm's attention
        return self.proj(a @ x)


class _PAttn(pnn.Layer):
    def __init__(self, axis):
        super().__init__()
        self.qk = pnn.Linear(6, 12)
        self.proj = pnn.Linear(6, 6)
        self.axis = axis

    def forward(self, x):
        q, k = self.qk(x).chunk(2, axis=-1)
        a = PF.softmax(q @ k.transpose([0, 2, 1]), axis=self.axis)
        return self.proj(a @ x)


def test_a_setting_inside_the_layer_where_values_first_differ_is_named_the_likely_cause():
    """A port's attention normalising over the queries (axis -2) where the reference's tensor
    method normalises over the keys: localisation stops at the attention layer, and the settings
    finding says the softmax call inside it is the likely cause."""
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Linear(6, 6), _TAttn(), tnn.Linear(6, 3))
    x = RNG.standard_normal((2, 5, 6)).astype(np.float32)
    for axis, expected in ((-1, None), (-2, "1:softmax")):
        pm = pnn.Sequential(pnn.Linear(6, 6), _PAttn(axis), pnn.Linear(6, 3))
        for (_, tp), (_, pp) in zip(tm.named_parameters(), pm.named_parameters()):
            pp.set_value(tp.detach().numpy().T if tp.ndim == 2 else tp.detach().numpy())
        r = align_forward(tm, pm, {"input": x}, calibrate=True, by_order=True)
        if expected is None:
            assert r.passed, r.to_table(failed_only=True)
            continue
        assert r.options["divergence"]["layer"] == "1"
        assert [k.key for k in r.failed if k.status == "setting"] == ["settings/1:softmax/axis"]
        assert r.options["findings"][-1].endswith(
            "1:softmax: axis 2 in torch, 1 in Paddle; 1:softmax is inside 1, where the values "
            "first differ: the likely cause")


def test_align_train_traces_the_first_step_s_forward_and_loss():
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Linear(6, 6))
    pm = pnn.Sequential(pnn.Linear(6, 6))
    pm[0].weight.set_value(tm[0].weight.detach().numpy().T)
    pm[0].bias.set_value(tm[0].bias.detach().numpy())
    kw = dict(steps=2, torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
              paddle_optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()))
    r = align_train(tm, pm, [(X2, LABELS)],
                    torch_loss_fn=tnn.CrossEntropyLoss(label_smoothing=0.1),
                    paddle_loss_fn=pnn.CrossEntropyLoss(), **kw)
    key = "settings/CrossEntropyLoss:cross_entropy/label_smoothing"
    assert r.failed[-1].key == key
    # one step's calls, not each step's
    assert r.options["settings"]["calls"] == {"compared": 1, "torch": 1, "paddle": 1}


# --- the trace itself -----------------------------------------------------------------------------


def test_the_trace_changes_no_value_and_puts_every_function_back():
    tm, pm = _inception_pair(exclusive=False)
    originals = {n: getattr(TF, n) for n in ("avg_pool2d", "interpolate", "gelu", "softmax")}
    p_originals = {n: getattr(PF, n) for n in ("avg_pool2d", "interpolate", "gelu", "softmax")}
    with torch.no_grad():
        plain = tm(torch.tensor(X4)).numpy()
        with trace_settings(tm):
            assert TF.avg_pool2d is not originals["avg_pool2d"]
            traced = tm(torch.tensor(X4)).numpy()
    assert np.array_equal(plain, traced)
    assert {n: getattr(TF, n) for n in originals} == originals
    # even where the forward pass raises
    with pytest.raises((RuntimeError, ValueError)):
        with trace_settings(pm):
            pm(paddle.to_tensor(X4[:, :3]))  # 3 channels for a 4-channel conv
    assert {n: getattr(PF, n) for n in p_originals} == p_originals
    assert not any(h for h in pm.pool._forward_pre_hooks.values())


def test_methods_top_level_functions_and_names_imported_are_put_back():
    t_saved = (torch.Tensor.__dict__.get("softmax"), torch.softmax, torch.var, _tgelu)
    p_saved = (paddle.Tensor.var, paddle.var, paddle.softmax, _pgelu)
    tm = _Fn(lambda x: _tgelu(torch.softmax(x.var(-1), 0)))
    pm = _PFn(lambda x: _pgelu(paddle.softmax(x.var(-1), 0)))
    with trace_settings(tm) as tt, trace_settings(pm) as pt:
        assert _tgelu is not t_saved[3] and _pgelu is not p_saved[3]
        tm(torch.tensor(X2))
        pm(paddle.to_tensor(X2))
    # a gelu imported by name into the model's module is traced through that name
    assert [e.op for e in tt.events] == [e.op for e in pt.events] == ["var", "softmax", "gelu"]
    assert compare_events(tt.events, pt.events)[0] == []
    assert (torch.Tensor.__dict__.get("softmax"), torch.softmax, torch.var, _tgelu) == t_saved
    assert t_saved[0] is None  # inherited from torch's C base, as before
    assert (paddle.Tensor.var, paddle.var, paddle.softmax, _pgelu) == p_saved


def test_another_thread_s_calls_are_not_the_model_s():
    """The wrappers are global while the pass runs: a softmax another thread computes then
    (a data loader's, a second model's) runs as it would and is not an event."""
    import threading

    started, release = threading.Event(), threading.Event()
    seen = []

    def other():
        started.set()
        release.wait(5)
        seen.append(torch.softmax(torch.tensor(X2), 1))

    tm = _Fn(lambda x: (release.set(), thread.join(5), TF.gelu(x))[-1])
    thread = threading.Thread(target=other)
    thread.start()
    started.wait(5)
    with trace_settings(tm) as tt:
        tm(torch.tensor(X2))
    assert [e.op for e in tt.events] == ["gelu"] and len(seen) == 1


def test_a_call_that_cannot_be_read_runs_as_it_would_and_is_said(monkeypatch):
    from reprod.align import calls

    def broken(a, x):
        raise KeyError("nope")

    kind, _, paddle_norm, params = calls._OPS["gelu"]
    monkeypatch.setitem(calls._OPS, "gelu", (kind, broken, paddle_norm, params))
    tm = _Fn(lambda x: TF.gelu(x))
    with trace_settings(tm) as tt:
        out = tm(torch.tensor(X2))
    np.testing.assert_array_equal(out.numpy(), TF.gelu(torch.tensor(X2)).numpy())
    assert tt.events == [] and tt.unread == ["gelu: KeyError: 'nope'"]


def test_a_call_within_a_traced_call_is_not_an_event():
    """Paddle's F.upsample calls F.interpolate: one call of the model's."""
    pm = _PFn(lambda x: PF.upsample(x, scale_factor=2))
    with trace_settings(pm) as pt:
        pm(paddle.to_tensor(X4))
    assert [(e.op, e.name) for e in pt.events] == [("upsample", "(model):upsample")]


def test_calls_are_named_by_the_module_that_made_them_and_counted_there():
    class Block(tnn.Module):
        def forward(self, x):
            return TF.gelu(TF.gelu(x))

    tm = tnn.Sequential(Block(), Block())
    with trace_settings(tm) as tt:
        tm(torch.tensor(X2))
    assert [e.name for e in tt.events] == ["0:gelu", "0:gelu#2", "1:gelu", "1:gelu#2"]


def test_one_trace_per_framework_at_a_time_and_only_of_models():
    tm = _Fn(lambda x: TF.gelu(x))
    with trace_settings(tm):
        with pytest.raises(ReprodError, match="a torch trace is already running"):
            with trace_settings(tnn.Linear(2, 2)):
                pass
    with pytest.raises(ReprodError, match="neither a torch module nor a Paddle layer"):
        trace_settings(object())


def test_kinds_of_other_counts_are_said():
    te, pe, _, _ = _run(lambda x: TF.gelu(TF.gelu(x)), lambda x: PF.gelu(x), (X2,))
    diffs, unpaired, compared, *_ = compare_events(te, pe)
    # the first call of each has one name: paired by it, and the extra one named
    assert diffs == [] and compared == 1
    assert unpaired == ["gelu (calls and layers): 2 in torch, 1 in Paddle; 1 paired by name, "
                        "(model):gelu#2 in torch only"]
    # no name in common: said, nothing compared
    renamed = [OpEvent(e.kind, e.op, "block:" + e.op, e.layer, e.settings) for e in pe]
    diffs, unpaired, compared, *_ = compare_events(te, renamed)
    assert diffs == [] and compared == 0
    assert unpaired == ["gelu (calls and layers): 2 in torch, 1 in Paddle"]


def test_a_port_that_kept_the_names_is_paired_by_them_where_a_call_is_extra():
    """The example's hardswish bug: a Hardswish (no settings) rewritten as x * F.hardsigmoid(x,
    slope=0.2) adds a hardsigmoid call: the kind's counts differ, its calls pair by name, and the
    extra one is named; a slope changed in a name-paired call is still a difference."""

    class TSE(tnn.Module):
        def forward(self, x):
            return x * TF.hardsigmoid(x)

    class PSE(pnn.Layer):
        def __init__(self, slope=1 / 6):
            super().__init__()
            self.slope = slope

        def forward(self, x):
            return x * PF.hardsigmoid(x, slope=self.slope)

    class PSwish(pnn.Layer):
        def forward(self, x):
            return x * PF.hardsigmoid(x, slope=0.2, offset=0.5)

    tm = tnn.Sequential(TSE(), tnn.Hardswish(), TSE())
    for pm, expected in ((pnn.Sequential(PSE(), PSwish(), PSE()), []),
                         (pnn.Sequential(PSE(), PSwish(), PSE(0.2)),
                          [("2:hardsigmoid", "slope", 1 / 6, 0.2)])):
        with trace_settings(tm) as tt:
            tm(torch.tensor(X2))
        with trace_settings(pm) as pt:
            pm(paddle.to_tensor(X2))
        diffs, unpaired, compared, *_ = compare_events(tt.events, pt.events)
        assert compared == 2
        assert [(d.paddle_layer, d.setting, pytest.approx(d.torch_value), d.paddle_value)
                for d in diffs] == expected
        assert unpaired == ["hardsigmoid (calls and layers): 2 in torch, 3 in Paddle; 2 paired "
                            "by name, 1:hardsigmoid in Paddle only"]


# --- saved by each script -------------------------------------------------------------------------


def test_traces_saved_by_each_script_compare_as_the_models_do(tmp_path):
    tm, pm = _inception_pair(exclusive=True)
    with torch.no_grad(), trace_settings(tm) as tt:
        tm(torch.tensor(X4))
    with paddle.no_grad(), trace_settings(pm) as pt:
        pm(paddle.to_tensor(X4))
    a = save_settings(tm, tmp_path / "t.json", trace=tt)
    b = save_settings(pm, tmp_path / "p.json", trace=pt)
    doc = json.loads(open(a).read())
    assert [OpEvent.from_json(e) for e in doc["calls"]] == tt.events
    report = compare_settings(a, b)
    assert [d.line() for d in report.differ] == [
        "pool (torch (model):avg_pool2d): count_include_pad True in torch, False in Paddle"]
    assert report.calls == 1
    # a file without a trace: its calls are not compared, its layers are
    c = save_settings(pm, tmp_path / "p_layers.json")
    assert compare_settings(a, c).calls == 0 and compare_settings(a, c).passed


def test_a_bad_call_in_a_settings_file_is_one_line_naming_it(tmp_path):
    tm = _Fn(lambda x: TF.gelu(x))
    path = save_settings(tm, tmp_path / "t.json")
    doc = json.loads(open(path).read())
    doc["calls"] = [{"kind": "gelu"}]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(ReprodError, match=r"t\.json: call #0 is not \{kind, op, name, layer, "
                                          r"settings\}"):
        compare_settings(path, path)


def test_reprod_diff_prints_a_call_that_differs(tmp_path, capsys):
    from reprod.cli import main

    tm, pm = _inception_pair(exclusive=True)
    with trace_settings(tm) as tt:
        tm(torch.tensor(X4))
    with trace_settings(pm) as pt:
        pm(paddle.to_tensor(X4))
    a = save_settings(tm, tmp_path / "t.json", trace=tt)
    b = save_settings(pm, tmp_path / "p.json", trace=pt)
    assert main([a, b]) == 1
    assert "pool (torch (model):avg_pool2d): count_include_pad True in torch, False in Paddle" \
        in capsys.readouterr().out


def test_a_setting_given_as_a_tensor_is_saved_as_its_value(tmp_path):
    """Paddle takes a size or a slope as a Tensor: the file still writes, the value in it."""
    pm = _PFn(lambda x: PF.leaky_relu(x, paddle.to_tensor(0.5).item()))
    qm = _PFn(lambda x: PF.adaptive_avg_pool2d(x, paddle.to_tensor([2, 2])))
    for model in (pm, qm):
        with trace_settings(model) as trace:
            model(paddle.to_tensor(X4))
        path = save_settings(model, tmp_path / "s.json", trace=trace)
        assert json.loads(open(path).read())["calls"][0]["settings"] == trace.events[0].to_json(
        )["settings"]
    assert trace.events[0].settings["output_size"] == (2, 2)


def test_one_layer_called_twice_pairs_by_call_with_two_layers():
    """Layers the layer settings cannot pair (two torch pools, one Paddle pool called twice) pair
    by call, and their settings are compared there."""
    tm = tnn.Sequential(tnn.MaxPool2d(2, ceil_mode=True), tnn.MaxPool2d(2, ceil_mode=True))

    class Twice(pnn.Layer):
        def __init__(self):
            super().__init__()
            self.pool = pnn.MaxPool2D(2)

        def forward(self, x):
            return self.pool(self.pool(x))

    pm = Twice()
    assert compare_settings(tm, pm, by_order=True).unpaired == ("maxpool: 2 in torch, 1 in Paddle",)
    with trace_settings(tm) as tt:
        tm(torch.tensor(X4))
    with trace_settings(pm) as pt:
        pm(paddle.to_tensor(X4))
    report = compare_settings(tm, pm, by_order=True, traces=(tt, pt))
    # pairs of two layers, counted as layers whichever order paired them
    assert report.unpaired == () and (report.compared, report.calls) == (2, 0)
    assert [d.line() for d in report.differ] == [
        "pool (torch 0): ceil_mode True in torch, False in Paddle",
        "pool#2 (torch 1): ceil_mode True in torch, False in Paddle"]


class _InlineSoftmax(tnn.Module):
    """Hugging Face CodeGen's attention: ``nn.Softmax(dim=-1)`` built in the forward pass, no
    layer of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = tnn.Linear(4, 4)

    def forward(self, x):
        return tnn.Softmax(dim=-1)(self.fc(x))


class _PaddleSoftmax(pnn.Layer):
    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        self.fc, self.axis = pnn.Linear(4, 4), axis

    def forward(self, x):
        return paddle.nn.functional.softmax(self.fc(x), axis=self.axis)


@pytest.mark.parametrize("axis, differs", [(-1, False), (1, True)])
def test_a_layer_built_in_the_forward_pass_is_traced_as_its_caller_s_call(axis, differs) -> None:
    # before, the trace took the temporary layer for a layer of the model, whose own calls are
    # no events, and saw no softmax in torch: "softmax 0 in torch, 2 in Paddle", a wrong axis
    # unsaid
    tm, pm = _InlineSoftmax(), _PaddleSoftmax(axis)
    x = np.ones((2, 3, 4), np.float32)
    with trace_settings(tm) as tt:
        tm(torch.from_numpy(x))
    with trace_settings(pm) as tp:
        pm(paddle.to_tensor(x))
    assert [(e.kind, e.name, e.settings["axis"]) for e in tt.events] == [
        ("softmax", "(model):softmax", 2)]
    report = compare_settings(tm, pm, by_order=True, traces=(tt, tp))
    assert [(d.setting, d.torch_value, d.paddle_value) for d in report.differ] == (
        [("axis", 2, 1)] if differs else []), str(report)
    assert not report.unpaired
