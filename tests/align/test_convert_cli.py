"""reprod-convert: the command line over torch_to_paddle."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from align_twins import PaddleNet, TorchNet  # noqa: E402

from reprod.align import read_pdparams, torch_to_paddle  # noqa: E402
from reprod.align.cli import load_factory, main  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TWINS = os.path.join(HERE, "align_twins.py")
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture
def pth(tmp_path):
    torch.manual_seed(0)
    tm = TorchNet()
    path = tmp_path / "model.pth"
    torch.save(tm.state_dict(), path)
    return tm, str(path)


def test_convert_with_model_writes_a_pdparams_paddle_loads(pth, tmp_path, capsys) -> None:
    tm, src = pth
    dst = str(tmp_path / "model.pdparams")
    assert (
        main([src, dst, "--model", f"{TWINS}:TorchNet", "--paddle-model", f"{TWINS}:PaddleNet"])
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith(
        f"wrote {dst}: 13 tensors converted: 2 transposed (found by nn.Linear layers"
    )
    assert err == ""
    pm = PaddleNet()
    assert pm.set_state_dict(paddle.load(dst)) == ([], [])
    want = torch_to_paddle(tm.state_dict(), model=tm)
    got = read_pdparams(dst)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_convert_without_model_notes_the_heuristic(pth, tmp_path, capsys) -> None:
    _, src = pth
    assert main([src, str(tmp_path / "m.pdparams")]) == 0
    _, err = capsys.readouterr()
    assert err.startswith("reprod-convert: note: ") and "fc1.weight, head.weight" in err


def test_rules_on_the_command_line(pth, tmp_path, capsys) -> None:
    tm, src = pth
    dst = str(tmp_path / "m.pdparams")
    rc = main(
        [
            src,
            dst,
            "--model",
            f"{TWINS}:TorchNet",
            "--rename",
            r"^=net.",
            "--skip",
            r"^emb\.",
            "--no-transpose",
            r"^head\.weight$",
            "--transpose",
            r"^emb\.weight$",
        ]
    )
    assert rc == 0
    got = read_pdparams(dst)
    assert "net.emb.weight" not in got and "emb.weight" not in got  # skip wins over transpose
    assert "net.bn._variance" in got
    np.testing.assert_array_equal(got["net.head.weight"], tm.head.weight.detach().numpy())
    np.testing.assert_array_equal(got["net.fc1.weight"], tm.fc1.weight.detach().numpy().T)


def test_dry_run_shows_the_plan_and_writes_nothing(pth, tmp_path, capsys) -> None:
    _, src = pth
    dst = tmp_path / "m.pdparams"
    assert main([src, str(dst), "--model", f"{TWINS}:TorchNet", "--dry-run"]) == 0
    out, _ = capsys.readouterr()
    assert not dst.exists()
    line = next(ln for ln in out.splitlines() if ln.startswith("bn.running_var"))
    assert "bn._variance" in line and "copy" in line
    assert "nn.Linear weight" in next(ln for ln in out.splitlines() if ln.startswith("fc1.weight"))
    assert out.rstrip().endswith("(dry run, nothing written)")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}", "{dst}"], "no such file"),
        (["{src}", "{dst}", "--model", "nosuchmodule_xyz:build"], "cannot import nosuchmodule_xyz"),
        (["{src}", "{dst}", "--model", f"{TWINS}:nothing"], "has no callable 'nothing'"),
        (["{src}", "{dst}", "--model", "no_colon"], "expected MODULE:FACTORY"),
        (["{src}", "{dst}", "--rename", "nopattern"], "PATTERN=REPLACEMENT"),
        (
            ["{src}", "{dst}", "--paddle-model", f"{TWINS}:PaddleNet", "--skip", "^head"],
            "missing 2 key(s): head.weight, head.bias",
        ),
        (["{dst_existing}", "{dst}"], "is already a Paddle file"),
        (["{dst}", "{src2}"], "swap SRC and DST"),
    ],
)
def test_bad_input_exits_2_with_one_line(pth, tmp_path, capsys, args, needle) -> None:
    _, src = pth
    existing = tmp_path / "old.pdparams"
    existing.write_bytes(b"\x80\x04}\x94.")
    fill = {
        "src": src,
        "dst": str(tmp_path / "out.pdparams"),
        "missing": str(tmp_path / "nope.pth"),
        "dst_existing": str(existing),
        "src2": str(tmp_path / "x.pth"),
    }
    assert main([a.format(**fill) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    errors = [ln for ln in err.splitlines() if not ln.startswith("reprod-convert: note: ")]
    assert len(errors) == 1 and errors[0].startswith("reprod-convert: error: ")
    assert needle in errors[0]
    assert not (tmp_path / "out.pdparams").exists()


def test_load_factory_accepts_module_paths(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_models_for_cli.py").write_text("def build():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_factory("my_models_for_cli:build")() == 42


def test_runs_as_a_program(pth, tmp_path) -> None:
    _, src = pth
    dst = tmp_path / "m.pdparams"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "reprod.align.cli",
            src,
            str(dst),
            "--model",
            f"{TWINS}:TorchNet",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert dst.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "reprod.align.cli", str(dst), str(tmp_path / "o.pdparams")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "is already a Paddle file" in bad.stderr
