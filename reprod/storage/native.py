"""The native format: an uncompressed zip of .npy members (plain ``numpy.load`` reads it), payloads
aligned to 64 bytes for mmap, a JSON metadata member, written member by member and renamed into
place only when complete. No pickle anywhere."""

from __future__ import annotations

import json
import platform
import re
import struct
import sys
import time
import zipfile
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..adapters import BFLOAT16, float32_to_bf16_bits
from ..errors import DumpFormatError
from ._atomic import AtomicFile
from .lazy import ArraySpec, Dump, MappedFile
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

    Memory stays bounded by the largest single array: each ``add`` goes straight to disk.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._af = AtomicFile(path)
        self._zf = zipfile.ZipFile(self._af.file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._entries: dict[tuple[str, ...], dict[str, Any]] = {}
        self._names: set[str] = {META_NAME}
        self._closed = False
        self._counter = 0
        self._order: dict[str, int] = {}

    def add(self, key: str, tree: Any, dtypes: Any = None) -> None:
        leaves: list[tuple[tuple[str, ...], Optional[np.ndarray], Optional[str]]] = []
        _flatten(tree, dtypes, (key,), leaves)
        # a re-added key replaces the old value and keeps its place (reprod_log's dict semantics)
        if key not in self._order:
            self._order[key] = len(self._order)
        for p in [p for p in self._entries if p[0] == key]:
            del self._entries[p]
        for path, arr, src in leaves:
            if arr is None:  # an empty nested dict: an entry with no member
                self._entries[path] = {"path": list(path), "kind": "dict"}
            else:
                self._write_member(path, arr, src)

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

    def _write_member(self, path: tuple[str, ...], arr: np.ndarray, src: Optional[str]) -> None:
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
        self._entries[path] = entry

    def close(self) -> str:
        if self._closed:
            return self.path
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "keys": [e for _, e in sorted(self._entries.items(), key=lambda kv: self._order[kv[0][0]])],
            "writer": _writer_info(),
        }
        try:
            self._zf.writestr(META_NAME, json.dumps(meta, ensure_ascii=False))
            self._zf.close()
            self._af.commit()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
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


def _data_start(mf: MappedFile, zi: zipfile.ZipInfo) -> int:
    buf = mf.buffer()
    off = zi.header_offset
    if off < 0 or off + 30 > mf.size or bytes(buf[off : off + 4]) != b"PK\x03\x04":
        raise DumpFormatError(f"{mf.path}: member {zi.filename!r}: bad local header")
    n, e = struct.unpack_from("<HH", buf, off + 26)
    start = off + 30 + n + e
    if start + zi.file_size > mf.size:
        raise DumpFormatError(f"{mf.path}: member {zi.filename!r}: truncated (claims {zi.file_size} bytes)")
    return start


def _member_spec(mf: MappedFile, zf: zipfile.ZipFile, zi: zipfile.ZipInfo, src: Optional[str]) -> ArraySpec:
    from .legacy import parse_npy_header

    where = f"{mf.path}: member {zi.filename!r}"
    if zi.compress_type == zipfile.ZIP_STORED:
        start = _data_start(mf, zi)
        dt, shape, fortran, data_off = parse_npy_header(mf.buffer(), start, start + zi.file_size, where)
        if dt.kind not in "biufc":
            raise DumpFormatError(f"{where}: dtype {dt} is not numeric data")
        spec = ArraySpec(dtype=dt, shape=shape, offset=data_off, fortran=fortran, source_dtype=src)
        if data_off + spec.nbytes != start + zi.file_size:
            raise DumpFormatError(f"{where}: header claims {spec.nbytes} bytes of data, member has "
                                  f"{start + zi.file_size - data_off}")
        return spec
    # a compressed member (plain np.savez_compressed): decompress on access
    with zf.open(zi) as f:
        head = f.read(1 << 16)
    dt, shape, fortran, data_off = parse_npy_header(head, 0, len(head), where)
    if dt.kind not in "biufc":
        raise DumpFormatError(f"{where}: dtype {dt} is not numeric data")
    probe = ArraySpec(dtype=dt, shape=shape, fortran=fortran)
    if data_off + probe.nbytes != zi.file_size:
        raise DumpFormatError(f"{where}: header claims {probe.nbytes} bytes of data")

    def load() -> np.ndarray:
        try:
            with zipfile.ZipFile(mf.path) as z2, z2.open(zi.filename) as f2:
                f2.read(data_off)
                raw = f2.read(probe.nbytes)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise DumpFormatError(f"{where}: cannot decompress ({exc})") from None
        if len(raw) != probe.nbytes:
            raise DumpFormatError(f"{where}: truncated")
        return np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C")

    return ArraySpec(dtype=dt, shape=shape, fortran=fortran, source_dtype=src, loader=load)


def read_npz(mf: MappedFile) -> Dump:
    import io

    buf = mf.buffer()
    try:
        zf = zipfile.ZipFile(io.BytesIO(buf) if mf.size < (1 << 16) else _MmapReader(buf))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
            NotImplementedError) as exc:
        raise DumpFormatError(f"{mf.path}: not a valid zip dump ({exc})") from None
    by_name = {zi.filename: zi for zi in infos}
    meta: dict[str, Any] = {}
    entries: list[tuple[list[str], Optional[str], Optional[str]]] = []
    if META_NAME in by_name:
        zi = by_name[META_NAME]
        if zi.file_size > 64 << 20:
            raise DumpFormatError(f"{mf.path}: metadata member too large")
        try:
            meta = json.loads(zf.read(zi).decode("utf-8"))
            if meta.get("format") != FORMAT_NAME:
                raise ValueError("wrong format name")
            if int(meta.get("version", 0)) > FORMAT_VERSION:
                raise DumpFormatError(f"{mf.path}: written by a newer reprod (format version {meta['version']})")
            for e in meta["keys"]:
                p = e["path"]
                m = None if e.get("kind") == "dict" else e["member"]
                if not (isinstance(p, list) and p and all(isinstance(s, str) for s in p)
                        and (m is None or isinstance(m, str))):
                    raise ValueError("bad key entry")
                if len(p) > MAX_DEPTH:
                    raise ValueError(f"key nested more than {MAX_DEPTH} levels deep")
                entries.append((p, m, e.get("dtype")))
        except DumpFormatError:
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DumpFormatError(f"{mf.path}: corrupt metadata member ({exc})") from None
    else:
        for zi in infos:
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
                spec = _member_spec(mf, zf, zi, src)
            except (zipfile.BadZipFile, OSError, EOFError, struct.error, NotImplementedError,
                    RuntimeError) as exc:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: unreadable ({exc})") from None
        node = tree
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r} clashes with an array")
            node = nxt
        if isinstance(node.get(path[-1]), dict):
            raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r} clashes with a nested key")
        node[path[-1]] = spec
    return Dump(tree, mf, path=mf.path, fmt="npz", meta=meta)


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


