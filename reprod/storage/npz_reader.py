"""The native format's reader (and plain ``numpy.savez`` archives'): ``read_npz`` opens a dump lazily.
The zip directory of a plain archive is read with ``struct`` in one pass (``_fast_directory``);
anything unusual goes through ``zipfile`` (``_read_npz_zipfile``), which reads or rejects it. The
layout is in ``npz_format``."""

from __future__ import annotations

import functools
import struct
import zlib
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..adapters import BFLOAT16
from ..errors import DumpFormatError
from . import npy_header
from .lazy import ArraySpec, Dump, MappedFile, _one_line, crc32
from .npy_header import _HEADERS, parse_npy_header
from .npz_format import _STORED, FORMAT_NAME, FORMAT_VERSION, META_NAME
from .npz_meta import (
    CHUNKED_FROM,
    Rechunk,
    _parse_meta,
    _popping,
    iter_meta_chunked,
    plain_meta_entries,
)

if TYPE_CHECKING:  # zipfile costs ~5 ms to import; the common paths do not need it
    import zipfile

__all__ = ["read_npz", "META_NAME", "FORMAT_NAME", "FORMAT_VERSION"]

# Deflate cannot shrink data by more than about 1032:1; a member claiming more is lying about its size.
_MAX_DEFLATE_RATIO = 1032


def _meta_limit(members: int) -> int:
    """The largest metadata member read: 64 MiB, plus 1 KiB for each member of the archive (an
    entry names a key and its member in ~70 bytes: a dump of a million keys has ~70 MiB of it,
    which a flat 64 MiB refused, though reprod.save had written it)."""
    return (64 << 20) + (members << 10)


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


def _reparse_meta(mf: MappedFile, start: int, size: int) -> dict[str, Any]:
    return _parse_meta(bytes(mf.buffer()[start : start + size]), mf.path)[0]


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
        if zi.file_size > _meta_limit(len(infos)):
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
    made: dict[tuple[str, Optional[str]], ArraySpec] = {}
    limit = _alias_limit(mf)
    total = 0
    for path, member, src in entries:
        spec: Any
        if member is None:
            spec = {}
        else:
            zi = by_name.get(member)
            if zi is None:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: member {member!r} is missing")
            spec = made.get((member, src))
            if spec is None:  # keys naming one member share its spec (and to_dict's copy)
                try:
                    spec = made[member, src] = _member_spec(mf, zf, zi, src, starts.get(id(zi)))
                except DumpFormatError:
                    raise
                except _zip_errors() as exc:
                    raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: unreadable ({_one_line(exc)})") from None
            total += spec.nbytes
            if total > limit:
                raise _aliased(mf, len(entries), limit)
        _place(tree, path, spec, mf)
    return Dump(tree, mf, path=mf.path, fmt="npz", meta=meta, verify=verify)


def _header_of(mf: MappedFile, buf: Any, headers: dict[Any, Any], member: str,
               hit: tuple[int, int, int], src: Optional[str]) -> tuple[Any, ...]:
    """(dtype, shape, fortran, header length, data bytes) of a stored member, checked."""
    start, size = hit[0], hit[1]
    # the .npy header by its bytes (magic, version 1, length, text) in the cache that
    # parse_npy_header fills: each distinct header is parsed once per process
    h = None
    if size >= 10 and buf[start + 6] == 1:
        hend = start + 10 + (buf[start + 8] | buf[start + 9] << 8)
        if hend <= start + size:
            h = headers.get(buf[start:hend])
    if h is None:
        h = _parse_stored(mf, member, start, size, src)
    elif src is not None or h[0].kind not in "biufc":
        # the cache holds every header that parsed, whatever reader met it first
        _check_numeric(h[0], src, f"{mf.path}: member {member!r}")
    if h[3] + h[4] != size:
        raise DumpFormatError(f"{mf.path}: member {member!r}: header claims {h[4]} bytes of "
                              f"data, member has {size - h[3]}")
    return h


def _alias_limit(mf: MappedFile) -> int:
    """The bytes of data the keys of a dump may refer to in all (``npy_header.ALIAS_FACTOR``)."""
    return npy_header.ALIAS_FACTOR * mf.size + npy_header.ALIAS_FLOOR


def _aliased(mf: MappedFile, keys: int, limit: int) -> DumpFormatError:
    from .legacy import aliased_payloads_error

    return aliased_payloads_error(mf.path, keys, limit, mf.size)


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


from .columns import ColumnBuilder  # noqa: E402
from .npz_directory import Directory, _fast_directory  # noqa: E402  (importable from here, as before)


