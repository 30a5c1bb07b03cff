"""Finding kink crossings: elements of a non-smooth layer's aligned input that ref and other
put on opposite sides of a kink, within the input's noise (``_Finder``); and the check that the
crossing layer's own input gradient fails only at those elements."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ...diff.noise import DEFAULT_NOISE_FACTOR
from ...diff.pairing import leaf_array, open_side
from ...diff.result import DiffResult, KeyResult
from ..naming import CaptureKey, layer_key, parse_key
from .passes import _entries, _Pass
from .points import MAX, KinkSpec, _eps, _infer_type, _looks_like_max_pool, _planes, _spec, sides

_FAILING = ("failed", "mismatch")  # the statuses a crossing may explain


@dataclass(frozen=True)
class KinkCrossing:
    """Elements of one non-smooth layer call's input on opposite sides of a kink in ref and other.

    ``layer`` is the layer call (``features.3.block.1.2``, ``layer1.0.relu#2``), ``key`` its
    input's key, ``elements`` how many elements cross, ``kinks`` the kink points they cross
    (``"max"`` for a max-pool tie), ``tolerance`` how far apart ref and other may be for an
    element to count, ``explained`` how many failing keys it explains (0: it changed nothing that
    matters). ``pass_index`` counts forward-backward passes (training steps) from 0.
    """

    layer: str
    layer_type: Optional[str]
    key: str
    elements: int
    kinks: KinkSpec
    tolerance: float
    pass_index: int = 0
    explained: int = 0

    @property
    def message(self) -> str:
        """``kink crossing at features.3.block.1.2 (ReLU): 1 element within noise of 0 on
        opposite sides``"""
        where = self.layer + (f" ({self.layer_type})" if self.layer_type else "")
        n = f"{self.elements} element{'' if self.elements == 1 else 's'}"
        if self.kinks == MAX:
            what = f"{n} within noise of a tie for their window's max, picked differently"
        else:
            points = " / ".join(f"{k:g}" for k in self.kinks)
            what = f"{n} within noise of {points} on opposite sides"
        return f"kink crossing at {where}: {what}"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "layer_type": self.layer_type, "key": self.key,
                "elements": self.elements,
                "kinks": self.kinks if self.kinks == MAX else list(self.kinks),
                "tolerance": self.tolerance, "pass": self.pass_index,
                "explained": self.explained, "message": self.message}

def _array(tree: Optional[Mapping[str, Any]], path: tuple[str, ...]) -> Optional[np.ndarray]:
    node: Any = tree
    for part in path[:-1]:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if not isinstance(node, Mapping) or path[-1] not in node:
        return None
    arr, _ = leaf_array(node, path[-1])
    if arr.dtype.kind not in "biuf":
        return None
    return np.asarray(arr, dtype=np.float64)

def _crossing_mask(spec: KinkSpec, xr: np.ndarray, xo: np.ndarray, tol: float,
                   yr: Optional[np.ndarray], yo: Optional[np.ndarray],
                   layer_type: Optional[str] = None,
                   frameworks: tuple[Optional[str], Optional[str]] = (None, None),
                   dtypes: tuple[Optional[str], Optional[str]] = (None, None),
                   ) -> Optional[tuple[np.ndarray, KinkSpec]]:
    close = np.abs(xr - xo) <= tol
    if spec == MAX:
        if yr is None or yo is None or not _looks_like_max_pool(xr, yr) or yo.shape != yr.shape:
            return None
        # an element is picked when it equals one of its plane's maxima; picked on one side only
        # means the argmax of some window moved to another element, within noise of it
        pr, po, pyr, pyo = _planes(xr), _planes(xo), _planes(yr), _planes(yo)
        mask = np.zeros(pr.shape, dtype=bool)
        for p in range(pr.shape[0]):
            mask[p] = np.isin(pr[p], pyr[p]) != np.isin(po[p], pyo[p])
        return (mask.reshape(xr.shape) & close), MAX
    assert not isinstance(spec, str)
    mask = np.zeros(xr.shape, dtype=bool)
    crossed = []
    # each side's own test (points.SIDES): an element both hold at 3 - 1 ulp is on opposite
    # sides of Paddle's Hardswish kink and torch's
    upper_r = sides(spec, layer_type, frameworks[0], xr, dtypes[0])
    upper_o = sides(spec, layer_type, frameworks[1], xo, dtypes[1])
    for k, ur, uo in zip(spec, upper_r, upper_o):
        m = (ur != uo) & close
        if m.any():
            crossed.append(k)
            mask |= m
    return mask, tuple(crossed)


def _tolerance(kr: KeyResult, xr: np.ndarray, noise: Optional[np.ndarray], factor: float,
               ulps: float) -> float:
    """How far ref and other may be apart at an element of an aligned input: ``noise_factor``
    times the input's noise (from the result, else the noise dump), else ``ulps`` rounding units
    of the input's largest value."""
    scale = float(np.max(np.abs(xr))) if xr.size else 0.0
    floor = ulps * _eps(kr.ref_dtype) * scale
    if kr.noise_max is not None and math.isfinite(kr.noise_max):
        return max(factor * kr.noise_max, floor)
    if noise is not None and noise.shape == xr.shape:
        noise_max = max(float(np.max(np.abs(xr - noise))), _eps(kr.ref_dtype) * scale)
        return max(factor * noise_max, floor)
    return floor


class _Finder:
    def __init__(self, result: DiffResult, ref: Any, other: Any, noise: Any,
                 layer_types: Optional[Mapping[str, str]], kinks: Optional[Mapping[str, Any]],
                 ulps: float, order: Optional[Sequence[str]],
                 frameworks: tuple[Optional[str], Optional[str]] = (None, None)) -> None:
        self.result = result
        self.ref = open_side(ref, "ref").tree
        self.other = open_side(other, "other").tree
        self.noise = None if noise is None else open_side(noise, "noise").tree
        self.layer_types = layer_types
        self.kinks = kinks
        self.ulps = ulps
        self.frameworks = frameworks
        factor = result.options.get("noise_factor")
        self.factor = float(factor) if factor is not None else DEFAULT_NOISE_FACTOR
        self.entries = _entries(result)
        self.by_key = {e.kr.key: e for e in self.entries}
        self.passes: dict[int, _Pass] = {}
        for e in self.entries:
            if e.pass_index is None:
                continue
            p = self.passes.get(e.pass_index)
            if p is None:
                p = self.passes[e.pass_index] = _Pass(e.pass_index, order)
            if e.parsed is not None and e.parsed.what in ("in", "out"):
                p.add_forward(e.parsed, e.pos)
        self._types: dict[str, Optional[str]] = {}
        self.masks: dict[str, np.ndarray] = {}  # crossing layer call -> crossing elements

    def layer_type(self, name: str) -> Optional[str]:
        if self.layer_types is not None:
            return self.layer_types.get(name)
        if name not in self._types:  # recognised from the reference's first call of the layer
            x = _array(self.ref, (layer_key(name, 1, "in"),))
            y = _array(self.ref, (layer_key(name, 1, "out"),))
            if x is None:
                x = _array(self.ref, (layer_key(name, 1, "in", ("0",)),))
            if y is None:
                y = _array(self.ref, (layer_key(name, 1, "out", ("0",)),))
            self._types[name] = None if x is None or y is None else _infer_type(x, y)
        return self._types[name]

    def crossings(self) -> list[KinkCrossing]:
        found = []
        seen: set[tuple[int, str]] = set()
        for e in self.entries:
            p = e.parsed
            if p is None or p.what != "in" or p.items not in ((), ("0",)) or e.pass_index is None:
                continue
            if (e.pass_index, p.subject) in seen:
                continue
            seen.add((e.pass_index, p.subject))
            if not e.kr.passed:  # the input itself differs: a divergence, not a crossing
                continue
            layer_type = self.layer_type(p.name)
            spec = _spec(p.name, layer_type, self.kinks)
            if spec is None:
                continue
            xr, xo = _array(self.ref, e.kr.path), _array(self.other, e.kr.path)
            if xr is None or xo is None or xr.shape != xo.shape or xr.size == 0:
                continue
            tol = _tolerance(e.kr, xr, _array(self.noise, e.kr.path), self.factor, self.ulps)
            yr = yo = None
            if spec == MAX:
                out_key = self.by_key.get(str(CaptureKey(p.name, p.call, "out", p.items)))
                if out_key is not None:
                    yr, yo = _array(self.ref, out_key.kr.path), _array(self.other, out_key.kr.path)
            got = _crossing_mask(spec, xr, xo, tol, yr, yo, layer_type, self.frameworks,
                                 (e.kr.ref_dtype, e.kr.other_dtype))
            if got is None:
                continue
            mask, crossed = got
            n = int(np.count_nonzero(mask))
            if not n:
                continue
            self.masks[p.subject] = mask
            found.append(KinkCrossing(p.subject, layer_type, e.kr.key, n, crossed, tol,
                                      e.pass_index))
        return found

    def grad_in_explained(self, c: KinkCrossing) -> bool:
        """False when the crossing layer's own input gradient fails also away from the crossing
        elements, while the gradient arriving at its output aligns: something else is wrong there."""
        parsed = parse_key(c.key)
        assert parsed is not None
        grad_in = self.by_key.get(str(CaptureKey(parsed.name, parsed.call, "grad_in", parsed.items)))
        grad_out = self.by_key.get(str(CaptureKey(parsed.name, parsed.call, "grad_out", ())))
        if grad_in is None or grad_in.kr.status not in _FAILING:
            return True
        if grad_out is None or grad_out.kr.status != "passed":
            return True  # the incoming gradient differs: judged through whatever explains that
        gr, go = _array(self.ref, grad_in.kr.path), _array(self.other, grad_in.kr.path)
        mask = self.masks.get(c.layer)
        if gr is None or go is None or mask is None or gr.shape != mask.shape or go.shape != gr.shape:
            return True
        d = np.where(mask, 0.0, go - gr)
        kr = grad_in.kr
        if kr.noise_max is not None and kr.noise_l2 is not None:
            multiple = max(_ratio(float(np.sqrt(np.sum(d * d))), kr.noise_l2),
                           _ratio(float(np.max(np.abs(d))), kr.noise_max))
            return multiple <= self.factor
        from ...diff.engine import compare

        masked = np.where(mask, gr, go)
        again = compare({"g": gr}, {"g": masked}, method=list(kr.thresholds) or "mean",
                        per_key={"g": dict(kr.thresholds)} if kr.thresholds else None,
                        threshold=None if not kr.thresholds else 1e-6, atol=kr.atol, rtol=kr.rtol)
        return again.passed


def _ratio(a: float, b: float) -> float:
    if a == 0.0:
        return 0.0
    return math.inf if b == 0.0 else a / b
