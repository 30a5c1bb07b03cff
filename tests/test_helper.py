"""reprod.ReprodDiffHelper: reprod_log's front door, its defaults, and where its lines go.

reprod_log 1.0.1 behaviour kept (read from its source): ``report`` prints to the sys.stdout current
at call time, writes the same lines to ``path`` (default ``./diff.txt``, overwritten, parent folder
created, ``None`` for console only) with the prefix ``[%Y/%m/%d %H:%M:%S] root INFO: ``, through
``logging`` (so pytest's caplog sees them). Fixed: it returns True/False, and calling it twice does
not print every line twice (reprod_log adds handlers to the root logger on every call).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import ReprodDiffHelper

_LINE = re.compile(r"^\[\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\] root INFO: (.*)$")

REF = {
    "logits": np.array([1.0, 2.0, 3.0], dtype=np.float32),
    "loss": np.array(0.5, dtype=np.float32),
}
CLOSE = {"logits": REF["logits"] + np.float32(2.0**-22), "loss": np.array(0.5, dtype=np.float32)}
FAR = {"logits": REF["logits"] + np.float32(2.0**-8), "loss": np.array(0.5, dtype=np.float32)}

EXPECTED_CLOSE = [
    "logits: ",
    f"\tmean diff: check passed: True, value: {np.float32(2.0**-22)}",
    "loss: ",
    "\tmean diff: check passed: True, value: 0.0",
    "diff check passed",
]


def _helper(tmp_path: Path, ref: dict, other: dict) -> ReprodDiffHelper:
    a = reprod.save(tmp_path / "ref.npy", ref)
    b = reprod.save(tmp_path / "other.npy", other)
    h = ReprodDiffHelper()
    h.compare_info(h.load_info(a), h.load_info(b))
    return h


def _messages(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        assert m is not None, f"line without reprod_log's prefix: {line!r}"
        out.append(m.group(1))
    return out


def test_report_returns_true_and_false(tmp_path: Path) -> None:
    assert _helper(tmp_path, REF, CLOSE).report(path=None) is True
    assert _helper(tmp_path, REF, FAR).report(path=None) is False


def test_report_defaults_write_diff_txt_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    h = _helper(tmp_path, REF, CLOSE)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert h.report() is True  # diff_method="mean", diff_threshold=1e-6, path="./diff.txt"
    assert sorted(p.name for p in work.iterdir()) == ["diff.txt"]
    assert _messages((work / "diff.txt").read_text()) == EXPECTED_CLOSE
    assert _messages(capsys.readouterr().out) == EXPECTED_CLOSE


def test_default_threshold_is_1e_6(tmp_path: Path) -> None:
    ref = {"x": np.zeros(4)}
    assert _helper(tmp_path, ref, {"x": np.full(4, 1e-6)}).report(path=None) is True
    assert _helper(tmp_path, ref, {"x": np.full(4, 1.5e-6)}).report(path=None) is False


def test_path_none_prints_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    h = _helper(tmp_path, REF, CLOSE)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    h.report(path=None)
    assert list(work.iterdir()) == []
    assert _messages(capsys.readouterr().out) == EXPECTED_CLOSE


def test_parent_folders_are_created(tmp_path: Path) -> None:
    log = tmp_path / "result" / "log" / "forward_diff.log"
    _helper(tmp_path, REF, CLOSE).report(path=str(log))
    assert _messages(log.read_text()) == EXPECTED_CLOSE


def test_file_is_overwritten(tmp_path: Path) -> None:
    log = tmp_path / "diff.txt"
    log.write_text("an earlier run\n" * 50)
    h = _helper(tmp_path, REF, FAR)
    h.report(diff_method="all", path=str(log))
    assert len(_messages(log.read_text())) == 9  # 2 keys x (1 + 3 methods) + verdict
    _helper(tmp_path, REF, CLOSE).report(path=str(log))
    assert _messages(log.read_text()) == EXPECTED_CLOSE


def test_report_twice_prints_each_line_once_and_adds_no_root_handler(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = _helper(tmp_path, REF, CLOSE)
    root = logging.getLogger()
    before = list(root.handlers)
    h.report(path=str(tmp_path / "a.txt"))
    first = capsys.readouterr().out
    h.report(path=str(tmp_path / "b.txt"))
    second = capsys.readouterr().out
    assert _messages(first) == EXPECTED_CLOSE
    assert _messages(second) == EXPECTED_CLOSE  # reprod_log would print every line twice here
    assert root.handlers == before
    # and the first file did not receive the second report's lines
    assert _messages((tmp_path / "a.txt").read_text()) == EXPECTED_CLOSE


def test_lines_reach_caplog(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _helper(tmp_path, REF, CLOSE).report(path=None)
    assert [r.getMessage() for r in caplog.records] == EXPECTED_CLOSE
    assert all(r.levelname == "INFO" for r in caplog.records)


def test_prints_to_the_stdout_current_at_call_time(tmp_path: Path) -> None:
    h = _helper(tmp_path, REF, CLOSE)
    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(first):
        h.report(path=None)
    with contextlib.redirect_stdout(second):
        h.report(path=None)
    assert _messages(first.getvalue()) == EXPECTED_CLOSE
    assert _messages(second.getvalue()) == EXPECTED_CLOSE


def test_report_methods_and_result(tmp_path: Path) -> None:
    h = _helper(tmp_path, REF, FAR)
    assert h.report(diff_method=["max", "min"], diff_threshold=1e-2, path=None) is True
    assert h.result.passed and h.result["logits"].methods == ("max", "min")
    assert h.report(diff_method="max", diff_threshold=2.0**-9, path=None) is False
    assert h.result.first_failure.key == "logits"


def test_compare_info_accepts_plain_dicts_like_reprod_log(
    capsys: pytest.CaptureFixture[str],
) -> None:
    h = ReprodDiffHelper()
    h.compare_info({"x": np.ones(2)}, {"x": np.ones(2)})
    assert h.report(path=None) is True


def test_missing_key_is_reported_not_asserted(capsys: pytest.CaptureFixture[str]) -> None:
    h = ReprodDiffHelper()
    h.compare_info({"x": np.ones(2), "y": np.ones(2)}, {"x": np.ones(2)})
    assert h.report(path=None) is False
    out = _messages(capsys.readouterr().out)
    assert out[0:2] == ["x: ", "\tmean diff: check passed: True, value: 0.0"]
    assert out[2] == "y: " and "missing" in out[3] and out[-1] == "diff check failed"


def test_load_info_of_missing_file_names_it(tmp_path: Path, assert_one_line_error: Any) -> None:
    p = tmp_path / "nope.npy"
    with pytest.raises(reprod.DumpFormatError) as info:
        ReprodDiffHelper().load_info(str(p))
    assert_one_line_error(info.value, p)
    assert isinstance(info.value, FileNotFoundError)  # what code written for reprod_log catches


def test_load_info_returns_a_plain_dict(tmp_path: Path) -> None:
    p = reprod.save(tmp_path / "ref.npy", REF)
    info = ReprodDiffHelper().load_info(str(p))
    assert type(info) is dict and list(info) == list(REF)
    info["logits"] *= 2  # writable; the file is not
    np.testing.assert_array_equal(reprod.load(p)["logits"], REF["logits"])


def test_diff_dict_holds_reprod_logs_statistics(tmp_path: Path) -> None:
    h = _helper(tmp_path, REF, CLOSE)
    assert h.diff_dict["logits"]["mean"] == np.float32(2.0**-22)
    assert set(h.diff_dict["loss"]) == {"mean", "max", "min"}


def test_report_before_compare_info_is_a_reprod_error() -> None:
    with pytest.raises(reprod.ReprodError):
        ReprodDiffHelper().report(path=None)
