"""Keys past the key log's spill: their metadata texts read back from the side file in large
pieces (``_KeyLog.spilled_joined``), the metadata member spooled to a file once it outgrows
memory, and a one-time save of a dict keeping no SQLite index. The metadata is what
``json.dumps`` writes of the document it holds, whichever way it was made."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import _native
from reprod.storage import npz_keylog, npz_members, npz_writer
from reprod.storage.npz_format import META_NAME


class _Pairs(Mapping):
    """A mapping that is not a dict: the writer keeps its key index for it."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d

    def __getitem__(self, k: str) -> Any:
        return self.d[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.d)

    def __len__(self) -> int:
        return len(self.d)


@pytest.fixture(autouse=True)
def _small_spill(monkeypatch):
    monkeypatch.setattr(npz_keylog._KeyLog, "spill", 40)
    monkeypatch.setattr(npz_members, "_KEEP_META", 700)  # larger metadata: spooled
    previous = _native.set_enabled(True)
    yield
    _native.set_enabled(previous)


def _tree(n: int, surrogate: bool) -> dict[str, Any]:
    tree: dict[str, Any] = {f"k{i}": np.full(1 + i % 3, i, np.float32) for i in range(n)}
    tree["ключ"] = {"日本": np.ones(1), "empty": {}}  # past the spill: the Python path
    tree['q"\\\n'] = np.ones(2)
    tree["long" * 300] = np.zeros(1)  # a numbered member
    if surrogate:
        tree["s\udcff"] = np.ones(1)
    tree.update({f"tail{i}": np.arange(i % 4, dtype=np.int16) for i in range(30)})
    return tree


