"""The native reader's lean parse of the metadata member (issue 20: a million keys' parsed JSON was
the peak of a load): ``_parse_meta(consume=True)`` gives the entries and the errors that the plain
parse gives, for every form of entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reprod
from reprod.errors import DumpFormatError
from reprod.storage import npz_reader
from reprod.storage.npz_format import FORMAT_NAME


def _doc(keys, **extra) -> bytes:
    return json.dumps({"format": FORMAT_NAME, "version": 1, "keys": keys, **extra}).encode()


def _both(raw: bytes):
    out = []
    for consume in (False, True):
        try:
            _, entries = npz_reader._parse_meta(memoryview(raw) if consume else raw, "f.npz",
                                                consume=consume)
        except DumpFormatError as exc:
            out.append(("error", str(exc)))
            continue
        out.append([([p] if type(p) is str else p, m, s) for p, m, s in entries])
    return out


GOOD = [
    {"path": ["a"], "member": "__reprod_0.npy"},
    {"path": ["n", "x"], "member": "__reprod_1.npy", "dtype": "bfloat16"},
    {"path": ["e"], "kind": "dict"},
    {"path": ["d"], "kind": "dict", "member": "ignored.npy"},
    {"path": ["w"], "member": "__reprod_2.npy", "shape": [2], "future": {"path": ["no"]}},
    {"member": "__reprod_3.npy", "path": ["z"], "dtype": None},
]


@pytest.mark.parametrize("bad", [
    [1], [None], [[]], [{"path": "a", "member": "m"}], [{"path": [], "member": "m"}],
    [{"path": [1], "member": "m"}], [{"path": ["a", 2], "member": "m"}], [{"path": ["a"]}],
    [{"path": ["a"], "member": 3}], [{"path": ["a"], "member": "m", "dtype": ""}],
    [{"path": ["a"], "member": "m", "dtype": 5}], [{"path": ["a"] * 100, "member": "m"}],
    [{"member": "m"}], [{"path": ["a"], "member": "m"}, {"path": ["b"], "member": 1}, 7],
])
def test_consumed_parse_gives_the_same_errors(bad):
    plain, lean = _both(_doc(GOOD + bad))
    assert plain[0] == "error" and plain == lean


def test_consumed_parse_gives_the_same_entries():
    plain, lean = _both(_doc(GOOD, writer={"path": ["x"]}, extra=[{"member": "m"}]))
    assert plain == lean and len(plain) == len(GOOD)
    assert [type(p[0]) for p, _, _ in lean] == [str] * len(GOOD)


@pytest.mark.parametrize("top", [b"{}", b'{"path": ["a"]}', b"[]", b'{"format": "x"}', b"{,"])
def test_consumed_parse_of_odd_documents(top):
    plain, lean = _both(top)
    assert plain == lean and plain[0] == "error"


def test_meta_stays_whole_after_a_lean_load(tmp_path):
    p = str(tmp_path / "d.npz")
    reprod.save(p, {"a": np.ones(2), "n": {"x": np.zeros(3)}, "e": {}})
    with reprod.load(p) as d:
        keys = d.meta["keys"]
        assert [k["path"] for k in keys] == [["a"], ["n", "x"], ["e"]]
        assert list(d) == ["a", "n", "e"] and list(d["n"]) == ["x"] and len(d["e"]) == 0
