"""Calibrated verdicts: a key's difference judged as a multiple of the reference's own noise.

The same computation run at higher precision (float64) gives every key of the reference its noise:
how far the float32 reference itself is from the float64 result. A correct port differs from the
reference by rounding of the same order; a porting bug by orders of magnitude more. The noise
multiple of a key is

    max( ||other - ref||_2 / ||ref - ref_hi||_2 ,  max|other - ref| / max|ref - ref_hi| )

(the L2 ratio sees a bias spread over many elements, the max ratio a few wrong elements), where
each noise is taken no lower than one machine epsilon of the coarser dtype at the reference's scale
(``eps * ||ref||_2`` and ``eps * max|ref|``): a key computed exactly (noise 0) still allows the
last-bit differences two correct implementations make.

The noise speaks for the precision it was measured at. A port run in float16 or bfloat16 rounds
every activation ~2^13-2^16 times coarser than the float32 reference whose float64 distance is the
noise, so that noise cannot judge it (measured on torchvision models with every BatchNorm folded
into its conv, a correct half-precision port: 20-514x a float32 noise at the floor of one half
epsilon, 10^3-10^5x where it was saved as float32). Such a key is left uncalibrated, saying what
to run instead: the reference in the port's precision as ``ref``, its float32 run as the noise.
Compared that way two correct half-precision runs are independent draws of the same rounding, and
their multiple stays small (3.0 at most measured; ``LOW_PRECISION_NOISE_FACTOR``).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .. import _native
from .. import messages as msg
from . import metrics
from . import second_pass as sp
from .metrics import Stats, compute_stats
from .pairing import leaf_array
from .partial import FIELDS, Partial
from .second_pass import ratio

__all__ = ["DEFAULT_NOISE_FACTOR", "Calibration", "calibrate", "calibrated_stats", "carried_precision",
           "judge_precision", "LOW_PRECISION_NOISE_FACTOR", "Rounding", "port_rounding"]

# A key passes when its difference is within this many times the reference's own noise. Measured
# on torchvision resnet50 / mobilenet_v3 against paddle.vision's own ports (3 seeds; forward, every
# layer, 2 SGD steps in float32; tests/realworld/MEASUREMENTS.md): correct ports reached 10.4 at
# most (paddle's float32 average pooling), the weakest injected bug 48 (one BN epsilon, logits):
# 20 leaves about 2x on each side.
DEFAULT_NOISE_FACTOR = 20.0

# The factor where the noise is the reference's own half-precision rounding (the reference run in
# float16 or bfloat16, its float32 run as the noise). Measured on torchvision mobilenet_v3_small,
# mobilenet_v3_large and resnet50 (3 seeds, float16 and bfloat16, every activation and block
# output): a correct port (every BatchNorm folded into its conv) reached 3.0 at most; a dropped
# residual read 18-225 at its block (bfloat16 mobilenets 18.5-26.9, which the float32 factor let
# through to the next block; resnet50's in bfloat16 5.6-6.9, within its noise: the logits fail).
LOW_PRECISION_NOISE_FACTOR = 8.0

# machine epsilon (one unit in the last place at 1.0) of the dtypes a port is compared in; two
# correctly rounded implementations may differ by that much per element. Anything else: float32.
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52,
        "complex64": 2.0**-23, "complex128": 2.0**-52}


@dataclass(frozen=True)
class Calibration:
    """The noise of one key (``None`` fields: no usable noise reference, with ``why``)."""

    l2: Optional[float] = None
    max: Optional[float] = None
    multiple: Optional[float] = None
    why: Optional[str] = None
    noise_dtype: Optional[str] = None  # the dtype the noise reference holds
    coarser_port: bool = False  # uncalibrated because other rounds coarser than ref
    # (rows set apart, rows): rows where the reference's float64 run took another discrete
    # branch than its float32 run (``_set_apart``); the others judged on their own noise
    flips: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Rounding:
    """A difference both sides' float32 rounding makes (``port_rounding``)."""

    times: float  # the port's distance from its float64 run, in the reference's noise
    agree: float  # max |port_hi - ref_hi|
    noise: float  # the reference's float32 noise (max, floored)

    def reason(self, run: str = "run in float64") -> str:
        return (f"a known framework difference: the port's float32 rounding, {self.times:.3g}x "
                f"the reference's (another summation order or kernel): {run}, it agrees "
                f"with the reference's float64 run to {self.agree:.3g} (max), within the "
                f"reference's float32 noise ({self.noise:.3g})")


