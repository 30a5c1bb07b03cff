"""record() on torch models: keys, values against torch itself, hooks, memory, saving."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import capture_twins as twins  # noqa: E402
from torch import nn  # noqa: E402

import reprod  # noqa: E402
from reprod import ReprodLogger  # noqa: E402
from reprod.capture import layer_types, record  # noqa: E402
from reprod.errors import UnsupportedValueError  # noqa: E402

FORWARD_KEYS = [
    "conv.in", "conv.out", "bn.in", "bn.out", "act.in", "act.out",
    "se.avgpool.in", "se.avgpool.out", "se.fc1.in", "se.fc1.out", "se.relu.in", "se.relu.out",
    "se.fc2.in", "se.fc2.out", "se.gate.in", "se.gate.out",
    "conv2.in", "conv2.out", "bn2.in", "bn2.out", "res.in[0]", "res.in[1]", "res.out",
    "pool.in", "pool.out", "flatten.in", "flatten.out", "fc.in", "fc.out",
    "act2.in", "act2.out", "head.in", "head.out",
]


def all_hooks(model) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(p._backward_hooks or {})
    return n


@pytest.fixture
def net():
    return twins.torch_net()


def test_leaf_layers_in_call_order(net):
    log = twins.run_torch(net, backward=False, containers=False)
    assert log.keys() == FORWARD_KEYS


def test_containers_are_recorded_by_default(net):
    keys = twins.run_torch(net, backward=False).keys()
    assert [k for k in keys if k in FORWARD_KEYS] == FORWARD_KEYS
    assert sorted(set(keys) - set(FORWARD_KEYS)) == ["<model>.in", "<model>.out", "se.in", "se.out"]
    assert keys[0] == "<model>.in" and keys[-1] == "<model>.out"


def test_values_are_what_the_layers_compute(net):
    x, _ = twins.inputs()
    log = twins.run_torch(net, backward=False)
    d = log.data
    np.testing.assert_array_equal(d["conv.in"], x)
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(torch.from_numpy(x), net.conv.weight, padding=1).numpy()
        bn = net.bn
        expect_bn = (conv - bn.running_mean.numpy()[:, None, None]) / np.sqrt(
            bn.running_var.numpy()[:, None, None] + bn.eps
        ) * bn.weight.numpy()[:, None, None] + bn.bias.numpy()[:, None, None]
    np.testing.assert_allclose(d["conv.out"], conv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d["bn.out"], expect_bn, rtol=1e-5, atol=1e-5)
    b = d["act.in"]
    np.testing.assert_allclose(d["act.out"], b * np.clip(b + 3, 0, 6) / 6, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(d["res.out"], d["res.in[0]"] + d["res.in[1]"])
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(d["head.out"], out)
    assert all(type(v) is np.ndarray and v.dtype == np.float32 for v in d.values())


def test_in_place_layers_do_not_change_what_was_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    with record(model, backward=True) as log:
        model(x).sum().backward()
    with torch.no_grad():
        pre = model[0](x).numpy()
    assert (pre < 0).any()
    np.testing.assert_array_equal(log.data["0.out"], pre)  # before ReLU clipped it in place
    np.testing.assert_array_equal(log.data["1.in"], pre)
    np.testing.assert_array_equal(log.data["1.out"], np.maximum(pre, 0))
    # the gradient arriving at the Linear's output is the one before the in-place ReLU
    grad_relu_out = log.data["2.grad_in"]
    np.testing.assert_array_equal(log.data["0.grad_out"], grad_relu_out * (pre > 0))


def test_backward_records_gradients_equal_to_autograd(net):
    x, w = twins.inputs()
    log = twins.run_torch(net, backward=True)
    d = log.data
    # an independent run without hooks
    ref = twins.torch_net()
    xt = torch.from_numpy(x).requires_grad_(False)
    feats = {}
    ref.fc.register_forward_hook(lambda m, i, o: feats.__setitem__("fc", o))
    out = ref(xt)
    feats["fc"].retain_grad()
    (out * torch.from_numpy(w)).sum().backward()
    np.testing.assert_array_equal(d["head.grad_out"], w)
    np.testing.assert_allclose(d["fc.grad_out"], feats["fc"].grad.numpy(), rtol=1e-6, atol=1e-7)
    grads = {f"param.{n}.grad": p.grad.numpy() for n, p in ref.named_parameters()}
    assert sorted(k for k in d if k.startswith("param.")) == sorted(grads)
    for k, g in grads.items():
        np.testing.assert_allclose(d[k], g, rtol=1e-6, atol=1e-7, err_msg=k)
    assert "conv.grad_in" not in d  # the input does not require grad
    assert d.keys() >= {f"{k.rsplit('.', 1)[0]}.grad_out" for k in FORWARD_KEYS if k.endswith(".out")}


def test_hooks_do_not_change_the_gradients(net):
    x, w = twins.inputs()
    plain = twins.torch_net()
    (plain(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
    twins.run_torch(net, backward=True)
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_a_layer_called_twice_gets_a_call_index():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 3)
            self.other = nn.Tanh()

        def forward(self, x):
            return self.shared(self.other(self.shared(x)))

    model = Twice()
    with record(model, backward=True, containers=False) as log:
        model(torch.ones(1, 3)).sum().backward()
    assert log.keys()[:6] == [
        "shared.in", "shared.out", "other.in", "other.out", "shared#2.in", "shared#2.out"
    ]
    np.testing.assert_array_equal(log.data["shared#2.in"], log.data["other.out"])
    assert {"shared#2.grad_out", "shared.grad_out", "param.shared.weight.grad"} <= set(log.keys())
    # a parameter used twice gets one gradient per backward pass: the sum of both uses
    np.testing.assert_array_equal(log.data["param.shared.weight.grad"], model.shared.weight.grad.numpy())


def test_gradient_keys_per_backward_pass():
    model = nn.Linear(2, 2)
    with record(model, backward=True) as log:
        for _ in range(2):
            model(torch.ones(1, 2)).sum().backward()
    assert [k for k in log.keys() if k.startswith("param.weight")] == [
        "param.weight.grad", "param.weight#2.grad"
    ]
    assert "<model>#2.out" in log.keys()  # a leaf model is recorded under <model>


def test_structured_outputs_and_keyword_inputs():
    class Multi(nn.Module):
        def forward(self, x, *, scale=None, flag=True):
            return x, {"double": x * 2, "scaled": x * scale, "meta": 3}, None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.multi = Multi()

        def forward(self, x):
            return self.multi(x, scale=torch.full_like(x, 3.0))

    net = Net()
    with record(net, containers=False) as log:
        net(torch.ones(2))
    assert log.keys() == [
        "multi.in[0]", "multi.in[scale]", "multi.out[0]", "multi.out[1][double]", "multi.out[1][scaled]"
    ]
    np.testing.assert_array_equal(log.data["multi.out[1][scaled]"], [3.0, 3.0])


def test_non_tensor_arguments_do_not_change_the_input_key():
    class Scale(nn.Module):
        def forward(self, x, factor=2.0, *, mode="mul"):
            return x * factor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Scale()
            self.b = Scale()
            self.c = Scale()

        def forward(self, x):
            return self.c(self.b(self.a(x), 3.0, mode="mul"))

    net = Net()
    with record(net, containers=False) as log:
        net(torch.ones(2))
    assert log.keys() == ["a.in", "a.out", "b.in", "b.out", "c.in", "c.out"]
    np.testing.assert_array_equal(log.data["c.in"], [6.0, 6.0])


def test_one_tensor_passed_as_every_argument_is_the_input():
    """torch's self-attention is called attn(x, x, x): one input, as a port's attention reading
    x once records it; cross attention's two tensors keep their places."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.cross = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, m):
            y = self.self_attn(x, x, x, need_weights=False)[0]
            return self.cross(y, m, m, need_weights=False)[0]

    net = Net().eval()
    x, m = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    with record(net, containers=False) as log, torch.no_grad():
        net(x, m)
    assert log.keys() == ["self_attn.in", "self_attn.out", "cross.in[0]", "cross.in[1]",
                          "cross.in[2]", "cross.out"]
    np.testing.assert_array_equal(log.data["self_attn.in"], x.numpy())
    np.testing.assert_array_equal(log.data["cross.in[2]"], m.numpy())


