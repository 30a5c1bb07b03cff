"""A half-precision port's layers judged each on its own input.

In float32 a layer's noise is its float64 distance, and a bug stands thousands of times above
it wherever it sits. In bfloat16 a layer's distance from the float32 computation holds all the
rounding upstream, 1-2 % at the middle of resnet18, so a whole-run layer check passed a weight
2 % off (0.84x, and 1.13x against the half-weights twin), a BERT query 5 % off (0.81x) and a
Hardswish of slope 1/5 (1.11x) that float32 caught at 10^4x.

Here every paired leaf of the port runs alone on what the half reference's layer received
(``capture.replay``), and so does the half-weights twin (the torch model holding the half
weights, in float32). The twin's distance from the half reference on the same input is that
layer's own rounding, about a fifth of a half-precision unit; a faithful port rounds its own
way by as much, a bug by its own size (resnet18's 2 % weight: 12x).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Optional

import numpy as np

from ..diff.noise import _EPS, LOW_PRECISION_NOISE_FACTOR
from ..diff.second_pass import ratio

__all__ = ["local_layers"]

# the floor of a layer's own rounding: in L2 an eighth of a half unit at the values' scale (one
# correct rounding is about a fifth), in max half a unit at the largest value (one rounding's
# bound); an exact layer (a ReLU, a pooling by max) has none, and a correct port of it none
# either
_L2_FLOOR, _MAX_FLOOR = 1 / 8, 1 / 2
# a name no reference layer has: a port layer left unpaired
_NOBODY = "\0"


@dataclasses.dataclass(frozen=True)
class LocalLayers:
    """The layers judged alone: ``result`` (a ``DiffResult``, one key per replayed output and
    per input the code between the layers computed, its multiple of that layer's or that code's
    own rounding), ``factor`` and how many of each were judged."""

    result: Any
    factor: float
    judged: int  # layer outputs replayed alone
    ports: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # key -> output
    inputs: int = 0  # layer inputs judged as the code between the layers computed them
    inputs_skipped: Optional[str] = None  # why the code between the layers was not judged

    @property
    def failed(self) -> list[Any]:
        return [kr for kr in self.result.results if not kr.passed]

    def hint(self, key: str, ref: Mapping[str, Any], types: tuple[str, Optional[str]],
             context: Mapping[str, Any]) -> Optional[str]:
        """What ``reprod.diagnose`` says of the failing output ``key``, the port's replayed
        output read against the reference's input (as a diagnosis reads both sides'); the
        whole run's own hint was gated on its noise and said nothing in half precision."""
        from ..diagnose import diagnose

        if key not in self.ports:
            return None
        plain = dataclasses.replace(self.result, results=tuple(
            kr for kr in self.result.results if kr.key == key))
        layer = key.rpartition(".")[0]
        found = diagnose(plain, ref, {key: self.ports[key]},
                         layer_types={layer: tuple(t for t in types if t)}, context=context)
        before, after = plain[key].note or "", found[key].note or ""
        if after == before:
            return None
        return after[len(before):].lstrip("; ") if after.startswith(before) else after