def _norms(a: np.ndarray) -> tuple[float, float]:
    """(L2, max) of ``a``; (0, 0) where it is empty."""
    if a.size == 0:
        return 0.0, 0.0
    return float(np.sqrt(np.sum(a * a))), float(np.max(np.abs(a)))


def port_rounding(ref: Any, other: Any, ref_hi: Any, other_hi: Any,
                  dtypes: tuple[Optional[str], ...] = ()) -> Optional[Rounding]:
    """Whether ``other - ref`` is both sides' rounding: with each side's same computation at
    higher precision (``ref_hi``, ``other_hi``),

        other - ref = (other - other_hi) - (ref - ref_hi) + (other_hi - ref_hi)

    and rounding leaves the last term at the higher precision's size, while a bug (another
    function) keeps it at full size. A ``Rounding`` where ``other_hi`` agrees with ``ref_hi``
    within the reference's own noise, in L2 and in max (each floored at one rounding unit of the
    coarsest of ``dtypes``, float32 where none is given, at the reference's scale); None otherwise, and where a shape
    differs or a value is not finite. The port's own noise is not bounded: Paddle's CPU Linear
    sums a bias gradient over 32,768 rows 3,000x less exactly than torch (measured)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (ref, other, ref_hi, other_hi)]
    t32, p32, t64, p64 = arrays
    if not (t32.shape == p32.shape == t64.shape == p64.shape):
        return None
    if not all(np.isfinite(a).all() for a in arrays):
        return None
    eps = _eps(*dtypes, "float64")
    r_l2, r_max = _norms(t32)
    n_l2, n_max = _norms(t32 - t64)
    n_l2, n_max = max(n_l2, eps * r_l2, 1e-300), max(n_max, eps * r_max, 1e-300)
    d_l2, d_max = _norms(p64 - t64)
    if d_l2 > n_l2 or d_max > n_max:
        return None
    p_l2, p_max = _norms(p32 - p64)
    return Rounding(max(p_l2 / n_l2, p_max / n_max), d_max, n_max)


def _eps(*dtypes: Optional[str]) -> float:
    return max(_EPS.get(str(d), _EPS["float32"]) for d in dtypes if d is not None)


_HALF = ("bfloat16", "float16")
# a precision scan reads 1,024 elements, then 8 times more each time up to 65,536: an array computed
# in float32 gives itself away in its first elements
_SCAN_FIRST, _SCAN = 1 << 10, 1 << 16
# the float32 bit of each half precision's last fraction bit (of its normal numbers)
_LAST_BIT = {"bfloat16": np.uint32(1 << 16), "float16": np.uint32(1 << 13)}
# fractional values that must use that last bit, at least 2 and a quarter of them (a half run's
# values use it one time in two; residues of a cancelling sum, with few bits, seldom do)
_EVIDENCE, _EVIDENCE_SHARE = 2, 4


def carried_precision(a: np.ndarray) -> Optional[str]:
    """``"bfloat16"`` or ``"float16"`` where a float32 or float64 array holds the values of a
    half-precision run (numpy has no bfloat16, so ``tensor.float()`` is how such a run reaches a
    dump), else ``None``.

    Every finite value must be one of that dtype's, and at least 2 of its fractional values, and a
    quarter of them, must use its last fraction bit. A value with few significant bits is a value
    of every dtype: whole numbers (counts, labels) and the residues of a cancelling float32 sum
    (k * 2^-29, as a bias gradient near zero is) say nothing. A float32 value is a bfloat16 one when its low 16 bits are zero, a
    float16 one when it survives the round trip; an array computed in float32 fails both within its
    first elements, where the scan stops."""
    if a.dtype not in (np.float32, np.float64) or a.size < _EVIDENCE:
        return None
    flat = a.reshape(-1)
    if _full_precision(flat[:4].tolist()):
        return None
    evidence = {"bfloat16": 0, "float16": 0}
    n_fractional = 0
    with np.errstate(over="ignore", invalid="ignore"):
        lo, step = 0, _SCAN_FIRST
        while lo < flat.size:
            c = flat[lo:lo + step]
            lo, step = lo + step, min(step * 8, _SCAN)
            c = c[np.isfinite(c)]
            if c.dtype == np.float64:
                c32 = c.astype(np.float32)
                if not np.array_equal(c32, c):
                    return None
                c = c32
            c = np.ascontiguousarray(c)
            bits = c.view(np.uint32)
            if "bfloat16" in evidence and np.any(bits & np.uint32(0xFFFF)):
                del evidence["bfloat16"]
            if "float16" in evidence and not np.array_equal(c.astype(np.float16).astype(np.float32), c):
                del evidence["float16"]
            if not evidence:
                return None
            fractional = c != np.floor(c)
            n_fractional += int(np.count_nonzero(fractional))
            for p in evidence:
                evidence[p] += int(np.count_nonzero((bits & _LAST_BIT[p]).astype(bool) & fractional))
    for p in _HALF:  # bfloat16 first: its values within float16's range are float16 ones too
        n = evidence.get(p, 0)
        if n >= _EVIDENCE and n * _EVIDENCE_SHARE >= n_fractional:
            return p
    return None


def _full_precision(values: list[float]) -> bool:
    """Whether one of ``values`` is a value of neither half precision: the check most float32
    arrays end at, in Python scalars (numpy's per-call cost is several times this)."""
    for v in values:
        if not math.isfinite(v):
            continue
        f32 = _F32.pack(v)
        if _F32.unpack(f32)[0] != v:
            return True  # not even a float32 value
        if _U32.unpack(f32)[0] & 0xFFFF:  # not bfloat16: float16?
            try:
                if _F16.unpack(_F16.pack(v))[0] != v:
                    return True
            except OverflowError:
                return True
    return False


_F32, _U32, _F16 = struct.Struct("<f"), struct.Struct("<I"), struct.Struct("<e")


def _precision(a: np.ndarray, declared: Optional[str]) -> tuple[Optional[str], bool]:
    """The precision ``a``'s values were computed in, and whether it differs from ``declared``."""
    if declared in _HALF:
        return declared, False
    carried = carried_precision(a)
    return (carried, True) if carried is not None else (declared, False)


def _coarser(a: Optional[str], b: Optional[str]) -> bool:
    """Whether precision ``a`` rounds coarser than ``b``."""
    return _EPS.get(str(a), _EPS["float32"]) > _EPS.get(str(b), _EPS["float32"])


def judge_precision(cal: Calibration, st: Stats, ref: np.ndarray, other: np.ndarray,
                    ref_dtype: Optional[str], other_dtype: Optional[str], factor: Optional[float]
                    ) -> tuple[Calibration, float, Optional[str]]:
    """``cal`` judged at the precision each side was computed in: the calibration, the factor the
    key passes within, and a note where a side holds half-precision values in a wider dtype.

    - other coarser than ref (a float16 port against a float32 reference): the noise cannot speak
      for it, the key is left uncalibrated with what to run instead;
    - ref coarser than the noise reference (the reference run in the port's half precision, its
      float32 run as the noise): judged within ``LOW_PRECISION_NOISE_FACTOR`` unless ``factor``
      is given;
    - half-precision values saved in a wider dtype floor the noise at their own rounding unit."""
    default = DEFAULT_NOISE_FACTOR if factor is None else factor
    if cal.multiple is None:
        return cal, default, None
    rp, r_carried = _precision(ref, ref_dtype)
    op, o_carried = _precision(other, other_dtype)
    half = [(side, str(p), str(dt)) for side, p, dt, carried in
            (("ref", rp, ref_dtype, r_carried), ("other", op, other_dtype, o_carried)) if carried]
    note = msg.note_half_values(half) if half else None
    if _coarser(op, rp):
        why = msg.why_coarser_port(str(op), str(rp))
        return Calibration(why=why, noise_dtype=cal.noise_dtype, coarser_port=True), default, note
    if _coarser(rp, cal.noise_dtype) and rp in _HALF:
        default = LOW_PRECISION_NOISE_FACTOR if factor is None else factor
    if r_carried or o_carried:  # no lower than one rounding unit of the precision computed in
        eps = _eps(rp, op)
        l2 = max(cal.l2 or 0.0, eps * (st.ref_l2 or 0.0))
        mx = max(cal.max or 0.0, eps * (st.ref_max or 0.0))
        multiple = max(ratio(st.diff_l2 or 0.0, l2), ratio(st.max_abs or 0.0, mx))
        if cal.flips:  # the rows set apart's judgement stands
            multiple = max(multiple, cal.multiple)
        cal = Calibration(l2=l2, max=mx, multiple=multiple, noise_dtype=cal.noise_dtype,
                          flips=cal.flips)
    return cal, default, note


# a row's noise this many times the typical row's is no rounding: the float64 run took another
# branch there (a router's expert, an argmax, a top-k); float32 rounding noise of a layer's rows
# stays within a few times of each other
_FLIP_ROWS = 100.0
# at most this share of the rows set apart: more is no few flips, and the whole key's noise
# stands
_FLIP_SHARE = 0.25
# the noise is looked at row by row only where its largest element is this many float32 units
# of the values' scale: rounding noise is a few to a few hundred
_FLIP_LOOK = 1e3
_ROW_CHUNK = 1 << 20  # elements per chunk of the row pass


def _row_norms(a: np.ndarray, b: Optional[np.ndarray], rows: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per row (the last axis's elements): ||a - b|| and max |a - b| (of ``a`` where ``b`` is
    None), in float64, by chunks."""
    a2 = a.reshape(rows, -1)
    b2 = None if b is None else b.reshape(rows, -1)
    step = max(1, _ROW_CHUNK // max(1, a2.shape[1]))
    l2, mx = np.empty(rows), np.empty(rows)
    for lo in range(0, rows, step):
        d = a2[lo:lo + step].astype(np.float64)
        d = np.abs(d if b2 is None else d - b2[lo:lo + step].astype(np.float64))
        d = np.where(np.isfinite(d), d, 0.0)  # NaN/Inf rows have their own verdicts
        l2[lo:lo + step] = np.sqrt(np.einsum("ij,ij->i", d, d))
        mx[lo:lo + step] = d.max(axis=1) if d.shape[1] else 0.0
    return l2, mx


def _set_apart(cal: Calibration, st: Stats, ref: np.ndarray, other: np.ndarray, hi: np.ndarray,
               eps: float) -> Calibration:
    """``cal`` where a few rows' noise is far above the others': the reference's float64 run
    took another discrete branch there than its float32 run (a Mixtral router near a tie sent
    3 of 64 tokens to other experts, 0.15 apart where rounding is 1e-7), and that noise, taken
    for the whole key's, passed a real bug on every row at 2.5x. The key's multiple is then
    also that of the other rows against their own noise, and ``flips`` says how many rows were
    set apart (both sides may take either branch there; the port's rows too where it takes the
    other branch on rows of its own, as long as all of them stay few)."""
    if cal.multiple is None or ref.ndim == 0 or ref.size < 2 or hi.shape != ref.shape:
        return cal
    if (cal.max or 0.0) <= _FLIP_LOOK * eps * (st.ref_max or 0.0):
        return cal
    carried = _precision(ref, None)[0]
    if carried in _HALF and (cal.max or 0.0) <= _FLIP_LOOK * _eps(carried) * (st.ref_max or 0.0):
        return cal  # half-precision values in a wider dtype: their own rounding is the scale
    rows = int(np.prod(ref.shape[:-1])) if ref.ndim >= 2 else int(ref.size)
    noise_l2, noise_mx = _row_norms(hi, ref, rows)
    ref_l2, ref_mx = _row_norms(ref, None, rows)
    # each row's noise relative to its values: rounding is about as large on every row (a row
    # of larger values has larger noise, a channel of a half-precision run), a branch taken
    # otherwise is as large as the values
    # a row of values near 0 (a channel a ReLU mostly zeroed) is as large as a hundredth of
    # the typical row: its relative noise is no sign of a branch
    size = np.maximum(ref_l2, max(1e-2 * float(np.median(ref_l2)), np.finfo(np.float64).tiny))
    rel = np.maximum(noise_l2 / size, eps)
    typical = float(np.median(rel))
    flipped = rel > _FLIP_ROWS * typical
    k = int(flipped.sum())
    if k == 0 or k > _FLIP_SHARE * rows:
        return cal
    diff_l2, diff_mx = _row_norms(other, ref, rows)
    # the key is shown to turn on such a branch: the port's own float32 run may take the other
    # one elsewhere (Mixtral's port flipped 9 rows, its reference's float64 run 6, 5 of them the
    # same). A bug on every row leaves too many for this; one on a few rows of a key that never
    # branches is judged as before
    either = flipped | (np.maximum(diff_l2 / size, eps) > _FLIP_ROWS * typical)
    if int(either.sum()) <= _FLIP_SHARE * rows:
        flipped = either
        k = int(flipped.sum())
    quiet = ~flipped
    q_noise_l2 = max(float(np.sqrt(np.sum(noise_l2[quiet] ** 2))),
                     eps * float(np.sqrt(np.sum(ref_l2[quiet] ** 2))))
    q_noise_mx = max(float(noise_mx[quiet].max()), eps * float(ref_mx[quiet].max()))
    q_multiple = max(ratio(float(np.sqrt(np.sum(diff_l2[quiet] ** 2))), q_noise_l2),
                     ratio(float(diff_mx[quiet].max()), q_noise_mx))
    return dataclasses.replace(cal, multiple=max(cal.multiple, q_multiple), flips=(k, rows))


def calibrate(diff: Stats, ref: np.ndarray, hi_tree: Mapping[str, Any], path: tuple[str, ...],
              ref_dtype: Optional[str], other_dtype: Optional[str]) -> Calibration:
    """The noise of ``ref`` against its high-precision value at ``path`` in ``hi_tree``, and the
    multiple of it that ``diff`` (the statistics of other against ref) is."""
    hi, why, hi_dtype = _noise_array(hi_tree, path, ref)
    if hi is None:
        return Calibration(why=why)
    return _judge(diff, _noise_stats(hi, ref), ref_dtype, other_dtype, hi_dtype)


def calibrated_stats(ref: np.ndarray, other: np.ndarray, hi_tree: Optional[Mapping[str, Any]],
                     path: tuple[str, ...], ref_dtype: Optional[str], other_dtype: Optional[str], *,
                     atol: Optional[float] = None, rtol: Optional[float] = None,
                     equal_nan: bool = False, on_progress: Optional[Callable[[int], None]] = None,
                     ) -> tuple[Stats, Optional[Calibration]]:
    """``compute_stats(ref, other, ...)`` and, with a noise reference, ``calibrate`` of it: the
    calibration is ``None`` without ``hi_tree`` and where the key's own NaN/Inf verdict decides
    (unmatched NaN or Inf), as the engine asks for none there.

    Where the compiled kernel takes all three arrays (float32/float64), both come from one pass
    (``stats3``: each block of ``ref`` read once for both, and no division for the noise): the
    statistics and the calibration are bit-identical to the two ``compute_stats`` calls they
    replace (of the noise statistics, the calibration reads the counts, ``max_abs`` and
    ``diff_l2``; relative errors, cosine and worst position are left out). Else the two passes
    (tests/diff/test_stats3.py checks one against the other)."""
    if hi_tree is None:
        return compute_stats(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan,
                             on_progress=on_progress), None
    hi, why, hi_dtype = _noise_array(hi_tree, path, ref)
    both = None if hi is None else _one_pass(ref, other, hi, atol, rtol, equal_nan, on_progress)
    if both is None:
        st = compute_stats(ref, other, atol=atol, rtol=rtol, equal_nan=equal_nan,
                           on_progress=on_progress)
        if st.nan_unmatched or st.inf_unmatched:
            return st, None
        if hi is None:
            return st, Calibration(why=why)
        cal = _judge(st, _noise_stats(hi, ref), ref_dtype, other_dtype, hi_dtype)
        return st, _set_apart(cal, st, ref, other, hi, _eps(ref_dtype, other_dtype))
    st, ns = both
    if st.nan_unmatched or st.inf_unmatched:
        return st, None
    cal = _judge(st, ns, ref_dtype, other_dtype, hi_dtype)
    return st, _set_apart(cal, st, ref, other, hi, _eps(ref_dtype, other_dtype))


def leaf_at(tree: Mapping[str, Any], path: tuple[str, ...]) -> Optional[tuple[np.ndarray, str]]:
    """The array at ``path`` in a (nested) dump and the dtype to show; None where it is not
    there."""
    parent: Any = tree
    for part in path[:-1]:
        parent = parent.get(part) if isinstance(parent, Mapping) else None
    if not isinstance(parent, Mapping) or not path or path[-1] not in parent:
        return None
    return leaf_array(parent, path[-1])


def _noise_array(hi_tree: Mapping[str, Any], path: tuple[str, ...], ref: np.ndarray
                 ) -> tuple[Optional[np.ndarray], Optional[str], Optional[str]]:
    """The high-precision array at ``path`` in ``ref``'s shape and its dtype, or ``None`` and why
    not."""
    found = leaf_at(hi_tree, path)
    if found is None:
        return None, "not in the noise reference", None
    hi, hi_dtype = found
    if hi.size != ref.size or tuple(s for s in hi.shape if s != 1) != tuple(s for s in ref.shape if s != 1):
        return None, f"noise reference has shape {tuple(hi.shape)}, ref {tuple(ref.shape)}", None
    if hi.shape != ref.shape:
        hi = hi.reshape(ref.shape)
    return hi, None, hi_dtype


def _noise_stats(hi: np.ndarray, ref: np.ndarray) -> Stats:
    """The second pass: ref against its high-precision run."""
    try:
        return compute_stats(hi, ref)
    except _native.MappedReadError as exc:
        # the kernel numbers its buffers (hi, ref) here; callers name files by (ref, other, hi)
        exc.argument = {0: 2, 1: 0}.get(getattr(exc, "argument", -1), -1)  # type: ignore[attr-defined]
        raise


def _judge(diff: Stats, ns: Stats, ref_dtype: Optional[str], other_dtype: Optional[str],
           noise_dtype: Optional[str]) -> Calibration:
    """The calibration of ``diff`` against the noise statistics ``ns`` (hi against ref)."""
    if ns.nan_unmatched or ns.inf_unmatched or ns.counted == 0:
        return Calibration(why="noise reference and ref disagree on NaN/Inf positions",
                           noise_dtype=noise_dtype)
    eps = _eps(ref_dtype, other_dtype)
    ref_l2, ref_max = diff.ref_l2 or 0.0, diff.ref_max or 0.0
    noise_l2 = max(ns.diff_l2 or 0.0, eps * ref_l2)
    noise_max = max(ns.max_abs or 0.0, eps * ref_max)
    multiple = max(ratio(diff.diff_l2 or 0.0, noise_l2), ratio(diff.max_abs or 0.0, noise_max))
    return Calibration(l2=noise_l2, max=noise_max, multiple=multiple, noise_dtype=noise_dtype)


def _one_pass(ref: np.ndarray, other: np.ndarray, hi: np.ndarray, atol: Optional[float],
              rtol: Optional[float], equal_nan: bool, on_progress: Optional[Callable[[int], None]]
              ) -> Optional[tuple[Stats, Stats]]:
    """``compute_stats(ref, other, ...)`` and the fields of ``compute_stats(hi, ref)`` that the
    calibration reads, from the kernel's ``stats3`` on compute_stats' chunks and threads;
    ``None`` where the kernel cannot take the three arrays."""
    kernel = _native.kernel()
    codes = metrics._KERNEL_CODES
    if kernel is None or not hasattr(kernel, "stats3"):  # a build older than stats3
        return None
    r, o, h = ref.reshape(-1), other.reshape(-1), hi.reshape(-1)
    rc, oc, hc = codes.get(r.dtype), codes.get(o.dtype), codes.get(h.dtype)
    n = int(r.size)
    if rc is None or oc is None or hc is None or n == 0 or o.size != n or h.size != n:
        return None
    # compute_stats' conversions, so that both statistics see the same contiguous buffers
    r, o, h = (a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in (r, o, h))
    block = metrics.BLOCK
    check_close = atol is not None or rtol is not None
    args = (block, check_close, float(atol or 0.0), float(rtol or 0.0), bool(equal_nan))
    if n <= metrics.CHUNK:
        values, noise_values = kernel.stats3(r, rc, o, oc, h, hc, *args)
        if on_progress is not None:
            on_progress(n)
    else:
        chunk = max(1, metrics.CHUNK // block) * block  # compute_stats' chunks, so its block grid
        noise_parts: dict[int, Partial] = {}

        def work(lo: int, hi_: int) -> Partial:
            first, second = kernel.stats3(r[lo:hi_], rc, o[lo:hi_], oc, h[lo:hi_], hc, *args)
            noise_parts[lo] = Partial.from_tuple(second, lo)  # one key per chunk: no lock needed
            return Partial.from_tuple(first, lo)

        p = metrics._run_chunks(work, n, chunk, on_progress)
        q = Partial()
        for lo in sorted(noise_parts):  # merged in chunk order, as _run_chunks merges
            q.merge(noise_parts[lo])
        values = tuple(getattr(p, f) for f in FIELDS)
        noise_values = tuple(getattr(q, f) for f in FIELDS)
    return metrics._finish(n, values, r, o, check_close, block), _noise_finish(n, noise_values, h, r, block)


def _noise_finish(n: int, values: Any, h: np.ndarray, r: np.ndarray, block: int) -> Stats:
    """``metrics._finish`` of stats3's noise row, for the fields that row has (the counts,
    max_abs, the L2 norms and max|hi|; the noise pass computes no relative error, cosine or
    worst position): the same values, second pass included, as ``compute_stats(hi, ref)``."""
    f = dict(zip(FIELDS, values))
    st = Stats(size=n, counted=int(f["counted"]), ref_nan=int(f["ref_nan"]), ref_inf=int(f["ref_inf"]),
               other_nan=int(f["other_nan"]), other_inf=int(f["other_inf"]),
               nan_unmatched=int(f["nan_unmatched"]), inf_unmatched=int(f["inf_unmatched"]))
    if st.counted == 0:
        return st
    max_abs, max_ref, dd, rr = float(f["max_abs"]), float(f["max_ref"]), f["dd"], f["rr"]
    st.max_abs, st.ref_max = max_abs, max_ref
    st.max_scaled = sp.ratio(max_abs, max_ref)
    if sp.squares_lost(dd, rr, 0.0, max_abs) and not (dd == 0.0 and max_abs == 0.0):
        st.rel_l2, st.diff_l2, st.ref_l2 = sp.scaled_rel_l2(h, r, block, max_abs, max_ref)
    else:
        st.diff_l2, st.ref_l2 = math.sqrt(dd), math.sqrt(rr)
        st.rel_l2 = sp.ratio(st.diff_l2, st.ref_l2)
    return st
