"""Known torch/Paddle differences, recognised by their magnitudes rather than by key names.

Each check takes the arrays it needs and returns a one-line hint when the numbers fit the known
difference, ``None`` when they do not: a hint is never offered because of a key's name alone.
``diagnose`` applies the checks that fit each failing key of a ``DiffResult``.

Pure numpy: nothing here imports torch or Paddle.

Where each check lives: ``batchnorm`` (running statistics, and their keys), ``epsilon``
(BatchNorm/LayerNorm epsilon), ``activations``, ``weights`` (untransposed Linear); ``fit`` holds
what they share. This module applies them to a ``DiffResult``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np

from .activations import activation_mismatch
from .batchnorm import (
    _STAT_RE,
    MOMENTUM_HINT,
    VAR_BIAS_HINT,
    _stat_hint,
    momentum_swap,
    running_var_bias,
)
from .batchnorm import _prev_key as _prev_key  # re-exported: reprod.align.results reads it
from .epsilon import bn_epsilon, layernorm_epsilon
from .fit import FIT_TOL as FIT_TOL  # re-exported: reprod.diagnose.FIT_TOL
from .fit import _no_hint_on_error
from .weights import untransposed_linear

__all__ = [
    "running_var_bias",
    "momentum_swap",
    "bn_epsilon",
    "layernorm_epsilon",
    "activation_mismatch",
    "untransposed_linear",
    "layer_type_label",
    "diagnose",
    "VAR_BIAS_HINT",
    "MOMENTUM_HINT",
]


def layer_type_label(types: Any) -> Optional[str]:
    """``("Hardsigmoid", "Sigmoid")`` -> ``"Hardsigmoid vs Sigmoid"``; one name stands alone."""
    if types is None:
        return None
    if isinstance(types, str):
        return types
    names = [str(t) for t in types if t]
    if not names:
        return None
    if len(names) == 2 and names[0] == names[1]:
        return names[0]
    return " vs ".join(names)


def diagnose(
    result: Any,
    ref: Mapping[str, Any],
    other: Mapping[str, Any],
    *,
    layer_types: Optional[Mapping[str, Any]] = None,
    context: Optional[Mapping[str, Any]] = None,
) -> Any:
    """``result`` with a hint in the note of each failing key whose numbers fit a known
    difference; keys whose numbers fit none are left as they are.

    ``ref``/``other``: the two dumps compared (key -> array). Checks by key role:
    BatchNorm statistics (``*_mean``/``*_variance``/``running_mean``/``running_var``) against the
    previous step's (``step<i-1>/...`` keys, or ``context["prev_ref"]``/``["prev_other"]``) for
    the momentum swap and the biased running variance (``context["momentum"]``, ``["n"]`` when
    known); 2-D weights for an untransposed Linear; capture ``.out`` keys against their layer's
    ``.in`` or ``.in[0]`` (from ``ref``) for an activation mismatch, and, when ``layer_types`` says the layer is
    a normalisation, its epsilon (``context[layer]``: ``{"var": ..., "eps": ..., "beta": ...}`` for
    BatchNorm, ``{"eps", "weight", "bias", "normalized_ndim"}`` for LayerNorm).
    ``layer_types``: layer name -> ``(reference class, port class)`` (or one name); the hint
    starts with ``"Hardsigmoid vs Sigmoid: "``.
    """
    from ..capture.naming import parse_key

    ctx = dict(context or {})
    changed = False
    rows = []
    for r in result.results:
        hint = None
        if not r.passed:
            t, q = ref.get(r.key), other.get(r.key)
            if t is not None and q is not None:
                hint = _hint(r.key, t, q, ref, other, _with_noise(ctx, r, result), layer_types,
                             parse_key)
        if hint is not None:
            r = dataclasses.replace(r, note=f"{r.note}; {hint}" if r.note else hint)
            changed = True
        rows.append(r)
    return dataclasses.replace(result, results=tuple(rows)) if changed else result


def _with_noise(ctx: dict[str, Any], r: Any, result: Any) -> dict[str, Any]:
    """``ctx`` with the key's calibrated noise and the comparison's noise factor, which let a
    fit be judged against rounding rather than by a relative residual alone."""
    noise = getattr(r, "noise_max", None)
    if noise is None or "noise" in ctx:
        return ctx
    return dict(ctx, noise=noise, noise_factor=getattr(result, "options", {}).get("noise_factor"))


@_no_hint_on_error
def _hint(
    key: str,
    t: Any,
    q: Any,
    ref: Mapping[str, Any],
    other: Mapping[str, Any],
    ctx: Mapping[str, Any],
    layer_types: Optional[Mapping[str, Any]],
    parse_key: Callable[[str], Any],
) -> Optional[str]:
    """The hint for one failing key whose two values are ``t`` and ``q``: the checks its role
    calls for (a statistic, a layer output, a 2-D weight)."""
    if _STAT_RE.match(key):
        return _stat_hint(key, ref, other, ctx)
    ck = parse_key(key)
    if ck is not None and ck.what == "out" and not ck.is_param:
        base = key[: len(key) - len(".out" + "".join(f"[{i}]" for i in ck.items))]
        # record names a lone positional input ``.in``, the first of several ``.in[0]``
        x = ref.get(base + ".in")
        if x is None:
            x = ref.get(base + ".in[0]")
        label = layer_type_label((layer_types or {}).get(ck.name))
        types = " ".join(str(s) for s in ((layer_types or {}).get(ck.name) or ()) if s)
        if isinstance((layer_types or {}).get(ck.name), str):
            types = str((layer_types or {}).get(ck.name))
        lctx = ctx.get(ck.name) or {}
        hint = None
        if x is not None:
            hint = activation_mismatch(x, t, q)
            rms = bool(lctx.get("rms")) or "RMSNorm" in types
            if hint is None and ("LayerNorm" in types or rms) and (lctx or not rms):
                # an RMSNorm's epsilon has no usual default to assume: only with its context
                hint = layernorm_epsilon(
                    x, t, q, lctx.get("eps", 1e-5),
                    normalized_ndim=lctx.get("normalized_ndim", 1),
                    weight=lctx.get("weight"), bias=lctx.get("bias"), rms=rms,
                )
        if hint is None and "BatchNorm" in types and lctx.get("var") is not None:
            hint = bn_epsilon(t, q, lctx["var"], lctx.get("eps", 1e-5), beta=lctx.get("beta"))
        if hint is not None and label:
            hint = f"{label}: {hint}"
        return hint
    if np.ndim(t) == 2:
        return untransposed_linear(t, q)
    return None
