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
import os
import re
from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any, Callable, Optional

import numpy as np

from ..diff.criteria import Criteria
from ..diff.noise import DEFAULT_NOISE_FACTOR
from ..errors import ReprodError
from ..logger import ReprodLogger
from . import counterfactual, decay, forcing, port_rounding, settings, spill, twin_sides
from .by_order import by_order_rules
from .calibration import (
    _float64_loss,
    _float64_optimizer,
    _float64_twin,
    float64_default,
    twin_failed,
    uncalibrated,
)
from .calls import trace_settings
from .forward import align_forward
from .framework import (
    _call_loss,
    _check_no_dropout,
    _check_scalar_loss,
    _check_structure,
    _criteria,
    _deterministic,
    _dropouts_off,
    _flatten,
    _log_torch,
    _paddle_place,
    _paddle_view,
    _split_batch,
    _split_inputs,
    _to_paddle,
    _to_torch,
    _torch_array,
    _torch_device,
    _torch_params_plan,
    _torch_view,
    extra_outputs_finding,
    not_compared_outputs,
    pair_outputs,
)
from .fusion import fuse, model_fusions, part_names, split_named, splitting_for_port
from .grad_clip import GradClip, grad_clip_of
from .kinks import KinkCapture
from .localise import localise_forward
from .results import (
    KNOWN_DIFFERENCES,
    PathLike,
    _finish,
    _kink_summary,
    _rounding_summary,
    _write_diff_log,
    noise_multiples,
)
from .rules import (
    ConversionRules,
    KeyPlan,
    active_splits,
    copy_into,
    packed_slices,
    split_attention,
    torch_views,
    unaliased,
    with_aliases,
)
from .train_localise import (
    Snapshot,
    backward_step,
    batch_size_of,
    first_failing_step,
    gradient_not_reaching,
    loss_finding,
    noise_gradients,
    noise_update_line,
    reference_diverged,
    stat_finding,
    state_finding,
    update_finding,
)

__all__ = ["align_forward", "align_train", "noise_multiples", "KNOWN_DIFFERENCES"]

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


def _twin_on_reference_sides(kink: KinkCapture, torch_model: Any, state: Mapping[str, Any],
                             batch: Any, ref: Mapping[str, Any], noise: dict[str, Any], *,
                             loss_fn: Callable[..., Any], seed: int,
                             plan: dict[str, KeyPlan]) -> Optional[dict[str, Any]]:
    """Where the float64 twin took an activation input of step 0 to the other side of a kink
    from the reference, its step-0 gradients (in ``noise``, replaced) from the twin run again
    with those elements on the reference's side (``twin_sides``); what moved, or why nothing
    could, for ``options["twin_sides"]``. None where the twin kept every side.

    Step 0 only: there the twin starts from the reference's own state, so an element on the
    other side is rounding's doing. A later step's twin starts from its own weights, which carry
    every earlier difference (Adam's first update is the sign of each gradient: on
    mobilenet_v2, 142,858 activation inputs of step 1 lay on the other side), and moving those
    would judge the step by a hybrid, not by rounding."""
    if kink.skipped is not None:
        return None
    inputs, moved = twin_sides.moved_inputs(ref, noise, kink._names("torch"),
                                            kink.calls_per_pass(), 0)
    if not inputs:
        return None
    info: dict[str, Any] = {"step": 0, "layers": sorted(inputs), "elements": moved}
    names = {k.split("/", 2)[2] for k in noise if k.startswith("step0/grad/")}
    grads, why = counterfactual.counterfactual_grads(
        torch_model, state, batch, loss_fn=loss_fn, seed=seed, plan=plan, inputs=inputs,
        sites=kink.torch_sites, names=names)
    if why is not None:
        info["skipped"] = why
        return info
    for name, grad in grads.items():
        noise[f"step0/grad/{name}"] = grad
    info["gradients"] = len(grads)
    return info


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
    state_out: Optional[dict[int, Any]] = None,
    drop_grads: bool = False,
    opt_state: bool = False,
    arena: Optional[spill.SpillArena] = None,
    trace: Any = None,
    clip: Optional[GradClip] = None,
) -> None:
    """``float64``: cast floating inputs and labels to float64. ``reseed``: seed torch with
    ``reseed + i`` before step i's forward pass. ``hyper_out`` receives each step's param-group
    hyperparameters (lr, momentum, betas...) as the step starts; ``hyper_in`` sets them (the
    float64 run follows the float32 run's scheduler, whatever its class). ``state_out``
    receives a copy of the optimizer's state as each step starts (per-step judging).
    ``drop_grads``: set the gradients to None once the optimizer has used them (a model nobody
    reads them from after). ``opt_state``: record each parameter's momentum buffer and Adam
    moments after the step (``step<i>/opt/<name>.<accumulator>``). ``arena``: where the
    copies of ``state_out`` are kept. ``clip``: the reference's gradient clipping, after the
    gradients are recorded (Paddle clips inside its step, after they are recorded too)."""
    import torch

    dev = _torch_device(model)
    buffers = {name for name, _ in model.named_buffers()}
    slices = packed_slices(model.state_dict())  # attention's packed q, k, v: Paddle's three
    for i in range(n):
        inputs, labels = _split_batch(batches[i % len(batches)], i)
        args, kwargs = _split_inputs(inputs)
        if hyper_in is not None:
            for group, saved in zip(optimizer.param_groups, hyper_in[i]):
                group.update(copy.deepcopy(dict(saved)))
        if hyper_out is not None:
            hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            hyper_out.append(copy.deepcopy(hyper))
        if state_out is not None:
            state_out[i] = (copy.deepcopy(optimizer.state_dict()) if arena is None else
                            spill.spilled_state(optimizer.state_dict(), arena))
        optimizer.zero_grad()
        if reseed is not None:
            torch.manual_seed(reseed + i)
        args_t = _to_torch(args, dev, float64=float64)
        kwargs_t = _to_torch(kwargs, dev, float64=float64)
        labels_t = _to_torch(labels, dev, float64=float64)
        # the first step's forward pass and loss: the settings of what they apply as functions
        with trace if trace is not None and i == 0 else contextlib.nullcontext():
            out = model(*args_t, **kwargs_t)
            loss = _check_scalar_loss(_call_loss(loss_fn, out, labels_t), "torch", i)
        loss.backward()
        flat: dict[str, np.ndarray] = {}
        _flatten(out, f"step{i}/logits", flat)
        for k, v in flat.items():
            log.add(k, v)
        log.add(f"step{i}/loss", loss.reshape(()))
        log.add(f"step{i}/lr", np.float64(optimizer.param_groups[0]["lr"]))
        for name, grad in torch_views(((n, p.grad) for n, p in model.named_parameters()),
                                      slices):
            kp = plan.get(name)
            if grad is not None and kp is not None and kp.paddle_name is not None:
                _log_torch(log, f"step{i}/grad/{kp.paddle_name}", grad, kp)
        if clip is not None:
            clip.apply(model.parameters())
        optimizer.step()
        if drop_grads:  # not kept beside the weights recorded next: the float64 twin's peak
            model.zero_grad(set_to_none=True)
        for name, value in torch_views(model.state_dict().items(), slices):
            kp = plan.get(name)
            if kp is None or kp.paddle_name is None:
                continue
            if name in buffers:
                if stats:
                    _log_torch(log, f"step{i}/stat/{kp.paddle_name}", value, kp)
            else:
                _log_torch(log, f"step{i}/param/{kp.paddle_name}", value, kp)
        if opt_state:
            for key, value, kp in forcing.torch_state_records(optimizer, model, plan):
                _log_torch(log, f"step{i}/opt/{key}", value, kp)
        if scheduler is not None:
            _step_scheduler(scheduler, "torch", i)


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
    opt_state: bool = False,
    trace: Any = None,
    outputs_like: Optional[Mapping[str, Any]] = None,
    extra: Optional[list[str]] = None,
    paired: Optional[Collection[str]] = None,
    fusions: Sequence[Any] = (),
    lrs: Optional[Sequence[float]] = None,
) -> None:
    """``lrs``: each step's learning rate, set for it (the port's float64 run, its scheduler
    past the steps). ``outputs_like``: the reference's records, whose named outputs a tuple pairs with
    (``pair_outputs``); ``extra`` receives the port's outputs beyond them (not recorded).
    ``paired``: the port's tensors the reference's pair with (``_paired_names``); the others
    are the port's own (a Swin's ``relative_position_index`` buffer, which timm keeps out of its
    state dict; a pooler ``port_only`` names) and are not recorded."""
    place = _paddle_place(model)
    for i in range(n):
        with contextlib.nullcontext() if lrs is None else forcing.paddle_lr(optimizer, lrs[i]):
            _paddle_step(model, batches, i, loss_fn=loss_fn, optimizer=optimizer, stats=stats,
                         log=log, opt_state=opt_state, trace=trace, outputs_like=outputs_like,
                         extra=extra, paired=paired, fusions=fusions, place=place)
        if scheduler is not None:
            _step_scheduler(scheduler, "paddle", i)


