"""``replay(by_order=True)`` where the port splits layers differently from the reference.

Found on torchvision against paddle.vision (inception_v3, densenet, squeezenet): a port that
records a ReLU the reference calls as a function had that ReLU take the next BatchNorm's place
(it replays to within 0.5 of it), and a correct inception_v3 port failed 80 of 85 keys; a port
calling two sibling layers the other way round (a Fire block's expand3x3 before its expand1x1)
paired its expand1x1 with the next block's layers, and a bug in it passed. Now a layer pairs
first with the reference layer it replays to almost exactly, then by shapes among the reference
layers between the same two such pairs, and a layer the reference has none for between them
pairs with nothing.
"""

from __future__ import annotations

import pytest

from reprod.capture import record, replay

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Ref(nn.Module):
    """conv-bn-relu twice (relu as a function), then two sibling convs concatenated, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.expand1, self.expand3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = torch.cat([self.expand1(h), self.expand3(h)], 1).mean((2, 3))
        return self.head(h)


class Port(Ref):
    """The same numbers: the ReLUs as layers, expand3 called before expand1."""

    def __init__(self) -> None:
        super().__init__()
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        h = self.act2(self.bn2(self.conv2(h)))
        b = self.expand3(h)
        a = self.expand1(h)
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = Ref().eval()
    with torch.no_grad():
        for bn in (ref.bn1, ref.bn2):  # a BatchNorm that is not the identity
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), record(ref) as log:
        ref(x)
    return ref, dict(log.data)


def _port(ref: Ref) -> Port:
    port = Port().eval()
    port.load_state_dict(ref.state_dict())
    return port


def test_a_correct_port_passes_and_its_own_relus_pair_with_nothing(reference) -> None:
    ref, capture = reference
    r = replay(_port(ref), capture, by_order=True, method="max", threshold=1e-5)
    assert r.passed, r.to_table(failed_only=True)
    assert {"bn1.out", "bn2.out", "expand1.out", "expand3.out"} <= set(r.keys())
    assert sorted(s["layer"] for s in r.options["replay_skipped"]) == ["act1", "act2"]
    assert r.options["replay_unpaired"] == []


def test_a_bug_in_the_sibling_called_second_is_found_there(reference) -> None:
    ref, capture = reference
    port = _port(ref)
    with torch.no_grad():
        port.expand1.bias += 0.5
    r = replay(port, capture, by_order=True, method="max", threshold=1e-5)
    assert sorted(k.key for k in r.failed) == ["expand1.out"]


def test_a_batchnorm_bug_is_found_at_the_batchnorm_not_a_relu(reference) -> None:
    ref, capture = reference
    port = _port(ref)
    port.bn2.eps = 0.3
    r = replay(port, capture, by_order=True, method="max", threshold=1e-5)
    assert sorted(k.key for k in r.failed) == ["bn2.out"]
    assert sorted(s["layer"] for s in r.options["replay_skipped"]) == ["act1", "act2"]
