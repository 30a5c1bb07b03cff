"""The restricted unpickler: a small pickle machine that walks the opcodes of a pickled dict of numpy
arrays without running anything.

It accepts only the globals numpy needs to rebuild arrays, dtypes and scalars (plus plain
containers), and records where each array's bytes lie in the file instead of copying them; anything
else is refused with ``UnsafeDumpError`` before it could run. What it returns (dicts, lists and the
stubs below) is turned into a lazy tree by ``legacy.tree_from_pickle``.
"""

from __future__ import annotations

import struct
from typing import Any

from .._native import scanner
from ..errors import DumpFormatError, UnsafeDumpError
from .npy_header import check_shape

__all__ = ["SAFE_GLOBALS", "restricted_unpickle"]

from .pickle_fast import _NumpyForms
from .pickle_stubs import (  # noqa: F401  (their names stay importable from here)
    _BYTES,
    _DTYPE,
    _ENCODE,
    _FROMBUFFER,
    _INLINE_LIMIT,
    _NDARRAY,
    _ODICT,
    _RECONSTRUCT,
    _SCALAR,
    _STUB_DTYPES,
    MAX_DTYPE_STRING,
    SAFE_GLOBALS,
    _ArrayStub,
    _DtypeStub,
    _Global,
    _Memo,
    _Payload,
    _Py2Payload,
    _Py2Str,
    _Scalar,
)


class _PickleWalker(_NumpyForms):
    """Interprets the subset of the pickle protocol numpy's pickles use, without calling anything."""

    def __init__(self, buf: Any, start: int, end: int, path: str) -> None:
        self.buf = buf
        self.pos = start
        self.end = end
        self.path = path
        self.steps = 0
        # (shape, dtype stub) -> the checked shape, for _commit_array
        self._shapes: dict[tuple[tuple[int, ...], _DtypeStub], tuple[int, ...]] = {}
        self._shape_objs: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per shape
        self._heads: dict[int, tuple[Any, ...]] = {}  # memo index of b"b" -> (ndarray, (0,), b"b")

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
        # left in the file whatever its size: an array's bytes (the first array of a dump, whose
        # dtype is built inline, is walked here) are then viewed in place, and batched, never
        # copied behind a loader; every reader of a blob takes a _Payload as it takes bytes
        return _Payload(self._need(n), n)

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
        memo = _Memo()
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
                memo.add(stack[-1])
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
