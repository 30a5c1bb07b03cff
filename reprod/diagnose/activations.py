"""Which elementwise activation each side computed from the same input, recognised among the
candidates torch and Paddle differ on (Hardsigmoid's slope, GELU's approximation, ...)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from .fit import _comparable, _f64, _fmt


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in numpy's loops (``math.erf`` a call per element cost seconds on a ResNet's layer
    outputs): Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7, far inside the float32
    tolerance activations are recognised within (GELU's two forms differ by up to ~2e-4)."""
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                           + t * 1.061405429))))
    return np.copysign(1.0 - poly * np.exp(-a * a), x)


def _hsig(slope: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.clip(slope * x + 0.5, 0.0, 1.0)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Hardsigmoid (slope 1/6)": _hsig(1 / 6),
    "Hardsigmoid (slope 0.2)": _hsig(0.2),
    "Hardswish (slope 1/6)": lambda x: x * _hsig(1 / 6)(x),
    "Hardswish (slope 0.2)": lambda x: x * _hsig(0.2)(x),
    "GELU (exact, erf)": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "GELU (tanh approximation)": lambda x: 0.5
    * x
    * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "ReLU": lambda x: np.maximum(x, 0.0),
    "ReLU6": lambda x: np.clip(x, 0.0, 6.0),
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "SiLU": lambda x: x / (1.0 + np.exp(-x)),
    # CLIP's and OpenAI GPT's x * sigmoid(1.702 x), which a port writes as GELU
    "QuickGELU": lambda x: x / (1.0 + np.exp(-1.702 * x)),
    "Tanh": np.tanh,
    "Identity": lambda x: x,
}


def _matches(pred: np.ndarray, out: np.ndarray, scale: Optional[float] = None,
             unit: float = 0.0) -> bool:
    """Within float32 evaluation error (a few ulps of the output's magnitude; ``scale``: the
    whole output's, where ``out`` is a sample of it), and where the output holds half-precision
    values, within one of their units (``unit``) of each element: its rounding."""
    if not out.size:
        return False
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(out))))
    if unit:
        return bool(np.all(np.abs(pred - out) <= 2e-5 * scale + unit * np.abs(pred)))
    return bool(np.max(np.abs(pred - out)) <= 2e-5 * scale)


def _half_unit(out: np.ndarray) -> float:
    """One unit of the half precision ``out``'s values are held in (bfloat16 2^-7, float16
    2^-10; in that dtype or widened to float32), else 0: an activation a half-precision layer
    computed is rounded to it, thousands of times the float32 tolerance."""
    name = out.dtype.name
    if name in ("bfloat16", "float16"):
        return 2.0**-7 if name == "bfloat16" else 2.0**-10
    if out.dtype != np.float32 or not out.size:
        return 0.0
    flat = np.ascontiguousarray(out).reshape(-1)
    flat = flat[np.isfinite(flat)]
    bits = flat.view(np.uint32)
    fractional = flat != np.floor(flat)
    if not np.any(bits & np.uint32(0xFFFF)):
        unit, last = 2.0**-7, np.uint32(1 << 16)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            back = flat.astype(np.float16).astype(np.float32)
        if not np.array_equal(back, flat):
            return 0.0
        unit, last = 2.0**-10, np.uint32(1 << 13)
    # values with few significant bits (whole numbers, a ReLU of them) are every dtype's: the
    # half precision shows in its last bit, used by a quarter of the fractional values
    used = int(np.count_nonzero((bits & last).astype(bool) & fractional))
    return unit if used >= 8 and 4 * used >= int(np.count_nonzero(fractional)) else 0.0


def _evaluate(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) of a large negative x is inf: sigmoid 0, exactly
        return f(x)


def _leaky(x: np.ndarray, out: np.ndarray, scale: Optional[float] = None) -> Optional[str]:
    neg = x < -1e-3
    if neg.any() and _matches(np.maximum(x, 0.0), np.where(neg, 0.0, out), scale):
        slope = float(np.dot(out[neg], x[neg]) / np.dot(x[neg], x[neg]))
        if slope > 0 and _matches(np.where(x >= 0, x, slope * x), out, scale):
            return f"LeakyReLU (slope {_fmt(slope)})"
    return None


# elements a first look at an output takes: a candidate that misses one of them misses the whole
_SAMPLE = 4096


def _which(x: Any, out: Any) -> Optional[str]:
    """The candidate ``out`` is of ``x``. Each is first tried on a spread sample of the elements
    (against the whole output's scale, so a sample never accepts less than the whole would), and
    only those fitting it on every element: a conv's output, failing every candidate, costs a
    sample's work, not a ResNet layer's million elements a candidate."""
    x, out = np.asarray(x), np.asarray(out)
    n = out.size
    if n <= _SAMPLE:
        xs, os_ = _f64(x).ravel(), _f64(out).ravel()
        scale = None
    else:
        idx = np.linspace(0, n - 1, _SAMPLE).astype(np.intp)
        xs, os_ = _f64(x.reshape(-1)[idx]), _f64(out.reshape(-1)[idx])
        scale = max(1.0, float(np.max(np.abs(out))))
    unit = _half_unit(out)
    fits = [name for name, f in _ACTIVATIONS.items()
            if _matches(_evaluate(f, xs), os_, scale, unit)]
    leaky = _leaky(xs, os_, scale) is not None
    if not fits and not leaky:
        return None
    xf, of = (xs, os_) if scale is None else (_f64(x), _f64(out))
    for name in fits:
        if scale is None or _matches(_evaluate(_ACTIVATIONS[name], xf), of, None, unit):
            return name
    return _leaky(xf, of) if leaky else None


def activation_mismatch(x: Any, ref_out: Any, other_out: Any) -> Optional[str]:
    """Which elementwise activation each side computed from the same input ``x``, when both are
    recognised and differ: ``"activation: reference Hardsigmoid (slope 1/6), port Hardsigmoid
    (slope 0.2)"``. ``None`` when either side matches none of the candidates within float32
    tolerance, or both match the same."""
    xx, r, o = np.asarray(x), np.asarray(ref_out), np.asarray(other_out)
    if xx.dtype.kind not in "fiub" or r.dtype.kind not in "fiub" or o.dtype.kind not in "fiub" \
            or not _comparable((xx, r, o), 1):
        return None
    ref_name = _which(xx, r)
    if ref_name is None:
        return None
    other_name = _which(xx, o)
    if ref_name is None or other_name is None or ref_name == other_name:
        return None
    return f"activation: reference {ref_name}, port {other_name}"