def _paddle_step(model: Any, batches: Sequence[Any], i: int, *, loss_fn: Callable[..., Any],
                 optimizer: Any, stats: bool, log: ReprodLogger, opt_state: bool, trace: Any,
                 outputs_like: Optional[Mapping[str, Any]], extra: Optional[list[str]],
                 paired: Optional[Collection[str]], fusions: Sequence[Any], place: Any) -> None:
    """``_paddle_steps``' step ``i``."""
    inputs, labels = _split_batch(batches[i % len(batches)], i)
    args, kwargs = _split_inputs(inputs)
    optimizer.clear_grad()
    pargs, pkw, plabels = (_to_paddle(args, place), _to_paddle(kwargs, place),
                           _to_paddle(labels, place))
    with trace if trace is not None and i == 0 else contextlib.nullcontext():
        out = model(*pargs, **pkw)
        loss = _check_scalar_loss(_call_loss(loss_fn, out, plabels), "paddle", i)
    loss.backward()
    flat: dict[str, np.ndarray] = {}
    _flatten(out, f"step{i}/logits", flat)
    # outputs named as the reference's already need nothing, and no scan of its records
    if outputs_like is not None and any(k not in outputs_like for k in flat):
        head = f"step{i}/logits"
        flat = pair_outputs({k: v for k, v in outputs_like.items()
                             if k == head or k.startswith(head + "/")}, flat, head,
                            extra=extra)[0]
    for k, v in flat.items():
        log.add(k, v)
    log.add(f"step{i}/loss", loss.reshape([]))
    log.add(f"step{i}/lr", np.float64(optimizer.get_lr()))
    # a fused tensor (PaddleNLP's qkv_proj) is recorded as the reference's parts
    for name, g in split_named(((name, _paddle_view(p.grad))
                                for name, p in model.named_parameters()
                                if not p.stop_gradient and p.grad is not None), fusions):
        if paired is None or name in paired:
            log.add(f"step{i}/grad/{name}", g)
    optimizer.step()
    # Paddle keeps BatchNorm statistics as stop_gradient parameters: they are torch's buffers
    state = unaliased(model.state_dict())[0]  # an RNN's weights once
    kinds = {name: "stat" if getattr(value, "stop_gradient", True) else "param"
             for name, value in state.items()}
    for name, value in split_named(((n, _paddle_view(v)) for n, v in state.items()),
                                   fusions):
        if paired is not None and name not in paired:
            continue
        if kinds.get(name, "param") == "stat":
            if stats:
                log.add(f"step{i}/stat/{name}", value)
        else:
            log.add(f"step{i}/param/{name}", value)
    if opt_state:
        for key, value in split_named(((k, _paddle_view(v)) for k, v in
                                       forcing.paddle_state_records(optimizer, model)),
                                      fusions):
            log.add(f"step{i}/opt/{key}", value)


def _step_scheduler(scheduler: Any, side: str, step: int) -> None:
    """``scheduler.step()`` after a training step; a scheduler that cannot be stepped so (timm's
    ``CosineLRScheduler`` wants the epoch or update count) is refused in one line."""
    try:
        scheduler.step()
    except TypeError as e:
        if "argument" not in str(e):
            raise
        name = type(scheduler).__name__
        raise ReprodError(
            f"{side}_scheduler: {name}.step() after step {step} failed ({e}); align_train "
            "steps a scheduler once per training step with no argument: wrap one that counts "
            f"otherwise (timm's: an object whose step() calls step_update(n) with n counted)"
        ) from None


def _paired_names(plan: Mapping[str, KeyPlan]) -> set[str]:
    """The Paddle names the reference's tensors convert to (a packed attention's slices
    included): what the port's records are set against."""
    return {kp.paddle_name for kp in plan.values() if kp.paddle_name is not None}


def _held_by_calls(torch_model: Any, paddle_model: Any, rules: Any, batch: Any) -> Any:
    """``call_order.held_by_calls`` from a pass of each model over the first batch's inputs
    (eval mode, no gradients); None where that pass fails (the steps will say why)."""
    from .call_order import first_calls, held_by_calls

    try:
        calls = first_calls(torch_model, paddle_model, _split_batch(batch, 0)[0])
    except ReprodError:
        return None
    return held_by_calls(torch_model, paddle_model, rules, calls)


