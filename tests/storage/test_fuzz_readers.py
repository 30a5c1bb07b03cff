"""Fuzzing every reader: mutated dumps either load with the right data or fail with a one-line
``DumpFormatError`` naming the file; never another exception, never a hang, never an allocation of
a size the file claims before that size is checked against the file.

A seeded loop (reproducible: each failure names its seed, case and mutations) mutates valid dumps
of every format ``reprod.load`` reads: reprod's ``.npz``, reprod_log's pickled ``.npy`` (pickle
protocols 2, 4 and 5), a plain ``.npy`` array, and plain ``numpy.savez``/``savez_compressed``
archives. Mutations: truncation, byte and bit flips, inserted and deleted bytes, copied spans, zip
header fields (sizes, offsets pointing outside the file, counts, name lengths, compression
methods, flags), ``.npy`` headers (huge, negative, overflowing and ill-typed shapes, odd dtypes,
header lengths), pickle opcode arguments (lengths, ints, memo indices) and opcodes, and hostile
metadata members in otherwise valid zips.

The oracle, per case:
- success on a ``.npz`` must give exactly the original tree: every member carries a CRC32 that the
  reader checks (small members on first access, all of them with ``verify=True``);
- success on a legacy ``.npy`` cannot promise that (a pickle has no checksum: a flipped payload
  byte is undetectable), so its result is compared with what a restricted copy of Python's own
  unpickler (numpy's array globals only) makes of the same bytes, when that succeeds;
- every value read is a read-only numeric ndarray matching its ``spec``;
- tracemalloc's peak while reading stays below a small multiple of the file size.

``REPROD_FUZZ_CASES`` (default 7000, under half a minute) sets the number of cases,
``REPROD_FUZZ_SEED`` the seed; see docs/fuzzing.md for a long run.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import signal
import struct
import time
import tracemalloc
import zipfile
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pytest

import reprod
from reprod import DumpFormatError
from reprod.storage import NonNumericValue
from reprod.storage.pickle_walker import SAFE_GLOBALS

CASES = int(os.environ.get("REPROD_FUZZ_CASES", "7000"))
SEED = int(os.environ.get("REPROD_FUZZ_SEED", "20240611"))
CASE_TIMEOUT_S = 60  # a hang guard, not a timing assertion: a case takes milliseconds
MAX_FAILURES = 8


# ---------------------------------------------------------------------------------------------
# seeds: one valid file per format, with what it holds
# ---------------------------------------------------------------------------------------------


def _tree() -> dict[str, Any]:
    rng = np.random.default_rng(11)
    return {
        "logits": rng.normal(size=(8, 40)).astype(np.float32),  # in place (>= 256 bytes)
        "loss": np.float32(0.25),
        "n": {"w": np.arange(20, dtype=np.int64), "b": np.array([1.5, -2.0]),
              "deep": {"mask": np.array([True, False, True])}},
        "odd key/with.slash": np.arange(5, dtype=np.uint8),
        "ünï": np.array([1 + 2j, -3j], dtype=np.complex64),
        "zero": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(rng.normal(size=(6, 7))),
        "be": np.arange(70, dtype=">i4"),
    }  # fmt: skip


@dataclass
class Seed:
    name: str
    raw: bytes
    suffix: str
    expected: dict[str, Any]  # what reprod.load gives for the clean file
    zip: bool = False
    pickle_start: Optional[int] = None  # where the pickle begins in a legacy .npy
    fields: list[tuple[int, int, str]] = field(default_factory=list)  # (offset, width, what)
    npy_headers: list[tuple[int, int]] = field(default_factory=list)  # (start of magic, text end)
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (local hdr, data, size)


def _npy_object_header() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, np.lib.format.header_data_from_array_1_0(np.empty((), dtype=object))
    )
    return buf.getvalue()


def _pickled_npy(tree: dict[str, Any], proto: int) -> bytes:
    arr = np.empty((), dtype=object)
    arr[()] = tree
    return _npy_object_header() + pickle.dumps(arr, protocol=proto)


def _npy_header_span(raw: bytes, start: int) -> tuple[int, int, int]:
    """(length field offset, length field width, end of header text) of the .npy at ``start``."""
    major = raw[start + 6]
    if major == 1:
        return start + 8, 2, start + 10 + struct.unpack_from("<H", raw, start + 8)[0]
    return start + 8, 4, start + 12 + struct.unpack_from("<I", raw, start + 8)[0]


_CD_FIELDS = [(4, 2, "made-by"), (6, 2, "needed"), (8, 2, "flags"), (10, 2, "method"),
              (12, 2, "time"), (16, 4, "crc"), (20, 4, "csize"), (24, 4, "usize"),
              (28, 2, "name-len"), (30, 2, "extra-len"), (32, 2, "comment-len"),
              (34, 2, "disk"), (38, 4, "ext-attr"), (42, 4, "local-offset")]  # fmt: skip
_LOCAL_FIELDS = [(4, 2, "needed"), (6, 2, "flags"), (8, 2, "method"), (14, 4, "crc"),
                 (18, 4, "csize"), (22, 4, "usize"), (26, 2, "name-len"), (28, 2, "extra-len")]  # fmt: skip
_EOCD_FIELDS = [(4, 2, "disk"), (6, 2, "cd-disk"), (8, 2, "entries-here"), (10, 2, "entries"),
                (12, 4, "cd-size"), (16, 4, "cd-offset"), (20, 2, "comment-len")]  # fmt: skip


def _describe_zip(seed: Seed) -> None:
    raw = seed.raw
    eocd = raw.rfind(b"PK\x05\x06")
    seed.fields += [(eocd + o, w, f"eocd.{n}") for o, w, n in _EOCD_FIELDS]
    n_entries, _, cd_off = struct.unpack_from("<HII", raw, eocd + 10)
    pos = cd_off
    for i in range(n_entries):
        seed.fields += [(pos + o, w, f"cd[{i}].{n}") for o, w, n in _CD_FIELDS]
        nl, xl, cl = struct.unpack_from("<HHH", raw, pos + 28)
        pos += 46 + nl + xl + cl
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        for i, zi in enumerate(zf.infolist()):
            lh = zi.header_offset
            seed.fields += [(lh + o, w, f"local[{i}].{n}") for o, w, n in _LOCAL_FIELDS]
            nl, xl = struct.unpack_from("<HH", raw, lh + 26)
            data = lh + 30 + nl + xl
            seed.members.append((lh, data, zi.compress_size))
            if zi.compress_type == zipfile.ZIP_STORED and zi.filename.endswith(".npy"):
                lf, lw, end = _npy_header_span(raw, data)
                seed.fields.append((lf, lw, f"member[{i}].npy-header-len"))
                seed.npy_headers.append((data, end))


def _describe_npy(seed: Seed) -> None:
    lf, lw, end = _npy_header_span(seed.raw, 0)
    seed.fields.append((lf, lw, "npy-header-len"))
    seed.npy_headers.append((0, end))
    if seed.pickle_start is not None:
        _describe_pickle(seed)


def _describe_pickle(seed: Seed) -> None:
    assert seed.pickle_start is not None
    for op, _arg, pos in pickletools.genops(io.BytesIO(seed.raw[seed.pickle_start :])):
        at = seed.pickle_start + pos + 1
        n = op.arg.n if op.arg is not None else 0
        width = {-2: 1, -3: 4, -4: 4, -5: 8}.get(n, n if n > 0 else 0)
        if width:
            seed.fields.append((at, width, f"pickle@{at - 1}.{op.name}"))


def _load_expected(raw: bytes, suffix: str, tmp: Any) -> dict[str, Any]:
    p = tmp / f"case{suffix}"
    p.write_bytes(raw)
    with reprod.load(p) as d:
        return _snapshot(d)


def _make_seeds(tmp: Any) -> list[Seed]:
    tree = _tree()
    seeds: list[Seed] = []

    def add(name: str, raw: bytes, suffix: str, *, pickle_start: Optional[int] = None) -> None:
        s = Seed(name, raw, suffix, _load_expected(raw, suffix, tmp), zip=raw[:2] == b"PK",
                 pickle_start=pickle_start)
        (_describe_zip if s.zip else _describe_npy)(s)
        seeds.append(s)

    bf16 = np.array([1.0, -2.5, 3.0e38, np.inf], dtype=np.float32)
    native = {**tree, "empty": {}, "bf": bf16}
    p = reprod.save(tmp / "seed.npz", native, source_dtypes={"bf": "bfloat16"})
    add("reprod-npz", open(p, "rb").read(), ".npz")
    p = reprod.save(tmp / "seed.npy", tree)
    raw = open(p, "rb").read()
    add("legacy-npy", raw, ".npy", pickle_start=len(_npy_object_header()))
    for proto in (2, 5):
        add(f"legacy-npy-proto{proto}", _pickled_npy(tree, proto), ".npy",
            pickle_start=len(_npy_object_header()))
    buf = io.BytesIO()
    np.save(buf, tree["fortran"])
    add("plain-npy", buf.getvalue(), ".npy")
    flat = {"logits": tree["logits"], "w": tree["n"]["w"], "be": tree["be"], "z": tree["zero"]}
    for name, fn in (("numpy-savez", np.savez), ("numpy-savez-compressed", np.savez_compressed)):
        buf = io.BytesIO()
        fn(buf, **flat)
        add(name, buf.getvalue(), ".npz")
    return seeds


# ---------------------------------------------------------------------------------------------
# mutations: each returns a description and whether the file may still be internally consistent
# (False once the mutation fixed the checksums up or rewrote the metadata: a success may then give
# different data, as long as it is well-formed)
# ---------------------------------------------------------------------------------------------

Mutation = Callable[[np.random.Generator, bytearray, Seed], tuple[str, bool]]


def _pos(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(0, max(n, 1)))


def _m_truncate(rng, b, seed):
    n = _pos(rng, len(b)) if rng.random() < 0.7 else len(b) - 1 - _pos(rng, min(64, len(b)))
    del b[n:]
    return f"truncate@{n}", True


def _m_flip(rng, b, seed):
    out = []
    for _ in range(int(rng.integers(1, 4))):
        p = _pos(rng, len(b))
        if rng.random() < 0.5:
            b[p] ^= 1 << int(rng.integers(0, 8))
        else:
            b[p] = int(rng.integers(0, 256))
        out.append(p)
    return f"flip@{out}", True


def _m_insert_delete(rng, b, seed):
    p, n = _pos(rng, len(b)), int(rng.integers(1, 17))
    if rng.random() < 0.5:
        b[p:p] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        return f"insert{n}@{p}", True
    del b[p : p + n]
    return f"delete{n}@{p}", True


def _m_splice(rng, b, seed):
    src, dst, n = _pos(rng, len(b)), _pos(rng, len(b)), int(rng.integers(1, 64))
    b[dst : dst + n] = b[src : src + n]
    return f"copy{n}:{src}->{dst}", True


def _hostile_ints(width: int, orig: int, size: int, rng) -> list[int]:
    top = (1 << (8 * width)) - 1
    vals = [0, 1, top, top - 1, top >> 1, (top >> 1) + 1, orig + 1, orig - 1, orig * 2,
            size, size - 1, size + 1, size * 1000, int(rng.integers(0, top, dtype=np.uint64))]
    return [v & top for v in vals]


def _m_field(rng, b, seed):
    if not seed.fields:
        return _m_flip(rng, b, seed)
    off, width, what = seed.fields[_pos(rng, len(seed.fields))]
    if off + width > len(b):
        return _m_flip(rng, b, seed)
    orig = int.from_bytes(b[off : off + width], "little")
    vals = _hostile_ints(width, orig, len(b), rng)
    v = vals[_pos(rng, len(vals))]
    b[off : off + width] = v.to_bytes(width, "little")
    return f"{what}={v}", True


_SHAPES = ["(1000000000000,)", "(9223372036854775807,)", "(9223372036854775808, 0)",
           "(18446744073709551616,)", "(-1,)", "(2, -3)", "(0, 99999999999999999999)",
           "(4294967296, 4294967296)", "(" + "1, " * 65 + ")", "((),)", "(1.5,)", "(True,)",
           "()", "[3]", "None", "'x'", "(3,)", "(40, 8)", "(0,)", "(2147483648,)"]  # fmt: skip
_DESCRS = ["'<f8'", "'<U999999999'", "'|O'", "'V8'", "'(3,)<f8'", "[('a', '<f8')]", "'<M8[s]'",
           "'>i4'", "'<c16'", "'|b1'", "'x'", "''", "'<f2'", "'S5'", "'<u2'", "'V0'", "3"]  # fmt: skip
_FORTRAN = ["False", "True", "0", "None"]


def _m_npy_header(rng, b, seed):
    if not seed.npy_headers:
        return _m_flip(rng, b, seed)
    magic, end = seed.npy_headers[_pos(rng, len(seed.npy_headers))]
    text_start = magic + (10 if seed.raw[magic + 6] == 1 else 12)
    room = end - text_start - 1
    if rng.random() < 0.15:
        text = rng.integers(32, 127, int(rng.integers(1, room + 1)), dtype=np.uint8).tobytes().decode()
    else:
        d = _DESCRS[_pos(rng, len(_DESCRS))]
        f = _FORTRAN[_pos(rng, len(_FORTRAN))]
        s = _SHAPES[_pos(rng, len(_SHAPES))]
        text = f"{{'descr': {d}, 'fortran_order': {f}, 'shape': {s}, }}"
    if len(text) > room:
        return _m_flip(rng, b, seed)
    b[text_start:end] = (text.ljust(room) + "\n").encode("latin1")
    return f"npy-header@{magic}={text!r}", True


def _refresh_crcs(b: bytearray, seed: Seed) -> None:
    """Recompute every member's CRC so that only structural checks can catch a mutation."""
    eocd = seed.raw.rfind(b"PK\x05\x06")
    n_entries, _, cd_off = struct.unpack_from("<HII", seed.raw, eocd + 10)
    pos = cd_off
    for i in range(n_entries):
        lh, data, size = seed.members[i]
        crc = zlib.crc32(bytes(b[data : data + size])) if seed.raw[lh + 8] == 0 else None
        if crc is not None:
            struct.pack_into("<I", b, pos + 16, crc)
            struct.pack_into("<I", b, lh + 14, crc)
        nl, xl, cl = struct.unpack_from("<HHH", seed.raw, pos + 28)
        pos += 46 + nl + xl + cl


