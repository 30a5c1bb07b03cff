"""The optimizers' hyperparameters, compared as the layers' settings are.

A port's optimizer is built by hand from the reference's, and its defaults are not torch's:
Paddle's ``RMSProp`` has rho 0.95 and epsilon 1e-6 where torch's ``RMSprop`` has alpha 0.99 and
eps 1e-8, a weight decay given to Paddle's ``Adam`` is an L2 term as torch's ``Adam`` has it
while its ``AdamW`` decays decoupled, and which parameters are decayed is said by torch's param
groups but by Paddle's ``apply_decay_param_fun`` or a parameter's own regularizer. The updated
weights show a difference only as a multiple of the noise, and ``train_localise`` can tell a
learning rate or a weight decay from the numbers, not an epsilon (its finding asks to "compare
the optimizers' hyperparameters"): here each is read and compared.

Read in one spelling (torch's names where Paddle's differ: ``betas`` for ``beta1, beta2``, ``rho``
for torch's ``alpha``): ``algorithm`` ("SGD", "SGD with momentum", "Adam", "AdamW", "RMSProp"),
``momentum``, ``nesterov``, ``dampening``, ``betas``, ``epsilon``, ``amsgrad``, ``rho``,
``centered``, ``maximize``, ``grad_clip`` (Paddle's optimizer's; torch's as ``align_train``'s
``torch_grad_clip`` or ``save_settings``' ``grad_clip`` give it: ``grad_clip.GradClip``) and, per
parameter, ``weight_decay`` ("L2 0.0001", "decoupled 0.05", "L1 0.001" or "none"). The
learning rate is not a setting here: each step's ``lr`` key compares it, schedule included.
RMSProp's epsilon is not compared: Paddle adds it under the square root, torch after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from .grad_clip import GradClip
from .settings import SettingDiff, _same

__all__ = ["compare_optimizers", "compare_records", "optimizer_record",
           "read_paddle_optimizer", "read_torch_optimizer"]

_SIDES = ("torch", "Paddle")


def _num(value: Any) -> float:
    """A hyperparameter Paddle may hold as a Tensor, as a float."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return float(np.asarray(value).reshape(-1)[0])


def _decay(kind: str, coeff: Any) -> str:
    c = _num(coeff) if coeff is not None else 0.0
    return f"{kind} {c:g}" if c else "none"


def read_torch_optimizer(opt: Any, grad_clip: Any = None
                         ) -> Optional[tuple[dict[str, Any], dict[int, str], list[str]]]:
    """``(settings, weight decay by id(parameter), settings that differ between param groups)``
    of a torch optimizer of a known class, else None. ``grad_clip``: the step's clipping
    (``GradClip``; None: none); a custom function's is left out of the settings."""
    import torch

    groups = list(getattr(opt, "param_groups", ()) or ())
    if not groups:
        return None
    if isinstance(opt, torch.optim.Adam):  # AdamW is one (decoupled_weight_decay)
        algorithm = "Adam"
    elif isinstance(opt, torch.optim.SGD):
        algorithm = "SGD"
    elif isinstance(opt, torch.optim.RMSprop):
        algorithm = "RMSProp"
    else:
        return None

    def one(g: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"maximize": bool(g.get("maximize", False))}
        if algorithm == "Adam":
            decoupled = isinstance(opt, torch.optim.AdamW) or bool(g.get("decoupled_weight_decay"))
            out["algorithm"] = "AdamW" if decoupled else "Adam"
            out["betas"] = tuple(float(b) for b in g["betas"])
            out["epsilon"] = float(g["eps"])
            out["amsgrad"] = bool(g.get("amsgrad", False))
        elif algorithm == "SGD":
            m = float(g.get("momentum", 0.0))
            out["algorithm"] = "SGD with momentum" if m else "SGD"
            out.update(momentum=m, nesterov=bool(g.get("nesterov", False)),
                       dampening=float(g.get("dampening", 0.0)) if m else 0.0)
        else:
            out.update(algorithm="RMSProp", rho=float(g["alpha"]), epsilon=float(g["eps"]),
                       momentum=float(g.get("momentum", 0.0)), centered=bool(g.get("centered")))
        return out

    per_group = [one(g) for g in groups]
    # a torch optimizer does not clip: the step around it does, as the caller says
    clip_text = "none" if grad_clip is None else grad_clip.text
    settings: dict[str, Any] = {} if clip_text is None else {"grad_clip": clip_text}
    varies = []
    for k in per_group[0]:
        values = [s.get(k) for s in per_group]
        if all(_same(v, values[0]) for v in values):
            settings[k] = values[0]
        else:
            varies.append(k)
    decay: dict[int, str] = {}
    for g, s in zip(groups, per_group):
        kind = "decoupled" if s.get("algorithm") == "AdamW" else "L2"
        for p in g["params"]:
            decay[id(p)] = _decay(kind, g.get("weight_decay", 0.0))
    return settings, decay, varies


