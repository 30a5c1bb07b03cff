"""Pairing a torch state dict with a Paddle one by definition order, for ports whose names no
rule maps (``features.0`` against ``stem.conv``): the pairs, checked by shape and kind, and the
``ConversionRules`` that carry them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import KeyMismatchError, ReprodError
from ..storage.framework_files import read_pdparams, read_torch_state_dict
from .call_order import first_calls, in_call_order
from .rules import (
    _DEFAULT_RULES,
    _DROPPED,
    ConversionRules,
    _is_torch_module,
    class_names,
    guess_linear_weight,
    integer_keys,
    is_hf_conv1d,
    kernel_against_matrix,
    known_layouts,
    linear_weight_names,
    packed_linear_weights,
    port_constants,
    split_attention,
    torch_aliases,
    torch_constants,
    unaliased,
    unit_axes_apart,
)

__all__ = ["pair_weights_by_order", "by_order_rules", "pair_by_order"]

# torch BatchNorm statistics and Paddle's names for them: a statistic pairs only with a statistic
# of the same kind, so a shifted pairing among same-shaped BN tensors is caught, not loaded.
_TORCH_STAT = (
    (re.compile(r"(^|\.)running_mean$"), "mean"),
    (re.compile(r"(^|\.)running_var$"), "var"),
)
_PADDLE_STAT = ((re.compile(r"(^|\.)_mean$"), "mean"), (re.compile(r"(^|\.)_variance$"), "var"))


def _stat_kind(name: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> Optional[str]:
    for pat, kind in table:
        if pat.search(name):
            return kind
    return None


# the kinds of layer that hold parameters, as both frameworks spell them once lowercased and
# without their rank (Conv2d / Conv2D, BatchNorm1d / BatchNorm1D); any other holder is "other"
_HOLDERS = {
    "linear": "linear", "nondynamicallyquantizablelinear": "linear", "bilinear": "bilinear",
    "conv": "conv", "convtranspose": "convtranspose", "conv_transpose": "convtranspose",
    "batchnorm": "batchnorm", "syncbatchnorm": "batchnorm", "layernorm": "layernorm",
    "groupnorm": "groupnorm", "instancenorm": "instancenorm", "rmsnorm": "rmsnorm",
    "embedding": "embedding", "prelu": "prelu", "lstm": "lstm", "gru": "gru", "rnn": "rnn",
    "simplernn": "rnn", "multiheadattention": "attention",
}
# holders read whole: their sublayers' tensors are theirs (an attention's projections, an RNN's
# cells), as torch's leaves hold them
_WHOLE_HOLDERS = frozenset({"lstm", "gru", "rnn", "attention"})
_RANK = re.compile(r"[123]d")


def _holder_kind(layer: Any) -> str:
    if is_hf_conv1d(layer):
        return "linear"
    for name in class_names(layer):
        kind = _HOLDERS.get(_RANK.sub("", name.lower()))
        if kind is not None:
            return kind
    if type(layer).__name__.lower().endswith("layernorm"):
        return "layernorm"  # written by hand (PaddleClas's ChannelsFirstLayerNorm)
    return "other"


def _owners(layers: Mapping[str, Any], keys: Any, whole: frozenset[str],
            sliced: frozenset[str] = frozenset(),
            bare: Optional[Mapping[str, tuple[int, ...]]] = None) -> dict[str, tuple[str, str]]:
    """key -> (the layer holding it, that layer's kind): the outermost layer of a kind in
    ``whole`` above the key, else the nearest layer above it. Where attention is not read whole,
    a slice of a packed projection (``sliced``: torch's ``attn.q_proj.weight``, from its
    ``in_proj_weight`` or GPT-2's ``c_attn``) is a Linear of its own, as Paddle's are. With
    ``bare`` (the keys' shapes), a matrix a layer of no known kind holds itself is a Linear of
    its own (PaddleNLP CLIP's ``vision_projection``, a ``create_parameter`` of the model where
    Hugging Face's is a Linear)."""
    out: dict[str, tuple[str, str]] = {}
    for key in keys:
        prefix = key.rpartition(".")[0]
        parts = prefix.split(".") if prefix else []
        nearest: Optional[tuple[str, str]] = (prefix, "linear") if key in sliced else None
        holder = layers.get(prefix)
        if bare is not None and holder is not None and _holder_kind(holder) == "other" and \
                len(bare.get(key, ())) == 2:
            out[key] = (key, "linear")
            continue
        outer: Optional[tuple[str, str]] = None
        for i in range(len(parts), -1, -1):
            name = ".".join(parts[:i])
            layer = layers.get(name)
            if layer is None:
                continue  # a split attention slice (q_proj) has no torch layer of its own
            kind = _holder_kind(layer)
            if nearest is None:
                nearest = (name, kind)
            if kind in whole:
                outer = (name, kind)
        out[key] = outer or nearest or ("", "other")
    return out


def _torch_shapes(obj: Any) -> tuple[dict[str, tuple[int, ...]], set[str], str, set[str]]:
    """(name -> shape in state-dict order, the weights in Linear layout, a label for messages,
    the integer tensors' names): a model's Linear weights, else what the state dict tells
    (``known_layouts``) and the heuristic (``guess_linear_weight``). A tied weight's second
    name is left out, as Paddle's state dict is read (``unaliased``)."""
    if _is_torch_module(obj):
        sd: Mapping[str, Any] = obj.state_dict()
        linear: Optional[set[str]] = linear_weight_names(obj)
        label = f"torch {type(obj).__name__}"
    elif isinstance(obj, (str, os.PathLike)):
        label = os.fspath(obj)
        sd, linear = read_torch_state_dict(label), None
    elif isinstance(obj, Mapping):
        sd, linear, label = obj, None, "torch state dict"
    else:
        raise ReprodError(
            f"cannot pair a {type(obj).__name__}: expected a torch model, state dict or .pth path"
        )
    aliases = torch_aliases(sd)
    if aliases:
        sd = {k: v for k, v in sd.items() if k not in aliases}
    ints = integer_keys(sd)
    if _is_torch_module(obj):
        ints |= torch_constants(obj) - set(aliases)
    if linear is not None:
        linear = linear | packed_linear_weights(sd)
        sd = split_attention(sd)[0]  # as Paddle's MultiHeadAttention lists them
    else:  # from a file: GPT-2's Conv1D weights and packed slices say their layout
        known = known_layouts(sd)
        sd = split_attention(sd)[0]
        linear = {k for k, v in sd.items()
                  if known.get(k, guess_linear_weight(k, tuple(np.shape(v))))}
    return {k: tuple(int(s) for s in np.shape(v)) for k, v in sd.items()}, linear, label, ints


def _paddle_shapes(obj: Any) -> tuple[dict[str, tuple[int, ...]], str, set[str]]:
    """The shapes, the label, and the constants (``rules.port_constants``: integer and bool
    tensors, and where the model is at hand its registered buffers)."""
    buffers: Optional[set[str]] = None
    if isinstance(obj, (str, os.PathLike)):
        label = os.fspath(obj)
        sd: Mapping[str, Any] = read_pdparams(label)
    elif isinstance(obj, Mapping):
        sd, label = obj, "paddle state dict"
    elif hasattr(obj, "state_dict"):
        sd, label = unaliased(obj.state_dict())[0], f"paddle {type(obj).__name__}"
        if hasattr(obj, "named_buffers"):
            buffers = {name for name, _ in obj.named_buffers()}
    else:
        raise ReprodError(
            f"cannot pair a {type(obj).__name__}: expected a Paddle model, state dict or "
            ".pdparams path"
        )
    # paddle tensors report their shape as a list; numpy's np.shape would copy them
    return {
        k: tuple(int(s) for s in getattr(v, "shape", np.shape(v))) for k, v in sd.items()
    }, label, port_constants(sd, buffers)


@dataclass(frozen=True)
class _OrderPlan:
    """Positional pairs ``(torch key, paddle key, transpose)`` for every position both sides have,
    and the problems found: ``(torch key or None, text)``, one per position; ``wrong_kind`` holds
    the torch keys paired with a tensor of another kind (a BatchNorm statistic with a weight);
    ``moved`` those paired by layer kind with a tensor at another position."""

    pairs: tuple[tuple[str, str, bool], ...]
    problems: tuple[tuple[Optional[str], str], ...]
    header: str
    wrong_kind: frozenset[str] = frozenset()
    # the torch keys paired with a tensor at another position: the layers were paired kind by kind
    moved: frozenset[str] = frozenset()
    # which layers one side alone holds, where the shapes say (``_explain_refusal``), and the
    # rules that say so: (skip patterns, port_only patterns)
    explained: str = ""
    lone: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    lone_at: tuple[str, ...] = ()  # their positions, said in place of the definition order's

    def raise_problems(self) -> None:
        if self.problems:
            # two different architectures disagree at hundreds of positions: the first few say
            # where the orders part, and a line of them all would bury it
            problems = [(None, at) for at in self.lone_at] if self.explained and \
                self.lone_at else self.problems
            shown = problems[:_LISTED]
            listed = "; ".join(text for _, text in shown)
            more = len(problems) - len(shown)
            if more:
                listed += (f"; ... and {more} more position{'s' if more != 1 else ''} (all of "
                           "them: print(compare_structure(torch_model, paddle_model, "
                           "by_order=True).to_table()))")
            if self.explained:
                listed = f"{self.explained}; the positions: {listed}"
            raise KeyMismatchError(f"pairing by order failed: {self.header}: {listed}")


_LISTED = 8  # the positions a pairing error lists


def _check(
    positions: list[tuple[int, str, str]],
    tshapes: Mapping[str, tuple[int, ...]],
    pshapes: Mapping[str, tuple[int, ...]],
    linear: set[str],
) -> tuple[list[tuple[str, str, bool]], list[tuple[Optional[str], str]], set[str]]:
    """Each (position, torch key, Paddle key) checked by shape and kind: the pairs with their
    transposes, the problems, the torch keys paired with a tensor of another kind."""
    pairs: list[tuple[str, str, bool]] = []
    problems: list[tuple[Optional[str], str]] = []
    wrong_kind: set[str] = set()
    for i, tk, pk in positions:
        ts, ps = tshapes[tk], pshapes[pk]
        if ts == ps and len(ts) == 2 and ts[0] == ts[1]:
            # a square weight's layout cannot be read from shapes: the model's, else the file's
            transpose = tk in linear
        elif ts == ps:
            transpose = False
        elif len(ts) == 2 and ts[::-1] == ps:
            transpose = True
        elif kernel_against_matrix(ts, ps):
            # a torch Linear converted as one ([in, out]); a kernel as it is: loading then
            # transposes either into the other (``as_target_layout``)
            transpose = tk in linear
        elif unit_axes_apart(ts, ps):
            transpose = False  # loaded reshaped (CLIP's 0-d logit_scale against [1])
        else:
            said = f"#{i} {tk} {list(ts)} vs {pk} {list(ps)}"
            if len(ts) > 1 and len(ps) > 1 and math.prod(ts) == math.prod(ps):
                # TNT's pixel_pos, [1, 24, 4, 4] in timm and [1, 16, 24] in PaddleClas: no rule
                # reshapes and permutes by itself, and by shape alone which permute is unknown
                said += (f" (the same {math.prod(ts)} values in another layout: convert it "
                         "yourself, reshaped or permuted as the port reads it, and leave it out "
                         f'here: rules=ConversionRules(skip=[r"^{re.escape(tk)}$"], '
                         f'port_only=[r"^{re.escape(pk)}$"]))')
            problems.append((tk, said))
            pairs.append((tk, pk, False))
            continue
        if _stat_kind(tk, _TORCH_STAT) != _stat_kind(pk, _PADDLE_STAT):
            wrong_kind.add(tk)
            problems.append(
                (tk, f"#{i} {tk} vs {pk}: a BatchNorm statistic paired with another kind of tensor")
            )
        pairs.append((tk, pk, transpose))
    return pairs, problems, wrong_kind


_STATS = re.compile(r"(^|\.)(running_mean|running_var|_mean|_variance)$")


def _shape_owners(keys: list[str], shapes: Mapping[str, tuple[int, ...]]
                  ) -> dict[str, tuple[str, str]]:
    """key -> (its layer, a kind read from the layer's tensors), for state dicts read from files,
    which name no layer's class: a ``weight`` of rank 1 is a norm's (LayerNorm, GroupNorm; with
    statistics a BatchNorm), of rank 2 a matrix's (Linear, Embedding), of rank 3 to 5 a
    convolution's; a layer holding other names is "other"."""
    held: dict[str, list[str]] = {}
    for k in keys:
        held.setdefault(k.rpartition(".")[0], []).append(k)
    out: dict[str, tuple[str, str]] = {}
    for layer, ks in held.items():
        leaves = {k.rpartition(".")[2] for k in ks}
        weight = next((k for k in ks if k.rpartition(".")[2] == "weight"), None)
        if weight is None or not leaves <= {"weight", "bias", "running_mean", "running_var",
                                             "_mean", "_variance"}:
            kind = "other"
        elif any(_STATS.search(k) for k in ks):
            kind = "batchnorm"
        else:
            kind = {1: "norm", 2: "matrix"}.get(len(shapes[weight]), "conv")
        out.update((k, (layer, kind)) for k in ks)
    return out


def _by_kind(torch_keys: list[str], paddle_keys: list[str], torch_side: Any,
             paddle_side: Any, shapes: tuple[Mapping[str, tuple[int, ...]],
                                          Mapping[str, tuple[int, ...]]]
             ) -> list[list[tuple[int, str, str]]]:
    """The keys paired layer by layer, the n-th layer of a kind with the n-th of that kind, for
    ports that define the same layers in another order (Hugging Face's BERT defines a block's
    attention LayerNorm before its feed-forward Linears, PaddleNLP's after them): a candidate
    for each way of reading attention layers under which each kind pairs one for one. Where
    either side is not a model (a state dict, a file), the kinds are read from the layers'
    tensors (``_shape_owners``)."""
    if not _is_torch_module(torch_side) or not hasattr(paddle_side, "named_sublayers"):
        pairs = _paired_by_kind(torch_keys, paddle_keys, _shape_owners(torch_keys, shapes[0]),
                                _shape_owners(paddle_keys, shapes[1]))
        return [] if pairs is None else [pairs]
    tlayers = dict(torch_side.named_modules())
    players = dict(paddle_side.named_sublayers(include_self=True))
    # an attention read whole pairs torch's MultiheadAttention with Paddle's; read as its
    # projections, a hand-written attention's Linears (Hugging Face's query/key/value/dense)
    found = []
    sliced = frozenset(split_attention(torch_side.state_dict())[1])
    # last, each side's bare matrices read as Linears of their own
    for whole, bare in ((_WHOLE_HOLDERS, False), (_WHOLE_HOLDERS - {"attention"}, False),
                        (_WHOLE_HOLDERS - {"attention"}, True)):
        pairs = _paired_by_kind(torch_keys, paddle_keys,
                                _owners(tlayers, torch_keys, whole, sliced,
                                        shapes[0] if bare else None),
                                _owners(players, paddle_keys, whole,
                                        bare=shapes[1] if bare else None))
        if pairs is not None and pairs not in found:
            found.append(pairs)
    return found


def _paired_by_kind(torch_keys: list[str], paddle_keys: list[str],
                    towner: dict[str, tuple[str, str]], powner: dict[str, tuple[str, str]]
                    ) -> Optional[list[tuple[int, str, str]]]:

    def layers(keys: list[str], owner: dict[str, tuple[str, str]]
               ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        held: dict[str, list[str]] = {}
        of_kind: dict[str, list[str]] = {}
        for k in keys:
            name, kind = owner[k]
            if name not in held:
                held[name] = []
                of_kind.setdefault(kind, []).append(name)
            held[name].append(k)
        return held, of_kind

    theld, tkinds = layers(torch_keys, towner)
    pheld, pkinds = layers(paddle_keys, powner)
    if {k: len(v) for k, v in tkinds.items()} != {k: len(v) for k, v in pkinds.items()}:
        return None
    tlist = [(name, towner[keys[0]][1]) for name, keys in theld.items()]
    plist = [(name, powner[keys[0]][1]) for name, keys in pheld.items()]
    position = {k: i for i, k in enumerate(torch_keys)}
    out: list[tuple[int, str, str]] = []
    for tname, pname in _in_blocks(tlist, plist) or _kind_pairs(tlist, plist):
        if len(theld[tname]) != len(pheld[pname]):
            return None
        out += [(position[tk], tk, pk) for tk, pk in zip(theld[tname], pheld[pname])]
    return sorted(out)


def _block(layer: str) -> str:
    """The innermost numbered layer holding ``layer`` (``encoder.layers.0`` for
    ``encoder.layers.0.self_attn.k_proj``), "" for one outside any."""
    parts = layer.split(".")[:-1]
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    return ""


def _leaf(layer: str) -> str:
    """A layer's own name as both libraries may spell it (``LayerNorm``/``layer_norm``); "" for
    a position in a list, which names nothing."""
    leaf = layer.rpartition(".")[2].lower().replace("_", "")
    return "" if leaf.isdigit() else leaf


def _names(layers: list[str], block: str) -> list[tuple[int, str]]:
    """Each layer's name within its block, as both libraries may spell it: (which of the block's
    sublayers holds it, in definition order, -1 for the block itself; its own name): a BART
    decoder layer's ``self_attn.k_proj`` is (0, "kproj") on both sides, its cross attention's
    (1, "kproj"), whether it is named ``encoder_attn`` or ``cross_attn``."""
    parents: dict[str, int] = {}
    out = []
    for name in layers:
        rel = name[len(block) + 1:] if block else name
        parent = rel.rpartition(".")[0]
        index = -1 if not parent else parents.setdefault(parent, len(parents))
        out.append((index, _leaf(name)))
    return out


def _kind_pairs(ts: list[tuple[str, str]], ps: list[tuple[str, str]],
                blocks: tuple[str, str] = ("", "")) -> list[tuple[str, str]]:
    """Each kind's layers paired, those of one name on both sides (``_names``, the only one so
    named on each side: Hugging Face's BART defines an attention's ``k_proj``, ``v_proj``,
    ``q_proj`` in that order, PaddleNLP's ``q_proj``, ``k_proj``, ``v_proj``) by it, the others
    in order. The kinds' counts agree; ``blocks``: the block each side's layers are in."""
    out: list[tuple[str, str]] = []
    tnames = dict(zip((n for n, _ in ts), _names([n for n, _ in ts], blocks[0])))
    pnames = dict(zip((n for n, _ in ps), _names([n for n, _ in ps], blocks[1])))
    for kind in dict.fromkeys(k for _, k in ts):
        tn = [n for n, k in ts if k == kind]
        pn = [n for n, k in ps if k == kind]
        tleaf, pleaf = [tnames[n] for n in tn], [pnames[n] for n in pn]
        named = {leaf for leaf in set(tleaf) & set(pleaf)
                 if leaf[1] and tleaf.count(leaf) == 1 and pleaf.count(leaf) == 1}
        by_name = {pleaf.index(leaf): tleaf.index(leaf) for leaf in named}
        rest = iter(n for i, n in enumerate(pn) if i not in by_name)
        taken = {t: pn[p] for p, t in by_name.items()}
        out += [(n, taken[i] if i in taken else next(rest)) for i, n in enumerate(tn)]
    return out


def _in_blocks(ts: list[tuple[str, str]], ps: list[tuple[str, str]]
               ) -> Optional[list[tuple[str, str]]]:
    """The layers paired block by block (``_block``: the i-th numbered block of the reference
    with the port's i-th, those outside any with those outside any), each block's kinds as
    ``_kind_pairs`` pairs them: the n-th LayerNorm of a BART encoder is not the n-th of the
    port, whose encoder defines its embedding's LayerNorm before its layers, HF's after them.
    None where the two do not hold the same blocks with the same kinds."""
    def blocks(layers: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {"": []}
        for name, kind in layers:
            out.setdefault(_block(name), []).append((name, kind))
        return out

    tb, pb = blocks(ts), blocks(ps)
    if len(tb) != len(pb) or len(tb) == 1:
        return None
    out: list[tuple[str, str]] = []
    for (tblock, tlayers), (pblock, players) in zip(tb.items(), pb.items()):
        if sorted(k for _, k in tlayers) != sorted(k for _, k in players):
            return None
        out += _kind_pairs(tlayers, players, (tblock, pblock))
    return out


def _contradicted(pairs: list[tuple[str, str, bool]]) -> bool:
    """Whether names say the positions mispair: a layer paired with one of another name, where
    the port's block holds a layer of its name and its block one of the port's (HF's OPT and
    BART define k, v, q; PaddleNLP q, k, v: the shapes agree, the names do not)."""
    layer_pairs = dict.fromkeys((tk.rpartition(".")[0], pk.rpartition(".")[0])
                                for tk, pk, _ in pairs)
    tleaves: dict[str, set[str]] = {}
    pleaves: dict[str, set[str]] = {}
    for t, p in layer_pairs:
        tleaves.setdefault(_block(t), set()).add(_leaf(t))
        pleaves.setdefault(_block(p), set()).add(_leaf(p))
    return any(_leaf(t) and _leaf(p) and _leaf(t) != _leaf(p)
               and _leaf(t) in pleaves[_block(p)] and _leaf(p) in tleaves[_block(t)]
               for t, p in layer_pairs)


def _order_plan(torch_side: Any, paddle_side: Any, rules: Optional[ConversionRules],
                explain: bool = True, calls: Optional[tuple[Mapping[str, int], Mapping[str, int]]]
                = None) -> _OrderPlan:
    """``calls``: each side's leaf layers in the order of their first calls
    (``call_order.first_calls``): the keys pair in that order, not in definition order."""
    rules = rules or _DEFAULT_RULES
    tshapes, linear, tlabel, tints = _torch_shapes(torch_side)
    pshapes, plabel, pints = _paddle_shapes(paddle_side)
    torch_keys = [k for k in tshapes if not _DROPPED.search(k) and rules.skip_pattern(k) is None]
    paddle_keys = [k for k in pshapes if rules.port_only_pattern(k) is None]
    if calls is not None:
        torch_keys = in_call_order(torch_keys, calls[0])
        paddle_keys = in_call_order(paddle_keys, calls[1])
    tints &= set(torch_keys)
    pints &= set(paddle_keys)
    if len(tints) != len(pints):
        # constants one side keeps in its state dict and the other not (PaddleNLP's persistable
        # position_ids, its GPT-J's causal mask): no weights, each model keeps its own
        torch_keys = [k for k in torch_keys if k not in tints]
        paddle_keys = [k for k in paddle_keys if k not in pints]
    # the pairs the porter gave (``rules.pairs``: a layer each side defines elsewhere, which
    # no order pairs) are theirs; the rest pair by order around them
    given = [(tk, pk) for tk, pk in rules.pairs if tk in tshapes and pk in pshapes]
    header = f"{tlabel} ({len(torch_keys)} tensors) vs {plabel} ({len(paddle_keys)} tensors)"
    if not given:
        return _plan_rest(torch_keys, paddle_keys, torch_side, paddle_side, rules, explain,
                          tshapes, pshapes, linear, header)
    t_given, p_given = {tk for tk, _ in given}, {pk for _, pk in given}
    plan = _plan_rest([k for k in torch_keys if k not in t_given],
                      [k for k in paddle_keys if k not in p_given], torch_side, paddle_side, rules,
                      explain, tshapes, pshapes, linear, header)
    at = {k: i for i, k in enumerate(torch_keys)}
    pairs, problems, wrong = _check([(at.get(tk, -1), tk, pk) for tk, pk in given], tshapes,
                                    pshapes, linear)
    order = {k: i for i, k in enumerate(tshapes)}
    return dataclasses.replace(
        plan, pairs=tuple(sorted([*plan.pairs, *pairs], key=lambda pair: order[pair[0]])),
        problems=(*problems, *plan.problems), wrong_kind=plan.wrong_kind | wrong)


def _plan_rest(torch_keys: list[str], paddle_keys: list[str], torch_side: Any, paddle_side: Any,
               rules: ConversionRules, explain: bool, tshapes: Mapping[str, tuple[int, ...]],
               pshapes: Mapping[str, tuple[int, ...]], linear: set[str], header: str
               ) -> _OrderPlan:
    flat = [(i, tk, pk) for i, (tk, pk) in enumerate(zip(torch_keys, paddle_keys))]
    pairs, problems, wrong_kind = _check(flat, tshapes, pshapes, linear)
    n = len(pairs)
    problems += [
        (k, f"#{n + j} {k} {list(tshapes[k])} vs nothing") for j, k in enumerate(torch_keys[n:])
    ]
    problems += [
        (None, f"#{n + j} nothing vs {k} {list(pshapes[k])}") for j, k in enumerate(paddle_keys[n:])
    ]
    if (problems or _contradicted(pairs)) and len(torch_keys) == len(paddle_keys):
        named = _same_names_first(torch_keys, paddle_keys)
        candidates = ([named] if named is not None else []) + _by_kind(
            torch_keys, paddle_keys, torch_side, paddle_side, (tshapes, pshapes))
        for kinds in candidates:
            kpairs, kproblems, kwrong = _check(kinds, tshapes, pshapes, linear)
            if not kproblems:
                by_position = dict(zip(torch_keys, paddle_keys))
                moved = frozenset(tk for tk, pk, _ in kpairs if by_position[tk] != pk)
                return _OrderPlan(tuple(kpairs), (), header, frozenset(kwrong), moved)
    if problems and len(torch_keys) != len(paddle_keys):
        fused = _fused_order(torch_keys, paddle_keys, tshapes, pshapes, linear)
        if fused is not None:
            return _OrderPlan(tuple(fused), (), header)
    # the same layers in the same order, or none that pair kind by kind: the positions decide
    explained, lone, at = _explain_refusal(
        torch_side, paddle_side, rules, torch_keys, paddle_keys, tshapes, pshapes
    ) if problems and explain else ("", ((), ()), ())
    if problems and explain and not explained and _reordered(torch_keys, paddle_keys, tshapes,
                                                             pshapes):
        explained = ("the two sides hold tensors of the same shapes, as many of each, in another "
                     "order: layers one side defines elsewhere (PaddleClas's ConvNeXt defines "
                     "its downsamplings before its stages, timm's each in its stage); where each "
                     "side runs them in the same order, pair by the order the layers run, from "
                     "both models and example inputs: inputs=x")
    return _OrderPlan(tuple(pairs), tuple(problems), header, frozenset(wrong_kind),
                      explained=explained, lone=lone, lone_at=at)


def _reordered(torch_keys: list[str], paddle_keys: list[str],
               tshapes: Mapping[str, tuple[int, ...]], pshapes: Mapping[str, tuple[int, ...]]
               ) -> bool:
    """Whether both sides hold as many tensors of each shape (a 2-D one either way round: a
    Linear's transpose), so that only their order differs."""
    def kinds(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
        return sorted(tuple(sorted(shapes[k])) if len(shapes[k]) == 2 else shapes[k]
                      for k in keys)

    return len(torch_keys) == len(paddle_keys) and \
        kinds(torch_keys, tshapes) == kinds(paddle_keys, pshapes)


_MOST_FUSED = 4  # reference layers one port layer may fuse (q, k, v; gate, up)


def _fused_order(torch_keys: list[str], paddle_keys: list[str],
                 tshapes: Mapping[str, tuple[int, ...]], pshapes: Mapping[str, tuple[int, ...]],
                 linear: set[str]) -> Optional[list[tuple[str, str, bool]]]:
    """The pairs by order where the port fuses runs of the reference's layers into one
    (``reprod.align.fusion``: a ``qkv`` Linear for ``query``, ``key``, ``value``), layer by
    layer in order: a layer pairs with one of as many tensors whose shapes pair, or a run of
    2 to 4 reference layers, each with the port layer's tensors (weight, bias), their outputs
    adding up to its. Each part is named under the port layer's parent by its own layer name
    (``blocks.0.attn.query.weight``), which loading then fuses by name. None where the layers
    do not read so, or nothing fuses."""
    tg, pg = _groups(torch_keys), _groups(paddle_keys)
    out: list[tuple[str, str, bool]] = []
    # parameters of their own (a class token, a position table) go where each model defines
    # them, torchvision's ViT before its patch embedding and PaddleClas's after: paired by
    # shape where each shape is one parameter's on both sides
    tb, pb = _bare(torch_keys, tg), _bare(paddle_keys, pg)
    if tb or pb:
        by_shape = {tshapes[torch_keys[tg[g][1][0]]]: g for g in tb}
        other = {pshapes[paddle_keys[pg[g][1][0]]]: g for g in pb}
        if len(by_shape) != len(tb) or len(other) != len(pb) or set(by_shape) != set(other):
            return None
        out += [(torch_keys[tg[by_shape[sh]][1][0]], paddle_keys[pg[other[sh]][1][0]], False)
                for sh in by_shape]
        tg = [grp for g, grp in enumerate(tg) if g not in tb]
        pg = [grp for g, grp in enumerate(pg) if g not in pb]

    def paddle_layout(key: str) -> tuple[int, ...]:
        shape = tshapes[key]
        return shape[::-1] if len(shape) == 2 and key in linear else shape

    fused = False
    i = j = 0
    while i < len(tg) and j < len(pg):
        tk = [torch_keys[x] for x in tg[i][1]]
        pk = [paddle_keys[x] for x in pg[j][1]]
        if len(tk) == len(pk) and all(_shapes_pair(tshapes[a], pshapes[b])
                                      for a, b in zip(tk, pk)):
            pairs, problems, _ = _check(list(zip(tg[i][1], tk, pk)), tshapes, pshapes, linear)
            if problems:
                return None
            out += pairs
            i, j = i + 1, j + 1
            continue
        parent, _, _ = pg[j][0].rpartition(".")
        for k in range(2, _MOST_FUSED + 1):
            run = [[torch_keys[x] for x in idx] for _, idx in tg[i:i + k]]
            if len(run) < k or any(len(keys) != len(pk) for keys in run):
                continue
            fits = True
            for n, port_key in enumerate(pk):
                want = pshapes[port_key]
                shapes = [paddle_layout(keys[n]) for keys in run]
                if any(len(sh) != len(want) or sh[:-1] != want[:-1] for sh in shapes) or \
                        len(want) not in (1, 2) or sum(sh[-1] for sh in shapes) != want[-1] or \
                        any(keys[n].rpartition(".")[2] != port_key.rpartition(".")[2]
                            for keys in run):
                    fits = False
                    break
            names = [tg[i + m][0].rpartition(".")[2] for m in range(k)]
            virtual = [f"{parent}.{name}" if parent else name for name in names]
            if not fits or len(set(names)) != k or any(
                    v + "." + key.rpartition(".")[2] in pshapes for v in virtual for key in pk):
                continue
            for m, keys in enumerate(run):
                out += [(key, f"{virtual[m]}.{key.rpartition('.')[2]}",
                         len(tshapes[key]) == 2 and key in linear) for key in keys]
            i, j, fused = i + k, j + 1, True
            break
        else:
            # the reverse: one reference layer holding a run of the port's (timm's qkv for
            # q_proj, k_proj, v_proj), named under the port layers' parent by its own name,
            # which the conversion then splits by name (``fusion.Split``)
            k = _split_run(tk, pg[j:j + _MOST_FUSED], paddle_keys, pshapes, paddle_layout)
            if k is None:
                return None
            parent = pg[j][0].rpartition(".")[0]
            name = tg[i][0].rpartition(".")[2]
            virtual = f"{parent}.{name}" if parent else name
            if any(f"{virtual}.{key.rpartition('.')[2]}" in pshapes for key in tk):
                return None
            # a run holding a layer named as one of the reference's beside it is a mispairing
            # the shapes hide: Phi-3 defines o_proj before qkv_proj, and by shape its o_proj
            # takes LLaMA's q_proj and its qkv_proj k_proj, v_proj, o_proj
            block = tg[i][0].rpartition(".")[0]
            beside = {layer.rpartition(".")[2] for layer, _ in tg
                      if layer.rpartition(".")[0] == block}
            if any(layer.rpartition(".")[2] in beside for layer, _ in pg[j:j + k]):
                return None
            out += [(key, f"{virtual}.{key.rpartition('.')[2]}",
                     len(tshapes[key]) == 2 and key in linear) for key in tk]
            i, j, fused = i + 1, j + k, True
    if i < len(tg) or j < len(pg) or not fused:
        return None
    return out


def _split_run(tk: list[str], pgroups: list[tuple[str, list[int]]], paddle_keys: list[str],
               pshapes: Mapping[str, tuple[int, ...]], paddle_layout: Any) -> Optional[int]:
    """How many of the port's layers ``pgroups`` (2 to 4, one parent) one reference layer's
    tensors ``tk`` hold side by side along their outputs, tensor by tensor (weight, bias);
    None where no run adds up."""
    for k in range(2, len(pgroups) + 1):
        run = [[paddle_keys[x] for x in idx] for _, idx in pgroups[:k]]
        if any(len(keys) != len(tk) for keys in run) or \
                len({layer.rpartition(".")[0] for layer, _ in pgroups[:k]}) != 1:
            continue
        fits = True
        for n, torch_key in enumerate(tk):
            have = paddle_layout(torch_key)
            shapes = [pshapes[keys[n]] for keys in run]
            if any(len(sh) != len(have) or sh[:-1] != have[:-1] for sh in shapes) or \
                    len(have) not in (1, 2) or sum(sh[-1] for sh in shapes) != have[-1] or \
                    any(keys[n].rpartition(".")[2] != torch_key.rpartition(".")[2]
                        for keys in run):
                fits = False
                break
        if fits:
            return k
    return None


# the last names of a layer's own tensors: a group of one tensor named otherwise is a bare
# parameter of its module (``class_token``, ``pos_embedding``)
_LAYER_TENSORS = re.compile(r"^(weight|bias|running_mean|running_var|_mean|_variance|"
                            r"weight_[a-z]+_l\d+.*|bias_[a-z]+_l\d+.*|in_proj_\w+)$")


def _bare(keys: list[str], groups: list[tuple[str, list[int]]]) -> set[int]:
    """The groups (``_groups``) that are one bare parameter each."""
    return {g for g, (_, idx) in enumerate(groups) if len(idx) == 1
            and not _LAYER_TENSORS.match(keys[idx[0]].rpartition(".")[2])}


def _same_names_first(torch_keys: list[str], paddle_keys: list[str]
                      ) -> Optional[list[tuple[int, str, str]]]:
    """(position, torch key, Paddle key): the keys both sides name alike paired by name, the
    rest in order; None where no name is shared or that pairs nothing otherwise. timm's ViT
    defines ``cls_token`` before ``pos_embed``, PaddleClas's after: by position the two cross."""
    common = set(torch_keys) & set(paddle_keys)
    if not common:
        return None
    position = {k: i for i, k in enumerate(torch_keys)}
    # then the names alike but for case and underscores (HF's LUKE ``embeddings.LayerNorm``
    # against PaddleNLP's ``embeddings.layer_norm``): LUKE's six norms, all [64], listed in
    # another order on each side, paired in order crossed blocks and loaded wrong, silently
    t_rest = [k for k in torch_keys if k not in common]
    p_rest = [k for k in paddle_keys if k not in common]
    t_loose, p_loose = _loose_names(t_rest), _loose_names(p_rest)
    alike = {t: p_loose[n] for n, t in t_loose.items() if n in p_loose}
    taken = set(alike.values())
    rest = zip([k for k in t_rest if k not in alike], [k for k in p_rest if k not in taken])
    out = sorted([(position[k], k, k) for k in common] +
                 [(position[t], t, p) for t, p in alike.items()] +
                 [(position[t], t, p) for t, p in rest])
    if all(p == paddle_keys[i] for i, _, p in out):
        return None  # the positions' own pairing
    return out


def _loose_names(keys: list[str]) -> dict[str, str]:
    """{name without case and underscores: key} of the keys that name is one key's alone."""
    seen: dict[str, list[str]] = {}
    for k in keys:
        seen.setdefault(k.lower().replace("_", ""), []).append(k)
    return {n: ks[0] for n, ks in seen.items() if len(ks) == 1}


def _groups(keys: list[str]) -> list[tuple[str, list[int]]]:
    """The keys' positions, layer by layer (consecutive keys of one layer; a tensor of the root
    model is a layer of its own)."""
    out: list[tuple[str, list[int]]] = []
    for i, k in enumerate(keys):
        layer = k.rpartition(".")[0]
        if out and layer and out[-1][0] == layer:
            out[-1][1].append(i)
        else:
            out.append((layer, [i]))
    return out


def _shapes_pair(ts: tuple[int, ...], ps: tuple[int, ...]) -> bool:
    return ts == ps or (len(ts) == 2 and ts[::-1] == ps) or unit_axes_apart(ts, ps) or \
        kernel_against_matrix(ts, ps)


_Signature = list[tuple[tuple[int, ...], Optional[str]]]


def _align_layers(ts: list[_Signature], ps: list[_Signature],
                  names: Optional[tuple[list[str], list[str]]] = None
                  ) -> Optional[tuple[list[int], list[int]]]:
    """The layers each side alone holds, aligning two sequences of layers (each a list of
    (shape, statistic kind)) with the fewest left alone: a layer pairs with one of as many
    tensors, each pair of shapes equal or transposed. Of readings leaving as many alone, the one
    whose pairs' names share the most words (``names``: each side's layer names; ``_NAMED``)
    wins: torch's encoder with a final LayerNorm against Paddle's without leaves out either
    that norm or the last block's norm2 by shape, and by name only the first. None where the best is reached in
    two ways (two Linears of one shape, either of which could be the extra one)."""
    n, m = len(ts), len(ps)
    if n * m > 250_000:
        return None
    # a layer left alone outweighs every pair of names that differ
    lone = _NAMED * (n + m) + 1
    words = None if names is None else ([_words(x) for x in names[0]],
                                        [_words(x) for x in names[1]])

    def named(i: int, j: int) -> int:
        if words is None:
            return 0
        a, b = words[0][i], words[1][j]
        if not a or not b:
            return _NAMED
        return round(_NAMED * (1 - len(a & b) / len(a | b)))

    def fits(i: int, j: int) -> bool:
        a, b = ts[i], ps[j]
        return len(a) == len(b) and all(x[1] == y[1] and _shapes_pair(x[0], y[0])
                                        for x, y in zip(a, b))

    # cost[i][j][after]: the fewest layers left alone aligning ts[i:] with ps[j:]; ways: how
    # many readings reach it (at most 2). ``after`` = 1 right after leaving a Paddle layer alone,
    # where a torch one may not be left next: a run of lone layers counts as one reading
    big = (n + m + 1) * lone
    cost = [[[big, big] for _ in range(m + 1)] for _ in range(n + 1)]
    ways = [[[0, 0] for _ in range(m + 1)] for _ in range(n + 1)]
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            for after in (0, 1):
                if i == n and j == m:
                    cost[i][j][after], ways[i][j][after] = 0, 1
                    continue
                options = []
                if i < n and j < m and fits(i, j):
                    options.append((cost[i + 1][j + 1][0] + named(i, j), ways[i + 1][j + 1][0]))
                if i < n and not after:
                    options.append((cost[i + 1][j][0] + lone, ways[i + 1][j][0]))
                if j < m:
                    options.append((cost[i][j + 1][1] + lone, ways[i][j + 1][1]))
                if not options:  # torch layers left after a lone Paddle one: read otherwise
                    continue
                best = min(c for c, _ in options)
                cost[i][j][after] = best
                ways[i][j][after] = min(2, sum(w for c, w in options if c == best))
    if ways[0][0][0] != 1:
        return None
    t_alone: list[int] = []
    p_alone: list[int] = []
    i = j = after = 0
    run: set[str] = set()  # the sides with a lone layer since the last pair
    while i < n or j < m:
        here = cost[i][j][after]
        if i < n and j < m and fits(i, j) and cost[i + 1][j + 1][0] + named(i, j) == here:
            i, j, after = i + 1, j + 1, 0
            run = set()
            continue
        if i < n and not after and cost[i + 1][j][0] + lone == here:
            t_alone.append(i)
            i, after = i + 1, 0
            run.add("torch")
        else:
            p_alone.append(j)
            j, after = j + 1, 1
            run.add("paddle")
        if len(run) == 2:
            # a layer on each side between the same two pairs: one layer built with other sizes
            # (a head of 5 classes for 6), not two layers each side alone holds
            return None
    return t_alone, p_alone


# how finely names weigh a pair: the share of the words two layer names share (Jaccard), in
# this many steps. The last name alone paired HF's cls.predictions.transform.dense with
# PaddleNLP's bert.pooler.dense ("dense") and left the port's cls.predictions.transform alone
_NAMED = 4


def _words(name: str) -> frozenset[str]:
    """A layer name's words, case and underscores aside (``LayerNorm`` is ``layer_norm``); a
    Sequential's positions name nothing."""
    return frozenset(w.replace("_", "").lower() for w in name.split(".")
                     if w and not w.isdigit())


_MOST_LONE = 6  # layers one side alone may hold for the shapes to be said to explain a refusal


def _lone_candidates(torch_keys: list[str], paddle_keys: list[str],
                     tshapes: Mapping[str, tuple[int, ...]],
                     pshapes: Mapping[str, tuple[int, ...]]
                     ) -> list[tuple[list[list[str]], list[list[str]]]]:
    """Readings of a refused pairing as a few layers one side alone holds (a port's pooler the
    reference lacks; a reference's sinusoidal table the port computes): (the torch layers' keys,
    the Paddle layers' keys) left alone, aligning the layers in order, then kind by kind (a port
    that also defines a block's layers in another order)."""
    tg, pg = _groups(torch_keys), _groups(paddle_keys)

    def sig(keys: list[str], idx: list[int], shapes: Mapping[str, tuple[int, ...]],
            table: Any) -> _Signature:
        return [(shapes[keys[i]], _stat_kind(keys[i], table)) for i in idx]

    tsig = [sig(torch_keys, idx, tshapes, _TORCH_STAT) for _, idx in tg]
    psig = [sig(paddle_keys, idx, pshapes, _PADDLE_STAT) for _, idx in pg]
    out = []
    whole = _align_layers(tsig, psig, ([name for name, _ in tg], [name for name, _ in pg]))
    if whole is not None:
        out.append(([[torch_keys[i] for i in tg[g][1]] for g in whole[0]],
                    [[paddle_keys[i] for i in pg[g][1]] for g in whole[1]]))
    tkind, pkind = _shape_owners(torch_keys, tshapes), _shape_owners(paddle_keys, pshapes)
    kinds = sorted({tkind[torch_keys[idx[0]]][1] for _, idx in tg} |
                   {pkind[paddle_keys[idx[0]]][1] for _, idx in pg})
    t_alone: list[list[str]] = []
    p_alone: list[list[str]] = []
    for kind in kinds:
        ti = [g for g, (_, idx) in enumerate(tg) if tkind[torch_keys[idx[0]]][1] == kind]
        pi = [g for g, (_, idx) in enumerate(pg) if pkind[paddle_keys[idx[0]]][1] == kind]
        found = _align_layers([tsig[g] for g in ti], [psig[g] for g in pi],
                              ([tg[g][0] for g in ti], [pg[g][0] for g in pi]))
        if found is None:
            return out
        t_alone += [[torch_keys[i] for i in tg[ti[g]][1]] for g in found[0]]
        p_alone += [[paddle_keys[i] for i in pg[pi[g]][1]] for g in found[1]]
    if t_alone or p_alone:
        out.append((t_alone, p_alone))
    # the reading leaving the fewest layers alone first: names now settle readings in order
    # that shapes left open, some of them only by leaving a block's moved layers alone too
    return sorted((c for c in out if 0 < len(c[0]) + len(c[1]) <= _MOST_LONE),
                  key=lambda c: len(c[0]) + len(c[1]))


def _pattern(keys: list[str]) -> str:
    """A rule pattern for one layer's tensors: by the layer's name, or a root tensor's own."""
    layer = keys[0].rpartition(".")[0]
    return f"^{re.escape(layer)}\\." if layer else f"^{re.escape(keys[0])}$"


def _explain_refusal(torch_side: Any, paddle_side: Any, rules: ConversionRules,
                     torch_keys: list[str], paddle_keys: list[str],
                     tshapes: Mapping[str, tuple[int, ...]],
                     pshapes: Mapping[str, tuple[int, ...]]
                     ) -> tuple[str, tuple[tuple[str, ...], tuple[str, ...]],
                                tuple[str, ...]]:
    """The first reading of ``_lone_candidates`` under whose rules every other tensor pairs
    (checked by pairing again), said with those rules, the rules' skip and port_only patterns,
    and the positions of the tensors one side alone holds; "" and none where no reading
    does."""
    biases = _biases_before_norms(torch_keys, paddle_keys, tshapes)
    if biases:
        skip = tuple(f"^{re.escape(b)}$" for b in biases)
        tried = dataclasses.replace(rules, skip=rules.skip + skip)
        if not _order_plan(torch_side, paddle_side, tried, explain=False).problems:
            shown = ", ".join(biases[:3]) + (f" and {len(biases) - 3} more"
                                             if len(biases) > 3 else "")
            return (f"every other tensor pairs by shape, but the torch side's convolutions "
                    f"have a bias before a BatchNorm where the port's have none: {shown}. A "
                    "norm cancels a bias before it in training, and in evaluation holds it in "
                    "its running mean: fold each into the norm after it (running_mean -= bias) "
                    "and drop it before loading (reprod.align.fold_conv_biases(torch_model, x) "
                    "does, checking the outputs stay); skipping them (rules=ConversionRules(skip="
                    "[...])) would load the rest and leave each norm's mean off by its bias",
                    (skip, ()), tuple(f"#{torch_keys.index(b)} {b} {list(tshapes[b])} vs "
                                      "nothing" for b in biases))
    lone = _lone_biases(torch_keys, paddle_keys, tshapes, pshapes)
    if lone is not None:
        t_bias, p_bias = lone
        skip = tuple(f"^{re.escape(b)}$" for b, _ in t_bias)
        only = tuple(f"^{re.escape(b)}$" for b, _ in p_bias)
        tried = dataclasses.replace(rules, skip=rules.skip + skip,
                                    port_only=rules.port_only + only)
        if not _order_plan(torch_side, paddle_side, tried, explain=False).problems:
            parts = []
            for side, other, found, shapes in (("torch side's", "port's", t_bias, tshapes),
                                               ("port's", "torch side's", p_bias, pshapes)):
                for bias, theirs in found:
                    layer = bias.rpartition(".")[0]
                    parts.append(f"the {side} {layer} has a bias {list(shapes[bias])} where the "
                                 f"{other} {theirs} has none")
            said = ([f"skip=[{', '.join('r' + chr(34) + p + chr(34) for p in skip)}]"]
                    if skip else []) + \
                ([f"port_only=[{', '.join('r' + chr(34) + p + chr(34) for p in only)}]"]
                 if only else [])
            at = tuple([f"#{torch_keys.index(b)} {b} {list(tshapes[b])} vs nothing"
                        for b, _ in t_bias] +
                       [f"#{paddle_keys.index(b)} nothing vs {b} {list(pshapes[b])}"
                        for b, _ in p_bias])
            return (f"every other tensor pairs by shape, but {'; '.join(parts)}: the two compute "
                    "otherwise unless that bias is zero. Give the layer without one a bias "
                    "(torch's bias=True, Paddle's bias_attr) to compute the same; where the bias "
                    f"is zero, say so: rules=ConversionRules({', '.join(said)})",
                    (skip, only), at)
    for t_alone, p_alone in _lone_candidates(torch_keys, paddle_keys, tshapes, pshapes):
        skip = [_pattern(keys) for keys in t_alone]
        only = [_pattern(keys) for keys in p_alone]
        tried = dataclasses.replace(rules, skip=rules.skip + tuple(skip),
                                    port_only=rules.port_only + tuple(only))
        if _order_plan(torch_side, paddle_side, tried, explain=False).problems:
            continue
        moved = _moved(t_alone, p_alone, tshapes, pshapes)
        if moved:
            # a layer alone on each side, of the same shapes: likely one each defines elsewhere
            # (HF's ConvBERT its attention's output Linear after its convolutions, PaddleNLP's
            # before them); skipping it would load the port with that layer left as it was
            paired = {tk: pk for t_keys, p_keys in moved for tk, pk in zip(t_keys, p_keys)}
            t_rest = [keys for keys in t_alone if keys[0] not in paired]
            p_rest = [keys for keys in p_alone if keys[0] not in paired.values()]
            given = dataclasses.replace(
                rules, pairs=tuple(rules.pairs) + tuple(paired.items()),
                skip=rules.skip + tuple(_pattern(k) for k in t_rest),
                port_only=rules.port_only + tuple(_pattern(k) for k in p_rest))
            if not _order_plan(torch_side, paddle_side, given, explain=False).problems:
                return _moved_text(paired, t_rest, p_rest, tshapes, pshapes), ((), ()), ()
        parts, said = [], []
        for side, alone, shapes, patterns, field in (
                ("torch", t_alone, tshapes, skip, "skip"),
                ("Paddle", p_alone, pshapes, only, "port_only")):
            if alone:
                held = ", ".join(f"{k} {list(shapes[k])}" for keys in alone for k in keys)
                parts.append(f"the {side} side alone holds {held}")
                said.append(f"{field}=[{', '.join('r' + chr(34) + p + chr(34) for p in patterns)}]")
        text = (f"every other tensor pairs by shape, but {' and '.join(parts)}; where those "
                "have no counterpart (a layer the other side computes or does without), say "
                f"so: rules=ConversionRules({', '.join(said)})")
        # where those sit: by definition order the positions part wherever the two define a
        # layer's tensors in another order (PaddleNLP's encoder layer its linear1 before its
        # norm1), which lists pairs the kinds would pair and says nothing of these
        at = [f"#{torch_keys.index(k)} {k} {list(tshapes[k])} vs nothing"
              for keys in t_alone for k in keys]
        at += [f"#{paddle_keys.index(k)} nothing vs {k} {list(pshapes[k])}"
               for keys in p_alone for k in keys]
        return (text + _untied(torch_side, p_alone, pshapes), (tuple(skip), tuple(only)),
                tuple(at))
    return "", ((), ()), ()


def _lone_biases(torch_keys: list[str], paddle_keys: list[str],
                 tshapes: Mapping[str, tuple[int, ...]], pshapes: Mapping[str, tuple[int, ...]]
                 ) -> Optional[tuple[list[tuple[str, str]], list[tuple[str, str]]]]:
    """Where the two pair in order but for a few biases one side's layer holds and its
    counterpart does not (timm's LCNet head convolution, bias=True, against PaddleClas's,
    bias_attr=False): (torch bias, the port layer without one) and (port bias, the torch layer
    without one); None where anything else parts them."""
    t_alone: list[tuple[str, str]] = []
    p_alone: list[tuple[str, str]] = []
    i = j = 0

    def lone(keys: list[str], k: int, other: list[str], o: int) -> bool:
        # a bias right after its own layer's weight, which paired with the other side's last
        key = keys[k]
        return (key.endswith(".bias") and k > 0 and o > 0
                and keys[k - 1] == key[:-len("bias")] + "weight"
                and not other[o - 1].endswith(".bias"))

    while i < len(torch_keys) and j < len(paddle_keys):
        tk, pk = torch_keys[i], paddle_keys[j]
        if _shapes_pair(tshapes[tk], pshapes[pk]):
            i, j = i + 1, j + 1
        elif lone(torch_keys, i, paddle_keys, j):
            t_alone.append((tk, paddle_keys[j - 1].rpartition(".")[0]))
            i += 1
        elif lone(paddle_keys, j, torch_keys, i):
            p_alone.append((pk, torch_keys[i - 1].rpartition(".")[0]))
            j += 1
        else:
            return None
    for k in torch_keys[i:]:
        if not lone(torch_keys, torch_keys.index(k), paddle_keys, len(paddle_keys)):
            return None
        t_alone.append((k, paddle_keys[-1].rpartition(".")[0]))
    for k in paddle_keys[j:]:
        if not lone(paddle_keys, paddle_keys.index(k), torch_keys, len(torch_keys)):
            return None
        p_alone.append((k, torch_keys[-1].rpartition(".")[0]))
    if not t_alone and not p_alone or len(t_alone) + len(p_alone) > _MOST_LONE:
        return None
    return t_alone, p_alone


def _biases_before_norms(torch_keys: list[str], paddle_keys: list[str],
                         tshapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The torch side's convolution biases right before a BatchNorm's tensors (timm's ResNeSt
    ``SplitAttn.fc1``, HRNet's heads), where the torch side holds as many more tensors as
    there are such biases: a port that folded them away."""
    stats = sum(1 for k in torch_keys if k.endswith("running_mean"))
    if not stats:
        return []
    out = []
    for i, key in enumerate(torch_keys[:-1]):
        layer, _, what = key.rpartition(".")
        weight = tshapes.get(f"{layer}.weight") if layer else None
        if what != "bias" or weight is None or len(weight) < 3:
            continue  # a convolution's weight is [out, in, *kernel]
        norm = torch_keys[i + 1].rpartition(".")[0]
        if f"{norm}.running_mean" in tshapes and tshapes[f"{norm}.running_mean"] == \
                tshapes[key] and norm != layer:
            out.append(key)
    return out if len(torch_keys) - len(paddle_keys) == len(out) else []


def _untied(torch_side: Any, p_alone: list[list[str]], pshapes: Mapping[str, tuple[int, ...]]
            ) -> str:
    """What to add where a tensor the port alone holds is a second name the reference ties to
    another (GPT-2's lm_head.weight, tied to transformer.wte.weight): the port's is a parameter
    of its own, so ``port_only`` would load it as it was and leave the head's share out of the
    embedding's gradient; "" otherwise."""
    state = torch_side.state_dict() if hasattr(torch_side, "state_dict") else torch_side
    try:
        aliases = torch_aliases(state)
    except Exception:  # noqa: BLE001 - arrays read from a file: no memory to share, no ties
        return ""
    said = []
    for keys in p_alone:
        for key in keys:
            shape = tuple(pshapes[key])
            for alias, target in aliases.items():
                t_shape = tuple(getattr(state[alias], "shape", ()))
                if alias.rpartition(".")[2] == key.rpartition(".")[2] and \
                        (t_shape == shape or t_shape == shape[::-1]):
                    said.append(f"the reference's {alias} is {target} (tied: one tensor), the "
                                f"port's {key} a parameter of its own")
    if not said:
        return ""
    return ("; but " + "; ".join(dict.fromkeys(said)) + ": a tie the port leaves out "
            "(tie_word_embeddings), which port_only would load as it is, its gradient missing "
            "from the embedding's: tie it in the port instead")


_STAT_NAMES = {"_mean": "running_mean", "_variance": "running_var"}  # Paddle's -> torch's


def _moved(t_alone: list[list[str]], p_alone: list[list[str]],
           tshapes: Mapping[str, tuple[int, ...]], pshapes: Mapping[str, tuple[int, ...]]
           ) -> list[tuple[list[str], list[str]]]:
    """The layers left alone on each side that pair in order by their tensors' shapes, each
    torch layer with the first Paddle one not yet taken (a layer each side defines elsewhere)."""
    out: list[tuple[list[str], list[str]]] = []
    taken: set[int] = set()
    for t_keys in t_alone:
        for n, p_keys in enumerate(p_alone):
            if n not in taken and len(t_keys) == len(p_keys) and all(
                    _shapes_pair(tshapes[a], pshapes[b]) and
                    _STAT_NAMES.get(b.rpartition(".")[2], b.rpartition(".")[2]) ==
                    a.rpartition(".")[2] for a, b in zip(t_keys, p_keys)):
                taken.add(n)
                out.append((t_keys, p_keys))
                break
    return out


def _moved_text(paired: Mapping[str, str], t_rest: list[list[str]], p_rest: list[list[str]],
                tshapes: Mapping[str, tuple[int, ...]], pshapes: Mapping[str, tuple[int, ...]]
                ) -> str:
    layers = [(tk.rpartition(".")[0], pk.rpartition(".")[0]) for tk, pk in paired.items()]
    named = ", ".join(f"{t} (torch) and {p} (Paddle)" for t, p in dict.fromkeys(layers))
    args = ["pairs={" + ", ".join(f'"{tk}": "{pk}"' for tk, pk in paired.items()) + "}"]
    if t_rest:
        args.append("skip=[" + ", ".join(f'r"{_pattern(k)}"' for k in t_rest) + "]")
    if p_rest:
        args.append("port_only=[" + ", ".join(f'r"{_pattern(k)}"' for k in p_rest) + "]")
    rest = [f"{k} {list(tshapes[k])}" for keys in t_rest for k in keys] + \
        [f"{k} {list(pshapes[k])}" for keys in p_rest for k in keys]
    alone = f"; {', '.join(rest)} on one side alone" if rest else ""
    return (f"every other tensor pairs by shape, but {named} are left alone, each on its own "
            f"side, of the same shapes: a layer each side defines elsewhere in its order (HF's "
            f"ConvBERT defines its attention's output Linear after its convolutions, PaddleNLP's "
            f"before them){alone}. Where so, pair them: "
            f"rules=ConversionRules({', '.join(args)}); or, where each side calls them as the "
            f"other does, pair by the order the layers run, from both models and example "
            f"inputs: inputs=x")


def _with_lone_layers(torch_side: Any, paddle_side: Any, rules: Optional[ConversionRules]
                      ) -> Optional[ConversionRules]:
    """``rules`` with the skips and ``port_only`` patterns under which a refused pairing by
    order pairs (``_explain_refusal``: a few layers one side alone holds); None where it pairs
    as it is, or no such reading is found. For what only reads the pairing (settings,
    localisation's anchors); loading asks the user to say so."""
    skip, only = _order_plan(torch_side, paddle_side, rules).lone
    if not skip and not only:
        return None
    base = rules or _DEFAULT_RULES
    return dataclasses.replace(base, skip=base.skip + skip, port_only=base.port_only + only)


def pair_weights_by_order(
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None,
    inputs: Any = None,
) -> dict[str, str]:
    """Pair torch keys with Paddle keys by definition order, for ports whose names no rule maps
    (``features.0`` against ``stem.conv``). Both frameworks list parameters in definition order,
    BatchNorm statistics included (``running_mean``/``running_var`` against ``_mean``/``_variance``),
    so the n-th tensor on one side is the n-th on the other when the port defines its layers in the
    same order.

    ``inputs`` (example inputs, as ``align_forward`` takes them): pair by the order the layers
    run in, not the order they are defined (``reprod.align.call_order``): each model runs once on
    them, and a leaf layer's tensors are listed by its first call. For a port defining sibling
    layers in another order than the reference (InceptionV4's branches), which by definition
    order pair crossed, silently where their shapes agree; ``align_forward`` names the case.
    Needs both models themselves.

    Each pair is checked: the shapes must be equal, or a 2-D weight the transpose (a Linear); a
    BatchNorm statistic pairs only with a statistic of the same kind. ``num_batches_tracked`` and
    keys that ``rules`` skip are left out. Any disagreement raises one ``KeyMismatchError`` listing
    the first positions that disagree (eight), with both names and shapes.

    ``torch_side``: a torch model, state dict or ``.pth`` path; ``paddle_side``: a Paddle model,
    state dict or ``.pdparams`` path. Returns torch key -> Paddle key, in order. A torch
    ``MultiheadAttention``'s packed ``in_proj_weight``/``in_proj_bias`` appear as the three
    slices Paddle holds (``<layer>.q_proj.weight``, ... : ``rules.split_attention``); a Paddle
    RNN's weight listed twice, once.

    >>> pair_weights_by_order(torch_model, paddle_model)
    {'features.0.weight': 'stem.conv.weight', ..., 'classifier.weight': 'head.weight', ...}
    >>> load_into_paddle(paddle_model, torch_model, by_order=True)   # pair, convert and load
    """
    plan = _order_plan(torch_side, paddle_side, rules, calls=_calls(torch_side, paddle_side,
                                                                    inputs))
    _raise_problems(plan, torch_side, paddle_side, rules)
    return {tk: pk for tk, pk, _ in plan.pairs}


def _calls(torch_side: Any, paddle_side: Any, inputs: Any
           ) -> Optional[tuple[dict[str, int], dict[str, int]]]:
    return None if inputs is None else first_calls(torch_side, paddle_side, inputs)


def pair_by_order(
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None
) -> dict[str, str]:
    """Deprecated: the old name of ``pair_weights_by_order`` (which says what it returns)."""
    warnings.warn(
        "reprod.align.pair_by_order is deprecated; use reprod.align.pair_weights_by_order",
        DeprecationWarning,
        stacklevel=2,
    )
    return pair_weights_by_order(torch_side, paddle_side, rules=rules)


def _rules_from_order(plan: _OrderPlan, base: Optional[ConversionRules]) -> ConversionRules:
    return ConversionRules.from_pairs(
        {tk: pk for tk, pk, _ in plan.pairs},
        transpose=[tk for tk, _, t in plan.pairs if t],
        no_transpose=[tk for tk, _, t in plan.pairs if not t],
        base=base,
    )


def by_order_rules(
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None,
    inputs: Any = None,
) -> ConversionRules:
    """``pair_weights_by_order``'s pairs as ``ConversionRules``, with each 2-D tensor's transpose
    decided by the two shapes (a square one by the torch model's ``nn.Linear`` layers, or the name
    heuristic). ``rules`` (skips, extra transposes) are kept. ``inputs``: pair by call order, as
    ``pair_weights_by_order`` says. Raises like ``pair_weights_by_order``.

    >>> rules = by_order_rules(torch_model, paddle_model)
    >>> paddle_model.set_state_dict(torch_to_paddle(torch_model, rules=rules))
    """
    plan = _order_plan(torch_side, paddle_side, rules, calls=_calls(torch_side, paddle_side,
                                                                    inputs))
    _raise_problems(plan, torch_side, paddle_side, rules)
    return _rules_from_order(plan, rules)


def _raise_problems(plan: _OrderPlan, torch_side: Any, paddle_side: Any,
                    rules: Optional[ConversionRules]) -> None:
    """``plan.raise_problems()``, saying where the two models pair by name instead: Phi-3
    against LLaMA is refused by order (it defines ``o_proj`` before ``qkv_proj``) and matches
    by name, its fused tensors split."""
    try:
        plan.raise_problems()
    except KeyMismatchError as exc:
        if not (_is_torch_module(torch_side) and hasattr(paddle_side, "named_sublayers")):
            raise
        from .structure import compare_structure

        try:
            by_name = compare_structure(torch_side, paddle_side, rules=rules)
        except ReprodError:
            raise exc from None
        if not by_name.ok:
            raise
        raise KeyMismatchError(f"{exc} | by name the models pair ({by_name.summary_line()}): "
                               "leave by_order off") from None