def local_layers(ref: Mapping[str, Any], noise_twin: Any, paddle_model: Any, *,
                 port_names: Mapping[str, str], precision: str,
                 factor: Optional[float] = None, containers: bool = False,
                 run_port: Optional[Callable[[], None]] = None,
                 run_twin: Optional[Callable[[], None]] = None) -> Optional[LocalLayers]:
    """The port's leaf layers (``paddle_model``), each replayed on the half reference's
    recorded input (``ref``, a capture), judged against the half-weights twin's (``noise_twin``)
    replay on the same input. ``port_names``: reference layer -> the port's, where they are
    named otherwise (a pairing by order). ``containers``: the blocks too; one its reference
    called on several tensors is judged where ``run_port`` (a run of the port) records what the
    port's block took (``_several_tensors``). With ``run_twin`` (the twin's run) too, the code
    between the layers is judged: both run with every paired layer giving the reference's output,
    and each layer's input, as that code computes it, is judged (``_between``). None where no
    layer replays on both."""
    from ..capture.replay import _replayed
    from ..diff.engine import compare
    from .localise import _inert

    factor = LOW_PRECISION_NOISE_FACTOR if factor is None else factor
    # a layer that computes nothing (a dropout in eval) is no one's counterpart: PaddleNLP's
    # BERT applies GELU as a function, and by order its dropout stood where HF's GELU module is
    ref_inert, port_inert = _inert(noise_twin), _inert(paddle_model)
    table = {p: r for r, p in port_names.items() if "#" not in r and "#" not in p}

    def twin_name(name: str) -> str:
        return _NOBODY + name if name in ref_inert else name

    def port_name(name: str) -> str:
        if name in port_inert:
            return _NOBODY + name
        if not table:  # paired by name
            return twin_name(name)
        return table.get(name, _NOBODY + name)  # by order: only the pairs the order found

    if containers and table:  # by order: the blocks pair by the leaves they hold
        table.update({p: r for p, r in _blocks_by_leaves(paddle_model, ref, table).items()
                      if p not in table})
    # a plain port norm paired with a reference norm holding its activation, which the port
    # applies after it as a function (PaddleClas's EfficientNet against timm's): judged as the
    # norm, against the reference's output before its activation and the twin's norm without
    # it (a faithful bf16 port failed every such norm at up to 390x)
    apart = _norms_apart(noise_twin, paddle_model, port_name, ref_inert)
    if apart:
        ref = _ref_apart(ref, apart)
    with _twin_acts_apart(noise_twin, apart):
        twin = _replayed(noise_twin, ref, rename=twin_name, containers=containers)
    ports_of = {r: p for p, r in table.items()}
    several = _several_tensors(ref, noise_twin, paddle_model,
                               (lambda n: ports_of.get(n)) if table else (lambda n: n), run_port) \
        if containers and run_port is not None else None
    # a fused norm paired with a reference norm holding its activation (timm's DPN against
    # PaddleClas's) is judged whole, as the reference's: taken apart, a faithful port failed
    # every norm at up to 794x
    holding = _norms_holding_acts(noise_twin)
    keep = {n for n in _fused_acts(paddle_model) if port_name(n) in holding} if holding else set()
    fused = list(_fused_acts(paddle_model, keep))
    port = _replayed(paddle_model, ref, rename=port_name, containers=containers,
                     inputs=several, exclude=fused or None)
    if fused:
        # Paddle's BatchNorm(act="relu") is the reference's norm and the ReLU after it: alone it
        # is judged as the norm, its activation taken out (densenet121: a faithful port failed
        # every norm at up to 1640x); the blocks around it keep it
        with _acts_apart(paddle_model, keep):
            norms = _replayed(paddle_model, ref, rename=port_name, include=fused)
        port.ref_out.update(norms.ref_out)
        port.port_out.update(norms.port_out)
    lone = _one_tensor_blocks(ref, noise_twin, several.rebuilt if several else ()) \
        if containers else None
    # another shape is left to the whole run, which reads layouts: PaddleNLP's BigBird query
    # returns its heads apart, Paddle's DenseLayer its input and new features together
    keys = [k for k in port.port_out if k in twin.port_out and k in port.ref_out
            and _floating(port.ref_out[k]) and (lone is None or lone(k))
            and np.shape(port.port_out[k]) == np.shape(port.ref_out[k])]
    ref_out, port_out, twin_out = port.ref_out, dict(port.port_out), dict(twin.port_out)
    between_skipped: Optional[str] = None
    eps = _EPS[precision]
    # a layer whose output is the reference's times a constant: a scale one side applies inside
    # the layer and the other after it (HF's MBart its embedding's sqrt(d_model)), or a bug
    scales = {k: c for k in keys if (c := _scale(ref_out[k], port_out[k], eps)) is not None}
    if run_port is not None and run_twin is not None:
        def paired(rename: Callable[[str], str]) -> Callable[[str], Optional[str]]:
            return lambda n: None if (r := rename(n)).startswith(_NOBODY) else r

        try:
            theirs, given = _between(ref, paddle_model, run_port, paired(port_name),
                                     scales=scales, keep=keep)
            # the twin is given what the port was: a layer the port computed itself (one it
            # holds fused, one it applies as a function) rounds on in both
            ours, _ = _between(ref, noise_twin, run_twin, paired(twin_name), given,
                               then=_twin_acts(noise_twin, apart))
        except Exception as e:  # noqa: BLE001 - the layers alone stand, said
            first = (str(e).strip().splitlines() or [""])[0][:160]
            between_skipped = f"{type(e).__name__}: {first}" if first else type(e).__name__
            theirs, ours = {}, {}
        inputs = [k for k in ref if k in theirs and k in ours and _floating(ref[k])
                  and np.shape(theirs[k]) == np.shape(ref[k]) == np.shape(ours[k])]
        ref_out = {**ref_out, **{k: ref[k] for k in inputs}}
        port_out.update({k: theirs[k] for k in inputs})
        twin_out.update({k: ours[k] for k in inputs})
        position = {k: i for i, k in enumerate(ref)}
        keys = sorted(keys + inputs, key=lambda k: position.get(k, len(position)))
    if not keys:
        return None
    refs = {k: _widened(ref_out[k]) for k in keys}
    ports = {k: _widened(port_out[k]) for k in keys}
    result = compare(refs, ports, method="max", threshold=float("inf"))
    judged = []
    for kr in result.results:
        if kr.key not in refs or kr.status not in ("passed", "failed"):
            judged.append(kr)  # NaN, Inf, shape: their own verdicts
            continue
        multiple, n_l2, n_max = _multiple(refs[kr.key], ports[kr.key],
                                          _widened(twin_out[kr.key]), eps)
        passed = multiple <= factor
        how = ("computed by the code before it from the reference's layer outputs"
               if _is_input(kr.key) else "replayed alone on the reference's input")
        judged.append(dataclasses.replace(
            kr, passed=passed, status="passed" if passed else "failed",
            noise_multiple=multiple, noise_l2=n_l2, noise_max=n_max,
            reason=(f"{multiple:.3g}x its own {precision} rounding, {how} "
                    f"({'<=' if passed else '>'} {factor:g}x)")))
    result = dataclasses.replace(result, results=tuple(_moved_scales(judged, scales)))
    # as the port computed them: a diagnosis reads their precision from the values
    outputs = [k for k in keys if not _is_input(k)]
    return LocalLayers(result, factor, len(outputs), {k: port_out[k] for k in outputs},
                       inputs=len(keys) - len(outputs), inputs_skipped=between_skipped)


