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

import dataclasses
from collections.abc import Mapping
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
    """The layers judged alone: ``result`` (a ``DiffResult``, one key per replayed output, its
    multiple of that layer's own rounding), ``factor`` and how many ran."""

    result: Any
    factor: float
    judged: int
    ports: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # key -> output

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
                 factor: Optional[float] = None, containers: bool = False
                 ) -> Optional[LocalLayers]:
    """The port's leaf layers (``paddle_model``), each replayed on the half reference's
    recorded input (``ref``, a capture), judged against the half-weights twin's (``noise_twin``)
    replay on the same input. ``port_names``: reference layer -> the port's, where they are
    named otherwise (a pairing by order). None where no layer replays on both."""
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
    twin = _replayed(noise_twin, ref, rename=twin_name, containers=containers)
    port = _replayed(paddle_model, ref, rename=port_name, containers=containers)
    lone = _one_tensor_blocks(ref, noise_twin) if containers else None
    keys = [k for k in port.port_out if k in twin.port_out and k in port.ref_out
            and _floating(port.ref_out[k]) and (lone is None or lone(k))]
    if not keys:
        return None
    refs = {k: _widened(port.ref_out[k]) for k in keys}
    ports = {k: _widened(port.port_out[k]) for k in keys}
    result = compare(refs, ports, method="max", threshold=float("inf"))
    eps = _EPS[precision]
    judged = []
    for kr in result.results:
        if kr.key not in refs or kr.status not in ("passed", "failed"):
            judged.append(kr)  # NaN, Inf, shape: their own verdicts
            continue
        multiple, n_l2, n_max = _multiple(refs[kr.key], ports[kr.key],
                                          _widened(twin.port_out[kr.key]), eps)
        passed = multiple <= factor
        judged.append(dataclasses.replace(
            kr, passed=passed, status="passed" if passed else "failed",
            noise_multiple=multiple, noise_l2=n_l2, noise_max=n_max,
            reason=(f"{multiple:.3g}x its own {precision} rounding, replayed alone on the "
                    f"reference's input ({'<=' if passed else '>'} {factor:g}x)")))
    result = dataclasses.replace(result, results=tuple(judged))
    # as the port computed them: a diagnosis reads their precision from the values
    return LocalLayers(result, factor, len(keys), {k: port.port_out[k] for k in keys})


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


def _one_tensor_blocks(ref: Mapping[str, Any], model: Any) -> Any:
    """A test of an output key: whether its layer is judged alone where blocks are, a leaf or
    the model itself, or a block its reference called on one tensor alone (a residual block, a
    Sequential). A block taking several (a transformer layer's states and mask) may take them
    in another convention in the port (an additive mask for a boolean one), and alone it would
    fail a faithful port; the whole run judges its code."""
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
        call = next((c for c in calls.get(parsed.name, ()) if c.call == parsed.call), None)
        return call is not None and len(call.ins) == 1 and call.ins[0][0] == ()

    return judged


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
