"""Pairing by call order, anchored on values: a port written as converters write them (X2Paddle's
ONNX route: every BatchNorm folded into its convolution, a flat model, each ResNet stage's
downsample called before the main branch). By shapes and order alone, the downsample paired
with the main branch's convolution and the pairs after it crossed over; the values say which
call is which. The real X2Paddle ports are in tests/realworld/test_x2paddle_ports_real.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reprod.capture._values import increasing, own_kind

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

import reprod  # noqa: E402
from reprod.capture import first_divergence, layer_types, match_by_order, record  # noqa: E402
from reprod.capture.naming import pair_layer_calls  # noqa: E402


@pytest.mark.parametrize("hw", [2, 4, 8])
def test_own_kind_tells_activations_from_batchnorms_from_convolutions(hw):
    torch.manual_seed(0)
    x = torch.randn(2, 32, hw, hw)
    bn = torch.nn.BatchNorm2d(32).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    cases = {
        "activation": [torch.nn.ReLU(), torch.nn.Hardswish(), torch.nn.GELU(), torch.nn.Sigmoid(),
                       torch.nn.Identity()],
        "channelwise": [bn],
        "mixing": [torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 1),
                   torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)],
    }
    with torch.no_grad():
        for kind, layers in cases.items():
            for layer in layers:
                got = own_kind(x.numpy(), layer(x).numpy())
                if hw == 2 and kind == "channelwise":
                    # 4 values a channel: too few to tell a channel's function from mixing
                    assert got in ("channelwise", "mixing"), layer
                else:
                    assert got == kind, (layer, got)


def test_own_kind_reads_tokens_and_says_nothing_of_what_it_cannot_tell():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        assert own_kind(x.numpy(), torch.nn.GELU()(x).numpy()) == "activation"
        assert own_kind(x.numpy(), torch.nn.Linear(64, 64)(x).numpy()) == "mixing"
    a = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert own_kind(a, a[:, :4]) is None  # another shape
    assert own_kind(a, np.zeros_like(a)) is None  # a constant says nothing
    assert own_kind(a[:1, :8], a[:1, :8]) is None  # 8 values: too few
    assert own_kind(a, np.full_like(a, np.nan)) is None
    assert own_kind(a.astype(np.int64), a.astype(np.int64)) is None


def test_increasing_keeps_a_longest_run_and_the_rest_cross_it():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 9))
        refs = rng.permutation(12)[:n]
        pairs = [(i, int(j)) for i, j in enumerate(refs)]
        kept, crossing = increasing(pairs)
        assert sorted(kept + crossing) == pairs
        assert all(a[1] < b[1] for a, b in zip(kept, kept[1:]))
        longest = max((len(c) for k in range(n + 1) for c in itertools.combinations(pairs, k)
                        if all(a[1] < b[1] for a, b in zip(c, c[1:]))), default=0)
        assert len(kept) == longest


class TorchBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchNet(torch.nn.Module):
    """torchvision's ResNet in small: stem, two stages, the second with a downsample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.layer1 = torch.nn.Sequential(TorchBlock(8, 8, 1), TorchBlock(8, 8, 1))
        self.layer2 = torch.nn.Sequential(TorchBlock(8, 16, 2), TorchBlock(16, 16, 1))
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


# the port's convolutions in the order it calls them, each with the torch layers it is made from
FOLDED = [("conv0", "conv1", "bn1"),
          ("conv1", "layer1.0.conv1", "layer1.0.bn1"), ("conv2", "layer1.0.conv2", "layer1.0.bn2"),
          ("conv3", "layer1.1.conv1", "layer1.1.bn1"), ("conv4", "layer1.1.conv2", "layer1.1.bn2"),
          ("conv5", "layer2.0.conv1", "layer2.0.bn1"),
          ("conv6", "layer2.0.downsample.0", "layer2.0.downsample.1"),
          ("conv7", "layer2.0.conv2", "layer2.0.bn2"),
          ("conv8", "layer2.1.conv1", "layer2.1.bn1"), ("conv9", "layer2.1.conv2", "layer2.1.bn2")]


