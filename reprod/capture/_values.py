"""What layer calls' values say about which call is which, for the pairing by call order.

Order and shapes alone pair wrongly where a port calls siblings in another order (a converter's
ResNet runs each stage's downsample before the main branch) or computes two reference layers in
one (a BatchNorm folded into the convolution before it). Values settle it: a faithful port's
call reads the same input as its reference call, and gives the same output as it, or as the last
of the reference calls it folds. Those calls are anchors; the rest pair by order between them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .. import _native

LIKE_RTOL = 1e-2  # values agreeing this closely are the same values (float32 or half ports)
_SAMPLES = 16  # elements read at fixed places: two arrays with like statistics but other values
_KERNEL_CODES = {np.dtype(np.float32): "f", np.dtype(np.float64): "d"}  # native order only
_FOLD = 3  # at most this many reference calls in a row computed by one port call


def moments(value: Any) -> Optional[tuple[float, float, float, float]]:
    """(mean, mean |x|, least, largest) of a float array; ``None`` for anything else. A NaN makes
    the means NaN."""
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - a value without an array view: no fingerprint
        return None
    if a.dtype.kind != "f" or a.size == 0:
        return None
    kernel = _native.kernel()
    code = _KERNEL_CODES.get(a.dtype)
    if kernel is not None and code is not None and a.flags.c_contiguous:
        # one read of the array: numpy's |x| copy and three reductions cost 5x that, most of
        # the pairing's time on a large model's captures (benchmarks/pairing.py)
        total, total_abs, lo, hi = kernel.moments(a, code)
        return total / a.size, total_abs / a.size, lo, hi
    # over the array as it is (half precision summed in float32): numpy's pairwise sums are far
    # within the 1e-2 that likeness reads them to, and a float64 copy costs the reads twice
    acc = np.float32 if a.itemsize < 4 else None
    with np.errstate(all="ignore"):
        return (float(a.mean(dtype=acc)), float(np.abs(a).mean(dtype=acc)), float(a.min()),
                float(a.max()))


def identical(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether two arrays of one shape and dtype hold the same data. Contiguous ones compare
    their bytes in the kernel, whose reads of a dump truncated meanwhile raise
    ``MappedReadError`` where numpy's kill the process; a NaN carried through unchanged is then
    the same data too, as it is."""
    kernel = _native.kernel()
    if kernel is not None and x.flags.c_contiguous and y.flags.c_contiguous:
        return bool(kernel.same_bytes(x, y))
    # most calls asked about compute something: their first elements already differ, and the
    # whole comparison (a boolean array of the capture's size) is left for the ones that do not
    n = min(x.size, 256)
    nan = x.dtype.kind in "fc"  # as the bytes: a NaN carried through is the same data
    return bool(np.array_equal(x.flat[:n], y.flat[:n], equal_nan=nan)) and \
        bool(np.array_equal(x, y, equal_nan=nan))


def varies(a: np.ndarray) -> bool:
    """Whether a float array holds more than one value (a NaN counts as varying, as it compares
    unequal to itself), read once through ``moments``."""
    m = moments(a)
    return m is not None and a.size > 1 and (math.isnan(m[0]) or m[2] != m[3])


def stats(value: Any) -> Optional[tuple[float, float, float]]:
    """(mean, mean |x|, max |x|) of a float array; ``None`` for anything else."""
    m = moments(value)
    return None if m is None else of_moments(m)


def of_moments(m: tuple[float, float, float, float]) -> tuple[float, float, float]:
    """``stats`` from ``moments``."""
    return m[0], m[1], max(m[3], -m[2])


def relu_stats(m: tuple[float, float, float, float]) -> tuple[float, float, float]:
    """``stats`` of max(x, 0) from the ``moments`` of x, without computing it: its mean and
    mean |x| are both (mean + mean |x|) / 2."""
    half = (m[0] + m[1]) / 2
    return half, half, max(m[3], 0.0)


def close(x: Any, y: Any) -> bool:
    """Two ``stats`` agreeing to ``LIKE_RTOL``."""
    if x is None or y is None or not all(map(math.isfinite, (*x, *y))):
        return False
    scale = max(x[1], y[1])
    return (abs(x[0] - y[0]) <= LIKE_RTOL * scale and abs(x[1] - y[1]) <= LIKE_RTOL * scale
            and abs(x[2] - y[2]) <= LIKE_RTOL * max(x[2], y[2]))