@splitting_for_port
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
    criteria: Optional[Criteria] = None,
    by_order: bool = False,
    kinks: Optional[bool] = None,
    localise: bool = True,
    optimizer_state: bool = True,
    memory_budget: Any = "auto",
    spill_dir: Optional[PathLike] = None,
    check_settings: Any = True,
    dropout: str = "check",
    torch_grad_clip: Any = None,
) -> Any:
    """Train both models for ``steps`` steps on the same batches and compare, per step, the logits,
    the loss, the learning rate, every parameter's gradient and every updated parameter.

    ``batches``: a sequence of ``(inputs, labels)`` pairs of numpy arrays (inputs as in
    ``align_forward``; labels may be None); with ``steps`` larger than ``len(batches)`` the batches
    are reused in order (``[batch] * 1`` trains three times on one batch with ``steps=3``). Each step
    calls ``loss_fn(outputs, labels)``, which must return a scalar, then backward, optimizer step,
    scheduler step. Keys: ``step0/logits``, ``step0/loss``, ``step0/lr`` (param group 0, before the
    step), ``step0/grad/<name>``, ``step0/param/<name>``, with ``stats`` ``step0/stat/<name>``
    (BatchNorm statistics) and, with ``optimizer_state``, ``step0/opt/<name>.velocity`` (SGD's
    momentum buffer) or ``.moment1`` / ``.moment2`` (Adam's moments, weighted as Paddle's
    float32 ``1 - beta`` weighs them), where both optimizers keep them; all with Paddle names and
    Paddle layout. The state shows what one update cannot: a small weight decay missing moves the
    weights by less than their float32 resolution, and their momentum buffers by the decay.
    Failing keys that a known framework difference may explain carry it as their ``note``.

    The models stay in the mode they are in (train mode uses batch statistics in BatchNorm); active
    dropout, and with ``check_determinism`` any other randomness in the forward pass, raises
    ``ReprodError``. ``dropout="off"`` switches dropout off for the run instead: each dropout
    layer, and each attention layer (which drops its weights as a function: torch's and Paddle's
    ``MultiheadAttention``, Hugging Face's attention modules), runs in eval mode, and gets its
    mode back after; the rates are still compared as settings. With ``out_dir``, writes ``train_torch.npy``, ``train_paddle.npy`` and
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

    ``torch_grad_clip``: how the torch step clips its gradients between backward and step, as a
    Paddle optimizer's ``grad_clip`` does inside its step: a number (the global 2-norm, scaled as
    Paddle's ``ClipGradByGlobalNorm`` scales it), a ``functools.partial`` of
    ``torch.nn.utils.clip_grad_norm_`` or ``clip_grad_value_``, or a function called with the
    model's parameters (``reprod.align.grad_clip``). The gradients recorded are before clipping
    on both sides.

    ``by_order=True`` pairs the two models' parameters by definition order
    (``reprod.align.by_order_rules``), for ports whose names no rule maps; every key is then
    recorded under the Paddle model's own names.

    ``kinks`` (default: ``calibrate``) explains kink crossings: a correct port can put an
    activation's input that lies within rounding of a kink (ReLU at 0, Hardswish at +-3, a
    max-pool tie) on the other side of it, and every gradient upstream then differs by far more
    than noise. Each run records the inputs and outputs of its layers whose class has kinks
    (``reprod.capture.KINK_POINTS``; the cost is those activations), the n-th such call of the
    Paddle model is paired with the n-th of the torch model, and ``reprod.capture.explain_kinks``
    relabels the failing keys a crossing explains: status ``"kink"``, passed, the reason naming
    the crossing (the gradients of layers called before it, the parameters updated with those
    gradients, every failing key of later steps). Where the calls do not pair (other counts or
    classes) nothing is relabelled. The captures are left out of the result and of the dumps;
    ``result.options["kinks"]`` says how many keys were explained (or why none could be) and
    ``result.options["kink_crossings"]`` lists the crossings (torch and Paddle layer names).
    Calibrated, each gradient a crossing of its step explains is checked: the float64 twin runs
    that step again from the state the port's step started from, each kink layer's aligned input
    replaced by the port's, and a gradient beyond ``noise_factor`` times its noise of that
    counterfactual
    fails (a bug in the backward pass of a layer called before the crossing), with the weights
    updated from it and the later keys labelled after it (``reprod.align.counterfactual``;
    ``result.options["counterfactual"]`` counts them per step).

    Calibrated with ``kinks``, a failing key of a step both sides ran from one state (step 0, or
    a step judged from the reference's state) passes as ``"known"`` where the port's own float32
    rounding makes it: the Paddle model runs that step's forward and backward again in float64
    (cast in place and back, its hooks kept), and a logit, loss, gradient or statistic whose
    float64 value agrees with the twin's within the reference's float32 noise differs by both
    sides' rounding only (Paddle's CPU kernels sum a long bias gradient hundreds of times less
    exactly than torch's), while a bug is another function in float64 too. The weights and
    optimizer state updated from an aligned gradient pass where the reference's optimizer makes
    them of the port's own gradient (``reprod.align.port_rounding``,
    ``result.options["port_rounding"]`` counts them per step, or says why none was checked).
    A failing key of a later step both sides ran free passes so too where the port, run again
    over the same steps in float64 from its state before training (its optimizer afresh, each
    step at the rate it recorded), agrees with the twin: Adam carries each side's rounding from
    step to step (a faithful BERT port's step-3 logits read 28x); ``["port_rounding"]["later"]``.

    Where neither side keeps optimizer state for a parameter (plain SGD), each side's weight
    decay is fitted from its own updates (the slope of (w_before - w_after) / lr - grad against
    w_before over the parameter's elements and steps, ``reprod.align.decay``): a decay of 1e-5
    at lr 0.01 moves a weight by one rounding unit, within every key's noise, and the fit sees
    it at 300 standard errors. Decays more than 20 standard errors apart fail that parameter's
    updated weights, saying both (``result.options["decay"]``).

    ``memory_budget``: the bytes the runs' records (every step's logits, gradients, weights,
    statistics and optimizer state of the float32, float64 and Paddle runs, the kink layers'
    activations, the reference's optimizer state per step: on resnet18 about 16 times the
    parameters a step) may hold in memory; past it, each record of 64 KiB or more is kept in an
    unlinked file under ``spill_dir`` (default ``out_dir``, else the system's temporary
    directory), mapped into memory, which the kernel pages out when memory is wanted
    (``reprod.align.spill``). ``"auto"`` (the default): half the memory available at the call
    (within a cgroup's limit); None: no limit; 0: every such record to the file. Records in the
    file read back as plain arrays: the verdicts and dumps are the same, the run about 1.5x as
    long where everything goes there. ``result.options["memory"]`` says how many bytes went
    where (only when some did, or when the file could not take them: a full disk leaves them in
    memory, and says why).

    ``check_settings=True`` (the default) compares the paired layers' settings, as
    ``align_forward`` does: a BatchNorm momentum that differs changes nothing in step 0's
    outputs and gradients, and a BatchNorm epsilon of 1e-6 for 1e-5 passed every key of
    resnet18's steps; each that differs is a failing key ``settings/<Paddle layer>/<setting>``
    and a finding. A list of ``"<Paddle layer>/<setting>"`` glob patterns waives those. The two
    optimizers' hyperparameters are compared too (``reprod.align.optim_settings``: an Adam
    epsilon, betas, momentum, nesterov, Paddle's grad_clip, which parameters decay and how),
    each that differs ``settings/optimizer/<setting>``; and the two learning-rate schedules,
    stepped on alone far past the steps trained (``reprod.align.lr_schedule``: a cosine's
    ``T_max``, a warmup's length), the first step where they part failing as
    ``settings/optimizer/lr_at_step_<k>``.

    ``criteria``: a ``reprod.Criteria`` holding the check at once (methods, thresholds, per-key
    rules, atol/rtol, noise factor); keyword arguments given beside it override its fields.

    ``localise=True`` (the default) says where a failing run first goes wrong, and why, in
    ``result.options["findings"]`` (also in ``train_diff.log`` and printed with ``verbose``),
    from a copy of both models' state taken before training (see
    ``reprod.align.train_localise``): step 0's outputs differing are localised layer by layer as
    ``align_forward`` does (``options["divergence"]``); its loss alone differing names the loss
    functions (a sum against a mean by the batch size); its gradients differing, with the outputs
    and loss aligned, are localised in the backward pass (the first layer, in backward order,
    whose gradients differ while the gradient it received aligns); its updated parameters
    differing, with the gradients aligned, sets the two updates against each other (a constant
    ratio: a learning rate; a difference proportional to the weights: a weight decay); a later
    first failing step is named with what fails in it, and where its outputs or gradients
    differ it is localised the same way from the weights each side recorded at the step before.
    The models keep the state training gave them (their gradients excepted).

    >>> r = align_train(tm, pm, [(x, y)], steps=3,
    ...                 torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
    ...                 torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9),
    ...                 paddle_optimizer=paddle.optimizer.Momentum(0.1, 0.9, parameters=pm.parameters()))
    >>> r.passed, r.first_failure
    """
    if dropout not in ("check", "off"):
        raise ReprodError(f"dropout={dropout!r}: give \"check\" (active dropout raises) or "
                          "\"off\" (dropout, drop-path and attention layers run in eval mode)")
    if dropout == "off":
        arguments = {k: v for k, v in locals().items() if k != "dropout"}
        with _dropouts_off(torch_model, paddle_model):
            return align_train(**arguments)
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)) or len(batches) == 0:
        raise ReprodError("batches must be a non-empty list of (inputs, labels) pairs")
    clip = grad_clip_of(torch_grad_clip)
    n = len(batches) if steps is None else int(steps)
    if n < 1:
        raise ReprodError(f"steps must be at least 1, got {steps}")
    crit = _criteria(criteria, calibrate, methods=method, threshold=threshold, atol=atol,
                     rtol=rtol, per_key=per_key, noise_factor=noise_factor)
    waive = settings.waivers(check_settings)
    # the settings of the operations each side applies as functions, from its first step
    traces = None if waive is None else (trace_settings(torch_model),
                                         trace_settings(paddle_model))
    budget = spill.budget_of(memory_budget)  # a bad one refused before any model runs
    if bool(torch_model.training) != bool(paddle_model.training):
        modes = {True: "train", False: "eval"}
        raise ReprodError(
            f"the torch model is in {modes[bool(torch_model.training)]} mode and the Paddle "
            f"model in {modes[bool(paddle_model.training)]} mode; put both in the same mode"
        )
    weights_paired = None
    # by order, the localisation pairs the weights itself from the user's rules, as
    # align_forward's does: so it can tell a definition-order pairing that crossed siblings
    localise_rules = rules
    if by_order:  # names no rule maps (torchvision against paddle.vision): pair by position
        # or by the order the layers run, where the port's weights hold that (loaded with
        # inputs=): else each of its crossed siblings' gradients is set against the other's
        held = None if getattr(rules, "pairs", ()) else _held_by_calls(
            torch_model, paddle_model, rules, batches[0])
        if held is not None:
            rules = localise_rules = held
            weights_paired = "by call order"
        else:
            rules = by_order_rules(torch_model, paddle_model, rules=rules)
    _check_structure(torch_model, paddle_model, rules)
    if torch_model.training:
        _check_no_dropout(torch_model, paddle_model)
    plan = _torch_params_plan(torch_model, rules)
    # the port's tensors fusing several of the reference's, as their values lie now
    fusions = [f for f, _ in model_fusions(torch_model, paddle_model, rules)]
    before = Snapshot.take(torch_model, paddle_model) if localise else None
    initial = _initial_stats(torch_model, paddle_model, plan) if stats else None
    explain = calibrate if kinks is None else kinks
    kink = KinkCapture(torch_model, paddle_model, _torch_to_paddle(plan)) if explain else None
    if check_determinism and torch_model.training:
        _check_determinism(torch_model, paddle_model, batches[0], seed)

    arena = spill.SpillArena(budget, out_dir if spill_dir is None else spill_dir,
                             create=spill_dir is None)  # out_dir is made anyway
    torch_log, paddle_log = spill.SpillingLogger(arena), spill.SpillingLogger(arena)
    noise_log = spill.SpillingLogger(arena) if calibrate else None
    adam = forcing.adam_betas(paddle_optimizer)
    # a port's own float64 run over the steps starts its optimizer afresh: only where it is
    fresh = not forcing.paddle_accumulators(paddle_optimizer)
    per_step = kink is not None or adam is not None
    # the torch optimizer's state as each step starts: what a replayed update starts from, and
    # what a step judged from the reference's state gives the port
    opt_states: Optional[dict[int, Any]] = {} if per_step else None
    # the weights before training (Paddle names and layout): step 0's updates start from them;
    # views of the copy localisation keeps, where it keeps one (not a second copy of the model)
    state0 = None if before is None else before.torch_state
    slices = packed_slices(torch_model.state_dict())
    views0 = None if state0 is None else dict(torch_views(state0.items(), slices))
    weights0 = {kp.paddle_name: np.array(_torch_array(p, kp)) if views0 is None
                else _torch_view(views0[name], kp) for name, p in
                torch_views(torch_model.named_parameters(), slices)
                if (kp := plan.get(name)) is not None and kp.paddle_name} \
        if per_step or state0 is not None else {}
    # the torch model's state before training: step 0's crossings are checked from it
    # (counterfactual); the copy localisation keeps, where it keeps one
    torch_start = None
    if calibrate and kink is not None:
        torch_start = state0 if state0 is not None else copy.deepcopy(torch_model.state_dict())
    # the Paddle model's state before training: step 0's keys its own float32 rounding may
    # explain are checked from it (port_rounding); the copy localisation keeps, where it keeps one
    paddle_start = None
    if calibrate and explain:
        paddle_start = (before.paddle_state if before is not None else
                        {k: v.detach().clone() for k, v in paddle_model.state_dict().items()})
    hyper: Optional[list[list[dict[str, Any]]]] = None
    if calibrate:  # copied before the float32 run changes weights, statistics and optimizer state
        twin = _float64_twin(torch_model)
        twin_opt = _float64_optimizer(torch_optimizer, torch_model, twin)
        hyper = []
    with _deterministic(seed), _recording(kink, torch_model, torch_log, "torch"):
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
            state_out=opt_states,
            opt_state=optimizer_state,
            arena=arena,
            trace=None if traces is None else traces[0],
            clip=clip,
        )
    skipped: Optional[str] = None  # why a calibrated run is judged without its twin
    extra_outputs: list[str] = []  # the port's outputs beyond the reference's, every step
    if calibrate:
        assert noise_log is not None and hyper is not None
        try:
            # its loss and backward pass with the default dtype float64 too (its forward pass
            # has it wherever it runs)
            with _deterministic(seed), _recording(kink, twin, noise_log, "torch64"), \
                    float64_default():
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
                    drop_grads=True,
                    opt_state=optimizer_state,
                    clip=clip,
                )
        except Exception as e:  # the model's own code: judged as if uncalibrated (kinks too)
            skipped = twin_failed(e)
            noise_log, calibrate, torch_start, paddle_start = None, False, None, None
        del twin, twin_opt
    with _deterministic(seed), _recording(kink, paddle_model, paddle_log, "paddle"):
        _paddle_steps(
            paddle_model,
            batches,
            n,
            loss_fn=paddle_loss_fn,
            optimizer=paddle_optimizer,
            scheduler=paddle_scheduler,
            stats=stats,
            log=paddle_log,
            opt_state=optimizer_state,
            trace=None if traces is None else traces[1],
            outputs_like=torch_log.data,
            extra=extra_outputs,
            paired=_paired_names(plan),
            fusions=fusions,
        )
    _common_state(torch_log, paddle_log, noise_log)
    twin_info = None
    if torch_start is not None and kink is not None and noise_log is not None:
        # the noise of step 0's gradients from the twin on the reference's side of each kink
        twin_info = _twin_on_reference_sides(kink, torch_model, torch_start, batches[0],
                                             torch_log.data, noise_log.data,
                                             loss_fn=torch_loss_fn, seed=seed, plan=plan)
    result = _finish(
        torch_log,
        paddle_log,
        out_dir=out_dir,
        name="train",
        criteria=crit,
        verbose=verbose,
        noise_log=noise_log,
        write_log=False,  # at the end, with the settings and the findings
        kinks=kink,
        paddle_to_torch=_paddle_to_torch(plan, torch_model),
        initial=initial,
        kink_line=torch_start is None,
    )
    if twin_info is not None:
        result = dataclasses.replace(result, options=dict(result.options, twin_sides=twin_info))
        if verbose:
            moved = twin_info["elements"]
            print(f"the float64 twin took {moved} element{'s' if moved != 1 else ''} of "
                  f"{', '.join(twin_info['layers'])} to the other side of a kink at step 0: "
                  + (f"not corrected ({twin_info['skipped']})" if "skipped" in twin_info else
                     "step 0's gradients are judged by the twin run again on the reference's "
                     "side"), flush=True)
    if torch_start is not None and kink is not None:
        for s in sorted(kink.port_inputs):
            # a later step from the port's own weights and statistics after the step before:
            # its gradients are what the reference computes from them, rounding apart
            start = partial(lambda s, t: t if s == 0 else
                            forcing.reference_state(s - 1, paddle_log.data, plan), s, torch_start)
            result = _checked_kinks(result, kink, torch_model, s, start,
                                    batches[s % len(batches)], paddle_data=paddle_log.data,
                                    loss_fn=torch_loss_fn, seed=seed + s, plan=plan)
        if verbose:
            print(_kink_summary(result), flush=True)
    torch_start = None
    if paddle_start is not None and noise_log is not None:
        result = _rounding_checked(
            result, paddle_model, lambda: paddle_start, batches[0], loss_fn=paddle_loss_fn,
            stats=stats, ref=torch_log.data, other=paddle_log.data, noise=noise_log.data)
    # the first step judged from the reference's state: its two updates, for localisation
    forced_logs: Optional[dict[int, Any]] = {} if localise else None
    if per_step:
        result = _judged_per_step(
            result, torch_model, paddle_model, batches, torch_log.data, paddle_log.data,
            None if noise_log is None else noise_log.data, torch_optimizer=torch_optimizer,
            paddle_optimizer=paddle_optimizer, opt_states=opt_states or {}, adam=adam,
            weights0=weights0,
            kinks=kink is not None, torch_loss_fn=torch_loss_fn, paddle_loss_fn=paddle_loss_fn,
            plan=plan, stats=stats, seed=seed, calibrate=calibrate, criteria=crit,
            optimizer_state=optimizer_state, fusions=fusions, clip=clip,
            forced_logs=forced_logs, arena=arena)
    if weights0:  # plain SGD's weight decay, which no key of one step resolves
        result = decay.decay_checked(result, torch_log.data, paddle_log.data, weights0,
                                     scaled=clip is not None or
                                     getattr(paddle_optimizer, "_grad_clip", None) is not None)
    weights0 = {}
    if paddle_start is not None and noise_log is not None:
        result = _later_rounding_checked(
            result, paddle_model, paddle_optimizer, paddle_start, batches, n, fresh=fresh,
            loss_fn=paddle_loss_fn, stats=stats, opt_state=optimizer_state,
            ref=torch_log.data, other=paddle_log.data, noise=noise_log.data, arena=arena,
            paired=_paired_names(plan), fusions=fusions, seed=seed)
    paddle_start = None
    arena.close()
    if arena.spilled or arena.reason is not None:
        result = dataclasses.replace(result, options=dict(result.options,
                                                          memory=arena.summary()))
    if weights_paired is not None:
        result = dataclasses.replace(result, options=dict(result.options,
                                                          weights_paired=weights_paired))
    if waive is not None:
        result = settings.settings_checked(
            result, torch_model, paddle_model,
            {name: kp.paddle_name for name, kp in plan.items() if kp.paddle_name}, waive,
            traces=traces, optimizers=(torch_optimizer, paddle_optimizer),
            schedulers=(torch_scheduler, paddle_scheduler, n), torch_grad_clip=clip)
    if verbose:
        for line in _rounding_summary(result):
            print(line, flush=True)
    # the float64 records are judged (and in the dump) now; localisation copies both models'
    # state again and may run a second float64 twin: not beside these
    noise_log = None
    if before is None:
        result = settings.with_finding(result, verbose=verbose)
        result = _extra_outputs_said(result, extra_outputs, verbose)
        result = uncalibrated(result, skipped, verbose)
        if out_dir is not None:
            _write_diff_log(result, os.path.join(os.fspath(out_dir), "train_diff.log"),
                            verbose=verbose)
        return result
    if settings.values_failed(result):
        after = Snapshot.take(torch_model, paddle_model)
        try:
            result = _train_localised(
                result, torch_model, paddle_model, before, batches, torch_log.data,
                paddle_log.data, torch_loss_fn=torch_loss_fn, paddle_loss_fn=paddle_loss_fn,
                seed=seed, by_order=by_order, calibrate=calibrate, criteria=crit,
                lr=_first_lr(paddle_optimizer), plan=plan, fusions=fusions,
                forced_logs=forced_logs, rules=localise_rules if by_order else None,
            )
        finally:
            after.restore(torch_model, paddle_model)
        if verbose:
            for line in result.options.get("findings", ()):
                print(line, flush=True)
    result = settings.with_finding(result, verbose=verbose)
    result = _extra_outputs_said(result, extra_outputs, verbose)
    result = uncalibrated(result, skipped, verbose)
    if out_dir is not None:
        _write_diff_log(result, os.path.join(os.fspath(out_dir), "train_diff.log"), verbose=verbose)
    return result


