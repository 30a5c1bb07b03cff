"""Isolated per-layer replay: feed each port layer the reference's recorded input, compare outputs.

A plain comparison of two forward captures shows the first layer that differs; everything after
it sees different inputs, so a second bug further on is hidden (or faked) by accumulated error.
``replay`` runs every layer of the port alone on exactly what the reference layer received, so
each broken layer is found on its own, several in one run. torch and paddle are imported only
for the port's own framework, inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np

from .. import messages as msg
from ..diff.result import DiffResult, KeyResult
from .naming import ROOT, Rules, _compile_rules, holders, layer_key, parse_key
from .recorder import Patterns, _outputs, _patterns, _selected

__all__ = ["replay"]

# how many reference layers ``by_order`` looks past the next unpaired one for a layer that fits
_LOOKAHEAD = 8
# how many reference layers before the last pair a search starts (siblings called the other way
# round)
_LOOKBACK = 2


class _Call:
    """One recorded reference layer call: its tensor inputs and output keys, in key order."""

    __slots__ = ("name", "call", "ins", "outs", "shapes")

    def __init__(self, name: str, call: int) -> None:
        self.name = name
        self.call = call
        self.ins: list[tuple[tuple[str, ...], np.ndarray]] = []
        self.outs: list[tuple[str, tuple[str, ...]]] = []  # (key, items)
        self.shapes: dict[tuple[str, ...], tuple[int, ...]] = {}  # output items -> shape


def _reference_tree(reference: Any) -> Mapping[str, Any]:
    from ..logger import ReprodLogger

    if isinstance(reference, ReprodLogger):
        return reference.data
    from ..diff.pairing import open_side

    return open_side(reference, "reference").tree


def _reference_calls(tree: Mapping[str, Any]) -> dict[str, list[_Call]]:
    """Layer name -> its calls in call order (only layers with a recorded output)."""
    calls: dict[tuple[str, int], _Call] = {}
    for key in tree:
        parsed = parse_key(key)
        if parsed is None or parsed.what not in ("in", "out"):
            continue
        c = calls.get((parsed.name, parsed.call))
        if c is None:
            c = calls[(parsed.name, parsed.call)] = _Call(parsed.name, parsed.call)
        if parsed.what == "in":
            c.ins.append((parsed.items, np.asarray(tree[key])))
        else:
            c.outs.append((key, parsed.items))
            c.shapes[parsed.items] = tuple(int(d) for d in np.shape(tree[key]))
    by_name: dict[str, list[_Call]] = {}
    for c in calls.values():
        if c.outs:
            by_name.setdefault(c.name, []).append(c)
    for lst in by_name.values():
        lst.sort(key=lambda c: c.call)
    return by_name


# --- the port's framework ----------------------------------------------------------------------


class _Torch:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.model_tensor: dict[int, Any] = {}  # model -> its first floating tensor

    def no_grad(self) -> Any:
        return self.torch.no_grad()

    def _ref_tensor(self, layer: Any, model: Any) -> Any:
        return _first_floating(self, layer, model, lambda t: t.is_floating_point())

    def tensor(self, arr: np.ndarray, like: Any) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(arr).copy())
        if like is None:
            return t
        if t.is_floating_point():
            return t.to(device=like.device, dtype=like.dtype)
        return t.to(device=like.device)

    def snapshot(self, layer: Any) -> Any:
        return {k: v.detach().clone() for k, v in layer.state_dict().items()}

    def restore(self, layer: Any, state: Any) -> None:
        layer.load_state_dict(state)

    def has_state(self, layer: Any) -> bool:
        return next(iter(layer.buffers()), None) is not None

    def own_tensors(self, layer: Any) -> int:
        return sum(1 for _ in layer.parameters(recurse=False)) + sum(
            1 for _ in layer.buffers(recurse=False))


class _Paddle:
    def __init__(self) -> None:
        import paddle

        self.paddle = paddle
        self.model_tensor: dict[int, Any] = {}  # model -> its first floating tensor

    def no_grad(self) -> Any:
        return self.paddle.no_grad()

    def _ref_tensor(self, layer: Any, model: Any) -> Any:
        kinds = (self.paddle.float16, self.paddle.bfloat16, self.paddle.float32,
                 self.paddle.float64)
        return _first_floating(self, layer, model, lambda t: t.dtype in kinds)

    def tensor(self, arr: np.ndarray, like: Any) -> Any:
        arr = np.ascontiguousarray(arr).copy()
        if like is None:
            return self.paddle.to_tensor(arr)
        t = self.paddle.to_tensor(arr, place=like.place)
        if np.issubdtype(arr.dtype, np.floating) and t.dtype != like.dtype:
            t = t.astype(like.dtype)
        return t

    def snapshot(self, layer: Any) -> Any:
        return {k: v.clone() for k, v in layer.state_dict().items()}

    def restore(self, layer: Any, state: Any) -> None:
        layer.set_state_dict(state)

    def has_state(self, layer: Any) -> bool:
        return next(iter(layer.buffers()), None) is not None or any(
            p.stop_gradient for p in layer.parameters(include_sublayers=True)
        )

    def own_tensors(self, layer: Any) -> int:
        return len(layer.parameters(include_sublayers=False)) + len(
            layer.buffers(include_sublayers=False))


def _first_floating(fw: Any, layer: Any, model: Any, floating: Callable[[Any], bool]) -> Any:
    """The first floating tensor ``layer`` holds, else the first ``model`` holds (its dtype and
    device are the replay's): the model's found once per replay, not once per layer without
    weights (mobilenet's 404 replays walked all its tensors for each activation, 0.2 s)."""
    for t in list(layer.parameters()) + list(layer.buffers()):
        if floating(t):
            return t
    if id(model) not in fw.model_tensor:
        fw.model_tensor[id(model)] = next(
            (t for t in list(model.parameters()) + list(model.buffers()) if floating(t)), None)
    return fw.model_tensor[id(model)]


def _framework(model: Any) -> tuple[Any, Any]:
    from . import _backend

    backend = _backend(model)
    return backend, (_Torch() if backend.name == "torch" else _Paddle())


# --- one layer call ----------------------------------------------------------------------------


class _Skip(Exception):
    pass


class _Raised(_Skip):
    """The port layer raised on the reference's input: a verdict on the port (a wrong channel
    count, a missing method), not a limit of the capture."""


def _arguments(layer: Any, call: _Call) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The recorded inputs as (positional, keyword) arrays; _Skip when they cannot be rebuilt."""
    if not call.ins:
        raise _Skip("its inputs were not recorded (record(..., inputs=False))")
    if len(call.ins) == 1 and call.ins[0][0] == ():
        args: list[Any] = [call.ins[0][1]]
        kwargs: dict[str, Any] = {}
    else:
        positional: dict[int, Any] = {}
        kwargs = {}
        for items, arr in call.ins:
            if len(items) != 1:
                shown = "".join(f"[{i}]" for i in items)
                raise _Skip(f"its input in{shown} sits in a nested structure, which is not rebuilt")
            if items[0].isdigit():
                positional[int(items[0])] = arr
            else:
                kwargs[items[0]] = arr
        if sorted(positional) != list(range(len(positional))):
            raise _Skip(
                "its positional inputs are not all tensors (recorded "
                + ", ".join(f"in[{i}]" for i in sorted(positional))
                + "; non-tensor arguments are not recorded)"
            )
        args = [positional[i] for i in range(len(positional))]
    _check_signature(layer, len(args), kwargs)
    return tuple(args), kwargs


def _check_signature(layer: Any, n_args: int, kwargs: Mapping[str, Any]) -> None:
    try:
        params = list(inspect.signature(layer.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    required = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is p.empty
        and p.name not in kwargs
    ]
    if len(required) > n_args:
        missing = ", ".join(required[n_args:])
        raise _Skip(
            f"forward needs {len(required)} positional arguments and the capture holds "
            f"{n_args} tensor input(s): {missing} is not a tensor (non-tensor inputs are "
            "not recorded)"
        )


def _stateful_reason(layer: Any) -> Optional[str]:
    """Why a layer cannot be replayed alone, or None."""
    if not getattr(layer, "training", False):
        return None
    cls = type(layer).__name__
    if "Dropout" in cls and float(getattr(layer, "p", 0.0) or 0.0) > 0.0:
        return f"{cls} in training mode draws a random mask: put the model in eval mode"
    return None


def _run(fw: Any, backend: Any, model: Any, layer: Any, call: _Call) -> dict[tuple[Any, ...], Any]:
    args, kwargs = _arguments(layer, call)
    like = fw._ref_tensor(layer, model)
    t_args = [fw.tensor(a, like) for a in args]
    t_kwargs = {k: fw.tensor(v, like) for k, v in kwargs.items()}
    state = fw.snapshot(layer) if fw.has_state(layer) else None
    try:
        with fw.no_grad():
            out = layer(*t_args, **t_kwargs)
    except _Skip:
        raise
    except Exception as exc:  # a port layer that cannot take the reference's input: say so
        first = (str(exc).splitlines() or [""])[0][:200]  # NotImplementedError() says nothing
        raise _Raised(f"replay raised {type(exc).__name__}" + (f": {first}" if first else "")) from None
    finally:
        if state is not None:  # BatchNorm in training mode updates its running statistics
            fw.restore(layer, state)
    return dict(_outputs(out, backend.is_tensor))  # named as the capture names them


# --- pairing -----------------------------------------------------------------------------------


def _port_layers(backend: Any, model: Any, include: Patterns, exclude: Patterns) -> list[tuple[str, Any]]:
    inc, exc = _patterns(include), _patterns(exclude) or ()
    return [
        (name or ROOT, layer)
        for name, layer in backend.named_layers(model)
        if _selected(name or ROOT, inc, exc)
    ]


# --- the entry point ---------------------------------------------------------------------------


def replay(
    model: Any,
    reference: Any,
    *,
    rename: Optional[Rules] = None,
    by_order: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    containers: bool = False,
    **compare_kw: Any,
) -> DiffResult:
    """Run every layer of the port ``model`` alone on the reference's recorded inputs and compare
    its outputs with the reference's outputs: every broken layer fails, independently of upstream
    error.

    ``model`` is the port (``torch.nn.Module`` or ``paddle.nn.Layer``) with the reference's
    weights; ``reference`` a capture of the reference model made by ``record`` (its logger, a
    dump path or a mapping), in any framework. Each port layer is paired with a reference layer
    by name, through ``rename`` rules (as ``reprod.capture.rename``: port name -> reference name),
    or with ``by_order=True`` by call order (port leaf layers in the order the port calls them,
    found by one run of the port on the reference's model input, against the reference's layers
    in call order; a pair must replay to outputs of the reference's shapes, and the closest in
    value is taken among those).
    Every recorded call of the paired layer is replayed (``name#2`` ...), in no-grad mode, on the
    recorded inputs converted to the port's framework, device and floating dtype. A layer's buffers
    are restored after each call (BatchNorm in training mode does not drift); dropout in training
    mode is skipped. ``include``/``exclude`` are globs on the port's layer names. Leaf layers are
    replayed (as ``record`` defines them); ``containers=True`` adds the containers the reference
    recorded, which finds a bug in a container's own code between its sublayers, but a container
    also fails whenever one of its sublayers does (read it after its sublayers). By order, a
    container pairs with the reference's that holds the same leaf layers (as
    ``match_by_order`` pairs them; of nested ones holding the same, only the outermost).

    Other keyword arguments go to ``reprod.compare`` (``method``, ``threshold``, ``atol``,
    ``rtol``, ``per_key``, ``noise``, ``noise_factor``, ``criteria``). The result has one key per
    replayed output, named as in the reference; ``first_divergence`` reads it. Layers not
    replayed are listed in ``result.options["replay_skipped"]`` (``layer``, ``reference``,
    ``reason``), reference layers nobody paired with in ``result.options["replay_unpaired"]``.

    >>> with record(torch_model) as ref:
    ...     torch_model(x)
    >>> r = replay(paddle_model, ref, method="max", threshold=1e-5)
    >>> [k.key for k in r.failed]
    ['bn.out', 'act2.out']
    """
    from ..diff.engine import compare

    for bad in ("pair", "keys"):
        if bad in compare_kw:
            raise TypeError(f"replay: {bad}= is not supported (use rename=, by_order=, include=)")
    got = _replayed(model, reference, rename=rename, by_order=by_order, include=include,
                    exclude=exclude, containers=containers)
    result = compare(got.ref_out, got.port_out, **compare_kw)
    if got.failures:
        result = _with_failures(result, got.failures, got.position, got.order)
    result.options["replay_skipped"] = got.skipped
    result.options["replay_unpaired"] = got.unpaired
    return result


@dataclasses.dataclass
class _Replayed:
    """What a replay ran, before it is judged: the reference's outputs and the port's, by the
    reference's keys, and replay's own verdicts (``failures``, at positions in ``position`` /
    ``order``)."""

    ref_out: dict[str, Any]
    port_out: dict[str, Any]
    failures: list[tuple[float, KeyResult]]
    skipped: list[dict[str, Any]]
    unpaired: list[str]
    position: dict[str, int]
    order: dict[str, int]


def _replayed(model: Any, reference: Any, *, rename: Optional[Rules] = None,
              by_order: bool = False, include: Patterns = None, exclude: Patterns = None,
              containers: bool = False,
              inputs: Optional[Callable[[str, _Call], _Call]] = None) -> _Replayed:
    """``replay``'s runs, without the comparison (``replay`` documents the arguments).
    ``inputs(port_layer, reference_call)``: the call to replay in its place (its inputs the
    port's own where they are in another convention), or ``_Skip``."""
    from ..adapters import to_numpy

    tree = _reference_tree(reference)
    calls = _reference_calls(tree)
    order: dict[str, int] = {}  # layer name -> position of its first output: call order
    for pos, key in enumerate(tree):
        parsed = parse_key(key)
        if parsed is not None and parsed.what == "out":
            order.setdefault(parsed.name, pos)
    backend, fw = _framework(model)
    layers = [
        (name, layer)
        for name, layer in _port_layers(backend, model, include, exclude)
        if containers or (name != ROOT and backend.is_leaf(layer))
    ]

    skipped: list[dict[str, Any]] = []
    ordered = layers
    if by_order:
        ordered = _in_call_order(fw, backend, model, layers, calls)
        mapping, skipped = _pair_by_order(fw, backend, model, ordered, calls, order, tree)
        if containers:
            mapping.update(_containers_by_leaves(backend, layers, calls, order, mapping))
    else:
        fn = None if rename is None else _compile_rules(rename)
        mapping = {}
        for name, layer in layers:
            ref = None if fn is None else fn(name)
            ref = name if ref is None else str(ref)
            if ref in calls:
                mapping[name] = ref
            elif name != ROOT and backend.is_leaf(layer):
                skipped.append({"layer": name, "reference": ref,
                                "reason": "the reference capture holds no output of " + ref})

    position = {key: i for i, key in enumerate(tree)}
    # verdicts replay gives itself, each at a position in the reference's key order
    failures: list[tuple[float, KeyResult]] = []
    layer_of = dict(layers)
    if not by_order and any(fw.own_tensors(layer_of[s["layer"]]) for s in skipped):
        # the port's call order places a layer checked nowhere among the keys (one more run)
        ordered = _in_call_order(fw, backend, model, layers, calls)
    failures += _unpaired_with_weights(fw, ordered, mapping, skipped, order, position,
                                       layer_of)
    ref_out: dict[str, Any] = {}
    port_out: dict[str, Any] = {}
    paired_refs = set(mapping.values())
    # replay in the reference's call order, so the result reads like the capture
    for name, ref in sorted(mapping.items(), key=lambda nr: order.get(nr[1], 0)):
        layer = layer_of[name]
        reason = _stateful_reason(layer)
        if reason is not None:
            skipped.append({"layer": name, "reference": ref, "reason": reason})
            continue
        for call in calls[ref]:
            subject = ref if call.call == 1 else f"{ref}#{call.call}"
            try:
                outs = _run(fw, backend, model, layer,
                            call if inputs is None else inputs(name, call))
            except _Skip as s:
                skipped.append({"layer": name, "reference": subject, "reason": str(s)})
                if isinstance(s, _Raised):
                    failures += [(position[key], _raised(key, tree[key], name, str(s)))
                                 for key, _ in call.outs]
                continue
            got = {tuple(str(i) for i in items): t for items, t in outs.items()}
            for key, items in call.outs:
                ref_out[key] = tree[key]
                if items in got:
                    port_out[key] = to_numpy(got.pop(items), key=key).array
            for items, t in got.items():  # outputs the reference does not have: shown as extra
                key = layer_key(ref, call.call, "out", items)
                port_out[key] = to_numpy(t, key=key).array

    inner = _containers(calls)
    unpaired = [n for n in sorted(calls, key=lambda n: order.get(n, 0))
                if n not in paired_refs and (containers or n not in inner)]
    return _Replayed(ref_out, port_out, failures, skipped, unpaired, position, order)


def _raised(key: str, ref: Any, layer: str, why: str) -> KeyResult:
    arr = np.asarray(ref)
    return KeyResult(key=key, passed=False, status="error", size=int(arr.size),
                     ref_shape=tuple(arr.shape), ref_dtype=str(arr.dtype),
                     reason=msg.reason_replay_raised(layer, why))


def _unpaired_with_weights(fw: Any, ordered: list[tuple[str, Any]], mapping: Mapping[str, str],
                           skipped: list[dict[str, Any]], order: Mapping[str, int],
                           position: Mapping[str, int], layer_of: Mapping[str, Any]) -> list[tuple[float, KeyResult]]:
    """A port layer holding parameters or buffers that pairs with no reference layer fails: its
    weights are checked nowhere (an extra layer, or one too broken to pair), which a pass would
    hide. One without (a ReLU the reference calls as a function) is only listed as skipped."""
    unpaired = {s["layer"]: s["reason"] for s in skipped}
    out: list[tuple[float, KeyResult]] = []
    at = -1.0
    for name, _ in ordered:
        if name in mapping:
            at = float(order.get(mapping[name], at))
        elif name in unpaired:
            layer = layer_of[name]
            n = fw.own_tensors(layer)
            if n:
                key = layer_key(name, 1, "out")
                if key in position:  # the reference's layer of this name pairs with another
                    key += " (port layer)"
                # "error", not "extra": first_divergence reads it (it skips one-sided keys)
                out.append((at + 0.5, KeyResult(
                    key=key, passed=False, status="error",
                    reason=msg.reason_replay_unpaired(name, type(layer).__name__, n,
                                                      unpaired[name]))))
    return out


def _with_failures(result: DiffResult, failures: list[tuple[float, KeyResult]],
                   position: Mapping[str, int], order: Mapping[str, int]) -> DiffResult:
    """``result`` with replay's own verdicts among its keys, all in the reference's order (a
    port-only output sits at its layer); a "nothing compared" placeholder goes."""
    def at(kr: KeyResult) -> float:
        if kr.key in position:
            return float(position[kr.key])
        parsed = parse_key(kr.key)
        return float(order.get(parsed.name, len(position)) if parsed else len(position))

    kept = [(at(kr), kr) for kr in result.results if kr.status != "nothing"]
    merged = sorted(kept + failures, key=lambda ak: ak[0])  # stable: the compare order holds
    return dataclasses.replace(result, results=tuple(kr for _, kr in merged))


def _containers_by_leaves(backend: Any, layers: list[tuple[str, Any]],
                          calls: Mapping[str, Any], order: Mapping[str, int],
                          leaves: Mapping[str, str]) -> dict[str, str]:
    """Port containers paired with the reference's by the leaf layers they hold (``leaves``: the
    leaf pairing), as ``match_by_order`` pairs them; the model with the model."""
    from .naming import _pair_containers

    ref_calls = [(n, {}) for n in sorted(calls, key=lambda n: order.get(n, 0))]
    # a list of layers (ModuleList, LayerList) holds leaves but is never called: no pair
    port_calls: list[tuple[str, dict[str, Any]]] = [(n, {}) for n, layer in layers
                                                    if _has_forward(layer)]
    port_boxes = {n for n, layer in layers if n == ROOT or not backend.is_leaf(layer)}
    # leaf layers only one side has (a ReLU the other calls as a function) say nothing of which
    # container is which (the leaf pairing has left them unpaired)
    ref_boxes = _containers(calls)
    paired = set(leaves.values())
    ref_only = {n for n, _ in ref_calls if n not in ref_boxes and n not in paired}
    port_only = {n for n, _ in layers if n not in port_boxes and n not in leaves}
    return _pair_containers(ref_calls, port_calls, ref_boxes, port_boxes, leaves,
                            ref_only, port_only)


def _has_forward(layer: Any) -> bool:
    """False for a layer whose class keeps its framework's unimplemented ``forward``."""
    for klass in type(layer).__mro__:
        if klass.__name__ in ("Module", "Layer") and klass.__module__.startswith(("torch.nn",
                                                                                  "paddle.nn")):
            return getattr(type(layer), "forward", None) is not getattr(klass, "forward", None)
    return True


def _containers(calls: Mapping[str, Any]) -> set[str]:
    """Reference layers that hold other recorded layers (the model, ``se`` of ``se.fc1``)."""
    return holders(calls)


def _in_call_order(
    fw: Any, backend: Any, model: Any, layers: list[tuple[str, Any]], calls: Mapping[str, list[_Call]]
) -> list[tuple[str, Any]]:
    """``layers`` in the order the port calls them, found by running the whole port once on the
    reference model's recorded input (``<model>.in``, recorded with containers); layers it never
    calls follow in registration order. Registration order where the reference holds no model
    input or the port cannot run on it: an SE block registers fc1, fc2, relu but calls fc1,
    relu, fc2, and that order is the reference's."""
    root = calls.get(ROOT)
    if not root:
        return layers
    seen: list[str] = []
    handles = []
    for name, layer in layers:
        if name != ROOT and backend.is_leaf(layer):
            handles.append(backend.add_post_hook(layer, lambda out, n=name: seen.append(n)))
    try:
        _run(fw, backend, model, model, root[0])
    except _Skip:
        return layers
    finally:
        for h in handles:
            h.remove()
    rank = {n: i for i, n in enumerate(dict.fromkeys(seen))}
    return sorted(layers, key=lambda nl: rank.get(nl[0], len(rank)))


def _closeness(outs: Mapping[str, Any], call: _Call, tree: Mapping[str, Any]) -> Optional[float]:
    """The relative L2 distance of a trial replay's outputs from the reference's, or None when
    their structure or shapes differ."""
    got = {tuple(str(i) for i in items): t for items, t in outs.items()}
    if {k: tuple(int(s) for s in t.shape) for k, t in got.items()} != call.shapes:
        return None
    from ..adapters import to_numpy

    worst = 0.0
    for key, items in call.outs:
        ref = np.asarray(tree[key], dtype=np.float64)
        port = to_numpy(got[items], key=key).array.astype(np.float64, copy=False)
        with np.errstate(all="ignore"):
            scale = float(np.linalg.norm(ref))
            dist = float(np.linalg.norm(port - ref)) / scale if scale > 0 else float(np.linalg.norm(port))
        worst = max(worst, dist) if np.isfinite(dist) else float("inf")
    return worst


# a trial replay this close to a reference layer's output is that layer: a correct port's layer
# replays to within float32 rounding (1e-6), a half-precision one to ~1e-2; a layer and the one
# after it (a BatchNorm, a ReLU) are often within 0.5 of each other, and a broken layer is not
# close to its own, so those pair by shapes between the close pairs, the closest first
_CLOSE = 0.05


def _pair_by_order(
    fw: Any, backend: Any, model: Any, layers: list[tuple[str, Any]],
    calls: dict[str, list[_Call]], order: Mapping[str, int], tree: Mapping[str, Any],
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Port leaf layers in call order, reference layers in call order, paired in two passes.

    First, a port layer pairs with the first unpaired reference layer (within a look-ahead,
    starting a little before the last pair, as a port may call two siblings the other way round)
    whose first call it replays to outputs of the same structure and shapes and close in value.
    Then each port layer left between two such pairs takes, of the unpaired reference layers
    between the same two pairs (a few back) whose shapes fit, the closest (a broken layer is not
    close to its own), and
    where the reference has none there it pairs with nothing: a layer the reference calls as a
    function (a ``ReLU``), which shapes alone would pair with the next ``BatchNorm``."""
    inner = _containers(calls)
    ref_names = [n for n in sorted(calls, key=lambda n: order.get(n, 0)) if n not in inner]
    leaves = [(n, layer) for n, layer in layers if n != ROOT and backend.is_leaf(layer)]
    trials: dict[tuple[int, int], Optional[float]] = {}

    def distance(p: int, k: int) -> Optional[float]:
        if (p, k) not in trials:
            call = calls[ref_names[k]][0]
            try:
                outs = _run(fw, backend, model, leaves[p][1], call)
            except _Skip:
                outs = None
            trials[p, k] = None if outs is None else _closeness(outs, call, tree)
        return trials[p, k]

    taken: set[int] = set()
    paired: dict[int, int] = {}
    last = -1
    for p in range(len(leaves)):
        k, looked = max(0, last + 1 - _LOOKBACK), 0
        while k < len(ref_names) and looked <= _LOOKAHEAD:
            if k not in taken:
                looked += 1
                dist = distance(p, k)
                if dist is not None and dist <= _CLOSE:
                    paired[p], last = k, k
                    taken.add(k)
                    break
            k += 1
    # the layers between two close pairs: by shapes, the closest, among the reference layers
    # from the last pairs before (a few back: siblings called the other way round) to the next
    bounds = [(-1, -1), *sorted(paired.items()), (len(leaves), len(ref_names))]
    weightless = [not fw.own_tensors(layer) for _, layer in leaves]
    fits: list[tuple[bool, float, int, int]] = []
    for at, ((p0, _), (p1, k1)) in enumerate(zip(bounds, bounds[1:])):
        lo = min(k for _, k in bounds[max(0, at - _LOOKBACK + 1): at + 1])
        fits += [(weightless[p], d, p, k) for p in range(p0 + 1, p1) for k in range(lo + 1, k1)
                 if k not in taken and (d := distance(p, k)) is not None]
    # the windows overlap (siblings the other way round put a broken one past the close pair of
    # its sibling), so they are filled together: a layer with weights first (a ReLU the reference
    # calls as a function would take a broken conv's place), then the closest
    for _, _, p, k in sorted(fits):
        if p not in paired and k not in taken:
            paired[p] = k
            taken.add(k)
    mapping: dict[str, str] = {}
    skipped: list[dict[str, Any]] = []
    for p, (name, _) in enumerate(leaves):
        if p in paired:
            mapping[name] = ref_names[paired[p]]
        else:
            skipped.append({"layer": name, "reference": None,
                            "reason": "no reference layer pairs with it by call order"})
    return mapping, skipped

