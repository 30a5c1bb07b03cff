"""The first divergence: in call order, the first recorded layer whose output fails, and whether
its input was already different (then the cause lies before it, outside the recorded layers)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

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
    """

    layer: str
    layer_type: Optional[str]
    input: Optional[KeyResult]
    output: KeyResult
    inputs: tuple[KeyResult, ...] = ()
    outputs: tuple[KeyResult, ...] = ()
    direction: str = "forward"
    previous: Optional[str] = None

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
        backward = self.direction == "backward"
        where = self.layer + (f" ({self.layer_type})" if self.layer_type else "")
        head = "backward diverges" if backward else "diverges"
        inp = "incoming gradient" if backward else "input"
        out = f"{_describe_output(self.output, backward, len(self.outputs) > 1)}"
        if self.input_aligned is None:
            return f"{head} at {where}: {inp} not recorded, {out}"
        if self.input_aligned:
            worst = _max_abs(self.inputs)
            return f"{head} at {where}: {inp} aligned (max {fmt_num(worst)}), {out}"
        assert self.input is not None
        diff = _describe(self.input)
        if self.previous is None:
            cause = f"the {inp} of the first recorded layer already differs ({diff})"
        else:
            cause = (
                f"{inp} already differs ({diff}) although {self.previous} aligns, so the cause "
                f"lies between the two, outside the recorded layers"
            )
        return f"{head} before {where}: {cause}; {out}"


def _max_abs(results: tuple[KeyResult, ...]) -> Optional[float]:
    values = [r.max_abs for r in results if r.max_abs is not None]
    return max(values) if values else None


def _describe(r: KeyResult) -> str:
    if r.status in ("failed", "mismatch") and r.max_abs is not None:
        return f"max diff {fmt_num(r.max_abs)}"
    return r.reason or r.status


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
    __slots__ = ("subject", "name", "ins", "outs", "pos")

    def __init__(self, subject: str, name: str) -> None:
        self.subject = subject
        self.name = name
        self.pos: Optional[int] = None  # position of the first output key: when the call ended
        self.ins: list[KeyResult] = []
        self.outs: list[KeyResult] = []


def _walk(
    units: list[_Unit], direction: str, layer_types: Optional[Mapping[str, str]]
) -> Optional[Divergence]:
    previous: Optional[str] = None
    for unit in units:
        if not unit.outs:
            continue
        if any(not r.passed for r in unit.outs):
            ins, outs = tuple(unit.ins), tuple(unit.outs)
            output = _representative(outs)
            assert output is not None
            return Divergence(
                layer=unit.subject,
                layer_type=None if layer_types is None else layer_types.get(unit.name),
                input=_representative(ins),
                output=output,
                inputs=ins,
                outputs=outs,
                direction=direction,
                previous=previous,
            )
        previous = unit.subject
    return None


def first_divergence(
    result: DiffResult, *, layer_types: Optional[Mapping[str, str]] = None
) -> Optional[Divergence]:
    """The first recorded layer whose output differs, forward pass first, then backward.

    ``result`` compares two captures made by ``reprod.capture.record`` (keys that are not capture
    keys, and keys present on one side only, are ignored). Forward: layers in call order, each
    judged by its outputs, reported with its inputs. Backward (when the forward pass aligns):
    layers in reverse call order, each judged by the gradients it sends on and its parameters'
    gradients, reported with the gradients it received. Keys that ``explain_kinks`` labelled
    ``"kink"`` are not held against their layer (a layer whose outputs are all kink keys is
    skipped). ``layer_types`` maps layer names to class
    names (``reprod.capture.layer_types(model)``) for the message. ``None`` when every recorded
    layer aligns.

    >>> result = reprod.compare(torch_log.data, paddle_log.data, method="max", threshold=1e-5)
    >>> div = first_divergence(result, layer_types=reprod.capture.layer_types(model))
    >>> print(div.message if div else "aligned")
    """
    forward: dict[str, _Unit] = {}
    backward: dict[str, _Unit] = {}
    params: list[tuple[CaptureKey, KeyResult]] = []
    for pos, r in enumerate(result.results):
        parsed = parse_key(r.key)
        if parsed is None or r.status in _ONE_SIDED:
            continue
        if r.status == "kink" and parsed.what not in ("in", "grad_out"):
            continue  # explained by a kink crossing (explain_kinks): never blamed on its layer
        if parsed.is_param:
            params.append((parsed, r))
            continue
        table = forward if parsed.what in ("in", "out") else backward
        unit = table.get(parsed.subject)
        if unit is None:
            unit = table[parsed.subject] = _Unit(parsed.subject, parsed.name)
        if parsed.what in ("in", "grad_out"):
            unit.ins.append(r)
        else:
            unit.outs.append(r)
            if unit.pos is None:
                unit.pos = pos

    # forward call order is the order in which layers finished: the order of their outputs
    order = sorted(forward.values(), key=lambda u: len(result.results) if u.pos is None else u.pos)
    found = _walk(order, "forward", layer_types)
    if found is not None:
        return found

    if forward:
        # reverse call order; layers with no gradient recorded drop out in _walk
        rank = {u.subject: i for i, u in enumerate(reversed(order))}
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
    return _walk(bwd, "backward", layer_types)
