"""Fused projections: one port Linear holding what the reference keeps in several.

A port written for speed fuses Linears the reference keeps apart: PaddleNLP's LLaMA with
``fuse_attention_qkv`` holds one ``qkv_proj`` [E, E + 2 E_kv] for Hugging Face's ``q_proj``,
``k_proj`` and ``v_proj``, and with ``fuse_attention_ffn`` one ``gate_up_fused_proj`` for
``gate_proj`` and ``up_proj``; a ViT port keeps one ``qkv`` for separate query, key and value.
By name, the reference's parts are "unexpected" and the port's tensor "missing", and nothing
loads.

A fusion is found from shapes alone, after the reference's weights are converted to Paddle's
names and layouts (a Linear's [in, out]): a port tensor no converted key names, and a run of
consecutive converted keys no port tensor names, under the same parent layer, with the same
last name (``weight``, ``bias``: a bias only where its layer's weight fused), the same leading
axes, whose output sizes add up to the port tensor's; and under that parent, a layer both
models name alike (the attention's output projection), without which the names are the port's
own and sums of shapes say nothing. The parts lie along the output axis (the last, in Paddle's
layout).

How they lie along it is the port's own code, which shapes cannot tell: side by side
(``[q | k | v]``, ``groups=1``, timm's and PaddleClas's ViT, PaddleNLP's ``gate_up_fused_proj``),
or each cut in ``groups`` pieces taken in turn (``[q_1 | k_1 | v_1 | q_2 | ...]``: PaddleNLP's
LLaMA reshapes its ``qkv_proj`` output per key-value head, so ``groups`` is its
``num_key_value_heads``). ``ConversionRules(fuse_groups={pattern: groups})`` says which; where
none does, the parts are loaded side by side and the conversion says so. ``align_forward``
tries the other layouts where a layer holding a fused tensor diverges, and names the one that
aligns. By order, ``by_order._fused_order`` names the parts under the port layer's parent, and
all of this follows by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import ReprodError

__all__ = ["Fusion", "Split", "find_fusions", "find_splits", "fuse", "unfuse", "regroup",
           "group_choices", "split_captures"]


def _columns(sizes: Sequence[int], groups: int) -> list[np.ndarray]:
    """Each part's indices along a fused tensor's output axis, ``sizes`` wide each, cut in
    ``groups`` pieces taken in turn."""
    g = groups
    out: list[np.ndarray] = []
    block = sum(s // g for s in sizes)  # one group of every part
    start = 0
    for s in sizes:
        piece = s // g
        out.append((np.arange(g)[:, None] * block + start + np.arange(piece)[None, :]).ravel())
        start += piece
    return out


def _layout(parts: Sequence[str], groups: int) -> str:
    names = [_short(p) for p in parts]
    if groups == 1:
        return "[" + " | ".join(names) + "] side by side"
    return f"[{' | '.join(n + '_1' for n in names)} | ...] in {groups} groups"


@dataclass(frozen=True)
class Fusion:
    """One port tensor (``port_key``) holding the converted reference tensors ``parts`` (Paddle
    names; query, key, value in that order where their names say so, else in the reference's
    order) along its last axis, ``sizes`` wide each, cut in ``groups`` pieces taken in turn
    (1: side by side)."""

    port_key: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: int = 1

    @property
    def layout(self) -> str:
        return _layout(self.parts, self.groups)

    def columns(self) -> list[np.ndarray]:
        """Each part's indices along the fused tensor's last axis."""
        return _columns(self.sizes, self.groups)

    def why(self, part: str) -> str:
        i = self.parts.index(part)
        return (f"into {self.port_key} ({self.sizes[i]} of its {sum(self.sizes)} outputs: "
                f"{self.layout})")


@dataclass(frozen=True)
class Split:
    """The reverse: one reference tensor holding what the port keeps in several (Hugging
    Face's Phi-3 ``qkv_proj`` and ``gate_up_proj`` against a port written as LLaMA is, with
    ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``). ``ref_key``: its Paddle
    name once converted; ``parts``: the port tensors it holds along its output axis (the last,
    in Paddle's layout), ``sizes`` wide each, cut in ``groups`` pieces taken in turn as the
    reference's code lays them out. ``torch_key``, ``torch_parts``, ``axis``: the same in the
    reference's own names and layout (a Linear's weight holds its outputs in rows: ``axis``
    0), each part named after the port's layer beside the reference's, so that the
    conversion's rules rename it as they rename the rest of that layer."""

    ref_key: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: int = 1
    torch_key: str = ""
    torch_parts: tuple[str, ...] = ()
    axis: int = -1
    linear: bool = False  # a Linear's weight, which Paddle holds transposed
    # where the port's parts hold the reference's tensor in no layout (``model_splits``): what
    # they hold instead, for the divergence's hint
    stray: str = ""

    @property
    def layout(self) -> str:
        return _layout(self.parts, self.groups)

    def columns(self) -> list[np.ndarray]:
        """Each part's indices along the reference tensor's output axis."""
        return _columns(self.sizes, self.groups)

    def torch_index(self, i: int) -> tuple[Any, ...]:
        """Part ``i``'s index into the reference's tensor in its own layout: a slice (a view)
        where the parts lie side by side."""
        if self.groups == 1:
            start = sum(self.sizes[:i])
            pick: Any = slice(start, start + self.sizes[i])
        else:
            pick = self.columns()[i]
        return (slice(None),) * self.axis + (pick,) if self.axis >= 0 else (..., pick)

    def part_why(self, torch_part: str) -> str:
        return self.why(self.parts[self.torch_parts.index(torch_part)])

    def share(self, part: str) -> str:
        i = self.parts.index(part)
        return (f"{self.sizes[i]} of its {sum(self.sizes)} outputs: {self.layout}; the "
                "reference fuses what the port keeps apart")

    def why(self, part: str) -> str:
        return f"split from {self.torch_key or self.ref_key} ({self.share(part)})"


