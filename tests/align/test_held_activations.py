"""Activations a port or reference holds as a function it took when it was built, which patching
the functional modules for a trace cannot see: Paddle's ``TransformerEncoderLayer`` holds
``getattr(F, "gelu")``, PaddleNLP's GPT ``self.activation = F.gelu`` (called with
``approximate=True`` whatever its config says), Hugging Face's ``GELUActivation`` its ``act``;
and Hugging Face's activation layers (``NewGELUActivation``: the tanh approximation written out)
as GELU layers. tests/realworld/test_more_transformers_real.py and test_gpt2_real.py run the
real pairs."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn
F = paddle.nn.functional

from reprod.align import align_forward, compare_settings, load_into_paddle, trace_settings  # noqa: E402

H, B, L = 8, 2, 5
X = np.random.default_rng(0).standard_normal((B, L, H)).astype(np.float32)


class NewGELUActivation(tnn.Module):
    """Hugging Face's, as transformers.activations writes it (GPT-2's "gelu_new")."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class GELUActivation(tnn.Module):
    """Hugging Face's: F.gelu taken when built (BERT's and RoBERTa's "gelu")."""

    def __init__(self) -> None:
        super().__init__()
        self.act = tnn.functional.gelu

    def forward(self, x):
        return self.act(x)


class TorchMLP(tnn.Module):
    def __init__(self, act: tnn.Module) -> None:
        super().__init__()
        self.fc, self.act, self.proj = tnn.Linear(H, 4 * H), act, tnn.Linear(4 * H, H)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class PaddleMLP(pnn.Layer):
    """As PaddleNLP's GPT holds its activation: F.gelu, taken when built."""

    def __init__(self, approximate: bool) -> None:
        super().__init__()
        self.fc, self.proj = pnn.Linear(H, 4 * H), pnn.Linear(4 * H, H)
        self.activation = F.gelu
        self.approximate = approximate

    def forward(self, x):
        return self.proj(self.activation(self.fc(x), approximate=self.approximate))


def _traced(tm, pm):
    with trace_settings(tm) as tt, torch.no_grad():
        tm(torch.tensor(X))
    with trace_settings(pm) as pt, paddle.no_grad():
        pm(paddle.to_tensor(X))
    return tt, pt


@pytest.mark.parametrize("act, approximate, differs", [
    (NewGELUActivation, True, False), (NewGELUActivation, False, True),
    (GELUActivation, False, False), (GELUActivation, True, True)])
def test_a_held_gelu_pairs_with_hugging_face_s_activation_layer(act, approximate, differs) -> None:
    torch.manual_seed(0)
    tm = TorchMLP(act()).eval()
    pm = PaddleMLP(approximate)
    pm.eval()
    tt, pt = _traced(tm, pm)
    assert [e.name for e in pt.events if e.kind == "gelu"] == ["(model):gelu"]
    assert [e.name for e in tt.events if e.kind == "gelu"] == ["act"]
    lines = [d.line() for d in compare_settings(tm, pm, by_order=True, traces=(tt, pt)).differ]
    want = "tanh" if act is NewGELUActivation else "none"
    got = "tanh" if approximate else "none"
    assert lines == ([f"(model):gelu (torch act): approximate '{want}' in torch, '{got}' in "
                      "Paddle"] if differs else [])
    # the trace gives every function it wrapped back
    assert pm.activation is F.gelu


def test_a_transformer_layer_s_activation_is_traced_with_its_setting() -> None:
    """Paddle's TransformerEncoderLayer names its activation "gelu", which a tanh one also is:
    its call is now an event, no longer taken for one the layer's own settings cover."""
    layer = pnn.TransformerEncoderLayer(H, 2, 4 * H, dropout=0.0, activation="gelu")
    layer.eval()
    layer.activation = functools.partial(F.gelu, approximate=True)
    with trace_settings(layer) as pt, paddle.no_grad():
        layer(paddle.to_tensor(X))
    gelu = [e for e in pt.events if e.kind == "gelu"]
    assert [(e.name, e.settings["approximate"]) for e in gelu] == [("(model):gelu", "tanh")]
    assert isinstance(layer.activation, functools.partial) and layer.activation.func is F.gelu


