"""The calibrated comparison in one pass (issue 23): the kernel's ``stats3`` computes a key's
statistics and its noise (ref against the float64 run) while reading each block of ref once.
Everything it gives must be bit-identical to the two ``stats``/``compute_stats`` calls it
replaces, on both loop widths and across chunks and threads, and agree with the float64 oracle."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from oracle import reference

import reprod
from reprod import _native
from reprod.diff import metrics, noise
from reprod.diff.partial import FIELDS

KERNEL = _native.built()
pytestmark = pytest.mark.skipif(KERNEL is None or not hasattr(KERNEL, "stats3"),
                                reason="stats3 is in the compiled kernel")

# the fields of the noise row that stats3 computes (the others are NaN, -1 or 0 by contract)
NOISE_FIELDS = ("counted", "total", "rr", "dd", "max_abs", "max_ref", "ref_nan", "ref_inf",
                "other_nan", "other_inf", "nan_unmatched", "inf_unmatched")
# the noise Stats fields the one pass fills (what the calibration and the second pass read)
NOISE_STATS = ("size", "counted", "max_abs", "diff_l2", "ref_l2", "rel_l2", "ref_max",
               "max_scaled", "ref_nan", "ref_inf", "other_nan", "other_inf", "nan_unmatched",
               "inf_unmatched")
CODES = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch: Any) -> None:
    """The one pass is the kernel's: on here even under REPROD_KERNEL=0 (tests switch it off)."""
    monkeypatch.setattr(_native, "_enabled", True)


@pytest.fixture(params=["avx2", "base"])
def isa(request: Any) -> Any:
    if request.param == "avx2":
        try:
            previous = KERNEL.set_isa("avx2")
        except ValueError:
            pytest.skip("no AVX2 here")
    else:
        previous = KERNEL.set_isa("base")
    yield request.param
    KERNEL.set_isa(previous)


def _same(a: Any, b: Any) -> bool:
    """Bit-identical floats (NaN equal to NaN), equal everything else."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def _triple(n: int, rdt: Any, odt: Any, hdt: Any, seed: int, kind: str = "plain"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hi = rng.standard_normal(n) * 3.0
    if kind == "huge":
        hi *= 1e300  # squares overflow: the scaled second pass (float32: Inf, compared as such)
    elif kind == "tiny":
        hi *= 1e-160  # squares underflow: the scaled second pass
    with np.errstate(over="ignore"):
        ref = (hi * (1 + rng.standard_normal(n) * 1e-7)).astype(rdt)
        other = (ref.astype(np.float64) * (1 + rng.standard_normal(n) * 1e-6)).astype(odt)
        hi = hi.astype(hdt)
    if kind == "nonfinite" and n > 40:
        for arr in (ref, other, hi):
            arr[3] = np.nan
        ref[17], other[17], hi[17] = np.inf, np.inf, np.inf
        other[29] = -np.inf  # unmatched in the statistics, not in the noise
        hi[37] = np.nan  # unmatched in the noise only
    if kind == "spread":  # Inf matched on all three sides, in blocks far apart and in the tail
        for at in (n // 7, n // 2 + 5, n - 1):
            ref[at] = other[at] = hi[at] = np.inf
    return ref, other, hi


def _unaligned(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of ``a`` starting ``offset`` bytes past a 64-byte boundary."""
    raw = np.zeros(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + a.nbytes].view(a.dtype)
    out[:] = a
    assert out.ctypes.data % 64 == offset
    return out


def _check_stats3(ref: np.ndarray, other: np.ndarray, hi: np.ndarray, block: int,
                  check_close: bool, equal_nan: bool) -> None:
    """stats3 against stats() of the pair and of (hi, ref), field by field."""
    rc, oc, hc = (CODES[a.dtype] for a in (ref, other, hi))
    args = (block, check_close, 1e-6, 1e-5, equal_nan)
    first, second = KERNEL.stats3(ref, rc, other, oc, hi, hc, *args)
    plain = KERNEL.stats(ref, rc, other, oc, *args)
    alone = KERNEL.stats(hi, hc, ref, rc, block, False, 0.0, 0.0, False)
    assert all(_same(a, b) for a, b in zip(first, plain)), (first, plain)
    got = dict(zip(FIELDS, second))
    want = dict(zip(FIELDS, alone))
    for f in NOISE_FIELDS:
        assert _same(got[f], want[f]), (f, got[f], want[f])
    assert got["worst"] == -1 and got["mismatched"] == 0 and math.isnan(got["max_rel"])


# every (ref, other, hi) kind triple: the fused loop has one copy per triple and loop width
DTYPES = list(itertools.product((np.float32, np.float64), repeat=3))


