"""The native reader's own parse of a zip directory: for a plain uncompressed archive (what
``npz_writer`` and plain ``numpy.savez`` write), one pass of ``struct`` over the central directory
and the local headers instead of ``zipfile``; ``None`` for anything else."""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from .lazy import MappedFile
from .npz_format import _EOCD, _EOCD64, _LOCATOR64

__all__: list[str] = []


# The common case, a dump this module (or plain ``np.savez``) wrote, is read without ``zipfile``:
# one pass of ``struct`` over the central directory and the local headers. Only archives whose
# every field is the plain, consistent kind take this path; anything else (compressed members, an
# archive comment, data descriptors, encryption, duplicate names, a zip inside another file, any
# field that disagrees) goes to ``_read_npz_zipfile``, which then reads or rejects it exactly as
# before. So the fast path never has to produce an error about the zip structure itself.
# central directory entry, 46 bytes: signature, extract version, flags, method, CRC, compressed
# size, size, name/extra/comment lengths, local header offset (the rest is not used)
_CENTRAL = struct.Struct("<4s2xBxHH4xLLLHHH8xL")
_LOCAL = struct.Struct("<4s22xHH")  # local header, 30 bytes: signature, name and extra lengths
_FIELD = struct.Struct("<HH")
_Q = struct.Struct("<Q")
_MAX_EXTRACT_VERSION = 63  # zipfile refuses more
_UTF8_NAME = 0x800
_ALT_SEP = os.sep if os.sep != "/" else "\0"  # zipfile turns os.sep into "/"


class Directory(Mapping[str, tuple[int, int, int]]):
    """member name -> (data start, size, CRC32), in directory order, held as columns: a million
    members held a name, a tuple and three ints each (~270 bytes) while a dump was opened; here
    21 bytes a member, names decoded from the mapping when asked for. ``at(i, name)`` looks a
    name up at the index a reader expects it at first (a dump lists its members in its keys'
    order); the name -> index table is built only when that guess misses."""

    __slots__ = ("_buf", "_name_at", "_name_len", "_utf8", "_start", "_size", "_crc", "_index")

    def __init__(self, buf: Any) -> None:
        self._buf = buf
        self._name_at, self._name_len, self._utf8 = array("q"), array("I"), bytearray()
        self._start, self._size, self._crc = array("q"), array("q"), array("I")
        self._index: Optional[dict[str, int]] = None

    def name(self, i: int) -> str:
        a = self._name_at[i]
        return _decode(self._buf[a : a + self._name_len[i]], self._utf8[i])  # type: ignore[return-value]

    def row(self, i: int) -> tuple[int, int, int]:
        return self._start[i], self._size[i], self._crc[i]

    def at(self, i: int, name: str) -> Optional[tuple[int, int, int]]:
        if self._index is None and 0 <= i < len(self._start) and self.name(i) == name:
            return self.row(i)
        return self.get(name)

    def _lookup(self) -> dict[str, int]:
        if self._index is None:
            self._index = {self.name(i): i for i in range(len(self._start))}
        return self._index

    def __getitem__(self, name: str) -> tuple[int, int, int]:
        return self.row(self._lookup()[name])

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        i = self._lookup().get(name)
        return default if i is None else self.row(i)

    def __contains__(self, name: object) -> bool:
        return name in self._lookup()

    def __iter__(self) -> Iterator[str]:
        return (self.name(i) for i in range(len(self._start)))

    def __len__(self) -> int:
        return len(self._start)


def _decode(raw: bytes, utf8: int) -> Optional[str]:
    try:
        return raw.decode("ascii")  # cp437 and UTF-8 agree on ASCII names
    except UnicodeDecodeError:
        try:
            return raw.decode("utf-8" if utf8 else "cp437")
        except UnicodeDecodeError:
            return None


def _fast_directory(mf: MappedFile) -> Optional[Directory]:
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
    got = _kernel_directory(mf, buf, cd_off, cd_end)
    if got is not None:
        members, hashes, listed = got
    else:
        members, hashes, listed, pos = _python_directory(mf, buf, cd_off, cd_end)
        if pos != cd_end:
            return None
    if listed != claimed:
        return None
    # a duplicate name shadows a member: equal hashes are looked at by name (zipfile's rule)
    if listed > 1:
        import numpy as np

        h = np.sort(np.frombuffer(hashes, dtype=np.int64))
        if (h[1:] == h[:-1]).any() and len(members._lookup()) != listed:
            return None
    return members