def _paddle_regularizer(reg: Any) -> Optional[str]:
    if reg is None:
        return None
    kind = type(reg).__name__
    coeff = getattr(reg, "_coeff", getattr(reg, "_regularization_coeff", None))
    if kind.startswith("L1"):
        return _decay("L1", coeff)
    if kind.startswith("L2"):
        return _decay("L2", coeff)
    return f"{kind} {coeff}"


def _paddle_clip(clip: Any) -> str:
    if clip is None:
        return "none"
    kind = type(clip).__name__
    if kind == "ClipGradByGlobalNorm":
        return f"global norm {_num(clip.clip_norm):g}"
    if kind == "ClipGradByNorm":
        return f"norm {_num(clip.clip_norm):g} per tensor"
    if kind == "ClipGradByValue":
        return f"value [{_num(clip.min):g}, {_num(clip.max):g}]"
    return kind


def read_paddle_optimizer(opt: Any) -> Optional[tuple[dict[str, Any], dict[int, str]]]:
    """``(settings, weight decay by id(parameter))`` of a Paddle optimizer of a known class, else
    None."""
    import paddle

    o = paddle.optimizer
    s: dict[str, Any] = {"maximize": False, "grad_clip": _paddle_clip(getattr(opt, "_grad_clip",
                                                                                None))}
    kind = "L2"
    if isinstance(opt, o.AdamW):
        s["algorithm"] = "AdamW"
        kind = "decoupled"
    elif isinstance(opt, o.Adam):
        s["algorithm"] = "Adam"
    elif isinstance(opt, o.Momentum):
        m = _num(opt._momentum)
        s.update(algorithm="SGD with momentum" if m else "SGD", momentum=m,
                 nesterov=bool(opt._use_nesterov), dampening=0.0)
    elif isinstance(opt, o.SGD):
        s.update(algorithm="SGD", momentum=0.0, nesterov=False, dampening=0.0)
    elif isinstance(opt, o.RMSProp):
        s.update(algorithm="RMSProp", rho=_num(opt._rho), epsilon=_num(opt._epsilon),
                 momentum=_num(opt._momentum), centered=bool(opt._centered))
    else:
        return None
    if s["algorithm"] in ("Adam", "AdamW"):
        s["betas"] = (_num(opt._beta1), _num(opt._beta2))
        s["epsilon"] = _num(opt._epsilon)
        s["amsgrad"] = bool(getattr(opt, "_amsgrad", False))

    decay: dict[int, str] = {}
    params = list(getattr(opt, "_parameter_list", None) or ())
    if params and isinstance(params[0], dict):  # param groups
        params = [p for g in params for p in g.get("params", ())]
    for p in params:
        if kind == "decoupled":
            fun = getattr(opt, "_apply_decay_param_fun", None)
            on = fun is None or bool(fun(p.name))
            decay[id(p)] = _decay("decoupled", opt._weight_decay if on else 0.0)
            continue
        own = _paddle_regularizer(getattr(p, "regularizer", None))  # a ParamAttr's: it wins
        if own is not None:
            decay[id(p)] = own
        elif getattr(opt, "_regularization_method", "") == "l2_decay":  # Momentum's fused L2
            decay[id(p)] = _decay("L2", opt._regularization_coeff)
        else:
            decay[id(p)] = _paddle_regularizer(getattr(opt, "regularization", None)) or "none"
    return s, decay


def optimizer_record(opt: Any, model: Any, grad_clip: Any = None) -> dict[str, Any]:
    """What ``save_settings(..., optimizer=)`` writes: the framework, the settings, those that
    differ between torch's param groups, and each parameter's weight decay in the model's
    definition order (``[[name, decay], ...]``; the parameters the optimizer holds), or
    ``{"skipped": why}`` for an optimizer of another class. ``grad_clip``: a torch step's
    clipping (``GradClip``); a custom function's is said under ``"not_compared"``."""
    from .settings import _framework

    framework = _framework(model)
    read = (read_torch_optimizer(opt, grad_clip) if framework == "torch" else
            None if (p := read_paddle_optimizer(opt)) is None else (*p, []))
    if read is None:
        return {"framework": framework, "skipped": _skipped(opt)}
    settings, decay, varies = read
    # what the optimizer trains: Paddle's BatchNorm statistics are parameters it holds too, with
    # stop_gradient, and torch's frozen parameters take no step either
    out: dict[str, Any] = {"framework": framework, "settings": settings,
                           "decay": [[n, decay[id(q)]] for n, q in model.named_parameters()
                                     if id(q) in decay and _trained(q)]}
    if varies:
        out["per_group"] = varies
    if framework == "torch" and grad_clip is not None and grad_clip.text is None:
        out["not_compared"] = [_CUSTOM_CLIP]
    return out


_CUSTOM_CLIP = ("grad_clip (the reference clips with a function reprod cannot read: give "
                "torch_grad_clip a number or a functools.partial of torch.nn.utils.clip_grad_norm_ "
                "or clip_grad_value_ to have it compared)")


