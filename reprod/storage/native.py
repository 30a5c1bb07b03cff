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
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np

from ..adapters import BFLOAT16, float32_to_bf16_bits
from ..errors import DumpFormatError, ReprodError
from ._atomic import AtomicFile
from .lazy import ArraySpec, Dump, MappedFile, _one_line, crc32
from .legacy import MAX_DEPTH, parse_npy_header

if TYPE_CHECKING:  # zipfile costs ~5 ms to import; the common paths do not need it
    import zipfile

__all__ = ["NpzWriter", "read_npz", "write_npz", "META_NAME", "FORMAT_NAME", "FORMAT_VERSION"]

META_NAME = "__reprod__.json"
FORMAT_NAME = "reprod-npz"
FORMAT_VERSION = 1
_ALIGN = 64
_PAD_ID = 0xD935  # the extra-field id zipalign uses for padding
_ZIP64_LIMIT = (1 << 31) - 1
_STORED = 0  # zipfile.ZIP_STORED
_ZIP_FILECOUNT_LIMIT = 0xFFFF  # more members than this need the zip64 end record
# the values zipfile writes: versions needed 2.0 (4.5 with zip64), made on Unix, mode 0600
_DEFAULT_VERSION = 20
_ZIP64_VERSION = 45
_CREATE_SYSTEM = 0 if sys.platform == "win32" else 3
_EXTERNAL_ATTR = 0o600 << 16
_PAD_FIELD = struct.Struct("<HH")
_ZIP64_SIZES = struct.Struct("<HHQQ")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zipfile's structFileHeader (version as one H)
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")  # zipfile's structCentralDir
_ONE_WRITE = 1 << 16  # members below this go to the file in one write with their headers
# json.dumps(str, ensure_ascii=False) without the json.dumps call around it
_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]
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
        self._file = self._af.file
        self._pos = 0  # where the next local header goes
        # The state kept per key is what bounds a streaming logger's memory (the arrays go to
        # disk at once): the central directory in a bytearray, moved to a temporary file every
        # few MiB, and the keys' metadata in a _KeyLog (in memory up to _KeyLog.spill keys, then
        # on disk), so that a stream of any length holds a bounded amount of memory.
        self._central = bytearray()
        self._central_file: Any = None
        self._central_spilled = 0
        self._members = 0
        self._keys = _KeyLog(os.path.dirname(os.path.abspath(path)))
        self._closed = False
        self._aborted: Optional[str] = None
        self._counter = 0
        # a writer dropped or left open at exit gives its temporary file back (in this process
        # only: a forked child exiting must not remove its parent's file)
        self._finalizer = weakref.finalize(self, _abandon, self._af, path, os.getpid())

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
        entries: list[str] = []
        try:
            # a re-added key's members are written again beside the old ones: numbered names
            again = self._keys.seen(key)
            for path, arr, src in leaves:
                if arr is None:  # an empty nested dict: an entry with no member
                    entries.append(json.dumps({"path": list(path), "kind": "dict"}, ensure_ascii=False))
                else:
                    entries.append(self._write_member(path, arr, src, again))
            # a re-added key replaces the old value and keeps its place (reprod_log's dict semantics)
            self._keys.put(key, ", ".join(entries))
        except BaseException as exc:
            # a member half written leaves the zip unusable: give up cleanly rather than later
            self._abort(exc)
            raise

    def _member_name(self, path: tuple[str, ...], again: bool) -> str:
        """Keys that make clean zip paths keep their name, so plain numpy.load shows them; the
        rest get a numbered name. Names cannot clash: a clean name is its key's path, and a path
        element holding "/" or starting with "__reprod" is not clean; a re-added key (``again``),
        whose first members keep their names, is numbered."""
        display = "/".join(path)
        self._counter += 1
        if not again and _SAFE_MEMBER.match(display) and len(path) == display.count("/") + 1 \
                and not display.startswith("__reprod"):
            return display + ".npy"
        return f"__reprod_{self._counter - 1}.npy"

    def _write_member(self, path: tuple[str, ...], arr: np.ndarray, src: Optional[str],
                      again: bool = False) -> str:
        if src == BFLOAT16:
            arr = float32_to_bf16_bits(arr)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        name = self._member_name(path, again)
        header = _npy_header(arr)
        data = memoryview(arr.reshape(-1)).cast("B") if arr.nbytes else b""
        self._write_stored(name, header, data, align=True)
        # the metadata entry as json.dumps({"path": [...], "member": name[, "dtype": src]}) writes
        # it, by its C string encoder (json.dumps costs ~5 us an entry)
        text = '{"path": [' + ", ".join(map(_json_str, path)) + '], "member": ' + _json_str(name)
        return text + (', "dtype": ' + _json_str(src) + "}" if src is not None else "}")

    def _write_stored(self, name: str, header: bytes, data: Any, *, align: bool,
                      chunks: Optional[Callable[[], Iterator[bytes]]] = None) -> None:
        """One stored member: local header, ``header + data``, and its central directory entry.

        The CRC is computed before anything is written, so the file is written front to back
        once (zipfile writes the local header, the data, then seeks back to rewrite the header:
        ~40 us a member). The layout is zipfile's: zip64 extra fields and end records where sizes
        or offsets pass ``_ZIP64_LIMIT``, the padding field that aligns the data to 64 bytes."""
        raw_name = name.encode("ascii")  # _member_name and META_NAME make ASCII names only
        if chunks is None:
            size = len(header) + len(data)
            crc = crc32(data, crc32(header))
        else:  # content made twice by ``chunks``: size and CRC first, then the bytes
            size = crc = 0
            for chunk in chunks():
                size += len(chunk)
                crc = crc32(chunk, crc)
        offset = self._pos
        zip64 = size > _ZIP64_LIMIT
        extra = b""
        if align:
            pad = (-(offset + 30 + len(raw_name) + 4 + (20 if zip64 else 0))) % _ALIGN
            extra = _PAD_FIELD.pack(_PAD_ID, pad) + b"\0" * pad
        version = _ZIP64_VERSION if zip64 else _DEFAULT_VERSION
        dos_time, dos_date = _dos_now()
        if zip64:
            local_extra = extra + _ZIP64_SIZES.pack(1, 16, size, size)
            fields = (0xFFFFFFFF, 0xFFFFFFFF)
        else:
            local_extra, fields = extra, (size, size)
        f = self._file
        head = _LOCAL_HEADER.pack(b"PK\x03\x04", version, 0, _STORED, dos_time, dos_date, crc,
                                  *fields, len(raw_name), len(local_extra))
        if chunks is not None:
            f.write(b"".join((head, raw_name, local_extra)))
            for chunk in chunks():
                f.write(chunk)
        elif len(data) < _ONE_WRITE:  # small members (most of a many-key dump): one write call
            f.write(b"".join((head, raw_name, local_extra, header, data)))
        else:
            f.write(b"".join((head, raw_name, local_extra, header)))
            f.write(data)
        self._pos = offset + 30 + len(raw_name) + len(local_extra) + size
        # the central entry: zip64 values (sizes, then offset) go in a leading extra field, as
        # zipfile writes them
        big = []
        csize = usize = size
        hoff = offset
        if size > _ZIP64_LIMIT:
            big += [size, size]
            csize = usize = 0xFFFFFFFF
        if offset > _ZIP64_LIMIT:
            big.append(offset)
            hoff = 0xFFFFFFFF
        if big:
            extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) + extra
            version = _ZIP64_VERSION
        self._central += _CENTRAL_HEADER.pack(
            b"PK\x01\x02", version, _CREATE_SYSTEM, version, 0, 0, _STORED, dos_time, dos_date,
            crc, csize, usize, len(raw_name), len(extra), 0, 0, 0, _EXTERNAL_ATTR, hoff)
        self._central += raw_name
        self._central += extra
        self._members += 1
        if len(self._central) >= _CENTRAL_SPILL:
            if self._central_file is None:
                self._central_file = _side_file(os.path.dirname(os.path.abspath(self.path)))
            self._central_file.write(self._central)
            self._central_spilled += len(self._central)
            self._central = bytearray()

    def _write_directory(self) -> None:
        """The central directory and the end records (zip64 ones where counts or offsets need)."""
        f = self._file
        start = self._pos
        if self._central_file is not None:  # the entries moved out of memory, in order
            self._central_file.seek(0)
            while True:
                chunk = self._central_file.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
        f.write(self._central)
        count, size = self._members, self._central_spilled + len(self._central)
        end = start + size
        if count >= _ZIP_FILECOUNT_LIMIT or start > _ZIP64_LIMIT or size > _ZIP64_LIMIT:
            f.write(_EOCD64.pack(b"PK\x06\x06", 44, _ZIP64_VERSION, _ZIP64_VERSION, 0, 0, count,
                                 count, size, start))
            f.write(_LOCATOR64.pack(b"PK\x06\x07", 0, end, 1))
            count, size, start = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
        f.write(_EOCD.pack(b"PK\x05\x06", 0, 0, count, count, size, start, 0))

    def close(self) -> str:
        if self._closed and self._aborted is None:
            return self.path
        self._check_open()
        try:
            self._write_stored(META_NAME, b"", b"", align=False, chunks=self._meta_chunks())
            self._write_directory()
            self._af.commit()
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            self._release()
        self._closed = True
        self._finalizer.detach()
        return self.path

    def _meta_chunks(self) -> Callable[[], Iterator[bytes]]:
        """The metadata member, ``json.dumps`` of {format, version, keys, writer} (UTF-8, or
        ASCII escapes where a key holds a lone surrogate), as chunks assembled from the keys'
        JSON texts: read twice (size and CRC first), never held whole."""
        head = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION})[:-1] + ', "keys": ['
        tail = '], "writer": ' + json.dumps(_writer_info(), ensure_ascii=False) + "}"
        ascii_only = False
        for text in self._keys.texts():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a key with a lone surrogate: JSON's \u escapes carry it
                ascii_only = True
                break

        def chunks() -> Iterator[bytes]:
            yield head.encode("ascii")
            batch: list[str] = []
            first = True
            for text in self._keys.texts():
                if not text:
                    continue
                if ascii_only:
                    text = json.dumps(json.loads("[" + text + "]"), ensure_ascii=True)[1:-1]
                batch.append(text if first else ", " + text)
                first = False
                if len(batch) >= 4096:
                    yield "".join(batch).encode("utf-8")
                    batch = []
            yield ("".join(batch) + tail).encode("ascii" if ascii_only else "utf-8")

        return chunks

    def _release(self) -> None:
        if self._central_file is not None:
            self._central_file.close()
            self._central_file = None
        self._keys.close()

    def keys(self) -> list[str]:
        """The top-level keys added so far, in the order they were first added."""
        return self._keys.keys()

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
        self._af.abort()
        self._release()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_CENTRAL_SPILL = 4 << 20  # bytes of central directory kept in memory before moving them out


