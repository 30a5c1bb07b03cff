"""``reprod.compare`` on hostile numbers: all-NaN, all-Inf, denormals, values near the float
limits, int64/uint64 extremes, empty and 0-d arrays, very many keys, and keys no file system or
zip would like, through both dump formats.

Every statistic is checked against an exact reference: each element becomes a
``fractions.Fraction`` (exact for every float and integer), differences, ratios, sums and the
cosine are computed exactly and rounded once to float64 at the end. Maxima and minima of
|other - ref| must then be bit-exact (one correctly rounded subtraction); means within float64
summation error. Both engine paths run: the compiled kernel and the numpy fallback.

The engine bugs these tests found (the cosine of values beyond ~1e154 or below ~1e-162, the
relative error of differences that overflow) are fixed by scaled second passes in metrics.py.

``REPROD_MANY_KEYS`` (default 100 000) sets the key count of the many-keys test; 1 000 000 is the
long run documented in docs/fuzzing.md.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import pytest

import reprod
from reprod import _native

MANY_KEYS = int(os.environ.get("REPROD_MANY_KEYS", "100000"))

F64 = np.finfo(np.float64)
F32 = np.finfo(np.float32)
I64 = np.iinfo(np.int64)
U64 = np.iinfo(np.uint64)
DENORM = 5e-324  # the smallest float64 denormal


@pytest.fixture(params=["kernel", "numpy"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test through the compiled kernel and through the numpy path."""
    if request.param == "kernel" and _native.built() is None:
        pytest.skip("compiled kernel not built")
    monkeypatch.setattr(_native, "_enabled", request.param == "kernel")
    return request.param


# ---------------------------------------------------------------------------------------------
# the exact reference
# ---------------------------------------------------------------------------------------------


def _exact(x: Any) -> Fraction:
    return Fraction(int(x)) if isinstance(x, (int, np.integer, bool, np.bool_)) else Fraction(float(x))


def _to_float(q: Fraction) -> float:
    try:
        return float(q)  # correctly rounded
    except OverflowError:
        return math.inf if q > 0 else -math.inf


def reference(ref: np.ndarray, other: np.ndarray) -> dict[str, Optional[float]]:
    """Exact statistics of two finite real arrays, rounded once to float64."""
    r = [_exact(x) for x in np.asarray(ref).reshape(-1).tolist()]
    o = [_exact(x) for x in np.asarray(other).reshape(-1).tolist()]
    d = [abs(b - a) for a, b in zip(r, o)]
    rel: list[Fraction | float] = []
    for a, di in zip(r, d):
        rel.append(Fraction(0) if di == 0 else math.inf if a == 0 else di / abs(a))
    n = len(d)
    finite_rel = [x for x in rel if x != math.inf]
    out: dict[str, Optional[float]] = {
        "max_abs": _to_float(max(d)),
        "min_abs": _to_float(min(d)),
        "mean_abs": _to_float(sum(d) / n),
        "max_rel": math.inf if len(finite_rel) < n else _to_float(max(finite_rel)),
        "mean_rel": math.inf if len(finite_rel) < n else _to_float(sum(finite_rel) / n),
    }
    dot = sum(a * b for a, b in zip(r, o))
    rr = sum(a * a for a in r)
    oo = sum(b * b for b in o)
    if rr == 0 and oo == 0:
        out["cosine"] = 1.0
    elif rr == 0 or oo == 0:
        out["cosine"] = 0.0
    else:  # cos**2 exactly, then one square root
        out["cosine"] = math.copysign(math.sqrt(_to_float(dot * dot / (rr * oo))), 1 if dot >= 0 else -1)
    return out


def _check_stats(k: Any, want: dict[str, Optional[float]], stats: tuple[str, ...]) -> None:
    for name in stats:
        got, exp = getattr(k, name), want[name]
        assert got is not None, f"{name}: None, exact {exp!r}"
        if name in ("max_abs", "min_abs") or math.isinf(exp) or exp == 0:
            assert got == exp, f"{name}: {got!r}, exact {exp!r}"
        elif name == "cosine":
            assert abs(got - exp) <= 4e-16, f"cosine: {got!r}, exact {exp!r}"
        else:  # a float64 sum of n terms: relative error below n * 2**-53 (n is small here)
            assert math.isclose(got, exp, rel_tol=1e-12), f"{name}: {got!r}, exact {exp!r}"


def _one(ref: Any, other: Any, **kw: Any) -> Any:
    result = reprod.compare({"x": ref}, {"x": other}, **kw)
    (k,) = result.results
    return k


