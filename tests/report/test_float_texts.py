"""The kernel's ``float_texts`` (Schubfach digits in repr's layout, ``reprod/_float_text.h``)
against ``float.__repr__``, CPython's own dtoa, as the independent reference: random bit
patterns, float32 values widened (what float32 statistics are), integers, powers of two and ten
and their neighbours, every exponent's edges, the subnormals, and the texts' layout boundaries;
then the writers that use it (JSON, CSV, log) with the kernel on and off."""

from __future__ import annotations

import math
import random
import struct
from dataclasses import replace

import numpy as np
import pytest
from test_json_fast import _hand_built  # tests/report, on sys.path

from reprod import _native
from reprod.diff.result import DiffResult
from reprod.report import data, log

needs_kernel = pytest.mark.skipif(_native.built() is None, reason="compiled kernel not built")


def _kernel_texts(values: list[float]) -> list[str]:
    return _native.built().float_texts(values)  # type: ignore[union-attr]


def _assert_repr(values: list[float]) -> None:
    """Every text is float.__repr__'s; a failure names the first values that differ (a plain
    list comparison would print millions of items)."""
    got = _kernel_texts(values)
    assert len(got) == len(values)
    want = list(map(float.__repr__, values))
    if got != want:
        bad = [(x.hex(), g, w) for x, g, w in zip(values, got, want) if g != w]
        pytest.fail(f"{len(bad)} texts differ from repr, first: {bad[:5]}")


def _from_bits(bits: np.ndarray) -> list[float]:
    return bits.astype(np.uint64).view(np.float64).tolist()


def _neighbours(values: list[float]) -> list[float]:
    """Each value, one ulp below and above, and their negatives."""
    out = []
    for x in values:
        for y in (math.nextafter(x, -math.inf), x, math.nextafter(x, math.inf)):
            out += [y, -y]
    return out


@needs_kernel
def test_random_bit_patterns() -> None:
    """Two million doubles of every kind by their bits: NaNs of any sign and payload, infinities,
    subnormals, every exponent."""
    bits = np.random.default_rng(20231).integers(0, 2**64, size=2_000_000, dtype=np.uint64)
    _assert_repr(bits.view(np.float64).tolist())


@needs_kernel
def test_float32_values_widened() -> None:
    """A float32 statistic is written as the double it widens to: a million of them by their
    float32 bits (every float32 exponent, subnormals), and typical differences."""
    rng = np.random.default_rng(7)
    bits32 = rng.integers(0, 2**32, size=700_000, dtype=np.uint64).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # a signalling NaN widened: still a NaN
        _assert_repr(bits32.view(np.float32).astype(np.float64).tolist())
    diffs = (rng.standard_normal(300_000) * 10.0 ** rng.integers(-12, 4, size=300_000))
    _assert_repr(diffs.astype(np.float32).astype(np.float64).tolist())


@needs_kernel
def test_integers_and_powers() -> None:
    """Integers of every size (exact below 2^53, rounded above), powers of two over the whole
    exponent range and powers of ten from 1e-323 to 1e308, each with its neighbours."""
    rng = random.Random(3)
    ints = [float(rng.getrandbits(rng.randint(1, 80))) for _ in range(20_000)]
    ints += [float(rng.randint(1, 9) * 10**k) for k in range(30) for _ in range(20)]
    ints += [float(2**53 + d) for d in range(-5, 6)] + [9007199254740993.0, 9007199254740991.0]
    _assert_repr(_neighbours(ints))
    _assert_repr(_neighbours([math.ldexp(1.0, e) for e in range(-1074, 1024)]))
    tens = [float(f"1e{k}") for k in range(-323, 309)]  # float() rounds correctly
    _assert_repr(_neighbours(tens + [float(f"{m}e{k}") for m in (2, 5, 9) for k in range(-320, 308)]))


@needs_kernel
def test_every_exponent_edge() -> None:
    """For every exponent field: the smallest and largest significands and their neighbours
    (the power of two, whose lower neighbour is half as far, among them), so also every
    subnormal boundary."""
    fracs = np.array([0, 1, 2, 3, 2**51 - 1, 2**51, 2**51 + 1, 2**52 - 2, 2**52 - 1], np.uint64)
    exps = np.arange(0, 2047, dtype=np.uint64) << np.uint64(52)
    bits = (exps[:, None] | fracs[None, :]).ravel()
    _assert_repr(_from_bits(bits) + _from_bits(bits | np.uint64(1 << 63)))
    subnormals = [math.ldexp(1.0, e) for e in range(-1074, -1021)]
    subnormals += [math.ldexp(float(2**k - 1), -1074) for k in range(1, 53)]
    _assert_repr(_neighbours(subnormals))


@needs_kernel
def test_short_digit_strings() -> None:
    """Values typed with 1 to 17 significant digits at any exponent: their repr is usually
    those digits, so every text length and layout is exercised."""
    rng = random.Random(11)
    values = []
    for _ in range(60_000):
        n = rng.randint(1, 17)
        digits = str(rng.randint(10 ** (n - 1), 10**n - 1))
        values.append(float(f"{digits}e{rng.randint(-330, 310)}"))
        values.append(float(f"{digits}e{rng.randint(-25, 25)}"))
    _assert_repr([v for v in values if v != 0.0])


