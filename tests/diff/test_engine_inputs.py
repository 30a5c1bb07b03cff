"""reprod.compare takes what record() and ReprodLogger hold, not only dicts and paths."""

from __future__ import annotations

import numpy as np
import pytest

import reprod
from reprod.errors import ReprodError


def test_loggers_compare_as_the_values_they_hold():
    ref, other, noise = reprod.ReprodLogger(), reprod.ReprodLogger(), reprod.ReprodLogger()
    ref.add("a", np.float32([1.0, 2.0]))
    other.add("a", np.float32([1.0, 2.5]))
    noise.add("a", np.float64([1.0, 2.0000001]))
    by_logger = reprod.compare(ref, other, method="max", threshold=1e-3)
    by_dict = reprod.compare(ref.data, other.data, method="max", threshold=1e-3)
    assert not by_logger.passed and by_logger["a"].max_abs == by_dict["a"].max_abs == 0.5
    assert reprod.compare(ref, other, noise=noise)["a"].noise_multiple is not None


def test_a_streaming_logger_says_which_file_to_compare(tmp_path):
    path = tmp_path / "run.npz"
    log = reprod.ReprodLogger(stream_to=path)
    log.add("a", np.ones(3))
    with pytest.raises(ReprodError, match=r"streaming ReprodLogger holds no values; close\(\) it "
                                          r"and compare the file it writes, .*run\.npz"):
        reprod.compare(log, {"a": np.ones(3)})
    log.close()
    assert reprod.compare(path, {"a": np.ones(3)}).passed
