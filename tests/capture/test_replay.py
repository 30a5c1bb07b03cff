"""reprod.capture.replay: every port layer run alone on the reference's recorded inputs."""

from __future__ import annotations

import copy

import capture_twins as tw
import numpy as np
import pytest

from reprod.capture import first_divergence, record, replay

torch = pytest.importorskip("torch")

TIGHT = {"method": "max", "threshold": 1e-6}  # torch against torch: same inputs, same kernels
PORT = {"method": "max", "threshold": 1e-5}  # paddle against torch: kernels differ in rounding


@pytest.fixture(scope="module")
def reference():
    net = tw.torch_net()
    return net, tw.run_torch(net, backward=False)


def _failed(result):
    return sorted(k.key for k in result.failed)


def _torch_two_bugs(net):
    port = copy.deepcopy(net)
    port.bn.eps = 1e-3  # wrong epsilon, early
    port.act2 = torch.nn.Hardsigmoid()  # wrong activation, near the head
    return port


def test_correct_torch_port_passes_every_layer(reference):
    net, ref = reference
    result = replay(copy.deepcopy(net), ref, **TIGHT)
    assert result.passed, result.to_table(failed_only=True)
    keys = result.keys()
    # one key per leaf layer output, in call order, no container
    assert keys[:3] == ["conv.out", "bn.out", "act.out"]
    assert "res.out" in keys and "head.out" in keys
    assert "se.out" not in keys and "<model>.out" not in keys
    assert all(k.endswith(".out") for k in keys)
    assert result.options["replay_skipped"] == []
    assert first_divergence(result) is None


def test_two_bugs_found_independently_torch(reference):
    net, ref = reference
    port = _torch_two_bugs(net)
    result = replay(port, ref, **TIGHT)
    assert _failed(result) == ["act2.out", "bn.out"]
    div = first_divergence(result)
    assert div is not None and div.layer == "bn"

    # the plain forward comparison stops at the first one
    with record(port) as log:
        port(torch.from_numpy(tw.inputs()[0]))
    plain = first_divergence(__import__("reprod").compare(ref.data, log.data, **TIGHT))
    assert plain is not None and plain.layer == "bn"


def test_paddle_port_against_torch_reference(reference):
    paddle = pytest.importorskip("paddle")
    net, ref = reference
    good = tw.paddle_net()
    tw.copy_weights(net, good)
    result = replay(good, ref, **PORT)
    assert result.passed, result.to_table(failed_only=True)
    assert len(result) >= 14

    bad = tw.paddle_net("bn_eps")
    tw.copy_weights(net, bad)
    bad.act2 = paddle.nn.Hardsigmoid()
    result = replay(bad, ref.data, **PORT)
    assert _failed(result) == ["act2.out", "bn.out"]
    # each of the twins' bugs is found on its own layer, and nowhere else
    for bug in ("hardsigmoid", "linear_not_transposed", "no_residual"):
        port = tw.paddle_net(bug)
        tw.copy_weights(net, port, bug=bug)
        assert _failed(replay(port, ref, **PORT)) == [f"{tw.BUG_LAYER[bug]}.out"], bug


def test_paddle_reference_from_a_saved_dump(reference, tmp_path):
    pytest.importorskip("paddle")
    net, ref = reference
    path = tmp_path / "torch_layers.npz"
    ref.save(str(path))
    port = tw.paddle_net("bn_eps")
    tw.copy_weights(net, port)
    assert _failed(replay(port, path, **PORT)) == ["bn.out"]


def test_noise_calibration_passes_through(reference):
    net, ref = reference
    net64 = copy.deepcopy(net).double()
    x = torch.from_numpy(tw.inputs()[0]).double()
    with record(net64) as hi:
        net64(x)
    result = replay(_torch_two_bugs(net), ref, noise=hi.data)
    assert result.options.get("noise")
    assert _failed(result) == ["act2.out", "bn.out"]


class _Renamed(torch.nn.Module):
    """The twin's layers under other names, registered in call order."""

    def __init__(self, net) -> None:
        super().__init__()
        net = copy.deepcopy(net)
        self.stem = net.conv
        self.norm = net.bn
        self.a1 = net.act
        self.squeeze = net.se
        self.stem2 = net.conv2
        self.norm2 = net.bn2
        self.add = net.res
        self.gap = net.pool
        self.flat = net.flatten
        self.dense = net.fc
        self.a2 = net.act2
        self.cls = net.head


RULES = {"stem": "conv", "norm": "bn", "a1": "act", "squeeze": "se", "stem2": "conv2",
         "norm2": "bn2", "add": "res", "gap": "pool", "flat": "flatten", "dense": "fc",
         "a2": "act2", "cls": "head"}


