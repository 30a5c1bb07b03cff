"""The port's own float32 rounding: a key that fails only because Paddle rounds more than torch.

The calibrated check judges ``port - reference`` against the reference's distance from its
float64 twin: torch's rounding. Paddle's kernels sum in other orders, and a long reduction (a bias
gradient over batch and space, a BatchNorm statistic) can round 20-30x more than torch's
(measured: squeezenet1_1 against paddle.vision's, seed 2, a final-Fire bias gradient at 29x
torch's noise on a correct port). Where a step started from the same state on both sides (step 0,
or a step forced from the reference's state), the port's step is run again in float64 from that
state. With ``t32, t64, p32, p64`` the two sides' float32 and float64 values,

    p32 - t32 = (p32 - p64) - (t32 - t64) + (p64 - t64)

and a porting bug (another function) stays in ``p64 - t64`` at full size, while rounding leaves
it at float64's. A failing key whose float64 values agree within the reference's float32 noise
(both norms, L2 and max) is both sides' float32 rounding: it passes as ``"known"``, saying how
much Paddle's rounding is torch's. There is no cap on that multiple: Paddle's CPU Linear sums its
bias gradient over 32,768 rows 3,000x less exactly than torch (3.6e-4 of its largest element,
measured), as far off as a float16 intermediate would be, and the function is the port's all the
same. A precision the port's own code lowers (a cast to float16) stays in its float64 run, and
fails there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Collection, Iterator, Mapping
from typing import Any, Callable, Optional

import numpy as np

from ..diff.noise import port_rounding
from ..errors import ReprodError
from .framework import (
    _as_array,
    _call_loss,
    _flatten,
    _map_tree,
    _paddle_place,
    _split_batch,
    _split_inputs,
)

__all__ = ["float64_batches", "float64_loss", "needed", "paddle_float64", "paddle_float64_run",
           "rescued", "rescued_later"]

# the keys a forward and backward pass from a state make (an update's need the optimizer)
_KINDS = ("logits", "loss", "grad", "stat")


def _to_paddle64(value: Any, place: Any) -> Any:
    """``_to_paddle`` with floating arrays in float64."""
    import paddle

    def one(v: Any) -> Any:
        a = _as_array(v)
        return paddle.to_tensor(a.astype(np.float64) if np.issubdtype(a.dtype, np.floating)
                                else a, place=place)

    return _map_tree(value, one)


def paddle_float64(paddle_model: Any, state: Optional[Mapping[str, Any]], batch: Any,
                   loss_fn: Callable[..., Any], *, stats: bool) -> dict[str, np.ndarray]:
    """One float64 forward and backward of the Paddle model set to ``state`` (its own state
    where None) on ``batch``: ``step0/logits...``, ``step0/loss``, ``step0/grad/<name>`` and,
    with ``stats``, ``step0/stat/<name>`` (BatchNorm statistics the forward pass updated), as
    ``align_train`` records them. The model is cast in place, not copied: a copy would lose the
    hooks registered on its tensors (``copy.deepcopy`` drops a gradient hook), which are the
    port's code; its state, dtype and hooks are put back (its gradients are cleared). Raises
    ``Unsupported`` where it holds floating tensors other than float32."""
    loss64 = float64_loss(loss_fn)
    place = _paddle_place(paddle_model)
    inputs, labels = _split_batch(batch, 0)
    args, kwargs = _split_inputs(inputs)
    got: dict[str, np.ndarray] = {}
    with _in_float64(paddle_model, state):
        out = paddle_model(*_to_paddle64(args, place), **_to_paddle64(kwargs, place))
        loss = _call_loss(loss64, out, _to_paddle64(labels, place))
        loss.backward()
        _flatten(out, "step0/logits", got)
        got["step0/loss"] = np.asarray(loss.numpy()).reshape(())
        for name, p in paddle_model.named_parameters():
            if not p.stop_gradient and p.grad is not None:
                got[f"step0/grad/{name}"] = np.array(p.grad.numpy())
        if stats:
            for name, value in paddle_model.state_dict().items():
                if getattr(value, "stop_gradient", True):
                    got[f"step0/stat/{name}"] = np.array(value.numpy())
    return got


@contextlib.contextmanager
def _in_float64(paddle_model: Any, state: Optional[Mapping[str, Any]]) -> Iterator[None]:
    """The Paddle model set to ``state`` (its own where None), its gradients cleared and its
    floating tensors cast to float64 in place for the block; its state, dtype and hooks put
    back after (``NotRestored`` where they cannot be). Raises ``Unsupported`` before anything
    changes where it cannot be cast (``_castable``)."""
    saved = {k: v.detach().clone() for k, v in _castable(paddle_model).items()}
    try:
        if state is not None:
            paddle_model.set_state_dict({k: np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                                         for k, v in state.items()})
        paddle_model.clear_gradients()
        _cast_floating(paddle_model, "float64")
        yield
    finally:
        try:
            paddle_model.clear_gradients()
            _cast_floating(paddle_model, "float32")
            paddle_model.set_state_dict(saved)
        except Exception as e:
            raise NotRestored(f"the Paddle model could not be put back after its float64 run "
                              f"({type(e).__name__}: {e})") from e


# what an optimizer builds for the parameters it steps, set aside for a float64 run and put
# back after: its moments and step counts (created again, in float64, for the parameters cast),
# its learning rate tensor (created in the dtype of ``_dtype``), its master weights
_OPTIMIZER_STATE = ("_accumulators", "_already_create_accumulator", "_accumulators_holder",
                    "_master_weights", "_learning_rate_map", "_dtype")


def paddle_float64_run(paddle_model: Any, optimizer: Any, state: Mapping[str, Any],
                       steps: Callable[[], None]) -> None:
    """Run ``steps()`` (the port's training steps, in the caller's logger) with the Paddle model
    set to ``state`` and cast to float64 in place, and ``optimizer`` stepping it from a fresh
    state in float64 (its accumulators made again, its learning rate in float64); then the
    model's state, dtype and hooks, and the optimizer's own state, are put back. Raises
    ``Unsupported`` where the model holds floating tensors other than float32 or the optimizer
    keeps state this cannot set aside."""
    import collections

    import paddle

    from .forcing import Unsupported

    missing = [a for a in _OPTIMIZER_STATE if not hasattr(optimizer, a)]
    if missing:
        raise Unsupported(f"the Paddle optimizer {type(optimizer).__name__} keeps no "
                          f"{', '.join(missing)} to set aside for a float64 run")
    kept = {a: getattr(optimizer, a) for a in _OPTIMIZER_STATE}
    default = paddle.get_default_dtype()
    with _in_float64(paddle_model, state):
        try:
            optimizer._accumulators = collections.defaultdict(dict)
            optimizer._already_create_accumulator = set()
            optimizer._accumulators_holder = {}
            optimizer._master_weights = {}
            optimizer._learning_rate_map = {}
            optimizer._dtype = paddle.float64
            paddle.set_default_dtype("float64")
            steps()
        finally:
            paddle.set_default_dtype(default)
            for a, v in kept.items():
                setattr(optimizer, a, v)


def _castable(paddle_model: Any) -> Any:
    """The Paddle model's state dict, where it can be cast to float64 in place and back;
    ``Unsupported`` saying why not where it holds floating tensors other than float32, or its
    Layer has no ``_apply``."""
    import paddle

    from .forcing import Unsupported

    tensors = paddle_model.state_dict()
    odd = sorted({str(v.dtype).replace("paddle.", "") for v in tensors.values()
                  if v.dtype in (paddle.float16, paddle.bfloat16, paddle.float64)})
    if odd:
        raise Unsupported(f"the Paddle model holds {', '.join(odd)} tensors: it is cast to "
                          "float64 and back to float32 in place")
    if not callable(getattr(paddle_model, "_apply", None)) or \
            not callable(getattr(paddle_model, "_transform", None)):
        raise Unsupported("this Paddle's Layer has no _apply to cast its floating tensors with")
    return tensors


def float64_batches(batches: Any) -> Any:
    """``batches`` with their floating arrays in float64 (labels and ids as they are)."""
    def one(v: Any) -> Any:
        a = _as_array(v)
        return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

    return _map_tree(list(batches), one)


def float64_loss(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A Paddle loss layer holding tensors (class weights) copied to float64; else as it is."""
    import paddle

    if isinstance(loss_fn, paddle.nn.Layer) and loss_fn.state_dict():
        loss64 = copy.deepcopy(loss_fn)
        loss64.to(dtype="float64")
        return loss64
    return loss_fn


