"""The native format's writer: ``NpzWriter`` writes a dump member by member into a temporary file,
renamed into place only when complete; a streaming logger's keys are kept in a ``_KeyLog``
(``npz_keylog``), the members' records are laid out by ``npz_members``, the format's constants
are in ``npz_format``."""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Mapping
from itertools import islice
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .. import _native
from .._native import crc32  # zlib's CRC-32, by the kernel where it is on
from ..adapters import BFLOAT16, float32_to_bf16_bits
from ..errors import ReprodError, StreamWriteError, UnsupportedValueError, WriteError
from . import npz_members
from ._pipe import (  # noqa: F401 - _HELPERS, _Helper, _Job: importable from here as before
    _HELPERS,
    _WRITEV,
    _ChunkPipe,
    _direct_write,
    _Helper,
    _helper,
    _Job,
    _writev_all,
    cores,
)
from .atomic import AtomicFile
from .npz_format import _EOCD, _EOCD64, _LOCATOR64, _STORED, FORMAT_NAME, FORMAT_VERSION, META_NAME
from .npz_keylog import _KeyLog, _side_file, _to_null
from .npz_members import (  # noqa: F401 - the writer's layout, importable from here as before
    _ALIGN,
    _CENTRAL_HEADER,
    _CREATE_SYSTEM,
    _DEAD,
    _DEFAULT_VERSION,
    _EXTERNAL_ATTR,
    _FREE_REGIONS,
    _HEADER_CRCS,
    _LOCAL_HEADER,
    _MAX_CLEAN_NAME,
    _ONE_WRITE,
    _PAD_FIELD,
    _PAD_ID,
    _PADS,
    _RECORD,
    _ZIP64_SIZES,
    _ZIP64_VERSION,
    MAX_KEY_CHARS,
    _abandon,
    _dos_now,
    _flatten,
    _formula_holds,
    _json_str,
    _npy_header,
    _writer_info,
    live_entries,
    meta_chunks,
)

_ZIP64_LIMIT = (1 << 31) - 1
_ZIP_FILECOUNT_LIMIT = 0xFFFF  # more members than this need the zip64 end record



__all__ = ["NpzWriter", "write_npz", "META_NAME", "FORMAT_NAME", "FORMAT_VERSION"]

