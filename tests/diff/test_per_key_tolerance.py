"""per_key entries may carry their own atol/rtol: the element-wise rule for matching keys."""

from __future__ import annotations

import numpy as np

import reprod


def _data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    ref = {"logits": rng.standard_normal(100), "layer.grad": rng.standard_normal(100)}
    other = {"logits": ref["logits"] + 1e-7, "layer.grad": ref["layer.grad"] + 1e-4}
    return ref, other


def test_per_key_atol_overrides_the_run() -> None:
    ref, other = _data()
    strict = reprod.compare(ref, other, threshold=None, atol=1e-6, rtol=0.0)
    assert strict["logits"].passed
    assert strict["layer.grad"].status == "mismatch"
    expected = int((~np.isclose(other["layer.grad"], ref["layer.grad"], atol=1e-6, rtol=0)).sum())
    assert strict["layer.grad"].mismatched == expected == 100
    loose = reprod.compare(ref, other, threshold=None, atol=1e-6, rtol=0.0,
                           per_key={"*.grad": {"atol": 2e-4}})
    assert loose.passed
    assert loose["layer.grad"].atol == 2e-4 and loose["layer.grad"].mismatched == 0
    assert loose["logits"].atol == 1e-6


def test_per_key_tolerance_and_thresholds_together() -> None:
    ref, other = _data()
    r = reprod.compare(ref, other, method="max", threshold=1e-6,
                       per_key={"layer.grad": {"max": 1e-3, "rtol": 1e-9}})
    kr = r["layer.grad"]
    assert kr.thresholds == {"max": 1e-3}
    assert kr.rtol == 1e-9 and kr.atol is None
    # max passes, but 1e-4 is far outside rtol=1e-9: every element mismatches
    assert kr.checks == {"max": True} and kr.status == "mismatch"
    assert r["logits"].passed and r["logits"].mismatched is None
