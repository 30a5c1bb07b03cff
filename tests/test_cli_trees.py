"""reprod-diff on folders with --jobs (a local process pool) and --scheduler (a Dask cluster):
the same report as the serial run; an unreachable scheduler is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import reprod


@pytest.fixture
def trees(tmp_path):
    rng = np.random.default_rng(0)
    for side in ("a", "b"):
        for rank in range(3):
            for step in (1, 2):
                x = rng.standard_normal(50).astype(np.float32) if side == "a" else None
                folder = tmp_path / side / f"rank_{rank}" / f"step_{step}"
                folder.mkdir(parents=True)
                value = np.full(50, rank + step, np.float32)
                if side == "b" and (rank, step) == (1, 2):
                    value = value + np.float32(1e-2)  # one bad rank at one step
                reprod.save(folder / "dump.npz", {"x": value, "noise": x if x is not None else
                                                  np.zeros(50, np.float32)})
    return tmp_path


def _diff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reprod", *args, "--format", "json", "--keys", "x"],
                          capture_output=True, text=True)


def test_jobs_gives_the_serial_report(trees) -> None:
    serial = _diff(str(trees / "a"), str(trees / "b"))
    pooled = _diff(str(trees / "a"), str(trees / "b"), "--jobs", "2")
    assert serial.returncode == pooled.returncode == 1, pooled.stderr
    strip = lambda doc: {rel: [{k: v for k, v in key.items() if k != "created"} for key in r["keys"]]  # noqa: E731
                         for rel, r in json.loads(doc)["files"].items()} if "files" in json.loads(doc) else json.loads(doc)
    assert strip(serial.stdout) == strip(pooled.stdout)


def test_unreachable_scheduler_is_one_line(trees) -> None:
    pytest.importorskip("distributed")
    p = subprocess.run([sys.executable, "-m", "reprod", str(trees / "a"), str(trees / "b"),
                        "--scheduler", "tcp://127.0.0.1:9", "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "127.0.0.1:9" in p.stderr
