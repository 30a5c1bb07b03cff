"""The restricted unpickler: a small pickle machine that walks the opcodes of a pickled dict of numpy
arrays without running anything.

It accepts only the globals numpy needs to rebuild arrays, dtypes and scalars (plus plain
containers), and records where each array's bytes lie in the file instead of copying them; anything
else is refused with ``UnsafeDumpError`` before it could run. What it returns (dicts, lists and the
stubs below) is turned into a lazy tree by ``legacy.tree_from_pickle``.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

import numpy as np

from .._native import scanner
from ..errors import DumpFormatError, UnsafeDumpError
from .npy_header import _DTYPE_PARSE_ERRORS, _short, check_shape

__all__ = ["SAFE_GLOBALS", "restricted_unpickle"]

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
    __slots__ = ("shape", "dtype", "fortran", "data", "built")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: Optional[_DtypeStub] = None
        self.fortran = False
        self.data: Any = None
        self.built = False


class _Scalar:
    __slots__ = ("dtype", "data")

    def __init__(self, dtype: _DtypeStub, data: Any) -> None:
        self.dtype = dtype
        self.data = data


class _PickleWalker:
    """Interprets the subset of the pickle protocol numpy's pickles use, without calling anything."""

    def __init__(self, buf: Any, start: int, end: int, path: str) -> None:
        self.buf = buf
        self.pos = start
        self.end = end
        self.path = path
        self.steps = 0
        # (shape, dtype stub) -> the checked shape, for _commit_array
        self._shapes: dict[tuple[tuple[int, ...], _DtypeStub], tuple[int, ...]] = {}

    # -- reading primitives -----------------------------------------------------------------------
    def _need(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise DumpFormatError(f"{self.path}: truncated or corrupt pickle at byte {p}")
        self.pos = p + n
        return p

    def _bytes(self, n: int) -> bytes:
        p = self._need(n)
        return bytes(self.buf[p : p + n])

    def _u8(self) -> int:
        p = self._need(1)
        return self.buf[p]

    def _unpack(self, fmt: str, n: int) -> Any:
        p = self._need(n)
        return struct.unpack_from(fmt, self.buf, p)[0]

    def _line(self) -> bytes:
        p = self.pos
        nl = self.buf.find(b"\n", p, self.end)
        if nl < 0:
            raise DumpFormatError(f"{self.path}: truncated pickle (unterminated line at byte {p})")
        self.pos = nl + 1
        return bytes(self.buf[p:nl])

    def _blob(self, n: int) -> Any:
        if n >= _INLINE_LIMIT:
            p = self._need(n)
            return _Payload(p, n)
        return self._bytes(n)

    def _py2_blob(self, n: int) -> Any:
        if n >= _INLINE_LIMIT:
            p = self._need(n)
            return _Py2Payload(p, n)
        return _Py2Str(self._bytes(n))

    def _as_str(self, x: Any) -> Any:
        """A Python 2 str as the text ``numpy.load(encoding="latin1")`` makes of it; anything
        else unchanged."""
        if type(x) is _Py2Str:
            return x.decode("latin1")
        if type(x) is _Py2Payload:
            return bytes(self.buf[x.offset : x.offset + x.length]).decode("latin1")
        return x

    def _text(self, n: int) -> str:
        try:
            # pickle writes str with "surrogatepass": a key holding a lone surrogate (a file name
            # decoded with surrogateescape) must read back
            return self._bytes(n).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise DumpFormatError(f"{self.path}: corrupt pickle (bad UTF-8 string)") from None

    # -- the machine --------------------------------------------------------------------------------
    def run(self) -> Any:
        stack: list[Any] = []
        memo: dict[int, Any] = {}
        marks: list[int] = []

        def pop_mark() -> list[Any]:
            if not marks:
                raise DumpFormatError(f"{self.path}: corrupt pickle (no mark)")
            m = marks.pop()
            items = stack[m:]
            del stack[m:]
            return items

        def pop() -> Any:
            if not stack:
                raise DumpFormatError(f"{self.path}: corrupt pickle (stack underflow at byte {self.pos})")
            return stack.pop()

        scan = scanner()  # the kernel's scanner, or None: the generic loop alone
        while True:
            if self.pos >= self.end:
                raise DumpFormatError(f"{self.path}: truncated pickle (no STOP opcode)")
            if scan is not None and self.buf[self.pos] == 0x8C:  # SHORT_BINUNICODE: a key?
                at = self.pos
                self._scan_items(stack, memo)
                if self.pos != at:
                    continue
            op = self._u8()
            self.steps += 1
            if op == 0x68 and self._fast_array(stack, memo):  # BINGET starting numpy's array form
                continue
            if op == 0x94:  # MEMOIZE (the commonest opcode: tested first)
                if not stack:
                    raise DumpFormatError(f"{self.path}: corrupt pickle (memoize on empty stack)")
                memo[len(memo)] = stack[-1]
            elif op == 0x80:  # PROTO
                self._u8()
            elif op == 0x95:  # FRAME: a length prefix only; opcodes continue inline
                self._need(8)
            elif op == 0x2E:  # STOP
                if len(stack) != 1:
                    raise DumpFormatError(f"{self.path}: corrupt pickle (stack has {len(stack)} items at STOP)")
                return stack[0]
            elif op == 0x28:  # MARK
                marks.append(len(stack))
            elif op == 0x4E:  # NONE
                stack.append(None)
            elif op == 0x88:
                stack.append(True)
            elif op == 0x89:
                stack.append(False)
            elif op == 0x4B:  # BININT1
                stack.append(self._u8())
            elif op == 0x4D:  # BININT2
                stack.append(self._unpack("<H", 2))
            elif op == 0x4A:  # BININT
                stack.append(self._unpack("<i", 4))
            elif op == 0x8A:  # LONG1
                n = self._u8()
                stack.append(int.from_bytes(self._bytes(n), "little", signed=True))
            elif op == 0x8B:  # LONG4
                n = self._unpack("<i", 4)
                if n > 64:
                    raise DumpFormatError(f"{self.path}: corrupt pickle (integer of {n} bytes)")
                stack.append(int.from_bytes(self._bytes(n), "little", signed=True))
            elif op == 0x49:  # INT (protocol 0)
                line = self._line()
                stack.append({b"00": False, b"01": True}.get(line) if line in (b"00", b"01") else self._int(line))
            elif op == 0x4C:  # LONG (protocol 0)
                stack.append(self._int(self._line().rstrip(b"L")))
            elif op == 0x47:  # BINFLOAT
                stack.append(self._unpack(">d", 8))
            elif op == 0x46:  # FLOAT (protocol 0)
                try:
                    stack.append(float(self._line()))
                except ValueError:
                    raise DumpFormatError(f"{self.path}: corrupt pickle (bad float)") from None
            elif op == 0x8C:  # SHORT_BINUNICODE
                stack.append(self._text(self._u8()))
            elif op == 0x58:  # BINUNICODE
                stack.append(self._text(self._unpack("<I", 4)))
            elif op == 0x8D:  # BINUNICODE8
                stack.append(self._text(self._unpack("<Q", 8)))
            elif op == 0x56:  # UNICODE (protocol 0, raw-unicode-escape)
                stack.append(self._line().decode("raw_unicode_escape", errors="replace"))
            elif op == 0x43:  # SHORT_BINBYTES
                stack.append(self._blob(self._u8()))
            elif op == 0x42:  # BINBYTES
                stack.append(self._blob(self._unpack("<I", 4)))
            elif op == 0x8E:  # BINBYTES8
                stack.append(self._blob(self._unpack("<Q", 8)))
            elif op == 0x96:  # BYTEARRAY8
                stack.append(self._blob(self._unpack("<Q", 8)))
            elif op == 0x55:  # SHORT_BINSTRING (a Python 2 str)
                stack.append(self._py2_blob(self._u8()))
            elif op == 0x54:  # BINSTRING
                stack.append(self._py2_blob(self._unpack("<i", 4)))
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({})
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([])
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
            elif op == 0x74:  # TUPLE
                stack.append(tuple(pop_mark()))
            elif op == 0x85:
                stack.append((pop(),))
            elif op == 0x86:
                b = pop()
                stack.append((pop(), b))
            elif op == 0x87:
                c = pop()
                b = pop()
                stack.append((pop(), b, c))
            elif op == 0x6C:  # LIST
                stack.append(pop_mark())
            elif op == 0x64:  # DICT
                items = pop_mark()
                stack.append(self._pairs({}, items))
            elif op == 0x61:  # APPEND
                v = pop()
                self._as(stack, list).append(v)
            elif op == 0x65:  # APPENDS
                items = pop_mark()
                self._as(stack, list).extend(items)
            elif op == 0x73:  # SETITEM
                v = pop()
                k = pop()
                self._pairs(self._as(stack, dict), [k, v])
            elif op == 0x75:  # SETITEMS
                items = pop_mark()
                self._pairs(self._as(stack, dict), items)
            elif op == 0x71:  # BINPUT
                memo[self._u8()] = self._top(stack)
            elif op == 0x72:  # LONG_BINPUT
                memo[self._unpack("<I", 4)] = self._top(stack)
            elif op == 0x70:  # PUT
                memo[self._int(self._line())] = self._top(stack)
            elif op in (0x68, 0x6A, 0x67):  # BINGET, LONG_BINGET, GET
                idx = self._u8() if op == 0x68 else self._unpack("<I", 4) if op == 0x6A else self._int(self._line())
                if idx not in memo:
                    raise DumpFormatError(f"{self.path}: corrupt pickle (memo {idx} unset)")
                stack.append(memo[idx])
            elif op == 0x93:  # STACK_GLOBAL
                name = pop()
                module = pop()
                if not isinstance(module, str) or not isinstance(name, str):
                    raise DumpFormatError(f"{self.path}: corrupt pickle (bad global name)")
                stack.append(self._global(module, name))
            elif op == 0x63:  # GLOBAL
                module = self._line().decode("utf-8", "replace")
                name = self._line().decode("utf-8", "replace")
                stack.append(self._global(module, name))
            elif op == 0x52:  # REDUCE
                args = pop()
                func = pop()
                stack.append(self._reduce(func, args))
            elif op == 0x62:  # BUILD
                state = pop()
                self._build(self._top(stack), state)
            elif op in (0x81, 0x92):  # NEWOBJ, NEWOBJ_EX
                raise UnsafeDumpError(f"{self.path}: refuses to build objects of a class (NEWOBJ); "
                                      "only numpy arrays, scalars and plain containers are allowed")
            elif op in (0x69, 0x6F, 0x82, 0x83, 0x84, 0x50, 0x51):  # INST, OBJ, EXT*, PERSID
                raise UnsafeDumpError(f"{self.path}: refuses pickle opcode 0x{op:02x} "
                                      "(it would build or look up arbitrary objects)")
            else:
                raise DumpFormatError(f"{self.path}: unsupported or corrupt pickle opcode 0x{op:02x} at byte {self.pos - 1}")

    def _fast_array(self, stack: list[Any], memo: dict[int, Any]) -> bool:
        """Consume one array in the exact opcode sequence numpy's ``__reduce__`` yields under
        protocol 4 (``np.save``'s), after its first BINGET (already read); False, with nothing
        consumed, for anything else, which the generic loop then walks. Same stack, memo, step
        count and checks as the generic loop, without dispatching ~25 opcodes one by one::

            BINGET _reconstruct  BINGET ndarray  BININT1 0  TUPLE1 MEMOIZE  BINGET b"b"  TUPLE3
            MEMOIZE  REDUCE MEMOIZE  MARK BININT1 1  <dims> TUPLEn MEMOIZE | EMPTY_TUPLE
            BINGET dtype  NEWTRUE|NEWFALSE  (SHORT_)BINBYTES(8) <data> [FRAME]  MEMOIZE
            TUPLE MEMOIZE BUILD
        """
        buf, p, end = self.buf, self.pos, self.end
        if p + 17 > end or buf[p + 1] != 0x68 or buf[p + 3 : p + 8] != b"K\x00\x85\x94h" \
                or buf[p + 9 : p + 16] != b"\x87\x94R\x94(K\x01":
            return False
        rec, nd, third = memo.get(buf[p]), memo.get(buf[p + 2]), buf[p + 8]
        if not (type(rec) is _Global and rec.kind == _RECONSTRUCT and type(nd) is _Global
                and nd.kind == _NDARRAY and third in memo):
            return False
        q = p + 16
        steps = 11  # the opcodes above, after the BINGET the loop counted
        dims: list[int] = []
        while q + 5 <= end:
            c = buf[q]
            if c == 0x4B:  # BININT1
                dims.append(buf[q + 1])
                q += 2
            elif c == 0x4D:  # BININT2
                dims.append(buf[q + 1] | buf[q + 2] << 8)
                q += 3
            elif c == 0x4A:  # BININT
                dims.append(int.from_bytes(buf[q + 1 : q + 5], "little", signed=True))
                q += 5
            else:
                break
        if q + 4 > end:
            return False
        steps += len(dims)
        c = buf[q]
        if c == 0x29 and not dims:  # EMPTY_TUPLE (never memoized)
            shape_memo = False
            q += 1
            steps += 1
        elif dims and c - 0x84 == len(dims) and buf[q + 1] == 0x94:  # TUPLE1-3 MEMOIZE
            shape_memo = True
            q += 2
            steps += 2
        else:
            return False
        if q + 4 > end or buf[q] != 0x68 or buf[q + 2] not in (0x88, 0x89):
            return False
        dtype = memo.get(buf[q + 1])
        if type(dtype) is not _DtypeStub:
            return False
        fortran = buf[q + 2] == 0x88
        c = buf[q + 3]
        q += 4
        if c == 0x43:  # SHORT_BINBYTES
            if q + 1 > end:
                return False
            n, q = buf[q], q + 1
        elif c == 0x42:  # BINBYTES
            if q + 4 > end:
                return False
            n, q = struct.unpack_from("<I", buf, q)[0], q + 4
        elif c == 0x8E:  # BINBYTES8
            if q + 8 > end:
                return False
            n, q = struct.unpack_from("<Q", buf, q)[0], q + 8
        else:
            return False
        data_at = q
        q += n
        steps += 3
        if q + 9 <= end and buf[q] == 0x95:  # FRAME: a large payload is written between frames
            q += 9
            steps += 1
        if q + 4 > end or buf[q : q + 4] != b"\x94t\x94b":
            return False
        self._commit_array(stack, memo, nd, third, tuple(dims), shape_memo, dtype, fortran,
                           data_at, n)
        self.pos = q + 4
        self.steps += steps + 4
        return True

    def _commit_array(self, stack: list[Any], memo: dict[int, Any], nd: _Global, third: int,
                      shape: tuple[int, ...], shape_memo: bool, dtype: _DtypeStub, fortran: bool,
                      data_at: int, n: int) -> None:
        """The stack and memo entries of one array in numpy's form, in the order the generic loop
        makes them (its memo references already checked), and what ``_build`` makes of the stub.
        Runs once per array of a dump: ``_build``'s checks of a state it built itself are left out,
        and shape checks are cached per (shape, dtype)."""
        data: Any = _Payload(data_at, n) if n >= _INLINE_LIMIT else \
            bytes(self.buf[data_at : data_at + n])
        zero = (0,)
        memo[len(memo)] = zero  # len() each time: a sparse memo (BINPUT) must count alike
        memo[len(memo)] = (nd, zero, memo[third])
        stub = _ArrayStub()
        memo[len(memo)] = stub
        if shape_memo:
            memo[len(memo)] = shape
        memo[len(memo)] = data
        memo[len(memo)] = (1, shape, dtype, fortran, data)
        stack.append(stub)
        checked = self._shapes.get((shape, dtype))
        if checked is None:  # a dump's arrays repeat a few hundred (shape, dtype) pairs
            checked = check_shape(shape, self._itemsize(dtype), f"{self.path}: corrupt pickle")
            self._shapes[shape, dtype] = checked
        stub.shape, stub.dtype, stub.fortran, stub.data, stub.built = checked, dtype, fortran, data, True

    def _scan_items(self, stack: list[Any], memo: dict[int, Any]) -> None:
        """Dict items ``key: ndarray`` in numpy's exact form, located by the compiled scanner
        (``reprod._kernel.scan_items``) and committed here with the generic loop's checks,
        stack, memo and step count. Stops at the first item that does not fit; the generic loop
        walks on from there. Called with ``pos`` on a SHORT_BINUNICODE opcode."""
        buf = self.buf
        scan = scanner()
        assert scan is not None
        for (_start, key_at, key_len, rec, nd, third, shape, shape_memo, dt, fortran, data_at, n,
             after, steps) in scan(buf, self.pos, self.end, 1 << 16):
            rec_g, nd_g, dtype = memo.get(rec), memo.get(nd), memo.get(dt)
            if not (type(rec_g) is _Global and rec_g.kind == _RECONSTRUCT and type(nd_g) is _Global
                    and nd_g.kind == _NDARRAY and third in memo and type(dtype) is _DtypeStub):
                return
            try:
                key = bytes(buf[key_at : key_at + key_len]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return  # the generic loop raises the error, at the same byte
            # references were checked before the key's MEMOIZE: one naming the key's own entry
            # failed above and goes to the generic loop, which gives it the same meaning
            stack.append(key)
            memo[len(memo)] = key
            self._commit_array(stack, memo, nd_g, third, shape, shape_memo == 1, dtype, fortran == 1,
                               data_at, n)
            self.pos = after
            self.steps += steps

    def _int(self, line: bytes) -> int:
        try:
            return int(line)
        except ValueError:
            raise DumpFormatError(f"{self.path}: corrupt pickle (bad integer)") from None

    def _top(self, stack: list[Any]) -> Any:
        if not stack:
            raise DumpFormatError(f"{self.path}: corrupt pickle (empty stack)")
        return stack[-1]

    def _as(self, stack: list[Any], typ: type) -> Any:
        top = self._top(stack)
        if not isinstance(top, typ):
            raise DumpFormatError(f"{self.path}: corrupt pickle (expected a {typ.__name__})")
        return top

    def _pairs(self, d: dict[Any, Any], items: list[Any]) -> dict[Any, Any]:
        if len(items) % 2:
            raise DumpFormatError(f"{self.path}: corrupt pickle (odd number of dict items)")
        for i in range(0, len(items), 2):
            k = items[i]
            if type(k) is _Py2Str or type(k) is _Py2Payload:
                k = self._as_str(k)  # a Python 2 dump's keys
            elif isinstance(k, _Payload):
                k = self._materialize_bytes(k)
            # only flat keys: hashing a tuple nested a million deep recurses in C
            if not isinstance(k, (str, bytes, int, float)) and k is not None:
                raise DumpFormatError(f"{self.path}: corrupt pickle (dict key is a {type(k).__name__})")
            d[k] = items[i + 1]
        return d

    def _global(self, module: str, name: str) -> _Global:
        kind = SAFE_GLOBALS.get((module, name))
        if kind is None:
            raise UnsafeDumpError(
                f"{self.path}: refuses to load global {_printable(module)}.{_printable(name)}: only "
                "numpy arrays, scalars "
                "and plain containers are allowed in this file (nothing was executed)"
            )
        return _Global(kind, f"{module}.{name}")

    def _materialize_bytes(self, x: Any) -> bytes:
        if isinstance(x, _Payload):
            return bytes(self.buf[x.offset : x.offset + x.length])
        return x

    def _reduce(self, func: Any, args: Any) -> Any:
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            raise DumpFormatError(f"{self.path}: corrupt pickle (REDUCE on a non-callable)")
        k = func.kind
        if k == _RECONSTRUCT:
            if len(args) != 3 or not (isinstance(args[0], _Global) and args[0].kind == _NDARRAY):
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad array reconstruct)")
            return _ArrayStub()
        if k == _DTYPE:
            descr = self._as_str(args[0]) if args else None
            if not isinstance(descr, str):
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad dtype)")
            if len(descr) > MAX_DTYPE_STRING:
                raise DumpFormatError(f"{self.path}: corrupt pickle (a dtype string of {len(descr)} "
                                      f"characters; numpy's limit is {MAX_DTYPE_STRING})")
            return _DtypeStub(descr)
        if k == _SCALAR:
            if len(args) < 1 or not isinstance(args[0], _DtypeStub):
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad scalar)")
            return _Scalar(args[0], args[1] if len(args) > 1 else None)
        if k == _ENCODE:
            if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad bytes encoding)")
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad latin1 bytes)") from None
        if k == _BYTES:
            if args == ():
                return b""
            if len(args) == 1 and isinstance(args[0], (bytes, _Payload)):
                return args[0]
            raise DumpFormatError(f"{self.path}: corrupt pickle (bad bytes() call)")
        if k == _FROMBUFFER:
            if not (len(args) == 4 and isinstance(args[0], (bytes, bytearray, _Payload))
                    and isinstance(args[1], _DtypeStub) and isinstance(args[2], tuple)
                    and args[3] in ("C", "F")):
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad array frombuffer)")
            shape = check_shape(args[2], self._itemsize(args[1]), f"{self.path}: corrupt pickle")
            stub = _ArrayStub()
            stub.shape, stub.dtype, stub.fortran, stub.data, stub.built = shape, args[1], args[3] == "F", args[0], True
            return stub
        if k == _ODICT:
            if args == ():
                return {}
            if len(args) == 1 and type(args[0]) is list:
                items: list[Any] = []
                for kv in args[0]:  # OrderedDict([(k, v), ...]): pairs and nothing else
                    if type(kv) not in (tuple, list) or len(kv) != 2:
                        raise DumpFormatError(f"{self.path}: corrupt pickle (bad OrderedDict item)")
                    items += kv
                return self._pairs({}, items)
            raise DumpFormatError(f"{self.path}: corrupt pickle (bad OrderedDict)")
        raise UnsafeDumpError(f"{self.path}: refuses to call {func.name}")

    def _itemsize(self, dtype: _DtypeStub) -> int:
        # only to bound a shape; a dtype that is not numeric data is refused later, naming the key
        try:
            return dtype.to_dtype(self.path).itemsize
        except DumpFormatError:
            return 1

    def _build(self, obj: Any, state: Any) -> None:
        if isinstance(obj, _ArrayStub) and not obj.built:
            if not (isinstance(state, tuple) and len(state) == 5):
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad array state)")
            _, shape, dtype, fortran, data = state
            if not isinstance(dtype, _DtypeStub):
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad array dtype)")
            shape = check_shape(shape, self._itemsize(dtype), f"{self.path}: corrupt pickle")
            obj.shape, obj.dtype, obj.fortran, obj.data, obj.built = shape, dtype, bool(fortran), data, True
        elif isinstance(obj, _DtypeStub):
            order = self._as_str(state[1]) if isinstance(state, tuple) and len(state) >= 2 else None
            if isinstance(order, str):
                obj.byteorder = order
                obj.structured = len(state) > 3 and state[3] is not None
                obj._parsed = None
            else:
                raise DumpFormatError(f"{self.path}: corrupt pickle (bad dtype state)")
        else:
            raise UnsafeDumpError(f"{self.path}: refuses to set the state of a {type(obj).__name__}")


def restricted_unpickle(buf: Any, start: int, end: int, path: str) -> Any:
    """Walk a pickle in ``buf[start:end]`` safely; arrays come back as stubs with file offsets.

    The result feeds ``tree_from_pickle``, which bounds how far shared sub-containers may expand.
    """
    return _PickleWalker(buf, start, end, path).run()


def _printable(text: str, limit: int = 80) -> str:
    """A name from the file as it can appear in a one-line message."""
    r = text if text.isprintable() else repr(text)
    return r if len(r) <= limit else r[: limit - 3] + "..."
