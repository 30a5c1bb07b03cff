"""What ``replay`` could not run is a verdict or a visible gap, never a silent pass.

Found trying reprod as a porter would: a port conv with the wrong input channel count raised on
the reference's input and was only listed in ``replay_skipped``; an extra conv the reference
lacks paired with nothing and was checked nowhere; both results read PASSED.
"""

from __future__ import annotations

import pytest

from reprod.capture import first_divergence, record, replay

torch = pytest.importorskip("torch")
nn = torch.nn
TIGHT = {"method": "max", "threshold": 1e-5}


class Ref(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(self.c2(x).mean((2, 3)))


class Extra(Ref):
    """A port with a layer the reference does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(self.c2(self.extra(x)).mean((2, 3)))


class Dropped(Ref):
    """A port that leaves c2 out."""

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c1(x))).mean((2, 3)))


class OwnRelu(Ref):
    """The same numbers, with the ReLU as a layer of its own (no weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc(self.c2(self.act(self.bn(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = Ref().eval()
    with torch.no_grad():
        ref.bn.running_mean.normal_(0, 0.5)
        ref.bn.running_var.uniform_(0.5, 2.0)
        with record(ref) as log:
            ref(torch.randn(2, 3, 8, 8))
    return ref, dict(log.data)


def _port(cls, ref):
    port = cls().eval()
    port.load_state_dict(ref.state_dict(), strict=False)
    return port


def test_a_layer_that_cannot_take_the_reference_input_fails_at_its_place(reference) -> None:
    ref, capture = reference
    port = _port(Ref, ref)
    port.c2 = nn.Conv2d(4, 8, 3, padding=1)  # the wrong input channel count
    r = replay(port, capture, **TIGHT)
    assert not r.passed
    bad = r["c2.out"]
    assert bad.status == "error" and bad.ref_shape == (2, 8, 8, 8)
    assert "port layer c2 cannot run on the reference's input" in bad.reason
    assert "4 channels" in bad.reason  # the framework's own words name the cause
    # in the reference's call order: the keys before it passed, it is the first failure
    assert r.keys().index("c2.out") > r.keys().index("bn.out")
    assert r.first_failure.key == "c2.out"
    assert [s["layer"] for s in r.options["replay_skipped"]] == ["c2"]
    assert "1 port layer not replayed" in r.summary_line()


def test_an_extra_layer_with_weights_fails_by_order_and_by_name(reference) -> None:
    ref, capture = reference
    for kw in ({"by_order": True}, {}):
        r = replay(_port(Extra, ref), capture, **kw, **TIGHT)
        assert [k.key for k in r.failed] == ["extra.out"], kw
        bad = r["extra.out"]
        assert bad.status == "error" and "port layer extra (Conv2d, 2 parameter" in bad.reason
        div = first_divergence(r)  # named as the first thing wrong
        assert div is not None and div.layer == "extra", div
        # placed after the layer the port calls before it (the BatchNorm), before c2
        keys = r.keys()
        assert keys.index("bn.out") < keys.index("extra.out") < keys.index("c2.out"), kw


def test_a_layer_without_weights_pairing_with_nothing_is_listed_not_failed(reference) -> None:
    ref, capture = reference
    r = replay(_port(OwnRelu, ref), capture, by_order=True, **TIGHT)
    assert r.passed, r.to_table(failed_only=True)
    assert [s["layer"] for s in r.options["replay_skipped"]] == ["act"]
    assert "1 port layer not replayed" in r.summary_line()


def test_a_dropped_layer_is_a_visible_gap(reference) -> None:
    """Leaf replay checks layers, not their wiring: a layer the port never calls is a reference
    layer nothing replays, which the summary says (the forward comparison fails on it)."""
    ref, capture = reference
    port = _port(Dropped, ref)
    del port.c2
    for kw in ({"by_order": True}, {}):
        r = replay(port, capture, **kw, **TIGHT)
        assert r.passed and r.options["replay_unpaired"] == ["c2"], kw
        assert "(1 reference layer not replayed: " in r.summary_line()


def test_include_keeps_the_layers_left_out_from_failing(reference) -> None:
    ref, capture = reference
    r = replay(_port(Extra, ref), capture, include=["c1", "bn", "c2", "fc"], **TIGHT)
    assert r.passed and r.options["replay_skipped"] == []


def test_nothing_replayed_fails_with_the_reasons(reference) -> None:
    ref, capture = reference
    port = _port(Ref, ref)

    def broken(x):
        raise NotImplementedError

    for name in ("c1", "bn", "c2", "fc"):
        getattr(port, name).forward = broken
    r = replay(port, capture, **TIGHT)
    assert {k.status for k in r} == {"error"} and not r.passed
    assert r.keys() == ["c1.out", "bn.out", "c2.out", "fc.out"]  # no "(nothing compared)"


def test_a_paddle_port_with_an_extra_layer_and_a_wrong_one(reference) -> None:
    paddle = pytest.importorskip("paddle")
    pnn = paddle.nn
    ref, capture = reference

    class Port(pnn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn = pnn.Conv2D(3, 8, 3, padding=1), pnn.BatchNorm2D(8)
            self.extra = pnn.Conv2D(8, 8, 1)
            self.c2, self.fc = pnn.Conv2D(8, 8, 3, padding=1), pnn.Linear(8, 4)

        def forward(self, x):
            x = paddle.nn.functional.relu(self.bn(self.c1(x)))
            return self.fc(self.c2(self.extra(x)).mean((2, 3)))

    port = Port()
    port.eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    for name in ("c1", "c2"):
        getattr(port, name).weight.set_value(sd[f"{name}.weight"])
        getattr(port, name).bias.set_value(sd[f"{name}.bias"])
    port.fc.weight.set_value(sd["fc.weight"].T)
    port.fc.bias.set_value(sd["fc.bias"])
    for ours, theirs in (("weight", "weight"), ("bias", "bias"), ("_mean", "running_mean"),
                         ("_variance", "running_var")):
        getattr(port.bn, ours).set_value(sd[f"bn.{theirs}"])
    r = replay(port, capture, by_order=True, method="max", threshold=1e-4)
    assert [k.key for k in r.failed] == ["extra.out"], r.to_table()
    assert "(Conv2D, 2 parameter" in r["extra.out"].reason
    port.c2 = pnn.Conv2D(4, 8, 3, padding=1)
    r = replay(port, capture, include=["c1", "bn", "c2", "fc"], method="max", threshold=1e-4)
    assert [(k.key, k.status) for k in r.failed] == [("c2.out", "error")], r.to_table()
