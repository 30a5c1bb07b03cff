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

import dataclasses
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .rules import class_names, is_hf_conv1d, number_attr

__all__ = ["SettingDiff", "SettingsReport", "compare_settings", "layer_settings", "read_settings",
           "save_settings", "settings_checked", "with_finding"]


@dataclass(frozen=True)
class SettingDiff:
    """One setting that differs between a torch layer and the Paddle layer paired with it."""

    torch_layer: str
    paddle_layer: str
    setting: str
    torch_value: Any
    paddle_value: Any
    kind: str  # the layers' kind: "batchnorm", "conv", "maxpool", ...
    sides: tuple[str, str] = ("torch", "Paddle")  # what the two are, as the line names them

    @property
    def key(self) -> str:
        return f"settings/{self.paddle_layer}/{self.setting}"

    def line(self) -> str:
        ref, other = self.sides
        where = (self.paddle_layer if self.paddle_layer == self.torch_layer else
                 f"{self.paddle_layer} ({ref} {self.torch_layer})")
        if self.paddle_layer.startswith(NONE_FOR):  # a layer or call one side alone applies
            where = f"{self.torch_layer} ({ref} only)"
        elif self.torch_layer.startswith(NONE_FOR):
            where = f"{self.paddle_layer} ({other} only)"
        if self.setting == "momentum" and other == "Paddle" and \
                isinstance(self.paddle_value, float):
            # compared in torch's convention, shown in each side's own: the generated code says
            # momentum=0.1 where torch's 0.1 needs Paddle's 0.9
            t = self.torch_value
            return (f"{where}: momentum {_show_value(t)} in {ref}, {1.0 - self.paddle_value:g} "
                    f"in {other}, where it weighs the running statistics and {ref}'s the batch"
                    + (f": {ref}'s {t:g} is {other}'s {1.0 - t:g}" if isinstance(t, float)
                       else ""))
        return (f"{where}: {self.setting} {_show_value(self.torch_value)} in {ref}, "
                f"{_show_value(self.paddle_value)} in {other}" + _MEANING.get(self.setting, ""))


NONE_FOR = "(none for "  # the name of the side a difference has no layer on: "(none for torch x)"
_NOTHING = "no dropout"  # the value of a dropout on the side without it


def _show_value(value: Any) -> str:
    return value if value == _NOTHING else _show(value)


# what a setting whose name does not say it means
_MEANING = {"correction": " (the variance divides by n - correction: unbiased is 1)",
            "padding_idx": (" (the row that gets no gradient; Paddle's also reads as zeros "
                            "whatever the row holds, torch's as the row)"),
            "masked": (" (the share of attention positions the mask takes out: torch's boolean "
                       "mask is True where masked, Paddle's True where kept)")}


def _show(value: Any) -> str:
    if isinstance(value, Undilated):
        return value.shown()
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
    if base in _PAD_MODES or base == "pad":
        return "pad", rank
    if n.endswith(("rmsnorm", "t5layernorm")):
        # torch's RMSNorm, Hugging Face's and PaddleNLP's LlamaRMSNorm and T5LayerNorm, and those
        # copying it (MT5LayerNorm, UMT5LayerNorm, LongT5LayerNorm): no mean taken, no bias
        return "rmsnorm", 0
    if n in ("layernorm", "groupnorm", "embedding", "leakyrelu", "gelu", "hardtanh", "elu",
             "softplus", "softmax", "logsoftmax", "upsample", "upsamplingbilinear2d",
             "upsamplingnearest2d", "pixelshuffle", "pixelunshuffle", "channelshuffle", "flatten",
             "celu", "hardshrink", "softshrink"):
        return n, 0
    if n in ("dropout", "dropout2d", "dropout3d", "alphadropout"):
        return n, 0
    if n == "timesteps":  # diffusers' and ppdiffusers' sinusoidal timestep embedding
        return "timesteps", 0
    if n.endswith("droppath") or n == "stochasticdepth":
        # stochastic depth: timm's and PaddleClas's DropPath, Hugging Face's ConvNextDropPath...,
        # torchvision's StochasticDepth
        return "droppath", 0
    if n in _HF_GELU:
        return "gelu", 0
    if n.endswith("rotaryembedding"):  # Llama's, and the models' that copy it
        return "rotary", 0
    if n in _RNN:
        return _RNN[n], 0
    if n == "multiheadattention":
        return "attention", 0
    if n in ("transformerencoderlayer", "transformerdecoderlayer"):
        return "transformerlayer", 0
    return None, rank


_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "nhead", "num_head")