def _extra_outputs_said(result: Any, extra: Sequence[str], verbose: bool) -> Any:
    """``result`` with the port's outputs beyond the reference's (PaddleNLP's Pegasus returns its
    encoder's mask too) in ``options["outputs_not_compared"]`` and a first finding, said once for
    step 0's: every step returns the same."""
    first = [k for k in extra if k.startswith("step0/")]
    line = extra_outputs_finding(first, "step0/logits")
    if line is None:
        return result
    if verbose:
        print(line, flush=True)
    return dataclasses.replace(result, options=dict(
        result.options, findings=[line, *result.options.get("findings", ())],
        outputs_not_compared=not_compared_outputs({}, list(extra))))


def _judged_per_step(result: Any, torch_model: Any, paddle_model: Any, batches: Sequence[Any],
                     torch_data: Mapping[str, Any], paddle_data: Mapping[str, Any],
                     noise_data: Optional[Mapping[str, Any]], *, torch_optimizer: Any,
                     paddle_optimizer: Any, opt_states: Mapping[int, Any],
                     adam: Optional[tuple[float, float, int]], weights0: Mapping[str, Any],
                     kinks: bool, fusions: Sequence[Any] = (),
                     torch_loss_fn: Callable[..., Any], paddle_loss_fn: Callable[..., Any],
                     plan: Mapping[str, KeyPlan], stats: bool, seed: int, calibrate: bool,
                     criteria: Criteria, optimizer_state: bool,
                     clip: Optional[GradClip] = None,
                     forced_logs: Optional[dict[int, Any]] = None,
                     arena: Optional[spill.SpillArena] = None) -> Any:
    """Step 0's updated weights that the reference's optimizer makes of the port's aligned
    gradient relabelled ``"kink"`` (with ``kinks``: Adam's normalised update near g = 0), weights
    that Paddle's float32 Adam bias corrections explain ``"known"``; then each later step whose
    free-running verdict rests on such an earlier difference judged again from the reference's
    state (``reprod.align.forcing``), the models and optimizers put back as training left
    them."""
    if kinks and 0 in opt_states:
        result = forcing.replay_kinks(
            result, torch_data, paddle_data, noise_data, criteria, 0, torch_opt=torch_optimizer,
            torch_state=opt_states[0], torch_model=torch_model, plan=plan, before=weights0,
            adam=adam, updates=0, clip=clip)
    if adam is not None:
        result = forcing.adam_known(result, torch_data, paddle_data, noise_data, criteria, adam)
    todo = forcing.steps_to_force(result, normalised=adam is not None)
    if not todo:
        return result
    lrs = {s: float(np.asarray(paddle_data[f"step{s}/lr"])) for s in todo
           if f"step{s}/lr" in paddle_data}
    saved = forcing.Saved.take(torch_model, torch_optimizer, paddle_model, paddle_optimizer)
    to_torch = _paddle_to_torch(plan, torch_model)
    found: dict[int, Any] = {}
    try:
        for s in todo:
            if s not in opt_states or s not in lrs:
                raise forcing.Unsupported(f"step {s}'s optimizer state was not recorded")
            kink = KinkCapture(torch_model, paddle_model, _torch_to_paddle(plan)) if kinks else None

            def run_torch(batch: Any, log: ReprodLogger, s: int = s,
                          kink: Optional[KinkCapture] = kink) -> None:
                with _deterministic(seed), _recording(kink, torch_model, log, "torch"):
                    _torch_steps(torch_model, [batch], 1, loss_fn=torch_loss_fn,
                                 optimizer=torch_optimizer, scheduler=None, plan=plan,
                                 stats=stats, log=log, reseed=seed + s if calibrate else None,
                                 opt_state=optimizer_state, clip=clip)

            def run_twin(batch: Any, s: int = s,
                         kink: Optional[KinkCapture] = kink) -> ReprodLogger:
                twin = _float64_twin(torch_model)
                twin_opt = _float64_optimizer(torch_optimizer, torch_model, twin)
                log = ReprodLogger()
                with _deterministic(seed), _recording(kink, twin, log, "torch64"):
                    _torch_steps(twin, [batch], 1, loss_fn=_float64_loss(torch_loss_fn),
                                 optimizer=twin_opt, scheduler=None, plan=plan, stats=stats,
                                 log=log, float64=True, reseed=seed + s, drop_grads=True,
                                 opt_state=optimizer_state, clip=clip)
                return log

            def run_paddle(batch: Any, log: ReprodLogger,
                           like: Optional[Mapping[str, Any]] = None,
                           kink: Optional[KinkCapture] = kink) -> None:
                with _deterministic(seed), _recording(kink, paddle_model, log, "paddle"):
                    _paddle_steps(paddle_model, [batch], 1, loss_fn=paddle_loss_fn,
                                  optimizer=paddle_optimizer, scheduler=None, stats=stats,
                                  log=log, opt_state=optimizer_state, outputs_like=like,
                                  paired=_paired_names(plan), fusions=fusions)

            def finish(t_log: ReprodLogger, p_log: ReprodLogger, n_log: Optional[ReprodLogger],
                       initial: Any, s: int = s, kink: Optional[KinkCapture] = kink) -> Any:
                _common_state(t_log, p_log, n_log)
                r = _finish(t_log, p_log, out_dir=None, name="train", criteria=criteria,
                            verbose=False, noise_log=n_log, write_log=False, kinks=kink,
                            paddle_to_torch=to_torch, initial=initial if stats else None)
                if kink is not None and n_log is not None:
                    r = _checked_kinks(r, kink, torch_model, 0,
                                       partial(forcing.reference_state, s - 1, torch_data, plan),
                                       batches[s % len(batches)], paddle_data=p_log.data,
                                       loss_fn=torch_loss_fn, seed=seed + s, plan=plan)
                if n_log is not None and kink is not None:
                    r = _rounding_checked(
                        r, paddle_model,
                        partial(_paddle_state, s - 1, torch_data, paddle_model, fusions),
                        batches[s % len(batches)], loss_fn=paddle_loss_fn, stats=stats,
                        ref=t_log.data, other=p_log.data, noise=n_log.data)
                before = {k.split("/param/", 1)[1]: v for k, v in torch_data.items()
                          if k.startswith(f"step{s - 1}/param/")}
                n_data = None if n_log is None else n_log.data
                if kinks:
                    r = forcing.replay_kinks(
                        r, t_log.data, p_log.data, n_data, criteria, 0,
                        torch_opt=torch_optimizer, torch_state=opt_states[s],
                        torch_model=torch_model, plan=plan, before=before, adam=adam, updates=s,
                        clip=clip)
                if adam is not None:  # this step's update alone, from the reference's weights
                    r = forcing.adam_known(r, t_log.data, p_log.data, n_data, criteria, adam,
                                           first=s, before=before)
                return r

            found[s] = forcing.run_forced(
                s, batches=batches, torch_model=torch_model, paddle_model=paddle_model,
                torch_opt=torch_optimizer, paddle_opt=paddle_optimizer,
                torch_opt_state=opt_states[s], torch_data=torch_data, paddle_lr_value=lrs[s],
                plan=plan, run_torch=run_torch, run_twin=run_twin if calibrate else None,
                run_paddle=run_paddle, finish=finish, fusions=fusions,
                keep=forced_logs if forced_logs is not None and not forced_logs else None)
            if forced_logs and s in forced_logs and arena is not None:
                # held until localisation reads them, about 8x the parameters: through the
                # arena, as every other record
                kept, t_data, p_data = forced_logs[s]
                forced_logs[s] = (kept, _through(arena, t_data), _through(arena, p_data))
    except forcing.Unsupported as e:
        options = dict(result.options, forcing={"steps": [], "skipped": str(e)})
        return dataclasses.replace(result, options=options)
    finally:
        saved.restore(torch_model, torch_optimizer, paddle_model, paddle_optimizer)
    result = forcing.merged(result, found)
    for option in ("counterfactual", "port_rounding"):
        checks = dict(result.options.get(option, {}))
        for s, f in found.items():
            info = f.options.get(option, {}).get("step0")
            if info is not None:
                checks[f"step{s}"] = info
        if checks:
            result = dataclasses.replace(result, options=dict(result.options, **{option: checks}))
    return result


