"""The capture key scheme, and the name maps that pair one side's keys with the other's.

A captured key is ``<subject>[#<call>].<what>[<item>]...``:

- ``subject`` is a layer's qualified name (``features.3.block.2``; the model itself is
  ``<model>``) or ``param.<parameter name>``;
- ``#<call>`` counts calls of the same layer (or backward passes reaching the same parameter)
  within one recording; the first call has no index, the second is ``#2``;
- ``what`` is ``in`` (an input), ``out`` (an output), ``grad_out`` (the gradient arriving at an
  output in backward), ``grad_in`` (the gradient leaving through an input) or ``grad`` (a
  parameter's gradient);
- each ``[<item>]`` picks a part of a structured value: a tuple position or a dict key
  (``.out[0]``, ``.out[logits]``, ``.in[1]``).

Items sit in brackets rather than after another dot so that a key always splits one way: the
``what`` word is the last dot-separated word before the brackets, whatever the layer and dict
keys are called (a layer attribute named ``out`` gives ``head.out.out``).
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import KeyMismatchError, UnsupportedValueError
from . import _values
from ._values import close as _close
from ._values import feeds as _feeds
from ._values import stats as _stats

__all__ = [
    "ROOT",
    "PARAM_PREFIX",
    "CaptureKey",
    "layer_key",
    "param_key",
    "parse_key",
    "rename",
    "rename_by_order",
    "pair_by_order",
    "match_by_order",
    "pair_inputs",
    "Rules",
]

ROOT = "<model>"
PARAM_PREFIX = "param."
UNPAIRED = "unpaired:"  # prefix of other-side keys rename_by_order could not pair
LAYER_WHATS = ("in", "out", "grad_out", "grad_in")
_WHATS = LAYER_WHATS + ("grad",)

# non-greedy subject + anchored end: the ``what`` word is the last dotted word before the items.
# ``#`` belongs to the call index only (a layer whose own name holds one is not parsed).
_KEY_RE = re.compile(
    r"^(?P<subject>[^#]+?)(?:#(?P<call>[1-9][0-9]*))?"
    r"\.(?P<what>in|out|grad_out|grad_in|grad)"
    r"(?P<items>(?:\[[^\[\]]*\])*)$"
)
_ITEM_RE = re.compile(r"\[([^\[\]]*)\]")

Rule = tuple[Union[str, "re.Pattern[str]"], Union[str, Callable[["re.Match[str]"], str]]]
Rules = Union[Mapping[str, str], Sequence[Rule], Callable[[str], Optional[str]]]


@dataclass(frozen=True)
class CaptureKey:
    """One parsed capture key.

    >>> parse_key("features.3#2.out[0]")
    CaptureKey(name='features.3', call=2, what='out', items=('0',))
    """

    name: str  # layer name, or parameter name without the ``param.`` prefix
    call: int
    what: str
    items: tuple[str, ...] = ()

    @property
    def is_param(self) -> bool:
        return self.what == "grad"

    @property
    def subject(self) -> str:
        """The layer call (``name`` or ``name#call``) or ``param.<name>[#call]``."""
        base = PARAM_PREFIX + self.name if self.is_param else self.name
        return base if self.call == 1 else f"{base}#{self.call}"

    @property
    def part(self) -> str:
        """What was captured, with its items: ``out``, ``in[1]``, ``grad_out[logits]``."""
        return self.what + "".join(f"[{i}]" for i in self.items)

    def with_name(self, name: str) -> CaptureKey:
        return CaptureKey(name, self.call, self.what, self.items)

    def __str__(self) -> str:
        return f"{self.subject}.{self.part}"


def _item(x: Any) -> str:
    # brackets delimit items, so an item cannot hold one
    return str(x).replace("[", "(").replace("]", ")")


def layer_key(name: str, call: int, what: str, items: Sequence[Any] = ()) -> str:
    """The key of one captured value of a layer call.

    >>> layer_key("features.3", 2, "out", (0,))
    'features.3#2.out[0]'
    """
    if what not in LAYER_WHATS:
        raise ValueError(f"what must be one of {LAYER_WHATS}, not {what!r}")
    return str(CaptureKey(name, call, what, tuple(_item(i) for i in items)))


def param_key(name: str, call: int = 1) -> str:
    """The key of a parameter's gradient: ``param.fc.weight.grad``, ``param.fc.weight#2.grad``."""
    return str(CaptureKey(name, call, "grad"))


def parse_key(key: str) -> Optional[CaptureKey]:
    """Split a capture key into its parts; ``None`` for a key the scheme did not make.

    >>> parse_key("param.fc.weight.grad").is_param
    True
    """
    m = _KEY_RE.match(key)
    if m is None:
        return None
    subject, what = m.group("subject"), m.group("what")
    is_param = what == "grad"
    if is_param and not subject.startswith(PARAM_PREFIX):
        return None
    name = subject[len(PARAM_PREFIX) :] if is_param else subject
    if not name:
        return None
    items = tuple(_ITEM_RE.findall(m.group("items")))
    return CaptureKey(name, int(m.group("call") or 1), what, items)


# --- name maps ---------------------------------------------------------------------------------


def _compile_rules(rules: Rules) -> Callable[[str], Optional[str]]:
    if callable(rules) and not isinstance(rules, Mapping):
        return rules
    if isinstance(rules, Mapping):
        table = {str(k): str(v) for k, v in rules.items()}

        def lookup(name: str) -> Optional[str]:
            # the longest dotted prefix with an entry: a layer's entry covers what lies under it
            head, tail = name, ""
            while True:
                if head in table:
                    return table[head] + tail
                head, dot, last = head.rpartition(".")
                if not dot:
                    return None
                tail = f".{last}{tail}"

        return lookup
    compiled = []
    for rule in rules:
        try:
            pattern, repl = rule
        except (TypeError, ValueError):
            raise UnsupportedValueError(
                f"rename rule {rule!r}: expected a (regex pattern, replacement) pair"
            ) from None
        compiled.append((re.compile(pattern), repl))

    def apply(name: str) -> Optional[str]:
        for pattern, repl in compiled:  # the first rule that matches wins
            if pattern.search(name):
                return pattern.sub(repl, name, count=1)
        return None

    return apply


def rename(mapping: Mapping[str, Any], rules: Rules) -> dict[str, Any]:
    """Rename one side's keys so that they pair with the other side's, keeping key order.

    ``rules`` is a dict of names (an entry also renames what lies under it:
    ``{"blocks.0": "features.1"}`` turns ``blocks.0.conv`` into ``features.1.conv``; the longest
    entry wins), a list of ``(regex, replacement)`` pairs (the first rule
    whose pattern is found in a name is applied once, ``re.sub`` style; a replacement may be a
    function of the match) or a callable ``name -> new name`` (``None`` keeps the name). For a
    capture key the rules see the layer or parameter name (``blocks.0.conv``, not
    ``blocks.0.conv#2.out[0]``), so one rule renames a layer's inputs, outputs, gradients and
    its parameters' gradients together; any other key (``loss``) is offered whole. A dict
    entry for a whole key wins over an entry for its name.

    >>> paddle_side = rename(paddle_logger.data, [(r"^blocks\\.(\\d+)", r"features.\\1")])
    >>> reprod.compare(torch_logger.data, paddle_side, method="max", threshold=1e-5)
    """
    fn = _compile_rules(rules)
    whole = rules if isinstance(rules, Mapping) else None
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in mapping.items():
        new = _rename_key(key, fn, whole)
        if new in out:
            raise KeyMismatchError(
                f"rename: keys {source[new]!r} and {key!r} both become {new!r}; "
                "make the rules tell them apart"
            )
        out[new] = value
        source[new] = key
    return out


def _rename_key(
    key: str, fn: Callable[[str], Optional[str]], whole: Optional[Mapping[str, Any]]
) -> str:
    if whole is not None and key in whole:
        return str(whole[key])
    parsed = parse_key(key)
    if parsed is None:
        new = fn(key)
        return key if new is None else str(new)
    new = fn(parsed.name)
    return key if new is None else str(parsed.with_name(str(new)))


# --- pairing by call order ---------------------------------------------------------------------


def _shape(value: Any) -> Optional[tuple[int, ...]]:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _layer_calls(mapping: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Layer calls in order of first appearance: (subject, {part: shape}); forward parts first."""
    calls: dict[str, dict[str, Any]] = {}
    for key, value in mapping.items():
        parsed = parse_key(key)
        if parsed is None or parsed.is_param:
            continue
        calls.setdefault(parsed.subject, {})[parsed.part] = _shape(value)
    return list(calls.items())


def _signature(parts: dict[str, Any]) -> tuple[Any, ...]:
    # forward parts only: a gradient missing on one side must not break the pairing of layers
    fwd = [(p, s) for p, s in parts.items() if p.startswith(("in", "out"))]
    if not fwd:
        return tuple(sorted(parts.items()))
    # the inputs' shapes, not their keys: one framework passes an argument by keyword, the
    # other by position (HF's self_attn(hidden_states=...), PaddleNLP's self_attn(x)), and the
    # call is the same call; pair_inputs then pairs the keys by value
    ins = tuple(sorted((s for p, s in fwd if p.startswith("in")), key=repr))
    return (("in", ins), *sorted((p, s) for p, s in fwd if p.startswith("out")))


def _anchored_pairs(
    ref_calls: list[tuple[str, dict[str, Any]]],
    other_calls: list[tuple[str, dict[str, Any]]],
    anchors: Optional[Mapping[str, str]],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(other index, ref index) of the layer calls ``anchors`` pair (other layer name -> ref layer
    name; the n-th call of one with the n-th of the other): those increasing on both sides, which
    bound the stretches paired by shape, and those that would cross an earlier one (siblings the
    port calls the other way round), which pair all the same."""
    if not anchors:
        return [], []
    ref_at = {subject: j for j, (subject, _) in enumerate(ref_calls)}
    pairs: list[tuple[int, int]] = []
    crossing: list[tuple[int, int]] = []
    used: set[int] = set()
    last = -1
    for i, (subject, _) in enumerate(other_calls):
        name, _, call = subject.partition("#")
        target = anchors.get(name)
        if target is None:
            continue
        j = ref_at.get(f"{target}#{call}" if call else target)
        if j is None or j in used:  # one reference call per port call: the first anchor wins
            continue
        used.add(j)
        if j > last:
            pairs.append((i, j))
            last = j
        else:
            crossing.append((i, j))
    return pairs, crossing


def rename_by_order(
    ref_map: Mapping[str, Any],
    other_map: Mapping[str, Any],
    *,
    anchors: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """``other_map`` with its capture keys renamed to ``ref_map``'s, by pairing layer calls in call
    order.

    For ports whose layer names cannot be mapped by rules. Layer calls are taken in the order
    their keys appear and paired when their inputs and outputs have the same shapes; where one
    side has a layer the other lacks, the longest runs of matching shapes are paired
    (``difflib``), and the layers left over keep their names (they show up as missing / extra;
    one whose name a paired layer now carries is renamed ``unpaired:<key>``).
    In captures with containers (``record``'s default), the leaf layers pair so, and each
    container with the one holding the same leaves (of nested ones holding the same leaves, such
    as a block and the ``Sequential`` inside it, only the outermost); a container that pairs with
    nothing keeps its name (``match_by_order`` leaves those out of both sides).
    A parameter gradient follows its layer (``param.blocks.0.weight.grad`` becomes
    ``param.features.1.weight.grad`` when layer ``blocks.0`` pairs with ``features.1``). Keys
    outside the capture scheme are kept as they are. Before the order, values pair what they
    pin down: a port call reading the same input as one reference call and giving the same
    output as it (or as a call up to two after it, which it folds in: a BatchNorm in its
    convolution) pairs with it wherever either calls it (a converter's ResNet runs each stage's
    downsample first). Where shapes leave several pairings, calls of one kind win, read from
    each call's own input and output. Layers whose shapes agree by chance and whose values say
    nothing can still pair wrongly, so read the result with that in mind.

    ``anchors`` (other layer name -> reference layer name) fixes pairs known otherwise, such
    as the layers owning parameters paired by ``reprod.align.pair_weights_by_order``: shapes
    alone cannot tell a BatchNorm from the ReLU after it, and a port that calls its activation
    as a function has one layer fewer. Anchored calls pair whatever their shapes; the calls
    between two anchors are paired by shape as above.

    >>> reprod.compare(torch_data, rename_by_order(torch_data, paddle_data), threshold=1e-5)
    """
    subject_map = pair_layer_calls(ref_map, other_map, anchors=anchors)
    return _renamed(other_map, subject_map)


def pair_layer_calls(
    ref_map: Mapping[str, Any],
    other_map: Mapping[str, Any],
    *,
    anchors: Optional[Mapping[str, str]] = None,
) -> dict[str, str]:
    """The layer calls ``rename_by_order`` pairs: other subject (``blocks.0``, ``act#2``) ->
    reference subject, for callers that need the pairing itself (a layer's class, its
    configuration) rather than the renamed keys."""
    return _pair_all(ref_map, other_map, anchors).calls


@dataclass(frozen=True)
class _Pairing:
    calls: dict[str, str]  # other layer call -> reference layer call
    ref_leaves: list[str]  # leaf layer calls in call order
    other_leaves: list[str]
    ref_boxes: set[str]  # containers (layer names)
    other_boxes: set[str]
    ref_only: set[str]  # leaf calls only that side makes between two paired calls
    other_only: set[str]
    ref_inert: set[str] = field(default_factory=set)  # leaf calls left out: output = input
    other_inert: set[str] = field(default_factory=set)

    def one_sided_layers(self) -> tuple[set[str], set[str]]:
        """The leaf layers of each side all of whose calls only that side makes: a layer only
        one side has (a ReLU the other calls as a function) says nothing about which container
        is which (a Fire block with ReLU layers holds the same as one without)."""
        return (_whole(self.ref_leaves, self.ref_only),
                _whole(self.other_leaves, self.other_only))

    def port_layers(self) -> dict[str, str]:
        """Reference layer -> the other side's layer it paired with (by their calls), the
        layer a hint about the reference's names: the porter edits the port's."""
        return {_base(r): _base(o) for o, r in self.calls.items()}


def _pair_all(ref_map: Mapping[str, Any], other_map: Mapping[str, Any],
              anchors: Optional[Mapping[str, str]],
              inert: tuple[Collection[str], Collection[str]] = ((), ()),
              kinds: Optional[tuple[Mapping[str, str], Mapping[str, str]]] = None,
              apart: Collection[str] = ()) -> _Pairing:
    """``apart``: reference layers that are leaves though a recorded layer's name lies under
    theirs (a norm recorded apart from the activation it holds). ``inert``: each side's layers (a dropout, ``Identity``) whose calls, where their output
    is their input, are left out of the pairing: they compute nothing to localise, and paired by
    order they would take the place of a layer that does (a port's p-0 activation dropout against
    the reference's activation layer). ``kinds``: each side's layer name -> class name
    (``layer_types``), where known: of pairings with as many pairs, those of layers of one kind
    win (``_pair_calls``)."""
    ref_calls = _layer_calls(ref_map)
    other_calls = _layer_calls(other_map)
    ref_boxes, other_boxes = _containers_of(ref_calls) - set(apart), _containers_of(other_calls)
    # with containers, shapes alone pair a block with a leaf or a wrapper with its block: the
    # leaf layers pair by call order, then each container with the one holding the same leaves
    ref_inert = {c[0] for c in ref_calls if _base(c[0]) not in ref_boxes
                 and _base(c[0]) in inert[0] and _identity_call(ref_map, c[0])}
    other_inert = {c[0] for c in other_calls if _base(c[0]) not in other_boxes
                   and _base(c[0]) in inert[1] and _identity_call(other_map, c[0])}
    ref_leaves = [c for c in ref_calls if _base(c[0]) not in ref_boxes and c[0] not in ref_inert]
    other_leaves = [c for c in other_calls
                    if _base(c[0]) not in other_boxes and c[0] not in other_inert]
    subject_map = _pair_calls(ref_leaves, other_leaves, anchors, ref_map, other_map, kinds)
    pairing = _Pairing(subject_map, [s for s, _ in ref_leaves], [s for s, _ in other_leaves],
                       ref_boxes, other_boxes, *_one_sided([s for s, _ in ref_leaves],
                                                           [s for s, _ in other_leaves],
                                                           subject_map),
                       ref_inert, other_inert)
    if ref_boxes or other_boxes:
        subject_map.update(_pair_containers(ref_calls, other_calls, ref_boxes, other_boxes,
                                            subject_map, *pairing.one_sided_layers()))
    return pairing


class _AnyLayer:
    """Every layer may be inert: captures read from files say no layer's class."""

    def __contains__(self, name: object) -> bool:
        return True


_ANY_LAYER = _AnyLayer()


def _identity_call(mapping: Mapping[str, Any], subject: str) -> bool:
    """A layer call whose output is its input, and holds more than one value (a layer seeing
    zeros or a constant says nothing of what it computes)."""
    for suffix in ("", ".0"):
        x, y = mapping.get(f"{subject}.in{suffix}"), mapping.get(f"{subject}.out{suffix}")
        if x is not None or y is not None:
            break
    if x is None or y is None or not _same_array(x, y):
        return False
    return _values.varies(np.asarray(x))


def _applied_as_functions(ref: Mapping[str, Any], port: Mapping[str, Any], pairing: Any,
                          fused: Collection[str] = ()) -> dict[str, Any]:
    """The port's input and output of each reference layer it applies as a function (Hugging
    Face's ``GELUActivation`` layer, Paddle's ``F.gelu`` inside ``TransformerEncoderLayer``),
    under the layer's keys: where a layer call only the reference records sits between two paired
    calls, and the reference's data runs through it (its input is the output of the call before,
    its output the input of the call after), the port's output of the call before and input of
    the call after are what it computed there. The layer is then judged, and diagnosed, as any
    paired one. ``fused``: the reference outputs a port layer computing two reference layers
    gives (``_fused``); the second of those counts as paired (a converter's convolution with the
    BatchNorm folded in, then the Hardswish as a function)."""
    parts: dict[str, dict[str, str]] = {}
    for key in ref:
        k = parse_key(key)
        if k is not None and not k.is_param:
            parts.setdefault(k.subject, {})[k.part] = key

    def part(subject: str, what: str) -> Optional[str]:
        got = parts.get(subject, {})
        return got.get(what) or got.get(f"{what}.0")

    paired = set(pairing.calls.values())
    order = pairing.ref_leaves
    out: dict[str, Any] = {}
    for i in range(1, len(order) - 1):
        prev, x, nxt = order[i - 1], order[i], order[i + 1]
        if x not in pairing.ref_only or nxt not in paired:
            continue
        keys = part(prev, "out"), part(x, "in"), part(x, "out"), part(nxt, "in")
        if any(k is None for k in keys) or (prev not in paired and keys[0] not in fused):
            continue
        before, x_in, x_out, after = keys
        if before not in port or after not in port or not (
                _same_array(ref[before], ref[x_in]) and _same_array(ref[x_out], ref[after])):
            continue
        out[x_in], out[x_out] = port[before], port[after]
    return out


def _same_array(a: Any, b: Any) -> bool:
    try:
        x, y = np.asarray(a), np.asarray(b)
    except Exception:  # noqa: BLE001 - a value without an array view
        return False
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    return x is y or _values.identical(x, y)


def _whole(leaves: list[str], calls: set[str]) -> set[str]:
    """Of the layer calls ``leaves``, the layers all of whose calls are in ``calls``."""
    out: dict[str, bool] = {}
    for subject in leaves:
        base = _base(subject)
        out[base] = out.get(base, True) and subject in calls
    return {name for name, every in out.items() if every}


def _base(subject: str) -> str:
    """A layer call's layer name (``act#2`` -> ``act``)."""
    return subject.partition("#")[0]


def _containers_of(calls: list[tuple[str, dict[str, Any]]]) -> set[str]:
    """The recorded layers holding other recorded layers (``blocks.0`` where ``blocks.0.conv``
    is recorded), and the model itself: what a capture with containers (``record``'s default)
    holds beside its leaf layers."""
    return holders({_base(s) for s, _ in calls})


def holders(names: Any) -> set[str]:
    """Of layer ``names``, those holding another of them (``se`` of ``se.fc1``), and the model."""
    found = {ROOT} & set(names)
    for name in names:
        cut = name.rfind(".")
        while cut > 0:
            if name[:cut] in names:
                found.add(name[:cut])
            cut = name.rfind(".", 0, cut)
    return found


def _pair_containers(ref_calls: list[tuple[str, dict[str, Any]]],
                     other_calls: list[tuple[str, dict[str, Any]]], ref_boxes: set[str],
                     other_boxes: set[str], leaf_map: Mapping[str, str],
                     ref_skip: frozenset[str] | set[str] = frozenset(),
                     other_skip: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
    """Container calls paired by the leaf layers they hold: a port container with the reference
    container holding the leaves its own leaves pair with (``leaf_map``). Where nested
    containers hold the same leaves (a block and the ``Sequential`` inside it), the outermost of
    each side pair and the inner ones pair with nothing: a port may nest the other way round (a
    one-block stage around a block without an inner ``Sequential``), and an inner pair would then
    set a block's output against a ``Sequential``'s, before the block's own add. Calls pair in
    order where both have as many; the model with the model."""
    leaves = {_base(o): _base(r) for o, r in leaf_map.items()}

    def held(calls: list[tuple[str, dict[str, Any]]], boxes: set[str],
             rename: Optional[Mapping[str, str]], skip: Any) -> dict[str, set[Optional[str]]]:
        out: dict[str, set[Optional[str]]] = {}
        for name in {_base(s) for s, _ in calls} - boxes - set(skip):
            leaf = name if rename is None else rename.get(name)
            cut = name.rfind(".")
            while cut > 0:
                if name[:cut] in boxes:
                    out.setdefault(name[:cut], set()).add(leaf)
                cut = name.rfind(".", 0, cut)
        return out

    groups: dict[frozenset[Optional[str]], tuple[list[str], list[str]]] = {}
    for box, inside in sorted(held(ref_calls, ref_boxes, None, ref_skip).items(),
                              key=lambda item: item[0].count(".")):
        if inside:  # a container holding no paired leaf says nothing of which it is
            groups.setdefault(frozenset(inside), ([], []))[0].append(box)
    partial: list[tuple[str, frozenset[Optional[str]]]] = []
    for box, inside in sorted(held(other_calls, other_boxes, leaves, other_skip).items(),
                              key=lambda item: item[0].count(".")):
        key = frozenset(inside)
        if key and None not in key and key in groups:  # every leaf it holds paired
            groups[key][1].append(box)
        elif None in key:
            partial.append((box, key - {None}))
    pairs = [(r_side[0], o_side[0]) for r_side, o_side in groups.values() if r_side and o_side]
    # a block holding a leaf whose call paired with nothing (an activation fed another input
    # where the block computes otherwise: a pre-norm port of a post-norm block) pairs with the
    # reference block holding the same paired leaves, where neither found another partner:
    # the leaves that did pair say which block it is
    taken_ref = {r for r, _ in pairs}
    taken_other = {o for _, o in pairs}
    paired_ref = set(leaves.values())
    loose: dict[frozenset[Optional[str]], list[str]] = {}
    for key, (r_side, _) in groups.items():
        if r_side and r_side[0] not in taken_ref:
            loose.setdefault(frozenset(k for k in key if k in paired_ref), []).append(r_side[0])
    for box, key in partial:
        match = loose.get(key, [])
        if len(key) > 1 and len(match) == 1 and box not in taken_other and match[0] not in taken_ref:
            pairs.append((match[0], box))
            taken_ref.add(match[0])
            taken_other.add(box)
    if ROOT in ref_boxes and ROOT in other_boxes:
        pairs.append((ROOT, ROOT))
    ref_by, other_by = _calls_by_layer(ref_calls), _calls_by_layer(other_calls)
    ref_parts, other_parts = dict(ref_calls), dict(other_calls)
    out: dict[str, str] = {}
    for r, o in pairs:
        r_calls, o_calls = ref_by.get(r, []), other_by.get(o, [])
        if len(r_calls) == len(o_calls):
            # the same leaves in blocks that take or give other things (torchvision's dense
            # layer returns its new features, paddle.vision's them concatenated to its input)
            # are blocks cut differently, not a pair
            out.update((oc, rc) for oc, rc in zip(o_calls, r_calls)
                       if _same_box(other_parts[oc], ref_parts[rc]))
    return out


def _same_box(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two container calls holding the same leaves take and give the same things: the
    same signature, or the same first output and an input of one shape, the rest keyed or
    returned otherwise: HF's ``self_attn(hidden_states=...)`` (``in[hidden_states]``) against
    PaddleNLP's ``self_attn(x)`` (``in[0]``), which ``pair_inputs`` pairs by value, and HF's
    OPT attention returning its key/value cache beside its output, PaddleNLP's its weights."""
    if _signature(a) == _signature(b):
        return True
    first = [next((parts[p] for p in ("out", "out[0]") if p in parts), None) for parts in (a, b)]
    if first[0] is None or first[0] != first[1]:
        return False
    ins = [{s for p, s in parts.items() if p.startswith("in") and s} for parts in (a, b)]
    return bool(ins[0] & ins[1])


def _calls_by_layer(calls: list[tuple[str, dict[str, Any]]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for subject, _ in calls:
        out.setdefault(_base(subject), []).append(subject)
    return out


def _pair_calls(ref_calls: list[tuple[str, dict[str, Any]]],
                other_calls: list[tuple[str, dict[str, Any]]],
                anchors: Optional[Mapping[str, str]],
                ref_map: Optional[Mapping[str, Any]] = None,
                other_map: Optional[Mapping[str, Any]] = None,
                kinds: Optional[tuple[Mapping[str, str], Mapping[str, str]]] = None
                ) -> dict[str, str]:
    """Layer calls paired by call order: the anchored ones (by ``anchors``' names, and by values:
    ``_values.value_anchors``, of which a longest run in order on both sides bounds the rest),
    and between them the most calls whose shapes match, in order. Where shapes allow several such pairings (a port with a layer the
    reference calls as a function: a ``ReLU`` after a ``BatchNorm`` keeps its shape), the one
    whose paired calls are layers of one kind (``kinds``), then see the same values
    (``_fingerprint``), wins: a port that drops a LayerNorm for an ``Identity`` has its next
    Linear see the LayerNorm's input, and by values alone the two would pair."""
    subject_map: dict[str, str] = {}
    owns: dict[tuple[int, str], Optional[str]] = {}

    def own(side: int, subject: str) -> Optional[str]:
        # what the call computes, from its own values: a bug before it leaves that as it is
        if (side, subject) not in owns:
            m = ref_map if side == 0 else other_map
            owns[side, subject] = None if m is None else _values.own_kind(
                _values.part_value(m, subject, "in"), _values.part_value(m, subject, "out"))
        return owns[side, subject]

    def alike(ref: str, other: str) -> Optional[bool]:
        """Whether two calls are layers of one kind: by class where both are known, else by
        what their values say they compute; ``None`` where neither tells."""
        if _known_kinds(kinds, ref, other):
            return _one_kind(kinds, ref, other)
        a, b = own(0, ref), own(1, other)
        return None if a is None or b is None else a == b

    fixed, crossing = _anchored_pairs(ref_calls, other_calls, anchors)
    folded: dict[int, list[int]] = {}
    if ref_map is not None and other_map is not None:
        found = _values.value_anchors(
            [c[0] for c in ref_calls], [c[0] for c in other_calls], ref_map, other_map,
            {j for _, j in fixed + crossing}, {i for i, _ in fixed + crossing},
            lambda j, i: alike(ref_calls[j][0], other_calls[i][0]) is not False)
        if found.pairs:
            fixed, crossing = _values.increasing(sorted(fixed + crossing + found.pairs))
            folded = found.folded
    for i, j in crossing:
        subject_map[other_calls[i][0]] = ref_calls[j][0]
    other_fixed, ref_fixed = {i for i, _ in crossing}, {j for _, j in crossing}
    # the reference calls a port call folds into the one it pairs with pair with nothing
    ref_fixed.update(k for chain in folded.values() for k in chain)
    bounds = [(-1, -1), *fixed, (len(other_calls), len(ref_calls))]
    prints: dict[tuple[int, str], Any] = {}

    def fp(side: int, subject: str) -> Any:
        if (side, subject) not in prints:
            m = ref_map if side == 0 else other_map
            prints[side, subject] = None if m is None else _fingerprint(m, subject)
        return prints[side, subject]

    for (i0, j0), (i1, j1) in zip(bounds, bounds[1:]):
        if i1 < len(other_calls):
            subject_map[other_calls[i1][0]] = ref_calls[j1][0]
        ref_seg = [c for j, c in enumerate(ref_calls[j0 + 1 : j1], j0 + 1) if j not in ref_fixed]
        other_seg = [c for i, c in enumerate(other_calls[i0 + 1 : i1], i0 + 1)
                     if i not in other_fixed]
        ref_subj, other_subj = [c[0] for c in ref_seg], [c[0] for c in other_seg]

        def like(a: int, b: int, r: list[str] = ref_subj, o: list[str] = other_subj) -> int:
            return _likeness(fp(0, r[a]), fp(1, o[b])) + _SAME_KIND * bool(alike(r[a], o[b]))

        ref_sigs, other_sigs = [_signature(p) for _, p in ref_seg], [_signature(p) for _, p in other_seg]
        pairs = _uncrossed(_align(ref_sigs, other_sigs, like), ref_sigs, other_sigs, like)
        for a, b in pairs:
            subject_map[other_subj[b]] = ref_subj[a]
    return subject_map


_SAME_KIND = 4  # a pair's likeness for two layers of one kind: above any values' (0-3)
_DIMS_SUFFIX = re.compile(r"[123]d$")


def _one_kind(kinds: Optional[tuple[Mapping[str, str], Mapping[str, str]]], ref: str,
              other: str) -> bool:
    """Whether two layer calls are of one class, read across the frameworks' spellings
    (``Conv2d``/``Conv2D``); False where either is unknown."""
    if kinds is None:
        return False
    a, b = kinds[0].get(_base(ref)), kinds[1].get(_base(other))
    if a is None or b is None:
        return False
    return _DIMS_SUFFIX.sub("", a.lower()) == _DIMS_SUFFIX.sub("", b.lower())


def _known_kinds(kinds: Optional[tuple[Mapping[str, str], Mapping[str, str]]], ref: str,
                 other: str) -> bool:
    return kinds is not None and _base(ref) in kinds[0] and _base(other) in kinds[1]


# how many pairs apart two paired calls may be swapped (siblings called the other way round)
_SWAP_WINDOW = 3


def _uncrossed(pairs: list[tuple[int, int]], ref_sigs: list[Any], other_sigs: list[Any],
               likeness: Callable[[int, int], int]) -> list[tuple[int, int]]:
    """``pairs`` where a port calls two same-shaped siblings the other way round (a Fire block's
    expand3x3 before its expand1x1): an alignment in order pairs each with the other's
    reference, and their values say so. Two pairs a few apart swap partners where both swapped
    pairs match in shapes and are more alike than the two in order."""
    pairs = list(pairs)
    for t in range(len(pairs)):
        for u in range(t + 1, min(t + 1 + _SWAP_WINDOW, len(pairs))):
            (a1, b1), (a2, b2) = pairs[t], pairs[u]
            if ref_sigs[a1] != other_sigs[b2] or ref_sigs[a2] != other_sigs[b1]:
                continue
            if likeness(a1, b2) + likeness(a2, b1) > likeness(a1, b1) + likeness(a2, b2):
                pairs[t], pairs[u] = (a1, b2), (a2, b1)
    return pairs


# an alignment of more calls than this (reference x port, between two anchors) takes difflib's
# longest runs of matching shapes instead of the value-aware alignment, whose table is that size
_ALIGN_CELLS = 1 << 22


def _align(ref_sigs: list[Any], other_sigs: list[Any], likeness: Callable[[int, int], int]
           ) -> list[tuple[int, int]]:
    """(ref index, other index) pairs, increasing on both sides, of equal signatures: as many as
    there can be, and of those the pairing whose pairs are most alike (``likeness`` 0-7 a pair)."""
    n, m = len(ref_sigs), len(other_sigs)
    if n == 0 or m == 0:
        return []
    if n * m > _ALIGN_CELLS:
        matcher = difflib.SequenceMatcher(None, ref_sigs, other_sigs, autojunk=False)
        return [(blk.a + k, blk.b + k) for blk in matcher.get_matching_blocks()
                for k in range(blk.size)]
    # the score of a pairing: its number of pairs first, then their likeness (at most 7 a pair:
    # 8 * pairs > any sum)
    weight = 8 * (min(n, m) + 1)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for a in range(n - 1, -1, -1):
        row, below, sig = score[a], score[a + 1], ref_sigs[a]
        for b in range(m - 1, -1, -1):
            best = below[b] if below[b] >= row[b + 1] else row[b + 1]
            if sig == other_sigs[b]:
                take = below[b + 1] + weight + likeness(a, b)
                if take > best:
                    best = take
            row[b] = best
    pairs: list[tuple[int, int]] = []
    a = b = 0
    while a < n and b < m:
        if ref_sigs[a] == other_sigs[b] and \
                score[a][b] == score[a + 1][b + 1] + weight + likeness(a, b):
            pairs.append((a, b))
            a, b = a + 1, b + 1
        elif score[a][b] == score[a + 1][b]:
            a += 1
        else:
            b += 1
    return pairs


def _fingerprint(mapping: Mapping[str, Any], subject: str) -> Optional[tuple[Any, Any]]:
    """(mean, mean |x|, max |x|) of a layer call's first input and first output, or ``None``
    for a part that is not a float array."""
    def part(what: str) -> Any:
        value = _values.part_value(mapping, subject, what)
        return None if value is None else _stats(value)
    return part("in"), part("out")


def _likeness(ref_fp: Any, other_fp: Any) -> int:
    """2 where the inputs agree, plus 1 where the outputs do: a correct port's paired calls see
    the same input (a layer and the one after it, same-shaped, do not)."""
    if ref_fp is None or other_fp is None:
        return 0
    return 2 * _close(ref_fp[0], other_fp[0]) + _close(ref_fp[1], other_fp[1])


def _fused(ref_map: Mapping[str, Any], other_map: Mapping[str, Any],
           subject_map: Mapping[str, str], ref_leaves: list[str]
           ) -> tuple[dict[str, str], set[str], dict[str, str]]:
    """Port layers computing what two reference layers compute in a row: paddle's
    ``BatchNorm(act="relu")`` against torch's ``BatchNorm2d`` and the ``ReLU`` layer after it.
    Such a port layer pairs with the first (their inputs agree), but its output is the second's.
    Returned: ``{other "<layer>.out": reference "<next>.out"}``, the reference keys nothing in
    the port computes (the first's output, the second's input: one tensor), and the reference
    keys to derive (below).

    Found by values: the reference's next layer is unpaired and takes the paired layer's output
    as its input, and the port layer's output agrees with the next layer's output, not with the
    paired layer's. After a bug in it values agree with neither, and the port layer's output
    is set against the one it is nearer (a convolution 1% off with its BatchNorm folded in is
    nearer the BatchNorm's output; one applying the next layer as a function, the paired one's).

    Where the reference applies the ReLU as a function (densenet's last ``F.relu``), no reference
    layer records what the fused port layer gives: its output agrees with the ReLU of the paired
    layer's, not with that output itself, and the next paired layers' inputs agree (so the
    reference does apply it: a port applying a ReLU the reference does not differs there). The
    paired layer's output is then set against the ReLU of the reference's (``derived``: reference
    key -> "relu"; a noise reference is derived alike, so a bug in the layer still fails there)."""
    paired = set(subject_map.values())
    port_of = {r: o for o, r in subject_map.items()}
    following = dict(zip(ref_leaves, ref_leaves[1:]))
    parts: dict[str, str] = {}
    superseded: set[str] = set()
    derived: dict[str, str] = {}
    for o, r in subject_map.items():
        r2 = following.get(r)
        if r2 is None:
            continue
        r_out, r2_in, r2_out, o_out = f"{r}.out", f"{r2}.in", f"{r2}.out", f"{o}.out"
        if r_out not in ref_map or r2_in not in ref_map or o_out not in other_map:
            continue
        a, b = ref_map[r_out], ref_map[r2_in]
        if r2 in paired:
            o2_in = f"{port_of[r2]}.in"
            if o2_in in other_map and not _feeds(a, b) and \
                    _shape(a) == _shape(other_map[o_out]) and _applied_relu(a, other_map[o_out]) \
                    and _close(_stats(b), _stats(other_map[o2_in])):
                derived[r_out] = "relu"
            continue
        if r2_out not in ref_map or _shape(ref_map[r2_out]) != _shape(other_map[o_out]):
            continue
        if a is not b and not np.array_equal(np.asarray(a), np.asarray(b)):
            continue
        got, first, second = _stats(other_map[o_out]), _stats(a), _stats(ref_map[r2_out])
        if (_close(got, second) and not _close(got, first)) or (
                not _close(got, first) and not _close(got, second)
                and _nearer(other_map[o_out], ref_map[r2_out], a)):
            parts[o_out] = r2_out
            superseded.update((r_out, r2_in))
    return parts, superseded, derived


def _nearer(got: Any, this: Any, that: Any) -> bool:
    """Whether ``got`` is nearer ``this`` than ``that`` (largest difference): a port layer
    computing two reference layers in one, with a bug in it, is nearer the second's output (a
    convolution's weight 1% off, its BatchNorm folded in) than the first's."""
    with np.errstate(all="ignore"):
        g = np.asarray(got, dtype=np.float64)
        near = float(np.max(np.abs(g - np.asarray(this, dtype=np.float64))))
        far = float(np.max(np.abs(g - np.asarray(that, dtype=np.float64))))
    return bool(near < far)


def _derive(ref: dict[str, Any], derived: Mapping[str, str]) -> dict[str, Any]:
    """``ref`` with the values ``_fused`` derives, as a ``Derived`` tree (``compare`` derives a
    noise reference's values alike); ``ref`` itself where there are none."""
    if not derived:
        return ref
    from ..diff.pairing import DERIVED_OPS, Derived

    return Derived({k: DERIVED_OPS[derived[k]](v) if k in derived else v for k, v in ref.items()},
                   derived)


def _applied_relu(ref_out: Any, port_out: Any) -> bool:
    """The port's output agrees with the ReLU of the reference's, and not with it."""
    m = _values.moments(ref_out)
    if m is None or not m[2] < 0:
        return False
    got = _stats(port_out)
    return _close(got, _values.relu_stats(m)) and not _close(got, _values.of_moments(m))


def match_by_order(
    ref_map: Mapping[str, Any],
    other_map: Mapping[str, Any],
    *,
    anchors: Optional[Mapping[str, str]] = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ref, other)`` ready to compare: ``other_map`` renamed as ``rename_by_order`` renames it,
    and the layer calls only one side has left out of both. That is, in captures with
    containers (``record``'s default), the container calls that pair with nothing (a
    ``Sequential`` the port does without, a ``ModuleList`` on one side), and the leaf layer calls
    one side makes where the other makes none between the same two paired calls (a ``ReLU``
    layer the other side calls as a function, a pooling layer against a functional pooling).
    Unpaired calls on both sides between the same two paired calls are a difference in the
    layers themselves and stay, as keys one side lacks. Every paired layer and the model's own
    input and output are compared, so a difference in the left-out code still fails the layers
    after it. ``reprod-diff --by-order`` compares layer captures this way.

    >>> reprod.compare(*match_by_order(torch_capture, paddle_capture), threshold=1e-5)
    """
    pairing = _pair_all(ref_map, other_map, anchors, inert=(_ANY_LAYER, _ANY_LAYER))
    subject_map = pairing.calls
    paired = set(subject_map.values())
    ref_boxes, other_boxes = pairing.ref_boxes, pairing.other_boxes
    # an inert call (a dropout in eval mode) computes nothing: left out as a one-sided call is
    ref_only = pairing.ref_only | pairing.ref_inert
    other_only = pairing.other_only | pairing.other_inert

    def left_out(key: str, boxes: set[str], known: Any, one_sided: set[str]) -> bool:
        k = parse_key(key)
        if k is None or k.is_param:
            return False
        return k.subject in one_sided or (_base(k.subject) in boxes and k.subject not in known)

    parts, superseded, derived = _fused(ref_map, other_map, subject_map, pairing.ref_leaves)
    kept = set(parts.values())
    other = _renamed({k: v for k, v in other_map.items()
                      if not left_out(k, other_boxes, subject_map, other_only)},
                     subject_map, parts)
    # inputs passed by keyword on one side and by position on the other
    other = pair_inputs(ref_map, other)
    # a reference layer the port applies as a function: judged on what the port computed there
    functions = _applied_as_functions(ref_map, other, pairing, kept)
    other.update(functions)
    ref = {k: v for k, v in ref_map.items()
           if k in kept or k in functions
           or (k not in superseded and not left_out(k, ref_boxes, paired, ref_only))}
    return _derive(ref, derived), other


def pair_inputs(ref_map: Mapping[str, Any], other_map: Mapping[str, Any]) -> dict[str, Any]:
    """``other_map`` with the inputs of each layer call that the two sides key otherwise renamed
    to the reference's keys. One framework passes an argument by keyword and the other by
    position (Hugging Face calls ``self_attn(hidden_states=...)``, PaddleNLP ``self_attn(x,
    ...)``), and the call's inputs then pair with nothing: ``in[hidden_states]`` on one side,
    ``in[0]`` on the other. A divergence inside such a layer was named at the block around it,
    its input never shown to align.

    An input is renamed where, of the same call's inputs the reference alone keys, one holds the
    same values (``_values.same_values``: shape, statistics and sampled elements to 1e-2): a
    faithful port hands a layer what the reference hands it, and inputs that already differ are
    left unpaired, as before, rather than set against an unrelated tensor of the same shape
    (an attention mask in another convention). Several alike (one tensor passed as query and
    key) pair in order. Each call's gradients through its inputs (``grad_in``) follow the
    pairing of its inputs. A call's lone output on one side and the first of several on the
    other, of one shape (``out`` against ``out[0]``: PaddleNLP's MegatronBERT attention returns
    its weights too), pair as well, their gradients alike. Keys that pair already, and
    everything else, are kept as they are.

    >>> reprod.compare(ref, pair_inputs(ref, port), threshold=1e-5)
    """
    ref_parts = _inputs_by_call(ref_map)
    other_parts = _inputs_by_call(other_map) if ref_parts else {}
    renamed: dict[str, str] = {}
    probes: dict[str, Optional[_values.Probe]] = {}

    def probe(mapping: Mapping[str, Any], key: str) -> Optional[_values.Probe]:
        side = ("r:" if mapping is ref_map else "o:") + key
        if side not in probes:
            probes[side] = _values.probe(mapping[key])
        return probes[side]

    for subject, theirs in other_parts.items():
        ours = ref_parts.get(subject)
        if ours is None:
            continue
        taught: dict[tuple[str, ...], tuple[str, ...]] = {}  # the port's items -> the reference's
        for what in ("in", "grad_in"):
            ref_left = [(k, c) for k, c in ours.get(what, ()) if k not in other_map]
            other_left = [(k, c) for k, c in theirs.get(what, ()) if k not in ref_map]
            if not ref_left or not other_left:
                continue
            if what == "grad_in":
                # as its input paired: a gradient that differs still pairs with its input's
                by_items = {c.items: (k, c) for k, c in ref_left}
                for key, parsed in list(other_left):
                    mine = by_items.get(taught.get(parsed.items, ("<none>",)))
                    if mine is not None:
                        renamed[key] = mine[0]
                        ref_left.remove(mine)
                        other_left.remove((key, parsed))
            for key, parsed in ref_left:
                p = probe(ref_map, key)
                if p is None:
                    continue
                for candidate in other_left:
                    if _values.same_values(p, probe(other_map, candidate[0])):
                        renamed[candidate[0]] = key
                        other_left.remove(candidate)
                        taught[candidate[1].items] = parsed.items
                        break
    renamed.update(_first_outputs(ref_map, other_map))
    if not renamed:
        return dict(other_map)
    return {renamed.get(k, k): v for k, v in other_map.items()}


_FIRST = ("[0]", ".0")  # how a capture keys the first of several outputs


def _first_outputs(ref_map: Mapping[str, Any], other_map: Mapping[str, Any]) -> dict[str, str]:
    """{other key: reference key} for a call's lone output on one side against the first of
    several on the other, of one shape (PaddleNLP's MegatronBERT attention returns its weights
    beside its output, HF's its output alone), and the gradient of that output alike: the
    first output is what the call computes, and unpaired neither was judged."""
    out: dict[str, str] = {}
    for what in ("out", "grad_out"):
        for key in other_map:
            if key.rpartition(".")[2] == what:  # the port's lone output against the reference's first
                theirs = [f"{key}{f}" for f in _FIRST if f"{key}{f}" in ref_map]
                if len(theirs) == 1 and key not in ref_map and \
                        _shape(ref_map[theirs[0]]) == _shape(other_map[key]):
                    out[key] = theirs[0]
                continue
            for f in _FIRST:
                lone = key[: -len(f)]
                if key.endswith(f) and lone.rpartition(".")[2] == what and lone in ref_map \
                        and lone not in other_map and key not in ref_map \
                        and _shape(ref_map[lone]) == _shape(other_map[key]):
                    out[key] = lone
    return out


def _inputs_by_call(mapping: Mapping[str, Any]
                    ) -> dict[str, dict[str, list[tuple[str, CaptureKey]]]]:
    """Each layer call's input and input-gradient keys, parsed, in order: {subject: {what: ...}}."""
    out: dict[str, dict[str, list[tuple[str, CaptureKey]]]] = {}
    for key in mapping:
        if ".in" not in key and ".grad_in" not in key:
            continue
        parsed = parse_key(key)
        if parsed is None or parsed.what not in ("in", "grad_in"):
            continue
        out.setdefault(parsed.subject, {}).setdefault(parsed.what, []).append((key, parsed))
    return out


def _one_sided(ref_leaves: list[str], other_leaves: list[str], subject_map: Mapping[str, str]
               ) -> tuple[set[str], set[str]]:
    """The unpaired leaf calls of each side that lie between two consecutive paired calls (or
    before the first, after the last) where the other side makes no unpaired call between the
    same two pairs (siblings called the other way round pair crosswise: the span between their
    positions on the other side is taken, whichever way round)."""
    ref_at = {s: j for j, s in enumerate(ref_leaves)}
    pairs = sorted((ref_at[r], i) for i, o in enumerate(other_leaves)
                   if (r := subject_map.get(o)) is not None and r in ref_at)
    ref_paired = {j for j, _ in pairs}
    other_paired = {i for _, i in pairs}
    ref_free = [j not in ref_paired for j in range(len(ref_leaves))]
    other_free = [i not in other_paired for i in range(len(other_leaves))]

    def gaps(bounds: list[tuple[int, int]], free: list[bool], across: list[bool],
             leaves: list[str]) -> set[str]:
        out: set[str] = set()
        for (x0, y0), (x1, y1) in zip(bounds, bounds[1:]):
            gap = [leaves[x] for x in range(x0 + 1, x1) if free[x]]
            lo, hi = min(y0, y1), max(y0, y1)
            if gap and not any(across[lo + 1: hi]):
                out.update(gap)
        return out

    ref_only = gaps([(-1, -1), *pairs, (len(ref_leaves), len(other_leaves))], ref_free,
                    other_free, ref_leaves)
    flipped = sorted((i, j) for j, i in pairs)
    other_only = gaps([(-1, -1), *flipped, (len(other_leaves), len(ref_leaves))], other_free,
                      ref_free, other_leaves)
    return ref_only, other_only


def _renamed(other_map: Mapping[str, Any], subject_map: Mapping[str, str],
             parts: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    # a layer's parameters follow the layer's first call
    owner_map: dict[str, str] = {}
    for other_subject, ref_subject in subject_map.items():
        o, r = parse_key(other_subject + ".out"), parse_key(ref_subject + ".out")
        if o is not None and r is not None and o.call == 1 and r.call == 1:
            owner_map[o.name] = r.name

    renamed: list[tuple[str, Optional[str]]] = []  # (key, paired name or None)
    for key in other_map:
        parsed = parse_key(key)
        paired: Optional[str] = None
        if parts and key in parts:  # a fused layer's output: the next reference layer's
            paired = parts[key]
        elif parsed is not None and not parsed.is_param and parsed.subject in subject_map:
            paired = f"{subject_map[parsed.subject]}.{parsed.part}"
        elif parsed is not None and parsed.is_param:
            owner, _, local = parsed.name.rpartition(".")
            ref_owner = owner_map.get(owner or ROOT)
            if ref_owner is not None:
                paired = str(
                    parsed.with_name(local if ref_owner == ROOT else f"{ref_owner}.{local}")
                )
        renamed.append((key, paired))
    taken = {p for _, p in renamed if p is not None}
    out: dict[str, Any] = {}
    for key, paired in renamed:
        # a key left unpaired must not take the name a paired key now carries
        new = paired if paired is not None else (UNPAIRED + key if key in taken else key)
        if new in out:
            raise KeyMismatchError(f"rename_by_order: two keys of the other side pair with {new!r}")
        out[new] = other_map[key]
    return out


def pair_by_order(ref_map: Mapping[str, Any], other_map: Mapping[str, Any]) -> dict[str, Any]:
    """Deprecated: the old name of ``rename_by_order`` (which says what it returns)."""
    warnings.warn(
        "reprod.capture.pair_by_order is deprecated; use reprod.capture.rename_by_order",
        DeprecationWarning,
        stacklevel=2,
    )
    return rename_by_order(ref_map, other_map)
