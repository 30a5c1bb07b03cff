"""A refused pairing by order whose layers left alone shapes cannot settle, names can.

torch's encoder with a final LayerNorm against Paddle's without: by shape, the reference's
final norm or its last block's norm2 could be the one the port lacks, so the refusal suggested
nothing (and a porter who loaded by hand had the attention named, wrongly). Of readings leaving
as many layers alone, the one pairing more layers of one last name wins.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import ConversionRules, align_forward, load_into_paddle  # noqa: E402
from reprod.align.by_order import _align_layers  # noqa: E402
from reprod.errors import KeyMismatchError  # noqa: E402

D = 16
X = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)


class TEnc(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(D, 4, 32, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(D),
                                               enable_nested_tensor=False)
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.enc(x))


class PEnc(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = paddle.nn.TransformerEncoder(
            paddle.nn.TransformerEncoderLayer(D, 4, 32, dropout=0.0), 2)
        self.classifier = paddle.nn.Linear(D, 3)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def test_the_final_norm_the_port_lacks_is_suggested_and_then_named() -> None:
    torch.manual_seed(0)
    tm = TEnc().eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pm = PEnc()
    pm.eval()
    with pytest.raises(KeyMismatchError) as e:
        load_into_paddle(pm, tm, by_order=True)
    assert ("the torch side alone holds enc.norm.weight [16], enc.norm.bias [16]; where those "
            "have no counterpart (a layer the other side computes or does without), say so: "
            'rules=ConversionRules(skip=[r"^enc\\.norm\\."])') in str(e.value)
    rules = ConversionRules(skip=[r"^enc\.norm\."])
    load_into_paddle(pm, tm, by_order=True, rules=rules)
    r = align_forward(tm, pm, X, by_order=True, rules=rules)
    assert not r.passed
    assert r.options["divergence"]["layer"] == "enc.norm"


def test_names_break_a_tie_of_shapes_only() -> None:
    norm = [((4,), None), ((4,), None)]
    lin = [((4, 2), None), ((2,), None)]
    ts, ps = [norm, norm, lin], [norm, lin]
    # by shape alone either norm could be the one left alone: no reading
    assert _align_layers(ts, ps) is None
    # by names, the one the port has no layer of that name for
    got = _align_layers(ts, ps, (["blocks.1.norm2", "enc.norm", "head"],
                                 ["layers.1.norm2", "classifier"]))
    assert got == ([1], [])
    got = _align_layers(ts, ps, (["enc.norm", "blocks.1.norm2", "head"],
                                 ["layers.1.norm2", "classifier"]))
    assert got == ([0], [])
    # names that pair nowhere settle nothing
    assert _align_layers(ts, ps, (["a", "b", "c"], ["x", "y"])) is None
