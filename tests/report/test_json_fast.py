"""The fast JSON and CSV writers of ``reprod.report.data`` (issue 20) against the general ones
they replace: the same bytes for every result, the same errors where there is no text.

Results come from ``reprod.compare`` of random dumps (plain KeyResults from mappings, the
batch's lazy RowKeyResults from files) and from hand-built KeyResults holding what the fast path
hands back to the general one (numpy scalars, subclasses, non-str keys, odd floats)."""

from __future__ import annotations

import enum
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import _native
from reprod.diff.result import DiffResult, KeyResult, RowKeyResult
from reprod.report import data
from reprod.report.json_fast import KeyEncoder, Unsupported, field_values

INDENTS = (None, 0, 1, 2, 4, -1)

# names a key may have: quotes, escapes, control characters, non-ASCII, a lone surrogate (a
# non-UTF-8 file name), and what a format string would take for itself
ODD = ["plain", 'q"uote', "back\\slash", "tab\there", "new\nline", "caf\u00e9", "\u4e2d\u6587",
       "emoji\U0001f600", "lone\udcffkey", "pct%s%d%%", "{brace}", "nul\x00", "comma, space",
       "del\x7f", "", " "]


def _outcome(f: Any, *args: Any, **kw: Any) -> Any:
    """The text, or the type of the error where the general path has no text for a value."""
    try:
        return f(*args, **kw)
    except (TypeError, ValueError) as e:
        return type(e)


def _joined(pieces: Any, result: DiffResult, indent: Any) -> str:
    return "".join(pieces(result, indent=indent))


def _same_json(result: DiffResult, indents: tuple[Any, ...] = INDENTS) -> None:
    for indent in indents:
        want = _outcome(_joined, data._iter_json_reference, result, indent)
        assert _outcome(_joined, data.iter_json, result, indent) == want, indent
        assert _outcome(data.to_json, result, indent=indent) == want, indent
        assert _outcome(result.to_json, indent=indent) == want, indent


def _same_csv(result: DiffResult) -> None:
    assert _outcome(data.to_csv, result) == _outcome(data._to_csv_reference, result)
    assert _outcome(data.flat_columns, result) == _outcome(data._flat_columns_reference, result)
    for r in result.results:
        got, want = _outcome(data.flat_record, r), _outcome(data._flat_record_reference, r)
        if isinstance(want, dict):
            # NaN is not equal to itself: the items' texts, in order
            assert [(k, repr(v)) for k, v in got.items()] == [(k, repr(v)) for k, v in want.items()]
        else:
            assert got == want


def _same_files(results: dict[str, DiffResult]) -> None:
    for indent in INDENTS:
        assert _outcome(data.files_to_json, results, indent=indent) == \
            _outcome(data._files_to_json_reference, results, indent=indent), indent
    assert _outcome(data.files_to_csv, results) == _outcome(data._files_to_csv_reference, results)


def _array(rng: random.Random, nrng: np.random.Generator) -> np.ndarray:
    dtype = rng.choice([np.float32, np.float64, np.float16, np.int64, np.int32, np.bool_])
    shape = rng.choice([(), (1,), (3,), (2, 3), (4, 1, 2), (0,), (70,)])
    with np.errstate(over="ignore"):  # float16 of 1e8: inf, one more value to write
        a = (nrng.standard_normal(shape) * 10 ** rng.randint(-8, 8)).astype(dtype)
    if a.dtype.kind == "f" and a.size and rng.random() < 0.3:
        flat = a.reshape(-1)
        flat[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf, -0.0])
    return a


def _perturbed(rng: random.Random, nrng: np.random.Generator, a: np.ndarray) -> Any:
    roll = rng.random()
    if roll < 0.1:
        return _array(rng, nrng)  # another shape or dtype
    if roll < 0.15:
        return {"inner": a}  # a mapping against an array
    b = a.copy()
    if b.dtype.kind == "f" and b.size:
        b = b + (nrng.standard_normal(b.shape) * 10 ** rng.randint(-9, -2)).astype(b.dtype)
        if rng.random() < 0.2:
            b.reshape(-1)[0] = np.nan
    return b


