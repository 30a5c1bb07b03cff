"""Files travel both ways between reprod and the real reprod_log 1.0.1.

- every ``.npy`` reprod writes loads in ``reprod_log.ReprodDiffHelper().load_info`` with the same
  values and dtypes;
- every file reprod_log's ``ReprodLogger.save`` writes (nested dicts too), and the same dict pickled
  with protocols 2 to 5 or by numpy 1.x, is read by ``reprod.load`` with the same values.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger

reprod_log = pytest.importorskip("reprod_log")  # imports paddle (slow): once for this module


def _sample() -> dict:
    rng = np.random.default_rng(3)
    return {
        "logits": rng.normal(size=(8, 10)).astype(np.float32),
        "loss": np.array(0.25, dtype=np.float32),
        "labels": rng.integers(0, 10, 8),
        "mask": rng.integers(0, 2, (4, 4)).astype(bool),
        "u8": rng.integers(0, 256, 300).astype(np.uint8),
        "half": rng.normal(size=7).astype(np.float16),
        "f64": np.array([np.nan, np.inf, -np.inf, -0.0, 1e-310]),
        "cplx": (rng.normal(size=3) + 1j).astype(np.complex64),
        "fortran": np.asfortranarray(rng.normal(size=(16, 9))),
        "big_endian": np.arange(70, dtype=">i4"),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "grads": {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
                  "bn": {"mean": np.zeros(4), "var": np.ones(4)}},
    }  # fmt: skip


def _assert_plain_equal(got, want, where="") -> None:
    """got is reprod_log's world: plain dicts and ndarrays."""
    assert isinstance(got, dict), where
    assert list(got) == list(want), where
    for k, w in want.items():
        if isinstance(w, dict):
            _assert_plain_equal(got[k], w, f"{where}/{k}")
        else:
            # numpy's own unpickler turns big-endian arrays native: compare in native byte order
            w = np.asarray(w)
            native = w.dtype.newbyteorder("=")
            assert isinstance(got[k], np.ndarray), f"{where}/{k}"
            assert got[k].dtype.newbyteorder("=") == native, f"{where}/{k}: {got[k].dtype}"
            assert got[k].shape == w.shape, f"{where}/{k}"
            assert got[k].astype(native).tobytes() == w.astype(native).tobytes(), f"{where}/{k}"


# ---------------------------------------------------------------------------------------------
# reprod writes, reprod_log reads
# ---------------------------------------------------------------------------------------------


def test_reprod_save_loads_in_reprod_log(tmp_path) -> None:
    data = _sample()
    p = reprod.save(tmp_path / "ours.npy", data)
    _assert_plain_equal(reprod_log.ReprodDiffHelper().load_info(p), data)


def test_reprod_logger_save_loads_in_reprod_log(tmp_path, torch, paddle) -> None:
    lg = ReprodLogger()
    lg.add("np", np.arange(6.0).reshape(2, 3))
    lg.add("torch", torch.arange(6.0).reshape(2, 3).T)
    lg.add("paddle", paddle.arange(6, dtype="int32"))
    lg.add("bf16", torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    lg.add("scalar", 3.5)
    lg.add("nested", {"a": torch.ones(2), "b": {"c": np.int8(4)}})
    lg.save(str(tmp_path / "forward_torch"))  # reprod_log users pass names without the suffix
    got = reprod_log.ReprodDiffHelper().load_info(str(tmp_path / "forward_torch.npy"))
    want = {
        "np": np.arange(6.0).reshape(2, 3),
        "torch": np.arange(6.0, dtype=np.float32).reshape(2, 3).T.copy(),
        "paddle": np.arange(6, dtype=np.int32),
        "bf16": np.array([1.5, -2.0], dtype=np.float32),
        "scalar": np.array(3.5),
        "nested": {"a": np.ones(2, dtype=np.float32), "b": {"c": np.array(4, dtype=np.int8)}},
    }
    _assert_plain_equal(got, want)


def test_reprod_log_compares_and_reports_reprod_files(tmp_path, capsys) -> None:
    """The tutorial pipeline, with reprod writing both sides and reprod_log checking them."""
    a, b = ReprodLogger(), ReprodLogger()
    a.add("logits", np.ones((2, 3), dtype=np.float32))
    b.add("logits", np.ones((2, 3), dtype=np.float32) + 1e-7)
    a.save(str(tmp_path / "torch.npy"))
    b.save(str(tmp_path / "paddle.npy"))
    helper = reprod_log.ReprodDiffHelper()
    helper.compare_info(helper.load_info(str(tmp_path / "torch.npy")),
                        helper.load_info(str(tmp_path / "paddle.npy")))  # fmt: skip
    helper.report(path=str(tmp_path / "diff.txt"))
    assert "diff check passed" in (tmp_path / "diff.txt").read_text()


# ---------------------------------------------------------------------------------------------
# reprod_log writes, reprod reads
# ---------------------------------------------------------------------------------------------


def test_reprod_log_logger_files_load_in_reprod(tmp_path, assert_same_tree) -> None:
    data = _sample()
    lg = reprod_log.ReprodLogger()
    for k, v in data.items():
        if isinstance(v, dict):
            lg.data[k] = v  # add() asserts an ndarray; nested dicts go in through .data
        else:
            lg.add(k, v)
    lg.save(str(tmp_path / "sub" / "theirs.npy"))
    with reprod.load(tmp_path / "sub" / "theirs.npy") as d:
        assert_same_tree(d, data)
        assert d["fortran"].flags.f_contiguous  # the layout comes back too, not just the values


def _pickle_file(path, data, protocol: int, *, numpy1: bool = False) -> None:
    """What ``np.save(path, data)`` writes, with a chosen pickle protocol."""
    arr = np.empty((), dtype=object)
    arr[()] = data
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    body = pickle.dumps(arr, protocol=protocol)
    if numpy1:
        # numpy 1.x pickled its reconstructors from numpy.core; GLOBAL lines carry no length
        assert protocol <= 3
        body = body.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n_reconstruct" in body
    with open(path, "wb") as f:
        f.write(header.getvalue() + body)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickle_protocols_load_identically(tmp_path, protocol, assert_same_tree) -> None:
    data = _sample()
    p = tmp_path / f"proto{protocol}.npy"
    _pickle_file(p, data, protocol)
    _assert_plain_equal(reprod_log.ReprodDiffHelper().load_info(str(p)), data)  # the file is sound
    with reprod.load(p) as d:
        assert_same_tree(d, data)


@pytest.mark.parametrize("protocol", [2, 3])
def test_numpy1_files_load_identically(tmp_path, protocol, assert_same_tree) -> None:
    data = _sample()
    data["scalar"] = np.float64(2.5)  # pickled through multiarray.scalar
    p = tmp_path / "old.npy"
    _pickle_file(p, data, protocol, numpy1=True)
    with reprod.load(p) as d:
        assert_same_tree(d, {**data, "scalar": np.array(2.5)})


def test_np_save_scalars_and_python_numbers_in_the_dict(tmp_path, assert_same_tree) -> None:
    """reprod_log's add only takes arrays, but people np.save dicts with scalars and numbers."""
    data = {"s32": np.float32(1.5), "i8": np.int8(-3), "py_int": 7, "py_float": 0.5, "flag": True}
    np.save(tmp_path / "scalars.npy", data, allow_pickle=True)
    with reprod.load(tmp_path / "scalars.npy") as d:
        assert_same_tree(d, {k: np.array(v) for k, v in data.items()})
