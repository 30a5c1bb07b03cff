"""pytest plugin: the ``reprod_regression`` fixture, ``--reprod-regen`` and ``--reprod-report``.

Registered through the ``pytest11`` entry point, so installing reprod is enough::

    def test_forward(reprod_regression):
        out = model(x)
        reprod_regression.check({"logits": out, "loss": loss}, threshold=1e-5)

    pytest --reprod-regen                  # write or refresh the reference dumps
    pytest --reprod-report align.json      # every alignment check of the session, one report

Under pytest-xdist each worker hands its checks to the controller through xdist's
``workeroutput`` channel and only the controller writes the report, once, atomically: no
worker ever touches the file, so parallel runs cannot interleave or corrupt it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import pytest

from . import testing
from .diff.result import DiffResult
from .report.session import checks_text, write_session_report

__all__ = ["RegressionChecker", "reprod_regression"]

_WORKER_KEY = "reprod_checks"
_TERMINAL_KEYS = 10  # failing keys shown per check in the terminal summary


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reprod", "reprod alignment checks")
    group.addoption(
        "--reprod-regen",
        action="store_true",
        default=False,
        help="reprod_regression: write or refresh the reference dumps instead of comparing.",
    )
    group.addoption(
        "--reprod-report",
        metavar="PATH",
        default=None,
        help="write every alignment check of the session to PATH "
        "(JSON; the text table when PATH ends in .txt or .log).",
    )


def pytest_configure(config: pytest.Config) -> None:
    recorder = _Recorder(config)
    config.pluginmanager.register(recorder, "reprod-recorder")
    config.stash[_RECORDER] = recorder


_RECORDER = pytest.StashKey["_Recorder"]()


class _Recorder:
    """Collects every alignment check of the session, with the node id of the test that ran it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.checks: list[dict[str, Any]] = []
        self.written: list[tuple[str, str, str]] = []  # (node id, path, "wrote" | "refreshed")
        self.outcomes: dict[str, str] = {}
        self.nodeid: Optional[str] = None
        # resolved now: a test may chdir before the report is written at the end
        report = config.getoption("reprod_report")
        self.report: Optional[str] = None if not report else os.path.abspath(os.fspath(report))
        testing._push_listener(self.record)

    # -- what runs where ---------------------------------------------------------------------
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Optional[pytest.Item]) -> Any:
        self.nodeid = item.nodeid
        try:
            yield
        finally:
            self.nodeid = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.when == "call":
            self.outcomes.setdefault(report.nodeid, report.outcome)

    def record(self, result: DiffResult, kind: str, reference: Optional[str]) -> None:
        check: dict[str, Any] = {
            "nodeid": self.nodeid,
            "kind": kind,
            "reference": reference,
            "passed": result.passed,
            "message": testing.format_failures(result),
        }
        if self.report:  # only the report needs every statistic
            check["result"] = result.to_dict()
        self.checks.append(check)

    # -- xdist: workers hand their checks to the controller ----------------------------------
    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        output = getattr(node, "workeroutput", None) or {}
        payload = output.get(_WORKER_KEY)
        if payload:
            data = json.loads(payload)
            self.checks.extend(data["checks"])
            self.written.extend(tuple(w) for w in data["written"])
            self.outcomes.update(data["outcomes"])

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller reports
            workeroutput[_WORKER_KEY] = json.dumps(
                {"checks": self.checks, "written": self.written, "outcomes": self.outcomes}
            )
            return
        if self.report:
            write_session_report(self.report, self.checks)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        testing._pop_listener(self.record)

    # -- terminal ----------------------------------------------------------------------------
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):
            return
        tr = terminalreporter
        if self.written:
            tr.write_sep("-", "reprod references written")
            for nodeid, path, how in self.written:
                tr.write_line(f"{how} {path} ({nodeid})")
        failed = [c for c in self.checks if not c["passed"]]
        # a failed check inside a passing test was expected (pytest.raises): count it, not list it
        listed = [c for c in failed if self.outcomes.get(c["nodeid"] or "") != "passed"]
        if listed:
            tr.write_sep("-", "reprod alignment checks failed")
            for c in listed:
                where = c["nodeid"] or "<outside a test>"
                tr.write_line(f"{where} ({c['kind']}):")
                for line in _shorten(c["message"].splitlines()):
                    tr.write_line("    " + line)
        expected = len(failed) - len(listed)
        path = self.report
        if self.checks and (listed or path):
            tail = f"reprod: {checks_text(len(self.checks))}, {len(failed)} failed"
            if expected:
                tail += f" ({expected} in passing tests)"
            if path:
                tail += f"; report: {path}"
            tr.write_line(tail)


