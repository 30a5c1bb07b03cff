"""BatchNorm's running statistics: the biased running variance and the swapped momentum, each
fitted to the numbers of one update; and the statistic keys of a dump that make them checkable
(the previous step's values beside this step's)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from .fit import FIT_TOL, _comparable, _f64, _fmt, _no_hint_on_error, _rel_residual

VAR_BIAS_HINT = (
    "in training Paddle updates the running variance with the biased batch variance, torch with "
    "the unbiased one (ratio n/(n-1) per update); the forward pass is not affected"
)
MOMENTUM_HINT = "check BatchNorm momentum: Paddle's momentum is torch's 1 - momentum"
# reprod.diff's DEFAULT_NOISE_FACTOR (diagnose sits below diff and does not import it)
NOISE_FACTOR = 20.0

# momenta tried first (the common settings), then a fine grid
_COMMON_M = (0.1, 0.01, 0.001, 0.03, 0.05, 0.2, 0.3, 0.003, 0.02, 0.005)
_GRID_M = tuple(np.round(np.concatenate([np.geomspace(1e-4, 0.45, 300), np.linspace(0.55, 0.9999, 200)]), 6))


def _momenta(momentum: Optional[float]) -> Sequence[float]:
    return (float(momentum),) if momentum is not None else _COMMON_M + _GRID_M


def _flat_update(ref: Any, other: Any, prev: Any, other_prev: Any) -> tuple[np.ndarray, ...]:
    """A statistic after and before one update, both sides, flattened to float64 (the port's value
    before the update is the reference's when not given)."""
    t, q = _f64(ref).ravel(), _f64(other).ravel()
    t0 = _f64(prev).ravel()
    q0 = t0 if other_prev is None else _f64(other_prev).ravel()
    return t, q, t0, q0


def running_var_bias(
    ref_var: Any,
    other_var: Any,
    n: Optional[int] = None,
    *,
    momentum: Optional[float] = None,
    prev_var: Any = None,
    other_prev_var: Any = None,
    noise: Optional[float] = None,
    noise_factor: float = NOISE_FACTOR,
) -> Optional[str]:
    """Does ``other_var`` differ from ``ref_var`` as Paddle's biased running variance differs from
    torch's unbiased one, after one update?

    torch: ``ref = (1-m)*prev + m*b*n/(n-1)``; Paddle: ``other = (1-m)*prev' + m*b`` (``b`` the
    biased batch variance, ``m`` torch's momentum). So ``ref - (1-m)*prev = r * (other -
    (1-m)*prev')`` per channel with one ``r = n/(n-1)``. ``prev_var`` is the running variance
    before the update (both sides, or the reference's with ``other_prev_var`` the port's). Without
    it nothing can be checked: ``None``. ``n`` (elements per channel in the batch) and
    ``momentum`` are checked when given, estimated when not.

    A fit is accepted when what it leaves unexplained is under ``FIT_TOL`` of the difference it
    explains, or, given ``noise`` (the reference's calibrated noise of this variance: its largest
    distance from a float64 run's), when the port's value is within ``noise_factor`` times that
    noise of the fitted update in every channel. The second is what a large batch needs: its
    bias, ``n/(n-1) - 1``, is 6e-4 for 2 x 28 x 28 elements, and the batch variances of a later
    step differ by rounding between the two sides about as much (a correct shufflenet_v2 port:
    5.6% relative, 0.58x noise).
    """
    if prev_var is None:
        return None
    t, q, t0, q0 = _flat_update(ref_var, other_var, prev_var, other_prev_var)
    # more channels than unknowns (the ratio, and the momentum when not given), or anything fits
    if not _comparable((t, q, t0, q0), 2 + (momentum is None) + (n is None)):
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
        if res <= FIT_TOL or (noise is not None and math.isfinite(noise) and noise > 0
                              and float(np.max(np.abs(num - r * den))) / r
                              <= noise_factor * noise):
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
    t, q, t0, q0 = _flat_update(ref_mean, other_mean, prev_mean, other_prev_mean)
    mu = None if batch_mean is None else _f64(batch_mean).ravel()
    if (mu is not None and mu.shape != t.shape) or not _comparable((t, q, t0, q0), 2 + (m is None)):
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


# --- the statistic keys of a dump -----------------------------------------------------------------


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


def _update_values(key: str, ref: Mapping[str, Any], other: Mapping[str, Any],
                   ctx: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    """A statistic's values after the update and before it, the reference's then the port's; the
    values before come from the previous step's key (``step<i-1>/...``), else from the
    ``ctx["prev_ref"]``/``ctx["prev_other"]`` mappings (``None`` where absent)."""
    pk = _prev_key(key)
    t, q = ref.get(key), other.get(key)
    t0 = _get(ctx.get("prev_ref"), key) if pk is None else ref.get(pk)
    q0 = _get(ctx.get("prev_other"), key) if pk is None else other.get(pk)
    return t, q, t0, q0


@_no_hint_on_error
def _stat_hint(key: str, ref: Mapping[str, Any], other: Mapping[str, Any], ctx: Mapping[str, Any]) -> Optional[str]:
    """The BatchNorm statistic checks: the previous step's statistics (``step<i-1>/...``, or
    ``ctx["prev_ref"]``/``ctx["prev_other"]`` mappings) make them checkable."""
    m = _STAT_RE.match(key)
    if m is None:
        return None
    is_var = m.group("stat") in ("_variance", "running_var")
    t, q, t0, q0 = _update_values(key, ref, other, ctx)
    if t is None or q is None or t0 is None or q0 is None:
        return None
    mom = ctx.get("momentum")
    n = ctx.get("n")
    mt, mq, mt0, mq0 = _update_values(_mean_key(key), ref, other, ctx)
    swap = None
    if mt is not None and mq is not None and mt0 is not None and mq0 is not None:
        swap = momentum_swap(mt, mq, mt0, m=mom, other_prev_mean=mq0)
    if swap is not None:
        return swap
    if is_var:
        return running_var_bias(t, q, n, momentum=mom, prev_var=t0, other_prev_var=q0,
                                noise=ctx.get("noise"),
                                noise_factor=ctx.get("noise_factor") or NOISE_FACTOR)
    return None
