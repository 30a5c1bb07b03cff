"""What a process imports for its first save and for a comparison of small dumps (project issue 23:
reprod_log pays none of it, and on small dumps imports are most of the time), checked in fresh
interpreters; and the exports of ``reprod.storage`` that now resolve on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import reprod
import reprod.storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, tmp_path, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_first_npy_save_imports_only_the_writer(tmp_path) -> None:
    """The reader (mmap views, dataclasses, the kernel), ``signal`` and ``threading`` were ~5 ms of
    a process's first ``ReprodLogger.save``, which made it slower than reprod_log's."""
    got = _run(
        """
        import json, sys
        import numpy as np
        from reprod import ReprodLogger
        before = set(sys.modules)
        lg = ReprodLogger()
        for i in range(100):
            lg.add(f"k{i}", np.full(4, i, np.float32))
        lg.add("n", {"a": 1.5, "b": [1, 2]})
        lg.save("a.npy")
        new = sorted(set(sys.modules) - before)
        import signal
        print(json.dumps({"new": new, "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL}))
        """,
        tmp_path,
    )
    unwanted = {"reprod.storage.lazy", "reprod.storage.legacy", "reprod._native", "dataclasses",
                "signal", "threading", "concurrent.futures", "tempfile", "logging"}
    assert not unwanted & set(got["new"]), got["new"]
    assert got["sigterm_default"]  # the handler, armed for the write, is gone again
    d = reprod.load(tmp_path / "a.npy")
    assert len(d) == 101 and d["k7"].tolist() == [7.0] * 4 and d["n"]["a"] == 1.5


def test_a_small_comparison_does_not_import_concurrent_futures(tmp_path) -> None:
    """The batch hands half of its rows to a second thread; ``concurrent.futures`` (with logging)
    was ~5 ms of a ``reprod-diff`` of small dumps. The helper thread must still have run."""
    rng = np.random.default_rng(0)
    ref = {f"k{i}": rng.standard_normal(8).astype(np.float32) for i in range(3000)}
    other = {k: v * np.float32(1 + 1e-7) for k, v in ref.items()}
    other["k5"] = other["k5"] + np.float32(1)
    np.save(tmp_path / "ref.npy", ref, allow_pickle=True)  # type: ignore[arg-type]
    np.save(tmp_path / "other.npy", other, allow_pickle=True)  # type: ignore[arg-type]
    got = _run(
        """
        import json, sys
        from reprod.cli import main
        status = main(["ref.npy", "other.npy", "--quiet"])
        from reprod.diff import metrics
        print(json.dumps({"status": status, "cf": "concurrent.futures" in sys.modules,
                          "logging": "logging" in sys.modules, "pool": metrics._pool is not None}))
        """,
        tmp_path,
        REPROD_THREADS="2",
    )
    assert got == {"status": 1, "cf": False, "logging": False, "pool": True}, got


def test_reprod_storage_still_exports_the_reader_classes() -> None:
    from reprod.storage import ArraySpec, Dump, MappedFile, NonNumericValue, lazy, load, save

    assert (ArraySpec, Dump, MappedFile, NonNumericValue) == (
        lazy.ArraySpec, lazy.Dump, lazy.MappedFile, lazy.NonNumericValue)
    assert reprod.storage.Dump is lazy.Dump and callable(load) and callable(save)
    assert {"ArraySpec", "Dump", "MappedFile", "NonNumericValue", "load", "save"} <= set(dir(reprod.storage))
    assert set(reprod.storage.__all__) <= set(dir(reprod.storage))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        reprod.storage.nothing  # noqa: B018
    from reprod.storage import npz_writer  # submodules still import through the package

    assert npz_writer.__name__ == "reprod.storage.npz_writer"


def test_the_exports_resolve_in_a_fresh_process(tmp_path) -> None:
    got = _run(
        """
        import json, sys
        import reprod.storage as s
        lazy_before = "reprod.storage.lazy" in sys.modules
        from reprod.storage import NonNumericValue
        print(json.dumps({"before": lazy_before, "name": NonNumericValue.__module__,
                          "after": "reprod.storage.lazy" in sys.modules,
                          "same": s.NonNumericValue is sys.modules["reprod.storage.lazy"].NonNumericValue}))
        """,
        tmp_path,
    )
    assert got == {"before": False, "name": "reprod.storage.lazy", "after": True, "same": True}


def test_save_of_a_loaded_dump_and_its_non_numeric_values(tmp_path) -> None:
    """``save`` recognises a ``Dump`` and ``NonNumericValue``s by their classes, looked up only
    once the reader is imported (before that no value can be one)."""
    src = tmp_path / "src.npy"
    np.save(src, {"x": np.arange(3.0), "s": "text", "n": {"none": None, "y": np.ones(2)}},
            allow_pickle=True)  # type: ignore[arg-type]
    d = reprod.load(src)
    out = reprod.save(tmp_path / "copy.npy", {"whole": d, "s": d["s"], "x": d["x"]})
    back = np.load(out, allow_pickle=True).item()
    assert back["s"] == "text" and back["whole"]["s"] == "text" and back["whole"]["n"]["none"] is None
    assert back["whole"]["x"].tolist() == [0.0, 1.0, 2.0] and back["x"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(reprod.UnsupportedValueError, match="only a .npy dump can keep it"):
        reprod.save(tmp_path / "copy.npz", {"s": d["s"]})
