"""Random trees through the direct ``.npy`` writer: the same opcodes as ``np.save`` (frame
boundaries aside), the same bytes where the pickle fits one frame, and the same values read back
by ``np.load`` and ``reprod.load``."""

from __future__ import annotations

import io
import pickletools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reprod
from reprod.storage._npy_writer import write_npy_dict

DTYPES = ["?", "i1", "<i2", ">i4", "<i8", "u1", "<u2", "<u8", "<f2", "<f4", ">f4", "<f8", ">f8",
          "<c8", "<c16"]


@st.composite
def arrays(draw):
    dt = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    if draw(st.integers(0, 9)) == 0:  # now and then a payload larger than a pickle frame
        shape = (draw(st.integers(9000, 20000)),)
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.asarray((np.random.default_rng(seed).standard_normal(shape) * 100).astype(dt))
    order = draw(st.sampled_from(["C", "F", "strided"]))
    if order == "F":
        a = np.asfortranarray(a)
    elif order == "strided" and a.ndim and a.shape[0] > 1:
        a = a[::2]
    return a


keys = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
trees = st.recursive(
    st.dictionaries(keys, arrays(), max_size=6),
    lambda children: st.dictionaries(keys, st.one_of(arrays(), children), max_size=4),
    max_leaves=12,
)


def _ops(raw: bytes) -> list[tuple[str, object]]:
    """The pickle's opcodes without FRAME (where frames break is the only allowed difference)."""
    start = raw.index(b"\x80")  # after the .npy header
    return [(op.name, arg if not isinstance(arg, bytes) else len(arg))
            for op, arg, _ in pickletools.genops(raw[start:]) if op.name != "FRAME"]


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees)
def test_random_trees_match_np_save(tree, tmp_path_factory):
    mine, theirs = io.BytesIO(), io.BytesIO()
    assert write_npy_dict(mine, tree) is True
    np.save(theirs, tree, allow_pickle=True)
    a, b = mine.getvalue(), theirs.getvalue()
    if len(b) < 60_000:
        assert a == b
    else:
        assert _ops(a) == _ops(b)
    back = np.load(io.BytesIO(a), allow_pickle=True).item()
    reference = np.load(io.BytesIO(b), allow_pickle=True).item()
    path = tmp_path_factory.mktemp("w") / "t.npy"
    path.write_bytes(a)
    loaded = reprod.load(path)
    for path, value in _leaves(tree):
        node, ref, dump = back, reference, loaded
        for part in path[:-1]:
            node, ref, dump = node[part], ref[part], dump[part]
        leaf = path[-1]
        np.testing.assert_array_equal(node[leaf], value)
        assert node[leaf].dtype == ref[leaf].dtype and node[leaf].shape == ref[leaf].shape
        np.testing.assert_array_equal(dump[leaf], value)