def _boxes(model: Any) -> set[str]:
    """The blocks of a torch model."""
    return {n for n, m in model.named_modules() if n and any(True for _ in m.children())}


def _scale(ref: Any, port: Any, eps: float) -> Optional[float]:
    """The constant c with ``ref`` == c * ``port`` within a rounding of the half precision
    (``eps`` in L2, relative), where c is further from 1 than eight roundings; else None."""
    a, b = _widened(ref).ravel(), _widened(port).ravel()
    if not a.size or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    bb = float(b @ b)
    if bb == 0.0:
        return None
    c = float(a @ b) / bb
    if abs(c - 1.0) <= 8 * eps or np.linalg.norm(a - c * b) > eps * np.linalg.norm(a):
        return None
    return c


def _moved_scales(judged: list[Any], scales: Mapping[str, float]) -> list[Any]:
    """The verdicts, each failing output that is the reference's times a constant (``scales``)
    passed where the next layer input judged, given the port's value of it (the reference's
    over the constant), aligns: the port's code undoes the scale, moved across the layer. Where
    that input fails (a weight scaled by a bug, passed on as it is), the layer fails."""
    at = {kr.key: i for i, kr in enumerate(judged)}
    out = list(judged)
    for key, c in scales.items():
        i = at.get(key)
        if i is None or out[i].passed:
            continue
        reader = next((kr for kr in judged[i + 1:] if _is_input(kr.key)), None)
        if reader is None or not reader.passed or reader.noise_multiple is None:
            continue
        out[i] = dataclasses.replace(
            out[i], passed=True, status="passed", noise_multiple=None,
            reason=(f"the reference's output over a constant {c:.6g}, which the port's code "
                    f"undoes before {_layer(reader.key)} (its input there "
                    f"{reader.noise_multiple:.3g}x its own rounding): a scale moved across "
                    "the layer"))
    return out


