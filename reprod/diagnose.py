"""Known torch/Paddle differences, recognised by their magnitudes rather than by key names.

Each check takes the arrays it needs and returns a one-line hint when the numbers fit the known
difference, ``None`` when they do not: a hint is never offered because of a key's name alone.
``diagnose`` applies the checks that fit each failing key of a ``DiffResult``.

Pure numpy: nothing here imports torch or Paddle.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import numpy as np

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

VAR_BIAS_HINT = (
    "in training Paddle updates the running variance with the biased batch variance, torch with "
    "the unbiased one (ratio n/(n-1) per update); the forward pass is not affected"
)
MOMENTUM_HINT = "check BatchNorm momentum: Paddle's momentum is torch's 1 - momentum"

# a fit is accepted when what it leaves unexplained is under this share of the difference it explains
FIT_TOL = 0.05
# momenta tried first (the common settings), then a fine grid
_COMMON_M = (0.1, 0.01, 0.001, 0.03, 0.05, 0.2, 0.3, 0.003, 0.02, 0.005)
_GRID_M = tuple(np.round(np.concatenate([np.geomspace(1e-4, 0.45, 300), np.linspace(0.55, 0.9999, 200)]), 6))


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _rel_residual(residual: np.ndarray, scale: np.ndarray) -> float:
    s = float(np.linalg.norm(scale))
    if not math.isfinite(s) or s == 0.0:
        return math.inf
    r = float(np.linalg.norm(residual)) / s
    return r if math.isfinite(r) else math.inf


def _fmt(x: float) -> str:
    """``1e-3``, ``2.5e-4``, ``0.1``: a value as a porter writes it."""
    if x == 0 or not math.isfinite(x):
        return repr(x)
    if 1e-2 <= abs(x) < 1e3:
        return f"{x:.3g}"
    mant, exp = f"{x:.1e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _momenta(momentum: Optional[float]) -> Sequence[float]:
    return (float(momentum),) if momentum is not None else _COMMON_M + _GRID_M


# --- BatchNorm running statistics ----------------------------------------------------------------


def running_var_bias(
    ref_var: Any,
    other_var: Any,
    n: Optional[int] = None,
    *,
    momentum: Optional[float] = None,
    prev_var: Any = None,
    other_prev_var: Any = None,
) -> Optional[str]:
    """Does ``other_var`` differ from ``ref_var`` as Paddle's biased running variance differs from
    torch's unbiased one, after one update?

    torch: ``ref = (1-m)*prev + m*b*n/(n-1)``; Paddle: ``other = (1-m)*prev' + m*b`` (``b`` the
    biased batch variance, ``m`` torch's momentum). So ``ref - (1-m)*prev = r * (other -
    (1-m)*prev')`` per channel with one ``r = n/(n-1)``. ``prev_var`` is the running variance
    before the update (both sides, or the reference's with ``other_prev_var`` the port's). Without
    it nothing can be checked: ``None``. ``n`` (elements per channel in the batch) and
    ``momentum`` are checked when given, estimated when not.
    """
    if prev_var is None:
        return None
    t, q = _f64(ref_var).ravel(), _f64(other_var).ravel()
    t0 = _f64(prev_var).ravel()
    q0 = t0 if other_prev_var is None else _f64(other_prev_var).ravel()
    # more channels than unknowns (the ratio, and the momentum when not given), or anything fits
    if not (t.shape == q.shape == t0.shape == q0.shape) or t.size < 2 + (momentum is None) + (n is None):
        return None
    if not np.isfinite(np.concatenate([t, q, t0, q0])).all():
        return None
    best: Optional[tuple[float, float, float]] = None  # (residual, m, r)
    for m in _momenta(momentum):
        k = 1.0 - m
        num = t - k * t0  # m * b * r
        den = q - k * q0  # m * b
        eps = float(np.dot(num - den, den) / np.dot(den, den)) if np.dot(den, den) > 0 else math.nan
        if not math.isfinite(eps) or eps <= 0:
            continue
        r = 1.0 + eps
        if n is not None:
            r_n = n / (n - 1.0) if n > 1 else math.inf
            if abs(r - r_n) > FIT_TOL * (r_n - 1.0):
                continue
            r = r_n
        res = _rel_residual(num - r * den, num - den)
        if res <= FIT_TOL:
            best = (res, m, r)
            break  # the first momentum that fits: the given one, a common one, then the grid
    if best is None:
        return None
    _, m, r = best
    n_est = 1.0 / (r - 1.0) + 1.0
    if n_est < 1.5:
        return None
    return f"{VAR_BIAS_HINT} [fits: n ≈ {round(n_est)}, momentum {_fmt(m)}]"


def momentum_swap(
    ref_mean: Any,
    other_mean: Any,
    prev_mean: Any,
    batch_mean: Any = None,
    m: Optional[float] = None,
    *,
    other_prev_mean: Any = None,
) -> Optional[str]:
    """Does the port weigh the batch by ``1 - m`` where the reference weighs it by ``m`` (Paddle's
    ``momentum`` set to torch's value)?

    ``ref = (1-m)*prev + m*batch``, ``other = m*prev' + (1-m)*batch``. With ``batch_mean`` the
    check is direct; without it the batch mean is taken from the reference's update
    (``batch = prev + (ref - prev)/m``). ``m`` (torch's momentum) is checked when given, estimated
    when not.
    """
    t, q = _f64(ref_mean).ravel(), _f64(other_mean).ravel()
    t0 = _f64(prev_mean).ravel()
    q0 = t0 if other_prev_mean is None else _f64(other_prev_mean).ravel()
    mu = None if batch_mean is None else _f64(batch_mean).ravel()
    if not (t.shape == q.shape == t0.shape == q0.shape) or (mu is not None and mu.shape != t.shape):
        return None
    if t.size < 2 + (m is None) or not np.isfinite(np.concatenate([t, q, t0, q0])).all():
        return None
    for mm in _momenta(m):
        if abs(mm - 0.5) < 0.05:
            continue  # 1 - m == m: no swap to see
        if mu is not None:
            if _rel_residual(t - ((1 - mm) * t0 + mm * mu), t - t0) > FIT_TOL:
                continue  # the reference does not use this momentum
            batch = mu
        else:
            batch = t0 + (t - t0) / mm
        swapped = mm * q0 + (1 - mm) * batch
        same = (1 - mm) * q0 + mm * batch
        res = _rel_residual(q - swapped, q - q0)
        if res <= FIT_TOL and _rel_residual(q - same, q - q0) > FIT_TOL:
            return (
                f"{MOMENTUM_HINT} [fits: the reference weighs the batch by {_fmt(mm)}, "
                f"the port by {_fmt(1 - mm)}]"
            )
    return None


# --- normalisation epsilon -----------------------------------------------------------------------


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
    return f"BN epsilon: port uses ~{_fmt(eps)}, reference {_fmt(float(eps_ref))}"


def layernorm_epsilon(
    x: Any,
    ref_out: Any,
    other_out: Any,
    eps_ref: float = 1e-5,
    *,
    normalized_ndim: int = 1,
    weight: Any = None,
    bias: Any = None,
) -> Optional[str]:
    """Does the port's LayerNorm use another epsilon? The input ``x`` gives each row's variance;
    ``other/ref = sqrt((var+eps)/(var+eps'))`` per row, one ``eps'`` for all rows."""
    xx, r, o = _f64(x), _f64(ref_out), _f64(other_out)
    if not (xx.shape == r.shape == o.shape) or xx.ndim < normalized_ndim:
        return None
    axes = tuple(range(xx.ndim - normalized_ndim, xx.ndim))
    var = xx.var(axis=axes).ravel()
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
    return f"LayerNorm epsilon: port uses ~{_fmt(eps)}, reference {_fmt(float(eps_ref))}"


# --- activations ---------------------------------------------------------------------------------


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
        if _matches(f(x), out):
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
    if not (xx.shape == r.shape == o.shape) or xx.size == 0:
        return None
    if not np.isfinite(np.concatenate([xx.ravel(), r.ravel(), o.ravel()])).all():
        return None
    ref_name, other_name = _which(xx, r), _which(xx, o)
    if ref_name is None or other_name is None or ref_name == other_name:
        return None
    return f"activation: reference {ref_name}, port {other_name}"


# --- weights -------------------------------------------------------------------------------------


def untransposed_linear(ref_w: Any, other_w: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> Optional[str]:
    """Is ``other_w`` ``ref_w`` transposed: a Linear weight copied without the (out, in) -> (in, out)
    transpose (or transposed twice)? Square weights count only when they are not symmetric."""
    r, o = _f64(ref_w), _f64(other_w)
    if r.ndim != 2 or o.shape != r.shape[::-1] or r.size == 0:
        return None
    if r.shape[0] == r.shape[1] and np.allclose(r, o, rtol=rtol, atol=atol):
        return None
    if not np.allclose(o, r.T, rtol=rtol, atol=atol):
        return None
    return (
        "Linear weight not transposed: torch stores (out_features, in_features), Paddle "
        "(in_features, out_features); the port's values equal the reference's transposed"
    )


# --- applying the checks to a result ----------------------------------------------------------------


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


_STAT_RE = re.compile(r"^(?P<head>.*?)(?P<stat>_mean|_variance|running_mean|running_var)$")
_STEP_RE = re.compile(r"^step_?(?P<i>\d+)/")


def _prev_key(key: str) -> Optional[str]:
    m = _STEP_RE.match(key)
    if m is None or int(m.group("i")) == 0:
        return None
    i = int(m.group("i"))
    return f"step{i - 1}/" + key[m.end():] if key.startswith(f"step{i}/") else f"step_{i - 1}/" + key[m.end():]


def _mean_key(key: str) -> str:
    """The running mean's key beside a running variance's (or the key itself)."""
    m = _STAT_RE.match(key)
    assert m is not None
    stat = {"_variance": "_mean", "running_var": "running_mean"}.get(m.group("stat"), m.group("stat"))
    return m.group("head") + stat


def _get(d: Optional[Mapping[str, Any]], key: Optional[str]) -> Any:
    if d is None or key is None:
        return None
    return d.get(key)


def _stat_hint(key: str, ref: Mapping[str, Any], other: Mapping[str, Any], ctx: Mapping[str, Any]) -> Optional[str]:
    try:
        return _stat_hint_checked(key, ref, other, ctx)
    except (TypeError, ValueError, FloatingPointError):  # a value no check can read: no hint
        return None


def _stat_hint_checked(
    key: str, ref: Mapping[str, Any], other: Mapping[str, Any], ctx: Mapping[str, Any]
) -> Optional[str]:
    """The BatchNorm statistic checks: the previous step's statistics (``step<i-1>/...``, or
    ``ctx["prev_ref"]``/``ctx["prev_other"]`` mappings) make them checkable."""
    m = _STAT_RE.match(key)
    if m is None:
        return None
    is_var = m.group("stat") in ("_variance", "running_var")
    pk = _prev_key(key)
    t, q = ref.get(key), other.get(key)
    t0 = _get(ctx.get("prev_ref"), key) if pk is None else ref.get(pk)
    q0 = _get(ctx.get("prev_other"), key) if pk is None else other.get(pk)
    if t is None or q is None or t0 is None or q0 is None:
        return None
    mom = ctx.get("momentum")
    n = ctx.get("n")
    mean_key = _mean_key(key)
    mk_prev = _prev_key(mean_key)
    mt, mq = ref.get(mean_key), other.get(mean_key)
    mt0 = _get(ctx.get("prev_ref"), mean_key) if mk_prev is None else ref.get(mk_prev)
    mq0 = _get(ctx.get("prev_other"), mean_key) if mk_prev is None else other.get(mk_prev)
    swap = None
    if mt is not None and mq is not None and mt0 is not None and mq0 is not None:
        swap = momentum_swap(mt, mq, mt0, m=mom, other_prev_mean=mq0)
    if swap is not None:
        return swap
    if is_var:
        return running_var_bias(t, q, n, momentum=mom, prev_var=t0, other_prev_var=q0)
    return None


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
    ``.in[0]`` (from ``ref``) for an activation mismatch, and, when ``layer_types`` says the layer is
    a normalisation, its epsilon (``context[layer]``: ``{"var": ..., "eps": ..., "beta": ...}`` for
    BatchNorm, ``{"eps", "weight", "bias", "normalized_ndim"}`` for LayerNorm).
    ``layer_types``: layer name -> ``(reference class, port class)`` (or one name); the hint
    starts with ``"Hardsigmoid vs Sigmoid: "``.
    """
    from .capture.naming import parse_key

    ctx = dict(context or {})
    changed = False
    rows = []
    for r in result.results:
        hint = None if r.passed else _hint_for(r.key, ref, other, ctx, layer_types, parse_key)
        if hint is not None:
            r = dataclasses.replace(r, note=f"{r.note}; {hint}" if r.note else hint)
            changed = True
        rows.append(r)
    return dataclasses.replace(result, results=tuple(rows)) if changed else result


def _hint_for(
    key: str,
    ref: Mapping[str, Any],
    other: Mapping[str, Any],
    ctx: Mapping[str, Any],
    layer_types: Optional[Mapping[str, Any]],
    parse_key: Callable[[str], Any],
) -> Optional[str]:
    t, q = ref.get(key), other.get(key)
    if t is None or q is None:
        return None
    try:
        return _hint_checked(key, t, q, ref, other, ctx, layer_types, parse_key)
    except (TypeError, ValueError, FloatingPointError):  # a value no check can read: no hint
        return None


def _hint_checked(
    key: str,
    t: Any,
    q: Any,
    ref: Mapping[str, Any],
    other: Mapping[str, Any],
    ctx: Mapping[str, Any],
    layer_types: Optional[Mapping[str, Any]],
    parse_key: Callable[[str], Any],
) -> Optional[str]:
    if _STAT_RE.match(key):
        return _stat_hint(key, ref, other, ctx)
    ck = parse_key(key)
    if ck is not None and ck.what == "out" and not ck.is_param:
        base = key[: len(key) - len(".out" + "".join(f"[{i}]" for i in ck.items))]
        x = ref.get(base + ".in[0]")
        label = layer_type_label((layer_types or {}).get(ck.name))
        types = " ".join(str(s) for s in ((layer_types or {}).get(ck.name) or ()) if s)
        if isinstance((layer_types or {}).get(ck.name), str):
            types = str((layer_types or {}).get(ck.name))
        lctx = ctx.get(ck.name) or {}
        hint = None
        if x is not None:
            hint = activation_mismatch(x, t, q)
            if hint is None and "LayerNorm" in types:
                hint = layernorm_epsilon(
                    x, t, q, lctx.get("eps", 1e-5),
                    normalized_ndim=lctx.get("normalized_ndim", 1),
                    weight=lctx.get("weight"), bias=lctx.get("bias"),
                )
        if hint is None and "BatchNorm" in types and lctx.get("var") is not None:
            hint = bn_epsilon(t, q, lctx["var"], lctx.get("eps", 1e-5), beta=lctx.get("beta"))
        if hint is not None and label:
            hint = f"{label}: {hint}"
        return hint
    if np.ndim(t) == 2:
        return untransposed_linear(t, q)
    return None
