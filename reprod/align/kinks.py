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

A Paddle layer with a built-in kink activation (``paddle.nn.BatchNorm(c, act="relu")``, where
torch has ``BatchNorm2d`` then ``ReLU``, or ``F.relu``) is a kink layer too: its activation is a
*site* (``reprod.capture.kinks.fused``) whose input, the normalised value, is recorded on the
Paddle side from inside the layer and on the torch side as the output of the torch BatchNorm
that pairs with it (the n-th batch-norm layer of one model with the n-th of the other, in
definition order, as ``by_order`` pairs their weights; checked against the parameter pairing).
Where a torch kink layer called next takes exactly that output (the ``ReLU`` after the norm), the
site is that layer's call; where none does (``F.relu``), the site is a layer of its own,
``features.norm5+relu``, placed right after the norm in the call order. The other kink layers
pair by call order as above.

A Paddle model that applies a kink activation as a function (``F.relu(self._conv(x))``, as
paddle.vision's SqueezeNet does where torchvision has ``nn.ReLU`` modules) has no layer to
capture. Where the Paddle model has no layer of a kink class at all, each torch layer of that
class, called once per forward pass on the very output of a layer with parameters (seen during
the torch run), pairs with the output of the Paddle layer that layer's parameters pair with:
recorded as a site (``_conv7._conv._conv+relu``) during the Paddle run. Whether the port applies
the activation there is left to the values: the site's key must align with the torch layer's
input for any crossing to be found in it.

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

import numpy as np

from ..capture import KINK_POINTS, explain_kinks, layer_types, record
from ..capture.kinks.fused import NORM_LAYERS, fused_activations, record_sites, site_name
from ..capture.kinks.points import MAX
from ..capture.naming import ROOT, layer_key, param_key, parse_key
from ..logger import ReprodLogger
from .counterfactual import _STEP_KEY, DOWNSTREAM, port_inputs

__all__ = ["KinkCapture"]

_FORWARD = ("in", "out")


def _exact(name: str) -> str:
    """A glob that matches ``name`` only (``record``'s ``include`` takes globs)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _kink_layers(model: Any) -> dict[str, str]:
    """Layer name -> class name of the model's layers whose class has kinks (the model itself
    left out: a model that is one activation has no upstream to explain)."""
    return {n: t for n, t in layer_types(model).items() if t.lower() in KINK_POINTS and n != ROOT}


@contextlib.contextmanager
def _call_order(model: Any, order: list[str],
                fed: Optional[dict[str, Optional[str]]] = None,
                kink_layers: frozenset[str] = frozenset()) -> Iterator[None]:
    """Fill ``order`` with every torch module call of the model's first forward pass, in call
    order, as ``explain_kinks(order=)`` reads them (``relu``, ``relu#2`` for a second call):
    parameter gradients are placed by their layer's position there, and the capture holds the
    kink layers only. ``fed``: each call of a layer of ``kink_layers`` -> the layer with
    parameters whose output, returned just before, is that call's input (the very tensor), or
    None."""
    counts: dict[str, int] = {}
    state: dict[str, Any] = {"started": False, "done": False, "last": None}

    def pre(name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            if name == ROOT and not state["started"]:
                state["started"] = True
            if state["started"] and not state["done"]:
                counts[name] = counts.get(name, 0) + 1
                subject = name if counts[name] == 1 else f"{name}#{counts[name]}"
                order.append(subject)
                if fed is not None and name in kink_layers:
                    last = state["last"]
                    fed[subject] = (last[0] if last is not None and args and args[0] is last[1]
                                    else None)
        return hook

    def post(name: str, owns: bool, leaf: bool) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if state["started"] and not state["done"]:
                # the last output returned, held only until the next: a container that returns
                # its last child's output leaves it that child's; a leaf without parameters
                # (an in-place ReLU returns the tensor it changed) makes it no one's
                if owns:
                    state["last"] = (name, output)
                elif leaf or state["last"] is None or output is not state["last"][1]:
                    state["last"] = None
        return hook

    def done(module: Any, args: Any, output: Any) -> None:
        state["done"] = True
        state["last"] = None

    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name or ROOT)))
            if fed is not None and name:
                owns = any(True for _ in module.parameters(recurse=False))
                leaf = not any(True for _ in module.children())
                handles.append(module.register_forward_hook(post(name, owns, leaf)))
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


def _norm_layers(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of the model's batch-norm layers, in definition order."""
    named = model.named_modules() if hasattr(model, "named_modules") else (
        model.named_sublayers(include_self=True))
    out = []
    for name, layer in named:
        if type(layer).__name__.lower() in NORM_LAYERS:
            shape = getattr(getattr(layer, "weight", None), "shape", ())
            out.append((name or ROOT, tuple(int(s) for s in shape)))
    return out


def _is_capture(key: str, layers: Mapping[str, str]) -> bool:
    p = parse_key(key)
    return p is not None and p.what in _FORWARD and p.name in layers


class KinkCapture:
    """The kink layers of both models, their captures during ``align_train``, the pairing of the
    Paddle side's calls with the torch side's, and the relabelling of the step keys."""

    def __init__(self, torch_model: Any, paddle_model: Any,
                 torch_to_paddle: Optional[Mapping[str, str]] = None) -> None:
        self.torch_layers = _kink_layers(torch_model)
        self.paddle_layers = _kink_layers(paddle_model)
        self.order: list[str] = []  # the torch model's layer calls of one forward pass
        self.skipped: Optional[str] = None  # why nothing is relabelled (fail closed)
        self.capture_keys: set[str] = set()  # ref-side (torch-named) capture keys
        self.paddle_of: dict[str, str] = {}  # torch layer call -> paired paddle layer call
        # built-in activations (reprod.capture.kinks.fused): torch norm layer -> its site,
        # Paddle fused layer -> its site, torch site -> activation class, Paddle site -> torch
        # site, Paddle site -> Paddle layer, and the (torch, Paddle) layer pairs behind them
        self.torch_sites: dict[str, str] = {}
        self.paddle_sites: dict[str, str] = {}
        self.site_types: dict[str, str] = {}
        self.site_of: dict[str, str] = {}
        self.layer_of_site: dict[str, str] = {}
        self.fused_pairs: list[tuple[str, str]] = []
        # activations the Paddle model applies as functions (paddle.vision's SqueezeNet calls
        # F.relu on each conv's output): Paddle layer -> the site of its output, that site ->
        # the torch kink layer it pairs with, and those torch layers; from the torch parameter
        # -> Paddle parameter pairing and, per torch kink layer call, the layer whose output it
        # takes (``fed``, from the torch model's first forward pass)
        self.torch_to_paddle = dict(torch_to_paddle or {})
        self.fed: dict[str, Optional[str]] = {}
        self.out_sites: dict[str, str] = {}
        self.site_layer: dict[str, str] = {}
        self.functional: set[str] = set()
        self._functional_done = False
        # the port's kink layer inputs of each step with gradients a crossing of that step
        # explains (counterfactual.port_inputs), by layer call within the step's forward pass
        self.port_inputs: dict[int, dict[str, np.ndarray]] = {}
        fused = fused_activations(paddle_model)
        if fused:
            self.skipped = self._pair_fused(torch_model, paddle_model, fused)
        if not self.torch_layers and not self.paddle_layers and not fused:
            self.skipped = "no layer of a class with kinks (ReLU, Hardswish, max-pool, ...)"

    def _pair_fused(self, torch_model: Any, paddle_model: Any,
                    fused: Mapping[str, str]) -> Optional[str]:
        """Pair each Paddle layer with a built-in activation with the torch batch norm of the
        same rank in definition order (None), or say why they do not pair."""
        t_norms, p_norms = _norm_layers(torch_model), _norm_layers(paddle_model)
        if len(t_norms) != len(p_norms):
            return (f"the Paddle model's {len(fused)} BatchNorm layers with a built-in activation "
                    f"do not pair with the torch model's: {len(t_norms)} batch-norm layers in "
                    f"torch, {len(p_norms)} in Paddle")
        for (tn, t_shape), (pn, p_shape) in zip(t_norms, p_norms):
            if pn not in fused:
                continue
            if t_shape != p_shape:
                return (f"{pn} (a BatchNorm with a built-in activation) pairs by order with "
                        f"{tn}, whose weight's shape differs: {p_shape} against {t_shape}")
            tsite, psite = site_name(tn, fused[pn]), site_name(pn, fused[pn])
            self.torch_sites[tn], self.paddle_sites[pn] = tsite, psite
            self.site_types[tsite] = fused[pn]
            self.site_of[psite], self.layer_of_site[psite] = tsite, pn
            self.fused_pairs.append((tn, pn))
        return None

    def _names(self, side: str) -> dict[str, str]:
        """The layers and sites whose calls are captured on ``side``: name -> class."""
        if side == "paddle":
            sites = {s: self.site_types[t] for s, t in self.site_of.items()}
            functional = {s: self.torch_layers[t] for s, t in self.site_layer.items()}
            return {**self.paddle_layers, **sites, **functional}
        return {**self.torch_layers, **self.site_types}

    # --- recording -------------------------------------------------------------------------------
    def recording(self, model: Any, log: ReprodLogger, side: str) -> Any:
        """A context recording the kink layers' inputs (and outputs: a max-pool's tie is read from
        them) of ``model`` into ``log``, and the inputs of the activation sites; ``side`` is
        "torch" (the call order is taken from its first forward pass too), "torch64" or
        "paddle"."""
        if self.skipped is not None:
            return contextlib.nullcontext()
        if side == "paddle":
            self._pair_functional()
        layers = self.paddle_layers if side == "paddle" else self.torch_layers
        sites = {**self.paddle_sites, **self.out_sites} if side == "paddle" else self.torch_sites
        if not layers and not sites:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if layers:
            # reuse=False: record's arrays kept for reuse would stay alive on the model after
            # align_train returns
            stack.enter_context(record(model, log, include=[_exact(n) for n in layers],
                                       forward=True, inputs=True, containers=False, reuse=False))
        if sites:
            stack.enter_context(record_sites(model, log, sites))
        if side == "torch":
            stack.enter_context(_call_order(model, self.order, self.fed,
                                            frozenset(self.torch_layers)))
        return stack

    def _pair_functional(self) -> None:
        """Pair the torch kink layers of a class the Paddle model has no layer of (its
        activations are functions: ``F.relu(self._conv(x))``) with the output of the Paddle
        layer that pairs with the torch layer feeding them: each such torch layer called once in
        a forward pass, on the very output of a layer with parameters that pairs with a Paddle
        layer. All of them or none (the calls then do not pair, and nothing is relabelled). The
        claim that the Paddle model applies the activation there is checked by the values: the
        site's key must align with the torch layer's input for a crossing to count."""
        if self._functional_done:
            return
        self._functional_done = True
        have = {t.lower() for t in self.paddle_layers.values()}
        missing = {n: t for n, t in self.torch_layers.items()
                   if t.lower() not in have and KINK_POINTS.get(t.lower()) != MAX}
        if not missing or not self.torch_to_paddle or not self.order:
            return
        paddle_layer = {name.rpartition(".")[0]: pname.rpartition(".")[0]
                        for name, pname in self.torch_to_paddle.items()}
        found: dict[str, str] = {}
        for layer in missing:
            calls = [e for e in self.order if e.partition("#")[0] == layer]
            producer = self.fed.get(calls[0]) if len(calls) == 1 else None
            player = None if producer is None else paddle_layer.get(producer)
            if player is None or player in found or player in self.paddle_sites:
                return
            found[player] = layer
        for player, layer in found.items():
            site = site_name(player, missing[layer])
            self.out_sites[player] = site
            self.site_layer[site] = layer
            self.layer_of_site[site] = player
            self.functional.add(layer)

    # --- pairing ---------------------------------------------------------------------------------
    def sides(self, ref: Mapping[str, Any], other: Mapping[str, Any],
              noise: Optional[Mapping[str, Any]]
              ) -> tuple[dict[str, Any], dict[str, Any], Optional[dict[str, Any]]]:
        """The three dumps to compare: the Paddle side's capture keys under the torch calls they
        pair with (the n-th kink layer call with the n-th; a built-in activation's call with its
        torch site's), or, where the calls do not pair, no capture keys on any side. Arrays are
        shared, not copied."""
        t_names, p_names = self._names("torch"), self._names("paddle")
        t_calls = _calls(ref, t_names)
        p_calls = _calls(other, p_names)
        why = self.skipped
        absorbed: dict[tuple[str, int], tuple[str, int]] = {}
        if why is None:
            absorbed = self._absorbed(ref, t_calls)
            why = self._check(t_calls, p_calls, noise, absorbed)
        if why is not None:
            self.skipped = why
            keep = lambda d, layers: {k: v for k, v in d.items()  # noqa: E731
                                      if not _is_capture(k, layers)}
            return (keep(ref, t_names), keep(other, p_names),
                    None if noise is None else keep(noise, t_names))
        t_plain, p_plain = self._plain(t_calls, absorbed), self._plain(p_calls, {})
        to_torch = dict(zip(p_plain, t_plain))
        for name, call in p_calls:
            if name in self.site_of:
                site = (self.site_of[name], call)
                to_torch[(name, call)] = absorbed.get(site, site)
            elif name in self.site_layer:
                to_torch[(name, call)] = (self.site_layer[name], call)
        self.paddle_of = {
            _subject(*t): _subject(self.layer_of_site.get(p[0], p[0]), p[1])
            for p, t in to_torch.items()
        }
        renamed: dict[str, Any] = {}
        for key, value in other.items():
            p = parse_key(key)
            if p is not None and p.what in _FORWARD and p.name in p_names:
                name, call = to_torch[(p.name, p.call)]
                key = layer_key(name, call, p.what, p.items)
            renamed[key] = value
        ref = _without_absorbed(ref, absorbed)
        self.capture_keys = {k for k in ref if _is_capture(k, t_names)}
        return ref, renamed, None if noise is None else _without_absorbed(noise, absorbed)

    def _plain(self, calls: list[tuple[str, int]],
               absorbed: Mapping[tuple[str, int], tuple[str, int]]) -> list[tuple[str, int]]:
        """The calls that pair by order: neither a site nor a layer call that stands for one."""
        taken = set(absorbed.values())
        return [c for c in calls
                if c[0] not in self.site_types and c[0] not in self.site_of and c not in taken
                and c[0] not in self.functional and c[0] not in self.site_layer]

    def _absorbed(self, data: Mapping[str, Any],
                  calls: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[str, int]]:
        """Torch site call -> the kink layer call that stands for it: the next kink layer call,
        of the site's class, whose input is exactly the site's (the ReLU after the norm)."""
        out = {}
        for (name, call), nxt in zip(calls, calls[1:]):
            kind = self.site_types.get(name)
            if kind is None or self.torch_layers.get(nxt[0], "").lower() != kind.lower():
                continue
            a, b = data.get(layer_key(name, call, "in")), data.get(layer_key(*nxt, "in"))
            if a is None or b is None or np.shape(a) != np.shape(b):
                continue
            if np.array_equal(np.asarray(a), np.asarray(b)):
                out[(name, call)] = nxt
        return out

    def _check(self, t_calls: list[tuple[str, int]], p_calls: list[tuple[str, int]],
               noise: Optional[Mapping[str, Any]],
               absorbed: Mapping[tuple[str, int], tuple[str, int]]) -> Optional[str]:
        """Why the two sides' kink layer calls do not pair one to one (None: they do)."""
        t_plain, p_plain = self._plain(t_calls, absorbed), self._plain(p_calls, {})
        if len(t_plain) != len(p_plain):
            return (f"the torch model's kink layers were called {len(t_plain)} times and the "
                    f"Paddle model's {len(p_plain)} times: their calls do not pair by order")
        for i, ((tn, _), (pn, _)) in enumerate(zip(t_plain, p_plain)):
            tt, pt = self.torch_layers[tn], self.paddle_layers[pn]
            if tt.lower() != pt.lower():
                return (f"kink layer call {i + 1} is {tn} ({tt}) in torch and {pn} ({pt}) in "
                        "Paddle: their calls do not pair by order")
        t_sites = {c for c in t_calls if c[0] in self.site_types}
        p_sites = [(self.site_of[n], k) for n, k in p_calls if n in self.site_of]
        if set(p_sites) != t_sites or len(p_sites) != len(t_sites):
            return (f"the Paddle model's BatchNorm layers with a built-in activation were called "
                    f"{len(p_sites)} times and the torch batch norms they pair with "
                    f"{len(t_sites)} times, or in other calls")
        t_fun = sorted(c for c in t_calls if c[0] in self.functional)
        p_fun = sorted((self.site_layer[n], k) for n, k in p_calls if n in self.site_layer)
        if t_fun != p_fun:
            return (f"the Paddle layers whose outputs take a functional activation were called "
                    f"{len(p_fun)} times and the torch kink layers they pair with "
                    f"{len(t_fun)} times, or in other calls")
        if noise is not None and (_calls(noise, self._names("torch")) != t_calls
                                  or self._absorbed(noise, t_calls) != absorbed):
            return "the float64 twin called its kink layers differently from the torch model"
        if not self.order:
            return "the torch model's call order was not recorded"
        return None

    def _order(self) -> list[str]:
        """The torch call order with each site right after its norm layer's call."""
        out = []
        for entry in self.order:
            out.append(entry)
            name, sep, call = entry.partition("#")
            if name in self.torch_sites:
                out.append(self.torch_sites[name] + sep + call)
        return out

    def _fused_mismatch(self, paddle_to_torch: Mapping[str, str]) -> Optional[str]:
        """Why the norm layers paired by definition order are not those whose weights
        ``align_train`` paired (None: they are, or there is nothing to check them by)."""
        for tn, pn in self.fused_pairs:
            got = paddle_to_torch.get(f"{pn}.weight")
            if got is not None and got != f"{tn}.weight":
                return (f"{pn} (a BatchNorm with a built-in activation) pairs by order with {tn}, "
                        f"but its weight with {got}")
        return None

    # --- the verdicts ---------------------------------------------------------------------------
    def explain(self, result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                noise: Optional[Mapping[str, Any]], paddle_to_torch: Mapping[str, str]) -> Any:
        """``result`` without the capture keys, its failing step keys that a kink crossing
        explains relabelled ``"kink"`` (``explain_kinks``), and ``options["kinks"]``."""
        main = [r for r in result.results if r.key not in self.capture_keys]
        if self.skipped is None:
            self.skipped = self._fused_mismatch(paddle_to_torch)
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
                                  noise, layer_types=self._names("torch"), order=self._order(),
                                  frameworks=("torch", "paddle"))
        relabelled = {original[r.key]: dataclasses.replace(r, key=original[r.key])
                      for r in explained.results if r.status == "kink"}
        per_pass = self.calls_per_pass()
        passes = {int(m.group("step")) for k, r in relabelled.items()
                  if (r.reason or "").startswith(DOWNSTREAM) and (m := _STEP_KEY.fullmatch(k))}
        captures = [r for r in result.results if r.key in self.capture_keys]
        self.port_inputs = port_inputs(captures, other, per_pass, passes)
        # a loss or outputs differing where no crossing explains them is a difference no crossing
        # makes (a summed loss doubles every gradient): from that step on, nothing is put down
        # to a crossing. So does a BatchNorm statistic of that step that no known difference
        # explains (no note): statistics are taken in the forward pass, which a crossing leaves
        # within noise (a wrong epsilon moves the batch means after it, while the logits of a
        # deep network may still align: densenet121)
        unexplained = [int(m.group("step")) for r in main
                       if not r.passed and r.key not in relabelled
                       and (m := _STEP_KEY.fullmatch(r.key)) and _forward_difference(m, r)]
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
                              "layer_calls": len(_calls(ref, self._names("torch")))})
        return dataclasses.replace(result, results=tuple(out), options=options)

    def calls_per_pass(self) -> dict[str, int]:
        """Each kink layer's (and activation site's) calls in one forward pass."""
        per_pass: dict[str, int] = {}
        for entry in self._order():
            name = entry.partition("#")[0]
            per_pass[name] = per_pass.get(name, 0) + 1
        return per_pass

    def strip(self, log: Optional[ReprodLogger], side: str) -> None:
        """Take the capture keys out of a run's logger (the dumps keep the documented keys)."""
        if log is None:
            return
        layers = self._names("paddle" if side == "paddle" else "torch")
        for key in [k for k in log.data if _is_capture(k, layers)]:
            log.remove(key)