# n and block around the fused loop's steps: 16 elements per prefetch (GROUP), then W at a time
# (W = 2 or 4), then the scalar tail; the prefetch distance (512) clamped near the end
@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 64, 529, 8191, 8192, 8193, 20000, 65537])
@pytest.mark.parametrize("dts", DTYPES, ids=lambda d: "".join(np.dtype(t).char for t in d))
@pytest.mark.parametrize("kind", ["plain", "nonfinite", "huge"])
def test_stats3_is_two_stats_calls(isa: str, n: int, dts: Any, kind: str) -> None:
    ref, other, hi = _triple(n, *dts, seed=n, kind=kind)
    for block, check_close, equal_nan in ((8192, True, False), (1000, False, True), (7, True, True),
                                          (16, False, False), (36, True, False)):
        _check_stats3(ref, other, hi, block, check_close, equal_nan)


@pytest.mark.parametrize("dts", DTYPES, ids=lambda d: "".join(np.dtype(t).char for t in d))
@pytest.mark.parametrize("offset", [0, 4, 1, 3])
def test_stats3_one_sided_nonfinite_blocks_unaligned(isa: str, dts: Any, offset: int) -> None:
    # block 1000: 62 groups of 16, then 8 elements W at a time; n leaves a scalar tail of 3
    n, block = 5003, 1000
    ref, other, hi = _triple(n, *dts, seed=offset + 40)
    other[1005] = np.inf  # block 1, group loop: the pair's block redone by the scalar rule
    hi[2997] = np.nan  # block 2, W-step remainder: the noise's only
    hi[3010] = -np.inf  # block 3: the noise's only
    ref[4000] = np.nan  # block 4, first element: both
    hi[5002] = np.inf  # the scalar tail of the last block: the noise's only
    other[5001] = 1e30 if other.dtype == np.float32 else 1e300  # the largest finite one, in the tail
    ref, other, hi = (_unaligned(a, offset) for a in (ref, other, hi))
    for check_close, equal_nan in ((True, False), (False, True)):
        _check_stats3(ref, other, hi, block, check_close, equal_nan)
    # the unmatched Inf is the worst position, not the tail's finite difference; the non-finite
    # counts on each side
    first, second = KERNEL.stats3(ref, CODES[ref.dtype], other, CODES[other.dtype], hi,
                                  CODES[hi.dtype], block, False, 0.0, 0.0, False)
    got, noise_row = dict(zip(FIELDS, first)), dict(zip(FIELDS, second))
    assert got["worst"] == 1005 and got["max_abs"] == math.inf
    assert (got["ref_nan"], got["other_inf"], got["nan_unmatched"], got["inf_unmatched"]) == (1, 1, 1, 1)
    assert (noise_row["ref_nan"], noise_row["ref_inf"], noise_row["other_nan"]) == (1, 2, 1)
    assert noise_row["nan_unmatched"] == 2 and noise_row["inf_unmatched"] == 2


def _two_pass(monkeypatch: Any, *args: Any, **kw: Any) -> Any:
    with monkeypatch.context() as m:
        m.setattr(noise, "_one_pass", lambda *a, **k: None)
        return noise.calibrated_stats(*args, **kw)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["plain", "nonfinite", "huge", "tiny", "spread"])
def test_calibrated_stats_matches_two_passes_across_chunks(monkeypatch: Any, threads: int,
                                                           kind: str) -> None:
    # three chunks and a tail: the chunks' partials are merged in order, as compute_stats merges
    n = 2 * metrics.CHUNK + 12345
    low = np.float64 if kind == "huge" else np.float32  # 1e300 is no float32
    ref, other, hi = _triple(n, low, low, np.float64, seed=7, kind=kind)
    if kind == "nonfinite":  # NaN in ref leaves the key uncalibrated (NaN never equals NaN there)
        other[29] = other[30]
    tree = {"a": {"x": hi.reshape(1, -1)}}  # size-1 axes are dropped, as calibrate drops them
    previous = metrics.set_threads(threads)
    try:
        progress: list[int] = []
        kw = dict(atol=1e-6, rtol=1e-5, equal_nan=True)
        st, cal = noise.calibrated_stats(ref, other, tree, ("a", "x"), str(low), str(low),
                                         on_progress=progress.append, **kw)
        st2, cal2 = _two_pass(monkeypatch, ref, other, tree, ("a", "x"), str(low), str(low), **kw)
    finally:
        metrics.set_threads(previous)
    assert sum(progress) == n
    assert st == st2 or all(_same(getattr(st, f), getattr(st2, f)) for f in st.__dataclass_fields__)
    assert cal is not None and cal2 is not None
    assert (cal.l2, cal.max, cal.multiple, cal.why) == (cal2.l2, cal2.max, cal2.multiple, cal2.why)
    assert (cal.multiple is None) == (kind == "nonfinite")


