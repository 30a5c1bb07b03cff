"""Real-model checks (torchvision / paddle.vision): collected only where torchvision and paddle
are importable, i.e. in ``.venv-real`` (see tests/realworld/MEASUREMENTS.md). The main suite's
``.venv`` has no torchvision, so nothing here is collected there.

Every math library runs on one thread: a multi-threaded reduction splits its sums by the number
of threads it gets (MKL adapts that to the machine's load), which changes the float32 rounding
from run to run; the verdicts here are measured single-threaded (under pytest-xdist each worker
takes one model, see test_calibrated.py)."""

import importlib.util
import os

collect_ignore_glob = ["*"]
if importlib.util.find_spec("torchvision") is not None:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    try:
        import paddle  # noqa: F401
        import torch
        import torchvision  # noqa: F401
    except Exception:  # a broken install: stay out of the suite
        pass
    else:
        torch.set_num_threads(1)
        collect_ignore_glob = []


def pytest_collection_modifyitems(config, items):
    """A model's tests one after the other: its pair and torch captures are built once
    (test_calibrated.pair_of holds one model at a time)."""
    here = [i for i, item in enumerate(items) if "realworld" in item.nodeid]
    models: dict = {}

    def model(item):
        spec = getattr(item, "callspec", None)
        name = spec.params.get("model") if spec is not None else None
        return models.setdefault(name, len(models))

    ordered = sorted((items[i] for i in here), key=model)  # stable: each model's tests in order
    for i, item in zip(here, ordered):
        items[i] = item


# Files skipped whole at collection (a module-level ``pytest.skip``, an ``importorskip``): in CI
# (REPROD_REALWORLD_STRICT=1, every package of constraints-realworld*.txt installed) each is a
# file of tests that silently did not run, as test_vision_ports_real.py once did (its helper
# answered "not installed" when called by a second module). Reported, and the run fails.
_SKIPPED_FILES: dict = {}


def pytest_collectreport(report):
    if report.skipped and report.nodeid.endswith(".py"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
        _SKIPPED_FILES[report.nodeid] = str(reason)


def pytest_sessionfinish(session, exitstatus):
    if not _SKIPPED_FILES or os.environ.get("REPROD_REALWORLD_STRICT") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
    for nodeid, reason in sorted(_SKIPPED_FILES.items()):
        line = f"REPROD_REALWORLD_STRICT: {nodeid} was skipped whole ({reason})"
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line)
    if session.exitstatus == 0:
        session.exitstatus = 1
