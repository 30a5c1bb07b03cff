"""The settings of paired layers: what a layer computes beyond its weights.

A port can hold every weight right and still compute another function: a BatchNorm's epsilon, a
convolution's stride or dilation, a pool's ``ceil_mode``, a dropout's scaling mode, GELU's
approximation. Most of these show in the values; some do not, or not in the mode aligned. A
BatchNorm epsilon of 1e-6 for 1e-5 in one middle layer of resnet18 moves its outputs by less than
float32 rounding: measured, ``align_train(calibrate=True)`` passed it on torchvision's resnet18
against paddle.vision's, where this check names it. A BatchNorm momentum, or a dropout's mode,
changes nothing in an evaluation-mode forward pass and everything in training.

Layers with parameters are paired through their parameters (the conversion rules, or by order);
layers without (pools, dropout, activations, upsampling) by order within their kind, where both
models have as many. Each pair's settings are read from the torch module's attributes and the
Paddle layer's and compared after normalising the two spellings (Paddle's momentum is
``1 - torch's``; ``exclusive`` is ``not count_include_pad``; a stride of ``None`` is the kernel).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["SettingDiff", "SettingsReport", "compare_settings", "settings_checked", "with_finding"]


@dataclass(frozen=True)
class SettingDiff:
    """One setting that differs between a torch layer and the Paddle layer paired with it."""

    torch_layer: str
    paddle_layer: str
    setting: str
    torch_value: Any
    paddle_value: Any
    kind: str  # the layers' kind: "batchnorm", "conv", "maxpool", ...

    @property
    def key(self) -> str:
        return f"settings/{self.paddle_layer}/{self.setting}"

    def line(self) -> str:
        where = (self.paddle_layer if self.paddle_layer == self.torch_layer else
                 f"{self.paddle_layer} (torch {self.torch_layer})")
        return (f"{where}: {self.setting} {_show(self.torch_value)} in torch, "
                f"{_show(self.paddle_value)} in Paddle")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, str) else str(value)


# --- kinds ---------------------------------------------------------------------------------------

_DIMS = re.compile(r"([123])d")


def _kind(cls_name: str) -> tuple[Optional[str], int]:
    """The kind of a layer class and its spatial rank (0 where none is implied)."""
    n = cls_name.lower()
    m = _DIMS.search(n)
    rank = int(m.group(1)) if m else 0
    base = _DIMS.sub("", n)
    if base in ("conv", "convtranspose", "conv_transpose"):
        return ("convtranspose" if "transpose" in base else "conv"), rank
    if base in ("batchnorm", "syncbatchnorm"):
        return "batchnorm", rank
    if base in ("maxpool", "avgpool", "adaptiveavgpool", "adaptivemaxpool", "instancenorm"):
        return base, rank
    if n in ("layernorm", "groupnorm", "embedding", "leakyrelu", "gelu", "hardtanh", "elu",
             "softplus", "softmax", "logsoftmax", "upsample", "upsamplingbilinear2d",
             "upsamplingnearest2d"):
        return n, 0
    if n in ("dropout", "dropout2d", "dropout3d", "alphadropout"):
        return n, 0
    return None, rank


# kinds paired by order (no parameters to pair them by)
_BY_ORDER = ("maxpool", "avgpool", "adaptiveavgpool", "adaptivemaxpool", "dropout", "dropout2d",
             "dropout3d", "leakyrelu", "gelu", "hardtanh", "elu", "softplus", "softmax",
             "logsoftmax", "upsample")


def _tuple(value: Any, rank: int) -> Any:
    """An int or a sequence as a tuple of ``rank`` ints (a sequence of another length as is)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        out = tuple(int(v) if isinstance(v, (int, float)) and float(v).is_integer() else v
                    for v in value)
        return out[0:1] * rank if len(out) == 1 and rank > 1 else out
    if isinstance(value, (int, float)) and rank:
        return (int(value),) * rank if float(value).is_integer() else (value,) * rank
    return value


def _paddle_padding(p: Any, rank: int) -> Any:
    algorithm = str(getattr(p, "_padding_algorithm", "EXPLICIT") or "EXPLICIT").upper()
    if algorithm in ("SAME", "VALID"):
        return algorithm.lower()
    pad = getattr(p, "_updated_padding", None)
    if pad is None:
        pad = p._padding
    if isinstance(pad, str):
        return pad.lower()
    if isinstance(pad, (list, tuple)) and len(pad) == 2 * rank and rank:
        pairs = [tuple(pad[2 * i:2 * i + 2]) for i in range(rank)]
        if all(a == b for a, b in pairs):  # [top, bottom, left, right], symmetric
            return tuple(int(a) for a, _ in pairs)
        return tuple(int(v) for v in pad)
    return _tuple(pad, rank)