def feeds(out: Any, nxt: Any) -> bool:
    """Whether a layer's output is the next layer's input (the same tensor, recorded once, or
    equal values), read from their first elements: a function between them changes those."""
    if out is nxt:
        return True
    a, b = np.asarray(out), np.asarray(nxt)
    if a.shape != b.shape:
        return False
    n = min(a.size, 256)
    return bool(np.array_equal(a.reshape(-1)[:n], b.reshape(-1)[:n]))


@dataclass(frozen=True)
class Probe:
    """A float array's shape, ``stats`` and a few elements at fixed places."""

    shape: tuple[int, ...]
    stats: tuple[float, float, float]
    samples: np.ndarray


def probe(value: Any) -> Optional[Probe]:
    st = stats(value)
    if st is None or not all(map(math.isfinite, st)):
        return None
    a = np.asarray(value).reshape(-1)
    at = np.linspace(0, a.size - 1, min(_SAMPLES, a.size)).astype(np.intp)
    return Probe(tuple(np.shape(value)), st, a[at].astype(np.float64))


def same_values(p: Optional[Probe], q: Optional[Probe]) -> bool:
    """Two arrays holding the same values, to ``LIKE_RTOL`` of their largest: like statistics
    and like elements where both are read."""
    if p is None or q is None or p.shape != q.shape or not close(p.stats, q.stats):
        return False
    return bool(np.all(np.abs(p.samples - q.samples) <= LIKE_RTOL * max(p.stats[2], q.stats[2])))


def part_value(mapping: Mapping[str, Any], subject: str, what: str) -> Any:
    """A layer call's single (or first) input or output."""
    for suffix in ("", "[0]", ".0"):
        value = mapping.get(f"{subject}.{what}{suffix}")
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class Anchors:
    pairs: list[tuple[int, int]]  # (other index, reference index)
    folded: dict[int, list[int]]  # reference index -> the reference calls after it one port call computes