class FlatPort(paddle.nn.Layer):
    """As X2Paddle writes a ResNet from its ONNX export: flat, BatchNorms folded, each
    stage's downsample called right after the main branch's first convolution."""

    def __init__(self) -> None:
        super().__init__()
        shapes = {"conv0": (3, 8, 3, 1), "conv1": (8, 8, 3, 1), "conv2": (8, 8, 3, 1),
                  "conv3": (8, 8, 3, 1), "conv4": (8, 8, 3, 1), "conv5": (8, 16, 3, 2),
                  "conv6": (8, 16, 1, 2), "conv7": (16, 16, 3, 1), "conv8": (16, 16, 3, 1),
                  "conv9": (16, 16, 3, 1)}
        for name, (cin, cout, k, s) in shapes.items():
            setattr(self, name, paddle.nn.Conv2D(cin, cout, k, s, padding=k // 2))
        for i in range(9):
            setattr(self, f"relu{i}", paddle.nn.ReLU())
        self.pool0 = paddle.nn.AdaptiveAvgPool2D(1)
        self.fc_weight = self.create_parameter([5, 16])
        self.fc_bias = self.create_parameter([5])

    def forward(self, x):
        x = self.relu0(self.conv0(x))
        for a, b, r1, r2 in ((1, 2, 1, 2), (3, 4, 3, 4)):
            y = getattr(self, f"conv{b}")(getattr(self, f"relu{r1}")(getattr(self, f"conv{a}")(x)))
            x = getattr(self, f"relu{r2}")(paddle.add(y, x))
        main, short = self.conv5(x), self.conv6(x)
        x = self.relu6(paddle.add(self.conv7(self.relu5(main)), short))
        y = self.conv9(self.relu7(self.conv8(x)))
        x = self.relu8(paddle.add(y, x))
        x = paddle.reshape(self.pool0(x), [-1, 16])
        return paddle.matmul(x, self.fc_weight, transpose_y=True) + self.fc_bias


# the torch layer call each port layer call computes (a folded conv: the convolution, whose
# output the BatchNorm's stands for)
MADE_FROM = {**{c: t for c, t, _ in FOLDED},
             "relu0": "relu", "relu1": "layer1.0.relu", "relu2": "layer1.0.relu#2",
             "relu3": "layer1.1.relu", "relu4": "layer1.1.relu#2", "relu5": "layer2.0.relu",
             "relu6": "layer2.0.relu#2", "relu7": "layer2.1.relu", "relu8": "layer2.1.relu#2",
             "pool0": "pool"}


def _pair() -> tuple[TorchNet, FlatPort, np.ndarray]:
    torch.manual_seed(0)
    tm = TorchNet().eval()
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    paddle.seed(0)
    port = FlatPort()
    port.eval()
    named = dict(tm.named_modules())
    state = {"fc_weight": tm.fc.weight.detach().numpy(), "fc_bias": tm.fc.bias.detach().numpy()}
    for layer, conv, bn in FOLDED:
        c, b = named[conv], named[bn]
        scale = (b.weight / torch.sqrt(b.running_var + b.eps)).detach().double()
        state[f"{layer}.weight"] = (c.weight.detach().double() * scale[:, None, None, None]
                                    ).float().numpy()
        state[f"{layer}.bias"] = (b.bias.detach().double() - b.running_mean.double() * scale
                                  ).float().numpy()
    port.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    return tm, port, x


def _captures(tm, port, x) -> tuple[dict, dict]:
    with torch.no_grad(), record(tm) as ref:
        tm(torch.from_numpy(x))
    with paddle.no_grad(), record(port) as got:
        port(paddle.to_tensor(x))
    return ref.data, got.data


def _first(tm, port, x):
    ref, got = _captures(tm, port, x)
    r = reprod.compare(*match_by_order(ref, got), method="max", threshold=1e-4)
    return r, first_divergence(r, layer_types={**layer_types(tm), **layer_types(port)})


def test_a_folded_port_calling_the_downsample_first_pairs_each_call_with_its_source():
    tm, port, x = _pair()
    ref, got = _captures(tm, port, x)
    pairs = pair_layer_calls(ref, got)
    assert {p: pairs.get(p) for p in MADE_FROM} == MADE_FROM
    r, div = _first(tm, port, x)
    assert r.passed, div.message if div else r.summary_line()
    # each folded conv is set against its BatchNorm's output, its input against the conv's
    assert "layer2.0.downsample.1.out" in r.keys() and "layer2.0.downsample.0.in" in r.keys()
    assert "layer2.0.downsample.0.out" not in r.keys()


def test_a_bug_in_a_folded_conv_after_the_downsample_is_named_with_both_its_layers():
    tm, port, x = _pair()
    with paddle.no_grad():
        port.conv8.weight.set_value(port.conv8.weight * 1.01)
    r, div = _first(tm, port, x)
    assert not r.passed
    assert (div.folded, div.layer, div.input_aligned) == ("layer2.1.conv1", "layer2.1.bn1", True)
    assert div.message.startswith(
        "diverges at layer2.1.conv1 (Conv2d) + layer2.1.bn1 (BatchNorm2d), one layer in the port: "
        "input aligned"), div.message


def test_a_bug_in_the_downsample_itself_is_named_there():
    tm, port, x = _pair()
    with paddle.no_grad():
        port.conv6.bias.set_value(port.conv6.bias + 0.5)
    r, div = _first(tm, port, x)
    assert (div.folded, div.layer, div.input_aligned) == (
        "layer2.0.downsample.0", "layer2.0.downsample.1", True), div.message


def test_an_activation_bug_after_the_downsample_is_named_at_its_layer():
    tm, port, x = _pair()
    port.relu7 = paddle.nn.LeakyReLU(0.1)
    r, div = _first(tm, port, x)
    assert div.layer == "layer2.1.relu" and div.input_aligned, div.message


def test_a_faithful_folded_port_passes_align_forward_and_a_bug_names_the_port_layer():
    from reprod.align import align_forward

    tm, port, x = _pair()
    assert align_forward(tm, port, x, by_order=True, threshold=1e-4).passed
    with paddle.no_grad():
        port.conv8.weight.set_value(port.conv8.weight * 1.01)
    r = align_forward(tm, port, x, by_order=True, threshold=1e-4)
    found = r.options["divergence"]
    assert (found["layer"], found["port_layer"]) == ("layer2.1.bn1", "conv8"), found
    # the port's weight is the folded one, other than the torch conv's by design: no hint
    # that "its own parameter weight differs"
    assert found.get("hint") is None, found


def test_siblings_with_the_same_values_anchor_neither():
    """Two port calls reading one input and giving one output (a layer called twice on one
    tensor): values cannot say which is which, and the pairing falls back to order."""
    a = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    b = np.maximum(a, 0)
    ref = {"x.in": a, "x.out": b, "x#2.in": a, "x#2.out": b, "<model>.in": a, "<model>.out": b}
    got = {"p.in": a, "p.out": b, "q.in": a, "q.out": b, "<model>.in": a, "<model>.out": b}
    assert pair_layer_calls(ref, got) == {"p": "x", "q": "x#2", "<model>": "<model>"}


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-5) * g + b


def test_own_kind_tells_a_layer_norm_from_the_linear_after_it():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 64) * 2 + 0.5
    ln, rms, lin = torch.nn.LayerNorm(64), torch.nn.RMSNorm(64), torch.nn.Linear(64, 64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
        rms.weight.uniform_(0.5, 1.5)
        assert own_kind(x.numpy(), ln(x).numpy()) == "normalising"
        assert own_kind(x.numpy(), rms(x).numpy()) == "normalising"
        assert own_kind(x.numpy(), lin(x).numpy()) == "mixing"


def test_a_layer_norm_the_port_leaves_out_pairs_with_nothing_on_captures_alone():
    """The port leaves the embedding LayerNorm out: its next Linear reads the LayerNorm's input.
    With layer classes (align_forward) the kinds kept them apart; on captures alone the Linear
    paired with the LayerNorm and every call after it shifted by one."""
    rng = np.random.default_rng(0)
    e = rng.standard_normal((2, 7, 16)).astype(np.float32)
    w0, w1, w2 = (rng.standard_normal((3, 16, 16)) / 2).astype(np.float32)
    x = e @ w0 + 0.5
    g, b = rng.uniform(0.5, 1.5, 16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    h = _layer_norm(x, g, b).astype(np.float32)
    ref = {"<model>.in": e, "emb.in": e, "emb.out": x, "ln.in": x, "ln.out": h, "q.in": h,
           "q.out": h @ w1, "k.in": h @ w1, "k.out": h @ w1 @ w2, "<model>.out": h @ w1 @ w2}
    got = {"<model>.in": e, "emb.in": e, "emb.out": x, "q.in": x, "q.out": x @ w1,
           "k.in": x @ w1, "k.out": x @ w1 @ w2, "<model>.out": x @ w1 @ w2}
    pairs = pair_layer_calls(ref, got)
    assert pairs == {"emb": "emb", "q": "q", "k": "k", "<model>": "<model>"}, pairs
    r = reprod.compare(*match_by_order(ref, got), threshold=1e-5)
    div = first_divergence(r)
    # judged where the port's data runs unchanged through the place of the left-out layer
    assert div.layer == "ln" and div.input_aligned, div.message
