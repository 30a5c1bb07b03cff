"""Walk two (nested) dumps side by side: which keys pair up, which are missing or extra, and the
leaf arrays of each pair, produced one at a time so memory holds one pair at most."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ..adapters import to_numpy

__all__ = ["Side", "Pair", "Named", "open_side", "walk_pairs"]


class Named(dict):  # type: ignore[type-arg]
    """A plain dict that remembers which file it was read from (for report headers)."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        super().__init__(data)
        self.path = path


@dataclass
class Side:
    """One side of a comparison: a mapping plus where it came from."""

    tree: Mapping[str, Any]
    name: str


def open_side(obj: Any, default_name: str) -> Side:
    if isinstance(obj, (str, os.PathLike)):
        from ..storage import load

        return Side(load(obj), os.fspath(obj))
    if isinstance(obj, Mapping):
        return Side(obj, getattr(obj, "path", default_name))
    # a single array or tensor: one key
    return Side({"value": obj}, default_name)


def _is_branch(v: Any) -> bool:
    return isinstance(v, Mapping)


def leaf_array(tree: Mapping[str, Any], key: str) -> tuple[np.ndarray, str]:
    """The array at ``key`` and the dtype to show (``bfloat16`` where the source was)."""
    src = getattr(tree, "source_dtype", None)
    value = tree[key]
    source = src(key) if callable(src) else None
    if isinstance(value, np.ndarray):
        dt = value.dtype
        if dt.kind in "biufc":
            return value, source or _dtype_name(dt)
    conv = to_numpy(value, key=key)
    return conv.array, source or conv.source_dtype or str(conv.array.dtype)


# str(dtype) costs microseconds (numpy builds it in Python); a dump repeats a few dtypes. Equal
# dtypes print alike (metadata is neither compared nor printed), so the dtype is the key.
_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dt: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = str(dt)
        if len(_DTYPE_NAMES) < 256:
            _DTYPE_NAMES[dt] = name
    return name


@dataclass
class Pair:
    path: tuple[str, ...]
    kind: str  # "leaf", "missing", "extra", "type"
    ref_tree: Optional[Mapping[str, Any]] = None
    other_tree: Optional[Mapping[str, Any]] = None

    @property
    def key(self) -> str:
        return "/".join(self.path)


def _selected(key: str, patterns: Optional[Sequence[str]]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(key, p) for p in patterns)


def walk_pairs(ref: Mapping[str, Any], other: Mapping[str, Any], *,
               keys: Optional[Union[str, Sequence[str]]] = None,
               _prefix: tuple[str, ...] = ()) -> Iterator[Pair]:
    """Pairs in the reference's key order; keys only in ``other`` follow, in its order."""
    patterns = [keys] if isinstance(keys, str) else keys
    for k in ref:
        path = _prefix + (k,)
        rv_branch = _is_branch(_peek(ref, k))
        if k not in other:
            yield from _one_sided(ref, k, path, "missing", patterns, rv_branch)
            continue
        ov_branch = _is_branch(_peek(other, k))
        if rv_branch and ov_branch:
            yield from walk_pairs(ref[k], other[k], keys=patterns, _prefix=path)
        elif rv_branch != ov_branch:
            if _selected("/".join(path), patterns) or rv_branch or ov_branch:
                yield Pair(path, "type", ref, other)
        elif _selected("/".join(path), patterns):
            yield Pair(path, "leaf", ref, other)
    for k in other:
        if k not in ref:
            yield from _one_sided(other, k, _prefix + (k,), "extra", patterns, _is_branch(_peek(other, k)))


def _peek(tree: Mapping[str, Any], k: str) -> Any:
    spec = getattr(tree, "spec", None)
    return spec(k) if callable(spec) else tree[k]


def _one_sided(tree: Mapping[str, Any], k: str, path: tuple[str, ...], kind: str,
               patterns: Optional[Sequence[str]], branch: bool) -> Iterator[Pair]:
    if branch:
        sub = tree[k]
        for kk in sub:
            yield from _one_sided(sub, kk, path + (kk,), kind, patterns, _is_branch(_peek(sub, kk)))
        return
    if _selected("/".join(path), patterns):
        yield Pair(path, kind, tree if kind == "missing" else None, tree if kind == "extra" else None)
