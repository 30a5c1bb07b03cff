"""A weight decay each side's updates fit, for optimizers that keep no state (plain SGD).

With momentum or Adam a missing weight decay shows in the optimizer state (the velocity holds
wd * w outright). Plain SGD keeps none, and its update moves a weight by lr * wd * w, which at
lr 0.01 and wd 1e-5 is 1e-7 of the weight, a unit of its float32 resolution: a port without the
decay passed every key (1.3x noise at most, measured; 8.4x with wd 1e-4). Over the elements of a parameter the decay is still there:
each side's own update gives, per element,

    d = (w_before - w_after) / lr - g  =  wd * w_before  + (the update's rounding) / lr

and the least-squares slope of d on w_before is that side's decay, to within
~ulp(w) / (lr * sqrt(n)). The two sides' slopes are compared by their standard errors; a
parameter whose decays differ by more than ``Z_LIMIT`` of them fails its updated weights, saying
both decays.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

__all__ = ["Z_LIMIT", "fitted_decay", "decay_checked"]

# the decays' difference, in standard errors of it, over which they differ: the fit's residual is
# float32 rounding, about symmetric; 20 as the noise factor is, far over any chance deviation
Z_LIMIT = 20.0
_PARAM = re.compile(r"step(\d+)/param/(.+)")


@dataclasses.dataclass(frozen=True)
class Decay:
    value: float  # the fitted decay
    error: float  # its standard error
    n: int  # elements fitted


def fitted_decay(data: Mapping[str, Any], name: str, steps: list[int],
                 before0: Optional[np.ndarray], scaled: bool = False) -> Optional[Decay]:
    """The weight decay ``name``'s updates fit in one side's dump over ``steps`` (step 0 from
    ``before0``, the weights before training); None where nothing can be fitted (no gradient,
    no learning rate, weights that do not vary). ``scaled``: the gradients recorded were
    scaled before the update (clipped), by a factor of each step's own: see ``_scaled_fit``."""
    if scaled:
        return _scaled_fit(data, name, steps, before0)
    swd = sww = 0.0
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for s in steps:
        got = _rows(data, name, s, before0)
        if got is None:
            continue
        w, u, g = got
        d = u - g
        if not (np.isfinite(d).all() and np.isfinite(w).all()):
            return None
        swd += float(d @ w)
        sww += float(w @ w)
        rows.append((w, d))
    n = sum(w.size for w, _ in rows)
    if n < 3 or sww == 0.0:
        return None
    lam = swd / sww
    ssr = sum(float(np.sum((d - lam * w) ** 2)) for w, d in rows)
    return Decay(lam, math.sqrt(ssr / (n - 1) / sww), n)


def _rows(data: Mapping[str, Any], name: str, s: int, before0: Optional[np.ndarray]
          ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(w_before, (w_before - w_after) / lr, grad) of step ``s``, float64, flat; None where a
    part is missing, or the shapes or the rate do not fit."""
    after, grad = data.get(f"step{s}/param/{name}"), data.get(f"step{s}/grad/{name}")
    before = before0 if s == 0 else data.get(f"step{s - 1}/param/{name}")
    lr = data.get(f"step{s}/lr")
    if after is None or grad is None or before is None or lr is None:
        return None
    lr = float(np.asarray(lr))
    w = np.asarray(before, np.float64).reshape(-1)
    a, g = np.asarray(after, np.float64).reshape(-1), np.asarray(grad, np.float64).reshape(-1)
    if not lr > 0 or w.shape != a.shape or w.shape != g.shape:
        return None
    return w, (w - a) / lr, g


def _scaled_fit(data: Mapping[str, Any], name: str, steps: list[int],
                before0: Optional[np.ndarray]) -> Optional[Decay]:
    """The decay where each step's gradient was scaled by a factor of its own before the update
    (clipped by the global norm: the factor is the same for every element of a step, and
    neither side records it): per step, (w_before - w_after) / lr = c * grad + wd * w_before,
    fitted by least squares in c and wd together, and the steps' decays weighed by their
    standard errors. Clipping by value is no factor: its clipped elements go to the residual."""
    num = den = 0.0
    n = 0
    for s in steps:
        rows = _rows(data, name, s, before0)
        if rows is None:
            continue
        w, u, g = rows
        if not (np.isfinite(u).all() and np.isfinite(w).all() and np.isfinite(g).all()):
            return None  # as the plain fit: a step that is not finite fits nothing
        if w.size < 4:
            continue
        gg, gw, ww = float(g @ g), float(g @ w), float(w @ w)
        det = gg * ww - gw * gw
        if not det > 1e-12 * gg * ww:  # the gradient a multiple of the weights: nothing to part
            continue
        gu, wu = float(g @ u), float(w @ u)
        c = (ww * gu - gw * wu) / det
        lam = (gg * wu - gw * gu) / det
        ssr = float(np.sum((u - c * g - lam * w) ** 2))
        var = ssr / (w.size - 2) * gg / det
        if not var > 0:
            var = 1e-300  # an exact fit: its decay weighs as much as any can
        num += lam / var
        den += 1.0 / var
        n += w.size
    if den == 0.0:
        return None
    return Decay(num / den, math.sqrt(1.0 / den), n)


def decay_checked(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                  weights0: Mapping[str, Any], scaled: bool = False) -> Any:
    """``result`` with the updated weights of each parameter whose two fitted decays differ
    failed (``fitted_decay``), for parameters whose optimizer state neither side recorded
    (plain SGD; any optimizer with ``optimizer_state=False``: the fit is each side's own, so a
    correct port's two fits agree whatever the update rule);
    ``result.options["decay"]`` lists them (``{name: {"reference": wd, "port": wd, "z": z}}``).
    ``scaled``: either side clips its gradients (``fitted_decay``)."""
    names: dict[str, list[int]] = {}
    for kr in result.results:
        m = _PARAM.fullmatch(kr.key)
        if m is not None:
            names.setdefault(m.group(2), []).append(int(m.group(1)))
    stateful = {k.split("/opt/", 1)[1].rpartition(".")[0] for d in (ref, other) for k in d
                if "/opt/" in k}
    differ: dict[str, dict[str, float]] = {}
    for name, steps in names.items():
        if name in stateful or name not in weights0:
            continue
        steps = sorted(steps)
        t = fitted_decay(ref, name, steps, np.asarray(weights0[name]), scaled)
        p = fitted_decay(other, name, steps, np.asarray(weights0[name]), scaled)
        if t is None or p is None:
            continue
        err = math.hypot(t.error, p.error)
        gap = abs(t.value - p.value)
        if gap > Z_LIMIT * err and gap > 0.0:
            differ[name] = {"reference": t.value, "port": p.value,
                            "z": gap / err if err > 0 else math.inf}
    if not differ:
        return result
    out = []
    for kr in result.results:
        m = _PARAM.fullmatch(kr.key)
        fit = differ.get(m.group(2)) if m is not None else None
        if fit is None or kr.status not in ("passed", "known", "kink", "failed", "mismatch"):
            out.append(kr)
            continue
        why = (f"the weight decays differ: this parameter's updates fit a decay of "
               f"{fit['reference']:.3g} in the reference and {fit['port']:.3g} in the port "
               f"({fit['z']:.3g} standard errors apart; (w_before - w_after) / lr - grad, "
               f"against w_before)")
        out.append(dataclasses.replace(kr, passed=False, status="failed",
                                       reason=f"{why}; {kr.reason}"))
    return dataclasses.replace(result, results=tuple(out),
                               options=dict(result.options, decay=differ))