def _torch_padding(t: Any, rank: int) -> Any:
    pad = t.padding
    return pad.lower() if isinstance(pad, str) else _tuple(pad, rank)


def _statistics_torch(t: Any) -> str:
    return "batch in training, running in eval" if t.track_running_stats else "always the batch's"


def _statistics_paddle(p: Any) -> str:
    g = getattr(p, "_use_global_stats", None)
    # the legacy paddle.nn.BatchNorm says False for what BatchNorm2D says None: the running
    # statistics in evaluation (its is_test)
    if g is None or (g is False and type(p).__name__ == "BatchNorm"):
        return "batch in training, running in eval"
    return "always the running ones" if g else "always the batch's"


def _momentum_torch(t: Any) -> Any:
    return "a cumulative average (None)" if t.momentum is None else float(t.momentum)


def _pool_kernel_paddle(p: Any) -> Any:
    return getattr(p, "ksize", getattr(p, "kernel_size", None))


def _pool_stride(kernel: Any, stride: Any) -> Any:
    return kernel if stride is None or stride == () or stride == [] else stride


def _padded(pad: Any) -> bool:
    """Whether a padding pads (a string one, "same", may)."""
    if isinstance(pad, str):
        return pad != "valid"
    if isinstance(pad, (list, tuple)):
        return any(_padded(v) for v in pad)
    return bool(pad)


