"""Errors that escaped as tracebacks: a .pth without torch, lone surrogates in keys and file names
(with --output, --html, and on stdout under strict UTF-8). Each is one line, or a report."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import reprod

LONE = "lone\udcffkey"  # what a non-UTF-8 byte in a file name becomes (surrogateescape)


def _py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, errors="backslashreplace")


@pytest.mark.parametrize("command", ["reprod.cli", "reprod.align.cli"])
def test_a_pth_without_torch_is_one_line_naming_the_extra(tmp_path, command: str) -> None:
    torch = pytest.importorskip("torch")
    pth = tmp_path / "m.pth"
    torch.save({"w": torch.ones(2)}, pth)
    other = str(tmp_path / ("m.pth" if command == "reprod.cli" else "m.pdparams"))
    p = _py(f"import sys; sys.modules['torch'] = None\nfrom {command} import main\n"
            f"sys.exit(main([{str(pth)!r}, {other!r}]))")
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and 'pip install "reprod-align[torch]"' in p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture
def surrogate_dumps(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, {LONE: np.ones(2)}, allow_pickle=True)
    np.save(b, {LONE: np.zeros(2)}, allow_pickle=True)
    return a, b


def test_lone_surrogate_keys_reach_every_output(tmp_path, surrogate_dumps) -> None:
    a, b = surrogate_dumps
    out, page = tmp_path / "o.txt", tmp_path / "o.html"
    p = _py(f"from reprod.cli import main; import sys; sys.exit(main([{str(a)!r}, {str(b)!r}, "
            f"'--output', {str(out)!r}, '--html', {str(page)!r}]))")
    assert p.returncode == 1, p.stderr
    assert "lone\\udcffkey" in out.read_text(encoding="utf-8")
    assert page.stat().st_size > 1000
    strict = subprocess.run([sys.executable, "-m", "reprod", str(a), str(b)], capture_output=True,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert strict.returncode == 1 and b"lone\\udcffkey" in strict.stdout and not strict.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="non-UTF-8 file names: Linux file systems")
def test_a_non_utf8_file_name_in_a_compared_folder(tmp_path) -> None:
    for side, value in (("ref", 1.0), ("other", 2.0)):
        folder = tmp_path / side
        folder.mkdir()
        reprod.save(os.path.join(os.fsencode(folder), b"step\xff.npz").decode("utf-8", "surrogateescape"),
                    {"x": np.full(2, value)})
    out = tmp_path / "o.json"
    p = subprocess.run([sys.executable, "-m", "reprod", str(tmp_path / "ref"), str(tmp_path / "other"),
                        "--format", "json", "--output", str(out)], capture_output=True)
    assert p.returncode == 1 and b"Traceback" not in p.stderr
    assert "step\\udcff.npz" in out.read_text(encoding="utf-8")