ABS_STATS = ("max_abs", "min_abs", "mean_abs")
REL_STATS = ("max_rel", "mean_rel")


def _rng() -> np.random.Generator:
    return np.random.default_rng(2024)


# name -> (ref, other): finite values every statistic must get right
FINITE_CASES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "denormals-vs-zero": (np.full(7, DENORM), np.zeros(7)),
    "denormals-mixed": (np.array([DENORM, 3 * DENORM, -DENORM, 2.2e-308]),
                        np.array([2 * DENORM, -DENORM, -DENORM, 2.2250738585072014e-308])),
    "float32-denormals": (np.full(5, 1e-45, np.float32), np.full(5, 3e-45, np.float32)),
    "float64-max-vs-zero": (np.full(9, F64.max), np.zeros(9)),
    "float64-max-vs-half": (np.full(9, F64.max), np.full(9, F64.max / 2)),
    "float64-max-vs-neg-tiny": (np.full(3, F64.max), np.full(3, -1e291)),  # rounds to max
    "float32-max-vs-neg-max": (np.full(4, F32.max, np.float32), np.full(4, -F32.max, np.float32)),
    "float16-max-vs-neg-max": (np.full(4, 65504, np.float16), np.full(4, -65504, np.float16)),
    "magnitudes-1e-320-to-1e300": (
        np.array([1e-320, 1e-300, 1e-100, 1.0, 1e100, 1e300]),
        np.array([2e-320, -1e-300, 1.5e-100, -1.0, 1.000001e100, 9e299])),
    "int64-extremes": (np.array([I64.min, I64.max, 0, -1]), np.array([I64.max, I64.min, I64.min, I64.max])),
    "int64-neighbours": (np.array([I64.max, I64.min]), np.array([I64.max - 1, I64.min + 1])),
    "uint64-extremes": (np.array([0, U64.max, U64.max], np.uint64), np.array([U64.max, 0, U64.max - 1], np.uint64)),
    "int64-vs-uint64": (np.array([I64.min, I64.max, -1]), np.array([U64.max, U64.max, 0], np.uint64)),
    "int8-wrap": (np.array([-128, 127, 0], np.int8), np.array([127, -128, -128], np.int8)),
    "uint8-wrap": (np.array([0, 255, 1], np.uint8), np.array([255, 0, 2], np.uint8)),
    "bool": (np.array([True, False, True]), np.array([False, False, True])),
    "random-float64-wide": (np.exp(_rng().uniform(-700, 700, 200)) * _rng().choice([-1, 1], 200),
                            np.exp(_rng().uniform(-700, 700, 200))),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FINITE_CASES))
def test_statistics_are_exact_on_finite_extremes(engine, case) -> None:
    ref, other = FINITE_CASES[case]
    k = _one(ref, other, threshold=None)
    want = reference(ref, other)
    assert k.status == "passed" and k.ref_nan == k.other_nan == k.ref_inf == k.other_inf == 0
    _check_stats(k, want, ABS_STATS + REL_STATS)
    worst = int(np.ravel_multi_index(k.worst_index, np.shape(ref))) if np.ndim(ref) else 0
    d = [abs(_exact(b) - _exact(a)) for a, b in zip(np.ravel(ref).tolist(), np.ravel(other).tolist())]
    assert d[worst] == max(d) and d.index(max(d)) == worst  # the first largest, as numpy's argmax


def test_no_difference_overflows_below_the_float64_limit(engine) -> None:
    """Sums of many huge terms overflow float64 while their mean does not: the mean is finite."""
    n = 300_001  # several chunks: the threaded path and the merge too
    k = _one(np.full(n, 1.5e308), np.zeros(n), threshold=None)
    assert k.mean_abs == pytest.approx(1.5e308, rel=1e-12) and k.max_abs == 1.5e308
    assert k.mean_rel == pytest.approx(1.0, rel=1e-12)


def test_a_threshold_check_on_huge_values_is_the_exact_verdict(engine) -> None:
    ref = np.array([F64.max, -F64.max])
    other = ref * (1 - 2**-52)
    k = _one(ref, other, method="max", threshold=float(reference(ref, other)["max_abs"]))
    assert k.passed  # the threshold itself passes (reprod_log's rule), and nothing overflowed
    k = _one(ref, other, method="max", threshold=np.nextafter(reference(ref, other)["max_abs"], 0))
    assert not k.passed and k.status == "failed"


# --- engine bugs found here (fixed): cosine and relative error at the edges of float64 ---------