def _side_file(folder: str) -> Any:
    """An anonymous temporary file beside the dump (gone with the process, however it ends)."""
    import tempfile

    return tempfile.TemporaryFile(dir=folder)


class _KeyLog:
    """A writer's top-level keys and their metadata texts, in first-added order, a re-added key's
    last text in its first place. The first ``spill`` keys stay in a dict; later keys go to an
    anonymous SQLite database on disk (key -> position) and their texts to a temporary file, so
    a stream of any length holds a bounded amount of memory (a key re-added after the spill
    keeps its latest text in memory: streams re-log a few keys, not all of them)."""

    spill = 20_000

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.mem: dict[str, str] = {}
        self.db: Any = None
        self.texts_file: Any = None
        self.spilled = 0
        self.replaced: dict[int, str] = {}
        self.no_db = False

    def seen(self, key: str) -> bool:
        if key in self.mem:
            return True
        return self.db is not None and self._position(key) is not None

    def _position(self, key: str) -> Optional[int]:
        row = self.db.execute("SELECT pos FROM k WHERE key = ?", (_db_key(key),)).fetchone()
        return None if row is None else int(row[0])

    def put(self, key: str, text: str) -> None:
        if key in self.mem or (self.db is None and (len(self.mem) < self.spill or self.no_db)):
            self.mem[key] = text
            return
        if self.db is None:
            try:
                import sqlite3
            except ImportError:  # a Python built without it: the keys stay in memory
                self.no_db = True
                self.mem[key] = text
                return
            # a private database in a temporary file; the logger may be used from any one thread
            self.db = sqlite3.connect("", check_same_thread=False)
            self.db.execute("CREATE TABLE k (key BLOB PRIMARY KEY, pos INTEGER)")
            self.texts_file = _side_file(self.folder)
        pos = self._position(key)
        if pos is not None:
            self.replaced[pos] = text
            return
        self.db.execute("INSERT INTO k VALUES (?, ?)", (_db_key(key), self.spilled))
        raw = text.encode("utf-8", "surrogatepass")
        self.texts_file.write(_TEXT_RECORD.pack(len(raw)) + raw)
        self.spilled += 1

    def texts(self) -> Iterator[str]:
        yield from self.mem.values()
        if self.texts_file is not None:
            self.texts_file.flush()
            self.texts_file.seek(0)
            for pos in range(self.spilled):
                (n,) = _TEXT_RECORD.unpack(self.texts_file.read(_TEXT_RECORD.size))
                text = self.texts_file.read(n).decode("utf-8", "surrogatepass")
                yield self.replaced.get(pos, text)
            self.texts_file.seek(0, 2)

    def keys(self) -> list[str]:
        out = list(self.mem)
        if self.db is not None:
            out += [k.decode("utf-8", "surrogatepass") for (k,) in
                    self.db.execute("SELECT key FROM k ORDER BY pos")]
        return out

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.texts_file is not None:
            self.texts_file.close()
            self.texts_file = None


