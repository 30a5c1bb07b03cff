"""DiffResult's report methods give exactly what the renderers give, and import nothing heavy
until called."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import reprod
from reprod.report import data, log, table

REPO = Path(__file__).resolve().parents[2]


def _result() -> reprod.DiffResult:
    ref = {"a": np.arange(6.0).reshape(2, 3), "b": {"c": np.ones(4)}}
    other = {"a": np.arange(6.0).reshape(2, 3) + 1e-3, "b": {"c": np.ones(4)}}
    return reprod.compare(ref, other, method="max", threshold=1e-4)


def test_methods_match_renderers(tmp_path: Path) -> None:
    r = _result()
    assert r.to_table() == table.render_table(r)
    assert r.to_table(failed_only=True) == table.render_table(r, failed_only=True)
    assert r.to_json() == data.to_json(r)
    assert r.to_csv() == data.to_csv(r)
    assert r.to_markdown() == data.to_markdown(r)
    assert r.to_log().splitlines() == log.render_log(r)
    assert r.to_log().splitlines()[-1] == "diff check failed"
    assert json.loads(r.to_json())["passed"] is False
    frame = r.to_frame()
    assert list(frame.index) == ["a", "b/c"]
    assert frame.loc["a", "max_abs"] == np.abs(np.arange(6.0) + 1e-3 - np.arange(6.0)).max()
    page = r.to_html()
    assert page.lstrip().lower().startswith("<!doctype html")
    written = r.to_html(str(tmp_path / "r.html"))
    assert Path(written).read_text(encoding="utf-8") == page


def test_compare_and_table_do_not_import_pandas() -> None:
    code = (
        "import sys, numpy as np, reprod\n"
        "r = reprod.compare({'a': np.ones(2)}, {'a': np.ones(2)})\n"
        "r.to_table(); r.to_json(); r.to_log()\n"
        "print(sorted(m for m in ('pandas', 'torch', 'paddle') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
