"""X2Paddle's ports, the route of the seed article (PyTorch -> ONNX -> Paddle): torchvision's
resnet18 and mobilenet_v3_small against the code X2Paddle 1.6.0 generated for them
(tests/realworld/x2paddle/), a port no one here wrote. The converter folds every BatchNorm into
its convolution, applies Hardswish as functions, and in ResNet calls each stage's downsample
before the main branch. Paired by call order and shapes alone, a faithful resnet18 port failed
at layer2.0.downsample.0 and every later bug was blamed there; the pairing now reads which call
is which from the values.

Which torch layer each generated layer came from is written in X2Paddle's variable names
(``x2paddle__layer2_layer2_0_downsample_downsample_0_Conv_output_0 = self.conv6(...)``): the
pairing is checked against that, and the port's weights are the torch model's with the
BatchNorms folded in (float64), as the converter folds them."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import randomize  # noqa: E402

import reprod  # noqa: E402
from reprod.align import align_forward  # noqa: E402
from reprod.capture import first_divergence, layer_types, match_by_order, record  # noqa: E402
from reprod.capture.naming import pair_layer_calls  # noqa: E402

HERE = Path(__file__).parent / "x2paddle"
SIZE = 64
_CALL = re.compile(r"x2paddle__(\w+?)_(Conv|Relu)_output_0 = self\.(\w+)\(")


def _encoded(name: str) -> str:
    """A torch layer name as X2Paddle spells its ONNX scope: ``layer2.0.downsample.0`` ->
    ``layer2_layer2_0_downsample_downsample_0``."""
    parts: list[str] = []
    last = ""
    for p in name.split("."):
        last = f"{last}_{p}" if p.isdigit() else p
        parts.append(last)
    return "_".join(parts)


def _subject(scope: str, by_scope: dict[str, str]) -> str:
    """The torch layer call an ONNX scope names: TorchScript writes a layer's second call
    ``relu_1`` (``layer1.0.relu#2`` in a capture)."""
    if scope in by_scope:
        return by_scope[scope]
    base, _, n = scope.rpartition("_")
    return f"{by_scope[base]}#{int(n) + 1}"


def _torch_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    return randomize(model, 0).eval()


def _source(name: str, patch: tuple[str, str] | None = None) -> str:
    src = (HERE / f"{name}_onnx.py").read_text()
    if patch is not None:
        assert src.count(patch[0]) == 1, patch[0]
        src = src.replace(*patch)
    return src


def _port(name: str, tm: torch.nn.Module, patch: tuple[str, str] | None = None
          ) -> tuple[paddle.nn.Layer, dict[str, str]]:
    """The generated model with ``tm``'s weights, BatchNorms folded in; and port layer ->
    the torch layer X2Paddle made it from."""
    src = _source(name, patch)
    mod_name = f"_x2p_{name}_{abs(hash(src))}"
    spec = importlib.util.spec_from_loader(mod_name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(src, str(HERE / f"{name}_onnx.py"), "exec"), module.__dict__)
    sys.modules[mod_name] = module
    # the generated code names its head parameters (attr='x2paddle_fc_weight'), which Paddle
    # takes once per name scope: each port is built in its own
    with paddle.utils.unique_name.guard():
        port = module.ONNXModel()
    port.eval()
    named = dict(tm.named_modules())
    by_scope = {_encoded(n): n for n in named if n}
    order = list(named)
    made_from = {layer: _subject(scope, by_scope) for scope, _, layer in _CALL.findall(src)}
    state = {}
    for layer, torch_name in made_from.items():
        conv = named.get(torch_name)
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        w = conv.weight.detach().double().numpy()
        b = (np.zeros(w.shape[0]) if conv.bias is None else conv.bias.detach().double().numpy())
        after = named[order[order.index(torch_name) + 1]]
        if isinstance(after, torch.nn.BatchNorm2d):
            scale = after.weight.detach().double().numpy() / np.sqrt(
                after.running_var.double().numpy() + after.eps)
            w = w * scale[:, None, None, None]
            b = (b - after.running_mean.double().numpy()) * scale + after.bias.detach().double().numpy()
        state[f"{layer}.weight"] = w.astype("float32")
        state[f"{layer}.bias"] = b.astype("float32")
    for pname, _ in port.named_parameters():
        if pname.startswith("x2paddle_"):  # the Linear heads, as matmul on parameters
            torch_param = pname[len("x2paddle_"):].rpartition("_")
            state[pname] = named[torch_param[0].replace("_", ".")].get_parameter(
                torch_param[2]).detach().numpy()
    missing = {n for n, _ in port.named_parameters()} - set(state)
    assert not missing, missing
    port.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    return port, made_from


def _captures(tm, port, x):
    with torch.no_grad(), record(tm) as ref:
        tm(torch.from_numpy(x))
    twin = copy.deepcopy(tm).double()
    with torch.no_grad(), record(twin) as noise:
        twin(torch.from_numpy(x).double())
    with paddle.no_grad(), record(port) as got:
        port(paddle.to_tensor(x))
    return ref.data, got.data, noise.data


def _input() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype("float32")


def _divergence(tm, port, x):
    ref, got, noise = _captures(tm, port, x)
    result = reprod.compare(*match_by_order(ref, got), noise=noise, method="max", threshold=1e-5)
    return result, first_divergence(result, layer_types={**layer_types(tm), **layer_types(port)})


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small"])
def test_a_faithful_x2paddle_port_pairs_each_layer_with_the_one_it_was_made_from(model):
    tm = _torch_model(model)
    port, made_from = _port(model, tm)
    x = _input()
    ref, got, _ = _captures(tm, port, x)
    pairs = pair_layer_calls(ref, got)
    wrong = {p: (pairs.get(p), t) for p, t in made_from.items() if pairs.get(p) != t}
    # resnet18: the downsample called before relu and conv2 once paired conv7 with
    # layer2.1.bn1 and relu6 with layer2.0.relu#2 (crossing over)
    assert not wrong, wrong
    result, div = _divergence(tm, port, x)
    assert result.passed, (div.message if div else result.summary_line())


def test_resnet18_a_faithful_port_passes_align_forward():
    tm = _torch_model("resnet18")
    port, _ = _port("resnet18", tm)
    r = align_forward(tm, port, _input(), by_order=True, calibrate=True)
    assert r.passed, r.options.get("findings")


def test_resnet18_a_weight_bug_after_the_first_downsample_is_named_at_its_folded_layer():
    tm = _torch_model("resnet18")
    port, _ = _port("resnet18", tm)
    with paddle.no_grad():
        port.conv8.weight.set_value(port.conv8.weight * 1.01)  # layer2.1.conv1 + bn1
    _, div = _divergence(tm, port, _input())
    # it was "diverges at layer2.0.downsample.0 (Conv2d)", for every bug after layer1
    assert div is not None and div.layer == "layer2.1.bn1" and div.folded == "layer2.1.conv1", div
    assert div.message.startswith(
        "diverges at layer2.1.conv1 (Conv2d) + layer2.1.bn1 (BatchNorm2d), one layer in the "
        "port: input aligned"), div.message
    r = align_forward(tm, port, _input(), by_order=True, calibrate=True)
    assert not r.passed
    found = r.options["divergence"]
    assert found["layer"] == "layer2.1.bn1" and found["port_layer"] == "conv8", found
    # the port's conv weight is the folded one: no "its own parameter differs" hint
    assert found.get("hint") is None, found


def test_resnet18_an_activation_bug_in_the_third_stage_is_named_there():
    tm = _torch_model("resnet18")
    port, _ = _port("resnet18", tm)
    port.relu11 = paddle.nn.LeakyReLU(0.1)  # layer3.1.relu
    _, div = _divergence(tm, port, _input())
    assert div is not None and div.layer == "layer3.1.relu", div
    assert div.input_aligned, div.message


def test_mobilenet_a_bug_in_a_hardswish_the_port_applies_as_a_function_is_named_there():
    tm = _torch_model("mobilenet_v3_small")
    bug = ("x2paddle__features_features_6_block_block_0_block_0_2_Mul_output_0 = paddle.multiply("
           "x=x2paddle__features_features_6_block_block_0_block_0_0_Conv_output_0, "
           "y=x2paddle__features_features_6_block_block_0_block_0_2_HardSigmoid_output_0)",
           "x2paddle__features_features_6_block_block_0_block_0_2_Mul_output_0 = paddle.nn."
           "functional.relu(x2paddle__features_features_6_block_block_0_block_0_0_Conv_output_0)")
    port, _ = _port("mobilenet_v3_small", tm, bug)
    _, div = _divergence(tm, port, _input())
    # paired by order alone, the port's next convolution took the Hardswish's place, and the
    # bug was "before features.6.block.1.0, outside the recorded layers"
    assert div is not None and div.layer == "features.6.block.0.2", div
    assert div.input_aligned, div.message


def test_mobilenet_a_weight_bug_in_a_folded_depthwise_conv_is_named_there():
    tm = _torch_model("mobilenet_v3_small")
    port, made_from = _port("mobilenet_v3_small", tm)
    assert made_from["conv22"] == "features.6.block.1.0"
    with paddle.no_grad():
        port.conv22.weight.set_value(port.conv22.weight * 1.01)
    _, div = _divergence(tm, port, _input())
    assert div is not None and (div.folded, div.layer) == (
        "features.6.block.1.0", "features.6.block.1.1"), div
    assert div.input_aligned, div.message
