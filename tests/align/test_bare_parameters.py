"""A port holding as bare parameters of the model what the reference holds as layers: PaddleNLP's
CLIP creates its projection heads with ``create_parameter`` ([in, out]) beside its
``logit_scale`` ([1]), where Hugging Face's CLIP has two bias-free Linears and a 0-d
``logit_scale``. Paddle lists a layer's own parameters before its sublayers', torch the
reference's ``logit_scale`` first and its Linears last. Before, pairing by order failed
("#0 logit_scale [] vs vision_projection [64, 32]"), and by hand the 0-d scale could not load.
tests/realworld/test_third_batch_real.py runs the real pair."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from reprod.align import align_forward, compare_structure, load_into_paddle, pair_weights_by_order  # noqa: E402

D, P = 8, 4
X = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
Y = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)


class TorchTowers(tnn.Module):
    """Its towers' Linears in numbered blocks, as CLIP's encoders hold them: outside any block
    the heads are the only Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = tnn.Parameter(torch.tensor(2.0))
        self.text = tnn.ModuleList([tnn.ModuleDict({"fc": tnn.Linear(D, D)})])
        self.vision = tnn.ModuleList([tnn.ModuleDict({"fc": tnn.Linear(D, D)})])
        self.visual_projection = tnn.Linear(D, P, bias=False)
        self.text_projection = tnn.Linear(D, P, bias=False)

    def forward(self, x, y):
        a = self.visual_projection(self.vision[0]["fc"](x))
        b = self.text_projection(self.text[0]["fc"](y))
        return self.logit_scale.exp() * a @ b.T


class PaddleTowers(pnn.Layer):
    def __init__(self, swapped: bool = False) -> None:
        super().__init__()
        self.vision_projection = self.create_parameter([D, P])
        self.text_projection = self.create_parameter([D, P])
        self.logit_scale = self.create_parameter([1])
        self.text_model = pnn.LayerList([pnn.LayerDict({"linear": pnn.Linear(D, D)})])
        self.vision_model = pnn.LayerList([pnn.LayerDict({"linear": pnn.Linear(D, D)})])
        self.swapped = swapped

    def forward(self, x, y):
        vp, tp = ((self.text_projection, self.vision_projection) if self.swapped
                  else (self.vision_projection, self.text_projection))
        a = paddle.matmul(self.vision_model[0]["linear"](x), vp)
        b = paddle.matmul(self.text_model[0]["linear"](y), tp)
        return self.logit_scale.exp() * paddle.matmul(a, b, transpose_y=True)


def _pair(**kw):
    torch.manual_seed(0)
    return TorchTowers().eval(), PaddleTowers(**kw)


def test_bare_heads_pair_with_the_reference_s_linears_and_load_by_order() -> None:
    tm, pm = _pair()
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["visual_projection.weight"] == "vision_projection"
    assert pairs["text_projection.weight"] == "text_projection"
    assert pairs["logit_scale"] == "logit_scale"
    load_into_paddle(pm, tm, by_order=True)
    np.testing.assert_array_equal(pm.vision_projection.numpy(),
                                  tm.visual_projection.weight.detach().numpy().T)
    np.testing.assert_allclose(pm.logit_scale.numpy(), [2.0])
    report = compare_structure(tm, pm, by_order=True)
    assert report.ok, report.to_table()
    (row,) = [r for r in report.rows if r.paddle_name == "logit_scale"]
    assert row.note.endswith("reshaped on load: [] to [1]")
    # the outputs, against the reference written again in numpy
    w = {k: v.detach().numpy().astype(np.float64) for k, v in tm.state_dict().items()}
    a = (X @ w["vision.0.fc.weight"].T + w["vision.0.fc.bias"]) @ w["visual_projection.weight"].T
    b = (Y @ w["text.0.fc.weight"].T + w["text.0.fc.bias"]) @ w["text_projection.weight"].T
    with paddle.no_grad():
        got = pm(paddle.to_tensor(X), paddle.to_tensor(Y)).numpy()
    np.testing.assert_allclose(got, np.exp(2.0) * a @ b.T, rtol=1e-5, atol=1e-5)
    assert align_forward(tm, pm, (X, Y), by_order=True).passed


def test_heads_used_the_other_way_round_fail() -> None:
    # loaded by position, the port applies them crossed: the outputs say so
    tm, pm = _pair(swapped=True)
    load_into_paddle(pm, tm, by_order=True)
    assert not align_forward(tm, pm, (X, Y), by_order=True).passed