def _layer(key: str) -> Optional[str]:
    from ..capture.naming import parse_key

    parsed = parse_key(key)
    return None if parsed is None else parsed.name


def _is_input(key: str) -> bool:
    from ..capture.naming import parse_key

    parsed = parse_key(key)
    return parsed is not None and parsed.what == "in"


def _between(ref: Mapping[str, Any], model: Any, run: Callable[[], None],
             paired: Callable[[str], Optional[str]], only: Optional[Collection[str]] = None,
             scales: Optional[Mapping[str, float]] = None, keep: Collection[str] = (),
             then: Optional[Mapping[str, Callable[[Any], Any]]] = None
             ) -> tuple[dict[str, np.ndarray], set[str]]:
    """The inputs ``model``'s leaf layers received in ``run``, each leaf ``paired`` with a
    reference layer giving that layer's recorded output of the same call in place of its own
    (of those in ``only``, where given): reference input key -> value, and the output keys
    given. Each input is then what the code between the layers (a residual's add, an
    attention's softmax, a function the other side holds as a layer) computed from the
    reference's own layer outputs; only that code's rounding is in it. ``scales``: output key
    -> c, where the port's layer gives the reference's output over c (``_scale``): given so.
    ``then``: layer -> what it applies to the value it is given (a norm given its output before
    the activation it holds, which rounds on as the port's function does)."""
    from ..adapters import to_numpy
    from ..capture.naming import layer_key
    from ..capture.replay import _framework

    backend, fw = _framework(model)
    got: dict[str, np.ndarray] = {}
    given: set[str] = set()
    handles = []

    def hooks(theirs: str) -> tuple[Any, Any]:
        calls = [0]

        def before(args: Any, kwargs: Any) -> None:
            calls[0] += 1
            for key in (layer_key(theirs, calls[0], "in"), layer_key(theirs, calls[0], "in", (0,))):
                if key in ref and args and backend.is_tensor(args[0]):
                    # a copy: an in-place ReLU overwrites its input
                    got[key] = np.array(to_numpy(args[0], key=key).array, copy=True)
                    break

        def after(out: Any) -> Any:
            key = layer_key(theirs, calls[0], "out")
            if key in ref and (only is None or key in only) and backend.is_tensor(out) and \
                    tuple(int(d) for d in out.shape) == np.shape(ref[key]):
                given.add(key)
                value = np.asarray(ref[key])
                if scales and key in scales:
                    value = (_widened(value) / scales[key]).astype(np.float32)
                given_out = fw.tensor(value, out)
                act = (then or {}).get(theirs)
                return given_out if act is None else act(given_out)
            return None

        return before, after

    with _acts_apart(model, keep) as acts:  # ``keep``: given the reference's output whole
        for name, layer in backend.named_layers(model):
            theirs = paired(name) if name and backend.is_leaf(layer) else None
            if theirs is not None:
                before, after = hooks(theirs)
                handles += [backend.add_pre_hook(layer, before),
                            backend.add_post_hook(layer, after)]
            if name in acts:  # its activation, on what it gives (the reference's norm output)
                act, apply = acts[name]
                handles.append(backend.add_post_hook(layer, lambda out, a=act, f=apply: f(out, act=a)))
        try:
            run()
        finally:
            for h in handles:
                h.remove()
    return got, given


