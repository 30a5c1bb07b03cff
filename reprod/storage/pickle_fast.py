"""The pickle walker's fast forms: numpy's exact opcode sequence for one array (and, with the
compiled scanner, for a run of ``key: array`` dict items) recognised and committed at once, with
the same stack, memo, step count and checks as the generic opcode loop of ``pickle_walker``."""

from __future__ import annotations

import struct
from typing import Any

from .._native import scanner
from .npy_header import check_shape
from .pickle_stubs import (
    _NDARRAY,
    _RECONSTRUCT,
    _STATE,
    _ArrayStub,
    _DtypeStub,
    _Global,
    _Memo,
    _Payload,
)

__all__: list[str] = []

_ZERO = (0,)


class _NumpyForms:
    """Mixed into ``_PickleWalker``, whose ``buf``, ``pos``, ``end``, ``path``, ``steps``,
    ``_shapes`` and ``_itemsize`` these use."""

    buf: Any
    pos: int
    end: int
    path: str
    steps: int
    _shapes: dict[tuple[tuple[int, ...], _DtypeStub], tuple[int, ...]]
    _shape_objs: dict[tuple[int, ...], tuple[int, ...]]
    _heads: dict[int, tuple[Any, ...]]

    def _itemsize(self, dtype: _DtypeStub) -> int:  # pragma: no cover - _PickleWalker's
        raise NotImplementedError

    def _fast_array(self, stack: list[Any], memo: _Memo) -> bool:
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

    def _commit_array(self, stack: list[Any], memo: _Memo, nd: _Global, third: int,
                      shape: tuple[int, ...], shape_memo: bool, dtype: _DtypeStub, fortran: bool,
                      data_at: int, n: int) -> None:
        """The stack and memo entries of one array in numpy's form, in the order the generic loop
        makes them (its memo references already checked), and what ``_build`` makes of the stub.
        Runs once per array of a dump: ``_build``'s checks of a state it built itself are left out,
        and shape checks are cached per (shape, dtype)."""
        # every array's bytes stay in the file, however small: a spec viewing them in place costs
        # a fraction of a copy plus its loader, and lets the batch kernel take the key (a dump of
        # a million 2-element arrays held a closure and a bytes object per key)
        data = _Payload(data_at, n)
        checked = self._shapes.get((shape, dtype))
        if checked is None:  # a dump's arrays repeat a few hundred (shape, dtype) pairs
            checked = check_shape(shape, self._itemsize(dtype), f"{self.path}: corrupt pickle")
            self._shapes[shape, dtype] = checked
        # the one shape tuple of its value, and one (ndarray, (0,), b"b") tuple per pickle: equal
        # immutable values, shared, where each array made its own (memory of a million arrays)
        shape = self._shape_objs.setdefault(shape, shape)
        head = self._heads.get(third)
        if head is None or head[2] is not memo[third] or head[0] is not nd:
            head = self._heads[third] = (nd, _ZERO, memo[third])
        stub = _ArrayStub()
        stub.shape, stub.dtype, stub.fortran, stub.data, stub.built = shape, dtype, fortran, data, True
        if memo.table is None:  # the state tuple, (1, shape, dtype, fortran, data), when asked for
            memo.items += (_ZERO, head, stub, shape, data, _STATE) if shape_memo \
                else (_ZERO, head, stub, data, _STATE)
        else:
            entries = (_ZERO, head, stub, shape, data) if shape_memo else (_ZERO, head, stub, data)
            for e in entries:  # len() each time: a sparse memo (BINPUT) must count alike
                memo.add(e)
            memo.add((1, shape, dtype, fortran, data))
        stack.append(stub)

    def _scan_items(self, stack: list[Any], memo: _Memo) -> None:
        """Dict items ``key: ndarray`` in numpy's exact form, located by the compiled scanner
        (``reprod._kernel.scan_items``) and committed here with the generic loop's checks,
        stack, memo and step count. Stops at the first item that does not fit; the generic loop
        walks on from there. Called with ``pos`` on a SHORT_BINUNICODE opcode."""
        buf = self.buf
        scan = scanner()
        assert scan is not None
        if memo.table is None:
            self._scan_items_listed(scan, stack, memo)
            return
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
            memo.add(key)
            self._commit_array(stack, memo, nd_g, third, shape, shape_memo == 1, dtype, fortran == 1,
                               data_at, n)
            self.pos = after
            self.steps += steps

    def _scan_items_listed(self, scan: Any, stack: list[Any], memo: _Memo) -> None:
        """``_scan_items`` while the memo is a list (numpy's pickles, always): ``_commit_array``
        inlined, and the memo references of an item checked once per distinct (reconstruct,
        ndarray, b"b", dtype) quadruple of the call: the memo only grows here, so what held for
        one item holds for every later one naming the same entries. Same stack, memo, steps."""
        buf = self.buf
        items = memo.items
        shapes, shape_objs, heads = self._shapes, self._shape_objs, self._heads
        checked_refs: dict[tuple[int, int, int, int], Any] = {}
        push, put = stack.append, items.append
        for (_start, key_at, key_len, rec, nd, third, shape, shape_memo, dt, fortran, data_at, n,
             after, steps) in scan(buf, self.pos, self.end, 1 << 16):
            refs = (rec, nd, third, dt)
            dtype = checked_refs.get(refs)
            if dtype is None:
                rec_g, nd_g, dtype = memo.get(rec), memo.get(nd), memo.get(dt)
                if not (type(rec_g) is _Global and rec_g.kind == _RECONSTRUCT and type(nd_g) is _Global
                        and nd_g.kind == _NDARRAY and third in memo and type(dtype) is _DtypeStub):
                    return
                checked_refs[refs] = dtype
            try:
                key = str(buf[key_at : key_at + key_len], "utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return  # the generic loop raises the error, at the same byte
            push(key)
            put(key)
            # _commit_array, for a list memo
            data = _Payload(data_at, n)
            if (shape, dtype) not in shapes:
                shapes[shape, dtype] = check_shape(shape, self._itemsize(dtype), f"{self.path}: corrupt pickle")
            shape = shape_objs.setdefault(shape, shape)
            head = heads.get(third)
            nd_g = items[nd]
            if head is None or head[2] is not items[third] or head[0] is not nd_g:
                head = heads[third] = (nd_g, _ZERO, memo[third])
            stub = _ArrayStub()
            stub.shape, stub.dtype, stub.fortran, stub.data, stub.built = shape, dtype, fortran == 1, data, True
            items += (_ZERO, head, stub, shape, data, _STATE) if shape_memo == 1 \
                else (_ZERO, head, stub, data, _STATE)
            push(stub)
            self.pos = after
            self.steps += steps
