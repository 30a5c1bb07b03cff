"""Run a torch model and its Paddle port side by side and compare what they compute: the forward
pass, and N training steps (logits, loss, learning rate, gradients, updated weights).

Both sides are recorded with Paddle names and Paddle layout (torch Linear weights and their
gradients transposed), through the same rules as ``torch_to_paddle``, so that one ``reprod.compare``
pairs them key by key.

With ``calibrate=True`` a float64 copy of the torch model runs beside it and its dump is the noise
reference of ``reprod.compare(..., noise=)``: every key is judged as a multiple of the float32
reference's own rounding noise instead of by an absolute threshold.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import inspect
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

from ..adapters import to_numpy
from ..errors import KeyMismatchError, ReprodError
from ..logger import ReprodLogger
from .rules import ConversionRules, KeyPlan, linear_weight_names, plan_conversion
from .structure import compare_structure

__all__ = ["align_forward", "align_train", "noise_multiples", "KNOWN_DIFFERENCES"]

PathLike = Union[str, "os.PathLike[str]"]

# (glob over keys, explanation) offered as the note of a failing key: framework differences a
# porter meets, measured on torch 2.x / Paddle 3.x.
KNOWN_DIFFERENCES: tuple[tuple[str, str], ...] = (
    (
        "*/stat/*_variance",
        "in training Paddle updates the running variance with the biased batch "
        "variance, torch with the unbiased one (ratio n/(n-1) per update); the forward pass is not affected",
    ),
    ("*/stat/*_mean", "check BatchNorm momentum: Paddle's momentum is torch's 1 - momentum"),
    (
        "*/lr",
        "the learning rates differ: check that the Paddle scheduler mirrors the torch one "
        "(StepDecay/StepLR: same step_size and gamma) and that both are stepped once per step",
    ),
)


# --- small helpers ----------------------------------------------------------------------------


def _flatten(value: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Model outputs (a tensor, or tuples/lists/dicts of them) -> flat ``prefix/...`` keys."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}/{i}", out)
    elif value is not None:
        out[prefix] = to_numpy(value, key=prefix).array


def _split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How inputs are passed to a model: a mapping as keyword arguments, a tuple/list as positional
    arguments, anything else as the one positional argument."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _map_tree(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, Mapping):
        return {k: _map_tree(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tree(v, fn) for v in value)
    if value is None:
        return None
    return fn(value)


def _as_array(value: Any) -> np.ndarray:
    return to_numpy(value, key="<input>").array


def _torch_device(model: Any) -> Any:
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_torch(value: Any, device: Any, *, float64: bool = False) -> Any:
    """numpy arrays (or tensors) -> torch tensors on ``device``; with ``float64``, floating ones
    (float16/bfloat16/float32) in float64 (integer and boolean ones as they are)."""
    import torch

    def one(v: Any) -> Any:
        t = torch.from_numpy(np.array(_as_array(v))).to(device)
        return t.double() if float64 and t.is_floating_point() else t

    return _map_tree(value, one)


def _paddle_place(model: Any) -> Any:
    for p in model.parameters():
        return p.place
    return None


def _to_paddle(value: Any, place: Any) -> Any:
    import paddle

    return _map_tree(value, lambda v: paddle.to_tensor(_as_array(v), place=place))


@contextlib.contextmanager
def _modes(torch_model: Any, paddle_model: Any, *, train: Optional[bool]) -> Iterator[None]:
    """Put both models in train/eval mode (``None``: leave them) and restore every sub-layer's mode."""
    saved_t = [(m, m.training) for m in torch_model.modules()]
    saved_p = [(m, m.training) for m in paddle_model.sublayers(include_self=True)]
    try:
        if train is not None:
            torch_model.train(train)
            paddle_model.train() if train else paddle_model.eval()
        yield
    finally:
        for m, t in saved_t:
            m.training = t
        for m, t in saved_p:
            m.training = t


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed both frameworks and ask CUDA for deterministic kernels; restore the cuDNN flags after."""
    import paddle
    import torch

    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        paddle.set_flags({"FLAGS_cudnn_deterministic": True})
    except (ValueError, RuntimeError):  # CPU builds may not know the flag
        pass
    torch.manual_seed(seed)
    paddle.seed(seed)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def _torch_params_plan(torch_model: Any, rules: Optional[ConversionRules]) -> dict[str, KeyPlan]:
    sd = torch_model.state_dict()
    plan = plan_conversion(
        {k: tuple(v.shape) for k, v in sd.items()},
        linear_weights=linear_weight_names(torch_model),
        rules=rules,
    )
    return {p.torch_name: p for p in plan}


def _torch_array(value: Any, plan: KeyPlan) -> np.ndarray:
    arr = to_numpy(value, key=plan.torch_name).array
    return np.ascontiguousarray(arr.T) if plan.action == "transpose" else arr


def _check_structure(torch_model: Any, paddle_model: Any, rules: Optional[ConversionRules]) -> None:
    report = compare_structure(torch_model, paddle_model, rules=rules)
    bad = [r for r in report.problems if r.status in ("missing", "extra", "shape")]
    if bad:
        listed = "; ".join(f"{r.paddle_name or r.torch_name} ({r.note})" for r in bad)
        raise KeyMismatchError(f"the Paddle model does not mirror the torch model: {listed}")


def _check_no_dropout(torch_model: Any, paddle_model: Any) -> None:
    """Dropout draws different masks in each framework: in train mode nothing would align."""
    found = []
    for side, layers in (
        ("torch", torch_model.named_modules()),
        ("paddle", paddle_model.named_sublayers()),
    ):
        for name, m in layers:
            if "Dropout" in type(m).__name__ and m.training and float(getattr(m, "p", 0) or 0) > 0:
                found.append(f"{side} {name or type(m).__name__} (p={float(m.p):g})")
    if found:
        raise ReprodError(
            f"dropout is active in train mode and draws different random masks in each framework: "
            f"{', '.join(found)}; build the models with dropout 0 for alignment, or call .eval() on "
            "those layers"
        )


def _check_noise_factor(calibrate: bool, noise_factor: Optional[float]) -> None:
    if noise_factor is not None and not calibrate:
        raise ReprodError(
            "noise_factor needs calibrate=True (it scales the float64 reference's noise)"
        )


def _check_scalar_loss(loss: Any, side: str, step: int) -> Any:
    if isinstance(loss, Mapping):  # reprod_log's loss functions return {"loss": tensor, ...}
        if "loss" not in loss:
            raise ReprodError(
                f"{side}_loss_fn returned a dict without a 'loss' entry at step {step}"
            )
        loss = loss["loss"]
    shape = tuple(getattr(loss, "shape", ()))
    if not hasattr(loss, "backward"):
        raise ReprodError(
            f"{side}_loss_fn returned a {type(loss).__name__} at step {step}; it must "
            "return a scalar tensor"
        )
    if int(np.prod(shape)) != 1:
        raise ReprodError(
            f"{side}_loss_fn returned a tensor of shape {list(shape)} at step {step}; it "
            "must return a scalar (reduce it with .mean() or .sum())"
        )
    return loss


def _split_batch(batch: Any, step: int) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ReprodError(
        f"batch {step} is a {type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; each "
        "batch must be an (inputs, labels) pair (labels may be None)"
    )


def _call_loss(loss_fn: Callable[..., Any], out: Any, labels: Any) -> Any:
    return loss_fn(out) if labels is None else loss_fn(out, labels)


def _with_notes(result: Any) -> Any:
    """Offer known framework differences as the note of the failing keys they may explain."""
    results = []
    changed = False
    for r in result.results:
        if not r.passed:
            for pattern, why in KNOWN_DIFFERENCES:
                if fnmatch.fnmatchcase(r.key, pattern):
                    r = dataclasses.replace(r, note=f"{r.note}; {why}" if r.note else why)
                    changed = True
                    break
        results.append(r)
    return dataclasses.replace(result, results=tuple(results)) if changed else result


def _finish(
    torch_log: ReprodLogger,
    paddle_log: ReprodLogger,
    *,
    out_dir: Optional[PathLike],
    name: str,
    method: Any,
    threshold: float,
    atol: Optional[float],
    rtol: Optional[float],
    per_key: Any,
    verbose: bool,
    noise_log: Optional[ReprodLogger] = None,
    noise_factor: Optional[float] = None,
) -> Any:
    from ..diff.engine import compare

    calibrated: dict[str, Any] = {}
    if noise_log is not None:
        calibrated = {"noise": noise_log.data}
        if noise_factor is not None:
            calibrated["noise_factor"] = noise_factor
    result = _with_notes(
        compare(
            torch_log.data,
            paddle_log.data,
            method=method,
            threshold=threshold,
            atol=atol,
            rtol=rtol,
            per_key=per_key,
            **calibrated,
        )
    )
    if noise_log is not None:
        worst = noise_multiples(result, default_group=name)
        options = dict(result.options, noise="torch float64", noise_multiple=worst)
        result = dataclasses.replace(result, options=options)
    if out_dir is not None:
        out = os.fspath(out_dir)
        os.makedirs(out, exist_ok=True)
        torch_log.save(os.path.join(out, f"{name}_torch.npy"))
        paddle_log.save(os.path.join(out, f"{name}_paddle.npy"))
        if noise_log is not None:
            noise_log.save(os.path.join(out, f"{name}_torch64.npy"))
        _write_diff_log(result, os.path.join(out, f"{name}_diff.log"), verbose=verbose)
    if verbose and noise_log is not None:
        print(_noise_summary(result), flush=True)
    return result


_STEP = re.compile(r"step_?\d+")


def noise_multiples(result: Any, *, default_group: str = "all") -> dict[str, dict[str, Any]]:
    """The worst noise multiple of each step of a calibrated result: ``{"step0": {"multiple": 2.4,
    "key": "step0/grad/fc1.weight"}, ...}``. Keys are grouped by their first ``/`` segment when it
    is ``step<N>`` or ``step_<N>`` (``align_train``'s keys, reprod_log's training dumps), all
    others under ``default_group``; keys the noise reference did not calibrate are left out.
    ``align_forward``/``align_train`` with ``calibrate=True`` put this in
    ``result.options["noise_multiple"]``.
    """
    worst: dict[str, dict[str, Any]] = {}
    for r in result:
        if r.noise_multiple is None:
            continue
        head = r.key.split("/", 1)[0]
        group = head if _STEP.fullmatch(head) else default_group
        seen = worst.get(group)
        # NaN compares False: a NaN multiple (never produced by the engine) would not hide others
        if seen is None or r.noise_multiple > seen["multiple"]:
            worst[group] = {"multiple": float(r.noise_multiple), "key": r.key}
    return worst


def _noise_summary(result: Any) -> str:
    """One line: the worst noise multiple per step and the factor a key may reach."""
    from ..messages import fmt_multiple

    factor = result.options.get("noise_factor")
    parts = [
        f"{group} {fmt_multiple(w['multiple'])} ({w['key']})"
        for group, w in result.options.get("noise_multiple", {}).items()
    ]
    return (
        f"worst noise multiple (a key passes up to {fmt_multiple(factor)}): "
        + ("; ".join(parts) if parts else "no key calibrated")
    )


def _write_diff_log(result: Any, log_path: str, *, verbose: bool) -> None:
    """The reprod_log-style log the porting tutorials ask for, with ``ReprodDiffHelper``'s lines,
    rendered from the very result returned (so per-key thresholds and atol/rtol show in it too)."""
    from ..report.log import emit_log_lines, render_log

    lines = render_log(result)
    # The records would also reach the root logger, where importing paddle installs a stderr
    # handler: unless asked to be verbose, a training run's hundreds of keys go to the file only.
    emit_log_lines(lines, log_path, console=verbose, propagate=verbose)


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
    return twin.double()


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


# --- forward ------------------------------------------------------------------------------------


def align_forward(
    torch_model: Any,
    paddle_model: Any,
    inputs: Any,
    *,
    out_dir: Optional[PathLike] = None,
    threshold: float = 1e-5,
    method: Any = "mean",
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_key: Any = None,
    seed: int = 0,
    verbose: bool = False,
    calibrate: bool = False,
    noise_factor: Optional[float] = None,
) -> Any:
    """Run both models in eval mode on the same inputs and compare their outputs.

    ``inputs``: numpy arrays (or tensors): one array, a tuple/list (positional arguments) or a dict
    (keyword arguments). Outputs are recorded as ``logits`` (``logits/0``, ``logits/<name>`` for
    tuples and dicts). With ``out_dir``, writes ``forward_torch.npy``, ``forward_paddle.npy`` and the
    reprod_log-style ``forward_diff.log`` (also printed with ``verbose``). The models' train/eval
    modes are restored afterwards.
    Returns ``reprod.compare``'s ``DiffResult`` (torch is the reference).

    ``calibrate=True``: a deep copy of the torch model cast to float64 (``.double()``: weights and
    BatchNorm statistics) runs on the same inputs (floating ones cast to float64), and its outputs
    are the noise reference of ``reprod.compare(..., noise=)``: each key passes when the Paddle
    output differs from the torch one by at most ``noise_factor`` (default 20) times the torch
    output's own distance from float64, whatever ``threshold`` says (``KeyResult.noise_multiple``).
    It costs one float64 forward pass and a second copy of the torch model. The worst multiple is
    in ``result.options["noise_multiple"]`` (``{"forward": {"multiple": ..., "key": ...}}``);
    ``out_dir`` also gets ``forward_torch64.npy`` (``reprod-diff forward_torch.npy
    forward_paddle.npy --noise forward_torch64.npy`` reproduces the verdicts).

    >>> load_into_paddle(paddle_model, torch_model)
    >>> r = align_forward(torch_model, paddle_model, {"x": x}, out_dir="result")
    >>> r.passed
    True
    """
    import paddle
    import torch

    _check_noise_factor(calibrate, noise_factor)
    torch_log, paddle_log = ReprodLogger(), ReprodLogger()
    noise_log = ReprodLogger() if calibrate else None
    args, kwargs = _split_inputs(inputs)
    outs: list[tuple[ReprodLogger, Any]] = []
    with _modes(torch_model, paddle_model, train=False), _deterministic(seed):
        dev = _torch_device(torch_model)
        with torch.no_grad():
            torch.manual_seed(seed)
            outs.append((torch_log, torch_model(*_to_torch(args, dev), **_to_torch(kwargs, dev))))
            if noise_log is not None:
                twin = _float64_twin(torch_model)  # in eval mode, as the original is now
                torch.manual_seed(seed)
                args64 = _to_torch(args, dev, float64=True)
                outs.append((noise_log, twin(*args64, **_to_torch(kwargs, dev, float64=True))))
                del twin
        place = _paddle_place(paddle_model)
        with paddle.no_grad():
            out_p = paddle_model(*_to_paddle(args, place), **_to_paddle(kwargs, place))
            outs.append((paddle_log, out_p))
    for log, out in outs:
        flat: dict[str, np.ndarray] = {}
        _flatten(out, "logits", flat)
        for k, v in flat.items():
            log.add(k, v)
    return _finish(
        torch_log,
        paddle_log,
        out_dir=out_dir,
        name="forward",
        method=method,
        threshold=threshold,
        atol=atol,
        rtol=rtol,
        per_key=per_key,
        verbose=verbose,
        noise_log=noise_log,
        noise_factor=noise_factor,
    )


# --- training -----------------------------------------------------------------------------------


def _check_repeatable_torch(model: Any, args: Any, kwargs: Any) -> bool:
    import torch

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        a, b = model(*args, **kwargs), model(*args, **kwargs)
    model.load_state_dict(saved)  # undo the BatchNorm statistics the probe updated
    return _same(a, b)


def _check_repeatable_paddle(model: Any, args: Any, kwargs: Any) -> bool:
    import paddle

    saved = {k: paddle.to_tensor(v.numpy()) for k, v in model.state_dict().items()}
    with paddle.no_grad():
        a, b = model(*args, **kwargs), model(*args, **kwargs)
    model.set_state_dict(saved)
    return _same(a, b)


def _same(a: Any, b: Any) -> bool:
    fa: dict[str, np.ndarray] = {}
    fb: dict[str, np.ndarray] = {}
    _flatten(a, "o", fa)
    _flatten(b, "o", fb)
    return fa.keys() == fb.keys() and all(
        np.allclose(fa[k], fb[k], rtol=1e-6, atol=1e-7, equal_nan=True) for k in fa
    )


def _torch_steps(
    model: Any,
    batches: Sequence[Any],
    n: int,
    *,
    loss_fn: Callable[..., Any],
    optimizer: Any,
    scheduler: Any,
    plan: dict[str, KeyPlan],
    stats: bool,
    log: ReprodLogger,
    float64: bool = False,
    reseed: Optional[int] = None,
    hyper_out: Optional[list[list[dict[str, Any]]]] = None,
    hyper_in: Optional[Sequence[Sequence[Mapping[str, Any]]]] = None,
) -> None:
    """``float64``: cast floating inputs and labels to float64. ``reseed``: seed torch with
    ``reseed + i`` before step i's forward pass. ``hyper_out`` receives each step's param-group
    hyperparameters (lr, momentum, betas...) as the step starts; ``hyper_in`` sets them (the
    float64 run follows the float32 run's scheduler, whatever its class)."""
    import torch

    dev = _torch_device(model)
    buffers = {name for name, _ in model.named_buffers()}
    for i in range(n):
        inputs, labels = _split_batch(batches[i % len(batches)], i)
        args, kwargs = _split_inputs(inputs)
        if hyper_in is not None:
            for group, saved in zip(optimizer.param_groups, hyper_in[i]):
                group.update(copy.deepcopy(dict(saved)))
        if hyper_out is not None:
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            hyper_out.append(copy.deepcopy(hyper))
        optimizer.zero_grad()
        if reseed is not None:
            torch.manual_seed(reseed + i)
        args_t = _to_torch(args, dev, float64=float64)
        out = model(*args_t, **_to_torch(kwargs, dev, float64=float64))
        labels_t = _to_torch(labels, dev, float64=float64)
        loss = _check_scalar_loss(_call_loss(loss_fn, out, labels_t), "torch", i)
        loss.backward()
        flat: dict[str, np.ndarray] = {}
        _flatten(out, f"step{i}/logits", flat)
        for k, v in flat.items():
            log.add(k, v)
        log.add(f"step{i}/loss", loss.reshape(()))
        log.add(f"step{i}/lr", np.float64(optimizer.param_groups[0]["lr"]))
        for name, p in model.named_parameters():
            kp = plan.get(name)
            if p.grad is not None and kp is not None and kp.paddle_name is not None:
                log.add(f"step{i}/grad/{kp.paddle_name}", _torch_array(p.grad, kp))
        optimizer.step()
        for name, value in model.state_dict().items():
            kp = plan.get(name)
            if kp is None or kp.paddle_name is None:
                continue
            if name in buffers:
                if stats:
                    log.add(f"step{i}/stat/{kp.paddle_name}", _torch_array(value, kp))
            else:
                log.add(f"step{i}/param/{kp.paddle_name}", _torch_array(value, kp))
        if scheduler is not None:
            scheduler.step()


def _paddle_steps(
    model: Any,
    batches: Sequence[Any],
    n: int,
    *,
    loss_fn: Callable[..., Any],
    optimizer: Any,
    scheduler: Any,
    stats: bool,
    log: ReprodLogger,
) -> None:
    place = _paddle_place(model)
    for i in range(n):
        inputs, labels = _split_batch(batches[i % len(batches)], i)
        args, kwargs = _split_inputs(inputs)
        optimizer.clear_grad()
        out = model(*_to_paddle(args, place), **_to_paddle(kwargs, place))
        loss = _check_scalar_loss(_call_loss(loss_fn, out, _to_paddle(labels, place)), "paddle", i)
        loss.backward()
        flat: dict[str, np.ndarray] = {}
        _flatten(out, f"step{i}/logits", flat)
        for k, v in flat.items():
            log.add(k, v)
        log.add(f"step{i}/loss", loss.reshape([]))
        log.add(f"step{i}/lr", np.float64(optimizer.get_lr()))
        for name, p in model.named_parameters():
            if not p.stop_gradient and p.grad is not None:
                log.add(f"step{i}/grad/{name}", p.grad)
        optimizer.step()
        # Paddle keeps BatchNorm statistics as stop_gradient parameters: they are torch's buffers
        for name, value in model.state_dict().items():
            if getattr(value, "stop_gradient", True):
                if stats:
                    log.add(f"step{i}/stat/{name}", value)
            else:
                log.add(f"step{i}/param/{name}", value)
        if scheduler is not None:
            scheduler.step()


def align_train(
    torch_model: Any,
    paddle_model: Any,
    batches: Sequence[Any],
    *,
    torch_loss_fn: Callable[..., Any],
    paddle_loss_fn: Callable[..., Any],
    torch_optimizer: Any,
    paddle_optimizer: Any,
    torch_scheduler: Any = None,
    paddle_scheduler: Any = None,
    steps: Optional[int] = None,
    out_dir: Optional[PathLike] = None,
    threshold: float = 1e-5,
    method: Any = "mean",
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_key: Any = None,
    rules: Optional[ConversionRules] = None,
    stats: bool = True,
    check_determinism: bool = True,
    seed: int = 0,
    verbose: bool = False,
    calibrate: bool = False,
    noise_factor: Optional[float] = None,
) -> Any:
    """Train both models for ``steps`` steps on the same batches and compare, per step, the logits,
    the loss, the learning rate, every parameter's gradient and every updated parameter.

    ``batches``: a sequence of ``(inputs, labels)`` pairs of numpy arrays (inputs as in
    ``align_forward``; labels may be None); with ``steps`` larger than ``len(batches)`` the batches
    are reused in order (``[batch] * 1`` trains three times on one batch with ``steps=3``). Each step
    calls ``loss_fn(outputs, labels)``, which must return a scalar, then backward, optimizer step,
    scheduler step. Keys: ``step0/logits``, ``step0/loss``, ``step0/lr`` (param group 0, before the
    step), ``step0/grad/<name>``, ``step0/param/<name>`` and, with ``stats``, ``step0/stat/<name>``
    (BatchNorm statistics), all with Paddle names and Paddle layout. Failing keys that a known
    framework difference may explain carry it as their ``note``.

    The models stay in the mode they are in (train mode uses batch statistics in BatchNorm); active
    dropout, and with ``check_determinism`` any other randomness in the forward pass, raises
    ``ReprodError``. With ``out_dir``, writes ``train_torch.npy``, ``train_paddle.npy`` and
    ``train_diff.log`` (also printed with ``verbose``).

    ``calibrate=True`` judges every key against the torch model's own float32 noise: before
    training, a deep copy of the torch model is cast to float64 (weights and BatchNorm statistics),
    and a float64 copy of the torch optimizer is built over it (same class, param groups and
    hyperparameters, its state copied and cast; torch.optim.SGD, Adam and AdamW are supported, and
    any optimizer that rebuilds from its param groups, ``defaults`` and ``state_dict``). It trains
    on the same batches (floating inputs and labels cast to float64; a loss ``nn.Module`` is copied
    to float64, a loss function is called as it is), follows the torch run's learning rate and
    other hyperparameters step by step (so any scheduler works), and records the same keys; torch
    is seeded with ``seed + i`` before step i's forward pass in both runs. Those float64 values
    are the ``noise`` of ``reprod.compare``: a key passes when it is within ``noise_factor``
    (default 20) times the torch value's own distance from float64 (``KeyResult.noise_multiple``),
    whatever ``threshold`` says. The cost is one float64 forward/backward/update per step and a
    second copy of the model and optimizer state. ``result.options["noise_multiple"]`` holds the
    worst multiple of each step (``{"step0": {"multiple": 2.4, "key": "step0/grad/fc1.weight"}}``,
    see ``noise_multiples``), also printed with ``verbose``; ``out_dir`` also gets
    ``train_torch64.npy``. The BatchNorm running variance keeps its known difference (above).

    >>> r = align_train(tm, pm, [(x, y)], steps=3,
    ...                 torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
    ...                 torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9),
    ...                 paddle_optimizer=paddle.optimizer.Momentum(0.1, 0.9, parameters=pm.parameters()))
    >>> r.passed, r.first_failure
    """
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)) or len(batches) == 0:
        raise ReprodError("batches must be a non-empty list of (inputs, labels) pairs")
    n = len(batches) if steps is None else int(steps)
    if n < 1:
        raise ReprodError(f"steps must be at least 1, got {steps}")
    _check_noise_factor(calibrate, noise_factor)
    if bool(torch_model.training) != bool(paddle_model.training):
        modes = {True: "train", False: "eval"}
        raise ReprodError(
            f"the torch model is in {modes[bool(torch_model.training)]} mode and the Paddle "
            f"model in {modes[bool(paddle_model.training)]} mode; put both in the same mode"
        )
    _check_structure(torch_model, paddle_model, rules)
    if torch_model.training:
        _check_no_dropout(torch_model, paddle_model)
    plan = _torch_params_plan(torch_model, rules)
    if check_determinism and torch_model.training:
        _check_determinism(torch_model, paddle_model, batches[0], seed)

    torch_log, paddle_log = ReprodLogger(), ReprodLogger()
    noise_log = ReprodLogger() if calibrate else None
    hyper: Optional[list[list[dict[str, Any]]]] = None
    if calibrate:  # copied before the float32 run changes weights, statistics and optimizer state
        twin = _float64_twin(torch_model)
        twin_opt = _float64_optimizer(torch_optimizer, torch_model, twin)
        hyper = []
    with _deterministic(seed):
        _torch_steps(
            torch_model,
            batches,
            n,
            loss_fn=torch_loss_fn,
            optimizer=torch_optimizer,
            scheduler=torch_scheduler,
            plan=plan,
            stats=stats,
            log=torch_log,
            reseed=seed if calibrate else None,
            hyper_out=hyper,
        )
    if calibrate:
        assert noise_log is not None and hyper is not None
        with _deterministic(seed):
            _torch_steps(
                twin,
                batches,
                n,
                loss_fn=_float64_loss(torch_loss_fn),
                optimizer=twin_opt,
                scheduler=None,
                plan=plan,
                stats=stats,
                log=noise_log,
                float64=True,
                reseed=seed,
                hyper_in=hyper,
            )
        del twin, twin_opt
    with _deterministic(seed):
        _paddle_steps(
            paddle_model,
            batches,
            n,
            loss_fn=paddle_loss_fn,
            optimizer=paddle_optimizer,
            scheduler=paddle_scheduler,
            stats=stats,
            log=paddle_log,
        )
    return _finish(
        torch_log,
        paddle_log,
        out_dir=out_dir,
        name="train",
        method=method,
        threshold=threshold,
        atol=atol,
        rtol=rtol,
        per_key=per_key,
        verbose=verbose,
        noise_log=noise_log,
        noise_factor=noise_factor,
    )


def _check_determinism(torch_model: Any, paddle_model: Any, batch: Any, seed: int) -> None:
    inputs, _ = _split_batch(batch, 0)
    args, kwargs = _split_inputs(inputs)
    with _deterministic(seed):
        dev = _torch_device(torch_model)
        place = _paddle_place(paddle_model)
        for side, ok in (
            (
                "torch",
                lambda: _check_repeatable_torch(
                    torch_model, _to_torch(args, dev), _to_torch(kwargs, dev)
                ),
            ),
            (
                "paddle",
                lambda: _check_repeatable_paddle(
                    paddle_model, _to_paddle(args, place), _to_paddle(kwargs, place)
                ),
            ),
        ):
            if not ok():
                raise ReprodError(
                    f"the {side} model gives different outputs for the same batch twice in train mode: "
                    "its forward pass is random (functional dropout, random augmentation, ...); make it "
                    "deterministic for alignment (or pass check_determinism=False)"
                )