@needs_kernel
def test_named_values() -> None:
    """The classic cases: the extremes, ties, and where repr switches between positional and
    exponent layout (decpt -4 and 16)."""
    named = [
        0.0, -0.0, math.inf, -math.inf, 5e-324, -5e-324, 2.2250738585072014e-308,
        2.225073858507201e-308, 1.7976931348623157e308, -1.7976931348623157e308, 0.1, 0.2, 0.3,
        0.1 + 0.2, 1 / 3, 2 / 3, 1e22, 1e23, 8.41e21, 5e-310, 9007199254740993.0, 1.5e300, 123.0,
        1e16, 9999999999999998.0, 1e15, 1e17, 1234567890123456.8, 12345678901234567.0, 1e-4,
        9.999999999999999e-05, 0.001, 1e-5, 0.00012345678901234567, 2.0**70, 2.0**-1022,
        4.35e-6, 1.0, 10.0, 100.0, 1.5, 65504.0, 3.4028234663852886e38, 1.401298464324817e-45,
    ]
    _assert_repr(_neighbours(named))
    texts = _kernel_texts([1e16, 1e15, 1e-4, 1e-5, 1e23, 5e-324, -0.0, 1.5e300])
    assert texts == ["1e+16", "1000000000000000.0", "0.0001", "1e-05", "1e+23", "5e-324", "-0.0",
                     "1.5e+300"]


@needs_kernel
def test_nan_of_any_sign_and_payload() -> None:
    nans = [struct.unpack("<d", struct.pack("<Q", b))[0] for b in (
        0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0xFFF0000000000001,
        0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x7FF4000000000000)]
    assert all(math.isnan(x) for x in nans)
    assert _kernel_texts(nans) == ["nan"] * len(nans)


@needs_kernel
def test_sequences_and_errors() -> None:
    """Any sequence (a tuple, an empty list) is taken; an item that is not exactly a float is
    a TypeError naming it: an int, a str, and float subclasses (numpy's float64 is one), whose
    repr may differ."""
    ft = _native.built().float_texts  # type: ignore[union-attr]
    assert ft([]) == []
    assert ft((0.5, -2.0)) == ["0.5", "-2.0"]
    for bad in ([1.0, 2], [1.0, "x"], [np.float64(1.0)], [True], [None]):
        with pytest.raises(TypeError, match=r"float_texts: item \d+ is of type [\w.]+, not float"):
            ft(bad)
    with pytest.raises(TypeError, match="float_texts: col must be a sequence"):
        ft(1.0)
    with pytest.raises(TypeError):
        ft()


def test_without_the_kernel() -> None:
    """With the kernel off (or not built) ``_native.float_texts`` is ``float.__repr__``'s
    list; with it on, the kernel's: the same texts."""
    values = _from_bits(np.random.default_rng(5).integers(0, 2**64, size=20_000, dtype=np.uint64))
    values += [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e16, 1e-5]
    want = list(map(float.__repr__, values))
    previous = _native.set_enabled(False)
    try:
        assert _native.float_texts(values) == want
        assert _native.float_texts(()) == []
        with pytest.raises(TypeError):
            _native.float_texts([1.0, 2])
    finally:
        _native.set_enabled(previous)
    assert _native.float_texts(values) == want


def _special_results() -> DiffResult:
    """Keys whose every float field is a different hard value (so each is written from a
    column of distinct floats), float32 and float64 difference dtypes, the log's casts."""
    rng = random.Random(9)
    pool = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e16, 9999999999999998.0, 1e-4,
            9.999999999999999e-05, 1e23, 0.1, 1 / 3, 1.7976931348623157e308, 3.5e38, 1e-45,
            2.2250738585072014e-308, 123.0, 1e15]
    fields = ["mean_abs", "max_abs", "min_abs", "mean_rel", "max_rel", "cosine", "rel_l2",
              "max_scaled", "worst_ref", "worst_other", "atol", "rtol"]
    base = _hand_built()[0]
    keys = []
    for i in range(300):
        pick = {f: rng.choice(pool) if rng.random() < 0.5 else rng.random() * 10.0 ** rng.randint(-40, 40)
                for f in fields}
        dtype = rng.choice(["float32", "float64", "float16"])
        keys.append(replace(base, key=f"k{i}", path=(), ref_dtype=dtype, other_dtype=dtype,
                            methods=("mean", "max", "min", "rel_l2", "cosine"),
                            thresholds={"mean": pick["mean_abs"], "max": rng.choice(pool)},
                            checks={"mean": True, "max": False}, **pick))
    return DiffResult(results=tuple(keys), options={}, created="2026")


def _writers(result: DiffResult) -> tuple[str, str, str, list[str]]:
    return (data.to_json(result, indent=2), data.to_json(result, indent=None),
            data.to_csv(result), list(log.iter_log_lines(result)))


def test_writers_with_and_without_the_kernel() -> None:
    """The JSON, CSV and log texts of hard float values: the batched writers (``float_texts``)
    equal the key-by-key reference writers (``float.__repr__``), kernel on or off."""
    result = _special_results()
    on = _writers(result)
    assert on[0] == "".join(data._iter_json_reference(result, indent=2))
    assert on[1] == "".join(data._iter_json_reference(result, indent=None))
    assert on[2] == data._to_csv_reference(result)
    assert on[3] == list(log._iter_log_lines_reference(result))
    previous = _native.set_enabled(False)
    try:
        off = _writers(result)
    finally:
        _native.set_enabled(previous)
    assert off == on


def test_the_committed_power_table_is_the_generators() -> None:
    """The 128-bit powers of ten in _float_text_pow10.h are what tools/gen_pow10_table.py computes
    with exact integers (which also checks the header's log approximations for every exponent)."""
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "gen_pow10_table.py"
    r = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to date" in r.stdout
