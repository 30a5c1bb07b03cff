"""Where a failing forward pass goes wrong, and why: ``align_forward``'s localisation.

When the outputs differ, both models run once more under ``reprod.capture.record`` on the same
inputs; the captures are paired by layer name (or by call order, ``by_order=True``), judged
with the forward check's criteria (against the float64 twin's capture with ``calibrate=True``),
and ``first_divergence`` names the first layer whose output differs while its input aligns.
``reprod.diagnose`` then checks that layer's numbers against the known differences it knows
(activation variants, BatchNorm / LayerNorm epsilon), reading the epsilons and statistics from
the torch model, so a hint appears only where the magnitudes fit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from ..adapters import to_numpy
from .fusion import (
    layout_hint,
    model_fusions,
    split_captures,
    split_layout_hint,
    stray_hint,
)
from .rules import active_splits

__all__ = ["Localisation", "localise_forward"]


@dataclass(frozen=True)
class Localisation:
    """What the layer captures say: ``divergence`` (``reprod.capture.Divergence`` or None),
    ``hint`` (a diagnosis of that layer whose numbers fit, or None), ``result`` (the layer
    captures' ``DiffResult``, with diagnoses in failing keys' notes), ``ref``/``port`` (the two
    captures, the port's keys renamed to the reference's when paired by order)."""

    divergence: Any
    hint: Optional[str]
    result: Any
    ref: Mapping[str, Any]
    port: Mapping[str, Any]
    by_order: bool = False
    backward: bool = False
    # paired by order: reference layer -> the port's layer of another name
    port_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def port_layer(self) -> Optional[str]:
        """The port's name of the layer named, where pairing by order paired it with a layer
        of another name (``time_embedding.act#5`` is the port's
        ``down_blocks.1.resnets.0.nonlinearity``); None otherwise."""
        if self.divergence is None or not self.divergence.layer:
            return None
        name = self.divergence.layer.partition("#")[0]
        port = self.port_names.get(self.divergence.layer) or self.port_names.get(name)
        folded = getattr(self.divergence, "folded", None)
        if port is None and folded is not None:  # a port layer computing two of the reference's
            port = self.port_names.get(folded) or self.port_names.get(folded.partition("#")[0])
        return port if port is not None and port != self.divergence.layer else None

    @property
    def findings(self) -> list[str]:
        """One-line sentences for a report: where, then why (when a diagnosis fits)."""
        if self.divergence is not None and self.divergence.kind == "unpaired":
            if not self.by_order:
                return [f"{self.divergence.message} (align_forward: by_order=True)"]
            d = self.divergence
            return [f"layer calls do not pair even by call order: only {d.paired} of {d.calls} "
                    f"pair ({d.one_sided} capture keys on one side only), so nothing is shown to "
                    "align; the two models' layers differ beyond what call order pairs: name the "
                    "pairs with rename rules (reprod.capture.rename) and compare the captures"]
        if self.divergence is None and self.backward:
            return [
                "the layer captures align, gradients included, although the parameters' "
                "gradients differ: the difference arises outside the recorded layers (the loss, "
                "or a parameter used outside any layer's forward)"
            ]
        if self.divergence is None:
            return [
                "the layer captures align although the outputs differ: the difference arises "
                "outside the recorded layers (the model's own forward code after its last layer)"
            ]
        lines = [self.divergence.message]
        if self.hint:
            # the label the hint starts with: the layer's type, or the reference's class where
            # the two classes differ ("Bottleneck vs BottleneckBlock")
            kind = self.divergence.layer_type or ""
            why = self.hint
            for label in (f"{kind}: ", f"{kind.split(' vs ')[0]}: "):
                if kind and why.startswith(label):
                    why = why[len(label):]
                    break
            lines.append(f"likely cause at {self.divergence.layer}: {why}")
        return lines


def _capture(model: Any, call: Any, containers: bool = True, backward: bool = False
             ) -> dict[str, Any]:
    from ..capture import record

    with record(model, containers=containers, backward=backward) as log:
        call()
    return dict(log.data)


def _weight_anchors(torch_model: Any, paddle_model: Any, rules: Any = None) -> dict[str, str]:
    """Paddle layer -> torch layer for the layers owning parameters, from the weights' pairing by
    definition order under ``rules``; where that is refused but the shapes say which few layers
    one side alone holds (a pooler only the port has), without those; empty where the weights
    do not pair: shapes alone then decide."""
    from ..errors import ReprodError
    from .by_order import _with_lone_layers, pair_weights_by_order

    try:
        pairs = pair_weights_by_order(torch_model, paddle_model, rules=rules)
    except ReprodError:
        wider = _with_lone_layers(torch_model, paddle_model, rules)
        if wider is None:
            return {}
        pairs = pair_weights_by_order(torch_model, paddle_model, rules=wider)
    return {p.rpartition(".")[0]: t.rpartition(".")[0] for t, p in pairs.items()}


def _port_blocks_as_leaves(torch_model: Any, paddle_model: Any, anchors: Mapping[str, str],
                           ref: Mapping[str, Any]) -> dict[str, str]:
    """Port block -> the reference leaf whose weights its layers hold, where by order (leaves
    only) the two would not meet: torch's ``MultiheadAttention`` holds ``in_proj_weight`` itself
    and applies its ``out_proj`` as a function, one leaf call, where Paddle's calls ``q_proj``,
    ``k_proj``, ``v_proj`` and ``out_proj``, four leaves and no weights of its own. A port layer
    whose every layer with weights pairs inside one reference leaf (by ``anchors``, Paddle layer
    -> torch layer), two of them at least, is recorded whole in place of its sublayers. Only
    a reference leaf none of whose sublayers the reference's capture ``ref`` records counts:
    torchvision's ViT ``Encoder`` holds ``pos_embedding`` itself, and its blocks are recorded."""
    from ..capture._torch import _TorchBackend

    leaf = _TorchBackend().is_leaf
    recorded = {s.partition("#")[0] for s in map(_subject, ref) if s is not None}
    holders = [name for name, m in torch_model.named_modules()
               if name and _has_sublayers(m) and leaf(m)
               and not any(r.startswith(name + ".") for r in recorded)]
    if not holders:
        return {}

    def holder(t: str) -> Optional[str]:
        return next((h for h in holders if t == h or t.startswith(h + ".")), None)

    groups: dict[str, list[str]] = {}
    for p, t in anchors.items():
        h = holder(t)
        if h is not None:
            groups.setdefault(h, []).append(p)
    weighted = [name for name, layer in _named(paddle_model)
                if name and any(True for _ in layer.named_parameters(include_sublayers=False))]
    out: dict[str, str] = {}
    for h, ports in groups.items():
        if len(ports) < 2:
            continue
        parts = [p.split(".") for p in ports]
        common = []
        for level in zip(*parts):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        block = ".".join(common)
        if not block or block in ports:
            continue
        inside = [n for n in weighted if n.startswith(block + ".")]
        if inside and all(holder(anchors.get(n, "")) == h for n in inside):
            out[block] = h
    return out


def _leaves_and_blocks(capture: Mapping[str, Any], paddle_model: Any, blocks: Mapping[str, str]
                       ) -> dict[str, Any]:
    """A capture of every layer (``containers=True``) cut to what a leaves-only one holds, with
    each of ``blocks`` in place of its sublayers (``_port_blocks_as_leaves``)."""
    from ..capture._paddle import _PaddleBackend
    from ..capture.naming import ROOT

    leaf = _PaddleBackend().is_leaf
    inside = tuple(b + "." for b in blocks)
    kept = {name for name, layer in _named(paddle_model)
            if name and leaf(layer) and not name.startswith(inside)} | set(blocks) | {ROOT}
    out = {}
    for key, value in capture.items():
        subject = _subject(key)
        if subject is None or subject.partition("#")[0] in kept:
            out[key] = value
    return out


def _order_rules(torch_model: Any, paddle_model: Any, rules: Any) -> Any:
    """``rules`` with the weights' pairing by order in them (where they pair), under which the
    reference's parts a port tensor fuses are named beside it (``by_order._fused_order``)."""
    from ..errors import ReprodError
    from .by_order import by_order_rules

    if rules is not None and rules.pairs:
        return rules
    try:
        return by_order_rules(torch_model, paddle_model, rules=rules)
    except ReprodError:
        return rules


def _rule_anchors(torch_model: Any, rules: Any) -> dict[str, str]:
    """Paddle layer -> torch layer for the layers owning parameters, as ``rules`` name their
    weights; empty where the rules rename no layer (names pair as they are)."""
    from .framework import _torch_params_plan

    out = {kp.paddle_name.rpartition(".")[0]: name.rpartition(".")[0]
           for name, kp in _torch_params_plan(torch_model, rules).items() if kp.paddle_name}
    return out if any(p != t for p, t in out.items()) else {}


def _torch_context(torch_model: Any, capture: Optional[Mapping[str, Any]] = None
                   ) -> dict[str, dict[str, Any]]:
    """Per normalisation layer of the reference, what ``reprod.diagnose`` needs to test an
    epsilon: the variance BatchNorm normalised with (its running variance; in training mode the
    batch's, from its input in ``capture``), epsilon and shift; LayerNorm's epsilon and affine."""
    import numpy as np
    import torch

    from .settings import _layer_kind, _rms_epsilon

    ctx: dict[str, dict[str, Any]] = {}
    for name, m in torch_model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            var = to_numpy(m.running_var).array
            x = None if capture is None or not m.training else capture.get(f"{name}.in")
            if x is not None and np.ndim(x) >= 2:
                a = np.asarray(x, dtype=np.float64)
                var = a.var(axis=tuple(i for i in range(a.ndim) if i != 1))  # biased, as it uses
            ctx[name] = {
                "var": var,
                "eps": float(m.eps),
                "beta": None if m.bias is None else to_numpy(m.bias.detach()).array,
            }
        elif _layer_kind(m)[0] == "rmsnorm":  # torch's, Hugging Face's (Llama's, T5's)
            eps = _rms_epsilon(m)
            ctx[name] = {
                "eps": float(np.finfo(np.float32).eps) if not isinstance(eps, float) else eps,
                "weight": None if getattr(m, "weight", None) is None
                else to_numpy(m.weight.detach()).array,
                "rms": True,
            }
        elif isinstance(m, torch.nn.LayerNorm):
            ctx[name] = {
                "eps": float(m.eps),
                "normalized_ndim": len(m.normalized_shape),
                "weight": None if m.weight is None else to_numpy(m.weight.detach()).array,
                "bias": None if m.bias is None else to_numpy(m.bias.detach()).array,
            }
    return ctx


def _column_packed(torch_model: Any) -> dict[str, tuple[str, int]]:
    """Each layer computing q, k and v side by side in one output (Hugging Face GPT-2's Conv1D
    ``c_attn``) -> (the prefix its slices' layers are named under, E)."""
    from .rules import _packings

    return {src[: -len(".weight")]: (prefix, e)
            for src, (prefix, what, e, axis, _, _) in _packings(torch_model.state_dict()).items()
            if what == "weight" and axis == 1}


