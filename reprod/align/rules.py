"""The torch -> Paddle state-dict rules: which name each torch key takes and which tensors are
transposed, decided per key before any array is touched.

What differs between the two frameworks' state dicts, and what the rules do about it:

- ``nn.Linear`` stores its weight as ``[out, in]`` in torch and ``[in, out]`` in Paddle: transposed.
  Which weights are Linear weights is read from the torch model (``isinstance(m, nn.Linear)``) when
  one is given; without a model a heuristic decides (see ``guess_linear_weight``).
- BatchNorm's ``running_mean``/``running_var`` are Paddle's ``_mean``/``_variance``;
  ``num_batches_tracked`` has no Paddle counterpart and is dropped.
- Everything else keeps its name and layout (Conv, Embedding, LayerNorm, ConvTranspose, LSTM, ...).

User rules (``ConversionRules``) add renames, skips and transposes. Every pattern is a regular
expression searched in the *original PyTorch key*; renames apply in order, each to the result of
the previous one, and the BatchNorm suffix renames apply after them. Exact ``pairs`` (torch key ->
Paddle key) come before all renames; ``reprod.align.pair_weights_by_order`` finds them by
definition order when names cannot be mapped by rules.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ReprodError

__all__ = [
    "integer_keys",
    "port_constants",
    "torch_constants",
    "unit_axes_apart",
    "kernel_against_matrix",
    "as_target_layout",
    "known_layouts",
    "packed_linear_weights",
    "packed_slices",
    "packed_why",
    "split_attention",
    "torch_aliases",
    "torch_views",
    "unaliased",
    "with_aliases",
    "ConversionRules",
    "KeyPlan",
    "plan_conversion",
    "linear_weight_names",
    "guess_linear_weight",
]

# torch BatchNorm statistics -> Paddle's names for the same tensors
_BUILTIN_RENAMES = (
    (re.compile(r"running_mean$"), "_mean"),
    (re.compile(r"running_var$"), "_variance"),
)
_DROPPED = re.compile(r"(^|\.)num_batches_tracked$")
# a layer name whose 2-D weight is NOT stored transposed in Paddle: a convolution's, an
# embedding's (embed_tokens, word_embeddings, tok_emb, wte); not a Linear whose name merely
# holds "emb" (diffusers' time_emb_proj, the time_embedding's linear_1)
_NOT_LINEAR_SEGMENT = re.compile(
    r"(?i)conv|^wte$|^wpe$|^emb|embed(ding)?s?$|_emb$|^embed_|embed_(tokens|positions)$")


def unaliased(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A state dict without its aliases, and each alias -> the key kept for it. Paddle's RNN
    layers (LSTM, GRU, SimpleRNN) list each weight twice, as torch names it (``weight_ih_l0``)
    and as their cell's (``0.cell_fw.weight_ih``): one tensor under two keys, which a torch
    model has once. The first key of each tensor is kept."""
    out: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for key, value in state.items():
        if isinstance(value, (int, float, str, bytes)) or value is None:
            out[key] = value  # a scalar is its own, whatever shares its identity
            continue
        kept = first.get(id(value))
        if kept is not None:
            aliases[key] = kept
            continue
        first[id(value)] = key
        out[key] = value
    return out, aliases


def torch_aliases(state: Mapping[str, Any]) -> dict[str, str]:
    """Each key of a torch state dict that names a tensor an earlier key names too -> that
    earlier key: tied weights (T5's ``shared.weight`` and ``encoder.embed_tokens.weight``), which
    ``state_dict()`` lists under each name as tensors of their own over one memory."""
    first: dict[tuple[Any, ...], str] = {}
    out: dict[str, str] = {}
    for key, value in state.items():
        ptr = getattr(value, "data_ptr", None)
        if ptr is None or not getattr(value, "numel", lambda: 0)():
            continue
        ident = (ptr(), tuple(value.shape), tuple(value.stride()), str(value.dtype))
        if ident in first:
            out[key] = first[ident]
        else:
            first[ident] = key
    return out


def integer_keys(state: Mapping[str, Any]) -> set[str]:
    """The keys of integer and bool tensors: constants a model computes with (PaddleNLP's
    persistable ``position_ids``, which Hugging Face keeps out of its state dict), not weights."""
    out = set()
    for key, value in state.items():
        dtype = str(getattr(value, "dtype", "")).replace("paddle.", "").replace("torch.", "")
        if dtype.startswith(("int", "uint", "bool")):
            out.add(key)
    return out


