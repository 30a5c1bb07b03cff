"""Stochastic depth (timm's and PaddleClas's ``DropPath``, in every ViT, Swin and ConvNeXt) drops
whole samples' residual branches at random in training. reprod knew only dropout: the dropout
check let it by, ``dropout="off"`` left it on, and the determinism check refused without naming
a layer (or, turned off, blamed a faithful block's own forward code)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod import ReprodError  # noqa: E402
from reprod.align import align_train, compare_settings, load_into_paddle  # noqa: E402

D = 8


class TorchDropPath(torch.nn.Module):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        keep = (torch.rand(x.shape[0], 1) >= self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


class DropPath(paddle.nn.Layer):
    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        keep = (paddle.rand([x.shape[0], 1]) >= self.drop_prob).astype(x.dtype)
        return x * keep / (1 - self.drop_prob)


TorchDropPath.__name__ = "DropPath"


class TorchNet(torch.nn.Module):
    def __init__(self, rate: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(D, D), torch.nn.Linear(D, 3)
        self.drop_path = TorchDropPath(rate)

    def forward(self, x):
        return self.fc2(x + self.drop_path(torch.tanh(self.fc1(x))))


class PaddleNet(paddle.nn.Layer):
    def __init__(self, rate: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = paddle.nn.Linear(D, D), paddle.nn.Linear(D, 3)
        self.drop_path = DropPath(rate)

    def forward(self, x):
        return self.fc2(x + self.drop_path(paddle.tanh(self.fc1(x))))


def _train(tm, pm, **kw):
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((4, D)).astype("float32"), rng.integers(0, 3, 4))
               for _ in range(2)]
    return align_train(tm, pm, batches, steps=2,
                       torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                       torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                       paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1,
                                                             parameters=pm.parameters()), **kw)


def _models(torch_rate: float = 0.2, paddle_rate: float = 0.2):
    torch.manual_seed(0)
    tm, pm = TorchNet(torch_rate), PaddleNet(paddle_rate)
    load_into_paddle(pm, tm)
    return tm.train(), pm.train() or pm


def test_active_drop_path_is_refused_by_name_and_switched_off_on_request():
    tm, pm = _models()
    with pytest.raises(ReprodError, match=r"torch drop_path \(p=0\.2\), paddle drop_path "
                                          r"\(p=0\.2\); pass dropout=\"off\""):
        _train(tm, pm)
    r = _train(tm, pm, dropout="off")
    assert r.passed, r.to_table(failed_only=True)
    assert tm.drop_path.training and pm.drop_path.training  # given back


def test_drop_path_rates_are_settings():
    tm, pm = _models(0.2, 0.1)
    report = compare_settings(tm, pm)
    assert [(d.torch_layer, d.setting, d.torch_value, d.paddle_value) for d in report.differ] \
        == [("drop_path", "p", 0.2, 0.1)]