def _m_npy_header_consistent(rng, b, seed):
    """A hostile member header in a zip whose CRCs agree with it: the header checks must hold."""
    desc, _ = _m_npy_header(rng, b, seed)
    if seed.zip and len(b) == len(seed.raw):
        _refresh_crcs(b, seed)
        return desc + "+crc", False
    return desc, True


_PICKLE_OPS = [bytes([c]) for c in b"cRbi\x81\x92o\x82\x93(tsu}]e.qhjgNKJM\x8a\x8bGXVBCT\x8c\x8e\x96\x95\x94"]


def _m_pickle(rng, b, seed):
    if seed.pickle_start is None:
        return _m_field(rng, b, seed)
    if rng.random() < 0.7:
        fields = [f for f in seed.fields if f[2].startswith("pickle@")]
        off, width, what = fields[_pos(rng, len(fields))]
        orig = int.from_bytes(b[off : off + width], "little")
        vals = _hostile_ints(width, orig, len(b), rng)
        v = vals[_pos(rng, len(vals))]
        b[off : off + width] = v.to_bytes(width, "little")
        return f"{what}={v}", True
    ops = [f[0] - 1 for f in seed.fields if f[2].startswith("pickle@")]
    p = ops[_pos(rng, len(ops))]
    op = _PICKLE_OPS[_pos(rng, len(_PICKLE_OPS))]
    b[p : p + 1] = op
    return f"opcode@{p}={op!r}", True