class NpzWriter:
    """Write a native dump member by member; the file appears at ``path`` on ``close()``.

    Memory stays bounded by the largest single array: each ``add`` goes straight to a temporary
    file beside ``path``, renamed into place by ``close()``. Until then any earlier file at
    ``path`` stays as it was: a process killed mid-run leaves that earlier dump (or no file), never
    a partial one, plus its temporary file, which the next save to ``path`` removes once stale.
    An error while writing (a full disk) aborts the writer: the temporary file is removed and
    later ``add``/``close`` calls raise. A re-added key replaces the old value (last one wins, in
    its first place): the old members leave the directory and their space takes later members
    that fit, so re-adding a key forever does not grow the file. A key longer than
    ``_MAX_CLEAN_NAME`` gets a numbered member, its name living in the metadata; one longer than
    ``MAX_KEY_CHARS`` is refused before anything is written, and the stream goes on. In a forked
    child the writer is its parent's: it refuses to write (and to list its keys), its ``abort``
    leaves the temporary file alone, and the bytes its file buffer held go nowhere when the child
    exits.

    A failed write raises ``reprod.errors.WriteError`` (``StreamWriteError`` with
    ``stream=True``, a streaming logger's writer), naming the file, the key where one was being
    added, and the system's problem.

    ``indexed=False`` is for a writer whose keys are all distinct and never asked for again (one
    save of a dict): past 20,000 keys it keeps no index of them, so a re-added key is not
    detected (it would be written twice) and ``keys()`` raises.
    """

    def __init__(self, path: str, *, indexed: bool = True, stream: bool = False) -> None:
        self.path = path
        self._stream = stream  # a write error raises StreamWriteError
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
        self._keys = _KeyLog(os.path.dirname(os.path.abspath(path)), indexed)
        self._closed = False
        self._aborted: Optional[str] = None
        self._counter = 0
        # A re-added key supersedes its members: their directory entries are marked dead (and
        # left out of the directory written on close), and their space, free, takes later members
        # that fit (a value re-added with the same shape goes back where it was), so re-adding
        # one key forever does not grow the file. length -> offsets of free regions:
        self._free: dict[int, list[int]] = {}
        self._n_free = 0
        self._dead = 0
        self._reuse = not self._af.direct or self._file.seekable()
        # the temporary file is extended ahead of the members (see _reserve), to this size
        self._reserved = 0
        self._grow = os.name == "posix" and not self._af.direct
        # large members' CRCs computed on a helper thread while their bytes are written, the
        # local header patched after (overlap_crcs)
        self._overlap = False
        # a writer dropped or left open at exit gives its temporary file back (in this process
        # only: a forked child exiting must not remove its parent's file)
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _abandon, self._af, path, self._pid)
        _OPEN.add(self)

    def overlap_crcs(self) -> bool:
        """Compute each large member's CRC on a helper thread while the member is written (its
        local header is patched afterwards), for a writer driven by a thread of its own on a
        machine with a core to spare (``npz_background``): one pass less on the writing thread.
        Returns whether it is on: a file written in place cannot be patched."""
        self._overlap = _native.kernel() is not None and not self._af.direct \
            and hasattr(os, "pwrite") and _WRITEV is not None
        return self._overlap

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            raise self._forked()
        if self._aborted is not None:
            raise ReprodError(f"{self.path}: this dump was abandoned ({self._aborted}); nothing was "
                              "written")
        if self._closed:
            raise ReprodError(f"{self.path}: this dump is already closed")

    def add(self, key: str, tree: Any, dtypes: Any = None) -> None:
        self._check_open()
        if type(tree) is np.ndarray and dtypes is None and len(key) <= MAX_KEY_CHARS:
            self._add_array(key, tree)  # the value of most keys, one plain array
            return
        leaves = self.check(key, tree, dtypes)
        entries: list[str] = []
        records: list[bytes] = []
        try:
            old = self._keys.records(key)
            if old:  # a re-added key: its old value's space is free for the new one
                for offset, length, _cpos in _RECORD.iter_unpack(old):
                    self._free_region(offset, length)
            for path, arr, src in leaves:
                if arr is None:  # an empty nested dict: an entry with no member
                    import json  # here only: ~2 ms of a process's first save

                    entries.append(json.dumps({"path": list(path), "kind": "dict"}, ensure_ascii=False))
                else:
                    entries.append(self._write_member(path, arr, src, records))
            # a re-added key replaces the old value and keeps its place (reprod_log's dict semantics)
            self._keys.put(key, ", ".join(entries), b"".join(records))
            if old:
                for _offset, _length, cpos in _RECORD.iter_unpack(old):
                    self._kill_entry(cpos)
        except BaseException as exc:
            # a member half written leaves the zip unusable: give up cleanly rather than later
            raise self._abort(exc, key)  # noqa: B904 - chained by write_error

    def check(self, key: str, tree: Any, dtypes: Any = None
              ) -> list[tuple[tuple[str, ...], Optional[np.ndarray], Optional[str]]]:
        """The leaves ``add`` would write; raises what ``add`` refuses before writing anything
        (a key too long), so that a caller writing later (``npz_background``) refuses it now."""
        leaves: list[tuple[tuple[str, ...], Optional[np.ndarray], Optional[str]]] = []
        _flatten(tree, dtypes, (key,), leaves)
        for path, _, _ in leaves:  # refused before anything is written: the stream goes on
            n = sum(map(len, path)) + len(path) - 1
            if n > MAX_KEY_CHARS:
                raise UnsupportedValueError(
                    f"{self.path}: key {'/'.join(path)[:60]!r}... is {n} characters long; reprod "
                    f"stores keys of at most {MAX_KEY_CHARS} characters")
        return leaves

    def add_array(self, key: str, arr: np.ndarray, source_dtype: Optional[str] = None,
                  crcs: Optional[dict[bytes, int]] = None) -> None:
        """``add`` of one array. ``crcs`` (npy header -> CRC of its member's data) is shared by
        the keys that write the same bytes (``reprod.capture``'s keys of one unchanged tensor):
        the first computes the CRC, the others take it."""
        if source_dtype is not None or len(key) > MAX_KEY_CHARS:
            self.add(key, arr, source_dtype)  # the rare path, with its checks
            return
        self._check_open()
        self._add_array(key, arr, crcs)

    def _add_array(self, key: str, arr: np.ndarray, crcs: Optional[dict[bytes, int]] = None) -> None:
        """``add`` of one plain array (what ``add`` does with its one leaf, less the walk)."""
        records: list[bytes] = []
        try:
            old = self._keys.records(key)
            if old:
                for offset, length, _cpos in _RECORD.iter_unpack(old):
                    self._free_region(offset, length)
            self._keys.put(key, self._write_member((key,), arr, None, records, crcs),
                           b"".join(records))
            if old:
                for _offset, _length, cpos in _RECORD.iter_unpack(old):
                    self._kill_entry(cpos)
        except BaseException as exc:
            raise self._abort(exc, key)  # noqa: B904 - chained by write_error

    def add_mapping(self, tree: Mapping[str, Any], source_dtypes: Optional[Mapping[str, Any]] = None) -> None:
        """``add(key, value, source_dtypes.get(key))`` of every item of ``tree``, in order, with
        the same bytes; runs of plain small arrays are written by the compiled kernel
        (``_kernel.npz_pack``, through the file's write a chunk at a time), the rest key by key as
        ``add`` writes them."""
        self._check_open()
        sd = source_dtypes or {}
        k = _native.kernel()
        pack = getattr(k, "npz_pack", None)
        if pack is None or not tree:
            for key, value in tree.items():
                self.add(key, value, sd.get(key))
            return
        sd = sd if type(sd) is dict else dict(sd)
        # a dict's keys are unique: none of them can be in the key log's SQLite part already,
        # which the kernel does not look into (the dict part it does)
        unique = type(tree) is dict
        pairs = iter(tree.items())
        while True:  # a slice of the items at a time: a list of all was ~70 bytes a key more
            items = list(islice(pairs, _BATCH_ITEMS))
            if not items:
                return
            self._add_items(pack, items, sd, unique)

    def _add_items(self, pack: Callable[..., Any], items: list[tuple[Any, Any]],
                   sd: dict[str, Any], unique: bool) -> None:
        keys = self._keys
        i, n = 0, len(items)
        # the kernel's chunks straight to the file: through the buffered file, which copies a
        # chunk smaller than its buffer into it first, each byte was copied once more; with a
        # core to spare, on the helper thread while the kernel packs the next chunk
        direct = not self._af.direct
        pipe: Optional[_ChunkPipe] = None
        if not direct:
            write: Callable[[bytes], int] = self._file.write
        elif cores() >= 2:
            write = pipe = _ChunkPipe(self._file.fileno())
        else:
            write = _direct_write(self._file.fileno())
        while i < n:
            if not self._n_free and (not keys.spilling or unique):
                if not keys.spilling:
                    mem: Optional[dict[str, str]] = keys.mem
                    room = n if keys.no_db else keys.spill - len(keys.mem)
                else:
                    mem, room = None, 0
                try:
                    if direct:
                        self._file.flush()  # what the Python path wrote goes first
                    try:
                        i, written, count, rows, texts = pack(
                            items, i, np.ndarray, _BATCH_DTYPES, _BATCH_HEADERS, _header_and_crc,
                            sd or None, mem, room, self._pos, self._central,
                            self._central_spilled, self._counter, _ZIP64_LIMIT, _ONE_WRITE,
                            _MAX_CLEAN_NAME, _BATCH_MAX_KEY, _BATCH_BYTES, keys.spilled,
                            npz_members._FIXED_DOS, write, _BATCH_DESCRS)
                    except BaseException:
                        if pipe is not None:
                            pipe.wait()  # nothing may write to the file after the abort
                        raise
                    if pipe is not None:
                        pipe.finish()
                    self._pos += written
                    self._counter += count
                    self._members += count
                    if len(self._central) >= _CENTRAL_SPILL:
                        self._spill_central()
                    if rows:
                        keys.put_rows(rows, texts)
                except BaseException as exc:
                    raise self._abort(exc)  # noqa: B904 - chained by write_error
                if i >= n:
                    continue
            key, value = items[i]  # one the kernel leaves to Python (see npz_pack)
            self.add(key, value, sd.get(key))
            i += 1

    def _member_name(self, path: tuple[str, ...]) -> str:
        """Keys that make clean zip paths keep their name, so plain numpy.load shows them; the
        rest (and keys longer than ``_MAX_CLEAN_NAME``) get a numbered name. Names cannot clash:
        a clean name is its key's path, and a path element holding "/" or starting with
        "__reprod" is not clean; a re-added key's old members, which may have its name, are left
        out of the directory."""
        display = "/".join(path)
        self._counter += 1
        if len(path) == display.count("/") + 1 and len(display) <= _MAX_CLEAN_NAME \
                and npz_members.safe_member(display) and not display.startswith("__reprod"):
            return display + ".npy"
        return f"__reprod_{self._counter - 1}.npy"

    def _free_region(self, offset: int, length: int) -> None:
        if self._reuse and self._n_free < _FREE_REGIONS and length > 0:
            self._free.setdefault(length, []).append(offset)
            self._n_free += 1

    def _take_region(self, n_name: int, size: int) -> Optional[tuple[int, int]]:
        """A free region (offset, length) that holds a member with an ``n_name``-byte name and
        ``size`` bytes of data (its alignment padding depends on where it goes), or None."""
        if not self._n_free:
            return None
        least = 30 + n_name + 4 + size  # with no padding; at most 63 bytes more
        for length in range(least, least + _ALIGN):
            offsets = self._free.get(length)
            if not offsets:
                continue
            for i in range(len(offsets) - 1, max(-1, len(offsets) - 9), -1):
                o = offsets[i]
                pad = (-(o + 30 + n_name + 4)) % _ALIGN
                if least + pad <= length:
                    offsets.pop(i)
                    if not offsets:
                        del self._free[length]
                    self._n_free -= 1
                    return o, length
        return None

    def _kill_entry(self, cpos: int) -> None:
        """Mark the central directory entry at ``cpos`` (of the whole directory stream) dead."""
        self._dead += 1
        if cpos >= self._central_spilled:
            at = cpos - self._central_spilled
            self._central[at : at + 4] = _DEAD
        else:
            f = self._central_file
            f.seek(cpos)
            f.write(_DEAD)
            f.seek(0, 2)

    def _write_member(self, path: tuple[str, ...], arr: np.ndarray, src: Optional[str],
                      records: Optional[list[bytes]] = None,
                      crcs: Optional[dict[bytes, int]] = None) -> str:
        if src == BFLOAT16:
            arr = float32_to_bf16_bits(arr)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        name = self._member_name(path)
        header = _npy_header(arr)
        header_crc = _HEADER_CRCS.get(header)
        if header_crc is None:
            header_crc = crc32(header)
            if len(_HEADER_CRCS) < 4096:
                _HEADER_CRCS[header] = header_crc
        if records is None or not arr.nbytes \
                or not self._write_plain(name, header, header_crc, arr, arr.nbytes, records, crcs):
            data = memoryview(arr.reshape(-1)).cast("B") if arr.nbytes else b""
            crc = None if crcs is None else crcs.get(header)
            if crc is None:
                crc = crc32(data, header_crc)
                if crcs is not None:
                    crcs[header] = crc
            self._write_stored(name, header, data, align=True, records=records, crc=crc)
        # the metadata entry as json.dumps({"path": [...], "member": name[, "dtype": src]}) writes
        # it, by its C string encoder (json.dumps costs ~5 us an entry)
        text = '{"path": [' + ", ".join(map(_json_str, path)) + '], "member": ' + _json_str(name)
        return text + (', "dtype": ' + _json_str(src) + "}" if src is not None else "}")

    def _write_plain(self, name: str, header: bytes, header_crc: int, arr: np.ndarray,
                     nbytes: int, records: list[bytes],
                     crcs: Optional[dict[bytes, int]] = None) -> bool:
        """``_write_stored`` of the member of most dumps (a C-contiguous array, no zip64 field, no
        free region to reuse): the same bytes, from the array's buffer, without its general
        walk (~10 us a key less); False, having written nothing, for any other (or an array
        without a buffer). ``crcs``: see ``add_array``."""
        size = len(header) + nbytes
        offset = self._pos
        if self._n_free or offset > _ZIP64_LIMIT or size > _ZIP64_LIMIT:
            return False
        raw_name = name.encode("ascii")
        n = len(raw_name)
        extra = _PADS[(-(offset + 34 + n)) % _ALIGN]
        length = 30 + n + len(extra) + size
        if offset + length > self._reserved:
            self._reserve(offset + length)
        dos_time, dos_date = _dos_now()
        if size < _ONE_WRITE:  # one write call with its headers
            try:
                crc = crc32(arr, header_crc)
                member = b"".join((
                    _LOCAL_HEADER.pack(b"PK\x03\x04", _DEFAULT_VERSION, 0, _STORED, dos_time,
                                       dos_date, crc, size, size, n, len(extra)),
                    raw_name, extra, header, arr))
            except (ValueError, TypeError, BufferError):
                return False
            if len(member) != 30 + n + len(extra) + size:  # pragma: no cover - another size
                return False
            self._file.write(member)
        else:
            try:
                data = memoryview(arr.reshape(-1)).cast("B")
            except (ValueError, TypeError, BufferError):  # pragma: no cover - no buffer
                return False
            crc = None if crcs is None else crcs.get(header)
            pending = None
            if crc is None:
                if self._overlap and nbytes >= _OVERLAP_FROM:
                    # the kernel's CRC releases the GIL, as writev does: both read the array at
                    # once, on two cores
                    pending = _helper().submit(crc32, data, header_crc)
                    crc = 0  # patched below
                else:
                    crc = crc32(data, header_crc)
                    if crcs is not None:
                        crcs[header] = crc
            prefix = b"".join((
                _LOCAL_HEADER.pack(b"PK\x03\x04", _DEFAULT_VERSION, 0, _STORED, dos_time, dos_date,
                                   crc, size, size, n, len(extra)),
                raw_name, extra, header))
            if nbytes < _WRITEV_FROM:
                self._file.write(prefix)
                self._file.write(data)
            else:
                try:
                    _write_large(self._file, prefix, data)
                except BaseException:
                    if pending is not None:
                        pending.wait()  # the CRC reads the array: done before it may go
                    raise
                if pending is not None:
                    crc = pending.result()
                    _pwrite_all(self._file.fileno(), _CRC.pack(crc), offset + _CRC_AT)
                    if crcs is not None:
                        crcs[header] = crc
        self._pos = offset + length
        central = self._central
        records.append(_RECORD.pack(offset, length, self._central_spilled + len(central)))
        central += _CENTRAL_HEADER.pack(
            b"PK\x01\x02", _DEFAULT_VERSION, _CREATE_SYSTEM, _DEFAULT_VERSION, 0, 0, _STORED,
            dos_time, dos_date, crc, size, size, n, len(extra), 0, 0, 0, _EXTERNAL_ATTR, offset)
        central += raw_name
        central += extra
        self._members += 1
        if len(central) >= _CENTRAL_SPILL:
            self._spill_central()
        return True

    def _reserve(self, end: int) -> None:
        """Extend the temporary file past ``end`` (sparse: no blocks, no zeros written) before
        the members up to there are written: ext4 takes a write within the file's size ~30 %
        faster than one that extends it (780 MiB in 6 MiB writes: 231 against 330 ms). ``close``
        cuts the file back to its end."""
        if not self._grow:
            return
        new = end + min(max(end, 16 << 20), 1 << 30)
        try:
            os.ftruncate(self._file.fileno(), new)
        except (OSError, ValueError):  # a file system that refuses: writes extend it as they go
            self._grow = False
            return
        self._reserved = new

    def _spill_central(self) -> None:
        """Move the central directory entries kept in memory to the side file."""
        if self._central_file is None:
            self._central_file = _side_file(os.path.dirname(os.path.abspath(self.path)))
        self._central_file.write(self._central)
        self._central_spilled += len(self._central)
        self._central = bytearray()

    def _write_stored(self, name: str, header: bytes, data: Any, *, align: bool,
                      chunks: Optional[Callable[[], Iterator[bytes]]] = None,
                      records: Optional[list[bytes]] = None, crc: Optional[int] = None) -> None:
        """One stored member: local header, ``header + data``, and its central directory entry.

        The CRC is computed before anything is written, so the file is written front to back
        once (zipfile writes the local header, the data, then seeks back to rewrite the header:
        ~40 us a member). The layout is zipfile's: zip64 extra fields and end records where sizes
        or offsets pass ``_ZIP64_LIMIT``, the padding field that aligns the data to 64 bytes.
        ``crc``: that of ``header + data`` where the caller has it."""
        raw_name = name.encode("ascii")  # _member_name and META_NAME make ASCII names only
        if chunks is None:
            size = len(header) + len(data)
            if crc is None:
                crc = crc32(data, crc32(header))
        else:  # content made twice by ``chunks``: size and CRC first, then the bytes
            size = crc = 0
            for chunk in chunks():
                size += len(chunk)
                crc = crc32(chunk, crc)
        zip64 = size > _ZIP64_LIMIT
        region = self._take_region(len(raw_name), size) if records is not None and align \
            and not zip64 else None
        offset = self._pos if region is None else region[0]
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
        length = 30 + len(raw_name) + len(local_extra) + size
        if region is not None:
            f.seek(offset)
        elif chunks is None and offset + length > self._reserved:
            self._reserve(offset + length)
        if chunks is not None:
            f.write(b"".join((head, raw_name, local_extra)))
            for chunk in chunks():
                f.write(chunk)
        elif len(data) < _ONE_WRITE:  # small members (most of a many-key dump): one write call
            f.write(b"".join((head, raw_name, local_extra, header, data)))
        elif len(data) < _WRITEV_FROM:
            f.write(b"".join((head, raw_name, local_extra, header)))
            f.write(data)
        else:
            _write_large(f, b"".join((head, raw_name, local_extra, header)), data)
        if region is None:
            self._pos = offset + length
        else:
            f.seek(self._pos)
            if region[1] - length >= 64:  # the rest of a larger region stays free
                self._free_region(offset + length, region[1] - length)
            else:
                length = region[1]
        if records is not None:
            records.append(_RECORD.pack(offset, length, self._central_spilled + len(self._central)))
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
            self._spill_central()

    def _write_directory(self) -> int:
        """The central directory and the end records (zip64 ones where counts or offsets need);
        returns the offset of the file's end."""
        f = self._file
        start = self._pos
        if not self._dead:
            if self._central_file is not None:  # the entries moved out of memory, in order
                self._central_file.seek(0)
                while True:
                    chunk = self._central_file.read(1 << 20)
                    if not chunk:
                        break
                    f.write(chunk)
            f.write(self._central)
            count, size = self._members, self._central_spilled + len(self._central)
        else:  # superseded members' entries are left out
            count = size = 0
            for entry in live_entries(self._central_file, self._central):
                f.write(entry)
                count += 1
                size += len(entry)
        end = start + size
        if count >= _ZIP_FILECOUNT_LIMIT or start > _ZIP64_LIMIT or size > _ZIP64_LIMIT:
            f.write(_EOCD64.pack(b"PK\x06\x06", 44, _ZIP64_VERSION, _ZIP64_VERSION, 0, 0, count,
                                 count, size, start))
            f.write(_LOCATOR64.pack(b"PK\x06\x07", 0, end, 1))
            end += _EOCD64.size + _LOCATOR64.size
            count, size, start = min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(start, 0xFFFFFFFF)
        f.write(_EOCD.pack(b"PK\x05\x06", 0, 0, count, count, size, start, 0))
        return end + _EOCD.size

    def close(self) -> str:
        if self._closed and self._aborted is None:
            return self.path
        self._check_open()
        try:
            self._write_stored(META_NAME, b"", b"", align=False, chunks=meta_chunks(self._keys))
            end = self._write_directory()
            if self._reserved:  # what _reserve added past the end goes
                self._file.flush()
                os.ftruncate(self._file.fileno(), end)
            self._af.commit()
        except BaseException as exc:
            raise self._abort(exc)  # noqa: B904 - chained by write_error
        finally:
            self._release()
        self._closed = True
        self._finalizer.detach()
        return self.path

    def _release(self) -> None:
        _OPEN.discard(self)
        if self._central_file is not None:
            self._central_file.close()
            self._central_file = None
        self._keys.close()

    def _forked(self) -> ReprodError:
        return ReprodError(f"{self.path}: this dump is streamed by process {self._pid}; a forked "
                           "child cannot write to it (open a logger of its own in the child)")

    def keys(self) -> list[str]:
        """The top-level keys added so far, in the order they were first added."""
        if self._pid != os.getpid():
            # past the spill they are in the parent's SQLite database, which the child's copy of
            # the key log has let go of (SQLite's connections are not to be used across a fork)
            raise self._forked()
        if self._closed and self._keys.spilled:
            # close() let go of the spilled keys' index with the files: they are in the dump
            if self._aborted is not None:
                raise ReprodError(f"{self.path}: this dump was abandoned ({self._aborted}); its "
                                  "keys past the first in memory were not kept")
            from . import load

            with load(self.path) as dump:
                return list(dump.keys())
        return self._keys.keys()

    def _abort(self, exc: BaseException, key: Optional[str] = None) -> BaseException:
        """Abandon the dump after ``exc``; returns what to raise: ``exc``, or a system error of the
        write as the ``WriteError`` naming the file (and ``key``)."""
        from .lazy import _one_line  # the reader's module: imported only for this message

        self.abort()
        self._aborted = f"{type(exc).__name__}: {_one_line(exc)}"
        if self._stream and isinstance(exc, WriteError) and not isinstance(exc, StreamWriteError) \
                and isinstance(exc.__cause__, OSError):
            exc = exc.__cause__  # the AtomicFile's (its last flush at close): named as a stream's
        return self._af._error(exc, key, StreamWriteError if self._stream else None)

    def abort(self) -> None:
        """Give the dump up: the temporary file goes, any earlier file at ``path`` stays."""
        if self._closed:
            return
        self._closed = True
        self._aborted = self._aborted or "aborted"
        self._finalizer.detach()
        if self._pid != os.getpid():
            return  # a forked child's copy: the temporary file is its parent's
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