def _shorten(lines: list[str], keep: int = _TERMINAL_KEYS) -> list[str]:
    """The first failing keys and the summary line; the report and the assertion hold them all."""
    if len(lines) <= keep + 2:
        return lines
    return [*lines[:keep], f"... {len(lines) - 1 - keep} more failing keys", lines[-1]]


# --------------------------------------------------------------------------------------------
# the regression fixture
# --------------------------------------------------------------------------------------------


def _file_stem(name: str) -> str:
    """A portable file name for a test or check name. Parametrize ids may hold "/", spaces or
    anything else; where characters had to be replaced, a hash of the name keeps ids such as
    ``p/q`` and ``p_q`` on two different files."""
    stem = re.sub(r"[^\w.\[\]-]", "_", name)
    if stem != name:
        import hashlib

        stem += "-" + hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return stem


class RegressionChecker:
    """Compares a test's values with a reference dump stored beside the test file.

    The reference of ``tests/test_model.py::test_forward`` is
    ``tests/test_model/test_forward.npz`` (reprod's native format; ``name=`` picks another
    file name in that folder, for a second check in one test). ``pytest --reprod-regen`` writes
    the references from the values of this run instead of comparing.
    """

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._checked: set[Path] = set()
        self.regen: bool = bool(request.config.getoption("reprod_regen"))

    def path_for(self, name: Optional[str] = None) -> Path:
        """The reference file a ``check(name=name)`` in this test uses."""
        node = self._request.node
        if name is None:
            name = node.name
            if self._request.cls is not None:  # two classes may share a method name
                name = f"{self._request.cls.__name__}.{name}"
        test_file = Path(self._request.path)
        return test_file.parent / test_file.stem / (_file_stem(name) + ".npz")

    def check(
        self,
        data: Any,
        *,
        name: Optional[str] = None,
        method: Any = None,
        threshold: Optional[float] = None,
        atol: Optional[float] = None,
        rtol: Optional[float] = None,
        per_key: Any = None,
        equal_nan: bool = False,
    ) -> Optional[DiffResult]:
        """Compare ``data`` (a mapping of key -> tensor/array/number, or a single one, stored as
        key ``"value"``) with this test's reference, as :func:`reprod.testing.assert_aligned` does.

        Returns the ``DiffResult``, or ``None`` when ``--reprod-regen`` wrote the reference.

        >>> reprod_regression.check({"logits": out, "loss": loss}, threshold=1e-5)
        """
        __tracebackhide__ = True
        path = self.path_for(name)
        if path in self._checked:
            raise ValueError(
                f"{path}: this test already checked this reference; give each check its own name="
            )
        self._checked.add(path)
        nodeid = self._request.node.nodeid
        if self.regen:
            from .storage import save

            how = "refreshed" if path.exists() else "wrote"
            save(path, testing._as_mapping(data))
            self._request.config.stash[_RECORDER].written.append((nodeid, str(path), how))
            return None
        if not path.exists():
            pytest.fail(
                f"reprod: no reference dump {path} for {nodeid}; create it from this run's values "
                f"with: pytest --reprod-regen {nodeid}",
                pytrace=False,
            )
        criteria = testing.criteria_for(method=method, threshold=threshold, atol=atol, rtol=rtol,
                                        per_key=per_key, equal_nan=equal_nan)
        obtained = path.with_name(path.stem + ".obtained.npz")
        try:
            result = testing._check(path, data, kind="regression", reference=str(path),
                                    criteria=criteria, other_name="this run")
        except AssertionError as exc:
            # this run's values beside the reference, to inspect or to promote by renaming
            from .storage import save

            save(obtained, testing._as_mapping(data))
            raise AssertionError(f"{exc}\nthis run's values: {obtained} (rename it to {path.name} "
                                 "to make it the reference)") from None
        if obtained.exists():  # a stale one from an earlier failure no longer applies
            obtained.unlink()
        return result


@pytest.fixture
def reprod_regression(request: pytest.FixtureRequest) -> RegressionChecker:
    """Regression-style alignment check against a reference dump stored next to the test.

    >>> def test_forward(reprod_regression):
    ...     reprod_regression.check({"logits": model(x)}, threshold=1e-5)
    """
    return RegressionChecker(request)
