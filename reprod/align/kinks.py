"""Kink crossings in ``align_train``: the layer captures that let ``reprod.capture.explain_kinks``
tell a gradient that jumped at a non-smooth layer's kink from a bug.

A correct port can put one element of a ReLU / Hardswish / max-pool input on the other side of the
kink than the reference (both values within rounding of it); every gradient upstream of that
element then differs by far more than the float64 twin's noise. To see it, each run of
``align_train`` records, during its forward passes, the inputs and outputs of the layers whose
class has kinks (``KINK_POINTS``; nothing else, so the cost is those activations only), into the
run's own logger, so that they sit in time order before the step's gradients. The Paddle side's
layers are named differently in ports paired by order: the kink layers are called in the same
order on both sides, so the n-th call of one side is paired with the n-th call of the other, and
where the numbers of calls or their classes differ nothing is relabelled (fail closed).

``explain_kinks`` reads capture keys: the step keys are shown to it in that scheme
(``step0/grad/<paddle name>`` as ``param.<torch name>.grad``, the torch model's call order of
every layer given as ``order``), and the verdicts it gives are carried back to the step keys.
The captures themselves leave the result (its keys stay those ``align_train`` documents) and the
dumps; the crossings found are in ``result.options["kink_crossings"]`` and the count of keys they
explain in ``result.options["kinks"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from ..capture import KINK_POINTS, explain_kinks, layer_types, record
from ..capture.naming import ROOT, layer_key, param_key, parse_key
from ..logger import ReprodLogger

__all__ = ["KinkCapture"]

_STEP_KEY = re.compile(r"step(?P<step>\d+)/(?P<kind>[^/]+)(?:/(?P<name>.+))?")
_FORWARD = ("in", "out")


def _exact(name: str) -> str:
    """A glob that matches ``name`` only (``record``'s ``include`` takes globs)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _kink_layers(model: Any) -> dict[str, str]:
    """Layer name -> class name of the model's layers whose class has kinks (the model itself
    left out: a model that is one activation has no upstream to explain)."""
    return {n: t for n, t in layer_types(model).items() if t.lower() in KINK_POINTS and n != ROOT}


@contextlib.contextmanager
def _call_order(model: Any, order: list[str]) -> Iterator[None]:
    """Fill ``order`` with every torch module call of the model's first forward pass, in call
    order, as ``explain_kinks(order=)`` reads them (``relu``, ``relu#2`` for a second call):
    parameter gradients are placed by their layer's position there, and the capture holds the
    kink layers only."""
    counts: dict[str, int] = {}
    state = {"started": False, "done": False}

    def pre(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            if name == ROOT and not state["started"]:
                state["started"] = True
            if state["started"] and not state["done"]:
                counts[name] = counts.get(name, 0) + 1
                order.append(name if counts[name] == 1 else f"{name}#{counts[name]}")
        return hook

    def done(module: Any, args: Any, output: Any) -> None:
        state["done"] = True

    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name or ROOT)))
        handles.append(model.register_forward_hook(done))
    except Exception:  # a module that takes no hooks (scripted): no order, nothing relabelled
        for h in handles:
            h.remove()
        handles = []
        order.clear()
        state["done"] = True
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _calls(data: Mapping[str, Any], layers: Mapping[str, str]) -> list[tuple[str, int]]:
    """The kink layer calls of a run's logger, in the order they happened: (layer, call)."""
    seen: dict[tuple[str, int], None] = {}
    for key in data:
        p = parse_key(key)
        if p is not None and p.what in _FORWARD and p.name in layers:
            seen.setdefault((p.name, p.call), None)
    return list(seen)


def _is_capture(key: str, layers: Mapping[str, str]) -> bool:
    p = parse_key(key)
    return p is not None and p.what in _FORWARD and p.name in layers