def _write_large(f: Any, prefix: bytes, data: Any) -> None:
    """``f.write(prefix); f.write(data)`` for data of at least ``_WRITEV_FROM`` bytes, in one
    system call from the data's own memory (the buffered file copies data smaller than its 1 MiB
    buffer into the buffer first, and writes a header alone before larger data; 256 KiB - 1 MiB
    members went 5-20 % faster, smaller ones slower): what ``f`` holds goes out first. Only
    absolute seeks follow on ``f``: its cached position is not updated."""
    if _WRITEV is None:  # pragma: no cover - Windows
        f.write(prefix)
        f.write(data)
        return
    f.flush()
    _writev_all(f.fileno(), [prefix, data])  # short writes (a pipe, a signal): the rest follows


_WRITEV_FROM = 256 << 10

# overlap_crcs: members from this size have their CRC computed beside their write (the helper
# thread's hand-over costs tens of us, a 512 KiB CRC ~60 us, its write ~130 us;
# benchmarks/stream_thread.py: 1.77x -> 1.20x of the write floor from here, 1.69x from 1 MiB)
_OVERLAP_FROM = max(512 << 10, _WRITEV_FROM)  # written by _write_large, which flushes first
_CRC = struct.Struct("<I")
_CRC_AT = 14  # the CRC's offset in a local file header
def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done

