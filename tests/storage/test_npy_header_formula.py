"""The ``.npy`` headers the ``.npz`` writer formats itself (``npz_members._formula_header`` in
Python, the kernel's ``npy_header_entry`` inside ``npz_pack``) are numpy's own bytes: checked
against ``numpy.lib.format`` for every plain dtype over shapes of every length and digit count,
and through whole files written with and without the formula."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

import reprod
from reprod import _native
from reprod.storage import npz_members, npz_writer

KERNEL = _native.built()
needs_kernel = pytest.mark.skipif(KERNEL is None or not hasattr(KERNEL, "npz_pack"),
                                  reason="the compiled kernel is not built")

DTYPES = [np.dtype(c) for c in "?bBhHiIlLqQefdFD"] + [np.dtype(">i4"), np.dtype(">f8")]
# every first-axis digit count numpy pads for (1 to 19), zero-sized axes, up to 64 dimensions
SHAPES = ([(), (0,), (1,), (9,), (10,)] + [(10**k + 3,) for k in range(2, 19)]
          + [(2, 3), (0, 10**12), (10**15, 0), (1,) * 30, (3,) * 64, (7, 1, 2, 3, 4, 5, 6, 7)])


def numpy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _fixed_clock(monkeypatch):
    monkeypatch.setattr(npz_members, "_FIXED_DOS", (0, 33))
    previous = _native.set_enabled(True)
    yield
    _native.set_enabled(previous)


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_the_formula_is_numpys_header(dt) -> None:
    assert npz_members._formula_holds(dt.str)
    for shape in SHAPES:
        assert npz_members._formula_header(dt.str, shape) == numpy_header(dt.str, shape), shape


def test_a_numpy_that_lays_headers_out_otherwise_keeps_its_own(monkeypatch) -> None:
    """Where the probe finds another text, every header is numpy's (here: a formula without the
    growth padding, as numpy before 1.24 wrote it)."""
    monkeypatch.setattr(npz_members, "_GROWTH", 0)
    monkeypatch.setattr(npz_members, "_FORMULA_HOLDS", {})
    monkeypatch.setattr(npz_members, "_WRITTEN_HEADERS", {})
    assert not npz_members._formula_holds("<f4")
    a = np.zeros((3, 4), np.float32)
    assert npz_members._npy_header(a) == numpy_header("<f4", (3, 4))


def _arrays() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for i, dt in enumerate(DTYPES):
        for j, shape in enumerate(SHAPES):
            if int(np.prod(shape, dtype=object)) * dt.itemsize < 60_000:
                out[f"a{i}_{j}"] = np.ones(shape, dt)
        out[f"sized{i}"] = np.arange(1 + 37 * i, dtype=dt)  # one more shape per dtype
    return out


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


@needs_kernel
def test_the_kernel_writes_numpys_headers(tmp_path, monkeypatch) -> None:
    """Every member's header as numpy writes it for the array, the file byte for byte the one
    written with every header from Python (``_BATCH_DESCRS`` None), read back equal."""
    tree = _arrays()
    monkeypatch.setattr(npz_writer, "_BATCH_HEADERS", {})
    monkeypatch.setattr(npz_writer, "_BATCH_DESCRS", [None] * len(npz_writer._BATCH_DTYPES))
    reprod.save(tmp_path / "warm.npz", tree)  # the first shape of each dtype fills the descrs
    assert sum(d is not None for d in npz_writer._BATCH_DESCRS) == len(npz_writer._BATCH_DESCRS)
    monkeypatch.setattr(npz_writer, "_BATCH_HEADERS", {})  # every other header from the kernel
    calls = []
    real = npz_writer._header_and_crc
    monkeypatch.setattr(npz_writer, "_header_and_crc", lambda a: calls.append(a) or real(a))
    reprod.save(tmp_path / "kernel.npz", tree)
    assert not [a for a in calls if a.dtype.byteorder not in "=|"], "native dtypes: all in C"
    monkeypatch.setattr(npz_writer, "_BATCH_HEADERS", {})
    monkeypatch.setattr(npz_writer, "_BATCH_DESCRS", None)
    reprod.save(tmp_path / "python.npz", tree)
    assert (tmp_path / "kernel.npz").read_bytes() == (tmp_path / "python.npz").read_bytes()
    members = _members(tmp_path / "kernel.npz")
    for key, a in tree.items():
        raw = members[f"{key}.npy"]
        want = numpy_header(a.dtype.str, a.shape)
        assert raw[:len(want)] == want, key
        assert raw[len(want):] == a.tobytes(), key
    back = reprod.load(tmp_path / "kernel.npz", verify=True)
    with np.load(tmp_path / "kernel.npz") as plain:
        for key, a in tree.items():
            np.testing.assert_array_equal(back[key], a)
            assert plain[key].dtype == a.dtype and plain[key].shape == a.shape
