"""What a localisation adds to the layer it names, on captures compared as ``first_divergence``
reads them (framework-free): no diagnosis where the layer's input already differs (BlenderbotSmall's
port dropping the decoder's embedding scale fit as the next LayerNorm's epsilon, 6.4e-4 for 1e-5,
though both are 1e-5), and, uncalibrated, a layer whose output differs no more than its
"aligned" input is said to carry rounding on (MobileBERT's correct port failed at 1e-5, named
at a Linear 1.2e-4 off in, 1.0e-4 out). tests/realworld runs neither pair (porters' repros)."""

from __future__ import annotations

import numpy as np

import reprod
from reprod.align.localise import _carried_rounding, _hint_of
from reprod.capture import first_divergence

ROWS = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8)


def _div(in_max: float, out_off: float, threshold: float = 1e-5):
    """The input off on a few elements by ``in_max`` (its mean under the threshold: aligned),
    the output off by ``out_off`` on every element, as a Linear spreads its input's rounding."""
    ref = {"a.in": ROWS, "a.out": ROWS * 2, "b.in": ROWS * 2, "b.out": ROWS * 3}
    other = dict(ref)
    other["b.in"] = ref["b.in"].copy()
    other["b.in"].flat[::16] += in_max  # 4 of 64 elements
    other["b.out"] = ref["b.out"] + np.float32(out_off)
    result = reprod.compare(ref, other, method="mean", threshold=threshold)
    return first_divergence(result), result


def test_rounding_carried_on_is_said_where_the_output_differs_no_more_than_the_input() -> None:
    # MobileBERT's: input 1.2e-4 off at most (its mean under 1e-5), output 1.0e-4 off
    div, _ = _div(1.2e-4, 1e-4)
    assert div.layer == "b" and div.input_aligned
    hint = _carried_rounding(div)
    assert hint.startswith("its output differs no more than its input (max 0.00012 in, "
                           "0.0001 out): likely float32 rounding carried on"), hint
    assert hint.endswith("calibrate=True judges each key against the reference's own rounding")


def test_an_output_that_grows_is_no_rounding_carried_on() -> None:
    div, _ = _div(1.2e-4, 5e-4)
    assert div.layer == "b" and div.input_aligned and div.output.max_abs > div.input.max_abs
    assert _carried_rounding(div) is None


def test_no_diagnosis_where_the_input_already_differs() -> None:
    div, result = _div(1e-2, 1e-2)
    assert div.input_aligned is False
    # a note diagnose would add to the output: not passed on as the layer's hint
    noted = {k.key: k for k in result.results}
    plain = dict(noted)
    import dataclasses

    out = dataclasses.replace(div.output, note="LayerNorm epsilon: port uses ~6.4e-4, reference 1e-5")
    div = dataclasses.replace(div, output=out, outputs=(out,))
    assert _hint_of(div, plain) is None
    assert _hint_of(dataclasses.replace(div, inputs=()), plain) is not None  # no input: said


def test_a_layer_s_own_parameter_that_differs_is_named_not_its_code() -> None:
    # XLNet's relative attention holds r_w_bias itself beside its sublayers: a port's perturbed
    # one read "its recorded sublayers align, so the cause is its own forward code"
    import pytest

    torch = pytest.importorskip("torch")
    paddle = pytest.importorskip("paddle")
    from reprod.align import align_forward, load_into_paddle

    class TorchAttn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.r_w_bias = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return torch.tanh(self.proj(x) + self.r_w_bias)

    class PaddleAttn(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.proj = paddle.nn.Linear(8, 8)
            self.r_w_bias = self.create_parameter([8])

        def forward(self, x):
            return paddle.tanh(self.proj(x) + self.r_w_bias)

    class TorchNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = TorchAttn(), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x))

    class PaddleNet(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = PaddleAttn(), paddle.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x))

    torch.manual_seed(0)
    tm, pm = TorchNet().eval(), PaddleNet()
    load_into_paddle(pm, tm)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert align_forward(tm, pm, x).passed
    pm.attn.r_w_bias.set_value(pm.attn.r_w_bias.numpy() + 0.125)
    div = align_forward(tm, pm, x).options["divergence"]
    assert div["layer"] == "attn" and "own forward code" in div["message"], div
    assert div["hint"] == ("its own parameter r_w_bias (max diff 0.125) differs from the "
                           "reference's: the weights, not the code"), div


def test_a_square_linear_weight_is_compared_in_paddle_s_layout() -> None:
    """A square Linear weight reads the same shape either way round: compared as it lies, a
    right one differed (max diff ~1.6 on random weights), and a code bug in the layer was put
    on its weights."""
    import pytest

    torch = pytest.importorskip("torch")
    paddle = pytest.importorskip("paddle")
    from reprod.align import align_forward, load_into_paddle

    class Shifted(paddle.nn.Linear):  # the port's code adds what the reference does not
        def forward(self, x):
            return super().forward(x) + 0.125

    torch.manual_seed(0)
    tm = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).eval()
    pm = paddle.nn.Sequential(Shifted(8, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 2))
    load_into_paddle(pm, tm)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    div = align_forward(tm, pm, x).options["divergence"]
    assert div["layer"] == "0" and div["hint"] is None, div
    # and a weight that does differ is still named, by its real difference
    pm[0].weight.set_value(pm[0].weight.numpy() * np.float32(1.5))
    pm[0].__class__ = paddle.nn.Linear
    div = align_forward(tm, pm, x).options["divergence"]
    w = tm[0].weight.detach().numpy()
    assert div["hint"] == (f"its own parameter weight (max diff {np.abs(w).max() * 0.5:.3g}) "
                           "differs from the reference's: the weights, not the code"), div