def test_rename_and_by_order_pairing(reference):
    net, ref = reference
    port = _Renamed(net)
    port.norm2.eps = 1e-2  # one bug, so that a wrong pairing would show
    expected = ["bn2.out"]
    by_rules = replay(port, ref, rename=RULES, **TIGHT)
    assert _failed(by_rules) == expected
    assert "se.fc1.out" in by_rules.keys()  # a dict entry renames what lies under it
    by_order = replay(port, ref, by_order=True, **TIGHT)
    assert _failed(by_order) == expected
    assert by_order.keys() == by_rules.keys()
    # without a map nothing pairs: every port layer is skipped with the reason, and each one
    # holding weights fails (they are checked nowhere), in the port's call order
    none = replay(port, ref, **TIGHT)
    reasons = {s["layer"]: s["reason"] for s in none.options["replay_skipped"]}
    assert "no output of stem" in reasons["stem"]
    weighted = [n for n, m in port.named_modules()
                if n and not list(m.children()) and list(m.parameters(recurse=False))]
    assert none.keys() == [f"{n}.out" for n in weighted] and len(weighted) >= 4
    assert {k.status for k in none} == {"error"} and not none.passed
    assert "stem (Conv2d, " in none["stem.out"].reason


def test_include_exclude_and_repeated_calls():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.act = torch.nn.Tanh()

        def forward(self, x):
            return self.act(self.lin(self.act(self.lin(x))))

    torch.manual_seed(0)
    net = Twice().eval()
    with record(net) as ref:
        net(torch.randn(3, 4))
    result = replay(copy.deepcopy(net), ref, **TIGHT)
    assert result.passed
    assert {"lin.out", "lin#2.out", "act.out", "act#2.out"} <= set(result.keys())
    only = replay(copy.deepcopy(net), ref, include="lin", **TIGHT)
    assert only.keys() == ["lin.out", "lin#2.out"]
    assert replay(copy.deepcopy(net), ref, exclude="lin", **TIGHT).keys() == ["act.out", "act#2.out"]


def test_non_tensor_input_and_dropout_skipped_with_reason():
    class Scale(torch.nn.Module):
        def forward(self, x, factor):
            return x * factor

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.scale = Scale()
            self.drop = torch.nn.Dropout(0.5)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.drop(self.scale(self.lin(x), 2.0)))

    torch.manual_seed(0)
    net = Net().eval()
    with record(net) as ref:
        net(torch.randn(3, 4))
    result = replay(net, ref, **TIGHT)
    assert result.passed and result.keys() == ["lin.out", "drop.out", "out.out"]
    (skip,) = result.options["replay_skipped"]
    assert skip["layer"] == "scale" and "factor is not a tensor" in skip["reason"]

    net.train()  # dropout in training mode is random: skipped, not failed
    result = replay(net, ref, **TIGHT)
    reasons = {s["layer"]: s["reason"] for s in result.options["replay_skipped"]}
    assert "training mode" in reasons["drop"]
    assert result.passed


def test_batchnorm_in_training_mode_keeps_its_statistics(reference):
    net, ref = reference
    port = copy.deepcopy(net).train()
    before = port.bn.running_mean.clone()
    replay(port, ref, **TIGHT)
    assert torch.equal(port.bn.running_mean, before)
    assert np.isfinite(before.numpy()).all()


def test_paddle_only_run_does_not_import_torch(tmp_path):
    pytest.importorskip("paddle")
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    code = (
        f"import sys; sys.path.insert(0, {str(here)!r})\n"
        "import capture_twins as tw\n"
        "from reprod.capture import replay\n"
        "net = tw.paddle_net()\n"
        "ref = tw.run_paddle(net, backward=False)\n"
        "r = replay(net, ref, method='max', threshold=1e-6)\n"
        "assert r.passed, r.to_table()\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_containers_find_a_bug_in_a_container_own_code(reference):
    pytest.importorskip("paddle")
    net, ref = reference
    port = tw.paddle_net("se_add")  # x + scale for x * scale, between recorded leaf layers
    tw.copy_weights(net, port)
    assert replay(port, ref, **PORT).passed  # every leaf is right
    result = replay(port, ref, containers=True, **PORT)
    assert _failed(result) == ["<model>.out", "se.out"]
    assert first_divergence(result).layer == "se"


def test_a_block_returning_its_tensor_in_a_tuple_is_compared_as_the_capture_names_it():
    """A Hugging Face layer returns ``(hidden,)`` where a port's returns ``hidden``; the capture
    names both ``<layer>.out``. Replay named the tuple's ``out[0]``, so the block was compared
    with nothing (the reference's key missing, the port's extra)."""

    class Block(torch.nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.fc, self.wrap = torch.nn.Linear(4, 4), wrap

        def forward(self, x):
            y = self.fc(x) + x
            return (y,) if self.wrap else y

    class Net(torch.nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.block = Block(wrap)

        def forward(self, x):
            out = self.block(x)
            return out[0] if isinstance(out, tuple) else out

    torch.manual_seed(0)
    ref_net = Net(wrap=True)
    with record(ref_net, containers=True) as ref:
        ref_net(torch.randn(3, 4))
    assert "block.out" in ref.data and "block.out[0]" not in ref.data
    port = Net(wrap=False)
    port.load_state_dict(ref_net.state_dict())
    result = replay(port, ref, containers=True, **TIGHT)
    assert {k.key for k in result.results} == {"block.fc.out", "block.out", "<model>.out"}
    assert result.passed and result["block.out"].status == "passed"
    # and the other way round: the port returning the tuple
    with record(port, containers=True) as plain:
        port(torch.randn(3, 4))
    assert replay(ref_net, plain, containers=True, **TIGHT)["block.out"].status == "passed"