def _heads(layer: Any) -> Optional[int]:
    """An attention layer's head count, under the name its library gives it; None where it
    holds none."""
    for attr in _HEADS:
        value = getattr(layer, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _layer_kind(layer: Any) -> tuple[Optional[str], int]:
    """``_kind`` of a layer's class, else of the nearest torch or Paddle class it derives from
    (PaddleNLP's GPTLayerNorm is a LayerNorm, with its settings); a layer without parameters
    whose class names a GELU (Bloom's ``BloomGelu``) is one, its approximation measured."""
    if is_hf_conv1d(layer):
        return None, 0  # Hugging Face's GPT-2 Linear: no settings, and no convolution's
    for name in class_names(layer):
        kind, rank = _kind(name)
        if kind == "attention" and not _framework_attention(layer):
            # a class written by hand under the framework's name (HF's and PaddleNLP's XLM
            # MultiHeadAttention): read whole as the framework's, its softmax and dropout calls
            # went untraced and a softmax over the wrong axis unsaid; it is a hand-written one
            break
        if kind is not None:
            return kind, rank
    name = type(layer).__name__.lower()
    if name.endswith("gelu") and "quick" not in name and not any(
            True for _ in layer.parameters()):
        return "gelu", 0
    if name.endswith("attention") and _heads(layer) is not None:
        # an attention written by hand (timm's and PaddleClas's Attention, Hugging Face's
        # LlamaAttention): its head count is a setting, which its weights cannot show. Its own
        # kind: a built-in attention's traced masks and held dropout rate are not read from it
        return "heads", 0
    if name.endswith("layernorm") and _norm_epsilon(layer) is not None:
        # a LayerNorm written by hand (PaddleClas's ChannelsFirstLayerNorm, Hugging Face's
        # ConvNextLayerNorm): its epsilon is a setting like any LayerNorm's
        return "layernorm", 0
    return None, 0


def _framework_attention(layer: Any) -> bool:
    """Whether a layer is (or derives from) torch's ``nn.MultiheadAttention`` or Paddle's
    ``nn.MultiHeadAttention``, not a class of a model library's that shares the name."""
    return any(base.__name__.lower() == "multiheadattention"
               and base.__module__.split(".", 1)[0] in ("torch", "paddle")
               for base in type(layer).__mro__)


_EPSILON_NAMES = ("eps", "epsilon", "_epsilon", "variance_epsilon")


def _norm_epsilon(layer: Any) -> Optional[float]:
    """A normalisation layer's epsilon, under any of the names layers keep it by."""
    return number_attr(layer, _EPSILON_NAMES)


def _ln_epsilon(layer: Any) -> float:
    value = _norm_epsilon(layer)
    if value is None:
        raise AttributeError("no epsilon")
    return value


def _ln_shape(layer: Any, paddle: bool) -> tuple[Any, ...]:
    """A LayerNorm's normalised shape; a hand-written one's where it keeps it, else its
    weight's."""
    for name in (("_normalized_shape", "normalized_shape") if paddle else
                 ("normalized_shape", "_normalized_shape")):
        value = getattr(layer, name, None)
        if value is not None:
            return _tuple(value, 0)
    weight = getattr(layer, "weight", None)
    if weight is None:
        raise AttributeError("no normalized shape")
    return _tuple(tuple(int(d) for d in weight.shape), 0)


# Hugging Face's activation layers (transformers.activations) that compute a GELU, and how
_HF_GELU = {"geluactivation": "none", "newgeluactivation": "tanh", "fastgeluactivation": "tanh",
            "accurategeluactivation": "tanh", "pytorchgelutanh": "tanh"}


def _gelu_approximate(t: Any) -> str:
    known = _HF_GELU.get(type(t).__name__.lower())
    if known is not None:
        return known
    if hasattr(t, "approximate"):  # torch's nn.GELU
        return str(t.approximate)
    if hasattr(t, "_approximate"):  # Paddle's
        return "tanh" if t._approximate else "none"
    return _measured_gelu(t)


def _rope(layer: Any) -> tuple[float, int]:
    """A rotary embedding's base (``rope_theta``) and dimension, as PaddleNLP's holds them
    (``base``, ``dim``), else read from its frequencies (Hugging Face's ``inv_freq``, the k-th
    ``base ** (-2k / dim)``: from the last, where float32's rounding is least amplified)."""
    import numpy as np

    base, dim = getattr(layer, "base", None), getattr(layer, "dim", None)
    if isinstance(base, (int, float)) and isinstance(dim, int):
        return float(base), dim
    inv = getattr(layer, "inv_freq", None)
    if inv is None:
        raise AttributeError("no base")
    f = np.asarray(inv.detach().cpu().numpy() if hasattr(inv, "detach") else inv.numpy(),
                   dtype=np.float64).reshape(-1)
    dim, k = 2 * f.size, f.size - 1
    if k < 1 or not f[-1] > 0:
        raise ValueError("too few frequencies")
    return float(f"{f[-1] ** (-dim / (2 * k)):.5g}"), dim


def _measured_gelu(layer: Any) -> str:
    """The approximation a GELU written out by hand computes (Hugging Face's and PaddleNLP's
    BloomGelu: the tanh formula), read from its values at a few points, where the two differ
    by up to 5e-4, far over float32's rounding: "none" (erf), "tanh", or "other"."""
    import numpy as np

    x = np.linspace(-3.0, 3.0, 13)
    if _framework(layer) == "torch":
        import torch

        with torch.no_grad():
            # forward itself: no hook of a trace reading it fires again
            y = layer.forward(torch.tensor(x, dtype=torch.float32)).double().numpy()
    else:
        import paddle

        with paddle.no_grad():
            y = layer.forward(paddle.to_tensor(x, dtype="float32")).numpy().astype(np.float64)
    from math import erf, pi, sqrt

    exact = 0.5 * x * (1.0 + np.array([erf(v / sqrt(2.0)) for v in x]))
    tanh = 0.5 * x * (1.0 + np.tanh(sqrt(2.0 / pi) * (x + 0.044715 * x ** 3)))
    for name, want in (("none", exact), ("tanh", tanh)):
        if np.abs(y - want).max() < 1e-5:
            return name
    return "other"


# recurrent layers: torch's are leaves, Paddle's hold a layer per direction and layer, and their
# cells: read as one layer each, as torch's
_RNN = {"lstm": "lstm", "gru": "gru", "rnn": "rnn", "simplernn": "rnn"}
# kinds read as one layer whose sublayers are its own (an attention's projections too)
_WHOLE = frozenset(_RNN.values()) | {"attention"}


# kinds paired by order (no parameters to pair them by)
_BY_ORDER = ("maxpool", "avgpool", "adaptiveavgpool", "adaptivemaxpool", "dropout", "dropout2d",
             "dropout3d", "droppath", "timesteps", "leakyrelu", "gelu", "hardtanh", "elu", "softplus", "softmax",
             "logsoftmax", "upsample", "pixelshuffle", "pixelunshuffle", "channelshuffle",
             "flatten", "celu", "hardshrink", "softshrink", "pad", "rotary",
             # whose parameters are their sublayers' (or packed otherwise than the port's)
             "attention", "transformerlayer", "heads")
# torch's padding layers by class (ZeroPad2d, ReflectionPad2d...): Paddle's Pad2D says its mode
_PAD_MODES = {"zeropad": "constant", "constantpad": "constant", "reflectionpad": "reflect",
              "replicationpad": "replicate", "circularpad": "circular"}


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
    if str(getattr(p, "_padding_mode", "zeros")) != "zeros":
        pad = None  # reflect, replicate, circular: padded before the convolution, which pads 0
    return _paddle_pad_value(p._padding if pad is None else pad, rank)


def _paddle_pad_value(pad: Any, rank: int) -> Any:
    """A Paddle padding (int, per dimension, [before, after] per dimension, or the NCHW list of
    pairs a functional call takes) in the spelling both share: per dimension where symmetric."""
    if isinstance(pad, str):
        return pad.lower()
    if isinstance(pad, (list, tuple)) and pad and all(isinstance(v, (list, tuple)) for v in pad):
        pad = [int(v) for pair in list(pad)[-rank:] for v in pair] if rank else []
    if isinstance(pad, (list, tuple)) and len(pad) == 2 * rank and rank:
        pairs = [tuple(pad[2 * i:2 * i + 2]) for i in range(rank)]
        if all(a == b for a, b in pairs):  # [top, bottom, left, right], symmetric
            return tuple(int(a) for a, _ in pairs)
        return tuple(int(v) for v in pad)
    return _tuple(pad, rank)


def explicit_padding(settings: Mapping[str, Any], rank: int,
                     kernel: Optional[Sequence[int]] = None,
                     spatial: Optional[Sequence[int]] = None) -> Any:
    """A ``"same"``/``"valid"`` padding (a convolution's or a pool's, ``settings`` as
    ``read_settings`` reads them) as the explicit one it pads, in ``_paddle_pad_value``'s
    spelling, where that does not hang on the input or its ``spatial`` size is given; else as it
    was. Paddle and torch pad "same" alike: ``(ceil(n / s) - 1) * s + k - n`` in all, half before
    and the rest after (PaddleClas's ResNet_vd pools its shortcut 2x2 "SAME" where timm's pads
    0: on an even size the same numbers). ``kernel``: a convolution's, from its weight."""
    given = pad = settings.get("padding")
    if not isinstance(pad, str) or not rank:
        return pad
    pad = pad.lower()
    if pad == "valid":
        return (0,) * rank
    if pad != "same":
        return given
    kernel = _tuple(settings.get("kernel_size") if kernel is None else tuple(kernel), rank)
    stride = _tuple(settings.get("stride", 1), rank)
    dilation = _tuple(settings.get("dilation", 1), rank)
    if not all(isinstance(v, tuple) and len(v) == rank for v in (kernel, stride, dilation)):
        return pad
    if spatial is None:
        if any(s != 1 for s in stride):
            return pad  # hangs on the input's size
        spatial = (1,) * rank  # with a stride of 1 it does not
    pairs = []
    for n, k, s, d in zip(spatial, kernel, stride, dilation):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pairs.append((total // 2, total - total // 2))
    if all(a == b for a, b in pairs):
        return tuple(a for a, _ in pairs)
    return tuple(v for pair in pairs for v in pair)


class Undilated(tuple):  # type: ignore[type-arg]
    """A Paddle "SAME" convolution's dilation: ones, whatever it was given (``given``)."""

    given: tuple[int, ...] = ()

    def shown(self) -> str:
        return (f"({', '.join('1' for _ in self)}) ('SAME' padding convolves undilated, "
                f"whatever dilation={self.given} says)")


def same_dilation(padding: Any, dilation: Any, rank: int) -> Any:
    """A Paddle convolution's dilation as it computes: with ``padding="SAME"`` Paddle
    convolves undilated whatever ``dilation`` says (``Conv2D(3, padding="SAME", dilation=2)``
    is ``Conv2D(3, padding=1)``), and the port's ``dilation`` is then no setting of its own."""
    if padding != "same" or not isinstance(dilation, tuple) or all(d == 1 for d in dilation):
        return dilation
    out = Undilated((1,) * rank)
    out.given = dilation
    return out


_POOL_OR_CONV = ("conv", "avgpool", "maxpool")


def _explicit_read(kind: str, layer: Any, out: dict[str, Any], rank: int) -> None:
    """``read_settings``'s "same"/"valid" padding made explicit where it does not hang on the
    input: a layer's settings are read without one."""
    if kind not in _POOL_OR_CONV or not isinstance(out.get("padding"), str):
        return
    kernel = None
    if kind == "conv":
        shape = getattr(getattr(layer, "weight", None), "shape", None)
        if shape is None or len(shape) != rank + 2:
            return
        kernel = tuple(int(d) for d in shape[2:])
    out["padding"] = explicit_padding(out, rank, kernel)


def _pool_windows(c: Mapping[str, Any], n: int, dim: int, kind: str
                  ) -> Optional[list[tuple[int, int, int]]]:
    """Along ``dim`` of an input ``n`` long, each window of a pool: the input range it covers
    and, for an average that counts the padding, what it divides by (the padding, not a
    ``ceil_mode`` window's reach past it); None where its settings cannot say."""
    k, st, pad = c.get("kernel_size"), c.get("stride"), c.get("padding")
    dil = c.get("dilation") or (1,) * len(k or ())
    if not (isinstance(k, tuple) and isinstance(st, tuple) and isinstance(dil, tuple)
            and len(k) == len(st) == len(dil) > dim):
        return None
    rank = len(k)
    if isinstance(pad, str):  # "same" pads as this input's size asks
        spatial = [n if i == dim else k[i] for i in range(rank)]
        pad = explicit_padding(c, rank, spatial=spatial)
    if not isinstance(pad, tuple) or len(pad) not in (rank, 2 * rank):
        return None
    before, after = (pad[dim], pad[dim]) if len(pad) == rank else pad[2 * dim:2 * dim + 2]
    s, span = st[dim], dil[dim] * (k[dim] - 1) + 1
    ceil = bool(c.get("ceil_mode"))
    count = (n + before + after - span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (count - 1) * s >= n + before:
        count -= 1  # no window starts in the padding after the input
    counts_pad = kind == "avgpool" and bool(c.get("count_include_pad"))
    out = []
    for i in range(count):
        start = i * s - before
        lo, hi = max(start, 0), min(start + span, n)
        # Paddle counts a window up to its padding *before* past the end, whatever "SAME" pads
        # after (torch pads alike on both sides)
        divisor = min(start + span, n + before) - start if counts_pad else hi - lo
        out.append((lo, hi, divisor if kind == "avgpool" else 0))
    return out


def _pool_windows_differ(kind: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], bool]:
    """Whether two pools' paddings, ceil modes or counts change anything, on an input of any
    size: not where every window covers the same input on both sides and divides by as many.
    PaddleClas's ResNet_vd pools its shortcut ``AvgPool2D(2, 2, padding="SAME",
    ceil_mode=True)`` where timm's has ``AvgPool2d(2, 2, ceil_mode=True,
    count_include_pad=False)``: "SAME" pads one after an odd size, where torch's last window
    reaches past the edge, and neither counts it."""
    def differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        k = a.get("kernel_size")
        if not isinstance(k, tuple) or k != b.get("kernel_size"):
            return True
        # the windows repeat with the stride: a few periods past the kernel and the padding
        # cover every case
        pads = [p for c in (a, b) if isinstance(p_ := c.get("padding"), tuple) for p in p_]
        sizes = range(1, 4 * (sum(k) + sum(a.get("stride") or ()) + sum(pads) + 8))
        return any((w := _pool_windows(a, n, dim, kind)) is None
                   or w != _pool_windows(b, n, dim, kind)
                   for dim in range(len(k)) for n in sizes)
    return differ


PADDED_IN_FORWARD = "TF's 'same', padded in its forward"
# a layer whose input the forward code around it pads (timm's PP-HGNetV2 stem: F.pad, then a
# convolution and a max pool without padding, where PaddleClas's pad "SAME" themselves)
PADDED_BEFORE = "with F.pad before it"


def _torch_padding(t: Any, rank: int) -> Any:
    if type(t).__name__.endswith(("Conv2dSame", "Pool2dSame", "Conv2dSameExport")):
        # timm's TF ports pad in their forward, as the input's size asks; their padding
        # attribute is 0
        return PADDED_IN_FORWARD
    pad = t.padding
    return pad.lower() if isinstance(pad, str) else _tuple(pad, rank)


def _rms_epsilon(layer: Any) -> Any:
    """An RMSNorm's epsilon, as the frameworks' own (``eps``, ``_epsilon``) and the model
    libraries' (Hugging Face's and PaddleNLP's ``LlamaRMSNorm``: ``variance_epsilon``) hold it;
    torch's ``eps=None`` is its dtype's machine epsilon."""
    for name in ("variance_epsilon", "eps", "_epsilon", "epsilon"):
        if hasattr(layer, name):
            value = getattr(layer, name)
            return "machine epsilon" if value is None else float(value)
    raise AttributeError("no epsilon")


def _torch_padding_idx(t: Any) -> Any:
    """torch's padding row reads as what it holds, Paddle's as zeros: the same only where
    torch's row is zero, and one that is not says so."""
    p = t.padding_idx
    if p is None:
        return None
    row = t.weight.detach()[p]
    return int(p) if not bool(row.any()) else f"{int(p)} (its row is not zero)"


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
# what both pools have
_POOL: list[tuple[str, _Getter, _Getter]] = [
    ("kernel_size", lambda t, r: _tuple(t.kernel_size, r),
     lambda p, r: _tuple(_pool_kernel_paddle(p), r)),
    ("stride", lambda t, r: _tuple(_pool_stride(t.kernel_size, t.stride), r),
     lambda p, r: _tuple(_pool_stride(_pool_kernel_paddle(p), p.stride), r)),
    ("padding", lambda t, r: _torch_padding(t, r), lambda p, r: _paddle_pad_value(p.padding, r)),
    ("ceil_mode", lambda t, r: bool(t.ceil_mode), lambda p, r: bool(p.ceil_mode)),
]
# kind -> [(setting, torch getter, Paddle getter)], each getter given the layer and its rank
_SETTINGS: dict[str, list[tuple[str, _Getter, _Getter]]] = {
    "conv": [
        ("stride", lambda t, r: _tuple(t.stride, r), lambda p, r: _tuple(p._stride, r)),
        ("padding", _torch_padding, _paddle_padding),
        ("dilation", lambda t, r: _tuple(t.dilation, r),
         lambda p, r: same_dilation(_paddle_padding(p, r), _tuple(p._dilation, r), r)),
        ("groups", lambda t, r: int(t.groups), lambda p, r: int(p._groups)),
        ("padding_mode", lambda t, r: t.padding_mode, lambda p, r: p._padding_mode),
    ],
    "batchnorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
        ("momentum", lambda t, r: _momentum_torch(t), lambda p, r: 1.0 - float(p._momentum)),
        ("statistics", lambda t, r: _statistics_torch(t), lambda p, r: _statistics_paddle(p)),
        # read only where each norm holds its activation (timm's BatchNormAct2d, Paddle's
        # BatchNorm(act=...)): a plain one may have it after as a layer or a function
        ("activation", lambda t, r: _held_act_torch(t), lambda p, r: _fused_act_paddle(p)),
    ],
    "rmsnorm": [
        ("epsilon", lambda t, r: _rms_epsilon(t), lambda p, r: _rms_epsilon(p)),
    ],
    "layernorm": [
        ("epsilon", lambda t, r: _ln_epsilon(t), lambda p, r: _ln_epsilon(p)),
        ("normalized_shape", lambda t, r: _ln_shape(t, False), lambda p, r: _ln_shape(p, True)),
    ],
    "groupnorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
        ("num_groups", lambda t, r: int(t.num_groups), lambda p, r: int(p._num_groups)),
    ],
    "instancenorm": [
        ("epsilon", lambda t, r: float(t.eps), lambda p, r: float(p._epsilon)),
    ],
    "embedding": [
        ("padding_idx", lambda t, r: _torch_padding_idx(t),
         lambda p, r: None if p._padding_idx in (None, -1) else int(p._padding_idx)),
    ],
    "maxpool": _POOL + [
        ("dilation", lambda t, r: _tuple(t.dilation, r), lambda p, r: _tuple(1, r)),
    ],
    "avgpool": _POOL + [
        ("count_include_pad", lambda t, r: bool(getattr(t, "count_include_pad", True)),
         lambda p, r: not bool(getattr(p, "exclusive", True))),
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
        ("mode", lambda t, r: "upscale_in_train", lambda p, r: str(p.mode)),
    ],
    "droppath": [("p", lambda t, r: _drop_path_rate(t), lambda p, r: _drop_path_rate(p))],
    # a sinusoidal embedding's layout (sin then cos, or cos then sin) and frequency shift: a
    # flip moves every output, a shift a little
    "timesteps": [
        ("num_channels", lambda t, r: int(t.num_channels), lambda p, r: int(p.num_channels)),
        ("flip_sin_to_cos", lambda t, r: bool(t.flip_sin_to_cos),
         lambda p, r: bool(p.flip_sin_to_cos)),
        ("downscale_freq_shift", lambda t, r: float(t.downscale_freq_shift),
         lambda p, r: float(p.downscale_freq_shift)),
    ],
    "dropout2d": [("p", lambda t, r: float(t.p), lambda p, r: float(p.p))],
    "dropout3d": [("p", lambda t, r: float(t.p), lambda p, r: float(p.p))],
    "leakyrelu": [("negative_slope", lambda t, r: float(t.negative_slope),
                   lambda p, r: float(p._negative_slope))],
    "gelu": [("approximate", lambda t, r: _gelu_approximate(t),
              lambda p, r: _gelu_approximate(p))],
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
# torch's batch_first defaults to False (time first), Paddle's time_major to False (batch first)
_SETTINGS["lstm"] = [
    ("hidden_size", lambda t, r: int(t.hidden_size), lambda p, r: int(p.hidden_size)),
    ("num_layers", lambda t, r: int(t.num_layers), lambda p, r: int(p.num_layers)),
    ("bidirectional", lambda t, r: bool(t.bidirectional), lambda p, r: int(p.num_directions) == 2),
    ("batch_first", lambda t, r: bool(t.batch_first), lambda p, r: not bool(p.time_major)),
    ("dropout", lambda t, r: float(t.dropout), lambda p, r: float(p.dropout)),
    ("proj_size", lambda t, r: int(getattr(t, "proj_size", 0)),
     lambda p, r: int(getattr(p, "proj_size", 0))),
]
_SETTINGS["gru"] = _SETTINGS["lstm"][:5]
# Paddle's MultiHeadAttention takes [batch, sequence, features] always; torch's without
# batch_first, [sequence, batch, features]
_SETTINGS["attention"] = [
    ("embed_dim", lambda t, r: int(t.embed_dim), lambda p, r: int(p.embed_dim)),
    ("num_heads", lambda t, r: int(t.num_heads), lambda p, r: int(p.num_heads)),
    ("dropout", lambda t, r: float(t.dropout), lambda p, r: float(p.dropout)),
    ("batch_first", lambda t, r: bool(t.batch_first), lambda p, r: True),
    ("kdim", lambda t, r: int(t.kdim), lambda p, r: int(p.kdim)),
    ("vdim", lambda t, r: int(t.vdim), lambda p, r: int(p.vdim)),
]
# an attention written by hand, on both sides (see _layer_kind)
_SETTINGS["heads"] = [("num_heads", lambda t, r: _heads_of(t), lambda p, r: _heads_of(p))]
_SETTINGS["transformerlayer"] = [
    ("norm_first", lambda t, r: bool(t.norm_first), lambda p, r: bool(p.normalize_before)),
    ("activation", lambda t, r: _activation_name(t.activation),
     lambda p, r: _activation_name(p.activation)),
]
_SETTINGS["rnn"] = _SETTINGS["lstm"][:5] + [
    ("nonlinearity", lambda t, r: str(t.nonlinearity), lambda p, r: str(p.activation)),
]
_SETTINGS.update({
    "pixelshuffle": [("upscale_factor", lambda t, r: int(t.upscale_factor),
                      lambda p, r: int(p._upscale_factor))],
    "pixelunshuffle": [("downscale_factor", lambda t, r: int(t.downscale_factor),
                        lambda p, r: int(p._downscale_factor))],
    "channelshuffle": [("groups", lambda t, r: int(t.groups), lambda p, r: int(p._groups))],
    "flatten": [("start", lambda t, r: int(t.start_dim), lambda p, r: int(p.start_axis)),
                ("end", lambda t, r: int(t.end_dim), lambda p, r: int(p.stop_axis))],
    "celu": [("alpha", lambda t, r: float(t.alpha), lambda p, r: float(p._alpha))],
    "hardshrink": [("threshold", lambda t, r: float(t.lambd), lambda p, r: float(p._threshold))],
    "softshrink": [("threshold", lambda t, r: float(t.lambd), lambda p, r: float(p._threshold))],
    # (left, right, top, bottom, ...) in both
    "rotary": [("base", lambda t, r: _rope(t)[0], lambda p, r: _rope(p)[0]),
               ("dim", lambda t, r: _rope(t)[1], lambda p, r: _rope(p)[1])],
    "pad": [
        ("padding", lambda t, r: _tuple(t.padding, 2 * r), lambda p, r: _tuple(p.padding, 2 * r)),
        ("mode", lambda t, r: _PAD_MODES[_DIMS.sub("", type(t).__name__.lower())],
         lambda p, r: str(p._mode)),
        ("value", lambda t, r: float(getattr(t, "value", 0.0)), lambda p, r: float(p.value)),
    ],
})
_SETTINGS["convtranspose"] = _SETTINGS["conv"] + [
    ("output_padding", lambda t, r: _tuple(t.output_padding, r),
     lambda p, r: _tuple(p.output_padding, r)),
]


def _heads_of(layer: Any) -> int:
    heads = _heads(layer)
    if heads is None:
        raise AttributeError("no head count")
    return heads


def _drop_path_rate(layer: Any) -> float:
    """A stochastic-depth layer's rate: ``drop_prob`` (timm's, PaddleClas's, Hugging Face's;
    None for 0 in PaddleClas), ``p`` (torchvision's)."""
    for name in ("drop_prob", "p"):
        if hasattr(layer, name):
            value = getattr(layer, name)
            return 0.0 if value is None else float(value)
    raise AttributeError("no rate")


def _activation_name(fn: Any) -> str:
    """A transformer layer's activation, a function (``F.relu``, Paddle's ``_gelu``), a
    ``functools.partial`` of one or a layer (``nn.GELU()``), by its name; a GELU's tanh
    approximation said: ``"gelu (tanh)"``."""
    import functools

    tanh = False
    if isinstance(fn, functools.partial):
        tanh = fn.keywords.get("approximate") in (True, "tanh")
        fn = fn.func
    name = str(getattr(fn, "__name__", None) or type(fn).__name__).lstrip("_").lower()
    tanh = tanh or getattr(fn, "approximate", None) in (True, "tanh") or \
        bool(getattr(fn, "_approximate", False))
    return f"{name} (tanh)" if name == "gelu" and tanh else name


def _either_padded(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return _padded(a.get("padding")) or _padded(b.get("padding"))


# (kind, setting) -> whether the setting changes anything for a pair, from both layers' settings:
# the padding mode of a convolution without padding is not compared
_RELEVANT: dict[tuple[str, str], Callable[[Mapping[str, Any], Mapping[str, Any]], bool]] = {
    ("conv", "padding_mode"): _either_padded,
    ("convtranspose", "padding_mode"): _either_padded,
    # windows reach padding only where there is some: a window ceil_mode takes past the edge
    # averages what it holds in torch and in Paddle either way (HF's Funnel against PaddleNLP's,
    # avg_pool2d(k=2, s=2, ceil_mode=True): count_include_pad True against exclusive True, the
    # same numbers; both frameworks, k 2-3, s <= k, 1-d and 2-d: 0.0 apart)
    **{(k, s): _pool_windows_differ(k) for k in ("avgpool", "maxpool")
       for s in ("padding", "ceil_mode", "count_include_pad")},
    ("dropout", "mode"): lambda a, b: bool(a.get("p")) or bool(b.get("p")),
    # torch's Softmax() without a dim picks one from the input's rank: nothing to compare
    ("softmax", "axis"): lambda a, b: a.get("axis") is not None and b.get("axis") is not None,
    ("logsoftmax", "axis"): lambda a, b: a.get("axis") is not None and b.get("axis") is not None,
    ("pad", "value"): lambda a, b: a.get("mode") == "constant" and b.get("mode") == "constant",
}
for _k in ("lstm", "gru", "rnn"):  # dropout acts between stacked layers only
    _RELEVANT[(_k, "dropout")] = lambda a, b: max(a.get("num_layers", 1),
                                                  b.get("num_layers", 1)) > 1


def _framework(layer: Any) -> str:
    top = type(layer).__module__.split(".", 1)[0]
    if top not in ("torch", "paddle"):  # a subclass defined elsewhere: what it derives from
        for base in type(layer).__mro__:
            top = base.__module__.split(".", 1)[0]
            if top in ("torch", "paddle"):
                break
    return top


def read_settings(layer: Any) -> Optional[tuple[str, dict[str, Any]]]:
    """A torch module's or Paddle layer's kind and settings, in one spelling for both (the
    torch one: Paddle's momentum as 1 - its own, ``exclusive`` as ``count_include_pad``...);
    None for a layer of no kind this module knows. A setting its framework version does not
    hold is left out."""
    kind, rank = _layer_kind(layer)
    if kind is None or kind not in _SETTINGS:
        return None
    side = 1 if _framework(layer) == "torch" else 2
    out: dict[str, Any] = {}
    for entry in _SETTINGS[kind]:
        try:
            out[entry[0]] = entry[side](layer, rank)
        except (AttributeError, TypeError, ValueError):
            continue
    _explicit_read(kind, layer, out, rank)
    return kind, out


def _differences(kind: str, a: Mapping[str, Any], b: Mapping[str, Any]
                 ) -> list[tuple[str, Any, Any]]:
    out = []
    for setting, *_ in _SETTINGS.get(kind, ()):
        if setting not in a or setting not in b:
            continue
        if _same(a[setting], b[setting]):
            continue
        relevant = _RELEVANT.get((kind, setting))  # after: a pool's reads every input size
        if relevant is None or relevant(a, b):
            out.append((setting, a[setting], b[setting]))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (list, tuple)) != isinstance(b, (list, tuple)):
        # one value for every dimension against the same value per dimension: (2.0, 2.0) is 2
        seq, one = (a, b) if isinstance(a, (list, tuple)) else (b, a)
        return len(seq) > 0 and all(_same(x, one) for x in seq)
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        # Paddle keeps some attributes in float32: 1e-5 reads back as 9.99999974e-06
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _leaves(model: Any, children: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    inside: Optional[str] = None  # a recurrent layer's name, whose sublayers are its own
    for name, m in model:
        if inside is not None and name.startswith(inside):
            continue
        kind = _layer_kind(m)[0]
        if kind in _WHOLE:  # read as one layer: its sublayers have no settings of their own
            inside = name + "."
            out.append((name, m))
        elif name and (kind in ("transformerlayer", "heads") or _norm_holding_more(kind, m)
                       or not any(True for _ in children(m))):
            # a transformer layer's or hand-written attention's own settings; its sublayers
            # follow
            out.append((name, m))
    return out


_NORMS = ("batchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm")


def _norm_holding_more(kind: Optional[str], m: Any) -> bool:
    """A norm layer that holds its activation as a sublayer (timm's ``BatchNormAct2d``, the norm
    of every ``ConvNormAct``): its own statistics and epsilon are settings like any norm's (a
    DPN port's epsilon 1e-5 against timm's 1e-3 went unread)."""
    return kind in _NORMS and bool(getattr(m, "_parameters", None) or getattr(m, "_buffers", None))


# a torch activation's class -> its name in Paddle's BatchNorm(act=...) spelling
_ACT_NAMES = {"ReLU": "relu", "SiLU": "silu", "Swish": "silu", "Sigmoid": "sigmoid",
              "Tanh": "tanh", "ReLU6": "relu6", "ELU": "elu", "GELU": "gelu",
              "Hardswish": "hard_swish", "HardSwish": "hard_swish", "Identity": "none"}
_PADDLE_ACTS = {"swish": "silu"}  # one function, two names


def _held_act_torch(t: Any) -> str:
    """The activation a torch norm holds as a sublayer (timm's ``act``), in Paddle's spelling
    (``leaky_relu(0.01)`` with its slope); AttributeError for a norm holding none."""
    if not norm_holding_act(t):
        raise AttributeError("no activation held")
    acts = [m for m in t.children() if type(m).__name__ not in ("Identity", "Dropout")] or \
        [m for m in t.children() if type(m).__name__ == "Identity"]
    if len(acts) != 1:
        raise AttributeError("not one activation")
    cls = type(acts[0]).__name__
    if cls == "LeakyReLU":
        return f"leaky_relu({float(acts[0].negative_slope):g})"
    if cls not in _ACT_NAMES:
        raise AttributeError(cls)
    return _ACT_NAMES[cls]


def _fused_act_paddle(p: Any) -> str:
    """The activation a Paddle ``BatchNorm(act=...)`` applies itself; AttributeError where it
    applies none."""
    act = getattr(p, "_act", None)
    if not isinstance(act, str) or not act:
        raise AttributeError("no activation fused")
    return _PADDLE_ACTS.get(act, act)


def norm_holding_act(m: Any) -> bool:
    """``m`` is a norm holding its activation as a sublayer (timm's ``BatchNormAct2d``): the
    counterpart of a Paddle ``BatchNorm(act=...)``, which replay and localisation keep whole."""
    return _norm_holding_more(_layer_kind(m)[0], m) and any(True for _ in m.children())


def plain_norm_against_held_act(port_layer: Any, ref_layer: Any) -> bool:
    """A port norm applying no activation itself paired with a reference norm holding one
    (PaddleClas's EfficientNet ``BatchNorm``, then ``F.swish``, against timm's
    ``BatchNormAct2d``): replay and localisation take the reference's apart."""
    return (port_layer is not None and ref_layer is not None
            and not getattr(port_layer, "_act", None)
            and _layer_kind(port_layer)[0] in _NORMS and norm_holding_act(ref_layer))


def _pairs(torch_model: Any, paddle_model: Any, torch_to_paddle: Mapping[str, str]
           ) -> list[tuple[str, Any, str, Any]]:
    """(torch name, module, Paddle name, layer) of each pair of layers with parameters (paired
    through them); those without are ``_by_definition``'s or the traces'."""
    t_leaves = _leaves(torch_model.named_modules(), lambda m: m.children())
    p_by_name = dict(_leaves(paddle_model.named_sublayers(), lambda m: m.children()))
    pairs: list[tuple[str, Any, str, Any]] = []
    layer_of = {t.rpartition(".")[0]: p.rpartition(".")[0] for t, p in torch_to_paddle.items()}
    for name, module in t_leaves:
        kind, _ = _layer_kind(module)
        if kind is None or kind in _BY_ORDER:
            continue
        pname = layer_of.get(name)
        if pname is not None and pname in p_by_name:
            pairs.append((name, module, pname, p_by_name[pname]))
    return pairs


_VIRTUAL = (":dropout", ":activation")  # the name suffixes of what a layer holds, as a layer


def _with_held(entries: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``layer_settings`` entries with what a layer holds as a setting, where a hand-written
    model holds a layer, after it as a layer of its own: an attention's dropout of its weights
    (Hugging Face's BERT: its ``attention.self.dropout``; PaddleNLP's ``MultiHeadAttention``
    keeps a rate) and a transformer layer's GELU (HF's ``GELUActivation`` layer; Paddle's
    ``TransformerEncoderLayer`` holds ``F.gelu``)."""
    out: list[Mapping[str, Any]] = []
    for e in entries:
        out.append(e)
        p = e["settings"].get("dropout") if e["kind"] == "attention" else None
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p:
            out.append({"name": e["name"] + _VIRTUAL[0], "kind": "dropout",
                        "settings": {"p": float(p)}})
        act = e["settings"].get("activation") if e["kind"] == "transformerlayer" else None
        if isinstance(act, str) and act.startswith("gelu"):
            out.append({"name": e["name"] + _VIRTUAL[1], "kind": "gelu",
                        "settings": {"approximate": "tanh" if "tanh" in act else "none"}})
    return out


def _by_definition(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]],
                   sides: tuple[str, str], kinds: Collection[str]
                   ) -> tuple[list[SettingDiff], list[str], int]:
    """The differing settings of each kind of ``kinds`` paired by definition order, where both
    sides hold as many (``layer_settings`` entries), the kinds that could not be paired, and the
    pairs compared.

    Without a trace nothing else pairs them, so the counts are made comparable as a trace's
    are (``calls.compare_events``): an attention's rate is a dropout of its own, a transformer
    layer's GELU a GELU of its own (``_with_held``), and where a
    kind's counts still differ, dropouts of p 0 (identities: PaddleNLP's activation dropout)
    are left out. A kind whose differences would all go were its layers paired otherwise (the
    same settings on both sides, defined in another order) still fails, and says so."""
    by_kind: dict[str, tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]] = {}
    for side, entries in ((0, ours), (1, theirs)):
        for e in _with_held(entries):
            if e["kind"] in kinds:
                by_kind.setdefault(e["kind"], ([], []))[side].append(e)
    heads = by_kind.get("heads")
    if heads is not None and not (heads[0] and heads[1]):
        # a hand-written attention on one side, the framework's own on the other (Hugging
        # Face's BertSelfAttention against PaddleNLP's MultiHeadAttention): head counts compare
        for side, entries in ((0, ours), (1, theirs)):
            if not heads[side]:
                heads[side].extend({"name": e["name"], "kind": "heads",
                                    "settings": {"num_heads": e["settings"]["num_heads"]}}
                                   for e in entries if e["kind"] == "attention"
                                   and "num_heads" in e["settings"])
    diffs: list[SettingDiff] = []
    unpaired: list[str] = []
    compared = 0
    for kind, (xs, ys) in by_kind.items():
        if len(xs) != len(ys) and kind.startswith("dropout"):
            kept = ([e for e in xs if e["settings"].get("p")],
                    [e for e in ys if e["settings"].get("p")])
            if len(kept[0]) == len(kept[1]) and kept[0]:
                xs, ys = kept
        if len(xs) != len(ys) and kind == "heads":
            continue  # read from classes named so: where they do not pair, nothing is known
        if len(xs) != len(ys):
            # a side that holds none may apply them as functions (Hugging Face's dropouts):
            # only a trace sees those
            unpaired.append(f"{kind}: {len(xs)} in {sides[0]}, {len(ys)} in {sides[1]}" + (
                f" (the {sides[0] if not xs else sides[1]} model may apply them as functions: "
                "give traces=, as align_forward does)" if not xs or not ys else ""))
            continue
        found = []
        ys = _by_weight(xs, ys)
        for x, y in zip(xs, ys):
            if x["name"].endswith(_VIRTUAL) and y["name"].endswith(_VIRTUAL):
                continue  # the two layers holding them compare them
            compared += 1
            for setting, xv, yv in _differences(kind, x["settings"], y["settings"]):
                found.append(SettingDiff(x["name"], y["name"], setting, xv, yv, kind, sides))
        if found and _reordered(kind, xs, ys):
            unpaired.append(f"{kind}: the same settings on both sides in another definition "
                            "order; give traces= to pair them in the order they are called")
        diffs += found
    return diffs, unpaired, compared


def _reordered(kind: str, xs: Sequence[Mapping[str, Any]], ys: Sequence[Mapping[str, Any]]
               ) -> bool:
    """Whether each of ``xs`` has a layer of the same settings in ``ys`` (one each)."""
    left = list(ys)
    for x in xs:
        same = next((i for i, y in enumerate(left)
                     if not _differences(kind, x["settings"], y["settings"])), None)
        if same is None:
            return False
        left.pop(same)
    return True


def _entries(model: Any, with_parameters: bool = False) -> list[dict[str, Any]]:
    """``layer_settings`` entries of the kinds without parameters (of those with, where
    ``with_parameters``), their values as read."""
    out = []
    for name, layer in _leaves_of(model):
        read = read_settings(layer)
        if read is not None and (read[0] in _BY_ORDER) != with_parameters:
            out.append(_with_weight({"name": name, "kind": read[0], "settings": read[1]}, layer))
    return out


def _with_weight(entry: dict[str, Any], layer: Any) -> dict[str, Any]:
    """``entry`` with ``"weight"``: the shape of the layer's own weight (its largest parameter
    where none is named so), where it holds one: what pairs layers of a kind defined in another
    order (``_by_weight``)."""
    try:
        own = (layer.named_parameters(recurse=False) if _framework(layer) == "torch"
               else layer.named_parameters(include_sublayers=False))
        params = [(n, tuple(int(d) for d in p.shape)) for n, p in own]
    except (AttributeError, TypeError):
        return entry
    if not params:
        return entry
    shape = dict(params).get("weight") or max((sh for _, sh in params), key=math.prod)
    return dict(entry, weight=list(shape))


def _weight_key(entry: Mapping[str, Any]) -> Optional[tuple[int, ...]]:
    """The weight's dimensions, sorted: a Linear's [out, in] and its port's [in, out] agree."""
    shape = entry.get("weight")
    return None if shape is None else tuple(sorted(int(d) for d in shape))


def _by_weight(xs: Sequence[Mapping[str, Any]], ys: Sequence[Mapping[str, Any]]
               ) -> Sequence[Mapping[str, Any]]:
    """``ys`` in the order that pairs each of ``xs`` (as many, one kind) with a layer of its
    weight's shape: definition order within each shape. A port that defines its layers in
    another order (PaddleClas's ConvNeXt defines every downsampling convolution before the
    stages; timm's each in its stage) pairs a depthwise convolution with a downsampling one by
    definition order alone. ``ys`` as they are where they already agree, where a weight is
    unknown, or where the shapes' counts differ (a port with another ``groups``: the settings
    then say so)."""
    xk, yk = [_weight_key(x) for x in xs], [_weight_key(y) for y in ys]
    if xk == yk or None in xk or None in yk or sorted(xk) != sorted(yk):
        return ys
    left: dict[tuple[int, ...], list[Mapping[str, Any]]] = {}
    for key, y in zip(yk, ys):
        left.setdefault(key, []).append(y)  # type: ignore[arg-type]
    return [left[key].pop(0) for key in xk]  # type: ignore[index]


def _values_decide(d: SettingDiff) -> Optional[str]:
    """What kind of setting is said and not failed, because values compared anyway show whether
    it matters, or None for a setting that fails:

    - "layout": how a layer takes its inputs, which no setting of the port's can match, so a
      faithful port transposes around it: torch's attention's batch_first against Paddle's,
      batch first always. (An RNN's is a setting still: Paddle's time_major matches it, and a
      port that forgets it computes on the batch as on time.)
    - "reduction": a loss's, which a port may undo in its own code: Paddle's cross entropy
      with ignore_index divides a mean by every label, so a faithful port takes the sum and
      divides by the labels kept, and failed on "reduction 'mean' in torch, 'sum' in Paddle"
      with every value aligned. The loss is compared wherever it is computed.
    - "padding": a layer that pads in its forward as its input's size asks (timm's
      ``Conv2dSame``), whose padding attribute says nothing of it."""
    if d.setting == "batch_first" and d.kind == "attention":
        return "layout"
    if d.setting == "reduction":
        return "reduction"
    if d.setting == "padding" and PADDED_IN_FORWARD in (d.torch_value, d.paddle_value):
        # against a port that pads as TF does in its own code around the layer (PaddleClas's
        # EfficientNet pads 2 and crops a row and a column): the values show what each pads
        return "padding"
    if d.setting == "padding" and any(isinstance(v, str) and PADDED_BEFORE in v
                                      for v in (d.torch_value, d.paddle_value)):
        return "padded_before"
    return None


_SAID = {"layout": "layout of the inputs", "reduction": "loss reduction",
         "padding": "padding one side computes in its forward",
         "padded_before": "padding one side's forward code applies before the layer"}


def _padded_before(diffs: Sequence[SettingDiff], events: Sequence[Any], side: int
                   ) -> list[SettingDiff]:
    """``diffs`` with each padding of a convolution or pool whose forward code around it (a
    layer holding it) calls ``F.pad`` read as that: "(0, 0) with F.pad before it in stem's
    forward", which the values decide (``_values_decide``). ``events``: that side's traced
    calls; ``side``: 0 for the torch side's values, 1 for the port's."""
    pads: dict[str, tuple[Any, ...]] = {}
    for e in events:
        if e.kind == "pad" and not e.layer and e.settings.get("mode", "constant") == "constant":
            pads.setdefault(e.name.rpartition(":")[0], tuple(e.settings.get("padding", ())))
    if not pads:
        return list(diffs)
    out = []
    for d in diffs:
        name = d.torch_layer if side == 0 else d.paddle_layer
        # the code of the layer holding it, or of the one holding that (timm's HGNetV2 pads in
        # its stem's forward before stem.stem2a.conv): a pad further out says nothing of it
        near = [name.rsplit(".", k)[0] if name.count(".") >= k else "" for k in (1, 2)]
        where = next((w for w in near if w in pads), None) \
            if d.setting == "padding" and d.kind in ("conv", "maxpool", "avgpool") else None
        if where is None:
            out.append(d)
            continue
        value = (f"{(d.torch_value, d.paddle_value)[side]} {PADDED_BEFORE} "
                 f"({list(pads[where])}) in {where or 'the model'}'s forward")
        out.append(dataclasses.replace(d, **{("torch_value", "paddle_value")[side]: value}))
    return out
_BY_DEFINITION = "layers with parameters: paired by definition order, kind by kind"
_BY_SHAPE = "layers with parameters: paired by order"


@dataclass(frozen=True)
class SettingsReport:
    """``compare_settings``'s answer: the settings that differ, and the kinds of layer without
    parameters that could not be paired by order (other counts: a model that applies them as
    functions, whose settings then go unchecked)."""

    differ: tuple[SettingDiff, ...]
    unpaired: tuple[str, ...]
    compared: int = 0  # the layer pairs whose settings were compared
    calls: int = 0  # the traced pairs with a functional call on a side (calls.compare_events)
    readable: int = 0  # the layers of a kind with settings the two models hold, the fewer side's
    # of ``unpaired``, the kinds with parameters both sides hold, in other numbers: unchecked
    unchecked: tuple[str, ...] = ()
    # settings the values compared decide (``_values_decide``): said, not failed
    said: tuple[SettingDiff, ...] = ()

    def __post_init__(self) -> None:
        moved = tuple(d for d in self.differ if _values_decide(d))
        if moved:
            object.__setattr__(self, "differ",
                               tuple(d for d in self.differ if not _values_decide(d)))
            object.__setattr__(self, "said", self.said + moved)

    @property
    def passed(self) -> bool:
        """No setting differs, and something was compared where there was something to: a
        report that paired none of the models' layers, or left some with parameters unpaired
        (``unchecked``: an embedding's padding index unseen), is no pass."""
        return not self.differ and not self.nothing_compared and not self.unchecked

    @property
    def nothing_compared(self) -> bool:
        return self.readable > 0 and self.compared == 0 and self.calls == 0

    def __str__(self) -> str:
        n, c = self.compared, self.calls
        agree = f"the settings of {n} paired layer{'s' if n != 1 else ''}"
        if c:
            agree += f" and {c} paired call{'s' if c != 1 else ''}"
        if self.nothing_compared:
            agree = (f"nothing compared: none of the {self.readable} layers with settings "
                     "paired (see below)")
        lines = [d.line() for d in self.differ] or (
            [agree] if self.nothing_compared else [f"{agree} agree"])
        lines += [f"{d.line()} (a {_SAID[str(_values_decide(d))]}: not failed, the values "
                  "decide)" for d in self.said]
        for u in self.unpaired:
            if u.startswith(_BY_SHAPE):
                lines.append(u)
            elif u in self.unchecked:
                lines.append(f"unchecked, not paired: {u}")
            else:
                lines.append(f"not paired by order: {u}")
        return "\n".join(lines)


def compare_settings(torch_model: Any, paddle_model: Any, *, rules: Any = None,
                     by_order: bool = False,
                     torch_to_paddle: Optional[Mapping[str, str]] = None,
                     traces: Optional[tuple[Any, Any]] = None) -> SettingsReport:
    """The settings that differ between the paired layers of a torch model and its Paddle port.

    Layers with parameters pair through them: under the conversion ``rules`` (the default
    ones where None), by definition order with ``by_order``, or through ``torch_to_paddle``
    (torch parameter name -> Paddle parameter name) where given. A setting one side cannot be
    read for (an attribute another version names otherwise) is left out.

    ``traces``: the two ``trace_settings`` of one forward pass each (torch's, Paddle's), whose
    functional calls (``F.avg_pool2d(...)``, ``F.interpolate(...)``) are compared too, each kind
    paired by order with the other side's calls and layers of that kind.

    Either side may also be a file ``save_settings`` wrote (the reference's script and the
    port's each save theirs): then every kind of layer pairs by definition order, where both
    sides have as many, and the calls where both files hold a trace.

    >>> print(compare_settings(torch_model, paddle_model, by_order=True))
    layer3.0.bn1: epsilon 1e-05 in torch, 1e-06 in Paddle
    >>> print(compare_settings("result/settings_torch.json", "result/settings_paddle.json"))
    """
    if _is_saved(torch_model) or _is_saved(paddle_model):
        return _compare_saved(_as_saved(torch_model), _as_saved(paddle_model))
    from ..errors import KeyMismatchError

    why = ""  # why the layers with parameters did not pair through their weights
    said = ""  # how they paired, where not plainly by order
    if torch_to_paddle is None:
        from .framework import _torch_params_plan

        try:
            if by_order:
                rules, said = _by_order_or_by_shape(torch_model, paddle_model, rules)
        except KeyMismatchError as e:
            # a port whose weights do not pair by order (a conv's groups change its weight's
            # shape): its layers are still compared, paired otherwise
            why = f"their weights do not pair by order: {str(e)[:300]}"
            torch_to_paddle = {}
        else:
            plan = _torch_params_plan(torch_model, rules)
            torch_to_paddle = {n: kp.paddle_name for n, kp in plan.items() if kp.paddle_name}
    diffs: list[SettingDiff] = []
    compared = 0
    for tname, tmod, pname, pmod in _pairs(torch_model, paddle_model, torch_to_paddle):
        t_read, p_read = read_settings(tmod), read_settings(pmod)
        if t_read is None or p_read is None or t_read[0] != p_read[0]:
            continue
        compared += 1
        for setting, tv, pv in _differences(t_read[0], t_read[1], p_read[1]):
            diffs.append(SettingDiff(tname, pname, setting, tv, pv, t_read[0]))
    unpaired: list[str] = []
    if said:
        unpaired.append(said)
    t_params, p_params = _entries(torch_model, True), _entries(paddle_model, True)
    if compared == 0 and t_params and p_params:
        # none paired through the weights (the port names them otherwise, or their order
        # failed): kind by kind in definition order, and said so
        found, left, more = _by_definition(t_params, p_params, ("torch", "Paddle"),
                                           {e["kind"] for e in t_params + p_params})
        diffs += found
        compared += more
        unpaired.append(f"{_BY_DEFINITION} ({why or 'none paired through their weights'})")
        unpaired += left
    readable = min(len(t_params) + len(_entries(torch_model)),
                   len(p_params) + len(_entries(paddle_model)))
    weighted = _weighted_on_both(t_params, p_params)
    if traces is None:
        found, left, more = _by_definition(_entries(torch_model), _entries(paddle_model),
                                           ("torch", "Paddle"), _BY_ORDER)
        report = SettingsReport(tuple(diffs + found), tuple(unpaired + left), compared + more,
                                readable=readable)
    else:
        # with traces, the layers without parameters pair in the order the data goes through
        # them, beside the calls of their kind: definition order pairs a port's activation
        # dropout (defined first) with the reference's attention dropout (called first)
        report = _with_calls(diffs, unpaired, compared, traces[0].events, traces[1].events,
                             by_call=_BY_ORDER)
        # replaced, so that the report says the paddings its forward code applies (values decide)
        report = dataclasses.replace(report, readable=readable, differ=tuple(_padded_before(
            _padded_before(report.differ, traces[0].events, 0), traces[1].events, 1)))
    return dataclasses.replace(report, unchecked=tuple(
        u for u in report.unpaired if u.split(":", 1)[0] in weighted))


def _weighted_on_both(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]]
                      ) -> set[str]:
    """The kinds of layer with parameters both sides hold some of: where their counts differ,
    layers whose settings went unchecked (a kind one side holds none of is that side's forward
    code, whose parts pair: Paddle's TransformerEncoderLayer against hand-written blocks)."""
    return {e["kind"] for e in ours} & {e["kind"] for e in theirs}


