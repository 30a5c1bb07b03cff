"""Calibration: the torch model again, in float64 (weights, buffers, optimizer state and hyperparameters cast), whose run is the noise reference of the comparison."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

from ..errors import ReprodError

# --- calibration: the torch model again, in float64 ----------------------------------------------


def _float64_twin(torch_model: Any) -> Any:
    """A deep copy of the torch model with every floating parameter and buffer (BatchNorm
    statistics included) in float64; the modes of its sub-modules are the original's."""
    try:
        twin = copy.deepcopy(torch_model)
    except Exception as e:  # a module holding something deepcopy refuses (a lock, a file...)
        raise ReprodError(
            f"calibrate=True runs a float64 copy of the torch model, but copy.deepcopy of "
            f"{type(torch_model).__name__} failed ({type(e).__name__}: {e}); make the model "
            "deep-copyable or compare with reprod.compare(..., noise=) on dumps of your own"
        ) from e
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
