"""Side-by-side check that a Paddle port has the torch model's parameters: names, shapes, counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ReprodError
from ..messages import fmt_shape
from .by_order import _order_plan, _rules_from_order
from .call_order import first_calls
from .fusion import find_fusions, model_splits
from .rules import (
    ConversionRules,
    KeyPlan,
    active_splits,
    integer_keys,
    kernel_against_matrix,
    linear_weight_names,
    packed_linear_weights,
    plan_conversion,
    port_constants,
    port_splitting,
    split_attention,
    torch_aliases,
    torch_constants,
    unaliased,
    unit_axes_apart,
)

__all__ = ["StructureRow", "LayerCount", "StructureReport", "compare_structure"]

_NO_RULES = ConversionRules()

# statuses that do not keep the weights from loading ("order": paired by order with a tensor of
# another kind, e.g. a BatchNorm statistic with a weight, is a problem)
_FINE = ("ok", "transposed", "skipped", "dropped", "own", "fused", "split")


@dataclass(frozen=True)
class StructureRow:
    """One tensor, seen from both sides after the conversion rules.

    ``status``: ok, transposed (a Linear weight, converted on load), shape, missing (torch has it,
    the Paddle model does not), extra (only the Paddle model has it), skipped (a user rule),
    dropped (no Paddle counterpart, e.g. ``num_batches_tracked``), order (``by_order=True`` paired a
    BatchNorm statistic with another kind of tensor), own (one side alone has it, and it is that
    model's constant, not a weight: an integer or bool tensor, PaddleNLP's ``position_ids``, or a
    buffer, PaddleNLP GPT-J's causal mask; loading leaves it alone and the counts leave it out),
    fused (one of the reference's tensors that a port tensor holds with others, its note saying
    which and how: PaddleNLP's ``qkv_proj`` for ``q_proj``, ``k_proj``, ``v_proj``; see
    ``reprod.align.fusion``), split (the reverse: a port tensor that one of the reference's
    holds with others, Phi-3's ``qkv_proj`` against a port's ``q_proj``..., one row a part, the
    reference's whole tensor on its side).
    With ``by_order=True`` the note of a pair whose
    names differ starts with ``paired by order``. ``trainable`` is False for
    statistics: torch buffers and Paddle's ``stop_gradient`` parameters (BatchNorm ``_mean``/``_variance``).
    """

    paddle_name: Optional[str]
    torch_name: Optional[str]
    torch_shape: Optional[tuple[int, ...]]
    paddle_shape: Optional[tuple[int, ...]]
    status: str
    note: str
    trainable: bool

    @property
    def ok(self) -> bool:
        return self.status in _FINE


@dataclass(frozen=True)
class LayerCount:
    """Number of values per layer (the Paddle name without its last segment) on each side."""

    layer: str
    torch_count: int
    paddle_count: int

    @property
    def ok(self) -> bool:
        return self.torch_count == self.paddle_count


@dataclass(frozen=True)
class StructureReport:
    """The result of ``compare_structure``.

    Counts include statistics on both sides (torch buffers, Paddle's BatchNorm ``_mean``/``_variance``
    parameters) and leave out what has no Paddle counterpart (``num_batches_tracked``) or what a
    rule skips, so that a faithful port has equal totals.
    """

    rows: tuple[StructureRow, ...]
    layers: tuple[LayerCount, ...]
    torch_total: int
    paddle_total: int
    torch_trainable: int
    paddle_trainable: int

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and self.torch_total == self.paddle_total

    @property
    def problems(self) -> list[StructureRow]:
        return [r for r in self.rows if not r.ok]

    def rows_with(self, status: str) -> list[StructureRow]:
        return [r for r in self.rows if r.status == status]

    def summary_line(self) -> str:
        counts = (
            f"values: torch {self.torch_total:,} ({self.torch_trainable:,} trainable), "
            f"paddle {self.paddle_total:,} ({self.paddle_trainable:,} trainable)"
        )
        fused = self.rows_with("fused")
        joined = (f", {len(fused)} fused into {len({r.paddle_name for r in fused})}"
                  if fused else "")
        split = self.rows_with("split")
        joined += (f", {len({r.torch_name for r in split})} split into {len(split)}"
                   if split else "")
        if self.ok:
            return (
                f"structure matches: {len(self.rows_with('ok')) + len(self.rows_with('transposed'))} "
                f"tensors, {len(self.rows_with('transposed'))} transposed on conversion{joined}; "
                f"{counts}"
            )
        parts = [
            f"{len(self.rows_with(s))} {s}"
            for s in ("missing", "extra", "shape", "order")
            if self.rows_with(s)
        ]
        hint = ""
        if self.rows_with("missing") and len(self.rows_with("missing")) == len(self.rows_with("extra")) \
                and self.torch_total == self.paddle_total:
            # every name fails to pair but the totals agree: the port names its layers differently
            hint = "; names do not pair but the totals match: try compare_structure(..., by_order=True)"
        return f"structure differs: {', '.join(parts) or 'counts differ'}; {counts}{hint}"

    def to_table(self, *, only_problems: bool = False, layers: bool = False) -> str:
        """A text table (tabulate) of the rows, then the totals; ``layers=True`` adds per-layer counts.

        >>> print(compare_structure(torch_model, paddle_model).to_table(only_problems=True))
        """
        from tabulate import tabulate

        rows = self.problems if only_problems else list(self.rows)
        body = [
            [
                r.paddle_name or "-",
                r.torch_name or "-",
                fmt_shape(r.torch_shape),
                fmt_shape(r.paddle_shape),
                r.note or r.status,
            ]
            for r in rows
        ]
        out = tabulate(
            body, headers=["paddle name", "torch name", "torch shape", "paddle shape", "status"]
        )
        if layers:
            lbody = [
                [
                    lc.layer,
                    f"{lc.torch_count:,}",
                    f"{lc.paddle_count:,}",
                    "" if lc.ok else "differs",
                ]
                for lc in self.layers
            ]
            out += "\n\n" + tabulate(lbody, headers=["layer", "torch values", "paddle values", ""])
        return out + "\n\n" + self.summary_line()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else "(root)"


def compare_structure(
    torch_model: Any,
    paddle_model: Any,
    *,
    rules: Optional[ConversionRules] = None,
    by_order: bool = False,
    inputs: Any = None,
) -> StructureReport:
    """Put the torch model's state dict, converted by the same rules as ``torch_to_paddle``, beside
    the Paddle model's: what is missing, extra or shaped differently, and the value counts per layer.

    ``by_order=True`` pairs tensors by definition order instead of by name (see
    ``pair_weights_by_order``) and shows each pair, including those whose shapes disagree, rather
    than raising; with ``inputs`` (example inputs), by the order the layers run on them
    (``reprod.align.call_order``), as ``load_into_paddle(..., by_order=True, inputs=x)`` loads.

    >>> report = compare_structure(torch_model, paddle_model)
    >>> report.ok, print(report.to_table(only_problems=True))
    >>> print(compare_structure(torch_model, renamed_port, by_order=True).to_table())
    """
    wrong_kind: set[str] = set()
    if inputs is not None and not by_order:
        raise ReprodError("compare_structure: inputs= pairs by call order, with by_order=True")
    if by_order:
        order = _order_plan(torch_model, paddle_model, rules, calls=None if inputs is None
                            else first_calls(torch_model, paddle_model, inputs))
        wrong_kind = set(order.wrong_kind)
        rules = _rules_from_order(order, rules)
    whole_sd = torch_model.state_dict()
    # a reference tensor holding several the port keeps apart: a row for each part
    # those in effect where a comparison runs (whose rules pair the parts already, by order)
    splits = active_splits() or model_splits(torch_model, paddle_model, rules)
    with port_splitting(splits):
        torch_sd, packed = split_attention(whole_sd)
        linear = linear_weight_names(torch_model) | packed_linear_weights(whole_sd)
    split_of = {part: s for s in splits for part in s.torch_parts}
    trainable_torch = {n for n, p in torch_model.named_parameters() if p.requires_grad}
    trainable_torch |= {k for k, src in packed.items() if src in trainable_torch}
    plan = plan_conversion(
        {k: tuple(v.shape) for k, v in torch_sd.items()}, linear_weights=linear, rules=rules)
    # a tied weight's second name (T5's encoder.embed_tokens.weight): Paddle's state dict is
    # read once per tensor too, and its alias loads through the first name
    tied = torch_aliases(whole_sd)
    plan = tuple(KeyPlan(p.torch_name, None, "drop", f"tied to {tied[p.torch_name]}",
                         p.torch_shape) if p.torch_name in tied else p for p in plan)
    paddle_sd = unaliased(paddle_model.state_dict())[0]  # an RNN's weights, once each
    paddle_shapes = {k: tuple(int(s) for s in v.shape) for k, v in paddle_sd.items()}
    paddle_trainable = {k for k, v in paddle_sd.items() if not getattr(v, "stop_gradient", True)}

    rows: list[StructureRow] = []
    counts: dict[str, list[int]] = {}
    # the reference's constants the port does not hold (it computes them): not weights
    torch_own = {p.torch_name for p in plan if p.paddle_name is not None
                 and p.paddle_name not in paddle_shapes} & torch_constants(torch_model)
    fused = {part: f for f in find_fusions(
        {p.paddle_name: p.paddle_shape for p in plan if p.paddle_name is not None
         and p.paddle_shape is not None and p.torch_name not in torch_own},
        paddle_shapes, rules) for part in f.parts}
    for p in plan:
        trainable = p.torch_name in trainable_torch
        if p.torch_name in torch_own:
            rows.append(StructureRow(None, p.torch_name, p.torch_shape, None, "own",
                                     "own: the reference's constant, not in the port", False))
            continue
        if p.paddle_name is None:
            status = "skipped" if p.action == "skip" else "dropped"
            rows.append(
                StructureRow(
                    None, p.torch_name, p.torch_shape, None, status, f"{status}: {p.why}", trainable
                )
            )
            continue
        if p.paddle_name in fused and p.torch_name not in wrong_kind:
            f = fused[p.paddle_name]
            counts.setdefault(_layer(f.port_key), [0, 0])[0] += _numel(p.torch_shape)
            rows.append(StructureRow(f.port_key, p.torch_name, p.torch_shape,
                                     paddle_shapes[f.port_key], "fused",
                                     f"fused: {f.why(p.paddle_name)}"
                                     + ("; transposed" if p.action == "transpose" else ""),
                                     trainable))
            continue
        if p.torch_name in split_of and paddle_shapes.get(p.paddle_name) == p.paddle_shape:
            sp = split_of[p.torch_name]
            counts.setdefault(_layer(p.paddle_name), [0, 0])[0] += _numel(p.torch_shape)
            rows.append(StructureRow(p.paddle_name, sp.torch_key, tuple(whole_sd[sp.torch_key].shape),
                                     p.paddle_shape, "split",
                                     f"split: {sp.share(p.paddle_name)}"
                                     + ("; transposed" if p.action == "transpose" else ""),
                                     trainable))
            continue
        counts.setdefault(_layer(p.paddle_name), [0, 0])[0] += _numel(p.torch_shape)
        want = paddle_shapes.get(p.paddle_name)
        converted = p.paddle_shape
        if p.torch_name in wrong_kind:
            status, note = "order", "order: a BatchNorm statistic paired with another kind"
        elif want is None:
            status, note = "missing", "missing in paddle"
        elif converted == want:
            status, note = (
                ("transposed", "transposed: will be converted")
                if p.action == "transpose"
                else ("ok", "")
            )
        elif converted is not None and kernel_against_matrix(converted, want):
            status, note = "ok", (f"reshaped and transposed on load: {fmt_shape(converted)} "
                                  f"to {fmt_shape(want)} (a 1x1 convolution's kernel against a "
                                  "Linear's weight)")
        elif converted is not None and unit_axes_apart(converted, want):
            status, note = "ok", f"reshaped on load: {fmt_shape(converted)} to {fmt_shape(want)}"
        elif converted is not None and len(want) == 2 and tuple(reversed(converted)) == want:
            status = "shape"
            note = (
                "shape: paddle wants the torch layout (not a Linear in paddle? add a no-transpose rule)"
                if p.action == "transpose"
                else "shape: paddle wants the transpose (add a transpose rule)"
            )
        else:
            status, note = (
                "shape",
                f"shape: converted {fmt_shape(converted)} vs paddle {fmt_shape(want)}",
            )
        if by_order and p.paddle_name != p.torch_name:
            note = "paired by order" + (f"; {note}" if note else "")
        rows.append(
            StructureRow(p.paddle_name, p.torch_name, p.torch_shape, want, status, note, trainable)
        )
    converted_names = {p.paddle_name for p in plan if p.paddle_name is not None}
    converted_names |= {f.port_key for f in fused.values()}
    own = port_constants(paddle_sd, {name for name, _ in paddle_model.named_buffers()}
                         if hasattr(paddle_model, "named_buffers") else None)
    own = own - paddle_trainable - converted_names
    port_only = {name: pat for name in paddle_shapes if name not in converted_names and
                 (pat := (rules or _NO_RULES).port_only_pattern(name)) is not None}
    for name, shape in paddle_shapes.items():
        if name in port_only:
            rows.append(StructureRow(name, None, None, shape, "own",
                                     f"own: only the port has it (port_only {port_only[name]!r}), "
                                     "kept on load", name in paddle_trainable))
            continue
        if name in own:
            kind = "integer" if name in integer_keys(paddle_sd) else "a buffer"
            rows.append(StructureRow(name, None, None, shape, "own",
                                     f"own: the port's constant ({kind}), kept on load", False))
            continue
        counts.setdefault(_layer(name), [0, 0])[1] += _numel(shape)
        if name not in converted_names:
            rows.append(
                StructureRow(
                    name,
                    None,
                    None,
                    shape,
                    "extra",
                    "extra: only in paddle",
                    name in paddle_trainable,
                )
            )
    torch_total = sum(_numel(p.torch_shape) for p in plan
                      if p.paddle_name is not None and p.torch_name not in torch_own)
    return StructureReport(
        rows=tuple(rows),
        layers=tuple(LayerCount(k, v[0], v[1]) for k, v in counts.items()),
        torch_total=torch_total,
        paddle_total=sum(_numel(s) for k, s in paddle_shapes.items()
                         if k not in own and k not in port_only),
        torch_trainable=sum(
            _numel(p.torch_shape)
            for p in plan
            if p.paddle_name is not None and p.torch_name in trainable_torch
        ),
        paddle_trainable=sum(_numel(paddle_shapes[k]) for k in paddle_trainable
                             if k not in port_only),
    )