def _metadata(path: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(META_NAME)


def _written(tmp_path, how: str, tree: dict[str, Any]) -> str:
    path = str(tmp_path / f"{how}.npz")
    if how == "dict":  # one save of a dict: no index
        npz_writer.write_npz(path, tree)
    elif how == "mapping":  # not a dict: indexed, the same batch path
        npz_writer.write_npz(path, _Pairs(tree))
    else:  # a stream, key by key
        w = npz_writer.NpzWriter(path)
        for k, v in tree.items():
            w.add(k, v)
        w.close()
    return path


@pytest.mark.parametrize("surrogate", [False, True])
@pytest.mark.parametrize("how", ["dict", "mapping", "stream"])
@pytest.mark.parametrize("kernel", [True, False])
def test_metadata_past_the_spill(tmp_path, surrogate, how, kernel) -> None:
    _native.set_enabled(kernel)
    for n in (10, 200):  # under the spill and the kept size; past both
        tree = _tree(n, surrogate)
        path = _written(tmp_path, how, tree)
        raw = _metadata(path)
        doc = json.loads(raw)
        assert raw == json.dumps(doc, ensure_ascii=surrogate).encode("utf-8")
        assert list(dict.fromkeys(e["path"][0] for e in doc["keys"])) == list(tree)
        back = reprod.load(path, verify=True)
        try:
            assert list(back) == list(tree)
            np.testing.assert_array_equal(back[f"k{n - 1}"], tree[f"k{n - 1}"])
            np.testing.assert_array_equal(back["tail29"], tree["tail29"])
        finally:
            back.close()
    assert sorted(os.listdir(tmp_path)) == [f"{how}.npz"]  # no side file left


def test_the_three_ways_write_the_same_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(npz_members, "_FIXED_DOS", (0, 33))
    tree = _tree(150, surrogate=False)
    files = {how: open(_written(tmp_path, how, tree), "rb").read()
             for how in ("dict", "mapping", "stream")}
    assert files["dict"] == files["mapping"] == files["stream"]


def _texts(n: int) -> list[tuple[str, str, bytes]]:
    rng = np.random.default_rng(5)
    alphabet = ["a", "é", "ключ", "😀", '"', ", ", "\\u0000", "x" * 40]
    out = []
    for i in range(n):
        key = f"key{i}"
        text = '{"path": ["' + "".join(rng.choice(alphabet, rng.integers(0, 8))) + '"]}'
        if i % 7 == 3:
            text = ""  # an empty text is left out of the join
        records = bytes(rng.integers(0, 256, 24 * int(rng.integers(0, 3)), dtype=np.uint8))
        out.append((key, text, records))
    return out


@pytest.mark.parametrize("indexed", [True, False])
def test_spilled_joined_is_the_texts_joined(tmp_path, indexed) -> None:
    """Every read size cuts the side file's records somewhere else: the join is the same."""
    log = npz_keylog._KeyLog(str(tmp_path), indexed)
    entries = _texts(300)
    for key, text, records in entries:
        log.put(key, text, records)
    if indexed:  # re-put keys past the spill: their latest text, in the first place
        for i in (45, 100, 299):
            key, _, records = entries[i]
            entries[i] = (key, f'{{"new": {i}}}', records)
            log.put(key, entries[i][1], records)
    spilled = [t for _, t, _ in entries[40:] if t]
    want = ", ".join(spilled).encode("utf-8")
    try:
        for size in (1, 5, 64, 300, 1 << 20):
            blocks = list(log.spilled_joined(size))
            assert all(b is not None for b in blocks)
            assert b", ".join(b for b in blocks if b) == want, size
        assert [t for t in log.text_blocks(1000)][0] == [t + "\0" + r.decode("latin1")
                                                          for _, t, r in entries[:40]]
        if indexed:
            assert log.keys() == [k for k, _, _ in entries]
        else:
            with pytest.raises(RuntimeError, match="does not keep"):
                log.keys()
    finally:
        log.close()


def test_spilled_joined_marks_a_lone_surrogate(tmp_path) -> None:
    log = npz_keylog._KeyLog(str(tmp_path), False)
    for i in range(40):
        log.put(f"k{i}", f'{{"i": {i}}}')
    log.put("odd", '{"path": ["s\udcff"]}', b"\xed\xa0\x80")  # surrogate bytes in the records too
    log.put("fine", '{"path": ["ok"]}', b"\xed\xa0\x80")
    try:
        assert list(log.spilled_joined()) == [None]  # the text's surrogate
        assert list(log.spilled_joined(check=False)) == [
            '{"path": ["s\udcff"]}, {"path": ["ok"]}'.encode("utf-8", "surrogatepass")]
        log2 = npz_keylog._KeyLog(str(tmp_path), False)
        for i in range(41):
            log2.put(f"k{i}", f'{{"i": {i}}}', b"\xed\xa0\x80")  # only in the records: cut off
        assert list(log2.spilled_joined()) == [b'{"i": 40}']
        log2.close()
    finally:
        log.close()


@pytest.mark.parametrize("n", [30, 120])
def test_a_closed_streams_keys_are_all_of_them(tmp_path, n) -> None:
    """close() lets go of the SQLite index of the keys past the spill: keys() after it used to
    list only the first ones, the rest silently missing; now it reads them from the dump."""
    path = tmp_path / "s.npz"
    lg = reprod.ReprodLogger(stream_to=path)
    for i in range(n):
        lg.add(f"k{i}", np.full(2, i, np.float32))
    lg.add("k3", np.zeros(3))  # re-added: keeps its first place
    expected = [f"k{i}" for i in range(n)]
    assert lg.keys() == expected
    lg.close()
    assert lg.keys() == expected == list(reprod.load(path).keys())


def test_an_abandoned_streams_keys_past_the_spill_are_refused(tmp_path) -> None:
    lg = reprod.ReprodLogger(stream_to=tmp_path / "s.npz")
    for i in range(120):
        lg.add(f"k{i}", np.ones(2))
    lg._writer.abort()
    with pytest.raises(reprod.errors.ReprodError, match="abandoned"):
        lg.keys()
    assert not os.listdir(tmp_path)
