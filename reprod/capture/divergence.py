"""The first divergence: in call order, the first recorded layer whose output fails, and whether
its input was already different. Then the cause is code between recorded layers: with containers
recorded, the innermost enclosing layer whose input aligns and whose output differs is named (its
own ``forward``); without, the gap between the two leaf layers is. A comparison whose layer calls
mostly did not pair by name gives a divergence of kind ``"unpaired"``, never ``None``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from ..diff.result import DiffResult, KeyResult
from ..messages import fmt_num
from .naming import ROOT, CaptureKey, parse_key

__all__ = ["Divergence", "first_divergence"]

# statuses that say a key exists on one side only: a pairing problem, not a numeric divergence
_ONE_SIDED = ("missing", "extra")


@dataclass(frozen=True)
class Divergence:
    """Where two captures part ways.

    ``layer`` is the layer call (``features.3.block.2``, ``blocks.1#2`` for a second call);
    ``input``/``output`` are the representative comparisons (the first failing one, else the
    largest difference) of everything in ``inputs``/``outputs``. In the backward direction the
    inputs are the gradients arriving at the layer's outputs (``grad_out``) and the outputs the
    gradients of its inputs (``grad_in``) and of its parameters. A ``grad_in`` is the gradient of
    the input tensor as a whole: where a tensor feeds several layers it includes what the others
    sent back, so a layer named for its ``grad_in`` shares the suspicion with the other users of
    that input; a parameter gradient is the layer's own. ``previous`` is the last
    recorded layer before it, whose outputs all align.

    ``kind`` is ``"layer"``, or ``"unpaired"`` when most layer calls are on one side only (names
    that did not pair): then nothing is shown to align, ``layer`` is ``""``, ``output`` is the
    first one-sided key and ``paired`` / ``calls`` count the layer calls that paired / all of
    the reference's. ``inner`` is set when ``layer`` is a container named for its own code: the
    divergence first seen inside it (a sublayer whose input already differs).
    ``own_code`` is True when ``layer`` has recorded sublayers that all align;
    ``unpaired_inside`` names those of its sublayers the reference alone recorded (names that
    did not pair), which may hold the cause instead.

    ``factor`` is set where the outputs differ by a constant factor (the reference's output is
    ``factor`` times the port's), which a scale applied inside the layer on one side and after
    it on the other gives. ``passed_over`` holds the layers called before ``layer`` whose own
    outputs differ while the layers reading them align again: their difference is not carried
    on, so it is not what made the outputs differ. ``unpaired_between``: where the input
    already differs, the reference's layer calls after ``previous`` that nothing in the port
    pairs with (a LayerNorm the port replaced by an ``Identity``). ``port_layer``: the port's
    name of ``layer`` where pairing by call order paired it with a layer of another name
    (``diverges at enc.layers.1.self_attn (MultiheadAttention; the port's
    body.layers.1.self_attn)``).
    """

    layer: str
    layer_type: Optional[str]
    input: Optional[KeyResult]
    output: KeyResult
    inputs: tuple[KeyResult, ...] = ()
    outputs: tuple[KeyResult, ...] = ()
    direction: str = "forward"
    previous: Optional[str] = None
    kind: str = "layer"
    inner: Optional[Divergence] = None
    own_code: bool = False
    paired: Optional[int] = None
    calls: Optional[int] = None
    one_sided: Optional[int] = None
    unpaired_inside: tuple[str, ...] = ()
    factor: Optional[float] = None
    passed_over: tuple[Divergence, ...] = ()
    # the reference's layer calls between ``previous`` and ``layer`` that nothing in the port
    # pairs with, with their classes ("encoder.ln (LayerNorm)"): where an input already differs
    unpaired_between: tuple[str, ...] = ()
    # the port's layer calls there that nothing in the reference pairs with ("pos_encoding
    # (Embedding)": CTRL's sinusoidal table, a layer in PaddleNLP and a function in HF)
    port_between: tuple[str, ...] = ()
    # the reference's layer call before ``layer`` that the port computes in the same layer (a
    # convolution a converter folded the BatchNorm ``layer`` into): ``inputs`` are its inputs
    folded: Optional[str] = None
    folded_type: Optional[str] = None
    # the data flowing on from the layer aligns again, and no layer after it differs: its
    # difference is not carried to the outputs (``carried`` said so; the first passed over)
    not_carried: bool = False
    # the port's name of the layer, where pairing by call order paired it with another name
    # (``align_forward(by_order=True)``): the message names both, as the porter edits the port
    port_layer: Optional[str] = None
    # inputs handed in another shape on each side while the call's other inputs compare (an
    # attention mask HF builds [B, 1, L, L] and PaddleNLP [B, 1, 1, L]): a form, not a value,
    # so not held against the layer; said in the message
    unlike: tuple[KeyResult, ...] = ()
    # inputs of the call keyed otherwise on each side that paired with none of the other's by
    # value (``pair_inputs``): the reference's and the port's keys. HF hands BlenderbotSmall's
    # attention its mask additive (1 = attend), PaddleNLP 1 = masked; an unpatched PaddleNLP
    # MegatronBERT adds its 0/1 mask as it is. Not compared, so said in the message
    unmatched: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    # where the input already differs: the block around the gap (by call order, recorded
    # afterwards) and the one of its inputs that already differs while its others align (an
    # unpatched PaddleNLP MegatronBERT adds its 0/1 mask as it is): that input's making is
    # where to look, not the code between the two leaves
    handed: Optional[tuple[str, KeyResult]] = None

    @property
    def input_aligned(self) -> Optional[bool]:
        """True when every recorded input aligns, False when one differs, None when none recorded."""
        if not self.inputs:
            return None
        return all(r.passed for r in self.inputs)

    @property
    def message(self) -> str:
        """One line for a report.

        >>> first_divergence(result).message
        'diverges at features.3.block.2 (SqueezeExcitation): input aligned (max 2.000e-07), output max diff 4.000e-02'
        """
        return (self._message() + _unlike_note(self.unlike, self.direction)
                + _unmatched_note(self.unmatched, self.direction) + _handed_note(self.handed)
                + _factor_note(self.factor) + _passed_note(self.passed_over))

    def _message(self) -> str:
        if self.kind == "unpaired":
            return (
                f"layer names do not pair: only {self.paired} of {self.calls} layer calls pair "
                f"by name ({self.one_sided} capture keys on one side only), so nothing is shown "
                "to align; pair them by call order: "
                "compare(*reprod.capture.match_by_order(ref, other)), or reprod-diff --by-order"
            )
        backward = self.direction == "backward"
        where = self.layer + (f" ({self.layer_type})" if self.layer_type else "")
        if self.folded is not None:
            where = (self.folded + (f" ({self.folded_type})" if self.folded_type else "")
                     + f" + {where}, one layer in the port"
                     + (f": {self.port_layer}" if self.port_layer else ""))
        elif self.port_layer:
            where = self.layer + (f" ({self.layer_type}; the port's {self.port_layer})"
                                  if self.layer_type else f" (the port's {self.port_layer})")
        head = "backward diverges" if backward else "diverges"
        inp = "incoming gradient" if backward else "input"
        out = f"{_describe_output(self.output, backward, len(self.outputs) > 1)}"
        if self.input_aligned is None:
            return f"{head} at {where}: {inp} not recorded, {out}"
        if self.input_aligned:
            worst = _max_abs(self.inputs)
            text = f"{head} at {where}: {inp} aligned (max {fmt_num(worst)}), {out}"
            if self.inner is not None and self.inner.input is not None:
                before = ("while its recorded sublayers before that align"
                          if self.inner.previous is not None and
                          self.inner.previous.startswith(self.layer + ".") else
                          "and it is the first of its sublayers recorded")
                text += (
                    f"; inside it, the {inp} of {self.inner.layer} already differs "
                    f"({_describe(self.inner.input)}) {before}, so the cause is {self.layer}'s "
                    "own forward code"
                )
            elif self.own_code and self.unpaired_inside:
                names = ", ".join(self.unpaired_inside[:3]) + (
                    f" and {len(self.unpaired_inside) - 3} more"
                    if len(self.unpaired_inside) > 3 else "")
                text += (f"; its sublayers that paired align, but {names} paired with nothing "
                         "in the port (their names differ: pair them by call order), so the "
                         "cause is there or in its own forward code")
            elif self.own_code:
                text += "; its recorded sublayers align, so the cause is its own forward code"
            return text
        assert self.input is not None
        diff = _describe(self.input)
        if self.previous is None:
            cause = f"the {inp} of the first recorded layer already differs ({diff})"
        elif _calls_of_one_layer(self.previous, self.layer):
            # the same layer called twice (XLNet's one dropout, before the word embeddings and
            # the positional encoding): "although dropout aligns" would name it at both ends
            base = self.layer.split("#")[0]
            earlier = self.previous if "#" in self.previous else f"{self.previous}#1"
            cause = (
                f"{inp} already differs ({diff}) although its call before, {earlier}, aligns, "
                f"so the cause lies between the two calls of {base}, in the code that calls "
                "it, outside the recorded layers"
            )
        elif self.unpaired_between or self.port_between:
            mine = bool(self.unpaired_between)
            calls = self.unpaired_between if mine else self.port_between
            what = ("a layer" if len(calls) == 1 else "layers") + (
                " the port leaves out, or computes where nothing records it" if mine else
                " the reference computes where nothing records it (a function, a table), or the "
                "port adds: the cause lies there or between the two")
            cause = (
                f"{inp} already differs ({diff}) although {self.previous} aligns; between the "
                f"two the {'reference' if mine else 'port'} calls {', '.join(calls)}, which "
                f"nothing in the {'port' if mine else 'reference'} pairs with: {what}"
            )
        else:
            cause = (
                f"{inp} already differs ({diff}) although {self.previous} aligns, so the cause "
                f"lies between the two, outside the recorded layers"
            )
        return f"{head} before {where}: {cause}; {out}"


def _calls_of_one_layer(previous: str, layer: str) -> bool:
    return previous.split("#")[0] == layer.split("#")[0]


def _unlike_note(unlike: tuple[KeyResult, ...], direction: str) -> str:
    if not unlike or direction != "forward":
        return ""
    parts = []
    for r in unlike:
        parsed = parse_key(r.key)
        item = "" if parsed is None else parsed.part[len("in"):]
        parts.append(f"input{item} ({_shape_text(r.ref_shape)} in the reference, "
                     f"{_shape_text(r.other_shape)} in the port)")
    return (f"; not judged: its {', '.join(parts)}, handed in another shape on each side (a mask "
            "each builds its own way), its other inputs compared")


def _unmatched_note(unmatched: tuple[tuple[str, ...], tuple[str, ...]], direction: str) -> str:
    ref, port = unmatched
    if not ref or direction != "forward":
        return ""
    mine = ", ".join(f"input{p[len('in'):]}" for p in ref)
    theirs = ", ".join(f"input{p[len('in'):]}" for p in port)
    return (f"; not compared: its {mine} holds other values than any input the port keys "
            f"otherwise ({theirs}): most often a mask each side writes its own way (additive "
            "against 1 = masked), which the layer's outputs then judge")


def _handed_note(handed: Optional[tuple[str, KeyResult]]) -> str:
    if handed is None:
        return ""
    block, r = handed
    parsed = parse_key(r.key)
    item = "" if parsed is None else parsed.part[len("in"):]
    return (f"; the block around it, {block}, is handed its input{item} already differing "
            f"({_describe(r)}) while its other inputs align: look first where that input is "
            "made (a mask built before the block)")


def _shape_text(shape: Optional[tuple[int, ...]]) -> str:
    return "?" if shape is None else "[" + ", ".join(str(n) for n in shape) + "]"


def _factor_note(factor: Optional[float]) -> str:
    if factor is None:
        return ""
    return (f"; outputs differ by a constant factor {round(factor, 6)} (the reference's output is "
            f"{round(factor, 6)} times the port's: a scale applied inside the layer on one side "
            "and after it on the other, or one in its weights)")


def _passed_note(passed: tuple[Divergence, ...]) -> str:
    if not passed:
        return ""
    layers = [d.layer + (f" ({d.layer_type})" if d.layer_type else "") +
              ("" if d.factor is None else f": output off by a constant factor {round(d.factor, 6)}")
              for d in passed]
    names = layers[0] if len(layers) == 1 else ", ".join(layers[:-1]) + " and " + layers[-1]
    their = "its output differs" if len(passed) == 1 else "their outputs differ"
    return (f"; passed over before it: {names} ({their}, but the layers reading "
            f"{'it' if len(passed) == 1 else 'them'} align again: not carried on)")


def _max_abs(results: tuple[KeyResult, ...]) -> Optional[float]:
    values = [r.max_abs for r in results if r.max_abs is not None]
    return max(values) if values else None


def _describe(r: KeyResult) -> str:
    if r.status in ("failed", "mismatch") and r.max_abs is not None:
        return f"max diff {fmt_num(r.max_abs)}"
    if r.status == "shape" and _rows_apart(r.ref_shape, r.other_shape):
        # a Mixtral expert handed 41 tokens in the port and 39 in the reference: a router near a
        # tie, or a wrong top-k or capacity, chose otherwise upstream
        return (f"{r.reason}: another number of rows, as a selection upstream gives that chose "
                "otherwise (a router's top-k, a near tie decided by rounding, a mask)")
    return r.reason or r.status


def unmatched_inputs(results: Iterable[KeyResult]
                     ) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """{layer call: (the reference's input parts, the port's)} for the calls whose inputs are
    keyed otherwise on each side and paired with none of the other's by value
    (``Divergence.unmatched``): a key on one side only, with one on the other side only."""
    sides: dict[str, tuple[list[str], list[str]]] = {}
    for r in results:
        if r.status not in _ONE_SIDED:
            continue
        parsed = parse_key(r.key)
        if parsed is not None and parsed.what == "in":
            sides.setdefault(parsed.subject, ([], []))[r.status == "extra"].append(parsed.part)
    return {s: (tuple(a), tuple(b)) for s, (a, b) in sides.items() if a and b}


def without_forms(ins: tuple[KeyResult, ...]
                  ) -> tuple[tuple[KeyResult, ...], tuple[KeyResult, ...]]:
    """A layer call's inputs split into those judged and those handed in another shape on each
    side (``Divergence.unlike``), where any other input is judged: a mask each side builds its
    own way is a form, not a value. A call's only inputs of another shape, and inputs with
    another number of rows (an expert handed other tokens), are what differs and stay."""
    forms = tuple(r for r in ins if r.status == "shape"
                  and not _rows_apart(r.ref_shape, r.other_shape))
    if not forms or len(forms) == len(ins):
        return ins, ()
    return tuple(r for r in ins if r not in forms), forms


def _rows_apart(a: Optional[tuple[int, ...]], b: Optional[tuple[int, ...]]) -> bool:
    return (a is not None and b is not None and len(a) == len(b) >= 1 and a[0] != b[0]
            and tuple(a[1:]) == tuple(b[1:]))


def _describe_output(r: KeyResult, backward: bool, several: bool) -> str:
    parsed = parse_key(r.key)
    if parsed is not None and parsed.is_param:
        what = f"gradient of param {parsed.name}"
    elif backward and parsed is not None:
        # a tensor hook sees the gradient of the whole tensor: every layer that used it adds in
        item = parsed.part[len("grad_in") :]
        return f"gradient of its input{item} (a total over every use of that input) {_describe(r)}"
    else:
        what = "output" + (f" {parsed.part}" if parsed and several else "")
    return f"{what} {_describe(r)}"


def _representative(results: tuple[KeyResult, ...]) -> Optional[KeyResult]:
    for r in results:
        if not r.passed:
            return r
    if not results:
        return None
    return max(results, key=lambda r: -1.0 if r.max_abs is None else r.max_abs)


class _Unit:
    __slots__ = ("subject", "name", "ins", "outs", "pos", "start", "folded", "forms",
                 "unmatched")

    def __init__(self, subject: str, name: str) -> None:
        self.subject = subject
        self.name = name
        self.folded: Optional[_Unit] = None  # the call before it, computed in one port layer
        self.pos: Optional[int] = None  # position of the first output key: when the call ended
        self.start: Optional[int] = None  # position of its first key: when the call began
        self.ins: list[KeyResult] = []
        self.outs: list[KeyResult] = []
        self.forms: list[KeyResult] = []  # inputs handed in another shape (without_forms)
        self.unmatched: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # Divergence.unmatched


# forward (start, end) positions of each layer call: call A encloses call B when A began before
# B and ended after it (a container and what its forward called)
Spans = dict[str, tuple[int, int]]


def _encloses(spans: Spans, outer: str, inner: str) -> bool:
    a, b = spans.get(outer), spans.get(inner)
    if a is None or b is None:
        return False
    return a[0] < b[0] and b[1] < a[1]


def _aligned(results: list[KeyResult]) -> bool:
    return bool(results) and all(r.passed for r in results)


def _failing(results: list[KeyResult]) -> bool:
    return any(not r.passed for r in results)


def _divergence(
    unit: _Unit,
    direction: str,
    layer_types: Optional[Mapping[str, str]],
    previous: Optional[str],
    **extra: Any,
) -> Divergence:
    ins, outs = tuple(unit.ins), tuple(unit.outs)
    output = _representative(outs)
    assert output is not None
    if unit.folded is not None:
        extra.setdefault("folded", unit.folded.subject)
        extra.setdefault("folded_type",
                         None if layer_types is None else layer_types.get(unit.folded.name))
    if unit.forms:
        extra.setdefault("unlike", tuple(unit.forms))
    if unit.unmatched[0]:
        extra.setdefault("unmatched", unit.unmatched)
    return Divergence(
        layer=unit.subject,
        layer_type=None if layer_types is None else layer_types.get(unit.name),
        input=_representative(ins),
        output=output,
        inputs=ins,
        outputs=outs,
        direction=direction,
        previous=previous,
        **extra,
    )


def _walk(
    units: list[_Unit], direction: str, layer_types: Optional[Mapping[str, str]], spans: Spans,
    ref_only: Sequence[tuple[int, str]] = (),
    carried: Optional[Callable[[Divergence], bool]] = None,
) -> Optional[Divergence]:
    previous: Optional[str] = None
    passed: list[Divergence] = []
    # backward: the first layer whose incoming gradient aligns and only whose input's gradient
    # differs. A tensor hook sees the total over every use of a tensor: an input several layers
    # read (a UNet's time embedding, a residual's) differs there for a bug in another reader,
    # walked later. A later layer whose own parameters' gradients differ, its incoming gradient
    # aligned, is that reader; where none is, this one is named.
    shared: Optional[Divergence] = None
    for unit in units:
        if not unit.outs:
            continue
        if shared is not None:
            if _failing(unit.outs):
                found = _found(unit, units, direction, layer_types, spans, ref_only, previous)
                if not found.input_aligned:
                    return shared
                if _own_gradients_fail(unit):
                    return found
                # another reader of the shared input (the UNet's next resnet): walked past
            previous = unit.subject
            continue
        if _failing(unit.outs):
            found = _found(unit, units, direction, layer_types, spans, ref_only, previous)
            if direction == "backward" and found.input_aligned and \
                    not _own_gradients_fail(unit) and found.inner is None:
                shared = found
                previous = unit.subject
                continue
            if found.input_aligned and carried is not None and unit.pos is not None and any(
                    u.start is not None and u.start > unit.pos and _aligned(u.ins)
                    for u in units) and not carried(found):
                # a layer whose outputs differ while the data flowing on from it aligns again (a
                # scale inside the layer on one side, after it on the other) did not make the
                # outputs differ: the first difference that is carried on did
                passed.append(found)
                continue
            return replace(found, passed_over=tuple(passed)) if passed else found
        previous = unit.subject
    if shared is not None:
        return shared
    return replace(passed[0], not_carried=True) if passed else None


def _uneven_calls(result: DiffResult) -> set[str]:
    """The layers called another number of times on each side, some of whose calls paired: a
    module one side shares (diffusers hands every resnet one ``nn.SiLU``, called 26 times;
    a port gives each block its own), whose n-th calls by number are not the same calls."""
    calls: dict[str, tuple[str, bool]] = {}  # call -> (its layer, whether any key paired)
    for r in result.results:
        parsed = parse_key(r.key)
        if parsed is None or parsed.is_param:
            continue
        seen = calls.get(parsed.subject, (parsed.name, False))[1]
        calls[parsed.subject] = (parsed.name, seen or r.status not in _ONE_SIDED)
    # a call with some keys on one side (a second input only one side passes) is still a call
    paired = {name for name, both in calls.values() if both}
    alone = {name for name, both in calls.values() if not both}
    return paired & alone


def _own_gradients_fail(unit: _Unit) -> bool:
    """Whether a backward unit's own parameters' gradients differ (not only its input's)."""
    for r in unit.outs:
        parsed = parse_key(r.key)
        if not r.passed and parsed is not None and parsed.is_param:
            return True
    return False


def _found(
    unit: _Unit, units: list[_Unit], direction: str, layer_types: Optional[Mapping[str, str]],
    spans: Spans, ref_only: Sequence[tuple[int, str]], previous: Optional[str],
) -> Divergence:
    """The divergence ``unit``, the first failing layer call, makes known."""
    found = _divergence(unit, direction, layer_types, previous)
    inside = [u for u in units if u.outs and _encloses(spans, unit.subject, u.subject)]
    if found.input_aligned is False:
        # the input was computed by code between recorded layers: the innermost enclosing
        # layer whose input aligns and whose output differs ran that code
        outer = [u for u in units if _encloses(spans, u.subject, unit.subject)]
        handed: Optional[tuple[str, KeyResult]] = None
        for enclosing in sorted(outer, key=lambda u: -spans[u.subject][0]):
            if _aligned(enclosing.ins):
                if _failing(enclosing.outs):
                    return _divergence(enclosing, direction, layer_types, previous, inner=found,
                                       handed=handed)
                break
            if handed is None and direction == "forward" and len(enclosing.ins) > 1 and \
                    any(r.passed for r in enclosing.ins):
                # the innermost block around it is handed one input already differing (a mask)
                handed = (enclosing.subject, next(r for r in enclosing.ins if not r.passed))
        if handed is not None:
            return replace(found, handed=handed)
    elif inside and found.input_aligned:
        span = spans.get(unit.subject)
        within = () if span is None else tuple(dict.fromkeys(
            s for p, s in ref_only if span[0] <= p <= span[1] and s != unit.subject))
        return _divergence(unit, direction, layer_types, previous, own_code=True,
                           unpaired_inside=within)
    return found


def _unpaired(result: DiffResult) -> Optional[Divergence]:
    """A kind ``"unpaired"`` divergence when most of the reference's layer calls have no
    counterpart (their keys are on one side only), else None."""
    ref_calls: dict[str, bool] = {}  # subject -> has a key on both sides
    other_calls: set[str] = set()
    one_sided: list[KeyResult] = []
    for r in result.results:
        parsed = parse_key(r.key)
        if parsed is None or parsed.is_param:
            continue
        if r.status in _ONE_SIDED:
            one_sided.append(r)
            if r.status == "extra":
                other_calls.add(parsed.subject)
                continue
        paired = r.status not in _ONE_SIDED
        ref_calls[parsed.subject] = ref_calls.get(parsed.subject, False) or paired
    paired = sum(ref_calls.values())
    # the port's calls inside a paired call are what the reference computes there as functions
    # (Paddle's attention calls its q, k, v and output Linears; torch's packs them): they leave
    # nothing unpaired
    both = [s + "." for s, on_both in ref_calls.items() if on_both]
    other_calls = {s for s in other_calls - set(ref_calls) if not s.startswith(tuple(both))}
    calls = max(len(ref_calls), paired + len(other_calls))
    if not one_sided or 2 * paired > calls:
        return None
    return Divergence(
        layer="",
        layer_type=None,
        input=None,
        output=one_sided[0],
        outputs=tuple(one_sided),
        kind="unpaired",
        paired=paired,
        calls=len(ref_calls) or calls,
        one_sided=len(one_sided),
    )


def _merge_folded(forward: dict[str, _Unit], result: DiffResult) -> None:
    """Join each layer call recorded with outputs only to the call just before it recorded
    with inputs only: what ``match_by_order`` leaves of two reference layers one port layer
    computes (a BatchNorm folded into its convolution), the first's input and the second's
    output. Judged as one call, its input is the first's, not "not recorded"."""
    at = {r.key: pos for pos, r in enumerate(result.results)}
    for unit in list(forward.values()):
        if unit.ins or not unit.outs or unit.start is None or unit.start == 0:
            continue
        parsed = parse_key(result.results[unit.start - 1].key)
        before = None if parsed is None else forward.get(parsed.subject)
        if before is None or before is unit or before.outs or not before.ins or \
                at.get(before.ins[-1].key) != unit.start - 1:
            continue
        unit.ins, unit.start, unit.folded = list(before.ins), before.start, before
        del forward[before.subject]


def first_divergence(
    result: DiffResult, *, layer_types: Optional[Mapping[str, str]] = None,
    carried: Optional[Callable[[Divergence], bool]] = None,
) -> Optional[Divergence]:
    """The first recorded layer whose output differs, forward pass first, then backward.

    ``result`` compares two captures made by ``reprod.capture.record`` (keys that are not capture
    keys are ignored). Forward: layers in call order, each judged by its outputs, reported with
    its inputs. When that layer's input already differs, code between recorded layers made it:
    the innermost enclosing layer (a container, recorded by default) whose input aligns and whose
    output differs is named, with the sublayer as ``inner``. Backward (when the forward pass
    aligns): layers in reverse call order, each judged by the gradients it sends on and its
    parameters' gradients, reported with the gradients it received. Keys that ``explain_kinks``
    labelled ``"kink"`` are not held against their layer (a layer whose outputs are all kink keys
    is skipped). ``layer_types`` maps layer names to class names
    (``reprod.capture.layer_types(model)``) for the message.

    Keys on one side only are skipped, but when most of the reference's layer calls did not pair
    by name the answer is a divergence of kind ``"unpaired"`` (pair them with
    ``reprod.capture.match_by_order``). ``None`` when every paired layer aligns.

    ``carried`` (forward only) tells whether the difference of a layer call whose input aligns
    and whose output differs is carried on by the data flowing from it. It is asked only where
    some layer called after it has aligned inputs; where it says no (the layers reading that
    output align again), the layer is passed over (``passed_over`` of the divergence found after
    it; where none is, the first one passed over is the answer). ``align_forward`` decides it by
    running the port once more with that output pushed off (``reprod.align.localise``); without
    it every layer whose input aligns and whose output differs is an answer.

    >>> result = reprod.compare(torch_log.data, paddle_log.data, method="max", threshold=1e-5)
    >>> div = first_divergence(result, layer_types=reprod.capture.layer_types(model))
    >>> print(div.message if div else "aligned")
    """
    unpaired = _unpaired(result)
    if unpaired is not None:
        return unpaired
    forward: dict[str, _Unit] = {}
    backward: dict[str, _Unit] = {}
    params: list[tuple[CaptureKey, KeyResult]] = []
    ref_only: list[tuple[int, str]] = []  # (position, layer call) of the reference's alone
    uneven = _uneven_calls(result)
    unmatched = unmatched_inputs(result.results)
    for pos, r in enumerate(result.results):
        parsed = parse_key(r.key)
        if parsed is not None and r.status == "missing" and not parsed.is_param:
            ref_only.append((pos, parsed.subject))
        if parsed is None or r.status in _ONE_SIDED:
            continue
        if not parsed.is_param and parsed.name in uneven:
            continue  # its calls, paired by number, are not the same calls
        if r.status == "kink" and parsed.what not in ("in", "grad_out"):
            continue  # explained by a kink crossing (explain_kinks): never blamed on its layer
        if parsed.is_param:
            params.append((parsed, r))
            continue
        table = forward if parsed.what in ("in", "out") else backward
        unit = table.get(parsed.subject)
        if unit is None:
            unit = table[parsed.subject] = _Unit(parsed.subject, parsed.name)
        if unit.start is None:
            unit.start = pos
        if parsed.what in ("in", "grad_out"):
            unit.ins.append(r)
        else:
            unit.outs.append(r)
            if unit.pos is None:
                unit.pos = pos

    for unit in forward.values():
        ins, forms = without_forms(tuple(unit.ins))
        unit.ins, unit.forms = list(ins), list(forms)
        unit.unmatched = unmatched.get(unit.subject, ((), ()))
    _merge_folded(forward, result)
    spans: Spans = {
        u.subject: (u.start, u.pos)
        for u in forward.values()
        if u.start is not None and u.pos is not None
    }
    # forward call order is the order in which layers finished: the order of their outputs
    end = len(result.results)
    order = sorted(forward.values(), key=lambda u: end if u.pos is None else u.pos)
    found = _walk(order, "forward", layer_types, spans, ref_only, carried)
    if found is not None:
        return found

    if forward:
        # reverse order of the calls' starts: a container's input gradient is complete after its
        # sublayers'; layers with no gradient recorded drop out in _walk
        starts = sorted(forward.values(), key=lambda u: end if u.start is None else u.start)
        rank = {u.subject: i for i, u in enumerate(reversed(starts))}
        bwd = sorted(backward.values(), key=lambda u: rank.get(u.subject, len(rank)))
    else:
        bwd = list(backward.values())  # gradient hooks fired in backward order already
    # a parameter's gradient is complete once its layer's first call has been differentiated,
    # which is that layer's last unit in backward order
    last_unit: dict[str, _Unit] = {}
    for unit in bwd:
        last_unit[unit.name] = unit
    for parsed, r in params:
        owner = parsed.name.rpartition(".")[0] or ROOT
        unit = last_unit.get(owner)
        if unit is None:
            unit = last_unit[owner] = _Unit(owner, owner)
            bwd.append(unit)
        unit.outs.append(r)
    return _walk(bwd, "backward", layer_types, spans)
