"""Calibrated verdicts: a key judged as a multiple of the reference's own float32 noise.

The oracle is a float64 run of the same computation: for a correct float32 port the difference is
of the order of the reference's distance from float64, for a bug orders of magnitude above it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reprod
from reprod.diff.criteria import CriteriaError
from reprod.diff.noise import DEFAULT_NOISE_FACTOR
from reprod.testing import assert_aligned


def _mlp(x: np.ndarray, ws: list[np.ndarray], dtype: type, *, order: str = "ab", scale: float = 1.0):
    """A small tanh MLP; ``order="ba"`` accumulates each matmul in four partial products summed
    from the last (what a different kernel does), ``scale`` multiplies the last layer (a bug)."""
    h = x.astype(dtype)
    out = {}
    for i, w in enumerate(ws):
        w = w.astype(dtype) * (dtype(scale) if i == len(ws) - 1 else dtype(1))
        if order == "ab":
            h = h @ w
        else:
            q = w.shape[0] // 4
            parts = [h[:, j * q:(j + 1) * q] @ w[j * q:(j + 1) * q] for j in range(4)]
            h = ((parts[3] + parts[2]) + parts[1]) + parts[0]
        out[f"layer{i}"] = h
        h = np.tanh(h)
    out["loss"] = np.asarray(h.astype(np.float64).sum() if dtype is np.float64 else h.sum(dtype=dtype))
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 256))
    ws = [rng.standard_normal((256, 256)) / 8 for _ in range(4)]
    return {
        "ref": _mlp(x, ws, np.float32),
        "ref64": _mlp(x, ws, np.float64),
        "port": _mlp(x, ws, np.float32, order="ba"),
        "bug": _mlp(x, ws, np.float32, order="ba", scale=1.0001),
    }


def test_a_correct_float32_port_passes_within_its_noise(runs) -> None:
    plain = reprod.compare(runs["ref"], runs["port"], method="max", threshold=1e-6)
    assert not plain.passed  # absolute thresholds call float32 rounding a bug
    r = reprod.compare(runs["ref"], runs["port"], noise=runs["ref64"])
    assert r.passed, r.to_table()
    for kr in r:
        assert kr.methods == ("noise",) and kr.noise_multiple is not None
        assert kr.noise_multiple <= DEFAULT_NOISE_FACTOR
        # the noise is the reference's own distance from float64, floored at one rounding unit
        ref, hi = runs["ref"][kr.key].astype(np.float64), runs["ref64"][kr.key]
        assert kr.noise_max == pytest.approx(max(np.abs(ref - hi).max(), 2.0**-23 * np.abs(ref).max()))
    assert r.options["noise_factor"] == DEFAULT_NOISE_FACTOR


def test_a_bug_of_one_part_in_ten_thousand_fails_by_many_times_the_noise(runs) -> None:
    r = reprod.compare(runs["ref"], runs["bug"], noise=runs["ref64"])
    failed = {kr.key: kr for kr in r.failed}
    assert "layer3" in failed and not {"layer0", "layer1", "layer2"} & set(failed)
    assert failed["layer3"].noise_multiple > 5 * DEFAULT_NOISE_FACTOR
    assert "noise >" in failed["layer3"].reason and failed["layer3"].status == "failed"
    assert r["layer2"].passed


def test_the_multiple_is_the_larger_of_the_l2_and_max_ratios() -> None:
    ref = np.linspace(1.0, 2.0, 1000).astype(np.float32)
    hi = ref.astype(np.float64) + 1e-7
    other = ref.copy()
    other[500] += np.float32(1e-4)  # one wrong element: the max ratio sees it, L2 dilutes it
    kr = reprod.compare({"x": ref}, {"x": other}, noise={"x": hi})["x"]
    d = other.astype(np.float64) - ref
    l2 = np.linalg.norm(d) / kr.noise_l2
    mx = np.abs(d).max() / kr.noise_max
    assert kr.noise_multiple == pytest.approx(max(l2, mx)) and mx > l2
    assert kr.noise_l2 == pytest.approx(max(np.linalg.norm(ref - hi), 2.0**-23 * np.linalg.norm(ref.astype(float))))


def test_exact_keys_get_a_floor_of_one_rounding_unit() -> None:
    ref = np.arange(1, 101, dtype=np.float32)  # exact in float32: noise 0
    hi = ref.astype(np.float64)
    one_ulp = np.nextafter(ref, np.float32(np.inf))
    assert reprod.compare({"x": ref}, {"x": one_ulp}, noise={"x": hi})["x"].passed
    kr = reprod.compare({"x": ref}, {"x": ref * np.float32(1.001)}, noise={"x": hi})["x"]
    assert not kr.passed and kr.noise_multiple > 1000
    assert reprod.compare({"x": ref}, {"x": ref.copy()}, noise={"x": hi})["x"].noise_multiple == 0.0


def test_keys_without_a_noise_reference_fall_back_and_say_so(runs) -> None:
    noise = {k: v for k, v in runs["ref64"].items() if k != "loss"}
    r = reprod.compare(runs["ref"], runs["port"], noise=noise, method="max", threshold=1e-2)
    assert r["loss"].methods == ("max",) and r["loss"].noise_multiple is None
    assert "no noise calibration (not in the noise reference)" in r["loss"].note
    bad_shape = dict(noise, loss=np.zeros(3))
    r = reprod.compare(runs["ref"], runs["port"], noise=bad_shape)
    assert "noise reference has shape" in r["loss"].note


def test_nan_inf_and_shape_verdicts_are_not_excused_by_noise(runs) -> None:
    other = dict(runs["port"])
    other["layer0"] = other["layer0"].copy()
    other["layer0"][0, 0] = np.nan
    other["layer1"] = other["layer1"][:, :3]
    r = reprod.compare(runs["ref"], other, noise=runs["ref64"])
    assert r["layer0"].status == "nan" and r["layer1"].status == "shape"


def test_noise_factor_is_validated_and_noise_is_not_a_method() -> None:
    with pytest.raises(CriteriaError):
        reprod.compare({"x": np.ones(2)}, {"x": np.ones(2)}, noise={"x": np.ones(2)}, noise_factor=math.nan)
    with pytest.raises(CriteriaError, match="noise="):
        reprod.compare({"x": np.ones(2)}, {"x": np.ones(2)}, method="noise")
    kr = reprod.compare({"x": np.ones(2, np.float32)}, {"x": np.ones(2, np.float32) * np.float32(1.001)},
                        noise={"x": np.ones(2)}, noise_factor=1e5)["x"]
    assert kr.passed and kr.thresholds == {"noise": 1e5}


def test_renderers_show_the_noise_multiple(runs) -> None:
    r = reprod.compare(runs["ref"], runs["bug"], noise=runs["ref64"])
    table = r.to_table()
    assert "noise" in table.splitlines()[0]
    doc = json.loads(r.to_json())
    assert doc["keys"][0]["noise_multiple"] == r.results[0].noise_multiple
    back = reprod.DiffResult.from_dict(doc)
    assert back.results == r.results
    assert "noise diff: check passed: False" in r.to_log()
    with pytest.raises(AssertionError, match=r"layer3: .*x noise > 20x"):
        assert_aligned(runs["ref"], runs["bug"], noise=runs["ref64"])
    assert_aligned(runs["ref"], runs["port"], noise=runs["ref64"])


def test_cli_noise_for_files_and_folders(runs, tmp_path: Path) -> None:
    for name in ("ref", "ref64", "port", "bug"):
        (tmp_path / name).mkdir()
        reprod.save(tmp_path / f"{name}.npz", runs[name])
        reprod.save(tmp_path / name / "step1.npz", runs[name])
    cmd = [sys.executable, "-m", "reprod"]
    t = str(tmp_path)
    ok = subprocess.run(cmd + [f"{t}/ref.npz", f"{t}/port.npz", "--noise", f"{t}/ref64.npz"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(cmd + [f"{t}/ref.npz", f"{t}/bug.npz", "--noise", f"{t}/ref64.npz"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "layer3" in bad.stdout
    folders = subprocess.run(cmd + [f"{t}/ref", f"{t}/port", "--noise", f"{t}/ref64", "--quiet"])
    assert folders.returncode == 0
    loose = subprocess.run(cmd + [f"{t}/ref.npz", f"{t}/bug.npz", "--noise", f"{t}/ref64.npz",
                                  "--noise-factor", "1e6", "--quiet"])
    assert loose.returncode == 0
    usage = subprocess.run(cmd + [f"{t}/ref.npz", f"{t}/port.npz", "--noise-factor", "3"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "--noise" in usage.stderr
