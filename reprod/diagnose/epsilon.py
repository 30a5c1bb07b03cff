"""A normalisation layer's epsilon: one ``eps'`` that scales the port's BatchNorm or LayerNorm
output against the reference's as ``sqrt((var+eps)/(var+eps'))`` in every channel or row."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .fit import _f64, _fmt, _rel_residual


def _eps_fit(ref: np.ndarray, other: np.ndarray, var: np.ndarray, eps_ref: float) -> Optional[float]:
    """``ref``, ``other``: (groups, elements) normalised outputs, ``var``: (groups,). The eps' with
    ``other = ref * sqrt((var+eps)/(var+eps'))`` per group, or None when no single eps' fits."""
    diff = other - ref
    if not np.isfinite(diff).all() or float(np.linalg.norm(diff)) == 0.0:
        return None
    rr = np.einsum("ij,ij->i", ref, ref)
    ok = rr > 0
    if not ok.any():
        return None
    s = np.einsum("ij,ij->i", ref, other)[ok] / rr[ok]
    v = var[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        est = (v + eps_ref) / (s * s) - v
    # the groups whose scale moved beyond rounding say the most
    informative = np.isfinite(est) & (np.abs(s - 1.0) > 1e-5)
    if not informative.any():
        return None
    eps = float(np.median(est[informative]))
    if not eps > 0 or abs(eps - eps_ref) <= 0.05 * eps_ref:
        return None
    scale = np.sqrt((var + eps_ref) / (var + eps))[:, None]
    if _rel_residual(other - ref * scale, diff) > 0.1:
        return None
    return eps


def _channels_last(a: Any, axis: int) -> np.ndarray:
    x = _f64(a)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def bn_epsilon(
    ref_out: Any,
    other_out: Any,
    var: Any,
    eps_ref: float = 1e-5,
    *,
    beta: Any = None,
    axis: int = 1,
) -> Optional[str]:
    """Does the port's BatchNorm use another epsilon? ``other/ref = sqrt((var+eps)/(var+eps'))``
    per channel (``axis``), one ``eps' > 0`` for all channels; ``var`` is the variance the layer
    normalised with (the running variance in eval mode), ``beta`` the shift to take off first."""
    r, o = _f64(ref_out), _f64(other_out)
    if r.shape != o.shape or r.ndim < 1:
        return None
    v = _f64(var).ravel()
    if v.size != r.shape[axis]:
        return None
    if beta is not None:
        b = _f64(beta).reshape([-1 if i == axis % r.ndim else 1 for i in range(r.ndim)])
        r, o = r - b, o - b
    eps = _eps_fit(_channels_last(r, axis), _channels_last(o, axis), v, float(eps_ref))
    if eps is None:
        return None
    return f"BN epsilon: {_uses(eps, v)}, reference {_fmt(float(eps_ref))}"


def layernorm_epsilon(
    x: Any,
    ref_out: Any,
    other_out: Any,
    eps_ref: float = 1e-5,
    *,
    normalized_ndim: int = 1,
    weight: Any = None,
    bias: Any = None,
    rms: bool = False,
) -> Optional[str]:
    """Does the port's LayerNorm use another epsilon? The input ``x`` gives each row's variance;
    ``other/ref = sqrt((var+eps)/(var+eps'))`` per row, one ``eps'`` for all rows. ``rms``: an
    RMSNorm (T5's, Llama's), which divides by the root of the mean square instead."""
    xx, r, o = _f64(x), _f64(ref_out), _f64(other_out)
    if not (xx.shape == r.shape == o.shape) or xx.ndim < normalized_ndim:
        return None
    if normalized_ndim == 1 and weight is not None and np.ndim(weight) == 1 and \
            xx.shape[-1] != np.size(weight):
        # a LayerNorm over channels first (SqueezeBERT's: [N, C, W] transposed, normalised over
        # C and transposed back): its weight's size says which axis it normalises
        same = [i for i, d in enumerate(xx.shape) if d == np.size(weight)]
        if len(same) != 1:
            return None
        xx, r, o = (np.moveaxis(a, same[0], -1) for a in (xx, r, o))
    axes = tuple(range(xx.ndim - normalized_ndim, xx.ndim))
    var = (np.square(xx).mean(axis=axes) if rms else xx.var(axis=axes)).ravel()
    if bias is not None:
        r, o = r - _f64(bias), o - _f64(bias)
    if weight is not None:  # a zero weight leaves nothing to see; divide where it is not
        w = _f64(weight)
        w = np.where(w == 0, 1.0, w)
        r, o = r / w, o / w
    rows = var.size
    eps = _eps_fit(r.reshape(rows, -1), o.reshape(rows, -1), var, float(eps_ref))
    if eps is None:
        return None
    kind = "RMSNorm" if rms else "LayerNorm"
    return f"{kind} epsilon: {_uses(eps, var)}, reference {_fmt(float(eps_ref))}"


# the part of a variance below which an epsilon added to it cannot be read back from float32
# outputs: their rounding (6e-8 relative, on each side) moves the fit by about this much
_RESOLUTION = 1e-6


def _uses(eps: float, var: np.ndarray) -> str:
    """What the port's fitted epsilon says: its value, or where it lies below what float32
    outputs can resolve (GPT-J's LayerNorm at 1e-12 against 1e-5 read as ~5.7e-10), that it is
    far smaller, and below what."""
    floor = _RESOLUTION * float(np.median(var))
    if eps < floor:
        return f"port uses far less (under ~{_fmt(floor)}, too small to read back)"
    return f"port uses ~{_fmt(eps)}"