def test_containers_include_and_exclude(net):
    log = twins.run_torch(net, backward=False, containers=True)
    keys = log.keys()
    assert keys[0] == "<model>.in" and keys[-1] == "<model>.out"
    assert keys.index("se.gate.out") < keys.index("se.out") < keys.index("conv2.in")
    log = twins.run_torch(net, backward=True, include="se.*", exclude=["*.relu"])
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in log.keys() if not k.startswith("param.")} == {
        "se.avgpool", "se.fc1", "se.fc2", "se.gate"
    }
    assert sorted(k for k in log.keys() if k.startswith("param.")) == [
        "param.se.fc1.bias.grad", "param.se.fc1.weight.grad", "param.se.fc2.bias.grad", "param.se.fc2.weight.grad"
    ]


def test_inputs_off_and_forward_off(net):
    log = twins.run_torch(net, backward=False, inputs=False, containers=False)
    assert log.keys() == [k for k in FORWARD_KEYS if ".out" in k]
    log = twins.run_torch(net, backward=True, forward=False)
    assert log.keys() and all("grad" in k for k in log.keys())


def test_hooks_are_removed_on_exit_and_on_error(net):
    assert all_hooks(net) == 0
    with record(net, backward=True):
        assert all_hooks(net) > 0
    assert all_hooks(net) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with record(net, backward=True):
            net(torch.ones(1, 3, 8, 8))
            raise RuntimeError("boom")
    assert all_hooks(net) == 0


