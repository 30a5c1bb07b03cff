"""What a new user meets first: --version, short reprs, --failed-only/--max-rows, messages that name
the user's file once and give advice that works, singular counts, and the install and test
commands of the README kept in step with pyproject.toml, constraints.txt and .ci/run."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reprod
from reprod.cli import main as diff_main
from reprod.diff.result import DiffResult, KeyResult
from reprod.messages import format_failures
from reprod.report.table import render_table

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                      os.environ.get("PYTHONPATH")])))


@pytest.fixture
def twelve(tmp_path: Path) -> tuple[str, str]:
    """Two dumps of 12 keys; k03 and k07 differ."""
    ref = {f"k{i:02d}": np.full((2, 3), float(i), np.float32) for i in range(12)}
    other = {k: v.copy() for k, v in ref.items()}
    other["k03"] += 1e-2
    other["k07"] += 1e-3
    a, b = str(tmp_path / "ref.npz"), str(tmp_path / "other.npz")
    reprod.save(a, ref)
    reprod.save(b, other)
    return a, b


def _rows(text: str) -> list[str]:
    """The table's key rows (after the header and its rule, before the last line)."""
    return [ln for ln in text.splitlines()[2:] if re.match(r"^(>>|! |  )\s+k\d\d\b", ln)]


# --- --version --------------------------------------------------------------------------------


def test_reprod_diff_version(capsys) -> None:
    assert diff_main(["--version"]) == 0
    assert capsys.readouterr().out == f"reprod {reprod.__version__}\n"


def test_reprod_convert_version(capsys) -> None:
    from reprod.align.cli import main as convert_main

    with pytest.raises(SystemExit) as exc:
        convert_main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"reprod {reprod.__version__}\n"


# --- reprs ------------------------------------------------------------------------------------


def test_result_reprs_are_one_short_line(twelve) -> None:
    result = reprod.compare(*twelve)
    assert repr(result) == "<DiffResult 12 keys: 10 passed, 2 failed; first failure k03>"
    assert str(result) == repr(result)
    first = repr(result.first_failure)
    assert first.startswith("<KeyResult 'k03' failed: mean 1.000e-02 > 1.000e-06") and "\n" not in first
    assert len(first) < 130
    assert repr(result["k00"]).startswith("<KeyResult 'k00' passed: mean 0.000e+00 <= 1.000e-06")
    passing = DiffResult(tuple(r for r in result if r.passed))
    assert repr(passing) == "<DiffResult 10 keys: all passed>"
    assert repr(DiffResult(passing.results[:1])) == "<DiffResult 1 key: passed>"
    assert repr(DiffResult(())) == "<DiffResult 0 keys>"
    long = KeyResult(key="w", passed=False, status="failed", reason="x" * 500)
    assert len(repr(long)) < 130 and repr(long).endswith("...>")


# --- --failed-only, --max-rows ------------------------------------------------------------------


def test_failed_only_lists_only_the_failing_keys(twelve, capsys) -> None:
    assert diff_main([*twelve, "--failed-only"]) == 1
    out = capsys.readouterr().out
    assert [r.split()[1] for r in _rows(out)] == ["k03", "k07"]
    assert out.rstrip().splitlines()[-1].startswith("12 keys compared, 10 passed, 2 failed: FAILED")


def test_max_rows_caps_the_table_and_says_how_many_are_left(twelve, capsys) -> None:
    assert diff_main([*twelve, "--max-rows", "5"]) == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert len(_rows("\n".join(lines))) == 5
    assert lines[-2] == "... 7 more rows"
    assert lines[-1].startswith("12 keys compared")
    # together: at most N of the failing keys
    assert diff_main([*twelve, "--failed-only", "--max-rows", "1"]) == 1
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert [r.split()[1] for r in _rows("\n".join(lines))] == ["k03"]
    assert lines[-2] == "... 1 more row"