def _short(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if len(parts) > 1 else parts[-1]


def _split(key: str) -> tuple[str, str, str]:
    """(parent layer prefix, layer, last name): ``a.attn.q.weight`` -> (``a.attn.``, ``q``,
    ``weight``)."""
    parts = key.split(".")
    if len(parts) < 2:
        return "", "", key
    return ".".join(parts[:-2]) + ("." if len(parts) > 2 else ""), parts[-2], parts[-1]


def _divides(groups: int, sizes: Sequence[int]) -> bool:
    return groups >= 1 and all(s % groups == 0 for s in sizes)


def find_fusions(converted: Mapping[str, tuple[int, ...]], port: Mapping[str, tuple[int, ...]],
                 rules: Any = None) -> list[Fusion]:
    """The fusions between converted reference shapes (Paddle names and layouts, in the
    reference's order) and the port's shapes; ``rules.fuse_groups`` gives each its layout.
    A port tensor more than one run of parts could fill is left alone (it stays missing)."""
    spare = [k for k in converted if k not in port]
    wanted = [k for k in port if k not in converted]
    if not spare or not wanted:
        return []
    # a parent holding a layer both name alike (an attention's o_proj beside its fused qkv_proj):
    # the names are the port's own otherwise, and shapes that add up say nothing
    anchored = {_split(k)[0] for k in converted if k in port}
    taken: set[str] = set()
    out: list[Fusion] = []
    by_layer: dict[tuple[str, str], Fusion] = {}
    # weights first: a bias fuses as its layer's weight did
    for key in sorted(wanted, key=lambda k: _split(k)[2] != "weight"):
        shape = tuple(int(d) for d in port[key])
        parent, layer, last = _split(key)
        weight = by_layer.get((parent, layer))
        # a Linear's weight, or the bias of one fused already
        if parent not in anchored or len(shape) != (1 if weight is not None else 2):
            continue
        cands = [k for k in spare if k not in taken and _split(k)[0] == parent
                 and _split(k)[2] == last and len(converted[k]) == len(shape)
                 and tuple(converted[k][:-1]) == shape[:-1]]
        if weight is not None:  # the same layers as its weight, or none
            names = [f"{parent}{_split(p)[1]}.{last}" for p in weight.parts]
            runs = [names] if all(n in cands for n in names) else []
        else:
            runs = []
            for i in range(len(cands)):
                total = 0
                for j in range(i, len(cands)):
                    total += int(converted[cands[j]][-1])
                    if total >= shape[-1]:
                        break
                if total == shape[-1] and j > i:
                    runs.append(cands[i:j + 1])
        if len(runs) != 1:
            continue
        parts = _qkv_order(runs[0])
        sizes = tuple(int(converted[k][-1]) for k in parts)
        if sum(sizes) != shape[-1]:
            continue
        groups = _groups_for(key, sizes, rules)
        f = Fusion(key, tuple(parts), sizes, groups)
        taken.update(parts)
        by_layer[(parent, layer)] = f
        out.append(f)
    return out


def find_splits(converted: Mapping[str, tuple[int, ...]], port: Mapping[str, tuple[int, ...]],
                rules: Any = None, fusions: Sequence[Fusion] = ()) -> list[Split]:
    """The reverse of ``find_fusions``: the converted reference tensors each holding a run of
    the port's (in the port's order, query, key, value first where named so), found by the same
    rules with the sides swapped, among the tensors ``fusions`` leave; ``rules.fuse_groups``,
    matched against the reference's converted key, gives each its layout."""
    taken = {p for f in fusions for p in f.parts}
    fused = {f.port_key for f in fusions}
    found = find_fusions({k: v for k, v in port.items() if k not in fused},
                         {k: v for k, v in converted.items() if k not in taken}, rules)
    return [Split(f.port_key, f.parts, f.sizes, f.groups) for f in found]


def split(arrays: Mapping[str, Any], splits: Sequence[Split]) -> dict[str, Any]:
    """``arrays`` (converted: Paddle names and layouts) with each split's reference tensor
    replaced by the port's parts it holds, in its place among the keys."""
    if not splits:
        return dict(arrays)
    by_key = {s.ref_key: s for s in splits}
    out: dict[str, Any] = {}
    for key, value in arrays.items():
        s = by_key.get(key)
        if s is None:
            out[key] = value
        else:
            out.update(zip(s.parts, unfuse(value, s)))
    return out


def torch_splits(state_shapes: Mapping[str, tuple[int, ...]], port: Mapping[str, tuple[int, ...]],
                 *, linear_weights: Optional[set[str]] = None, rules: Any = None,
                 known: Optional[Mapping[str, bool]] = None) -> list[Split]:
    """The splits between a torch state dict (its shapes, split as ``split_attention`` splits
    torch's packed attention) and a port's shapes, with the reference's own names and layout
    filled in (``Split.torch_key``...): each part named after the port's layer, under the
    reference tensor's parent; kept only where the conversion's rules take that name to the
    port's part, as they take the rest of the layer."""
    import dataclasses

    from .rules import plan_conversion

    plan = plan_conversion(dict(state_shapes), linear_weights=linear_weights, rules=rules,
                           known=known)
    by_paddle = {p.paddle_name: p for p in plan if p.paddle_name is not None}
    converted = {k: p.paddle_shape for k, p in by_paddle.items() if p.paddle_shape is not None}
    out: list[Split] = []
    for s in find_splits(converted, port, rules, find_fusions(converted, port, rules)):
        kp = by_paddle[s.ref_key]
        parent, _, last = _split(kp.torch_name)
        linear = kp.action == "transpose"
        axis = 0 if linear else len(kp.torch_shape or ()) - 1

        # the port's layer names beside the reference's (renamed as the rest of that layer),
        # else, where the rules name the reference's tensor one by one (pairs by order), the
        # port's own keys, which no rule renames
        names = next((n for n in (tuple(f"{parent}{_split(p)[1]}.{last}" for p in s.parts),
                                  tuple(s.parts))
                      if n[0] not in state_shapes and _renamed_to(n, s, kp.torch_shape or (),
                                                                  axis, linear, rules)), None)
        if names is None:
            continue
        out.append(dataclasses.replace(s, torch_key=kp.torch_name, torch_parts=names, axis=axis,
                                       linear=linear))
    return out


def _renamed_to(names: tuple[str, ...], s: Split, shape: tuple[int, ...], axis: int,
                linear: bool, rules: Any) -> bool:
    """Whether the conversion's rules take the torch names ``names`` of ``s``'s parts (their
    tensor of ``shape`` cut along ``axis``) to the port's parts."""
    from .rules import plan_conversion

    shapes = {}
    for n, size in zip(names, s.sizes):
        cut = list(shape)
        cut[axis] = size
        shapes[n] = tuple(cut)
    renamed = {p.torch_name: p.paddle_name for p in plan_conversion(
        shapes, linear_weights=set(names) if linear else set(), rules=rules)}
    return [renamed.get(n) for n in names] == list(s.parts)


def port_splits(state: Mapping[str, Any], paddle_side: Any, rules: Any = None,
                linear_weights: Optional[set[str]] = None) -> list[Split]:
    """``torch_splits`` between a torch state dict (``linear_weights``: its Linear weights,
    None to guess them as the conversion does) and a Paddle model, state dict or ``.pdparams``
    path."""
    from .by_order import _paddle_shapes
    from .rules import known_layouts, packed_linear_weights, port_splitting, split_attention

    with port_splitting(()):  # the reference's own tensors, whatever splits are in effect
        port = _paddle_shapes(paddle_side)[0]
        linear = None if linear_weights is None else \
            set(linear_weights) | packed_linear_weights(state)
        shapes = {k: tuple(int(d) for d in np.shape(v))
                  for k, v in split_attention(state)[0].items()}
        return torch_splits(shapes, port, linear_weights=linear, rules=rules,
                            known=known_layouts(state))


def model_splits(torch_model: Any, paddle_model: Any, rules: Any = None) -> list[Split]:
    """``port_splits`` between a torch model and its port, each laid out as the port's parts
    hold it now: the layout ``rules`` give if the parts' values are the reference's tensor cut
    so, else the other layout they are cut in (a porter's own script split it per head), a
    bias as its weight. Their captures are then cut as the parts were, and a layout the
    reference's code does not read shows where that code diverges (``split_layout_hint``).
    Parts holding the reference's tensor in no layout keep the rules' and say what they hold
    (``Split.stray``)."""
    import dataclasses

    from ..adapters import to_numpy
    from .rules import linear_weight_names, unaliased

    found = port_splits(torch_model.state_dict(), paddle_model, rules,
                        linear_weight_names(torch_model))
    if not found or not hasattr(paddle_model, "state_dict"):
        return found
    sd = torch_model.state_dict()
    port = unaliased(paddle_model.state_dict())[0]
    out: list[Split] = []
    weights: dict[str, int] = {}  # layer -> the groups its weight's parts were found in
    for s in found:  # weights first (``find_fusions``)
        layer = s.ref_key.rsplit(".", 1)[0]
        if layer in weights:
            g = weights[layer]
            out.append(dataclasses.replace(s, groups=g) if _divides(g, s.sizes) else s)
            continue
        # the tensors' own memory, read here only (bfloat16 as float32, on both sides)
        whole = to_numpy(sd[s.torch_key], copy=False).array
        held = [to_numpy(port[p], copy=False).array for p in s.parts]
        here = _held_as(s, whole, held)
        if here is None:
            here = dataclasses.replace(s, stray=_stray_split(s, whole, held))
        weights[layer] = here.groups
        out.append(here)
    return out


def _held_as(s: Split, whole: np.ndarray, held: Sequence[np.ndarray]) -> Optional[Split]:
    """``s`` in the layout (its own first) whose cut of ``whole`` (the reference's tensor, in
    its own layout) the parts ``held`` (the port's, in Paddle's) are."""
    import dataclasses

    for g in _layouts(s):
        if _cut_is(s.sizes, g, s.axis, whole, held, s.linear):
            return s if g == s.groups else dataclasses.replace(s, groups=g)
    return None


def _layouts(f: Any) -> Any:
    """A fusion's or split's own layout, then the others it allows, counted only if asked for."""
    yield f.groups
    yield from group_choices(f)


def _cut_is(sizes: Sequence[int], groups: int, axis: int, whole: np.ndarray,
            held: Sequence[np.ndarray], transposed: bool) -> bool:
    """Whether the parts ``held`` are ``whole`` cut along ``axis`` into ``sizes`` laid out in
    ``groups``; ``transposed``: each part is held transposed against ``whole`` (a Linear's
    weight in Paddle's layout against torch's). Compared through views: the axis split into
    (groups, one group of every part), each part's into (groups, its piece). No copy of a
    tensor is made (a fancy-indexed cut copied 0.6 s of a 100M-parameter Phi-3's 1.2)."""
    g = groups
    if not _divides(g, sizes) or int(whole.shape[axis]) != sum(sizes):
        return False
    w = np.moveaxis(whole, axis, 0)
    w = w.reshape((g, sum(sizes) // g) + w.shape[1:])
    start = 0
    for size, part in zip(sizes, held):
        piece = size // g
        p = np.moveaxis(part.T if transposed else part, axis, 0)
        if p.shape != (size,) + w.shape[2:]:
            return False
        p = p.reshape((g, piece) + p.shape[1:])
        if not np.array_equal(w[:, start:start + piece], p.astype(w.dtype, copy=False)):
            return False
        start += piece
    return True


def _stray_split(s: Split, whole: np.ndarray, held: Sequence[np.ndarray]) -> str:
    """What the parts of a split hold where they are the reference's tensor in no layout: its
    outputs in another order (a conversion script cutting ``[k | v | q]``), or not its."""
    import dataclasses
    import itertools

    names = ", ".join(_short(p) for p in s.parts)
    key = s.torch_key or s.ref_key
    for order in itertools.islice(itertools.permutations(range(len(s.parts))), 1, 24):
        moved = dataclasses.replace(s, parts=tuple(s.parts[i] for i in order),
                                    sizes=tuple(s.sizes[i] for i in order), groups=1)
        other = _held_as(moved, whole, [held[i] for i in order])
        if other is not None:
            return (f"the port's {names} hold {key}'s outputs cut as {other.layout}, and the "
                    f"reference reads them as {s.layout}: its {names} in another order")
    return (f"the port's {names} hold none of {key}'s outputs in the layouts they allow (side "
            "by side, or cut in groups, in any order): their values are not the reference's")


def splitting_for_port(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(torch_model, paddle_model, ..., rules=, by_order=)`` run with the reference's
    tensors that hold several of the port's split as the port keeps them (``model_splits``,
    ``rules.port_splitting``): its plan, gradients, moments and layer captures all read them
    so. By order (``by_order=True``), the reference's tensor is named by the pairing
    (``by_order._fused_order``) and split by name from there; within, the models pair part for
    part."""
    import functools

    from .rules import _SPLITS, port_splitting

    @functools.wraps(fn)
    def run(torch_model: Any, paddle_model: Any, *args: Any, **kwargs: Any) -> Any:
        if _SPLITS.get() or not hasattr(torch_model, "state_dict"):
            return fn(torch_model, paddle_model, *args, **kwargs)
        rules = kwargs.get("rules")
        rules = rules if hasattr(rules, "fuse_groups_for") else None
        if kwargs.get("by_order"):
            from .by_order import by_order_rules

            try:
                rules = by_order_rules(torch_model, paddle_model, rules=rules)
            except ReprodError:  # refused: ``fn`` says why, as it would without splits
                return fn(torch_model, paddle_model, *args, **kwargs)
        try:
            splits = model_splits(torch_model, paddle_model, rules)
        except ReprodError:  # a port with no state dict to read: ``fn`` takes it as it can
            splits = []
        with port_splitting(splits):
            return fn(torch_model, paddle_model, *args, **kwargs)
    return run


# a projection's role by its layer's name: query, key, value
_ROLE = re.compile(r"(?i)^(?:(q|k|v)(?:_?proj|_lin|_linear)?|(query|key|value)(?:_?proj)?)$")


def _qkv_order(parts: Sequence[str]) -> list[str]:
    """``parts`` in query, key, value order where their layers' names say which is which: a
    fused projection holds them so whatever order the reference defines them in (Hugging
    Face's BART and OPT define ``k_proj``, ``v_proj``, ``q_proj``)."""
    roles = []
    for p in parts:
        m = _ROLE.match(_short(p))
        if m is None:
            return list(parts)
        roles.append((m.group(1) or m.group(2)).lower()[0])
    if sorted(roles) != ["k", "q", "v"]:
        return list(parts)
    return [p for _, p in sorted(zip(roles, parts), key=lambda rp: "qkv".index(rp[0]))]


def _groups_for(key: str, sizes: Sequence[int], rules: Any) -> int:
    pattern_groups = getattr(rules, "fuse_groups_for", None)
    found = pattern_groups(key) if pattern_groups is not None else None
    if found is None:
        return 1
    pattern, groups = found
    if not _divides(groups, sizes):
        raise ReprodError(
            f"fuse_groups {pattern!r}: {groups} groups do not divide {key}'s parts "
            f"({', '.join(str(s) for s in sizes)} outputs)")
    return groups


def fuse(arrays: Mapping[str, Any], fusions: Sequence[Fusion]) -> dict[str, Any]:
    """``arrays`` with each fusion's parts replaced by the port tensor they make up, in its
    place among the keys."""
    if not fusions:
        return dict(arrays)
    first = {f.parts[0]: f for f in fusions}
    gone = {p for f in fusions for p in f.parts}
    out: dict[str, Any] = {}
    for key, value in arrays.items():
        if key in first:
            f = first[key]
            parts = [np.asarray(arrays[p]) for p in f.parts]
            dtype = np.result_type(*parts)
            fused = np.empty(parts[0].shape[:-1] + (sum(f.sizes),), dtype=dtype)
            for cols, part in zip(f.columns(), parts):
                fused[..., cols] = part
            out[f.port_key] = fused
        elif key not in gone:
            out[key] = value
    return out


def unfuse(value: Any, fusion: Fusion) -> list[np.ndarray]:
    """The parts a fused port tensor holds, as ``fusion`` lays them out."""
    arr = np.asarray(value)
    return [np.ascontiguousarray(arr[..., cols]) for cols in fusion.columns()]


def regroup(value: Any, fusion: Fusion, groups: int) -> np.ndarray:
    """A fused tensor laid out as ``fusion`` says, laid out in ``groups`` instead."""
    other = Fusion(fusion.port_key, fusion.parts, fusion.sizes, groups)
    parts = unfuse(value, fusion)
    out = np.empty_like(np.asarray(value))
    for cols, part in zip(other.columns(), parts):
        out[..., cols] = part
    return out


def group_choices(fusion: Fusion, limit: Optional[int] = None) -> list[int]:
    """The layouts a fusion's parts allow besides its own: every count of groups that divides
    each part's size (side by side first, then by count)."""
    sizes = fusion.sizes
    top = min(sizes)
    out = [g for g in range(1, top + 1) if _divides(g, sizes) and g != fusion.groups]
    return out if limit is None else out[:limit]


def _role(key: str) -> str:
    """A key with its block indices left out: the same tensor of every block."""
    return ".".join("#" if seg.isdigit() else seg for seg in key.split("."))


def model_fusions(torch_model: Any, paddle_model: Any, rules: Any = None,
                  strays: Optional[list[tuple[Fusion, Optional[Fusion]]]] = None
                  ) -> list[tuple[Fusion, list[np.ndarray]]]:
    """The fusions between a torch model's converted weights and a Paddle model's, each with
    its parts' converted values (views of the torch tensors, to be read before they change) and
    with the layout the port's tensor holds them in now (the one whose parts equal them). Those in no layout are left out (their values differ), and
    put in ``strays`` with the layout of the parts in another order that the port's tensor
    holds, or None."""
    import itertools

    from ..adapters import to_numpy
    from .framework import _torch_params_plan, _torch_view
    from .rules import split_attention, unaliased

    plan = _torch_params_plan(torch_model, rules)
    state = split_attention(torch_model.state_dict())[0]
    by_paddle = {p.paddle_name: p for p in plan.values() if p.paddle_name is not None}
    port_state = unaliased(paddle_model.state_dict())[0]
    port_shapes = {k: tuple(int(d) for d in v.shape) for k, v in port_state.items()}
    out: list[tuple[Fusion, list[np.ndarray]]] = []

    def laid_out(f: Fusion, held: np.ndarray, parts: list[np.ndarray]) -> Optional[Fusion]:
        for g in _layouts(f):
            if _cut_is(f.sizes, g, held.ndim - 1, held, parts, False):
                return f if g == f.groups else Fusion(f.port_key, f.parts, f.sizes, g)
        return None

    for f in find_fusions({k: p.paddle_shape for k, p in by_paddle.items()
                           if p.paddle_shape is not None}, port_shapes, rules):
        # the tensors' own memory, read here only: the parts in Paddle's layout as views (a
        # Linear's weight transposed), bfloat16 as float32 on both sides
        parts = [_torch_view(state[by_paddle[k].torch_name], by_paddle[k]) for k in f.parts]
        held = to_numpy(port_state[f.port_key], copy=False).array
        here = laid_out(f, held, parts)
        if here is not None:
            out.append((here, parts))
            continue
        if strays is None:
            continue
        other = None
        for order in itertools.islice(itertools.permutations(range(len(f.parts))), 1, 24):
            moved = Fusion(f.port_key, tuple(f.parts[i] for i in order),
                           tuple(f.sizes[i] for i in order), 1)
            other = laid_out(moved, held, [parts[i] for i in order])
            if other is not None:
                break
        strays.append((f, other))
    return out


def stray_hint(layer: str, strays: Sequence[tuple[Fusion, Optional[Fusion]]]) -> Optional[str]:
    """Where ``layer`` (a port layer, "" the model) holds a fused tensor whose values are the
    reference's parts in no layout (``model_fusions``' strays), what it holds instead."""
    prefix = f"{layer}." if layer else ""
    for f, other in strays:
        if not f.port_key.startswith(prefix) or not f.port_key.endswith(".weight"):
            continue
        names = ", ".join(_short(p) for p in f.parts)
        if other is not None:
            return (f"{f.port_key} holds {', '.join(_short(p) for p in other.parts)} laid out "
                    f"{other.layout}: the reference's {names} in another order, which a fused "
                    f"projection reads as {names}")
        return (f"{f.port_key} holds the reference's {names} in none of the layouts they "
                "allow (side by side, or cut in groups, in any order): its values are not "
                "theirs")
    return None


def _candidates(fusion: Fusion, port_layer: Any, limit: int) -> list[int]:
    """The other layouts worth a run, likeliest first: side by side, then each head count the
    port's layer holds (a split per head or per key-value head), then the rest by count."""
    from .settings import _HEADS

    choices = group_choices(fusion)
    first = [1] if 1 in choices else []
    for layer in port_layer:
        for name in _HEADS + ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
            value = getattr(layer, name, None)
            if isinstance(value, int) and value in choices and value not in first:
                first.append(value)
    return (first + [g for g in choices if g not in first])[:limit]


def split_captures(ref: Mapping[str, Any], port: Mapping[str, Any],
                   fusions: Sequence[Fusion], splits: Sequence[Split] = ()
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer captures (``reprod.capture.record``) with each fused port layer's keys given under
    the reference's layers it fuses: its output (and output gradient, and its parameters'
    gradients) cut along the last axis as the fusion lays the parts out, its input as it is.
    An input's gradient, the sum of the parts' on the port's side, has no counterpart: the
    reference's parts' are left out too. ``splits``, the reverse: each reference layer holding
    several of the port's cut so, under the names ``Split.torch_parts`` gives the parts (the
    reference's parameters' gradients in Paddle's layout: ``align_train``'s ``ref_layout``)."""
    port, ref = _cut(port, ref, [(f.port_key, f.parts, f.columns()) for f in fusions])
    ref, port = _cut(ref, port, [(s.torch_key, s.torch_parts, s.columns()) for s in splits])
    return ref, port


def _cut(whole: Mapping[str, Any], other: Mapping[str, Any],
         table: Sequence[tuple[str, Sequence[str], list[np.ndarray]]]
         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``split_captures`` for one side: ``whole``'s keys of each (tensor, its parts' names,
    their columns) in ``table`` cut into the parts', and ``other``'s input gradients of the
    parts' layers left out."""
    from ..capture.naming import parse_key

    layers: dict[str, list[tuple[str, np.ndarray]]] = {}
    params: dict[str, list[tuple[str, np.ndarray]]] = {}
    for key, parts, columns in table:
        params[key] = list(zip(parts, columns))
        if key.endswith(".weight"):
            layers[key[:-7]] = [(p.rsplit(".", 1)[0], c) for p, c in zip(parts, columns)]
    if not layers:
        return dict(whole), dict(other)
    total = {lp: sum(len(c) for _, c in parts) for lp, parts in layers.items()}
    part_layers = {rl for parts in layers.values() for rl, _ in parts}
    out: dict[str, Any] = {}
    for key, value in whole.items():
        k = parse_key(key)
        cut_by = None if k is None else (params.get(k.name) if k.is_param
                                         else layers.get(k.name))
        if cut_by is None:
            out[key] = value
            continue
        if k.what == "grad_in":
            continue
        arr = np.asarray(value)
        cut = k.is_param or (k.what in ("out", "grad_out") and arr.ndim
                             and arr.shape[-1] == total.get(k.name, -1))
        for name, cols in cut_by:
            out[str(k.with_name(name))] = arr[..., cols] if cut else arr
    kept = {}
    for key, value in other.items():
        k = parse_key(key)
        if k is not None and not k.is_param and k.what == "grad_in" and k.name in part_layers:
            continue
        kept[key] = value
    return out, kept


def layout_hint(layer: str, paddle_model: Any, fusions: Sequence[tuple[Fusion, list[np.ndarray]]],
                aligns: Any, limit: int = 8) -> Optional[str]:
    """Where ``layer`` (a port layer, "" the model) holds a fused tensor and diverges, the layout
    of its parts under which it aligns (``aligns(fusions)``: whether the layer aligns now, the
    fusions laid out as they are now), each tried by writing the port's tensors of that role
    (in every block) laid out so, and put back after. None where no layout tried aligns it."""
    prefix = f"{layer}." if layer else ""
    inside = [(f, parts) for f, parts in fusions if f.port_key.startswith(prefix)]
    if not inside:
        return None
    named = dict(paddle_model.named_sublayers(include_self=True))
    state = paddle_model.state_dict()
    for role in dict.fromkeys(_role(f.port_key) for f, _ in inside):
        if not role.endswith("weight"):
            continue
        layer_role = role.rsplit(".", 1)[0]  # its bias goes with it
        group = [(f, parts) for f, parts in fusions if _role(f.port_key).rsplit(".", 1)[0]
                 == layer_role]
        here = next(f for f, _ in inside if _role(f.port_key) == role)
        owner = here.port_key.rsplit(".", 2)[0]
        holders = [named[n] for n in (owner, owner.rsplit(".", 1)[0]) if n in named]
        saved = {f.port_key: np.array(state[f.port_key].numpy()) for f, _ in group}
        regrouped = {f.port_key for f, _ in group}

        def write(g: int, group: Any = group, saved: Any = saved) -> None:
            for f, _ in group:
                state[f.port_key].set_value(
                    regroup(saved[f.port_key], f, g).astype(saved[f.port_key].dtype))

        def now(g: int, regrouped: set[str] = regrouped) -> bool:
            return bool(aligns([Fusion(f.port_key, f.parts, f.sizes, g)
                                if f.port_key in regrouped else f for f, _ in fusions]))

        found = _first_layout(state, saved, here, holders, [f.sizes for f, _ in group], limit,
                              write, now)
        if found is not None:
            tried = Fusion(here.port_key, here.parts, here.sizes, found)
            pattern = re.escape(layer_role.rsplit(".", 1)[-1])
            return (f"{here.port_key} holds {', '.join(_short(p) for p in here.parts)} "
                    f"laid out {here.layout}, and the port reads them as "
                    f"{tried.layout}: with that layout it aligns; load with "
                    f"ConversionRules(fuse_groups={{{pattern!r}: {found}}})")
    return None


def _first_layout(state: Any, saved: dict[str, np.ndarray], here: Any, holders: list[Any],
                  sizes: list[Sequence[int]], limit: int, write: Callable[[int], None],
                  aligns: Callable[[int], bool]) -> Optional[int]:
    """``layout_hint``'s and ``split_layout_hint``'s search: the first group count ``g`` (of
    ``here``'s candidates) dividing every tensor's part ``sizes`` under which, the port's
    tensors written so (``write(g)``), the layer aligns (``aligns(g)``). The port's tensors
    (``saved``) are put back in ``state`` whatever is found or raised."""
    try:
        for g in _candidates(here, holders, limit):
            if all(_divides(g, s) for s in sizes):
                write(g)
                if aligns(g):
                    return g
    finally:
        for key, value in saved.items():
            state[key].set_value(value)
    return None


def split_layout_hint(layer: str, torch_model: Any, paddle_model: Any, splits: Sequence[Split],
                      aligns: Callable[[], bool], limit: int = 8) -> Optional[str]:
    """The reverse of ``layout_hint``: where ``layer`` (a port layer, "" the model) holds the
    parts of a reference tensor that holds several of the port's and diverges with its input
    aligned, the parts were cut in a layout other than the one the reference's code reads them
    in (each part's own output aligns, as it was cut alike from both). Each other layout is
    tried by loading the port's parts of that role (in every block) cut so from the reference's
    tensors, and put back after; ``aligns()``: whether the layer aligns now."""
    import dataclasses

    from ..adapters import to_numpy

    prefix = f"{layer}." if layer else ""
    inside = [s for s in splits if s.parts[0].startswith(prefix)]
    if not inside:
        return None
    sd = torch_model.state_dict()
    modules = dict(torch_model.named_modules())
    state = paddle_model.state_dict()
    for role in dict.fromkeys(_role(s.ref_key) for s in inside):
        if not role.endswith("weight"):
            continue
        layer_role = role.rsplit(".", 1)[0]  # its bias goes with it
        group = [s for s in splits if _role(s.ref_key).rsplit(".", 1)[0] == layer_role
                 and all(p in state for p in s.parts)]
        here = next(s for s in inside if _role(s.ref_key) == role)
        owner = here.torch_key.rsplit(".", 2)[0]
        holders = [modules[n] for n in (owner, owner.rsplit(".", 1)[0]) if n in modules]
        whole = {}
        for s in group:
            arr = to_numpy(sd[s.torch_key]).array
            whole[s.ref_key] = arr.T if s.linear else arr
        saved = {p: np.array(state[p].numpy()) for s in group for p in s.parts}

        def write(g: int, group: Any = group, whole: Any = whole, saved: Any = saved
                  ) -> None:
            for s in group:
                cut = unfuse(whole[s.ref_key], dataclasses.replace(s, groups=g))
                for p, value in zip(s.parts, cut):
                    state[p].set_value(value.astype(saved[p].dtype))

        found = _first_layout(state, saved, here, holders, [s.sizes for s in group], limit,
                              write, lambda _g: aligns())
        if found is not None:
            tried = dataclasses.replace(here, groups=found)
            pattern = re.escape(_short(here.ref_key))
            return (f"{here.torch_key} holds {', '.join(_short(p) for p in here.parts)} "
                    f"laid out {tried.layout}, and they were split from it as "
                    f"{here.layout}: split so, the port aligns; load with "
                    f"ConversionRules(fuse_groups={{{pattern!r}: {found}}})")
    return None


def split_named(items: Any, fusions: Sequence[Fusion]) -> Any:
    """``(name, array)`` pairs with each fused port tensor's given as its parts', under their
    names, cut as the fusion lays them out; a ``<name>.<accumulator>`` (an optimizer's moment
    of that tensor) likewise."""
    by_key = {f.port_key: f for f in fusions}
    for name, value in items:
        f = by_key.get(name)
        suffix = ""
        if f is None and "." in name and by_key:
            head, _, acc = name.rpartition(".")
            f, suffix = by_key.get(head), f".{acc}"
        if f is None:
            yield name, value
            continue
        arr = np.asarray(value)
        for part, cols in zip(f.parts, f.columns()):
            yield part + suffix, arr[..., cols]


def part_names(names: Any, fusions: Sequence[Fusion]) -> list[str]:
    """``names`` (the port's state keys) with each fused tensor's given as its parts', as
    ``align_train`` records them."""
    parts = {f.port_key: f.parts for f in fusions}
    return [p for name in names for p in parts.get(name, (name,))]
