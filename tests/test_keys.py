"""One key rule for every way a tree comes in: ``ReprodLogger.add`` (top level and nested),
``reprod.save`` (both formats) and ``reprod.compare`` of in-memory trees take an int key as its
str and refuse any other non-str key, or an int beside its own str, with one line naming it."""

from __future__ import annotations

import numpy as np
import pytest

import reprod
from reprod.errors import UnsupportedValueError
from reprod.keys import key_text


class Name(str):
    pass


@pytest.mark.parametrize(("key", "text"), [
    ("a", "a"), (Name("sub"), "sub"), (0, "0"), (-3, "-3"), (2**70, str(2**70)),
    (np.int8(-5), "-5"), (np.uint64(2**64 - 1), str(2**64 - 1)), (np.int64(12), "12"),
    (True, None), (np.bool_(False), None), (1.0, None), (np.float32(2), None), ((1,), None),
    (None, None), (b"a", None),
])
def test_key_text(key, text) -> None:
    got = key_text(key)
    assert got == text
    assert got is None or type(got) is str


def _tree() -> dict:
    rng = np.random.default_rng(5)
    return {3: rng.standard_normal(4), "block": {0: rng.standard_normal(2), np.int64(7): np.ones(3),
                                                 "w": {1: np.arange(5)}}}


TEXT_KEYS = ["3", "block/0", "block/7", "block/w/1"]


@pytest.mark.parametrize("suffix", ["npz", "npy"])
def test_save_takes_the_int_keys_add_takes(tmp_path, suffix) -> None:
    tree = _tree()
    saved = reprod.save(tmp_path / f"s.{suffix}", tree)
    lg = reprod.ReprodLogger()
    for k, v in tree.items():
        lg.add(k, v)
    logged = lg.save(tmp_path / f"l.{suffix}")
    for path in (saved, logged):
        r = reprod.compare(tree, path, method="max", threshold=0.0)
        assert r.passed and [x.key for x in r.results] == TEXT_KEYS
        dump = reprod.load(path).to_dict()
        assert list(dump) == ["3", "block"] and list(dump["block"]) == ["0", "7", "w"]
        np.testing.assert_array_equal(dump["block"]["w"]["1"], np.arange(5))


def test_a_reprod_log_dump_with_int_keys_reads_as_the_same_keys(tmp_path) -> None:
    reprod_log = pytest.importorskip("reprod_log")
    tree = {3: np.linspace(0, 1, 4), 11: np.ones(2)}
    theirs = reprod_log.ReprodLogger()
    for k, v in tree.items():
        theirs.add(k, v)
    theirs.save(str(tmp_path / "theirs.npy"))
    ours = reprod.save(tmp_path / "ours.npz", tree)
    r = reprod.compare(tmp_path / "theirs.npy", ours, method="max", threshold=0.0)
    assert r.passed and [x.key for x in r.results] == ["3", "11"]


BAD = [
    ({1: np.ones(1), "1": np.ones(1)}, "1 is there both as an int and as a str"),
    ({"1": np.ones(1), np.int16(1): np.ones(1)}, "1 is there both as an int and as a str"),
    ({(1, 2): np.ones(1)}, "(1, 2) is a tuple; keys must be str (or int)"),
    ({True: np.ones(1)}, "True is a bool; keys must be str (or int)"),
    ({2.5: np.ones(1)}, "2.5 is a float; keys must be str (or int)"),
]


@pytest.mark.parametrize(("tree", "problem"), BAD)
def test_bad_keys_are_one_line_errors_everywhere(tmp_path, tree, problem) -> None:
    path = tmp_path / "bad.npz"
    cases = [
        (lambda: reprod.save(path, tree), f"{path}: key {problem}"),
        (lambda: reprod.save(path, {"z": tree}), f"{path}: key 'z': nested key {problem}"),
        (lambda: reprod.ReprodLogger().add("z", tree), f"key 'z': nested key {problem}"),
        (lambda: reprod.compare(tree, tree), f"ref: key {problem}"),
    ]
    for call, message in cases:
        with pytest.raises(UnsupportedValueError) as e:
            call()
        assert str(e.value) == message
    assert not path.exists()  # nothing half written


def test_a_bad_top_level_logger_key() -> None:
    with pytest.raises(UnsupportedValueError, match=r"^key 2\.5 is a float; keys must be str \(or int\)$"):
        reprod.ReprodLogger().add(2.5, np.ones(1))


def test_a_streaming_logger_takes_nested_int_keys(tmp_path) -> None:
    path = tmp_path / "s.npz"
    with reprod.ReprodLogger(stream_to=path) as lg:
        lg.add(4, {0: np.ones(2), "x": {5: np.zeros(1)}})
    assert [x.key for x in reprod.compare(path, {"4": {"0": np.ones(2), "x": {"5": np.zeros(1)}}}).results] \
        == ["4/0", "4/x/5"]
