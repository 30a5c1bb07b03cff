"""reprod's ReprodDiffHelper writes the log file reprod_log 1.0.1 writes, byte for byte.

Both tools read the same ``.npy`` files (written with ``np.save`` of a dict, as reprod_log's
ReprodLogger does) and report with the same arguments; the files are compared after stripping the
``[YYYY/mm/dd HH:MM:SS] `` timestamp of each line.

The real reprod_log runs in one subprocess for the whole module (it imports paddle, which is slow).
reprod_log adds a stdout and a file handler to the root logger on every ``report`` call, so later
reports also write into the files of earlier ones; the subprocess removes the handlers each call
added before the next case, which gives each case the file a fresh process would write.

Data is chosen so that reprod_log's float32 mean is exact (differences that are multiples of a
power of two, element counts that are powers of two, or float64 data): reprod accumulates in
float64, so on arbitrary float32 data the last printed digit of a mean may differ, which has its
own test. The deliberate differences (NaN, uint8 wrap-around, transposes, per-method verdicts) are
tested last, each showing reprod_log's line and reprod's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import reprod

pytest.importorskip("reprod_log")

_STAMP = re.compile(rb"^\[\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\] ", re.M)

# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

_rng = np.random.default_rng(2024)


def _f32(
    shape: tuple[int, ...], steps: tuple[int, ...], unit: float = 2.0**-20
) -> tuple[np.ndarray, np.ndarray]:
    """float32 values in [1, 2) and a copy moved by ``k * unit`` (k drawn from ``steps``): every
    difference, sum and (power-of-two count) mean is exact in float32."""
    ref = (_rng.integers(2**20, 2**21, size=shape) * 2.0**-20).astype(np.float32)
    moves = _rng.choice(steps, size=shape) * unit
    other = (ref.astype(np.float64) + moves).astype(np.float32)
    assert (other.astype(np.float64) - ref.astype(np.float64) == moves).all()  # no rounding
    return ref, other


def _f64(
    shape: tuple[int, ...], steps: tuple[int, ...], unit: float = 2.0**-12
) -> tuple[np.ndarray, np.ndarray]:
    ref = _rng.integers(-4000, 4000, size=shape) / 8.0
    return ref, ref + _rng.choice(steps, size=shape) * unit


# one float32 step below 2**-20: below in float64 and in float32 (reprod_log under numpy 2 compares
# a float32 value with the threshold rounded to float32)
_BELOW = float(np.nextafter(np.float32(2.0**-20), np.float32(0)))

a_pass, a_small = _f32((8, 8), (0, 1))  # mean <= 2**-20 < 1e-6 <= max
a_fail = _f32((4, 16), (1, 2, 16))  # every difference >= 2**-20: min 9.5e-07
logits64 = _f64((5, 7), (0, 1, 3))
loss32 = (np.float32(1.25), np.float32(1.25 + 2**-20))

_CASES: dict[str, tuple[dict, dict, dict]] = {
    # name: (ref, other, report kwargs)
    "mean_pass": ({"logits": a_pass}, {"logits": a_small}, {}),
    "mean_fail": ({"logits": a_fail[0]}, {"logits": a_fail[1]}, {"diff_threshold": 1e-6}),
    "max": (
        {"x": a_pass, "y": a_fail[0]},
        {"x": a_small, "y": a_fail[1]},
        {"diff_method": "max", "diff_threshold": 2.0**-19},
    ),
    "min": (
        {"x": a_pass, "y": a_fail[0]},
        {"x": a_small, "y": a_fail[1]},
        {"diff_method": "min", "diff_threshold": 1e-6},
    ),
    "all_pass": (
        {"x": a_pass, "y": a_fail[0]},
        {"x": a_small, "y": a_fail[1]},
        {"diff_method": "all", "diff_threshold": 1e-3},
    ),
    "all_fail_from_min": (
        {"y": a_fail[0]},
        {"y": a_fail[1]},
        {"diff_method": "all", "diff_threshold": 1e-7},
    ),
    "list_first_passes": (
        {"x": a_pass},
        {"x": a_small},
        {"diff_method": ["mean", "max"], "diff_threshold": 1e-6},
    ),
    "list_min_max": (
        {"x": a_pass, "y": a_fail[0]},
        {"x": a_small, "y": a_fail[1]},
        {"diff_method": ["min", "max"], "diff_threshold": 1e-2},
    ),
    # the threshold itself passes in both: max is exactly 2**-20 here
    "threshold_equal": (
        {"x": a_pass},
        {"x": a_small},
        {"diff_method": "max", "diff_threshold": 2.0**-20},
    ),
    "threshold_just_below": (
        {"x": a_pass},
        {"x": a_small},
        {"diff_method": "max", "diff_threshold": _BELOW},
    ),
    "float64_all": (
        {"logits": logits64[0]},
        {"logits": logits64[1]},
        {"diff_method": "all", "diff_threshold": 1e-4},
    ),
    "mixed_keys": (
        {"a": a_pass, "b": a_fail[0], "c": logits64[0], "loss": np.asarray(loss32[0])},
        {"a": a_small, "b": a_fail[1], "c": logits64[1], "loss": np.asarray(loss32[1])},
        {"diff_threshold": 1e-5},
    ),
    "nested": (
        {
            "out": {"logits": a_pass, "aux": {"x": logits64[0]}},
            "loss": np.asarray(loss32[0]),
            "grads": {"w": a_fail[0]},
        },
        {
            "out": {"logits": a_small, "aux": {"x": logits64[1]}},
            "loss": np.asarray(loss32[1]),
            "grads": {"w": a_fail[1]},
        },
        {"diff_method": "all", "diff_threshold": 1e-4},
    ),
    "int_labels": (
        {"labels": np.array([1, 5, 9, 2], dtype=np.int64)},
        {"labels": np.array([1, 7, 9, 2], dtype=np.int64)},
        {"diff_method": "all", "diff_threshold": 0.4},
    ),  # min passes, max and mean fail
    "float32_against_float64": (
        {"x": a_pass},
        {"x": a_small.astype(np.float64)},
        {"diff_method": "all"},
    ),
    # every tutorial's loss check: a (1,) loss from older Paddle against a torch scalar
    "loss_shape_1_vs_scalar": (
        {"loss": np.array([loss32[0]])},
        {"loss": np.asarray(loss32[1])},
        {"diff_method": "all", "diff_threshold": 1e-6},
    ),
}

# reprod_log does these wrong; each has a test below showing both lines
_DIFFERENCES: dict[str, tuple[dict, dict, dict]] = {
    "nan": (
        {"x": np.array([1.0, np.nan], dtype=np.float32)},
        {"x": np.array([1.0, np.nan], dtype=np.float32)},
        {"diff_method": "mean"},
    ),
    "uint8": (
        {"x": np.array([0, 10], dtype=np.uint8)},
        {"x": np.array([255, 10], dtype=np.uint8)},
        {"diff_method": "max", "diff_threshold": 2},
    ),
    "transpose": (
        {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
        {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3).T.copy()},
        {"diff_method": "mean"},
    ),
    # max fails, mean passes: reprod_log prints the mean line "check passed: False" too
    "per_method": ({"x": a_pass}, {"x": a_small}, {"diff_method": "all", "diff_threshold": 5e-7}),
    # arbitrary float32 data: reprod_log's float32 mean and reprod's float64 mean may differ in the
    # last printed digit
    "float32_mean": (
        {"x": _rng.normal(size=(33, 97)).astype(np.float32)},
        {"x": None},  # filled below
        {"diff_method": "all", "diff_threshold": 1e-3},
    ),
}
_x = _DIFFERENCES["float32_mean"][0]["x"]
_DIFFERENCES["float32_mean"][1]["x"] = (_x + _rng.normal(scale=1e-4, size=_x.shape)).astype(
    np.float32
)

_ALL = {**_CASES, **_DIFFERENCES}

# ---------------------------------------------------------------------------------------------
# running both tools
# ---------------------------------------------------------------------------------------------

_REPROD_LOG_RUNNER = textwrap.dedent(
    """
    import json, logging, sys
    from reprod_log import ReprodDiffHelper

    root = logging.getLogger()
    for case in json.load(open(sys.argv[1])):
        before = list(root.handlers)
        try:
            helper = ReprodDiffHelper()
            a = helper.load_info(case["ref"])
            b = helper.load_info(case["other"])
            helper.compare_info(a, b)
            helper.report(path=case["log"], **case["kwargs"])
        finally:
            # report() added a stdout and a file handler to the root logger: drop them, or the
            # next case's lines land in this case's file too
            for h in list(root.handlers):
                if h not in before:
                    root.removeHandler(h)
                    h.close()
    """
)


def _strip(raw: bytes) -> bytes:
    return _STAMP.sub(b"", raw)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes, bool]]:
    """name -> (reprod_log's file, reprod's file, reprod's return value), timestamps stripped."""
    root = tmp_path_factory.mktemp("golden")
    jobs = []
    for name, (ref, other, kwargs) in _ALL.items():
        d = root / name
        d.mkdir()
        np.save(d / "ref.npy", ref, allow_pickle=True)
        np.save(d / "other.npy", other, allow_pickle=True)
        jobs.append(
            {
                "ref": str(d / "ref.npy"),
                "other": str(d / "other.npy"),
                "log": str(d / "reprod_log" / "diff.txt"),
                "kwargs": kwargs,
            }
        )
    (root / "cases.json").write_text(json.dumps(jobs))
    (root / "runner.py").write_text(_REPROD_LOG_RUNNER)
    proc = subprocess.run(
        [sys.executable, str(root / "runner.py"), str(root / "cases.json")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, tuple[bytes, bytes, bool]] = {}
    for name, (_, _, kwargs) in _ALL.items():
        d = root / name
        helper = reprod.ReprodDiffHelper()
        helper.compare_info(
            helper.load_info(str(d / "ref.npy")), helper.load_info(str(d / "other.npy"))
        )
        ok = helper.report(path=str(d / "reprod" / "diff.txt"), **kwargs)
        out[name] = (
            _strip((d / "reprod_log" / "diff.txt").read_bytes()),
            _strip((d / "reprod" / "diff.txt").read_bytes()),
            ok,
        )
    return out


# ---------------------------------------------------------------------------------------------
# identical logs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_CASES))
def test_log_file_is_byte_identical_to_reprod_log(logs: dict, name: str) -> None:
    theirs, ours, ok = logs[name]
    assert theirs.startswith(b"root INFO: ")  # the stamp was there and is gone
    assert ours == theirs
    assert ok is theirs.endswith(b"diff check passed\n")


def test_cases_cover_passing_and_failing_reports(logs: dict) -> None:
    verdicts = {name: logs[name][2] for name in _CASES}
    assert any(verdicts.values()) and not all(verdicts.values())
    # a few cases whose verdict is known by construction, so the byte comparison cannot pass on
    # two empty or trivially equal files
    assert verdicts["mean_pass"] and not verdicts["mean_fail"]
    assert verdicts["threshold_equal"] and not verdicts["threshold_just_below"]


def test_nested_log_shape(logs: dict) -> None:
    lines = logs["nested"][1].decode().splitlines()
    assert lines[:3] == [
        "root INFO: out",
        "root INFO: \tlogits: ",
        "root INFO: \t\tmin diff: " + lines[2].split("min diff: ", 1)[1],
    ]
    assert "root INFO: \taux" in lines and "root INFO: \t\tx: " in lines


# ---------------------------------------------------------------------------------------------
# deliberate differences
# ---------------------------------------------------------------------------------------------


def _lines(raw: bytes) -> list[str]:
    return [line.removeprefix("root INFO: ") for line in raw.decode().splitlines()]


def test_nan_passes_in_reprod_log_and_fails_in_reprod(logs: dict) -> None:
    theirs, ours, ok = logs["nan"]
    assert _lines(theirs) == [
        "x: ",
        "\tmean diff: check passed: True, value: nan",
        "diff check passed",
    ]
    assert _lines(ours) == [
        "x: ",
        "\tmean diff: check passed: False, value: nan",
        "diff check failed",
    ]
    assert ok is False


def test_uint8_wraps_in_reprod_log_not_in_reprod(logs: dict) -> None:
    theirs, ours, ok = logs["uint8"]
    # reprod_log: uint8(0) - uint8(255) == 1, so a difference of 255 reads as 1 and passes
    assert _lines(theirs) == [
        "x: ",
        "\tmax diff: check passed: True, value: 1",
        "diff check passed",
    ]
    assert _lines(ours) == [
        "x: ",
        "\tmax diff: check passed: False, value: 255",
        "diff check failed",
    ]
    assert ok is False


def test_transpose_is_silently_accepted_by_reprod_log_and_fails_in_reprod(logs: dict) -> None:
    theirs, ours, ok = logs["transpose"]
    assert _lines(theirs) == [
        "w: ",
        "\tmean diff: check passed: True, value: 0.0",
        "diff check passed",
    ]
    got = _lines(ours)
    assert got[0] == "w: " and got[-1] == "diff check failed"
    assert got[1].startswith("\tmean diff: check passed: False, value: None (shape: ")
    assert "transpose" in got[1]
    assert ok is False


def test_each_method_line_carries_its_own_verdict(logs: dict) -> None:
    theirs, ours, ok = logs["per_method"]
    a, b = _CASES["mean_pass"][0]["logits"], _CASES["mean_pass"][1]["logits"]
    d = np.abs(a - b)
    assert d.max() > 5e-7 >= d.mean()  # max fails, mean passes
    # reprod_log: once max failed, the mean line says False too
    assert _lines(theirs) == [
        "x: ",
        f"\tmin diff: check passed: True, value: {d.min()}",
        f"\tmax diff: check passed: False, value: {d.max()}",
        f"\tmean diff: check passed: False, value: {d.mean()}",
        "diff check failed",
    ]
    assert _lines(ours) == [
        "x: ",
        f"\tmin diff: check passed: True, value: {d.min()}",
        f"\tmax diff: check passed: False, value: {d.max()}",
        f"\tmean diff: check passed: True, value: {d.mean()}",
        "diff check failed",
    ]
    assert ok is False


_VALUE = re.compile(r"value: (\S+)$")


def test_float32_mean_may_differ_only_in_the_last_digit(logs: dict) -> None:
    theirs, ours, ok = logs["float32_mean"]
    t, o = _lines(theirs), _lines(ours)
    assert len(t) == len(o) == 5 and ok is True
    for lt, lo in zip(t, o):
        mt, mo = _VALUE.search(lt), _VALUE.search(lo)
        assert (mt is None) == (mo is None)
        if mt is None:
            assert lt == lo
            continue
        assert lt[: mt.start()] == lo[: mo.start()]  # same key, method and verdict
        if "mean" not in lt:
            assert mt.group(1) == mo.group(1)  # min and max are exact in both
        else:
            # reprod's value is the float64 mean rounded once to float32; reprod_log's float32
            # pairwise sum is within a few float32 ulps of it
            a, b = _DIFFERENCES["float32_mean"][0]["x"], _DIFFERENCES["float32_mean"][1]["x"]
            exact = np.abs(b.astype(np.float64) - a.astype(np.float64)).mean()
            assert mo.group(1) == f"{np.float32(exact)}"
            np.testing.assert_allclose(float(mt.group(1)), float(mo.group(1)), rtol=4e-7)


def test_reprod_log_runner_output_is_per_case(logs: dict) -> None:
    # the runner's handler clean-up works: no case's file holds another case's lines
    for name, (theirs, _, _) in logs.items():
        assert theirs.count(b"diff check") == 1, name
