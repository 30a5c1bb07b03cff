"""The native reader's own zip directory parse (``npz_reader._fast_directory`` and the path built on
it) against ``zipfile`` and against the general reader ``npz_reader._read_npz_zipfile``.

Valid archives of every kind reprod meets (reprod-written, nested keys, bfloat16, empty arrays, no
keys, plain ``np.savez``, zip64 end records and extra fields, UTF-8 names) must give the same
members, offsets, sizes and CRCs as ``zipfile``; archives the fast parse does not handle
(compressed members, an archive comment, a zip behind other bytes) must be left to ``zipfile``.
Mutated archives must load to the same tree, or fail with the same one-line
``DumpFormatError``, through either reader.
"""

from __future__ import annotations

import gc
import random
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import DumpFormatError
from reprod.storage import npz_reader, npz_writer
from reprod.storage.lazy import Dump, MappedFile

torch = pytest.importorskip("torch")


def _zipfile_members(path: Any) -> dict[str, tuple[int, int, int]]:
    """name -> (data start, size, CRC32) as zipfile reads the directory; the data start from the
    local header, parsed here with struct."""
    raw = open(path, "rb").read()
    out = {}
    with zipfile.ZipFile(path) as zf:
        for zi in zf.infolist():
            n, e = struct.unpack_from("<HH", raw, zi.header_offset + 26)
            out[zi.filename] = (zi.header_offset + 30 + n + e, zi.file_size, zi.CRC)
    return out


def _fast(path: Any) -> Any:
    mf = MappedFile(str(path))
    try:
        d = npz_reader._fast_directory(mf)
        # the directory reads its names from the mapping: as a dict, before the file closes
        return None if d is None else dict(d.items())
    finally:
        mf.close()


