"""reprod_log's format: ``np.save(path, dict)``, an .npy holding a pickled dict of arrays.

Reading never runs the pickle: ``pickle_walker`` walks its opcodes and records where each array's
bytes lie in the file instead of copying them; the tree of ``ArraySpec``s built from that here
views each array in place through mmap, so opening a 2 GiB dump costs milliseconds. Anything but
numeric data is refused with ``DumpFormatError`` or ``UnsafeDumpError`` before it could run.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Union

import numpy as np

from ..errors import DumpFormatError
from .columns import ColumnBuilder, ColumnTree, columns_of
from .lazy import ArraySpec, Dump, MappedFile, NonNumericValue
from .npy_header import (
    ALIAS_FACTOR,
    ALIAS_FLOOR,
    MAX_DEPTH,
    MAX_NDIM,
    _short,
    check_shape,
    parse_npy_header,
)
from .pickle_walker import (
    SAFE_GLOBALS,
    _ArrayStub,
    _Payload,
    _PickleWalker,
    _Py2Payload,
    _Py2Str,
    _Scalar,
    restricted_unpickle,
)

__all__ = ["read_legacy", "write_legacy", "SAFE_GLOBALS", "restricted_unpickle", "tree_from_pickle",
           "check_shape"]

# A pickle's memo lets one sub-dict or list be referenced many times, so a tiny file can describe a
# tree of billions of entries. Real dumps reference each container about once, and each entry of
# theirs costs at least one opcode: the tree may hold at most this many entries per pickle opcode
# (plus a constant) before the file is refused. (Each entry is a key to compare: 1 MiB of pickle
# may describe a few hundred thousand, as a genuine dump of 5-byte keys does.)
_EXPANSION = 1
_EXPANSION_FLOOR = 100_000


def aliased_payloads_error(path: str, keys: int, total: int, size: int) -> DumpFormatError:
    """The one error both readers give for keys referring to far more data than the file holds."""
    return DumpFormatError(
        f"{path}: {keys} keys refer to more than {total} bytes of data in a file of {size} bytes "
        f"(aliased payloads: the limit is {ALIAS_FACTOR} times the file's size + "
        f"{ALIAS_FLOOR >> 20} MiB; a hostile file?)")


class _Budget:
    """Counts the entries a tree expands to, against a bound set by the size of its pickle, and
    the bytes of data its keys refer to, against a bound set by the size of the file."""

    __slots__ = ("left", "path", "bytes_left", "size", "keys", "specs", "trees", "markers", "inplace")

    def __init__(self, left: int, path: str, size: int = 0, markers: bool = True) -> None:
        self.left = left
        self.path = path
        self.size = size
        self.bytes_left = ALIAS_FACTOR * size + ALIAS_FLOOR
        self.keys = 0
        # id(stub or list) -> its spec: keys that share one payload in the pickle share one spec
        self.specs: dict[int, Any] = {}
        # id(dict) -> (its tree, entries, data bytes, keys, height): shared dicts, walked once
        self.trees: dict[int, tuple[dict[str, Any], int, int, int, int, Any]] = {}
        self.markers = markers  # False: a value that is not numeric data is an error (.pdparams)
        self.inplace = False  # True: the walked dicts are nobody else's, and may become the tree

    def take(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise DumpFormatError(f"{self.path}: the pickle's shared entries expand to an implausibly "
                                  "large tree (a hostile file?)")

    def data(self, n: int, keys: int = 1) -> None:
        """``n`` bytes of data referred to (by ``keys`` more keys)."""
        self.keys += keys
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise aliased_payloads_error(self.path, self.keys, ALIAS_FACTOR * self.size + ALIAS_FLOOR,
                                         self.size)


def _marker(where: Any, what: str, kind: str, budget: Optional[_Budget], value: Any = None,
            has_value: bool = False) -> NonNumericValue:
    if budget is not None and not budget.markers:
        raise DumpFormatError(f"{where}: {what} is not numeric data")
    return NonNumericValue(what, kind, value, has_value)


def _leaf(value: Any, mf: MappedFile, where: Any, budget: Optional[_Budget] = None,
          depth: int = 0) -> Union[ArraySpec, NonNumericValue]:
    """``where``: the key's text for messages, a str or a _KeyText. A value that is well-formed
    but not numeric data (a str, None, a list that is no array, an array of strings) is a
    ``NonNumericValue``; a corrupt one is a ``DumpFormatError``."""
    tv = type(value)
    if budget is not None:
        budget.take()
        if tv is _ArrayStub:  # the spec rides on the stub: no table entry per array
            spec = value.spec
            if spec is None:
                spec = value.spec = _leaf_uncached(value, mf, where, budget, depth)
            return spec
        if tv is list or tv is tuple:
            hit = budget.specs.get(id(value))
            if hit is not None:  # the pickle's memo: this very value again
                return hit[0]
            spec = _leaf_uncached(value, mf, where, budget, depth)
            # the value kept alive with it: its id must not name another object while cached
            budget.specs[id(value)] = (spec, value)
            return spec
    return _leaf_uncached(value, mf, where, budget, depth)


def _leaf_uncached(value: Any, mf: MappedFile, where: Any, budget: Optional[_Budget],
                   depth: int) -> Union[ArraySpec, NonNumericValue]:
    path = mf.path
    if type(value) is _ArrayStub:
        if value.dtype is None:
            raise DumpFormatError(f"{where}: corrupt array")
        if value.dtype.structured:
            return _marker(where, f"an array of a structured dtype, shape {_shape_text(value.shape)}",
                           "array", budget)
        dt = value.dtype.to_dtype(where)
        if dt.kind not in "biufc":
            return _marker(where, f"an array of dtype {_dtype_text(value.dtype, dt)}, shape {_shape_text(value.shape)}", "array",
                           budget)
        nbytes = dt.itemsize * math.prod(value.shape)  # ArraySpec.nbytes, without building one
        data = value.data
        if isinstance(data, _Payload):
            if data.length != nbytes:
                raise DumpFormatError(f"{where}: array claims {nbytes} bytes but holds {data.length}")
            return ArraySpec.in_file(dt, value.shape, data.offset, value.fortran)
        if isinstance(data, (bytes, bytearray)):
            if len(data) != nbytes:
                raise DumpFormatError(f"{where}: array claims {nbytes} bytes but holds {len(data)}")
            raw = bytes(data)
            shape, fortran = value.shape, value.fortran
            return ArraySpec(dtype=dt, shape=shape, fortran=fortran,
                             loader=lambda: np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if fortran else "C"))
        raise DumpFormatError(f"{where}: array payload is not raw bytes (object array?)")
    if isinstance(value, _Scalar):
        if value.dtype.structured:
            return _marker(where, "a numpy scalar of a structured dtype", "scalar", budget)
        dt = value.dtype.to_dtype(where)
        if dt.kind not in "biufc":
            return _marker(where, f"a numpy scalar of dtype {_dtype_text(value.dtype, dt)}", "scalar", budget)
        raw = bytes(value.data if isinstance(value.data, (bytes, bytearray)) else
                    mf.buffer()[value.data.offset: value.data.offset + value.data.length]
                    if isinstance(value.data, _Payload) else b"")
        if len(raw) != dt.itemsize:
            raise DumpFormatError(f"{where}: corrupt scalar")
        return ArraySpec(dtype=dt, shape=(), loader=lambda: np.frombuffer(raw, dtype=dt).reshape(()))
    if isinstance(value, (bool, int, float, complex)) and not isinstance(value, _Payload):
        arr = np.array(value)
        if arr.dtype == object:
            return _marker(where, f"an integer of {value.bit_length()} bits (beyond 64)", "int",
                           budget, value, True)
        return ArraySpec(dtype=arr.dtype, shape=(), loader=lambda: arr)
    if value is None:
        return _marker(where, "None", "NoneType", budget, None, True)
    if isinstance(value, (str, bytes, _Payload)):
        text = _plain_value(value, mf, budget)
        kind = type(text).__name__
        what = f"a {kind} ({_short(text, 60)})"
        return _marker(where, what, kind, budget, text, True)
    if isinstance(value, (list, tuple)):
        if depth >= MAX_NDIM:
            raise DumpFormatError(f"{where}: list nested more than {MAX_NDIM} levels deep")
        specs = [_leaf(v, mf, where, budget, depth + 1) if type(v) is not dict else None
                 for v in value]
        if not specs:
            return ArraySpec(dtype=np.dtype(np.float64), shape=(0,), loader=lambda: np.zeros(0))
        if any(type(s) is not ArraySpec for s in specs):
            odd = next(s for s in specs if type(s) is not ArraySpec)
            held = "a dict" if odd is None else odd.what
            return _list_marker(value, mf, where, budget, f"it holds {held}")
        # numpy's own rule for a list of equal-shape arrays, worked out without allocating them
        if any(s.shape != specs[0].shape for s in specs):
            return _list_marker(value, mf, where, budget, "its items differ in shape")
        dt = functools.reduce(np.promote_types, {s.dtype for s in specs})
        shape = check_shape((len(specs), *specs[0].shape), dt.itemsize, where)
        spec = ArraySpec(dtype=dt, shape=shape)
        if spec.nbytes > 8 * mf.size + (1 << 20):
            raise DumpFormatError(f"{where}: a list of {len(specs)} entries referencing the same "
                                  "data expands far beyond the file (a hostile file?)")

        def load_list() -> np.ndarray:
            return np.array([s.materialize(mf) for s in specs], dtype=dt)  # type: ignore[union-attr]

        return ArraySpec(dtype=dt, shape=shape, loader=load_list)
    raise DumpFormatError(f"{path}: {str(where).split(': ', 1)[-1]}: value of type {type(value).__name__} is not numeric data")


def _list_marker(value: Any, mf: MappedFile, where: Any, budget: Optional[_Budget],
                 why: str) -> NonNumericValue:
    kind = type(value).__name__
    try:
        plain, ok = _plain_value(value, mf, budget), True
    except _NotPlain:
        plain, ok = None, False
    return _marker(where, f"a {kind} of {len(value)} items that is not an array ({why})", kind,
                   budget, plain, ok)


def _dtype_text(stub: Any, dt: np.dtype) -> str:
    """``str(dt)`` bounded for a one-line reason, made once per (memoized) dtype: a structured
    dtype prints every field, milliseconds for thousands of them."""
    text = stub.text
    if text is None:
        text = str(dt) if dt.names is None else f"[{len(dt.names)} fields]"
        text = stub.text = text if len(text) <= 60 else text[:57] + "..."
    return text


def _shape_text(shape: Any) -> str:
    text = str(shape) if type(shape) is tuple else "?"  # a checked shape: at most 64 ints
    return text if len(text) <= 80 else text[:77] + "..."


class _NotPlain(Exception):
    pass


def _plain_value(value: Any, mf: MappedFile, budget: Optional[_Budget], depth: int = 0) -> Any:
    """The plain Python value (str, bytes, None, numbers, lists and tuples of them) that
    ``numpy.load(allow_pickle=True)`` would give, for ``NonNumericValue.value``; ``_NotPlain``
    for anything else (arrays, dicts). Only called on values ``_leaf`` has walked (and budgeted);
    bytes read from the file count against the budget's data bound."""
    if value is None or type(value) in (str, bool, int, float, complex):
        return value
    if type(value) is _Py2Str:
        return value.decode("latin1")
    if isinstance(value, _Payload):
        if budget is not None:
            budget.data(value.length, 0)
        raw = bytes(mf.buffer()[value.offset : value.offset + value.length])
        return raw.decode("latin1") if type(value) is _Py2Payload else raw
    if isinstance(value, bytes):
        return bytes(value)
    if type(value) in (list, tuple) and depth < MAX_NDIM:
        items = [_plain_value(v, mf, budget, depth + 1) for v in value]
        return items if type(value) is list else tuple(items)
    raise _NotPlain