def _split_packed(capture: dict[str, Any], packed: Mapping[str, tuple[str, int]]
                  ) -> dict[str, Any]:
    """A torch capture with each packed ``c_attn`` call as three layer calls, ``q_proj``,
    ``k_proj`` and ``v_proj`` under its attention's prefix, as a port holding three Linears
    calls them and as ``split_attention`` names their weights (whose pairing anchors them):
    each takes the call's input and its E columns of the output (and of its output's and its
    weight's gradients). The input's gradient, a sum over the three, is left out."""
    if not packed:
        return capture
    from ..capture.naming import parse_key

    out: dict[str, Any] = {}
    for key, value in capture.items():
        parsed = parse_key(key)
        layer = None if parsed is None else (
            parsed.name.rpartition(".")[0] if parsed.is_param else parsed.name)
        if layer not in packed or (parsed.is_param and not parsed.name.endswith((".weight",
                                                                                ".bias"))):
            out[key] = value
            continue
        prefix, e = packed[layer]
        if parsed.what == "grad_in" or (parsed.what != "in" and np.shape(value)[-1:] != (3 * e,)):
            continue
        for i, q in enumerate("qkv"):
            part = value if parsed.what == "in" else value[..., i * e:(i + 1) * e]
            name = f"{prefix}{q}_proj"
            if parsed.is_param:
                name += "." + parsed.name.rpartition(".")[2]
            out[str(parsed.with_name(name))] = part
    return out


