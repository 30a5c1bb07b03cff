"""The pytest plugin, through pytester: regression fixture, --reprod-regen, --reprod-report, xdist."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points

import numpy as np
import pytest

import reprod

# In-process pytester runs drop the modules first imported inside them when they end; the next run
# would import a second copy of reprod.testing, beside the one its test modules already hold.
import reprod.diff.engine  # noqa: F401, E402
import reprod.pytest_plugin  # noqa: F401, E402
import reprod.report.table  # noqa: F401, E402
import reprod.storage  # noqa: F401, E402
import reprod.testing  # noqa: F401, E402

pytest_plugins = ["pytester"]

# Installed, the pytest11 entry point loads the plugin; from the work tree it must be named.
_INSTALLED = any(ep.name == "reprod" for ep in entry_points(group="pytest11"))
_PLUGIN = [] if _INSTALLED else ["-p", "reprod.pytest_plugin"]

MODEL = """
import numpy as np
import pytest

from reprod.testing import assert_aligned

def outputs(shift=0.0):
    x = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(4, 250)
    y = x.copy()
    y[2, 7] += np.float32(shift)
    return {"logits": y, "loss": np.float32(0.5)}

SHIFT = 0.0

def test_forward(reprod_regression):
    reprod_regression.check(outputs(SHIFT), threshold=1e-5, method="max")
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # the plugin module is imported here already (see above), too early for assert rewriting
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    return pytester.runpytest(*_PLUGIN, "-p", "no:cacheprovider", *quiet, *args)


def write_model(pytester: pytest.Pytester, shift: float = 0.0, extra: str = "") -> None:
    pytester.makepyfile(test_model=MODEL.replace("SHIFT = 0.0", f"SHIFT = {shift!r}") + extra)


# --------------------------------------------------------------------------------------------
# reprod_regression and --reprod-regen
# --------------------------------------------------------------------------------------------


def test_regen_writes_the_reference_then_the_check_passes(pytester: pytest.Pytester) -> None:
    write_model(pytester)
    ref = pytester.path / "test_model" / "test_forward.npz"
    result = run(pytester, "--reprod-regen")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*reprod references written*", f"wrote {ref} (test_model.py::test_forward)"]
    )
    dump = reprod.load(ref)
    assert list(dump) == ["logits", "loss"]
    np.testing.assert_array_equal(
        dump["logits"], np.linspace(-1, 1, 1000, dtype=np.float32).reshape(4, 250)
    )
    dump.close()

    run(pytester).assert_outcomes(passed=1)

    # a second regeneration says it refreshed an existing file
    run(pytester, "--reprod-regen").stdout.fnmatch_lines(
        [f"refreshed {ref} (test_model.py::test_forward)"]
    )


def test_a_drifted_value_fails_with_the_message(pytester: pytest.Pytester) -> None:
    write_model(pytester)
    run(pytester, "--reprod-regen").assert_outcomes(passed=1)
    write_model(pytester, shift=3e-4)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    ref = pytester.path / "test_model" / "test_forward.npz"
    result.stdout.fnmatch_lines(
        [
            "E * logits: max abs diff 3.000e-04 > 1.000e-05 at index (2, 7) (ref *, other *)",
            f"E * 1 of 2 keys not aligned (failed 1); ref: {ref}, other: this run",
        ]
    )
    # __tracebackhide__: the traceback ends on the user's line, not inside reprod
    result.stdout.fnmatch_lines(["*reprod_regression.check(outputs(SHIFT)*"])
    result.stdout.no_fnmatch_line("*reprod/testing.py*")
    result.stdout.no_fnmatch_line("*reprod/pytest_plugin.py*")


def test_a_failed_check_writes_the_obtained_values_beside_the_reference(
    pytester: pytest.Pytester,
) -> None:
    write_model(pytester)
    run(pytester, "--reprod-regen").assert_outcomes(passed=1)
    write_model(pytester, shift=3e-4)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    folder = pytester.path / "test_model"
    obtained = folder / "test_forward.obtained.npz"
    result.stdout.fnmatch_lines([f"E * this run's values: {obtained} (rename it to test_forward.npz*"])
    got, ref = reprod.load(obtained), reprod.load(folder / "test_forward.npz")
    assert sorted(got) == sorted(ref)
    assert not reprod.compare(ref, got, method="max", threshold=1e-5).passed
    # promoting it makes the check pass, and a passing check removes a stale obtained file
    obtained.replace(folder / "test_forward.npz")
    run(pytester).assert_outcomes(passed=1)
    assert not obtained.exists()


