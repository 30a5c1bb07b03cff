"""``record_onnx`` and ``align_onnx`` on graphs whose weights lie in external data files (what
``torch.onnx.export`` writes for a model over 2 GiB, an LLM's export).

reprod loaded every weight into the Python proto and handed onnxruntime the graph as one
serialized message: past 2 GiB protobuf cannot make it, and a 2.1 GiB graph failed with
"onnxruntime could not run it: Failed to serialize proto", at 8 GiB of memory. The graph now
goes to onnxruntime without its weights, which it reads from their files itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from reprod.capture import record, record_onnx  # noqa: E402
from reprod.errors import ReprodError  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 64)
        self.act = torch.nn.ReLU()
        self.b = torch.nn.Linear(64, 4)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def _exported(tmp_path: Path) -> tuple[Net, np.ndarray, Path]:
    """The net, an input, and its TorchScript export saved with every weight in ``w.data``."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 16)
    inline = tmp_path / "inline.onnx"
    torch.onnx.export(model, (x,), str(inline), dynamo=False)
    folder = tmp_path / "export"
    folder.mkdir()
    proto = onnx.load(str(inline))
    onnx.save(proto, str(folder / "net.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    return model, x.numpy(), folder / "net.onnx"


def test_a_graph_with_external_data_is_captured_from_any_working_directory(tmp_path,
                                                                           monkeypatch):
    model, x, path = _exported(tmp_path)
    with record(model) as ref:
        with torch.no_grad():
            model(torch.from_numpy(x))
    monkeypatch.chdir(tmp_path)  # not the graph's folder: its data is found beside it anyway
    # onnx's loader of external data is never called: the weights stay out of Python
    monkeypatch.setattr(onnx, "load_external_data_for_model", _never)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", _never)
    got = record_onnx(str(path), x, torch_model=model).data
    assert {"a.out", "act.out", "b.out"} <= set(got)
    for key in ("a.out", "act.out", "b.out"):
        np.testing.assert_allclose(got[key], ref.data[key], rtol=1e-5, atol=1e-6)


def _never(*args, **kwargs):
    raise AssertionError("external data loaded into Python")


def test_align_onnx_reads_external_data_too(tmp_path):
    from reprod.align import align_onnx

    model, x, path = _exported(tmp_path)
    r = align_onnx(model, str(path), x, calibrate=True)
    assert r.passed and r["logits"].passed
    assert {"a.out", "b.out"} <= {k.key for k in r}  # its layers were judged too


def test_missing_external_data_is_a_one_line_error_naming_the_graph(tmp_path):
    model, x, path = _exported(tmp_path)
    os.remove(path.parent / "w.data")
    with pytest.raises(ReprodError) as e:
        record_onnx(str(path), x)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{path}: onnxruntime could not run it")


def test_a_graph_over_2_gib_is_captured(tmp_path):
    """Two MatMuls holding 2.1 GiB of weights in a sparse file (no disk written): before, the
    graph could not be serialized for onnxruntime at all."""
    n = 28_000_000  # 16 x n + n x 4 float32: 2.09 GiB
    folder = tmp_path / "big"
    folder.mkdir()
    data = folder / "g.data"
    w1_bytes, w2_bytes = 16 * n * 4, n * 4 * 4
    with open(data, "wb") as f:
        f.truncate(w1_bytes + w2_bytes)  # zeros, sparse
    rng = np.random.default_rng(0)
    k = 512  # the only weights that are not 0: w1[:, :k] and w2[:k, :]
    head1 = rng.standard_normal((16, k)).astype(np.float32)
    head2 = rng.standard_normal((k, 4)).astype(np.float32)
    mm = np.memmap(data, np.float32, mode="r+", shape=(16 * n + 4 * n,))
    for row in range(16):
        mm[row * n:row * n + k] = head1[row]
    mm[16 * n:16 * n + 4 * k] = head2.ravel()
    mm.flush()
    del mm

    def external(name: str, dims: list[int], offset: int, length: int) -> TensorProto:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "g.data"), ("offset", str(offset)),
                           ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/a/MatMul"),
             helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="/b/MatMul")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [external("w1", [16, n], 0, w1_bytes), external("w2", [n, 4], w1_bytes, w2_bytes)])
    path = folder / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((2, 16)).astype(np.float32)
    try:
        got = record_onnx(str(path), x).data
        h = np.maximum(x @ head1, 0)
        np.testing.assert_allclose(got["a.out"][:, :k], x @ head1, rtol=1e-5, atol=1e-5)
        assert not got["a.out"][:, k:].any()
        np.testing.assert_allclose(got["<model>.out"], h @ head2, rtol=1e-4, atol=1e-4)
        del got
        # the same graph given as a proto holding its weights: what to do instead, in one line
        proto = onnx.load(str(path))
        with pytest.raises(ReprodError) as e:
            record_onnx(proto, x)
        assert str(e.value) == (
            "<onnx model>: the graph holds its weights in itself, 2.1 GiB, past the 2 GiB "
            "protobuf can hand to onnxruntime: save it with its weights as external data "
            "(onnx.save(model, path, save_as_external_data=True)) and pass the path")
    finally:
        data.unlink()