def _broadcast(ref: dict[str, Any], port: dict[str, Any], noise: Optional[dict[str, Any]]
               ) -> tuple[dict[str, Any], dict[str, Any], Optional[dict[str, Any]]]:
    """Captures whose shapes differ where one side holds a size-1 axis the other repeats, or
    lacks leading axes the other has (Hugging Face's BERT embeds position ids of shape [1, L],
    PaddleNLP's of [B, L]; PaddleNLP's BART position embedding gives [L, E], HF's [B, L, E]),
    each side as the larger shape: the values then judge them, as the model broadcasts them, not
    the shapes. The trees are returned as they came where nothing broadcasts, and otherwise as
    copies of their own type (a ``Derived`` reference keeps what it derives)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key in ref.keys() & port.keys():
        sa, sb = np.shape(ref[key]), np.shape(port[key])
        if sa == sb or not sa or not sb:
            continue
        sa, sb = (1,) * (len(sb) - len(sa)) + sa, (1,) * (len(sa) - len(sb)) + sb
        if not all(x == y or 1 in (x, y) for x, y in zip(sa, sb)):
            continue
        shape = tuple(max(x, y) for x, y in zip(sa, sb))
        if 0 not in shape and (shape == sa or shape == sb):
            shapes[key] = shape  # else each side short of the other somewhere: other tensors
    if not shapes:
        return ref, port, noise

    def wide(value: Any, shape: tuple[int, ...]) -> Any:
        try:
            return np.broadcast_to(value, shape)
        except ValueError:  # a noise value of another shape: left to fail as it would
            return value

    def widened(tree: Any) -> Any:
        data = {k: wide(v, shapes[k]) if k in shapes and np.shape(v) != shapes[k] else v
                for k, v in tree.items()}
        return Derived(data, tree.derived) if isinstance(tree, Derived) else data

    from ..diff.pairing import Derived

    return widened(ref), widened(port), None if noise is None else widened(noise)


def _alike(ref: Any, port: dict[str, Any], noise: Optional[dict[str, Any]], criteria: Any
           ) -> tuple[Any, dict[str, Any], Optional[dict[str, Any]]]:
    """The two captures (and the noise reference) as they are judged: axes one side repeats or
    merges taken as the other's (``_broadcast``, ``_merged``), masks both apply set alike
    (``_masked_alike``), and axes in another order transposed to the reference's
    (``_permuted``): the values then judge them, not the layouts."""
    ref, port, noise = _broadcast(ref, _merged(ref, port), noise)
    return ref, _permuted(ref, _masked_alike(ref, port), criteria, noise), noise


def _merged(ref: Any, port: dict[str, Any]) -> dict[str, Any]:
    """``port`` with each capture that holds the reference's values with its leading axes
    merged or split otherwise (Hugging Face's OPT flattens a layer's hidden states to [B*L, E]
    before its feed-forward part, PaddleNLP's keeps [B, L, E]) in the reference's shape: the
    values then judge them. Only where the last axis agrees and the sizes do: a tensor laid out
    otherwise still differs, by its values."""
    out = port
    for key in ref.keys() & port.keys():
        sa, sb = np.shape(ref[key]), np.shape(port[key])
        if sa == sb or len(sa) == len(sb) or not sa or not sb or sa[-1] != sb[-1] or \
                int(np.prod(sa)) != int(np.prod(sb)):
            continue
        if out is port:
            out = dict(port)
        out[key] = np.reshape(port[key], sa)
    return out


# an additive attention mask's value at or below which softmax gives exactly 0 (exp underflows
# below -745 even in float64); PaddleNLP's -1e4 plus a position bias of either sign is above -1e4
MASKED = -1e3


def _masked_alike(ref: Any, port: dict[str, Any]) -> dict[str, Any]:
    """``port`` with each capture's masked entries, where both sides hold an additive attention
    mask (at or below ``MASKED``), set to the reference's: Hugging Face masks with float32's
    lowest value, PaddleNLP with -1e4, and softmax gives 0 for both (T5 adds its mask to the
    position bias it passes on from block to block). A mask on one side alone still differs."""
    out = port
    for key in ref.keys() & port.keys():
        a, b = ref[key], port[key]
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape \
                or a.dtype.kind != "f" or b.dtype.kind != "f" or not a.size:
            continue
        if a.min() > MASKED or b.min() > MASKED:
            continue
        both = (a <= MASKED) & (b <= MASKED)
        if both.any() and not np.array_equal(a[both], b[both]):
            if out is port:
                out = dict(port)
            out[key] = np.where(both, a, b)
    return out


# axis permutations tried on a capture of rank above this are too many (6! = 720 arrangements)
_MAX_PERMUTED_RANK = 5


def _permutations(have: tuple[int, ...], want: tuple[int, ...]) -> list[Callable[[Any], Any]]:
    """The transpositions of an array shaped ``have`` into ``want``, of one rank."""
    from itertools import permutations

    if have == want or len(have) != len(want) or not 2 <= len(have) <= _MAX_PERMUTED_RANK or \
            sorted(have) != sorted(want):
        return []
    return [functools.partial(np.transpose, axes=axes) for axes in permutations(range(len(have)))
            if tuple(have[i] for i in axes) == want]


def _head_splits(have: tuple[int, ...], want: tuple[int, ...]) -> list[Callable[[Any], Any]]:
    """The ways an array shaped ``have`` holds ``want``'s values with one axis split in two and
    the axes in another order, or the reverse: PaddleNLP's BigBird projects its query with a
    ``Linear3D`` giving [B, H, L, D], HF's ``Linear`` [B, L, H * D]."""
    from itertools import permutations

    if abs(len(have) - len(want)) != 1 or int(np.prod(have)) != int(np.prod(want)):
        return []
    hi = have if len(have) > len(want) else want
    if not 3 <= len(hi) <= _MAX_PERMUTED_RANK:
        return []
    lo = want if hi is have else have
    ways: list[Callable[[Any], Any]] = []
    for axes in permutations(range(len(hi))):
        moved = tuple(hi[i] for i in axes)
        for at in range(len(moved) - 1):
            if moved[:at] + (moved[at] * moved[at + 1],) + moved[at + 2:] != lo:
                continue
            if hi is have:  # transposed, then two axes merged
                ways.append(lambda b, axes=axes: np.reshape(np.transpose(b, axes), want))
            else:  # one axis split, then transposed back
                back = tuple(int(i) for i in np.argsort(axes))
                ways.append(lambda b, moved=moved, back=back:
                            np.transpose(np.reshape(b, moved), back))
    return ways


def _permuted(ref: Any, port: dict[str, Any], criteria: Any, noise: Any) -> dict[str, Any]:
    """``port`` with each capture that holds the reference's values laid out otherwise in the
    reference's layout: its axes in another order (HF's Llama-family attention hands its rotary
    embedding [B, H, L, D], PaddleNLP's [B, L, H, D]), or also one axis split in two (PaddleNLP's
    BigBird query [B, H, L, D] against HF's [B, L, E]): of the layouts that map its shape onto the
    reference's, those whose values then pass ``criteria`` (against ``noise`` where calibrated),
    and of them the one whose values differ least. Where sizes repeat (B == H) several layouts
    fit the shapes and the values decide. A capture no layout makes agree is laid out as the
    captures of the same two shapes that agree are (a bug before a rotary embedding changes its
    query's values, not their layout), and otherwise stays as it was, to fail on its shape.
    Shapes that agree are never permuted: with H == L a bug that transposes the two could not be
    told from a layout."""
    from ..diff.engine import compare

    derived = getattr(ref, "derived", {})
    out = port
    learnt: dict[tuple[tuple[int, ...], tuple[int, ...]], Callable[[Any], Any]] = {}
    left: list[str] = []
    for key in sorted(ref.keys() & port.keys()):
        a, b = ref[key], port[key]
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or key in derived or \
                a.shape == b.shape:
            continue
        ways = _permutations(b.shape, a.shape) or _head_splits(b.shape, a.shape)
        if not ways:
            continue
        fits = []
        for n, way in enumerate(ways):
            gap = np.abs(way(b).astype(np.float64) - a) if a.size else np.zeros(1)
            worst = float(np.max(gap))
            fits.append((worst if worst == worst else np.inf, n))  # NaN: tried last
        for _, n in sorted(fits):
            moved = ways[n](b)
            judged = compare({key: a}, {key: moved}, criteria=criteria,
                             noise=None if noise is None or key not in noise else {key: noise[key]})
            if judged[key].passed:
                if out is port:
                    out = dict(port)
                out[key] = moved
                learnt.setdefault((b.shape, a.shape), ways[n])
                break
        else:
            left.append(key)
    # a capture whose values differ, laid out as others that agree (the query handed to a rotary
    # embedding after a bug, beside the key that aligns), is judged by its values in that layout
    for key in left:
        way = learnt.get((port[key].shape, ref[key].shape))
        if way is not None:
            if out is port:
                out = dict(port)
            out[key] = way(port[key])
    return out


def localise_forward(
    torch_model: Any,
    paddle_model: Any,
    run_torch: Any,
    run_paddle: Any,
    *,
    by_order: bool,
    criteria: Any,
    run_twin: Any = None,
    backward: bool = False,
    ref_layout: Any = None,
    rules: Any = None,
) -> Localisation:
    """Capture both models' layers (``run_*``: no-argument callables running one forward pass
    in the right mode), pair, judge and diagnose them. ``run_twin`` runs the float64 twin, whose
    capture becomes the noise reference. ``backward=True``: the callables run a training step's
    forward, loss and backward, the gradients are captured too, and where the forward aligns the
    first layer whose gradients differ is named (``align_train``); ``ref_layout`` maps the
    reference's (and the twin's) captures to the port's layout (torch Linear weights' gradients
    transposed). ``rules``: the user's conversion rules (skips, ``port_only``), under which
    the weights pair by order; without ``by_order``, where they rename the port's layers (a
    porter's own pairs, ``ConversionRules.from_pairs``), the captures pair by call order
    anchored on the layers they pair, as by order: by name they would not pair at all."""
    from ..capture import first_divergence, layer_types
    from ..capture.kinks.fused import fused_activations
    from ..capture.naming import (
        ROOT,
        _applied_as_functions,
        _derive,
        _fused,
        _pair_all,
        _renamed,
        pair_inputs,
    )
    from ..diagnose import diagnose
    from ..diff.engine import compare
    from .call_order import crossed_hint, crossing

    # between the layers the weights pair, pairing by call order reads only shapes, and a
    # container and a leaf with the same in/out shapes would pair: by order, leaf layers only
    anchors = None if by_order or rules is None else _rule_anchors(torch_model, rules)
    if anchors:
        by_order = True
    containers = not by_order
    packed = _column_packed(torch_model) if by_order else {}
    ref = _split_packed(_capture(torch_model, run_torch, containers, backward), packed)
    blocks: dict[str, str] = {}
    by_weights = by_order and not anchors  # the weights' pairing by order anchors the calls
    if by_weights:
        anchors = _weight_anchors(torch_model, paddle_model, rules)
    # a port Linear holding several of the reference's (PaddleNLP's qkv_proj for q_proj, k_proj
    # and v_proj) is judged as those, its output cut as its weights lie
    strays: list[Any] = []  # fused port tensors holding the parts in no layout
    fusions = model_fusions(torch_model, paddle_model, _order_rules(
        torch_model, paddle_model, rules) if by_order else rules, strays)
    if by_order and anchors:
        # a fused layer is anchored where its parts are: a port block of fused layers whose
        # parts one reference leaf holds (PaddleClas's attention against torch's) is that leaf
        fused = {f.port_key.rpartition(".")[0]: anchors[part]
                 for f, _ in fusions if (part := f.parts[0].rpartition(".")[0]) in anchors}
        blocks = _port_blocks_as_leaves(torch_model, paddle_model, {**anchors, **fused}, ref)
    if blocks:
        raw = _leaves_and_blocks(_capture(paddle_model, run_paddle, True, backward),
                                 paddle_model, blocks)
        anchors = {**{p: t for p, t in anchors.items()
                      if not p.startswith(tuple(b + "." for b in blocks))}, **blocks}
    else:
        raw = _capture(paddle_model, run_paddle, containers, backward)
    # a port defining sibling layers in another order than the reference pairs them crossed
    # by definition order: where its weights were loaded by call order, the calls anchor so
    crossed = crossing(torch_model, paddle_model, rules, ref, raw) \
        if by_weights and anchors else None
    if crossed is not None and crossed.held == "calls":
        anchors = {**anchors, **crossed.anchors()}
    if by_order and anchors:
        raw, anchors = _wrappers_for_shapes(paddle_model, run_paddle, anchors, ref, raw)
    if ref_layout is not None:
        ref = ref_layout(ref)
    # and the reverse, a reference layer holding several of the port's (Phi-3's qkv_proj for
    # a port's q_proj, k_proj, v_proj), judged as those
    splits = active_splits()
    if fusions or splits:
        ref, raw = split_captures(ref, raw, [f for f, _ in fusions], splits)
    # calls that compute nothing (an Identity, an eval-mode dropout or drop path: output is
    # input) and have no counterpart: timm's ViT holds 18 Identity placeholders a port does
    # without, and counted as unpaired they made "layer names do not pair" the answer
    inert = (_inert(torch_model), _inert(paddle_model))
    ref, raw = _without_inert(ref, raw, inert[0]), _without_inert(raw, ref, inert[1])
    names: dict[str, str] = {}  # port layer -> reference layer
    port = raw
    superseded: set[str] = set()  # reference keys a fused port layer computes nothing for
    derived: dict[str, str] = {}  # reference keys set against a function of their value
    functions: dict[str, Any] = {}  # the port's side of reference layers it applies as functions
    pairing = None
    apart: dict[str, str] = {}  # reference norm -> its activation, recorded apart
    if by_order and anchors:
        # a reference norm holding its activation (timm's BatchNormAct2d) whose weights the
        # port's fused BatchNorm(act=...) holds is recorded whole, its sublayers left out:
        # else the port's norm paired with the activation inside, whose input is the
        # normalised one
        ref = _without_sublayers(ref, _fused_norm_pairs(torch_model, paddle_model, anchors))
        # and one whose weights a port's plain norm holds, the port applying the activation
        # after it as a function (PaddleClas's EfficientNet: BatchNorm, then F.swish), is
        # recorded as the norm and the activation after it: else the port's norm paired with
        # the activation inside, and a faithful port failed its layers
        apart = _norms_apart(torch_model, paddle_model, anchors, ref)
        ref = _norm_apart(ref, apart)
    elif not by_order:  # by name, the same: a port's bn, then F.silu, against timm's bn1
        apart = _norms_apart(torch_model, paddle_model,
                             {n: n for n, _ in _named(paddle_model) if n}, ref)
        ref = _norm_apart(ref, apart)
    if by_order:
        pairing = _pair_all(ref, raw, anchors or {},
                            inert=inert,
                            kinds=(layer_types(torch_model), layer_types(paddle_model)),
                            apart=apart)
        parts, superseded, derived = _fused(ref, raw, pairing.calls, pairing.ref_leaves)
        port = _renamed(raw, pairing.calls, parts)
        functions = _applied_as_functions(ref, port, pairing, set(parts.values()))
        port.update(functions)
        names = {o.partition("#")[0]: r.partition("#")[0] for o, r in pairing.calls.items()}
    elif fused_activations(paddle_model):
        # by name too, Paddle's BatchNorm(act="relu") gives what the reference's ReLU after its
        # norm gives: a faithful port with the reference's names failed its norm (102x)
        boxes = {n for n, m in torch_model.named_modules()
                 if not n or any(True for _ in m.children())}
        order = list(dict.fromkeys(
            subject for k in ref if (subject := _subject(k)) is not None
            and subject.partition("#")[0] not in boxes
            and subject.partition("#")[0] not in inert[0]))
        same = {s: s for s in order if f"{s}.out" in raw}
        parts, superseded, derived = _fused(ref, raw, same, order)
        if parts:
            port = _renamed(raw, {}, parts)
    # an input passed by keyword on one side and by position on the other (HF's
    # self_attn(hidden_states=...) against PaddleNLP's self_attn(x)) pairs by its values: else
    # the layer's input never aligns, and a divergence inside it is named at the block around it
    port = pair_inputs(ref, port)
    noise = None if run_twin is None else _norm_apart(_split_packed(
        _capture(run_twin[0], run_twin[1], containers, backward), packed), apart)
    if noise is not None and ref_layout is not None:
        noise = ref_layout(noise)
    if noise is not None and splits:
        noise = split_captures(noise, {}, (), splits)[0]
    judged = _derive({k: v for k, v in ref.items() if k not in superseded}, derived)
    judged, port, noise = _alike(judged, port, noise, criteria)
    plain = compare(judged, port, criteria=criteria, noise=noise)
    ptypes = layer_types(paddle_model)
    types: dict[str, tuple[str, Optional[str]]] = {
        name: (cls, None) for name, cls in layer_types(torch_model).items()
    }
    for layer, (prefix, e) in packed.items():
        for i, q in enumerate("qkv"):
            types[f"{prefix}{q}_proj"] = (f"{layer.rpartition('.')[2]}[..., {i * e}:{(i + 1) * e}]",
                                          None)
    for pname, cls in ptypes.items():
        rname = names.get(pname, pname)
        if rname in types:
            types[rname] = (types[rname][0], cls)
    # BatchNorm2d and BatchNorm2D are one layer: the port's class is named only where it differs
    types = {
        k: (r, None if p is None or p.lower() == r.lower() else p) for k, (r, p) in types.items()
    }
    result = diagnose(
        plain,
        {**ref, **{k: judged[k] for k in derived if k in judged}},  # what each key was set against
        port,
        layer_types={k: tuple(t for t in v if t) for k, v in types.items()},
        context=_torch_context(torch_model, ref),
    )
    labels = {k: _type_label(v) for k, v in types.items()}
    for key in functions:
        subject = _subject(key)
        layer = None if subject is None else subject.partition("#")[0]
        if layer in labels:
            labels[layer] = f"{types[layer][0]} vs " + (
                "nothing in the port: its data passes unchanged" if _passes_unchanged(
                    functions, subject) else "a function in the port")
    flows = None if pairing is None else pairing.calls
    carried = _carried(result, judged, port, paddle_model, run_paddle, raw, containers, flows)
    div = _with_factors(first_divergence(result, layer_types=labels, carried=carried),
                        judged, port)
    hint = _hint_of(div, plain)
    if hint is None and div is not None and div.kind == "layer" and div.input_aligned:
        hint = _untransposed(div.layer.partition("#")[0], torch_model, paddle_model, names)
    if hint is None and div is not None and div.kind == "layer" and div.input_aligned:
        hint = _own_parameters(div.layer.partition("#")[0], torch_model, paddle_model, names)
    if hint is None and pairing is None and div is not None and div.kind == "layer" \
            and div.input_aligned and div.direction == "forward":
        hint = _fused_layout(div, fusions, paddle_model, run_paddle, judged, noise,
                             criteria, containers)
        if hint is None and strays:
            layer = div.layer.partition("#")[0]
            hint = stray_hint("" if layer == ROOT else layer, strays)
    # what the fused or split tensors hold, found from their values or by running the port
    # again: true of the block found below too, where the leaves' hints are not
    layout = None
    rename = None if pairing is None else (lambda got: _renamed(got, pairing.calls, parts))
    if hint is None and splits and div is not None and div.kind == "layer" \
            and div.input_aligned and div.direction == "forward":
        hint = layout = _split_hint(div, splits, torch_model, paddle_model, run_paddle, judged,
                                    noise, criteria, containers, pairing, rename, fusions)
    if hint is None and pairing is not None and splits and div is not None \
            and div.kind == "layer" and div.input_aligned is False and div.previous is not None \
            and div.direction == "forward":
        # by order only leaves are recorded: the code reading the parts lies between the last
        # part and the next leaf, whose input is judged
        hint = layout = _split_layout_by_order(div, splits, torch_model, paddle_model,
                                               run_paddle, judged, noise, criteria, containers,
                                               rename, fusions, pairing)
    if hint is None and pairing is not None and fusions and div is not None \
            and div.kind == "layer" and div.input_aligned is False and div.previous is not None \
            and div.direction == "forward":
        # by order only leaves are recorded: the code reading a fused layer's output lies
        # between its last part and the next leaf, whose input is judged
        hint = layout = _fused_layout_by_order(div, fusions, paddle_model, run_paddle, judged,
                                               noise, criteria, containers, rename,
                                               pairing)
    if crossed is not None and div is not None and pairing is not None:
        # loaded by definition order, crossed: whether loading by call order makes the rest align
        # outranks what any layer's own reading says
        moved = {r for p, r in names.items() if p in crossed.anchors()}
        failed = {r.key for r in plain.failed}

        def aligns() -> bool:
            got = rename(_capture(paddle_model, run_paddle, containers))
            keys = [k for k in got if k in judged and (
                (s := _subject(k)) is None or s.partition("#")[0] not in moved)]
            # and it must mend a key that failed: the rest aligning says nothing where every
            # key that failed is a moved layer's own
            return bool(failed.intersection(keys)) and bool(compare(
                {k: judged[k] for k in keys}, {k: got[k] for k in keys}, criteria=criteria,
                noise=None if noise is None else {k: noise[k] for k in keys if k in noise}
            ).passed)

        hint = crossed_hint(crossed, torch_model, paddle_model, aligns) or hint
    if hint is None and noise is None:
        hint = _carried_rounding(div)
    if pairing is not None and div is not None and div.kind == "layer" \
            and div.input_aligned is False and div.previous is not None:
        between = _unpaired_between(pairing, div, labels)
        if between:
            div = dataclasses.replace(div, unpaired_between=between)
        else:
            theirs = _port_between(pairing, div, paddle_model)
            if theirs:
                div = dataclasses.replace(div, port_between=theirs)
    # by order only the leaves (and the model itself) are recorded: a leaf whose input already
    # differs inside the model is named at the model's own forward code, where a block between
    # the two leaves (timm's Attention, whose scale is its own code) holds that code
    gap = div.inner if div is not None and div.layer == ROOT and div.inner is not None else div
    blocks: dict[str, str] = {}  # reference block -> the port's, where one was found below
    if pairing is not None and gap is not None and gap.kind == "layer" \
            and gap.direction == "forward" and gap.input_aligned is False:
        found = _block_between(gap, torch_model, paddle_model, run_torch, run_paddle, ref, raw,
                               names, criteria, run_twin, pairing)
        if found is not None and isinstance(found[0], _Handed):
            div = dataclasses.replace(div, handed=(found[0].block, found[0].input))
        elif found is not None:
            div, hint = dataclasses.replace(found[0], passed_over=div.passed_over), layout
            ref, port = {**ref, **found[1]}, {**port, **found[2]}
            blocks = found[3]
            if hint is None and div.inner is not None:
                hint = _reads_hint(div.layer, div.inner.layer, ref, port)
                if hint is not None:  # labelled as every hint is, by the reference's class
                    cls = type(dict(_named(torch_model)).get(div.layer)).__name__
                    hint = f"{cls}: {hint}"
    port_names = {} if pairing is None else {r: o for o, r in pairing.calls.items()}
    port_names.update(blocks)  # a block found between two leaves: its port name too
    found = Localisation(div, hint, result, ref, port, by_order, backward, port_names)
    if found.port_layer() is not None:  # named in the message too: the porter edits the port
        found = dataclasses.replace(found, divergence=dataclasses.replace(
            div, port_layer=found.port_layer()))
    return found


def _aligns_when(key: str, paddle_model: Any, run_paddle: Any, judged: Mapping[str, Any],
                 noise: Optional[Mapping[str, Any]], criteria: Any, containers: bool,
                 rename: Any = None) -> Any:
    """``layout_hint``'s test: whether the port, run again with its fused tensors laid out as
    ``now`` says, gives ``key`` as the reference does (judged as before; ``rename``: the port's
    captures under the reference's names, where paired by order)."""
    from ..diff.engine import compare

    ref_noise = None if noise is None or key not in noise else {key: noise[key]}

    def aligns(now: Any) -> bool:
        got = split_captures({}, _capture(paddle_model, run_paddle, containers), now)[1]
        if rename is not None:
            got = rename(got)
        return key in got and bool(compare({key: judged[key]}, {key: got[key]},
                                           criteria=criteria, noise=ref_noise).passed)

    return aligns


def _fused_layout(div: Any, fusions: Any, paddle_model: Any, run_paddle: Any,
                  judged: Mapping[str, Any], noise: Optional[Mapping[str, Any]], criteria: Any,
                  containers: bool) -> Optional[str]:
    """The hint for a layer holding a port tensor that fuses several of the reference's
    (``reprod.align.fusion``), where another layout of its parts makes the layer align: the
    port runs again once per layout tried, the layer's output judged as before."""
    from ..capture.naming import ROOT

    key = div.output.key if div.output is not None else None
    if not fusions or key is None or key not in judged:
        return None
    layer = div.layer.partition("#")[0]
    return layout_hint("" if layer == ROOT else layer, paddle_model, fusions, _aligns_when(
        key, paddle_model, run_paddle, judged, noise, criteria, containers))


def _split_hint(div: Any, splits: Any, torch_model: Any, paddle_model: Any, run_paddle: Any,
                judged: Mapping[str, Any], noise: Optional[Mapping[str, Any]], criteria: Any,
                containers: bool, pairing: Any, rename: Any, fusions: Any = ()
                ) -> Optional[str]:
    """The hint for a layer holding the parts of a reference tensor that holds several of the
    port's (``reprod.align.fusion.Split``), its input aligned: what the parts hold where they
    are the reference's tensor in no layout (``Split.stray``), else the layout the reference
    reads where loading the parts so makes the layer align. Paired by call order (``pairing``),
    the layer is the reference's and the port's is the one it paired with; ``rename`` gives
    the port's captures the reference's names."""
    from ..capture.naming import ROOT

    layer = div.layer.partition("#")[0]
    if pairing is not None and layer != ROOT:
        layer = pairing.port_layers().get(layer)
        if layer is None:
            return None
    prefix = "" if layer == ROOT else f"{layer}."
    hint = next((s.stray for s in splits
                 if s.stray and any(p.startswith(prefix) for p in s.parts)), None)
    key = div.output.key if div.output is not None else None
    if hint is not None or key is None or key not in judged:
        return hint
    return split_layout_hint("" if layer == ROOT else layer, torch_model, paddle_model, splits,
                             lambda: _aligns_when(key, paddle_model, run_paddle, judged, noise,
                                                  criteria, containers, rename)(
                                 [f for f, _ in fusions]))


def _split_layout_by_order(div: Any, splits: Any, torch_model: Any, paddle_model: Any,
                           run_paddle: Any, judged: Mapping[str, Any],
                           noise: Optional[Mapping[str, Any]], criteria: Any, containers: bool,
                           rename: Any, fusions: Any, pairing: Any) -> Optional[str]:
    """``_split_hint``'s layouts paired by call order, where the leaf after a split's last
    part (``div.previous``) reads a differing input: tried until that input aligns."""
    key = div.input.key if div.input is not None else None
    if key is None or key not in judged:
        return None
    before = pairing.port_layers().get(div.previous.partition("#")[0])
    owner = next((s for s in splits if any(p.rpartition(".")[0] == before for p in s.parts)),
                 None)
    if owner is None:
        return None
    return split_layout_hint(owner.parts[0].rsplit(".", 2)[0], torch_model, paddle_model,
                             splits, lambda: _aligns_when(key, paddle_model, run_paddle, judged,
                                                          noise, criteria, containers, rename)(
                                 [f for f, _ in fusions]))


def _fused_layout_by_order(div: Any, fusions: Any, paddle_model: Any, run_paddle: Any,
                           judged: Mapping[str, Any], noise: Optional[Mapping[str, Any]],
                           criteria: Any, containers: bool, rename: Any,
                           pairing: Any) -> Optional[str]:
    """``_fused_layout`` paired by order, where the leaf after a fused layer's last part
    (``div.previous``) reads a differing input: the layouts are tried until that input aligns.
    ``rename``: the port's captures under the reference's names, as the pairing named them."""
    key = div.input.key if div.input is not None else None
    if key is None or key not in judged:
        return None
    before = pairing.port_layers().get(div.previous.partition("#")[0])
    owner = next((f for f, _ in fusions
                  if any(p.rpartition(".")[0] == before for p in f.parts)), None)
    if owner is None:
        return None
    return layout_hint(owner.port_key.rsplit(".", 2)[0], paddle_model, fusions, _aligns_when(
        key, paddle_model, run_paddle, judged, noise, criteria, containers, rename))


def _passes_unchanged(functions: Mapping[str, Any], subject: Optional[str]) -> bool:
    """Whether the port's data where it applies a reference layer as a function is the same
    before and after it: the port does without the layer (an ``Identity`` for a LayerNorm)."""
    import numpy as np

    x = next((functions[k] for k in (f"{subject}.in", f"{subject}.in.0") if k in functions), None)
    y = next((functions[k] for k in (f"{subject}.out", f"{subject}.out.0") if k in functions),
             None)
    if x is None or y is None:
        return False
    a, b = np.asarray(x), np.asarray(y)
    return a.shape == b.shape and a.size > 1 and bool(np.array_equal(a, b))


def _unpaired_between(pairing: Any, div: Any, labels: Mapping[str, str]) -> tuple[str, ...]:
    """The reference's leaf calls after ``div.previous`` and before ``div.layer`` that nothing in
    the port pairs with, each with its class: what the port may have left out."""
    order = pairing.ref_leaves
    try:
        start, end = order.index(div.previous), order.index(div.layer)
    except ValueError:
        return ()
    return _labelled(order[start + 1:end], pairing.ref_only, labels)


def _labelled(calls: list[str], alone: Collection[str], classes: Mapping[str, str]
              ) -> tuple[str, ...]:
    """Of ``calls``, those in ``alone``, each with its layer's class: "encoder.ln (LayerNorm)"."""
    out = []
    for subject in calls:
        if subject in alone:
            kind = classes.get(subject.partition("#")[0])
            out.append(f"{subject} ({kind})" if kind else subject)
    return tuple(out)


def _port_between(pairing: Any, div: Any, paddle_model: Any) -> tuple[str, ...]:
    """The port's leaf calls between its pairs of ``div.previous`` and ``div.layer`` that nothing
    in the reference pairs with, each with its class: what the port computes there on its own."""
    port_of = {r: o for o, r in pairing.calls.items()}
    order = pairing.other_leaves
    try:
        start = order.index(port_of[div.previous])
    except (KeyError, ValueError):
        return ()
    # up to the layer's pair, or where it has none (an eval-mode dropout, left out of the
    # pairing on both sides) the next paired call
    end = next((i for i in range(start + 1, len(order))
                if order[i] == port_of.get(div.layer) or order[i] in pairing.calls), len(order))
    classes = {name: type(layer).__name__ for name, layer in _named(paddle_model)}
    return _labelled(order[start + 1:end], pairing.other_only, classes)


# how far a layer's output is pushed to see which later layers read it: noise on the scale of its
# largest value, which no later normalisation or rounding can hide
_JOLT = 1.0
# a recorded input counts as changed by the push above this part of its largest value; below it
# (a rerun on a device whose kernels are not bitwise repeatable) as the same
_CHANGED = 1e-4


def _carried(result: Any, ref: Mapping[str, Any], port: Mapping[str, Any], paddle_model: Any,
             run_paddle: Any, raw: Mapping[str, Any], containers: bool,
             calls: Optional[Mapping[str, str]]) -> Any:
    """``first_divergence``'s ``carried``: whether the difference at a layer call (whose input
    aligns, whose output differs) is carried on. Only a difference by an exact constant factor
    (``ref``/``port``: the judged captures) is looked into, a scale moved across the layer's
    boundary; any other is carried (a router's logits choose its experts and weigh them, and
    the experts reading the same tokens say nothing of the weights).

    The port runs once more with that call's output pushed off (``_downstream``), and the first
    paired layer call whose recorded input then changes reads it. Its inputs aligning says the
    difference stops there (HF's MBart scales its word embedding inside the embedding layer,
    PaddleNLP's after it, and the sum that comes next agrees again). Where they differ, it is
    carried unless another layer called between the two whose output differs mends the
    reader's input when it gives the reference's output (``_mends``): the position embedding
    added to that sum, where its table is wrong. The layers called after it
    that do not read it (a k_proj after the q_proj that differs) say nothing either way.
    ``calls``: port layer call -> reference layer call (by order; by name they are the same)."""
    from ..capture.naming import parse_key

    inputs: dict[str, list[bool]] = {}  # reference layer call -> whether each input aligns
    outputs: dict[str, str] = {}  # reference layer call -> its first failing output's key
    start: dict[str, int] = {}  # reference layer call -> position of its first key
    end: dict[str, int] = {}  # ... and of its first output
    for pos, kr in enumerate(result):
        parsed = parse_key(kr.key)
        if parsed is None or parsed.is_param or kr.status in ("missing", "extra"):
            continue
        start.setdefault(parsed.subject, pos)
        if parsed.what == "in":
            inputs.setdefault(parsed.subject, []).append(kr.passed)
        elif parsed.what == "out":
            end.setdefault(parsed.subject, pos)
            if not kr.passed:
                outputs.setdefault(parsed.subject, kr.key)
    to_port = None if calls is None else {r: o for o, r in calls.items()}

    def port_call(layer: str) -> Optional[str]:
        return layer if to_port is None else to_port.get(layer)

    def carried(div: Any) -> bool:
        key = div.output.key
        call = port_call(div.layer)
        if call is None or _factor(ref.get(key), port.get(key)) is None:
            return True
        read = _downstream(paddle_model, run_paddle, raw, containers, call)
        if read is None:  # not probed: a reference layer the port applies as a function
            return True
        for subject in read:
            reader = subject if calls is None else calls.get(subject)
            if reader is None or reader == div.layer or reader not in inputs:
                continue
            if all(inputs[reader]):
                return False
            after, before = end.get(div.layer, -1), start.get(reader, -1)
            # whatever their inputs: a position embedding's differ in kind (ids against
            # positions), and only whether its output explains the reader's input counts
            others = [s for s in outputs
                      if after < start[s] < before and port_call(s) is not None]
            return not any(_mends(paddle_model, run_paddle, raw, ref, port_call(s) or s,
                                  outputs[s], subject, reader) for s in others)
        return True  # read by no recorded layer: it reaches the outputs as it is

    return carried


def _rerun(model: Any, run: Any, call: str, change: Any, capture: Any) -> Optional[dict[str, Any]]:
    """The port's capture (``capture(model, run)``) with ``change`` applied to the output of its
    layer call ``call``; None where there is no such layer, ``change`` left the output as it was,
    or the port cannot run so."""
    name, _, nth = call.partition("#")
    layer = dict(_named(model)).get(name)
    if layer is None or not hasattr(layer, "register_forward_post_hook"):
        return None
    seen, changed = [0], [False]

    def hook(_layer: Any, _args: Any, output: Any) -> Any:
        seen[0] += 1
        if seen[0] != int(nth or 1):
            return None
        moved = change(output)
        changed[0] = moved is not output
        return moved

    handle = layer.register_forward_post_hook(hook)
    try:
        data = capture(model, run)
    except Exception:  # noqa: BLE001 - a port that cannot run so says nothing either way
        return None
    finally:
        handle.remove()
    return data if changed[0] else None


def _downstream(model: Any, run: Any, raw: Mapping[str, Any], containers: bool, call: str
                ) -> Optional[list[str]]:
    """The port's layer calls whose recorded inputs change when ``call``'s output is pushed off
    (``raw``: the capture of the run as it is), in call order; None where that cannot be told:
    no such layer or no floating-point output, or a rerun that does not repeat the layer calls
    before it."""
    from ..capture.naming import parse_key

    probe = _rerun(model, run, call, _jolted,
                   lambda m, r: _capture(m, r, containers))
    if probe is None:
        return None
    read: list[str] = []
    before = True  # keys recorded before the call's output: a repeatable run leaves them alone
    for key, value in probe.items():
        parsed = parse_key(key)
        if parsed is None or parsed.is_param:
            continue
        if parsed.subject == call and parsed.what == "out":
            before = False
            continue
        if parsed.what != "in" or key not in raw:
            continue
        if _changed(raw[key], value):
            if before:
                return None
            if parsed.subject not in read:
                read.append(parsed.subject)
    return read


def _mends(model: Any, run: Any, raw: Mapping[str, Any], ref: Mapping[str, Any], call: str,
           out_key: str, reader: str, ref_reader: str) -> bool:
    """Whether the port layer call ``reader``'s input comes at least halfway to the reference's
    when the port's ``call`` outputs the reference's value (``out_key``, in the port's shape:
    ``_in_shape``). False where that cannot be tried (an output of several tensors, or shapes
    that differ otherwise)."""
    import paddle

    from ..capture.naming import pair_inputs, parse_key

    target = ref.get(out_key)
    pairs = {}
    for key in raw:
        parsed = parse_key(key)
        if parsed is not None and parsed.subject == reader and parsed.what == "in":
            pairs[key] = f"{ref_reader}.{parsed.part}"
    # an input the reference passes by keyword and the port by position: by its values
    named = pair_inputs(ref, {r: raw[k] for k, r in pairs.items()})
    pairs = {k: n for k, n in zip(pairs, named)}
    if not isinstance(target, np.ndarray) or target.dtype.kind != "f" or not pairs or any(
            np.shape(ref.get(r)) != np.shape(raw[k]) for k, r in pairs.items()):
        return False

    def gap(data: Mapping[str, Any]) -> Optional[float]:
        if any(k not in data for k in pairs):
            return None
        return max((float(np.max(np.abs(np.asarray(data[k], np.float64) - ref[r])))
                    if np.size(ref[r]) else 0.0) for k, r in pairs.items())

    def put(output: Any) -> Any:
        value = None if not isinstance(output, paddle.Tensor) else \
            _in_shape(target, tuple(output.shape))
        if value is None:
            return output
        return paddle.to_tensor(value, place=output.place).astype(output.dtype)

    before = gap(raw)
    after = _rerun(model, run, call, put,
                   lambda m, r: _capture_only(m, r, [reader.partition("#")[0]]))
    moved = None if after is None else gap(after)
    return before is not None and moved is not None and moved <= before / 2


def _in_shape(value: np.ndarray, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """``value`` as the port holds it, of ``shape``: as it is, or where the reference repeats
    along axes the port leaves out or holds at size 1 (``_broadcast``: HF's MBart position
    embedding gives [B, L, E], PaddleNLP's [L, E]), one of the repeats; None otherwise."""
    if value.shape == shape:
        return value
    if len(shape) > value.ndim:
        return None
    full = (1,) * (value.ndim - len(shape)) + shape
    if any(s not in (1, v) for s, v in zip(full, value.shape)):
        return None
    one = value[tuple(slice(0, 1) if s == 1 else slice(None) for s in full)]
    if not np.array_equal(np.broadcast_to(one, value.shape), value):
        return None
    return one.reshape(shape)


def _jolted(output: Any) -> Any:
    """``output`` with noise added to its floating-point tensors (tuples, lists and dicts gone
    through); ``output`` itself where it holds none."""
    import paddle

    if isinstance(output, paddle.Tensor):
        if not paddle.is_floating_point(output) or output.size == 0:
            return output
        # in float32: Paddle has no half-precision abs or add on the CPU
        wide = output.astype("float32")
        scale = float(paddle.abs(wide).max()) + _JOLT
        noise = np.random.default_rng(0).standard_normal(output.shape).astype(np.float32)
        return (wide + paddle.to_tensor(noise * scale, place=output.place)).astype(output.dtype)
    if isinstance(output, (tuple, list)):
        items = [_jolted(o) for o in output]
        if all(a is b for a, b in zip(items, output)):
            return output
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if isinstance(output, dict):
        moved = {k: _jolted(v) for k, v in output.items()}
        return output if all(moved[k] is output[k] for k in output) else type(output)(moved)
    return output


def _changed(a: Any, b: Any) -> bool:
    if np.shape(a) != np.shape(b):
        return True
    x, y = np.asarray(a), np.asarray(b)
    if x.dtype.kind not in "fc" or y.dtype.kind not in "fc":
        return not np.array_equal(x, y)
    if not x.size:
        return False
    gap = np.abs(x.astype(np.float64) - y)
    top = float(np.nanmax(np.abs(y))) if np.isfinite(y).any() else 0.0
    return bool(np.any(gap > _CHANGED * top) or np.any(np.isnan(x) != np.isnan(y)))


# a constant factor holds where the outputs, the factor applied, agree to this part of their size
_FACTOR_FIT = 1e-5


def _with_factors(div: Any, ref: Mapping[str, Any], port: Mapping[str, Any]) -> Any:
    """``div`` (and the layers it passed over) with ``factor`` set where, its input aligned, the
    outputs differ by a constant factor."""
    if div is None or div.kind != "layer" or div.direction != "forward":
        return div
    passed = tuple(_with_factors(d, ref, port) for d in div.passed_over)
    # an input that already differs may carry a factor of its own: only the layer's own counts
    factor = _factor(ref.get(div.output.key), port.get(div.output.key)) \
        if div.input_aligned else None
    return dataclasses.replace(div, factor=factor, passed_over=passed)


def _fit(a: np.ndarray, b: Any) -> Optional[float]:
    """The c for which c * b comes closest to a (least squares); None where none is finite."""
    x, y = a.astype(np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    yy = float(y @ y)
    return None if yy == 0.0 else float(x @ y) / yy


# a constant factor between half-precision values holds to a rounding of the largest: the
# factor applied to the rounded values on one side, to the unrounded ones on the other
_HALF_FIT = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}


def _factor(a: Any, b: Any) -> Optional[float]:
    """The constant c with a == c * b, where one fits (not 1, which is no factor), else None.
    Half-precision values (a bfloat16 port's: numpy holds them as ml_dtypes' bfloat16, of no
    floating kind) fit to a rounding of theirs."""
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)) or a.shape != b.shape \
            or not _floats(a) or not _floats(b) or not a.size:
        return None
    c = _fit(a, b)
    if c is None:
        return None
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    size = float(np.max(np.abs(x)))
    fit = max(_FACTOR_FIT, _HALF_FIT.get(a.dtype.name, 0.0), _HALF_FIT.get(b.dtype.name, 0.0))
    if size == 0.0 or abs(c - 1.0) < max(1e-4, 4 * fit) or \
            float(np.max(np.abs(x - c * y))) > fit * size:
        return None
    return c