def _fused_acts(model: Any, keep: Collection[str] = ()) -> dict[str, Any]:
    """Layer name -> ``(act, apply)`` for each layer of a Paddle model applying a kink
    activation to its own output (``paddle.nn.BatchNorm(act="relu")``), but those in ``keep``:
    paired with a reference norm that holds its activation too (timm's ``BatchNormAct2d``)."""
    from ..capture.kinks.fused import _applier

    if not hasattr(model, "named_sublayers"):
        return {}
    return {name: found for name, layer in model.named_sublayers()
            if name and name not in keep and (found := _applier(layer)) is not None}


def _norms_apart(noise_twin: Any, paddle_model: Any, port_name: Callable[[str], str],
                 inert: Collection[str]) -> dict[str, str]:
    """Reference norm -> the activation sublayer it holds, for each port norm without an
    activation of its own paired with a torch norm holding one (``port_name``: the port's
    layer -> the reference's), where that activation is the one sublayer that computes."""
    from .settings import plain_norm_against_held_act

    if not hasattr(noise_twin, "named_modules") or not hasattr(paddle_model, "named_sublayers"):
        return {}
    modules = dict(noise_twin.named_modules())
    out: dict[str, str] = {}
    for name, layer in paddle_model.named_sublayers():
        r = port_name(name)
        m = modules.get(r)
        if not plain_norm_against_held_act(layer, m):
            continue
        acts = [c for c, _ in m.named_children() if f"{r}.{c}" not in inert]
        if len(acts) == 1:
            out[r] = acts[0]
    return out


def _ref_apart(ref: Mapping[str, Any], apart: Mapping[str, str]) -> dict[str, Any]:
    """``ref`` with each norm's output of ``apart`` its activation's input, call by call."""
    from ..capture.naming import layer_key, parse_key

    out = dict(ref)
    for key in ref:
        k = parse_key(key)
        if k is not None and k.name in apart and k.what == "out" and not k.items:
            act = f"{k.name}.{apart[k.name]}"
            value = ref.get(layer_key(act, k.call, "in"), ref.get(layer_key(act, k.call, "in", (0,))))
            if value is not None:
                out[key] = value
    return out


@contextlib.contextmanager
def _twin_acts_apart(model: Any, apart: Mapping[str, str]) -> Iterator[None]:
    """The torch twin with each norm of ``apart`` holding an identity for its activation, put
    back after."""
    if not apart:
        yield
        return
    import torch

    modules = dict(model.named_modules())
    held = {name: getattr(modules[name], act) for name, act in apart.items()}
    for name, act in apart.items():
        setattr(modules[name], act, torch.nn.Identity())
    try:
        yield
    finally:
        for name, act in apart.items():
            setattr(modules[name], act, held[name])


def _twin_acts(model: Any, apart: Mapping[str, str]) -> dict[str, Callable[[Any], Any]]:
    """Norm -> its activation's forward, without the hooks (for ``_between``'s ``then``)."""
    modules = dict(model.named_modules()) if apart else {}
    return {name: getattr(modules[name], act).forward for name, act in apart.items()}


def _norms_holding_acts(model: Any) -> set[str]:
    """The torch model's norms that hold their activation as a sublayer."""
    from .settings import norm_holding_act

    if not hasattr(model, "named_modules"):
        return set()
    return {name for name, m in model.named_modules() if name and norm_holding_act(m)}


@contextlib.contextmanager
def _acts_apart(model: Any, keep: Collection[str] = ()) -> Iterator[dict[str, Any]]:
    """The block with each fused layer's activation taken out of it (``_fused_acts``, which it
    yields), put back after."""
    acts = _fused_acts(model, keep)
    layers = dict(model.named_sublayers()) if acts else {}
    for name in acts:
        layers[name]._act = None
    try:
        yield acts
    finally:
        for name, (act, _) in acts.items():
            layers[name]._act = act


