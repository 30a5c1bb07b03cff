"""Which elementwise activation each side computed from the same input, recognised among the
candidates torch and Paddle differ on (Hardsigmoid's slope, GELU's approximation, ...)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from .fit import _comparable, _f64, _fmt


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


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
    "Tanh": np.tanh,
    "Identity": lambda x: x,
}


def _matches(pred: np.ndarray, out: np.ndarray) -> bool:
    """Within float32 evaluation error (a few ulps of the output's magnitude)."""
    scale = max(1.0, float(np.max(np.abs(out))) if out.size else 1.0)
    return bool(np.max(np.abs(pred - out)) <= 2e-5 * scale) if out.size else False


def _which(x: np.ndarray, out: np.ndarray) -> Optional[str]:
    for name, f in _ACTIVATIONS.items():
        with np.errstate(over="ignore"):  # exp(-x) of a large negative x is inf: sigmoid 0, exactly
            pred = f(x)
        if _matches(pred, out):
            return name
    neg = x < -1e-3
    if neg.any() and _matches(np.maximum(x, 0.0), np.where(neg, 0.0, out)):
        slope = float(np.dot(out[neg], x[neg]) / np.dot(x[neg], x[neg]))
        if slope > 0 and _matches(np.where(x >= 0, x, slope * x), out):
            return f"LeakyReLU (slope {_fmt(slope)})"
    return None


def activation_mismatch(x: Any, ref_out: Any, other_out: Any) -> Optional[str]:
    """Which elementwise activation each side computed from the same input ``x``, when both are
    recognised and differ: ``"activation: reference Hardsigmoid (slope 1/6), port Hardsigmoid
    (slope 0.2)"``. ``None`` when either side matches none of the candidates within float32
    tolerance, or both match the same."""
    xx, r, o = _f64(x), _f64(ref_out), _f64(other_out)
    if not _comparable((xx, r, o), 1):
        return None
    ref_name, other_name = _which(xx, r), _which(xx, o)
    if ref_name is None or other_name is None or ref_name == other_name:
        return None
    return f"activation: reference {ref_name}, port {other_name}"