def rescued_later(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                  noise: Mapping[str, Any], port64: Mapping[str, Any],
                  forced: Collection[int]) -> Any:
    """``result`` with each failing calibrated key of a step after the first, run free on both
    sides (not one of ``forced``, judged from the reference's state), relabelled ``"known"``
    where ``port64`` (the port's own float64 run over the same steps) agrees with the
    reference's float64 run within the reference's float32 noise: the two float32 runs part by
    their own rounding, which Adam carries from step to step; a bug stays in the float64 runs
    at full size."""
    from .forcing import _step_of

    def later(kr: Any) -> bool:
        step = _step_of(kr.key)
        return step not in (None, 0) and step not in forced and _candidate(kr, later=True)

    return _relabelled(result, ref, other, noise, port64, later,
                       "run in float64 over the same steps")


class NotRestored(ReprodError):
    """The model a float64 run cast could not be put back as it was: never passed over."""


def _cast_floating(paddle_model: Any, dtype: str) -> None:
    """The model's floating parameters and buffers cast in place, the others left as they are:
    ``Layer.to(dtype=...)`` casts every tensor, so a bool causal mask (PaddleNLP's CodeGen and
    GPT-J) or an int64 ``position_ids`` came back float32, and the port then computed otherwise
    or failed."""
    import paddle

    floating = (paddle.float32, paddle.float64)

    def cast(t: Any, device: Any, to: Any, blocking: Any) -> Any:
        return paddle_model._transform(t, device, to, blocking) if t.dtype in floating else t

    paddle_model._apply(cast, None, dtype, None)


