"""The settings of paired layers (``reprod.align.settings``): what a layer computes beyond its
weights, read from both frameworks' own attributes.

Each setting is checked both ways: the same setting spelled the two frameworks' ways is no
difference (Paddle's momentum is 1 - torch's, ``exclusive`` is ``not count_include_pad``, a pool
stride of None is the kernel), and a changed one is exactly one difference, with both values.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, align_train, load_into_paddle  # noqa: E402
from reprod.align.settings import compare_settings  # noqa: E402
from reprod.messages import format_failure  # noqa: E402

tnn, pnn = torch.nn, paddle.nn


def _diffs(t_layer, p_layer):
    tm, pm = tnn.Sequential(t_layer), pnn.Sequential(p_layer)
    mapping = {f"0.{n}": f"0.{n}" for n, _ in t_layer.named_parameters()}
    report = compare_settings(tm, pm, torch_to_paddle=mapping)
    diffs = report.differ
    assert report.unpaired == () and report.passed is (not diffs)
    return [(d.setting, d.torch_value, d.paddle_value) for d in diffs]


def _drop_path(base: type, rate: float):
    """timm's and PaddleClas's DropPath (``drop_prob``), for either framework."""
    layer = type("DropPath", (base,), {"forward": lambda self, x: x})()
    layer.drop_prob = rate
    return layer


def _timesteps(base: type, flip: bool, shift: float):
    """diffusers' and ppdiffusers' Timesteps, for either framework."""
    layer = type("Timesteps", (base,), {"forward": lambda self, t: t})()
    layer.num_channels, layer.flip_sin_to_cos, layer.downscale_freq_shift = 32, flip, shift
    return layer


SAME = [
    ("conv", lambda: tnn.Conv2d(3, 8, 3, stride=2, padding=1),
     lambda: pnn.Conv2D(3, 8, 3, stride=2, padding=1)),
    ("conv spelled otherwise", lambda: tnn.Conv2d(3, 8, 3, stride=(2, 2), padding=(1, 1)),
     lambda: pnn.Conv2D(3, 8, 3, stride=[2, 2], padding=[1, 1])),
    ("conv explicit pairs", lambda: tnn.Conv2d(3, 8, 3, padding=(1, 2)),
     lambda: pnn.Conv2D(3, 8, 3, padding=[1, 1, 2, 2])),
    ("conv same", lambda: tnn.Conv2d(3, 8, 3, padding="same"),
     lambda: pnn.Conv2D(3, 8, 3, padding="SAME")),
    ("conv without padding, another padding mode",
     lambda: tnn.Conv2d(3, 8, 3, padding_mode="reflect"), lambda: pnn.Conv2D(3, 8, 3)),
    # Paddle pads by reflection before its convolution, which then pads 0 (_updated_padding)
    ("conv reflecting", lambda: tnn.Conv2d(4, 4, 7, padding=3, padding_mode="reflect", groups=4),
     lambda: pnn.Conv2D(4, 4, 7, padding=3, padding_mode="reflect", groups=4)),
    ("stochastic depth", lambda: _drop_path(torch.nn.Module, 0.1),
     lambda: _drop_path(paddle.nn.Layer, 0.1)),
    ("conv1d", lambda: tnn.Conv1d(3, 4, 3, dilation=2), lambda: pnn.Conv1D(3, 4, 3, dilation=2)),
    ("grouped", lambda: tnn.Conv2d(8, 8, 3, groups=4), lambda: pnn.Conv2D(8, 8, 3, groups=4)),
    ("transposed", lambda: tnn.ConvTranspose2d(3, 8, 3, stride=2, output_padding=1),
     lambda: pnn.Conv2DTranspose(3, 8, 3, stride=2, output_padding=1)),
    ("batchnorm", lambda: tnn.BatchNorm2d(8), lambda: pnn.BatchNorm2D(8)),
    ("batchnorm momentum", lambda: tnn.BatchNorm2d(8, momentum=0.01),
     lambda: pnn.BatchNorm2D(8, momentum=0.99)),
    ("legacy batchnorm", lambda: tnn.BatchNorm2d(8), lambda: pnn.BatchNorm(8)),
    ("batchnorm without running statistics", lambda: tnn.BatchNorm2d(8, track_running_stats=False),
     lambda: pnn.BatchNorm2D(8, use_global_stats=False)),
    ("layernorm", lambda: tnn.LayerNorm(8, eps=1e-6), lambda: pnn.LayerNorm(8, epsilon=1e-6)),
    ("groupnorm", lambda: tnn.GroupNorm(2, 8), lambda: pnn.GroupNorm(2, 8)),
    ("embedding", lambda: tnn.Embedding(10, 4, padding_idx=0),
     lambda: pnn.Embedding(10, 4, padding_idx=0)),
    ("embedding without padding", lambda: tnn.Embedding(10, 4), lambda: pnn.Embedding(10, 4)),
    ("maxpool", lambda: tnn.MaxPool2d(3, 2, 1), lambda: pnn.MaxPool2D(3, 2, 1)),
    ("maxpool stride None", lambda: tnn.MaxPool2d(2), lambda: pnn.MaxPool2D(2, stride=2)),
    ("avgpool", lambda: tnn.AvgPool2d(3, 2, 1), lambda: pnn.AvgPool2D(3, 2, 1, exclusive=False)),
    ("avgpool unpadded, another count", lambda: tnn.AvgPool2d(2),
     lambda: pnn.AvgPool2D(2, exclusive=True)),
    # HF's Funnel against PaddleNLP's: a window past the edge averages what it holds either way
    ("avgpool unpadded ceil_mode, another count",
     lambda: tnn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=True),
     lambda: pnn.AvgPool2D(2, 2, ceil_mode=True, exclusive=True)),
    ("adaptive", lambda: tnn.AdaptiveAvgPool2d(1), lambda: pnn.AdaptiveAvgPool2D(1)),
    ("dropout", lambda: tnn.Dropout(0.2), lambda: pnn.Dropout(0.2)),
    ("dropout off, another mode", lambda: tnn.Dropout(0.0),
     lambda: pnn.Dropout(0.0, mode="downscale_in_infer")),
    ("leaky", lambda: tnn.LeakyReLU(0.2), lambda: pnn.LeakyReLU(0.2)),
    ("gelu", lambda: tnn.GELU(approximate="tanh"), lambda: pnn.GELU(approximate=True)),
    ("hardtanh", lambda: tnn.Hardtanh(-2.0, 2.0), lambda: pnn.Hardtanh(-2.0, 2.0)),
    ("elu", lambda: tnn.ELU(0.5), lambda: pnn.ELU(0.5)),
    ("softplus", lambda: tnn.Softplus(2, 10), lambda: pnn.Softplus(2, 10)),
    ("softmax", lambda: tnn.Softmax(dim=1), lambda: pnn.Softmax(axis=1)),
    ("softmax without a dim", lambda: tnn.Softmax(), lambda: pnn.Softmax()),
    ("pixel shuffle", lambda: tnn.PixelShuffle(2), lambda: pnn.PixelShuffle(2)),
    ("channel shuffle", lambda: tnn.ChannelShuffle(4), lambda: pnn.ChannelShuffle(4)),
    ("flatten", lambda: tnn.Flatten(1, -1), lambda: pnn.Flatten(1, -1)),
    ("zero pad", lambda: tnn.ZeroPad2d((1, 1, 2, 2)), lambda: pnn.ZeroPad2D([1, 1, 2, 2])),
    ("constant pad", lambda: tnn.ConstantPad2d(1, 0.5), lambda: pnn.Pad2D(1, value=0.5)),
    ("reflection pad", lambda: tnn.ReflectionPad2d(2),
     lambda: pnn.Pad2D(2, mode="reflect", value=7.0)),  # a value unused by the mode
    ("hardshrink", lambda: tnn.Hardshrink(0.3), lambda: pnn.Hardshrink(0.3)),
    ("celu", lambda: tnn.CELU(0.5), lambda: pnn.CELU(0.5)),
    ("upsample per dimension", lambda: tnn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
     lambda: pnn.Upsample(scale_factor=2, mode="nearest")),
    ("upsample", lambda: tnn.Upsample(scale_factor=2, mode="bilinear"),
     lambda: pnn.Upsample(scale_factor=2, mode="bilinear")),
]


@pytest.mark.parametrize("name,t,p", SAME, ids=[s[0] for s in SAME])
def test_the_same_setting_spelled_each_framework_s_way_is_no_difference(name, t, p):
    assert _diffs(t(), p()) == []


DIFFER = [
    (lambda: tnn.Conv2d(3, 8, 3, stride=2), lambda: pnn.Conv2D(3, 8, 3, stride=1),
     ("stride", (2, 2), (1, 1))),
    (lambda: tnn.Conv2d(3, 8, 3, padding=1), lambda: pnn.Conv2D(3, 8, 3, padding=0),
     ("padding", (1, 1), (0, 0))),
    (lambda: tnn.Conv2d(3, 8, 3, dilation=2), lambda: pnn.Conv2D(3, 8, 3, dilation=1),
     ("dilation", (2, 2), (1, 1))),
    (lambda: tnn.Conv2d(8, 8, 3, groups=8, bias=False),
     lambda: pnn.Conv2D(8, 8, 3, groups=4, bias_attr=False), ("groups", 8, 4)),
    (lambda: tnn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
     lambda: pnn.Conv2D(3, 8, 3, padding=1), ("padding_mode", "reflect", "zeros")),
    (lambda: tnn.Conv2d(3, 8, 3, padding=1), lambda: pnn.Conv2D(3, 8, 3, padding=1,
                                                                padding_mode="reflect"),
     ("padding_mode", "zeros", "reflect")),  # the padding itself the same: 1, not 0
    (lambda: _drop_path(torch.nn.Module, 0.1), lambda: _drop_path(paddle.nn.Layer, 0.2),
     ("p", 0.1, 0.2)),
    (lambda: _timesteps(torch.nn.Module, True, 1.0), lambda: _timesteps(paddle.nn.Layer, False, 1.0),
     ("flip_sin_to_cos", True, False)),
    (lambda: _timesteps(torch.nn.Module, True, 1.0), lambda: _timesteps(paddle.nn.Layer, True, 0.0),
     ("downscale_freq_shift", 1.0, 0.0)),
    (lambda: tnn.ConvTranspose2d(3, 8, 3, stride=2, output_padding=1),
     lambda: pnn.Conv2DTranspose(3, 8, 3, stride=2), ("output_padding", (1, 1), (0, 0))),
    (lambda: tnn.BatchNorm2d(8), lambda: pnn.BatchNorm2D(8, epsilon=1e-6),
     ("epsilon", 1e-5, 1e-6)),
    (lambda: tnn.BatchNorm2d(8), lambda: pnn.BatchNorm2D(8, momentum=0.1),
     ("momentum", 0.1, 0.9)),
    (lambda: tnn.BatchNorm2d(8), lambda: pnn.BatchNorm2D(8, use_global_stats=True),
     ("statistics", "batch in training, running in eval", "always the running ones")),
    (lambda: tnn.LayerNorm(8), lambda: pnn.LayerNorm(8, epsilon=1e-6), ("epsilon", 1e-5, 1e-6)),
    (lambda: tnn.GroupNorm(2, 8), lambda: pnn.GroupNorm(4, 8), ("num_groups", 2, 4)),
    (lambda: tnn.Embedding(10, 4, padding_idx=0), lambda: pnn.Embedding(10, 4),
     ("padding_idx", 0, None)),
    (lambda: tnn.MaxPool2d(3, 2, 1, ceil_mode=True), lambda: pnn.MaxPool2D(3, 2, 1),
     ("ceil_mode", True, False)),
    (lambda: tnn.MaxPool2d(3, 2), lambda: pnn.MaxPool2D(3, 1), ("stride", (2, 2), (1, 1))),
    (lambda: tnn.MaxPool2d(2, 2), lambda: pnn.MaxPool2D(3, 2), ("kernel_size", (2, 2), (3, 3))),
    (lambda: tnn.AvgPool2d(3, 2, 1), lambda: pnn.AvgPool2D(3, 2, 1),
     ("count_include_pad", True, False)),
    (lambda: tnn.AdaptiveAvgPool2d(2), lambda: pnn.AdaptiveAvgPool2D(1),
     ("output_size", (2, 2), (1, 1))),
    (lambda: tnn.AdaptiveMaxPool2d(2), lambda: pnn.AdaptiveMaxPool2D(1),
     ("output_size", (2, 2), (1, 1))),
    (lambda: tnn.Dropout(0.5), lambda: pnn.Dropout(0.5, mode="downscale_in_infer"),
     ("mode", "upscale_in_train", "downscale_in_infer")),
    (lambda: tnn.Dropout(0.5), lambda: pnn.Dropout(0.1), ("p", 0.5, 0.1)),
    (lambda: tnn.LeakyReLU(0.01), lambda: pnn.LeakyReLU(0.2), ("negative_slope", 0.01, 0.2)),
    (lambda: tnn.GELU(), lambda: pnn.GELU(approximate=True), ("approximate", "none", "tanh")),
    (lambda: tnn.ELU(1.0), lambda: pnn.ELU(0.5), ("alpha", 1.0, 0.5)),
    (lambda: tnn.Softmax(dim=1), lambda: pnn.Softmax(axis=-1), ("axis", 1, -1)),
    (lambda: tnn.Upsample(scale_factor=2, mode="bilinear"),
     lambda: pnn.Upsample(scale_factor=2, mode="bilinear", align_mode=1), ("align_mode", 0, 1)),
    (lambda: tnn.PixelShuffle(2), lambda: pnn.PixelShuffle(3), ("upscale_factor", 2, 3)),
    (lambda: tnn.ChannelShuffle(2), lambda: pnn.ChannelShuffle(4), ("groups", 2, 4)),
    (lambda: tnn.Flatten(), lambda: pnn.Flatten(0, -1), ("start", 1, 0)),
    (lambda: tnn.ZeroPad2d(1), lambda: pnn.Pad2D(1, mode="replicate"),
     ("mode", "constant", "replicate")),
    (lambda: tnn.ReflectionPad2d((1, 1, 2, 2)), lambda: pnn.Pad2D([1, 1, 1, 1], mode="reflect"),
     ("padding", (1, 1, 2, 2), (1, 1, 1, 1))),
    (lambda: tnn.ConstantPad2d(1, 0.5), lambda: pnn.Pad2D(1, value=0.0), ("value", 0.5, 0.0)),
    (lambda: tnn.Softshrink(0.5), lambda: pnn.Softshrink(0.2), ("threshold", 0.5, 0.2)),
    (lambda: tnn.Upsample(scale_factor=2, mode="nearest"),
     lambda: pnn.Upsample(scale_factor=2, mode="bilinear"), ("mode", "nearest", "bilinear")),
]


@pytest.mark.parametrize("t,p,expected", DIFFER, ids=[f"{d[2][0]}-{i}" for i, d in enumerate(DIFFER)])
def test_a_changed_setting_is_one_difference_with_both_values(t, p, expected):
    got = _diffs(t(), p())
    assert len(got) == 1, got
    setting, tv, pv = got[0]
    assert setting == expected[0]
    for a, b in ((tv, expected[1]), (pv, expected[2])):
        if isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-6)
        else:
            assert a == b


@pytest.mark.parametrize("size", [3, 4, 5, 7])
@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 2), (3, 3), (2, 1)])
def test_an_unpadded_ceil_mode_pool_computes_the_same_whatever_it_counts(size, kernel, stride):
    """Why the count is not compared without padding, even with ceil_mode: the numbers."""
    x = np.random.default_rng(size).standard_normal((1, 2, size, size + 1)).astype(np.float32)
    t = torch.nn.functional.avg_pool2d(torch.from_numpy(x), kernel, stride, ceil_mode=True,
                                       count_include_pad=True).numpy()
    for exclusive in (True, False):
        p = paddle.nn.functional.avg_pool2d(paddle.to_tensor(x), kernel, stride, ceil_mode=True,
                                            exclusive=exclusive).numpy()
        np.testing.assert_allclose(p, t, rtol=1e-6, atol=1e-7)
    assert _diffs(tnn.AvgPool2d(kernel, stride, ceil_mode=True),
                  pnn.AvgPool2D(kernel, stride, ceil_mode=True)) == []


def test_layers_without_parameters_pair_by_order_only_where_the_counts_agree():
    tm = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.MaxPool2d(2), tnn.ReLU(), tnn.MaxPool2d(2))
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3), pnn.MaxPool2D(2), pnn.ReLU(), pnn.MaxPool2D(3))
    report = compare_settings(tm, pm)  # the default rules pair 0.weight with 0.weight
    assert [(d.torch_layer, d.paddle_layer, d.setting) for d in report.differ] == [
        ("3", "3", "kernel_size"), ("3", "3", "stride")]
    assert str(report).splitlines() == ["3: kernel_size (2, 2) in torch, (3, 3) in Paddle",
                                        "3: stride (2, 2) in torch, (3, 3) in Paddle"]
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3), pnn.MaxPool2D(2), pnn.ReLU())
    report = compare_settings(tm, pm)
    assert report.passed and report.unpaired == ("maxpool: 2 in torch, 1 in Paddle",)
    assert str(report).splitlines() == ["the settings of 1 paired layer agree",
                                        "not paired by order: maxpool: 2 in torch, 1 in Paddle"]


# --- in align_forward and align_train ----------------------------------------------------------


class TNet(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 8, 3, padding=1)
        self.bn = tnn.BatchNorm2d(8)
        self.head = tnn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class PNet(pnn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = pnn.Conv2D(3, 8, 3, padding=1)
        self.bn = pnn.BatchNorm2D(8)
        self.head = pnn.Linear(8, 5)

    def forward(self, x):
        return self.head(paddle.nn.functional.relu(self.bn(self.conv(x))).mean(axis=(2, 3)))


def _pair():
    torch.manual_seed(0)
    tm, pm = TNet(), PNet()
    with torch.no_grad():  # a variance of about 5: an epsilon 10x smaller moves the outputs
        tm.bn.running_var.uniform_(4.0, 6.0)  # by a few times float32 rounding, not 20
    load_into_paddle(pm, tm)
    return tm, pm


X = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
Y = np.array([0, 1, 2, 3])


def test_a_sub_noise_epsilon_passes_the_values_and_fails_as_a_setting(tmp_path):
    tm, pm = _pair()
    pm.bn._epsilon = 1e-6
    values_only = align_forward(tm, pm, X, calibrate=True, check_settings=False)
    # within float32 rounding of the reference: the values cannot tell
    assert values_only.passed and values_only["logits"].noise_multiple < 10, \
        values_only["logits"].noise_multiple
    r = align_forward(tm, pm, X, calibrate=True, out_dir=tmp_path)
    assert not r.passed and [k.key for k in r.failed] == ["settings/bn/epsilon"]
    assert r["settings/bn/epsilon"].status == "setting"
    assert r.options["settings"]["differ"] == ["bn: epsilon 1e-05 in torch, 1e-06 in Paddle"]
    assert "divergence" not in r.options  # no value differs: nothing to localise
    assert r.options["findings"][-1].endswith("bn: epsilon 1e-05 in torch, 1e-06 in Paddle")
    log = (tmp_path / "forward_diff.log").read_text()
    assert "value: None (setting: bn: epsilon 1e-05 in torch, 1e-06 in Paddle" in log
    assert "finding: 1 layer setting" in log
    assert format_failure(r["settings/bn/epsilon"]) == (
        "settings/bn/epsilon: bn: epsilon 1e-05 in torch, 1e-06 in Paddle: the layers compute "
        "other functions")


def test_a_momentum_that_step_0_cannot_show_fails_as_a_setting():
    tm, pm = _pair()
    pm.bn._momentum = 0.1  # torch's value, in Paddle's convention
    tm.eval()
    pm.eval()  # evaluation mode: the statistics are not updated, the momentum shows nowhere
    r = align_train(tm, pm, [(X, Y)], steps=1,
                    torch_loss_fn=tnn.CrossEntropyLoss(), paddle_loss_fn=pnn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                    paddle_optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()))
    assert [k.key for k in r.failed] == ["settings/bn/momentum"]
    assert r.options["findings"] == [
        "1 layer setting of the port differs from the reference's, whatever the values say: "
        "bn: momentum 0.1 in torch, 0.1 in Paddle, where it weighs the running statistics and "
        "torch's the batch: torch's 0.1 is Paddle's 0.9; it acts in training only (a "
        "BatchNorm's momentum, a dropout): a port for inference waives it with "
        'check_settings=["*/momentum"]']


class TNetDropout(TNet):
    def __init__(self):
        super().__init__()
        self.drop = tnn.Dropout(0.2)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def test_a_dropout_an_inference_port_lacks_fails_and_the_finding_says_how_to_waive_it():
    """X2Paddle's ONNX-route ports have no dropout (the export leaves it out): align_forward
    failed them on it, in evaluation mode where it does nothing, without saying so."""
    torch.manual_seed(0)
    tm, pm = TNetDropout(), PNet()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True)
    assert [k.key for k in r.failed] == ["settings/(none for torch drop)/p"], r.summary_line()
    finding = r.options["findings"][-1]
    assert finding.startswith("1 layer setting of the port differs from the reference's, "
                              "whatever the values say: drop (torch only): p 0.2 in torch, "
                              "no dropout in Paddle; it acts in training only"), finding
    waiver = finding.rpartition("check_settings=")[2]
    assert waiver == '["(none for torch drop)/p"]'
    r = align_forward(tm, pm, X, by_order=True, check_settings=["(none for torch drop)/p"])
    assert r.passed and r.options["settings"]["waived"] == [
        "drop (torch only): p 0.2 in torch, no dropout in Paddle"], r.options["settings"]


def test_matching_settings_add_no_key():
    tm, pm = _pair()
    r = align_forward(tm, pm, X)
    assert r.passed and not any(k.key.startswith("settings/") for k in r.results)
    # its two layers were traced too; no call to compare beside them
    assert r.options["settings"] == {"differ": [],
                                     "calls": {"compared": 0, "torch": 2, "paddle": 2}}


# --- each script saves its own --------------------------------------------------------------------


def test_settings_saved_by_each_script_compare_as_the_models_do(tmp_path):
    from reprod.align import save_settings

    tm, pm = _pair()
    pm.bn._epsilon = 1e-6
    a = save_settings(tm, tmp_path / "settings_torch.json")
    b = save_settings(pm, tmp_path / "settings_paddle.json")
    in_process = [d.line() for d in compare_settings(tm, pm).differ]
    assert in_process == ["bn: epsilon 1e-05 in torch, 1e-06 in Paddle"]
    assert [d.line() for d in compare_settings(a, b).differ] == in_process
    assert [d.line() for d in compare_settings(tm, b).differ] == in_process  # a model and a file
    assert compare_settings(a, a).passed
    # two files of one framework: the reference and the port
    tm2, _ = _pair()
    tm2.bn.eps = 1e-3
    c = save_settings(tm2, tmp_path / "port_torch.json")
    assert [d.line() for d in compare_settings(a, c).differ] == [
        "bn: epsilon 1e-05 in torch (reference), 0.001 in torch (port)"]


def test_kinds_of_other_counts_in_saved_settings_are_said(tmp_path):
    from reprod.align import save_settings

    a = save_settings(tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.MaxPool2d(2), tnn.MaxPool2d(2)),
                      tmp_path / "a.json")
    b = save_settings(pnn.Sequential(pnn.Conv2D(3, 4, 3, stride=2), pnn.MaxPool2D(2)),
                      tmp_path / "b.json")
    report = compare_settings(a, b)
    assert [d.line() for d in report.differ] == ["0: stride (1, 1) in torch, (2, 2) in Paddle"]
    assert report.unpaired == ("maxpool: 2 in torch, 1 in Paddle",)


@pytest.mark.parametrize("text,problem", [
    ("{not json", "not a layer settings file (JSONDecodeError"),
    ('{"format": "other", "layers": []}', "not a layer settings file (save_settings writes them)"),
    ('{"format": "reprod-settings", "layers": [{"name": "x"}]}',
     "layer #0 is not {name, kind, settings}"),
])
def test_a_bad_settings_file_is_one_line_naming_it(tmp_path, text, problem):
    from reprod.errors import ReprodError

    bad = tmp_path / "bad.json"
    bad.write_text(text)
    tm, _ = _pair()
    with pytest.raises(ReprodError) as e:
        compare_settings(tm, bad)
    assert str(e.value).startswith(f"{bad}: {problem}") and "\n" not in str(e.value)
    with pytest.raises(ReprodError, match="missing.json: not a layer settings file"):
        compare_settings(tm, tmp_path / "missing.json")


def test_saving_where_it_cannot_says_so_and_leaves_nothing(tmp_path):
    from reprod.align import save_settings
    from reprod.errors import WriteError

    tm, _ = _pair()
    target = tmp_path / "settings.json"
    target.mkdir()  # a directory where the file should go: the final rename fails
    (target / "kept").write_text("earlier")
    with pytest.raises(WriteError, match="settings.json: cannot write the layer settings"):
        save_settings(tm, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["settings.json"]  # no temporary left
    assert (target / "kept").read_text() == "earlier"
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(WriteError, match="cannot write the layer settings"):
        save_settings(tm, blocked / "settings.json")  # under a file


def test_a_setting_differing_on_purpose_can_be_waived():
    from reprod.errors import ReprodError

    tm, pm = _pair()
    pm.bn._epsilon = 1e-6
    r = align_forward(tm, pm, X, check_settings=["*/epsilon"])
    assert r.passed and not any(k.key.startswith("settings/") for k in r.results)
    assert r.options["settings"] == {
        "differ": [], "waived": ["bn: epsilon 1e-05 in torch, 1e-06 in Paddle"],
        "calls": {"compared": 0, "torch": 2, "paddle": 2}}
    assert "findings" not in r.options
    assert not align_forward(tm, pm, X, check_settings=["*/momentum"]).passed
    assert "settings" not in align_forward(tm, pm, X, check_settings=False).options
    for bad in ("*/epsilon", [3]):
        with pytest.raises(ReprodError, match="check_settings="):
            align_forward(tm, pm, X, check_settings=bad)


def test_reprod_diff_compares_two_settings_files(tmp_path, capsys):
    from reprod.align import save_settings
    from reprod.cli import main

    tm, pm = _pair()
    a = save_settings(tm, tmp_path / "settings_torch.json")
    assert main([a, save_settings(pm, tmp_path / "settings_paddle.json")]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "the settings of 2 paired layers agree", "0 layer settings differ: PASSED"]
    pm.bn._epsilon = 1e-6
    b = save_settings(pm, tmp_path / "settings_paddle.json")
    assert main([a, b]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "bn: epsilon 1e-05 in torch, 1e-06 in Paddle", "1 layer setting differs: FAILED"]
    assert main([a, b, "--quiet"]) == 1 and capsys.readouterr().out == ""
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "reprod-settings", "layers": 3}')
    assert main([a, str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reprod-diff: error: {broken}: not a layer settings file") and \
        err.count("\n") == 1


def test_verbose_prints_each_log_line_once(tmp_path, capfd):
    """paddle's import puts a handler on the root logger's stderr: the log's records reached it
    too, and every line of a verbose run was printed twice."""
    import logging
    import sys

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.__stderr__)  # as paddle's, whatever pytest did to it
    root.addHandler(handler)
    try:
        tm, pm = _pair()
        pm.bn._momentum = 0.1
        align_forward(tm, pm, X, out_dir=tmp_path, verbose=True)
    finally:
        root.removeHandler(handler)
    out, err = capfd.readouterr()
    assert (out + err).count("diff check failed") == 1, out + err
    assert (out + err).count("finding: 1 layer setting") == 1


def test_the_finding_shows_what_moves_the_forward_pass_before_momenta():
    """X2Paddle's ports set every BatchNorm's momentum in torch's convention: 35 lines that act
    in training only. An epsilon that moves this forward pass must be among the five shown."""
    import dataclasses

    import numpy as np

    import reprod
    from reprod.align import settings as settings_module

    lines = [f"batchnorm{i} (torch bn{i}): momentum 0.1 in torch, 0.9 in Paddle" for i in range(35)]
    lines.insert(20, "batchnorm16 (torch features.6.block.1.1): epsilon 0.001 in torch, "
                     "1e-05 in Paddle")
    result = reprod.compare({"a": np.ones(2)}, {"a": np.ones(2)})
    result = dataclasses.replace(result, options=dict(result.options, settings={
        "differ": lines, "where": [("batchnorm0", "bn0")]}))
    finding = settings_module.with_finding(result).options["findings"][-1]
    assert finding.startswith("36 ")
    shown = finding.split("whatever the values say: ", 1)[1]
    assert shown.startswith("batchnorm16 (torch features.6.block.1.1): epsilon 0.001 in torch")
    assert shown.endswith("; and 31 more")
