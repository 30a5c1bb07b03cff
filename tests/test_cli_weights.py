"""reprod-diff on weight files: a torch .pth against a paddle .pdparams, through the conversion rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "reprod", *args], capture_output=True, text=True, env=env)


def test_pth_against_converted_pdparams(tmp_path: Path) -> None:
    from reprod.align import torch_to_paddle
    from reprod.storage.framework_files import write_pdparams

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    weights = torch_to_paddle(str(tmp_path / "m.pth"), model=model)
    write_pdparams(str(tmp_path / "ok.pdparams"), weights)
    proc = _run(str(tmp_path / "m.pth"), str(tmp_path / "ok.pdparams"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 keys compared, 6 passed" in proc.stdout
    # a linear weight that was not transposed is a shape verdict naming the transpose
    bad = dict(weights)
    bad["0.weight"] = np.ascontiguousarray(weights["0.weight"].T)
    write_pdparams(str(tmp_path / "bad.pdparams"), bad)
    proc = _run(str(tmp_path / "m.pth"), str(tmp_path / "bad.pdparams"), "--first")
    assert proc.returncode == 1
    assert "0.weight" in proc.stdout and "transpose" in proc.stdout
