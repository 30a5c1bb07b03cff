"""Pairing by call order where the port calls two same-shaped sibling layers the other way round
(a Fire block's expand3x3 before its expand1x1, concatenated in the reference's order).

Found on torchvision's squeezenet1_1 against paddle.vision's with the port's Fire blocks
reordered so: the numbers were identical, yet ``match_by_order`` paired each sibling with the
other's reference and a correct port failed 16 keys; with the weights' anchors
(``align_forward(by_order=True)``) the anchor of the sibling called second crossed the first
one's and was dropped, and a bug in it read "layer names do not pair" with advice to pass
``by_order=True``, which was passed.
"""

from __future__ import annotations

import pytest

import reprod
from reprod.capture import first_divergence, match_by_order, record
from reprod.capture.naming import pair_layer_calls

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        s = self.act(self.squeeze(x))
        return torch.cat([self.act(self.expand1x1(s)), self.act(self.expand3x3(s))], 1)


class SwappedFire(Fire):
    """The same numbers, with expand3x3 called first and the ReLUs as functions."""

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        b = F.relu(self.expand3x3(s))
        a = F.relu(self.expand1x1(s))
        return torch.cat([a, b], 1)


class Net(nn.Module):
    def __init__(self, fire=Fire) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fires = nn.Sequential(fire(8, 4, 8), fire(16, 4, 8), fire(16, 6, 8))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.fires(F.relu(self.stem(x))).mean((2, 3)))


def _capture(model, x) -> dict:
    with torch.no_grad(), record(model) as log:
        model(x)
    return dict(log.data)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    return ref, x, _capture(ref, x)


def _port(ref: Net) -> Net:
    port = Net(SwappedFire).eval()
    port.load_state_dict(ref.state_dict())
    return port


def test_a_correct_port_calling_siblings_the_other_way_round_passes(pair) -> None:
    ref, x, cref = pair
    port = _port(ref)
    calls = pair_layer_calls(cref, _capture(port, x))
    for i in range(3):
        for conv in ("expand1x1", "expand3x3"):
            name = f"fires.{i}.{conv}"
            assert calls[name] == name
    r = reprod.compare(*match_by_order(cref, _capture(port, x)), method="max", threshold=1e-5)
    assert r.passed, r.to_table(failed_only=True)
    # the ReLU layers only the reference has are not failed as missing: each between two paired
    # layers is judged on what the port computed there (its ReLU as a function)
    assert "fires.1.act.out" in r.keys() and "fires.1.expand3x3.out" in r.keys()


def test_a_bug_in_the_sibling_called_second_is_named_there(pair) -> None:
    ref, x, cref = pair
    port = _port(ref)
    with torch.no_grad():
        port.fires[1].expand1x1.bias += 0.5
    r = reprod.compare(*match_by_order(cref, _capture(port, x)), method="max", threshold=1e-5)
    div = first_divergence(r)
    assert div is not None and div.layer == "fires.1.expand1x1", div and div.message
    assert div.input_aligned


def test_anchors_crossing_in_call_order_still_pair(pair) -> None:
    """The weights pair by definition order (expand1x1 with expand1x1); the port calls them the
    other way round, so the second anchor crosses the first: both pair all the same."""
    ref, x, cref = pair
    port = _port(ref)
    anchors = {n: n for n, m in port.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    calls = pair_layer_calls(cref, _capture(port, x), anchors=anchors)
    for name in anchors:
        assert calls[name] == name
    with torch.no_grad():
        port.fires[2].expand1x1.bias += 0.5
    r = reprod.compare(*match_by_order(cref, _capture(port, x), anchors=anchors),
                       method="max", threshold=1e-5)
    assert first_divergence(r).layer == "fires.2.expand1x1"


def test_unswapped_siblings_stay_paired_in_order(pair) -> None:
    """Two siblings whose values cannot be told apart (both broken the same way) keep the pairing
    in call order: a swap needs the values to say so."""
    ref, x, cref = pair
    port = Net().eval()
    port.load_state_dict(ref.state_dict())
    calls = pair_layer_calls(cref, _capture(port, x))
    assert calls["fires.0.expand1x1"] == "fires.0.expand1x1"
    with torch.no_grad():
        for conv in (port.fires[0].expand1x1, port.fires[0].expand3x3):
            conv.weight.zero_()
            conv.bias.zero_()
    calls = pair_layer_calls(cref, _capture(port, x))
    assert calls["fires.0.expand1x1"] == "fires.0.expand1x1"
    assert calls["fires.0.expand3x3"] == "fires.0.expand3x3"


def test_findings_do_not_advise_by_order_when_it_was_used() -> None:
    import numpy as np

    from reprod.align.localise import Localisation

    ref = {f"a{i}.out": np.ones(3, np.float32) for i in range(4)}
    other = {f"b{i}.out": np.ones(3, np.float32) for i in range(4)}
    r = reprod.compare(ref, other)
    div = first_divergence(r)
    assert div is not None and div.kind == "unpaired"
    by_name = Localisation(div, None, r, ref, other).findings[0]
    assert by_name.endswith("(align_forward: by_order=True)")
    by_order = Localisation(div, None, r, ref, other, by_order=True).findings[0]
    assert by_order.startswith("layer calls do not pair even by call order: only 0 of 4 pair")
    assert "by_order=True" not in by_order
