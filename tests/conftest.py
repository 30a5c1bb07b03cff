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


# --- the "slow" marker ----------------------------------------------------------------------------
# Tests that take seconds each: whole example runs, scripts run in subprocesses under two
# libraries, fuzzing loops, memory measurements, killed writers, headless Chromium. CI runs them
# all (the README's test command); `python -m pytest -q -m "not slow"` is the quick subset. They
# are named here by node id prefix (file, or file::test) so that the list lives in one place.
SLOW = (
    "tests/examples/",  # MobileNetV3 in torch and paddle, every step, several injected bugs
    "tests/compat/test_dropin_pipelines.py",  # scripts run under reprod_log and reprod
    "tests/test_import.py",  # fresh interpreters importing torch / paddle
    "tests/align/test_convert_cli.py::test_runs_as_a_program",
    "tests/test_cli_weights.py::test_pth_against_converted_pdparams",
    "tests/storage/test_fuzz_readers.py::test_mutated_dumps_load_right_or_fail_cleanly",
    "tests/storage/test_fuzz_readers.py::test_mutated_pdparams_read_right_or_fail_cleanly",
    "tests/diff/test_hostile_numbers.py::test_many_tiny_keys_in_memory",
    "tests/test_logger.py::test_stream_holds_nothing_in_memory",
    "tests/test_logger.py::test_streaming_state_per_key_is_small",
    "tests/test_logger.py::test_stream_memory_stays_flat_past_the_spill",
    "tests/storage/test_write_faults.py::test_sigkill_mid_save_leaves_a_complete_dump",
    "tests/test_pytest_plugin.py::test_xdist_workers_share_one_report",
    "tests/diff/test_metrics_blocks.py::test_kernel_and_numpy_paths_agree_on_a_large_pair",
    "tests/test_cli_trees.py::test_unreachable_scheduler_is_one_line",  # a connection's timeout
    "tests/report/test_float_texts.py::test_random_bit_patterns",  # fuzzing
    "tests/report/test_float_texts.py::test_the_committed_power_table_is_the_generators",
    "tests/storage/test_storage.py::test_random_trees_round_trip",  # fuzzing
    "tests/storage/test_npy_writer_props.py::test_random_trees_match_np_save",  # fuzzing
    "tests/storage/test_npz_writev.py::test_a_zip64_dump_is_cut_back_to_its_end_records",  # 70,000 members
    "tests/storage/test_npz_keylog_fork.py",  # forked children
    "tests/storage/test_write_faults.py::test_sigterm_mid_save_leaves_no_temporary",  # killed writers
    "tests/capture/test_gpu_check_script.py",  # a fresh interpreter with torch
    "tests/report/test_json_fast.py::test_random_comparisons_of_dump_files",  # fuzzing
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        nodeid = item.nodeid.replace("\\", "/")
        if not nodeid.startswith("tests/"):  # run from inside tests/: ids lack the prefix
            nodeid = "tests/" + nodeid
        # the HTML report's tests in headless Chromium (they skip where it is absent)
        if nodeid.startswith(SLOW) or "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