def _through(arena: spill.SpillArena, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data``'s arrays kept by ``arena``: themselves within its budget, copies in its file
    past it."""
    return {k: arena.keep(v) if type(v) is np.ndarray and not v.dtype.hasobject else v
            for k, v in data.items()}


def _paddle_state(step: int, torch_data: Mapping[str, Any], paddle_model: Any,
                  fusions: Sequence[Any] = ()) -> dict[str, np.ndarray]:
    """The Paddle model's state dict as the reference recorded it after ``step`` (what a forced
    step loads into it); a fused tensor from the parts recorded under the reference's names."""
    names = part_names(unaliased(paddle_model.state_dict())[0], fusions)
    return fuse({name: forcing._recorded(step, torch_data, name) for name in names}, fusions)


_STATE_KEY = re.compile(r"step\d+/opt/.+")


def _common_state(torch_log: ReprodLogger, paddle_log: ReprodLogger,
                  noise_log: Optional[ReprodLogger]) -> None:
    """The optimizer-state records that only one side has taken out of every log: torch's SGD
    keeps no buffer at momentum 0 where Paddle's Momentum keeps a velocity, and a pair with no
    counterpart says nothing about the port."""
    t = {k for k in torch_log.data if _STATE_KEY.fullmatch(k)}
    p = {k for k in paddle_log.data if _STATE_KEY.fullmatch(k)}
    for log in (torch_log, paddle_log, noise_log):
        if log is not None:
            for key in (t ^ p) & set(log.data):
                log.remove(key)