def _tree(d: dict[Any, Any], mf: MappedFile, prefix: str, budget: _Budget, depth: int = 0) -> dict[str, Any]:
    return _subtree(d, mf, prefix, budget, depth)[0]


def _subtree(d: dict[Any, Any], mf: MappedFile, prefix: str, budget: _Budget,
             depth: int) -> tuple[dict[str, Any], int]:
    """(tree, height in dicts). A dict the pickle shares (its memo) is walked once: every further
    reference charges the budgets what the first walk counted, at once, and shares the tree, so a
    file of many references to one big dict is refused in time proportional to the file."""
    if depth > MAX_DEPTH:
        raise DumpFormatError(f"{mf.path}: key {prefix.rstrip('/')[:80]!r}...: dicts nested more than "
                              f"{MAX_DEPTH} levels deep")
    hit = budget.trees.get(id(d))
    if hit is not None:
        out, entries, nbytes, keys, height, _ = hit
        if depth + height > MAX_DEPTH:
            raise DumpFormatError(f"{mf.path}: key {prefix.rstrip('/')[:80]!r}...: dicts nested "
                                  f"more than {MAX_DEPTH} levels deep")
        budget.take(entries)
        budget.data(nbytes, keys)
        return out, height
    left, bytes_left, keys_before = budget.left, budget.bytes_left, budget.keys
    budget.take(1 + len(d))
    # a dict of str keys (the walker's own, used nowhere else) becomes its tree in place: each
    # value replaced by its spec as it is walked, so the stubs go as the specs come, and a
    # million keys never have two dicts (int keys need a new dict, their names change)
    inplace = budget.inplace and all(type(k) is str for k in d)
    out = d if inplace else {}
    height = 0
    for k, v in d.items():
        if type(k) is not str:
            if type(k) is not int:
                raise DumpFormatError(f"{mf.path}: key {_short(k)} is a {type(k).__name__}, not a string")
            # reprod_log's add(3, x) wrote an int key: reprod names it "3", as ReprodLogger does
            k = str(k)
            if k in d or k in out:
                raise DumpFormatError(f"{mf.path}: key {k!r} appears twice (as an int and a str)")
        if isinstance(v, dict):
            out[k], h = _subtree(v, mf, f"{prefix}{k}/", budget, depth + 1)
            height = max(height, h + 1)
        else:
            leaf = out[k] = _leaf(v, mf, _KeyText(mf.path, prefix + k), budget)
            budget.data(leaf.nbytes)
    # the entry keeps ``d`` alive too: its id must not be reused by another dict while cached
    budget.trees[id(d)] = (out, left - budget.left, bytes_left - budget.bytes_left,
                           budget.keys - keys_before, height, d)
    return out, height


