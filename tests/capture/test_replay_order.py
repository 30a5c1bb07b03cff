"""replay(by_order=True) pairs the port's layers in the order it calls them, and by value where
shapes alone would pair a BatchNorm with the ReLU after it."""

from __future__ import annotations

import numpy as np
import pytest

from reprod.capture import record, replay

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        )
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class PaddleBlock(paddle.nn.Layer):
    """Registers its activation before its norm, calls it after: registration order misleads."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(cin, cout, 3, padding=1)
        self.act = paddle.nn.ReLU()
        self.norm = paddle.nn.BatchNorm2D(cout)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class PaddlePort(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = PaddleBlock(3, 8)
        self.b2 = PaddleBlock(8, 8)
        self.head = paddle.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.b2(self.b1(x)).mean(axis=(2, 3)))


def _pair(seed: int = 0):
    from reprod.align import load_into_paddle

    torch.manual_seed(seed)
    tm = TorchNet().eval()
    with torch.no_grad():
        for bn in (tm.features[1], tm.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    pm = PaddlePort()
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    x = np.random.default_rng(seed).standard_normal((2, 3, 6, 6)).astype(np.float32)
    with record(tm) as ref, torch.no_grad():
        tm(torch.from_numpy(x))
    return pm, ref


def test_a_correct_port_pairs_every_layer_in_call_order() -> None:
    pm, ref = _pair()
    result = replay(pm, ref, by_order=True, method="max", threshold=1e-5)
    assert result.passed, result.to_table(failed_only=True)
    assert result.keys() == [f"features.{i}.out" for i in range(6)] + ["fc.out"]
    assert result.options["replay_skipped"] == [] and result.options["replay_unpaired"] == []


def test_each_bug_is_found_in_its_own_layer() -> None:
    pm, ref = _pair()
    pm.b1.norm._epsilon = 1e-1  # features.1
    pm.b2.act = paddle.nn.Hardswish()  # features.5
    result = replay(pm, ref, by_order=True, method="max", threshold=1e-5)
    assert sorted(k.key for k in result.failed) == ["features.1.out", "features.5.out"]