def _floats(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def _untransposed(layer: str, torch_model: Any, paddle_model: Any, names: Mapping[str, str]
                  ) -> Optional[str]:
    """The hint for a Linear layer whose port weight holds the reference's values in the
    reference's order (copied, or reshaped, without the transpose Paddle's layout needs), or
    None. ``names``: port layer -> reference layer (by order; by name they are the same)."""
    import numpy as np

    port_name = next((p for p, r in names.items() if r == layer), layer)
    ref_layer = dict(_named(torch_model)).get(layer)
    port_layer = dict(_named(paddle_model)).get(port_name)
    rw, pw = getattr(ref_layer, "weight", None), getattr(port_layer, "weight", None)
    if rw is None or pw is None or type(ref_layer).__name__ != "Linear":
        return None
    r, p = to_numpy(rw.detach()).array, to_numpy(pw).array
    if r.ndim != 2 or p.ndim != 2 or r.size != p.size:
        return None
    if np.array_equal(p, r.T) or not np.array_equal(p.reshape(-1), r.reshape(-1)):
        return None
    how = "as it is" if p.shape == r.shape else f"reshaped to {list(p.shape)}"
    return (f"Linear weight not transposed: the port's weight holds the reference's values in the "
            f"reference's order, {how}; torch stores (out_features, in_features), Paddle "
            "(in_features, out_features): transpose it when converting")


# a layer's own parameter counts as other than the reference's beyond this part of its largest
# value: far above a few steps' float32 drift (align_train localises later steps too)
_PARAM_APART = 1e-3


def _own_parameters(layer: str, torch_model: Any, paddle_model: Any, names: Mapping[str, str]
                    ) -> Optional[str]:
    """The hint for a layer whose own parameters (not its sublayers') differ from the
    reference's: the weights, not the code (XLNet's attention holds ``r_w_bias`` itself, and a
    port's perturbed one read "its recorded sublayers align, so the cause is its own forward
    code"). Paired by name, else by order where both hold as many; a 2-D one compared
    transposed where only that fits (a Linear's weight). None where all agree."""
    import numpy as np

    port_name = next((p for p, r in names.items() if r == layer), layer)
    ref_layer = dict(_named(torch_model)).get(layer)
    port_layer = dict(_named(paddle_model)).get(port_name)
    if ref_layer is None or port_layer is None:
        return None
    try:
        ours = list(ref_layer.named_parameters(recurse=False))
        theirs = list(port_layer.named_parameters(include_sublayers=False))
        if not theirs and ours:
            # a wrapper holding the one layer that does (``_wrappers_for_shapes``): its weights
            inner = list(port_layer.named_parameters())
            if len({n.rpartition(".")[0] for n, _ in inner}) == 1:
                theirs = [(n.rpartition(".")[2], q) for n, q in inner]
    except (TypeError, AttributeError):
        return None
    by_name = dict(theirs)
    pairs = [(n, t, by_name[n]) for n, t in ours if n in by_name]
    if len(pairs) != len(ours):
        pairs = ([(n, t, q) for (n, t), (_, q) in zip(ours, theirs)]
                 if len(ours) == len(theirs) else [])
    # a Linear's weight is the transpose of Paddle's: a square one compared as it lies would
    # differ however right it is, and blame the weights for the code's bug
    import torch

    linear = isinstance(ref_layer, torch.nn.Linear)
    apart = []
    for name, t, q in pairs:
        r, p = to_numpy(t.detach()).array, to_numpy(q).array
        if r.ndim == 2 and r.T.shape == p.shape and (
                r.shape != p.shape or (linear and name == "weight")):
            r = r.T
        if r.shape != p.shape or not r.size:
            continue
        gap = float(np.max(np.abs(r.astype(np.float64) - p)))
        if gap > _PARAM_APART * max(float(np.max(np.abs(r))), 1e-12):
            apart.append(f"{name} (max diff {gap:.3g})")
    if not apart:
        return None
    return (f"its own parameter{'s' if len(apart) > 1 else ''} {', '.join(apart)} "
            f"differ{'' if len(apart) > 1 else 's'} from the reference's: the weights, not the code")


def _containers(named: Any) -> list[str]:
    """The names of the layers with sublayers (the model itself left out), outermost first."""
    names = [name for name, layer in named if name and _has_sublayers(layer)]
    return sorted(names, key=lambda n: n.count("."))


def _has_sublayers(layer: Any) -> bool:
    children = getattr(layer, "children", None)  # torch; paddle's Layer has it too
    if children is None:  # pragma: no cover - neither framework
        return False
    return next(iter(children()), None) is not None


def _around(containers: list[str], previous: str, following: str) -> list[str]:
    """The containers whose own forward code may run between layers ``previous`` and
    ``following`` (outermost first): those holding ``previous`` but not ``following`` (their
    forward ends between the two), those holding ``following`` but not ``previous`` (their
    forward starts between the two: diffusers' UpBlock2D concatenates its skip connection before
    its first resnet), and the innermost one holding both."""
    def holds(c: str, layer: str) -> bool:
        return layer == c or layer.startswith(c + ".")

    ending = [c for c in containers if holds(c, previous) and not holds(c, following)]
    starting = [c for c in containers if holds(c, following) and not holds(c, previous)
                and c != following]
    both = [c for c in containers if previous.startswith(c + ".") and following.startswith(c + ".")]
    return (both[-1:] if both else []) + ending + starting


def _block_between(div: Any, torch_model: Any, paddle_model: Any, run_torch: Any, run_paddle: Any,
                   ref_leaves: Mapping[str, Any], port_leaves: Mapping[str, Any],
                   names: Mapping[str, str], criteria: Any, run_twin: Any,
                   pairing: Any
                   ) -> Optional[tuple[Any, dict[str, Any], dict[str, Any], dict[str, str]]]:
    """By call order only leaf layers are recorded, so a block's own forward code (a dropped
    residual add) shows as a leaf whose input already differs although the leaf before it aligns.
    The blocks whose forward code may run between those two leaves (those ending between them,
    and the innermost one holding both: a ResNet block's add before its last ReLU) are recorded
    on each side, and a port block pairs with the reference block that holds the same leaves (by
    the leaves' pairing; of nested blocks holding the same ones, only the outermost). The
    innermost pair whose input aligns while its output differs is where the two part ways, as by
    name. Returns that ``Divergence``, the blocks' captures and {its name: the port's}, or None
    (no such blocks, or none diverges)."""
    from ..capture.divergence import (
        Divergence,
        _representative,
        unmatched_inputs,
        without_forms,
    )
    from ..capture.naming import (
        _base,
        _layer_calls,
        _pair_containers,
        _renamed,
        pair_inputs,
        parse_key,
    )
    from ..diff.engine import compare

    # no previous: the first recorded leaf reads a differing input, though both models were
    # handed the same: the blocks holding it start before it (a transformer whose first block
    # is the first thing called, normalising after its attention where the reference does so
    # before: "the input of the first recorded layer already differs" sent porters to their
    # inputs)
    previous = "" if div.previous is None else div.previous.partition("#")[0]
    following = div.layer.partition("#")[0]
    to_port = {r: o for o, r in names.items()}
    # a call left out of the pairing (an eval-mode dropout, output = input) keeps its own name,
    # where the port has a layer of that name
    port_layers = {name for name, _ in _named(paddle_model)}
    for layer in (previous, following):
        if layer and layer not in to_port and layer in port_layers:
            to_port[layer] = layer
    if (previous and previous not in to_port) or following not in to_port:
        return None
    ref_blocks = _around(_containers(_named(torch_model)), previous, following)
    port_blocks = _around(_containers(_named(paddle_model)), to_port.get(previous, ""),
                          to_port[following])
    if not ref_blocks or not port_blocks:
        return None
    ref = _capture_only(torch_model, run_torch, ref_blocks)
    raw = _capture_only(paddle_model, run_paddle, port_blocks)
    # paired as match_by_order pairs containers: by the leaves they hold (a block never called,
    # a ModuleList, has no keys and pairs with nothing); its first call only
    ref_calls, port_calls = _layer_calls({**ref_leaves, **ref}), _layer_calls({**port_leaves, **raw})
    # layers one side alone has, and calls that compute nothing (an eval-mode dropout, left out
    # of the pairing), say nothing of which block is which
    ref_skip, port_skip = pairing.one_sided_layers()
    ref_skip = ref_skip | {s.partition("#")[0] for s in pairing.ref_inert}
    port_skip = port_skip | {s.partition("#")[0] for s in pairing.other_inert}
    # a leaf the pairing by order left out on both sides (Mixtral's rotary_emb: [B, H, L, D]
    # in HF, [B, L, H, D] in PaddleNLP) but of one name on both is that leaf, as it is judged
    ref_subjects = {_base(s) for s, _ in ref_calls}
    same = {o: o for o in {_base(s) for s, _ in port_calls}
            if o in ref_subjects and o not in names and o not in names.values()}
    boxes = _pair_containers(ref_calls, port_calls, set(ref_blocks), set(port_blocks),
                             {**same, **names}, ref_skip, port_skip)
    pairs = sorted(((r, p) for p, r in boxes.items() if "#" not in p and "#" not in r),
                   key=lambda pair: -pair[0].count("."))  # the innermost first
    blocks_ref = ref

    args = (div, previous, following, to_port, ref_blocks, port_blocks, blocks_ref, raw,
            ref_leaves, port_leaves, torch_model, paddle_model, criteria, run_twin)

    def feeding() -> Optional[tuple[Any, dict[str, Any], dict[str, Any], dict[str, str]]]:
        if not previous:  # both look for the blocks between two leaves
            return None
        return _block_feeding(*args) or _block_holding(*args)

    if not pairs:
        return feeding()
    port = pair_inputs(ref, _renamed(raw, {p: r for r, p in pairs}))
    paired = {r for r, _ in pairs}
    ref = {k: v for k, v in ref.items() if _subject(k) in paired}
    port = {k: v for k, v in port.items() if _subject(k) in paired}
    noise = None if run_twin is None else _capture_only(run_twin[0], run_twin[1], sorted(paired))
    # judged as the leaves are: T5's mask, float32's lowest in HF and -1e4 in PaddleNLP, alike
    ref, port, noise = _alike(ref, port, noise, criteria)
    result = compare(ref, port, criteria=criteria, noise=noise)
    # as first_divergence judges: a key one side alone records (an attention mask only HF
    # passes) says nothing of either block
    keys = [(kr, parse_key(kr.key)) for kr in result if kr.status not in ("missing", "extra")]
    unmatched = unmatched_inputs(result)
    handed: Optional[_Handed] = None
    for r, p in pairs:
        ins = tuple(kr for kr, k in keys if k is not None and k.subject == r and k.what == "in")
        outs = tuple(kr for kr, k in keys if k is not None and k.subject == r and k.what == "out")
        ins, unlike = without_forms(ins)  # a mask built otherwise beside them: as by name
        if handed is None and following.startswith(r + ".") and len(ins) > 1 and \
                any(kr.passed for kr in ins) and not all(kr.passed for kr in ins):
            # the innermost block holding both is handed one input already differing
            handed = _Handed(r, next(kr for kr in ins if not kr.passed))
        if not ins or not outs or not all(kr.passed for kr in ins) or all(kr.passed for kr in outs):
            continue
        output = _representative(outs)
        assert output is not None
        label = _block_label(torch_model, paddle_model, r, p)
        # a block ending between the two holds only aligned layers; the one holding both holds
        # the layer whose input differs, as by name its "inner" divergence
        holds = following.startswith(r + ".")
        found = Divergence(layer=r, layer_type=label, input=_representative(ins), output=output,
                           inputs=ins, outputs=outs, previous=div.previous,
                           inner=div if holds else None, own_code=not holds, unlike=unlike,
                           unmatched=unmatched.get(r, ((), ())))
        # a block holding both leaves: where the reference's block ending between them (HF's
        # ErnieM self_attn.self_attn, whose output its out_proj reads) diverges, it is nearer
        fed = _block_feeding(*args) if holds and previous else None
        return fed if fed is not None else (found, ref, port, {r: p})
    fed = feeding()
    if fed is None and handed is not None:
        return handed, {}, {}, {}
    return fed


_MOST_READ = 24  # a block's values tried as what a layer reads, singly and in pairs


def _reads_hint(block: str, layer: str, ref: Mapping[str, Any], port: Mapping[str, Any]
                ) -> Optional[str]:
    """What the layer whose input already differs inside ``block`` reads on each side, where
    that is one of the block's own values or the sum of two: its input, its recorded sublayers'
    outputs (each side's own). A post-norm port of a pre-norm block: "norm1 reads the block's
    input + attn's output in the port, the block's input in the reference"; a residual added to
    the normalised tensor: "norm2 reads norm1's output + attn's output in the port, the block's
    input + attn's output in the reference". None where either side's reads are none of those."""
    from ..capture import _values

    def reads(side: Mapping[str, Any]) -> Optional[str]:
        target = _values.part_value(side, layer, "in")
        if target is None:
            return None
        t = np.asarray(target, dtype=np.float64)
        named: list[tuple[str, np.ndarray]] = []
        block_in = _values.part_value(side, block, "in")
        if block_in is not None and np.shape(block_in) == t.shape:
            named.append(("the block's input", np.asarray(block_in, dtype=np.float64)))
        seen: set[str] = set()
        for key in side:
            sub = key.rpartition(".")[0] if ".out" in key else None
            if sub is None or not sub.startswith(block + ".") or sub == layer or sub in seen:
                continue
            seen.add(sub)
            out = _values.part_value(side, sub, "out")
            if out is not None and np.shape(out) == t.shape:
                named.append((f"{sub[len(block) + 1:]}'s output", np.asarray(out, dtype=np.float64)))
        named = named[:_MOST_READ]
        scale = float(np.abs(t).max(initial=0.0))
        if not scale or not named:
            return None
        tol = 1e-4 * scale

        def near(v: np.ndarray) -> bool:
            return float(np.abs(t - v).max(initial=0.0)) <= tol
        for name, v in named:
            if near(v):
                return name
        for i, (a, va) in enumerate(named):
            for b, vb in named[i + 1:]:
                if near(va + vb):
                    return f"{a} + {b}"
        return None

    try:
        mine, theirs = reads(ref), reads(port)
    except (TypeError, ValueError):  # a value that is no numeric array: no hint, not a failure
        return None
    if mine is None or theirs is None or mine == theirs:
        return None
    sub = layer[len(block) + 1:] if layer.startswith(block + ".") else layer
    return (f"{sub} reads {theirs} in the port, {mine} in the reference: the block adds or "
            "normalises in another order (a residual, pre-norm against post-norm)")


@dataclass(frozen=True)
class _Handed:
    """``_block_between``'s answer where no block diverges but the one holding both leaves is
    handed one input already differing while its others align (``Divergence.handed``)."""

    block: str
    input: Any


def _block_feeding(div: Any, previous: str, following: str, to_port: Mapping[str, str],
                   ref_blocks: list[str], port_blocks: list[str], ref: Mapping[str, Any],
                   raw: Mapping[str, Any], ref_leaves: Mapping[str, Any],
                   port_leaves: Mapping[str, Any], torch_model: Any, paddle_model: Any,
                   criteria: Any, run_twin: Any
                   ) -> Optional[tuple[Any, dict[str, Any], dict[str, Any], dict[str, str]]]:
    """``_block_between`` where the blocks are cut otherwise on each side, so none holds the
    same leaves as another: Hugging Face's BERT computes its attention in ``attention.self``
    (query, key, value) and projects it in ``attention.output.dense``, PaddleNLP's in one
    ``self_attn`` holding all four. The reference block that ends between the two leaves and
    whose output is what ``following`` reads is set against the port's block holding both
    leaves: its input against that block's input, its output against what the port's
    ``following`` reads. Where its input aligns and its output differs, it is named (its own
    forward code), with the port's block."""
    from ..capture import _values

    port_prev, port_next = to_port[previous], to_port[following]
    holder = _innermost(port_blocks, port_prev, port_next)
    reads = _values.part_value(ref_leaves, following, "in")
    port_reads = _values.part_value(port_leaves, port_next, "in")
    if holder is None or reads is None or port_reads is None:
        return None
    for r in sorted(ref_blocks, key=lambda b: -b.count(".")):  # the innermost first
        if not previous.startswith(r + ".") or following.startswith(r + "."):
            continue
        out_key = _first_out(ref, r)
        if out_key is None or not _values.feeds(ref[out_key], reads):
            continue
        return _judged_against(div, r, holder, out_key, port_reads, ref, raw, torch_model,
                               paddle_model, criteria, run_twin, own_code=True)
    return None


def _innermost(blocks: list[str], a: str, b: str) -> Optional[str]:
    """Of ``blocks``, the innermost holding both layers ``a`` and ``b``."""
    return next((c for c in sorted(blocks, key=lambda c: -c.count("."))
                 if a.startswith(c + ".") and b.startswith(c + ".")), None)


def _first_out(capture: Mapping[str, Any], call: str) -> Optional[str]:
    """The key of a call's lone (or first) output in ``capture``."""
    return next((f"{call}.{w}" for w in ("out", "out[0]") if f"{call}.{w}" in capture), None)


def _block_holding(div: Any, previous: str, following: str, to_port: Mapping[str, str],
                   ref_blocks: list[str], port_blocks: list[str], ref: Mapping[str, Any],
                   raw: Mapping[str, Any], ref_leaves: Mapping[str, Any],
                   port_leaves: Mapping[str, Any], torch_model: Any, paddle_model: Any,
                   criteria: Any, run_twin: Any
                   ) -> Optional[tuple[Any, dict[str, Any], dict[str, Any], dict[str, str]]]:
    """``_block_between`` where the innermost blocks holding both leaves hold other leaves on
    each side: Hugging Face's MPNet computes its attention in ``attention.attn`` (q, k, v, o)
    and adds and normalises in ``attention``, PaddleNLP's ``attention`` holds q, k, v, o and the
    norm. The reference's innermost block holding both is set against the port's: its inputs
    against that block's (by value), and its output, where it is a leaf's it holds (``o``'s),
    against the port's pair of that leaf. Where its input aligns and its output differs, it is
    named, its code between the two leaves the cause, with the port's block."""
    from ..capture import _values
    from ..capture.naming import parse_key

    r = _innermost(ref_blocks, previous, following)
    holder = _innermost(port_blocks, to_port[previous], to_port[following])
    if r is None or holder is None:
        return None
    out_key = _first_out(ref, r)
    if out_key is None:
        return None
    # the leaf whose output the block returns as it is, the last such, and its pair's output
    last = None
    for key in ref_leaves:
        k = parse_key(key)
        if (k is not None and k.what == "out" and k.subject.startswith(r + ".")
                and k.subject.partition("#")[0] in to_port
                and _values.feeds(ref_leaves[key], ref[out_key])):
            last = k
    if last is None:
        return None
    theirs_out = _values.part_value(port_leaves, to_port[last.subject.partition("#")[0]], "out")
    if theirs_out is None:
        return None
    # the block's inputs may be values the port computes inside its block (HF's LayoutLMOutput
    # takes the feed-forward's hidden state and the attention's output, both inside PaddleNLP's
    # one TransformerEncoderLayer): the port's recorded values of their shapes are candidates
    shapes = {np.shape(v) for k, v in ref.items() if _is_input_of(k, r)}
    inside = [v for k, v in port_leaves.items()
              if (pk := parse_key(k)) is not None and pk.what in ("in", "out")
              and pk.subject.startswith(holder + ".") and np.shape(v) in shapes]
    return _judged_against(div, r, holder, out_key, theirs_out, ref, raw, torch_model,
                           paddle_model, criteria, run_twin, inside=inside, inner=div)


def _judged_against(div: Any, r: str, holder: str, out_key: str, port_out: Any,
                    ref: Mapping[str, Any], raw: Mapping[str, Any], torch_model: Any,
                    paddle_model: Any, criteria: Any, run_twin: Any, inside: Sequence[Any] = (),
                    **found: Any
                    ) -> Optional[tuple[Any, dict[str, Any], dict[str, Any], dict[str, str]]]:
    """The reference block ``r`` judged against the port's block ``holder`` that holds other
    leaves (``_block_feeding``, ``_block_holding``): its inputs against the port block's, paired
    by their values alone (the blocks take other arguments in each position: HF's attention.self
    its mask second, Paddle's attention its key), its output ``out_key`` against ``port_out``.
    ``inside``: more of the port's values its inputs may pair with (computed inside the port's
    block). Where its inputs align and its output differs, the ``Divergence`` (``found``: its
    other fields), the two captures and {r: holder}; else None."""
    from ..capture.divergence import Divergence, _representative
    from ..capture.naming import pair_inputs
    from ..diff.engine import compare

    ins = {k: v for k, v in ref.items() if _is_input_of(k, r)}
    given = [raw[k] for k in raw if _is_input_of(k, holder)] + list(inside)
    port = {f"{r}.in[port {i}]": v for i, v in enumerate(given)}
    mine = {**ins, out_key: ref[out_key]}
    theirs = {**pair_inputs(mine, port), out_key: port_out}
    noise = None if run_twin is None else _capture_only(run_twin[0], run_twin[1], [r])
    mine, theirs, noise = _alike(mine, theirs, noise, criteria)
    result = compare(mine, theirs, criteria=criteria, noise=noise)
    judged = [kr for kr in result if kr.status not in ("missing", "extra")]
    ins_r = tuple(kr for kr in judged if kr.key != out_key)
    outs = tuple(kr for kr in judged if kr.key == out_key)
    if not ins_r or not outs or not all(kr.passed for kr in ins_r) or outs[0].passed:
        return None
    label = _block_label(torch_model, paddle_model, r, holder)
    return (Divergence(layer=r, layer_type=label, input=_representative(ins_r), output=outs[0],
                       inputs=ins_r, outputs=outs, previous=div.previous, **found),
            mine, theirs, {r: holder})


def _block_label(torch_model: Any, paddle_model: Any, ref_block: str, port_block: str) -> str:
    """The two blocks' classes for a message: the port's only where it differs."""
    rc = type(dict(_named(torch_model))[ref_block]).__name__
    pc = type(dict(_named(paddle_model))[port_block]).__name__
    return _type_label((rc, None if pc.lower() == rc.lower() else pc))


def _is_input_of(key: str, call: str) -> bool:
    from ..capture.naming import parse_key

    parsed = parse_key(key)
    return parsed is not None and parsed.subject == call and parsed.what == "in"


# layers that may compute their input unchanged (a dropout in eval mode)
_INERT = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alphadropout",
                    "featurealphadropout", "identity", "droppath", "stochasticdepth"})