class KinkCapture:
    """The kink layers of both models, their captures during ``align_train``, the pairing of the
    Paddle side's calls with the torch side's, and the relabelling of the step keys."""

    def __init__(self, torch_model: Any, paddle_model: Any) -> None:
        self.torch_layers = _kink_layers(torch_model)
        self.paddle_layers = _kink_layers(paddle_model)
        self.order: list[str] = []  # the torch model's layer calls of one forward pass
        self.skipped: Optional[str] = None  # why nothing is relabelled (fail closed)
        self.capture_keys: set[str] = set()  # ref-side (torch-named) capture keys
        self.paddle_of: dict[str, str] = {}  # torch layer call -> paired paddle layer call
        if not self.torch_layers and not self.paddle_layers:
            self.skipped = "no layer of a class with kinks (ReLU, Hardswish, max-pool, ...)"

    # --- recording -------------------------------------------------------------------------------
    def recording(self, model: Any, log: ReprodLogger, side: str) -> Any:
        """A context recording the kink layers' inputs (and outputs: a max-pool's tie is read from
        them) of ``model`` into ``log``; ``side`` is "torch" (the call order is taken from its
        first forward pass too), "torch64" or "paddle"."""
        if self.skipped is not None:
            return contextlib.nullcontext()
        layers = self.paddle_layers if side == "paddle" else self.torch_layers
        if not layers:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        # reuse=False: record's arrays kept for reuse would stay alive on the model after
        # align_train returns
        stack.enter_context(record(model, log, include=[_exact(n) for n in layers], forward=True,
                                   inputs=True, containers=False, reuse=False))
        if side == "torch":
            stack.enter_context(_call_order(model, self.order))
        return stack

    # --- pairing ---------------------------------------------------------------------------------
    def sides(self, ref: Mapping[str, Any], other: Mapping[str, Any],
              noise: Optional[Mapping[str, Any]]
              ) -> tuple[dict[str, Any], dict[str, Any], Optional[dict[str, Any]]]:
        """The three dumps to compare: the Paddle side's capture keys under the torch calls they
        pair with (the n-th kink layer call with the n-th), or, where the calls do not pair, no
        capture keys on any side. Arrays are shared, not copied."""
        t_calls = _calls(ref, self.torch_layers)
        p_calls = _calls(other, self.paddle_layers)
        why = self.skipped
        if why is None:
            why = self._check(t_calls, p_calls, noise)
        if why is not None:
            self.skipped = why
            keep = lambda d, layers: {k: v for k, v in d.items()  # noqa: E731
                                      if not _is_capture(k, layers)}
            return (keep(ref, self.torch_layers), keep(other, self.paddle_layers),
                    None if noise is None else keep(noise, self.torch_layers))
        to_torch = dict(zip(p_calls, t_calls))
        self.paddle_of = {_subject(*t): _subject(*p) for p, t in to_torch.items()}
        renamed: dict[str, Any] = {}
        for key, value in other.items():
            p = parse_key(key)
            if p is not None and p.what in _FORWARD and p.name in self.paddle_layers:
                name, call = to_torch[(p.name, p.call)]
                key = layer_key(name, call, p.what, p.items)
            renamed[key] = value
        self.capture_keys = {k for k in ref if _is_capture(k, self.torch_layers)}
        return dict(ref), renamed, None if noise is None else dict(noise)

    def _check(self, t_calls: list[tuple[str, int]], p_calls: list[tuple[str, int]],
               noise: Optional[Mapping[str, Any]]) -> Optional[str]:
        """Why the two sides' kink layer calls do not pair one to one (None: they do)."""
        if len(t_calls) != len(p_calls):
            return (f"the torch model's kink layers were called {len(t_calls)} times and the "
                    f"Paddle model's {len(p_calls)} times: their calls do not pair by order")
        for i, ((tn, _), (pn, _)) in enumerate(zip(t_calls, p_calls)):
            tt, pt = self.torch_layers[tn], self.paddle_layers[pn]
            if tt.lower() != pt.lower():
                return (f"kink layer call {i + 1} is {tn} ({tt}) in torch and {pn} ({pt}) in "
                        "Paddle: their calls do not pair by order")
        if noise is not None and _calls(noise, self.torch_layers) != t_calls:
            return "the float64 twin called its kink layers differently from the torch model"
        if not self.order:
            return "the torch model's call order was not recorded"
        return None

    # --- the verdicts ---------------------------------------------------------------------------
    def explain(self, result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                noise: Optional[Mapping[str, Any]], paddle_to_torch: Mapping[str, str]) -> Any:
        """``result`` without the capture keys, its failing step keys that a kink crossing
        explains relabelled ``"kink"`` (``explain_kinks``), and ``options["kinks"]``."""
        main = [r for r in result.results if r.key not in self.capture_keys]
        if self.skipped is not None:
            options = dict(result.options, kinks={"explained": 0, "skipped": self.skipped})
            return dataclasses.replace(result, results=tuple(main), options=options)
        shadow, original = [], {}
        for r in result.results:
            key = r.key if r.key in self.capture_keys else _shadow_key(r, paddle_to_torch)
            if key is None:
                continue
            shadow.append(r if key == r.key else dataclasses.replace(r, key=key))
            original[key] = r.key
        explained = explain_kinks(dataclasses.replace(result, results=tuple(shadow)), ref, other,
                                  noise, layer_types=self.torch_layers, order=self.order)
        relabelled = {original[r.key]: dataclasses.replace(r, key=original[r.key])
                      for r in explained.results if r.status == "kink"}
        # a loss or outputs differing where no crossing explains them is a difference no crossing
        # makes (a summed loss doubles every gradient): from that step on, nothing is put down
        # to a crossing
        unexplained = [int(m.group("step")) for r in main
                       if not r.passed and r.key not in relabelled
                       and (m := _STEP_KEY.fullmatch(r.key)) and m.group("kind") in ("loss", "logits")]
        if unexplained:
            first = min(unexplained)
            relabelled = {k: v for k, v in relabelled.items()
                          if (m := _STEP_KEY.fullmatch(k)) is None or int(m.group("step")) < first}
        out = []
        for r in main:
            new = relabelled.get(r.key)
            if new is None and not r.passed:
                new = _updated(r, relabelled)
            out.append(r if new is None else new)
        # each crossing's count of the step keys it explains (explain_kinks counted the shadow's,
        # captures of later steps included); a reason names its crossing's unique message
        crossings = [dict(c, paddle_layer=self.paddle_of.get(c["layer"]),
                          explained=sum(r.status == "kink" and c["message"] in r.reason
                                        for r in out))
                     for c in explained.options.get("kink_crossings", [])]
        n = sum(r.status == "kink" for r in out)
        options = dict(result.options, kink_crossings=crossings,
                       kinks={"explained": n, "crossings": len(crossings),
                              "layer_calls": len(_calls(ref, self.torch_layers))})
        return dataclasses.replace(result, results=tuple(out), options=options)

    def strip(self, log: Optional[ReprodLogger], side: str) -> None:
        """Take the capture keys out of a run's logger (the dumps keep the documented keys)."""
        if log is None:
            return
        layers = self.paddle_layers if side == "paddle" else self.torch_layers
        for key in [k for k in log.data if _is_capture(k, layers)]:
            log.remove(key)