def test_ids_that_differ_only_in_replaced_characters_get_different_references(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_ids="""
        import numpy as np
        import pytest

        @pytest.mark.parametrize("case", ["p/q", "p_q"], ids=["p/q", "p_q"])
        def test_it(reprod_regression, case):
            reprod_regression.check({"x": np.full(2, float(len(case) + (case == "p/q")))})
        """
    )
    run(pytester, "--reprod-regen").assert_outcomes(passed=2)
    assert len(list((pytester.path / "test_ids").iterdir())) == 2
    run(pytester).assert_outcomes(passed=2)


def test_missing_reference_says_how_to_create_it(pytester: pytest.Pytester) -> None:
    write_model(pytester)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    ref = pytester.path / "test_model" / "test_forward.npz"
    result.stdout.fnmatch_lines(
        [
            f"*reprod: no reference dump {ref} for test_model.py::test_forward; create it from "
            "this run's values with: pytest --reprod-regen test_model.py::test_forward*"
        ]
    )
    assert not ref.exists()


def test_reference_names_for_params_classes_and_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_names="""
        import numpy as np
        import pytest

        @pytest.mark.parametrize("size", ["a/b c", "2"])
        def test_param(reprod_regression, size):
            reprod_regression.check(np.ones(3))

        class TestGroup:
            def test_method(self, reprod_regression):
                reprod_regression.check({"x": np.zeros(2)})
                reprod_regression.check({"y": np.ones(2)}, name="second")

        def test_twice(reprod_regression):
            reprod_regression.check({"x": np.zeros(2)})
            reprod_regression.check({"x": np.zeros(2)})
        """
    )
    result = run(pytester, "--reprod-regen")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        ["*this test already checked this reference; give each check its own name=*"]
    )
    folder = pytester.path / "test_names"
    import hashlib

    hashed = "test_param[a_b_c]-" + hashlib.sha1(b"test_param[a/b c]").hexdigest()[:8] + ".npz"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "TestGroup.test_method.npz",
        "second.npz",
        "test_param[2].npz",
        hashed,
        "test_twice.npz",
    ])
    assert list(reprod.load(folder / "test_param[2].npz")) == ["value"]
    run(pytester, "-k", "not twice").assert_outcomes(passed=3)


def test_default_tolerances_follow_the_dtype(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_dtype="""
        import numpy as np

        x = np.linspace(1, 2, 100)
        SHIFT = 0.0

        def test_half(reprod_regression):
            reprod_regression.check({"h": (x + SHIFT).astype(np.float16)})

        def test_single(reprod_regression):
            reprod_regression.check({"s": (x + SHIFT).astype(np.float32)})
        """
    )
    run(pytester, "--reprod-regen").assert_outcomes(passed=2)
    source = (pytester.path / "test_dtype.py").read_text().replace("SHIFT = 0.0", "SHIFT = 2e-5")
    (pytester.path / "test_dtype.py").write_text(source)
    result = run(pytester)
    # 2e-5 is inside float16's tolerance, outside float32's
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*s: * outside atol+rtol*|ref| (atol 1.000e-05, rtol 1.300e-06)*"])


# --------------------------------------------------------------------------------------------
# --reprod-report and the terminal summary
# --------------------------------------------------------------------------------------------

CHECKS = """

def test_direct_pass():
    x = np.arange(6.0)
    assert_aligned(x, x)

def test_direct_fail():
    assert_aligned({"w": np.zeros(3)}, {"w": np.array([0.0, 1.0, 0.0])})

def test_expected_failure():
    with pytest.raises(AssertionError):
        assert_aligned(np.zeros(2), np.ones(2))
"""