def unit_axes_apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two shapes differ only by axes of size 1 (a 0-d torch parameter against Paddle's
    [1]: CLIP's ``logit_scale``): the same values, reshaped. Not a 1x1 convolution's kernel
    against a matrix (``kernel_against_matrix``), which is transposed too."""
    return a != b and tuple(d for d in a if d != 1) == tuple(d for d in b if d != 1) \
        and not kernel_against_matrix(a, b)


def kernel_against_matrix(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether one shape is a 1x1 convolution's kernel ([out, in, 1, 1]: every axis after the
    first two of size 1) and the other a Linear's weight in Paddle's layout ([in, out]):
    diffusers' ``proj_in`` as a 1x1 ``Conv2d`` against a port built with
    ``use_linear_projection=True``. Both frameworks keep a kernel [out, in, ...], so the two
    hold the same values transposed; read as a reshape, a square one loads silently wrong."""
    if len(a) == 2 and len(b) >= 3:
        a, b = b, a
    return (len(b) == 2 and len(a) >= 3 and all(d == 1 for d in a[2:])
            and tuple(a[:2]) == tuple(b[::-1]))


def as_target_layout(value: Any, want: tuple[int, ...]) -> Any:
    """``value`` (an array in the Paddle layout of the reference's layer) in the shape ``want``
    of the port's tensor: reshaped where they differ by axes of size 1, and where one is a 1x1
    kernel and the other a matrix, transposed too (``kernel_against_matrix``)."""
    import numpy as np

    got = tuple(np.shape(value))
    if kernel_against_matrix(got, want):
        if len(got) == 2:  # a Linear's [in, out] into a kernel [out, in, 1, 1]
            return np.reshape(np.transpose(value), want)
        return np.transpose(np.reshape(value, got[:2]))  # a kernel into a Linear's [in, out]
    return np.reshape(value, want)


def port_constants(state: Mapping[str, Any], buffers: Optional[Collection[str]] = None
                   ) -> set[str]:
    """The keys of a Paddle state that are the model's constants, not weights: integer and bool
    tensors, and the model's registered buffers (``buffers``, where the model is at hand:
    Paddle's BatchNorm statistics are parameters, so a buffer is what a model computes with,
    PaddleNLP GPT-J's causal mask and ``masked_bias``, which Hugging Face's does not hold)."""
    out = integer_keys(state)
    if buffers:
        out |= {k for k in state if k in buffers}
    return out


def torch_constants(torch_model: Any) -> set[str]:
    """The keys of a torch model's state dict that are its constants: integer and bool tensors,
    and its buffers other than a normalisation's running statistics."""
    state = torch_model.state_dict()
    stats = re.compile(r"(^|\.)(running_mean|running_var|num_batches_tracked)$")
    return integer_keys(state) | {name for name, _ in torch_model.named_buffers()
                                  if name in state and not stats.search(name)}


_IN_PROJ = re.compile(r"(.*\.)?in_proj_(weight|bias)")
# torch's MultiheadAttention with kdim or vdim other than embed_dim: the three projection
# weights apart ([E, E], [E, kdim], [E, vdim]), their biases still packed in ``in_proj_bias``
_APART = re.compile(r"(.*\.)?([qkv])_proj_(weight)")
# Hugging Face's GPT-2 attention: one Conv1D ``c_attn`` ([E, 3E], [in, out] as Paddle's Linear
# holds a weight) beside its output projection ``c_proj``
_C_ATTN = re.compile(r"(.*\.)?c_attn\.(weight|bias)")

# a packed tensor -> (the layer prefix its slices go under, "weight" or "bias", its E, the axis
# q, k and v lie along, whether its weight slices are in torch's Linear layout [out, in], which
# of q, k and v it holds: "qkv" packed, or one of them whole)
_Packing = tuple[str, str, int, int, bool, str]


def _packings(state: Mapping[str, Any]) -> dict[str, _Packing]:
    """Each packed attention tensor of a torch state dict: torch's ``nn.MultiheadAttention``
    ``in_proj_weight`` [3E, E] and ``in_proj_bias`` [3E] (rows), and a Hugging Face GPT-2
    attention's Conv1D ``c_attn.weight`` [E, 3E] and ``c_attn.bias`` [3E] (columns), each where
    its layer holds an output projection of [E, E] beside it (``out_proj``, ``c_proj``). With
    ``kdim``/``vdim``, torch's ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` ([E,
    E], [E, kdim], [E, vdim]) are each one of them whole, under another name than Paddle's."""
    def shape(key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in getattr(state.get(key), "shape", ()))

    out: dict[str, _Packing] = {}
    for key in state:
        for pattern, out_proj in ((_IN_PROJ, "out_proj.weight"), (_C_ATTN, "c_proj.weight"),
                                  (_APART, "out_proj.weight")):
            m = pattern.fullmatch(key)
            if m is None:
                continue
            prefix, what = m.group(1) or "", m.group(m.lastindex or 0)
            out_w = shape(prefix + out_proj)
            e = out_w[0] if len(out_w) == 2 and out_w[0] == out_w[1] else 0
            if not e:
                continue
            if pattern is _APART:
                if len(shape(key)) == 2 and shape(key)[0] == e:
                    out[key] = (prefix, what, e, 0, True, m.group(2))
            elif what == "bias" and shape(key) == (3 * e,):
                out[key] = (prefix, what, e, 0, True, "qkv")
            elif shape(key) == (3 * e, e):  # a Linear's rows
                out[key] = (prefix, what, e, 0, True, "qkv")
            elif pattern is _C_ATTN and shape(key) == (e, 3 * e):
                out[key] = (prefix, what, e, 1, False, "qkv")
    return out


# the reference tensors that hold what the port keeps apart (``reprod.align.fusion.Split``),
# while a comparison of one pair of models runs (``port_splitting``): every reader of a torch
# state dict below (its plan, its gradients, its optimizer's moments, forcing's writes) then
# sees each as the port's parts, as it sees torch's packed attention as Paddle's q, k, v.
# A context rather than one more argument to the dozen functions that slice a state dict.
_SPLITS: ContextVar[tuple[Any, ...]] = ContextVar("reprod_port_splits", default=())


@contextlib.contextmanager
def port_splitting(splits: Sequence[Any]) -> Iterator[None]:
    """Within it, the torch state dicts read through ``split_attention``, ``packed_slices``...
    hold each of ``splits``' reference tensors as the port's parts."""
    token = _SPLITS.set(tuple(splits))
    try:
        yield
    finally:
        _SPLITS.reset(token)


def active_splits() -> tuple[Any, ...]:
    """The splits ``port_splitting`` has in effect."""
    return _SPLITS.get()


def _splits_in(state: Mapping[str, Any]) -> dict[str, Any]:
    """The splits in effect whose reference tensor ``state`` holds, at the size they cut."""
    out: dict[str, Any] = {}
    for sp in _SPLITS.get():
        shape = tuple(getattr(state.get(sp.torch_key), "shape", ()))
        if shape and int(shape[sp.axis]) == sum(sp.sizes):
            out[sp.torch_key] = sp
    return out


def _slices(packing: _Packing) -> list[tuple[str, tuple[slice, ...]]]:
    """(q, k or v, its index into the tensor) for each of the projections a tensor holds."""
    _, _, e, axis, _, held = packing
    if len(held) == 1:
        return [(held, (slice(None),))]
    return [(q, (slice(None),) * axis + (slice(i * e, (i + 1) * e),)) for i, q in enumerate(held)]


def split_attention(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A torch state dict with each packed attention projection split as Paddle's
    ``MultiHeadAttention`` holds it, and each new key -> the torch key it is a slice of.

    torch's ``nn.MultiheadAttention`` packs the query, key and value projections in one
    ``in_proj_weight`` [3E, E] and ``in_proj_bias`` [3E]; Hugging Face's GPT-2 in one Conv1D
    ``c_attn`` ([E, 3E]: the three side by side, each already in Paddle's [in, out]). Paddle
    holds ``q_proj``, ``k_proj`` and ``v_proj``, each a Linear ([E, E] and [E]). With ``kdim`` or
    ``vdim``, torch keeps the weights apart as ``q_proj_weight``... ([E, kdim] for the key's),
    each renamed to Paddle's ``q_proj.weight``..., the biases still packed. The slices come in
    Paddle's order (``q_proj.weight``, ``q_proj.bias``, ``k_proj.weight``...) under the
    attention layer's prefix, so that pairing by definition order sees them as Paddle lists
    them. A packed key is split where its layer has an output projection of [E, E] beside it and
    its shape is three E-wide blocks; any other is kept (``_packings``)."""
    packings = _packings(state)
    # the tensors holding each projection's weight and bias: (prefix, q/k/v) -> {what: key}
    held: dict[tuple[str, str], dict[str, str]] = {}
    for key, packing in packings.items():
        for q, _ in _slices(packing):
            held.setdefault((packing[0], q), {})[packing[1]] = key
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    splits = _splits_in(state)
    # a layer's split tensors (weight, bias) give their parts together, part by part, as the
    # port lists them (``q_proj.weight``, ``q_proj.bias``, ``k_proj.weight``...)
    by_layer: dict[str, list[Any]] = {}
    for key, sp in splits.items():
        by_layer.setdefault(key.rpartition(".")[0], []).append(sp)
    for key, value in state.items():
        sp = splits.get(key)
        if sp is not None:  # a tensor the port keeps apart (``port_splitting``)
            layer = by_layer.get(key.rpartition(".")[0], [sp])
            if layer[0] is not sp:
                continue  # given beside the layer's first
            for i in range(len(sp.torch_parts)):
                for each in layer:
                    if i < len(each.torch_parts):
                        name = each.torch_parts[i]
                        out[name] = state[each.torch_key][each.torch_index(i)]
                        origin[name] = each.torch_key
            continue
        packing = packings.get(key)
        if packing is None:
            out[key] = value
            continue
        prefix, what = packing[0], packing[1]
        if what == "bias" and all("weight" in held[prefix, q] for q, _ in _slices(packing)):
            continue  # split beside its weights, as Paddle lists them
        for q, _ in _slices(packing):
            for part in ("weight", "bias") if what == "weight" else ("bias",):
                src = held[prefix, q].get(part)
                if src is None:
                    continue
                index = dict(_slices(packings[src]))[q]
                name = f"{prefix}{q}_proj.{part}"
                out[name] = state[src][index]
                origin[name] = src
    return out, origin


def packed_slices(state: Mapping[str, Any]) -> dict[str, list[tuple[str, tuple[slice, ...]]]]:
    """Each packed attention tensor of a torch state dict -> [(the Paddle-ordered name of a
    slice, its index into the tensor)] (``split_attention``'s slices: rows of torch's
    ``in_proj_weight``, columns of GPT-2's ``c_attn.weight``; a ``k_proj_weight`` whole)."""
    packings = _packings(state)
    splits = _splits_in(state)
    out: dict[str, list[tuple[str, tuple[slice, ...]]]] = {}
    for name, src in split_attention(state)[1].items():
        if src in splits:
            sp = splits[src]
            out.setdefault(src, []).append((name, sp.torch_index(sp.torch_parts.index(name))))
            continue
        q = name.rsplit(".", 2)[-2][0]
        out.setdefault(src, []).append((name, dict(_slices(packings[src]))[q]))
    return out


def packed_linear_weights(state: Mapping[str, Any]) -> set[str]:
    """The slices' weight names (``split_attention``) in torch's Linear layout [out, in], which
    Paddle holds transposed: ``in_proj_weight``'s rows; GPT-2's Conv1D columns are not."""
    packings = _packings(state)
    splits = _splits_in(state)
    return {name for name, src in split_attention(state)[1].items()
            if (splits[src].linear if src in splits else
                name.endswith("weight") and packings[src][4])}


_CONV1D_WEIGHT = re.compile(r"(^|\.)(c_attn|c_proj|c_fc)\.weight$")


def known_layouts(state: Mapping[str, Any]) -> dict[str, bool]:
    """Torch keys (``split_attention``'s) whose layout the state dict itself tells, for files
    read without their model, where a square weight's layout cannot be read from its shape:
    True where Paddle holds it transposed. The slices of a packed attention (rows of
    ``in_proj_weight``: True; columns of GPT-2's Conv1D ``c_attn``: False), and, where a
    ``c_attn`` is packed by columns (Hugging Face's GPT-2), the weights of its Conv1D layers
    (``c_attn``, ``c_proj``, ``c_fc``: [in, out], as Paddle's Linear)."""
    packings = _packings(state)
    splits = _splits_in(state)
    out = {name: splits[src].linear if src in splits else packings[src][4]
           for name, src in split_attention(state)[1].items()
           if name.endswith("weight") and (src in splits or src in packings)}
    if any(not p[4] for p in packings.values() if p[1] == "weight"):
        out.update((k, False) for k in state if _CONV1D_WEIGHT.search(k))
    return out


def packed_why(state: Mapping[str, Any]) -> dict[str, str]:
    """Each slice's name -> where it comes from, for the conversion's reasons."""
    packings = _packings(state)
    splits = _splits_in(state)
    out: dict[str, str] = {}
    for name, src in split_attention(state)[1].items():
        if src in splits:
            out[name] = splits[src].part_why(name)
        elif packings[src][3] == 0 and "in_proj_" in src:
            out[name] = f"rows of {src} (torch's MultiheadAttention packs q, k, v)"
        elif len(packings[src][5]) == 1:
            out[name] = (f"{src} renamed (torch's MultiheadAttention with kdim or vdim keeps q, "
                         "k and v apart)")
        else:
            out[name] = (f"{'columns' if packings[src][3] else 'rows'} of {src} (Hugging Face's "
                         "GPT-2 attention packs q, k, v)")
    return out


def torch_views(items: Any, slices: Mapping[str, list[tuple[str, tuple[slice, ...]]]]
                ) -> list[tuple[str, Any]]:
    """``(name, tensor)`` pairs with each packed attention tensor replaced by its slices; a None
    (a missing gradient) stays None. A slice is a view of the packed tensor except where a split
    lays its parts out in groups (``port_splitting``): write through ``copy_into``."""
    out: list[tuple[str, Any]] = []
    for name, value in items:
        parts = slices.get(name)
        if parts is None:
            out.append((name, value))
        else:
            out.extend((v, None if value is None else value[index]) for v, index in parts)
    return out


def copy_into(state: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Write ``values`` (arrays or tensors, by torch name) into a torch state dict's tensors in
    place, a packed or split tensor's slices (``packed_slices``) by their names: through an
    index, since a split laid out in groups is no view of its tensor. Names it does not hold are
    left alone."""
    import numpy as np
    import torch

    where = {name: (src, index) for src, parts in packed_slices(state).items()
             for name, index in parts}
    with torch.no_grad():
        for name, value in values.items():
            v = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            if name in where:
                src, index = where[name]
                target = state[src]
                target[index] = v.to(device=target.device, dtype=target.dtype)
            elif name in state:
                state[name].copy_(v.to(state[name].device))


def with_aliases(model: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a Paddle state dict without aliases) with each alias of ``model``'s state dict
    named too, as ``set_state_dict`` wants every key (it warns of each it misses)."""
    out = dict(values)
    for alias, kept in unaliased(model.state_dict())[1].items():
        if alias not in out and kept in out:
            out[alias] = out[kept]
    return out


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ReprodError(
            f"{what} pattern {pattern!r} is not a valid regular expression ({exc})"
        ) from None


def _tuple_of_str(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    out = tuple(value)
    for p in out:
        if not isinstance(p, str):
            raise ReprodError(f"{what} pattern {p!r} is a {type(p).__name__}, expected a str")
    return out


@dataclass(frozen=True)
class ConversionRules:
    """User additions to the built-in torch -> Paddle rules. Patterns are regexes searched in the
    original PyTorch key.

    - ``rename``: ``(pattern, replacement)`` pairs (or a dict), applied in order with ``re.sub``.
    - ``skip``: keys matching any of these are left out of the result.
    - ``transpose``: 2-D tensors matching these are transposed even if not ``nn.Linear`` weights.
    - ``no_transpose``: tensors matching these are never transposed (overrides model and heuristic).
    - ``pairs``: exact torch key -> Paddle key (or a dict); a paired key takes this name and no
      rename applies to it (see ``from_pairs`` and ``pair_weights_by_order``).
    - ``port_only``: patterns searched in the *Paddle* keys: tensors only the port holds (a pooler
      or head the reference lacks). They keep their values on load, are left out of pairing by
      order, and show in ``compare_structure`` as the port's own.
    - ``fuse_groups``: ``{pattern: groups}`` (or pairs), patterns searched in the *Paddle* keys:
      how a port tensor fusing several of the reference's lays them out (``reprod.align.fusion``):
      each part cut in ``groups`` pieces taken in turn (PaddleNLP's LLaMA ``qkv_proj``: its
      ``num_key_value_heads``); 1, the default, side by side.

    >>> rules = ConversionRules(rename={r"^module\\.": ""}, skip=[r"^head\\."])
    >>> weights = torch_to_paddle("model.pth", rules=rules)
    >>> rules = ConversionRules(skip=[r"embed_positions"], port_only=[r"^pooler\\."])
    >>> rules = ConversionRules(fuse_groups={r"qkv_proj": 8})
    """

    rename: tuple[tuple[str, str], ...] = ()
    skip: tuple[str, ...] = ()
    transpose: tuple[str, ...] = ()
    no_transpose: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    port_only: tuple[str, ...] = ()
    fuse_groups: tuple[tuple[str, int], ...] = ()
    _compiled: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rename = self.rename.items() if isinstance(self.rename, Mapping) else self.rename
        pairs: list[tuple[str, str]] = []
        for pair in rename:
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                raise ReprodError(
                    f"rename rule {pair!r} must be a (pattern, replacement) pair of str"
                )
            pairs.append((pair[0], pair[1]))
        object.__setattr__(self, "rename", tuple(pairs))
        exact = self.pairs.items() if isinstance(self.pairs, Mapping) else self.pairs
        exact_pairs: list[tuple[str, str]] = []
        for pair in exact:
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                raise ReprodError(f"pair {pair!r} must be a (torch key, paddle key) pair of str")
            exact_pairs.append((pair[0], pair[1]))
        object.__setattr__(self, "pairs", tuple(exact_pairs))
        fg = self.fuse_groups.items() if isinstance(self.fuse_groups, Mapping) \
            else self.fuse_groups
        groups: list[tuple[str, int]] = []
        for pair in fg:
            if isinstance(pair, str) or len(pair) != 2 or not isinstance(pair[0], str) \
                    or not isinstance(pair[1], int) or isinstance(pair[1], bool) or pair[1] < 1:
                raise ReprodError(
                    f"fuse_groups entry {pair!r} must be a (pattern, groups >= 1) pair")
            groups.append((pair[0], pair[1]))
        object.__setattr__(self, "fuse_groups", tuple(groups))
        for name in ("skip", "transpose", "no_transpose", "port_only"):
            object.__setattr__(self, name, _tuple_of_str(getattr(self, name), name))
        renames = tuple((_compile(p, "rename"), r) for p, r in self.rename)
        compiled: dict[str, Any] = {
            "rename": renames,
            "skip": tuple(_compile(p, "skip") for p in self.skip),
            "transpose": tuple(_compile(p, "transpose") for p in self.transpose),
            "no_transpose": tuple(_compile(p, "no-transpose") for p in self.no_transpose),
            "port_only": tuple(_compile(p, "port-only") for p in self.port_only),
            "fuse_groups": tuple((_compile(p, "fuse_groups"), g) for p, g in self.fuse_groups),
            "pairs": dict(self.pairs),
        }
        for pat, repl in renames:
            try:
                pat.sub(repl, "")  # a bad group reference in the replacement shows up here
            except (re.error, IndexError) as exc:
                raise ReprodError(
                    f"rename replacement {repl!r} is invalid for {pat.pattern!r} ({exc})"
                ) from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_strings(
        cls,
        *,
        rename: Collection[str] = (),
        skip: Collection[str] = (),
        transpose: Collection[str] = (),
        no_transpose: Collection[str] = (),
        port_only: Collection[str] = (),
        fuse_groups: Collection[str] = (),
    ) -> ConversionRules:
        """Rules from command-line style strings; a rename is ``"PATTERN=REPLACEMENT"``, a
        ``fuse_groups`` entry ``"PATTERN=N"``.

        >>> ConversionRules.from_strings(rename=[r"^backbone\\.=body."]).rename
        (('^backbone\\\\.', 'body.'),)
        """
        pairs = []
        for item in rename:
            if "=" not in item:
                raise ReprodError(f"rename rule {item!r} must look like PATTERN=REPLACEMENT")
            pat, repl = item.split("=", 1)
            pairs.append((pat, repl))
        groups = []
        for item in fuse_groups:
            pat, _, n = item.rpartition("=")
            if not pat or not n.strip().isdigit():
                raise ReprodError(f"fuse-groups {item!r} must look like PATTERN=N (N a count)")
            groups.append((pat, int(n)))
        return cls(
            rename=tuple(pairs),
            skip=tuple(skip),
            transpose=tuple(transpose),
            no_transpose=tuple(no_transpose),
            port_only=tuple(port_only),
            fuse_groups=tuple(groups),
        )

    @classmethod
    def from_pairs(
        cls,
        pairs: Mapping[str, str],
        *,
        transpose: Collection[str] = (),
        no_transpose: Collection[str] = (),
        base: Optional[ConversionRules] = None,
    ) -> ConversionRules:
        """Rules that name each torch key's Paddle key exactly, e.g. the result of
        ``pair_weights_by_order``. ``transpose``/``no_transpose`` are exact torch keys (not
        patterns); ``base`` keeps another rule set's renames, skips and transposes beside the pairs.

        >>> rules = ConversionRules.from_pairs({"features.0.weight": "stem.conv.weight"})
        >>> rules.paddle_name("features.0.weight")
        'stem.conv.weight'
        """
        base = base or _DEFAULT_RULES
        exact = tuple(f"^{re.escape(k)}$" for k in transpose)
        exact_no = tuple(f"^{re.escape(k)}$" for k in no_transpose)
        return cls(
            rename=base.rename,
            skip=base.skip,
            transpose=base.transpose + exact,
            no_transpose=base.no_transpose + exact_no,
            pairs=base.pairs + tuple(pairs.items()),
            port_only=base.port_only,
            fuse_groups=base.fuse_groups,
        )

    def port_only_pattern(self, paddle_name: str) -> Optional[str]:
        """The ``port_only`` pattern a Paddle key matches: a tensor only the port holds."""
        for pat in self._compiled["port_only"]:
            if pat.search(paddle_name):
                return str(pat.pattern)
        return None

    def fuse_groups_for(self, paddle_name: str) -> Optional[tuple[str, int]]:
        """The first ``fuse_groups`` (pattern, groups) whose pattern a Paddle key matches."""
        for pat, groups in self._compiled["fuse_groups"]:
            if pat.search(paddle_name):
                return str(pat.pattern), int(groups)
        return None

    def skip_pattern(self, torch_name: str) -> Optional[str]:
        for pat in self._compiled["skip"]:
            if pat.search(torch_name):
                return str(pat.pattern)
        return None

    def transpose_pattern(self, torch_name: str) -> Optional[str]:
        for pat in self._compiled["transpose"]:
            if pat.search(torch_name):
                return str(pat.pattern)
        return None

    def no_transpose_pattern(self, torch_name: str) -> Optional[str]:
        for pat in self._compiled["no_transpose"]:
            if pat.search(torch_name):
                return str(pat.pattern)
        return None

    def paddle_name(self, torch_name: str) -> str:
        """The Paddle key for a torch key: user renames, then the built-in BatchNorm renames."""
        paired = self._compiled["pairs"].get(torch_name)
        if paired is not None:
            return str(paired)
        name = torch_name
        for pat, repl in self._compiled["rename"]:
            name = pat.sub(repl, name)
        for pat, repl in _BUILTIN_RENAMES:
            name = pat.sub(repl, name)
        return name


_DEFAULT_RULES = ConversionRules()


@dataclass(frozen=True)
class KeyPlan:
    """What happens to one torch key: ``action`` is copy, transpose, skip (a user rule) or drop
    (no Paddle counterpart); ``why`` says which rule decided."""

    torch_name: str
    paddle_name: Optional[str]
    action: str
    why: str
    torch_shape: tuple[int, ...]

    @property
    def paddle_shape(self) -> Optional[tuple[int, ...]]:
        if self.paddle_name is None:
            return None
        return tuple(reversed(self.torch_shape)) if self.action == "transpose" else self.torch_shape


def guess_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """The fallback when no torch model is given: a key is taken for an ``nn.Linear`` weight when it
    is 2-D, its last segment is ``weight`` and its layer's name (the last segment before it that
    is not a ``Sequential`` index) names no convolution (``conv``) and no embedding (``emb...``,
    ``...embedding(s)``, ``embed_tokens``, ``wte``/``wpe``).

    >>> guess_linear_weight("head.fc.weight", (10, 64)), guess_linear_weight("tok_emb.weight", (100, 64))
    (True, False)
    """
    parts = name.split(".")
    if len(shape) != 2 or parts[-1] != "weight":
        return False
    # the layer's own name decides (a Sequential's index: its container's); a Linear inside a
    # module named for embeddings (diffusers' time_embedding.linear_1) is a Linear
    layers = [seg for seg in parts[:-1] if not seg.isdigit()]
    return not (layers and _NOT_LINEAR_SEGMENT.search(layers[-1]))


def _is_torch_module(obj: Any) -> bool:
    return (
        hasattr(obj, "state_dict")
        and hasattr(obj, "named_modules")
        and type(obj).__module__.split(".")[0] != "paddle"
    )


def number_attr(obj: Any, names: Sequence[str]) -> Optional[float]:
    """The first of ``names`` that ``obj`` holds as a number (not a bool), as a float: a
    setting that layers of one kind keep under several names (``eps``, ``epsilon``...)."""
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def is_hf_conv1d(layer: Any) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's Linear: ``nf`` outputs, its weight [in, out] as
    Paddle's Linear holds one), not Paddle's own ``nn.Conv1D``."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def class_names(layer: Any) -> list[str]:
    """The names of a layer's class and of its bases down to the first torch or Paddle class,
    by which a kind is read: a model library's subclass is of its framework base's kind
    (PaddleNLP's ``GPTLayerNorm`` is a LayerNorm)."""
    out = []
    for base in type(layer).__mro__:
        out.append(base.__name__)
        if base.__module__.split(".", 1)[0] in ("torch", "paddle"):
            break
    return out


def linear_weight_names(torch_model: Any) -> set[str]:
    """Keys of every ``nn.Linear`` (and subclass) weight in a torch model's state dict."""
    import torch

    return {
        f"{name}.weight" if name else "weight"
        for name, module in torch_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _rule_why(kind: str, pattern: str, name: str) -> str:
    # from_pairs (pair_weights_by_order) writes one exact pattern per key: quoting it back is noise
    if pattern == f"^{re.escape(name)}$":
        return f"exact {kind} rule for this key"
    return f"{kind} rule {pattern!r}"


def plan_conversion(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    linear_weights: Optional[Collection[str]] = None,
    rules: Optional[ConversionRules] = None,
    known: Optional[Mapping[str, bool]] = None,
) -> tuple[KeyPlan, ...]:
    """Decide, for each torch key, its Paddle name and whether it is transposed, skipped or dropped.

    ``linear_weights`` are the torch keys known to be ``nn.Linear`` weights; ``None`` means unknown,
    and ``guess_linear_weight`` decides, but for the keys ``known`` (``known_layouts``) says.
    Raises ``ReprodError`` when two keys land on one Paddle name
    or a transpose rule matches a tensor that is not 2-D.

    >>> [p.action for p in plan_conversion({"fc.weight": (2, 3), "bn.num_batches_tracked": ()},
    ...                                    linear_weights={"fc.weight"})]
    ['transpose', 'drop']
    """
    rules = rules or _DEFAULT_RULES
    plans: list[KeyPlan] = []
    not_2d: list[str] = []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        skip = rules.skip_pattern(name)
        if skip is not None:
            plans.append(KeyPlan(name, None, "skip", f"skip rule {skip!r}", shape))
            continue
        if _DROPPED.search(name):
            plans.append(
                KeyPlan(name, None, "drop", "BatchNorm counter, no Paddle counterpart", shape)
            )
            continue
        paddle = rules.paddle_name(name)
        forced = rules.transpose_pattern(name)
        kept = rules.no_transpose_pattern(name)
        if kept is not None:
            action, why = "copy", _rule_why("no-transpose", kept, name)
        elif forced is not None:
            action, why = "transpose", _rule_why("transpose", forced, name)
            if len(shape) != 2:
                not_2d.append(f"{name} {list(shape)}")
        elif linear_weights is not None and name in linear_weights:
            action, why = "transpose", "nn.Linear weight"
        elif linear_weights is None and known and name in known:
            action, why = ("transpose", "Linear layout, from its packed tensor") if known[name] \
                else ("copy", "Hugging Face Conv1D weight: [in, out], as Paddle's")
        elif linear_weights is None and guess_linear_weight(name, shape):
            action, why = "transpose", "heuristic: 2-D weight outside conv/embedding"
        else:
            action, why = "copy", "same layout"
        plans.append(KeyPlan(name, paddle, action, why, shape))
    if not_2d:
        raise ReprodError(f"transpose rules match tensors that are not 2-D: {', '.join(not_2d)}")
    seen: dict[str, str] = {}
    clashes = []
    for p in plans:
        if p.paddle_name is None:
            continue
        if p.paddle_name in seen:
            clashes.append(f"{seen[p.paddle_name]} and {p.torch_name} -> {p.paddle_name}")
        else:
            seen[p.paddle_name] = p.torch_name
    if clashes:
        raise ReprodError(f"rename rules map several keys to one Paddle name: {'; '.join(clashes)}")
    return tuple(plans)