def _without_inert(capture: dict[str, Any], other: Mapping[str, Any], inert: set[str]
                   ) -> dict[str, Any]:
    """``capture`` without the calls of ``inert`` layers whose output is their input and
    whose layer the ``other`` capture does not name: nothing to pair or judge. By order, such
    calls the other side also makes are left to the pairing (``_pair_all``'s inert)."""
    from ..capture.naming import _identity_call, parse_key

    if not inert:
        return capture
    named = {k.name for k in map(parse_key, other) if k is not None and not k.is_param}
    drop: set[str] = set()
    seen: set[str] = set()
    for key in capture:
        k = parse_key(key)
        if k is None or k.is_param or k.subject in seen:
            continue
        seen.add(k.subject)
        if k.name in inert and k.name not in named and _identity_call(capture, k.subject):
            drop.add(k.subject)
    if not drop:
        return capture
    return {key: v for key, v in capture.items()
            if (k := parse_key(key)) is None or k.is_param or k.subject not in drop}


def _inert(model: Any) -> set[str]:
    return {name for name, layer in _named(model) if type(layer).__name__.lower() in _INERT}


def _fused_norm_pairs(torch_model: Any, paddle_model: Any, anchors: Mapping[str, str]
                      ) -> tuple[str, ...]:
    """The reference's norms holding their activation as a sublayer whose weights a port's
    ``BatchNorm(act=...)`` holds (``anchors``: port layer -> reference layer)."""
    from .settings import norm_holding_act

    ours, theirs = dict(_named(torch_model)), dict(_named(paddle_model))
    out = []
    for port, layer in anchors.items():
        m, p = ours.get(layer), theirs.get(port)
        if m is not None and type(p).__name__ == "BatchNorm" and getattr(p, "_act", None) \
                and norm_holding_act(m):
            out.append(layer)
    return tuple(out)


