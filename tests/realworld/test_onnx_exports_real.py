"""torchvision's models against their own ONNX exports, run by onnxruntime, through
``reprod.align.align_onnx`` (collected only where torchvision and paddle import, see
conftest.py; skipped where onnxruntime or onnxscript is not installed). Seeded random weights,
every BatchNorm's statistics and affine and every LayerNorm's affine perturbed.

Porter 11 exported resnet18, mobilenet_v3_small, efficientnet_b0, regnet_y_400mf,
squeezenet1_0 and small ViT, Swin and ConvNeXt configs with both exporters and found, before the
fixes these tests hold:

- resnet18 and squeezenet1_0 "diverge" at 1e-5 on faithful exports: onnxruntime's float32
  convolutions round otherwise than torch's, 1.1e-5 on values of 6-10. Judged against the
  float64 twin's noise they pass, and a 1% weight bug still fails.
- The TorchScript exporter's default export folds each BatchNorm into its convolution and
  names the node after the convolution: a bug in ``layer2.0.conv1`` was blamed on
  ``layer2.0``'s own forward code. Given the model, the folded output is the BatchNorm's.
- ViT's ``MultiheadAttention`` is recorded by torch under ``.in[0..2]``/``.out`` and seen
  by the graph as one tensor in and out: a Softmax axis bug was blamed on the encoder block.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None:
    pytest.skip("onnxruntime and onnxscript are not installed here", allow_module_level=True)

import onnx  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from reprod.align import align_onnx  # noqa: E402


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) * 0.5 + 0.75)
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) * 0.5 + 0.75)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.1)
    return model.eval()


def build(name: str):
    torch.manual_seed(0)
    if name == "resnet18":
        model, size = torchvision.models.resnet18(), 64
    elif name == "squeezenet1_0":
        model, size = torchvision.models.squeezenet1_0(), 96
    else:  # a small ViT: two encoder blocks, torch's MultiheadAttention in each
        model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2,
                                                     num_heads=2, hidden_dim=64, mlp_dim=128)
        size = 64
    model = randomised(model)
    torch.manual_seed(123)
    return model, torch.randn(1, 3, size, size)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_real")
    cache: dict = {}

    def get(name: str, exporter: str):
        if (name, exporter) not in cache:
            model, x = build(name)
            path = out / f"{name}.{exporter}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), dynamo=exporter == "dynamo")
            cache[name, exporter] = (model, x, path)
        return cache[name, exporter]

    return get


def scaled(path, pick, factor: float = 1.01) -> onnx.ModelProto:
    """The graph with one weight initializer scaled: the one ``pick(proto)`` names."""
    proto = onnx.load(str(path))
    name = pick(proto)
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            array = numpy_helper.to_array(init) * np.float32(factor)
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            return proto
    raise AssertionError(name)


@pytest.mark.parametrize("model", ["resnet18", "squeezenet1_0"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_faithful_export_passes_on_noise_where_1e_5_fails_it(exported, model, exporter):
    net, x, path = exported(model, exporter)
    plain = align_onnx(net, path, x, calibrate=False, threshold=1e-5)
    assert not plain.passed  # onnxruntime's rounding, 1e-6 relative
    worst = max(r.max_abs for r in plain if not r.passed)
    assert worst < 3e-5
    calibrated = align_onnx(net, path, x)
    assert calibrated.passed, calibrated.options.get("findings")
    assert calibrated.options["noise_multiple"]["onnx"]["multiple"] < 20


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_bug_in_a_folded_convolution_is_named_with_its_batchnorm(exported, exporter):
    net, x, path = exported("resnet18", exporter)

    def conv1_weight(proto):  # TorchScript renames a folded weight: take the node's input
        for node in proto.graph.node:
            meta = {p.key: p.value for p in node.metadata_props}
            scopes = meta.get("pkg.torch.onnx.name_scopes", "")
            if node.op_type == "Conv" and (node.name == "/layer2/layer2.0/conv1/Conv"
                                           or "'layer2.0.bn1'" in scopes):
                return node.input[1]
        raise AssertionError("no layer2.0.conv1")

    r = align_onnx(net, scaled(path, conv1_weight), x)
    assert not r.passed
    assert r.options["divergence"]["layer"] == "layer2.0.bn1"
    assert r.options["findings"][0].endswith(
        "the graph computes it fused with layer2.0.conv1 (Conv2d), whose output it does not "
        "hold: the difference is in either")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_bug_inside_multihead_attention_is_named_at_it(exported, exporter):
    net, x, path = exported("vit", exporter)
    proto = onnx.load(str(path))
    (softmax,) = [n for n in proto.graph.node if n.op_type == "Softmax"][:1]
    del softmax.attribute[:]
    softmax.attribute.append(onnx.helper.make_attribute("axis", -2))
    r = align_onnx(net, proto, x)
    assert r.options["divergence"]["layer"] == "encoder.layers.encoder_layer_0.self_attention"
    assert "input aligned" in r.options["divergence"]["message"]
    assert align_onnx(net, path, x).passed


def test_a_weight_bug_in_a_late_block_is_named_at_its_layer(exported):
    net, x, path = exported("vit", "dynamo")

    def mlp3_weight(proto):  # dynamo stores a Linear's weight transposed, under a name of its own
        inits = {i.name for i in proto.graph.initializer}
        made_by = {o: n for n in proto.graph.node for o in n.output}
        for node in proto.graph.node:
            meta = {p.key: p.value for p in node.metadata_props}
            if node.op_type in ("MatMul", "Gemm") and "'encoder.layers.encoder_layer_1.mlp.3'" \
                    in meta.get("pkg.torch.onnx.name_scopes", ""):
                weight = node.input[1]
                if weight not in inits:
                    weight = made_by[weight].input[0]
                return weight
        raise AssertionError("no mlp.3")

    r = align_onnx(net, scaled(path, mlp3_weight), x)
    assert r.options["divergence"]["layer"] == "encoder.layers.encoder_layer_1.mlp.3"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Hugging Face's BERT, two small layers, LayerNorms perturbed, a padded second row."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=gen) * 0.4 - 0.2)
    ids = torch.randint(0, 100, (2, 16), generator=gen)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    out = tmp_path_factory.mktemp("bert")
    paths = {}
    for exporter in ("dynamo", "torchscript"):
        paths[exporter] = out / f"bert.{exporter}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids, mask), str(paths[exporter]),
                              dynamo=exporter == "dynamo")
    return model, (ids, mask), paths


def _in_layer(node, layer: str, torchscript: str) -> bool:
    """Whether dynamo's labels or TorchScript's node name (``torchscript``, its scope path)
    put ``node`` in ``layer``."""
    meta = {p.key: p.value for p in node.metadata_props}
    return f"'{layer}'" in meta.get("pkg.torch.onnx.name_scopes", "") or \
        node.name.startswith(torchscript)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_bert_export_pairs_its_layers_and_names_a_bug_at_its_layer(bert, exporter):
    """BERT's layers are called with keywords (``input_ids=``) and return ``ModelOutput``
    dicts and tuples: torch records ``.in[input_ids]``, ``.out[last_hidden_state]``,
    ``.out`` (a ``(hidden,)`` tuple), the graph one tensor each. Before pair_onnx paired them, the faithful export
    failed on four keys the graph alone had."""
    model, inputs, paths = bert
    faithful = align_onnx(model, paths[exporter], inputs)
    assert faithful.passed, faithful.options.get("findings")
    keys = {r.key for r in faithful}
    assert {"embeddings.in[input_ids]", "encoder.out[last_hidden_state]",
            "encoder.layer.1.out", "<model>.out[pooler_output]"} <= keys
    assert len(keys) > 60

    proto = onnx.load(str(paths[exporter]))
    (gelu,) = [n for n in proto.graph.node if n.op_type == "Gelu"
               and _in_layer(n, "encoder.layer.1.intermediate.intermediate_act_fn",
                             "/encoder/layer.1/intermediate/intermediate_act_fn/")]
    del gelu.attribute[:]
    gelu.attribute.append(onnx.helper.make_attribute("approximate", "tanh"))
    r = align_onnx(model, proto, inputs)
    assert r.options["divergence"]["layer"] == "encoder.layer.1.intermediate.intermediate_act_fn"
    assert "input aligned" in r.options["divergence"]["message"]