_TEXT_RECORD = struct.Struct("<I")


def _db_key(key: str) -> bytes:
    # keys may hold lone surrogates (file names decoded with surrogateescape): stored as bytes
    return key.encode("utf-8", "surrogatepass")


def _abandon(af: AtomicFile, path: str, pid: int) -> None:
    if os.getpid() != pid:
        return
    af.abort()
    sys.stderr.write(f"reprod: the dump streamed to {path} was never closed, so nothing was written "
                     "(call close() or save(), or use the logger in a with block)\n")


_DOS_TIME: list[Any] = [None, (0, 0)]  # (second, (dos time, dos date)) of the last member


def _dos_now() -> tuple[int, int]:
    """The member timestamp zipfile would write (local time, 2-second steps), once a second."""
    now = int(time.time())
    if _DOS_TIME[0] != now:
        y, mo, d, h, mi, sec = time.localtime(now)[:6]
        _DOS_TIME[:] = [now, (h << 11 | mi << 5 | sec // 2, max(y - 1980, 0) << 9 | mo << 5 | d)]
    return _DOS_TIME[1]


def _npy_header(arr: np.ndarray) -> bytes:
    dt = arr.dtype
    # numpy's header is a function of dtype, shape and order (always C here); writing it costs
    # ~4 us, cached for plain dtypes, where ``dtype.str`` is the header's descr
    key = (dt.str, arr.shape) if dt.names is None and dt.subdtype is None and dt.metadata is None \
        else None
    header = _WRITTEN_HEADERS.get(key) if key is not None else None
    if header is None:
        import io

        buf = io.BytesIO()
        d = np.lib.format.header_data_from_array_1_0(arr)
        try:
            np.lib.format.write_array_header_1_0(buf, d)
        except ValueError:
            buf = io.BytesIO()
            np.lib.format.write_array_header_2_0(buf, d)
        header = buf.getvalue()
        if key is not None and len(_WRITTEN_HEADERS) < 4096:
            _WRITTEN_HEADERS[key] = header
    return header


_WRITTEN_HEADERS: dict[Any, bytes] = {}


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
def _zip_errors() -> tuple[type[BaseException], ...]:
    import zipfile

    return (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
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
    stored_size = zi.file_size if zi.compress_type == _STORED else zi.compress_size
    if zi.compress_type == _STORED and zi.compress_size != zi.file_size:
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
    if zi.compress_type == _STORED:
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
        import zipfile

        try:
            # through the same mapping, not the path: the file may have been replaced since
            with zipfile.ZipFile(_MmapReader(mf.buffer())) as z2, z2.open(zi) as f2:
                f2.read(data_off)
                raw = f2.read(probe.nbytes)
                f2.read(1)  # reach the end, where zipfile checks the CRC
        except _zip_errors() as exc:
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
    # json.loads makes exact dicts, lists and strs, so ``type(x) is`` checks what isinstance would,
    # faster: this loop runs once per key (5,000 in the many-small benchmark)
    for e in keys:
        if type(e) is not dict:
            raise bad("bad key entry")
        p, src, kind = e.get("path"), e.get("dtype"), e.get("kind")
        m = None if kind == "dict" else e.get("member")
        if type(p) is not list or not p or (type(p[0]) is not str if len(p) == 1
                                             else not all(type(s) is str for s in p)):
            raise bad("bad key path")
        if m is None and kind != "dict" or m is not None and type(m) is not str:
            raise bad(f"key {'/'.join(p)[:80]!r}: bad member name")
        if src is not None and not (isinstance(src, str) and 0 < len(src) <= 64 and src.isprintable()):
            raise bad(f"key {'/'.join(p)[:80]!r}: bad source dtype")
        if len(p) > MAX_DEPTH:
            raise bad(f"key nested more than {MAX_DEPTH} levels deep")
        entries.append((p, m, src))
    return meta, entries


def _read_npz_zipfile(mf: MappedFile, *, verify: Optional[bool] = None) -> Dump:
    """The general reader: ``zipfile`` parses the directory (compressed members, comments, ...)."""
    import io
    import zipfile

    buf = mf.buffer()
    try:
        zf = zipfile.ZipFile(io.BytesIO(buf) if mf.size < (1 << 16) else _MmapReader(buf))
        infos = zf.infolist()
    except _zip_errors() as exc:
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
        except _zip_errors() as exc:
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
            except _zip_errors() as exc:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: unreadable ({_one_line(exc)})") from None
        _place(tree, path, spec, mf)
    return Dump(tree, mf, path=mf.path, fmt="npz", meta=meta, verify=verify)


def _place(tree: dict[str, Any], path: list[str], spec: Any, mf: MappedFile) -> None:
    """Put a key's spec (or ``{}`` for an empty dict) at its path in the reader's nested tree."""
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r} clashes with an array")
        node = nxt
    if path[-1] in node:
        raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r} appears twice")
    node[path[-1]] = spec


# The common case, a dump this module (or plain ``np.savez``) wrote, is read without ``zipfile``:
# one pass of ``struct`` over the central directory and the local headers. Only archives whose
# every field is the plain, consistent kind take this path; anything else (compressed members, an
# archive comment, data descriptors, encryption, duplicate names, a zip inside another file, any
# field that disagrees) goes to ``_read_npz_zipfile``, which then reads or rejects it exactly as
# before. So the fast path never has to produce an error about the zip structure itself.
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record, 22 bytes
_LOCATOR64 = struct.Struct("<4sLQL")  # zip64 end record locator, 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record, 56 bytes
# central directory entry, 46 bytes: signature, extract version, flags, method, CRC, compressed
# size, size, name/extra/comment lengths, local header offset (the rest is not used)
_CENTRAL = struct.Struct("<4s2xBxHH4xLLLHHH8xL")
_LOCAL = struct.Struct("<4s22xHH")  # local header, 30 bytes: signature, name and extra lengths
_FIELD = struct.Struct("<HH")
_Q = struct.Struct("<Q")
_MAX_EXTRACT_VERSION = 63  # zipfile refuses more
_UTF8_NAME = 0x800
_ALT_SEP = os.sep if os.sep != "/" else "\0"  # zipfile turns os.sep into "/"


def _fast_directory(mf: MappedFile) -> Optional[dict[str, tuple[int, int, int]]]:
    """member name -> (data start, size, CRC32) for a plain uncompressed zip whose directory,
    end records and local headers all agree; ``None`` for anything else. Checks what
    ``_check_directory`` checks (count in the end record = members listed, each local header
    agrees in name, stored sizes equal, nothing outside the file) and what makes ``zipfile``
    read a directory differently (offset shift of a zip prefixed by other data, zip64 fields)."""
    size = mf.size
    if size < 22:
        return None
    buf = mf.buffer()
    eocd = size - 22
    sig, disk, disk_cd, count_disk, count, cd_size, cd_off, comment = _EOCD.unpack_from(buf, eocd)
    if sig != b"PK\x05\x06" or comment:
        return None
    claimed = count  # what _entries_claimed reads
    cd_end = eocd
    if eocd >= 20 and buf[eocd - 20 : eocd - 16] == b"PK\x06\x07":
        _, disk64, rec, disks = _LOCATOR64.unpack_from(buf, eocd - 20)
        # zipfile reads the zip64 record just before the locator, _entries_claimed where the
        # locator points: both must be the same record
        if disk64 or disks > 1 or rec != eocd - 76 or rec < 0:
            return None
        (sig, rec_size, _, _, disk, disk_cd, count_disk, count64, cd_size,
         cd_off) = _EOCD64.unpack_from(buf, rec)
        if sig != b"PK\x06\x06" or rec_size != 44:
            return None
        if claimed == 0xFFFF:
            claimed = count64
        count = count64
        cd_end = rec
    if disk or disk_cd or count_disk != count or cd_off + cd_size != cd_end:
        return None
    members: dict[str, tuple[int, int, int]] = {}
    listed = 0
    unpack_central, unpack_local, unpack_field = _CENTRAL.unpack_from, _LOCAL.unpack_from, _FIELD.unpack_from
    pos = cd_off
    while pos < cd_end:
        if pos + 46 > cd_end:
            return None
        sig, version, flags, method, crc, csize, usize, n, e, c, off = unpack_central(buf, pos)
        if sig != b"PK\x01\x02" or version > _MAX_EXTRACT_VERSION or flags & ~_UTF8_NAME or method:
            return None
        p = pos + 46
        pos = p + n + e + c
        if pos > cd_end:
            return None
        raw = buf[p : p + n]
        # zipfile's _decodeExtra: fields must fit; zip64 sizes replace the 0xFFFFFFFF ones. Most
        # entries carry one field, the alignment padding, which needs no walk.
        if e and (e < 4 or unpack_field(buf, p + n)[1] + 4 != e or usize == 0xFFFFFFFF
                  or csize == 0xFFFFFFFF or off == 0xFFFFFFFF):
            x, x_end = p + n, p + n + e
            while x_end - x >= 4:
                tp, ln = unpack_field(buf, x)
                x += 4
                if x + ln > x_end:
                    return None
                if tp == 1:
                    z, z_end = x, x + ln
                    if usize == 0xFFFFFFFF:
                        if z + 8 > z_end:
                            return None
                        usize = _Q.unpack_from(buf, z)[0]
                        z += 8
                    if csize == 0xFFFFFFFF:
                        if z + 8 > z_end:
                            return None
                        csize = _Q.unpack_from(buf, z)[0]
                        z += 8
                    if off == 0xFFFFFFFF:
                        if z + 8 > z_end:
                            return None
                        off = _Q.unpack_from(buf, z)[0]
                x += ln
        if csize != usize or off + 30 > size:
            return None
        lsig, ln, le = unpack_local(buf, off)
        start = off + 30 + ln + le
        if lsig != b"PK\x03\x04" or ln != n or start + usize > size or buf[off + 30 : start - le] != raw:
            return None
        try:
            name = raw.decode("ascii")  # cp437 and UTF-8 agree on ASCII names
        except UnicodeDecodeError:
            try:
                name = raw.decode("utf-8" if flags & _UTF8_NAME else "cp437")
            except UnicodeDecodeError:
                return None
        members[name] = (start, usize, crc)
        listed += 1
    # a duplicate name shadows a member; zipfile cuts a name at a NUL and rewrites os.sep
    if pos != cd_end or len(members) != listed or listed != claimed:
        return None
    names = "".join(members)
    if "\0" in names or _ALT_SEP in names:
        return None
    return members


# full .npy header bytes -> (dtype, shape, fortran, header length, data bytes), for headers that
# parsed and passed every check (numeric dtype included); members of a dump repeat a few headers
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int, int]] = {}