def _wrappers_for_shapes(paddle_model: Any, run_paddle: Any, anchors: Mapping[str, str],
                         ref: Mapping[str, Any], raw: Mapping[str, Any]
                         ) -> tuple[dict[str, Any], dict[str, str]]:
    """The port's capture and anchors with each anchored leaf whose output has another shape
    than its reference layer's replaced by the layer around it holding nothing else, where that
    one's output has the reference's shape: PaddleClas's EfficientNet pads its convolution 2
    and crops a row and a column in the wrapper around it (TF's "same"), and the inner
    convolution was named the divergence for its shape in every port."""
    from ..capture.naming import parse_key

    def shapes(capture: Mapping[str, Any]) -> dict[str, list[tuple[int, ...]]]:
        """Layer -> the shapes of its calls' outputs."""
        out: dict[str, list[tuple[int, ...]]] = {}
        for key, v in capture.items():
            k = parse_key(key)
            if k is not None and not k.is_param and k.what == "out" and not k.items:
                out.setdefault(k.name, []).append(np.shape(v))
        return out

    got, want = shapes(raw), shapes(ref)
    apart = [port for port, layer in anchors.items()
             if got.get(port) and want.get(layer) and got[port] != want[layer]
             and len(got[port]) == len(want[layer])]
    if not apart:
        return dict(raw), dict(anchors)
    layers = dict(_named(paddle_model))

    def owned(name: str) -> set[int]:
        layer = layers.get(name)
        return set() if layer is None else {id(p) for p in layer.parameters()}

    wrappers: dict[str, list[str]] = {}  # port leaf -> the layers around it, innermost first
    for port in apart:
        mine, up, name = owned(port), [], port
        while "." in name:
            name = name.rpartition(".")[0]
            if owned(name) != mine:
                break  # it holds weights of others: not this layer's wrapper
            up.append(name)
        if up and mine:
            wrappers[port] = up
    if not wrappers:
        return dict(raw), dict(anchors)
    around = _capture_only(paddle_model, run_paddle,
                           sorted({n for up in wrappers.values() for n in up}))
    theirs_shapes = shapes(around)
    anchors = dict(anchors)
    swap: dict[str, str] = {}  # port leaf -> the wrapper recorded in its place
    for port, up in wrappers.items():
        found = next((n for n in up if theirs_shapes.get(n) == want[anchors[port]]), None)
        if found is not None:
            swap[port] = found
            anchors[found] = anchors.pop(port)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = parse_key(key)
        if k is None or k.is_param or k.name not in swap:
            out[key] = value
            continue
        # in the leaf's place, call by call: the wrapper's input is the leaf's, its output
        # comes where the leaf's came
        theirs = str(k.with_name(swap[k.name]))
        if theirs in around:
            out[theirs] = around[theirs]
    return out, anchors


