"""The CSV and log writers a batch of keys at a time (``data._csv_rows``/``_csv_batch``,
``log._line_batches``) against the key-by-key writers they replace: the same text for every
result, the same error where there is none (``test_json_fast.py`` does the same for JSON and
for ``to_csv`` against ``_to_csv_reference``)."""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from test_json_fast import ODD, _dumps, _hand_built, _options  # tests/report, on sys.path

import reprod
from reprod import _native
from reprod.diff.result import DiffResult, KeyResult, RowKeyResult
from reprod.report import data, log

needs_kernel = pytest.mark.skipif(_native.kernel() is None, reason="compiled kernel not built")


def _outcome(f: Any, *args: Any, **kw: Any) -> Any:
    try:
        return f(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the same error either way is the point
        return type(e)


def _same_log(result: DiffResult) -> None:
    want = _outcome(lambda: list(log._iter_log_lines_reference(result)))
    assert _outcome(lambda: list(log.iter_log_lines(result))) == want
    assert _outcome(lambda: "".join(log.iter_log_text(result))) == \
        (want if isinstance(want, type) else "\n".join(want))


def _same_csv(result: DiffResult) -> None:
    want = _outcome(data._to_csv_reference, result)
    assert _outcome(data.to_csv, result) == want
    assert _outcome(lambda: "".join(data.iter_csv(result))) == want


@pytest.mark.parametrize("per_batch", [2048, 3])
@pytest.mark.parametrize("seed", range(12))
def test_random_comparisons_of_mappings(seed: int, per_batch: int, monkeypatch) -> None:
    """Missing, extra, shape, type, NaN and Inf keys, nested keys (parents written once across
    batches), per-key rules, every dtype pair."""
    monkeypatch.setattr(log, "_KEYS_PER_BATCH", per_batch)
    monkeypatch.setattr(data, "_CSV_PIECE_ROWS", per_batch)
    ref, other = _dumps(seed)
    result = reprod.compare(ref, other, progress=False, **_options(seed))
    _same_log(result)
    _same_csv(result)


@needs_kernel
@pytest.mark.parametrize("per_batch", [2048, 5])
@pytest.mark.parametrize("seed", range(6))
def test_random_comparisons_of_dump_files(tmp_path, seed: int, per_batch: int,
                                          monkeypatch) -> None:
    """The batch's RowKeyResults (window columns) beside per-key results, in batches that start
    and end anywhere in a window."""
    monkeypatch.setattr(log, "_KEYS_PER_BATCH", per_batch)
    monkeypatch.setattr(data, "_CSV_PIECE_ROWS", per_batch)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    ref, other = _dumps(seed, n=30)
    ref = {k: v for k, v in ref.items() if k and "\x00" not in k}
    other = {k: v for k, v in other.items() if k and "\x00" not in k}
    for i in range(200):
        dt = rng.choice([np.float32, np.float64, np.float16])
        a = nrng.standard_normal(rng.choice([2, 5, (2, 3)])).astype(dt)
        ref[f"blk{i}"] = a
        other[f"blk{i}"] = a if rng.random() < 0.5 else (a * 1.001).astype(
            rng.choice([dt, np.float32]))
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, ref, allow_pickle=True)
    np.save(b, other, allow_pickle=True)
    result = reprod.compare(a, b, progress=False, **_options(seed))
    assert any(type(r) is RowKeyResult for r in result.results)
    _same_log(result)
    _same_csv(result)


@pytest.mark.parametrize("per_batch", [2048, 7])
def test_int_keys_of_a_reprod_log_file(tmp_path, per_batch: int, monkeypatch) -> None:
    """``{3: 3}`` as reprod_log users ``add`` numbers: pickled ints and floats (the batch's
    single numbers), some unequal."""
    monkeypatch.setattr(log, "_KEYS_PER_BATCH", per_batch)
    monkeypatch.setattr(data, "_CSV_PIECE_ROWS", per_batch)
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, {i: (i if i % 2 else float(i) / 3) for i in range(40)}, allow_pickle=True)
    np.save(b, {i: (i + (i % 5 == 0) if i % 2 else float(i) / 3) for i in range(40)},
            allow_pickle=True)
    result = reprod.compare(a, b, progress=False)
    assert not result.passed
    _same_log(result)
    _same_csv(result)


def test_calibrated_results() -> None:
    """noise_multiple, noise_l2 and noise_max, the "noise" method and its threshold."""
    rng = np.random.default_rng(0)
    hi = {f"k{i}": rng.standard_normal(50) for i in range(6)}
    ref = {k: v.astype(np.float32) for k, v in hi.items()}
    other = {k: (v * (1 + 1e-6 * i ** 3)).astype(np.float32) for i, (k, v) in enumerate(hi.items())}
    other["k5"] = other["k5"].astype(np.float64)
    del hi["k4"]  # judged by the plain threshold, with a note
    for noise_factor in (None, 1e-3):
        result = reprod.compare(ref, other, progress=False, noise=hi, noise_factor=noise_factor)
        assert any(r.noise_multiple is not None for r in result)
        _same_log(result)
        _same_csv(result)


