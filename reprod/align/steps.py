"""Run a torch model and its Paddle port side by side and compare what they compute: the forward
pass, and N training steps (logits, loss, learning rate, gradients, updated weights).

Both sides are recorded with Paddle names and Paddle layout (torch Linear weights and their
gradients transposed), through the same rules as ``torch_to_paddle``, so that one ``reprod.compare``
pairs them key by key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

from ..adapters import to_numpy
from ..errors import KeyMismatchError, ReprodError
from ..logger import ReprodLogger
from .rules import ConversionRules, KeyPlan, linear_weight_names, plan_conversion
from .structure import compare_structure

__all__ = ["align_forward", "align_train", "KNOWN_DIFFERENCES"]

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


def _to_torch(value: Any, device: Any) -> Any:
    import torch

    return _map_tree(value, lambda v: torch.from_numpy(np.array(_as_array(v))).to(device))


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
) -> Any:
    from ..diff.engine import compare

    result = _with_notes(
        compare(
            torch_log.data,
            paddle_log.data,
            method=method,
            threshold=threshold,
            atol=atol,
            rtol=rtol,
            per_key=per_key,
        )
    )
    if out_dir is not None:
        out = os.fspath(out_dir)
        os.makedirs(out, exist_ok=True)
        torch_log.save(os.path.join(out, f"{name}_torch.npy"))
        paddle_log.save(os.path.join(out, f"{name}_paddle.npy"))
        _write_diff_log(result, os.path.join(out, f"{name}_diff.log"), verbose=verbose)
    return result


def _write_diff_log(result: Any, log_path: str, *, verbose: bool) -> None:
    """The reprod_log-style log the porting tutorials ask for, with ``ReprodDiffHelper``'s lines,
    rendered from the very result returned (so per-key thresholds and atol/rtol show in it too)."""
    from ..helper import emit_log_lines
    from ..report.log import render_log

    lines = render_log(result)
    # The records would also reach the root logger, where importing paddle installs a stderr
    # handler: unless asked to be verbose, a training run's hundreds of keys go to the file only.
    emit_log_lines(lines, log_path, console=verbose, propagate=verbose)


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
) -> Any:
    """Run both models in eval mode on the same inputs and compare their outputs.

    ``inputs``: numpy arrays (or tensors): one array, a tuple/list (positional arguments) or a dict
    (keyword arguments). Outputs are recorded as ``logits`` (``logits/0``, ``logits/<name>`` for
    tuples and dicts). With ``out_dir``, writes ``forward_torch.npy``, ``forward_paddle.npy`` and the
    reprod_log-style ``forward_diff.log`` (also printed with ``verbose``). The models' train/eval
    modes are restored afterwards.
    Returns ``reprod.compare``'s ``DiffResult`` (torch is the reference).

    >>> load_into_paddle(paddle_model, torch_model)
    >>> r = align_forward(torch_model, paddle_model, {"x": x}, out_dir="result")
    >>> r.passed
    True
    """
    import paddle
    import torch

    torch_log, paddle_log = ReprodLogger(), ReprodLogger()
    args, kwargs = _split_inputs(inputs)
    with _modes(torch_model, paddle_model, train=False), _deterministic(seed):
        dev = _torch_device(torch_model)
        with torch.no_grad():
            out_t = torch_model(*_to_torch(args, dev), **_to_torch(kwargs, dev))
        place = _paddle_place(paddle_model)
        with paddle.no_grad():
            out_p = paddle_model(*_to_paddle(args, place), **_to_paddle(kwargs, place))
    for log, out in ((torch_log, out_t), (paddle_log, out_p)):
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
) -> None:
    dev = _torch_device(model)
    buffers = {name for name, _ in model.named_buffers()}
    for i in range(n):
        inputs, labels = _split_batch(batches[i % len(batches)], i)
        args, kwargs = _split_inputs(inputs)
        optimizer.zero_grad()
        out = model(*_to_torch(args, dev), **_to_torch(kwargs, dev))
        loss = _check_scalar_loss(_call_loss(loss_fn, out, _to_torch(labels, dev)), "torch", i)
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
        )
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
