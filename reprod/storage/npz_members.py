"""The native format's members as ``NpzWriter`` writes them: the zip records' layouts, a
member's name and ``.npy`` header, the timestamp, the metadata's JSON pieces (``npz_writer``
writes them; ``npz_format`` has the layout the reader shares)."""

from __future__ import annotations

import itertools
import platform
import re
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .. import _native
from .atomic import AtomicFile
from .npz_format import FORMAT_NAME, FORMAT_VERSION

__all__: list[str] = []  # the writer's private helpers

_ALIGN = 64
_PAD_ID = 0xD935  # the extra-field id zipalign uses for padding
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
# json.dumps(str, ensure_ascii=False) without the json.dumps call around it (json's own C
# function, taken from _json without importing json)
try:
    from _json import encode_basestring as _json_str
except ImportError:  # pragma: no cover - a Python without the C accelerator
    from json.encoder import py_encode_basestring as _json_str  # type: ignore[assignment]
# compiled at first use (~0.16 ms): a save whose members all go through the kernel's batch
# (npz_pack, which checks names in C) never uses it
_SAFE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$"
_SAFE_MEMBER: list[Any] = []


def safe_member(name: str) -> bool:
    """Whether ``name`` may be a member's name as it is (``_SAFE_PATTERN``)."""
    if not _SAFE_MEMBER:
        _SAFE_MEMBER.append(re.compile(_SAFE_PATTERN))
    return _SAFE_MEMBER[0].match(name) is not None


# Keys up to this long keep their name as their member's name; longer ones (a zip name holds at
# most 65,535 bytes) get a numbered member, their name living in the metadata alone.
_MAX_CLEAN_NAME = 1024
# A key (its path joined) may be this long at most: the reader takes metadata of up to 64 MiB.
MAX_KEY_CHARS = 1 << 20
# A member's record, for a re-added key: where it lies (offset, length) and where its central
# directory entry is (position in the directory stream).
_RECORD = struct.Struct("<QQQ")
_DEAD = b"DEAD"  # what a superseded member's central entry starts with instead of PK\x01\x02
_FREE_REGIONS = 1 << 16  # free regions remembered for reuse at most
# the alignment field of a member whose data needs ``pad`` bytes to reach 64, by ``pad``
_PADS = [_PAD_FIELD.pack(_PAD_ID, pad) + b"\0" * pad for pad in range(_ALIGN)]



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


def _abandon(af: AtomicFile, path: str, pid: int) -> None:
    import os

    if os.getpid() != pid:
        return
    af.abort()
    sys.stderr.write(f"reprod: the dump streamed to {path} was never closed, so nothing was written "
                     "(call close() or save(), or use the logger in a with block)\n")


_DOS_TIME: list[Any] = [None, (0, 0)]  # (second, (dos time, dos date)) of the last member
# Every member's (DOS time, DOS date) instead of the clock's, where set: tests compare the files
# two paths write byte for byte (the kernel's batch reads the clock on its own).
_FIXED_DOS: Optional[tuple[int, int]] = None


