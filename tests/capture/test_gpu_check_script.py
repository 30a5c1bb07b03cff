"""benchmarks/gpu_check.py, the checks prepared for a session lent a CUDA device, run here on the
CPU so that the script works when a device comes (and says so in one line when none is there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow
def test_the_checks_pass_on_the_cpu() -> None:
    p = _run("--device", "cpu", "--rounds", "1", "--batch", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(c["dtype"], c["passed"], c["wrong"]) for c in out["copies"]] == [
        ("float32", True, []), ("bfloat16", True, []), ("float32, streamed", True, [])]
    assert all(c["keys checked"] > 100 for c in out["copies"])
    assert set(out["forward ms"]) == {"plain", "hooks copy", "record", "plain + write",
                                      "record stream"}
    assert out["dump MiB"] > 1
    # Paddle has no half kernels on the CPU: the half-precision ports are said to be skipped,
    # with align_forward's one line
    assert [h["dtype"] for h in out["half ports"]] == ["float16", "bfloat16"]
    assert all(h["skipped"].startswith("align_forward: the port MobileNetV3 holds")
               and "Paddle has no float16 or bfloat16 kernels" in h["skipped"]
               for h in out["half ports"]), out["half ports"]


def test_without_a_device_it_says_so_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script runs its checks on it")
    p = _run()
    assert p.returncode == 2
    assert p.stdout.strip() == "gpu_check: no CUDA device here (torch.cuda.is_available() is False)"