def value_anchors(ref_subjects: Sequence[str], other_subjects: Sequence[str],
                  ref_map: Mapping[str, Any], other_map: Mapping[str, Any],
                  ref_taken: set[int], other_taken: set[int],
                  alike: Optional[Callable[[int, int], bool]] = None) -> Anchors:
    """Port calls whose values say which reference call they are, each the only one that can be:

    1. the same input and the same output;
    2. the same input as one reference call and the same output as a call up to two after it,
       each of those reading the one before's output (a BatchNorm folded into its convolution,
       paddle's ``BatchNorm(act="relu")``);
    3. the same input, the same shapes in and out, and nothing saying the two are layers of
       other kinds (``alike(reference index, other index)``): the call where a bug is (its
       output differs). A port that leaves a layer out has the next layer read the left-out
       one's input, and only the kinds tell the two apart.

    The calls ``*_taken`` (anchored by name) are left out. A value many calls share (siblings
    reading one input, a layer called twice on one tensor) anchors none of them."""
    def probes(subjects: Sequence[str], mapping: Mapping[str, Any], taken: set[int]
               ) -> dict[int, tuple[Probe, Optional[Probe]]]:
        out: dict[int, tuple[Probe, Optional[Probe]]] = {}
        for i, s in enumerate(subjects):
            if i in taken:
                continue
            p_in = probe(part_value(mapping, s, "in"))
            if p_in is not None:
                out[i] = (p_in, probe(part_value(mapping, s, "out")))
        return out

    ref_p = probes(ref_subjects, ref_map, ref_taken)
    other_p = probes(other_subjects, other_map, other_taken)
    if not ref_p or not other_p:
        return Anchors([], {})
    # the reference calls reading each port call's input, found once for the three rules: of
    # those of its shape, sorted by mean |x|, only the ones within LIKE_RTOL of it are read (a
    # large model's thousand same-shaped calls a side would otherwise make a million checks)
    by_shape: dict[tuple[int, ...], tuple[list[float], list[int]]] = {}
    for j, (p_in, _) in sorted(ref_p.items(), key=lambda item: item[1][0].stats[1]):
        sizes, calls = by_shape.setdefault(p_in.shape, ([], []))
        sizes.append(p_in.stats[1])
        calls.append(j)

    def read_by(p_in: Probe) -> list[int]:
        sizes, calls = by_shape.get(p_in.shape, ([], []))
        size = p_in.stats[1]
        lo = bisect.bisect_left(sizes, size * (1 - LIKE_RTOL))
        hi = bisect.bisect_right(sizes, size / (1 - LIKE_RTOL))
        return sorted(j for j in calls[lo:hi] if same_values(p_in, ref_p[j][0]))

    reads = {i: read_by(p_in) for i, (p_in, _) in other_p.items()}
    pairs: dict[int, int] = {}
    folded: dict[int, list[int]] = {}
    used: set[int] = set()

    def settle(found: dict[int, list[tuple[int, list[int]]]]) -> None:
        """Keep the port calls with one candidate (reference call, the calls it folds in) that
        no other port call has."""
        count: dict[int, int] = {}
        for cands in found.values():
            for j, _ in cands:
                count[j] = count.get(j, 0) + 1
        for i, cands in found.items():
            if len(cands) != 1:
                continue
            j, chain = cands[0]
            if count[j] == 1:
                pairs[i] = j
                used.add(j)
                used.update(chain)
                if chain:
                    folded[j] = chain

    def free(i: int) -> list[int]:
        return [j for j in reads[i] if j not in used]

    settle({i: [(j, []) for j in free(i) if same_values(other_p[i][1], ref_p[j][1])]
            for i in other_p if other_p[i][1] is not None})
    fused: dict[int, list[tuple[int, list[int]]]] = {}
    for i in other_p:
        out = other_p[i][1]
        if i in pairs or out is None:
            continue
        cands: list[tuple[int, list[int]]] = []
        for j in free(i):
            chain: list[int] = []
            k = j
            while len(chain) < _FOLD - 1 and k + 1 < len(ref_subjects) and k + 1 not in used \
                    and k + 1 not in ref_taken:
                before = part_value(ref_map, ref_subjects[k], "out")
                after = part_value(ref_map, ref_subjects[k + 1], "in")
                if before is None or after is None or not feeds(before, after):
                    break
                k += 1
                chain.append(k)
                got = ref_p[k][1] if k in ref_p else probe(
                    part_value(ref_map, ref_subjects[k], "out"))
                if same_values(out, got):
                    cands.append((j, list(chain)))
                    break
        fused[i] = cands
    settle(fused)

    def same_shapes(i: int, j: int) -> bool:
        o_out, r_out = other_p[i][1], ref_p[j][1]
        return o_out is not None and r_out is not None and o_out.shape == r_out.shape

    settle({i: [(j, []) for j in free(i) if same_shapes(i, j) and (alike is None or alike(j, i))]
            for i in other_p if i not in pairs})
    return Anchors(sorted(pairs.items()), folded)