def _dos_now() -> tuple[int, int]:
    """The member timestamp zipfile would write (local time, 2-second steps), once a second."""
    if _FIXED_DOS is not None:
        return _FIXED_DOS
    now = int(time.time())
    if _DOS_TIME[0] != now:
        y, mo, d, h, mi, sec = time.localtime(now)[:6]
        _DOS_TIME[:] = [now, (h << 11 | mi << 5 | sec // 2, max(y - 1980, 0) << 9 | mo << 5 | d)]
    return _DOS_TIME[1]


def _npy_header(arr: np.ndarray) -> bytes:
    dt = arr.dtype
    # numpy's header is a function of dtype, shape and order (always C here), cached for plain
    # dtypes, where ``dtype.str`` is the header's descr
    if dt.names is not None or dt.subdtype is not None or dt.metadata is not None:
        return _numpy_header(arr)
    key = (dt.str, arr.shape)
    header = _WRITTEN_HEADERS.get(key)
    if header is None:
        # numpy writes a header in ~5 us; dumps of many differently sized arrays have as many
        # shapes as keys, so the text is formatted here where it agrees with numpy's
        header = _formula_header(*key) if _formula_holds(key[0]) else None
        if header is None:
            header = _numpy_header(arr)
        if len(_WRITTEN_HEADERS) < 4096:
            _WRITTEN_HEADERS[key] = header
    return header


def _numpy_header(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    d = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


# The spaces numpy leaves after the shape for the first axis to grow into (from 1.24: 21; none
# before); the probes below check it with the rest of the layout
_GROWTH = getattr(np.lib.format, "GROWTH_AXIS_MAX_DIGITS", 0)
_MAGIC_1_0 = b"\x93NUMPY\x01\x00"


def _formula_header(descr: str, shape: tuple[int, ...]) -> Optional[bytes]:
    """numpy's version 1.0 header of a C-ordered array, as ``_write_array_header`` lays it out;
    None where it would need version 2.0."""
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    if shape:
        text += " " * (_GROWTH - len(repr(shape[0])))
    hlen = len(text) + 1
    total = hlen + _ALIGN - (len(_MAGIC_1_0) + 2 + hlen) % _ALIGN
    if total > 0xFFFF:
        return None
    return (_MAGIC_1_0 + total.to_bytes(2, "little") + text.encode("latin1")
            + b" " * (total - hlen) + b"\n")


# Shapes whose header texts take every length modulo the 64-byte alignment (a text longer or
# shorter than numpy's anywhere moves one of them past a boundary), and first axes of 1 to 19
# digits (the growth padding): ~0.5 ms a dtype, once per process
_PROBE_SHAPES = ((), (0,), *((10**k,) for k in range(19)), *((1,) + (7,) * j for j in range(64)))
_FORMULA_HOLDS: dict[str, bool] = {}


def _formula_holds(descr: str) -> bool:
    """Whether ``_formula_header`` writes this numpy's bytes for ``descr``, checked once per
    dtype (another numpy's layout leaves each header to numpy)."""
    holds = _FORMULA_HOLDS.get(descr)
    if holds is None:
        import io

        holds = True
        try:
            for shape in _PROBE_SHAPES:
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    buf, {"descr": descr, "fortran_order": False, "shape": shape})
                if buf.getvalue() != _formula_header(descr, shape):
                    holds = False
                    break
        except (ValueError, TypeError, AttributeError):
            holds = False
        _FORMULA_HOLDS[descr] = holds
    return holds


_WRITTEN_HEADERS: dict[Any, bytes] = {}
_HEADER_CRCS: dict[bytes, int] = {}  # the CRC-32 of each cached header, by its bytes


def _pieces(f: Any) -> Iterator[bytes]:
    """A side file's bytes from its start, 1 MiB at a time."""
    f.seek(0)
    while True:
        piece = f.read(1 << 20)
        if not piece:
            return
        yield piece


def live_entries(central_file: Any, central: bytearray) -> Iterator[bytes]:
    """The central directory entries written so far (moved to ``central_file``, then those in
    ``central``), in order, less the dead ones."""

    def stream() -> Iterator[bytes]:
        if central_file is not None:
            yield from _pieces(central_file)
        yield bytes(central)

    buf = b""
    pos = 0
    for chunk in stream():
        buf = buf[pos:] + chunk
        pos = 0
        while len(buf) - pos >= 46:
            n, e, c = struct.unpack_from("<HHH", buf, pos + 28)
            end = pos + 46 + n + e + c
            if end > len(buf):
                break
            if buf[pos : pos + 4] != _DEAD:
                yield buf[pos:end]
            pos = end


def meta_chunks(keys: Any) -> Callable[[], Iterator[bytes]]:
    """The metadata member, ``json.dumps`` of {format, version, keys, writer} (UTF-8, or
    ASCII escapes where a key holds a lone surrogate), as chunks assembled from the keys'
    JSON texts, made twice (size and CRC first): from the first reading, kept in memory up to
    ``_KEEP_META`` bytes and past that in an anonymous file beside the dump (the key log's
    texts are read once, never held whole)."""
    head = _META_HEAD.encode("ascii")
    ascii_only = False
    kept: Optional[list[bytes]] = []
    spool: Any = None
    size = 0
    for block in _joined(keys, False):
        if block is None:  # a key with a lone surrogate: JSON's \u escapes carry it
            ascii_only, kept = True, None
            break
        if spool is not None:
            spool.write(block)
            continue
        assert kept is not None
        kept.append(block)
        size += len(block)
        if size > _KEEP_META:
            spool = keys.spool()
            spool.writelines(kept)
            kept = None
    if ascii_only and spool is not None:
        spool = None  # the key log closes it; the ASCII texts are made from the log each time
    tail = ('], "writer": ' + _json_obj(_writer_info()) + "}").encode("ascii" if ascii_only else "utf-8")

    def chunks() -> Iterator[bytes]:
        yield head
        if kept is not None:
            yield from kept
        elif spool is not None:
            spool.flush()
            yield from _pieces(spool)
        else:
            for block in _joined(keys, ascii_only):
                assert block is not None  # ASCII escapes can carry every text
                yield block
        yield tail

    return chunks


def _joined(keys: Any, ascii_only: bool) -> Iterator[Optional[bytes]]:
    """The keys' texts joined by ", " and encoded, a block of up to 4,096 keys (past the key
    log's spill: about 1 MiB) at a time; a block of None where a text cannot be UTF-8
    (``ascii_only`` re-encodes them as JSON's ASCII escapes)."""
    join = _native.kernel()
    join = getattr(join, "join_texts", None) or _join_texts
    first = True
    blocks: Iterator[Any] = keys.text_blocks(4096)
    if keys.texts_file is not None:
        blocks = itertools.chain(blocks, keys.spilled_joined(check=not ascii_only))
    for block in blocks:
        data: Optional[bytes]
        if type(block) is list:  # the dict part's texts, each maybe followed by NUL, records
            if ascii_only:
                data = _ascii_json(", ".join(t for t in (t.partition("\0")[0] for t in block) if t))
            else:
                data = join(block)
        elif ascii_only:  # the spilled part, joined
            data = _ascii_json(block.decode("utf-8", "surrogatepass"))
        else:
            data = block
        if data is None:
            yield None
            return
        if data:
            yield data if first else b", " + data
            first = False


def _ascii_json(joined: str) -> bytes:
    """JSON texts joined by ", ", with every non-ASCII character as JSON's escape (a lone
    surrogate included, which UTF-8 cannot carry)."""
    import json

    return json.dumps(json.loads("[" + joined + "]"), ensure_ascii=True)[1:-1].encode("ascii")


def _join_texts(block: list[str]) -> Optional[bytes]:
    """``_kernel.join_texts`` without the kernel."""
    try:
        return ", ".join(t for t in (t.partition("\0")[0] for t in block) if t).encode("utf-8")
    except UnicodeEncodeError:
        return None


def _json_obj(info: Mapping[str, Any]) -> str:
    """``json.dumps(info, ensure_ascii=False)`` of a dict of strings (the writer's versions),
    without importing json (~2 ms of a process's first save) where every value is a str."""
    if all(type(k) is str and isinstance(v, str) for k, v in info.items()):
        return "{" + ", ".join(_json_str(k) + ": " + _json_str(v) for k, v in info.items()) + "}"
    import json

    return json.dumps(info, ensure_ascii=False)


_META_HEAD = '{"format": ' + _json_str(FORMAT_NAME) + ', "version": ' + str(FORMAT_VERSION) + ', "keys": ['
_KEEP_META = 1 << 20  # metadata up to this size is encoded once, not twice
