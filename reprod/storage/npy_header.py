"""The ``.npy`` header, read from a file and never trusted: ``parse_npy_header`` for both readers
(reprod_log's ``.npy`` and the members of an ``.npz``), with one cache of the headers that parsed
and passed every check, and ``check_shape``, the bound on any shape a file claims."""

from __future__ import annotations

import ast
import re
import struct
import warnings
from typing import Any

import numpy as np

from ..errors import DumpFormatError

__all__ = ["parse_npy_header", "check_shape", "MAX_DEPTH", "MAX_NDIM", "MAX_HEADER_SIZE"]

# nested dicts deeper than this are refused: real dumps nest a few levels, and the readers recurse
MAX_DEPTH = 64
# numpy's own limit on dimensions (NPY_MAXDIMS in numpy 2)
MAX_NDIM = 64
# One payload can be the value of many keys (a pickle's memo, or many .npz metadata entries
# naming one member): the keys of a dump may refer to at most this many bytes of data in all,
# counted once per key, before the file is refused: comparing (or copying) what a file describes
# stays within a constant factor of the file's own size. A genuine dump refers to its payloads
# once each (numbers written as pickle integers widen at most 8 times). Both readers use it.
ALIAS_FACTOR = 64
ALIAS_FLOOR = 64 << 20
# numpy's own limit on a header's length (numpy.lib.format._MAX_HEADER_SIZE, which np.load applies
# to any file it does not trust); numpy writes 118-byte headers for numeric arrays
MAX_HEADER_SIZE = 10_000

# what numpy's dtype parser raises on strings from a damaged file (a comma string goes through
# ast.literal_eval, hence SyntaxError)
_DTYPE_PARSE_ERRORS = (TypeError, ValueError, OverflowError, KeyError, IndexError, SyntaxError,
                       RecursionError)


def _short(x: Any, limit: int = 80, depth: int = 0) -> str:
    """A repr bounded in length and never recursing deeply (the value comes from the file)."""
    if isinstance(x, (str, bytes, float, bool)) or x is None or isinstance(x, int) and x.bit_length() < 256:
        r = repr(x)
    elif isinstance(x, tuple) and depth < 2:
        r = "(" + ", ".join(_short(v, 20, depth + 1) for v in x[:8]) + (", ..." if len(x) > 8 else "") + ")"
    else:
        r = f"<{type(x).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def check_shape(shape: Any, itemsize: int, where: str) -> tuple[int, ...]:
    """A shape read from a file, checked before anything is sized by it: a tuple of at most 64
    non-negative ints whose byte size (zero dimensions aside) fits numpy's index type."""
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM:
        raise DumpFormatError(f"{where} (bad array shape {_short(shape)})")
    for s in shape:  # a plain loop: a generator in all() costs more than the check (many keys)
        if type(s) is not int or s < 0:
            raise DumpFormatError(f"{where} (bad array shape {_short(shape)})")
    n = max(itemsize, 1)
    for s in shape:
        n *= max(s, 1)
        if n >= 1 << 63:
            raise DumpFormatError(f"{where} (array shape {_short(shape)} is too large for any memory)")
    return shape