def _by_order_or_by_shape(torch_model: Any, paddle_model: Any, rules: Any) -> tuple[Any, str]:
    """``by_order_rules`` and ""; where the weights do not pair by order but the shapes say
    which few layers each side alone holds (a pooler only the port has:
    ``by_order._explain_refusal``), the rules that leave those out, and a note saying so.
    Raises where neither pairs."""
    from ..errors import KeyMismatchError
    from .by_order import _with_lone_layers, by_order_rules

    try:
        return by_order_rules(torch_model, paddle_model, rules=rules), ""
    except KeyMismatchError:
        wider = _with_lone_layers(torch_model, paddle_model, rules)
        if wider is None:
            raise
    paired = by_order_rules(torch_model, paddle_model, rules=wider)
    skip = wider.skip[len(rules.skip if rules is not None else ()):]
    only = wider.port_only[len(rules.port_only if rules is not None else ()):]
    note = (f"{_BY_SHAPE}, leaving alone the layers the shapes say "
            f"one side alone holds (torch: {', '.join(skip) or 'none'}; Paddle: "
            f"{', '.join(only) or 'none'})")
    return paired, note


def _with_calls(diffs: list[SettingDiff], unpaired: Sequence[str], compared: int,
                ours: Sequence[Any], theirs: Sequence[Any],
                sides: tuple[str, str] = ("torch", "Paddle"),
                by_call: Sequence[str] = ()) -> SettingsReport:
    """The layers' report with the traced events compared too (``calls.compare_events``): a
    kind the layers could not pair is paired by call there, and no longer said unpaired; so is
    each kind of ``by_call``, whose layers the layer settings left to the calls."""
    from .calls import compare_events

    # "maxpool: 3 in torch, 1 in Paddle"; the note on layers with parameters stays
    kind_of = {u: u.split(":", 1)[0] for u in unpaired if not u.startswith(_BY_DEFINITION)}
    call_diffs, call_unpaired, calls, paired, layers = compare_events(
        ours, theirs, sides, layer_kinds=set(kind_of.values()) | set(by_call))
    left = [u for u in unpaired if u not in kind_of or kind_of[u] not in paired]
    return SettingsReport(tuple(diffs + call_diffs), tuple(left + call_unpaired),
                          compared + layers, calls)


