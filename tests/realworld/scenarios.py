"""Three scenarios on a real model pair, each giving three dicts of numpy arrays with identical keys:
``ref`` (torch float32), ``ref64`` (torch float64, same weights and inputs) and ``port`` (Paddle
float32, optionally with an injected bug).

- ``forward``: logits in eval mode (batch 4, 224x224).
- ``layers``:  every leaf layer's output in eval mode (batch 2), captured with
  ``reprod.capture.record`` on both sides and paired by call order (``pair_by_order``).
- ``train``:   2 SGD steps (lr 0.01, momentum 0.9, cross-entropy on fixed labels) in training
  mode (batch 2): the loss, every gradient and every weight (BN running statistics included)
  after each step, under torch names and torch layout. Dropout is set to p=0 on both sides (its
  random masks cannot match across frameworks). The inputs of every activation (ReLU, Hardswish,
  Hardsigmoid) in each step's forward are kept in ``aux["act_in@stepN"]`` to look for kink
  crossings.

The torch results depend only on (model, seed) and are cached, so running a scenario for each
bug re-runs only the Paddle side.

>>> res = run("train", pair, seed=0, bug="bn_eps")
>>> ref, ref64, port = res
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import paddle
import torch
from models import ModelPair, make_inputs, make_labels, paddle_input, torch_input

Arrays = dict[str, np.ndarray]

BATCH = {"forward": 4, "layers": 2, "train": 2}
STEPS = 2
LR = 0.01
MOMENTUM = 0.9
# activation layers and where their kinks are (for the kink-crossing count)
KINKS = {"ReLU": (0.0,), "Hardswish": (-3.0, 3.0), "Hardsigmoid": (-3.0, 3.0), "ReLU6": (0.0, 6.0)}


@dataclass
class Result:
    ref: Arrays
    ref64: Arrays
    port: Arrays
    aux: dict[str, tuple[Arrays, Arrays, Arrays]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    act_kinks: dict[str, tuple[float, ...]] = field(default_factory=dict)  # layer -> kink points
    order: dict[str, int] = field(default_factory=dict)  # leaf layer call ("relu#2") -> position

    def __iter__(self) -> Iterator[Arrays]:
        return iter((self.ref, self.ref64, self.port))


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().copy()
    return np.array(t.numpy(), copy=True)


_TORCH_CACHE: dict[
    tuple[str, str, int], tuple[Arrays, Arrays, dict[str, tuple[Arrays, Arrays]]]
] = {}


def _cached(scenario: str, pair: ModelPair, seed: int, fn) -> tuple[Arrays, Arrays, dict]:
    key = (scenario, pair.name, seed)
    if key not in _TORCH_CACHE:
        _TORCH_CACHE[key] = fn()
    return _TORCH_CACHE[key]


def clear_cache() -> None:
    _TORCH_CACHE.clear()


# --- (a) forward logits ---------------------------------------------------------------------------


def forward(pair: ModelPair, seed: int = 0, bug: Optional[str] = None) -> Result:
    x = make_inputs(seed, BATCH["forward"])

    def torch_side():
        with torch.no_grad():
            ref = {"logits": _np(pair.torch32(torch_input(x)))}
            ref64 = {"logits": _np(pair.torch64(torch_input(x, torch.float64)))}
        return ref, ref64, {}

    ref, ref64, _ = _cached("forward", pair, seed, torch_side)
    model = pair.paddle(bug)
    with paddle.no_grad():
        port = {"logits": _np(model(paddle_input(x)))}
    return Result(ref, ref64, port, notes=[pair.last_bug] if bug else [])


# --- (b) per-layer capture --------------------------------------------------------------------------


def _capture(model: Any, x: Any, **kw: Any) -> Arrays:
    from reprod.capture import record

    with record(model, inputs=False, containers=False, **kw) as log:
        model(x)
    return {k: np.asarray(v) for k, v in dict(log.data).items()}


def layers(pair: ModelPair, seed: int = 0, bug: Optional[str] = None) -> Result:
    from reprod.capture import pair_by_order

    x = make_inputs(seed, BATCH["layers"])

    def torch_side():
        with torch.no_grad():
            ref = _capture(pair.torch32, torch_input(x))
            ref64 = _capture(pair.torch64, torch_input(x, torch.float64))
        assert list(ref) == list(ref64)
        return ref, ref64, {}

    ref, ref64, _ = _cached("layers", pair, seed, torch_side)
    model = pair.paddle(bug)
    with paddle.no_grad():
        raw = _capture(model, paddle_input(x))
    port = pair_by_order(ref, raw)
    notes = [pair.last_bug] if bug else []
    unpaired = [k for k in port if k not in ref]
    missing = [k for k in ref if k not in port]
    if unpaired or missing:
        notes.append(
            f"unpaired: {len(missing)} ref keys, {len(unpaired)} port keys: "
            f"{missing[:3]} / {unpaired[:3]}"
        )
    common = [k for k in ref if k in port]
    return Result(
        {k: ref[k] for k in common},
        {k: ref64[k] for k in common},
        {k: port[k] for k in common},
        notes=notes,
    )


# --- (c) training steps ---------------------------------------------------------------------------


def _activation_names(model: Any, torch_side: bool) -> list[str]:
    mods = model.named_modules() if torch_side else model.named_sublayers()
    return [n for n, m in mods if type(m).__name__ in KINKS]


def _torch_train(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, dtype
) -> tuple[Arrays, dict]:
    from reprod.capture import record

    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    xt, yt = torch_input(x, dtype), torch.from_numpy(y)
    out: Arrays = {}
    acts: dict[int, Arrays] = {}
    names = _activation_names(model, True)
    for step in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        with record(model, include=names, forward=True, containers=False) as log:
            logits = model(xt)
        acts[step] = {k: np.asarray(v) for k, v in dict(log.data).items() if k.endswith(".in")}
        loss = torch.nn.functional.cross_entropy(logits, yt)
        loss.backward()
        out[f"step{step}/loss"] = _np(loss)
        for n, p in model.named_parameters():
            out[f"step{step}/grad/{n}"] = _np(p.grad)
        opt.step()
        for n, v in model.state_dict().items():
            if not n.endswith("num_batches_tracked"):
                out[f"step{step}/weight/{n}"] = _np(v)
    return out, acts


def _paddle_train(pair: ModelPair, model: Any, x: np.ndarray, y: np.ndarray) -> tuple[Arrays, dict]:
    from reprod.capture import record

    for m in model.sublayers():
        if isinstance(m, paddle.nn.Dropout):
            m.p = 0.0
    model.train()
    opt = paddle.optimizer.Momentum(
        learning_rate=LR, momentum=MOMENTUM, parameters=model.parameters(), use_nesterov=False
    )
    xp, yp = paddle_input(x), paddle.to_tensor(y)
    to_torch = {p.paddle_key: p for p in pair.pairs}
    params = dict(model.named_parameters())
    out: Arrays = {}
    acts: dict[int, Arrays] = {}
    names = _activation_names(model, False)
    for step in range(1, STEPS + 1):
        with record(model, include=names, forward=True, containers=False) as log:
            logits = model(xp)
        acts[step] = {k: np.asarray(v) for k, v in dict(log.data).items() if k.endswith(".in")}
        loss = paddle.nn.functional.cross_entropy(logits, yp)
        loss.backward()
        out[f"step{step}/loss"] = _np(loss).reshape(())
        for pk, p in params.items():
            if p.stop_gradient:
                continue
            wp = to_torch[pk]
            g = _np(p.grad)
            out[f"step{step}/grad/{wp.torch_key}"] = g.T.copy() if wp.transpose else g
        opt.step()
        opt.clear_grad()
        for pk, v in model.state_dict().items():
            wp = to_torch[pk]
            a = _np(v)
            out[f"step{step}/weight/{wp.torch_key}"] = a.T.copy() if wp.transpose else a
    return out, acts


def call_order(model: torch.nn.Module) -> dict[str, int]:
    """Position of each leaf-module call in a torch forward pass, keyed like capture subjects
    (``layer1.0.relu``, ``layer1.0.relu#2``)."""
    order: dict[str, int] = {}
    calls: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if next(iter(m.children()), None) is None:

            def hook(mod, args, out, name=name):
                calls[name] = calls.get(name, 0) + 1
                order[name if calls[name] == 1 else f"{name}#{calls[name]}"] = len(order)

            hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64, dtype=next(model.parameters()).dtype))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return order


