"""Flat dumps held as columns (``reprod.storage.columns.ColumnTree``), the chunked parse of large
metadata (``npz_meta.iter_meta_chunked``), the column-held zip directory
(``npz_directory.Directory``) and ``MappedFile.drop_pages``, each against an independent reference:

- values against numpy's own readers (``np.load(allow_pickle=True).item()`` for a reprod_log
  ``.npy``; ``zipfile`` + ``np.lib.format.read_array`` and ``np.load`` for a ``.npz``), key order
  against the saved dict, specs against the same reader with columns disabled (``.npy``) or the
  general ``zipfile`` reader (``.npz``), to_dict's sharing against ``np.load``'s object identity;
- the chunked parse against the whole parse (``_parse_meta(consume=True)``): same entries, or
  ``Rechunk`` (or an error) and then ``reprod.load`` gives exactly what the whole parse gives;
- the fast directory against ``zipfile`` and the general reader.
"""

from __future__ import annotations

import io
import json
import mmap
import shutil
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import pytest

import reprod
from reprod import DumpFormatError
from reprod.storage import lazy, legacy, npy_header, npz_directory, npz_meta, npz_reader
from reprod.storage.columns import ColumnTree, columns_of
from reprod.storage.lazy import ArraySpec, Dump, MappedFile, NonNumericValue
from reprod.storage.npz_format import FORMAT_NAME, FORMAT_VERSION, META_NAME
from reprod.storage.npz_meta import Rechunk, _parse_meta, iter_meta_chunked

try:  # bfloat16 values come from torch tensors; optional
    import torch
except ImportError:  # pragma: no cover - torch is in the test extras
    torch = None

# ---------------------------------------------------------------------------------------------
# random flat dumps
# ---------------------------------------------------------------------------------------------

DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
          np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128, ">i4", ">f8",
          ">c8", "<u2"]
SHAPES = [(), (), (0,), (3, 0), (0, 0, 2), (1,), (5,), (7,), (2, 3), (3, 2), (2, 3, 4), (1, 1, 2)]
# keys that are hard for the metadata's JSON (the chunked parse cuts at '}, {"path": '), for zip
# member names, for the pickle and for the ``Dump`` API
TRICKY_KEYS = ["", "ключ", "键🙂", '"}, {"path": ', 'x"}, {\\"path\\": ["y"], ', "back\\slash",
               "\\", "\\\\\"", 'q"uote', "a/b", "sp ace", "__reprod__.json", "__reprod_0.npy",
               "\ud800lone", "tab\tnew\nline", "nul\x00byte", "k" * 1500, "}", "{", "],", "\u2028"]
ALPHABET = list("abcxyz019_-.") + ["é", "中", "🙂", "\\", '"', "}", "{", ",", " ", "/"]


def _array(rng: np.random.Generator, *, allow_fortran: bool = True) -> np.ndarray:
    dt = np.dtype(DTYPES[int(rng.integers(len(DTYPES)))])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    n = int(np.prod(shape))
    if dt.kind == "b":
        arr = rng.integers(0, 2, n).astype(bool)
    else:  # random bit patterns: NaN payloads, infinities, subnormals, extreme integers
        arr = np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt).copy()
    arr = arr.reshape(shape)
    if allow_fortran and len(shape) >= 2 and rng.random() < 0.5:
        arr = np.asfortranarray(arr)
    return arr


def _key(rng: np.random.Generator, i: int, used: set[str]) -> str:
    if rng.random() < 0.35:
        k = TRICKY_KEYS[int(rng.integers(len(TRICKY_KEYS)))]
        if k not in used:
            return k
    body = "".join(ALPHABET[int(j)] for j in rng.integers(0, len(ALPHABET), int(rng.integers(0, 8))))
    return f"k{i}{body}"


def _flat(seed: int, *, n_max: int = 40) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A flat dict of arrays with tricky keys; some keys hold the same array object as an
    earlier key (``aliases``: (first key, later key))."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {}
    aliases: list[tuple[str, str]] = []
    for i in range(int(rng.integers(1, n_max))):
        k = _key(rng, i, set(data))
        if data and rng.random() < 0.15:
            first = list(data)[int(rng.integers(len(data)))]
            data[k] = data[first]
            aliases.append((first, k))
        else:
            data[k] = _array(rng)
    return data, aliases


def _same(got: Any, want: Any, where: str = "", *, any_byteorder: bool = False) -> None:
    """Same dtype, shape and bits (NaN payloads too). ``any_byteorder``: the same values in
    either byte order (unpickling makes a big-endian array native, np.load's .npy dict too;
    reprod views the file's bytes as they lie)."""
    want = np.asarray(want)
    assert isinstance(got, np.ndarray), f"{where}: {type(got).__name__}"
    if any_byteorder:
        got = got.astype(got.dtype.newbyteorder("="))
        want = want.astype(want.dtype.newbyteorder("="))
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
    assert got.tobytes() == want.tobytes(), f"{where}: values differ"


def _spec_fields(spec: Any) -> tuple[Any, ...]:
    return (spec.dtype.str, spec.shape, spec.offset, spec.fortran, spec.source_dtype, spec.check,
            spec.loader is None)


def _specs(dump: Dump) -> list[tuple[Any, ...]]:
    return [(k, *_spec_fields(dump.spec(k))) for k in dump]


