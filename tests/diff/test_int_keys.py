"""In-memory trees with integer keys (reprod_log's logger took them; ``ReprodLogger`` stores them
as their str): compared as the dump of the same tree would be, not a TypeError from the walk."""

from __future__ import annotations

import numpy as np
import pytest

import reprod
from reprod.diff.pairing import open_side
from reprod.errors import UnsupportedValueError


def test_int_keys_pair_with_the_dump_of_the_same_tree(tmp_path) -> None:
    rng = np.random.default_rng(3)
    tree = {7: rng.standard_normal(5), np.int64(12): np.ones(2), "block": {"w": np.zeros(3)}}
    lg = reprod.ReprodLogger()  # takes int keys at the top level (reprod_log's did)
    for k, v in tree.items():
        lg.add(k, v)
    for suffix in ("npz", "npy"):
        path = lg.save(tmp_path / f"d.{suffix}")
        r = reprod.compare(tree, path, method="max", threshold=0.0)
        assert r.passed
        assert [x.key for x in r.results] == ["7", "12", "block/w"]
        assert list(reprod.load(path)) == ["7", "12", "block"]


def test_nested_int_keys_in_memory() -> None:
    a = {"block": {0: np.ones(4), np.int64(12): np.ones(2)}}
    r = reprod.compare(a, {"block": {"0": np.ones(4), "12": np.ones(2)}})
    assert r.passed and [x.key for x in r.results] == ["block/0", "block/12"]


def test_a_changed_int_keyed_leaf_fails_where_it_is() -> None:
    a = {"x": {3: np.ones(3)}, 1: np.zeros(2)}
    b = {"x": {3: np.ones(3) + 1}, 1: np.zeros(2)}
    r = reprod.compare(a, b)
    assert [(x.key, x.status) for x in r.results] == [("x/3", "failed"), ("1", "passed")]
    assert r.first_failure.key == "x/3"


def test_an_int_key_on_one_side_pairs_with_its_str_on_the_other() -> None:
    r = reprod.compare({5: np.ones(2)}, {"5": np.ones(2)})
    assert r.passed and [x.key for x in r.results] == ["5"]


@pytest.mark.parametrize("tree, message", [
    ({7: np.ones(1), "7": np.ones(1)}, "ref: key 7 is there both as an int and as a str"),
    ({"a": {(1, 2): np.ones(1)}}, "ref: key a/(1, 2) is a tuple; keys must be str (or int)"),
    ({True: np.ones(1)}, "ref: key True is a bool; keys must be str (or int)"),
    ({1.5: np.ones(1)}, "ref: key 1.5 is a float; keys must be str (or int)"),
])
def test_other_keys_are_a_one_line_error(tree, message) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        reprod.compare(tree, {"x": np.ones(1)})
    assert str(info.value) == message


def test_str_keyed_trees_and_dumps_are_taken_as_they_are(tmp_path) -> None:
    tree = {"a": np.ones(2), "b": {"c": np.zeros(1)}}
    assert open_side(tree, "ref").tree is tree
    path = reprod.save(tmp_path / "d.npz", tree)
    dump = reprod.load(path)
    assert open_side(dump, "ref").tree is dump
