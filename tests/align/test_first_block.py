"""A bug in the block a model calls first (pairing by call order records only the leaves).

A pre-norm reference against a post-norm port: the port's first norm reads the attention's
input plus its output, so the first recorded leaf's input already differs although both
models were handed the same array. That read "the input of the first recorded layer already
differs", which sent porters to their inputs. The blocks holding that leaf are recorded, and
the one whose input aligns and whose output differs is named, its own forward code the cause.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

D, H = 16, 4
X = np.random.default_rng(0).standard_normal((2, 6, D)).astype(np.float32)


class TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(D)
        self.attn = torch.nn.Linear(D, D)  # a stand-in for the attention: what reads the norm
        self.norm2 = torch.nn.LayerNorm(D)
        self.fc = torch.nn.Linear(D, D)

    def forward(self, x):  # pre-norm
        x = x + self.attn(self.norm1(x))
        return x + self.fc(self.norm2(x))


class PaddleBlock(paddle.nn.Layer):
    def __init__(self, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln1 = paddle.nn.LayerNorm(D)
        self.proj = paddle.nn.Linear(D, D)
        self.ln2 = paddle.nn.LayerNorm(D)
        self.linear = paddle.nn.Linear(D, D)

    def forward(self, x):
        if self.pre_norm:
            x = x + self.proj(self.ln1(x))
            return x + self.linear(self.ln2(x))
        x = self.ln1(x + self.proj(x))  # post-norm: the port's bug
        return self.ln2(x + self.linear(x))


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([TorchBlock(), TorchBlock()])
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class PaddleNet(paddle.nn.Layer):
    def __init__(self, pre_norm: bool) -> None:
        super().__init__()
        self.layers = paddle.nn.LayerList([PaddleBlock(pre_norm), PaddleBlock(pre_norm)])
        self.out = paddle.nn.Linear(D, 3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.out(x)


def _pair(pre_norm: bool):
    torch.manual_seed(0)
    tm = TorchNet().eval()
    with torch.no_grad():  # LayerNorms' weights and biases matter too
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pm = PaddleNet(pre_norm)
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def test_a_faithful_port_passes() -> None:
    r = align_forward(*_pair(True), X, by_order=True)
    assert r.passed, r.to_table(failed_only=True)


@pytest.mark.parametrize("calibrate", [False, True])
def test_a_post_norm_port_of_a_pre_norm_first_block_is_named_at_that_block(calibrate) -> None:
    r = align_forward(*_pair(False), X, by_order=True, calibrate=calibrate)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "blocks.0" and div.get("port_layer") == "layers.0"
    message = r.options["findings"][0]
    assert message.startswith("diverges at blocks.0 (TorchBlock vs PaddleBlock; the port's layers.0): input "
                              "aligned (max 0.000e+00)")
    assert ("inside it, the input of blocks.0.norm1 already differs" in message and
            "and it is the first of its sublayers recorded, so the cause is blocks.0's own "
            "forward code" in message)
    assert "first recorded layer" not in message
    # what norm1 reads on each side, from each side's own values: post-norm against pre-norm
    assert div["hint"] == (
        "TorchBlock: norm1 reads the block's input + attn's output in the port, the block's "
        "input in the reference: the block adds or normalises in another order (a residual, "
        "pre-norm against post-norm)")
    assert r.options["findings"][1] == (
        "likely cause at blocks.0: norm1 reads the block's input + attn's output in the port, "
        "the block's input in the reference: the block adds or normalises in another order (a "
        "residual, pre-norm against post-norm)")


class ResidualOfTheNorm(PaddleBlock):
    """The residual added to the normalised tensor: h = ln1(x); x = h + proj(h)."""

    def forward(self, x):
        h = self.ln1(x)
        x = h + self.proj(h)
        return x + self.linear(self.ln2(x))


def test_a_residual_added_to_the_normalised_tensor_is_said_by_what_the_next_norm_reads() -> None:
    tm, _ = _pair(True)
    pm = PaddleNet(True)
    pm.layers = paddle.nn.LayerList([ResidualOfTheNorm(True), PaddleBlock(True)])
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "blocks.0"
    assert "the input of blocks.0.norm2 already differs" in r.options["findings"][0]
    assert div["hint"].startswith(
        "TorchBlock: norm2 reads norm1's output + attn's output in the port, the block's input "
        "+ attn's output in the reference")
    # independently: the port's norm2 input is ln1's output plus proj's, by numpy on its own
    x = paddle.to_tensor(X)
    h = pm.layers[0].ln1(x)
    got = (h + pm.layers[0].proj(h)).numpy()
    xt = torch.from_numpy(X)
    want = (tm.blocks[0].norm1(xt) + tm.blocks[0].attn(tm.blocks[0].norm1(xt))).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_torch_s_pre_norm_encoder_against_paddle_s_post_norm_names_the_layer_and_its_setting() -> None:
    """The libraries' own layers: norm_first against normalize_before, a setting, now said to
    be the likely cause where the values first differ."""
    class TEnc(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True,
                                                     norm_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(D, 3)

        def forward(self, x):
            return self.head(self.enc(x))

    class PEnc(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = paddle.nn.TransformerEncoder(
                paddle.nn.TransformerEncoderLayer(D, H, 32, dropout=0.0), 2)
            self.classifier = paddle.nn.Linear(D, 3)

        def forward(self, x):
            return self.classifier(self.encoder(x))

    torch.manual_seed(0)
    tm = TEnc().eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pm = PEnc()
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True)
    assert r.options["divergence"]["layer"] == "enc.layers.0"
    assert r.options["findings"][0].startswith(
        "diverges at enc.layers.0 (TransformerEncoderLayer; the port's encoder.layers.0): input "
        "aligned")
    assert r.options["findings"][-1].endswith(
        "enc.layers.0 is the layer where the values first differ: the likely cause")
    assert "norm_first True in torch, False in Paddle" in r.options["findings"][-1]


class TorchPostBlock(torch.nn.Module):
    """Post-norm, with an activation layer in its feed-forward (a leaf without parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(D, D)
        self.norm1 = torch.nn.LayerNorm(D)
        self.fc1 = torch.nn.Linear(D, 2 * D)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(2 * D, D)
        self.norm2 = torch.nn.LayerNorm(D)

    def forward(self, x):
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.fc2(self.act(self.fc1(x))))


