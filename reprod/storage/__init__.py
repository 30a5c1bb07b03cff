"""``reprod.load`` and ``reprod.save``: two formats chosen by content (load) or suffix (save)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

from ..adapters import to_tree
from ..errors import DumpFormatError, UnsupportedValueError

if TYPE_CHECKING:
    from .lazy import ArraySpec, Dump, MappedFile, NonNumericValue

__all__ = ["load", "save", "Dump", "ArraySpec", "NonNumericValue"]

PathLike = Union[str, "os.PathLike[str]"]

# The reader's classes, resolved on first use (PEP 562): importing them (mmap views, dataclasses,
# the kernel) was ~3 ms of a process's first ``ReprodLogger.save``, which imports this package for
# its writer and reads nothing.
_FROM_LAZY = frozenset({"ArraySpec", "Dump", "MappedFile", "NonNumericValue"})
_LAZY_MODULE = __name__ + ".lazy"


def __getattr__(name: str) -> Any:
    if name not in _FROM_LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import lazy

    value = getattr(lazy, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_LAZY)


def load(path: PathLike, *, verify: Optional[bool] = None) -> Dump:
    """Open a dump lazily: keys, shapes and dtypes now, array bytes (mmap) when a key is read.

    Reads reprod's ``.npz``, reprod_log's pickled ``.npy`` dicts (safely: no code runs), plain
    ``.npy`` arrays (one key named after the file) and plain ``numpy.savez`` archives. The format is
    detected from the content, not the suffix. Every problem with the file, found now or when a key
    is read, is a ``DumpFormatError`` naming the file.

    A value of a reprod_log ``.npy`` that is not numeric data (a ``str``, ``None``, a list that is
    no array, an array of strings) loads as a ``NonNumericValue`` (``what`` says what it is), which
    the comparison reports as a ``type`` verdict; the other keys load as usual.

    ``verify`` applies to ``.npz`` members, which carry a CRC32: by default (``None``) a member
    under 1 MiB is checked the first time it is read; ``True`` checks every member now; ``False``
    checks none. A legacy ``.npy`` has no checksum: a flipped payload byte there cannot be detected.

    >>> d = reprod.load("result/forward_paddle.npy")
    >>> list(d), d["logits"].shape
    """
    from .._gc import gc_paused
    from .lazy import MappedFile

    p = os.fspath(path)
    try:
        mf = MappedFile(p)
    except DumpFormatError as exc:
        if isinstance(exc.__context__, FileNotFoundError):  # also a FileNotFoundError
            from ..errors import DumpNotFoundError

            raise DumpNotFoundError(p, str(exc)) from None
        raise
    head = bytes(mf.buffer()[:6])
    try:
        with gc_paused():
            return _read(mf, p, head, verify)
    except RecursionError:
        # the readers recurse over nesting they have already bounded; this is a last safety net
        mf.close()
        raise DumpFormatError(f"{p}: structure nested too deeply to be a dump") from None
    except BaseException:
        mf.close()
        raise


def _read(mf: MappedFile, p: str, head: bytes, verify: Optional[bool]) -> Dump:
    if head == b"\x93NUMPY":
        from .legacy import read_npy

        stem = os.path.splitext(os.path.basename(p))[0]
        return read_npy(mf, stem)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        from .npz_reader import read_npz

        dump = read_npz(mf, verify=verify)
        if verify:
            dump.verify()
        return dump
    raise DumpFormatError(f"{p}: not a dump (neither .npy nor .npz; starts with {head[:4]!r})")


def save(path: PathLike, mapping: Mapping[str, Any], *, source_dtypes: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``mapping`` (key -> array/tensor/number or nested dict) atomically; return the path.

    ``.npz`` writes the native format; any other path writes reprod_log's pickled ``.npy`` dict,
    with ``.npy`` appended when missing (as ``np.save`` did for reprod_log). Keys are str; an int
    key (at any depth) is saved as its str, as ``ReprodLogger.add`` stores it. An exception while
    saving leaves any earlier file at ``path`` intact.
    """
    p = os.fsdecode(path)
    if not isinstance(mapping, Mapping):
        raise UnsupportedValueError(f"{p}: save() needs a mapping of key -> array, got {type(mapping).__name__}")
    tree: dict[str, Any] = {}
    dtypes: dict[str, Any] = dict(source_dtypes or {})
    legacy = not p.endswith(".npz")
    # a Dump or a NonNumericValue exists only once their module is imported: until then no value
    # can be one, and saving need not import the reader
    lazy = sys.modules.get(_LAZY_MODULE)
    dump_cls = marker_cls = None
    if lazy is not None:
        dump_cls, marker_cls = lazy.Dump, lazy.NonNumericValue
    import numpy as np

    ndarray = np.ndarray
    if not all(type(k) is str for k in mapping):
        # an int key as ReprodLogger.add takes it (its text), any other a one-line error
        from ..keys import str_keyed

        mapping = str_keyed(mapping, f"{p}: key ")
    for k, v in mapping.items():
        if type(v) is ndarray and v.dtype.kind in _PLAIN_KINDS:  # most values: kept as they are
            tree[k] = v
            continue
        if dump_cls is not None and isinstance(v, dump_cls):
            v = v.to_dict()
        if marker_cls is not None and _has_marker(v, marker_cls):
            # a reprod_log dump's str/None/list value: np.save keeps it in a .npy, as it came
            tree[k] = _unmarked(v, p, k, legacy)
            continue
        try:
            tree[k], dt = to_tree(v, key=k) if not _is_plain(v) else (v, None)
        except UnsupportedValueError as e:  # named by its key only: the file too
            raise UnsupportedValueError(f"{p}: {e}") from None
        if dt is not None:
            dtypes[k] = dt
    if p.endswith(".npz"):
        from .npz_writer import write_npz

        return write_npz(p, tree, dtypes)
    from .legacy import write_legacy

    if not p.endswith(".npy"):
        p += ".npy"
    return write_legacy(p, tree)


def _has_marker(v: Any, marker_cls: type) -> bool:
    if isinstance(v, marker_cls):
        return True
    return isinstance(v, dict) and any(_has_marker(x, marker_cls) for x in v.values())


def _unmarked(v: Any, p: str, key: str, legacy: bool) -> Any:
    """A tree holding ``NonNumericValue``s (from ``load`` of a reprod_log dump) with their plain
    values, for a ``.npy``; a ``.npz`` holds numeric data only."""
    from .lazy import NonNumericValue

    if isinstance(v, dict):
        return {k: _unmarked(x, p, f"{key}/{k}", legacy) for k, x in v.items()}
    if isinstance(v, NonNumericValue):
        if not (legacy and v.has_value):
            raise UnsupportedValueError(f"{p}: key {key!r} holds {v.what}, not numeric data"
                                        + ("; only a .npy dump can keep it" if v.has_value else ""))
        return v.value
    return v


_PLAIN_KINDS = "biufc"


def _is_plain(v: Any) -> bool:
    """Already-converted trees (what ReprodLogger holds) need no second copy."""
    import numpy as np

    if isinstance(v, np.ndarray):
        return v.dtype.kind in _PLAIN_KINDS
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False