def _candidate(kr: Any, later: bool = False) -> bool:
    """A failing calibrated key of what a forward and backward pass make (``later``: and a
    step's update, its weights and optimizer state, which a run over the steps makes too)."""
    kind = kr.key.split("/", 2)[1] if kr.key.count("/") else ""
    kinds = _KINDS + ("param", "opt") if later else _KINDS
    return (not kr.passed and kr.status in ("failed", "mismatch") and kind in kinds
            and kr.noise_multiple is not None)


def needed(result: Any) -> bool:
    """Whether ``result`` (a one-step result under ``step0/`` keys) holds a key a float64 run of
    the port could put down to its rounding."""
    return any(_candidate(kr) for kr in result.results if kr.key.startswith("step0/"))


def rescued(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
            noise: Mapping[str, Any], port64: Mapping[str, Any]) -> Any:
    """``result`` with each failing calibrated key of ``port64`` (``paddle_float64``'s) that
    both sides' float32 rounding makes relabelled ``"known"``."""
    return _relabelled(result, ref, other, noise, port64, _candidate,
                       "run again in float64 from the same state")


def _relabelled(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                noise: Mapping[str, Any], port64: Mapping[str, Any],
                taken: Callable[[Any], bool], run: str) -> Any:
    """``result`` with each key ``taken`` says to look at, and that every record holds,
    relabelled ``"known"`` where ``port_rounding`` puts its difference down to both sides'
    rounding (``run``: how the port's float64 values were made, for the reason)."""
    out, changed = [], False
    for kr in result.results:
        key = kr.key
        if not taken(kr) or not all(key in d for d in (ref, other, noise, port64)):
            out.append(kr)
            continue
        found = port_rounding(ref[key], other[key], noise[key], port64[key])
        if found is None:  # the float64 runs differ too: another function, not rounding
            out.append(kr)
            continue
        changed = True
        out.append(dataclasses.replace(
            kr, passed=True, status="known", reason=f"{found.reason(run)}; {kr.reason}"))
    return dataclasses.replace(result, results=tuple(out)) if changed else result
