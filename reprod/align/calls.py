"""The settings of operations a model applies as functions, traced through one forward pass.

Layer settings (``settings``) are read from layer attributes, so a pool, an upsampling, a GELU or
a dropout that a model's code applies as a function goes unchecked there, and a model that applies
as a function what its port holds as a layer leaves that kind unpaired. torchvision's
inception_v3 applies its branch pools as ``F.avg_pool2d(x, 3, stride=1, padding=1)``, which counts
the padding; the same call in Paddle's ``F.avg_pool2d`` defaults to ``exclusive=True``, which
does not: the classic port of it computes another border and no layer setting says so.

``trace_settings(model)`` wraps the functions of ``torch.nn.functional`` or
``paddle.nn.functional`` that have settings, for the time of a forward pass, and registers a
pre-hook on each layer of a kind ``settings`` reads. Each call from a model's code (not from
inside such a layer, and not from inside another traced function) and each such layer becomes an
``OpEvent``: its kind, where it ran and its settings, in the spelling both frameworks share (the
same as the layers': Paddle's ``exclusive`` as ``count_include_pad``, its momentum as ``1 -
torch's``). Events of one kind pair by order, where both passes made as many; a pair of two layers
is left to the layer settings, which compared them already.

Beyond the functional modules, the top-level functions and tensor methods model code calls as
often are wrapped too (``attn.softmax(dim=-1)``, ``x.var(-1, unbiased=False)``: ``_SITES``), and a
wrapped function the model's own modules imported by name is replaced in their globals for the
time of the trace. A function imported into a helper module that defines none of the model's
layers is not seen.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from . import settings as _settings
from .rules import number_attr

__all__ = ["OpEvent", "SettingsTrace", "compare_events", "trace_settings"]


@dataclass(frozen=True)
class OpEvent:
    """One operation of a traced forward pass: a function call or a layer of a known kind."""

    kind: str  # the kind, as the layer settings name it: "avgpool", "upsample", "dropout"...
    op: str  # the function called ("avg_pool2d") or the layer's class ("AvgPool2D")
    name: str  # a layer's own name; for a call, where it ran and the op: "Mixed_5b:avg_pool2d#2"
    layer: bool  # a layer of a kind the layer settings compare
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "op": self.op, "name": self.name, "layer": self.layer,
                "settings": {k: _settings._jsonable(v) for k, v in self.settings.items()}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> OpEvent:
        return cls(str(doc["kind"]), str(doc["op"]), str(doc["name"]), bool(doc["layer"]),
                   {k: _settings._from_json(v) for k, v in dict(doc["settings"]).items()})


# --- normalising each framework's arguments ---------------------------------------------------


def _ndim(x: Any) -> int:
    try:
        return len(x.shape)
    except (AttributeError, TypeError):
        return 0


def _axis(axis: Any, ndim: int) -> Any:
    if isinstance(axis, int) and not isinstance(axis, bool) and axis < 0 and ndim:
        return axis + ndim
    return axis


def _torch_implicit_dim(ndim: int) -> int:
    # torch's softmax without a dim (deprecated): what torch.nn.functional._get_softmax_dim picks
    return 0 if ndim in (0, 1, 3) else 1


def _torch_pad_raw(pad: Any, rank: int) -> Any:
    return pad.lower() if isinstance(pad, str) else _settings._tuple(pad, rank)


def _trimmed_pad(pad: Sequence[Any]) -> tuple[int, ...]:
    """(left, right, top, bottom, ...) from the last dimension, without trailing zero pairs."""
    out = [int(v) for v in pad]
    while len(out) >= 2 and out[-1] == 0 and out[-2] == 0:
        del out[-2:]
    return tuple(out)


def _paddle_pad_torch_order(pad: Any, ndim: int, from_left: bool) -> Any:
    """Paddle's ``F.pad`` list in torch's order: a list of ``2 * ndim`` runs from the first
    axis (``pad_from_left_axis``), a shorter one from the last, as torch's does."""
    if not isinstance(pad, (list, tuple)):
        return pad
    vals = [int(v) for v in pad]
    if len(vals) == 2 * ndim and from_left:
        pairs = [vals[2 * i:2 * i + 2] for i in range(ndim)]
        vals = [v for p in reversed(pairs) for v in p]
    return _trimmed_pad(vals)