def _parse_stored(mf: MappedFile, name: str, start: int, size: int,
                  src: Optional[str]) -> tuple[np.dtype, tuple[int, ...], bool, int, int]:
    """(dtype, shape, fortran, header length, data bytes) of a stored member whose header is not
    in ``_NPY_HEADERS`` yet, checked as ``_member_spec`` checks it, and cached by its bytes."""
    where = f"{mf.path}: member {name!r}"
    buf = mf.buffer()
    dt, shape, fortran, data_off = parse_npy_header(buf, start, start + size, where)
    _check_numeric(dt, src, where)
    nbytes = dt.itemsize
    for s in shape:
        nbytes *= s
    if size >= 10 and buf[start + 6] == 1 and data_off - start <= 512 and len(_NPY_HEADERS) < 4096:
        _NPY_HEADERS[buf[start:data_off]] = (dt, shape, fortran, data_off - start, nbytes)
    return dt, shape, fortran, data_off - start, nbytes


def read_npz(mf: MappedFile, *, verify: Optional[bool] = None) -> Dump:
    """Open a native (or plain ``np.savez``) dump lazily; see ``reprod.load`` (which pauses the
    cyclic GC around it: 5,000 keys make ~25,000 objects that all survive)."""
    members = _fast_directory(mf)
    if members is None:
        return _read_npz_zipfile(mf, verify=verify)
    return _read_npz_fast(mf, members, verify)


