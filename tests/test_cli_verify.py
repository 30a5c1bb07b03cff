"""reprod-diff --verify: a flipped payload byte in a large .npz member is caught before comparing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import reprod

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "reprod", *args], capture_output=True, text=True,
                           env=env)


def test_verify_catches_a_flipped_byte_in_a_large_member(tmp_path: Path) -> None:
    big = np.zeros(1 << 19, dtype=np.float32)  # 2 MiB: above the default check-on-read size
    reprod.save(tmp_path / "ref.npz", {"x": big})
    reprod.save(tmp_path / "other.npz", {"x": big})
    raw = bytearray((tmp_path / "other.npz").read_bytes())
    offset = reprod.load(tmp_path / "other.npz").spec("x").offset
    raw[offset + 1003] ^= 0x40  # one float becomes 2.0: the comparison itself would see it ...
    (tmp_path / "other.npz").write_bytes(bytes(raw))

    plain = _run(str(tmp_path / "ref.npz"), str(tmp_path / "other.npz"), "--quiet")
    assert plain.returncode == 1  # ... as a difference, not as a damaged file
    checked = _run(str(tmp_path / "ref.npz"), str(tmp_path / "other.npz"), "--verify")
    assert checked.returncode == 2
    err = checked.stderr.strip()
    assert len(err.splitlines()) == 1 and "other.npz" in err and "CRC" in err.upper(), err
    # an intact pair still passes with --verify
    ok = _run(str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--verify", "--quiet")
    assert ok.returncode == 0, ok.stderr
