"""The diff log file (``ReprodDiffHelper.report(path=...)``, ``emit_log_lines``): the bytes
``logging.FileHandler`` writes, written atomically: a full disk raises one line naming the file
and keeps the earlier log (a ``FileHandler`` truncated it first, printed a traceback a line, and
raised an ``OSError`` naming no file)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reprod
from reprod import ReprodDiffHelper
from reprod.report import log as log_mod

ROOT = Path(__file__).resolve().parents[2]


def test_the_file_holds_what_a_file_handler_writes(tmp_path):
    lines = ["x: ", "\tmean diff: check passed: True, value: 0.0", "ünïcode ✓", "diff check passed"]
    reference = tmp_path / "reference.log"
    handler = logging.FileHandler(reference, "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter(log_mod._FORMAT, datefmt=log_mod._DATEFMT))
    logger = logging.getLogger(log_mod.LOGGER_NAME)
    logger.addHandler(handler)  # sees the same records, formatted by the same rule
    try:
        log_mod.emit_log_lines(lines, str(tmp_path / "sub" / "diff.log"), console=False)
    finally:
        logger.removeHandler(handler)
        handler.close()
    written = (tmp_path / "sub" / "diff.log").read_bytes()
    assert written == reference.read_bytes()
    assert written.decode().splitlines()[2].endswith("root INFO: ünïcode ✓")


_FULL = r"""
import resource, signal, sys
import numpy as np
import pytest
import reprod
from reprod import ReprodDiffHelper

folder = sys.argv[1]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
helper = ReprodDiffHelper()
info = helper.load_info(folder + "/a.npy")
helper.compare_info(info, info)
resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY))
try:
    helper.report(path=folder + "/diff.log")
except reprod.WriteError as exc:
    print("WriteError", exc)
"""


def test_a_full_disk_raises_one_line_and_keeps_the_earlier_log(tmp_path):
    reprod.save(tmp_path / "a.npy", {f"k{i}": np.arange(10.0) for i in range(50)})
    (tmp_path / "diff.log").write_text("the earlier log\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _FULL, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert out[-1] == (f"WriteError {tmp_path}/diff.log: writing failed: "
                       f"{os.strerror(27)} (errno 27); nothing was replaced")
    assert out[-2].endswith("root INFO: diff check passed")  # the console got every line
    assert "Logging error" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "diff.log").read_text() == "the earlier log\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "diff.log"]


def test_the_helpers_log_is_still_written_through_its_folder(tmp_path):
    reprod.save(tmp_path / "a.npy", {"x": np.ones(3)})
    helper = ReprodDiffHelper()
    info = helper.load_info(str(tmp_path / "a.npy"))
    helper.compare_info(info, info)
    assert helper.report(path=str(tmp_path / "new" / "folder" / "diff.log")) is True
    text = (tmp_path / "new" / "folder" / "diff.log").read_text()
    assert text.splitlines()[-1].endswith("root INFO: diff check passed")


def test_a_write_failing_midway_keeps_the_console_whole_and_raises_once(tmp_path, monkeypatch,
                                                                        capsys):
    import errno

    from reprod.storage import atomic

    real = atomic.AtomicFile

    class Failing(real):  # its file refuses the third record: the disk filled up meanwhile
        def __init__(self, p):
            super().__init__(p)
            inner, count = self.file, [0]

            class File:
                def write(self, data):
                    count[0] += 1
                    if count[0] >= 3:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return inner.write(data)

                def __getattr__(self, name):
                    return getattr(inner, name)

            self.file = File()

    monkeypatch.setattr(atomic, "AtomicFile", Failing)
    target = tmp_path / "diff.log"
    target.write_text("the earlier log\n")
    lines = [f"line {i}" for i in range(6)]
    with pytest.raises(reprod.WriteError) as info:
        log_mod.emit_log_lines(lines, str(target), propagate=False)
    assert str(info.value) == (f"{target}: writing failed: {os.strerror(errno.ENOSPC)} "
                               f"(errno {errno.ENOSPC}); nothing was replaced")
    printed = capsys.readouterr()
    assert [x.split(": ", 1)[1] for x in printed.out.splitlines()] == lines
    assert "Logging error" not in printed.err
    assert target.read_text() == "the earlier log\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff.log"]