_Getter = Callable[[Any, int], Any]
# kind -> [(setting, torch getter, Paddle getter[, whether it matters for the pair])], each
# getter given the layer and its rank: a setting that changes nothing here (the padding mode of
# a convolution without padding) is not compared
_SETTINGS: dict[str, list[tuple[Any, ...]]] = {
    "conv": [
        ("stride", lambda t, r: _tuple(t.stride, r), lambda p, r: _tuple(p._stride, r)),
        ("padding", _torch_padding, _paddle_padding),
        ("dilation", lambda t, r: _tuple(t.dilation, r), lambda p, r: _tuple(p._dilation, r)),
        ("groups", lambda t, r: int(t.groups), lambda p, r: int(p._groups)),
        ("padding_mode", lambda t, r: t.padding_mode, lambda p, r: p._padding_mode,
         lambda t, p, r: _padded(_torch_padding(t, r)) or _padded(_paddle_padding(p, r))),
    ],
    "batchnorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
        ("momentum", lambda t, r: _momentum_torch(t), lambda p, r: 1.0 - float(p._momentum)),
        ("statistics", lambda t, r: _statistics_torch(t), lambda p, r: _statistics_paddle(p)),
    ],
    "layernorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
        ("normalized_shape", lambda t, r: _tuple(t.normalized_shape, 0),
         lambda p, r: _tuple(p._normalized_shape, 0)),
    ],
    "groupnorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
        ("num_groups", lambda t, r: int(t.num_groups), lambda p, r: int(p._num_groups)),
    ],
    "instancenorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
    ],
    "embedding": [
        ("padding_idx", lambda t, r: t.padding_idx,
         lambda p, r: None if p._padding_idx in (None, -1) else int(p._padding_idx)),
    ],
    "maxpool": [
        ("kernel_size", lambda t, r: _tuple(t.kernel_size, r),
         lambda p, r: _tuple(_pool_kernel_paddle(p), r)),
        ("stride", lambda t, r: _tuple(_pool_stride(t.kernel_size, t.stride), r),
         lambda p, r: _tuple(_pool_stride(_pool_kernel_paddle(p), p.stride), r)),
        ("padding", lambda t, r: _tuple(t.padding, r), lambda p, r: _tuple(p.padding, r)),
        ("dilation", lambda t, r: _tuple(t.dilation, r), lambda p, r: _tuple(1, r)),
        ("ceil_mode", lambda t, r: bool(t.ceil_mode), lambda p, r: bool(p.ceil_mode)),
    ],
    "avgpool": [
        ("kernel_size", lambda t, r: _tuple(t.kernel_size, r),
         lambda p, r: _tuple(_pool_kernel_paddle(p), r)),
        ("stride", lambda t, r: _tuple(_pool_stride(t.kernel_size, t.stride), r),
         lambda p, r: _tuple(_pool_stride(_pool_kernel_paddle(p), p.stride), r)),
        ("padding", lambda t, r: _tuple(t.padding, r), lambda p, r: _tuple(p.padding, r)),
        ("ceil_mode", lambda t, r: bool(t.ceil_mode), lambda p, r: bool(p.ceil_mode)),
        ("count_include_pad", lambda t, r: bool(getattr(t, "count_include_pad", True)),
         lambda p, r: not bool(getattr(p, "exclusive", True)),
         # windows over padding only: explicit, or past the edge with ceil_mode
         lambda t, p, r: _padded(_tuple(t.padding, r)) or _padded(_tuple(p.padding, r))
         or bool(t.ceil_mode) or bool(p.ceil_mode)),
        ("divisor_override", lambda t, r: getattr(t, "divisor_override", None),
         lambda p, r: getattr(p, "divisor", None)),
    ],
    "adaptiveavgpool": [
        ("output_size", lambda t, r: _tuple(t.output_size, r),
         lambda p, r: _tuple(p._output_size, r)),
    ],
    "dropout": [
        ("p", lambda t, r: float(t.p), lambda p, r: float(p.p)),
        # torch scales the kept values by 1 / (1 - p) in training and nothing in evaluation
        ("mode", lambda t, r: "upscale_in_train", lambda p, r: str(p.mode),
         lambda t, p, r: float(t.p) > 0 or float(p.p) > 0),
    ],
    "dropout2d": [("p", lambda t, r: float(t.p), lambda p, r: float(p.p))],
    "dropout3d": [("p", lambda t, r: float(t.p), lambda p, r: float(p.p))],
    "leakyrelu": [("negative_slope", lambda t, r: float(t.negative_slope),
                   lambda p, r: float(p._negative_slope))],
    "gelu": [("approximate", lambda t, r: str(getattr(t, "approximate", "none")),
              lambda p, r: "tanh" if p._approximate else "none")],
    "hardtanh": [("min", lambda t, r: float(t.min_val), lambda p, r: float(p._min)),
                 ("max", lambda t, r: float(t.max_val), lambda p, r: float(p._max))],
    "elu": [("alpha", lambda t, r: float(t.alpha), lambda p, r: float(p._alpha))],
    "softplus": [("beta", lambda t, r: float(t.beta), lambda p, r: float(p._beta)),
                 ("threshold", lambda t, r: float(t.threshold), lambda p, r: float(p._threshold))],
    "softmax": [("axis", lambda t, r: t.dim, lambda p, r: p._axis)],
    "logsoftmax": [("axis", lambda t, r: t.dim, lambda p, r: p._axis)],
    "upsample": [
        ("mode", lambda t, r: str(t.mode), lambda p, r: str(p.mode)),
        ("align_corners", lambda t, r: bool(t.align_corners),
         lambda p, r: bool(p.align_corners)),
        # Paddle's align_mode 1 samples (0, 1, ...) where torch samples pixel centres
        ("align_mode", lambda t, r: 0, lambda p, r: int(getattr(p, "align_mode", 0))
         if str(p.mode) in ("linear", "bilinear", "trilinear") and not p.align_corners else 0),
        ("scale_factor", lambda t, r: t.scale_factor, lambda p, r: p.scale_factor),
        ("size", lambda t, r: t.size, lambda p, r: p.size),
    ],
}
_SETTINGS["adaptivemaxpool"] = _SETTINGS["adaptiveavgpool"]
_SETTINGS["convtranspose"] = _SETTINGS["conv"] + [
    ("output_padding", lambda t, r: _tuple(t.output_padding, r),
     lambda p, r: _tuple(p.output_padding, r)),
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        # Paddle keeps some attributes in float32: 1e-5 reads back as 9.99999974e-06
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _leaves(model: Any, children: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model if name and not any(True for _ in children(m))]


def _pairs(torch_model: Any, paddle_model: Any, torch_to_paddle: Mapping[str, str]
           ) -> tuple[list[tuple[str, Any, str, Any]], list[str]]:
    """(torch name, module, Paddle name, layer) for each pair, and the kinds left unpaired."""
    t_leaves = _leaves(torch_model.named_modules(), lambda m: m.children())
    p_leaves = _leaves(paddle_model.named_sublayers(), lambda m: m.children())
    p_by_name = dict(p_leaves)
    pairs: list[tuple[str, Any, str, Any]] = []
    layer_of = {t.rpartition(".")[0]: p.rpartition(".")[0] for t, p in torch_to_paddle.items()}
    for name, module in t_leaves:
        kind, _ = _kind(type(module).__name__)
        if kind is None or kind in _BY_ORDER:
            continue
        pname = layer_of.get(name)
        if pname is not None and pname in p_by_name:
            pairs.append((name, module, pname, p_by_name[pname]))
    unpaired: list[str] = []
    for kind in _BY_ORDER:
        ts = [(n, m) for n, m in t_leaves if _kind(type(m).__name__)[0] == kind]
        ps = [(n, m) for n, m in p_leaves if _kind(type(m).__name__)[0] == kind]
        if len(ts) != len(ps):
            unpaired.append(f"{kind}: {len(ts)} in torch, {len(ps)} in Paddle")
            continue
        pairs.extend((tn, tm, pn, pm) for (tn, tm), (pn, pm) in zip(ts, ps))
    return pairs, unpaired


@dataclass(frozen=True)
class SettingsReport:
    """``compare_settings``'s answer: the settings that differ, and the kinds of layer without
    parameters that could not be paired by order (other counts: a model that applies them as
    functions, whose settings then go unchecked)."""

    differ: tuple[SettingDiff, ...]
    unpaired: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.differ

    def __str__(self) -> str:
        lines = [d.line() for d in self.differ] or ["every paired layer's settings agree"]
        lines += [f"not paired by order: {u}" for u in self.unpaired]
        return "\n".join(lines)


def compare_settings(torch_model: Any, paddle_model: Any, *, rules: Any = None,
                     by_order: bool = False,
                     torch_to_paddle: Optional[Mapping[str, str]] = None) -> SettingsReport:
    """The settings that differ between the paired layers of a torch model and its Paddle port.

    Layers with parameters pair through them: under the conversion ``rules`` (the default
    ones where None), by definition order with ``by_order``, or through ``torch_to_paddle``
    (torch parameter name -> Paddle parameter name) where given. A setting one side cannot be
    read for (an attribute another version names otherwise) is left out.

    >>> print(compare_settings(torch_model, paddle_model, by_order=True))
    layer3.0.bn1: epsilon 1e-05 in torch, 1e-06 in Paddle
    """
    if torch_to_paddle is None:
        from .by_order import by_order_rules
        from .framework import _torch_params_plan

        if by_order:
            rules = by_order_rules(torch_model, paddle_model, rules=rules)
        plan = _torch_params_plan(torch_model, rules)
        torch_to_paddle = {n: kp.paddle_name for n, kp in plan.items() if kp.paddle_name}
    pairs, unpaired = _pairs(torch_model, paddle_model, torch_to_paddle)
    diffs: list[SettingDiff] = []
    for tname, tmod, pname, pmod in pairs:
        kind, rank = _kind(type(tmod).__name__)
        pkind, prank = _kind(type(pmod).__name__)
        if kind is None or kind != pkind:
            continue
        rank = rank or prank
        for setting, from_torch, from_paddle, *relevant in _SETTINGS.get(kind, ()):
            try:
                if relevant and not relevant[0](tmod, pmod, rank):
                    continue
                tv, pv = from_torch(tmod, rank), from_paddle(pmod, rank)
            except (AttributeError, TypeError, ValueError):
                continue
            if not _same(tv, pv):
                diffs.append(SettingDiff(tname, pname, setting, tv, pv, kind))
    return SettingsReport(tuple(diffs), tuple(unpaired))


def settings_checked(result: Any, torch_model: Any, paddle_model: Any,
                     torch_to_paddle: Mapping[str, str]) -> Any:
    """``result`` with a failing key ``settings/<Paddle layer>/<setting>`` (status
    ``"setting"``) for each setting that differs, after the value keys, and
    ``options["settings"]``: the differences' lines, and the kinds that could not be paired."""
    import dataclasses

    from ..diff.result import KeyResult

    report = compare_settings(torch_model, paddle_model, torch_to_paddle=torch_to_paddle)
    diffs = report.differ
    info: dict[str, Any] = {"differ": [d.line() for d in diffs]}
    if report.unpaired:
        info["unpaired"] = list(report.unpaired)
    extra = tuple(KeyResult(key=d.key, passed=False, status="setting",
                            reason=f"{d.line()}: the layers compute other functions")
                  for d in diffs)
    return dataclasses.replace(result, results=tuple(result.results) + extra,
                               options=dict(result.options, settings=info))


def values_failed(result: Any) -> bool:
    """Whether a key other than a setting fails: what localisation has to look for."""
    return any(not kr.passed and not kr.key.startswith("settings/") for kr in result.results)


def with_finding(result: Any, verbose: bool = False) -> Any:
    """``result`` with the settings that differ as its last finding (``options["findings"]``),
    printed with ``verbose``."""
    import dataclasses

    lines = (result.options.get("settings") or {}).get("differ") or []
    if not lines:
        return result
    shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
    line = (f"{len(lines)} layer setting{'s' if len(lines) > 1 else ''} of the port differ"
            f"{'s' if len(lines) == 1 else ''} from the reference's, whatever the values say: "
            f"{shown}")
    if verbose:
        print(line, flush=True)
    # after where the values first differ (localisation's findings), which a setting may cause
    findings = [f for f in result.options.get("findings", ()) if f != line] + [line]
    return dataclasses.replace(result, options=dict(result.options, findings=findings))
