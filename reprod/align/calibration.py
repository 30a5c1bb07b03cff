"""Calibration: the torch model again, in float64 (weights, buffers, optimizer state and hyperparameters cast), whose run is the noise reference of the comparison."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import numpy as np

from ..errors import ReprodError

# --- calibration: the torch model again, in float64 ----------------------------------------------


def _float64_twin(torch_model: Any) -> Any:
    """A deep copy of the torch model with every floating parameter and buffer (BatchNorm
    statistics included) in float64; the modes of its sub-modules are the original's."""
    twin = _copied(torch_model, "calibrate=True runs a float64 copy of the torch model")
    twin = twin.double()
    # each call of the twin itself, wherever it runs (align_forward, align_train, localisation,
    # the counterfactual and forced steps); always_call: restored when its forward raises too
    twin.register_forward_pre_hook(_enter_float64)
    twin.register_forward_hook(_leave_float64, always_call=True)
    return twin


def _half_twin(torch_model: Any, precision: str, where: str) -> Any:
    """A deep copy of the torch model in ``precision`` (``"float16"``, ``"bfloat16"``): the
    reference of a port that computes in it."""
    import torch

    try:
        return copy.deepcopy(torch_model).to(getattr(torch, precision))
    except Exception as e:
        raise ReprodError(
            f"{where}: the port computes in {precision}, and a {precision} copy of "
            f"{type(torch_model).__name__}, its reference, could not be made "
            f"({type(e).__name__}: {_first_line(e)}); pass precision='float32'") from e


def _half_weights_twin(torch_model: Any, precision: str, keys: Optional[set[str]] = None
                       ) -> Any:
    """The noise reference of a half-precision port: a deep copy of the torch model, in its own
    dtype, whose floating parameters and buffers (those named in ``keys``; every one where
    None) hold their values rounded to ``precision``.

    It computes, nearly exactly, what the half reference and a faithful half port both compute,
    so the half run's distance from it is the rounding of the values alone, which a faithful
    port has of its own. The float32 model, the noise before, was also off by the rounding of
    the weights, which the port shares with the half reference: that noise was tens of times a
    layer's own rounding (91 % at a BatchNorm whose statistics round), and a weight 2 % off
    passed behind it (resnet18 0.84x, BERT 0.81x; caught at 10^4x in float32)."""
    import torch

    twin = _copied(torch_model, f"calibrate=True with a {precision} port runs a copy of the "
                   "torch model")
    with torch.no_grad():
        for name, t in [*twin.named_parameters(), *twin.named_buffers()]:
            if t.is_floating_point() and t.dtype != getattr(torch, precision) \
                    and (keys is None or name in keys):
                t.copy_(t.to(getattr(torch, precision)).to(t.dtype))
    return twin


def _copied(torch_model: Any, what: str) -> Any:
    """A deep copy of the torch model; where it cannot be made, one line saying ``what`` needed
    it and what to do."""
    try:
        return copy.deepcopy(torch_model)
    except Exception as e:  # a module holding something deepcopy refuses (a lock, a file...)
        raise ReprodError(
            f"{what}, but copy.deepcopy of "
            f"{type(torch_model).__name__} failed ({type(e).__name__}: {e}); make the model "
            "deep-copyable or compare with reprod.compare(..., noise=) on dumps of your own"
        ) from e


def _holds_half(value: Any, precision: str) -> bool:
    """Whether a Paddle tensor holds ``precision`` values: in that dtype, or float32 values
    that dtype represents exactly (a port rounded to it and held in float32)."""
    name = str(value.dtype).rpartition(".")[2]
    if name == precision:
        return True
    if name != "float32":
        return False
    a = np.ascontiguousarray(value.numpy())
    if precision == "bfloat16":
        return not np.any(a.view(np.uint32) & np.uint32(0xFFFF))
    with np.errstate(over="ignore", invalid="ignore"):
        back = a.astype(np.float16).astype(np.float32)
    return bool(np.array_equal(back, a, equal_nan=True))


