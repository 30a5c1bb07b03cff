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

Where each part lives: ``points`` (which layer classes have kinks, and where; recognising a
layer's function from its recorded input and output), ``passes`` (the keys in time order),
``crossings`` (``KinkCrossing`` and finding them), ``fused`` (a kink activation built into another
layer, Paddle's ``BatchNorm(c, act="relu")``: its input recorded from inside the layer, for
``align_train``); this module relabels the keys they explain.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional, Union

from ...diff.result import DiffResult
from ..naming import ROOT, parse_key
from .crossings import _FAILING, KinkCrossing, _Finder
from .passes import _Entry, _Pass
from .points import FRAMEWORKS, KINK_POINTS, SIDES

__all__ = ["KINK_POINTS", "SIDES", "KinkCrossing", "explain_kinks", "find_kink_crossings"]

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
    frameworks: tuple[Optional[str], Optional[str]] = (None, None),
) -> list[KinkCrossing]:
    """Every kink crossing in two captures, in time order (``explain_kinks`` without relabelling:
    ``explained`` is 0). Arguments as for ``explain_kinks``."""
    _check_frameworks(frameworks)
    return _Finder(result, ref, other, noise, layer_types, kinks, ulps, None,
                   frameworks).crossings()


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
    frameworks: tuple[Optional[str], Optional[str]] = (None, None),
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
    an optimizer step, ``"step*/weight/*"``). ``frameworks``: the frameworks that computed
    ``ref`` and ``other`` (``("torch", "paddle")``), so that each side's element is placed by the
    test its own kernel makes (``SIDES``): Paddle's Hardswish takes an input 1 ulp below 3 to the
    upper side, torch's to the lower, and the gradients differ at an element both hold alike.
    ``None``: the test is ``x > k``.

    Relabelled keys keep their statistics and get ``passed=True``, ``status="kink"`` and a
    reason naming the crossing; the crossing layer's input key gets a note; every crossing found
    is listed in ``result.options["kink_crossings"]`` (``KinkCrossing.to_dict()``).
    """
    _check_frameworks(frameworks)
    finder = _Finder(result, ref, other, noise, layer_types, kinks, ulps, order, frameworks)
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


def _check_frameworks(frameworks: Any) -> None:
    if (not isinstance(frameworks, tuple) or len(frameworks) != 2
            or any(f is not None and f not in FRAMEWORKS for f in frameworks)):
        raise ValueError(f"frameworks={frameworks!r}: want a pair of None or one of "
                         f"{', '.join(map(repr, FRAMEWORKS))} (ref's, other's)")


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