@pytest.mark.parametrize("case", ["denormal-vs-negation", "denormal-vs-zero", "tiny-rotated"])
def test_cosine_of_tiny_values(engine, case) -> None:
    ref, other = {
        "denormal-vs-negation": (np.full(4, DENORM), np.full(4, -DENORM)),
        "denormal-vs-zero": (np.full(4, DENORM), np.zeros(4)),
        "tiny-rotated": (np.array([1e-200, 2e-200]), np.array([2e-200, 1e-200])),
    }[case]
    _check_stats(_one(ref, other), reference(ref, other), ("cosine",))


@pytest.mark.parametrize("scale", [1e155, 1e200, F64.max])
def test_cosine_of_huge_values(engine, scale) -> None:
    ref = np.array([1.0, 0.5, -0.25]) * scale
    other = np.array([1.0, 0.5, -0.25]) * scale
    other[2] = -other[2]
    _check_stats(_one(ref, other), reference(ref, other), ("cosine",))


def test_relative_error_when_the_difference_overflows(engine) -> None:
    ref, other = np.full(3, 1.7e308), np.full(3, -1.7e308)
    k = _one(ref, other, threshold=None)
    assert k.max_abs == math.inf and k.mean_abs == math.inf  # not representable: documented
    _check_stats(k, reference(ref, other), REL_STATS)


# ---------------------------------------------------------------------------------------------
# NaN and Inf: the pass rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.complex64])
def test_all_nan(engine, dtype) -> None:
    nan = np.full((3, 5), np.nan, dtype)
    k = _one(nan, nan)
    assert not k.passed and k.status == "nan" and k.ref_nan == k.other_nan == 15
    assert k.mean_abs is None and k.max_abs is None  # no statistic hides a NaN
    for method in ("mean", "max", "min", "all"):  # not even min over an empty set
        assert not _one(nan, nan, method=method, threshold=math.inf).passed
    k = _one(nan, nan, equal_nan=True, atol=0.0, rtol=0.0)
    assert k.passed and k.ref_nan == 15 and k.mismatched == 0


def test_nan_at_different_positions_fails_even_with_equal_nan(engine) -> None:
    a = np.array([np.nan, 1.0, 2.0])
    b = np.array([1.0, np.nan, 2.0])
    k = _one(a, b, equal_nan=True)
    assert not k.passed and k.status == "nan" and k.ref_nan == k.other_nan == 1


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_inf(engine, dtype) -> None:
    inf = np.full(6, np.inf, dtype)
    k = _one(inf, inf, atol=0.0, rtol=0.0)
    assert k.passed and k.ref_inf == k.other_inf == 6 and k.mismatched == 0
    assert k.mean_abs is None  # matched Infs stay out of the statistics
    k = _one(inf, -inf)
    assert not k.passed and k.status == "inf" and k.max_abs == math.inf
    k = _one(inf, np.full(6, F64.max if dtype == np.float64 else 1.0, dtype))
    assert not k.passed and k.status == "inf"


def test_matched_infs_leave_exact_statistics_of_the_rest(engine) -> None:
    ref = np.array([np.inf, 1.0, -np.inf, DENORM, F64.max])
    other = np.array([np.inf, 1.5, -np.inf, 0.0, F64.max / 4])
    k = _one(ref, other, threshold=None)
    assert k.passed and k.ref_inf == k.other_inf == 2
    _check_stats(k, reference(ref[[1, 3, 4]], other[[1, 3, 4]]), ABS_STATS + REL_STATS)
    assert k.worst_index == (4,)


def test_negative_zero_equals_zero(engine) -> None:
    k = _one(np.array([0.0, -0.0]), np.array([-0.0, 0.0]), method="max", threshold=0.0)
    assert k.passed and k.max_abs == 0.0 and k.max_rel == 0.0


# ---------------------------------------------------------------------------------------------
# empty and 0-d arrays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 3), (4, 0, 2)])
def test_zero_size_arrays(engine, shape) -> None:
    k = _one(np.zeros(shape), np.zeros(shape, np.float32))
    assert k.passed and k.size == 0 and k.mean_abs is None
    k = _one(np.zeros(shape), np.ones(3))
    assert not k.passed and k.status == "empty"
    k = _one(np.ones(3), np.zeros(shape))
    assert not k.passed and k.status == "empty"