def _without_absorbed(data: Mapping[str, Any],
                      absorbed: Mapping[tuple[str, int], tuple[str, int]]) -> dict[str, Any]:
    """``data`` without the keys of the sites a layer call stands for, nor that call's output:
    the layer's input is the site's, and the Paddle side has no output key to pair with."""
    out = {}
    stand_ins = set(absorbed.values())
    for key, value in data.items():
        p = parse_key(key)
        if p is not None and p.what in _FORWARD and (
            (p.name, p.call) in absorbed or (p.what == "out" and (p.name, p.call) in stand_ins)
        ):
            continue
        out[key] = value
    return out


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


def _forward_difference(m: re.Match[str], r: Any) -> bool:
    """Whether a failing step key is a forward value no crossing of its step can move."""
    return m.group("kind") in ("loss", "logits") or (m.group("kind") == "stat" and not r.note)


def _updated(r: Any, relabelled: Mapping[str, Any]) -> Optional[Any]:
    """A failing ``step<i>/param/<name>`` (or optimizer state, ``step<i>/opt/<name>.velocity``)
    whose own gradient of step i a crossing of that step explains: the update carries the
    gradient's difference. (A parameter whose gradient aligns keeps its verdict: an optimizer
    difference is no kink's.)"""
    m = _STEP_KEY.fullmatch(r.key)
    if m is None or m.group("kind") not in ("param", "opt") or not m.group("name"):
        return None
    name = m.group("name")
    if m.group("kind") == "opt":
        name = name.rpartition(".")[0]
    grad = relabelled.get(f"step{m.group('step')}/grad/{name}")
    if grad is None:
        return None
    head = grad.reason.split("; ", 1)[0]  # "downstream of the kink crossing at ..."
    return dataclasses.replace(r, passed=True, status="kink",
                               reason=f"updated with {grad.key}, {head}; {r.reason}")