def _rows(dump: Dump, prefix: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key in order, depth first, with its spec and the bytes read."""
    rows: list[tuple[Any, ...]] = []
    for k in dump:
        spec = dump.spec(k)
        if isinstance(spec, Dump):
            rows.append((prefix + (k,), "dict"))
            rows.extend(_rows(spec, prefix + (k,)))
            continue
        if type(spec) is NonNumericValue:
            rows.append((prefix + (k,), "non-numeric", str(spec)))
            continue
        arr = dump[k]
        rows.append((prefix + (k,), *_spec_fields(spec), arr.dtype.str, arr.shape, arr.tobytes()))
    return rows


def _outcome(load: Callable[[], Dump]) -> tuple[Any, ...]:
    """What a reader makes of a file: every key with its spec and bytes, verify() and the
    metadata; or the error's message."""
    try:
        dump = load()
    except DumpFormatError as exc:
        return ("error", str(exc))
    try:
        rows = _rows(dump)
        dump.verify()
        return ("ok", rows, repr(dump.meta), type(dump._tree).__name__)
    except DumpFormatError as exc:
        return ("error after load", str(exc))
    finally:
        dump.close()


def _zipfile_outcome(path: str) -> tuple[Any, ...]:
    """The general reader's outcome, less the tree's type (it never makes columns)."""
    out = _outcome(lambda: npz_reader._read_npz_zipfile(MappedFile(path)))
    return out[:3] if out[0] == "ok" else out


def _less_type(out: tuple[Any, ...]) -> tuple[Any, ...]:
    return out[:3] if out[0] == "ok" else out


def _distinct_payloads(a: np.ndarray, b: np.ndarray) -> bool:
    # 0- and 1-byte payloads are CPython singletons that pickle's memo shares between distinct
    # arrays: see test_npy_to_dict_keeps_distinct_arrays_distinct_when_pickle_shares_their_bytes
    return a.nbytes > 1 or b.nbytes > 1


# ---------------------------------------------------------------------------------------------
# 1. reprod_log .npy: flat dumps become columns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(14))
def test_npy_flat_dumps_match_numpy(tmp_path, monkeypatch, seed) -> None:
    data, aliases = _flat(seed)
    p = str(tmp_path / "d.npy")
    np.save(p, data, allow_pickle=True)
    ref = np.load(p, allow_pickle=True).item()
    assert list(ref) == list(data)
    for a, b in aliases:  # the reference shares what pickle's memo shares
        assert ref[a] is ref[b]

    d = reprod.load(p)
    assert type(d._tree) is ColumnTree
    assert list(d) == list(ref) and len(d) == len(ref)
    for k in ref:
        assert k in d
        _same(d[k], ref[k], k, any_byteorder=True)
        _same(d[k], data[k], k)  # the saved array exactly, byte order too
        assert not d[k].flags.writeable
        assert d.spec(k).fortran == (ref[k].ndim > 1 and ref[k].flags.f_contiguous
                                     and not ref[k].flags.c_contiguous)
    assert "never a key \x01" not in d
    with pytest.raises(KeyError):
        d["never a key \x01"]

    # the same specs as the dict tree the reader builds with columns disabled
    with monkeypatch.context() as m:
        m.setattr(legacy, "columns_of", lambda tree: None)
        m.setattr(legacy, "_stub_columns", lambda *_: None)
        plain = reprod.load(p)
    assert type(plain._tree) is dict
    # the columns built straight from the walker's stubs are the ones built from its specs
    with monkeypatch.context() as m:
        m.setattr(legacy, "_stub_columns", lambda *_: None)
        via_specs = reprod.load(p)
    assert type(via_specs._tree) is ColumnTree
    for name in ("_offsets", "_codes", "_layouts"):
        assert getattr(d._tree, name) == getattr(via_specs._tree, name), name
    assert d._tree._rows == via_specs._tree._rows and list(d._tree._rows) == list(via_specs._tree._rows)
    assert _specs(d) == _specs(plain)
    assert list(d._tree.items()) == list(plain._tree.items())
    assert list(d._tree.values()) == list(plain._tree.values())
    assert d._tree == plain._tree  # Mapping equality: same keys, equal specs

    d.verify()  # no checksums in a pickle: a no-op that must not fail
    td = d.to_dict()
    assert list(td) == list(ref)
    for k in ref:
        _same(td[k], ref[k], k, any_byteorder=True)
        assert td[k].flags.writeable
    keys = list(ref)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            # one array under two keys: one copy, as np.load gives one object; but for a
            # payload of 0 or 1 byte, which pickle also shares between distinct arrays, a copy each
            if ref[a] is ref[b] and ref[a].nbytes > 1:
                assert td[a] is td[b], (a, b)
            elif ref[a] is ref[b]:
                assert td[a] is not td[b] and np.array_equal(td[a], td[b]), (a, b)
            elif _distinct_payloads(ref[a], ref[b]):
                assert td[a] is not td[b], (a, b)
                assert not np.shares_memory(td[a], td[b]), (a, b)
    wd = d.to_writable_dict()
    assert list(wd) == list(ref)
    for k in ref:
        _same(wd[k], ref[k], k, any_byteorder=True)
        assert wd[k].flags.writeable
    # released keys (Dump._release, the engine's): a key stays, its value None, as in a dict
    # tree; the other keys still read
    for k in keys[:3]:
        d._release(k)
        plain._release(k)
        assert d._tree[k] is None and k in d and list(d) == keys
    assert list(d._tree.items()) == list(plain._tree.items())
    for k in keys[3:]:
        _same(d[k], ref[k], k, any_byteorder=True)
    d.close()
    plain.close()


@pytest.mark.parametrize("value", [np.float32(1.5), 2.5, 7, "text", None, [1, 2],
                                   np.array(["s"]), {"n": np.ones(2)}, {}])
def test_npy_dumps_that_are_not_flat_arrays_stay_dicts(tmp_path, value) -> None:
    data = {"a": np.arange(3.0), "v": value, "b": np.ones((2, 2), np.int16)}
    p = str(tmp_path / "d.npy")
    np.save(p, data, allow_pickle=True)
    ref = np.load(p, allow_pickle=True).item()
    d = reprod.load(p)
    assert type(d._tree) is dict
    assert list(d) == list(ref)
    _same(d["a"], ref["a"])
    _same(d["b"], ref["b"])
    got = d["v"]
    if isinstance(value, dict):
        assert list(got) == list(value)
        for k in value:
            _same(got[k], ref["v"][k], k)
    elif type(got) is NonNumericValue:
        assert value is None or isinstance(value, (str, np.ndarray))
    else:
        _same(got, np.asarray(ref["v"]))
    td = d.to_dict()
    _same(td["a"], ref["a"])
    _same(td["b"], ref["b"])
    d.close()


def test_npy_to_dict_keeps_distinct_arrays_distinct_when_pickle_shares_their_bytes(tmp_path) -> None:
    """np.save pickles each array's bytes; CPython's empty and one-byte ``bytes`` are singletons,
    so pickle's memo stores the payload of ``[7]`` (int8) once for two distinct arrays, and the
    reader gives both keys the same offset. ``np.load`` gives two independent arrays; so did
    ``to_dict`` before it keyed its shared copies by (offset, dtype, shape, ...) instead of by
    spec object. Now writing into one key's copy changes the other's."""
    data = {"h": np.array([7], np.int8), "i": np.array([7], np.int8),
            "e1": np.zeros((0, 3), np.float32), "e2": np.zeros((0, 3), np.float32)}
    p = str(tmp_path / "d.npy")
    np.save(p, data, allow_pickle=True)
    ref = np.load(p, allow_pickle=True).item()
    assert ref["h"] is not ref["i"] and ref["e1"] is not ref["e2"]
    d = reprod.load(p)
    td = d.to_dict()
    assert td["h"] is not td["i"]
    assert td["e1"] is not td["e2"]
    td["h"][0] = 1
    assert td["i"][0] == 7
    d.close()


def test_npy_to_writable_dict_keeps_distinct_arrays_apart_when_pickle_shares_their_bytes(
        tmp_path) -> None:
    """As above, for ``to_writable_dict`` (copy-on-write views of the file): the two keys view
    the same bytes, so a write through one shows through the other, which ``np.load`` never does.
    (Not new with the column change: the reader gave both the same offset before it too.)"""
    data = {"h": np.array([7], np.int8), "i": np.array([7], np.int8)}
    p = str(tmp_path / "d.npy")
    np.save(p, data, allow_pickle=True)
    d = reprod.load(p)
    wd = d.to_writable_dict()
    wd["h"][0] = 1
    assert wd["i"][0] == 7
    d.close()


# ---------------------------------------------------------------------------------------------
# 1. native .npz: flat dumps become columns
# ---------------------------------------------------------------------------------------------


def _zip_reference(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """key -> array as zipfile and numpy's .npy reader read the members the metadata names."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read(META_NAME))
        for e in meta["keys"]:
            arr = np.lib.format.read_array(io.BytesIO(zf.read(e["member"])), allow_pickle=False)
            if e.get("dtype") == "bfloat16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            out[e["path"][0]] = arr
    return out, meta


@pytest.mark.parametrize("seed", range(14))
def test_npz_flat_dumps_match_zipfile_and_numpy(tmp_path, seed) -> None:
    data, aliases = _flat(seed + 1000)
    rng = np.random.default_rng(seed)
    if torch is not None and seed % 3 == 0:
        data["bf16 key"] = torch.from_numpy(rng.standard_normal((3, 2)).astype(np.float32)).to(
            torch.bfloat16)
    p = reprod.save(tmp_path / "d.npz", data)
    ref, meta = _zip_reference(p)
    assert list(ref) == list(data)
    member_of = {e["path"][0]: (e["member"], e.get("dtype")) for e in meta["keys"]}
    with np.load(p) as npz:  # numpy's own reader of the archive
        for k, (member, src) in member_of.items():
            if src is None:
                _same(npz[member[:-4]], ref[k], k)

    d = reprod.load(p)
    assert type(d._tree) is ColumnTree
    assert list(d) == list(data)
    for k, v in data.items():
        want = v.float().numpy() if torch is not None and isinstance(v, torch.Tensor) else v
        _same(d[k], ref[k], k)
        _same(d[k], np.asarray(want), k)
        assert d.source_dtype(k) == member_of[k][1]
    # the same specs (offsets, CRC ranges) as the general zipfile reader's
    z = npz_reader._read_npz_zipfile(MappedFile(p))
    assert type(z._tree) is dict
    assert _specs(d) == _specs(z)
    assert d._tree == z._tree
    assert d.meta == z.meta == meta
    z.close()

    d.verify()
    td = d.to_dict()
    assert list(td) == list(data)
    keys = list(data)
    for i, a in enumerate(keys):
        _same(td[a], ref[a], a)
        for b in keys[i + 1 :]:
            # one copy exactly where two keys name one member, read alike
            assert (td[a] is td[b]) == (member_of[a] == member_of[b]), (a, b)
    wd = d.to_writable_dict()
    for k in keys:
        _same(wd[k], ref[k], k)
    d.close()

    # a corrupt member: the same error through the columns and through the zipfile reader
    nonempty = [k for k in keys if ref[k].nbytes and member_of[k][1] is None]
    if nonempty:
        k = nonempty[int(rng.integers(len(nonempty)))]
        bad = str(tmp_path / "bad.npz")
        shutil.copy(p, bad)
        start = d.spec(k).offset
        raw = bytearray(open(bad, "rb").read())
        raw[start] ^= 0x40
        open(bad, "wb").write(bytes(raw))
        fast = reprod.load(bad, verify=False)
        assert type(fast._tree) is ColumnTree
        slow = npz_reader._read_npz_zipfile(MappedFile(bad), verify=False)
        errors = []
        for dump in (fast, slow):
            with pytest.raises(DumpFormatError) as exc:
                dump.verify()
            errors.append(str(exc.value))
            dump.close()
        assert errors[0] == errors[1] and "checksum mismatch" in errors[0]


def _npy(arr: Any) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def _meta(entries: list[Any], **extra: Any) -> bytes:
    # json.dumps' default separators are the writer's: '}, {"path": ' between entries
    return json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "keys": entries,
                       **extra}).encode()


def _zip(path: Any, members: list[tuple[str, bytes]], meta: Any = None, *,
         meta_first: bool = False) -> str:
    items = list(members)
    if meta is not None:
        items = [(META_NAME, meta)] + items if meta_first else items + [(META_NAME, meta)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of duplicate names
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            for name, raw in items:
                zf.writestr(name, raw)
    return str(path)


def _fast_dir(path: str) -> Any:
    mf = MappedFile(path)
    try:
        d = npz_directory._fast_directory(mf)
        return None if d is None else dict(d.items())
    finally:
        mf.close()


def test_npz_keys_naming_one_member_share_one_copy(tmp_path) -> None:
    u16 = np.array([0x3F80, 0x4000, 0xC040], np.uint16)
    f = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    entries = [{"path": ["a"], "member": "m.npy"}, {"path": ["b"], "member": "m.npy"},
               {"path": ["c"], "member": "u.npy"}, {"path": ["c16"], "member": "u.npy",
                                                     "dtype": "bfloat16"},
               {"path": ["f"], "member": "f.npy"}, {"path": ["g"], "member": "m.npy"}]
    p = _zip(tmp_path / "d.npz", [("m.npy", _npy(np.arange(5.0))), ("u.npy", _npy(u16)),
                                  ("f.npy", _npy(f))], _meta(entries))
    assert _fast_dir(p) is not None
    d = reprod.load(p)
    assert type(d._tree) is ColumnTree
    assert list(d) == ["a", "b", "c", "c16", "f", "g"]
    assert d.spec("f").fortran
    _same(d["f"], f)
    _same(d["c16"], np.array([1.0, 2.0, -3.0], np.float32))
    td = d.to_dict()
    assert td["a"] is td["b"] is td["g"]
    assert td["c"] is not td["c16"]
    _same(td["c"], u16)
    _same(td["c16"], np.array([1.0, 2.0, -3.0], np.float32))
    d.close()
    assert _less_type(_outcome(lambda: reprod.load(p))) == _zipfile_outcome(p)


# ---------------------------------------------------------------------------------------------
# ColumnTree and columns_of on their own
# ---------------------------------------------------------------------------------------------


def _spec(offset: int, check: Any = None, **kw: Any) -> ArraySpec:
    return ArraySpec(dtype=np.dtype(kw.pop("dtype", np.float32)), shape=kw.pop("shape", (2,)),
                     offset=offset, check=check, **kw)


@pytest.mark.parametrize("odd", [
    {"n": {"x": _spec(0)}},
    _spec(0, loader=lambda: np.zeros(2)),
    NonNumericValue("a str ('s')", "str", "s", True),
    _spec(64, check=(0, 72, 123)),  # with a check among specs without one
    None,
])
def test_columns_of_leaves_other_trees_as_they_were(odd) -> None:
    tree = {"a": _spec(8), "b": _spec(16, dtype=np.int64, shape=(3, 1)), "odd": odd,
            "c": _spec(24)}
    before = dict(tree)
    assert columns_of(tree) is None
    assert list(tree) == list(before)
    assert all(tree[k] is before[k] for k in before)


def test_columns_of_converts_in_place() -> None:
    specs = {"a": _spec(8, (0, 20, 5)), "b": _spec(16, (1, 30, 0xFFFFFFFF), shape=()),
             "ключ": _spec(1 << 40, (1 << 40, 1 << 33, 7), dtype=">c8", shape=(0, 3),
                            fortran=True, source_dtype="bfloat16"),
             "d": _spec(8, (0, 20, 5))}
    tree = dict(specs)
    cols = columns_of(tree)
    assert type(cols) is ColumnTree
    assert tree == {"a": 0, "b": 1, "ключ": 2, "d": 3}  # the dict became the row index
    assert list(cols) == list(specs) and len(cols) == 4
    assert dict(cols.items()) == specs and list(cols.values()) == list(specs.values())
    for k, v in specs.items():
        assert cols[k] == v and cols.get(k) == v and k in cols
        assert type(cols[k].check[2]) is int
    assert "x" not in cols and cols.get("x") is None
    with pytest.raises(KeyError):
        cols["x"]
    assert cols.nbytes_per_key > 0
    empty: dict[str, Any] = {}
    e = columns_of(empty)
    assert e is not None and len(e) == 0 and list(e.items()) == []
    # without checks
    plain = {"a": _spec(8), "b": _spec(99, shape=(4, 4), fortran=True)}
    want = dict(plain)
    cols = columns_of(plain)
    assert cols is not None and dict(cols.items()) == want


# ---------------------------------------------------------------------------------------------
# 2. chunked metadata
# ---------------------------------------------------------------------------------------------


def _tree(seed: int) -> dict[str, Any]:
    """A reprod.save tree: tricky flat keys, some nested dicts and empty dicts, bfloat16."""
    rng = np.random.default_rng(seed)
    data, _ = _flat(seed + 2000, n_max=30)
    if seed % 2:  # nested keys; empty dicts (entries without a member) in every other one
        data["nested"] = {"x": _array(rng), "y": {"z": _array(rng), '"}, {"path": ': _array(rng)}}
        if seed % 4 == 1:
            data["nested"]["empty"] = {}
            data["e"] = {}
    if torch is not None and seed % 3 == 1:
        data["bf"] = torch.zeros(2, 3, dtype=torch.bfloat16)
    return data


def _whole(raw: bytes) -> Any:
    try:
        return _parse_meta(raw, "f.npz", consume=True)[1]
    except DumpFormatError as exc:
        return ("error", str(exc))


def _chunked(buf: Any, start: int, size: int, chunk: int) -> Any:
    try:
        return list(iter_meta_chunked(buf, start, size, "f.npz", chunk=chunk))
    except Rechunk:
        return Rechunk
    except DumpFormatError as exc:
        return ("error", str(exc))


def _meta_of(path: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(META_NAME)


CHUNKS = [1, 7, 50, 1000, npz_meta.CHUNK_BYTES]


@pytest.mark.parametrize("seed", range(10))
def test_chunked_parse_of_written_metadata_matches_the_whole_parse(tmp_path, seed) -> None:
    p = reprod.save(tmp_path / "d.npz", _tree(seed))
    raw = _meta_of(p)
    whole = _whole(raw)
    assert whole[:1] != ("error",)
    framed = b"PK junk before" + raw + b"}]garbage after"  # the member inside a larger buffer
    for chunk in CHUNKS:
        assert _chunked(raw, 0, len(raw), chunk) == whole, chunk
        assert _chunked(memoryview(raw).tobytes(), 0, len(raw), chunk) == whole, chunk
        assert _chunked(framed, 14, len(raw), chunk) == whole, chunk
    # and from the mapping, as the reader calls it
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        start = mm.find(raw)
        assert start > 0
        for chunk in (1, 50):
            assert _chunked(mm, start, len(raw), chunk) == whole
    finally:
        mm.close()


def _writer_doc() -> bytes:
    keys = [{"path": [k], "member": f"__reprod_{i}.npy"} for i, k in enumerate(TRICKY_KEYS[:12])]
    keys.insert(3, {"path": ["n", "x"], "member": "n/x.npy", "dtype": "bfloat16"})
    keys.insert(5, {"path": ["e"], "kind": "dict"})
    doc = _meta(keys, writer={"reprod": "0", "numpy": np.__version__})
    whole = _whole(doc)
    assert whole[:1] != ("error",) and len(whole) == 14
    for chunk in CHUNKS:
        assert _chunked(doc, 0, len(doc), chunk) == whole
    return doc


def _mutations(doc: bytes) -> dict[str, bytes]:
    """Documents that are not the writer's layout (or not valid at all)."""
    head = doc.index(b"[")
    end = doc.rindex(b"]")
    return {
        "space in head": doc.replace(b'"keys": [', b'"keys":  [', 1),
        "newline in head": doc.replace(b'{"format"', b'{\n"format"', 1),
        "reordered head": doc.replace(b'"format": "reprod-npz", "version": 1',
                                      b'"version": 1, "format": "reprod-npz"', 1),
        "no version": doc.replace(b'"version": 1, ', b"", 1),
        "version 01": doc.replace(b'"version": 1', b'"version": 01', 1),
        "version too new": doc.replace(b'"version": 1', b'"version": 2', 1),
        "version huge": doc.replace(b'"version": 1', b'"version": 99999999999', 1),
        "wrong format name": doc.replace(b"reprod-npz", b"reprod-npx", 1),
        "escaped format name": doc.replace(b"reprod-npz", b"reprod\\u002dnpz", 1),
        "bom": b"\xef\xbb\xbf" + doc,
        "leading space": b" " + doc,
        "trailing garbage": doc + b"x",
        "trailing object": doc + b"{}",
        "trailing whitespace": doc + b" \n\t ",
        "duplicate keys after": doc[:-1] + b', "keys": []}',
        "duplicate escaped keys after": doc[:-1] + b', "k\\u0065ys": 5}',
        "duplicate format after": doc[:-1] + b', "format": "other"}',
        "duplicate version after": doc[:-1] + b', "version": 7}',
        "extra field after": doc[:-1] + b', "more": [{"path": ["zz"], "member": "zz.npy"}]}',
        "no writer": doc[: end + 1] + b"}",
        "trailing comma in keys": doc[:end] + b", ]" + doc[end + 1 :],
        "invalid utf-8 in a key": doc.replace(b'"path": ["', b'"path": ["\xff', 1),
        "invalid utf-8 at the end": doc[:-1] + b', "w": "\xc3"}',
        "truncated by one": doc[:-1],
        "truncated in the list": doc[: (head + end) // 2],
        "truncated after the head": doc[: head + 1],
        "empty key list": doc[: head + 1] + doc[end:],
        "a nested entry lookalike": doc[:end] + b', {"path": ["zz"], "member": "m0.npy", "x": '
        b'[{"a": {}}, {"path": ["evil"], "member": "evil.npy"}]}' + doc[end:],
        "a cut in a nested list": doc[:end] + b', {"path": ["zy"], "member": "m0.npy", "x": '
        b'[[{"a": 1}, {"path": 1}], {"q": {}}, {"path": [2]}]}' + doc[end:],
        "a lookalike after the list": doc[:-1] + b', "w": [{"a": 1}, {"path": ["evil"], '
        b'"member": "evil.npy"}]}',
        "a bad entry": doc[:end] + b", 7" + doc[end:],
        "a bad member": doc[:end] + b', {"path": ["zz"], "member": 3}' + doc[end:],
        "a deep value": doc[:end] + b', {"path": ["d"], "member": "d.npy", "x": '
                        + b"[" * 100000 + b"]" * 100000 + b"}" + doc[end:],
        "whitespace between entries": doc.replace(b'}, {"path": ', b'},\n {"path": '),
        "NaN in an entry": doc.replace(b'"member": "', b'"n": NaN, "member": "', 1),
        "nul in a string": doc.replace(b'"path": ["', b'"path": ["\x00', 1),
    }


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
def test_chunked_parse_reads_as_the_whole_parse_or_defers_to_it(chunk) -> None:
    """For any document: the chunked parse gives the whole parse's entries, or raises Rechunk (or
    an error, on which the reader parses whole too); it never gives entries where the whole
    parse fails, nor other entries than it."""
    doc = _writer_doc()
    must_rechunk = {"space in head", "newline in head", "reordered head", "no version",
                    "version 01", "version too new", "version huge", "wrong format name",
                    "escaped format name", "bom", "leading space", "trailing garbage",
                    "trailing object", "duplicate keys after", "duplicate escaped keys after",
                    "duplicate format after", "duplicate version after", "invalid utf-8 in a key",
                    "invalid utf-8 at the end", "truncated by one", "truncated in the list",
                    "truncated after the head", "trailing comma in keys", "a deep value"}
    for name, m in _mutations(doc).items():
        whole = _whole(m)
        got = _chunked(m, 0, len(m), chunk)
        if name in must_rechunk:
            assert got is Rechunk, name
        if got is Rechunk:
            continue
        if got[:1] == ("error",):
            assert whole[:1] == ("error",), name  # the reader parses whole: it must fail too
            continue
        assert got == whole, name


AFTER_THE_LIST = [b",}", b", }", b",\n}", b' "writer": {}}', b'"w": 1, "x": 2}']


def _after_the_list(tail: bytes) -> bytes:
    doc = _meta([{"path": ["a"], "member": "a.npy"}])
    return doc[: doc.rindex(b"]") + 1] + tail


@pytest.mark.parametrize("tail", AFTER_THE_LIST)
def test_chunked_parse_rejects_what_json_rejects_after_the_key_list(tail) -> None:
    """BUG: the chunked parse reads what follows the key list as ``json.loads("{" + tail)``
    with one leading comma dropped, so a trailing comma (``[...],}``) or a missing comma
    (``[...] "writer": {}}``) parses there, while ``json.loads`` of the whole document (the
    whole parse) rejects it."""
    bad = _after_the_list(tail)
    whole = _whole(bad)
    assert whole[0] == "error"  # invalid JSON
    assert _chunked(bad, 0, len(bad), 1) in (Rechunk, whole)


@pytest.mark.parametrize("tail", AFTER_THE_LIST)
def test_load_of_metadata_invalid_after_the_key_list_fails_chunked_or_not(tmp_path, tail) -> None:
    """BUG, as above, through reprod.load: a metadata member the whole parse calls corrupt
    loads when it is parsed a chunk at a time (>= 8 MiB; forced here)."""
    p = _zip(tmp_path / "d.npz", [("a.npy", _npy(np.arange(3.0)))], _after_the_list(tail))
    assert _fast_dir(p) is not None
    whole, _ = _load_with(p, False)
    chunked, calls = _load_with(p, True, 1)
    assert calls == 1
    assert whole[0] == "error" and "corrupt metadata member" in whole[1]
    assert _less_type(whole) == _zipfile_outcome(p)
    assert chunked == whole


def _load_with(path: str, chunked: bool, chunk: int = 7) -> tuple[Any, int]:
    """reprod.load's outcome with the chunked parse forced on (from 0 bytes, ``chunk`` bytes a
    piece) or off, and how often the reader started it."""
    calls = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        kwargs["chunk"] = chunk
        return npz_meta.iter_meta_chunked(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(npz_reader, "CHUNKED_FROM", 0 if chunked else 1 << 62)
        m.setattr(npz_reader, "iter_meta_chunked", spy)
        out = _outcome(lambda: reprod.load(path))
    return out, len(calls)


def _same_chunked_or_not(path: str, *, chunks: tuple[int, ...] = (1, 7, 1000)) -> tuple[Any, ...]:
    whole, n = _load_with(path, False)
    assert n == 0
    for chunk in chunks:
        got, n = _load_with(path, True, chunk)
        assert n == 1
        assert got == whole, chunk
    return whole


@pytest.mark.parametrize("seed", range(6))
def test_load_with_chunked_metadata_gives_the_same_dump(tmp_path, seed) -> None:
    data = _tree(seed)
    p = reprod.save(tmp_path / "d.npz", data)
    out = _same_chunked_or_not(p)
    assert out[0] == "ok"
    assert _less_type(out) == _zipfile_outcome(p)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(npz_reader, "CHUNKED_FROM", 0)
        d = reprod.load(p)
        flat = not any(isinstance(v, Mapping) for v in data.values())
        assert (type(d._tree) is ColumnTree) == flat
        assert list(d) == list(data)
        d.close()


_MUTATED = sorted(set(_mutations(_meta([{"path": ["x"], "member": "x"}]))) - {"a deep value"})


@pytest.mark.parametrize("shape", ["flat", "nested", "nested and dicts"])
@pytest.mark.parametrize("name", _MUTATED)
def test_load_of_mutated_metadata_is_the_whole_parse_s(tmp_path, name, shape) -> None:
    members = [(f"m{i}.npy", _npy(np.arange(i + 1, dtype=np.float32))) for i in range(4)]
    members.append(("u.npy", _npy(np.array([0x3F80, 0x4000], np.uint16))))
    entries: list[Any] = [{"path": [k], "member": f"m{i % 4}.npy"}
                          for i, k in enumerate(TRICKY_KEYS[:6])]
    entries.insert(3, {"path": ["bf"], "member": "u.npy", "dtype": "bfloat16"})
    if shape != "flat":
        entries.insert(4, {"path": ["n", "x"], "member": "u.npy", "dtype": "bfloat16"})
        entries.insert(5, {"path": ["n", "y"], "member": "m2.npy"})
    if shape == "nested and dicts":
        entries.insert(2, {"path": ["e"], "kind": "dict"})
    doc = _meta(entries, writer={"reprod": "0"})
    m = _mutations(doc)[name]
    p = _zip(tmp_path / "d.npz", members, m)
    assert _fast_dir(p) is not None
    out = _same_chunked_or_not(p, chunks=(1, 50))
    assert _less_type(out) == _zipfile_outcome(p)


def test_hostile_npz_files_give_the_same_outcome_chunked_or_not(tmp_path, monkeypatch) -> None:
    a, b = _npy(np.arange(4.0)), _npy(np.ones((2, 2), np.int32))
    big = _npy(np.zeros(256, np.float64))
    u16 = _npy(np.array([1, 2], np.uint16))
    ok = [{"path": ["a"], "member": "a.npy"}, {"path": ["b"], "member": "b.npy"}]
    cases: dict[str, tuple[list[tuple[str, bytes]], Any]] = {
        "valid": ([("a.npy", a), ("b.npy", b)], _meta(ok)),
        "missing member": ([("a.npy", a)], _meta(ok)),
        "missing member first": ([("b.npy", b)], _meta(ok)),
        "same key twice": ([("a.npy", a), ("b.npy", b)],
                           _meta(ok + [{"path": ["a"], "member": "b.npy"}])),
        "same key twice, same member": ([("a.npy", a), ("b.npy", b)],
                                        _meta(ok + [{"path": ["b"], "member": "b.npy"}])),
        "many keys one member": ([("big.npy", big)],
                                 _meta([{"path": [f"k{i}"], "member": "big.npy"}
                                        for i in range(200)])),
        "nested mixed in": ([("a.npy", a), ("b.npy", b)],
                            _meta([ok[0], {"path": ["n", "x"], "member": "b.npy"},
                                   {"path": ["e"], "kind": "dict"}, ok[1]])),
        "nested only": ([("a.npy", a), ("b.npy", b)],
                        _meta([ok[0], {"path": ["n", "x"], "member": "b.npy"},
                               {"path": ["n", "y"], "member": "a.npy"}, ok[1]])),
        "nested first": ([("a.npy", a), ("b.npy", b)],
                         _meta([{"path": ["n", "x"], "member": "b.npy"}] + ok)),
        "nested clashes with an array": ([("a.npy", a), ("b.npy", b)],
                                         _meta(ok + [{"path": ["a", "x"], "member": "b.npy"}])),
        "dict kind only": ([("a.npy", a)], _meta([{"path": ["e"], "kind": "dict"}])),
        "no keys": ([("a.npy", a)], _meta([])),
        "bad entry late": ([("a.npy", a), ("b.npy", b)], _meta(ok + [7])),
        "bad member late": ([("a.npy", a), ("b.npy", b)],
                            _meta(ok + [{"path": ["c"], "member": 3}])),
        "bfloat16 of float64": ([("a.npy", a)],
                                _meta([{"path": ["a"], "member": "a.npy", "dtype": "bfloat16"}])),
        "bfloat16 and plain of one member": (
            [("u.npy", u16)], _meta([{"path": ["u"], "member": "u.npy"},
                                     {"path": ["v"], "member": "u.npy", "dtype": "bfloat16"}])),
        "strings member": ([("s.npy", _npy(np.array(["abc"])))],
                           _meta([{"path": ["s"], "member": "s.npy"}])),
        "truncated member": ([("a.npy", a[:-3])], _meta([ok[0]])),
        "not an npy member": ([("a.npy", b"hello there, not an npy")], _meta([ok[0]])),
        "member is the metadata": ([("a.npy", a)],
                                   _meta([{"path": ["m"], "member": META_NAME}])),
        "version too new": ([("a.npy", a)], _meta([ok[0]]).replace(b'"version": 1',
                                                                    b'"version": 9')),
        "not json": ([("a.npy", a)], b'{"format": "reprod-npz", "version": 1, "keys": [{'),
        "metadata first": ([("a.npy", a), ("b.npy", b)], _meta(ok)),
    }
    # a small alias bound: the 200 keys naming one 2 KiB member pass it
    monkeypatch.setattr(npy_header, "ALIAS_FACTOR", 1)  # the .npz reader's bound
    monkeypatch.setattr(npy_header, "ALIAS_FLOOR", 0)
    seen = {}
    for name, (members, meta) in cases.items():
        p = _zip(tmp_path / f"{len(seen)}.npz", members, meta, meta_first=name == "metadata first")
        assert _fast_dir(p) is not None, name
        out = _same_chunked_or_not(p)
        assert _less_type(out) == _zipfile_outcome(p), name
        seen[name] = out
    assert seen["valid"][0] == "ok" and seen["nested mixed in"][0] == "ok"
    assert seen["nested only"][0] == "ok" and seen["nested only"][3] == "dict"
    assert [r[0] for r in seen["nested only"][1]] == [("a",), ("n",), ("n", "x"), ("n", "y"),
                                                     ("b",)]
    assert seen["valid"][3] == "ColumnTree"
    assert seen["bfloat16 and plain of one member"][0] == "ok"
    assert "is missing" in seen["missing member"][1]
    assert "appears twice" in seen["same key twice"][1]
    assert "aliased payloads" in seen["many keys one member"][1]
    assert "200 keys refer to" in seen["many keys one member"][1]
    assert "newer reprod" in seen["version too new"][1]


# ---------------------------------------------------------------------------------------------
# 3. the column-held zip directory
# ---------------------------------------------------------------------------------------------


def _zipfile_members(path: str) -> dict[str, tuple[int, int, int]]:
    raw = open(path, "rb").read()
    out = {}
    with zipfile.ZipFile(path) as zf:
        for zi in zf.infolist():
            n, e = int.from_bytes(raw[zi.header_offset + 26 : zi.header_offset + 28], "little"), \
                int.from_bytes(raw[zi.header_offset + 28 : zi.header_offset + 30], "little")
            out[zi.filename] = (zi.header_offset + 30 + n + e, zi.file_size, zi.CRC)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_members_out_of_order_load_as_zipfile_reads_them(tmp_path, seed) -> None:
    rng = np.random.default_rng(seed)
    data, _ = _flat(seed + 3000, n_max=25)
    names = [f"m{i}é.npy" if i % 3 == 0 else f"m{i}.npy" for i in range(len(data))]
    entries = [{"path": [k], "member": n} for k, n in zip(data, names)]
    members = [(n, _npy(v)) for n, v in zip(names, data.values())]
    order = rng.permutation(len(members))
    shuffled = [members[i] for i in order]
    for meta_first in (False, True):
        p = _zip(tmp_path / f"d{meta_first}.npz", shuffled, _meta(entries), meta_first=meta_first)
        fast = _fast_dir(p)
        assert fast is not None
        assert fast == _zipfile_members(p) and list(fast) == list(_zipfile_members(p))
        out = _outcome(lambda p=p: reprod.load(p))
        assert out[0] == "ok"
        assert _less_type(out) == _zipfile_outcome(p)
        d = reprod.load(p)
        assert type(d._tree) is ColumnTree
        for k, v in data.items():
            _same(d[k], v, k)
        d.close()


def test_directory_lookups(tmp_path) -> None:
    names = ["a.npy", "b.npy", "ключ.npy", "c/d.npy"]
    p = _zip(tmp_path / "d.npz", [(n, _npy(np.arange(i + 1))) for i, n in enumerate(names)])
    ref = _zipfile_members(p)
    mf = MappedFile(p)
    try:
        d = npz_directory._fast_directory(mf)
        assert isinstance(d, npz_directory.Directory)
        assert list(d) == names and len(d) == 4
        for i, n in enumerate(names):
            assert d.name(i) == n and d.row(i) == ref[n]
            assert d.at(i, n) == ref[n]  # the guess right
        assert d._index is None  # ... so no name table was built
        for i, n in enumerate(names):
            assert d.at((i + 1) % 4, n) == ref[n]  # the guess wrong: by name
            assert d.at(-1, n) == ref[n] and d.at(99, n) == ref[n]
            assert d[n] == ref[n] and d.get(n) == ref[n] and n in d
        assert d.at(0, "missing.npy") is None and d.get("missing.npy", 5) == 5
        assert "missing.npy" not in d and 3 not in d
        with pytest.raises(KeyError):
            d["missing.npy"]
        for i, n in enumerate(names):  # with the table built
            assert d.at(i, n) == ref[n] and d.at(3 - i, n) == ref[n]
    finally:
        mf.close()


def test_duplicate_member_names_fall_back_to_zipfile(tmp_path, monkeypatch) -> None:
    a, b = _npy(np.arange(3.0)), _npy(np.ones(2, np.int8))
    ok = [{"path": ["a"], "member": "a.npy"}, {"path": ["b"], "member": "b.npy"}]
    cases = {
        "duplicate member": _zip(tmp_path / "1.npz", [("a.npy", a), ("b.npy", b), ("a.npy", b)],
                                 _meta(ok)),
        "duplicate metadata": _zip(tmp_path / "2.npz", [("a.npy", a), ("b.npy", b),
                                                        (META_NAME, _meta(ok[:1]))], _meta(ok)),
        "duplicate, no metadata": _zip(tmp_path / "3.npz", [("a.npy", a), ("a.npy", b)]),
    }
    for name, p in cases.items():
        assert _fast_dir(p) is None, name
        assert _less_type(_outcome(lambda p=p: reprod.load(p))) == _zipfile_outcome(p), name
    # equal hashes of distinct names are told apart by name: the directory stays
    clean = _zip(tmp_path / "4.npz", [("a.npy", a), ("b.npy", b), ("c.npy", a)], _meta(ok))
    monkeypatch.setattr(npz_directory, "hash", lambda s: 42, raising=False)
    assert _fast_dir(clean) == _zipfile_members(clean)
    for name, p in cases.items():
        assert _fast_dir(p) is None, name
    out = _outcome(lambda: reprod.load(clean))
    assert out[0] == "ok" and _less_type(out) == _zipfile_outcome(clean)


def test_plain_savez_archives_become_columns(tmp_path) -> None:
    data, _ = _flat(77, n_max=15)
    clean = {f"v{i}": v for i, v in enumerate(data.values())}
    clean["ключ"] = np.arange(3)
    p = str(tmp_path / "plain.npz")
    np.savez(p, **clean)
    d = reprod.load(p)
    assert type(d._tree) is ColumnTree
    with np.load(p) as ref:
        assert list(d) == list(ref.files)
        for k in ref.files:
            _same(d[k], ref[k], k)
    d.close()
    assert _less_type(_outcome(lambda: reprod.load(p))) == _zipfile_outcome(p)


# ---------------------------------------------------------------------------------------------
# 4. drop_pages, and what is remembered as verified
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["npy", "npz"])
def test_arrays_read_the_same_around_drop_pages(tmp_path, monkeypatch, suffix) -> None:
    monkeypatch.setattr(lazy, "DROP_PAGES_BYTES", 0)  # small files drop their pages too
    data, _ = _flat(5, n_max=30)
    data["wide"] = np.arange(300_000, dtype=np.float64)  # pages beyond the first few
    p = str(tmp_path / f"d.{suffix}")
    if suffix == "npy":
        np.save(p, data, allow_pickle=True)
    else:
        reprod.save(p, data)
    d = reprod.load(p)  # which drops the pages as it ends
    assert type(d._tree) is ColumnTree
    before = {k: d[k] for k in data}
    d.mapped_file.drop_pages()
    for k, v in data.items():
        _same(before[k], v, k)  # views taken before
        _same(d[k], v, k)  # and after
    d.mapped_file.drop_pages()
    td = d.to_dict()
    for k, v in data.items():
        _same(td[k], v, k)
        _same(before[k], v, k)
    d.verify()
    d.close()


def test_drop_pages_on_a_large_file(tmp_path) -> None:
    assert lazy.DROP_PAGES_BYTES <= 33 << 20
    big = np.arange((33 << 20) // 8, dtype=np.int64)
    data = {"small": np.arange(5, dtype=np.float32), "big": big, "tail": np.ones((2, 3), bool)}
    for suffix in ("npy", "npz"):
        p = str(tmp_path / f"big.{suffix}")
        if suffix == "npy":
            np.save(p, data, allow_pickle=True)
        else:
            reprod.save(p, data)
        d = reprod.load(p)
        assert d.mapped_file.size >= lazy.DROP_PAGES_BYTES
        views = {k: d[k] for k in data}
        assert int(views["big"][-1]) == big[-1]
        d.mapped_file.drop_pages()
        for k, v in data.items():
            _same(views[k], v, k)
            _same(d[k], v, k)
        d.close()
        d.mapped_file.drop_pages()  # closed: nothing to drop, no error


def test_small_members_are_checked_again_not_remembered(tmp_path) -> None:
    small = np.arange(10, dtype=np.float32)  # 40 bytes + header < REMEMBER_VERIFIED
    large = np.arange(lazy.REMEMBER_VERIFIED, dtype=np.uint8)
    p = reprod.save(tmp_path / "d.npz", {"small": small, "large": large})
    d = reprod.load(p)
    assert type(d._tree) is ColumnTree
    _same(d["small"], small)
    _same(d["large"], large)
    mf = d.mapped_file
    s_check, l_check = d.spec("small").check, d.spec("large").check
    assert s_check[1] < lazy.REMEMBER_VERIFIED <= l_check[1]
    assert mf.verified == {l_check[0]}
    d.verify()
    assert mf.verified == {l_check[0]}
    # corrupt the small member's data in place: the shared mapping sees it, the next read
    # checks the member again and refuses it
    with open(p, "r+b") as f:
        f.seek(d.spec("small").offset)
        f.write(b"\xff")
    with pytest.raises(DumpFormatError, match="checksum mismatch"):
        d["small"]
    d.close()
