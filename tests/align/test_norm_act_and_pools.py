"""Settings the check could not pair, found on PaddleClas's ports of timm's models (session 37,
``tests/realworld/test_paddleclas_ports_real.py`` holds the real pairs):

- a norm holding its activation as a sublayer (timm's ``BatchNormAct2d``, in every
  ``ConvNormAct``) had no settings, as only layers without sublayers had: DPN68's epsilon 1e-5
  against timm's 1e-3 went unread;
- a pool of one element and stride 1 (the identity; ResNeSt50's port holds one) made the pool
  counts differ, and no pool was compared: its padded pools' count went unread;
- pools whose counts differ (timm's Res2Net pools a split the port does not) now pair by kernel
  and stride, where one way only pairs every pool of the side with fewer.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402
from reprod.align.calls import trace_settings  # noqa: E402
from reprod.align.settings import compare_settings  # noqa: E402

tnn, pnn = torch.nn, paddle.nn
X = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)


class NormAct(tnn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm whose activation is its sublayer."""

    def __init__(self, channels: int, eps: float):
        super().__init__(channels, eps=eps)
        self.drop = tnn.Identity()
        self.act = tnn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class TConvNormAct(tnn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.conv = tnn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = NormAct(4, eps)
        self.head = tnn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


class PConvBN(pnn.Layer):
    """PaddleClas's ConvBNLayer: the legacy BatchNorm with its activation fused."""

    def __init__(self):
        super().__init__()
        self.conv = pnn.Conv2D(3, 4, 3, padding=1, bias_attr=False)
        self.bn = pnn.BatchNorm(4, act="relu", epsilon=1e-5)
        self.head = pnn.Conv2D(4, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


def _randomised(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(4, generator=gen) * 0.3)
        model.bn.running_var.copy_(torch.rand(4, generator=gen) * 0.01 + 0.002)  # eps matters
        model.bn.weight.copy_(torch.rand(4, generator=gen) + 0.5)
        model.bn.bias.copy_(torch.randn(4, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
def test_a_norm_holding_its_activation_has_its_epsilon_compared(eps):
    torch.manual_seed(0)
    tm, pm = _randomised(TConvNormAct(eps)), PConvBN().eval()
    load_into_paddle(pm, tm, by_order=True)
    report = compare_settings(tm, pm, by_order=True)
    lines = [d.line() for d in report.differ]
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    if eps == 1e-5:
        assert lines == [] and r.passed, r.options.get("findings")
        return
    assert lines == ["bn: epsilon 0.001 in torch, 1e-05 in Paddle"]
    assert not r.passed and not r["logits"].passed  # the values show it too
    # localised at the norm itself, recorded whole as the port's fused norm is: before, the
    # port's norm was paired with the activation inside, and "the cause lies between conv and
    # bn.act, outside the recorded layers"
    assert r.options["divergence"]["layer"] == "bn"
    assert r.options["findings"][0].startswith("diverges at bn (NormAct vs BatchNorm): input "
                                               "aligned")
    assert r.options["findings"][-1].startswith(
        "1 layer setting of the port differs from the reference's, whatever the values say: "
        "bn: epsilon 0.001 in torch, 1e-05 in Paddle")


def _traced(tm, pm, x=X):
    with trace_settings(tm) as tt:
        with torch.no_grad():
            tm(torch.from_numpy(x))
    with trace_settings(pm) as pt:
        pm(paddle.to_tensor(x))
    return compare_settings(tm, pm, by_order=True, traces=(tt, pt))


class TPools(tnn.Module):
    def __init__(self, *pools):
        super().__init__()
        self.conv = tnn.Conv2d(3, 4, 3, padding=1)
        self.pools = tnn.Sequential(*pools)

    def forward(self, x):
        return self.pools(self.conv(x))


class PPools(pnn.Layer):
    """Its pools named as the port's own (``pool_a``...): none pairs by name."""

    def __init__(self, *pools):
        super().__init__()
        self.conv = pnn.Conv2D(3, 4, 3, padding=1)
        self.names = [f"pool_{chr(97 + i)}" for i in range(len(pools))]
        for name, pool in zip(self.names, pools):
            self.add_sublayer(name, pool)

    def forward(self, x):
        x = self.conv(x)
        for name in self.names:
            x = getattr(self, name)(x)
        return x


def test_an_identity_pool_in_the_port_leaves_the_pools_paired():
    tm = TPools(tnn.AvgPool2d(3, 2, 1))  # counts the padding
    pm = PPools(pnn.AvgPool2D(1, 1), pnn.AvgPool2D(3, 2, 1))  # the identity, then excludes it
    report = _traced(tm, pm)
    assert [d.line() for d in report.differ] == [
        "pool_b (torch pools.0): count_include_pad True in torch, False in Paddle"]
    assert report.unpaired == ()
    pm = PPools(pnn.AvgPool2D(1, 1), pnn.AvgPool2D(3, 2, 1, exclusive=False))
    assert _traced(tm, pm).differ == ()


def test_pools_whose_counts_differ_pair_by_kernel_and_stride_where_one_way_only_does():
    # the reference pools a split the port does not (timm's Res2Net), then both pool alike
    tm = TPools(tnn.AvgPool2d(3, 1, 1), tnn.AvgPool2d(3, 2, 1), tnn.AvgPool2d(3, 2, 1))
    pm = PPools(pnn.AvgPool2D(3, 2, 1), pnn.AvgPool2D(3, 2, 1))
    report = _traced(tm, pm)
    assert [d.line() for d in report.differ] == [
        f"pool_{n} (torch pools.{i}): count_include_pad True in torch, False in Paddle"
        for n, i in (("a", 1), ("b", 2))]
    assert report.unpaired == ("avgpool (calls and layers): 3 in torch, 2 in Paddle; paired by "
                               "kernel and stride, pools.0 in torch only",)
    # three like pools against two: no one pairing, so none, and nothing said to differ
    tm = TPools(tnn.AvgPool2d(3, 1, 1), tnn.AvgPool2d(3, 1, 1), tnn.AvgPool2d(3, 1, 1))
    pm = PPools(pnn.AvgPool2D(3, 1, 1), pnn.AvgPool2D(3, 1, 1))
    report = _traced(tm, pm)
    assert report.differ == ()
    assert report.unpaired == ("avgpool (calls and layers): 3 in torch, 2 in Paddle",)


@pytest.mark.parametrize("mode", ["upscale_in_train", "downscale_in_infer"])
def test_a_dropout_paddle_scales_in_evaluation_is_not_waived_as_training_only(mode):
    """PaddleClas's InceptionV3 ends in ``Dropout(0.2, mode="downscale_in_infer")``, which
    multiplies by 0.8 in evaluation; timm's head has no dropout. Its rate and mode were said to
    act in training only, and a port for inference was told to waive them."""
    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.Dropout(0.0)).eval()
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3), pnn.Dropout(0.2, mode=mode))
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    eval_scales = mode == "downscale_in_infer"
    assert not r.passed and r["logits"].passed is not eval_scales
    finding = r.options["findings"][-1]
    assert ("in training only" in finding) is not eval_scales, finding
    assert "1: p 0 in torch, 0.2 in Paddle" in finding


class Conv2dSame(tnn.Conv2d):
    """timm's TF port of a convolution: pads "same" in its forward, as the input's size asks;
    its padding attribute is 0."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


@pytest.mark.parametrize("padding", [[0, 1, 0, 1], 1])
def test_a_reference_padding_in_its_forward_leaves_the_padding_to_the_values(padding):
    """timm's tf_efficientnet_b0 against PaddleClas's EfficientNetB0 read "padding (0, 0) in
    torch, (2, 2) in Paddle" on every strided convolution of a faithful port (PaddleClas pads 2
    and crops a row and a column around it): the padding of a layer that pads in its forward is
    said, not failed, and where the values differ a finding says to check it."""
    torch.manual_seed(0)
    tm = tnn.Sequential(Conv2dSame(3, 4, 3, stride=2, padding=0)).eval()
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3, stride=2, padding=padding))
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    x = X[:, :, :12, :12]  # an even size: "same" pads (0, 1)
    report = compare_settings(tm, pm, by_order=True)
    assert report.differ == () and [d.setting for d in report.said] == ["padding"]
    assert str(report).splitlines()[-1].endswith(
        "(a padding one side computes in its forward: not failed, the values decide)")
    r = align_forward(tm, pm, x, by_order=True, calibrate=True)
    faithful = padding != 1
    assert r.passed is faithful, r.options.get("findings")
    assert any(f.startswith("the reference pads in its layers' forward as the input's size "
                            "asks") for f in r.options.get("findings", ())) is not faithful


def test_a_conv_bias_before_a_norm_the_port_folded_away_is_said_and_folding_it_loads():
    """timm's ResNeSt (``SplitAttn.fc1``) and HRNet (its heads) hold a convolution bias before
    a BatchNorm, which PaddleClas's ports do without: the refusal listed a cascade of shifted
    positions. It now names the biases and says what folding them means."""
    from reprod.errors import ReprodError

    torch.manual_seed(0)
    tm = tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.BatchNorm2d(4), tnn.ReLU(),
                        tnn.Conv2d(4, 4, 3), tnn.BatchNorm2d(4), tnn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        for m in (tm[1], tm[4]):
            m.running_mean.copy_(torch.randn(4) * 0.3)
    pm = pnn.Sequential(pnn.Conv2D(3, 4, 3, bias_attr=False), pnn.BatchNorm2D(4), pnn.ReLU(),
                        pnn.Conv2D(4, 4, 3, bias_attr=False), pnn.BatchNorm2D(4),
                        pnn.Conv2D(4, 2, 1))
    pm.eval()
    with pytest.raises(ReprodError) as e:
        load_into_paddle(pm, tm, by_order=True)
    text = str(e.value)
    assert "the torch side's convolutions have a bias before a BatchNorm where the port's " \
           "have none: 0.bias, 3.bias." in text
    assert "#1 0.bias [4] vs nothing; #7 3.bias [4] vs nothing" in text
    # folded as the message says, the reference computes the same and loads into the port
    with torch.no_grad():
        before = tm(torch.from_numpy(X)).numpy()
        for conv, norm in ((tm[0], tm[1]), (tm[3], tm[4])):
            norm.running_mean.sub_(conv.bias)
            conv.bias = None
        np.testing.assert_allclose(tm(torch.from_numpy(X)).numpy(), before, rtol=1e-5,
                                   atol=1e-6)
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert r.passed, r.options.get("findings")
