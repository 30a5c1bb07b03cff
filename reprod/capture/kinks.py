"""Kink crossings: gradients that differ because an activation's input sits on its kink.

A non-smooth layer (ReLU at 0, ReLU6 at 0 and 6, Hardswish / Hardsigmoid at -3 and 3, a max-pool
at a tie between the largest elements of a window) has a derivative that jumps. When one element
of its input lies within rounding noise of the kink, the reference and a correct port can land it
on opposite sides: the forward outputs still agree (the values are both ~ the kink), but the
gradient flowing back through that element is ``g`` on one side and ``0`` (or ``g/2``...) on the
other, and every gradient upstream of it then differs by far more than rounding noise. No noise
factor can tell that from a bug, but the captured inputs can: ``explain_kinks`` finds those
elements (ref and other on opposite sides of a kink, no further apart than the input's own
tolerance) and gives the gradients they reach their own verdict, status ``"kink"``, with
``passed=True``: aligned, with a warning that says where.

>>> result = reprod.compare(torch_log.data, paddle_side, noise=torch64_log.data)
>>> result = explain_kinks(result, torch_log.data, paddle_side,
...                        layer_types=reprod.capture.layer_types(torch_model))
>>> [r.reason for r in result if r.status == "kink"][:1]
['downstream of the kink crossing at features.3.block.1.2 (ReLU): 1 element within noise of 0 on opposite sides; ...']

Time order: captures record keys as they happen (forward keys, then the backward's gradients, a
second step's keys after the first's), and the result keeps the reference's key order. A
*pass* is a run of forward keys (``in``/``out``) followed by gradient keys; a crossing in one
pass reaches

- the gradient keys of the same pass of every layer call that started before the crossing layer
  in the forward pass (``grad_in``, ``grad_out``, parameter gradients), and the crossing layer's
  own ``grad_in`` and parameter gradients;
- keys outside the capture scheme that match ``updates`` (weights after an optimizer step) and
  come after that pass's first gradient;
- once it has explained one failing key: every key of the later passes (a second step starts
  from weights that carry the difference).

Only keys that fail (status ``failed`` or ``mismatch``) are relabelled. Layers called earlier are
an over-approximation of "upstream in the graph" (a parallel branch that never feeds the crossing
layer is included), so a bug whose only effect is in the backward of a layer upstream of a
crossing hides behind the kink label; the forward keys and every key downstream of no crossing
keep their verdicts.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import numpy as np

from ..diff.noise import DEFAULT_NOISE_FACTOR
from ..diff.pairing import leaf_array, open_side
from ..diff.result import DiffResult, KeyResult
from .naming import ROOT, CaptureKey, layer_key, parse_key

__all__ = ["KINK_POINTS", "KinkCrossing", "explain_kinks", "find_kink_crossings"]

MAX = "max"  # a max-pool: its "kink" is a tie between the largest elements of a window
KinkSpec = Union[tuple[float, ...], str]

# class name (lower case: torch's MaxPool2d and paddle's MaxPool2D are one entry) -> kink points
KINK_POINTS: dict[str, KinkSpec] = {
    "relu": (0.0,),
    "relu6": (0.0, 6.0),
    "leakyrelu": (0.0,),
    "prelu": (0.0,),
    "rrelu": (0.0,),
    "selu": (0.0,),
    "hardswish": (-3.0, 3.0),
    "hardsigmoid": (-3.0, 3.0),
    "hardtanh": (-1.0, 1.0),
    "hardshrink": (-0.5, 0.5),
    "softshrink": (-0.5, 0.5),
    "abs": (0.0,),
    "maxpool": MAX,
    "maxpool1d": MAX,
    "maxpool2d": MAX,
    "maxpool3d": MAX,
    "adaptivemaxpool1d": MAX,
    "adaptivemaxpool2d": MAX,
    "adaptivemaxpool3d": MAX,
}

_FAILING = ("failed", "mismatch")
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


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


# --- the keys in time order ----------------------------------------------------------------------


@dataclass
class _Entry:
    pos: int
    kr: KeyResult
    parsed: Optional[CaptureKey]
    pass_index: Optional[int]  # None: not placed in time (keys only in other come last)
    backward: bool  # recorded after this pass's first gradient


def _entries(result: DiffResult) -> list[_Entry]:
    out = []
    index, backward = 0, False
    for pos, kr in enumerate(result.results):
        parsed = parse_key(kr.key)
        if kr.status == "extra":
            out.append(_Entry(pos, kr, parsed, None, False))
            continue
        if parsed is not None:
            if parsed.what in ("in", "out"):
                if backward:  # forward keys after gradients: the next step
                    index, backward = index + 1, False
            else:
                backward = True
        out.append(_Entry(pos, kr, parsed, index, backward))
    return out


class _Pass:
    """The forward order of one pass: where each layer call and each layer started."""

    def __init__(self, index: int, order: Optional[Sequence[str]]) -> None:
        self.index = index
        self.start: dict[str, int] = {}  # layer call -> position of its first forward key
        self.name_start: dict[str, int] = {}  # layer -> its first call's position
        self.local: dict[str, str] = {}  # layer call -> the call within this pass (relu#5 -> relu#2)
        self._calls: dict[str, int] = {}
        self._order = None if order is None else {s: i for i, s in enumerate(order)}

    def add_forward(self, parsed: CaptureKey, pos: int) -> None:
        subject = parsed.subject
        if subject in self.start:
            return
        self.start[subject] = pos
        self.name_start.setdefault(parsed.name, pos)
        call = self._calls.get(parsed.name, 0) + 1
        self._calls[parsed.name] = call
        self.local[subject] = parsed.name if call == 1 else f"{parsed.name}#{call}"

    def call_position(self, subject: str, name: str) -> Optional[int]:
        if self._order is not None:
            local = self.local.get(subject, subject)
            found = self._order.get(local)
            return self._order.get(name) if found is None else found
        return self.start.get(subject)

    def layer_position(self, name: str) -> Optional[int]:
        if self._order is not None:
            return self._order.get(name)
        return self.name_start.get(name)


# --- reading arrays -------------------------------------------------------------------------------


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


def _eps(dtype: Optional[str]) -> float:
    return _EPS.get(str(dtype), _EPS["float32"])


# --- which layers have kinks ---------------------------------------------------------------------


def _spec(name: str, layer_type: Optional[str],
          kinks: Optional[Mapping[str, Any]]) -> Optional[KinkSpec]:
    if kinks:
        for pattern, value in kinks.items():
            if fnmatch.fnmatchcase(name, pattern) or (
                layer_type is not None and pattern.lower() == layer_type.lower()
            ):
                if value is None or value == ():
                    return None
                return MAX if value == MAX else tuple(float(v) for v in value)
    if layer_type is None:
        return None
    return KINK_POINTS.get(layer_type.lower())


_SAMPLE = 4096


def _matches(x: np.ndarray, y: np.ndarray, fn: Any, tol: Any) -> bool:
    for part in (slice(0, _SAMPLE), slice(None)):  # a cheap rejection first
        xs, ys = x.reshape(-1)[part], y.reshape(-1)[part]
        want = fn(xs)
        if not np.all(np.abs(ys - want) <= tol(xs, want)):
            return False
    return True


def _infer_type(x: np.ndarray, y: np.ndarray) -> Optional[str]:
    """The non-smooth function a layer computes, recognised from its reference input and output
    (``None``: none of them). Used when no ``layer_types`` are given."""
    if x.size == 0:
        return None
    if x.shape != y.shape:
        return "MaxPool" if _looks_like_max_pool(x, y) else None
    if not np.any(x < 0):  # an identity on non-negative values is no ReLU
        return None
    exact = lambda xs, want: 0.0  # noqa: E731
    eps = _EPS["float32"]
    if np.any(x > 6) and _matches(x, y, lambda v: np.clip(v, 0.0, 6.0), exact):
        return "ReLU6"
    if _matches(x, y, lambda v: np.maximum(v, 0.0), exact):
        return "ReLU"
    gate = lambda v: np.clip(v / 6.0 + 0.5, 0.0, 1.0)  # noqa: E731
    if _matches(x, y, gate, lambda xs, want: 4 * eps):
        return "Hardsigmoid"
    if _matches(x, y, lambda v: v * gate(v), lambda xs, want: 8 * eps * (np.abs(xs) + 1.0)):
        return "Hardswish"
    neg = x < 0
    if np.any(x > 0) and np.array_equal(y[~neg], x[~neg]):
        slope = float(np.median(y[neg] / x[neg]))
        if 0.0 < abs(slope) < 1.0 and np.all(
            np.abs(y[neg] - slope * x[neg]) <= 4 * eps * np.abs(x[neg])
        ):
            return "LeakyReLU"
    return None


def _looks_like_max_pool(x: np.ndarray, y: np.ndarray) -> bool:
    if x.ndim < 3 or y.ndim != x.ndim or y.shape[:2] != x.shape[:2] or y.size >= x.size:
        return False
    xp, yp = _planes(x), _planes(y)
    return all(bool(np.all(np.isin(yp[p], xp[p]))) for p in range(min(len(xp), 4)))


def _planes(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0] * a.shape[1], -1)


# --- finding crossings ----------------------------------------------------------------------------


def _crossing_mask(spec: KinkSpec, xr: np.ndarray, xo: np.ndarray, tol: float,
                   yr: Optional[np.ndarray], yo: Optional[np.ndarray]
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
    for k in spec:
        m = ((xr > k) != (xo > k)) & close
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
                 ulps: float, order: Optional[Sequence[str]]) -> None:
        self.result = result
        self.ref = open_side(ref, "ref").tree
        self.other = open_side(other, "other").tree
        self.noise = None if noise is None else open_side(noise, "noise").tree
        self.layer_types = layer_types
        self.kinks = kinks
        self.ulps = ulps
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
            got = _crossing_mask(spec, xr, xo, tol, yr, yo)
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
        from ..diff.engine import compare

        masked = np.where(mask, gr, go)
        again = compare({"g": gr}, {"g": masked}, method=list(kr.thresholds) or "mean",
                        per_key={"g": dict(kr.thresholds)} if kr.thresholds else None,
                        threshold=None if not kr.thresholds else 1e-6, atol=kr.atol, rtol=kr.rtol)
        return again.passed


def _ratio(a: float, b: float) -> float:
    if a == 0.0:
        return 0.0
    return math.inf if b == 0.0 else a / b


# --- the API ---------------------------------------------------------------------------------------


def find_kink_crossings(
    result: DiffResult,
    ref: Any,
    other: Any,
    noise: Any = None,
    *,
    layer_types: Optional[Mapping[str, str]] = None,
    kinks: Optional[Mapping[str, Any]] = None,
    ulps: float = 16.0,
) -> list[KinkCrossing]:
    """Every kink crossing in two captures, in time order (``explain_kinks`` without relabelling:
    ``explained`` is 0). Arguments as for ``explain_kinks``."""
    return _Finder(result, ref, other, noise, layer_types, kinks, ulps, None).crossings()


def explain_kinks(
    result: DiffResult,
    ref: Any,
    other: Any,
    noise: Any = None,
    *,
    layer_types: Optional[Mapping[str, str]] = None,
    kinks: Optional[Mapping[str, Any]] = None,
    order: Optional[Sequence[str]] = None,
    updates: Union[str, Sequence[str], None] = None,
    ulps: float = 16.0,
) -> DiffResult:
    """``result`` with the failing keys that a kink crossing explains relabelled ``"kink"``.

    ``result`` compares two captures of ``reprod.capture.record`` (made with ``inputs=True``;
    with ``backward=True`` for there to be gradients to explain), ``ref``/``other``/``noise`` are
    what was given to ``reprod.compare`` (mappings or dump paths; ``noise`` is optional: the
    tolerance is read from the result's calibrated input keys first). A crossing is an element of
    a non-smooth layer's input (``KINK_POINTS``) that ref and other put on opposite sides of a
    kink while differing by no more than ``noise_factor`` times the input's noise (``ulps``
    rounding units of its largest value when it is not calibrated), in a layer call whose input
    key passes. The layers' classes come from ``layer_types`` (``reprod.capture.layer_types
    (model)``); without it they are recognised from each layer's recorded input and output
    (ReLU, ReLU6, LeakyReLU, Hardswish, Hardsigmoid, max-pool). ``kinks`` adds or overrides
    entries: ``{"Clip": (0.0, 1.0), "head.*": None, "MyPool": "max"}`` (class names or layer-name
    globs; ``None`` for no kink). ``order``: the layer calls of one forward pass in call order
    (``["conv", "relu", "conv2", "relu#2"]``), for captures that leave layers out (with
    ``include=``) whose parameter gradients were added by hand. ``updates``: globs of keys
    outside the capture scheme that are computed from the gradients of their pass (weights after
    an optimizer step, ``"step*/weight/*"``).

    Relabelled keys keep their statistics and get ``passed=True``, ``status="kink"`` and a
    reason naming the crossing; the crossing layer's input key gets a note; every crossing found
    is listed in ``result.options["kink_crossings"]`` (``KinkCrossing.to_dict()``).
    """
    finder = _Finder(result, ref, other, noise, layer_types, kinks, ulps, order)
    crossings = [c for c in finder.crossings() if finder.grad_in_explained(c)]
    by_pass: dict[int, list[KinkCrossing]] = {}
    for c in crossings:
        by_pass.setdefault(c.pass_index, []).append(c)
    globs = (updates,) if isinstance(updates, str) else tuple(updates or ())
    labels: dict[int, KinkCrossing] = {}  # entry position -> the crossing that explains it
    earlier: Optional[KinkCrossing] = None  # an explaining crossing of an earlier pass
    later: dict[int, KinkCrossing] = {}
    for index in sorted(finder.passes):
        mine = by_pass.get(index, [])
        here = finder.passes[index]
        explained_here: Optional[KinkCrossing] = None
        for e in finder.entries:
            if e.pass_index != index or e.kr.status not in _FAILING:
                continue
            if earlier is not None:
                later[e.pos] = earlier
                continue
            if e.parsed is None:  # an update computed from this pass's gradients
                if (explained_here is not None and e.backward
                        and any(fnmatch.fnmatchcase(e.kr.key, g) for g in globs)):
                    labels[e.pos] = explained_here
                continue
            c = _explaining(e, mine, here)
            if c is not None:
                labels[e.pos] = c
                explained_here = explained_here or c
        if earlier is None and explained_here is not None:
            earlier = explained_here
    counts: dict[tuple[int, str], int] = {}
    for c in list(labels.values()) + list(later.values()):
        counts[(c.pass_index, c.layer)] = counts.get((c.pass_index, c.layer), 0) + 1
    crossings = [replace(c, explained=counts.get((c.pass_index, c.layer), 0)) for c in crossings]
    notes = {c.key: c for c in crossings}

    out = []
    for e in finder.entries:
        kr = e.kr
        if e.pos in labels:
            c = labels[e.pos]
            kr = replace(kr, passed=True, status="kink",
                         reason=f"downstream of the {c.message}; {kr.reason}")
        elif e.pos in later:
            c = later[e.pos]
            kr = replace(kr, passed=True, status="kink",
                         reason=f"after the {c.message}, in an earlier step; {kr.reason}")
        elif kr.key in notes:
            note = notes[kr.key].message
            kr = replace(kr, note=note if not kr.note else f"{kr.note}; {note}")
        out.append(kr)
    options = dict(result.options, kink_crossings=[c.to_dict() for c in crossings])
    return replace(result, results=tuple(out), options=options)


def _explaining(e: _Entry, crossings: list[KinkCrossing], here: _Pass) -> Optional[KinkCrossing]:
    """The crossing of this pass that reaches capture key ``e``: the nearest one after it in
    forward order (the first the gradient passed through on its way back)."""
    p = e.parsed
    if not crossings or p is None or p.what in ("in", "out"):
        return None
    best: Optional[tuple[int, KinkCrossing]] = None
    for c in crossings:
        cp = parse_key(c.key)
        assert cp is not None
        at = here.call_position(c.layer, cp.name)
        if at is None:
            continue
        if p.is_param:
            owner = p.name.rpartition(".")[0] or ROOT
            start = here.layer_position(owner)
            reached = owner == cp.name or (start is not None and start < at)
        else:
            start = here.call_position(p.subject, p.name)
            reached = (p.subject == c.layer and p.what == "grad_in") or (
                p.subject != c.layer and start is not None and start < at
            )
        if reached and (best is None or at < best[0]):
            best = (at, c)
    return None if best is None else best[1]