def _checked_kinks(result: Any, kink: KinkCapture, torch_model: Any, step: int,
                   state: Callable[[], Mapping[str, Any]], batch: Any, *,
                   paddle_data: Mapping[str, Any], loss_fn: Callable[..., Any], seed: int,
                   plan: Mapping[str, KeyPlan]) -> Any:
    """``result`` with the gradients of ``step`` that a crossing of that step explains checked
    against the float64 twin's backward with the port's side of every kink (``counterfactual``),
    run from ``state()`` (a state dict of the torch model: what the port's step started from) on
    ``batch``; ``options["counterfactual"]["step<step>"]`` says how many aligned and
    failed (and the first failing in backward order), or why none was checked."""
    inputs = kink.port_inputs.get(step)
    names = counterfactual.labelled_grads(result, step)
    if not names or not inputs:
        return result
    try:
        grads, why = counterfactual.counterfactual_grads(
            torch_model, state(), batch, loss_fn=loss_fn, seed=seed, plan=plan, inputs=inputs,
            sites=kink.torch_sites, names=names, types=kink._names("torch"))
    except forcing.Unsupported as e:  # the state before the step was not recorded
        grads, why = {}, str(e)
    info: dict[str, Any]
    if why is not None:
        info = {"skipped": why}
    else:
        factor = result.options.get("noise_factor")
        result, info = counterfactual.checked(
            result, grads, paddle_data, step=step,
            factor=DEFAULT_NOISE_FACTOR if factor is None else float(factor))
        to_torch = _paddle_to_torch(plan, torch_model)
        first = counterfactual.first_in_backward(list(info["failed_params"]), kink.order,
                                                 to_torch)
        if first is not None:
            module = dict(torch_model.named_modules()).get(first[1])
            info["first"] = {"param": first[0], "layer": first[1],
                             "type": None if module is None else type(module).__name__}
    kink.port_inputs.pop(step, None)  # the port's activations are not needed any more
    kinks = dict(result.options.get("kinks", {}))
    kinks["explained"] = sum(kr.status == "kink" for kr in result.results)
    checks = dict(result.options.get("counterfactual", {}), **{f"step{step}": info})
    return dataclasses.replace(result, options=dict(result.options, kinks=kinks,
                                                    counterfactual=checks))


def _rounding_checked(result: Any, paddle_model: Any, state: Callable[[], Any], batch: Any, *,
                      loss_fn: Callable[..., Any], stats: bool, ref: Mapping[str, Any],
                      other: Mapping[str, Any], noise: Mapping[str, Any]) -> Any:
    """``result`` (a step's, under ``step0/`` keys, both sides run from one state) with the keys
    the port's own float32 rounding makes passed (``reprod.align.port_rounding``): the Paddle
    model run again in float64 from ``state()``; ``options["port_rounding"]["step0"]`` says how
    many, or why none could be checked."""
    if not port_rounding.needed(result):
        return result
    try:
        port64 = port_rounding.paddle_float64(paddle_model, state(), batch, loss_fn, stats=stats)
    except forcing.Unsupported as e:
        info: dict[str, Any] = {"skipped": str(e)}
    except port_rounding.NotRestored:
        raise  # the port is no longer what it was: nothing after this could be trusted
    except Exception as e:  # noqa: BLE001 - a layer without a float64 kernel: nothing rescued
        info = {"skipped": f"the Paddle model does not run in float64 ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})"}
    else:
        before = {kr.key: kr.status for kr in result.results}
        result = port_rounding.rescued(result, ref, other, noise, port64)
        info = {"known": sum(kr.status == "known" and before[kr.key] != "known"
                             for kr in result.results)}
    checks = dict(result.options.get("port_rounding", {}), step0=info)
    return dataclasses.replace(result, options=dict(result.options, port_rounding=checks))


def _later_rounding_checked(result: Any, paddle_model: Any, paddle_optimizer: Any,
                            start: Mapping[str, Any], batches: Sequence[Any], n: int, *,
                            fresh: bool, loss_fn: Callable[..., Any], stats: bool,
                            opt_state: bool, ref: Mapping[str, Any], other: Mapping[str, Any],
                            noise: Mapping[str, Any], arena: spill.SpillArena,
                            paired: Collection[str], fusions: Sequence[Any], seed: int) -> Any:
    """``result`` with the keys of steps after the first, run free on both sides, that the two
    runs' own float32 rounding makes relabelled ``"known"`` (``port_rounding.rescued_later``):
    the port run again over the same steps in float64, from ``start`` (its state before
    training), its optimizer afresh, each step at the rate it recorded.
    ``options["port_rounding"]["later"]`` says how many, or why none could be checked.

    Adam carries each side's rounding from step to step, and a faithful port's free run parts
    from the reference's by more than the reference's own float64 distance: a calibrated BERT
    port failed step 3's logits at 28x, a GPT-2 port a LayerNorm gradient at 24x."""
    if not any(port_rounding._candidate(kr, later=True)
               and forcing._step_of(kr.key) not in (None, 0) for kr in result.results):
        return result
    forced = set((result.options.get("forcing") or {}).get("steps") or ())
    info: dict[str, Any]
    if not fresh:
        info = {"skipped": "the Paddle optimizer held state before training: its float64 run "
                           "would start from another"}
    else:
        log = spill.SpillingLogger(arena)
        lrs = [float(np.asarray(other[f"step{i}/lr"])) for i in range(n)]

        def run() -> None:
            with _deterministic(seed):
                _paddle_steps(paddle_model, port_rounding.float64_batches(batches), n,
                              loss_fn=port_rounding.float64_loss(loss_fn),
                              optimizer=paddle_optimizer, scheduler=None, stats=stats, log=log,
                              opt_state=opt_state, outputs_like=ref, paired=paired,
                              fusions=fusions, lrs=lrs)

        try:
            port_rounding.paddle_float64_run(paddle_model, paddle_optimizer, start, run)
        except forcing.Unsupported as e:
            info = {"skipped": str(e)}
        except port_rounding.NotRestored:
            raise  # the port is no longer what it was: nothing after this could be trusted
        except Exception as e:  # noqa: BLE001 - a layer without a float64 kernel
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            info = {"skipped": f"the Paddle model does not train in float64 "
                               f"({type(e).__name__}: {first[:160]})"}
        else:
            port64 = dict(log.data)
            betas = forcing.adam_betas(paddle_optimizer)
            if betas is not None:
                # in float64 Paddle weighs each gradient into Adam's moments by 1 - beta made
                # in float64, in float32 by 1 - beta made in float32, as the records hold them
                # (1.3e-5 apart for 0.999, torch's moments recorded so weighted)
                weight = {"moment1": forcing._paddle_weight(betas[0]),
                          "moment2": forcing._paddle_weight(betas[1])}
                for key, value in port64.items():
                    acc = key.rpartition(".")[2]
                    if "/opt/" in key and acc in weight:
                        port64[key] = np.asarray(value, np.float64) * weight[acc]
            before = {kr.key: kr.status for kr in result.results}
            result = port_rounding.rescued_later(result, ref, other, noise, port64, forced)
            info = {"known": sum(kr.status == "known" and before[kr.key] != "known"
                                 for kr in result.results)}
    checks = dict(result.options.get("port_rounding", {}), later=info)
    return dataclasses.replace(result, options=dict(result.options, port_rounding=checks))