def waivers(check_settings: Any) -> Optional[tuple[str, ...]]:
    """``align_forward``/``align_train``'s ``check_settings``: None (no check) for False, else
    the glob patterns of the settings waived (``"layer3.0.bn1/epsilon"``, ``"*/momentum"``)."""
    from ..errors import ReprodError

    if check_settings is True:
        return ()
    if check_settings is False or check_settings is None:
        return None
    if isinstance(check_settings, str) or not all(isinstance(p, str) for p in check_settings):
        raise ReprodError(f"check_settings={check_settings!r}: give True, False or a list of "
                          "\"<Paddle layer>/<setting>\" patterns to waive (\"*/momentum\")")
    return tuple(check_settings)


def settings_checked(result: Any, torch_model: Any, paddle_model: Any,
                     torch_to_paddle: Optional[Mapping[str, str]] = None,
                     waive: Sequence[str] = (), *, by_order: bool = False,
                     traces: Optional[tuple[Any, Any]] = None,
                     optimizers: Optional[tuple[Any, Any]] = None,
                     schedulers: Optional[tuple[Any, Any, int]] = None,
                     rules: Any = None, torch_grad_clip: Any = None) -> Any:
    """``result`` with a failing key ``settings/<Paddle layer>/<setting>`` (status
    ``"setting"``) for each setting that differs and no ``waive`` pattern matches
    (``<Paddle layer>/<setting>``, glob), after the value keys, and ``options["settings"]``:
    the differences' lines, those waived, and the kinds that could not be paired.
    ``optimizers``: (torch's, Paddle's), whose hyperparameters are compared too
    (``optim_settings``; needs ``torch_to_paddle``). ``schedulers``: (torch's, Paddle's, the
    steps both took), whose learning rates are compared far past those steps
    (``lr_schedule``; needs ``optimizers``). ``torch_grad_clip``: how the torch step clips
    (``optim_settings.compare_optimizers``)."""
    from fnmatch import fnmatchcase

    from ..diff.result import KeyResult

    unpaired_layers: list[str] = []
    # weights the user loaded otherwise, that do not pair by order: the layers with parameters
    # pair by definition order, and the note says so
    report = compare_settings(torch_model, paddle_model, by_order=by_order, rules=rules,
                              torch_to_paddle=torch_to_paddle, traces=traces)
    found = list(report.differ)
    optimizer_info = None
    if optimizers is not None and torch_to_paddle is not None:
        from .optim_settings import compare_optimizers

        extra, optimizer_info = compare_optimizers(optimizers[0], optimizers[1], torch_model,
                                                   paddle_model, torch_to_paddle,
                                                   torch_grad_clip=torch_grad_clip)
        found += extra
        if schedulers is not None:
            from .lr_schedule import compare_schedules

            extra, optimizer_info["lr_schedule"] = compare_schedules(
                schedulers[0], optimizers[0], schedulers[1], optimizers[1], done=schedulers[2])
            found += extra
    diffs, waived = [], []
    for d in found:
        name = f"{d.paddle_layer}/{d.setting}"
        (waived if any(fnmatchcase(name, p) for p in waive) else diffs).append(d)
    info: dict[str, Any] = {"differ": [d.line() for d in diffs]}
    if diffs:  # both sides' names, for the finding to say which is where the values differ
        info["where"] = [[d.torch_layer, d.paddle_layer] for d in diffs]
    port_layers = dict(paddle_model.named_sublayers()) if diffs else {}
    training = [f"{d.paddle_layer}/{d.setting}" for d in diffs
                if _training_only(d, port_layers.get(d.paddle_layer))]
    if training:
        info["training_only"] = training
    if waived:
        info["waived"] = [d.line() for d in waived]
    for d in report.said:
        info.setdefault(str(_values_decide(d)), []).append(d.line())
    if report.unpaired or unpaired_layers:
        info["unpaired"] = unpaired_layers + list(report.unpaired)
    if report.nothing_compared:
        info["nothing_compared"] = report.readable
    if report.unchecked:
        info["unchecked"] = list(report.unchecked)
    if optimizer_info is not None:
        info["optimizer"] = optimizer_info
    if traces is not None:
        info["calls"] = {"compared": report.calls, "torch": len(traces[0].events),
                         "paddle": len(traces[1].events)}
        unread = [f"{side}: {line}" for side, t in zip(("torch", "Paddle"), traces)
                  for line in t.unread]
        if unread:
            info["unread"] = unread
    extra = tuple(KeyResult(key=d.key, passed=False, status="setting",
                            reason=f"{d.line()}: {_WHAT_DIFFERS[_origin(d.torch_layer, d.paddle_layer)]}")
                  for d in diffs)
    return dataclasses.replace(result, results=tuple(result.results) + extra,
                               options=dict(result.options, settings=info))


