"""The import rule, checked in fresh interpreters: reprod imports numpy only; torch and paddle load
only where their own tensors are handed in, and one framework never pulls in the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "paddle", "pandas")


def _modules_after(code: str, tmp_path) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; report which heavy modules ended up imported (plus
    whatever the code put in a global ``EXTRA`` dict)."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json, sys
        seen = {{m: m in sys.modules for m in {HEAVY!r}}}
        print(json.dumps({{**seen, **globals().get("EXTRA", {{}})}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_reprod_is_light(tmp_path) -> None:
    loaded = _modules_after(
        """
        import reprod
        from reprod import ReprodLogger, ReprodDiffHelper, compare, load, save, DiffResult
        assert reprod.__all__
        """,
        tmp_path,
    )
    assert not any(loaded[m] for m in HEAVY), loaded


def test_load_save_compare_of_small_files_stay_light(tmp_path) -> None:
    loaded = _modules_after(
        """
        import numpy as np, reprod
        lg = reprod.ReprodLogger()
        lg.add("x", np.ones(3, dtype=np.float32))
        lg.add("n", {"y": [1, 2], "z": 1.5})
        lg.save("a.npy")
        reprod.save("b.npz", {"x": np.ones(3, dtype=np.float32), "n": {"y": [1, 2], "z": 1.5}})
        with reprod.ReprodLogger(stream_to="c.npz") as s:
            s.add("x", np.ones(3, dtype=np.float32))
        for p in ("a.npy", "b.npz", "c.npz"):
            d = reprod.load(p)
            _ = [d[k] for k in d]
        r = reprod.compare("a.npy", "b.npz")
        assert r.passed, r.summary()
        r.summary_line()
        """,
        tmp_path,
    )
    assert not any(loaded[m] for m in HEAVY), loaded


def test_helper_pipeline_stays_light(tmp_path) -> None:
    loaded = _modules_after(
        """
        import numpy as np
        from reprod import ReprodDiffHelper, ReprodLogger
        for name in ("t", "p"):
            lg = ReprodLogger()
            lg.add("logits", np.ones((2, 2), dtype=np.float32))
            lg.save(name)
        h = ReprodDiffHelper()
        h.compare_info(h.load_info("t.npy"), h.load_info("p.npy"))
        h.report(path="diff.txt")
        """,
        tmp_path,
    )
    assert not any(loaded[m] for m in HEAVY), loaded


def test_torch_side_never_imports_paddle(tmp_path) -> None:
    pytest.importorskip("torch")
    loaded = _modules_after(
        """
        import torch, reprod
        lg = reprod.ReprodLogger()
        lg.add("x", torch.ones(2, dtype=torch.bfloat16))
        lg.save("t.npz")
        reprod.compare("t.npz", {"x": torch.ones(2)})
        """,
        tmp_path,
    )
    assert loaded["torch"] and not loaded["paddle"], loaded


def test_paddle_side_never_imports_torch(tmp_path) -> None:
    pytest.importorskip("paddle")
    loaded = _modules_after(
        """
        import sys
        import paddle
        EXTRA = {"torch_by_paddle": "torch" in sys.modules}
        import reprod
        lg = reprod.ReprodLogger()
        lg.add("x", paddle.ones([2], dtype="bfloat16"))
        lg.save("p.npz")
        reprod.compare("p.npz", {"x": paddle.ones([2])})
        """,
        tmp_path,
    )
    if loaded["torch_by_paddle"]:
        pytest.skip("this paddle build imports torch itself")
    assert loaded["paddle"] and not loaded["torch"], loaded