def _blocks_by_leaves(paddle_model: Any, ref: Mapping[str, Any], leaves: Mapping[str, str]
                      ) -> dict[str, str]:
    """The port's blocks paired with the reference's by the leaves they hold (``leaves``: port
    leaf -> reference leaf, the pairing by order), as ``replay`` pairs them by order."""
    from ..capture.naming import parse_key
    from ..capture.replay import (
        _containers_by_leaves,
        _framework,
        _port_layers,
        _reference_calls,
    )

    backend, _ = _framework(paddle_model)
    order: dict[str, int] = {}
    for pos, key in enumerate(ref):
        parsed = parse_key(key)
        if parsed is not None and parsed.what == "out":
            order.setdefault(parsed.name, pos)
    return _containers_by_leaves(backend, _port_layers(backend, paddle_model, None, None),
                                 _reference_calls(ref), order, leaves)


def _one_tensor_blocks(ref: Mapping[str, Any], model: Any, rebuilt: Collection[str] = ()
                       ) -> Any:
    """A test of an output key: whether its layer is judged alone where blocks are, a leaf or
    the model itself, a block its reference called on one tensor alone (a residual block, a
    Sequential), or the first output of one of ``rebuilt``: a block taking several (a
    transformer layer's states and mask) given the port's own arguments, the reference's states
    in them (``_several_tensors``). Given the reference's as they are it would fail a faithful port
    taking them in another convention (an additive mask for a boolean one)."""
    from ..capture.naming import ROOT, parse_key
    from ..capture.replay import _reference_calls

    calls = _reference_calls(ref)
    modules = dict(model.named_modules())

    def judged(key: str) -> bool:
        parsed = parse_key(key)
        if parsed is None or parsed.name == ROOT:
            return True
        module = modules.get(parsed.name)
        if module is None or not any(True for _ in module.children()):
            return True
        if parsed.name in rebuilt:
            # its states: what else it returns (T5's position bias, the mask in it) is in the
            # convention of the arguments it was given, the port's own (a faithful T5 read
            # 1024x there)
            return parsed.items in ((), ("0",))
        call = next((c for c in calls.get(parsed.name, ()) if c.call == parsed.call), None)
        return call is not None and len(call.ins) == 1 and call.ins[0][0] == ()

    return judged


# a port's argument within this relative L2 distance of the reference's of its shape is that
# argument (a hidden state, rounded its own way upstream: a few % in bfloat16); a mask in another
# convention (0/-1e4 for 1/0, or -inf for the dtype's least) or a complement is nowhere near
_SAME = 0.1


class _SeveralTensors:
    """``_replayed``'s ``inputs``: a block its reference called on several tensors replays on
    the port's own arguments (recorded by one more run of the port), each the port took in the
    reference's convention (within ``_SAME`` of one of the reference's of its shape: the states)
    replaced by the reference's, and the rest (a mask in its own convention) the port's own.
    The block is judged (``rebuilt``) where the reference's first argument went in."""

    def __init__(self, multi: set[str], port_calls: Mapping[str, Any]) -> None:
        self.multi, self.port_calls = multi, port_calls
        self.rebuilt: set[str] = set()

    def __call__(self, port_layer: str, call: Any) -> Any:
        from ..capture.replay import _Call, _Skip

        if call.name not in self.multi:
            return call
        own = next((c for c in self.port_calls.get(port_layer, ()) if c.call == call.call), None)
        if own is None or not own.ins:
            raise _Skip("the port's own inputs to the block were not recorded")
        first = next((a for items, a in call.ins if items == ("0",)), call.ins[0][1])
        ins, used = [], False
        for items, arr in own.ins:
            theirs = _counterpart(arr, [a for _, a in call.ins])
            if theirs is not None:
                used = used or theirs is first or np.array_equal(theirs, first)
                arr = theirs
            ins.append((items, arr))
        if not used:
            raise _Skip("none of the port's inputs to the block is the reference's first")
        rebuilt = _Call(call.name, call.call)
        rebuilt.ins, rebuilt.outs, rebuilt.shapes = ins, call.outs, call.shapes
        self.rebuilt.add(call.name)
        return rebuilt