def increasing(pairs: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``pairs`` (sorted on their first index) split into the longest run increasing on the
    second index too, which bounds the stretches paired by order, and the rest, which cross it
    (siblings called the other way round) and pair all the same."""
    if not pairs:
        return [], []
    tails: list[int] = []  # tails[k]: index in pairs ending the best run of length k + 1
    prev = [-1] * len(pairs)
    for t, (_, j) in enumerate(pairs):
        lo, hi = 0, len(tails)
        while lo < hi:
            mid = (lo + hi) // 2
            if pairs[tails[mid]][1] < j:
                lo = mid + 1
            else:
                hi = mid
        prev[t] = tails[lo - 1] if lo else -1
        if lo == len(tails):
            tails.append(t)
        else:
            tails[lo] = t
    keep: set[int] = set()
    t = tails[-1]
    while t >= 0:
        keep.add(t)
        t = prev[t]
    return ([p for t, p in enumerate(pairs) if t in keep],
            [p for t, p in enumerate(pairs) if t not in keep])


_KIND_ROWS, _KIND_COLS = 256, 64  # channels x elements read to tell what a call computes
_POINTWISE = 0.1  # a sorted run varying this little of a shuffled one: a function of the input


def own_kind(x: Any, y: Any) -> Optional[str]:
    """What a layer call computes, read from its own input and output, so that a bug before it
    does not change the answer: ``"activation"`` (one function of each element: ReLU,
    Hardswish), ``"channelwise"`` (a function of each element per channel: an eval BatchNorm),
    ``"normalising"`` (each element a function, per feature, of its row along the last axis
    standardised: LayerNorm, RMSNorm), ``"mixing"`` (each output of several inputs:
    convolution, linear), or ``None`` (other shapes, too few values, a constant output). The
    pairing by order prefers calls of one kind where shapes allow several pairings."""
    try:
        a, b = np.asarray(x), np.asarray(y)
    except Exception:  # noqa: BLE001 - a value without an array view
        return None
    if a.shape != b.shape or a.dtype.kind != "f" or b.dtype.kind != "f" or a.size < 16:
        return None
    full_a, full_b = a, b
    if a.ndim >= 2:
        a, b = np.moveaxis(a, 1, 0), np.moveaxis(b, 1, 0)
    a, b = a.reshape(len(a) if a.ndim > 1 else 1, -1), b.reshape(len(b) if b.ndim > 1 else 1, -1)
    a, b = _sampled(a, b)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    flat = _ratio(a.reshape(1, -1), b.reshape(1, -1))
    if flat is None:
        return None
    if flat <= _POINTWISE:
        return "activation"
    if a.shape[1] < 4:
        return None
    if _monotone(a, b):
        return "channelwise"
    return "normalising" if _normalising(full_a, full_b) else "mixing"


def _sampled(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``_KIND_ROWS`` x ``_KIND_COLS`` of two (rows, columns) arrays, in float64."""
    rows = np.linspace(0, a.shape[0] - 1, min(_KIND_ROWS, a.shape[0])).astype(np.intp)
    cols = np.linspace(0, a.shape[1] - 1, min(_KIND_COLS, a.shape[1])).astype(np.intp)
    return (a[np.ix_(rows, cols)].astype(np.float64), b[np.ix_(rows, cols)].astype(np.float64))


def _ratio(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """How much less ``y`` varies along sorted ``x`` than as it lies, row by row: near 1 for
    values unrelated to the input, about 3 / (columns - 1) for a monotone function."""
    shuffled = float(np.abs(np.diff(y, axis=1)).sum())
    if shuffled <= 0.0:
        return None
    order = np.argsort(x, axis=1, kind="stable")
    return float(np.abs(np.diff(np.take_along_axis(y, order, 1), axis=1)).sum()) / shuffled


def _monotone(x: np.ndarray, y: np.ndarray) -> bool:
    """Each row of ``y`` a function of the same row of ``x`` (rows, columns)."""
    got = _ratio(x, y)
    # a monotone function's sorted run varies ~3 / (n - 1) of a shuffled one over n columns
    return got is not None and got <= min(0.5, max(_POINTWISE, 6 / (x.shape[1] - 1)))


def _normalising(x: np.ndarray, y: np.ndarray) -> bool:
    """Each feature (last axis) of ``y`` a function of that feature of ``x``'s rows
    standardised (LayerNorm) or divided by their root mean square (RMSNorm): a LayerNorm and
    the Linear after it read one input and give one shape, and only this tells them apart."""
    if x.ndim < 2 or x.shape[-1] < 4:
        return False
    rows_x, rows_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if len(rows_x) < 4:
        return False
    pick = np.linspace(0, len(rows_x) - 1, min(_KIND_ROWS, len(rows_x))).astype(np.intp)
    rows_x, rows_y = rows_x[pick].astype(np.float64), rows_y[pick].astype(np.float64)
    with np.errstate(all="ignore"):
        centred = rows_x - rows_x.mean(axis=1, keepdims=True)
        standard = centred / np.sqrt((centred ** 2).mean(axis=1, keepdims=True))
        rms = rows_x / np.sqrt((rows_x ** 2).mean(axis=1, keepdims=True))
    for z in (standard, rms):
        if np.isfinite(z).all():
            zs, ys = _sampled(z.T, rows_y.T)  # features as rows, the rows read as columns
            if _monotone(zs, ys):
                return True
    return False
