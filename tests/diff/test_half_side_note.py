"""A failing key whose one side holds a half-precision run's values in float32 says so.

``ReprodLogger().add("logits", bf16_tensor).save("x.npy")`` saves float32, as reprod_log does: the
dtype shown is float32 both sides, and a porter read a bfloat16 run's rounding (3e-2) as a float32
port 3e-2 off. Half values are recognised from the values (``carried_precision``), only where a
key fails and no noise reference judges it.
"""

from __future__ import annotations

import numpy as np

from reprod import ReprodLogger, compare


def _bf16(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to bfloat16 (to nearest, ties to even), held in float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


rng = np.random.default_rng(0)
REF = (rng.standard_normal((64, 32)) @ rng.standard_normal((32, 16))).astype(np.float32)
HALF = _bf16(REF)


def test_the_half_side_is_named_on_a_failing_key(tmp_path):
    r = compare({"logits": REF}, {"logits": HALF}, threshold=1e-6)
    assert not r.passed
    assert "other holds bfloat16 values held in float32, ref does not" in r["logits"].note
    assert "compare the reference run in bfloat16 against it" in r["logits"].note
    # the other way round, and through two ReprodLogger .npy dumps (the column path)
    r = compare({"x": HALF}, {"x": REF}, threshold=1e-6)
    assert r["x"].note.startswith("ref holds bfloat16 values held in float32, other does not")
    for name, v in (("a.npy", REF), ("b.npy", HALF)):
        log = ReprodLogger()
        log.add("logits", v)
        log.save(str(tmp_path / name))
    r = compare(str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), threshold=1e-6)
    assert "other holds bfloat16 values" in (r["logits"].note or "")


def test_nothing_is_said_where_it_says_nothing():
    # a pass, both sides half, and a float32 port off by more than rounding
    assert compare({"x": REF}, {"x": HALF}, threshold=1.0)["x"].note is None
    assert compare({"x": HALF}, {"x": _bf16(REF * 1.1)}, threshold=1e-6)["x"].note is None
    assert compare({"x": REF}, {"x": REF * 1.1}, threshold=1e-6)["x"].note is None
    # whole numbers are every dtype's values: no half run there
    ints = np.arange(1024, dtype=np.float32)
    assert compare({"x": ints}, {"x": ints + 1}, threshold=1e-6)["x"].note is None
