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
from ..keys import str_keyed

__all__ = ["Side", "Pair", "Named", "open_side", "walk_pairs", "rename_leaves_by_order"]


class Named(dict):  # type: ignore[type-arg]
    """A plain dict that remembers which file it was read from (for report headers)."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        super().__init__(data)
        self.path = path


def _relu(a: Any) -> np.ndarray:
    return np.maximum(np.asarray(a), 0)


# what a reference key may be derived by, where no reference layer records the value a port's
# layer gives (a ReLU the reference calls as a function, fused into the port's BatchNorm)
DERIVED_OPS = {"relu": _relu}


class Derived(dict):  # type: ignore[type-arg]
    """A reference tree some of whose values are derived from what the reference recorded
    (``derived``: key -> the name of the ``DERIVED_OPS`` applied): a comparison with a noise
    reference derives that key's noise value alike."""

    def __init__(self, data: Mapping[str, Any], derived: Mapping[str, str]) -> None:
        super().__init__(data)
        self.derived = dict(derived)


class DerivedNoise(Mapping):  # type: ignore[type-arg]
    """A noise tree seen through a ``Derived`` reference's derivations."""

    def __init__(self, tree: Mapping[str, Any], derived: Mapping[str, str]) -> None:
        self.tree, self.derived = tree, derived
        src = getattr(tree, "source_dtype", None)
        if src is not None:
            self.source_dtype = src

    def __getitem__(self, key: str) -> Any:
        value = self.tree[key]
        op = self.derived.get(key)
        return value if op is None else DERIVED_OPS[op](value)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tree)

    def __len__(self) -> int:
        return len(self.tree)

    def __contains__(self, key: object) -> bool:
        return key in self.tree


@dataclass
class Side:
    """One side of a comparison: a mapping plus where it came from. ``owned``: the engine opened
    it from a path, so no caller holds it and the comparison may release what it has read."""

    tree: Mapping[str, Any]
    name: str
    owned: bool = False


def open_side(obj: Any, default_name: str) -> Side:
    if isinstance(obj, (str, os.PathLike)):
        from ..storage import load

        return Side(load(obj), os.fspath(obj), owned=True)
    if isinstance(obj, Mapping):
        name = getattr(obj, "path", default_name)
        return Side(_str_keys(obj, name, ()), name)
    # a single array or tensor: one key
    return Side({"value": obj}, default_name)


def _str_keys(tree: Mapping[Any, Any], name: str, path: tuple[str, ...]) -> Mapping[str, Any]:
    """``tree`` with its integer keys (at any depth) as their ``str``, as ``ReprodLogger`` stores
    them, so an in-memory tree pairs with a dump of it; the tree itself where every key is a str
    (a dump's always are). Any other key, or an int beside the same str, is a one-line error."""
    from ..storage.lazy import Dump

    if type(tree) is Dump:
        return tree
    if all(type(k) is str for k in tree):
        level: Mapping[str, Any] = tree
    else:  # an int key as its text, as ReprodLogger stores it; any other key an error
        level = str_keyed(tree, f"{name}: key " + "".join(p + "/" for p in path))
    # a new dict only where a key or a branch changed
    branches = {k: _str_keys(v, name, path + (k,)) for k, v in level.items() if _is_branch(v)}
    if level is tree and all(nv is tree[k] for k, nv in branches.items()):
        return tree
    return {k: branches.get(k, v) for k, v in level.items()}


def _is_branch(v: Any) -> bool:
    return type(v) is dict or (type(v) is not np.ndarray and isinstance(v, Mapping))


def leaf_array(tree: Mapping[str, Any], key: str) -> tuple[np.ndarray, str]:
    """The array at ``key`` and the dtype to show (``bfloat16`` where the source was)."""
    src = getattr(tree, "source_dtype", None)
    value = tree[key]
    source = src(key) if callable(src) else None
    if isinstance(value, np.ndarray):
        dt = value.dtype
        if dt.kind in "biufc":
            return value, source or dtype_name(dt)
    conv = to_numpy(value, key=key)
    return conv.array, source or conv.source_dtype or str(conv.array.dtype)


# str(dtype) costs microseconds (numpy builds it in Python); a dump repeats a few dtypes. Equal
# dtypes print alike (metadata is neither compared nor printed), so the dtype is the key.
_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dt: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = str(dt)
        if len(_DTYPE_NAMES) < 256:
            _DTYPE_NAMES[dt] = name
    return name