_BAD_META: list[Any] = [
    [], "x", 3, None, {"format": "reprod-npz"}, {"format": "reprod-npz", "version": 1},
    {"format": "reprod-npz", "version": 1e400}, {"format": "reprod-npz", "version": "1"},
    {"format": "reprod-npz", "version": True, "keys": []}, {"format": "reprod-npz", "version": 99, "keys": []},
    {"format": "reprod-npz", "version": 1, "keys": {}},
    {"format": "reprod-npz", "version": 1, "keys": [1, 2]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": "logits", "member": "logits.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": [], "member": "logits.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": [1], "member": "logits.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": 5}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"]}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "nope.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "__reprod__.json"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "logits.npy", "dtype": "bfloat16"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "logits.npy", "dtype": 7}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "logits.npy", "dtype": "x" * 10000}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "logits.npy"},
                                                     {"path": ["a"], "member": "loss.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "member": "logits.npy"},
                                                     {"path": ["a", "b"], "member": "loss.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a", "b"], "member": "logits.npy"},
                                                     {"path": ["a"], "member": "loss.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["a"], "kind": "dict"},
                                                     {"path": ["a"], "member": "loss.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["k"] * 100, "member": "logits.npy"}]},
    {"format": "reprod-npz", "version": 1, "keys": [{"path": ["x", "y"], "member": "logits.npy"},
                                                     {"path": ["z"], "member": "logits.npy"}]},
]  # fmt: skip


def _m_meta(rng, b, seed):
    """Swap the metadata member for hostile JSON in an otherwise valid zip (CRCs all right)."""
    if not seed.name == "reprod-npz":
        return _m_flip(rng, b, seed)
    i = _pos(rng, len(_BAD_META) + 3)
    if i == len(_BAD_META):
        text = "[" * 100_000 + "]" * 100_000  # deep enough to break a recursive JSON parser
    elif i == len(_BAD_META) + 1:
        text = '{"format": "reprod-npz", "version": 1, "keys": [' + "{" * 50_000 + "}" * 50_000 + "]}"
    elif i == len(_BAD_META) + 2:
        text = "\udcff{}"  # not UTF-8 once encoded with surrogateescape
    else:
        import json

        text = json.dumps(_BAD_META[i])
    out = io.BytesIO()
    # rebuilt from the clean seed: mutations drawn before this one are dropped
    with zipfile.ZipFile(io.BytesIO(seed.raw)) as src, zipfile.ZipFile(out, "w") as dst:
        for zi in src.infolist():
            data = src.read(zi) if zi.filename != "__reprod__.json" else \
                text.encode("utf-8", "surrogateescape")
            dst.writestr(zi.filename, data)
    b[:] = out.getvalue()
    return f"meta#{i}", False


MUTATIONS: list[tuple[Mutation, float]] = [
    (_m_truncate, 2), (_m_flip, 4), (_m_insert_delete, 1), (_m_splice, 1), (_m_field, 4),
    (_m_npy_header, 2), (_m_npy_header_consistent, 1), (_m_pickle, 3), (_m_meta, 1),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------


def _snapshot(d: Any) -> dict[str, Any]:
    """Read every key (nested too) and check each value is a well-formed read-only numeric array."""
    out: dict[str, Any] = {}
    for k in d:
        assert isinstance(k, str), f"key {k!r} is not a str"
        v = d[k]
        if isinstance(v, Mapping):
            out[k] = _snapshot(v)
            continue
        spec = d.spec(k)
        if isinstance(v, NonNumericValue):
            # a legacy value that is well-formed but not numeric data (a byte flip can turn a
            # dtype into "S4"): the key loads as a marker the engine turns into a "type" verdict
            assert d.format == "npy-dict", f"{k}: a non-numeric value in a {d.format} file"
            assert spec is v and isinstance(v.what, str) and v.what.isprintable(), repr(v.what)
            out[k] = ("non-numeric", v.what)
            continue
        assert isinstance(v, np.ndarray), f"{k}: {type(v).__name__}"
        assert v.dtype.kind in "biufc", f"{k}: dtype {v.dtype}"
        assert not v.flags.writeable, f"{k}: writeable"
        assert v.shape == spec.shape, f"{k}: shape {v.shape} != spec {spec.shape}"
        out[k] = np.array(v)
    return out


def _same(got: Any, want: Any, where: str = "") -> Optional[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict) or list(got) != list(want):
            return f"{where}: keys {list(got) if isinstance(got, dict) else type(got)} != {list(want)}"
        for k in want:
            r = _same(got[k], want[k], f"{where}/{k}")
            if r:
                return r
        return None
    got, want = np.asarray(got), np.asarray(want)
    native = want.dtype.newbyteorder("=")
    if got.dtype.newbyteorder("=") != native or got.shape != want.shape:
        return f"{where}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
    if got.astype(native).tobytes() != want.astype(native).tobytes():
        return f"{where}: values differ"
    return None


# The legacy-format reference runs in a child process: Python's unpickler restricted to numpy's
# own array globals still crashes numpy on some one-byte changes (an object dtype whose flags byte
# was flipped segfaults numpy 2.4) -- one more reason reprod never calls those globals.
_REF_WORKER = r"""
import io, pickle, resource, sys
import numpy as np
SAFE = {SAFE}
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

class Ref(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in SAFE:
            raise pickle.UnpicklingError(module + "." + name)
        return super().find_class(module, name)

def plain(obj):
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("key")
        return {{k: plain(v) for k, v in obj.items()}}
    arr = np.asarray(obj)
    if arr.dtype.kind not in "biufc":
        raise TypeError("not numeric")
    # a dtype whose flags byte was changed makes numpy misbehave (wrong values, crashes): no
    # reference then (reprod ignores the flags)
    for dt in (getattr(obj, "dtype", arr.dtype), arr.dtype):
        if dt.flags != np.dtype(dt.str).flags:
            raise TypeError("corrupt dtype flags")
    # plain builtins only: the parent never unpickles numpy objects built from hostile bytes
    return (arr.dtype.str, arr.shape, np.ascontiguousarray(arr).tobytes())

def reference(raw):
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    read = {{(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}}[version]
    _shape, _fortran, dt = read(f)
    if not dt.hasobject:
        return None
    obj = Ref(f).load()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return plain(obj) if isinstance(obj, dict) else None

for line in sys.stdin:
    path = line.rstrip("\n")
    try:
        out = reference(open(path, "rb").read())
    except BaseException:
        out = None
    with open(path + ".ref", "wb") as f:
        pickle.dump(out, f, protocol=4)
    print("done", flush=True)
"""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}")


def _rebuild(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _rebuild(v) for k, v in x.items()}
    dt, shape, data = x
    return np.frombuffer(data, dtype=np.dtype(dt)).reshape(shape)


class RefReader:
    """A child process that reads legacy dumps with Python's restricted unpickler; restarted when
    numpy crashes or hangs in it (counted in ``crashes``)."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.crashes = 0

    def _start(self) -> None:
        import subprocess
        import sys

        src = _REF_WORKER.format(SAFE=repr(set(SAFE_GLOBALS)))
        self.proc = subprocess.Popen([sys.executable, "-c", src], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def __call__(self, raw: bytes, path: Any) -> Optional[dict[str, Any]]:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        src = f"{path}.forref"
        with open(src, "wb") as f:
            f.write(raw)
        try:
            self.proc.stdin.write(src + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], 30)
            line = self.proc.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError):
            line = ""
        if line.strip() != "done":
            self.crashes += 1
            self.close()
            return None
        with open(src + ".ref", "rb") as f:
            out = _NoGlobals(f).load()
        return None if out is None else _rebuild(out)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("key")
        return {k: _plain(v) for k, v in obj.items()}
    arr = np.asarray(obj)
    if arr.dtype.kind not in "biufc":
        raise TypeError("not numeric")
    return arr


class _Hang(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"no answer within {CASE_TIMEOUT_S} s")


@dataclass
class Outcome:
    kind: str  # "exact", "differs-undetectably", "error"
    problem: Optional[str] = None
    error: str = ""
    peak: int = 0


def _run_case(path: Any, raw: bytes, seed: Seed, checksummed: bool, truncated_only: bool,
              verify: Optional[bool], ref_reader: RefReader) -> Outcome:
    """Read everything; judge the outcome. ``checksummed``: a success must give the seed's data."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    got: Any = None
    err: Optional[BaseException] = None
    try:
        with reprod.load(path, verify=verify) as d:
            got = _snapshot(d)
    except DumpFormatError as exc:
        err = exc
    peak = tracemalloc.get_traced_memory()[1] - base
    limit = 16 * len(raw) + (16 << 20)
    if peak > limit:
        return Outcome("error", f"allocated {peak} bytes reading a {len(raw)}-byte file", peak=peak)
    if err is not None:
        msg = str(err)
        if not msg.isprintable() or str(path) not in msg:
            return Outcome("error", f"error is not one line naming the file: {msg!r}")
        return Outcome("error", error=type(err).__name__ + ": " + msg.split(": ", 1)[-1][:60],
                       peak=peak)
    if checksummed or truncated_only:
        problem = _same(got, seed.expected)
        return Outcome("exact", f"loaded wrong data: {problem}" if problem else None, peak=peak)
    ref = ref_reader(raw, path) if seed.pickle_start is not None else _reference_npy(raw, path)
    if ref is not None:
        problem = _same(got, ref)
        if problem:
            return Outcome("exact", f"disagrees with the reference reader: {problem}")
    same = _same(got, seed.expected) is None
    return Outcome("exact" if same else "differs-undetectably", peak=peak)


def _reference_npy(raw: bytes, path: Any) -> Optional[dict[str, Any]]:
    """numpy's own reader (no pickle) for a plain .npy array; None where it refuses the file."""
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        return {os.path.splitext(os.path.basename(path))[0]: _plain(arr)}
    except Exception:  # noqa: BLE001 - the reference may fail any way it likes
        return None


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[Seed]:
    return _make_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def ref_reader() -> Any:
    r = RefReader()
    yield r
    r.close()


SEED_NAMES = ["reprod-npz", "legacy-npy", "legacy-npy-proto2", "legacy-npy-proto5", "plain-npy",
              "numpy-savez", "numpy-savez-compressed"]  # fmt: skip


def test_seeds_load_with_their_data(seeds, ref_reader, tmp_path) -> None:
    """The clean files the fuzzer starts from read back what was saved."""
    assert [s.name for s in seeds] == SEED_NAMES
    tree = _tree()
    for s in seeds:
        if s.name.startswith("legacy"):
            assert _same(s.expected, tree) is None, s.name
            assert _same(ref_reader(s.raw, tmp_path / "x.npy"), tree) is None, s.name
    native = next(s for s in seeds if s.name == "reprod-npz").expected
    assert _same({k: native[k] for k in tree}, tree) is None
    bf16 = reprod.adapters.bf16_bits_to_float32(
        reprod.adapters.float32_to_bf16_bits(np.array([1.0, -2.5, 3.0e38, np.inf], np.float32)))
    assert native["empty"] == {} and _same(native["bf"], bf16) is None
    assert all(s.fields for s in seeds)


@pytest.mark.parametrize("seed_name", SEED_NAMES)
def test_mutated_dumps_load_right_or_fail_cleanly(seeds, ref_reader, seed_name, tmp_path) -> None:
    seed = next(s for s in seeds if s.name == seed_name)
    n_cases = -(-CASES // len(SEED_NAMES))
    rng = np.random.default_rng([SEED, SEED_NAMES.index(seed_name)])
    weights = np.array([w for _, w in MUTATIONS], dtype=float)
    weights /= weights.sum()
    path = tmp_path / f"case{seed.suffix}"
    tally: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    failures: list[str] = []
    old = signal.signal(signal.SIGALRM, _on_alarm)
    tracemalloc.start()
    t0 = time.perf_counter()
    crashes0 = ref_reader.crashes
    try:
        for case in range(n_cases):
            b = bytearray(seed.raw)
            steps = []
            consistent_possible = False
            for _ in range(1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)):
                if not b:
                    break  # truncated to nothing: the empty file is the case
                mut = MUTATIONS[int(rng.choice(len(MUTATIONS), p=weights))][0]
                desc, checked = mut(rng, b, seed)
                steps.append(desc)
                consistent_possible = consistent_possible or not checked
            checksummed = seed.zip and not consistent_possible
            truncated_only = all(x.startswith("truncate") for x in steps)
            raw = bytes(b)
            # a fresh inode each case: arrays of an earlier case may still map the old file
            tmp = tmp_path / "next"
            tmp.write_bytes(raw)
            os.replace(tmp, path)
            verify = [None, None, True, False][case % 4]
            if verify is False and seed.zip:
                verify = None  # without verification a flipped payload byte would load silently
            signal.alarm(CASE_TIMEOUT_S)
            try:
                out = _run_case(path, raw, seed, checksummed, truncated_only, verify, ref_reader)
            except _Hang as exc:
                out = Outcome("error", f"hang: {exc}")
            except Exception as exc:  # noqa: BLE001 - exactly what the test is looking for
                out = Outcome("error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            finally:
                signal.alarm(0)
            tally[out.kind] += 1
            if out.error:
                errors[out.error.split(":")[0]] += 1
            if out.problem:
                keep = tmp_path / f"failure-{case}{seed.suffix}"
                keep.write_bytes(raw)
                failures.append(f"seed={SEED} {seed_name} case {case} {steps} verify={verify}: "
                                f"{out.problem} (file kept at {keep})")
                if len(failures) >= MAX_FAILURES:
                    break
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)
    print(f"\n{seed_name}: {sum(tally.values())} cases in {time.perf_counter() - t0:.1f} s: "
          f"{dict(tally)}; errors {dict(errors)}; reference reader crashed {ref_reader.crashes - crashes0} times")
    assert not failures, "\n".join(failures)


def test_mutated_pdparams_read_right_or_fail_cleanly(tmp_path) -> None:
    """Paddle's ``.pdparams`` reader (reprod.align) walks the same restricted pickle machine."""
    from reprod.storage.framework_files import read_pdparams, write_pdparams

    weights = {"conv.weight": np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3),
               "bn._mean": np.zeros(2, np.float32), "fc.bias": np.array([0.5, -1.0])}
    clean = tmp_path / "clean.pdparams"
    write_pdparams(clean, weights)
    seed = Seed("pdparams", clean.read_bytes(), ".pdparams", {}, pickle_start=0)
    _describe_pickle(seed)
    assert _same(read_pdparams(clean), weights) is None
    rng = np.random.default_rng([SEED, 99])
    mutations = [_m_truncate, _m_flip, _m_flip, _m_insert_delete, _m_splice, _m_pickle, _m_pickle]
    path = tmp_path / "case.pdparams"
    tally: Counter[str] = Counter()
    failures = []
    for case in range(max(1, CASES // 7)):
        b = bytearray(seed.raw)
        desc, _ = mutations[_pos(rng, len(mutations))](rng, b, seed)
        tmp = tmp_path / "next"
        tmp.write_bytes(bytes(b))
        os.replace(tmp, path)
        try:
            got = read_pdparams(path)
            assert isinstance(got, dict) and all(
                isinstance(k, str) and isinstance(v, np.ndarray) and v.dtype.kind in "biufc"
                for k, v in got.items()), "not a dict of numeric arrays"
            tally["read"] += 1
        except DumpFormatError as exc:
            assert str(exc).isprintable() and str(path) in str(exc), repr(str(exc))
            tally["error"] += 1
        except Exception as exc:  # noqa: BLE001 - exactly what the test is looking for
            failures.append(f"case {case} {desc}: {type(exc).__name__}: {exc}")
    print(f"\npdparams: {dict(tally)}")
    assert not failures, "\n".join(failures[:MAX_FAILURES])


# ---------------------------------------------------------------------------------------------
# targeted cases: each class of hostile input the loop draws from, checked on its own
# ---------------------------------------------------------------------------------------------


def _load_all(path: Any, **kw: Any) -> dict[str, Any]:
    with reprod.load(path, **kw) as d:
        return _snapshot(d)


def _expect_error(path: Any, *words: str, **kw: Any) -> str:
    with pytest.raises(DumpFormatError) as info:
        _load_all(path, **kw)
    msg = str(info.value)
    assert msg.isprintable() and str(path) in msg, repr(msg)
    for w in words:
        assert w in msg, msg
    return msg


def _npz_member_offsets(raw: bytes, name: str) -> tuple[int, int, int]:
    """(local header, data start, size in the file) of a member."""
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        zi = zf.getinfo(name)
    nl, xl = struct.unpack_from("<HH", raw, zi.header_offset + 26)
    return zi.header_offset, zi.header_offset + 30 + nl + xl, zi.compress_size


def test_every_flipped_payload_byte_of_an_npz_is_detected(tmp_path) -> None:
    data = {"a": np.arange(64, dtype=np.float32), "b": {"c": np.arange(9, dtype=np.int16)}}
    raw = open(reprod.save(tmp_path / "ok.npz", data), "rb").read()
    p = tmp_path / "bad.npz"
    for member, key in (("a.npy", "'a'"), ("b/c.npy", "'b/c'")):
        _, start, size = _npz_member_offsets(raw, member)
        for pos in range(start, start + size):  # the .npy header and every payload byte
            b = bytearray(raw)
            b[pos] ^= 0x10
            p.write_bytes(bytes(b))
            msg = _expect_error(p)
            assert key in msg or "header" in msg or "member" in msg, msg


def test_legacy_npy_payload_flip_is_undetectable(tmp_path) -> None:
    """A pickle carries no checksum: a flipped payload byte loads as a different value. This is a
    limitation of reprod_log's format (stated in SECURITY.md), not something reprod can fix."""
    want = np.arange(64, dtype=np.float32)
    raw = bytearray(open(reprod.save(tmp_path / "ok.npy", {"a": want}), "rb").read())
    pos = bytes(raw).find(want.tobytes())
    raw[pos + 4 * 10] ^= 0x01
    p = tmp_path / "bad.npy"
    p.write_bytes(bytes(raw))
    got = _load_all(p)["a"]
    assert (got != want).sum() == 1 and got[10] != want[10]


def test_verify_modes_on_a_large_member(tmp_path) -> None:
    """Members of 1 MiB or more are checked only with verify=True (or Dump.verify()), at load."""
    big = np.arange(300_000, dtype=np.float32)  # 1.2 MB
    raw = bytearray(open(reprod.save(tmp_path / "ok.npz", {"big": big, "s": np.ones(3)}), "rb").read())
    _, start, size = _npz_member_offsets(bytes(raw), "big.npy")
    raw[start + size - 1] ^= 0x80
    p = tmp_path / "bad.npz"
    p.write_bytes(bytes(raw))
    got = _load_all(p)  # default: too big to check on access, so the flip goes through
    assert got["big"][-1] != big[-1] and (got["big"][:-1] == big[:-1]).all()
    with pytest.raises(DumpFormatError, match="checksum mismatch"):
        reprod.load(p, verify=True)
    with reprod.load(p) as d, pytest.raises(DumpFormatError, match="'big'.*checksum"):
        d.verify()
    small = bytearray(open(tmp_path / "ok.npz", "rb").read())
    _, start, size = _npz_member_offsets(bytes(small), "s.npy")
    small[start + size - 1] ^= 0x80
    p.write_bytes(bytes(small))
    _expect_error(p, "'s'", "checksum")
    assert _load_all(p, verify=False)["big"].tobytes() == big.tobytes()  # False checks nothing
    ok = _load_all(tmp_path / "ok.npz", verify=True)
    assert ok["big"].tobytes() == big.tobytes()


@pytest.mark.parametrize("shape", ["(1000000000000,)", "(9223372036854775808, 0)", "(-1,)",
                                   "(4294967296, 4294967296)", "(" + "1, " * 65 + ")", "(1.5,)",
                                   "(0, 18446744073709551616)"])  # fmt: skip
@pytest.mark.parametrize("where", ["npy", "npz-member"])
def test_huge_or_bad_claimed_shapes_allocate_nothing(tmp_path, shape, where) -> None:
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", 502) + header.ljust(501).encode() + b"\n" + b"\0" * 64
    if where == "npy":
        p = tmp_path / "huge.npy"
        p.write_bytes(npy)
    else:
        p = tmp_path / "huge.npz"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr("x.npy", npy)
    tracemalloc.start()
    try:
        _expect_error(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


@pytest.mark.parametrize("field,value,words", [
    ("cd.local-offset", 10**9, ("bad local header",)),
    ("cd.local-offset", 0xFFFFFFFF, ()),
    ("cd.usize", 0xFFFFFFF0, ()),
    ("cd.csize", 0xFFFFFFF0, ()),
    ("local.extra-len", 0xFFFF, ()),
    ("local.name-len", 0xFFFF, ()),
    ("cd.name-len", 0xFFFF, ()),
    ("cd.comment-len", 0x2000, ()),
    ("eocd.cd-offset", 0xFFFFFFF0, ()),
    ("eocd.cd-size", 0xFFFFFFF0, ()),
    ("eocd.entries", 0xFFFF, ()),
    ("eocd.entries", 1, ("counts 1",)),
    ("local.usize", 0xFFFFFFF0, None),  # zip readers take sizes from the central directory:
    ("local.csize", 0xFFFFFFF0, None),  # these load, with the right data
    ("local.crc", 0, None),
])  # fmt: skip
def test_zip_sizes_and_offsets_pointing_outside_the_file(tmp_path, field, value, words) -> None:
    data = {"a": np.arange(50.0), "b": np.ones(3, np.int8)}
    raw = open(reprod.save(tmp_path / "ok.npz", data), "rb").read()
    seed = Seed("z", raw, ".npz", {}, zip=True)
    _describe_zip(seed)
    kind, name = field.split(".")
    off, width = next((o, w) for o, w, what in seed.fields
                      if what.split("[")[0].split(".")[0] == kind and what.endswith("." + name))
    b = bytearray(raw)
    b[off : off + width] = value.to_bytes(width, "little")
    p = tmp_path / "bad.npz"
    p.write_bytes(bytes(b))
    if words is None:
        assert _same(_load_all(p), data) is None
    else:
        _expect_error(p, *words)


def test_compressed_member_claiming_more_than_deflate_can_give(tmp_path) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.zeros(1000))
    raw = bytearray(buf.getvalue())
    seed = Seed("z", bytes(raw), ".npz", {}, zip=True)
    _describe_zip(seed)
    for off, width, what in seed.fields:
        if what.endswith("usize"):
            raw[off : off + width] = (0xFFFFFF00).to_bytes(4, "little")
    p = tmp_path / "bomb.npz"
    p.write_bytes(bytes(raw))
    _expect_error(p, "compressed")


def test_corrupt_deflate_stream_is_a_dump_error(tmp_path) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.arange(5000.0))
    raw = bytearray(buf.getvalue())
    _, start, size = _npz_member_offsets(bytes(raw), "a.npy")
    p = tmp_path / "bad.npz"
    for pos in range(start, start + size, max(1, size // 40)):
        b = bytearray(raw)
        b[pos] ^= 0xFF
        p.write_bytes(bytes(b))
        _expect_error(p)


def _legacy(tmp_path, body: bytes, name: str = "evil.npy") -> Any:
    p = tmp_path / name
    p.write_bytes(_npy_object_header() + b"\x80\x04" + body + b".")
    return p


def _array_ops(n_floats: int) -> bytes:
    """Pickle opcodes building a float64 array of ``n_floats`` zeros (the way numpy pickles one)."""
    g = b"\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93"
    nd = b"\x8c\x05numpy\x8c\x07ndarray\x93"
    dt = b"\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02f8\x89\x88\x87R(K\x03\x8c\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    payload = b"\0" * (8 * n_floats)
    return (g + nd + b"K\x00\x85C\x01b\x87R(K\x01J" + struct.pack("<i", n_floats) + b"\x85" + dt
            + b"\x89B" + struct.pack("<I", len(payload)) + payload + b"tb")


def test_legacy_billion_laughs_is_refused_quickly(tmp_path) -> None:
    """Each level's dict holds the previous one twice (pickle memo): 2**40 leaves in ~700 bytes."""
    levels = _array_ops(1) + b"\x94"  # memo 0: one array
    for level in range(40):  # memo level+1: {"a": memo[level], "b": memo[level]}
        levels += b"}(\x8c\x01a" + (b"h%c" % level) + b"\x8c\x01b" + (b"h%c" % level) + b"u\x94"
    # {"top": <level 40>, "junk": [the array and every level, which the building left behind]}
    body = b"}\x8c\x03topNs\x8c\x04junk](" + levels + b"es\x8c\x03toph\x28s"
    p = _legacy(tmp_path, body)
    _expect_error(p, "implausibly large")


def test_legacy_list_of_shared_arrays_is_not_expanded(tmp_path) -> None:
    """A list holding one 8 MB payload 20 000 times would be 160 GB once stacked."""
    body = b"}\x8c\x01x" + _array_ops(1 << 20) + b"\x94]\x94(" + b"h\x00" * 20_000 + b"es"
    p = _legacy(tmp_path, body)
    tracemalloc.start()
    try:
        _expect_error(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


@pytest.mark.parametrize("body,words", [
    (b"}\x8c\x01x" + b"]" * 5000 + b"a" * 4999 + b"s", ("nested",)),  # lists 5000 deep
    (b"}\x8c\x01x" + b"K\x01" + b"\x85" * 100_000 + b"s", ()),  # tuples 10**5 deep
    (b"}(" + b"K\x01" + b"\x85" * 100_000 + b"K\x01u", ()),  # ... as a dict key
    (b"}\x8c\x01x]\x94h\x00as", ()),  # a list that holds itself
    (b"}\x8c\x01x}\x94\x8c\x01yh\x00ss", ("nested",)),  # a dict that holds itself
    (b"}\x8c\x01x\x8b\xff\xff\xff\x7fs", ()),  # LONG4 claiming 2 GB
    (b"}\x8c\x01x\x8e" + b"\xff" * 8 + b"s", ("truncated",)),  # BINBYTES8 claiming 2**64-1
    (b"}\x8c\x01xT\xff\xff\xff\xffs", ("truncated",)),  # BINSTRING with a negative length
    (b"}\x8c\x01xI" + b"9" * 100_000 + b"\ns", ()),  # a 100 000-digit integer
    (b"}\x8c\x01x\x8c\x05numpy\x8c\x05nd\nar\x93s", ("'nd\\nar'",)),  # names quoted, one line
    (b"}\x8c\x01x\x8c\x05\x1b[31m\x8c\x01x\x93s", ("'\\x1b[31m'",)),  # no terminal escapes
])  # fmt: skip
def test_hostile_pickles(tmp_path, body, words) -> None:
    p = _legacy(tmp_path, body)
    msg = _expect_error(p, *words)
    assert msg.isprintable(), repr(msg)


@pytest.mark.parametrize("i", range(len(_BAD_META) + 3))
def test_hostile_metadata_members(tmp_path, i) -> None:
    raw = open(reprod.save(tmp_path / "ok.npz", {"logits": np.ones(3), "loss": np.float32(1)}), "rb").read()
    seed = Seed("reprod-npz", raw, ".npz", {}, zip=True)

    class _Pick:
        def integers(self, lo, hi=None, *a, **k):
            return i

    b = bytearray(raw)
    _m_meta(_Pick(), b, seed)
    p = tmp_path / "meta.npz"
    p.write_bytes(bytes(b))
    try:
        got = _load_all(p)
    except DumpFormatError as exc:
        assert str(exc).isprintable() and str(p) in str(exc), repr(str(exc))
        return
    # the few hostile documents that are still valid metadata give well-formed data
    assert all(isinstance(v, (np.ndarray, dict)) for v in got.values())


def test_reading_never_runs_out_of_the_file_on_a_truncated_mmap(tmp_path) -> None:
    """Every prefix of a native dump: the structure is checked against the file's real size."""
    data = {"a": np.arange(100.0), "b": {"c": np.ones((3, 3), np.float32)}}
    raw = open(reprod.save(tmp_path / "ok.npz", data), "rb").read()
    p = tmp_path / "cut.npz"
    for n in range(1, len(raw)):
        p.write_bytes(raw[:n])
        _expect_error(p)


# ---------------------------------------------------------------------------------------------
# the reduce arguments of every allowed global: random argument trees, built opcode by opcode
# ---------------------------------------------------------------------------------------------


class _Call:
    """``module.name(*args)`` in the pickle (GLOBAL, the args tuple, REDUCE), then BUILD with
    ``state`` where one is given."""

    def __init__(self, glob: tuple[str, str], args: tuple, state: Any = None) -> None:
        self.glob, self.args, self.state = glob, args, state


def _emit(x: Any, out: bytearray) -> None:
    if isinstance(x, _Call):
        out += b"c" + x.glob[0].encode() + b"\n" + x.glob[1].encode() + b"\n"
        _emit(x.args, out)
        out += b"R"
        if x.state is not None:
            _emit(x.state, out)
            out += b"b"
    elif x is None:
        out += b"N"
    elif x is True or x is False:
        out += b"\x88" if x else b"\x89"
    elif isinstance(x, int):
        if -(1 << 31) <= x < 1 << 31:
            out += b"J" + struct.pack("<i", x)
        else:
            raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
            out += b"\x8a" + bytes([len(raw)]) + raw
    elif isinstance(x, float):
        out += b"G" + struct.pack(">d", x)
    elif isinstance(x, str):
        raw = x.encode("utf-8", "surrogatepass")
        out += b"X" + struct.pack("<I", len(raw)) + raw
    elif isinstance(x, bytes):
        out += b"B" + struct.pack("<I", len(x)) + x
    elif isinstance(x, tuple):
        out += b"("
        for v in x:
            _emit(v, out)
        out += b"t"
    elif isinstance(x, list):
        out += b"]("
        for v in x:
            _emit(v, out)
        out += b"e"
    elif isinstance(x, dict):
        out += b"}("
        for k, v in x.items():
            _emit(k, out)
            _emit(v, out)
        out += b"u"
    else:
        raise TypeError(type(x))


_GLOBALS = sorted(SAFE_GLOBALS)
_SMALL_STRS = ["", "f8", "<f4", "latin1", "C", "F", "b", "<", "|", "O", "U3", "x" * 300, "\u20ac"]


def _random_value(rng: np.random.Generator, depth: int) -> Any:
    r = int(rng.integers(0, 12 if depth < 3 else 7))
    if r == 0:
        return None
    if r == 1:
        return int(rng.choice([0, 1, -1, 2, 3, 7, 8, 255, 1 << 31, -(1 << 40), 1 << 70]))
    if r == 2:
        return _SMALL_STRS[int(rng.integers(0, len(_SMALL_STRS)))]
    if r == 3:
        return bytes(rng.integers(0, 256, int(rng.choice([0, 1, 4, 8, 16, 300])), dtype=np.uint8))
    if r == 4:
        return float(rng.choice([0.0, 1.5, -np.inf, np.nan]))
    if r == 5:
        return bool(rng.integers(0, 2))
    if r == 6:
        return ()
    if r in (7, 8):
        return tuple(_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 6))))
    if r == 9:
        return [_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 5)))]
    if r == 10:
        return {_SMALL_STRS[int(rng.integers(0, 4))]: _random_value(rng, depth + 1)
                for _ in range(int(rng.integers(0, 3)))}
    return _random_call(rng, depth + 1)


