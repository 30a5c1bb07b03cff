"""What precedes the dict in reprod_log's ``.npy`` (npy header, PROTO, the object array's reduce),
learned once from this numpy's own pickle of ``{}``, and the small opcode reader that reads it
(``pickletools`` costs an import on every first save)."""

from __future__ import annotations

import pickle
import struct
from typing import Any

import numpy as np

_pack_I = struct.Struct("<I").pack


def _get(i: int) -> bytes:
    """BINGET / LONG_BINGET of memo index ``i``."""
    return b"h" + bytes((i,)) if i < 256 else b"j" + _pack_I(i)



class _Prefix:
    """What precedes the dict: npy header, PROTO, the object array's reduce up to its state list.

    Built once from numpy's own pickle of a 0-d object array holding ``{}``, so the globals and
    memo layout are whatever this numpy writes; the memo indices the writer reuses are read off
    it and checked.
    """

    def __init__(self) -> None:
        import io

        holder = np.empty((), dtype=object)
        holder[()] = {}
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, np.lib.format.header_data_from_array_1_0(holder)
        )
        self.npy_header = buf.getvalue()
        raw = pickle.dumps(holder, protocol=4)
        ops = _genops(raw)
        if [op.name for op, _, _ in ops[:2]] != ["PROTO", "FRAME"]:
            raise ValueError("unexpected pickle layout")
        memo = 0
        globals_: list[int] = []
        strings: dict[str, int] = {}
        bytes_memo: dict[bytes, int] = {}
        last_pushed: Any = None
        body_start = ops[2][2]  # first opcode after FRAME
        dict_at = None
        for op, arg, pos in ops[2:]:
            if op.name == "MEMOIZE":
                if last_pushed == ("global",):
                    globals_.append(memo)
                elif isinstance(last_pushed, str):
                    strings.setdefault(last_pushed, memo)
                elif isinstance(last_pushed, bytes):
                    bytes_memo[last_pushed] = memo
                memo += 1
                continue
            if op.name == "EMPTY_DICT":
                dict_at = (pos, memo)
            last_pushed = ("global",) if op.name == "STACK_GLOBAL" else arg
        if dict_at is None or len(globals_) != 3 or bytes_memo.get(b"b") is None:
            raise ValueError("unexpected pickle layout")
        self.body = raw[body_start : dict_at[0]]
        self.dict_memo = dict_at[1]
        self.reconstruct, self.ndarray, self.dtype_global = globals_
        self.b_memo = bytes_memo[b"b"]
        self.b_obj = np.array([98], np.uint8).tobytes()  # b"b", the object numpy's reduce uses
        # every array starts: _reconstruct, (ndarray, (0,), b"b") REDUCE, and its state: MARK 1;
        # the (0,) tuple is new each time, so memoised
        self.head = (
            _get(self.reconstruct) + _get(self.ndarray) + b"K\x00\x85\x94" + _get(self.b_memo)
            + b"\x87\x94R\x94(K\x01"
        )
        self.strings = strings
        # the byte-order character of dtype('O') ("|"): numpy's dtypes reduce to the same object
        self.pipe = np.dtype(object).__reduce__()[2][1]
        tail = raw[dict_at[0] :]
        if tail != b"}\x94at\x94b.":
            raise ValueError("unexpected pickle layout")


# the opcodes of numpy's pickle of a 0-d object array (pickletools.genops, which costs 0.7 ms to
# import, for just these): code -> (name, argument: fixed byte count, or "s1" a 1-byte length then
# that many bytes); any other opcode is an unknown layout, left to np.save
_OPS: dict[int, tuple[str, Any]] = {
    0x80: ("PROTO", 1), 0x95: ("FRAME", 8), 0x8C: ("SHORT_BINUNICODE", "s1"), 0x94: ("MEMOIZE", 0),
    0x93: ("STACK_GLOBAL", 0), 0x4B: ("BININT1", 1), 0x4A: ("BININT", 4), 0x85: ("TUPLE1", 0),
    0x86: ("TUPLE2", 0), 0x87: ("TUPLE3", 0), 0x43: ("SHORT_BINBYTES", "s1"), 0x52: ("REDUCE", 0),
    0x28: ("MARK", 0), 0x29: ("EMPTY_TUPLE", 0), 0x68: ("BINGET", 1), 0x89: ("NEWFALSE", 0),
    0x88: ("NEWTRUE", 0), 0x4E: ("NONE", 0), 0x74: ("TUPLE", 0), 0x62: ("BUILD", 0),
    0x5D: ("EMPTY_LIST", 0), 0x7D: ("EMPTY_DICT", 0), 0x61: ("APPEND", 0), 0x2E: ("STOP", 0),
}


class _Op:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _genops(raw: bytes) -> list[tuple[_Op, Any, int]]:
    """``list(pickletools.genops(raw))`` for the opcodes of ``_OPS`` (the same names, arguments
    and positions: str for SHORT_BINUNICODE, bytes for SHORT_BINBYTES, int otherwise)."""
    out: list[tuple[_Op, Any, int]] = []
    pos = 0
    while pos < len(raw):
        entry = _OPS.get(raw[pos])
        if entry is None:
            raise ValueError("unexpected pickle layout")
        name, argument = entry
        at = pos
        pos += 1
        arg: Any = None
        if argument == "s1":
            n = raw[pos]
            data = raw[pos + 1 : pos + 1 + n]
            arg = data.decode("utf-8") if name == "SHORT_BINUNICODE" else data
            pos += 1 + n
        elif argument:
            arg = int.from_bytes(raw[pos : pos + argument], "little", signed=name == "BININT")
            pos += argument
        out.append((_Op(name), arg, at))
        if name == "STOP":
            break
    return out
