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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .metrics import Stats, compute_stats
from .pairing import leaf_array
from .second_pass import ratio

__all__ = ["DEFAULT_NOISE_FACTOR", "Calibration", "calibrate"]

# A key passes when its difference is within this many times the reference's own noise. Measured
# on torchvision resnet50 / mobilenet_v3 against paddle.vision's own ports (3 seeds; forward, every
# layer, 2 SGD steps in float32; tests/realworld/MEASUREMENTS.md): correct ports reached 10.4 at
# most (paddle's float32 average pooling), the weakest injected bug 48 (one BN epsilon, logits):
# 20 leaves about 2x on each side.
DEFAULT_NOISE_FACTOR = 20.0

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


def _eps(*dtypes: Optional[str]) -> float:
    return max(_EPS.get(str(d), _EPS["float32"]) for d in dtypes if d is not None)


def calibrate(diff: Stats, ref: np.ndarray, hi_tree: Mapping[str, Any], path: tuple[str, ...],
              ref_dtype: Optional[str], other_dtype: Optional[str]) -> Calibration:
    """The noise of ``ref`` against its high-precision value at ``path`` in ``hi_tree``, and the
    multiple of it that ``diff`` (the statistics of other against ref) is."""
    parent = hi_tree
    for part in path[:-1]:
        parent = parent.get(part) if isinstance(parent, Mapping) else None  # type: ignore[assignment]
    if not isinstance(parent, Mapping) or path[-1] not in parent:
        return Calibration(why="not in the noise reference")
    hi, _ = leaf_array(parent, path[-1])
    if hi.size != ref.size or tuple(s for s in hi.shape if s != 1) != tuple(s for s in ref.shape if s != 1):
        return Calibration(why=f"noise reference has shape {tuple(hi.shape)}, ref {tuple(ref.shape)}")
    if hi.shape != ref.shape:
        hi = hi.reshape(ref.shape)
    ns = compute_stats(hi, ref)
    if ns.nan_unmatched or ns.inf_unmatched or ns.counted == 0:
        return Calibration(why="noise reference and ref disagree on NaN/Inf positions")
    eps = _eps(ref_dtype, other_dtype)
    ref_l2, ref_max = diff.ref_l2 or 0.0, diff.ref_max or 0.0
    noise_l2 = max(ns.diff_l2 or 0.0, eps * ref_l2)
    noise_max = max(ns.max_abs or 0.0, eps * ref_max)
    multiple = max(ratio(diff.diff_l2 or 0.0, noise_l2), ratio(diff.max_abs or 0.0, noise_max))
    return Calibration(l2=noise_l2, max=noise_max, multiple=multiple)