def _subject(name: str, call: int) -> str:
    return name if call == 1 else f"{name}#{call}"


def _shadow_key(r: Any, paddle_to_torch: Mapping[str, str]) -> Optional[str]:
    """How ``explain_kinks`` sees a step key: a gradient as its torch parameter's capture key
    (one call per step, so that it is placed by its layer); a key it may relabel only as "after a
    crossing of an earlier step" as it is; None for keys no crossing may explain (the learning
    rate; a statistic a known framework difference explains, which keeps its note)."""
    m = _STEP_KEY.fullmatch(r.key)
    if m is None or parse_key(r.key) is not None:
        return None  # not align_train's, or it would read as a capture key
    kind, name = m.group("kind"), m.group("name")
    if kind == "grad":
        torch_name = paddle_to_torch.get(name or "")
        return None if torch_name is None else param_key(torch_name, int(m.group("step")) + 1)
    if kind == "lr" or (kind == "stat" and r.note):
        return None
    return r.key


def _updated(r: Any, relabelled: Mapping[str, Any]) -> Optional[Any]:
    """A failing ``step<i>/param/<name>`` whose own gradient of step i a crossing of that step
    explains: the update carries the gradient's difference. (A parameter whose gradient aligns
    keeps its verdict: an optimizer difference is no kink's.)"""
    m = _STEP_KEY.fullmatch(r.key)
    if m is None or m.group("kind") != "param":
        return None
    grad = relabelled.get(f"step{m.group('step')}/grad/{m.group('name')}")
    if grad is None:
        return None
    head = grad.reason.split("; ", 1)[0]  # "downstream of the kink crossing at ..."
    return dataclasses.replace(r, passed=True, status="kink",
                               reason=f"updated with {grad.key}, {head}; {r.reason}")
