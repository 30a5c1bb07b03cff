"""reprod_log's format: ``np.save(path, dict)``, an .npy holding a pickled dict of arrays.

Reading never runs the pickle: ``pickle_walker`` walks its opcodes and records where each array's
bytes lie in the file instead of copying them; the tree of ``ArraySpec``s built from that here
views each array in place through mmap, so opening a 2 GiB dump costs milliseconds. Anything but
numeric data is refused with ``DumpFormatError`` or ``UnsafeDumpError`` before it could run.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np

from ..errors import DumpFormatError
from .atomic import AtomicFile
from .lazy import ArraySpec, Dump, MappedFile
from .npy_header import MAX_DEPTH, MAX_NDIM, _short, check_shape, parse_npy_header
from .pickle_walker import (
    SAFE_GLOBALS,
    _ArrayStub,
    _Payload,
    _PickleWalker,
    _Scalar,
    restricted_unpickle,
)

__all__ = ["read_legacy", "write_legacy", "SAFE_GLOBALS", "restricted_unpickle", "tree_from_pickle",
           "check_shape"]

# A pickle's memo lets one sub-dict or list be referenced many times, so a tiny file can describe a
# tree of billions of entries. Real dumps reference each container about once: the tree may hold at
# most this many entries per pickle opcode (plus a constant) before the file is refused.
_EXPANSION = 4
_EXPANSION_FLOOR = 100_000


class _Budget:
    """Counts the entries a tree expands to, against a bound set by the size of its pickle."""

    __slots__ = ("left", "path")

    def __init__(self, left: int, path: str) -> None:
        self.left = left
        self.path = path

    def take(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise DumpFormatError(f"{self.path}: the pickle's shared entries expand to an implausibly "
                                  "large tree (a hostile file?)")


def _leaf(value: Any, mf: MappedFile, where: Any, budget: Optional[_Budget] = None, depth: int = 0) -> ArraySpec:
    """``where``: the key's text for messages, a str or a _KeyText."""
    path = mf.path
    if budget is not None:
        budget.take()
    if type(value) is _ArrayStub:
        if value.dtype is None:
            raise DumpFormatError(f"{where}: corrupt array")
        dt = value.dtype.to_dtype(where)
        if dt.kind not in "biufc":
            raise DumpFormatError(f"{where}: array of dtype {dt} is not numeric data")
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
        dt = value.dtype.to_dtype(where)
        if dt.kind not in "biufc":
            raise DumpFormatError(f"{where}: scalar of dtype {dt} is not numeric data")
        raw = bytes(value.data if isinstance(value.data, (bytes, bytearray)) else
                    mf.buffer()[value.data.offset: value.data.offset + value.data.length]
                    if isinstance(value.data, _Payload) else b"")
        if len(raw) != dt.itemsize:
            raise DumpFormatError(f"{where}: corrupt scalar")
        return ArraySpec(dtype=dt, shape=(), loader=lambda: np.frombuffer(raw, dtype=dt).reshape(()))
    if isinstance(value, (bool, int, float, complex)) and not isinstance(value, _Payload):
        arr = np.array(value)
        if arr.dtype == object:
            raise DumpFormatError(f"{where}: integer does not fit in 64 bits")
        return ArraySpec(dtype=arr.dtype, shape=(), loader=lambda: arr)
    if isinstance(value, (list, tuple)):
        if depth >= MAX_NDIM:
            raise DumpFormatError(f"{where}: list nested more than {MAX_NDIM} levels deep")
        specs = [_leaf(v, mf, where, budget, depth + 1) for v in value]
        if not specs:
            return ArraySpec(dtype=np.dtype(np.float64), shape=(0,), loader=lambda: np.zeros(0))
        # numpy's own rule for a list of equal-shape arrays, worked out without allocating them
        if any(s.shape != specs[0].shape for s in specs):
            raise DumpFormatError(f"{where}: ragged list is not an array")
        dt = functools.reduce(np.promote_types, {s.dtype for s in specs})
        shape = check_shape((len(specs), *specs[0].shape), dt.itemsize, where)
        spec = ArraySpec(dtype=dt, shape=shape)
        if spec.nbytes > 8 * mf.size + (1 << 20):
            raise DumpFormatError(f"{where}: a list of {len(specs)} entries referencing the same "
                                  "data expands far beyond the file (a hostile file?)")

        def load_list() -> np.ndarray:
            return np.array([s.materialize(mf) for s in specs], dtype=dt)

        return ArraySpec(dtype=dt, shape=shape, loader=load_list)
    raise DumpFormatError(f"{path}: {str(where).split(': ', 1)[-1]}: value of type {type(value).__name__} is not numeric data")


def _tree(d: dict[Any, Any], mf: MappedFile, prefix: str, budget: _Budget, depth: int = 0) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise DumpFormatError(f"{mf.path}: key {prefix.rstrip('/')[:80]!r}...: dicts nested more than "
                              f"{MAX_DEPTH} levels deep")
    budget.take(1 + len(d))
    out: dict[str, Any] = {}
    for k, v in d.items():
        if type(k) is not str:
            raise DumpFormatError(f"{mf.path}: key {_short(k)} is a {type(k).__name__}, not a string")
        out[k] = _tree(v, mf, f"{prefix}{k}/", budget, depth + 1) if isinstance(v, dict) \
            else _leaf(v, mf, _KeyText(mf.path, prefix + k), budget)
    return out


class _KeyText:
    """``f"{path}: key {name!r}"``, formatted only if a message needs it (a dump of 5,000 keys
    would format 5,000 texts that no error uses)."""

    __slots__ = ("path", "name")

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name

    def __str__(self) -> str:
        return f"{self.path}: key {self.name!r}"


def tree_from_pickle(root: dict[Any, Any], mf: MappedFile, *, opcodes: Optional[int] = None) -> dict[str, Any]:
    """The lazy tree of ArraySpecs for a dict that ``restricted_unpickle`` returned.

    The tree may hold a few entries per pickle opcode (``opcodes``; by default the file's size,
    which bounds it) and no more: shared sub-containers cannot blow a small file up into billions
    of entries.
    """
    left = _EXPANSION * (mf.size if opcodes is None else opcodes) + _EXPANSION_FLOOR
    return _tree(root, mf, "", _Budget(left, mf.path))


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
        return Dump(tree_from_pickle(root, mf, opcodes=walker.steps), mf, path=mf.path, fmt="npy-dict")
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
    from ._npy_writer import write_npy_dict

    with AtomicFile(path) as af:
        if not write_npy_dict(af.file, tree):
            np.save(af.file, tree, allow_pickle=True)  # type: ignore[arg-type]
    return path