def test_align_forward_fails_a_tanh_port_of_an_exact_gelu_on_its_setting() -> None:
    """The values part by less than the threshold here: the setting alone fails it."""
    torch.manual_seed(0)
    tm = TorchMLP(GELUActivation()).eval()
    with torch.no_grad():
        tm.fc.weight.mul_(0.1)  # inputs to the GELU near 0, where the two agree to 1e-6
    pm = PaddleMLP(approximate=True)
    pm.eval()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X})
    assert [k.key for k in r.failed] == ["settings/(model):gelu/approximate"], \
        r.to_table(failed_only=True)


class HFLayer(tnn.Module):
    """A BERT layer as Hugging Face writes it: its GELU a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.act, self.out = tnn.Linear(H, 4 * H), GELUActivation(), tnn.Linear(4 * H, H)

    def forward(self, x):
        return self.out(self.act(self.dense(x)))


def test_without_a_trace_a_transformer_layer_s_gelu_pairs_with_the_reference_s_layer() -> None:
    """compare_settings without traces: the port's TransformerEncoderLayer holds its GELU, the
    reference's layer holds one as a layer; before, "gelu: 1 in torch, 0 in Paddle" went
    unpaired, and a tanh port passed."""
    torch.manual_seed(0)
    tm = HFLayer().eval()
    for approximate, lines in ((False, []), (True, [
            "0:activation (torch act): approximate 'none' in torch, 'tanh' in Paddle"])):
        pm = pnn.LayerList([pnn.TransformerEncoderLayer(H, 2, 4 * H, activation="gelu")])
        if approximate:
            pm[0].activation = functools.partial(F.gelu, approximate=True)
        report = compare_settings(tm, pm, torch_to_paddle={})
        assert [d.line() for d in report.differ] == lines
        assert not [u for u in report.unpaired if u.startswith("gelu")], report.unpaired


class BloomGelu(tnn.Module):
    """Hugging Face's Bloom: the tanh formula written out, no call of F.gelu."""

    def forward(self, x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class PaddleBloomGelu(pnn.Layer):
    def forward(self, x):
        return x * 0.5 * (1.0 + paddle.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


PaddleBloomGelu.__name__ = "BloomGelu"


class SigmoidGelu(tnn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class PaddleGeluLayerMLP(pnn.Layer):
    def __init__(self, act: pnn.Layer) -> None:
        super().__init__()
        self.fc, self.act, self.proj = pnn.Linear(H, 4 * H), act, pnn.Linear(4 * H, H)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


@pytest.mark.parametrize("port_act, differs", [(PaddleBloomGelu, False), (pnn.GELU, True)])
def test_a_gelu_written_out_by_hand_has_its_approximation_measured(port_act, differs) -> None:
    """Bloom's GELU calls nothing a trace reads: a port applying nn.GELU() (exact) there passed,
    5e-6 apart. Its class names a GELU: its values at a few points say which it computes."""
    from reprod.align.settings import read_settings

    assert read_settings(BloomGelu()) == ("gelu", {"approximate": "tanh"})
    assert read_settings(PaddleBloomGelu()) == ("gelu", {"approximate": "tanh"})
    assert read_settings(SigmoidGelu()) == ("gelu", {"approximate": "other"})
    torch.manual_seed(0)
    tm = TorchMLP(BloomGelu()).eval()
    pm = PaddleGeluLayerMLP(port_act())
    pm.eval()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X})
    failed = [k.key for k in r.failed]
    assert ("settings/act/approximate" in failed) is differs and bool(failed) is differs, \
        r.to_table(failed_only=True)


class InlineTanhMLP(tnn.Module):
    """Its GELU in its own forward code: nothing a trace reads."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = tnn.Linear(H, 4 * H), tnn.Linear(4 * H, H)

    def forward(self, x):
        h = self.fc(x)
        return self.proj(h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1 + 0.044715 * h * h))))


def test_gelus_that_do_not_pair_are_a_finding() -> None:
    torch.manual_seed(0)
    tm = InlineTanhMLP().eval()
    with torch.no_grad():
        tm.fc.weight.mul_(0.05)  # inputs near 0: the two GELUs agree to under the threshold
    pm = PaddleMLP(approximate=False)
    pm.eval()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X})
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["findings"] == [
        "GELUs not paired, so their approximations went unchecked: gelu (calls and layers): 0 "
        "in torch, 1 in Paddle (torch applying none that is read: a GELU computed in a model's "
        "own forward code, or another activation; check that both sides apply the same one, "
        "approximated alike)"]
