"""Shapes that differ only by axes of size 1: compared element by element with a note (reprod_log
passes a torch lr list saved as (90, 1) against Paddle's (90,)); transposes and every other
broadcast stay shape verdicts; ``strict_shape`` turns the note into a failure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import reprod


@pytest.mark.parametrize("ref_shape,other_shape", [((90, 1), (90,)), ((1,), ()), ((1, 3), (3,)),
                                                   ((2, 1, 3), (2, 3)), ((3,), (1, 3, 1))])
def test_size_one_axes_are_compared_element_by_element(ref_shape: tuple, other_shape: tuple) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(ref_shape)
    b = a.reshape(other_shape).copy()
    r = reprod.compare({"lr": a}, {"lr": b}, method="max", threshold=0.0)
    kr = r["lr"]
    assert kr.passed and kr.status == "passed" and "axes of size 1" in kr.note
    # a real difference is still found, at the reference's index
    b.reshape(-1)[-1] += 1.0
    kr = reprod.compare({"lr": a}, {"lr": b}, method="max", threshold=0.0)["lr"]
    assert kr.status == "failed" and kr.max_abs == pytest.approx(1.0)
    assert kr.worst_index == np.unravel_index(a.size - 1, ref_shape)


@pytest.mark.parametrize("ref_shape,other_shape", [((3, 1), (1, 3)), ((2, 3), (3, 2)),
                                                   ((3,), (2, 3)), ((4, 1), (2, 2))])
def test_transposes_and_broadcasts_stay_shape_verdicts(ref_shape: tuple, other_shape: tuple) -> None:
    a = np.ones(ref_shape)
    b = np.ones(other_shape)
    kr = reprod.compare({"w": a}, {"w": b})["w"]
    assert kr.status == "shape" and not kr.passed


def test_strict_shape_makes_the_note_a_failure() -> None:
    a, b = {"lr": np.ones((90, 1))}, {"lr": np.ones(90)}
    kr = reprod.compare(a, b, strict_shape=True)["lr"]
    assert kr.status == "shape" and "strict_shape" in kr.reason
    assert reprod.compare(a, b, criteria=reprod.Criteria(strict_shape=True))["lr"].status == "shape"


def test_cli_strict_shape_and_nan_thresholds(tmp_path) -> None:
    reprod.save(tmp_path / "a.npy", {"lr": np.ones((90, 1), np.float32)})
    reprod.save(tmp_path / "b.npy", {"lr": np.ones(90, np.float32)})
    run = [sys.executable, "-m", "reprod", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--quiet"]
    assert subprocess.run(run).returncode == 0
    assert subprocess.run(run + ["--strict-shape"]).returncode == 1
    for bad in (["--threshold", "nan"], ["--atol", "nan"], ["--rtol", "-1"], ["--key-threshold", "lr=nan"]):
        p = subprocess.run(run + bad, capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a usable limit" in p.stderr, bad


def test_nan_threshold_in_the_reprod_log_helper_is_an_error(tmp_path) -> None:
    from reprod import ReprodDiffHelper

    h = ReprodDiffHelper()
    h.compare_info({"x": np.zeros(3)}, {"x": np.full(3, 1e6)})
    with pytest.raises(ValueError):
        h.report(path=None, diff_threshold=float("nan"))