def _plain(value: Any) -> Any:
    """A setting as JSON holds it: a tensor given for a size, a dtype object, as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    try:  # numpy and framework scalars, and short vectors (a size given as a tensor)
        shape = tuple(getattr(value, "shape", None) or ())
        if hasattr(value, "tolist") and len(shape) <= 1 and (not shape or shape[0] <= 16):
            listed = value.tolist()
            return _plain(tuple(listed) if isinstance(listed, list) else listed)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        pass
    return repr(value)


def _stats_torch(training: Any) -> str:
    return "the batch's" if training else "the running ones"


def _stats_paddle(training: Any, use_global_stats: Any) -> str:
    if use_global_stats is None:
        return "the batch's" if training else "the running ones"
    return "the running ones" if use_global_stats else "the batch's"


def _loss_common(a: Mapping[str, Any]) -> dict[str, Any]:
    return {"reduction": str(a.get("reduction", "mean"))}


def _shape(x: Any) -> Optional[tuple[int, ...]]:
    try:
        return tuple(int(d) for d in x.shape)
    except (AttributeError, TypeError, ValueError):
        return None


def _ce_torch(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    target = a.get("target")
    soft = bool(getattr(getattr(target, "dtype", None), "is_floating_point", False))
    return dict(_loss_common(a), class_axis=1 if _ndim(x) >= 2 else 0, soft_label=soft,
                use_softmax=True, ignore_index=int(a["ignore_index"]),
                label_smoothing=float(a.get("label_smoothing", 0.0) or 0.0),
                weighted=a.get("weight") is not None)


def _ce_paddle(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    return dict(_loss_common(a), class_axis=_axis(a.get("axis", -1), _ndim(x)),
                soft_label=bool(a.get("soft_label")), use_softmax=bool(a.get("use_softmax", True)),
                ignore_index=int(a["ignore_index"]),
                label_smoothing=float(a.get("label_smoothing", 0.0) or 0.0),
                weighted=a.get("weight") is not None)


def _smooth_l1_paddle(a: Mapping[str, Any]) -> str:
    delta = float(a.get("delta", 1.0))
    if a.get("is_huber", True) and delta != 1.0:
        return f"Huber, delta {delta:g}"
    return f"smooth L1, beta {delta:g}"


def _upsample(mode: Any, align_corners: Any, align_mode: Any = 0, antialias: Any = False
              ) -> dict[str, Any]:
    mode = str(mode).lower()
    linear = mode in ("linear", "bilinear", "trilinear")
    return {"mode": mode, "align_corners": bool(align_corners),
            # Paddle's align_mode 1 samples (0, 1, ...) where torch samples pixel centres
            "align_mode": int(align_mode or 0) if linear and not align_corners else 0,
            "antialias": bool(antialias)}


# Torch's builtins have no signature inspect can read: their parameters, with defaults. A
# parameter without ``=`` is required.
_TORCH_PARAMS = {
    "conv": "input weight bias=None stride=1 padding=0 dilation=1 groups=1",
    "conv_transpose": "input weight bias=None stride=1 padding=0 output_padding=0 groups=1 "
                      "dilation=1",
    "avg_pool1d": "input kernel_size stride=None padding=0 ceil_mode=False count_include_pad=True",
    "avg_pool": "input kernel_size stride=None padding=0 ceil_mode=False count_include_pad=True "
                "divisor_override=None",
    "max_pool": "input kernel_size stride=None padding=0 dilation=1 ceil_mode=False "
                "return_indices=False",
    "adaptive_pool": "input output_size return_indices=False",
    "gelu": "input approximate='none'",
    "softplus": "input beta=1.0 threshold=20.0",
    "pixel_shuffle": "input upscale_factor",
    "pixel_unshuffle": "input downscale_factor",
    "cosine_similarity": "x1 x2 dim=1 eps=1e-08",
}


def _parse_params(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in text.split():
        name, eq, default = item.partition("=")
        out.append((name, ast.literal_eval(default) if eq else inspect.Parameter.empty))
    return out


_Norm = Callable[[Mapping[str, Any], Any], dict[str, Any]]


def _pool_common(a: Mapping[str, Any], r: int, pad: Callable[[Any, int], Any]) -> dict[str, Any]:
    k = a["kernel_size"]
    return {"kernel_size": _settings._tuple(k, r),
            "stride": _settings._tuple(_settings._pool_stride(k, a.get("stride")), r),
            "padding": pad(a.get("padding", 0), r), "ceil_mode": bool(a.get("ceil_mode"))}


# op -> (kind, torch normaliser, Paddle normaliser, torch builtin parameters); a normaliser takes
# the bound arguments (defaults applied) and the first tensor argument
_OPS: dict[str, tuple[str, Optional[_Norm], Optional[_Norm], Optional[str]]] = {}


# a fused attention call: the softmax over its keys and the dropout of its weights that a
# hand-written attention applies as two calls or layers, each an event of its own kind
_SDPA = "sdpa"
_CALLER = "__caller__"  # what ``_record`` adds: the layer whose code made the call
# where an attention that calls the fused op holds its rate as a number (Hugging Face's BERT and
# ALBERT ``dropout_prob``, Llama's ``attention_dropout``)
_HELD_RATES = ("dropout_prob", "attention_dropout", "attn_dropout", "dropout_p", "dropout")


def _held_rate(layer: Any) -> Optional[float]:
    return number_attr(layer, _HELD_RATES)


def _sdpa_events(a: Mapping[str, Any], scores: Optional[tuple[int, ...]], on: bool
                 ) -> dict[str, dict[str, Any]]:
    p = float(a.get("dropout_p") or 0.0)
    dropout: dict[str, Any] = {"p": p, "mode": "upscale_in_train", "training": bool(on and p)}
    caller = a.get(_CALLER)
    if not p and caller is not None and getattr(caller, "training", None) is False:
        # Hugging Face passes ``dropout_p=self.dropout_prob if self.training else 0.0``: out of
        # training the call says nothing of the rate, the layer may
        held = _held_rate(caller)
        if held is None:
            dropout["_rate_unread"] = True
        else:
            dropout["p"] = held
    softmax = {"axis": len(scores) - 1 if scores else -1, "_shape": scores}
    return {"softmax": softmax, "dropout": dropout}


def _sdpa_torch(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    q, k = _shape(a.get("query")), _shape(a.get("key"))
    scores = q[:-1] + k[-2:-1] if q and k else None  # (..., L, E) @ (..., S, E)^T
    return _sdpa_events(a, scores, True)  # torch's call drops wherever its p is not 0


def _sdpa_paddle(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    q, k = _shape(a.get("query")), _shape(a.get("key"))
    # Paddle's layout is (batch, length, heads, dim)
    scores = (q[0], q[2], q[1], k[1]) if q and k and len(q) == 4 and len(k) == 4 else None
    return _sdpa_events(a, scores, bool(a.get("training", True)))


def _op(names: Sequence[str], kind: str, torch_norm: Optional[_Norm],
        paddle_norm: Optional[_Norm], torch_params: Optional[str] = None) -> None:
    for n in names:
        _OPS[n] = (kind, torch_norm, paddle_norm, torch_params)


for _r in (1, 2, 3):
    _op([f"avg_pool{_r}d"], "avgpool",
        lambda a, x, r=_r: dict(_pool_common(a, r, _torch_pad_raw),
                                count_include_pad=bool(a.get("count_include_pad", True)),
                                divisor_override=a.get("divisor_override")),
        lambda a, x, r=_r: dict(_pool_common(a, r, _settings._paddle_pad_value),
                                count_include_pad=not bool(a.get("exclusive", True)),
                                divisor_override=a.get("divisor_override")),
        _TORCH_PARAMS["avg_pool1d" if _r == 1 else "avg_pool"])
    _op([f"max_pool{_r}d"], "maxpool",
        lambda a, x, r=_r: dict(_pool_common(a, r, _torch_pad_raw),
                                dilation=_settings._tuple(a.get("dilation", 1), r)),
        lambda a, x, r=_r: dict(_pool_common(a, r, _settings._paddle_pad_value),
                                dilation=_settings._tuple(1, r)),
        _TORCH_PARAMS["max_pool"])
    for _kind in ("avg", "max"):
        _op([f"adaptive_{_kind}_pool{_r}d"], f"adaptive{_kind}pool",
            lambda a, x, r=_r: {"output_size": _settings._tuple(a["output_size"], r)},
            lambda a, x, r=_r: {"output_size": _settings._tuple(a["output_size"], r)},
            _TORCH_PARAMS["adaptive_pool"])
    _op([f"conv{_r}d"], "conv",
        lambda a, x, r=_r: {"stride": _settings._tuple(a["stride"], r),
                            "padding": _torch_pad_raw(a["padding"], r),
                            "dilation": _settings._tuple(a["dilation"], r),
                            "groups": int(a["groups"])},
        lambda a, x, r=_r: {"stride": _settings._tuple(a["stride"], r),
                            "padding": _settings._paddle_pad_value(a["padding"], r),
                            "dilation": _settings.same_dilation(
                                _settings._paddle_pad_value(a["padding"], r),
                                _settings._tuple(a["dilation"], r), r),
                            "groups": int(a["groups"])},
        _TORCH_PARAMS["conv"])
    _op([f"conv_transpose{_r}d", f"conv{_r}d_transpose"], "convtranspose",
        lambda a, x, r=_r: {"stride": _settings._tuple(a["stride"], r),
                            "padding": _torch_pad_raw(a["padding"], r),
                            "dilation": _settings._tuple(a["dilation"], r),
                            "groups": int(a["groups"]),
                            "output_padding": _settings._tuple(a["output_padding"], r)},
        lambda a, x, r=_r: {"stride": _settings._tuple(a["stride"], r),
                            "padding": _settings._paddle_pad_value(a["padding"], r),
                            "dilation": _settings._tuple(a["dilation"], r),
                            "groups": int(a["groups"]),
                            "output_padding": _settings._tuple(a["output_padding"], r)},
        _TORCH_PARAMS["conv_transpose"])

_op(["interpolate", "upsample"], "upsample",
    lambda a, x: _upsample(a["mode"], a.get("align_corners"), 0, a.get("antialias", False)),
    lambda a, x: _upsample(a["mode"], a.get("align_corners"), a.get("align_mode", 0)))
_op(["upsample_bilinear"], "upsample", lambda a, x: _upsample("bilinear", True), None)
_op(["upsample_nearest"], "upsample", lambda a, x: _upsample("nearest", False), None)
_op(["gelu"], "gelu",
    lambda a, x: {"approximate": str(a.get("approximate", "none"))},
    lambda a, x: {"approximate": "tanh" if a.get("approximate") in (True, "tanh") else "none"},
    _TORCH_PARAMS["gelu"])
_op(["layer_norm"], "layernorm",
    lambda a, x: {"epsilon": float(a["eps"]),
                  "normalized_shape": _settings._tuple(a["normalized_shape"], 1)},
    lambda a, x: {"epsilon": float(a["epsilon"]),
                  "normalized_shape": _settings._tuple(a["normalized_shape"], 1)})
_op(["group_norm"], "groupnorm",
    lambda a, x: {"epsilon": float(a["eps"]), "num_groups": int(a["num_groups"])},
    lambda a, x: {"epsilon": float(a["epsilon"]), "num_groups": int(a["num_groups"])})
_op(["batch_norm"], "batchnorm",
    lambda a, x: {"epsilon": float(a["eps"]), "momentum": float(a["momentum"]),
                  "statistics": _stats_torch(a["training"])},
    lambda a, x: {"epsilon": float(a["epsilon"]), "momentum": 1.0 - float(a["momentum"]),
                  "statistics": _stats_paddle(a["training"], a.get("use_global_stats"))})
_op(["instance_norm"], "instancenorm",
    lambda a, x: {"epsilon": float(a["eps"])}, lambda a, x: {"epsilon": float(a["eps"])})
_op(["normalize"], "normalize",
    lambda a, x: {"p": float(a["p"]), "axis": _axis(a["dim"], _ndim(x)),
                  "epsilon": float(a["eps"])},
    lambda a, x: {"p": float(a["p"]), "axis": _axis(a["axis"], _ndim(x)),
                  "epsilon": float(a["epsilon"])})
for _n, _k in (("softmax", "softmax"), ("log_softmax", "logsoftmax")):
    _op([_n], _k,
        lambda a, x: {"axis": _axis(_torch_implicit_dim(_ndim(x)) if a["dim"] is None
                                    else a["dim"], _ndim(x))},
        lambda a, x: {"axis": _axis(a["axis"], _ndim(x))})
_op(["dropout"], "dropout",
    lambda a, x: {"p": float(a["p"]), "mode": "upscale_in_train", "training": bool(a["training"])},
    lambda a, x: {"p": float(a["p"]), "mode": str(a["mode"]), "training": bool(a["training"])})
for _n in ("dropout1d", "dropout2d", "dropout3d", "alpha_dropout"):
    _op([_n], _n.replace("_", ""),
        lambda a, x: {"p": float(a["p"]), "training": bool(a["training"])},
        lambda a, x: {"p": float(a["p"]), "training": bool(a["training"])})
_op(["leaky_relu"], "leakyrelu",
    lambda a, x: {"negative_slope": float(a["negative_slope"])},
    lambda a, x: {"negative_slope": float(a["negative_slope"])})
_op(["hardsigmoid"], "hardsigmoid",
    lambda a, x: {"slope": 1.0 / 6.0, "offset": 0.5},
    lambda a, x: {"slope": float(a["slope"]), "offset": float(a["offset"])})
_op(["hardtanh"], "hardtanh",
    lambda a, x: {"min": float(a["min_val"]), "max": float(a["max_val"])},
    lambda a, x: {"min": float(a["min"]), "max": float(a["max"])})
# torch's ReLU6 layer is a Hardtanh (F.hardtanh), Paddle's calls F.relu6: one kind for both
_op(["relu6"], "hardtanh", lambda a, x: {"min": 0.0, "max": 6.0},
    lambda a, x: {"min": 0.0, "max": 6.0})
for _n in ("elu", "celu"):
    _op([_n], _n, lambda a, x: {"alpha": float(a["alpha"])},
        lambda a, x: {"alpha": float(a["alpha"])})
_op(["softplus"], "softplus",
    lambda a, x: {"beta": float(a["beta"]), "threshold": float(a["threshold"])},
    lambda a, x: {"beta": float(a["beta"]), "threshold": float(a["threshold"])},
    _TORCH_PARAMS["softplus"])
_op(["pad"], "pad",
    lambda a, x: {"padding": _trimmed_pad(a["pad"]), "mode": str(a["mode"]),
                  "value": float(a.get("value") or 0.0)},
    lambda a, x: {"padding": _paddle_pad_torch_order(a["pad"], _ndim(x),
                                                     bool(a.get("pad_from_left_axis", True))),
                  "mode": str(a["mode"]), "value": float(a.get("value") or 0.0)})
_op(["cross_entropy"], "crossentropy", lambda a, x: _ce_torch(a, x),
    lambda a, x: _ce_paddle(a, x))
_op(["nll_loss"], "nllloss",
    lambda a, x: dict(_loss_common(a), ignore_index=int(a["ignore_index"]),
                      weighted=a.get("weight") is not None),
    lambda a, x: dict(_loss_common(a), ignore_index=int(a["ignore_index"]),
                      weighted=a.get("weight") is not None))
for _n in ("mse_loss", "l1_loss"):
    _op([_n], _n.replace("_", ""), lambda a, x: _loss_common(a), lambda a, x: _loss_common(a))
for _n in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
    _op([_n], _n.replace("_", ""),
        lambda a, x: dict(_loss_common(a), weighted=a.get("weight") is not None,
                          pos_weighted=a.get("pos_weight") is not None),
        lambda a, x: dict(_loss_common(a), weighted=a.get("weight") is not None,
                          pos_weighted=a.get("pos_weight") is not None))
_op(["smooth_l1_loss"], "smoothl1loss",
    lambda a, x: dict(_loss_common(a), loss=f"smooth L1, beta {float(a.get('beta', 1.0)):g}"),
    lambda a, x: dict(_loss_common(a), loss=_smooth_l1_paddle(a)))
_op(["pixel_shuffle"], "pixelshuffle",
    lambda a, x: {"upscale_factor": int(a["upscale_factor"])},
    lambda a, x: {"upscale_factor": int(a["upscale_factor"])}, _TORCH_PARAMS["pixel_shuffle"])
_op(["pixel_unshuffle"], "pixelunshuffle",
    lambda a, x: {"downscale_factor": int(a["downscale_factor"])},
    lambda a, x: {"downscale_factor": int(a["downscale_factor"])},
    _TORCH_PARAMS["pixel_unshuffle"])
_op(["grid_sample"], "gridsample",
    lambda a, x: {"mode": str(a["mode"]), "padding_mode": str(a["padding_mode"]),
                  "align_corners": bool(a["align_corners"])},
    lambda a, x: {"mode": str(a["mode"]), "padding_mode": str(a["padding_mode"]),
                  "align_corners": bool(a["align_corners"])})
_op(["affine_grid"], "affinegrid",
    lambda a, x: {"align_corners": bool(a["align_corners"])},
    lambda a, x: {"align_corners": bool(a["align_corners"])})
_op(["cosine_similarity"], "cosinesimilarity",
    lambda a, x: {"axis": _axis(a["dim"], _ndim(x)), "eps": float(a["eps"])},
    lambda a, x: {"axis": _axis(a["axis"], _ndim(x)), "eps": float(a["eps"])},
    _TORCH_PARAMS["cosine_similarity"])
_op(["scaled_dot_product_attention"], _SDPA, _sdpa_torch, _sdpa_paddle,
    "query key value attn_mask=None dropout_p=0.0 is_causal=False scale=None enable_gqa=False")
_op(["embedding"], "embedding",
    lambda a, x: {"padding_idx": a["padding_idx"], "max_norm": a.get("max_norm")},
    lambda a, x: {"padding_idx": a["padding_idx"], "max_norm": a.get("max_norm")})

# kinds whose axis names a dimension of their input: the same only on inputs of one shape (a port
# that moved the classes last, and says so, computes the same loss)
_AXES = {"softmax": "axis", "logsoftmax": "axis", "normalize": "axis",
         "cosinesimilarity": "axis", "crossentropy": "class_axis"}


def _same_input(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.get("_shape") is None or b.get("_shape") is None or \
        tuple(a["_shape"]) == tuple(b["_shape"])


# (kind, setting) -> whether it changes anything for a pair of calls, from both calls' settings
_RELEVANT: dict[tuple[str, str], Callable[[Mapping[str, Any], Mapping[str, Any]], bool]] = {
    **{(k, s): _settings._RELEVANT[(k, s)] for k in ("avgpool", "maxpool")
       for s in ("padding", "ceil_mode", "count_include_pad") if (k, s) in _settings._RELEVANT},
    ("conv", "padding_mode"): _settings._RELEVANT[("conv", "padding_mode")],
    ("softmax", "axis"): lambda a, b: _settings._RELEVANT[("softmax", "axis")](a, b)
    and _same_input(a, b),
    ("logsoftmax", "axis"): lambda a, b: _settings._RELEVANT[("logsoftmax", "axis")](a, b)
    and _same_input(a, b),
    ("normalize", "axis"): _same_input,
    ("cosinesimilarity", "axis"): _same_input,
    ("crossentropy", "class_axis"): _same_input,
    ("pad", "value"): _settings._RELEVANT[("pad", "value")],
    # a fused attention's call out of training may not say its rate (``_sdpa_events``)
    ("dropout", "p"): lambda a, b: not a.get("_rate_unread") and not b.get("_rate_unread"),
    # a dropout of p 0 drops nothing, whatever its mode or whether it is on
    ("dropout", "mode"): lambda a, b: bool(a.get("p")) or bool(b.get("p")),
    ("dropout", "training"): lambda a, b: bool(a.get("p")) or bool(b.get("p")),
    # running statistics are updated by their momentum only where a side uses the batch's
    ("batchnorm", "momentum"): lambda a, b: "the batch's" in (a.get("statistics"),
                                                               b.get("statistics")),
    ("crossentropy", "ignore_index"): lambda a, b: not a.get("soft_label")
    and not b.get("soft_label"),
    ("upsample", "align_mode"): lambda a, b: not a.get("align_corners")
    and not b.get("align_corners"),
}
for _k in ("dropout1d", "dropout2d", "dropout3d", "alphadropout"):
    _RELEVANT[(_k, "training")] = _RELEVANT[("dropout", "training")]


def _axes(dim: Any, ndim: int) -> Any:
    """A reduction's axes as sorted non-negative ints, or "all" (None, or every axis named)."""
    if dim is None:
        return "all"
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return _plain(dim)
    out = tuple(sorted({d + ndim if d < 0 and ndim else d for d in dims}))
    return "all" if ndim and out == tuple(range(ndim)) else out