def values_failed(result: Any) -> bool:
    """Whether a key other than a setting fails: what localisation has to look for."""
    return any(not kr.passed and not kr.key.startswith("settings/") for kr in result.results)


def _origin(torch_name: str, paddle_name: str) -> str:
    """What a difference is of: "call" (its name holds the op: "Mixed_5b:avg_pool2d"),
    "optimizer" or "layer"."""
    if ":" in torch_name + paddle_name:
        return "call"
    if "optimizer" in (torch_name.split("/")[0], paddle_name.split("/")[0]):
        return "optimizer"
    return "layer"


_WHAT_DIFFERS = {"call": "the calls compute other functions",
                 "layer": "the layers compute other functions",
                 "optimizer": "the optimizers make other updates"}


def _inside_divergence(result: Any) -> Optional[tuple[str, str]]:
    """The first differing setting of the layer where localisation found the values first
    differ (or of a layer or call inside it): (its name, that layer)."""
    info = result.options.get("settings") or {}
    layer = str((result.options.get("divergence") or {}).get("layer") or "").split("#")[0]
    if not layer:
        return None
    for names in info.get("where") or ():
        for name in names:
            base = str(name).split("#")[0]
            if base == layer or base.startswith((layer + ".", layer + ":")):
                return str(name), layer
    return None