def _initial_stats(torch_model: Any, paddle_model: Any, plan: Mapping[str, KeyPlan]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each side's BatchNorm statistics before training, under their ``step0/stat/`` keys: the
    known-difference checks of step 0 read them (the momentum convention, the biased variance)."""
    buffers = {name for name, _ in torch_model.named_buffers()}
    ref = {f"step0/stat/{kp.paddle_name}": np.array(_torch_array(value, kp))  # copies
           for name, value in torch_model.state_dict().items()
           if name in buffers and (kp := plan.get(name)) is not None and kp.paddle_name}
    other = {f"step0/stat/{name}": np.array(value.numpy())
             for name, value in paddle_model.state_dict().items()
             if getattr(value, "stop_gradient", True)}
    return ref, other


def _first_lr(paddle_optimizer: Any) -> Optional[float]:
    try:
        return float(paddle_optimizer.get_lr())
    except Exception:  # noqa: BLE001 - only for a finding's wording
        return None


def _train_localised(
    result: Any,
    torch_model: Any,
    paddle_model: Any,
    before: Snapshot,
    batches: Sequence[Any],
    torch_data: Mapping[str, Any],
    paddle_data: Mapping[str, Any],
    *,
    torch_loss_fn: Callable[..., Any],
    paddle_loss_fn: Callable[..., Any],
    seed: int,
    by_order: bool,
    calibrate: bool,
    criteria: Criteria,
    lr: Optional[float],
    plan: Mapping[str, KeyPlan],
    fusions: Sequence[Any] = (),
    rules: Any = None,
    forced_logs: Optional[Mapping[int, Any]] = None,
) -> Any:
    """``result`` with where the first failing step goes wrong in ``options["findings"]`` (and
    ``["divergence"]`` where a layer is named). ``forced_logs``: the first step judged from the
    reference's state, {step: (its result under step0/ keys, torch data, Paddle data)}."""
    found = first_failing_step(result)
    if found is None:
        return result
    step, kinds, first = found
    diverged = reference_diverged(step, first)
    if diverged is not None:  # no layer of a diverged computation is worth localising
        return dataclasses.replace(result, options=dict(result.options, findings=[diverged]))
    # judged from the reference's state (forcing): localised from it on both sides too
    forced = step in result.options.get("forcing", {}).get("steps", ())
    findings: list[str] = []
    options = dict(result.options)
    if step > 0:
        findings.append(f"step {step} is the first whose outputs, gradients or weights differ "
                        f"({', '.join(kinds)}), first at {first.key}: {first.reason}")
        if kinds[0] == "lr":
            findings.append("the learning rate differs first: the schedulers differ (their "
                            "kind, step size, decay, or how often each is stepped)" +
                            _lr_ratio(torch_data, paddle_data))
        elif kinds[0] == "param" and forced:
            failing = [kr.key for kr in result if kr.key.startswith(f"step{step}/param/")
                       and not kr.passed]
            top = noise_gradients(failing, step, torch_data, paddle_data)
            head = (f"step {step}, run on both sides from the reference's weights, statistics "
                    "and optimizer state, computes aligned gradients and other updated weights")
            fitted = None
            kept = (forced_logs or {}).get(step)
            if top is None and kept is not None:
                # a warmup from lr 0 moves nothing at step 0: the first update that shows the
                # optimizers is this one, set against each other as step 0's would be
                weights = {k.split("/param/", 1)[1]: v for k, v in torch_data.items()
                           if k.startswith(f"step{step - 1}/param/")}
                lr_s = torch_data.get(f"step{step}/lr")
                fitted = update_finding(kept[0], kept[1], kept[2], weights,
                                        None if lr_s is None else float(np.asarray(lr_s)),
                                        label=step)
            if top is not None:
                # a warmup from lr 0 moves nothing at step 0: the noise shows first later on
                findings.append(f"{head} ({len(failing)} of them): {noise_update_line(top)}")
            elif fitted is not None and "neither proportional" not in fitted:
                # "the gradients align (stepN/grad) and the updated parameters do not (n of
                # them): ..." says again what the head says
                said = fitted.split(" of them): ", 1)
                findings.append(f"{head}: {said[-1]}")
            else:
                findings.append(f"{head}: the optimizers' hyperparameters differ (momentum, "
                                "Adam's betas or epsilon, a weight decay: the first update "
                                "does not show them)")
        elif kinds[0] == "param":
            findings.append(f"step {step}'s gradients align and its updated weights do not, "
                            "while the first update aligned: the optimizers' state differs "
                            "(momentum, Adam's betas or epsilon: the first update does not "
                            "show them)")
    elif kinds[0] == "loss":
        findings.append(loss_finding(result, batch_size_of(batches),
                                     _split_batch(batches[0], 0)[1],
                                     getattr(torch_loss_fn, "ignore_index", -100)))
    elif kinds[0] == "lr":
        findings.append("the learning rate differs before the first update: the optimizers' "
                        "initial learning rates (or their schedulers) differ" +
                        _lr_ratio(torch_data, paddle_data))
    elif kinds[0] == "param":
        weights = {k: np.asarray(v.numpy()) for k, v in before.paddle_state.items()}
        line = update_finding(result, torch_data, paddle_data, weights, lr)
        if line:
            findings.append(line)
        if "opt" in kinds and (not line or "neither proportional" in line):
            # a normalised update (Adam) hides a weight decay that its moments show
            findings.append(state_finding(result, 0, torch_data, paddle_data, weights))
    elif kinds[0] == "stat":
        findings.append(stat_finding(result))
    if kinds[0] == "opt":
        weights = ({k: np.asarray(v.numpy()) for k, v in before.paddle_state.items()}
                   if step == 0 else
                   {k.split("/param/", 1)[1]: v for k, v in torch_data.items()
                    if k.startswith(f"step{step - 1}/param/")})
        findings.append(state_finding(result, step, torch_data, paddle_data, weights))
    # gradients a kink crossing was said to explain and the counterfactual did not: the
    # layer-by-layer backward would stop at the crossing itself, the gradients say more
    check = result.options.get("counterfactual", {}).get(f"step{step}") or {}
    line = counterfactual.finding(step, check) if kinds[0] == "grad" else None
    if line is not None:
        findings.append(line)
        options["divergence"] = {"layer": check["first"]["layer"], "kind": "layer",
                                 "message": line, "hint": None, "direction": "backward",
                                 "step": step}
    elif kinds[0] in ("logits", "grad"):
        # the step again, layer by layer, from the state each side had before it: the copy taken
        # before training, or the weights and statistics each side recorded at the step before
        before.restore(torch_model, paddle_model)
        if step == 0 or _restore_step(step - 1, torch_model, paddle_model, torch_data,
                                      torch_data if forced else paddle_data, plan, fusions):
            loc = _localise_step(torch_model, paddle_model, batches[step % len(batches)],
                                 backward=kinds[0] == "grad", torch_loss_fn=torch_loss_fn,
                                 paddle_loss_fn=paddle_loss_fn, seed=seed, by_order=by_order,
                                 calibrate=calibrate, criteria=criteria, plan=plan,
                                 rules=rules)
            from ..capture import layer_types

            cut = gradient_not_reaching(loc.result, layer_types(torch_model)) \
                if kinds[0] == "grad" else None
            div = loc.divergence
            if cut is not None and div is None:
                # the gradient cut is where the step goes wrong: named as a divergence would be
                findings.append(cut[1])
                options["divergence"] = {"layer": cut[0], "kind": "layer", "message": cut[1],
                                         "hint": None, "direction": "backward", "step": step}
            else:
                findings += loc.findings
            drift = _drifted(div, step, forced, plan, torch_data, paddle_data)
            if drift is not None:
                findings.append(drift)
            if div is not None:
                options["divergence"] = {"layer": div.layer, "kind": div.kind,
                                         "message": div.message, "hint": loc.hint,
                                         "direction": div.direction, "step": step}
                if loc.port_layer() is not None:
                    options["divergence"]["port_layer"] = loc.port_layer()
    options["findings"] = findings
    return dataclasses.replace(result, options=options)


def _lr_ratio(torch_data: Mapping[str, Any], paddle_data: Mapping[str, Any]) -> str:
    """"; the port's rate is 2x the reference's at every step (...)" where the two sides' rates
    keep one ratio over every step either is not 0 at (a peak rate given otherwise, the same
    schedule), else ""."""
    ratios = []
    for key in torch_data:
        if not re.fullmatch(r"step\d+/lr", key) or key not in paddle_data:
            continue
        a, b = float(np.asarray(torch_data[key])), float(np.asarray(paddle_data[key]))
        if a == 0.0 and b == 0.0:  # a warmup from 0: no ratio to read
            continue
        if a == 0.0:
            return ""
        ratios.append(b / a)
    if len(ratios) < 2 or any(abs(r - ratios[0]) > 1e-6 * abs(ratios[0]) for r in ratios):
        return ""
    return (f"; the port's rate is {ratios[0]:.6g}x the reference's at each of the {len(ratios)} "
            "steps with a rate: the same schedule from another peak (or initial) learning rate")


def _drifted(div: Any, step: int, forced: bool, plan: Mapping[str, KeyPlan],
             torch_data: Mapping[str, Any], paddle_data: Mapping[str, Any]) -> Optional[str]:
    """A later step localised from each side's own weights names a layer whose input aligns and
    whose output does not: where that layer's own weights after the step before already differ
    (each key passing), the step computes on weights apart by the rounding of the steps before,
    and the layer is named for them (a faithful BERT's word embedding after three Adam steps)."""
    if div is None or step == 0 or forced or div.kind != "layer" or not div.input_aligned \
            or div.direction != "forward":
        return None
    layer = div.layer.partition("#")[0]
    worst, names = 0.0, []
    for name, kp in plan.items():
        if kp.paddle_name is None or name.rpartition(".")[0] != layer:
            continue
        key = f"step{step - 1}/param/{kp.paddle_name}"
        a, b = torch_data.get(key), paddle_data.get(key)
        if a is None or b is None or np.shape(a) != np.shape(b):
            continue
        gap = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                           initial=0.0))
        if gap > 0.0:
            worst = max(worst, gap)
            names.append(key)
    if not names:
        return None
    return (f"{layer}'s own weights after step {step - 1} already differ on the two sides (max "
            f"{worst:.3e}, {', '.join(names[:2])}{' ...' if len(names) > 2 else ''}, which "
            f"passed): step {step} runs each side from its own weights, so a layer whose weights "
            "the steps before moved apart is named there; the difference is carried from those "
            "steps, not made by the layer's code")


