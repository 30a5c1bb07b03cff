"""Pairing weights by the order layers run, not the order they are defined.

``pair_weights_by_order`` pairs the n-th tensor of one state dict with the n-th of the other:
both frameworks list parameters in definition order. A port that defines two sibling layers in
another order than the reference (InceptionV4's branches; a hand-written port defining
``self.conv2`` before ``self.conv1``) pairs them crossed, and where their shapes agree nothing
says so: the port is loaded with the wrong weights, and its run fails at a place whose code is
right. The order the layers run in does not depend on where they are defined: given example
inputs, each model runs once, each leaf layer's first call is noted, and the tensors a leaf
holds are listed in the order of those calls. Tensors a container holds itself (a ViT's
``pos_embed``), and those of leaves the run never calls, keep their places: where they are
used is not seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Collection, Iterator, Mapping
from typing import Any, Callable, Optional

import numpy as np

__all__ = ["Crossing", "capture_calls", "crossed_hint", "crossing", "first_calls",
           "first_calls_of", "held_by_calls", "in_call_order", "noting_calls"]


def _leaves(model: Any) -> list[tuple[str, Any]]:
    if hasattr(model, "named_sublayers"):  # paddle
        return [(n, m) for n, m in model.named_sublayers() if not m.sublayers()]
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


@contextlib.contextmanager
def noting_calls(model: Any) -> Iterator[dict[str, int]]:
    """A dict filled, while the block runs, with leaf layer name -> the position of its first
    call among the leaves' first calls (forward pre-hooks, removed after, whatever happens)."""
    order: dict[str, int] = {}
    handles = []
    try:
        for name, layer in _leaves(model):
            def hook(_layer: Any, _args: Any, name: str = name) -> None:
                order.setdefault(name, len(order))
            handles.append(layer.register_forward_pre_hook(hook))
        yield order
    finally:
        for h in handles:
            h.remove()


def first_calls_of(model: Any, run: Callable[[], Any]) -> dict[str, int]:
    """Leaf layer name -> the position of its first call while ``run()`` runs ``model``."""
    with noting_calls(model) as order:
        run()
    return order


def first_calls(torch_model: Any, paddle_model: Any, inputs: Any
                ) -> tuple[dict[str, int], dict[str, int]]:
    """Each model's leaf layers in the order of their first calls, running once on ``inputs``
    (as ``align_forward`` takes them: one array, a tuple of positional arguments or a dict of
    keyword arguments), in eval mode and without gradients; the models' modes are restored."""
    import paddle
    import torch

    from ..errors import ReprodError
    from .framework import (
        _modes,
        _paddle_place,
        _split_inputs,
        _to_paddle,
        _to_torch,
        _torch_device,
    )
    from .rules import _is_torch_module

    if not _is_torch_module(torch_model) or not hasattr(paddle_model, "named_sublayers"):
        raise ReprodError("pairing by call order (inputs=) needs the two models themselves: a "
                          "torch model and a Paddle model, not state dicts or files")
    args, kwargs = _split_inputs(inputs)
    with _modes(torch_model, paddle_model, train=False):
        dev, place = _torch_device(torch_model), _paddle_place(paddle_model)
        targs, tkw = _to_torch(args, dev), _to_torch(kwargs, dev)
        pargs, pkw = _to_paddle(args, place), _to_paddle(kwargs, place)

        def run_torch() -> None:
            with torch.no_grad():
                torch_model(*targs, **tkw)

        def run_paddle() -> None:
            with paddle.no_grad():
                paddle_model(*pargs, **pkw)

        try:
            return first_calls_of(torch_model, run_torch), first_calls_of(paddle_model,
                                                                          run_paddle)
        except ReprodError:
            raise
        except Exception as exc:  # the model's own error: said as the pairing's, in one line
            raise ReprodError(f"pairing by call order: running the models on the inputs "
                              f"failed: {type(exc).__name__}: {exc}") from None


def in_call_order(keys: list[str], calls: Optional[Mapping[str, int]]) -> list[str]:
    """``keys`` (a state dict's, in definition order) with those of leaves ``calls`` saw run
    ordered by the leaf's first call, in the places such keys held; the rest stay where
    they are. A leaf's own tensors keep their order."""
    if not calls:
        return list(keys)
    at = [i for i, k in enumerate(keys) if k.rpartition(".")[0] in calls]
    moved = sorted((keys[i] for i in at), key=lambda k: calls[k.rpartition(".")[0]])
    out = list(keys)
    for i, k in zip(at, moved):
        out[i] = k
    return out


