"""Renderers of a DiffResult: text table, first-failure detail, DataFrame, JSON, CSV, Markdown.

Hand-built results give exact (golden) text; results from ``reprod.compare`` are checked against
statistics computed here with plain numpy.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest

import reprod
from reprod.diff.result import DiffResult, KeyResult
from reprod.messages import fmt_num
from reprod.report.data import (
    files_from_json,
    files_to_csv,
    files_to_json,
    from_json,
    to_csv,
    to_json,
    to_markdown,
)
from reprod.report.table import render_first_failure, render_table, statistics_for


def sample() -> DiffResult:
    """A pass, a threshold failure, a NaN, a missing key: one of each row kind."""
    ok = KeyResult(
        key="conv1.weight",
        passed=True,
        status="passed",
        reason="mean 1.000e-08 <= 1.000e-06",
        path=("conv1.weight",),
        ref_shape=(2, 3),
        other_shape=(2, 3),
        ref_dtype="float32",
        other_dtype="float32",
        size=6,
        mean_abs=1e-08,
        max_abs=3e-08,
        min_abs=0.0,
        mean_rel=1e-07,
        max_rel=2e-07,
        cosine=1.0,
        worst_index=(1, 2),
        worst_ref=0.5,
        worst_other=0.50000003,
        methods=("mean",),
        thresholds={"mean": 1e-06},
        checks={"mean": True},
    )
    bad = KeyResult(
        key="block/fc",
        passed=False,
        status="failed",
        reason="mean 3.100e-04 > 1.000e-06",
        path=("block", "fc"),
        ref_shape=(4,),
        other_shape=(4,),
        ref_dtype="float32",
        other_dtype="float64",
        size=4,
        mean_abs=0.00031,
        max_abs=0.0012,
        min_abs=0.0,
        mean_rel=math.inf,
        max_rel=math.inf,
        cosine=0.99,
        worst_index=(3,),
        worst_ref=1.0,
        worst_other=1.0012,
        methods=("mean",),
        thresholds={"mean": 1e-06},
        checks={"mean": False},
    )
    nan = KeyResult(
        key="loss",
        passed=False,
        status="nan",
        reason="other has 1 NaN",
        path=("loss",),
        ref_shape=(),
        other_shape=(1,),
        ref_dtype="float32",
        other_dtype="float32",
        size=1,
        mean_abs=math.nan,
        max_abs=math.nan,
        other_nan=1,
        methods=("mean",),
        thresholds={"mean": 1e-06},
        checks={"mean": False},
    )
    missing = KeyResult(
        key="head",
        passed=False,
        status="missing",
        reason="key only in ref (missing from other)",
        path=("head",),
        ref_shape=(2, 2),
        ref_dtype="int64",
        size=4,
        methods=("mean",),
        thresholds={"mean": 1e-06},
    )
    return DiffResult(
        results=(ok, bad, nan, missing),
        ref_name="torch.npy",
        other_name="paddle.npy",
        options={"methods": ["mean"], "threshold": 1e-06},
    )


SUMMARY = "4 keys compared, 1 passed, 3 failed: FAILED; first failure block/fc: mean 3.100e-04 > 1.000e-06"


# --- table ---------------------------------------------------------------------------------------


def test_table_golden() -> None:
    expected = "\n".join(
        [
            "    key           shape    dtype               mean_abs    max_abs    threshold  verdict",
            "--  ------------  -------  ----------------  ----------  ---------  -----------  ---------",
            "    conv1.weight  [2, 3]   float32            1.000e-08  3.000e-08    1.000e-06  ok",
            ">>  block/fc      [4]      float32->float64   3.100e-04  1.200e-03    1.000e-06  FAILED",
            "!   loss          []->[1]  float32                  nan        nan    1.000e-06  NAN",
            "!   head          [2, 2]   int64                      -          -    1.000e-06  MISSING",
            SUMMARY,
        ]
    )
    assert render_table(sample()) == expected


def test_table_failed_only_and_all_methods_golden() -> None:
    expected = "\n".join(
        [
            "    key       shape    dtype               min_abs    max_abs    mean_abs    threshold  verdict",
            "--  --------  -------  ----------------  ---------  ---------  ----------  -----------  ---------",
            ">>  block/fc  [4]      float32->float64  0.000e+00  1.200e-03   3.100e-04    1.000e-06  FAILED",
            "!   loss      []->[1]  float32                   -        nan         nan    1.000e-06  NAN",
            "!   head      [2, 2]   int64                     -          -           -    1.000e-06  MISSING",
            SUMMARY,
        ]
    )
    # "all" is reprod_log's min, max, mean, in that order
    assert render_table(sample(), failed_only=True, methods=["all"]) == expected


def test_table_marks_only_the_first_failure_with_arrows() -> None:
    lines = render_table(sample()).splitlines()[2:-1]
    marks = [line[:2].strip() for line in lines]
    assert marks == ["", ">>", "!", "!"]
    # the first failure is the result's first_failure, not the first row
    reordered = replace(sample(), results=sample().results[::-1])
    rows = render_table(reordered).splitlines()[2:-1]
    assert rows[0].startswith(">>  head") and rows[-1].startswith("    conv1.weight")


def test_table_all_passed_has_no_marks() -> None:
    r = replace(sample(), results=sample().results[:1])
    text = render_table(r)
    assert text.splitlines()[-1] == "1 key compared, 1 passed, 0 failed: PASSED"
    assert ">>" not in text and "!" not in text
    # failed_only with nothing failing: the summary alone
    assert render_table(r, failed_only=True) == "1 key compared, 1 passed, 0 failed: PASSED"


def test_table_default_columns_follow_the_judged_methods() -> None:
    r = sample()
    assert statistics_for(r) == ["mean_abs", "max_abs"]
    # the run's methods first, then any a key was judged with (per-key thresholds may add some)
    judged_max = replace(r, options={"methods": ["max"]})
    assert statistics_for(judged_max) == ["max_abs", "mean_abs"]
    # without options, the methods carried by the keys
    no_opts = replace(r, options={})
    assert statistics_for(no_opts) == ["mean_abs", "max_abs"]
    assert statistics_for(r, ["mean_rel", "cosine"]) == ["mean_rel", "cosine", "max_abs"]
    with pytest.raises(ValueError, match="unknown"):
        statistics_for(r, ["median"])


def test_table_shows_mismatch_counts_when_atol_was_used() -> None:
    kr = replace(sample().results[0], mismatched=2, atol=1e-5, rtol=0.0)
    text = render_table(replace(sample(), results=(kr,)))
    header, _, row = text.splitlines()[:3]
    assert "mismatched" in header.split()
    assert "2/6" in row.split()


def test_first_failure_golden() -> None:
    expected = "\n".join(
        [
            "first failure: block/fc (FAILED)",
            "  reason:    mean 3.100e-04 > 1.000e-06",
            "  shape:     [4] (ref), [4] (other)",
            "  dtype:     float32 (ref), float64 (other)",
            "  worst:     index (3): ref 1.0, other 1.0012",
            "  mean_abs:  3.100e-04",
            "  max_abs:   1.200e-03",
            "  min_abs:   0.000e+00",
            "  mean_rel:  inf",
            "  max_rel:   inf",
            "  cosine:    9.900e-01",
            "  threshold: 1.000e-06",
            "  checks:    mean failed",
            "  (2 more failing keys after this one)",
        ]
    )
    assert render_first_failure(sample()) == expected


def test_first_failure_when_all_passed() -> None:
    r = replace(sample(), results=sample().results[:1])
    assert render_first_failure(r) == "all keys passed (1 compared)"


def test_table_from_compare_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    b = a + rng.standard_normal((5, 7)).astype(np.float32) * 1e-3
    r = reprod.compare({"x": a, "y": a}, {"x": b, "y": a.copy()})
    diff = np.abs(b.astype(np.float64) - a.astype(np.float64))
    row_x = next(line for line in render_table(r).splitlines() if line[4:].startswith("x "))
    cells = row_x.split()
    assert cells[0] == ">>" and cells[-1] == "FAILED"
    assert fmt_num(diff.mean()) in cells and fmt_num(diff.max()) in cells


# --- DataFrame -----------------------------------------------------------------------------------


def test_frame_has_every_field_per_key() -> None:
    pytest.importorskip("pandas")
    from reprod.report.frame import to_frame

    r = sample()
    df = to_frame(r)
    assert list(df.index) == r.keys()
    assert df.index.name == "key"
    assert "thresholds" not in df.columns and "checks" not in df.columns
    assert {"threshold_mean", "check_mean", "worst_index", "ref_shape", "note"} <= set(df.columns)
    for kr in r:
        row = df.loc[kr.key]
        assert row["status"] == kr.status and row["passed"] == kr.passed
        assert row["ref_shape"] == kr.ref_shape  # tuples stay tuples
        assert row["path"] == kr.path
        if kr.max_abs is None:
            assert np.isnan(row["max_abs"])
        else:
            np.testing.assert_equal(row["max_abs"], kr.max_abs)
        assert row["threshold_mean"] == kr.thresholds["mean"]
    assert (
        df.loc["block/fc", "check_mean"] is False and df.loc["conv1.weight", "check_mean"] is True
    )
    assert df.loc["block/fc", "worst_index"] == (3,)
    assert df.sort_values("max_abs", ascending=False).index[0] == "block/fc"


def test_frame_flattens_a_union_of_methods() -> None:
    pytest.importorskip("pandas")
    from reprod.report.frame import to_frame

    a = sample().results[0]
    b = replace(a, key="b", thresholds={"max": 1e-4}, checks={"max": True}, methods=("max",))
    df = to_frame(replace(sample(), results=(a, b)))
    assert df.loc["conv1.weight", "threshold_mean"] == 1e-6
    assert np.isnan(df.loc["conv1.weight", "threshold_max"])
    assert df.loc["b", "threshold_max"] == 1e-4
    assert np.isnan(df.loc["b", "threshold_mean"])


# --- JSON ----------------------------------------------------------------------------------------


def _strict_loads(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_json_document_shape() -> None:
    doc = _strict_loads(to_json(sample()))
    assert isinstance(doc, dict)
    assert doc["passed"] is False
    assert doc["summary"]["first_failure"] == "block/fc"
    assert [k["key"] for k in doc["keys"]] == ["conv1.weight", "block/fc", "loss", "head"]
    assert doc["keys"][1]["mean_rel"] == "inf" and doc["keys"][2]["mean_abs"] == "nan"


def test_json_round_trip_exact() -> None:
    # NaN != NaN, so first a result without NaN: dataclass equality
    no_nan = replace(sample(), results=tuple(k for k in sample().results if k.key != "loss"))
    again = from_json(to_json(no_nan))
    assert again == no_nan
    # with NaN: every field the same, NaN where NaN was
    r = sample()
    back = from_json(to_json(r))
    assert back.keys() == r.keys()
    for got, want in zip(back.results, r.results):
        for name, value in vars(want).items():
            have = getattr(got, name)
            if isinstance(value, float) and math.isnan(value):
                assert isinstance(have, float) and math.isnan(have), name
            else:
                assert have == value and type(have) is type(value), name
    assert to_json(back) == to_json(r)


def test_json_round_trip_nested_non_finite_thresholds() -> None:
    # a threshold of inf (a key that is only reported, never judged) lives inside a nested dict
    kr = replace(sample().results[0], thresholds={"mean": math.inf})
    r = replace(sample(), results=(kr,), options={"methods": ["mean"], "threshold": math.inf})
    text = to_json(r)
    _strict_loads(text)
    back = from_json(text)
    assert back == r


def test_json_round_trip_of_a_real_comparison() -> None:
    a = {"x": np.array([1.0, np.inf, 3.0]), "n": {"y": np.arange(4, dtype=np.int32)}}
    b = {"x": np.array([1.0, np.inf, 3.5]), "n": {"y": np.arange(4, dtype=np.int32)}}
    r = reprod.compare(a, b, atol=1e-3)
    back = from_json(to_json(r))
    assert back == r
    assert back["x"].max_abs == 0.5 and back["n/y"].path == ("n", "y")


def test_files_json_round_trip() -> None:
    r = sample()
    text = files_to_json({"fwd/a.npy": r, "b.npz": r})
    doc = _strict_loads(text)
    assert doc["passed"] is False and list(doc["files"]) == ["fwd/a.npy", "b.npz"]
    assert doc["files"]["b.npz"]["summary"]["failed"] == 3
    back = files_from_json(text)
    assert to_json(back["fwd/a.npy"]) == to_json(r)


# --- CSV -----------------------------------------------------------------------------------------


def test_csv_parses_back_with_full_precision() -> None:
    r = sample()
    rows = list(csv.DictReader(io.StringIO(to_csv(r))))
    assert [row["key"] for row in rows] == r.keys()
    for row, kr in zip(rows, r.results):
        assert row["passed"] == ("true" if kr.passed else "false")
        assert row["status"] == kr.status and row["reason"] == kr.reason
        for stat in ("mean_abs", "max_abs", "min_abs", "mean_rel", "max_rel", "cosine"):
            value = getattr(kr, stat)
            if value is None:
                assert row[stat] == ""
            else:
                np.testing.assert_equal(float(row[stat]), value)  # exact, nan == nan here
        shape = None if row["ref_shape"] == "" else tuple(json.loads(row["ref_shape"]))
        assert shape == kr.ref_shape
        assert row["threshold_mean"] == "1e-06"
    assert rows[2]["ref_shape"] == "[]"  # a scalar is not "no shape"
    assert rows[3]["other_shape"] == "" and rows[3]["check_mean"] == ""
    assert tuple(json.loads(rows[1]["path"])) == ("block", "fc")


def test_csv_of_several_files_has_a_file_column() -> None:
    r = sample()
    rows = list(csv.DictReader(io.StringIO(files_to_csv({"a.npy": r, "sub/b.npz": r}))))
    assert [row["file"] for row in rows] == ["a.npy"] * 4 + ["sub/b.npz"] * 4
    assert float(rows[5]["max_abs"]) == 0.0012


# --- Markdown ------------------------------------------------------------------------------------


def test_markdown_golden() -> None:
    expected = "\n".join(
        [
            "|     | key          | shape   | dtype            | mean_abs  | max_abs   | threshold | verdict |",
            "|-----|--------------|---------|------------------|-----------|-----------|-----------|---------|",
            "|     | conv1.weight | [2, 3]  | float32          | 1.000e-08 | 3.000e-08 | 1.000e-06 | ok      |",
            "| >>  | block/fc     | [4]     | float32->float64 | 3.100e-04 | 1.200e-03 | 1.000e-06 | FAILED  |",
            "| !   | loss         | []->[1] | float32          | nan       | nan       | 1.000e-06 | NAN     |",
            "| !   | head         | [2, 2]  | int64            | -         | -         | 1.000e-06 | MISSING |",
            "",
            SUMMARY,
        ]
    )
    assert to_markdown(sample()) == expected


def test_markdown_escapes_pipes_in_keys() -> None:
    kr = replace(sample().results[0], key="a|b")
    text = to_markdown(replace(sample(), results=(kr,)))
    row = text.splitlines()[2]
    assert "a\\|b" in row
    # the escaped pipe does not add a cell
    assert row.replace("\\|", "").count("|") == text.splitlines()[0].count("|")


def test_simple_table_is_tabulates_character_for_character() -> None:
    """The fast renderer of the default table against tabulate on random ASCII tables (cells with
    blanks around them, empty cells, both alignments), and its refusal of wide characters."""
    import random
    import string

    from tabulate import tabulate

    from reprod.report.table import _simple_table

    rng = random.Random(0)
    pool = ["", ">>", "!", "a b", " pad ", "1.000e-06", "[2, 3]", "-"]
    for _ in range(2000):
        ncol = rng.randint(1, 9)
        headers = [rng.choice(["", "key", "shape", "mean_abs", "verdict", " sp "]) for _ in range(ncol)]
        align = [rng.choice(["left", "right"]) for _ in range(ncol)]
        rows = [[rng.choice([*pool, "".join(rng.choices(string.printable[:95], k=rng.randint(0, 30)))])
                 for _ in range(ncol)] for _ in range(rng.randint(1, 6))]
        want = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True, colalign=align)
        assert _simple_table(rows, headers, align) == want, (rows, headers, align)
    assert _simple_table([["ключ", "1"]], ["key", "v"], ["left", "right"]) is None
    assert _simple_table([["a\nb", "1"]], ["key", "v"], ["left", "right"]) is None


def test_default_table_with_wide_keys_still_renders() -> None:
    import numpy as np

    import reprod

    r = reprod.compare({"层1": np.ones(3), "x": np.ones(2)}, {"层1": np.ones(3), "x": np.ones(2) * 2},
                       progress=False)
    text = r.to_table()
    assert "层1" in text and text.splitlines()[-1] == r.summary_line()