_DROPOUTS = ("dropout", "dropout2d", "dropout3d", "alphadropout", "droppath")


def _training_only(d: SettingDiff, port_layer: Any = None) -> bool:
    """A setting that acts in training only: a BatchNorm's momentum, a dropout's rate or mode
    (X2Paddle's ONNX-route ports have no dropout at all: the export leaves it out); not a
    dropout Paddle scales by ``1 - p`` in evaluation (``mode="downscale_in_infer"``, PaddleClas's
    InceptionV3 head: 0.8 where timm's passes its features on), whose rate acts there too."""
    if d.kind == "batchnorm":
        return d.setting == "momentum"
    if d.kind not in _DROPOUTS:
        return False
    downscale = "downscale_in_infer"
    if port_layer is None or not hasattr(port_layer, "mode"):  # a call: what the line says
        return downscale not in (d.torch_value, d.paddle_value)
    return not (port_layer.mode == downscale and getattr(port_layer, "p", 0))


def _waiver(names: list[str]) -> str:
    """``check_settings=`` patterns waiving ``names`` ("<Paddle layer>/<setting>"): a glob per
    momentum, the names themselves for the rest (a glob on ``p`` would waive a normalize's)."""
    patterns = sorted({"*/momentum" if n.endswith("/momentum") else n for n in names})
    return "check_settings=[" + ", ".join(f'"{p}"' for p in patterns) + "]"