# entries the kernel reads between two drop_pages (as the Python loop drops them)
_KERNEL_RUN = 0x10000


def _kernel_directory(mf: MappedFile, buf: Any, cd_off: int, cd_end: int
                      ) -> Optional[tuple[Directory, array, int]]:
    """The directory read by the kernel's ``zip_central`` (the loop below, for the plain kind of
    entry with an ASCII name), or None where it is off or meets any other kind of entry."""
    from .._native import kernel

    k = kernel()
    if k is None:
        return None
    import numpy as np

    members = Directory(buf)
    hashes = array("q")
    pos = cd_off
    listed = 0
    while pos < cd_end:
        got = k.zip_central(buf, pos, cd_end, mf.size, _KERNEL_RUN)
        if got is None:
            return None
        pos, raw = got
        rec = np.frombuffer(raw, dtype=np.int64).reshape(-1, 7)
        members._name_at.frombytes(rec[:, 0].tobytes())
        members._name_len.frombytes(rec[:, 1].astype(np.uint32).tobytes())
        members._utf8 += rec[:, 2].astype(np.uint8).tobytes()
        members._start.frombytes(rec[:, 3].tobytes())
        members._size.frombytes(rec[:, 4].tobytes())
        members._crc.frombytes(rec[:, 5].astype(np.uint32).tobytes())
        hashes.frombytes(rec[:, 6].tobytes())
        listed += len(rec)
        if pos < cd_end:  # a large archive's headers, read, leave resident memory as read
            mf.drop_pages()
    return members, hashes, listed


def _python_directory(mf: MappedFile, buf: Any, cd_off: int, cd_end: int
                      ) -> tuple[Directory, array, int, int]:
    """The directory's entries read one by one with ``struct``: (members, name hashes, count,
    where it stopped: short of ``cd_end`` at an entry this reader does not take)."""
    size = mf.size
    members = Directory(buf)
    hashes = array("q")
    name_at, name_len, utf8 = members._name_at, members._name_len, members._utf8
    starts, sizes, crcs = members._start, members._size, members._crc
    listed = 0
    unpack_central, unpack_local, unpack_field = _CENTRAL.unpack_from, _LOCAL.unpack_from, _FIELD.unpack_from
    pos = cd_off
    while pos < cd_end:
        if pos + 46 > cd_end:
            return members, hashes, listed, -1
        sig, version, flags, method, crc, csize, usize, n, e, c, off = unpack_central(buf, pos)
        if sig != b"PK\x01\x02" or version > _MAX_EXTRACT_VERSION or flags & ~_UTF8_NAME or method:
            return members, hashes, listed, -1
        p = pos + 46
        pos = p + n + e + c
        if pos > cd_end:
            return members, hashes, listed, -1
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
                    return members, hashes, listed, -1
                if tp == 1:
                    z, z_end = x, x + ln
                    if usize == 0xFFFFFFFF:
                        if z + 8 > z_end:
                            return members, hashes, listed, -1
                        usize = _Q.unpack_from(buf, z)[0]
                        z += 8
                    if csize == 0xFFFFFFFF:
                        if z + 8 > z_end:
                            return members, hashes, listed, -1
                        csize = _Q.unpack_from(buf, z)[0]
                        z += 8
                    if off == 0xFFFFFFFF:
                        if z + 8 > z_end:
                            return members, hashes, listed, -1
                        off = _Q.unpack_from(buf, z)[0]
                x += ln
        if csize != usize or off + 30 > size:
            return members, hashes, listed, -1
        lsig, ln, le = unpack_local(buf, off)
        start = off + 30 + ln + le
        if lsig != b"PK\x03\x04" or ln != n or start + usize > size or buf[off + 30 : start - le] != raw:
            return members, hashes, listed, -1
        name = _decode(raw, flags & _UTF8_NAME)
        # zipfile cuts a name at a NUL and rewrites os.sep
        if name is None or "\0" in name or _ALT_SEP in name:
            return members, hashes, listed, -1
        hashes.append(hash(name))
        name_at.append(p)
        name_len.append(n)
        utf8.append(1 if flags & _UTF8_NAME else 0)
        starts.append(start)
        sizes.append(usize)
        crcs.append(crc)
        listed += 1
        if not listed & 0xFFFF:  # a large archive's headers, read, leave resident memory as read
            mf.drop_pages()
    return members, hashes, listed, pos