def _parse_stored(mf: MappedFile, name: str, start: int, size: int,
                  src: Optional[str]) -> tuple[np.dtype, tuple[int, ...], bool, int, int]:
    """(dtype, shape, fortran, header length, data bytes) of a stored member whose header is not
    in the header cache yet (``parse_npy_header`` puts it there), checked as ``_member_spec``
    checks it."""
    where = f"{mf.path}: member {name!r}"
    dt, shape, fortran, data_off = parse_npy_header(mf.buffer(), start, start + size, where)
    _check_numeric(dt, src, where)
    nbytes = dt.itemsize
    for s in shape:
        nbytes *= s
    return dt, shape, fortran, data_off - start, nbytes


def read_npz(mf: MappedFile, *, verify: Optional[bool] = None) -> Dump:
    """Open a native (or plain ``np.savez``) dump lazily; see ``reprod.load`` (which pauses the
    cyclic GC around it: 5,000 keys make ~25,000 objects that all survive)."""
    members = _fast_directory(mf)
    if members is None:
        return _read_npz_zipfile(mf, verify=verify)
    return _read_npz_fast(mf, members, verify)


def _read_npz_fast(mf: MappedFile, members: Directory, verify: Optional[bool]) -> Dump:
    """``_read_npz_zipfile`` for an archive whose directory ``_fast_directory`` has read and
    checked: same tree, same metadata, same errors, in the same order."""
    meta: dict[str, Any] = {}
    entries: list[tuple[list[str], Optional[str], Optional[str]]] = []
    m = members.at(len(members) - 1, META_NAME)  # where the writer puts it
    if m is not None:
        start, size, crc = m
        if size > _meta_limit(len(members)):
            raise DumpFormatError(f"{mf.path}: metadata member too large")
        raw = mf.view()[start : start + size]  # decoded from the mapping: no copy of the bytes
        try:
            if crc32(raw) != crc:
                return _read_npz_zipfile(mf, verify=verify)  # which words the error as zipfile does
            # parsed again if asked for (Dump.meta): the same bytes, checked already
            lazy_meta = functools.partial(_reparse_meta, mf, start, size)
            if size >= CHUNKED_FROM:
                # a large document a few megabytes at a time, its entries made into columns as
                # they come; anything that reads otherwise than whole (an error too) is read whole
                try:
                    cols = _columns(mf, members, iter_meta_chunked(mf.buffer(), start, size, mf.path), -1)
                    return _fast_dump(mf, cols.build(), lazy_meta, verify)
                except (Rechunk, DumpFormatError):
                    pass
            else:
                pairs = plain_meta_entries(mf.buffer(), start, size)
                if pairs is not None:  # the writer's spelling, every key one plain name
                    cols = _plain_columns(mf, members, pairs)
                    if cols is not None:
                        return _fast_dump(mf, cols.build(), lazy_meta, verify)
            meta, entries = _parse_meta(raw, mf.path, consume=True)
        finally:
            raw.release()
        # the parsed document (a dict per key) and the member's copy go now, before the tree
        meta = lazy_meta  # type: ignore[assignment]
        del raw
    else:
        for name in members:
            if name.startswith("__reprod"):
                raise DumpFormatError(f"{mf.path}: the metadata member is missing; the dump is corrupt")
            if name.endswith(".npy"):
                entries.append(([name[:-4]], name, None))
        if not entries:
            raise DumpFormatError(f"{mf.path}: zip holds no .npy arrays, not a dump")
    n_keys = len(entries)
    # a flat dump (every key one name, every value an array) becomes columns: no spec, no
    # directory tuple kept per key (see columns.py)
    if entries and all(m is not None and (type(p) is str or len(p) == 1) for p, m, _ in entries):
        entries.reverse()
        return _fast_dump(mf, _columns(mf, members, _popping(entries), n_keys).build(), meta, verify)
    buf = mf.buffer()
    tree: dict[str, Any] = {}
    headers, make, at = _HEADERS, ArraySpec.in_file, members.at
    made: dict[Any, ArraySpec] = {}
    limit = _alias_limit(mf)
    total = 0
    # each entry (a path list, a member name) goes as its key's spec comes
    entries.reverse()
    # the i-th key's member is looked for as the i-th member first (the writer's order)
    for i, (path, member, src) in enumerate(_popping(entries)):
        if type(path) is str:
            path = [path]
        spec: Any
        if member is None:
            spec = {}
        else:
            hit = at(i, member)
            if hit is None:
                raise DumpFormatError(f"{mf.path}: key {'/'.join(path)!r}: member {member!r} is missing")
            start = hit[0]
            h = _header_of(mf, buf, headers, member, hit, src)
            total += h[4]
            if total > limit:
                raise _aliased(mf, n_keys, limit)
            spec = made.get(start)
            if spec is None or spec.source_dtype != src:
                spec = make(h[0], h[1], start + h[3], h[2], src, hit)
                # keys naming one member share its spec (and to_dict's copy)
                made[start] = spec
        _place(tree, path, spec, mf)
    return _fast_dump(mf, tree, meta, verify)