class _KeyText:
    """``f"{path}: key {name!r}"``, formatted only if a message needs it (a dump of 5,000 keys
    would format 5,000 texts that no error uses)."""

    __slots__ = ("path", "name")

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name

    def __str__(self) -> str:
        return f"{self.path}: key {self.name!r}"


def tree_from_pickle(root: dict[Any, Any], mf: MappedFile, *, opcodes: Optional[int] = None,
                     markers: bool = True, _inplace: bool = False) -> dict[str, Any]:
    """The lazy tree of ArraySpecs for a dict that ``restricted_unpickle`` returned.

    The tree may hold a few entries per pickle opcode (``opcodes``; by default the file's size,
    which bounds it) and no more: shared sub-containers cannot blow a small file up into billions
    of entries; and its keys may refer to at most ``ALIAS_FACTOR`` times the file's size (plus
    ``ALIAS_FLOOR``) bytes of data. A value that is not numeric data is a ``NonNumericValue``
    (``markers=False``: a ``DumpFormatError``).
    """
    left = _EXPANSION * (mf.size if opcodes is None else opcodes) + _EXPANSION_FLOOR
    budget = _Budget(left, mf.path, mf.size, markers)
    budget.inplace = _inplace
    return _tree(root, mf, "", budget)


def _stub_columns(root: dict[Any, Any], mf: MappedFile, opcodes: int) -> Optional[ColumnTree]:
    """``columns_of(tree_from_pickle(root, ...))`` for the usual reprod_log dict (str keys, every
    value an array whose bytes lie in the file), without a spec per key on the way: the same
    columns, or None, with ``root`` untouched, for anything else or anything the general walk
    would refuse or mark (which it then does, with its own message). Its per-key loop is one
    check and two appends; the general one built a spec, checked it, then took it apart."""
    n = len(root)
    if not n or set(map(type, root)) != {str} or set(map(type, root.values())) != {_ArrayStub}:
        return None
    budget = _Budget(_EXPANSION * opcodes + _EXPANSION_FLOOR, mf.path, mf.size)
    if budget.left < 1 + 2 * n:  # tree_from_pickle's count: the dict's entries, then each leaf
        return None
    b = ColumnBuilder()
    offsets, codes = b.offsets, b.codes
    # (dtype stub, shape, fortran) -> (layout code, bytes): a dump repeats a few hundred
    seen: dict[tuple[Any, ...], tuple[int, int]] = {}
    total = 0
    payload = _Payload
    for stub in root.values():
        data = stub.data
        if type(data) is not payload:
            return None
        form = (stub.dtype, stub.shape, stub.fortran)
        got = seen.get(form)
        if got is None:
            dstub = form[0]
            if dstub is None or dstub.structured:
                return None
            try:
                dt = dstub.to_dtype(mf.path)
            except DumpFormatError:
                return None
            if dt.kind not in "biufc":
                return None
            got = seen[form] = (b.code((dt, form[1], form[2], None)), dt.itemsize * math.prod(form[1]))
        if data.length != got[1]:
            return None
        offsets.append(data.offset)
        codes.append(got[0])
        total += got[1]
    if total > budget.bytes_left:  # aliased payloads: the general walk names the key
        return None
    root.update(zip(list(root), range(n)))  # the reader's dict becomes the rows, in place
    b.rows = root
    return b.build()