# the writers not yet closed or aborted, for _silence_in_child
_OPEN: weakref.WeakSet[NpzWriter] = weakref.WeakSet()


def _silence_in_child() -> None:
    """A forked child inherits its parent's open dumps with the bytes their file buffers held, and
    their files' offsets are shared: flushed when the child's copies are closed (at its exit),
    those bytes would land in the parent's file a second time, shifting what the parent writes
    next. In the child those files write to the null device instead (the key log's own files
    and database: ``npz_keylog._disown_in_child``)."""
    _to_null([f for w in list(_OPEN) for f in (w._file, w._central_file) if f is not None])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_silence_in_child)


def _header_and_crc(arr: np.ndarray) -> tuple[bytes, int]:
    """The ``.npy`` header of ``arr`` and its CRC-32, for ``npz_pack``'s cache of them; where
    numpy's header text for the dtype is the formula's, ``npz_pack`` formats the dtype's later
    shapes itself (``_BATCH_DESCRS``)."""
    header = _npy_header(arr)
    descrs = _BATCH_DESCRS
    if descrs is not None:
        dt = arr.dtype
        for i, d in enumerate(_BATCH_DTYPES):
            if d is dt:
                if _formula_holds(dt.str):
                    descrs[i] = dt.str.encode("ascii")
                break
    header_crc = _HEADER_CRCS.get(header)
    if header_crc is None:
        header_crc = crc32(header)
    return header, header_crc


