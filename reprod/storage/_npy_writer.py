"""Write reprod_log's dump format (``np.save(path, dict_of_arrays)``) straight from the arrays.

``np.save`` of a dict pickles a 0-d object array whose one item is the dict; the pickler calls
``ndarray.__reduce__`` on every array, which copies its data into a ``bytes`` object (``tobytes``),
and then copies that again into its frame buffer (or writes it). Here the pickle opcodes are
emitted directly and each payload is written from the array's own memory: small payloads are
copied once into the current frame, large ones (64 KiB and more, as the pickler does) go to the
file unframed and uncopied.

The stream is the one numpy's protocol-4 pickle produces, opcode for opcode: the same globals
(``numpy._core.multiarray._reconstruct`` under numpy 2, the module numpy itself names), the same
memo indices, memoised dtypes, strings and repeated objects, BINGET/LONG_BINGET, the same
SHORT_BINBYTES/BINBYTES/BINBYTES8 choice and the same unframed large payloads. Only frame
boundaries can differ: a frame is closed before a key, never inside an array's opcodes (the
pickler closes one wherever it crosses 64 KiB), which keeps every array in the exact sequence
``reprod.load``'s fast path recognises. Files up to 64 KiB of opcodes are byte-identical to
``np.save``'s.

With the compiled kernel (built, on, and imported already or the tree has ``_KERNEL_KEYS`` keys
at its top), runs of a mapping's common-case keys (a str key, a new C-contiguous array of 2 bytes
to 64 KiB - 1 whose dtype was written before) are written by its ``npy_pack``, with
``_Writer.item``'s bytes, memo and frames, and the tree is checked by its ``npy_check``
(``_check``'s rule); everything else, and every key without the kernel (``REPROD_KERNEL=0``),
goes ``item``, the reference. The files are the same either way.

Anything this writer does not cover exactly (an ndarray subclass, an object dtype, a value that
is not an array or a dict with str keys, a dtype whose reduction holds other than ints, strings,
bools and None) makes ``write_npy_dict`` return False before writing anything; the caller then
uses ``np.save``.
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np

from ._npy_prefix import _genops, _get, _Prefix  # noqa: F401 - _genops: the opcode reader tests check

__all__ = ["write_npy_dict", "npy_dict_bytes_supported"]

_FRAME_TARGET = 64 * 1024  # pickle's _FRAME_SIZE_TARGET: frame size, and the large-payload bound
_BATCH = 1000  # pickle's BATCHSIZE for SETITEMS
_KINDS = frozenset("biufc")

_pack_I = struct.Struct("<I").pack
_pack_Q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<i").pack


_prefix: Any = None
# whether the kernel's npy_pack wrote the self-test's sample as np.save does (None: not tried yet);
# where it did not, the Python path writes everything
_pack_checked: Optional[bool] = None


def _get_prefix() -> Any:
    global _prefix
    if _prefix is None:
        try:
            _prefix = _Prefix()
            _prefix = _prefix if _self_test(_prefix) else False
        except (ValueError, AttributeError, IndexError, TypeError):
            _prefix = False  # an unknown numpy layout: np.save does the work
    return _prefix


_sample: Optional[tuple[dict[str, Any], bytes]] = None


def _self_test(pre: Any, pack: Optional[Callable[..., Any]] = None) -> bool:
    """Once per process (and once more for the kernel's ``pack``): the writer's bytes equal this
    numpy's ``np.save`` on a small sample (each array form, a repeated dtype, array and key, a
    nested dict, the kernel's opcode forms); any difference leaves it to np.save (or, for the
    kernel, to the Python path)."""
    import io

    global _sample
    if _sample is None:
        base = np.arange(6, dtype=np.float32).reshape(2, 3)
        key = "key"  # one str object under two dicts: memoised, then BINGET
        # each key the Python path must write is followed by one the kernel takes (with the
        # kernel: "h", key, "i", "j...", "k", key again), so that no back-off skips it
        sample: dict[str, Any] = {
            "a": base, "h": np.arange(3, dtype=np.float32),
            "b": {"c": np.asfortranarray(base), key: base[0], "d": base[:, ::2]},
            "e": np.array(2.5), "i": np.ones((1, 2, 1, 2), np.float32),
            "f": np.zeros(0, np.int8), "j\u00e9" * 90: np.arange(70, dtype=np.float32),
            "g": np.array([1, 2], ">i4"), "k": np.full((), 1.5, np.float32), key: base[1],
            "l": base,
        }
        want = io.BytesIO()
        np.save(want, sample, allow_pickle=True)
        _sample = (sample, want.getvalue())
    got = io.BytesIO()
    _write(_Writer(got, pre, pack), _sample[0])
    return got.getvalue() == _sample[1]


# top-level keys from which a save imports the kernel when nothing has yet: its import is ~0.5 ms
# of a fresh process, the kernel saves ~1 us a small key
_KERNEL_KEYS = 512


def _kernel(size: int) -> Any:
    """The compiled kernel where it is built, on and worth importing for a tree of ``size`` keys
    (at its top), or None."""
    if size < _KERNEL_KEYS and "reprod._native" not in sys.modules:
        return None
    from .. import _native

    return _native.kernel()


def _pack(pre: Any, kernel: Any) -> Optional[Callable[..., Any]]:
    """The kernel's ``npy_pack`` where it writes the self-test's sample as np.save does."""
    global _pack_checked
    pack = getattr(kernel, "npy_pack", None)
    if pack is None:
        return None
    if _pack_checked is None:
        try:
            _pack_checked = _self_test(pre, pack)
        except Exception:  # a kernel out of step with this module: the Python path, as above
            _pack_checked = False
    return pack if _pack_checked else None


def npy_dict_bytes_supported() -> bool:
    """Whether this numpy's pickle layout is the one the writer reproduces."""
    return bool(_get_prefix())