def capture_calls(capture: Mapping[str, Any], leaves: Collection[str]) -> dict[str, int]:
    """Leaf layer name -> the position of its first call, read from a layer capture's keys
    (recorded as the layers run): no second run."""
    from ..capture.naming import parse_key

    order: dict[str, int] = {}
    for key in capture:
        k = parse_key(key)
        if k is None or k.is_param:
            continue
        name = k.subject.partition("#")[0]
        if name in leaves:
            order.setdefault(name, len(order))
    return order


@dataclasses.dataclass(frozen=True)
class Crossing:
    """Where pairing the weights by definition order and by call order disagree.

    ``moved``: Paddle key -> (the torch key by definition order, the torch key by call order,
    whether the latter is transposed); ``held``: which of the two the port's weights hold
    (``"definition"``, ``"calls"``, or None where its values tell neither); ``rules``: the
    pairing by call order, as ``by_order_rules`` gives it."""

    moved: Mapping[str, tuple[str, str, bool]]
    held: Optional[str]
    rules: Any

    def layers(self) -> list[tuple[str, str, str]]:
        """(Paddle layer, torch layer by definition order, torch layer by call order), once
        each, in the port's order."""
        out = dict.fromkeys((pk.rpartition(".")[0], d.rpartition(".")[0], c.rpartition(".")[0])
                            for pk, (d, c, _) in self.moved.items())
        return list(out)

    def anchors(self) -> dict[str, str]:
        """Paddle layer -> torch layer, by call order, for the layers that moved."""
        return {p: c for p, _, c in self.layers()}


def _as_float(value: Any) -> Optional[np.ndarray]:
    try:
        if hasattr(value, "detach"):  # torch
            value = value.detach().float().cpu().numpy()
        elif hasattr(value, "astype") and hasattr(value, "place"):  # paddle
            value = value.astype("float32").numpy()
        return np.asarray(value, dtype=np.float32)
    except Exception:  # a tensor of a kind not read here: it tells nothing
        return None


def _plans(torch_model: Any, paddle_model: Any, rules: Any,
           calls: tuple[Mapping[str, int], Mapping[str, int]]) -> Optional[tuple[Any, Any]]:
    """(the pairing by definition order, None where refused; the pairing by call order), or
    None where the pairing by call order is refused."""
    from ..errors import ReprodError
    from .by_order import _order_plan

    try:
        by_calls = _order_plan(torch_model, paddle_model, rules, explain=False, calls=calls)
    except ReprodError:
        return None
    if by_calls.problems:
        return None
    try:
        by_def = _order_plan(torch_model, paddle_model, rules, explain=False)
    except ReprodError:
        by_def = None
    return (None if by_def is None or by_def.problems else by_def), by_calls


def _moved(by_def: Any, by_calls: Any) -> dict[str, tuple[Optional[str], bool, str, bool]]:
    """Paddle key -> (its torch key by definition order, None where that is refused, whether
    transposed; its torch key by call order, whether transposed), where the two differ."""
    first = {} if by_def is None else {pk: (tk, t) for tk, pk, t in by_def.pairs}
    return {pk: (*first.get(pk, (None, False)), tk, t) for tk, pk, t in by_calls.pairs
            if first.get(pk, (None,))[0] != tk}


def _held(moved: Mapping[str, tuple[Optional[str], bool, str, bool]], torch_model: Any,
          paddle_model: Any) -> Optional[str]:
    """Which pairing the port's weights hold, ``"definition"`` or ``"calls"``: the one every
    tensor that can tell (its two candidates differ) is held within 1 % of (a half-precision
    port's rounding too); None where they tell neither, or disagree."""
    tsd, psd = torch_model.state_dict(), paddle_model.state_dict()
    votes = set()
    for pk, (d, dt, c, ct) in moved.items():
        held = _as_float(psd[pk]) if pk in psd else None
        by_calls = _as_float(tsd[c]) if c in tsd else None
        if held is None or by_calls is None:
            continue
        by_calls = by_calls.T if ct and by_calls.ndim == 2 else by_calls
        by_def = _as_float(tsd[d]) if d is not None and d in tsd else None
        if by_def is not None:
            by_def = by_def.T if dt and by_def.ndim == 2 else by_def
            if by_def.shape == by_calls.shape and np.array_equal(by_def, by_calls):
                continue  # the two candidates are alike: this tensor tells nothing
        near_c = by_calls.shape == held.shape and np.allclose(held, by_calls, rtol=1e-2,
                                                              atol=1e-5)
        near_d = by_def is not None and by_def.shape == held.shape and \
            np.allclose(held, by_def, rtol=1e-2, atol=1e-5)
        votes.add("neither" if near_c == near_d else "calls" if near_c else "definition")
    return next(iter(votes)) if len(votes) == 1 and "neither" not in votes else None


