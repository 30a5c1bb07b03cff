"""record() on paddle models: values against paddle itself, hooks, memory, saving."""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import capture_twins as twins  # noqa: E402

import reprod  # noqa: E402
from reprod import ReprodLogger  # noqa: E402
from reprod.capture import layer_types, record  # noqa: E402


def layer_hooks(model) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_post_hooks)
        for _, m in model.named_sublayers(include_self=True)
    )


@pytest.fixture
def net():
    paddle.seed(0)
    return twins.paddle_net()


def test_values_are_what_the_layers_compute(net):
    x, w = twins.inputs()
    log = twins.run_paddle(net)
    d = log.data
    np.testing.assert_array_equal(d["conv.in"], x)
    conv = paddle.nn.functional.conv2d(paddle.to_tensor(x), net.conv.weight, padding=1).numpy()
    np.testing.assert_allclose(d["conv.out"], conv, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(d["res.out"], d["res.in[0]"] + d["res.in[1]"])
    np.testing.assert_array_equal(d["head.grad_out"], w)
    # BatchNorm statistics are parameters in paddle, but without gradients: not recorded
    assert "param.bn._mean.grad" not in d and "param.bn.weight.grad" in d
    plain = twins.paddle_net()
    plain.set_state_dict(net.state_dict())
    (plain(paddle.to_tensor(x)) * paddle.to_tensor(w)).sum().backward()
    for name, p in plain.named_parameters():
        if not p.stop_gradient:
            np.testing.assert_allclose(d[f"param.{name}.grad"], p.grad.numpy(), rtol=1e-6, atol=1e-7)


# paddle warns (RuntimeWarning) when a tensor hook it is asked to remove is not there
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_hooks_are_removed_on_exit_and_on_error(net):
    assert layer_hooks(net) == 0
    with record(net, backward=True):
        assert layer_hooks(net) > 0
    assert layer_hooks(net) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with record(net, backward=True):
            net(paddle.ones([1, 3, 8, 8]))
            raise RuntimeError("boom")
    assert layer_hooks(net) == 0


def test_gradient_hooks_are_gone_or_disarmed_after_exit(net):
    x, _ = twins.inputs()
    with record(net, backward=True) as log:
        out = net(paddle.to_tensor(x))
    keys = log.keys()
    out.sum().backward()  # activation and parameter hooks fire no more
    assert log.keys() == keys and not any("grad" in k for k in keys)


def test_nothing_leaks_between_two_recordings(net):
    first = twins.run_paddle(net)
    snapshot = {k: v.copy() for k, v in first.data.items()}
    net.clear_gradients()
    second = twins.run_paddle(net)
    assert second.keys() == first.keys() and not any("#" in k for k in second.keys())
    for k, v in snapshot.items():
        np.testing.assert_array_equal(first.data[k], v)
        np.testing.assert_array_equal(second.data[k], v)


def test_streaming_logger_holds_nothing(net, tmp_path):
    logger = ReprodLogger(stream_to=tmp_path / "paddle.npz")
    x, w = twins.inputs()
    with record(net, logger, backward=True):
        (net(paddle.to_tensor(x)) * paddle.to_tensor(w)).sum().backward()
        assert logger.data == {}
    keys = logger.keys()
    logger.close()
    assert list(reprod.load(tmp_path / "paddle.npz")) == keys


def test_layer_types(net):
    types = layer_types(net)
    assert types["bn"] == "BatchNorm2D" and types["<model>"] == "Net" and types["se.gate"] == "Hardsigmoid"


def test_no_grad_records_forward_only(net):
    with paddle.no_grad(), record(net, backward=True) as log:
        net(paddle.ones([1, 3, 8, 8]))
    assert log.keys() and not any("grad" in k for k in log.keys())


def test_structured_outputs_and_keyword_inputs():
    class Multi(paddle.nn.Layer):
        def forward(self, x, flag=True, *, scale=None):
            return x, {"double": x * 2, "scaled": x * scale, "meta": 3}, None

    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.multi = Multi()

        def forward(self, x):
            return self.multi(x, False, scale=paddle.full_like(x, 3.0))

    net = Net()
    with record(net, containers=False) as log:
        net(paddle.ones([2]))
    # the same keys torch's twin of this layer gets (tests/capture/test_capture_torch.py)
    assert log.keys() == [
        "multi.in[0]", "multi.in[scale]", "multi.out[0]", "multi.out[1][double]", "multi.out[1][scaled]"
    ]
    np.testing.assert_array_equal(log.data["multi.out[1][scaled]"], [3.0, 3.0])