def _read_npz_fast(mf: MappedFile, members: dict[str, tuple[int, int, int]],
                   verify: Optional[bool]) -> Dump:
    """``_read_npz_zipfile`` for an archive whose directory ``_fast_directory`` has read and
    checked: same tree, same metadata, same errors, in the same order."""
    buf = mf.buffer()
    meta: dict[str, Any] = {}
    entries: list[tuple[list[str], Optional[str], Optional[str]]] = []
    m = members.get(META_NAME)
    if m is not None:
        start, size, crc = m
        if size > 64 << 20:
            raise DumpFormatError(f"{mf.path}: metadata member too large")
        raw = buf[start : start + size]
        if crc32(raw) != crc:
            return _read_npz_zipfile(mf, verify=verify)  # which words the error as zipfile does
        meta, entries = _parse_meta(raw, mf.path)
    else:
        for name in members:
            if name.startswith("__reprod"):
                raise DumpFormatError(f"{mf.path}: the metadata member is missing; the dump is corrupt")
            if name.endswith(".npy"):
                entries.append(([name[:-4]], name, None))
        if not entries:
            raise DumpFormatError(f"{mf.path}: zip holds no .npy arrays, not a dump")
    tree: dict[str, Any] = {}
    headers, make, get = _NPY_HEADERS, ArraySpec.in_file, members.get
    for path, member, src in entries:
        spec: Any
        if member is None:
            spec = {}
        else:
            hit = get(member)
            if hit is None:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: member {member!r} is missing")
            start, size = hit[0], hit[1]
            # the .npy header by its bytes (magic, version 1, length, text): each distinct
            # header is parsed once per process
            h = None
            if size >= 10 and buf[start + 6] == 1:
                hend = start + 10 + (buf[start + 8] | buf[start + 9] << 8)
                if hend <= start + size:
                    h = headers.get(buf[start:hend])
            if h is None:
                h = _parse_stored(mf, member, start, size, src)
            elif src is not None:
                _check_numeric(h[0], src, f"{mf.path}: member {member!r}")
            if h[3] + h[4] != size:
                raise DumpFormatError(f"{mf.path}: member {member!r}: header claims {h[4]} bytes of "
                                      f"data, member has {size - h[3]}")
            spec = make(h[0], h[1], start + h[3], h[2], src, hit)
        _place(tree, path, spec, mf)
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