def with_finding(result: Any, verbose: bool = False) -> Any:
    """``result`` with the settings that differ as its last finding (``options["findings"]``),
    printed with ``verbose``."""

    result = _values_decide_finding(result, verbose)
    info = result.options.get("settings") or {}
    lines = info.get("differ") or []
    unread = _unpaired_activations(info.get("unpaired") or ())
    if info.get("unchecked") and not info.get("nothing_compared"):
        said = ("layers with parameters not paired, so their settings went unchecked: " +
                "; ".join(info["unchecked"]) + " (pair the weights: by_order=True, or rules= "
                "with skip= for the reference's layers the port lacks and port_only= for the "
                "port's own)")
        unread = said + (f"; {unread}" if unread else "")
    if info.get("nothing_compared"):
        unread = (f"no layer setting was checked: none of the {info['nothing_compared']} layers "
                  "with settings paired with the port's (see options['settings']['unpaired']); "
                  "a wrong epsilon, stride or dropout would go unseen" +
                  (f"; {unread}" if unread else ""))
    if not lines and unread is None:
        return result
    if not lines:
        findings = [f for f in result.options.get("findings", ()) if f != unread] + [unread]
        return dataclasses.replace(result, options=dict(result.options, findings=findings))
    # a momentum acts in training only: among the five shown, what moves this forward pass first
    # (X2Paddle's ports set 35 BatchNorms' momentum wrong, and hid an epsilon behind them)
    ordered = sorted(lines, key=lambda line: ": momentum " in line)
    shown = "; ".join(ordered[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
    where = (result.options.get("settings") or {}).get("where") or []
    what = ("layer setting" if where and all(_origin(*w) == "layer" for w in where)
            else "setting")
    line = (f"{len(lines)} {what}{'s' if len(lines) > 1 else ''} of the port differ"
            f"{'s' if len(lines) == 1 else ''} from the reference's, whatever the values say: "
            f"{shown}")
    training = info.get("training_only") or []
    if training:
        who = ("it acts" if len(lines) == 1 else
               f"{'all' if len(training) == len(lines) else len(training)} of them act")
        line += (f"; {who} in training only (a BatchNorm's momentum, a dropout): a port for "
                 f"inference waives {'it' if len(training) == 1 else 'them'} with "
                 f"{_waiver(training)}")
    inside = _inside_divergence(result)
    if inside is None and any(_origin(*w) == "optimizer" for w in where) and any(
            "optimizer" in f for f in result.options.get("findings", ())):
        line += "; the optimizers' settings that differ are the likely cause"
    if inside is not None:
        name, layer = inside
        line += (f"; {name} is the layer where the values first differ: the likely cause"
                 if name.split("#")[0] == layer else
                 f"; {name} is inside {layer}, where the values first differ: the likely cause")
    if verbose:
        print(line, flush=True)
    # after where the values first differ (localisation's findings), which a setting may cause
    findings = [f for f in result.options.get("findings", ()) if f not in (line, unread)] + \
        [line] + ([unread] if unread is not None else [])
    return dataclasses.replace(result, options=dict(result.options, findings=findings))


def _values_decide_finding(result: Any, verbose: bool) -> Any:
    """``result`` with a finding for each kind of setting said and not failed
    (``_values_decide``) where values fail: alone it passes, but it is what to check first."""
    info = result.options.get("settings") or {}
    if not values_failed(result):
        return result
    lines = []
    layout = info.get("layout") or []
    if layout:
        lines.append(
            f"the port's layer{'s take' if len(layout) > 1 else ' takes'} "
            f"{'their' if len(layout) > 1 else 'its'} inputs in another layout: "
            f"{_shown(layout)} (torch's attention without batch_first takes [sequence, batch, "
            "features], Paddle's [batch, sequence, features]): a layout alone is no difference, "
            "but where the values differ, check that the port transposes its inputs as the "
            "reference does")
    reduction = info.get("reduction") or []
    if reduction and any(not kr.passed and re.search(r"(^|/)loss(/|$)", kr.key)
                         for kr in result.results):
        lines.append(
            f"the port's loss reduces otherwise: {_shown(reduction)}; a reduction alone is no "
            "difference (a sum the port divides by the count kept is the mean), but the loss "
            "differs: check that the port's loss is divided as the reference's")
    padding = info.get("padding") or []
    if padding:
        lines.append(
            f"the reference pads in its layers' forward as the input's size asks, and the port "
            f"by its own padding: {_shown(padding)}; alone that is no difference (a port may "
            "pad and crop around the layer), but where the values differ, check that the port "
            "pads as the reference does at this input's size")
    before = info.get("padded_before") or []
    if before:
        lines.append(
            f"the forward code pads before the layer on one side, and the layer pads itself on "
            f"the other: {_shown(before)}; alone that is no difference for a convolution (zeros "
            "either way), but where the values differ, check what each pads with: F.pad pads "
            "zeros, a max pool's own padding never wins its max (PaddleClas's 'SAME' pools), so "
            "the two differ wherever the values at the border are negative")
    if not lines:
        return result
    if verbose:
        for line in lines:
            print(line, flush=True)
    findings = [f for f in result.options.get("findings", ()) if f not in lines] + lines
    return dataclasses.replace(result, options=dict(result.options, findings=findings))


def _shown(lines: Sequence[str]) -> str:
    return "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")


def _unpaired_activations(unpaired: Sequence[str]) -> Optional[str]:
    """A finding for GELUs the two sides do not apply as many of, whose approximation then goes
    unchecked: a GELU computed in a model's own forward code is no call and no layer reprod
    reads, and an exact GELU for a tanh one moves float32 outputs by a few times their noise
    (Bloom's: 5e-6, 9x, under the threshold and the calibrated verdict's 20x). None where
    they pair."""
    said = [u for u in unpaired if u.startswith("gelu")]
    if not said:
        return None
    # "gelu (calls and layers): 2 in torch, 0 in Paddle": one side applies none that is read
    none = [side for u in said for side in ("torch", "Paddle") if f" 0 in {side}" in u]
    if len(none) == len(said):
        return ("GELUs not paired, so their approximations went unchecked: " + "; ".join(said) +
                f" ({' and '.join(dict.fromkeys(none))} applying none that is read: a GELU "
                "computed in a model's own forward code, or another activation; check that both "
                "sides apply the same one, approximated alike)")
    return ("GELUs not paired, so their approximations went unchecked: " + "; ".join(said) +
            " (a GELU computed in a model's own forward code is not read: check that both "
            "sides approximate it alike)")


# --- settings saved by each script -------------------------------------------------------------

FORMAT = "reprod-settings"


def _leaves_of(model: Any) -> list[tuple[str, Any]]:
    named = model.named_modules() if _framework(model) == "torch" else model.named_sublayers()
    return _leaves(named, lambda m: m.children())


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def layer_settings(model: Any) -> list[dict[str, Any]]:
    """Every layer of a known kind of a torch or Paddle model, in definition order, with its
    settings in the spelling both share: ``[{"name": "layer1.0.bn1", "kind": "batchnorm",
    "settings": {"epsilon": 1e-05, "momentum": 0.1, ...}}, ...]`` (JSON values)."""
    out = []
    for name, layer in _leaves_of(model):
        read = read_settings(layer)
        if read is not None:
            out.append(_with_weight({"name": name, "kind": read[0], "settings": {
                k: _jsonable(v) for k, v in read[1].items()}}, layer))
    return out


def save_settings(model: Any, path: Any, trace: Any = None, optimizer: Any = None,
                  scheduler: Any = None, grad_clip: Any = None) -> str:
    """Write ``layer_settings(model)`` to ``path`` (JSON, atomically) and return the path: what
    a script that cannot hold the other framework's model saves beside its dump, for
    ``compare_settings(reference_file, port_file)``. ``trace``: a ``trace_settings`` of one
    forward pass of ``model``, whose calls are saved too and compared where both files hold
    one. ``optimizer``: the script's optimizer over ``model``'s parameters, whose
    hyperparameters are saved too (``optim_settings.optimizer_record``) and compared where both
    files hold them, each parameter's weight decay paired by definition order. ``scheduler``:
    its learning-rate schedule (torch's over ``optimizer``), stepped on alone from where it is
    (``lr_schedule``), saved as its rates and compared where both files hold one: save both
    before training, or after as many steps. ``grad_clip``: how a torch script clips its
    gradients before ``optimizer.step()`` (``align_train``'s ``torch_grad_clip``: a number, a
    ``functools.partial`` of ``clip_grad_norm_`` or ``clip_grad_value_``); a Paddle optimizer
    holds its own."""
    import json
    import os
    import tempfile

    from ..errors import WriteError

    path = os.fspath(path)
    doc: dict[str, Any] = {"format": FORMAT, "version": 1, "framework": _framework(model),
                           "layers": layer_settings(model)}
    if trace is not None:
        doc["calls"] = [e.to_json() for e in trace.events]
    if grad_clip is not None and optimizer is None:
        from ..errors import ReprodError

        raise ReprodError("save_settings: grad_clip= is saved with the optimizer's settings: give "
                          "optimizer= too")
    if optimizer is not None:
        from ..errors import ReprodError
        from .grad_clip import grad_clip_of
        from .optim_settings import optimizer_record

        if grad_clip is not None and _framework(model) != "torch":
            raise ReprodError("save_settings: grad_clip= is for a torch script's step; a Paddle "
                              "optimizer holds its clipping (grad_clip=ClipGradByGlobalNorm(...))")
        record = optimizer_record(optimizer, model, grad_clip_of(grad_clip))
        if "settings" in record:
            record["settings"] = {k: _jsonable(v) for k, v in record["settings"].items()}
        doc["optimizer"] = record
    if scheduler is not None:
        from .lr_schedule import schedule_record

        schedule = schedule_record(scheduler, optimizer, _framework(model))
        if schedule is not None:
            doc["lr_schedule"] = schedule
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".settings-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise WriteError(f"{path}: cannot write the layer settings ({e.strerror or e})") from e
    return path


def _is_saved(x: Any) -> bool:
    import os

    return isinstance(x, (str, os.PathLike))


# (where from, framework, layers, traced calls or None, optimizer record or None, learning
# rates or None)
_Saved = tuple[str, str, list[dict[str, Any]], Optional[list[Any]], Optional[dict[str, Any]],
               Optional[list[float]]]


def _as_saved(x: Any) -> _Saved:
    """(where from, framework, layers, traced calls or None, optimizer or None) of a settings
    file or a model."""
    import json
    import os

    from ..errors import ReprodError

    if not _is_saved(x):  # as a file would read back
        return type(x).__name__, _framework(x), [
            dict(e, settings={k: _from_json(v) for k, v in e["settings"].items()})
            for e in layer_settings(x)], None, None, None
    path = os.fspath(x)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReprodError(f"{path}: not a layer settings file ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or \
            not isinstance(doc.get("layers"), list):
        raise ReprodError(f"{path}: not a layer settings file (save_settings writes them)")
    layers = []
    for i, entry in enumerate(doc["layers"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("kind"), str)
                and isinstance(entry.get("settings"), dict)):
            raise ReprodError(f"{path}: layer #{i} is not {{name, kind, settings}}")
        layers.append({"name": entry["name"], "kind": entry["kind"],
                       "settings": {k: _from_json(v) for k, v in entry["settings"].items()}})
        weight = entry.get("weight")
        if isinstance(weight, list) and all(isinstance(d, int) for d in weight):
            layers[-1]["weight"] = weight  # files before it hold none: pairing as before
    calls = None
    if doc.get("calls") is not None:
        from .calls import OpEvent

        if not isinstance(doc["calls"], list):
            raise ReprodError(f"{path}: its calls are not a list")
        calls = []
        for i, entry in enumerate(doc["calls"]):
            try:
                calls.append(OpEvent.from_json(entry))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ReprodError(f"{path}: call #{i} is not {{kind, op, name, layer, settings}}"
                                  f" ({type(e).__name__}: {e})") from e
    rates = doc.get("lr_schedule")
    if rates is not None:
        rates = rates.get("lrs") if isinstance(rates, dict) else None
        if not (isinstance(rates, list) and all(isinstance(v, (int, float)) and
                                                not isinstance(v, bool) for v in rates)):
            raise ReprodError(f"{path}: its lr_schedule is not {{lrs: [rate, ...]}}")
    return (path, str(doc.get("framework", "?")), layers, calls, _saved_optimizer(path, doc),
            rates)


def _saved_optimizer(path: str, doc: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    from ..errors import ReprodError

    rec = doc.get("optimizer")
    if rec is None:
        return None
    if isinstance(rec, dict) and isinstance(rec.get("skipped"), str):
        return dict(rec)
    ok = isinstance(rec, dict) and isinstance(rec.get("settings"), dict) and \
        isinstance(rec.get("decay"), list) and all(
            isinstance(d, list) and len(d) == 2 and all(isinstance(v, str) for v in d)
            for d in rec["decay"])
    if not ok:
        raise ReprodError(f"{path}: its optimizer is not {{settings, decay: [[parameter, "
                          "decay], ...]}}")
    return dict(rec, settings={k: _from_json(v) for k, v in rec["settings"].items()})


_SIDE = {"torch": "torch", "paddle": "Paddle"}


def _compare_saved(a: _Saved, b: _Saved) -> SettingsReport:
    """Each kind's layers paired by order where both sides have as many; the calls too where
    both sides hold them."""
    sides = (_SIDE.get(a[1], a[1]), _SIDE.get(b[1], b[1]))
    if sides[0] == sides[1]:
        sides = (f"{sides[0]} (reference)", f"{sides[1]} (port)")
    kinds: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for side, layers in ((0, a[2]), (1, b[2])):
        for entry in layers:
            kinds.setdefault(entry["kind"], ([], []))[side].append(entry)
    diffs, unpaired = [], []
    compared = 0
    traced = a[3] is not None and b[3] is not None
    for kind, (ours, theirs) in kinds.items():
        if kind in _BY_ORDER:
            continue  # paired in call order with the calls (compare_settings says why), or below
        if len(ours) != len(theirs):
            unpaired.append(f"{kind}: {len(ours)} in {sides[0]}, {len(theirs)} in {sides[1]}")
            continue
        compared += len(ours)
        for x, y in zip(ours, _by_weight(ours, theirs)):
            for setting, xv, yv in _differences(kind, x["settings"], y["settings"]):
                diffs.append(SettingDiff(x["name"], y["name"], setting, xv, yv, kind, sides))
    if not traced:
        found, left, more = _by_definition(a[2], b[2], sides, _BY_ORDER)
        diffs += found
        unpaired += left
        compared += more
    if a[4] is not None and b[4] is not None:
        from .optim_settings import compare_records

        found, info = compare_records(a[4], b[4], None, sides)
        diffs += found
        if "unpaired" in info.get("weight_decay", {}):
            unpaired.append(f"optimizer parameters: {info['weight_decay']['unpaired']}")
        if "skipped" in info:
            unpaired.append(f"optimizer: {info['skipped']}")
    if a[5] is not None and b[5] is not None:
        from .lr_schedule import first_parting

        found_at = first_parting(a[5], b[5], done=0, sides=sides)
        if found_at is not None:
            diffs.append(found_at)
    if not traced:
        return SettingsReport(tuple(diffs), tuple(unpaired), compared)
    return _with_calls(diffs, unpaired, compared, a[3], b[3], sides, by_call=_BY_ORDER)
