"""``reprod-convert --by-order --inputs``: pairing by the order layers run, from the command line
(``reprod.align.call_order``; ``test_call_order.py`` holds the Python side)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import read_pdparams  # noqa: E402
from reprod.align.cli import main  # noqa: E402

MODELS = '''
import torch, paddle


class Ref(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x, scale=None):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.b(x), self.c(x)], 1).mean((2, 3))
        return self.head(y if scale is None else y * scale)


class Port(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv0 = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.br3 = paddle.nn.Conv2D(8, 8, 1)   # defined before br2, called after it
        self.br2 = paddle.nn.Conv2D(8, 8, 1)
        self.fc = paddle.nn.Linear(16, 5)

    def forward(self, x, scale=None):
        x = paddle.nn.functional.relu(self.conv0(x))
        y = paddle.concat([self.br2(x), self.br3(x)], 1).mean((2, 3))
        return self.fc(y if scale is None else y * scale)
'''
X = np.random.RandomState(0).randn(2, 3, 8, 8).astype("float32")


@pytest.fixture
def files(tmp_path):
    models = tmp_path / "cli_call_order_models.py"
    models.write_text(MODELS)
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_call_order_models", models)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tm = mod.Ref()
    src = tmp_path / "model.pth"
    torch.save(tm.state_dict(), src)
    np.save(tmp_path / "x.npy", X)
    np.savez(tmp_path / "pos.npz", X)
    np.savez(tmp_path / "kw.npz", x=X, scale=np.float32(2.0) * np.ones((1, 16), np.float32))
    return tm, str(models), str(src), tmp_path


@pytest.mark.parametrize("inputs", ["x.npy", "pos.npz", "kw.npz"])
def test_inputs_pair_by_the_order_layers_run(files, inputs, capsys):
    tm, models, src, tmp = files
    dst = str(tmp / "model.pdparams")
    rc = main([src, dst, "--by-order", "--model", f"{models}:Ref",
               "--paddle-model", f"{models}:Port", "--inputs", str(tmp / inputs), "-q"])
    assert rc == 0, capsys.readouterr().err
    got = read_pdparams(dst)
    np.testing.assert_array_equal(got["br2.weight"], tm.b.weight.detach().numpy())
    np.testing.assert_array_equal(got["br3.weight"], tm.c.weight.detach().numpy())
    # by definition order, as before: crossed
    rc = main([src, dst, "--by-order", "--paddle-model", f"{models}:Port", "-q"])
    assert rc == 0
    np.testing.assert_array_equal(read_pdparams(dst)["br3.weight"], tm.b.weight.detach().numpy())


@pytest.mark.parametrize("extra, needle", [
    (["--inputs", "{tmp}/x.npy"], "--inputs pairs by call order: it needs --by-order"),
    (["--by-order", "--paddle-model", "{models}:Port", "--inputs", "{tmp}/x.npy"],
     "--inputs runs the models: it needs --model"),
    (["--by-order", "--model", "{models}:Ref", "--paddle-model", "{models}:Port",
      "--inputs", "{tmp}/nope.npy"], "nope.npy: cannot be read"),
    (["--by-order", "--model", "{models}:Ref", "--paddle-model", "{models}:Port",
      "--inputs", "{tmp}/bad.npy"], "bad.npy: cannot be read"),
    (["--by-order", "--model", "{models}:Ref", "--paddle-model", "{models}:Port",
      "--inputs", "{tmp}/wrong.npy"], "running the models on the inputs failed"),
])
def test_bad_inputs_exit_2_with_one_line(files, capsys, extra, needle):
    _, models, src, tmp = files
    (tmp / "bad.npy").write_bytes(b"not an array")
    np.save(tmp / "wrong.npy", np.zeros((2, 5, 8, 8), np.float32))
    dst = tmp / "out.pdparams"
    args = [src, str(dst), *[a.format(tmp=tmp, models=models) for a in extra]]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert out == "" and len(lines) == 1 and lines[0].startswith("reprod-convert: error: "), err
    assert needle in lines[0], lines[0]
    assert not os.path.exists(dst)