def test_json_report_holds_every_check_with_its_test(pytester: pytest.Pytester) -> None:
    write_model(pytester, extra=CHECKS)
    run(pytester, "--reprod-regen").assert_outcomes(passed=3, failed=1)
    report = pytester.path / "out" / "align.json"
    result = run(pytester, "--reprod-report", str(report))
    result.assert_outcomes(passed=3, failed=1)
    doc = json.loads(report.read_text())
    assert doc["passed"] is False
    assert doc["summary"] == {"checks": 4, "passed": 2, "failed": 2}
    rows = [(c["nodeid"], c["kind"], c["passed"]) for c in doc["checks"]]
    assert rows == [
        ("test_model.py::test_forward", "regression", True),
        ("test_model.py::test_direct_pass", "assert_aligned", True),
        ("test_model.py::test_direct_fail", "assert_aligned", False),
        ("test_model.py::test_expected_failure", "assert_aligned", False),
    ]
    forward = doc["checks"][0]
    assert forward["reference"] == str(pytester.path / "test_model" / "test_forward.npz")
    assert [k["key"] for k in forward["result"]["keys"]] == ["logits", "loss"]
    assert reprod.DiffResult.from_dict(doc["checks"][2]["result"])["w"].mismatched == 1
    assert doc["checks"][2]["message"].splitlines()[0].startswith("w: 1 / 3 elements (33.3%)")

    # the failing check of the failing test is listed; the one a passing test expected is counted
    result.stdout.fnmatch_lines(
        [
            "*reprod alignment checks failed*",
            "test_model.py::test_direct_fail (assert_aligned):",
            "    w: 1 / 3 elements (33.3%) outside atol+rtol*|ref| *",
            "    1 of 1 keys not aligned (mismatch 1); ref: ref, other: other",
            f"reprod: 4 alignment checks, 2 failed (1 in passing tests); report: {report}",
        ]
    )
    result.stdout.no_fnmatch_line("test_model.py::test_expected_failure (assert_aligned):")


def test_text_report_is_the_table(pytester: pytest.Pytester) -> None:
    write_model(pytester, extra=CHECKS)
    run(pytester, "--reprod-regen")
    report = pytester.path / "align.txt"
    run(pytester, "--reprod-report", str(report)).assert_outcomes(passed=3, failed=1)
    text = report.read_text()
    assert text.startswith("== test_model.py::test_forward (regression): passed\n")
    assert "== test_model.py::test_direct_fail (assert_aligned): FAILED" in text
    assert "w: 1 / 3 elements (33.3%)" in text
    # the table's header and verdict column
    assert "verdict" in text and "MISMATCH" in text
    assert text.endswith("4 alignment checks, 2 passed, 2 failed\n")


def test_quiet_when_every_check_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_ok="""
        import numpy as np
        from reprod.testing import assert_aligned

        def test_ok():
            assert_aligned(np.ones(3), np.ones(3))
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("reprod*")
    result.stdout.no_fnmatch_line("*reprod alignment*")


def test_help_lists_the_options(pytester: pytest.Pytester) -> None:
    run(pytester, "--help").stdout.fnmatch_lines(["*--reprod-regen*", "*--reprod-report=PATH*"])


# --------------------------------------------------------------------------------------------
# pytest-xdist: workers hand their checks to the controller, which writes one report
# --------------------------------------------------------------------------------------------


def test_xdist_workers_share_one_report(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_many="""
        import numpy as np
        import pytest
        from reprod.testing import assert_aligned

        @pytest.mark.parametrize("i", range(12))
        def test_check(i):
            assert_aligned(np.full(3, float(i)), np.full(3, float(i) + (i == 5)))
        """
    )
    report = pytester.path / "align.json"
    # the workers are fresh interpreters: they need the work tree on their path
    tree = os.path.dirname(os.path.dirname(reprod.__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(
        *_PLUGIN, "-p", "xdist", "-n", "2", "--reprod-report", str(report)
    )
    result.assert_outcomes(passed=11, failed=1)
    doc = json.loads(report.read_text())
    nodeids = sorted(c["nodeid"] for c in doc["checks"])
    assert nodeids == sorted(f"test_many.py::test_check[{i}]" for i in range(12))
    assert doc["summary"] == {"checks": 12, "passed": 11, "failed": 1}
    result.stdout.fnmatch_lines(
        ["*reprod alignment checks failed*", "test_many.py::test_check[[]5[]] *"]
    )


def test_terminal_summary_shortens_long_failures() -> None:
    from reprod.pytest_plugin import _shorten

    lines = [f"k{i}: NaN: 0 in ref, 1 in other" for i in range(15)] + ["15 of 15 keys not aligned"]
    assert _shorten(lines) == [*lines[:10], "... 5 more failing keys", "15 of 15 keys not aligned"]
    assert _shorten(lines[-12:]) == lines[-12:]