def half_rounded_keys(torch_model: Any, paddle_model: Any, precision: str, rules: Any = None
                      ) -> tuple[Optional[set[str]], str]:
    """Which of the torch model's tensors the half-weights twin rounds, and how that was
    decided, in a few words (``options["half_noise"]``): every one where the port holds all
    its floating tensors in ``precision``; where it holds some in float32 (Paddle's AMP O2
    keeps norm layers' there), those it holds in ``precision``, paired by definition order;
    none where it holds none, or the pairing is refused (the float32 model, the noise as
    before: a port held in float32 rounds its weights where nobody can see)."""
    held = {n: _holds_half(t, precision) for n, t in
            [*paddle_model.named_parameters(), *paddle_model.named_buffers()]
            if str(t.dtype).rpartition(".")[2] in ("float16", "bfloat16", "float32")}
    if held and all(held.values()):
        return None, f"every weight rounded to {precision}"
    if not any(held.values()):
        return set(), "the port holds its weights in float32: none rounded"
    from .by_order import pair_weights_by_order

    try:
        pairs = pair_weights_by_order(torch_model, paddle_model, rules=rules)
    except Exception:  # noqa: BLE001 - a refusal, or a model it cannot read: the noise as before
        return set(), ("the port holds some weights in float32, and they do not pair by "
                       "order: none rounded")
    keys = {t for t, p in pairs.items() if held.get(p)}
    return keys, (f"{len(keys)} of {len(pairs)} weights rounded to {precision}, as the port "
                  "holds them")


def _first_line(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return first if len(first) <= 160 else first[:157] + "..."


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """torch's default dtype float64 inside, the one before restored after (an error too).

    A model's forward pass makes tensors of the default dtype (``torch.tensor(x)``,
    ``torch.full(shape, torch.finfo(h.dtype).min)`` in Hugging Face's causal masks): float32
    beside the twin's float64, and float64's lowest value does not fit float32 ("value cannot
    be converted to type float without overflow", MBart and Pegasus)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


# the default dtype each call of a twin found, restored as the call ends (a stack: a twin's
# call may run inside another's, a sub-module's localisation)
_defaults: list[Any] = []


def _enter_float64(module: Any, args: Any) -> None:
    import torch

    _defaults.append(torch.get_default_dtype())
    torch.set_default_dtype(torch.float64)


def _leave_float64(module: Any, args: Any, output: Any) -> None:
    import torch

    if _defaults:
        torch.set_default_dtype(_defaults.pop())


def uncalibrated(result: Any, why: Optional[str], verbose: bool = False) -> Any:
    """``result`` with ``options["calibration"]["skipped"]`` and its first finding saying why
    a calibrated run was judged without calibration (``why``; None: ``result`` as it is)."""
    if why is None:
        return result
    line = f"calibrate=True: {why}"
    if verbose:
        print(line, flush=True)
    return dataclasses.replace(result, options=dict(
        result.options, calibration={"skipped": why},
        findings=[line, *result.options.get("findings", ())]))


def twin_failed(error: BaseException) -> str:
    """Why a calibrated run is judged without calibration, in one line: its float64 twin's
    error."""
    first = _first_line(error)
    return (f"the float64 copy of the torch model failed ({type(error).__name__}: {first}), "
            "so the run is judged without calibration (a model's own code may make float32 "
            "tensors, torch.full(..., dtype=torch.float32), or refuse float64)")


def _float64_loss(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A loss module holding floating buffers (class weights) gets a float64 copy; a plain
    function is used as it is."""
    import torch

    if isinstance(loss_fn, torch.nn.Module):
        return copy.deepcopy(loss_fn).double()
    return loss_fn


def _constructor_kwargs(cls: type, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` restricted to what ``cls.__init__`` accepts (torch's AdamW keeps
    ``decoupled_weight_decay`` in its defaults but does not take it)."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return dict(defaults)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in sig.parameters}


def _float64_optimizer(optimizer: Any, model: Any, twin: Any) -> Any:
    """The same optimizer class over the twin's parameters: same param groups and hyperparameters,
    and its state (momentum buffers, Adam moments and step counts) copied and cast to float64."""
    by_id = {id(p): p64 for p, p64 in zip(model.parameters(), twin.parameters())}
    groups = []
    for g in optimizer.param_groups:
        try:
            params = [by_id[id(p)] for p in g["params"]]
        except KeyError:
            raise ReprodError(
                "calibrate=True: the torch optimizer updates a tensor that is not a parameter of "
                "the torch model, so the float64 copy cannot mirror it"
            ) from None
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    cls = type(optimizer)
    try:
        twin_opt = cls(groups, **_constructor_kwargs(cls, optimizer.defaults))
        # a deep copy: load_state_dict keeps integer tensors such as Adam's step as they are,
        # and the float64 run would count the float32 run's steps up a second time
        twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    except Exception as e:
        raise ReprodError(
            f"calibrate=True could not build a float64 copy of the torch optimizer {cls.__name__} "
            f"({type(e).__name__}: {e}); torch.optim.SGD, Adam and AdamW are supported, and any "
            "optimizer that rebuilds from its param groups, defaults and state_dict"
        ) from e
    return twin_opt