def _trained(param: Any) -> bool:
    return bool(getattr(param, "requires_grad", True)) and not bool(
        getattr(param, "stop_gradient", False))


def _skipped(opt: Any) -> str:
    return (f"{type(opt).__name__} is not an optimizer whose hyperparameters reprod reads (SGD, "
            "momentum, Adam, AdamW, RMSProp)")


def compare_records(ours: Mapping[str, Any], theirs: Mapping[str, Any],
                    pairs: Optional[Mapping[str, str]] = None,
                    sides: tuple[str, str] = _SIDES) -> tuple[list[SettingDiff], dict[str, Any]]:
    """The hyperparameters that differ between two ``optimizer_record``s, and what was read.
    ``pairs``: the reference's parameter name -> the port's; None pairs them by order (where
    both hold as many)."""
    if "skipped" in ours or "skipped" in theirs:
        return [], {"skipped": ours.get("skipped") or theirs.get("skipped")}
    ts, ps = dict(ours["settings"]), dict(theirs["settings"])
    info: dict[str, Any] = {"torch": ts, "paddle": ps}
    not_compared = [*ours.get("not_compared", ()), *theirs.get("not_compared", ())]
    if not_compared:
        info["not_compared"] = not_compared
    if ours.get("per_group"):
        info["per_group"] = list(ours["per_group"])
    diffs = []
    for k in ts:
        if k == "epsilon" and ts.get("algorithm") == ps.get("algorithm") == "RMSProp":
            # not one number in two spellings: Paddle adds it under the square root, torch
            # after it, so no pair of values computes the same (a framework difference)
            info.setdefault("not_compared", []).append(
                "epsilon (RMSProp: Paddle's is under the square root, torch's added after it)")
            continue
        if k in ps and not _same(ts[k], ps[k]):
            diffs.append(SettingDiff("optimizer", "optimizer", k, ts[k], ps[k], "optimizer",
                                     sides))
    # weight decay, parameter by parameter (torch's param groups against Paddle's
    # apply_decay_param_fun or regularizers)
    t_decay, p_decay = list(ours["decay"]), list(theirs["decay"])
    if pairs is None:
        if len(t_decay) != len(p_decay):
            info["weight_decay"] = {"unpaired": f"{len(t_decay)} parameters in {sides[0]}, "
                                                f"{len(p_decay)} in {sides[1]}"}
            return diffs, info
        matched = [(tn, pn, a, b) for (tn, a), (pn, b) in zip(t_decay, p_decay)]
    else:
        by_name = dict((n, d) for n, d in p_decay)
        matched = [(tn, pairs[tn], a, by_name[pairs[tn]]) for tn, a in t_decay
                   if pairs.get(tn) in by_name]
    differing = [x for x in matched if x[2] != x[3]]
    if differing and len(differing) == len(matched) and \
            len({(a, b) for _, _, a, b in differing}) == 1:
        diffs.append(SettingDiff("optimizer", "optimizer", "weight_decay", differing[0][2],
                                 differing[0][3], "optimizer", sides))
    else:
        diffs.extend(SettingDiff(f"optimizer/{tn}", f"optimizer/{pn}", "weight_decay", a, b,
                                 "optimizer", sides) for tn, pn, a, b in differing)
    decays = {(a, b) for _, _, a, b in matched}
    info["weight_decay"] = {"parameters": len(matched), "differ": len(differing)}
    if len(decays) == 1:
        info["weight_decay"]["torch"], info["weight_decay"]["paddle"] = next(iter(decays))
    return diffs, info


def compare_optimizers(torch_opt: Any, paddle_opt: Any, torch_model: Any, paddle_model: Any,
                       torch_to_paddle: Optional[Mapping[str, str]] = None,
                       torch_grad_clip: Any = None
                       ) -> tuple[list[SettingDiff], dict[str, Any]]:
    """The hyperparameters that differ between the two optimizers, as ``SettingDiff`` of
    ``"optimizer"`` (``settings/optimizer/<setting>``; a weight decay that differs on some
    parameters only, ``settings/optimizer/<Paddle parameter>/weight_decay``), and what was read
    (``{"torch": ..., "paddle": ...}``, or ``{"skipped": why}`` for an optimizer of another
    class). ``torch_to_paddle``: torch parameter name -> Paddle parameter name (None: by
    definition order). ``torch_grad_clip``: how the torch step clips its gradients, as
    ``align_train`` takes it (a number, a ``functools.partial`` of ``clip_grad_norm_`` or
    ``clip_grad_value_``, a function; None: not at all)."""
    from .grad_clip import grad_clip_of

    clip = torch_grad_clip if isinstance(torch_grad_clip, GradClip) else grad_clip_of(torch_grad_clip)
    return compare_records(optimizer_record(torch_opt, torch_model, clip),
                           optimizer_record(paddle_opt, paddle_model), torch_to_paddle)