def _var_torch(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    dim, unbiased, correction = a.get("dim"), a.get("unbiased"), a.get("correction")
    if isinstance(dim, bool):  # the overload var(input, unbiased)
        dim, unbiased = None, dim
    if correction is None:
        correction = 0 if unbiased is False else 1
    return {"correction": float(correction), "axis": _axes(dim, _ndim(x))}


def _var_paddle(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    unbiased, correction = a.get("unbiased"), a.get("correction", 1)
    if unbiased is not None:  # paddle.var: unbiased, where given, over correction
        correction = 1 if unbiased else 0
    return {"correction": float(correction), "axis": _axes(a.get("axis"), _ndim(x))}


def _softmax_dim(a: Mapping[str, Any], x: Any) -> dict[str, Any]:
    # torch's rule for a missing dim, which paddle.softmax (the torch-compatible one) follows too
    nd = _ndim(x)
    dim = a.get("dim")
    return {"axis": _axis(_torch_implicit_dim(nd) if dim is None else dim, nd)}


_AXES.update({"var": "axis", "std": "axis"})
_RELEVANT.update({("var", "axis"): _same_input, ("std", "axis"): _same_input})

_LN_TORCH = "input normalized_shape weight=None bias=None eps=1e-05 cudnn_enable=True"
_VAR_TORCH = "input dim=None unbiased=None keepdim=False correction=None"
_SOFTMAX_TORCH = "input dim=None dtype=None"

# What model code calls as often outside the functional module: top-level functions and tensor
# methods (``attn.softmax(dim=-1)``, ``x.var(-1, unbiased=False)`` in a hand-written layer norm).
# (framework, owner, attribute, op, kind, normaliser, torch builtin parameters)
_SITES: list[tuple[str, str, str, str, str, _Norm, Optional[str]]] = [
    ("torch", "torch", "softmax", "softmax", "softmax", _softmax_dim, _SOFTMAX_TORCH),
    ("torch", "torch.Tensor", "softmax", "softmax", "softmax", _softmax_dim, _SOFTMAX_TORCH),
    ("torch", "torch", "log_softmax", "log_softmax", "logsoftmax", _softmax_dim, _SOFTMAX_TORCH),
    ("torch", "torch.Tensor", "log_softmax", "log_softmax", "logsoftmax", _softmax_dim,
     _SOFTMAX_TORCH),
    ("torch", "torch", "layer_norm", "layer_norm", "layernorm", _OPS["layer_norm"][1], _LN_TORCH),
    ("torch", "torch", "group_norm", "group_norm", "groupnorm", _OPS["group_norm"][1],
     "input num_groups weight=None bias=None eps=1e-05 cudnn_enabled=True"),
    ("paddle", "paddle", "softmax", "softmax", "softmax", _softmax_dim, None),
    ("paddle", "paddle.Tensor", "softmax", "softmax", "softmax", _softmax_dim, None),
    ("paddle", "paddle", "layer_norm", "layer_norm", "layernorm", _OPS["layer_norm"][2], None),
]
for _n in ("var", "std"):
    for _fw, _owners, _norm in (("torch", ("torch", "torch.Tensor"), _var_torch),
                                ("paddle", ("paddle", "paddle.Tensor"), _var_paddle)):
        for _owner in _owners:
            _SITES.append((_fw, _owner, _n, _n, _n, _norm, _VAR_TORCH))
    # torch's var_mean / std_mean against a port's var (or std) and mean
    _SITES.append(("torch", "torch", f"{_n}_mean", f"{_n}_mean", _n, _var_torch, _VAR_TORCH))

# a parameter's other name in Paddle's torch-compatible spellings (paddle.var(input=, dim=))
_ALIASES = {"input": "x", "x": "input", "dim": "axis", "axis": "dim"}


# what a layer's call says and its attributes do not: compared for pairs of two layers too
_DYNAMIC: dict[str, tuple[str, ...]] = {"attention": ("masked",)}
# kinds a model may hold once for all its blocks where the other holds one a block (Hugging
# Face's Llama computes its rotary embedding once in the model, PaddleNLP's in each attention)
_SHARED = frozenset({"rotary"})
_RELEVANT[("attention", "masked")] = lambda a, b: a.get("masked") != "none" or \
    b.get("masked") != "none"


def _masked_share(layer: Any, args: Any, kwargs: Mapping[str, Any], torch_side: bool) -> Any:
    """The share of attention positions an attention call's mask takes out, as each framework
    reads its mask: torch's boolean mask is True where a position is masked, Paddle's True where
    it is kept (the classic port bug passes the same array to both); an additive float mask
    masks where it is -inf (or below -1e4, as Paddle's ports write -1e9). "none" without one
    (torch's ``is_causal`` reads as the causal mask's share)."""
    import numpy as np

    names = (["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
              "average_attn_weights", "is_causal"] if torch_side
             else ["query", "key", "value", "attn_mask", "cache"])
    bound = dict(zip(names, tuple(args or ())))
    bound.update(kwargs)

    def taken_out(mask: Any, true_masks: bool) -> Any:
        a = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach")
                       else mask.numpy() if hasattr(mask, "numpy") else mask)
        if a.dtype == np.bool_:
            return a if true_masks else ~a
        return a.astype(np.float64) <= -1e4

    mask, padding = bound.get("attn_mask"), bound.get("key_padding_mask") if torch_side else None
    if mask is None and padding is None:
        if torch_side and bound.get("is_causal"):
            q = bound.get("query")
            n = int(q.shape[1 if getattr(layer, "batch_first", False) else 0])
            return round((n - 1) / (2 * n), 6) if n else "none"
        return "none"
    masked = None if mask is None else taken_out(mask, torch_side)
    if padding is not None:
        # torch's key_padding_mask (batch, keys) is True where a key is padding; a port folds it
        # into its one mask: the share is of the two together, per batch row
        pad = taken_out(padding, True)
        if masked is None:
            masked = pad
        elif masked.ndim == 2:
            masked = masked[None, :, :] | pad[:, None, :]
        else:  # (batch x heads, queries, keys)
            b = pad.shape[0]
            masked = masked.reshape(b, -1, *masked.shape[1:]) | pad[:, None, None, :]
    return round(float(masked.mean()), 6) if masked.size else "none"


# --- tracing -------------------------------------------------------------------------------------

_ACTIVE: set[str] = set()  # the frameworks being traced now: one trace each at a time


def _dropout_input(x: Any) -> dict[str, Any]:
    """What a dropout's input says of its role: its shape, and whether it holds attention
    probabilities (rank 3 at least, none negative, each last-axis row summing to 1: a softmax's
    output). Hugging Face's BERT drops its attention probabilities with a Dropout layer of its
    attention, Paddle's MultiHeadAttention with a rate it holds; by role the two pair, and a
    dropout the port alone holds (PaddleNLP's activation dropout, p 0) is not set against
    either."""
    out: dict[str, Any] = {"_shape": _shape(x)}
    if _ndim(x) >= 3:
        try:
            d = x.detach()
            out["_probs"] = bool(d.is_floating_point()) and float(d.min()) >= 0.0 and \
                float((d.sum(-1) - 1).abs().max()) < 1e-2
        except Exception:  # a tensor this cannot read says nothing of its role
            pass
    return out


def _layer_event_settings(layer: Any, read: tuple[str, dict[str, Any]], x: Any) -> dict[str, Any]:
    """A layer's settings as its call this time computes: the statistics it uses now, whether
    its dropout is on, its softmax axis for this input, its padding as a call's."""
    kind, out = read[0], dict(read[1])
    torch_side = _settings._framework(layer) == "torch"
    if kind == "batchnorm":
        if torch_side:
            uses_batch = layer.training or not layer.track_running_stats
            out["statistics"] = "the batch's" if uses_batch else "the running ones"
        else:
            g = getattr(layer, "_use_global_stats", None)
            if g is False and type(layer).__name__ == "BatchNorm":
                g = None  # the legacy layer's False is BatchNorm2D's None
            out["statistics"] = _stats_paddle(layer.training, g)
    elif kind.startswith("dropout") or kind == "alphadropout":
        out["training"] = bool(layer.training)
        out.update(_dropout_input(x))
    elif kind in ("softmax", "logsoftmax"):
        axis = out.get("axis")
        if axis is None and torch_side:
            axis = _torch_implicit_dim(_ndim(x))
        out["axis"] = _axis(axis, _ndim(x))
        out["_shape"] = _shape(x)
    elif kind == "pad" and isinstance(out.get("padding"), tuple):
        out["padding"] = _trimmed_pad(out["padding"])
    elif kind == "upsample":
        up = _upsample(out.get("mode"), out.get("align_corners"), out.get("align_mode", 0))
        out.update(up)
        out.pop("antialias", None)  # neither framework's layer has one
    return out


class SettingsTrace:
    """What ``trace_settings`` saw: ``events`` in the order they ran, and the calls it could not
    read (``unread``: one line each, the call itself went on unchanged)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.framework = _settings._framework(model)
        if self.framework not in ("torch", "paddle"):
            from ..errors import ReprodError

            raise ReprodError(f"trace_settings: {type(model).__name__} is neither a torch module "
                              "nor a Paddle layer")
        self.events: list[OpEvent] = []
        self.unread: list[str] = []
        self._names: dict[int, str] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._depth = 0
        self._thread = threading.get_ident()  # the thread that opened the trace
        # (owner, attribute, what it held, whether the owner held it itself, not by inheritance)
        self._saved: list[tuple[Any, str, Any, bool]] = []
        self._hooks: list[Any] = []
        self._base: Any = None
        self._sigs: dict[str, Optional[list[tuple[str, Any]]]] = {}

    # the functional module and the layer base class of the framework
    def _modules(self) -> tuple[Any, Any]:
        if self.framework == "torch":
            import torch

            return torch.nn.functional, torch.nn.Module
        import paddle

        return paddle.nn.functional, paddle.nn.Layer

    def _sites(self, functional: Any) -> list[tuple[Any, str, str, str, _Norm, Optional[str]]]:
        """Where to wrap: (owner, attribute, op, kind, normaliser, torch builtin parameters)."""
        side = 1 if self.framework == "torch" else 2
        out = [(functional, name, name, entry[0], entry[side], entry[3])
               for name, entry in _OPS.items() if entry[side] is not None]
        top = sys.modules[self.framework]
        owners = {self.framework: top, f"{self.framework}.Tensor": getattr(top, "Tensor", None)}
        for fw, owner, attr, op, kind, norm, params in _SITES:
            if fw == self.framework and owners.get(owner) is not None:
                out.append((owners[owner], attr, op, kind, norm, params))
        return out

    def _wrap(self, owner: Any, attr: str, wrapper: Any) -> None:
        own = attr in vars(owner)
        self._saved.append((owner, attr, getattr(owner, attr), own))
        setattr(owner, attr, wrapper)

    def __enter__(self) -> SettingsTrace:
        from ..errors import ReprodError

        self._thread = threading.get_ident()

        if self.framework in _ACTIVE:
            raise ReprodError(f"trace_settings: a {self.framework} trace is already running")
        functional, self._base = self._modules()
        named = self._named()
        self._names = {id(m): n for n, m in named}
        _ACTIVE.add(self.framework)
        try:
            wrappers: dict[int, Any] = {}  # each original's first wrapper, by identity
            for owner, attr, op, kind, norm, params in self._sites(functional):
                original = getattr(owner, attr, None)
                if original is None or not callable(original):
                    continue
                wrapper = self._wrapped(f"{getattr(owner, '__name__', owner)}.{attr}", op, kind,
                                        norm, params, original)
                wrappers.setdefault(id(original), (original, wrapper))
                self._wrap(owner, attr, wrapper)
            # a function the model's own modules imported by name (``from torch.nn.functional
            # import gelu``) is the original in their globals: the same wrapper there
            for mod in self._model_modules(named):
                for attr, value in list(vars(mod).items()):
                    hit = wrappers.get(id(value))
                    if hit is not None and hit[0] is value:
                        self._wrap(mod, attr, hit[1])
            for _, layer in named:
                self._wrap_held(layer, wrappers)
            for name, layer in named:
                read = _settings.read_settings(layer)
                if read is None:
                    continue
                try:
                    # an attention's mask comes as a keyword as often as not
                    hook = layer.register_forward_pre_hook(
                        self._pre_hook(name, read[0]),
                        **({"with_kwargs": True} if read[0] in _DYNAMIC else {}))
                except Exception as e:  # a compiled layer that takes no hook: said, not fatal
                    self.unread.append(f"{name or '(model)'} ({type(layer).__name__}): no "
                                       f"forward hook ({type(e).__name__}: {e})")
                    continue
                self._hooks.append(hook)
        except BaseException:  # nothing left wrapped or hooked
            self.__exit__(None, None, None)
            raise
        return self

    def _wrap_held(self, layer: Any, wrappers: Mapping[int, Any]) -> None:
        """A layer's own reference to a traced function, taken when it was built (Paddle's
        ``TransformerEncoderLayer.activation = getattr(F, "gelu")``, PaddleNLP GPT's
        ``self.activation = F.gelu``, Hugging Face's ``GELUActivation.act``), or a
        ``functools.partial`` of one: the wrapper there too, for the pass."""
        import functools

        for attr, value in list(vars(layer).items()):
            if attr.startswith("__"):
                continue
            hit = wrappers.get(id(value))
            if hit is not None and hit[0] is value:
                self._wrap(layer, attr, hit[1])
            elif isinstance(value, functools.partial):
                hit = wrappers.get(id(value.func))
                if hit is not None and hit[0] is value.func:
                    self._wrap(layer, attr, functools.partial(hit[1], *value.args,
                                                              **value.keywords))

    def _model_modules(self, named: Sequence[tuple[str, Any]]) -> list[Any]:
        """The Python modules defining the model's layer classes, the frameworks' own aside
        (their layers' calls are not events; paddle.vision's models are model code)."""
        out: dict[str, Any] = {}
        for _, layer in named:
            mod = type(layer).__module__
            if mod in out or mod in ("torch", "paddle") or (
                    mod.startswith(("torch.", "paddle.")) and not mod.startswith("paddle.vision.")):
                continue
            module = sys.modules.get(mod)
            if module is not None:
                out[mod] = module
        return list(out.values())

    def _named(self) -> list[tuple[str, Any]]:
        named = (self.model.named_modules() if self.framework == "torch"
                 else self.model.named_sublayers(include_self=True))
        return list(named)

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original, own in reversed(self._saved):
            if own:
                setattr(owner, attr, original)
            else:  # inherited (torch.Tensor's methods live on its C base): inherited again
                delattr(owner, attr)
        self._saved.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        _ACTIVE.discard(self.framework)

    def _pre_hook(self, name: str, kind: str) -> Callable[..., None]:
        def hook(layer: Any, inputs: Any, kwargs: Optional[Mapping[str, Any]] = None) -> None:
            if self._depth:
                return
            try:
                read = _settings.read_settings(layer)
                if read is None:
                    return
                x = inputs[0] if isinstance(inputs, tuple) and inputs else None
                found = _layer_event_settings(layer, read, x)
                if kind == "attention":
                    found["masked"] = _masked_share(layer, inputs, kwargs or {},
                                                    self.framework == "torch")
                label = name or "(model)"
                n = self._counts.get((label, ""), 0) + 1  # a layer called again: "pool#2"
                self._counts[(label, "")] = n
                self.events.append(OpEvent(kind, type(layer).__name__,
                                           label + (f"#{n}" if n > 1 else ""), True,
                                           {k: _plain(v) for k, v in found.items()}))
            except Exception as e:  # never the model's failure: the layer runs as it would
                self.unread.append(f"{name} ({type(layer).__name__}): {type(e).__name__}: {e}")
        return hook

    def _params(self, key: str, original: Any, text: Optional[str]
                ) -> Optional[list[tuple[str, Any]]]:
        if key not in self._sigs:
            params: Optional[list[tuple[str, Any]]]
            try:
                sig = inspect.signature(original)
                params = [(p.name, p.default) for p in sig.parameters.values()
                          if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                if not params and self.framework == "torch":
                    raise ValueError("no named parameters")  # max_pool2d(*args, **kwargs)
            except (TypeError, ValueError):
                params = _parse_params(text) if text else None
            self._sigs[key] = params
        return self._sigs[key]

    def _bound(self, key: str, original: Any, text: Optional[str], args: tuple[Any, ...],
               kwargs: Mapping[str, Any]) -> dict[str, Any]:
        params = self._params(key, original, text)
        if params is None:
            raise TypeError("its parameters cannot be read")
        names = [p for p, _ in params]
        if len(args) > len(names):
            raise TypeError(f"{len(args)} positional arguments for {len(names)} parameters")
        out = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names and _ALIASES.get(k) in names:
                k = _ALIASES[k]
            out[k] = v
        for p, default in params:
            if p not in out:
                if default is inspect.Parameter.empty:
                    raise TypeError(f"no {p!r}")
                out[p] = default
        return out

    def _where(self) -> tuple[str, bool, Any]:
        """The name of the module whose code made the call, whether it is a layer of a kind the
        layer settings read (whose own calls are not events), and the module."""
        f = sys._getframe(3)
        for _ in range(12):
            if f is None:
                break
            s = f.f_locals.get("self")
            if s is not None and isinstance(s, self._base) and id(s) not in self._names and \
                    _settings.read_settings(s) is not None:
                # a layer built in the forward pass (Hugging Face CodeGen's
                # ``nn.Softmax(dim=-1)(w)``): no layer of the model, its call is the caller's
                f = f.f_back
                continue
            if s is not None and isinstance(s, self._base):
                name = self._names.get(id(s))
                # a transformer layer's settings name its activation, not how it computes it;
                # a hand-written attention's name its head count, not its softmax or dropout
                read = _settings.read_settings(s)
                inside = read is not None and read[0] not in ("transformerlayer", "heads")
                if name is None:
                    return type(s).__name__, inside, s
                return name or "(model)", inside, s
            f = f.f_back
        return "(model)", False, None

    def _wrapped(self, key: str, op: str, kind: str, norm: _Norm, text: Optional[str],
                 original: Any) -> Callable[..., Any]:
        def traced(*args: Any, **kwargs: Any) -> Any:
            # the wrappers are global for the pass: another thread's calls are not the model's
            if threading.get_ident() != self._thread:
                return original(*args, **kwargs)
            if self._depth == 0:
                self._record(key, op, kind, norm, text, original, args, kwargs)
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        traced.__wrapped__ = original  # type: ignore[attr-defined]
        traced.__name__ = getattr(original, "__name__", op)
        traced.__doc__ = getattr(original, "__doc__", None)
        return traced

    def _record(self, key: str, op: str, kind: str, norm: _Norm, text: Optional[str],
                original: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        try:
            where, inside, caller = self._where()
            if inside:
                return
            bound = self._bound(key, original, text, args, kwargs)
            bound[_CALLER] = caller
            first = args[0] if args else next(iter(kwargs.values()), None)
            found = norm(bound, first)
            if kind in _AXES:
                found["_shape"] = _shape(first)
            elif kind == "dropout":
                found.update(_dropout_input(first))
            elif kind == "conv" and isinstance(found.get("padding"), str):
                # F.conv2d(x, w, padding="same"): explicit where no input size decides it
                weight = _shape(bound.get("weight"))
                rank = len(found["stride"]) if isinstance(found.get("stride"), tuple) else 0
                if weight is not None and len(weight) == rank + 2:
                    found["padding"] = _settings.explicit_padding(found, rank, weight[2:])
        except Exception as e:  # a call this cannot read runs as it would, and is said
            self.unread.append(f"{op}: {type(e).__name__}: {e}")
            return
        n = self._counts.get((where, op), 0) + 1
        self._counts[(where, op)] = n
        label = f"{where}:{op}" + (f"#{n}" if n > 1 else "")
        parts = found.items() if kind == _SDPA else ((kind, found),)
        for part, settings in parts:
            self.events.append(OpEvent(part, op, label if kind != _SDPA else f"{label}:{part}",
                                       False, {k: _plain(v) for k, v in settings.items()}))


def trace_settings(model: Any) -> SettingsTrace:
    """A context manager that traces, while it is open, the settings of each operation ``model``
    applies (its functional calls and its layers of a known kind), for ``compare_settings(...,
    traces=(torch_trace, paddle_trace))`` or ``save_settings(model, path, trace=trace)``.

    >>> with trace_settings(paddle_model) as trace:
    ...     paddle_model(x)
    >>> save_settings(paddle_model, "result/settings_paddle.json", trace=trace)
    """
    return SettingsTrace(model)


# --- comparing -----------------------------------------------------------------------------------


def _call_differences(kind: str, a: Mapping[str, Any], b: Mapping[str, Any]
                      ) -> list[tuple[str, Any, Any]]:
    out = []
    for setting in list(a) + [k for k in b if k not in a]:
        if setting not in a or setting not in b or setting.startswith("_"):
            continue  # "_shape": what a setting is read against, not one
        if _settings._same(a[setting], b[setting]):
            continue
        relevant = _RELEVANT.get((kind, setting))  # after: a pool's reads every input size
        if relevant is None or relevant(a, b):
            out.append((setting, a[setting], b[setting]))
    return out


def _by_name(xs: Sequence[OpEvent], ys: Sequence[OpEvent], sides: tuple[str, str]
             ) -> tuple[list[tuple[OpEvent, OpEvent]], str]:
    """Where the counts differ, the events of one name on both sides (a port that kept the
    reference's layer names), and the rest named: where the extra call is."""
    by = {e.name: e for e in ys}
    names = {e.name for e in xs}
    pairs = [(x, by[x.name]) for x in xs if x.name in by]
    if not pairs:
        return [], ""
    only = [(sides[0], [e.name for e in xs if e.name not in by]),
            (sides[1], [e.name for e in ys if e.name not in names])]
    said = [f"{', '.join(ns[:3])}{f' and {len(ns) - 3} more' if len(ns) > 3 else ''} in "
            f"{side} only" for side, ns in only if ns]
    return pairs, f"; {len(pairs)} paired by name, " + "; ".join(said)


_INSIDE_ATTENTION = "(attention)"  # the op of an attention's own dropout


def _with_attention_dropouts(events: Sequence[OpEvent]) -> list[OpEvent]:
    """The events, each attention's dropout of its weights after it as a dropout of its own: a
    hand-written attention applies that one as a Dropout layer (Hugging Face's BERT), which would
    otherwise pair with the port's next dropout."""
    out: list[OpEvent] = []
    for e in events:
        out.append(e)
        p = e.settings.get("dropout") if e.kind == "attention" else None
        # its rate held though 0: a port whose attention drops nothing, against the reference's
        # dropout of the attention's probabilities, is that one difference (else the reference's
        # paired with the port's next dropout, and its text named the wrong one)
        if isinstance(p, (int, float)) and not isinstance(p, bool):
            out.append(OpEvent("dropout", _INSIDE_ATTENTION, f"{e.name}:dropout", False,
                               {"p": float(p)}))
    return out


def _identity(e: OpEvent) -> bool:
    """A dropout of p 0, or a pool of one element, stride 1 and no padding: the identity."""
    if e.kind in ("avgpool", "maxpool"):
        st = e.settings
        return all(_settings._same(st.get(k), v) for k, v in
                   (("kernel_size", 1), ("stride", 1), ("padding", 0))) and \
            st.get("divisor_override") in (None, 1)
    return e.kind.replace("alpha", "").startswith("dropout") and not e.settings.get("p") \
        and not e.settings.get("_rate_unread")


def _free(e: OpEvent) -> bool:
    """A dropout that may go unpaired: the identity, or a fused call whose rate is unread."""
    return _identity(e) or bool(e.settings.get("_rate_unread"))


_BLOCK = re.compile(r"\.(\d+)(?=[.:#]|$)")


def _place(e: OpEvent) -> tuple[tuple[int, ...], bool]:
    """Where an event is: the numbers of the blocks it is in (``layers.1`` -> (1,)), and whether
    it is an attention's own dropout (a fused call's, or an attention layer's rate)."""
    return (tuple(int(d) for d in _BLOCK.findall(e.name.split(":", 1)[0])),
            e.op in (_INSIDE_ATTENTION, "scaled_dot_product_attention")
            or bool(e.settings.get("_probs")))


def _pair_cost(kind: str, x: OpEvent, y: OpEvent) -> float:
    """0 for two alike dropouts in the same place; a pair whose settings differ costs 1, more
    across blocks or between an attention's own dropout and another, and more than leaving both
    unpaired between one in a block and one outside any."""
    (xb, xa), (yb, ya) = _place(x), _place(y)
    cost = 1.0 if _call_differences(kind, x.settings, y.settings) else 0.0
    # one in a block and one outside any (timm's head dropout against a block's in a port
    # without one): dearer than leaving both alone
    outside = 2.0 if bool(xb) != bool(yb) else 0.0
    # inputs of other shapes (a port's dropout after its FFN activation, 4x wide, against the
    # reference's residual one): a little dearer, so of equal costs the like-shaped pair wins
    xs, ys = x.settings.get("_shape"), y.settings.get("_shape")
    shaped = 0.1 if xs is not None and ys is not None and tuple(xs) != tuple(ys) else 0.0
    return cost + (0.6 if xb != yb else 0.0) + (0.3 if xa != ya else 0.0) + outside + shaped


_POOLS = ("avgpool", "maxpool", "adaptiveavgpool", "adaptivemaxpool")


def _shape_of_pool(e: OpEvent) -> tuple[Any, ...]:
    st = e.settings
    return (st.get("kernel_size"), st.get("stride"), st.get("output_size"))


def _pools_aligned(xs: Sequence[OpEvent], ys: Sequence[OpEvent]
                   ) -> Optional[list[tuple[OpEvent, OpEvent]]]:
    """Pools of two passes whose counts differ, paired in call order by kernel and stride where
    one way only pairs every pool of the fewer side: timm's Res2Net pools its first block's last
    split (3x3, stride 1), which PaddleClas's does not, and the three pools after it pair with
    the port's three. None where no such pairing is alone (four like pools against three)."""
    n, m = len(xs), len(ys)
    a, b = [_shape_of_pool(e) for e in xs], [_shape_of_pool(e) for e in ys]
    # longest common subsequence, and how many ways reach it
    best = [[0] * (m + 1) for _ in range(n + 1)]
    ways = [[1] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            options = [(best[i - 1][j], ways[i - 1][j]), (best[i][j - 1], ways[i][j - 1])]
            if a[i - 1] == b[j - 1]:
                options.append((best[i - 1][j - 1] + 1, ways[i - 1][j - 1]))
            top = max(o[0] for o in options)
            best[i][j] = top
            # paths through both skips reach (i-1, j-1) twice: count it once
            total = sum(w for v, w in options if v == top)
            if best[i - 1][j] == top and best[i][j - 1] == top and best[i - 1][j - 1] == top:
                total -= ways[i - 1][j - 1]
            ways[i][j] = total
    if best[n][m] != min(n, m) or ways[n][m] != 1:
        return None
    pairs: list[tuple[OpEvent, OpEvent]] = []
    i, j = n, m
    while i and j:
        if a[i - 1] == b[j - 1] and best[i][j] == best[i - 1][j - 1] + 1:
            pairs.append((xs[i - 1], ys[j - 1]))
            i, j = i - 1, j - 1
        elif best[i - 1][j] == best[i][j]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _aligned(kind: str, xs: Sequence[OpEvent], ys: Sequence[OpEvent]
             ) -> list[tuple[Optional[OpEvent], Optional[OpEvent]]]:
    """The dropouts of both passes aligned in call order where their counts differ: the fewest
    differences, a dropout of p 0 left unpaired for nothing (a port may hold one where the
    reference has none), any other left unpaired for more than a pair whose settings differ in
    one block. So a port's dropout set to 0, or one it lacks, is one difference where it is,
    not a kind whose counts differ and which nothing then compared (MBart's 22 dropouts against
    16); PaddleNLP's OPT dropout after the embeddings, which Hugging Face's has not, is named
    there, not paired with a p 0 of the next block."""
    n, m = len(xs), len(ys)
    skip = [0.01 if _free(e) else 1.5 for e in xs], [0.01 if _free(e) else 1.5 for e in ys]
    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            c = cost[i][j]
            if c == inf:
                continue
            if i < n and c + skip[0][i] < cost[i + 1][j]:
                cost[i + 1][j] = c + skip[0][i]
            if j < m and c + skip[1][j] < cost[i][j + 1]:
                cost[i][j + 1] = c + skip[1][j]
            if i < n and j < m:
                d = c + _pair_cost(kind, xs[i], ys[j])
                if d < cost[i + 1][j + 1]:
                    cost[i + 1][j + 1] = d
    out: list[tuple[Optional[OpEvent], Optional[OpEvent]]] = []
    i, j = n, m
    while i or j:
        c = cost[i][j]
        if i and j and c == cost[i - 1][j - 1] + _pair_cost(kind, xs[i - 1], ys[j - 1]):
            out.append((xs[i - 1], ys[j - 1]))
            i, j = i - 1, j - 1
        elif i and c == cost[i - 1][j] + skip[0][i - 1]:
            out.append((xs[i - 1], None))
            i -= 1
        else:
            out.append((None, ys[j - 1]))
            j -= 1
    return out[::-1]


def _shifted(kind: str, xs: Sequence[OpEvent], ys: Sequence[OpEvent]) -> bool:
    """Whether as many dropouts on both sides pair better aligned than in order: a port with
    one the reference lacks at one end and none where the reference has one at the other
    (PaddleClas's Swin drops after its patch embedding, timm's before its head), which in order
    pairs every dropout with the next one's counterpart."""
    if not xs:
        return False
    in_order = sum(_pair_cost(kind, x, y) for x, y in zip(xs, ys))
    if in_order < 1.0:
        return False
    aligned = sum(_pair_cost(kind, x, y) if x is not None and y is not None else
                  (0.01 if _free(x or y) else 1.5)  # type: ignore[arg-type]
                  for x, y in _aligned(kind, xs, ys))
    return aligned < in_order - 0.5


def _lone(kind: str, e: OpEvent, side: int, sides: tuple[str, str]) -> _settings.SettingDiff:
    """A dropout one pass applies and the other has none for, as a difference of its rate."""
    none = f"{_settings.NONE_FOR}{sides[side]} {e.name})"
    p, nothing = e.settings.get("p"), _settings._NOTHING
    if side == 0:
        return _settings.SettingDiff(e.name, none, "p", p, nothing, kind, sides)
    return _settings.SettingDiff(none, e.name, "p", nothing, p, kind, sides)


def compare_events(ours: Sequence[OpEvent], theirs: Sequence[OpEvent],
                   sides: tuple[str, str] = ("torch", "Paddle"),
                   layer_kinds: Collection[str] = ()
                   ) -> tuple[list[_settings.SettingDiff], list[str], int, set[str], int]:
    """The differing settings of the paired events (each kind by order, where both sides have as
    many; else the events of one name on both sides, and the others said) that are not two
    layers, the kinds that could not be paired, the pairs with a call compared, the kinds
    paired here, and the pairs of two layers compared here. ``layer_kinds``: kinds the layer
    settings left to the calls (a layer called three times against three layers; those without
    parameters, in call order), whose pairs of two layers are compared here."""
    kinds: dict[str, tuple[list[OpEvent], list[OpEvent]]] = {}
    for side, events in ((0, ours), (1, theirs)):
        for e in _with_attention_dropouts(events):
            kinds.setdefault(e.kind, ([], []))[side].append(e)
    heads = kinds.get("heads")
    if heads is not None and not (heads[0] and heads[1]):
        # a hand-written attention on one side, the framework's own on the other: head counts
        # compare (as ``settings._by_definition`` pairs them)
        for side in (0, 1):
            if not heads[side]:
                heads[side].extend(
                    dataclasses.replace(e, kind="heads",
                                        settings={"num_heads": e.settings["num_heads"]})
                    for e in kinds.get("attention", ([], []))[side] if "num_heads" in e.settings)
    diffs: list[_settings.SettingDiff] = []
    unpaired: list[str] = []
    compared = layers = 0
    paired: set[str] = set()
    for kind, (xs, ys) in kinds.items():
        if kind not in layer_kinds and kind not in _DYNAMIC and not any(
                not e.layer for e in xs + ys):
            continue  # layers only: the layer settings' pairs
        if kind == "heads" and len(xs) != len(ys):
            continue  # read from classes named so: where they do not pair, nothing is known
        if len(xs) != len(ys):
            # a dropout of p 0 is the identity: a port may hold one where the reference has none
            # (PaddleNLP's activation dropout), and pairing goes on without them; so is a pool
            # of one element (PaddleClas's ResNeSt pools its first block's shortcut so)
            kept = [e for e in xs if not _identity(e)], [e for e in ys if not _identity(e)]
            if len(kept[0]) == len(kept[1]) and kept[0]:
                xs, ys = kept
        pairs = list(zip(xs, ys))
        if len(xs) != len(ys) and kind in _SHARED and 1 in (len(xs), len(ys)):
            # one layer serving every block against one a block: each is set against it
            pairs = [(x, y) for x in xs for y in ys]
        elif kind == "dropout" and (len(xs) != len(ys) or _shifted(kind, xs, ys)):
            pairs = []
            for x, y in _aligned(kind, xs, ys):
                if x is not None and y is not None:
                    pairs.append((x, y))
                elif not _free(x or y):  # type: ignore[arg-type]
                    diffs.append(_lone(kind, x or y, 0 if y is None else 1, sides))  # type: ignore[arg-type]
            paired.add(kind)
        elif len(xs) != len(ys):
            pairs, left = _by_name(xs, ys, sides)
            aligned = _pools_aligned(xs, ys) if kind in _POOLS and not pairs else None
            if aligned is not None:
                pairs = aligned
                alone = [(sides[k], [e.name for e in es if all(e is not p[k] for p in pairs)])
                         for k, es in ((0, xs), (1, ys))]
                left = "; paired by kernel and stride, " + "; ".join(
                    f"{', '.join(ns[:3])}{f' and {len(ns) - 3} more' if len(ns) > 3 else ''} "
                    f"in {side} only" for side, ns in alone if ns)
            unpaired.append(f"{kind} (calls and layers): {len(xs)} in {sides[0]}, "
                            f"{len(ys)} in {sides[1]}" + left)
            if not pairs:
                continue
        else:
            paired.add(kind)
        for x, y in pairs:
            dynamic = _DYNAMIC.get(kind, ())
            if x.layer and y.layer and kind not in layer_kinds and not dynamic:
                continue
            if x.op == y.op == _INSIDE_ATTENTION:
                continue  # the attentions' own settings compare their rates
            if x.layer and y.layer:
                layers += kind in layer_kinds  # else the layer settings counted them
            else:
                compared += 1
            for setting, xv, yv in _call_differences(kind, x.settings, y.settings):
                if x.layer and y.layer and kind not in layer_kinds and setting not in dynamic:
                    continue  # the layer settings compared it
                diffs.append(_settings.SettingDiff(x.name, y.name, setting, xv, yv, kind, sides))
    return diffs, unpaired, compared, paired, layers