def test_max_rows_bad_values_and_other_formats_are_usage_errors(twelve, capsys) -> None:
    assert diff_main([*twelve, "--max-rows", "-1"]) == 2
    assert "expected a row count" in capsys.readouterr().err
    assert diff_main([*twelve, "--max-rows", "x"]) == 2
    capsys.readouterr()
    assert diff_main([*twelve, "--failed-only", "--format", "json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reprod-diff: error: --failed-only and --max-rows shape the table"), err


def test_render_table_max_rows(twelve) -> None:
    result = reprod.compare(*twelve)
    full = render_table(result)
    assert render_table(result, max_rows=12) == full == render_table(result, max_rows=None)
    capped = render_table(result, max_rows=0).splitlines()
    assert capped == ["... 12 more rows", result.summary_line()]
    with pytest.raises(ValueError, match="max_rows"):
        render_table(result, max_rows=-1)


# --- messages ---------------------------------------------------------------------------------


def test_singular_counts() -> None:
    from reprod.report.session import session_text as _text_report

    ok = KeyResult(key="a", passed=True, status="passed", reason="", max_abs=0.0)
    assert format_failures(DiffResult((ok,))).startswith("the 1 key aligned;")
    assert format_failures(DiffResult((ok, ok))).startswith("all 2 keys aligned;")
    check = {"nodeid": "t.py::test", "kind": "assert_aligned", "passed": True, "reference": None,
             "message": "", "result": DiffResult((ok,)).to_dict()}
    assert _text_report([check], 0).endswith("\n1 alignment check, 1 passed, 0 failed\n")
    assert _text_report([check, check], 0).endswith("\n2 alignment checks, 2 passed, 0 failed\n")


def test_html_error_names_the_users_path_not_a_temporary(twelve, tmp_path, capsys) -> None:
    target = tmp_path / "report.html"
    target.mkdir()  # a folder where the page should go: the final rename fails
    assert diff_main([*twelve, "--html", str(target), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reprod-diff: error: {target}: "), err
    assert ".tmp" not in err and "\n" not in err.strip()


def test_pth_note_names_the_file_once_and_gives_advice_that_works(tmp_path, capsys) -> None:
    torch = pytest.importorskip("torch")
    from reprod.align import write_pdparams

    fc = torch.nn.Linear(3, 2)
    pth = str(tmp_path / "model.pth")
    torch.save(fc.state_dict(), pth)
    pdparams = str(tmp_path / "model.pdparams")
    write_pdparams(pdparams, {"weight": fc.weight.detach().numpy().T.copy(),
                              "bias": fc.bias.detach().numpy()})
    assert diff_main([pth, pdparams, "--quiet"]) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if ln.startswith("reprod-diff: note: ")]
    assert notes, err
    for note in notes:
        assert note.count(pth) == 1, note
        assert "(--model)" not in note and "reprod-convert --model" in note, note


@pytest.mark.slow
def test_convert_quiet_prints_nothing_not_even_paddles_ccache_warning(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("paddle")
    sys.path.insert(0, str(REPO / "tests" / "align"))
    try:
        from align_twins import TorchNet
    finally:
        sys.path.remove(str(REPO / "tests" / "align"))
    src = tmp_path / "model.pth"
    torch.save(TorchNet().state_dict(), src)
    twins = REPO / "tests" / "align" / "align_twins.py"
    proc = subprocess.run(
        [sys.executable, "-m", "reprod.align.cli", str(src), str(tmp_path / "m.pdparams"),
         "--model", f"{twins}:TorchNet", "--paddle-model", f"{twins}:PaddleNet", "-q"],
        env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


# --- the README's commands, pyproject.toml, constraints.txt, .ci/run ----------------------------

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else None


@pytest.fixture(scope="module")
def project() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        req = line.split("#")[0].split(";")[0].strip()
        if req:
            name, _, version = req.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.strip().lower()] = version.strip()
    return pins


def test_extras_ask_for_ranges_and_constraints_pin_them(project) -> None:
    extras = project["project"]["optional-dependencies"]
    assert sorted(extras["example"]) == ["paddlepaddle>=2.6", "torch>=2.1"]
    for name, reqs in extras.items():
        for req in reqs:
            assert "==" not in req, f"extra {name}: {req} pins a version (constraints.txt does)"
    assert any(r.startswith("pytest-xdist") for r in extras["test"])
    assert {"mkdocs", "mkdocstrings[python]"} <= {re.split(r"[<>=!~]", r)[0] for r in extras["docs"]}
    pins = _pins()
    for name in ("torch", "paddlepaddle", "pytest", "pytest-xdist", "mkdocs", "mkdocstrings"):
        assert name in pins, name
    assert pins["torch"] == "2.13.0"  # the CPU build on the machines' disk


def test_tests_run_in_parallel_and_slow_is_a_known_marker(project, request) -> None:
    ini = project["tool"]["pytest"]["ini_options"]
    assert re.search(r"(^|\s)-n\s*(auto|logical|\d+)", ini["addopts"]), ini["addopts"]
    assert any(m.startswith("slow:") for m in request.config.getini("markers"))


def test_quick_start_and_ci_use_the_constraints() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick = readme[readme.index("## Quick start"):]
    quick = quick[: quick.index("```", quick.index("```bash") + 3)]
    commands = [ln for ln in quick.splitlines() if ln.startswith("python3 -m venv")]
    assert len(commands) == 2, commands
    assert '-c constraints.txt -e ".[example]"' in commands[0] and "run.py" in commands[0]
    assert '-c constraints.txt -e ".[test]"' in commands[1]
    assert commands[1].endswith(".venv/bin/python -m pytest -q")
    assert all(" -q -e" not in c and "pip install -q" not in c for c in commands)
    assert 'pytest -q -m "not slow"' in readme
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"pip install .*-c constraints\.txt", ci)
    assert "\npython -m pytest -q\n" in ci and "mkdocs build --strict" in ci


def test_docs_pages_exist_and_the_reference_covers_the_public_modules() -> None:
    config = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    for page in re.findall(r":\s*([\w-]+\.md)\s*$", config, flags=re.M):
        assert (REPO / "docs" / page).is_file(), page
    api = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    entries = set(re.findall(r"^::: ([\w.]+)", api, flags=re.M))
    assert {"reprod", "reprod.testing", "reprod.capture", "reprod.align",
            "reprod.diff.criteria"} <= entries
    guide = (REPO / "docs" / "porting-guide.md").read_text(encoding="utf-8")
    for step in ("Structure", "Weights", "Forward", "Loss", "Backward", "Training", "Layers"):
        assert re.search(rf"^## \d\. {step}\b", guide, flags=re.M), step


def test_the_docs_extension_fences_examples() -> None:
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_doctests",
                                                  REPO / "docs" / "griffe_doctests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Prose.\n\n>>> x = f(a)\n>>> x[\"mean\"]\n0.5\n\nMore, see :func:`g`.\n  >>> y\n"
    fenced = module.fence_examples(module._ROLE.sub(r"`\1`", text))
    assert fenced == ("Prose.\n\n```python\n>>> x = f(a)\n>>> x[\"mean\"]\n0.5\n```\n\n"
                      "More, see `g`.\n  ```python\n  >>> y\n  ```")
