"""The native format: an uncompressed zip of .npy members (plain ``numpy.load`` reads it), payloads
aligned to 64 bytes for mmap, a JSON metadata member, written member by member and renamed into
place only when complete. No pickle anywhere."""

from __future__ import annotations

import json
import os
import platform
import re
import struct
import sys
import time
import weakref
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..adapters import BFLOAT16, float32_to_bf16_bits
from ..errors import DumpFormatError, ReprodError
from ._atomic import AtomicFile
from .lazy import ArraySpec, Dump, MappedFile, _one_line
from .legacy import MAX_DEPTH

__all__ = ["NpzWriter", "read_npz", "write_npz", "META_NAME", "FORMAT_NAME", "FORMAT_VERSION"]

META_NAME = "__reprod__.json"
FORMAT_NAME = "reprod-npz"
FORMAT_VERSION = 1
_ALIGN = 64
_PAD_ID = 0xD935  # the extra-field id zipalign uses for padding
_ZIP64_LIMIT = (1 << 31) - 1
_SAFE_MEMBER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")


def _flatten(tree: Any, dtypes: Any, path: tuple[str, ...],
             out: list[tuple[tuple[str, ...], Optional[np.ndarray], Optional[str]]]) -> None:
    if isinstance(tree, Mapping):
        if not tree:
            out.append((path, None, None))
        for k, v in tree.items():
            sub = dtypes.get(k) if isinstance(dtypes, Mapping) else None
            _flatten(v, sub, path + (k,), out)
    else:
        out.append((path, np.asarray(tree), dtypes if isinstance(dtypes, str) else None))


