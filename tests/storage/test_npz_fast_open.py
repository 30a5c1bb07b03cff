"""Opening a native ``.npz`` of many small keys: the kernel's directory walk, the metadata's
regular-expression parse and the inlined column build give what the general readers give.

* ``_kernel.zip_central`` against ``npz_directory``'s ``struct`` loop: the same members, names,
  hashes, or the same refusal, on valid and on mutated archives;
* ``npz_meta.plain_meta_entries`` against ``_parse_meta``: the same (key, member) pairs wherever
  it answers, on the writer's documents and on mutated ones;
* ``reprod.load`` with the fast paths against without them: the same dump, or the same error.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import reprod
from reprod import _native
from reprod.errors import ReprodError
from reprod.storage import npz_meta, npz_reader
from reprod.storage.lazy import Dump, MappedFile
from reprod.storage.npz_directory import _fast_directory
from reprod.storage.npz_format import META_NAME

needs_kernel = pytest.mark.skipif(_native.built() is None, reason="compiled kernel not built")


def _directory(path: str, kernel: bool) -> object:
    before = _native.set_enabled(kernel)
    try:
        d = _fast_directory(MappedFile(path))
    finally:
        _native.set_enabled(before)
    if d is None:
        return None
    return ([d.name(i) for i in range(len(d))], [d.row(i) for i in range(len(d))], bytes(d._utf8),
            list(d._name_at), list(d._name_len))


def _tree(rng: np.random.Generator, n: int = 40) -> dict:
    return {f"layer{i}/out": rng.standard_normal(1 + i % 9).astype(np.float32) for i in range(n)}


@needs_kernel
def test_directory_on_valid_archives(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    reprod.save(tmp_path / "a.npz", _tree(rng))
    paths.append(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", x=np.ones(3), y=np.zeros((2, 2)))
    paths.append(tmp_path / "b.npz")
    np.savez_compressed(tmp_path / "c.npz", x=np.ones(3))  # compressed: neither reader takes it
    paths.append(tmp_path / "c.npz")
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:  # a non-ASCII name: the struct loop's
        z.writestr("ключ.npy", b"\x93NUMPY")
        z.writestr("plain.npy", b"\x93NUMPY")
    paths.append(tmp_path / "d.npz")
    reprod.save(tmp_path / "e.npz", {"a b": np.ones(2), "naïve": np.ones(2), "x" * 300: np.ones(2)})
    paths.append(tmp_path / "e.npz")
    for p in paths:
        assert _directory(str(p), True) == _directory(str(p), False), p
    assert _directory(str(tmp_path / "a.npz"), True) is not None
    assert _directory(str(tmp_path / "c.npz"), True) is None
    assert _directory(str(tmp_path / "d.npz"), True) is not None  # read by the struct loop


@needs_kernel
def test_directory_on_mutated_archives(tmp_path):
    """Byte flips in the central directory and the local headers: the kernel walk refuses or
    reads exactly what the struct loop refuses or reads."""
    rng = np.random.default_rng(1)
    src = tmp_path / "src.npz"
    reprod.save(src, _tree(rng, 12))
    raw = src.read_bytes()
    cd = raw.rfind(b"PK\x01\x02", 0, raw.find(b"PK\x05\x06"))
    cd = raw.find(b"PK\x01\x02")
    headers = [i for i in range(len(raw)) if raw.startswith(b"PK\x03\x04", i)]
    spots = list(range(cd, len(raw))) + [h + k for h in headers for k in range(34)]
    out = tmp_path / "m.npz"
    agreed = taken = 0
    for trial in range(600):
        b = bytearray(raw)
        for at in rng.choice(spots, size=1 + trial % 3):
            b[at] = int(rng.integers(0, 256))
        out.write_bytes(bytes(b))
        fast, slow = _directory(str(out), True), _directory(str(out), False)
        assert fast == slow, trial
        agreed += 1
        taken += fast is not None
    assert agreed == 600 and 0 < taken < 600


def _pairs_of(doc: bytes) -> object:
    try:
        _meta, entries = npz_meta._parse_meta(doc, "m.json", consume=True)
    except ReprodError as exc:
        return str(exc)
    return entries


@pytest.mark.parametrize("seed", range(4))
def test_meta_fast_parse_agrees_with_json(tmp_path, seed):
    rng = np.random.default_rng(seed)
    keys = [f"layer{i}/out" for i in range(30)]
    reprod.save(tmp_path / "a.npz", {k: np.ones(2, np.float32) for k in keys})
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        doc = z.read(META_NAME)
    fast = npz_meta.plain_meta_entries(doc, 0, len(doc))
    assert fast is not None
    assert [(str(k, "utf-8"), str(m, "utf-8"), None) for k, m in fast] == _pairs_of(doc)
    # other spellings: escapes, a source dtype, nested keys, reordered fields, blanks
    for other in (doc.replace(b'"layer3/out"', b'"layer3\\/out"'),
                  doc.replace(b'"member": "__reprod_4.npy"}', b'"member": "__reprod_4.npy", "dtype": "bfloat16"}'),
                  doc.replace(b'["layer5/out"]', b'["layer5", "out"]'),
                  doc.replace(b'{"path": ["layer6/out"], "member": "__reprod_6.npy"}',
                              b'{"member": "__reprod_6.npy", "path": ["layer6/out"]}'),
                  doc.replace(b'"keys": [', b'"keys":['),
                  doc.replace(b'"keys": [{', b'"keys": [ {')):
        assert npz_meta.plain_meta_entries(other, 0, len(other)) is None
        assert not isinstance(_pairs_of(other), str)
    # mutations: wherever the fast parse answers, the JSON parse gives the same entries
    answered = 0
    for _ in range(400):
        b = bytearray(doc)
        for at in rng.integers(0, len(b), size=int(rng.integers(1, 3))):
            b[at] = int(rng.choice([0, 0x22, 0x5C, 0x7D, 0x5D, 0x2C, 0x20, 0xC3, 0xFF, int(rng.integers(0, 256))]))
        fast = npz_meta.plain_meta_entries(bytes(b), 0, len(b))
        if fast is None:
            continue
        answered += 1
        whole = _pairs_of(bytes(b))
        try:
            decoded = [(str(k, "utf-8"), str(m, "utf-8"), None) for k, m in fast]
        except UnicodeDecodeError:  # not UTF-8: the reader hands it to the JSON parse, which refuses
            assert isinstance(whole, str)
            continue
        assert decoded == whole
    assert answered > 0


def _flat(d: object, prefix: str = "") -> dict:
    out: dict = {}
    for k in d:  # type: ignore[attr-defined]
        spec = d.spec(k)  # type: ignore[attr-defined]
        if isinstance(spec, Dump):
            out.update(_flat(spec, f"{prefix}{k}/"))
        else:
            out[prefix + k] = (spec.dtype, spec.shape, spec.offset, spec.check, d[k].tobytes())  # type: ignore[index]
    return out


def _load(path: str, fast: bool, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(npz_reader, "plain_meta_entries", lambda *_: None)
            m.setattr(npz_reader, "_plain_columns", lambda *_: None)
        before = _native.set_enabled(fast and _native.built() is not None)
        try:
            return _flat(reprod.load(path))
        except ReprodError as exc:
            return str(exc)
        finally:
            _native.set_enabled(before)


def test_load_with_and_without_the_fast_paths(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    trees = {
        "plain": _tree(rng, 50),
        "mixed": {"a": np.ones(3), "b/c": np.arange(6, dtype=np.int16).reshape(2, 3), "e": np.zeros(0),
                  "f": np.ones((2, 3), np.float32).T, "naïve": np.ones(2, ">f8")},
        "nested": {"x": {"y": np.ones(2)}, "z": np.ones(2)},
    }
    for name, tree in trees.items():
        p = str(tmp_path / f"{name}.npz")
        reprod.save(p, tree)
        assert _load(p, True, monkeypatch) == _load(p, False, monkeypatch), name
    # a member whose header lies about its size, behind a metadata member the fast parse reads
    p = str(tmp_path / "plain.npz")
    raw = bytearray((tmp_path / "plain.npz").read_bytes())
    at = raw.index(b"'shape': (5,)")
    raw[at + 10] = ord("7")
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    bad = str(tmp_path / "bad.npz")
    got = _load(bad, True, monkeypatch)
    assert isinstance(got, str) and got == _load(bad, False, monkeypatch)
    # a metadata document naming members out of order: the general reader's lookup
    tree = _tree(rng, 6)
    reprod.save(tmp_path / "o.npz", tree)
    with zipfile.ZipFile(tmp_path / "o.npz") as z:
        doc = json.loads(z.read(META_NAME))
        members = {n: z.read(n) for n in z.namelist() if n != META_NAME}
    doc["keys"].reverse()
    with zipfile.ZipFile(tmp_path / "r.npz", "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        z.writestr(META_NAME, json.dumps(doc))
    r = str(tmp_path / "r.npz")
    assert _load(r, True, monkeypatch) == _load(r, False, monkeypatch)