def test_zero_d_arrays(engine) -> None:
    k = _one(np.float32(1.0), np.array(1.5), threshold=None)
    assert k.status == "passed" and k.ref_shape == () and k.worst_index == ()
    _check_stats(k, reference(np.float32(1.0), np.array(1.5)), ABS_STATS + REL_STATS)
    k = _one(np.array(2.0), np.array([2.0]))  # torch's () loss against older paddle's (1,)
    assert k.passed and k.note and "size 1" in k.note
    k = _one(np.array(2.0), np.array([2.0, 2.0]))
    assert not k.passed and k.status == "shape"
    k = _one(np.array(np.nan), np.array(np.nan))
    assert not k.passed and k.status == "nan"
    k = _one(np.array(I64.min), np.array(U64.max, np.uint64), threshold=None)
    _check_stats(k, reference(np.array(I64.min), np.array(U64.max, np.uint64)), ABS_STATS)


# ---------------------------------------------------------------------------------------------
# very many keys, odd keys
# ---------------------------------------------------------------------------------------------


def test_many_tiny_keys_in_memory() -> None:
    ref = {f"k{i}": np.float32(i) for i in range(MANY_KEYS)}
    other = dict(ref)
    bad = [3, MANY_KEYS // 2, MANY_KEYS - 1]
    for i in bad:
        other[f"k{i}"] = np.float32(i + 0.5)
    r = reprod.compare(ref, other)
    assert len(r.results) == MANY_KEYS
    assert [k.key for k in r.results[:3]] == ["k0", "k1", "k2"]
    assert [k.key for k in r.failed] == [f"k{i}" for i in bad]
    assert all(k.mean_abs == 0.5 for k in r.failed)


def test_many_tiny_keys_through_both_formats(tmp_path, fmt) -> None:
    n = max(1, MANY_KEYS // 10)  # files cost more per key; the full count is the long run
    ref = {f"layer{i}.out": np.full(2, i, np.float32) for i in range(n)}
    other = dict(ref)
    other[f"layer{n - 1}.out"] = np.array([n - 1, n], np.float32)
    a = reprod.save(tmp_path / f"ref.{fmt}", ref)
    b = reprod.save(tmp_path / f"other.{fmt}", other)
    r = reprod.compare(a, b, method="max")
    assert len(r.results) == n and [k.key for k in r.failed] == [f"layer{n - 1}.out"]
    assert [k.key for k in r.results[:2]] == ["layer0.out", "layer1.out"]


ODD_KEYS = ["a/b", "a.b", "a..b", "ünïcødé", "", " ", "\n", "..", "../../etc/passwd",
            "/abs/path", "C:\\windows", "__reprod__.json", "__reprod_0", "x" * 1000, "😀",
            "nul\x00byte", "tab\tkey", "a//b", "trail/", "quote'\"", "%s{}", "a.npy",
            "lone\udcffsurrogate"]  # fmt: skip


def test_unusual_keys_round_trip_and_compare_in_both_formats(tmp_path, fmt) -> None:
    tree: dict[str, Any] = {k: np.float32(i) for i, k in enumerate(ODD_KEYS)}
    tree["nest"] = {"": {"": np.arange(3.0)}, "a/b": np.ones(2), "a": {"b": np.zeros(2)}}
    other = {**tree, "../../etc/passwd": np.float32(99), "nest": {**tree["nest"], "a": {"b": np.ones(2)}}}
    a = reprod.save(tmp_path / f"ref.{fmt}", tree)
    b = reprod.save(tmp_path / f"other.{fmt}", other)
    assert sorted(os.listdir(tmp_path)) == [f"other.{fmt}", f"ref.{fmt}"]  # no key became a file
    with reprod.load(a) as d:
        assert list(d) == list(tree) and list(d["nest"]) == ["", "a/b", "a"]
        for i, k in enumerate(ODD_KEYS):
            assert d[k] == np.float32(i)
    r = reprod.compare(a, b)
    paths = [k.path for k in r.results]
    assert paths[: len(ODD_KEYS)] == [(k,) for k in ODD_KEYS]
    assert paths[len(ODD_KEYS) :] == [("nest", "", ""), ("nest", "a/b"), ("nest", "a", "b")]
    assert [k.path for k in r.failed] == [("../../etc/passwd",), ("nest", "a", "b")]
    # a key with "/" stays one element: its display name may equal a nested key's
    assert [k.key for k in r.results if k.key == "nest/a/b"] == ["nest/a/b"] * 2


def test_complex_worst_element_beyond_the_float64_range_is_inf_not_an_error() -> None:
    a = {"c": np.array([1.5e308 + 1.5e308j, 1 + 1j])}
    b = {"c": np.array([-1.5e308 - 1.5e308j, 1 + 1j])}
    kr = reprod.compare(a, b)["c"]
    assert kr.status == "failed" and kr.worst_index == (0,)
    assert kr.worst_ref == kr.worst_other == float("inf") and kr.max_abs == float("inf")
