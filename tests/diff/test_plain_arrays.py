"""Two plain-array files (``np.save("a.npy", x)``, each one array rather than a dict) are one
comparison, not a "missing" and an "extra" key named after the two file stems."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import reprod


def test_two_plain_arrays_are_one_key_named_by_the_reference(tmp_path) -> None:
    x = np.linspace(0, 1, 50, dtype=np.float32)
    np.save(tmp_path / "torch_out.npy", x)
    np.save(tmp_path / "paddle_out.npy", x + np.float32(1e-3))
    r = reprod.compare(tmp_path / "torch_out.npy", tmp_path / "paddle_out.npy", method="max",
                       threshold=1e-4)
    assert r.keys() == ["torch_out"]
    kr = r["torch_out"]
    assert kr.status == "failed" and abs(kr.max_abs - 1e-3) < 1e-6
    # the CLI says the same, and a noise run saved as a third plain array calibrates it
    np.save(tmp_path / "torch64.npy", x.astype(np.float64))
    p = subprocess.run([sys.executable, "-m", "reprod", str(tmp_path / "torch_out.npy"),
                        str(tmp_path / "paddle_out.npy"), "--noise", str(tmp_path / "torch64.npy")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "torch_out" in p.stdout and "missing" not in p.stdout.lower()


def test_a_plain_array_against_a_dict_dump_stays_one_sided(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.ones(3))
    reprod.save(tmp_path / "b.npy", {"x": np.ones(3)})
    r = reprod.compare(tmp_path / "a.npy", tmp_path / "b.npy")
    assert sorted(kr.status for kr in r) == ["extra", "missing"]