def _fast_dump(mf: MappedFile, tree: Any, meta: Any, verify: Optional[bool]) -> Dump:
    mf.drop_pages()  # the directory's walk read every member's header
    return Dump(tree, mf, path=mf.path, fmt="npz", meta=meta, verify=verify)


def _columns(mf: MappedFile, members: Directory, entries: Any, n_keys: int) -> ColumnBuilder:
    """The rows of a flat dump's keys (``entries``: path or one-name list, member, source
    dtype), checked as the tree's loop checks them. ``n_keys < 0``: the entries come from the
    chunked parse, which may hold any entry: one that is not flat, or an error whose wording
    needs the whole list (the alias bound's count), raises ``Rechunk``."""
    buf = mf.buffer()
    rows: dict[str, int] = {}
    cols = ColumnBuilder(rows, checks=True)
    offsets, codes, (cstart, clen, ccrc) = cols.offsets, cols.codes, cols.checks  # type: ignore[misc]
    layout_of: dict[tuple[int, Optional[str]], tuple[int, Any]] = {}
    headers, at = _HEADERS, members.at
    limit = _alias_limit(mf)
    total = 0
    for i, (path, member, src) in enumerate(entries):
        if type(path) is not str:
            if len(path) != 1 or member is None:
                raise Rechunk
            path = path[0]
        hit = at(i, member)
        if hit is None:
            raise DumpFormatError(f"{mf.path}: key {path!r}: member {member!r} is missing")
        h = _header_of(mf, buf, headers, member, hit, src)
        start, size = hit[0], hit[1]
        total += h[4]
        if total > limit:
            if n_keys < 0:
                raise Rechunk
            raise _aliased(mf, n_keys, limit)
        if path in rows:
            raise DumpFormatError(f"{mf.path}: key {path!r} appears twice")
        rows[path] = len(offsets)
        offsets.append(start + h[3])
        # the layout by the header tuple's identity (the cache hands out one per header)
        c = layout_of.get((id(h), src))
        if c is None:
            c = layout_of[id(h), src] = (cols.code((h[0], h[1], h[2], src)), h)
        codes.append(c[0])
        cstart.append(start)
        clen.append(size)
        ccrc.append(hit[2])
        if not i & 0xFFFF:  # the members' headers, read, leave resident memory as read
            mf.drop_pages()
    if n_keys < 0 and not rows:
        raise Rechunk  # no keys: the whole parse says what that is
    return cols


def _plain_columns(mf: MappedFile, members: Directory, pairs: list[tuple[bytes, bytes]]
                   ) -> Optional[ColumnBuilder]:
    """``_columns`` of ``npz_meta.plain_meta_entries``' (key, member) pairs, the lookups inlined
    for the writer's order (the i-th key's member is the i-th member, its header one the cache
    holds); None, having raised nothing, for anything else: ``_columns`` then reads the whole
    parse's entries and words any error."""
    buf = mf.buffer()
    rows: dict[str, int] = {}
    cols = ColumnBuilder(rows, checks=True)
    offsets, codes, (cstart, clen, ccrc) = cols.offsets, cols.codes, cols.checks  # type: ignore[misc]
    name_at, name_len, starts, sizes, crcs = (members._name_at, members._name_len, members._start,
                                              members._size, members._crc)
    if len(pairs) > len(starts) or members._index is not None:
        return None
    layout_of: dict[int, tuple[int, Any]] = {}
    headers = _HEADERS
    limit = _alias_limit(mf)
    total = 0
    for i, (raw_key, member) in enumerate(pairs):
        a = name_at[i]
        if buf[a : a + name_len[i]] != member:
            return None
        start, size = starts[i], sizes[i]
        if size < 10 or buf[start + 6] != 1:
            return None
        hend = start + 10 + (buf[start + 8] | buf[start + 9] << 8)
        h = headers.get(buf[start:hend]) if hend <= start + size else None
        if h is None:  # a header not met yet in this process (or odd): parsed and checked there
            h = _header_of(mf, buf, headers, str(member, "ascii", "replace"), (start, size, crcs[i]), None)
        if h[0].kind not in "biufc" or h[3] + h[4] != size:
            return None
        total += h[4]
        if total > limit:
            return None
        try:
            key = str(raw_key, "utf-8")
        except UnicodeDecodeError:
            return None
        if key in rows:
            return None
        rows[key] = len(offsets)
        offsets.append(start + h[3])
        c = layout_of.get(id(h))
        if c is None:
            c = layout_of[id(h)] = (cols.code((h[0], h[1], h[2], None)), h)
        codes.append(c[0])
        cstart.append(start)
        clen.append(size)
        ccrc.append(crcs[i])
    if not rows:
        return None
    return cols


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


