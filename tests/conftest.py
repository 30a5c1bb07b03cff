"""Shared fixtures: the two dump formats, a bit-exact tree comparison, the one-line error rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import pytest


def _assert_same_tree(got: Any, want: Any, where: str = "") -> None:
    """Same keys in the same order, same dtypes and shapes, and the same bits (NaN payloads too)."""
    if isinstance(want, Mapping):
        assert isinstance(got, Mapping), f"{where}: expected a mapping, got {type(got).__name__}"
        assert list(got) == list(want), f"{where}: key order {list(got)} != {list(want)}"
        for k in want:
            _assert_same_tree(got[k], want[k], f"{where}/{k}")
        return
    want = np.asarray(want)
    assert isinstance(got, np.ndarray), f"{where}: expected an ndarray, got {type(got).__name__}"
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
    assert got.tobytes() == want.tobytes(), f"{where}: values differ"


@pytest.fixture(params=["npy", "npz"])
def fmt(request: pytest.FixtureRequest) -> str:
    """The file suffix of each dump format: reprod_log's pickled ``.npy`` and the native ``.npz``."""
    return request.param


@pytest.fixture
def assert_same_tree() -> Callable[[Any, Any], None]:
    return _assert_same_tree


def _assert_one_line_error(exc: BaseException, path: Any) -> None:
    """reprod's rule for input errors: one line that names the file."""
    msg = str(exc)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg, f"message does not name {path}: {msg!r}"


@pytest.fixture
def assert_one_line_error() -> Callable[[BaseException, Any], None]:
    return _assert_one_line_error


@pytest.fixture(scope="session")
def torch() -> Any:
    """torch, imported once; tests that need it skip where it is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def paddle() -> Any:
    """paddle, imported once (slow); tests that need it skip where it is not installed."""
    return pytest.importorskip("paddle")
