"""A padding the reference's forward code applies before a layer (``F.pad``, then a convolution
and a max pool without padding), where the port's layers pad themselves ("SAME"): timm's
PP-HGNetV2 stem against PaddleClas's (session 38's survey). The settings check failed
"padding (0, 0) in torch, (0, 1, 0, 1) in Paddle" on both layers of a port whose values agree;
with the traces it now reads the F.pad, says the padding, and leaves it to the values. Where
they differ (zeros padded before a max pool, which its own padding never is, on negative
values), a finding says what to check."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import torch.nn.functional as TF  # noqa: E402

from reprod.align import align_forward, compare_settings, load_into_paddle  # noqa: E402

tnn, pnn = torch.nn, paddle.nn
X = np.abs(np.random.default_rng(0).standard_normal((2, 3, 8, 8))).astype(np.float32)


class TStem(tnn.Module):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv = tnn.Conv2d(3, 4, 2, bias=False)
        self.pool = tnn.MaxPool2d(2, 1, ceil_mode=True) if pool else None
        self.head = tnn.Conv2d(8 if pool else 4, 2, 1)

    def forward(self, x):
        x = TF.pad(x, (0, 1, 0, 1))
        y = self.conv(x)
        if self.pool is not None:
            y = torch.cat([y, self.pool(x)[:, [0, 1, 2, 0]]], 1)
        return self.head(y)


class T(tnn.Module):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.stem = TStem(pool)

    def forward(self, x):
        return self.stem(x)


class PStem(pnn.Layer):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv = pnn.Conv2D(3, 4, 2, padding="SAME", bias_attr=False)
        self.pool = pnn.MaxPool2D(2, 1, ceil_mode=True, padding="SAME") if pool else None
        self.head = pnn.Conv2D(8 if pool else 4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.pool is not None:
            y = paddle.concat([y, paddle.gather(self.pool(x), paddle.to_tensor([0, 1, 2, 0]),
                                                axis=1)], 1)
        return self.head(y)


class P(pnn.Layer):
    def __init__(self, pool: bool = True):
        super().__init__()
        self.stem = PStem(pool)

    def forward(self, x):
        return self.stem(x)


def _pair(pool: bool = True):
    torch.manual_seed(0)
    tm, pm = T(pool).eval(), P(pool)
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def test_a_faithful_port_padding_in_its_layers_passes_and_the_padding_is_said():
    tm, pm = _pair()
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert r.passed, r.options.get("findings")
    info = r.options["settings"]
    assert info["differ"] == [] and info["padded_before"] == [
        f"stem.{n}: padding \"(0, 0) with F.pad before it ([0, 1, 0, 1]) in stem's forward\" "
        "in torch, (0, 1, 0, 1) in Paddle" for n in ("conv", "pool")]
    # without the traces nothing says where the reference pads: the layers' paddings differ
    report = compare_settings(tm, pm, by_order=True)
    assert [d.line() for d in report.differ] == [
        f"stem.{n}: padding (0, 0) in torch, (0, 1, 0, 1) in Paddle" for n in ("conv", "pool")]


def test_zeros_before_a_max_pool_against_its_own_padding_show_on_negative_values():
    tm, pm = _pair()
    r = align_forward(tm, pm, -X, by_order=True, calibrate=True)
    assert not r.passed and r.options["settings"]["differ"] == []
    findings = r.options["findings"]
    assert findings[0].startswith("diverges at stem (TStem vs PStem): input aligned")
    assert "so the cause is stem's own forward code" in findings[0]
    assert findings[1].startswith("the forward code pads before the layer on one side, and the "
                                  "layer pads itself on the other: stem.conv: padding")
    assert "a max pool's own padding never wins its max" in findings[1]


def test_a_convolution_alone_agrees_whatever_the_sign():
    tm, pm = _pair(pool=False)
    for x in (X, -X):
        assert align_forward(tm, pm, x, by_order=True, calibrate=True).passed


class _Pads(tnn.Module):
    def forward(self, x):
        return TF.pad(x, (1, 1, 1, 1))


class _TSideways(tnn.Module):
    """The F.pad is a sibling layer's, and the stem's convolution pads nothing."""

    def __init__(self):
        super().__init__()
        self.side = _Pads()
        self.stem = tnn.Module()
        self.stem.conv = tnn.Conv2d(3, 4, 2, bias=False)
        self.stem.head = tnn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.stem.head(self.stem.conv(x)) + self.side(x).mean()


def test_a_pad_in_a_layer_not_holding_the_convolution_leaves_its_padding_a_difference():
    torch.manual_seed(0)
    tm, pm = _TSideways().eval(), P(pool=False)
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert r.options["settings"]["differ"] == [
        "stem.conv: padding (0, 0) in torch, (0, 1, 0, 1) in Paddle"]
    assert "padded_before" not in r.options["settings"]


def test_a_pad_further_out_than_the_layer_holding_the_one_holding_it_says_nothing():
    """The model pads its input; the convolution three levels down pads nothing itself, the
    port's pads "SAME": a difference, not a padding the code around the layer applies."""

    class Deep(tnn.Module):
        def __init__(self):
            super().__init__()
            self.a = tnn.Module()
            self.a.b = tnn.Module()
            self.a.b.conv = tnn.Conv2d(3, 4, 2, bias=False)

        def forward(self, x):
            return self.a.b.conv(TF.pad(x, (0, 1, 0, 1)))

    class PDeep(pnn.Layer):
        def __init__(self):
            super().__init__()
            self.a = pnn.Layer()
            self.a.b = pnn.Layer()
            self.a.b.conv = pnn.Conv2D(3, 4, 2, padding="SAME", bias_attr=False)

        def forward(self, x):
            return self.a.b.conv(x)

    torch.manual_seed(0)
    tm, pm = Deep().eval(), PDeep()
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True, calibrate=True)
    assert r["logits"].passed  # the same numbers, by the values
    assert r.options["settings"]["differ"] == [
        "a.b.conv: padding (0, 0) in torch, (0, 1, 0, 1) in Paddle"]
