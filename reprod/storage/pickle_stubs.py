"""The objects the restricted unpickler (``pickle_walker``) builds instead of running a pickle:
references to bytes left in the file, stand-ins for numpy arrays, dtypes and scalars, and the
table of the only globals it accepts."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..errors import DumpFormatError
from .npy_header import _DTYPE_PARSE_ERRORS, _short

__all__ = ["SAFE_GLOBALS", "MAX_DTYPE_STRING"]


_RECONSTRUCT, _NDARRAY, _DTYPE, _SCALAR, _ENCODE, _ODICT, _BYTES, _FROMBUFFER = range(8)

# The only globals a pickled dict of numpy arrays needs, and why each is harmless: they construct
# arrays, dtypes, scalars, bytes or dicts from data, and call nothing the file names.
SAFE_GLOBALS: dict[tuple[str, str], int] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("_codecs", "encode"): _ENCODE,  # how protocol 2 spells bytes
    ("collections", "OrderedDict"): _ODICT,
    ("__builtin__", "bytes"): _BYTES,  # protocols 0-2 spell an empty bytes as bytes()
    ("builtins", "bytes"): _BYTES,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,  # protocol 5 arrays
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
}

# Payloads at least this long are left in the file and viewed in place; shorter ones are copied.
_INLINE_LIMIT = 256



class _Payload:
    """A byte string left in the file: its absolute offset and length."""

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length


class _Py2Payload(_Payload):
    """A long Python 2 ``str`` (BINSTRING), left in the file: bytes where numpy wants bytes (an
    array's data), latin-1 text where a str is wanted (a key, a dtype), as
    ``numpy.load(encoding="latin1")`` reads it."""

    __slots__ = ()


class _Py2Str(bytes):
    """A short Python 2 ``str`` (SHORT_BINSTRING, BINSTRING): see ``_Py2Payload``."""

    __slots__ = ()


# numpy's own bound on a header's length (numpy.lib.format._MAX_HEADER_SIZE): dtype strings from a
# pickle are held to it too; a numeric dtype's string has a few characters
MAX_DTYPE_STRING = 10_000


class _Global:
    __slots__ = ("kind", "name")

    def __init__(self, kind: int, name: str) -> None:
        self.kind = kind
        self.name = name


class _DtypeStub:
    __slots__ = ("descr", "byteorder", "structured", "_parsed", "text")

    def __init__(self, descr: str) -> None:
        self.descr = descr
        self.byteorder = "|"
        self.structured = False
        # the parse of this stub, dtype or error text: a memoized dtype is referenced by every
        # array of its kind, and is parsed once (BUILD, which changes it, clears this)
        self._parsed: Any = None
        self.text: Optional[str] = None  # the dtype as messages show it, made once (legacy)

    def to_dtype(self, where: Any) -> np.dtype:
        """The numpy dtype; ``DumpFormatError`` for one that does not parse or is structured.
        ``where`` (str() of it) names the key in the message."""
        parsed = self._parsed
        if parsed is None:
            parsed = self._parsed = self._parse()
        if type(parsed) is str:
            raise DumpFormatError(f"{where}: {parsed}")
        return parsed

    def _parse(self) -> Any:
        if self.structured:
            return "structured dtype is not numeric data"
        cached = _STUB_DTYPES.get((self.descr, self.byteorder))
        if cached is not None:  # a dump repeats a handful of dtypes thousands of times
            return cached
        try:
            dt = np.dtype(self.descr)
        except _DTYPE_PARSE_ERRORS:
            return f"unknown dtype {_short(self.descr)}"
        if self.byteorder in ("<", ">") and dt.itemsize > 1:
            dt = dt.newbyteorder(self.byteorder)
        if len(self.descr) <= 16 and len(self.byteorder) == 1 and len(_STUB_DTYPES) < 256:
            _STUB_DTYPES[(self.descr, self.byteorder)] = dt
        return dt


# (descr, byteorder) -> dtype, for _DtypeStub.to_dtype; numpy dtypes are immutable
_STUB_DTYPES: dict[tuple[str, str], np.dtype] = {}


class _ArrayStub:
    # spec: what legacy._leaf made of it, so that a stub the memo shares is walked once
    __slots__ = ("shape", "dtype", "fortran", "data", "built", "spec")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: Optional[_DtypeStub] = None
        self.fortran = False
        self.data: Any = None
        self.built = False
        self.spec: Any = None


# A memo entry standing for the state tuple ``(1, shape, dtype, fortran, data)`` of the array whose
# stub lies two entries (three with a memoized shape) before it: built only if a later opcode
# asks for it (numpy's pickles never do), where each array held its own tuple.
_STATE = object()


def _state_at(items: list[Any], i: int) -> tuple[Any, ...]:
    stub = items[i - 2]
    if type(stub) is not _ArrayStub:
        stub = items[i - 3]
    return (1, stub.shape, stub.dtype, stub.fortran, stub.data)


class _Memo:
    """The pickle memo, index -> object, with a dict's meaning: a list while the indices come in
    order (MEMOIZE, and the BINPUTs of protocols 2-3, as numpy's pickles write them), a dict from
    the first index out of order on. A million arrays put ~7 million entries here: as a dict
    with int keys that was ~500 bytes an array, the largest part of the peak of a load."""

    __slots__ = ("items", "table")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.table: Optional[dict[int, Any]] = None

    def __len__(self) -> int:
        return len(self.items) if self.table is None else len(self.table)

    def __contains__(self, i: int) -> bool:
        if self.table is None:
            return 0 <= i < len(self.items)
        return i in self.table

    def get(self, i: int, default: Any = None) -> Any:
        if self.table is None:
            if not 0 <= i < len(self.items):
                return default
            v = self.items[i]
            return _state_at(self.items, i) if v is _STATE else v
        return self.table.get(i, default)

    def __getitem__(self, i: int) -> Any:
        if self.table is None:
            if 0 <= i < len(self.items):
                v = self.items[i]
                return _state_at(self.items, i) if v is _STATE else v
            raise KeyError(i)
        return self.table[i]

    def __setitem__(self, i: int, value: Any) -> None:
        if self.table is None:
            n = len(self.items)
            if i == n:
                self.items.append(value)
                return
            if 0 <= i < n:
                self._resolve()  # an overwritten stub must not change a state built from it
                self.items[i] = value
                return
            self._resolve()
            self.table = dict(enumerate(self.items))
            self.items = []
        self.table[i] = value

    def _resolve(self) -> None:
        items = self.items
        for i, v in enumerate(items):
            if v is _STATE:
                items[i] = _state_at(items, i)

    def add(self, value: Any) -> None:
        """``memo[len(memo)] = value``."""
        if self.table is None:
            self.items.append(value)
        else:
            self.table[len(self.table)] = value


class _Scalar:
    __slots__ = ("dtype", "data")

    def __init__(self, dtype: _DtypeStub, data: Any) -> None:
        self.dtype = dtype
        self.data = data