def test_noise_statistics_match_compute_stats_and_the_oracle() -> None:
    ref, other, hi = _triple(100_003, np.float32, np.float32, np.float64, seed=3)
    both = noise._one_pass(ref, other, hi, None, None, False, None)
    assert both is not None
    st, ns = both
    alone = metrics.compute_stats(hi, ref)
    for f in NOISE_STATS:
        assert _same(getattr(ns, f), getattr(alone, f)), f
    assert st == metrics.compute_stats(ref, other)
    # the float64 oracle: the whole array at once
    want = reference(hi, ref, atol=None, rtol=None, equal_nan=False)
    assert ns.max_abs == want["max_abs"]
    d = np.abs(ref.astype(np.float64) - hi)
    assert ns.diff_l2 == pytest.approx(math.sqrt(float(np.dot(d, d))), rel=1e-12)
    assert ns.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-12)
    assert ns.max_scaled == pytest.approx(want["max_scaled"], rel=1e-15)
    want_st = reference(ref, other, atol=None, rtol=None, equal_nan=False)
    assert st.max_abs == want_st["max_abs"] and st.mean_abs == pytest.approx(want_st["mean_abs"], rel=1e-12)


@pytest.mark.parametrize("case", ["missing", "shape", "unmatched", "int16", "noise-nan"])
def test_calibrated_stats_cases_without_one_pass(monkeypatch: Any, case: str) -> None:
    ref, other, hi = _triple(5000, np.float32, np.float32, np.float64, seed=11)
    tree: dict[str, Any] = {"x": hi}
    if case == "missing":
        tree = {"y": hi}
    elif case == "shape":
        tree = {"x": hi[:-1]}
    elif case == "unmatched":
        other[10] = np.nan  # the key's own verdict: no calibration asked
    elif case == "int16":
        ref, other = (ref * 100).astype(np.int16), (other * 100).astype(np.int16)
    elif case == "noise-nan":
        tree = {"x": np.where(np.arange(hi.size) == 5, np.nan, hi)}
    got = noise.calibrated_stats(ref, other, tree, ("x",), str(ref.dtype), str(other.dtype))
    want = _two_pass(monkeypatch, ref, other, tree, ("x",), str(ref.dtype), str(other.dtype))
    assert got[0] == want[0] or case == "unmatched"
    assert got[1] == want[1]
    if case == "unmatched":
        assert got[1] is None
    elif case in ("missing", "shape", "noise-nan"):
        assert got[1] is not None and got[1].multiple is None and got[1].why
    # the old entry point gives the same calibration
    if got[1] is not None:
        assert noise.calibrate(got[0], ref, tree, ("x",), str(ref.dtype), str(other.dtype)) == got[1]


def test_without_the_kernel_two_passes_give_the_same_calibration(monkeypatch: Any) -> None:
    ref, other, hi = _triple(30_000, np.float32, np.float32, np.float64, seed=5)
    tree = {"x": hi}
    st, cal = noise.calibrated_stats(ref, other, tree, ("x",), "float32", "float32")
    monkeypatch.setattr(_native, "_enabled", False)
    st2, cal2 = noise.calibrated_stats(ref, other, tree, ("x",), "float32", "float32")
    assert cal is not None and cal2 is not None and cal.multiple is not None
    # the numpy path: the same statistics to float64 rounding
    assert cal2.l2 == pytest.approx(cal.l2, rel=1e-12)
    assert cal2.max == cal.max
    assert cal2.multiple == pytest.approx(cal.multiple, rel=1e-12)


def test_compare_with_noise_is_the_same_either_way(monkeypatch: Any, tmp_path: Any) -> None:
    rng = np.random.default_rng(2)
    hi = {f"k{i}": rng.standard_normal((16, 1000 + i)) for i in range(4)}
    ref = {k: v.astype(np.float32) for k, v in hi.items()}
    other = {k: (v * (1 + 1e-6 * (k == "k2"))).astype(np.float32) for k, v in hi.items()}
    paths = {}
    for name, tree in (("ref", ref), ("other", other), ("hi", hi)):
        paths[name] = str(tmp_path / f"{name}.npz")
        reprod.save(paths[name], tree)
    one = reprod.compare(paths["ref"], paths["other"], noise=paths["hi"])
    monkeypatch.setattr(noise, "_one_pass", lambda *a, **k: None)
    two = reprod.compare(paths["ref"], paths["other"], noise=paths["hi"])
    assert one.results == two.results  # every field of every key
    assert all(r.noise_multiple is not None for r in one.results)


def test_stats3_refuses_bad_arguments() -> None:
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError):
        KERNEL.stats3(a, "f", a, "f", np.zeros(9), "d", 8, False, 0.0, 0.0, False)
    with pytest.raises(ValueError):
        KERNEL.stats3(a, "f", a, "f", a, "x", 8, False, 0.0, 0.0, False)
    with pytest.raises(ValueError):
        KERNEL.stats3(a, "f", a, "f", a, "f", 0, False, 0.0, 0.0, False)