def train(pair: ModelPair, seed: int = 0, bug: Optional[str] = None) -> Result:
    from reprod.capture import pair_by_order

    x = make_inputs(seed, BATCH["train"])
    y = make_labels(seed, BATCH["train"])

    def torch_side():
        ref, a32 = _torch_train(pair.torch32, x, y, torch.float32)
        ref64, a64 = _torch_train(pair.torch64, x, y, torch.float64)
        return ref, ref64, {"act_in": (a32, a64)}

    ref, ref64, aux_t = _cached("train", pair, seed, torch_side)
    port_raw, acts = _paddle_train(pair, pair.paddle(bug), x, y)
    # same key order as the reference
    port = {k: port_raw[k] for k in ref if k in port_raw}
    notes = [pair.last_bug] if bug else []
    missing = [k for k in ref if k not in port_raw]
    if missing:
        notes.append(f"{len(missing)} ref keys with no port value: {missing[:3]}")
    a32, a64 = aux_t["act_in"]
    aux = {}
    for step in a32:  # activation inputs of each step's forward, paired by call order
        a_port = pair_by_order(a32[step], acts[step])
        common = [k for k in a32[step] if k in a_port]
        aux[f"act_in@step{step}"] = (
            {k: a32[step][k] for k in common},
            {k: a64[step][k] for k in common},
            {k: a_port[k] for k in common},
        )
    keys = [k for k in ref if k in port]
    kinks = {
        n: KINKS[type(m).__name__]
        for n, m in pair.torch32.named_modules()
        if type(m).__name__ in KINKS
    }
    return Result(
        {k: ref[k] for k in keys},
        {k: ref64[k] for k in keys},
        port,
        aux,
        notes,
        kinks,
        call_order(pair.torch32),
    )


SCENARIOS = {"forward": forward, "layers": layers, "train": train}


def run(scenario: str, pair: ModelPair, seed: int = 0, bug: Optional[str] = None) -> Result:
    return SCENARIOS[scenario](pair, seed, bug)


def known_difference(scenario: str, key: str) -> Optional[str]:
    """Why a key differs on a correct port by design, or None."""
    if scenario == "train" and fnmatch.fnmatchcase(key, "step*/weight/*running_var"):
        return "BN running_var: Paddle updates with the biased batch variance, torch unbiased"
    return None