def test_gradient_hooks_on_activations_are_disarmed_after_exit(net):
    x, _ = twins.inputs()
    with record(net, backward=True) as log:
        out = net(torch.from_numpy(x))
    keys = log.keys()
    out.sum().backward()  # the graph outlived the block: its hooks must not write any more
    assert log.keys() == keys
    assert not any("grad" in k for k in keys)


def test_nothing_leaks_between_two_recordings(net):
    first = twins.run_torch(net)
    snapshot = {k: v.copy() for k, v in first.data.items()}
    for p in net.parameters():
        p.grad = None
    second = twins.run_torch(net)
    assert second.keys() == first.keys()  # no call indices carried over
    assert not any("#" in k for k in second.keys())
    for k, v in snapshot.items():
        np.testing.assert_array_equal(first.data[k], v)
        np.testing.assert_array_equal(second.data[k], v)


@pytest.mark.parametrize("run_backward", [True, False])
def test_recorder_keeps_no_tensor_alive(net, run_backward):
    x, w = twins.inputs()
    refs: list = []
    probe = net.bn.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
    try:
        with record(net, backward=True) as log:
            out = net(torch.from_numpy(x))
            loss = (out * torch.from_numpy(w)).sum()
            refs += [weakref.ref(out), weakref.ref(loss)]
            if run_backward:
                loss.backward()
            # dropping the step's tensors frees them and the graph (the bn activation lives only
            # in the graph), although gradient hooks were put on them
            del out, loss
            gc.collect()
            assert len(refs) == 3 and all(r() is None for r in refs)
    finally:
        probe.remove()
    assert all(type(v) is np.ndarray for v in log.data.values())


def test_streaming_logger_holds_nothing_and_keeps_call_order(net, tmp_path):
    path = tmp_path / "run.npz"
    logger = ReprodLogger(stream_to=path)
    with record(net, logger, backward=True, containers=False) as log:
        assert log is logger
        x, w = twins.inputs()
        (net(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
        assert log.data == {}
    keys = logger.keys()
    logger.close()
    dump = reprod.load(path)
    assert list(dump) == keys and keys[: len(FORWARD_KEYS)] == FORWARD_KEYS
    in_memory = twins.run_torch(twins.torch_net(), containers=False)
    result = reprod.compare(in_memory.data, dump, method="max", threshold=0)
    assert result.passed, result.summary_line()


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_key_order_survives_saving(net, tmp_path, suffix):
    log = twins.run_torch(net)
    path = log.save(tmp_path / f"layers{suffix}")
    dump = reprod.load(path)
    assert list(dump) == log.keys()
    np.testing.assert_array_equal(dump["se.gate.out"], log.data["se.gate.out"])


def test_legacy_dump_loads_in_reprod_log(net, tmp_path):
    reprod_log = pytest.importorskip("reprod_log")
    log = twins.run_torch(net, backward=False)
    path = log.save(tmp_path / "layers.npy")
    helper = reprod_log.ReprodDiffHelper()
    info = helper.load_info(path)
    assert list(info) == log.keys()


def test_no_grad_with_backward_records_forward_only(net):
    with torch.no_grad(), record(net, backward=True, containers=False) as log:
        net(torch.ones(1, 3, 8, 8))
    assert log.keys() == FORWARD_KEYS


def test_layer_types(net):
    types = layer_types(net)
    assert types["<model>"] == "Net" and types["se"] == "SqueezeExcitation"
    assert types["bn"] == "BatchNorm2d" and types["se.gate"] == "Hardsigmoid"


def test_not_a_model_is_refused():
    with pytest.raises(UnsupportedValueError, match="neither a torch.nn.Module nor a paddle.nn.Layer"):
        with record(object()):
            pass
