"""reprod-diff --first on two layer-by-layer captures names the layer where the models part ways."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("paddle")

import capture_twins as ct  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_first_names_the_diverging_layer(tmp_path: Path) -> None:
    tm = ct.torch_net()
    pm = ct.paddle_net(bug="bn_eps")
    ct.copy_weights(tm, pm, bug="bn_eps")
    ref = ct.run_torch(tm, backward=False)
    other = ct.run_paddle(pm, backward=False)
    ref.save(str(tmp_path / "torch.npz"))
    other.save(str(tmp_path / "paddle.npz"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "reprod", str(tmp_path / "torch.npz"), str(tmp_path / "paddle.npz"),
         "--method", "max", "--threshold", "1e-5", "--first"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    first_line = proc.stdout.splitlines()[0]
    assert first_line.startswith("diverges at bn"), proc.stdout
    assert "input aligned" in first_line