class PaddlePreBlock(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.proj = paddle.nn.Linear(D, D)
        self.ln1 = paddle.nn.LayerNorm(D)
        self.linear1 = paddle.nn.Linear(D, 2 * D)
        self.activation = paddle.nn.GELU()
        self.linear2 = paddle.nn.Linear(2 * D, D)
        self.ln2 = paddle.nn.LayerNorm(D)

    def forward(self, x):  # pre-norm: the port's bug
        x = x + self.proj(self.ln1(x))
        return x + self.linear2(self.activation(self.linear1(self.ln2(x))))


def test_a_pre_norm_port_of_a_post_norm_first_block_is_named_at_that_block() -> None:
    """The reverse: the port calls its norm first, the reference its attention. The blocks'
    activations, fed other inputs, pair with nothing by call order, and a block holding a leaf
    that paired with nothing paired with no block: the attention was named "the input of the
    first recorded layer already differs". A block whose paired leaves are the reference
    block's now pairs with it."""
    torch.manual_seed(0)
    tm = TorchNet().eval()
    tm.blocks = torch.nn.ModuleList([TorchPostBlock(), TorchPostBlock()])
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pm = PaddleNet(True)
    pm.layers = paddle.nn.LayerList([PaddlePreBlock(), PaddlePreBlock()])
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, X, by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "blocks.0" and div.get("port_layer") == "layers.0", r.options["findings"]
    assert "and it is the first of its sublayers recorded" in r.options["findings"][0]
    assert div["hint"].startswith("TorchPostBlock: attn reads norm1's output in the port, the "
                                  "block's input in the reference")