def _localise_step(torch_model: Any, paddle_model: Any, batch: Any, *, backward: bool,
                    torch_loss_fn: Callable[..., Any], paddle_loss_fn: Callable[..., Any],
                    seed: int, by_order: bool, calibrate: bool, criteria: Criteria,
                    plan: Mapping[str, KeyPlan], rules: Any = None) -> Any:
    """A step's forward (and with ``backward``, loss and backward) captured layer by layer on
    both sides, in the models' own mode, paired and judged (``localise_forward``). ``rules``:
    by order, the user's, under which the localisation pairs the weights itself (else the
    plan's pairs)."""
    import paddle
    import torch

    inputs, labels = _split_batch(batch, 0)
    args, kwargs = _split_inputs(inputs)
    dev, place = _torch_device(torch_model), _paddle_place(paddle_model)
    targs, tkw, tlab = _to_torch(args, dev), _to_torch(kwargs, dev), _to_torch(labels, dev)
    pargs, pkw, plab = _to_paddle(args, place), _to_paddle(kwargs, place), _to_paddle(labels, place)

    def zero_torch(model: Any) -> Callable[[], None]:
        def zero() -> None:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
        return zero

    def run(model: Any, fwd_args: Any, fwd_kw: Any, labels_: Any, loss_fn: Any,
            zero: Callable[[], None], no_grad: Any) -> Callable[[], None]:
        if backward:
            return backward_step(model, fwd_args, fwd_kw, labels_, loss_fn, _call_loss, zero)

        def forward() -> None:
            zero()
            with no_grad():
                model(*fwd_args, **fwd_kw)
        return forward

    with _deterministic(seed):
        run_torch = run(torch_model, targs, tkw, tlab, torch_loss_fn, zero_torch(torch_model),
                        torch.no_grad)
        run_paddle = run(paddle_model, pargs, pkw, plab, paddle_loss_fn,
                         paddle_model.clear_gradients, paddle.no_grad)
        twin = None
        if calibrate:
            model64 = _float64_twin(torch_model)
            a64, k64 = _to_torch(args, dev, float64=True), _to_torch(kwargs, dev, float64=True)
            l64 = _to_torch(labels, dev, float64=True)
            twin = (model64, run(model64, a64, k64, l64, _float64_loss(torch_loss_fn),
                                 zero_torch(model64), torch.no_grad))
        return localise_forward(torch_model, paddle_model, run_torch, run_paddle,
                                by_order=by_order, criteria=criteria, run_twin=twin,
                                backward=backward, ref_layout=partial(_paddle_layout, plan),
                                rules=rules if by_order else ConversionRules.from_pairs(
                                    {t: kp.paddle_name for t, kp in plan.items()
                                     if kp.paddle_name is not None}))


def _restore_step(step: int, torch_model: Any, paddle_model: Any, torch_data: Mapping[str, Any],
                  paddle_data: Mapping[str, Any], plan: Mapping[str, KeyPlan],
                  fusions: Sequence[Any] = ()) -> bool:
    """Each model's weights and statistics as it recorded them after ``step`` (the torch side's
    from Paddle's layout back to its own); False where a value was not recorded (``stats=False``),
    the models then left as they were."""

    def recorded(data: Mapping[str, Any], name: str) -> Any:
        for kind in ("param", "stat"):
            value = data.get(f"step{step}/{kind}/{name}")
            if value is not None:
                return np.asarray(value)
        return None

    torch_values: dict[str, np.ndarray] = {}
    for tname, kp in plan.items():
        if kp.paddle_name is None:
            continue
        value = recorded(torch_data, kp.paddle_name)
        if value is None:
            return False
        torch_values[tname] = np.ascontiguousarray(value.T) if kp.action == "transpose" else value
    paddle_values = {}
    for name in part_names(unaliased(paddle_model.state_dict())[0], fusions):
        value = recorded(paddle_data, name)
        if value is None:
            return False
        paddle_values[name] = value
    paddle_values = fuse(paddle_values, fusions)
    # a packed attention tensor also under its slices' names
    copy_into(torch_model.state_dict(), torch_values)
    paddle_model.set_state_dict(with_aliases(paddle_model, paddle_values))
    return True


def _paddle_layout(plan: Mapping[str, KeyPlan], capture: dict[str, Any]) -> dict[str, Any]:
    """A torch capture's parameter gradients in Paddle's layout (Linear weights transposed), as
    ``align_train`` records its own ``grad/`` keys."""
    from ..capture.naming import parse_key

    # a reference tensor split for the port (``fusion.Split``) has no plan of its own, only
    # its parts: its gradient is turned whole, then cut along the outputs as they are
    whole = {s.torch_key: s for s in active_splits() if s.linear}
    out = dict(capture)
    for key, value in capture.items():
        parsed = parse_key(key)
        if parsed is not None and parsed.is_param:
            kp = plan.get(parsed.name)
            if kp is not None and kp.action == "transpose":
                out[key] = _torch_array(value, kp)
            elif kp is None and parsed.name in whole:
                out[key] = np.ascontiguousarray(np.asarray(value).T)
    return out


def _paddle_to_torch(plan: Mapping[str, KeyPlan], torch_model: Any) -> dict[str, str]:
    """Paddle parameter name -> the torch parameter it comes from: a packed attention tensor's
    own name for each of its slices (its layer is the torch model's)."""
    origin = split_attention(torch_model.state_dict())[1]
    return {kp.paddle_name: origin.get(name, name) for name, kp in plan.items() if kp.paddle_name}


def _torch_to_paddle(plan: Mapping[str, KeyPlan]) -> dict[str, str]:
    return {name: kp.paddle_name for name, kp in plan.items() if kp.paddle_name}


def _recording(kink: Optional[KinkCapture], model: Any, log: ReprodLogger, side: str) -> Any:
    return contextlib.nullcontext() if kink is None else kink.recording(model, log, side)


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