class Pair:
    """Two leaves (or one, for "missing"/"extra") at ``path``; ``key`` is the path joined by "/"."""

    __slots__ = ("path", "kind", "ref_tree", "other_tree", "key")

    def __init__(self, path: tuple[str, ...], kind: str,  # "leaf", "missing", "extra", "type"
                 ref_tree: Optional[Mapping[str, Any]] = None,
                 other_tree: Optional[Mapping[str, Any]] = None, key: Optional[str] = None) -> None:
        self.path = path
        self.kind = kind
        self.ref_tree = ref_tree
        self.other_tree = other_tree
        self.key = "/".join(path) if key is None else key

    def __repr__(self) -> str:
        return f"Pair({self.key!r}, {self.kind!r})"


def _selected(key: str, patterns: Optional[Sequence[str]]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(key, p) for p in patterns)


def walk_pairs(ref: Mapping[str, Any], other: Mapping[str, Any], *,
               keys: Optional[Union[str, Sequence[str]]] = None,
               _prefix: tuple[str, ...] = ()) -> Iterator[Pair]:
    """Pairs in the reference's key order; keys only in ``other`` follow, in its order."""
    patterns = [keys] if isinstance(keys, str) else keys
    ref_nodes, other_nodes = _nodes(ref), _nodes(other)
    head = "/".join(_prefix) + "/" if _prefix else ""
    for k in ref:
        path = _prefix + (k,)
        rv_branch = _is_branch(ref_nodes[k] if ref_nodes is not None else _peek(ref, k))
        if k not in other:
            yield from _one_sided(ref, k, path, "missing", patterns, rv_branch)
            continue
        ov_branch = _is_branch(other_nodes[k] if other_nodes is not None else _peek(other, k))
        if rv_branch and ov_branch:
            yield from walk_pairs(ref[k], other[k], keys=patterns, _prefix=path)
            continue
        key = head + k
        if rv_branch != ov_branch:
            if _selected(key, patterns) or rv_branch or ov_branch:
                yield Pair(path, "type", ref, other, key)
        elif _selected(key, patterns):
            yield Pair(path, "leaf", ref, other, key)
    for k in other:
        if k not in ref:
            yield from _one_sided(other, k, _prefix + (k,), "extra", patterns, _is_branch(_peek(other, k)))


def _nodes(tree: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """A Dump's key -> spec-or-dict table (what ``_peek`` would return, as a nested dict where it
    returns a nested Dump: both are branches), so the walk does not call ``spec`` per key."""
    from ..storage.columns import ColumnTree
    from ..storage.lazy import Dump

    if type(tree) is not Dump:
        return None
    nodes = tree._tree
    # a ColumnTree holds leaves only: its row numbers say "not a branch" without building a spec
    return nodes._rows if type(nodes) is ColumnTree else nodes


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


def _leaves(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k in tree:
        node = _peek(tree, k)
        if _is_branch(node):
            yield from _leaves(tree[k], prefix + (k,))
        else:
            yield prefix + (k,), node


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    shape = getattr(node, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def rename_leaves_by_order(ref: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """``other`` as a flat mapping whose i-th leaf carries the reference's i-th key, for two dumps
    written in the same order under different names (a port whose parameters or outputs are named
    otherwise). Leaves are paired while their shapes agree (or one is the 2-D transpose of the
    other, which the comparison then reports); from the first disagreement on, the rest keep their
    own names and show up as missing/extra, so a wrong pairing is never silent.

    >>> reprod.compare(torch_dump, paddle_dump, pair=rename_leaves_by_order)
    """
    ref_leaves = list(_leaves(ref))
    out: dict[str, Any] = {}
    paired = True
    for i, (path, node) in enumerate(_leaves(other)):
        new = path
        if paired and i < len(ref_leaves):
            rs, os_ = _shape(ref_leaves[i][1]), _shape(node)
            if rs is not None and (rs == os_ or (len(rs) == 2 and os_ == rs[::-1])):
                new = ref_leaves[i][0]
            else:
                paired = False
        else:
            paired = False
        value: Any = other
        for part in path:
            value = value[part]
        branch = out
        for part in new[:-1]:
            branch = branch.setdefault(part, {})
        leaf = new[-1] if new[-1] not in branch else "unpaired:" + new[-1]
        branch[leaf] = value
    return out