def test_hand_built_results(monkeypatch) -> None:
    """What the batch writers take key by key (subclasses, numpy values, lists, a method naming
    no field) or word otherwise by status (kink, nothing, error)."""
    hand = _hand_built()
    base = hand[0]
    odd = [
        replace(base, status="kink", passed=True),
        replace(base, status="nothing", passed=True, methods=()),
        replace(base, status="missing", mean_abs=None, reason="only in ref"),
        replace(base, status="nan", checks={"mean": np.bool_(False)}),
        replace(base, status="shape", mean_abs="not a number"),  # never printed
        replace(base, path=(3, "x"), ref_dtype="int32", other_dtype="int64", max_abs=7.0),
        replace(base, methods=["max", "mean"]),
        replace(base, methods=("m{0}x", "mean"), checks={"m{0}x": True}),
        replace(base, methods=("size",)),
        replace(base, ref_dtype="bfloat16", other_dtype="float16", mean_abs=1e9),
        replace(base, ref_dtype="float64", other_dtype="complex64", mean_abs=0.1),
        replace(base, ref_dtype="longdouble", mean_abs=0.1),
        replace(base, ref_dtype=None, other_dtype="no such dtype"),
        replace(base, key="t\u00e9\"st,\n", path=()),
        replace(base, methods=("nope",)),
    ]
    for per_batch in (2048, 2, 1):
        monkeypatch.setattr(log, "_KEYS_PER_BATCH", per_batch)
        monkeypatch.setattr(data, "_CSV_PIECE_ROWS", per_batch)
        for kr in [*hand, *odd]:
            result = DiffResult(results=(kr, *odd[:2], kr), options={}, created="2026")
            _same_log(result)
            _same_csv(result)
        _same_log(DiffResult(results=tuple(odd)))
        _same_log(DiffResult(results=()))


def test_log_values_a_column_at_a_time() -> None:
    """``_values_text`` (a column of values cast at once) is ``_value_text`` of each: every
    float kind the log prints, their rounding, overflow and non-finite values."""
    rng = random.Random(1)
    values = [0.0, -0.0, 1e16, 1e15, 1e-4, 1e-5, 5e-324, 1.7976931348623157e308, math.inf,
              -math.inf, math.nan, 3.4e38, 3.5e38, 65504.0, 65520.0, 6e-8, 0.1, None, 3, True]
    values += [rng.random() * 10 ** rng.randint(-45, 45) for _ in range(3000)]
    values += [np.float32(0.5), np.float64(1e300)]
    dtypes = [None, *map(np.dtype, ["float16", "float32", "float64", "int8", "uint64",
                                    "longdouble", ">f4"])]
    dts = [rng.choice(dtypes) for _ in values]
    for stat in ("mean_abs", "max_abs"):
        want = [_outcome(log._value_text, v, dt, stat) for v, dt in zip(values, dts)]
        # a value the key-by-key text raises on (inf as an int): the column raises too, and
        # the writer takes that batch key by key
        fine = [i for i, w in enumerate(want) if isinstance(w, str)]
        assert len(fine) < len(want) if stat == "max_abs" else len(fine) == len(want)
        if len(fine) < len(want):
            with pytest.raises((OverflowError, ValueError)):
                log._values_text(values, dts, stat)
        got = log._values_text([values[i] for i in fine], [dts[i] for i in fine], stat)
        assert got == [want[i] for i in fine]


def _writer_line(cells: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def test_csv_batch_quotes_as_csv_writer() -> None:
    """``_csv_batch``'s quoting against ``csv.writer``'s on cells of every odd character,
    as a column's texts and as text every row shares."""
    rng = random.Random(2)
    alphabet = ['a', ',', '"', '\n', '\r', '\x00', ' ', '\t', "'", '\u00e9', '\udcff', '\\', '{']
    for _ in range(300):
        n = rng.randint(1, 6)
        k = rng.randint(2, 6)
        cells: list[Any] = []
        for _ in range(k):
            if rng.random() < 0.3:
                cells.append("".join(rng.choices(alphabet, k=rng.randint(0, 4))))
            else:
                cells.append(["".join(rng.choices(alphabet, k=rng.randint(0, 4)))
                              for _ in range(n)])
        rows = [[c if type(c) is str else c[j] for c in cells] for j in range(n)]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        assert data._csv_batch(cells, n, writer, buf) == "".join(map(_writer_line, rows))


def test_csv_odd_keys_in_many_pieces(monkeypatch) -> None:
    """Keys with line breaks, NUL, quotes and commas (rows csv.writer writes itself), in
    pieces of a few rows."""
    monkeypatch.setattr(data, "_CSV_PIECE_ROWS", 3)
    ref = {k: np.ones(3) for k in ODD}
    other = {k: np.ones(3) * (1.5 if i % 2 else 1.0) for i, k in enumerate(ODD)}
    result = reprod.compare(ref, other, progress=False, atol=1e-3)
    _same_csv(result)
    _same_log(result)
    rows = list(csv.reader(io.StringIO(data.to_csv(result))))
    assert [r[0] for r in rows[1:]] == list(ref)
    assert isinstance(result.results[0], KeyResult)
