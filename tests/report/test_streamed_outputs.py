"""Issue 20: ``--output`` writes CSV and log text in pieces as it is made (a million keys' text is
never held at once), byte for byte the text the whole render gives."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import reprod
from reprod.cli import main
from reprod.cli_output import _render, _rstrip_newlines
from reprod.report import data, log


def _pair(tmp_path, fmt: str, n: int, seed: int) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    ref = {f"k{i}/é\"{i % 7}": rng.standard_normal(1 + i % 5).astype(np.float32) for i in range(n)}
    ref["nested"] = {"a": np.arange(3.0), "b": {"c": np.ones(2)}}
    other = {k: (v * np.float32(1.01) if isinstance(v, np.ndarray) and i % 3 == 0 else v)
             for i, (k, v) in enumerate(ref.items())}
    other["k1/é\"1"] = np.array([np.nan, 1.0], np.float32)
    other["k2/é\"2"] = np.zeros((2, 2), np.float32)  # shape
    del other["k3/é\"3"]  # missing
    other["extra"] = np.ones(1)
    a, b = str(tmp_path / f"a.{fmt}"), str(tmp_path / f"b.{fmt}")
    if fmt == "npy":
        np.save(a, ref, allow_pickle=True)
        np.save(b, other, allow_pickle=True)
    else:
        reprod.save(a, ref)
        reprod.save(b, other)
    return a, b


@pytest.mark.parametrize("out_fmt", ["csv", "log", "json"])
@pytest.mark.parametrize("fmt,n,seed", [("npy", 30, 0), ("npz", 9000, 1), ("npy", 9000, 2)])
def test_output_file_is_the_whole_render(tmp_path, out_fmt, fmt, n, seed, monkeypatch):
    a, b = _pair(tmp_path, fmt, n, seed)
    monkeypatch.setattr(data, "_CSV_PIECE_ROWS", 7)  # many pieces, on the small pair too
    out = tmp_path / f"out.{out_fmt}"
    code = main([a, b, "--format", out_fmt, "--output", str(out), "--quiet"])
    assert code == 1
    result = reprod.compare(a, b, progress=False)
    args = argparse.Namespace(format=out_fmt, failed_only=False, max_rows=None)
    want = _render([(None, result)], args) + "\n"
    got = out.read_text(encoding="utf-8")
    if out_fmt == "json":  # the creation time is the second it ran
        got = "\n".join(x for x in got.splitlines() if '"created"' not in x)
        want = "\n".join(x for x in want.splitlines() if '"created"' not in x)
    assert got == want
    if out_fmt == "csv":
        assert "".join(data.iter_csv(result)) == data.to_csv(result) == data._to_csv_reference(result)
    if out_fmt == "log":
        assert list(log.iter_log_lines(result)) == log.render_log(result) == \
            list(log._iter_log_lines_reference(result))
        assert "".join(log.iter_log_text(result)) == "\n".join(log.render_log(result))


def test_piece_helpers_match_their_whole_forms():
    texts = ["", "\n", "a", "a\n", "a\n\n", "\nb"]
    for pieces in ([], [""], ["a\n", "\n"], ["a", "\n\n", "b\n", "\n"], ["\n", "\n"],
                   ["x\n", "", "y"], texts):
        assert "".join(_rstrip_newlines(iter(pieces))) == "".join(pieces).rstrip("\n")