def _norms_apart(torch_model: Any, paddle_model: Any, anchors: Mapping[str, str],
                 ref: Mapping[str, Any]) -> dict[str, str]:
    """Reference norm -> the activation it holds, for each norm holding its activation as a
    sublayer whose weights a port norm without an activation holds (``anchors``: port layer ->
    reference layer), where the activation is the one sublayer recorded that computes (a
    dropout of p 0 is left out: ``_without_inert``) and called as often as the norm."""
    from .settings import plain_norm_against_held_act

    ours, theirs = dict(_named(torch_model)), dict(_named(paddle_model))
    calls: dict[str, set[str]] = {}
    for key in ref:
        subject = _subject(key)
        if subject is not None:
            calls.setdefault(subject.partition("#")[0], set()).add(subject)
    out: dict[str, str] = {}
    for port, layer in anchors.items():
        if not plain_norm_against_held_act(theirs.get(port), ours.get(layer)):
            continue
        inside = [n for n in calls if n.startswith(f"{layer}.")]
        if len(inside) == 1 and "." not in inside[0][len(layer) + 1:] \
                and len(calls[inside[0]]) == len(calls.get(layer, ())):
            out[layer] = inside[0]
    return out


def _norm_apart(capture: Mapping[str, Any], apart: Mapping[str, str]) -> dict[str, Any]:
    """``capture`` with each norm of ``apart`` (norm -> its activation) recorded as the norm and
    then the activation: the norm's output is its activation's input, put before the
    activation's keys, and its gradient there the activation's input gradient; any other
    sublayer's keys (an identity dropout) are left out."""
    if not apart:
        return dict(capture)
    from ..capture.naming import CaptureKey, parse_key

    acts = {a: n for n, a in apart.items()}
    inside = tuple(f"{n}." for n in apart)
    out: dict[str, Any] = {}
    for key, value in capture.items():
        k = parse_key(key)
        if k is None or k.is_param:
            out[key] = value
            continue
        if k.name in apart and k.what in ("out", "grad_out"):
            continue  # the norm's own: from its activation's input, below
        if k.name in acts:
            if k.what in ("in", "grad_in"):
                what = "out" if k.what == "in" else "grad_out"
                out[str(CaptureKey(acts[k.name], k.call, what, k.items))] = value
        elif k.name.startswith(inside):
            continue
        out[key] = value
    return out