def _writer_info() -> dict[str, Any]:
    info: dict[str, Any] = {"reprod": _version(), "numpy": np.__version__, "python": platform.python_version()}
    for mod in ("torch", "paddle"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def _version() -> str:
    from .. import __version__

    return __version__


class NpzWriter:
    """Write a native dump member by member; the file appears at ``path`` on ``close()``.

    Memory stays bounded by the largest single array: each ``add`` goes straight to a temporary
    file beside ``path``, renamed into place by ``close()``. Until then any earlier file at
    ``path`` stays as it was: a process killed mid-run leaves that earlier dump (or no file), never
    a partial one, plus its temporary file, which the next save to ``path`` removes once stale.
    An error while writing (a full disk) aborts the writer: the temporary file is removed and
    later ``add``/``close`` calls raise.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._af = AtomicFile(path)
        self._zf = zipfile.ZipFile(self._af.file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        # top-level key -> its metadata entries; dict order is the order keys were first added
        self._entries: dict[str, list[dict[str, Any]]] = {}
        self._names: set[str] = {META_NAME}
        self._closed = False
        self._aborted: Optional[str] = None
        self._counter = 0
        # a writer dropped or left open at exit gives its temporary file back (in this process
        # only: a forked child exiting must not remove its parent's file)
        self._finalizer = weakref.finalize(self, _abandon, self._zf, self._af, path, os.getpid())

    def _check_open(self) -> None:
        if self._aborted is not None:
            raise ReprodError(f"{self.path}: this dump was abandoned ({self._aborted}); nothing was "
                              "written")
        if self._closed:
            raise ReprodError(f"{self.path}: this dump is already closed")

    def add(self, key: str, tree: Any, dtypes: Any = None) -> None:
        self._check_open()
        leaves: list[tuple[tuple[str, ...], Optional[np.ndarray], Optional[str]]] = []
        _flatten(tree, dtypes, (key,), leaves)
        # a re-added key replaces the old value and keeps its place (reprod_log's dict semantics)
        entries = self._entries[key] = []
        try:
            for path, arr, src in leaves:
                if arr is None:  # an empty nested dict: an entry with no member
                    entries.append({"path": list(path), "kind": "dict"})
                else:
                    entries.append(self._write_member(path, arr, src))
        except BaseException as exc:
            # a member half written leaves the zip unusable: give up cleanly rather than later
            self._abort(exc)
            raise

    def _member_name(self, path: tuple[str, ...]) -> str:
        display = "/".join(path)
        # keys that make clean zip paths keep their name, so plain numpy.load shows them; the rest
        # (and anything that looks like our own fallback names) get a numbered name
        if _SAFE_MEMBER.match(display) and len(path) == display.count("/") + 1 \
                and not display.startswith("__reprod") and display + ".npy" not in self._names:
            name = display + ".npy"
        else:
            name = f"__reprod_{self._counter}.npy"
            while name in self._names:
                self._counter += 1
                name = f"__reprod_{self._counter}.npy"
        self._counter += 1
        self._names.add(name)
        return name

    def _write_member(self, path: tuple[str, ...], arr: np.ndarray, src: Optional[str]) -> dict[str, Any]:
        if src == BFLOAT16:
            arr = float32_to_bf16_bits(arr)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        name = self._member_name(path)
        header = _npy_header(arr)
        size = len(header) + arr.nbytes
        zip64 = size > _ZIP64_LIMIT
        offset = self._af.file.tell()
        fixed = 30 + len(name.encode("utf-8")) + 4 + (20 if zip64 else 0)
        pad = (-(offset + fixed)) % _ALIGN
        zi = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
        zi.compress_type = zipfile.ZIP_STORED
        zi.extra = struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
        zi.file_size = size
        with self._zf.open(zi, "w", force_zip64=zip64) as f:
            f.write(header)
            if arr.nbytes:
                f.write(memoryview(arr.reshape(-1)).cast("B"))
        entry: dict[str, Any] = {"path": list(path), "member": name}
        if src is not None:
            entry["dtype"] = src
        return entry

    def close(self) -> str:
        if self._closed and self._aborted is None:
            return self.path
        self._check_open()
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "keys": [e for entries in self._entries.values() for e in entries],
            "writer": _writer_info(),
        }
        try:
            self._zf.writestr(META_NAME, _meta_bytes(meta))
            self._zf.close()
            self._af.commit()
        except BaseException as exc:
            self._abort(exc)
            raise
        self._closed = True
        self._finalizer.detach()
        return self.path

    def _abort(self, exc: BaseException) -> None:
        self.abort()
        self._aborted = f"{type(exc).__name__}: {_one_line(exc)}"

    def abort(self) -> None:
        """Give the dump up: the temporary file goes, any earlier file at ``path`` stays."""
        if self._closed:
            return
        self._closed = True
        self._aborted = self._aborted or "aborted"
        self._finalizer.detach()
        try:
            self._zf.close()
        except Exception:
            pass
        self._af.abort()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _abandon(zf: zipfile.ZipFile, af: AtomicFile, path: str, pid: int) -> None:
    if os.getpid() != pid:
        return
    try:
        zf.close()
    except Exception:
        pass
    af.abort()
    sys.stderr.write(f"reprod: the dump streamed to {path} was never closed, so nothing was written "
                     "(call close() or save(), or use the logger in a with block)\n")


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    text = json.dumps(meta, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a key with a lone surrogate: JSON's \u escapes carry it
        return json.dumps(meta, ensure_ascii=True).encode("ascii")


def _npy_header(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def write_npz(path: str, tree: Mapping[str, Any], source_dtypes: Optional[Mapping[str, Any]] = None) -> str:
    w = NpzWriter(path)
    try:
        for k, v in tree.items():
            w.add(k, v, (source_dtypes or {}).get(k))
    except BaseException:
        w.abort()
        raise
    return w.close()


# Deflate cannot shrink data by more than about 1032:1; a member claiming more is lying about its size.
_MAX_DEFLATE_RATIO = 1032
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
               NotImplementedError, RuntimeError, OverflowError, zlib.error)


def _where(mf: MappedFile, zi: zipfile.ZipInfo) -> str:
    # formatted only for a message: on 5,000 members it costs as much as the checks
    return f"{mf.path}: member {zi.filename!r}"


def _data_start(mf: MappedFile, zi: zipfile.ZipInfo) -> int:
    """Offset of a member's data, after checking its local header against the central directory."""
    buf = mf.buffer()
    off = zi.header_offset
    if off < 0 or off + 30 > mf.size or bytes(buf[off : off + 4]) != b"PK\x03\x04":
        raise DumpFormatError(f"{_where(mf, zi)}: bad local header (offset {off} in a file of "
                              f"{mf.size} bytes)")
    if zi.flag_bits & 0x1:
        raise DumpFormatError(f"{_where(mf, zi)}: encrypted members are not supported")
    n, e = struct.unpack_from("<HH", buf, off + 26)
    start = off + 30 + n + e
    raw_name = bytes(buf[off + 30 : off + 30 + n])
    if raw_name != zi.orig_filename.encode("utf-8" if zi.flag_bits & 0x800 else "cp437", "replace"):
        raise DumpFormatError(f"{_where(mf, zi)}: local header names {raw_name[:80]!r}; "
                              "the zip is corrupt")
    stored_size = zi.file_size if zi.compress_type == zipfile.ZIP_STORED else zi.compress_size
    if zi.compress_type == zipfile.ZIP_STORED and zi.compress_size != zi.file_size:
        raise DumpFormatError(f"{_where(mf, zi)}: stored member with two different sizes "
                              f"({zi.compress_size} and {zi.file_size}); the zip is corrupt")
    if start + stored_size > mf.size:
        raise DumpFormatError(f"{_where(mf, zi)}: truncated (claims {stored_size} bytes at offset "
                              f"{start}, file has {mf.size})")
    return start


def _check_directory(mf: MappedFile, infos: list[zipfile.ZipInfo]) -> dict[int, int]:
    """The central directory lists every member the end record counts, each with a local header
    that agrees with it: a damaged directory cannot silently drop or rename members. Returns each
    member's data offset by ``id(zipinfo)``, so that it is not worked out twice."""
    claimed = _entries_claimed(mf)
    if claimed is not None and claimed != len(infos):
        raise DumpFormatError(f"{mf.path}: the zip directory lists {len(infos)} members but its end "
                              f"record counts {claimed}; the zip is corrupt")
    return {id(zi): _data_start(mf, zi) for zi in infos}


def _entries_claimed(mf: MappedFile) -> Optional[int]:
    """The member count in the end-of-central-directory record zipfile used (zip64 aware)."""
    buf = mf.buffer()
    tail_start = max(0, mf.size - (1 << 16) - 22)
    eocd = buf.rfind(b"PK\x05\x06", tail_start)
    if mf.size >= 22 and bytes(buf[mf.size - 22 : mf.size - 18]) == b"PK\x05\x06":
        eocd = mf.size - 22  # zipfile's first guess: no archive comment
    if eocd < 0 or eocd + 22 > mf.size:
        return None
    total = struct.unpack_from("<H", buf, eocd + 10)[0]
    loc = eocd - 20
    if total == 0xFFFF and loc >= 0 and bytes(buf[loc : loc + 4]) == b"PK\x06\x07":
        rec = struct.unpack_from("<Q", buf, loc + 8)[0]
        if rec + 56 <= mf.size and bytes(buf[rec : rec + 4]) == b"PK\x06\x06":
            return int(struct.unpack_from("<Q", buf, rec + 32)[0])
    return int(total)


def _member_spec(mf: MappedFile, zf: zipfile.ZipFile, zi: zipfile.ZipInfo, src: Optional[str],
                 start: Optional[int] = None) -> ArraySpec:
    from .legacy import parse_npy_header

    where = f"{mf.path}: member {zi.filename!r}"
    if start is None:
        start = _data_start(mf, zi)
    if zi.compress_type == zipfile.ZIP_STORED:
        dt, shape, fortran, data_off = parse_npy_header(mf.buffer(), start, start + zi.file_size, where)
        _check_numeric(dt, src, where)
        spec = ArraySpec(dtype=dt, shape=shape, offset=data_off, fortran=fortran, source_dtype=src,
                         check=(start, zi.file_size, zi.CRC))
        if data_off + spec.nbytes != start + zi.file_size:
            raise DumpFormatError(f"{where}: header claims {spec.nbytes} bytes of data, member has "
                                  f"{start + zi.file_size - data_off}")
        return spec
    # a compressed member (plain np.savez_compressed): decompress on access, after bounding the
    # claimed size by what the compressed bytes in the file could possibly expand to
    if zi.file_size > _MAX_DEFLATE_RATIO * zi.compress_size + 1024:
        raise DumpFormatError(f"{where}: claims {zi.file_size} bytes from {zi.compress_size} "
                              "compressed ones; the zip is corrupt")
    with zf.open(zi) as f:
        head = f.read(1 << 16)
    dt, shape, fortran, data_off = parse_npy_header(head, 0, len(head), where)
    _check_numeric(dt, src, where)
    probe = ArraySpec(dtype=dt, shape=shape, fortran=fortran)
    if data_off + probe.nbytes != zi.file_size:
        raise DumpFormatError(f"{where}: header claims {probe.nbytes} bytes of data, member has "
                              f"{zi.file_size - data_off}")

    def load() -> np.ndarray:
        try:
            # through the same mapping, not the path: the file may have been replaced since
            with zipfile.ZipFile(_MmapReader(mf.buffer())) as z2, z2.open(zi) as f2:
                f2.read(data_off)
                raw = f2.read(probe.nbytes)
                f2.read(1)  # reach the end, where zipfile checks the CRC
        except _ZIP_ERRORS as exc:
            raise DumpFormatError(f"{where}: cannot decompress ({_one_line(exc)})") from None
        if len(raw) != probe.nbytes:
            raise DumpFormatError(f"{where}: truncated")
        return np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")

    return ArraySpec(dtype=dt, shape=shape, fortran=fortran, source_dtype=src, loader=load)


def _check_numeric(dt: np.dtype, src: Optional[str], where: str) -> None:
    if dt.kind not in "biufc":
        raise DumpFormatError(f"{where}: dtype {dt} is not numeric data")
    if src == BFLOAT16 and dt != np.dtype(np.uint16):
        raise DumpFormatError(f"{where}: bfloat16 values must be stored as uint16 bits, not {dt}")


def _parse_meta(raw: bytes, path: str) -> tuple[dict[str, Any], list[tuple[list[str], Optional[str], Optional[str]]]]:
    """The metadata member, checked field by field: it comes from the file, so nothing is trusted."""
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise DumpFormatError(f"{path}: corrupt metadata member ({_one_line(exc)})") from None

    def bad(what: str) -> DumpFormatError:
        return DumpFormatError(f"{path}: corrupt metadata member ({what})")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise bad("wrong format name")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad(f"version {str(version)[:40]!r} is not an integer")
    if version > FORMAT_VERSION:
        raise DumpFormatError(f"{path}: written by a newer reprod (format version {version})")
    keys = meta.get("keys")
    if not isinstance(keys, list):
        raise bad("no key list")
    entries: list[tuple[list[str], Optional[str], Optional[str]]] = []
    for e in keys:
        if not isinstance(e, dict):
            raise bad("bad key entry")
        p, src = e.get("path"), e.get("dtype")
        m = None if e.get("kind") == "dict" else e.get("member")
        if not (isinstance(p, list) and p and all(isinstance(s, str) for s in p)):
            raise bad("bad key path")
        if m is None and e.get("kind") != "dict" or m is not None and not isinstance(m, str):
            raise bad(f"key {'/'.join(p)[:80]!r}: bad member name")
        if src is not None and not (isinstance(src, str) and 0 < len(src) <= 64 and src.isprintable()):
            raise bad(f"key {'/'.join(p)[:80]!r}: bad source dtype")
        if len(p) > MAX_DEPTH:
            raise bad(f"key nested more than {MAX_DEPTH} levels deep")
        entries.append((p, m, src))
    return meta, entries


def read_npz(mf: MappedFile, *, verify: Optional[bool] = None) -> Dump:
    import io

    buf = mf.buffer()
    try:
        zf = zipfile.ZipFile(io.BytesIO(buf) if mf.size < (1 << 16) else _MmapReader(buf))
        infos = zf.infolist()
    except _ZIP_ERRORS as exc:
        raise DumpFormatError(f"{mf.path}: not a valid zip dump ({_one_line(exc)})") from None
    starts = _check_directory(mf, infos)
    by_name = {zi.filename: zi for zi in infos}
    meta: dict[str, Any] = {}
    entries: list[tuple[list[str], Optional[str], Optional[str]]] = []
    if META_NAME in by_name:
        zi = by_name[META_NAME]
        if zi.file_size > 64 << 20:
            raise DumpFormatError(f"{mf.path}: metadata member too large")
        try:
            raw = zf.read(zi)  # zipfile checks the CRC of what it reads
        except _ZIP_ERRORS as exc:
            raise DumpFormatError(f"{mf.path}: corrupt metadata member ({_one_line(exc)})") from None
        meta, entries = _parse_meta(raw, mf.path)
    else:
        for zi in infos:
            if zi.filename.startswith("__reprod"):
                # reprod's own member names: this is a reprod dump that lost its metadata
                raise DumpFormatError(f"{mf.path}: the metadata member is missing; the dump is corrupt")
            if zi.filename.endswith(".npy"):
                entries.append(([zi.filename[:-4]], zi.filename, None))
        if not entries:
            raise DumpFormatError(f"{mf.path}: zip holds no .npy arrays, not a dump")
    tree: dict[str, Any] = {}
    for path, member, src in entries:
        spec: Any
        if member is None:
            spec = {}
        else:
            zi = by_name.get(member)
            if zi is None:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: member {member!r} is missing")
            try:
                spec = _member_spec(mf, zf, zi, src, starts.get(id(zi)))
            except DumpFormatError:
                raise
            except _ZIP_ERRORS as exc:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: unreadable ({_one_line(exc)})") from None
        node = tree
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r} clashes with an array")
            node = nxt
        if path[-1] in node:
            raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r} appears twice")
        node[path[-1]] = spec
    return Dump(tree, mf, path=mf.path, fmt="npz", meta=meta, verify=verify)


class _MmapReader:
    """A seekable file over an mmap, so zipfile reads the central directory without copying."""

    def __init__(self, buf: Any) -> None:
        self._buf = buf
        self._pos = 0
        self._size = len(buf)

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = bytes(self._buf[self._pos : end])
        self._pos = end
        return out

    def seekable(self) -> bool:
        return True


