"""A layer only the port records between two paired layers: PaddleNLP's CTRL holds its
sinusoidal table as a layer (``pos_encoding``), HF's CTRL adds a bare tensor. A bug in the
port's table was put "between w and dropout, outside the recorded layers", though the port
records the layer that computed it; the message now names it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402

L, D = 6, 8
TABLE = np.random.default_rng(3).standard_normal((L, D)).astype(np.float32)


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(D, D)
        self.register_buffer("table", torch.from_numpy(TABLE), persistent=False)
        self.dropout = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.dropout(self.w(x) + self.table))


class Table(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("values", paddle.to_tensor(TABLE), persistable=False)

    def forward(self, positions):
        return paddle.gather(self.values, positions)


class PaddleNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.w = paddle.nn.Linear(D, D)
        self.pos = Table()
        self.dropout = paddle.nn.Dropout(0.1)
        self.head = paddle.nn.Linear(D, 2)

    def forward(self, x):
        return self.head(self.dropout(self.w(x) + self.pos(paddle.arange(L))))


def _pair() -> tuple[TorchNet, PaddleNet]:
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchNet().eval(), PaddleNet()
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    return tm, pm


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, L, D)).astype(np.float32)


def test_the_faithful_port_passes() -> None:
    tm, pm = _pair()
    assert align_forward(tm, pm, _x(), by_order=True).passed


def test_a_bug_in_the_port_s_own_layer_is_said_there() -> None:
    tm, pm = _pair()
    pm.pos.values.set_value(paddle.to_tensor(TABLE[:, ::-1].copy()))
    div = align_forward(tm, pm, _x(), by_order=True).options["divergence"]
    assert div["layer"] == "dropout", div
    assert "the port calls pos (Table), which nothing in the reference pairs with" in \
        div["message"], div["message"]
    assert "outside the recorded layers" not in div["message"]