def _random_call(rng: np.random.Generator, depth: int) -> _Call:
    glob = _GLOBALS[int(rng.integers(0, len(_GLOBALS)))]
    args = tuple(_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 5))))
    if rng.random() < 0.3:  # a list of pairs, what OrderedDict takes (and what it must refuse)
        args = ([_random_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))],)
    state = _random_value(rng, depth + 1) if rng.random() < 0.3 else None
    return _Call(glob, args, state)


def test_reduce_arguments_of_every_allowed_global(tmp_path) -> None:
    """``collections.OrderedDict([1])`` once raised a bare TypeError from the walker: every allowed
    global, called with random arguments (ints, strs, bytes, None, lists, tuples, dicts, other
    calls, nested), as a value and as the whole file, in a legacy ``.npy`` and a ``.pdparams``,
    must load or raise a one-line DumpFormatError naming the file."""
    from reprod.storage.framework_files import read_pdparams

    rng = np.random.default_rng([SEED, 7])
    npy, pdp = tmp_path / "call.npy", tmp_path / "call.pdparams"
    failures: list[str] = []
    tally: Counter[str] = Counter()
    cases = max(len(_GLOBALS) * 20, CASES // 3)
    for case in range(cases):
        call = _random_call(rng, 0) if case >= len(_GLOBALS) * 10 else \
            _Call(_GLOBALS[case % len(_GLOBALS)], tuple(_random_value(rng, 1) for _ in range(case % 4)))
        body = bytearray(b"\x80\x02")
        if case % 5 == 4:
            _emit(call, body)  # the call is the whole pickle
        else:
            _emit({"a": 1.5, "k": call, "z": [1, 2]}, body)
        body += b"."
        npy.write_bytes(_npy_object_header() + bytes(body))
        pdp.write_bytes(bytes(body))
        for path, read in ((npy, _load_all), (pdp, read_pdparams)):
            try:
                read(path)
                tally["read"] += 1
            except DumpFormatError as exc:
                tally["error"] += 1
                if not (str(exc).isprintable() and str(path) in str(exc)):
                    failures.append(f"case {case} {path.suffix}: not one line naming the file: {exc!r}")
            except Exception as exc:  # noqa: BLE001 - exactly what the test is looking for
                failures.append(f"case {case} {path.suffix} {call.glob} {bytes(body)[:120]!r}: "
                                f"{type(exc).__name__}: {exc}")
        if len(failures) >= MAX_FAILURES:
            break
    print(f"\nreduce arguments: {cases} cases: {dict(tally)}")
    assert not failures, "\n".join(failures)


def test_ordered_dict_of_a_non_pair_is_a_dump_error(tmp_path) -> None:
    """The 60-byte file of the report: ``{"k": collections.OrderedDict([1])}``."""
    from reprod.storage.framework_files import read_pdparams

    body = b"\x80\x02}X\x01\x00\x00\x00kccollections\nOrderedDict\n(]K\x01atRs."
    npy, pdp = _legacy_raw(tmp_path, body), tmp_path / "od.pdparams"
    pdp.write_bytes(body)
    _expect_error(npy, "OrderedDict")
    with pytest.raises(DumpFormatError, match="OrderedDict"):
        read_pdparams(pdp)


def _legacy_raw(tmp_path, pickle_bytes: bytes, name: str = "raw.npy") -> Any:
    p = tmp_path / name
    p.write_bytes(_npy_object_header() + pickle_bytes)
    return p
