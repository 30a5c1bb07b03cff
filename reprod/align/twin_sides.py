"""The float64 twin on the reference's side of each kink: noise that is rounding, not a crossing.

The calibrated verdict judges ``port - reference`` against ``reference - twin``, the reference's
distance from its own float64 run. That distance is rounding only while the twin takes every
kink as the reference does. Where an activation input lies within rounding of a kink, the twin
can land on the other side: then every gradient upstream carries that element's whole gradient
in its "noise", and a bug below it passes. Measured on an AVX2 CPU: shufflenet_v2_x1_0 (eval,
seed 0), one ReLU input of ``stage3.4.branch2.2`` on the other side of 0 in float64, put the
first conv's float32 gradient 3.3% (L2) from the twin's, and the port's gradient scaled by 1.5
passed at 15x that noise (on an AVX-512 CPU, where the twin kept the reference's side, it read
364,000x).

So, at step 0, each activation input the twin recorded is compared with the reference's: where
an element lies on the other side of a kink point (each framework's own test, ``points.sides``),
the twin's step is run again from the same state with those elements (and only those) set to the
reference's values, through ``counterfactual.counterfactual_grads``, and its gradients are the
noise the step's gradient keys are judged by. Max-pool ties are not checked: a tie picked
otherwise leaves no side to read from the inputs alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..capture.kinks.points import KINK_POINTS, sides
from ..capture.naming import parse_key

__all__ = ["moved_inputs"]


def moved_inputs(ref: Mapping[str, Any], twin: Mapping[str, Any], layer_types: Mapping[str, str],
                 per_pass: Mapping[str, int], step: int
                 ) -> tuple[dict[str, np.ndarray], int]:
    """The twin's kink layer inputs of forward pass ``step`` that hold an element on the other
    side of a kink point from the reference's, with those elements set to the reference's
    values: layer call within the pass (``relu``, ``relu#2``) -> the array; and how many elements
    moved. ``ref``/``twin``: the captures (the reference's float32 run, its float64 twin's);
    ``layer_types``: kink layer (or activation site) -> class; ``per_pass``: its calls in one
    forward pass."""
    out: dict[str, np.ndarray] = {}
    moved = 0
    for key, value in ref.items():
        p = parse_key(key)
        if p is None or p.what != "in" or p.items not in ((), ("0",)):
            continue
        layer_type = layer_types.get(p.name)
        spec = KINK_POINTS.get(str(layer_type).lower()) if layer_type else None
        calls = per_pass.get(p.name, 0)
        other = twin.get(key)
        if not isinstance(spec, tuple) or calls < 1 or other is None:
            continue
        at, call = divmod(p.call - 1, calls)
        if at != step:
            continue
        x32, x64 = np.asarray(value), np.asarray(other, dtype=np.float64)
        if x32.shape != x64.shape:
            continue
        dtype = str(x32.dtype)
        want = sides(spec, layer_type, "torch", x32.astype(np.float64), dtype)
        have = sides(spec, layer_type, "torch", x64, "float64")
        differ: Optional[np.ndarray] = None
        for w, h in zip(want, have):
            d = w != h
            differ = d if differ is None else differ | d
        if differ is None or not differ.any():
            continue
        fixed = np.array(x64, dtype=np.float64)
        fixed[differ] = x32[differ]
        moved += int(differ.sum())
        out[p.name if call == 0 else f"{p.name}#{call + 1}"] = fixed
    return out, moved