def held_by_calls(torch_model: Any, paddle_model: Any, rules: Any,
                  calls: tuple[Mapping[str, int], Mapping[str, int]]) -> Any:
    """The pairing by call order (``calls``: each side's leaves' first calls) as
    ``ConversionRules``, where it differs from the pairing by definition order (or that is
    refused) and the port's weights hold it: a port loaded with ``inputs=``, whose layers the
    settings check and the localisation must then pair so too (by definition order a faithful
    port's crossed siblings of other dilations failed invented settings). None otherwise."""
    from .by_order import _rules_from_order

    if not calls[0] or not calls[1]:
        return None
    plans = _plans(torch_model, paddle_model, rules, calls)
    if plans is None:
        return None
    moved = _moved(*plans)
    if not moved or _held(moved, torch_model, paddle_model) != "calls":
        return None
    return _rules_from_order(plans[1], rules)


def crossing(torch_model: Any, paddle_model: Any, rules: Any, ref: Mapping[str, Any],
             port: Mapping[str, Any]) -> Optional[Crossing]:
    """The weights' pairings by definition order and by call order (read from the two models'
    layer captures ``ref`` and ``port``), where they differ and both pair every tensor; with
    which of them the port's weights hold (``_held``)."""
    from .by_order import _rules_from_order

    calls = (capture_calls(ref, {n for n, _ in _leaves(torch_model)}),
             capture_calls(port, {n for n, _ in _leaves(paddle_model)}))
    plans = _plans(torch_model, paddle_model, rules, calls)
    if plans is None or plans[0] is None:
        return None
    moved = _moved(*plans)
    if not moved:
        return None
    return Crossing({pk: (d, c, ct) for pk, (d, _, c, ct) in moved.items() if d is not None},
                    _held(moved, torch_model, paddle_model), _rules_from_order(plans[1], rules))


def crossed_hint(found: Crossing, torch_model: Any, paddle_model: Any,
                 aligns: Callable[[], bool]) -> Optional[str]:
    """Where the port's weights hold the pairing by definition order and its run fails: the
    port loaded by call order instead (only the tensors that move), ``aligns`` judging it
    (the port's weights are restored after, whatever happens); a hint saying so where it
    aligns, else None."""
    from ..errors import ReprodError
    from .conversion import convert

    if found.held != "definition":
        return None
    try:
        weights = convert(torch_model, model=torch_model, rules=found.rules, copy=False).weights
    except ReprodError:
        return None
    psd = paddle_model.state_dict()
    keys = [pk for pk in found.moved if pk in weights and pk in psd]
    if not keys:
        return None
    import paddle

    saved = {pk: psd[pk].clone() for pk in keys}
    try:
        for pk in keys:  # in the port's dtype: a half-precision port's weights too
            psd[pk].set_value(paddle.to_tensor(np.asarray(weights[pk]), place=psd[pk].place)
                              .astype(psd[pk].dtype))
        if not aligns():
            return None
    finally:
        for pk, value in saved.items():
            psd[pk].set_value(value)
    said = [f"the port's {p} took {d}'s weights where it runs as {c}"
            for p, d, c in found.layers()[:3]]
    more = len(found.layers()) - len(said)
    return ("not the port's code but the pairing of its weights by definition order: "
            + "; ".join(said) + (f" (and {more} more)" if more > 0 else "")
            + " (the port defines them in another order than the reference); loaded by the "
            "order the layers run, every other layer aligns: load_into_paddle(paddle_model, "
            "torch_model, by_order=True, inputs=<the inputs>)")