def parse_npy_header(buf: Any, start: int, end: int, path: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran, data offset) of the .npy header at ``buf[start:]``; never trusts it."""
    if end - start < 10 or bytes(buf[start : start + 6]) != b"\x93NUMPY":
        raise DumpFormatError(f"{path}: not an .npy file (bad magic)")
    major = buf[start + 6]
    if major == 1:
        hlen = struct.unpack_from("<H", buf, start + 8)[0]
        hstart = start + 10
    elif major in (2, 3):
        if end - start < 12:
            raise DumpFormatError(f"{path}: truncated .npy header")
        hlen = struct.unpack_from("<I", buf, start + 8)[0]
        hstart = start + 12
    else:
        raise DumpFormatError(f"{path}: unsupported .npy version {major}")
    if hlen > MAX_HEADER_SIZE:
        raise DumpFormatError(f"{path}: .npy header of {hlen} bytes is longer than numpy's limit "
                              f"of {MAX_HEADER_SIZE}")
    if hstart + hlen > end:
        raise DumpFormatError(f"{path}: truncated .npy header")
    hend = hstart + hlen
    key = bytes(buf[start:hend])
    hit = _HEADERS.get(key)
    if hit is not None:  # a dump repeats a few headers: each is parsed and checked once per process
        return hit[0], hit[1], hit[2], hend
    text = key[hstart - start :].decode("utf-8" if major == 3 else "latin1", "replace")
    m = _NUMPY_HEADER.match(text)
    if m:  # the exact form numpy writes: parsed without ast (20x faster on dumps of many keys)
        descr: Any = m.group(1)
        fortran: Any = m.group(2) == "True"
        shape: Any = tuple(int(x) for x in m.group(3).replace(",", " ").split())
    else:
        try:
            with warnings.catch_warnings():  # a damaged header can make the parser warn
                warnings.simplefilter("ignore")
                d = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DumpFormatError(f"{path}: corrupt .npy header") from None
        if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
            raise DumpFormatError(f"{path}: corrupt .npy header (wrong fields)")
        descr, shape, fortran = d["descr"], d["shape"], d["fortran_order"]
    if not isinstance(fortran, bool):
        raise DumpFormatError(f"{path}: corrupt .npy header (bad fortran_order)")
    dt = _descr_dtype(descr, path)
    shape = check_shape(shape, dt.itemsize, f"{path}: corrupt .npy header")
    long = hend - start > _HEADER_BYTES
    if len(_HEADERS) < _HEADER_ENTRIES and (not long or _LONG_HEADERS[0] < _LONG_HEADER_ENTRIES):
        # numpy writes 128 bytes; a file's header may be 10,000: a few of those are kept too, so
        # that members repeating one long header are parsed once
        _LONG_HEADERS[0] += long
        nbytes = dt.itemsize
        for s in shape:
            nbytes *= s
        _HEADERS[key] = (dt, shape, fortran, hend - start, nbytes)
    return dt, shape, fortran, hend


# The one header cache of both readers: full header bytes (magic, version, length, text) ->
# (dtype, shape, fortran, header length, data bytes) of headers that parsed and passed every check
# of ``parse_npy_header``. The dtype may still be one a reader refuses (object, str): each reader
# checks that itself, hit or not. ``npz_reader`` looks its members' version-1 headers up here
# directly, by their bytes, before calling ``parse_npy_header``.
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int, int]] = {}
_HEADER_BYTES = 512
_LONG_HEADER_ENTRIES = 64
_LONG_HEADERS = [0]  # how many of the cached headers are longer than _HEADER_BYTES
_HEADER_ENTRIES = 4096

# numpy's header, as ``numpy.lib.format`` writes it for plain (non-structured) dtypes
_NUMPY_HEADER = re.compile(
    r"\{'descr': '([<>|=]?[a-zA-Z][0-9]{0,3})', 'fortran_order': (True|False), "
    r"'shape': \((|[0-9]{1,19},|[0-9]{1,19}(?:, [0-9]{1,19})+)\), \} *\n?\Z")
_DESCR_CACHE: dict[str, np.dtype] = {}


def _descr_dtype(descr: Any, path: str) -> np.dtype:
    if isinstance(descr, str) and descr in _DESCR_CACHE:
        return _DESCR_CACHE[descr]
    try:
        dt = np.lib.format.descr_to_dtype(descr)
    except _DTYPE_PARSE_ERRORS:
        raise DumpFormatError(f"{path}: corrupt .npy header (bad dtype {_short(descr)})") from None
    if isinstance(descr, str) and len(_DESCR_CACHE) < 256:
        _DESCR_CACHE[descr] = dt
    return dt
