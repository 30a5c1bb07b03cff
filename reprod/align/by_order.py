"""Pairing a torch state dict with a Paddle one by definition order, for ports whose names no
rule maps (``features.0`` against ``stem.conv``): the pairs, checked by shape and kind, and the
``ConversionRules`` that carry them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import KeyMismatchError, ReprodError
from ..storage.framework_files import read_pdparams, read_torch_state_dict
from .rules import (
    _DEFAULT_RULES,
    _DROPPED,
    ConversionRules,
    _is_torch_module,
    guess_linear_weight,
    linear_weight_names,
    split_attention,
    unaliased,
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


def _torch_shapes(obj: Any) -> tuple[dict[str, tuple[int, ...]], Optional[set[str]], str]:
    """(name -> shape in state-dict order, Linear weight names or None, a label for messages)."""
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
    sd, packed = split_attention(sd)  # as Paddle's MultiHeadAttention lists them
    if linear is not None:
        linear = linear | {k for k in packed if k.endswith("weight")}
    return {k: tuple(int(s) for s in np.shape(v)) for k, v in sd.items()}, linear, label


def _paddle_shapes(obj: Any) -> tuple[dict[str, tuple[int, ...]], str]:
    if isinstance(obj, (str, os.PathLike)):
        label = os.fspath(obj)
        sd: Mapping[str, Any] = read_pdparams(label)
    elif isinstance(obj, Mapping):
        sd, label = obj, "paddle state dict"
    elif hasattr(obj, "state_dict"):
        sd, label = unaliased(obj.state_dict())[0], f"paddle {type(obj).__name__}"
    else:
        raise ReprodError(
            f"cannot pair a {type(obj).__name__}: expected a Paddle model, state dict or "
            ".pdparams path"
        )
    # paddle tensors report their shape as a list; numpy's np.shape would copy them
    return {
        k: tuple(int(s) for s in getattr(v, "shape", np.shape(v))) for k, v in sd.items()
    }, label


@dataclass(frozen=True)
class _OrderPlan:
    """Positional pairs ``(torch key, paddle key, transpose)`` for every position both sides have,
    and the problems found: ``(torch key or None, text)``, one per position; ``wrong_kind`` holds
    the torch keys paired with a tensor of another kind (a BatchNorm statistic with a weight)."""

    pairs: tuple[tuple[str, str, bool], ...]
    problems: tuple[tuple[Optional[str], str], ...]
    header: str
    wrong_kind: frozenset[str] = frozenset()

    def raise_problems(self) -> None:
        if self.problems:
            # two different architectures disagree at hundreds of positions: the first few say
            # where the orders part, and a line of them all would bury it
            shown = self.problems[:_LISTED]
            listed = "; ".join(text for _, text in shown)
            more = len(self.problems) - len(shown)
            if more:
                listed += (f"; ... and {more} more position{'s' if more != 1 else ''} (all of "
                           "them: print(compare_structure(torch_model, paddle_model, "
                           "by_order=True).to_table()))")
            raise KeyMismatchError(f"pairing by order failed: {self.header}: {listed}")


_LISTED = 8  # the positions a pairing error lists


def _order_plan(torch_side: Any, paddle_side: Any, rules: Optional[ConversionRules]) -> _OrderPlan:
    rules = rules or _DEFAULT_RULES
    tshapes, linear, tlabel = _torch_shapes(torch_side)
    pshapes, plabel = _paddle_shapes(paddle_side)
    torch_keys = [k for k in tshapes if not _DROPPED.search(k) and rules.skip_pattern(k) is None]
    paddle_keys = list(pshapes)
    pairs: list[tuple[str, str, bool]] = []
    problems: list[tuple[Optional[str], str]] = []
    wrong_kind: set[str] = set()
    for i, (tk, pk) in enumerate(zip(torch_keys, paddle_keys)):
        ts, ps = tshapes[tk], pshapes[pk]
        if ts == ps and len(ts) == 2 and ts[0] == ts[1]:
            # a square weight's layout cannot be read from shapes: ask the model, else the heuristic
            transpose = tk in linear if linear is not None else guess_linear_weight(tk, ts)
        elif ts == ps:
            transpose = False
        elif len(ts) == 2 and ts[::-1] == ps:
            transpose = True
        else:
            problems.append((tk, f"#{i} {tk} {list(ts)} vs {pk} {list(ps)}"))
            pairs.append((tk, pk, False))
            continue
        if _stat_kind(tk, _TORCH_STAT) != _stat_kind(pk, _PADDLE_STAT):
            wrong_kind.add(tk)
            problems.append(
                (tk, f"#{i} {tk} vs {pk}: a BatchNorm statistic paired with another kind of tensor")
            )
        pairs.append((tk, pk, transpose))
    n = len(pairs)
    problems += [
        (k, f"#{n + j} {k} {list(tshapes[k])} vs nothing") for j, k in enumerate(torch_keys[n:])
    ]
    problems += [
        (None, f"#{n + j} nothing vs {k} {list(pshapes[k])}") for j, k in enumerate(paddle_keys[n:])
    ]
    header = f"{tlabel} ({len(torch_keys)} tensors) vs {plabel} ({len(paddle_keys)} tensors)"
    return _OrderPlan(tuple(pairs), tuple(problems), header, frozenset(wrong_kind))


def pair_weights_by_order(
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None
) -> dict[str, str]:
    """Pair torch keys with Paddle keys by definition order, for ports whose names no rule maps
    (``features.0`` against ``stem.conv``). Both frameworks list parameters in definition order,
    BatchNorm statistics included (``running_mean``/``running_var`` against ``_mean``/``_variance``),
    so the n-th tensor on one side is the n-th on the other when the port defines its layers in the
    same order.

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
    plan = _order_plan(torch_side, paddle_side, rules)
    plan.raise_problems()
    return {tk: pk for tk, pk, _ in plan.pairs}


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
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None
) -> ConversionRules:
    """``pair_weights_by_order``'s pairs as ``ConversionRules``, with each 2-D tensor's transpose
    decided by the two shapes (a square one by the torch model's ``nn.Linear`` layers, or the name
    heuristic). ``rules`` (skips, extra transposes) are kept. Raises like ``pair_weights_by_order``.

    >>> rules = by_order_rules(torch_model, paddle_model)
    >>> paddle_model.set_state_dict(torch_to_paddle(torch_model, rules=rules))
    """
    plan = _order_plan(torch_side, paddle_side, rules)
    plan.raise_problems()
    return _rules_from_order(plan, rules)
