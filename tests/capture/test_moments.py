"""The fingerprints the pairing by call order reads of every capture (``_values.moments``): the
kernel's one pass against numpy in float64, on both loop widths, and the numpy path it falls back
to for what the kernel does not read (half precision, byte-swapped, strided arrays)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from reprod import _native
from reprod.capture import _values
from reprod.capture.naming import _same_array

KERNEL = _native.built()
needs_kernel = pytest.mark.skipif(KERNEL is None or not hasattr(KERNEL, "moments"),
                                  reason="moments is in the compiled kernel")


@pytest.fixture(params=["avx2", "base"])
def isa(request: Any, monkeypatch: Any) -> Any:
    if KERNEL is None or not hasattr(KERNEL, "moments"):
        pytest.skip("moments is in the compiled kernel")
    monkeypatch.setattr(_native, "_enabled", True)
    try:
        previous = KERNEL.set_isa(request.param)
    except ValueError:
        pytest.skip(f"no {request.param} here")
    yield request.param
    KERNEL.set_isa(previous)


def _oracle(a: np.ndarray) -> tuple[float, float, float, float]:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    return float(x.sum()), float(np.abs(x).sum()), float(x.min()), float(x.max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 1000, 100_003])
def test_kernel_moments_match_float64(isa: str, dtype: Any, n: int) -> None:
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 3 + 0.5).astype(dtype)
    got = KERNEL.moments(a, "f" if dtype == np.float32 else "d")
    want = _oracle(a)
    assert got[2:] == want[2:]  # the extremes are elements: exact
    # summed in float64 in other orders: within the rounding of n additions
    assert got[0] == pytest.approx(want[0], rel=1e-12, abs=1e-12 * want[1])
    assert got[1] == pytest.approx(want[1], rel=1e-12)


def test_kernel_reads_unaligned_buffers(isa: str) -> None:
    raw = np.random.default_rng(1).standard_normal(4001).astype(np.float32).tobytes()
    for offset in (4, 8, 12):
        a = np.frombuffer(raw, np.float32, offset=offset)
        got, want = KERNEL.moments(a, "f"), _oracle(a)
        assert got[2:] == want[2:] and got[1] == pytest.approx(want[1], rel=1e-12)


@pytest.mark.parametrize("where", [0, 5, 16, 99])
def test_kernel_nan_makes_the_sums_nan(isa: str, where: int) -> None:
    a = np.arange(100, dtype=np.float32) - 40
    a[where] = np.nan
    s, sa, lo, hi = KERNEL.moments(a, "f")
    rest = np.delete(a, where)
    assert math.isnan(s) and math.isnan(sa)
    assert (lo, hi) == (float(rest.min()), float(rest.max()))


def test_kernel_infinities_and_empty(isa: str) -> None:
    a = np.array([1.0, np.inf, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], np.float64)
    assert KERNEL.moments(a, "d") == (math.inf, math.inf, -2.0, math.inf)
    a[0] = -np.inf
    s, sa, lo, hi = KERNEL.moments(a, "d")
    assert math.isnan(s) and sa == math.inf and (lo, hi) == (-math.inf, math.inf)
    assert KERNEL.moments(np.empty(0, np.float32), "f") == (0.0, 0.0, math.inf, -math.inf)


@needs_kernel
def test_kernel_rejects_bad_kinds_and_lengths() -> None:
    with pytest.raises(ValueError, match="moments: bad kind or length"):
        KERNEL.moments(np.zeros(3, np.float32), "h")
    with pytest.raises(ValueError, match="moments: bad kind or length"):
        KERNEL.moments(b"\0" * 6, "f")


def _numpy_moments(a: np.ndarray, monkeypatch: Any) -> Any:
    with monkeypatch.context() as m:
        m.setattr(_native, "_enabled", False)
        return _values.moments(a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_moments_kernel_and_numpy_agree(isa: str, dtype: Any, monkeypatch: Any) -> None:
    a = (np.random.default_rng(2).standard_normal((4, 3, 17, 19)) * 2 - 0.3).astype(dtype)
    fast, slow = _values.moments(a), _numpy_moments(a, monkeypatch)
    assert fast[2:] == slow[2:]
    np.testing.assert_allclose(fast[:2], slow[:2], rtol=1e-5)
    np.testing.assert_allclose(_values.stats(a), (a.mean(), np.abs(a).mean(), np.abs(a).max()),
                               rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda a: a.astype(np.float16),                 # half precision: numpy, summed in float32
    lambda a: a.astype(">f4"),                      # byte-swapped: the kernel reads native order
    lambda a: a[:, ::2],                            # strided
    lambda a: np.asfortranarray(a),                 # column-major
])
def test_what_the_kernel_does_not_read_goes_to_numpy(make: Any) -> None:
    a = np.random.default_rng(3).standard_normal((6, 40)).astype(np.float32) + 0.25
    b = make(a)
    x = np.asarray(b, dtype=np.float64)
    got = _values.moments(b)
    np.testing.assert_allclose(got, (x.mean(), np.abs(x).mean(), x.min(), x.max()), rtol=1e-3)


def test_values_moments_of_what_is_not_a_float_array() -> None:
    assert _values.moments(np.arange(5)) is None
    assert _values.moments(np.zeros(0, np.float32)) is None
    assert _values.moments("text") is None
    assert _values.stats(np.array([True, False])) is None


@pytest.mark.parametrize("kernel", [True, False])
def test_relu_stats_are_those_of_the_relu(kernel: bool, monkeypatch: Any) -> None:
    monkeypatch.setattr(_native, "_enabled", kernel and KERNEL is not None)
    a = np.random.default_rng(4).standard_normal(5000).astype(np.float32) - 0.2
    got = _values.relu_stats(_values.moments(a))
    np.testing.assert_allclose(got, _values.stats(np.maximum(a, 0)), rtol=1e-5)
    neg = -np.abs(a) - 1
    assert _values.relu_stats(_values.moments(neg)) == (0.0, 0.0, 0.0)


def test_same_array_reads_past_the_first_elements() -> None:
    a = np.random.default_rng(5).standard_normal(2000).astype(np.float32)
    b = a.copy()
    assert _same_array(a, b) and _same_array(a, a)
    b[1500] += 1  # the first 256 elements agree, the whole does not
    assert not _same_array(a, b)
    assert not _same_array(a, a.astype(np.float64)) and not _same_array(a, a.reshape(2, -1))


@pytest.mark.parametrize("kernel", [True, False])
def test_same_array_takes_a_nan_carried_through_as_the_same_data(kernel: bool, monkeypatch: Any) -> None:
    # an identity call (a Dropout in eval) passing a port's NaN on is still an identity: the
    # pairing must not lose its anchors exactly when a capture holds the NaN a bug made
    if kernel and (KERNEL is None or not hasattr(KERNEL, "same_bytes")):
        pytest.skip("same_bytes is in the compiled kernel")
    monkeypatch.setattr(_native, "_enabled", kernel)
    c = np.random.default_rng(7).standard_normal((40, 50)).astype(np.float32)
    c[3, 4] = np.nan
    assert _same_array(c, c.copy())
    d = c.copy()
    d[39, 49] += 1
    assert not _same_array(c, d)
    strided = np.asfortranarray(c)  # not C-contiguous: numpy's comparison, the same answer
    assert _same_array(strided, c.copy(order="F")) and not _same_array(strided, np.asfortranarray(d))
    ints = np.arange(600).reshape(20, 30)
    assert _same_array(ints, ints.copy()) and not _same_array(ints, ints + (ints == 599))


@pytest.mark.parametrize("kernel", [True, False])
def test_varies_agrees_with_comparing_every_element_to_the_first(kernel: bool, monkeypatch: Any) -> None:
    monkeypatch.setattr(_native, "_enabled", kernel)
    inf, nan = np.inf, np.nan
    for values in ([1.0, 1.0, 1.0], [1.0, 1.0, 2.0], [inf, inf], [inf, -inf], [-inf, -inf, -inf],
                   [nan, nan], [1.0, nan], [nan, 1.0], [0.0, -0.0], [3e38, 3e38, 3e38, 3e38], [5.0]):
        for dtype in (np.float32, np.float64, np.float16):
            with np.errstate(over="ignore"):  # 3e38 is inf in float16: a case too
                a = np.array(values, dtype)
            want = a.size > 1 and not bool((a == a.flat[0]).all())
            assert _values.varies(a) == want, (values, dtype)
    assert not _values.varies(np.arange(5))  # not float: nothing the pairing reads


@pytest.mark.parametrize("suffix", ["", "[0]", ".0"])
def test_the_pairing_fingerprint_reads_a_call_s_first_part_however_it_is_keyed(suffix: str
                                                                              ) -> None:
    """``_fingerprint`` read ``in``/``in.0`` only: a call of several inputs (``in[0]``, ``in[1]``:
    an attention handed its mask) had no input fingerprint, and its values never helped pair
    it where shapes left a choice. It now reads as ``_values.part_value`` does."""
    from reprod.capture.naming import _fingerprint

    x = np.random.default_rng(6).standard_normal((3, 4)).astype(np.float32)
    y = x * 2 + 1
    fp = _fingerprint({f"a.in{suffix}": x, "a.in[1]": x[:1], f"a.out{suffix}": y}, "a")
    assert fp == (_values.stats(x), _values.stats(y))
    assert _fingerprint({"a.in": np.arange(3)}, "a") == (None, None)
