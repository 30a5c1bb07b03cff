"""Difference histograms for the HTML report: counts equal numpy.histogram over the whole array,
and reprod-diff --html embeds them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import reprod
from reprod.diff.histogram import diff_histogram, result_histograms

REPO = Path(__file__).resolve().parents[2]


def test_counts_match_numpy_across_blocks() -> None:
    rng = np.random.default_rng(5)
    ref = rng.standard_normal(200_001).astype(np.float32)  # several blocks, an odd tail
    other = ref + rng.standard_normal(ref.size).astype(np.float32) * 1e-4
    other[:10] = ref[:10]  # exact zeros land in the first bin
    other[-1] = np.nan  # non-finite pairs are left out
    d = np.abs(other.astype(np.float64) - ref.astype(np.float64))
    finite = d[np.isfinite(d)]
    edges, counts = diff_histogram(ref, other, max_abs=float(finite.max()))
    assert len(edges) == len(counts) + 1 and edges[0] == 0.0
    assert all(a < b for a, b in zip(edges, edges[1:]))
    assert counts == np.histogram(finite, bins=np.array(edges))[0].tolist()
    assert sum(counts) == finite.size == ref.size - 1


def test_no_histogram_without_a_positive_finite_maximum() -> None:
    z = np.zeros(4)
    assert diff_histogram(z, z, max_abs=0.0) is None
    assert diff_histogram(z, z, max_abs=float("inf")) is None


def test_result_histograms_and_cli_html(tmp_path: Path) -> None:
    ref = {"a": np.arange(100.0), "n": {"b": np.ones(10)}, "gone": np.ones(2)}
    other = {"a": np.arange(100.0) + 1e-3, "n": {"b": np.ones(10)}}
    result = reprod.compare(ref, other)
    hist = result_histograms(result, ref, other)
    assert set(hist) == {"a"}  # "n/b" is identical (max 0), "gone" is missing
    assert sum(hist["a"][1]) == 100
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "other.npy", other)
    page = tmp_path / "r.html"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "reprod", str(tmp_path / "ref.npy"),
                           str(tmp_path / "other.npy"), "--html", str(page), "--quiet"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr
    text = page.read_text(encoding="utf-8")
    assert '"histograms":{"a":{"edges":[0.0,' in text  # the page carries key a's histogram
