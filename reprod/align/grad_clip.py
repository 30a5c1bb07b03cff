"""Gradient clipping in the reference's training step (``align_train(torch_grad_clip=...)``).

A Paddle optimizer holds its clipping (``grad_clip=ClipGradByGlobalNorm(1.0)``); a torch script
clips between ``backward()`` and ``optimizer.step()`` with ``torch.nn.utils.clip_grad_norm_``,
which no optimizer knows of. A port that clips faithfully failed against a reference step that
clipped nothing, so the reference's step takes the clipping as an argument:

- a number: the gradients scaled to a global 2-norm of at most that number, by
  ``limit / max(norm, limit)`` as Paddle's ``ClipGradByGlobalNorm`` scales them. torch's
  ``clip_grad_norm_`` divides by ``norm + 1e-6`` instead: a coefficient ``1e-6 / norm`` apart,
  the same for every element, which a faithful port cannot remove and which carries into every
  momentum buffer and Adam moment whole (40 float32 units at a norm of 0.4: 20 to 48 times their
  noise, measured on tests/align/test_grad_clip.py's twins, calibrated);
- ``functools.partial(torch.nn.utils.clip_grad_norm_, max_norm=..., norm_type=...)`` or
  ``functools.partial(torch.nn.utils.clip_grad_value_, clip_value=...)``: read as what they do
  (compared with Paddle's clipping as a setting, replayed in numpy where a replay needs it);
- any other callable, called with the model's parameters: run as it is, and neither compared
  nor replayed (reprod cannot read what it does).

The gradients recorded (``stepN/grad/``) are both sides' before clipping: Paddle clips inside
``optimizer.step()``, after they are recorded, so a clipping that differs shows in the updated
weights and the optimizer's state, and as a setting.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ReprodError

__all__ = ["GradClip", "grad_clip_of"]


@dataclass(frozen=True)
class GradClip:
    """How the reference's step clips: ``kind`` "norm" (over every gradient together, the
    ``norm_type``-norm at most ``limit``), "value" (each element within [-limit, limit]) or
    "custom" (``fn`` only)."""

    kind: str
    limit: float = math.nan
    norm_type: float = 2.0
    fn: Optional[Callable[..., Any]] = None

    @property
    def text(self) -> Optional[str]:
        """The setting as ``optim_settings`` spells Paddle's (``global norm 1``), or None where
        it cannot be read (a custom function)."""
        if self.kind == "norm":
            if self.norm_type == 2.0:
                return f"global norm {self.limit:g}"
            order = "max" if math.isinf(self.norm_type) else f"{self.norm_type:g}"
            return f"global {order}-norm {self.limit:g}"
        if self.kind == "value":
            return f"value [{-self.limit:g}, {self.limit:g}]"
        return None

    def apply(self, parameters: Any) -> None:
        """Clip the torch gradients of ``parameters`` in place, as the reference's step does."""
        import torch

        params = [p for p in parameters if p.grad is not None]
        if self.fn is not None:
            self.fn(params)
        elif self.kind == "norm":  # a number given: Paddle's coefficient (module docstring)
            with torch.no_grad():
                grads = [p.grad for p in params]
                if not grads:
                    return
                norms = torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads])
                total = torch.linalg.vector_norm(norms, 2.0)
                coef = self.limit / torch.clamp(total, min=self.limit)
                for g in grads:
                    g.mul_(coef.to(g.dtype))
        else:
            torch.nn.utils.clip_grad_value_(params, clip_value=self.limit)

    def arrays(self, grads: Mapping[str, Any]) -> Optional[dict[str, np.ndarray]]:
        """``grads`` (every gradient of one step) clipped as torch's ``apply`` clips them, in
        float64 then cast back, for replaying the reference's update of the port's gradients;
        None for a custom function."""
        if self.kind == "custom":
            return None
        out = {k: np.asarray(g) for k, g in grads.items()}
        if self.kind == "value":
            return {k: np.clip(g, -self.limit, self.limit).astype(g.dtype) for k, g in out.items()}
        flat = [np.abs(g.astype(np.float64)).reshape(-1) for g in out.values()]
        if math.isinf(self.norm_type):
            total = max((float(f.max()) for f in flat if f.size), default=0.0)
        else:
            p = self.norm_type
            total = sum(float(np.sum(f ** p)) for f in flat) ** (1.0 / p)
        # a number given: Paddle's coefficient; clip_grad_norm_'s own: torch's, clamped at 1
        coef = self.limit / max(total, self.limit) if self.fn is None else \
            min(1.0, self.limit / (total + 1e-6))
        return {k: (g.astype(np.float64) * coef).astype(g.dtype) for k, g in out.items()}


def grad_clip_of(spec: Any) -> Optional[GradClip]:
    """``align_train``'s ``torch_grad_clip`` read; a bad one raises ``ReprodError`` (one line)."""
    if spec is None:
        return None
    if isinstance(spec, bool) or not (callable(spec) or isinstance(spec, (int, float))):
        raise ReprodError(f"torch_grad_clip={spec!r}: give a number (the largest global 2-norm of "
                          "the gradients, as clip_grad_norm_ takes it), or a function called with "
                          "the model's parameters between backward() and optimizer.step()")
    if not callable(spec):
        return GradClip("norm", _positive(spec, "torch_grad_clip"))
    if isinstance(spec, functools.partial) and not spec.args:
        import torch

        fn, kw = spec.func, dict(spec.keywords)
        if fn is torch.nn.utils.clip_grad_norm_ and "max_norm" in kw:
            return GradClip("norm", _positive(kw["max_norm"], "max_norm"),
                            float(kw.get("norm_type", 2.0)), fn=spec)
        if fn is torch.nn.utils.clip_grad_value_ and "clip_value" in kw:
            return GradClip("value", _positive(kw["clip_value"], "clip_value"), fn=spec)
    return GradClip("custom", fn=spec)


def _positive(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not (x > 0 and math.isfinite(x)):
        raise ReprodError(f"torch_grad_clip: {name}={value!r}: give a positive, finite number")
    return x