def _int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes((v,))
    if 0 <= v < 65536:
        return b"M" + v.to_bytes(2, "little")
    if -(2**31) <= v < 2**31:
        return b"J" + _pack_i(v)
    raw = pickle.encode_long(v)  # type: ignore[attr-defined]
    if len(raw) < 256:
        return b"\x8a" + bytes((len(raw),)) + raw
    return b"\x8b" + _pack_i(len(raw)) + raw


def _bytes_header(n: int) -> bytes:
    if n < 256:
        return b"C" + bytes((n,))
    if n < 2**32:
        return b"B" + _pack_I(n)
    return b"\x8e" + _pack_Q(n)


def _str_op(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    n = len(raw)
    if n < 256:
        return b"\x8c" + bytes((n,)) + raw
    if n < 2**32:
        return b"X" + _pack_I(n) + raw
    return b"\x8d" + _pack_Q(n) + raw


class _Unsupported(Exception):
    pass


class _Writer:
    __slots__ = ("f", "out", "memo", "n", "pre", "keep", "mids", "pack")

    def __init__(self, f: BinaryIO, pre: Any, pack: Optional[Callable[..., Any]] = None) -> None:
        self.f = f
        self.pre = pre
        self.pack = pack  # the kernel's npy_pack, or None: item() for every key
        self.out = bytearray()
        # pickle's memo: id(object) -> index; the objects stay alive in the tree or in ``keep``
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []
        self.n = 0
        self.mids: dict[tuple[Any, ...], bytes] = {}  # item()'s opcodes between key and payload

    # -- frames ---------------------------------------------------------------------------------
    def commit(self) -> None:
        out = self.out
        if not out:
            return
        if len(out) >= 4:  # pickle's FRAME_SIZE_MIN: a shorter frame goes without a header
            self.f.write(b"\x95" + _pack_Q(len(out)))
        self.f.write(out)
        self.out = bytearray()

    def memoize(self, obj: Any) -> None:
        self.memo[id(obj)] = self.n
        self.n += 1

    # -- objects --------------------------------------------------------------------------------
    def string(self, s: str) -> None:
        i = self.memo.get(id(s))
        if i is not None:
            self.out += _get(i)
            return
        self.out += _str_op(s)
        self.out += b"\x94"
        self.memoize(s)

    def scalar(self, v: Any) -> None:
        """The items of a dtype's reduction: None, bool, int, str (anything else: unsupported)."""
        if v is None:
            self.out += b"N"
        elif v is True:
            self.out += b"\x88"
        elif v is False:
            self.out += b"\x89"
        elif type(v) is int:
            self.out += _int(v)
        elif type(v) is str:
            self.string(v)
        else:
            raise _Unsupported

    def dtype(self, dt: np.dtype) -> None:
        i = self.memo.get(id(dt))
        if i is not None:
            self.out += _get(i)
            return
        red = dt.__reduce__()
        if len(red) != 3 or red[0] is not np.dtype or len(red[1]) != 3 or not isinstance(red[2], tuple):
            raise _Unsupported
        self.keep.append(red)
        out = self.out
        out += _get(self.pre.dtype_global)
        for v in red[1]:
            self.scalar(v)
        self.out += b"\x87\x94R\x94"  # TUPLE3 MEMOIZE REDUCE MEMOIZE
        self.n += 1
        self.memoize(dt)
        self.out += b"("
        for v in red[2]:
            self.scalar(v)
        self.out += b"t\x94b"  # TUPLE MEMOIZE BUILD
        self.n += 1

    def array(self, a: np.ndarray) -> None:
        i = self.memo.get(id(a))
        if i is not None:
            self.out += _get(i)
            return
        pre = self.pre
        n = self.n
        self.out += pre.head
        self.memo[id(a)] = n + 2  # the REDUCE result
        n += 3
        shape = a.shape
        self.out += _SHAPES.get(shape) or _shape_ops(shape)
        if shape:
            n += 1  # the shape tuple is memoised (the empty tuple is not)
        self.n = n
        self.dtype(a.dtype)
        # ndarray.__reduce__: Fortran-ordered (F- but not C-contiguous) data is written in F order
        flags = a.flags
        fortran = flags.f_contiguous and not flags.c_contiguous
        if fortran:
            data = a.T
        elif flags.c_contiguous:
            data = a
        else:
            data = np.ascontiguousarray(a)
        nbytes = a.nbytes
        self.out += b"\x88" if fortran else b"\x89"
        if nbytes <= 1:
            # numpy's tobytes() returns CPython's shared empty / one-byte bytes objects, which the
            # pickler memoises by identity like any other object
            b = data.tobytes()
            i = self.memo.get(id(b))
            if i is not None:
                self.out += _get(i) + b"t\x94b"
                self.n += 1
                return
            self.out += _bytes_header(nbytes) + b
            self.keep.append(b)
            self.memoize(b)
            self.out += b"\x94t\x94b"
            self.n += 1
            return
        if nbytes >= _FRAME_TARGET:
            # as the pickler does: close the frame, write the header and the payload unframed,
            # the payload straight from the array's memory
            self.commit()
            self.f.write(_bytes_header(nbytes))
            self.f.write(_raw(data))
        else:
            out = self.out
            out += _bytes_header(nbytes)
            out += _raw(data)  # the one copy, into the frame
        self.out += b"\x94t\x94b"  # MEMOIZE (the payload) TUPLE MEMOIZE BUILD
        self.n += 2

    def mapping(self, d: dict[Any, Any]) -> None:
        i = self.memo.get(id(d))
        if i is not None:
            self.out += _get(i)
            return
        self.out += b"}\x94"
        self.memoize(d)
        size = len(d)
        if size == 0:
            return
        items = iter(d.items())
        if size == 1:
            self.items(items, 1)
            self.out += b"s"
            return
        left = size
        while True:
            self.out += b"("
            batch = min(left, _BATCH)
            self.items(items, batch)
            self.out += b"u"
            left -= batch
            if batch < _BATCH:
                break
            # a multiple of the batch size ends with an empty MARK ... SETITEMS, as the C pickler

    def items(self, items: Iterator[tuple[Any, Any]], count: int) -> None:
        """``item(k, v)`` for the next ``count`` pairs of ``items``; with the kernel, its runs of
        the common case in one call each, the pairs it hands back through ``item``."""
        pack = self.pack
        if pack is None:
            for _ in range(count):
                k, v = next(items)
                self.item(k, v)
            return
        head, write = self.pre.head, self.f.write
        idle = 0  # grows while calls take nothing: see below
        while count:
            taken, self.n, self.out, pending = pack(items, count, self.out, self.memo, self.n,
                                                    np.ndarray, head, write, _FRAME_TARGET)
            count -= taken
            if not count:
                return
            k, v = next(items) if pending is None else pending  # next(): as item() would find it
            self.item(k, v)
            count -= 1
            # a run the kernel hands back pair by pair (one-byte arrays, large ones, dicts) costs
            # a call a pair: from the fourth call in a row that took none, the pairs left to
            # item() before the next call double (1, 3, 7, ... 31); fewer skipped keys it would
            # take (each ~1 us more in item() than a call that takes nothing)
            idle = 0 if taken else min(2 * idle + 1, 255)
            for _ in range(min(idle >> 3, count)):
                k, v = next(items)
                self.item(k, v)
                count -= 1

    def item(self, k: Any, v: Any) -> None:
        out = self.out
        if len(out) >= _FRAME_TARGET:
            self.commit()
            out = self.out
        if type(k) is not str:
            raise _Unsupported
        memo = self.memo
        i = memo.get(id(k))
        if i is None:
            raw_key = k.encode("utf-8", "surrogatepass")
            if len(raw_key) < 256:
                out += _SHORT_STR[len(raw_key)]
                out += raw_key
                out += b"\x94"
            else:
                out += _str_op(k)
                out += b"\x94"
            memo[id(k)] = self.n
            self.n += 1
        else:
            out += _get(i)
        if type(v) is not np.ndarray:
            if type(v) is dict:
                self.mapping(v)
                return
            raise _Unsupported
        # the common case inline: a new C-contiguous array of 2 bytes to 64 KiB whose dtype was
        # written before; the opcodes are those of array(), the ones between the key and the
        # payload taken whole from a cache by (shape, dtype's memo index, size)
        nbytes = v.nbytes
        dt = memo.get(id(v.dtype))
        if dt is None or not 1 < nbytes < _FRAME_TARGET or id(v) in memo:
            self.array(v)
            return
        try:
            # ``out += v`` would be numpy's add; a dtype without buffer export (non-native long
            # double) goes through array(), which writes through a uint8 view
            raw = memoryview(v)
        except ValueError:
            self.array(v)
            return
        if not raw.c_contiguous:  # as v.flags.c_contiguous (axes of length 1 ignored), cheaper
            self.array(v)
            return
        shape = v.shape
        spec = (shape, dt, nbytes)
        mid = self.mids.get(spec)
        if mid is None:
            sh = _SHAPES.get(shape)
            if sh is None:
                sh = _shape_ops(shape)
            mid = (self.pre.head + sh + _get(dt)
                   + (b"\x89C" + bytes((nbytes,)) if nbytes < 256 else b"\x89B" + _pack_I(nbytes)))
            self.mids[spec] = mid
        n = self.n
        memo[id(v)] = n + 2
        out += mid
        out += raw  # the one copy, into the frame
        out += b"\x94t\x94b"
        self.n = n + (6 if shape else 5)


_SHORT_STR = [b"\x8c" + bytes((n,)) for n in range(256)]  # SHORT_BINUNICODE and its length


_SHAPES: dict[tuple[int, ...], bytes] = {}


def _raw(a: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes, as a buffer any dtype can give (through a uint8 view)."""
    return memoryview(a.reshape(-1).view(np.uint8))


def _shape_ops(shape: tuple[int, ...]) -> bytes:
    """The shape tuple's opcodes (with its MEMOIZE; the empty tuple has none), cached."""
    if not shape:
        ops = b")"
    else:
        ops = b"".join(_int(d) for d in shape)
        ops = b"(" + ops + b"t\x94" if len(shape) > 3 else ops + bytes((0x84 + len(shape), 0x94))
    if len(_SHAPES) < 4096:
        _SHAPES[shape] = ops
    return ops


def _check(tree: Any, dtypes: dict[int, np.dtype], depth: int = 0) -> bool:
    """Everything ``_Writer`` reproduces exactly: dicts with str keys of plain numeric ndarrays.
    Collects the distinct dtype objects into ``dtypes``."""
    if depth > 200:
        return False
    for k, v in tree.items():
        if type(k) is not str:
            return False
        if type(v) is np.ndarray:
            dt = v.dtype
            if dt.kind not in _KINDS:
                return False
            dtypes[id(dt)] = dt
        elif type(v) is dict:
            if not _check(v, dtypes, depth + 1):
                return False
        else:
            return False
    return True


def write_npy_dict(f: BinaryIO, tree: dict[str, Any], fd: Optional[int] = None) -> bool:
    """Write ``tree`` to the binary file ``f`` as ``np.save(f, tree, allow_pickle=True)`` would.

    Returns False, having written nothing, when ``tree`` holds anything but (nested) dicts with str
    keys of numeric numpy arrays, or this numpy pickles arrays another way; use ``np.save`` then.

    ``fd``: ``f``'s descriptor, for a regular file that nothing else writes to meanwhile: ``f`` is
    flushed and the dump goes to ``fd`` in ``writev`` calls of ~256 KiB (``_pipe.WritevPipe``),
    without the buffered file's copy, and where two cores are free from a helper thread while the
    next frames are packed; ``f``'s own position is then stale (only closing it is safe).

    >>> with open("forward.npy", "wb") as f:
    ...     write_npy_dict(f, {"logits": np.ones((2, 3), np.float32)})
    True
    """
    pre = _get_prefix()
    dtypes: dict[int, np.dtype] = {}
    if not pre or type(tree) is not dict:
        return False
    kernel = _kernel(len(tree))
    check = getattr(kernel, "npy_check", None)  # _check without a Python step a key
    if not (check(tree, np.ndarray, dtypes) if check is not None else _check(tree, dtypes)):
        return False
    # the dtype reductions are checked before anything is written, too
    try:
        for dt in dtypes.values():
            red = dt.__reduce__()
            if red[0] is not np.dtype or not all(
                v is None or type(v) in (bool, int, str) for v in (*red[1], *red[2])
            ):
                return False
    except (TypeError, IndexError, ValueError):
        return False
    pack = _pack(pre, kernel)
    if fd is None:
        _write(_Writer(f, pre, pack), tree)
        return True
    from ._pipe import WritevPipe, cores

    f.flush()
    pipe = WritevPipe(fd, cores() >= 2)
    try:
        _write(_Writer(pipe, pre, pack), tree)  # type: ignore[arg-type] - only write() is used
        pipe.finish()
    except BaseException:
        pipe.wait()  # the caller closes the file next: nothing may write to its descriptor then
        raise
    return True


class _Count:
    """A sink that counts the bytes written to it."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def write(self, b: Any) -> None:
        self.n += memoryview(b).nbytes


class _Keys:
    """A dict's view for ``_Writer.mapping`` that notes where each top-level key starts."""

    def __init__(self, tree: dict[str, Any], w: _Writer, sink: _Count) -> None:
        self.tree, self.w, self.sink = tree, w, sink
        self.starts: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self.tree)

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k, v in self.tree.items():
            # the next byte goes into the frame being packed, which is written after its header
            self.starts.append((self.sink.n + len(self.w.out) + 9, k))
            yield k, v


def save_npy_dict(path: str, tree: dict[str, Any]) -> str:
    """``np.save(path, tree)`` as reprod_log does, atomically (``write_npy_dict``, ``np.save``
    for what it does not write); a failed write names the key it stopped at."""
    import os

    from .atomic import AtomicFile

    with AtomicFile(path) as af:
        fd = None if af.direct else af.file.fileno()
        try:
            written = write_npy_dict(af.file, tree, fd)
        except OSError as exc:
            from ..errors import WriteError

            # a full disk or a size limit: the key whose bytes it stopped at, named (packing
            # again reads every array: not after a source array's own read error)
            if fd is None or not isinstance(af._error(exc), WriteError):
                raise
            raise af._error(exc, key_at(tree, os.lseek(fd, 0, os.SEEK_CUR)))  # noqa: B904 - chained
        if not written:
            np.save(af.file, tree, allow_pickle=True)  # type: ignore[arg-type]
    return path


def key_at(tree: dict[str, Any], offset: int) -> Optional[str]:
    """The top-level key of ``tree`` whose bytes lie at byte ``offset`` of the file
    ``write_npy_dict`` writes: for a failed write, the key it was writing. Writes nothing: the pickle is packed again, without the kernel, into a counter."""
    pre = _get_prefix()
    if not pre or type(tree) is not dict or not tree:
        return None
    sink = _Count()
    w = _Writer(sink, pre, None)
    view = _Keys(tree, w, sink)
    try:
        _write(w, view)  # type: ignore[arg-type] - mapping() takes any sized .items()
    except Exception:  # noqa: BLE001 - the tree changed meanwhile: no key to name
        return None
    found = None
    for start, key in view.starts:
        if start > offset:
            break
        found = key
    return found


def _write(w: _Writer, tree: dict[str, Any]) -> None:
    pre = w.pre
    w.f.write(pre.npy_header)
    w.f.write(b"\x80\x04")  # PROTO 4, outside the first frame as the pickler writes it
    w.out += pre.body
    w.n = pre.dict_memo
    # objects of the prefix that numpy hands out again (CPython's one-character str and bytes
    # singletons): the pickler finds them in its memo, so must we
    if pre.pipe in pre.strings:
        w.memo[id(pre.pipe)] = pre.strings[pre.pipe]
    w.memo[id(pre.b_obj)] = pre.b_memo
    w.keep += (pre.pipe, pre.b_obj)
    try:
        w.mapping(tree)
    except _Unsupported:  # pragma: no cover - _check and the dtype check rule these out
        raise AssertionError("tree changed while being written") from None
    w.out += b"at\x94b."  # APPEND (the dict into the state list) TUPLE MEMOIZE BUILD STOP
    w.commit()
