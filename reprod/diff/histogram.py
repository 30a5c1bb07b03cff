"""Histograms of element-wise differences |other - ref| for the HTML report's key detail,
computed block by block (bounded memory) on log-spaced bins."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from .pairing import leaf_array, open_side
from .result import DiffResult, KeyResult

__all__ = ["diff_histogram", "result_histograms"]

_BLOCK = 1 << 16


def diff_histogram(ref: np.ndarray, other: np.ndarray, *, max_abs: float, bins: int = 40
                   ) -> Optional[tuple[list[float], list[int]]]:
    """``(bin_edges, counts)`` of |other - ref| over the pairs where both are finite.

    The first bin is ``[0, max_abs * 1e-12)`` (zeros and negligible differences); the others are
    log-spaced up to ``max_abs``. ``None`` when ``max_abs`` is not a positive finite number.
    """
    if not (math.isfinite(max_abs) and max_abs > 0) or ref.size != other.size:
        return None
    hi = math.log10(max_abs)
    edges = np.concatenate(([0.0], np.logspace(hi - 12, hi, bins)))
    edges[-1] = np.nextafter(max_abs, math.inf)  # the largest difference falls inside the last bin
    counts = np.zeros(bins, dtype=np.int64)
    r, o = ref.reshape(-1), other.reshape(-1)
    with np.errstate(all="ignore"):
        for s in range(0, r.size, _BLOCK):
            rb = r[s : s + _BLOCK].astype(np.float64)
            ob = o[s : s + _BLOCK].astype(np.float64)
            d = np.abs(ob - rb)
            d = d[np.isfinite(d)]
            counts += np.histogram(d, bins=edges)[0]
    return [float(e) for e in edges], [int(c) for c in counts]


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Optional[np.ndarray]:
    node: Any = tree
    for part in path[:-1]:
        node = node[part]
    try:
        return leaf_array(node, path[-1])[0]
    except (KeyError, TypeError):
        return None


def result_histograms(result: DiffResult, ref: Any, other: Any, *, limit: int = 500,
                      bins: int = 40) -> dict[str, tuple[list[float], list[int]]]:
    """Histograms for up to ``limit`` keys of ``result`` (failing keys first), reading the two
    dumps (paths or mappings, as given to ``compare``) again."""
    a, b = open_side(ref, "ref").tree, open_side(other, "other").tree
    usable = [k for k in result if k.status in ("passed", "failed", "mismatch") and k.size]
    chosen: list[KeyResult] = [k for k in usable if not k.passed] + [k for k in usable if k.passed]
    out: dict[str, tuple[list[float], list[int]]] = {}
    for kr in chosen[:limit]:
        ra, oa = _leaf(a, kr.path), _leaf(b, kr.path)
        if ra is None or oa is None or kr.max_abs is None:
            continue
        h = diff_histogram(ra, oa, max_abs=kr.max_abs, bins=bins)
        if h is not None:
            out[kr.key] = h
    return out