def _without_sublayers(capture: Mapping[str, Any], layers: Sequence[str]) -> dict[str, Any]:
    inside = tuple(f"{n}." for n in layers)
    if not inside:
        return dict(capture)
    return {k: v for k, v in capture.items()
            if (s := _subject(k)) is None or not s.partition("#")[0].startswith(inside)}


def _named(model: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every layer: paddle's ``named_sublayers``, torch's ``named_modules``."""
    named = getattr(model, "named_sublayers", None) or model.named_modules
    return list(named())


def _subject(key: str) -> Optional[str]:
    from ..capture.naming import parse_key

    k = parse_key(key)
    return None if k is None or k.is_param else k.subject


def _capture_only(model: Any, call: Any, layers: list[str]) -> dict[str, Any]:
    from ..capture import record

    with record(model, include=layers, containers=True) as log:
        call()
    return dict(log.data)


def _type_label(types: tuple[Optional[str], Optional[str]]) -> str:
    ref, port = types
    return ref if port is None else f"{ref} vs {port}"


def _carried_rounding(div: Any) -> Optional[str]:
    """Uncalibrated, a layer named whose input is "aligned" by the threshold and whose output
    differs no more than that input: float32 rounding carried on from earlier layers, which a
    threshold cannot tell from a cause (MobileBERT's NoNorm leaves activations near 60: a correct
    port failed at 1e-5, named at a Linear with input 1.2e-4 and output 1.0e-4 off)."""
    if div is None or div.kind != "layer" or not div.input_aligned or div.direction != "forward":
        return None
    i = div.input.max_abs if div.input is not None else None
    o = div.output.max_abs if div.output is not None else None
    if not i or o is None or o > i:
        return None
    return (f"its output differs no more than its input (max {i:.3g} in, {o:.3g} out): likely "
            "float32 rounding carried on from earlier layers, not this layer's; calibrate=True "
            "judges each key against the reference's own rounding")


def _hint_of(div: Any, plain: Any) -> Optional[str]:
    """What ``diagnose`` added to the notes of the divergence's outputs (``plain``: before it).
    None where the layer's input already differs: a diagnosis reads the reference's input as
    both sides' (a decoder's embedding scale dropped before a LayerNorm fit as its epsilon)."""
    if div is None or div.kind != "layer" or div.input_aligned is False:
        return None
    for r in (div.output, *div.outputs):
        before = plain[r.key].note or ""
        after = r.note or ""
        if after != before:
            return after[len(before) :].lstrip("; ") if after.startswith(before) else after
    return None
