"""Kink labels checked by a counterfactual: the reference's float64 backward with the port's side
of each crossing.

``explain_kinks`` puts every failing gradient of a layer called before a crossing down to it.
That is an over-approximation (a layer called earlier need not feed the crossing layer, and a
crossing that moves a gradient a little does not license it to move 50%), so a bug whose only
effect is in a backward pass upstream of a crossing hid behind the label: a port that scales
shufflenet_v2's first conv gradient by 1.5 passed, its gradient 360,000x noise away "downstream
of the kink crossing at maxpool".

The crossing is a claim that can be checked: had the reference put those elements where the port
put them, it would have computed the port's gradients. So the float64 twin runs the step again
from the same state with each kink layer's input (an activation's, a max-pool's, the input of a
Paddle BatchNorm's built-in activation) replaced by the port's value, with the identity's
gradient: every kink is then taken on the port's side (the crossings found, and any other element
where the twin's own rounding falls on the other side from the port's), while the forward pass
moves by no more than those inputs' noise (only inputs whose key aligns are replaced; where one
does not, a forward difference, the twin keeps its own). A labelled gradient passes when it is
within ``noise_factor`` times its own noise of that counterfactual gradient, as any calibrated
key, and fails otherwise, taking with it the weights and optimizer state updated from it and the
labels of every later step (their difference starts at a bug).

Each step is run again from the state the port's step started from (the free run's step 0 from
the state before training, a later step from the weights and statistics the port recorded after
the step before, a step judged from the reference's state from that state), and only with
``calibrate=True``: the noise the check is judged by is the float64 twin's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import numpy as np

from ..capture.kinks.crossings import _ratio
from ..capture.kinks.points import KINK_POINTS, onto_side
from ..capture.naming import parse_key
from .calibration import _float64_loss, _float64_twin
from .framework import (
    _call_loss,
    _deterministic,
    _split_batch,
    _split_inputs,
    _to_torch,
    _torch_array,
    _torch_device,
)
from .rules import KeyPlan, copy_into, packed_slices, torch_views

__all__ = ["checked", "counterfactual_grads", "finding", "first_in_backward", "labelled_grads",
           "port_inputs"]

_STEP_KEY = re.compile(r"step(?P<step>\d+)/(?P<kind>[^/]+)(?:/(?P<name>.+))?")
DOWNSTREAM = "downstream of the "
AFTER = "after the "
UPDATED = "updated with "


def port_inputs(results: Sequence[Any], other: Mapping[str, Any], per_pass: Mapping[str, int],
                passes: set[int]) -> dict[int, dict[str, np.ndarray]]:
    """The port's input of each kink layer call of ``passes`` whose input key aligns (a
    ``passed`` capture key among ``results``): pass -> layer call within that pass's forward
    (``relu``, ``relu#2``) -> the array (``other``'s own, not copied). ``per_pass``: each kink
    layer's (and activation site's) calls in one forward pass: its n-th call overall is call
    n - k * per_pass of pass k. An input that does not align is left out: the reference keeps
    its own value there (a forward difference is no kink's to explain)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for kr in results:
        p = parse_key(kr.key)
        if p is None or p.what != "in" or p.items not in ((), ("0",)) or not kr.passed:
            continue
        calls = per_pass.get(p.name, 0)
        if calls < 1:
            continue
        at, call = divmod(p.call - 1, calls)
        value = other.get(kr.key)
        if at in passes and value is not None:
            subject = p.name if call == 0 else f"{p.name}#{call + 1}"
            out.setdefault(at, {})[subject] = np.asarray(value)
    return out


def _labelled(kr: Any, step: int) -> Optional[str]:
    """The Paddle parameter name of ``kr`` where it is a ``step<step>/grad/`` key that a
    crossing of that step explains (status ``"kink"``, "downstream of the ..."), else None."""
    m = _STEP_KEY.fullmatch(kr.key)
    if (m is None or int(m.group("step")) != step or m.group("kind") != "grad"
            or kr.status != "kink" or not (kr.reason or "").startswith(DOWNSTREAM)):
        return None
    return m.group("name")


def labelled_grads(result: Any, step: int) -> set[str]:
    """The Paddle parameter names whose ``step<step>/grad/`` key a crossing of that step
    explains."""
    return {name for kr in result.results if (name := _labelled(kr, step)) is not None}


class _Unusable(Exception):
    """The counterfactual cannot be built (a kink layer input of another shape)."""


def counterfactual_grads(torch_model: Any, state: Mapping[str, Any], batch: Any, *,
                         loss_fn: Callable[..., Any], seed: int, plan: Mapping[str, KeyPlan],
                         inputs: Mapping[str, np.ndarray], sites: Mapping[str, str],
                         names: set[str], types: Optional[Mapping[str, str]] = None,
                         ) -> tuple[dict[str, np.ndarray], Optional[str]]:
    """The float64 twin's gradients of ``names`` (Paddle names and layout) after one forward and
    backward on ``batch`` from ``state`` (the torch model's own state dict, its values as arrays
    or tensors), each kink layer call of ``inputs`` (``port_inputs``) taking the port's input
    value with the identity's gradient: ``(grads, None)``, or ``({}, why)`` where it cannot be
    built. torch is seeded with ``seed`` before the forward pass, as the twin's own step was.
    ``sites``: torch norm layer -> the activation site whose input is its output
    (``KinkCapture.torch_sites``). ``types``: layer (or site) -> class, for the elements that
    Paddle's kernel takes to another side of a kink than torch's float64 one at the same value
    (Hardswish at 3 - 1 ulp): those are moved onto Paddle's side (``points.onto_side``). The
    torch model is not changed."""
    import torch

    twin = _float64_twin(torch_model)
    # a packed attention tensor by its own name and its slices' names
    copy_into(twin.state_dict(), state)
    norm_of = {site: norm for norm, site in sites.items()}
    modules = dict(twin.named_modules())
    wanted: set[str] = set()  # the modules whose calls take the port's input
    for subject in inputs:
        layer = subject.partition("#")[0]
        module = norm_of.get(layer, layer)
        if module not in modules:
            return {}, f"no layer {module} in the float64 twin"
        wanted.add(module)
    counts: dict[str, int] = {}
    applied: set[str] = set()

    def ported(subject: str, x: Any) -> Any:
        value = inputs.get(subject)
        if value is None:
            return None
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != value.shape:
            raise _Unusable(f"{subject}'s input in the float64 twin is not of the recorded shape "
                            f"{value.shape}")
        applied.add(subject)
        # the port's value, within the input's noise of the twin's (the key aligns), with the
        # identity's gradient: every kink of the layer is taken on the port's side
        layer_type = (types or {}).get(subject.partition("#")[0])
        spec = KINK_POINTS.get(str(layer_type).lower())
        if isinstance(spec, tuple):
            value = onto_side(np.asarray(value), spec, layer_type, "paddle", str(value.dtype),
                              "torch")
        port = torch.from_numpy(np.asarray(value)).to(device=x.device, dtype=x.dtype)
        return x + (port - x.detach())

    def subject_of(name: str, label: str) -> str:
        counts[name] = counts.get(name, 0) + 1
        return label if counts[name] == 1 else f"{label}#{counts[name]}"

    def pre(name: str) -> Any:
        def hook(module: Any, args: Any) -> Any:
            new = ported(subject_of(name, name), args[0]) if args else None
            return None if new is None else (new, *args[1:])
        return hook

    def post(name: str, site: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            return ported(subject_of(name, site), output)
        return hook

    handles = []
    for module in wanted:
        site = sites.get(module)
        handles.append(modules[module].register_forward_hook(post(module, site)) if site
                       else modules[module].register_forward_pre_hook(pre(module)))
    batch_in, labels = _split_batch(batch, 0)
    args, kwargs = _split_inputs(batch_in)
    dev = _torch_device(twin)
    try:
        with _deterministic(seed):
            torch.manual_seed(seed)
            out = twin(*_to_torch(args, dev, float64=True), **_to_torch(kwargs, dev, float64=True))
            loss = _call_loss(_float64_loss(loss_fn), out, _to_torch(labels, dev, float64=True))
            loss.backward()
    except _Unusable as e:
        return {}, str(e)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(inputs) - applied)
    if missing:
        return {}, f"the float64 twin did not call {', '.join(missing[:3])}"
    grads = {}
    for name, grad in torch_views(((n, p.grad) for n, p in twin.named_parameters()),
                                  packed_slices(twin.state_dict())):
        kp = plan.get(name)
        if kp is not None and kp.paddle_name in names and grad is not None:
            grads[kp.paddle_name] = _torch_array(grad, kp)
    return grads, None


def _plain(reason: str) -> str:
    """A relabelled key's reason as the comparison gave it (the label's clause dropped)."""
    return reason.split("; ", 1)[1] if "; " in reason else reason


def checked(result: Any, grads: Mapping[str, np.ndarray], port: Mapping[str, Any], *,
            step: int, factor: float) -> tuple[Any, dict[str, int]]:
    """``result`` with each gradient of ``step`` labelled by a crossing of that step judged
    against the counterfactual gradient (``grads``, Paddle names): within ``factor`` times its
    noise, the label stays and says so; beyond it, the key fails, and so do the weights updated
    from it and every key of a later step labelled "after" a crossing. Also the counts
    ``{"aligned": n, "failed": m, "worst": the largest multiple, "failed_params": {Paddle name:
    its multiple, worded}}``."""
    failed: dict[str, str] = {}  # Paddle name -> the multiple, worded
    aligned: dict[str, str] = {}
    worst = 0.0
    for kr in result.results:
        name = _labelled(kr, step)
        if name is None:
            continue
        g, o = grads.get(name), port.get(kr.key)
        if g is None or o is None or kr.noise_l2 is None or kr.noise_max is None:
            continue
        o = np.asarray(o, dtype=np.float64)
        if o.shape != g.shape:
            continue
        d = o - g
        multiple = max(_ratio(float(np.sqrt(np.sum(d * d))), kr.noise_l2),
                       _ratio(float(np.max(np.abs(d))) if d.size else 0.0, kr.noise_max))
        (failed if not multiple <= factor else aligned)[name] = f"{multiple:,.3g}x"
        worst = max(worst, multiple)
    counts: dict[str, Any] = {"aligned": len(aligned), "failed": len(failed), "worst": worst,
                              "failed_params": dict(failed)}
    if not failed and not aligned:
        return result, counts
    first = next((kr.key for kr in result.results
                  if (m := _STEP_KEY.fullmatch(kr.key)) is not None and m.group("kind") == "grad"
                  and int(m.group("step")) == step and m.group("name") in failed), None)
    out = []
    for kr in result.results:
        m = _STEP_KEY.fullmatch(kr.key)
        s = None if m is None else int(m.group("step"))
        name = None if m is None else m.group("name")
        reason = kr.reason or ""
        if kr.status != "kink" or s is None:
            out.append(kr)
        elif s == step and m.group("kind") == "grad" and name in failed:
            crossing = reason[len(DOWNSTREAM):].split("; ", 1)[0]
            out.append(dataclasses.replace(
                kr, passed=False, status="failed",
                reason=f"not explained by the {crossing}: with the port's side of each crossing "
                       f"of step {step}, the reference's float64 gradient is still "
                       f"{failed[name]} noise away (> {factor:g}x); {_plain(reason)}"))
        elif s == step and m.group("kind") == "grad" and name in aligned:
            out.append(dataclasses.replace(
                kr, reason=f"{reason}; with the port's side of each crossing of step {step}, the "
                           f"reference's float64 gradient aligns ({aligned[name]} noise)"))
        elif (s == step and m.group("kind") in ("param", "opt") and reason.startswith(UPDATED)
              and (name if m.group("kind") == "param" else name.rpartition(".")[0]) in failed):
            out.append(dataclasses.replace(
                kr, passed=False, status="failed",
                reason=f"updated with {reason[len(UPDATED):].split(', ', 1)[0]}, which no kink "
                       "crossing explains; "
                       f"{_plain(reason)}"))
        elif failed and s > step and reason.startswith(AFTER):
            out.append(dataclasses.replace(
                kr, passed=False, status="failed",
                reason=f"after {first}, which no kink crossing explains; {_plain(reason)}"))
        else:
            out.append(kr)
    return dataclasses.replace(result, results=tuple(out)), counts


def first_in_backward(failed: Sequence[str], order: Sequence[str],
                      to_torch: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """(Paddle parameter name, torch layer) of the failing gradient whose layer is called last
    in the forward pass (``order``: the torch model's layer calls), the first the backward
    reaches; None where no failing parameter's layer is in ``order``."""
    position = {}
    for i, entry in enumerate(order):
        position.setdefault(entry.partition("#")[0], i)
    best: Optional[tuple[int, str, str]] = None
    for name in failed:
        tname = to_torch.get(name)
        if tname is None:
            continue
        layer = tname.rpartition(".")[0]
        at = position.get(layer)
        if at is not None and (best is None or at > best[0]):
            best = (at, name, layer)
    return None if best is None else (best[1], best[2])


def finding(step: int, info: Mapping[str, Any]) -> Optional[str]:
    """The finding of a step whose crossing-labelled gradients the counterfactual failed:
    where the port's backward goes wrong."""
    first = info.get("first")
    failed = info.get("failed_params") or {}
    if not first or first.get("param") not in failed:
        return None
    n = len(failed)
    others = "" if n == 1 else f"; {n - 1} more differ so, all of layers called before it"
    layer = first["layer"] + (f" ({first['type']})" if first.get("type") else "")
    return (f"backward diverges at {layer}: the port's gradient of {first['param']} is "
            f"{failed[first['param']]} noise from the reference's float64 gradient with the "
            f"port's side of each kink crossing of step {step}, while the gradients of the "
            f"layers called after it align{others}: the port's backward differs in "
            f"{first['layer']} (a gradient hook, a custom backward, a rescaled or frozen "
            "gradient) or in a layer without parameters between it and the next")