def _several_tensors(ref: Mapping[str, Any], twin: Any, paddle_model: Any,
                     port_of: Callable[[str], Optional[str]], run_port: Callable[[], None]
                     ) -> Optional[_SeveralTensors]:
    """The inputs for the blocks the reference called on several tensors, the port recorded
    once more for them (only those blocks, ``port_of``: reference layer -> the port's); None
    where there are none."""
    from ..capture import record
    from ..capture.naming import ROOT
    from ..capture.replay import _reference_calls

    boxes = _boxes(twin)
    multi = {name for name, calls in _reference_calls(ref).items()
             if name in boxes and name != ROOT
             and any(not (len(c.ins) == 1 and c.ins[0][0] == ()) for c in calls)}
    ours = dict(paddle_model.named_sublayers())
    wanted = sorted({p for n in multi if (p := port_of(n)) in ours})
    if not wanted:
        return None
    with record(paddle_model, include=wanted, containers=True) as log:
        run_port()
    return _SeveralTensors(multi, _reference_calls(log.data))


def _counterpart(arr: np.ndarray, theirs: list[np.ndarray]) -> Optional[np.ndarray]:
    """Of the reference's arguments ``theirs``, the one ``arr`` (a port's argument) is, in the
    reference's convention; None where none is (``_SAME``). Two apart, both near: a _Skip."""
    from ..capture.replay import _Skip

    if not _floating(arr):  # ids: the same values in any convention
        return next((r for r in theirs if np.shape(r) == np.shape(arr)
                     and not _floating(r) and np.array_equal(r, arr)), None)
    near = sorted(((d, i) for i, r in enumerate(theirs) if _floating(r) and
                   np.shape(r) == np.shape(arr) and (d := _distance(arr, r)) <= _SAME),
                  key=lambda di: di[0])
    if not near:
        return None
    best = theirs[near[0][1]]
    if any(not np.array_equal(theirs[i], best) for _, i in near[1:]):
        raise _Skip("two of the reference's inputs to the block are near one of the port's")
    return best


def _distance(a: Any, b: Any) -> float:
    """Relative L2 distance of ``a`` from ``b``; inf where their non-finite values differ."""
    x, y = _widened(a), _widened(b)
    fx, fy = np.isfinite(x), np.isfinite(y)
    if not np.array_equal(fx, fy) or not np.array_equal(x[~fx], y[~fy]):
        return float("inf")
    scale = float(np.linalg.norm(y[fy]))
    gap = float(np.linalg.norm(x[fx] - y[fy]))
    return gap / scale if scale > 0 else (0.0 if gap == 0 else float("inf"))


def _multiple(ref: np.ndarray, port: np.ndarray, twin: np.ndarray, eps: float
              ) -> tuple[float, float, float]:
    """The port's distance from ``ref`` as a multiple of the twin's (the layer's own rounding),
    in L2 and in max, each noise floored (``_L2_FLOOR``, ``_MAX_FLOOR``); and the two noises."""
    finite = np.isfinite(ref) & np.isfinite(port) & np.isfinite(twin)
    r, p, t = ref[finite], port[finite], twin[finite]
    scale_l2 = float(np.linalg.norm(r)) if r.size else 0.0
    scale_max = float(np.max(np.abs(r))) if r.size else 0.0
    n_l2 = max(float(np.linalg.norm(t - r)), _L2_FLOOR * eps * scale_l2, 1e-300)
    n_max = max(float(np.max(np.abs(t - r))) if r.size else 0.0, _MAX_FLOOR * eps * scale_max,
                1e-300)
    d = p - r
    d_l2 = float(np.linalg.norm(d))
    d_max = float(np.max(np.abs(d))) if d.size else 0.0
    return max(ratio(d_l2, n_l2), ratio(d_max, n_max)), n_l2, n_max


def _floating(value: Any) -> bool:
    a = np.asarray(value)
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def _widened(value: Any) -> np.ndarray:
    return np.asarray(value).astype(np.float64)