def read_npy(mf: MappedFile, stem: str) -> Dump:
    """Read an .npy: reprod_log's pickled dict, or a plain array (one key named after the file)."""
    buf = mf.buffer()
    dt, shape, fortran, data_off = parse_npy_header(buf, 0, mf.size, mf.path)
    if dt.hasobject:
        walker = _PickleWalker(buf, data_off, mf.size, mf.path)
        root = walker.run()
        if isinstance(root, _ArrayStub) and root.dtype is not None and root.dtype.descr.startswith("O") \
                and isinstance(root.data, list) and len(root.data) == 1:
            root = root.data[0]
        if not isinstance(root, dict):
            raise DumpFormatError(
                f"{mf.path}: object .npy does not hold a dict of arrays (found {type(root).__name__})"
            )
        cols = _stub_columns(root, mf, walker.steps)
        if cols is not None:  # the usual dict of arrays: straight to columns
            del walker, root
            mf.drop_pages()
            return Dump(cols, mf, path=mf.path, fmt="npy-dict")
        tree = tree_from_pickle(root, mf, opcodes=walker.steps, _inplace=True)
        del walker, root  # the walk's memo goes before the tree is turned into columns
        cols = columns_of(tree)
        mf.drop_pages()  # the walk read every page; the comparison maps in what it reads
        return Dump(tree if cols is None else cols, mf, path=mf.path, fmt="npy-dict")
    if dt.kind not in "biufc":
        raise DumpFormatError(f"{mf.path}: array of dtype {dt} is not numeric data")
    spec = ArraySpec(dtype=dt, shape=shape, offset=data_off, fortran=fortran)
    if data_off + spec.nbytes > mf.size:
        raise DumpFormatError(f"{mf.path}: truncated: header claims {spec.nbytes} bytes of data, "
                              f"file has {mf.size - data_off}")
    return Dump({stem: spec}, mf, path=mf.path, fmt="npy-array")


read_legacy = read_npy


def write_legacy(path: str, tree: dict[str, Any]) -> str:
    """``np.save(path, tree)`` exactly as reprod_log does, but atomically.

    The pickle is written from the arrays' memory (``_npy_writer``: same bytes as ``np.save``,
    without its copy of every array into a ``bytes``); ``np.save`` itself for anything else.
    """
    from ._npy_writer import save_npy_dict

    return save_npy_dict(path, tree)