def _dumps(seed: int, n: int = 40) -> tuple[dict, dict]:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    names = [*ODD, *(f"layer{i}.w" for i in range(n))]
    rng.shuffle(names)
    ref: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for name in names[:n]:
        a = _array(rng, nrng)
        side = rng.random()
        if side < 0.08:
            ref[name] = a  # missing
        elif side < 0.16:
            other[name] = a  # extra
        else:
            ref[name], other[name] = a, _perturbed(rng, nrng, a)
    ref["nest"] = {"x": np.ones(3), "y": {"z\u00e9": np.arange(4.0)}}
    other["nest"] = {"x": np.ones(3) * 1.5, "y": {"z\u00e9": np.arange(4.0)}}
    return ref, other


def _options(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    opts: dict[str, Any] = {}
    opts["method"] = rng.choice(["mean", "max", "all", ["max", "mean_rel"], "rel_l2", "min"])
    opts["threshold"] = rng.choice([1e-6, 0.5, None, 1e-30, 1e300])
    if rng.random() < 0.5:
        opts["atol"] = rng.choice([1e-3, 0.0, 1e-12])
    if rng.random() < 0.4:
        opts["rtol"] = rng.choice([1e-3, 0.5])
    if rng.random() < 0.5:
        opts["per_key"] = {"layer1*": {"max": math.inf}, "lay*3.w": 1e-2,
                           "nest/*": {"mean": 0.0, "atol": 1e-3}}
    if rng.random() < 0.3:
        opts["equal_nan"] = True
    return opts


@pytest.mark.parametrize("seed", range(12))
def test_random_comparisons_of_mappings(seed: int) -> None:
    ref, other = _dumps(seed)
    result = reprod.compare(ref, other, progress=False, **_options(seed))
    _same_json(result)
    _same_csv(result)
    _same_files({"a.npy": result, "sub/b\u00e9.npz": replace(result, ref_name="r\udcff")})
    _same_files({PurePosixPath("p.npy"): result, "q": result})  # type: ignore[dict-item]


needs_kernel = pytest.mark.skipif(_native.kernel() is None, reason="compiled kernel not built")


@needs_kernel
@pytest.mark.parametrize("seed", range(6))
def test_random_comparisons_of_dump_files(tmp_path, seed: int) -> None:
    """Files: the batch's RowKeyResults (fields built from a row) beside per-key results."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    ref, other = _dumps(seed, n=30)
    ref = {k: v for k, v in ref.items() if k and "\x00" not in k}
    other = {k: v for k, v in other.items() if k and "\x00" not in k}
    for i in range(300):  # small float keys: the batch's
        a = nrng.standard_normal(rng.choice([2, 5, 16])).astype(rng.choice([np.float32, np.float64]))
        ref[f"blk{i}"] = a
        other[f"blk{i}"] = a if rng.random() < 0.5 else a * np.float32(1 + 1e-3)
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, ref, allow_pickle=True)
    np.save(b, other, allow_pickle=True)
    result = reprod.compare(a, b, progress=False, **_options(seed))
    assert any(type(r) is RowKeyResult for r in result.results)
    assert any(type(r) is KeyResult for r in result.results)
    _same_json(result)
    _same_csv(result)
    _same_files({"x.npy": result, "y.npy": result})


@needs_kernel
def test_many_pieces_and_an_unsupported_key_among_them(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "_KEYS_PER_PIECE", 256)
    nrng = np.random.default_rng(3)
    ref = {f"k{i}": nrng.standard_normal(3).astype(np.float32) for i in range(1100)}
    other = {k: v * np.float32(1.0001) if i % 7 else v for i, (k, v) in enumerate(ref.items())}
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, ref, allow_pickle=True)
    np.save(b, other, allow_pickle=True)
    result = reprod.compare(a, b, progress=False, atol=1e-5)
    assert all(type(r) is RowKeyResult for r in result.results)
    results = list(result.results)
    results[700] = replace(results[700], mean_abs=np.float64(0.25))  # a numpy scalar
    mixed = replace(result, results=tuple(results))
    for r in (result, mixed):
        _same_json(r, indents=(2, None))
        _same_csv(r)
        assert len(list(data.iter_json(r))) == 1 + math.ceil(1100 / 256)


class Level(enum.IntEnum):
    ONE = 1


class Name(str):
    pass


@dataclass(frozen=True, eq=False)
class Extended(KeyResult):
    extra: str = "x"


def _hand_built() -> list[KeyResult]:
    """Values the fast path writes itself, and values it hands to the general path."""
    base = KeyResult(key="k", passed=False, status="failed", reason="r", path=("a", "b"),
                     ref_shape=(2, 3), other_shape=(2, 3), ref_dtype="float32",
                     other_dtype="float64", size=6, mean_abs=1e-300, max_abs=5e-324,
                     min_abs=-0.0, mean_rel=math.inf, max_rel=-math.inf, cosine=math.nan,
                     rel_l2=1e16, max_scaled=0.1 + 0.2, worst_index=(1, 2), worst_ref=-1.5,
                     worst_other=2.0**70, mismatched=3, ref_nan=1, methods=("mean", "max"),
                     thresholds={"mean": math.inf, "max": -0.0}, checks={"mean": True, "max": False},
                     atol=0.0, rtol=1e-3, note="n\u00e9")
    return [
        base,
        replace(base, thresholds={}, checks={}, methods=(), path=(), worst_index=()),
        replace(base, ref_shape=None, other_shape=None, worst_index=None, note=None),
        replace(base, key="lone\udcff", reason="\u4e2d\"\\\n", path=("lone\udcff",)),
        replace(base, thresholds={"nan": math.nan, "-inf": 1.0, "inf": 2}),
        replace(base, thresholds={"x": [1.0, math.nan, (2, "y")], "d": {"n": math.inf}}),
        replace(base, checks={"a": None, "b": 1, "c": 1.5}),
        replace(base, path=["a", "b"], ref_shape=[2, 3]),  # lists where tuples are usual
        replace(base, ref_shape=(True, 2.0), other_shape=(None, "x", [], {})),
        replace(base, worst_index=(np.int64(1), 2)),
        # numpy scalars: _jsonable's .item(); numpy's repr for a non-finite one (_json_safe)
        replace(base, mean_abs=np.float64(0.5), max_abs=np.float32(0.1), size=np.int64(6)),
        replace(base, mean_abs=np.float64(math.nan), passed=np.bool_(False)),
        replace(base, thresholds={"mean": np.float32(1e-6)}, rtol=np.float64(math.inf)),
        replace(base, size=Level.ONE, ref_nan=True, key=Name("sub")),
        replace(base, thresholds={1: 0.5, None: 1.0}),  # non-str keys: str(k) in JSON
        replace(base, thresholds={1: 0.5}),
        replace(base, worst_index=(math.nan,), thresholds={"mean": math.nan}),
        replace(base, worst_index=(np.array([1, 2]),)),
        Extended(key="e", passed=True, status="passed", reason="", extra="y"),
    ]


def test_hand_built_results() -> None:
    for kr in _hand_built():
        result = DiffResult(results=(kr, *_hand_built()[:2]), ref_name="r\u00e9",
                            options={"threshold": math.inf, "x": np.float32(2.0), "l": (1, math.nan)},
                            created="2026")
        _same_json(result)
        _same_csv(result)
        _same_files({"f": result, "g": DiffResult(results=())})


def test_what_the_fast_path_hands_back() -> None:
    hand = _hand_built()
    enc = KeyEncoder(2, 2)
    for kr in [*hand[:9], hand[-3]]:
        enc.encode(kr)  # written here
    for kr in [*hand[9:-3], *hand[-2:]]:
        with pytest.raises(Unsupported):
            enc.encode(kr)
    assert field_values(hand[-1])[0] == "e"  # a subclass's KeyResult fields, for the CSV


def test_empty_and_other_indents() -> None:
    empty = DiffResult(results=())
    _same_json(empty)
    _same_csv(empty)
    _same_files({})
    _same_files({"a": empty})
    result = reprod.compare({"a": np.ones(2)}, {"a": np.zeros(2)}, progress=False)
    for indent in ("\t", True):  # the general path's text or error
        for r in (result, empty):
            try:
                want: Any = "".join(data._iter_json_reference(r, indent=indent))  # type: ignore[arg-type]
            except TypeError as e:
                want = type(e)
            try:
                got: Any = data.to_json(r, indent=indent)  # type: ignore[arg-type]
            except TypeError as e:
                got = type(e)
            assert got == want
            assert data.files_to_json({"a": r}, indent=indent) == \
                data._files_to_json_reference({"a": r}, indent=indent)  # type: ignore[arg-type]


def test_errors_are_the_general_paths() -> None:
    base = _hand_built()[0]
    bad_key = DiffResult(results=(replace(base, thresholds={1: 0.5}),))
    with pytest.raises(TypeError):
        data._to_csv_reference(bad_key)
    with pytest.raises(TypeError):
        data.to_csv(bad_key)
    with pytest.raises(TypeError):
        data.files_to_csv({"f": bad_key})
    unwritable = DiffResult(results=(replace(base, note=object()),))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        data.to_json(unwritable)


def test_csv_methods_first_seen_late() -> None:
    """The CSV's columns come from the first key, and from every key where a later one has
    another method (per-key thresholds): both give the general path's text."""
    ref = {"missing": np.ones(2), **{f"k{i}": np.ones(3) for i in range(5)}}
    other = {f"k{i}": np.ones(3) * 1.01 for i in range(5)}
    for per_key in (None, {"k3": {"max": 0.1, "min": 0.0}}, {"k0": {"max": 0.1}}):
        result = reprod.compare(ref, other, progress=False, per_key=per_key)
        assert data._csv_of([(None, result.results)]) is not None  # not the general path
        _same_csv(result)
        _same_files({"a": result, "b": reprod.compare(other, other, progress=False, method="all")})


def test_lone_surrogate_keys_are_escaped() -> None:
    result = reprod.compare({"lone\udcffkey": np.ones(2)}, {"lone\udcffkey": np.zeros(2)},
                            progress=False)
    text = data.to_json(result)
    assert '"lone\\udcffkey"' in text and text.isascii()
    assert json.loads(text)["keys"][0]["key"] == "lone\udcffkey"
    _same_json(result)
    _same_csv(result)


def test_encode_many_is_encode_key_by_key() -> None:
    """``KeyEncoder.encode_many`` (a batch's keys a field at a time, what every key of the batch
    writes alike in one literal) against ``encode`` of each key, on batches mixing what it folds
    (one shape, one thresholds dict, constant columns) with what it cannot (lists, odd floats,
    dicts of other keys, numpy scalars, subclasses)."""
    hand = _hand_built()
    base = hand[0]
    shared_thr = {"mean": 1e-6, "max": 0.5}
    same = [replace(base, key=f"k{i}", path=(f"k{i}",), worst_index=(i,),
                    thresholds=shared_thr, mean_abs=[0.1, -0.0, math.nan, math.inf][i % 4],
                    size=6) for i in range(12)]
    two_d = [replace(b, worst_index=(i, 2 * i), path=("p", b.key)) for i, b in enumerate(same)]
    batches = [same, two_d, same[:1], hand[:9], [*same, *hand[:9]], [hand[9], *same],
               [hand[-1], *same], [*same[:3], hand[-2]], []]
    for indent in (None, 0, 2, 4):
        for level in (0, 2):
            enc = KeyEncoder(indent, level)
            for b in batches:
                try:
                    want: Any = [enc.encode(kr) for kr in b]
                except Unsupported:
                    want = Unsupported
                try:
                    got: Any = enc.encode_many(b)
                except Unsupported:
                    got = Unsupported
                assert got == want, (indent, level, [kr.key for kr in b])