def _batch_dtypes() -> tuple[np.dtype, ...]:
    # numpy's own dtype objects of the plain types, each once by identity ('l' and 'q' are both
    # int64 on Linux, equal but two objects): an array with a byte-swapped, metadata-carrying or
    # otherwise other dtype object goes the Python path
    out: list[np.dtype] = []
    for c in "?bBhHiIlLqQefdFD":
        dt = np.dtype(c)
        if not any(dt is o for o in out):
            out.append(dt)
    return tuple(out)


_BATCH_DTYPES = _batch_dtypes()
_BATCH_HEADERS: dict[bytes, tuple[bytes, int]] = {}  # npz_pack's: (dtype, shape) -> (header, crc)
# npz_pack's: by dtype, the descr of those whose headers it formats (``_formula_header`` in C)
_BATCH_DESCRS: Optional[list[Optional[bytes]]] = [None] * len(_BATCH_DTYPES)
_BATCH_BYTES = 256 << 10  # member bytes npz_pack hands to the file's write at a time (about)
_BATCH_MAX_KEY = 4096  # longer keys go the Python path (a numbered member each)
_BATCH_ITEMS = 8192  # items handed to npz_pack at most, with their rows past the key log's spill


def write_npz(path: str, tree: Mapping[str, Any], source_dtypes: Optional[Mapping[str, Any]] = None) -> str:
    # a dict's keys are unique and nothing asks the writer for them again: no key index
    w = NpzWriter(path, indexed=type(tree) is not dict)
    if cores() >= 2:  # nothing else runs meanwhile: a core for the writes, one for the CRCs
        w.overlap_crcs()
    try:
        w.add_mapping(tree, source_dtypes)
    except BaseException:
        w.abort()
        raise
    return w.close()