def _rows(dump: Dump, prefix: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key in order, depth first, with its spec, source dtype and bytes."""
    rows: list[tuple[Any, ...]] = []
    for k in dump:
        v = dump[k]
        if isinstance(v, Mapping):
            rows.append((prefix + (k,), "dict"))
            rows.extend(_rows(v, prefix + (k,)))
            continue
        spec = dump.spec(k)
        arr = np.asarray(v)
        rows.append((prefix + (k,), spec.dtype.str, spec.shape, spec.offset, spec.fortran,
                     spec.source_dtype, spec.check, arr.dtype.str, arr.shape, arr.tobytes()))
    return rows


def _outcome(reader: Any, path: str) -> tuple[Any, ...]:
    """What a reader makes of a file: every key in order with its spec, source dtype and bytes,
    and the metadata; or the error's type and message."""
    mf = MappedFile(path)
    try:
        dump = reader(mf, verify=None)
        rows = _rows(dump)
        dump.verify()
        return ("ok", tuple(rows), repr(dump.meta))
    except DumpFormatError as exc:
        return ("error", type(exc).__name__, str(exc))
    finally:
        mf.close()


def _same_through_both_readers(path: Any) -> tuple[Any, ...]:
    fast = _outcome(npz_reader.read_npz, str(path))
    slow = _outcome(npz_reader._read_npz_zipfile, str(path))
    assert fast == slow
    return fast


@pytest.fixture
def dumps(tmp_path) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    files = {}
    flat = {f"k{i}": rng.standard_normal(int(rng.integers(0, 40))).astype(np.float32) for i in range(30)}
    flat["i64"] = np.arange(12, dtype=np.int64).reshape(3, 4)
    flat["fortran"] = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    flat["scalar"] = np.float16(3.5)
    flat["empty"] = np.zeros((0, 3), np.float32)
    flat["complex"] = np.array([1 + 2j], np.complex64)
    files["flat"] = reprod.save(tmp_path / "flat.npz", flat)
    nested = {
        "layer": {"w": torch.randn(3, 2, dtype=torch.bfloat16), "b": np.zeros(2, np.float32),
                  "inner": {"deep": np.ones(1, np.int8)}, "none": {}},
        "odd key/with slash": np.arange(3, dtype=np.uint16),
        "ключ": np.arange(2, dtype=np.float32),
        "__reprod_0.npy": np.arange(2, dtype=np.float32),
    }
    files["nested"] = reprod.save(tmp_path / "nested.npz", nested)
    files["no keys"] = reprod.save(tmp_path / "empty.npz", {})
    np.savez(tmp_path / "plain.npz", a=np.arange(5.0), b=np.ones((2, 2), np.int32), ключ=np.zeros(1))
    files["np.savez"] = str(tmp_path / "plain.npz")
    return files


def test_fast_directory_matches_zipfile_on_valid_dumps(dumps) -> None:
    for kind, path in dumps.items():
        fast = _fast(path)
        assert fast is not None, kind
        assert fast == _zipfile_members(path), kind
        assert list(fast) == list(_zipfile_members(path)), kind  # directory order kept


def test_fast_path_loads_what_the_zipfile_path_loads(dumps) -> None:
    for kind, path in dumps.items():
        outcome = _same_through_both_readers(path)
        assert outcome[0] == "ok", (kind, outcome)
    # and what it loads is the data that was saved, as numpy reads it
    d = reprod.load(dumps["np.savez"])
    with np.load(dumps["np.savez"]) as ref:
        assert list(d) == list(ref.files)
        for k in ref.files:
            np.testing.assert_array_equal(d[k], ref[k])
            assert d[k].dtype == ref[k].dtype
    nested = reprod.load(dumps["nested"])
    assert list(nested) == ["layer", "odd key/with slash", "ключ", "__reprod_0.npy"]
    assert list(nested["layer"]) == ["w", "b", "inner", "none"]
    assert nested.spec("layer").source_dtype("w") == "bfloat16"
    assert nested["layer"]["w"].dtype == np.float32
    assert len(reprod.load(dumps["no keys"])) == 0


def test_zip64_end_records_and_extra_fields(tmp_path, monkeypatch) -> None:
    # zipfile (np.savez) and reprod's writer switch to zip64 above these limits; lowered, small
    # files get zip64 sizes, offsets and end records everywhere
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
    monkeypatch.setattr(npz_writer, "_ZIP64_LIMIT", 64)
    monkeypatch.setattr(npz_writer, "_ZIP_FILECOUNT_LIMIT", 3)
    tree = {f"k{i}": np.arange(i * 10, dtype=np.float32) for i in range(6)}
    paths = [reprod.save(tmp_path / "r.npz", tree)]
    np.savez(tmp_path / "p.npz", **tree)
    paths.append(str(tmp_path / "p.npz"))
    monkeypatch.undo()
    for i, path in enumerate(list(paths)):
        raw = bytearray(open(path, "rb").read())
        assert raw[-42:-38] == b"PK\x06\x07"  # the zip64 locator before the end record
        first = raw.find(b"PK\x01\x02")  # sizes and offsets in the entries' zip64 extra fields
        assert struct.unpack_from("<LL", raw, first + 20) == (0xFFFFFFFF, 0xFFFFFFFF)
        # what writers of real large archives put in the classic end record: only the markers
        struct.pack_into("<HHLL", raw, len(raw) - 14, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        paths.append(str(tmp_path / f"markers{i}.npz"))
        open(paths[-1], "wb").write(raw)
    for path in paths:
        fast = _fast(path)
        assert fast is not None and fast == _zipfile_members(path), path
        outcome = _same_through_both_readers(path)
        assert outcome[0] == "ok"
        d = reprod.load(path)
        for k, v in tree.items():
            np.testing.assert_array_equal(d[k], v)


def test_archives_the_fast_parse_leaves_to_zipfile(tmp_path, dumps) -> None:
    tree = {"a": np.arange(50.0), "b": np.ones(3, np.int16)}
    np.savez_compressed(tmp_path / "c.npz", **tree)
    with_comment = tmp_path / "comment.npz"
    with zipfile.ZipFile(with_comment, "w") as zf, zipfile.ZipFile(dumps["flat"]) as src:
        for zi in src.infolist():
            zf.writestr(zi, src.read(zi))
        zf.comment = b"hello"
    prefixed = tmp_path / "prefixed.npz"  # zipfile finds members of a zip behind other bytes
    prefixed.write_bytes(b"x" * 100 + open(dumps["flat"], "rb").read())
    for path in (tmp_path / "c.npz", with_comment, prefixed):
        assert _fast(path) is None, path
        assert _same_through_both_readers(path)[0] == "ok", path
    d = reprod.load(tmp_path / "c.npz")
    for k, v in tree.items():
        np.testing.assert_array_equal(d[k], v)


def test_collector_state_is_restored(tmp_path, dumps) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(open(dumps["flat"], "rb").read()[:-5])
    assert gc.isenabled()
    with pytest.raises(DumpFormatError):
        reprod.load(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        reprod.load(dumps["flat"])
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# mutated archives: both readers agree, and only ever raise DumpFormatError
# ---------------------------------------------------------------------------------------------

def _structure_offsets(raw: bytes) -> list[int]:
    """Offsets of the zip's own fields: every local header, central entry and end record, where
    a mutation tests the directory checks rather than the payload CRCs."""
    out = []
    for sig, length in ((b"PK\x03\x04", 30), (b"PK\x01\x02", 46), (b"PK\x05\x06", 22),
                        (b"PK\x06\x06", 56), (b"PK\x06\x07", 20)):
        pos = raw.find(sig)
        while pos >= 0:
            out.extend(range(pos, min(pos + length, len(raw))))
            pos = raw.find(sig, pos + 1)
    return out


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    fields = _structure_offsets(raw)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not b:
            break
        op = rng.random()
        if op < 0.55:  # a zip header field: a byte, or a whole 2/4-byte field set to an edge value
            pos = rng.choice(fields)
            if pos >= len(b):  # cut off by an earlier mutation
                continue
            if rng.random() < 0.5:
                b[pos] = rng.randrange(256)
            else:
                width = rng.choice((2, 4))
                value = rng.choice((0, 1, 0xFFFF, 0xFFFFFFFF, len(raw), len(raw) - 1, 64))
                b[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op < 0.75 and b:  # anywhere
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        elif op < 0.85 or len(b) < 2:
            del b[rng.randrange(len(b)) :]
        elif op < 0.93:
            pos = rng.randrange(len(b))
            del b[pos : pos + rng.randrange(1, 8)]
        else:
            pos = rng.randrange(len(b))
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    return bytes(b)


@pytest.mark.parametrize("kind", ["flat", "nested", "no keys", "np.savez", "zip64"])
def test_mutated_archives_give_the_same_result_through_both_readers(tmp_path, dumps, monkeypatch,
                                                                     kind) -> None:
    if kind == "zip64":
        with monkeypatch.context() as m:
            m.setattr(zipfile, "ZIP64_LIMIT", 64)
            m.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
            m.setattr(npz_writer, "_ZIP64_LIMIT", 64)
            m.setattr(npz_writer, "_ZIP_FILECOUNT_LIMIT", 3)
            path = reprod.save(tmp_path / "z.npz", {f"k{i}": np.arange(i * 9, dtype=np.float32)
                                                    for i in range(5)})
    else:
        path = dumps[kind]
    raw = open(path, "rb").read()
    rng = random.Random(f"native-directory-{kind}")
    target = tmp_path / "mutant.npz"
    seen = {"ok": 0, "error": 0}
    for case in range(300):
        mutant = _mutate(raw, rng)
        if not mutant:
            continue
        target.write_bytes(mutant)
        try:
            outcome = _same_through_both_readers(target)
        except AssertionError:
            raise AssertionError(f"{kind} case {case}: the readers disagree") from None
        seen[outcome[0]] += 1
        if outcome[0] == "error":
            assert "\n" not in outcome[2] and str(target) in outcome[2]
    assert seen["ok"] and seen["error"]  # the mutations reach both outcomes


def test_directory_errors_keep_their_wording(tmp_path, dumps) -> None:
    raw = bytearray(open(dumps["flat"], "rb").read())
    eocd = len(raw) - 22
    count = struct.unpack_from("<H", raw, eocd + 10)[0]
    struct.pack_into("<HH", raw, eocd + 8, count - 1, count - 1)
    p = tmp_path / "count.npz"
    p.write_bytes(bytes(raw))
    with pytest.raises(DumpFormatError, match=rf"lists {count} members but its end record counts "
                                              rf"{count - 1}; the zip is corrupt"):
        reprod.load(p)

    raw = bytearray(open(dumps["flat"], "rb").read())
    first = raw.find(b"PK\x01\x02")
    name_len = struct.unpack_from("<H", raw, first + 28)[0]
    name = bytes(raw[first + 46 : first + 46 + name_len]).decode()
    struct.pack_into("<L", raw, first + 20, 7)  # compressed size != size of a stored member
    p = tmp_path / "sizes.npz"
    p.write_bytes(bytes(raw))
    with pytest.raises(DumpFormatError, match=rf"member '{name}': stored member with two different "
                                              "sizes"):
        reprod.load(p)


def test_fast_reader_result_is_a_plain_dump(dumps) -> None:
    d = reprod.load(dumps["flat"])
    assert isinstance(d, Dump) and d.format == "npz"
    spec = d.spec("k1")
    assert spec == npz_reader.ArraySpec(dtype=spec.dtype, shape=spec.shape, offset=spec.offset,
                                    fortran=False, check=spec.check)
    assert spec.nbytes == d["k1"].nbytes


# ---------------------------------------------------------------------------------------------
# the writer: zip structures written directly, byte for byte what zipfile wrote before
# ---------------------------------------------------------------------------------------------

def _rewrite_with_zipfile(path: str, out: str) -> None:
    """The archive as the previous writer built it through zipfile: each .npy member with the
    alignment field in front of its data (zip64 above npz_writer._ZIP64_LIMIT), then the metadata
    member; the timestamps taken from ``path``."""
    with zipfile.ZipFile(path) as src, open(out, "wb") as f, \
            zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for old in src.infolist():
            data = src.read(old)
            if old.filename == npz_reader.META_NAME:
                zi = zipfile.ZipInfo(old.filename, date_time=old.date_time)
                zf.writestr(zi, data)
                continue
            zip64 = len(data) > npz_writer._ZIP64_LIMIT
            fixed = 30 + len(old.filename) + 4 + (20 if zip64 else 0)
            pad = (-(f.tell() + fixed)) % 64
            zi = zipfile.ZipInfo(old.filename, date_time=old.date_time)
            zi.extra = struct.pack("<HH", 0xD935, pad) + b"\0" * pad
            zi.file_size = len(data)
            with zf.open(zi, "w", force_zip64=zip64) as w:
                w.write(data)


def _writer_tree() -> dict[str, Any]:
    rng = np.random.default_rng(3)
    tree = {
        "a": np.arange(40.0),
        "nested": {"c": np.ones((2, 3), np.int32), "none": {}, "deeper": {"x": np.zeros((0, 2))}},
        "bf": torch.randn(4, 3, dtype=torch.bfloat16),
        "odd key": np.float16(2),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
        "view": np.arange(30, dtype=np.int16)[::3],
        "ключ": np.arange(5, dtype=np.uint8),
    }
    tree.update({f"k{i}": rng.standard_normal(i + 1).astype(np.float32) for i in range(20)})
    return tree


@pytest.mark.parametrize("zip64", [False, True])
def test_writer_bytes_match_the_zipfile_writer(tmp_path, monkeypatch, zip64) -> None:
    if zip64:
        # every member (each has a 128-byte .npy header) and the directory pass these limits
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
        monkeypatch.setattr(npz_writer, "_ZIP64_LIMIT", 64)
        monkeypatch.setattr(npz_writer, "_ZIP_FILECOUNT_LIMIT", 3)
    tree = _writer_tree()
    path = reprod.save(tmp_path / "w.npz", tree)
    _rewrite_with_zipfile(path, str(tmp_path / "ref.npz"))
    assert open(path, "rb").read() == (tmp_path / "ref.npz").read_bytes()
    raw = open(path, "rb").read()
    assert (raw[-42:-38] == b"PK\x06\x07") == zip64


def test_written_dumps_open_in_numpy_zipfile_and_unzip(tmp_path) -> None:
    import shutil
    import subprocess

    tree = _writer_tree()
    path = reprod.save(tmp_path / "w.npz", tree)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    members = _zipfile_members(path)
    assert all(start % 64 == 0 for name, (start, _, _) in members.items() if name != npz_reader.META_NAME)
    d = reprod.load(path)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], tree["a"])
        np.testing.assert_array_equal(z["nested/c"], tree["nested"]["c"])
        np.testing.assert_array_equal(z["view"], tree["view"])
        assert z["fortran"].flags.c_contiguous
        np.testing.assert_array_equal(z["fortran"], tree["fortran"])
    np.testing.assert_array_equal(d["bf"], tree["bf"].float().numpy())
    assert d.spec("bf").source_dtype == "bfloat16"
    assert list(d) == list(tree)
    assert list(d["nested"]) == ["c", "none", "deeper"]
    if shutil.which("unzip"):
        res = subprocess.run(["unzip", "-t", path], capture_output=True, text=True)
        assert res.returncode == 0 and "No errors detected" in res.stdout, res.stdout + res.stderr
