"""``align_forward``: both models in eval mode on the same inputs, their outputs compared, and
where they differ, the first layer that makes them differ (``localise``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..diff.criteria import Criteria
from ..errors import ReprodError
from ..logger import ReprodLogger
from ..storage import save
from . import settings
from .calibration import (
    _first_line,
    _float64_twin,
    _half_twin,
    _half_weights_twin,
    float64_default,
    half_rounded_keys,
    twin_failed,
    uncalibrated,
)
from .call_order import held_by_calls, noting_calls
from .calls import trace_settings
from .framework import (
    _HALF,
    _criteria,
    _deterministic,
    _flatten,
    _modes,
    _paddle_place,
    _port_precision,
    _split_inputs,
    _to_paddle,
    _to_torch,
    _torch_device,
    extra_outputs_finding,
    not_compared_outputs,
    one_sided_outputs,
    pair_outputs,
)
from .fusion import splitting_for_port
from .half_local import _is_input, local_layers
from .localise import _capture, localise_forward
from .results import PathLike, _finish, _write_diff_log

__all__ = ["align_forward"]

# --- forward ------------------------------------------------------------------------------------


def _held_half(result: Any, half: Optional[str], verbose: bool) -> Any:
    """``result`` with a first finding where the port's values are half precision held in
    float32 (its parameters float32, so ``precision="auto"`` read float32): the comparison
    said "compare the reference run in bfloat16", which ``precision=`` does here."""
    why = str((result.options.get("not_calibrated") or {}).get("why", ""))
    found = re.match(r"other is (bfloat16|float16), ref float32", why)
    if half is not None or found is None:
        return result
    p = found.group(1)
    line = (f"the port's values are {p}, held in float32 (its parameters are float32, so "
            f"precision='auto' read float32): pass precision='{p}' to judge it against the "
            f"reference run in {p}, with the float32 run as the noise")
    if verbose:
        print(line, flush=True)
    findings = [line, *[f for f in result.options.get("findings", ()) if f != line]]
    return dataclasses.replace(result, options=dict(result.options, findings=findings))


def _computed_float32(result: Any, half: Optional[str], port_cast: Optional[str],
                      port: Mapping[str, Any], verbose: bool) -> Any:
    """``result`` with a first finding where ``precision=`` asked for a half precision and the
    port, holding float32 weights, returned float32 values: it computed in float32, and the
    check said nothing of its half-precision run (``paddle.amp.auto_cast`` does nothing where
    Paddle has no half kernels, as on the CPU)."""
    from ..diff.noise import carried_precision

    if half is None or port_cast is not None:
        return result
    floating = [np.asarray(v) for v in port.values() if np.asarray(v).dtype.kind == "f"]
    if not floating or any(a.dtype != np.float32 or carried_precision(a) is not None
                           for a in floating):
        return result
    line = (f"precision='{half}', but the port's weights and outputs are float32 values: it "
            f"computed in float32, and is judged against the reference run in {half} "
            "(paddle.amp.auto_cast does nothing where Paddle has no half kernels, as on the "
            f"CPU; cast the port with paddle_model.to(dtype='{half}') on a GPU)")
    if verbose:
        print(line, flush=True)
    return dataclasses.replace(result, options=dict(
        result.options, findings=[line, *result.options.get("findings", ())]))


@splitting_for_port
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
    criteria: Optional[Criteria] = None,
    by_order: bool = False,
    localise: bool = True,
    check_settings: Any = True,
    rules: Any = None,
    layers: Optional[bool] = None,
    precision: str = "auto",
) -> Any:
    """Run both models in eval mode on the same inputs and compare their outputs.

    ``inputs``: numpy arrays (or tensors): one array, a tuple/list (positional arguments) or a dict
    (keyword arguments). Outputs are recorded as ``logits`` (``logits/0``, ``logits/<name>`` for
    tuples and dicts); where one side returns a tuple and the other names the same outputs (a
    Hugging Face ``ModelOutput``), they pair by position under the reference's names, listed in
    ``options["outputs_paired"]`` (Paddle key -> torch key). A None output is nothing to compare,
    and the port's outputs beyond the reference's once each of the reference's has its pair
    (PaddleNLP's hidden states with ``output_hidden_states=True``) are not compared but said in a
    finding: both in ``options["outputs_not_compared"]`` (key -> why). With ``out_dir``, writes ``forward_torch.npy``, ``forward_paddle.npy`` and the
    reprod_log-style ``forward_diff.log`` (also printed with ``verbose``). The models' train/eval
    modes are restored afterwards.
    Returns ``reprod.compare``'s ``DiffResult`` (torch is the reference).

    ``check_settings=True`` (the default) also compares what each paired layer computes beyond
    its weights (``reprod.align.settings``: a BatchNorm's epsilon and momentum, a convolution's
    stride, padding, dilation and groups, a pool's kernel, stride, padding and ``ceil_mode``, a
    dropout's rate and scaling mode, GELU's approximation...): each that differs is a failing key
    ``settings/<Paddle layer>/<setting>`` (status ``"setting"``) and a finding, whatever
    the values say (a BatchNorm epsilon of 1e-6 for 1e-5 moves resnet18's outputs by less than
    float32 rounding). ``options["settings"]`` lists them, and the kinds of layer without
    parameters that could not be paired by order. A list of ``"<Paddle layer>/<setting>"``
    glob patterns (``["*/momentum"]``) waives those settings: listed under ``"waived"``, not
    failed. ``False`` turns the check off.

    ``calibrate=True``: a deep copy of the torch model cast to float64 (``.double()``: weights and
    BatchNorm statistics) runs on the same inputs (floating ones cast to float64), and its outputs
    are the noise reference of ``reprod.compare(..., noise=)``: each key passes when the Paddle
    output differs from the torch one by at most ``noise_factor`` (default 20) times the torch
    output's own distance from float64, whatever ``threshold`` says (``KeyResult.noise_multiple``).
    It costs one float64 forward pass and a second copy of the torch model, which runs with
    torch's default dtype float64 (a model's own ``torch.tensor(...)`` or ``torch.full(...)``
    are float64 there too; restored after). Where the copy still fails, the run is judged
    without calibration, and ``options["calibration"]["skipped"]`` and the first finding say
    why. The worst multiple is
    in ``result.options["noise_multiple"]`` (``{"forward": {"multiple": ..., "key": ...}}``);
    ``out_dir`` also gets ``forward_torch64.npy`` (``reprod-diff forward_torch.npy
    forward_paddle.npy --noise forward_torch64.npy`` reproduces the verdicts).

    ``layers`` (default: ``calibrate``): where the outputs pass, the layers inside are judged
    too, each against the float64 twin's own distance from float64: a bug early in a network
    with random weights can move the outputs by less than their rounding (a squeeze-excitation
    weight 1% off moves the example MobileNetV3's logits by 4e-9, its own layer's output by
    2e-3). The first layer that differs fails the run as the key ``layers/<its key>``, and the
    findings name it as localisation does. It costs the recorded passes localisation makes (the
    torch model, the port and the twin, each once more). Uncalibrated, a layer's float32
    rounding could fail a faithful port at an absolute threshold, so the default judges the
    outputs alone there.

    ``precision``: what the port computes in, ``"auto"`` (the default) reading it from the
    Paddle model's parameters (``model.to(dtype="float16")``). A float16 or bfloat16 port rounds
    every value thousands of times coarser than float32 noise can judge: the reference is then
    a copy of the torch model in that precision, on the inputs cast to it, and, calibrated, the
    torch model as given (float32) is the noise, within
    ``reprod.diff.noise.LOW_PRECISION_NOISE_FACTOR`` (8; ``out_dir`` gets
    ``forward_torch32.npy``). The port's floating inputs are cast to its precision.
    ``precision="float32"`` judges it against the float32 model, where calibration cannot
    speak (each key says so). ``options["precision"]`` holds a half precision judged in.
    Paddle has no half-precision kernels for most operations on the CPU: run such a port on a
    GPU (the error says which kernel it lacked).

    ``rules``: the ``ConversionRules`` the weights were loaded with (skips of the reference's
    layers the port lacks, ``port_only`` for the port's own): the settings check and the
    localisation pair the layers with parameters under them.

    ``criteria``: a ``reprod.Criteria`` holding the check at once (methods, thresholds, per-key
    rules, atol/rtol, noise factor); keyword arguments given beside it override its fields.

    >>> load_into_paddle(paddle_model, torch_model)
    >>> r = align_forward(torch_model, paddle_model, {"x": x}, out_dir="result")
    >>> r.passed
    True
    """
    import paddle
    import torch

    crit = _criteria(criteria, calibrate, methods=method, threshold=threshold, atol=atol,
                     rtol=rtol, per_key=per_key, noise_factor=noise_factor)
    port_dtype = _port_precision(paddle_model)
    if precision == "auto":
        precision = port_dtype
    elif precision not in (*_HALF, "float32"):
        raise ReprodError(f"align_forward: precision={precision!r}; expected 'auto', "
                          "'float32', 'float16' or 'bfloat16'")
    half = precision if precision in _HALF else None
    port_cast = port_dtype if port_dtype in _HALF else None  # what the port's inputs are in
    waive = settings.waivers(check_settings)
    torch_log, paddle_log = ReprodLogger(), ReprodLogger()
    noise_log = ReprodLogger() if calibrate else None
    skipped: Optional[str] = None  # why a calibrated run is judged without its twin
    args, kwargs = _split_inputs(inputs)
    outs: list[tuple[ReprodLogger, Any]] = []
    half_twin = None  # the reference in the port's half precision
    noise_twin = None  # and its noise: the torch model on the half weights, in float32
    half_noise: Optional[str] = None  # which weights that rounds
    # the settings of the operations each model applies as functions, from its first pass
    traces = None if waive is None else (trace_settings(torch_model),
                                         trace_settings(paddle_model))
    # by order, which leaves each model calls first, from the same first pass: where the port's
    # weights hold the pairing by call order (loaded with inputs=), the settings and the
    # localisation pair the layers so too
    calls: Optional[tuple[Any, Any]] = None
    if by_order and not getattr(rules, "pairs", ()):
        calls = (noting_calls(torch_model), noting_calls(paddle_model))
    noted: list[dict[str, int]] = []
    with _modes(torch_model, paddle_model, train=False), _deterministic(seed):
        dev = _torch_device(torch_model)
        with torch.no_grad():
            torch.manual_seed(seed)
            targs, tkw = _to_torch(args, dev), _to_torch(kwargs, dev)
            with traces[0] if traces else contextlib.nullcontext(), \
                    calls[0] if calls else contextlib.nullcontext() as seen:
                out32 = torch_model(*targs, **tkw)
            noted.append(seen or {})
            if half is not None:
                # the reference in the port's precision, and the float32 run its noise: a half
                # port against float32 noise would fail every key by its own rounding
                # made once: localisation runs the same copy
                half_twin = _half_twin(torch_model, half, "align_forward")
                outs.append((torch_log, _run_half(half_twin, torch_model, half, args, kwargs,
                                                  dev, seed)))
                if noise_log is not None:
                    # the noise: the same half weights and inputs, computed in float32
                    keys, half_noise = half_rounded_keys(torch_model, paddle_model, half,
                                                         rules)
                    noise_twin = _half_weights_twin(torch_model, half, keys)
                    outs.append((noise_log, _run_rounded(noise_twin, half, args, kwargs,
                                                         dev, seed)))
            else:
                outs.append((torch_log, out32))
            del out32
            if noise_log is not None and half is None:
                twin = _float64_twin(torch_model)  # in eval mode, as the original is now
                torch.manual_seed(seed)
                args64 = _to_torch(args, dev, float64=True)
                try:
                    with float64_default():
                        outs.append((noise_log, twin(*args64,
                                                     **_to_torch(kwargs, dev, float64=True))))
                except Exception as e:  # the model's own code: judged as if uncalibrated
                    skipped = twin_failed(e)
                    noise_log, calibrate = None, False
                del twin
        place = _paddle_place(paddle_model)
        with paddle.no_grad():
            pargs = _to_paddle(args, place, dtype=port_cast)
            pkw = _to_paddle(kwargs, place, dtype=port_cast)
            with traces[1] if traces else contextlib.nullcontext(), \
                    calls[1] if calls else contextlib.nullcontext() as seen:
                out_p = _run_port(paddle_model, pargs, pkw, port_cast, place)
            noted.append(seen or {})
            outs.append((paddle_log, out_p))
    flats: list[dict[str, np.ndarray]] = []
    nones: dict[str, list[str]] = {}
    sides = ("torch", "torch64", "Paddle") if len(outs) == 3 else ("torch", "Paddle")
    for side, (_, out) in zip(sides, outs):
        flats.append({})
        # the twin's Nones are the reference's
        _flatten(out, "logits", flats[-1],
                 None if side == "torch64" else nones.setdefault(side, []))
    extra: list[str] = []
    flats[-1], paired_outputs = pair_outputs(flats[0], flats[-1], extra=extra)
    not_compared = not_compared_outputs({s: k for s, k in nones.items() if k}, extra)
    for (log, _), flat in zip(outs, flats):
        for k, v in flat.items():
            log.add(k, v)
    result = _finish(
        torch_log,
        paddle_log,
        out_dir=out_dir,
        name="forward",
        criteria=crit,
        verbose=verbose,
        noise_log=noise_log,
        write_log=False,  # below, with the findings
        noise_precision="float32" if half is not None else "float64",
    )
    if half is not None:
        result = dataclasses.replace(result, options=dict(result.options, precision=half))
    if half_noise is not None:
        result = dataclasses.replace(result, options=dict(result.options,
                                                          half_noise=half_noise))
    if paired_outputs:
        result = dataclasses.replace(result, options=dict(result.options,
                                                          outputs_paired=paired_outputs))
    if not_compared:
        result = dataclasses.replace(result, options=dict(result.options,
                                                          outputs_not_compared=not_compared))
    held = held_by_calls(torch_model, paddle_model, rules, (noted[0], noted[1])) \
        if calls else None
    if held is not None:
        rules = held
        result = dataclasses.replace(result, options=dict(result.options,
                                                          weights_paired="by call order"))
    if waive is not None:
        result = settings.settings_checked(result, torch_model, paddle_model, waive=waive,
                                           by_order=by_order, traces=traces, rules=rules)
    # an output one side does not return has no layer to find: said below, not localised
    outputs_fail = any(not kr.passed and not kr.key.startswith("settings/")
                       and kr.status not in ("missing", "extra") for kr in result.results)
    if localise and (outputs_fail or (calibrate if layers is None else layers)):
        result = _localised(
            result, torch_model, paddle_model, args, kwargs, seed=seed, by_order=by_order,
            calibrate=calibrate, criteria=crit, out_dir=out_dir, verbose=verbose, rules=rules,
            outputs_passed=not outputs_fail, half=half, port_cast=port_cast,
            half_twin=half_twin, noise_twin=noise_twin,
        )
    half_twin = noise_twin = None
    result = settings.with_finding(result, verbose=verbose)
    result = _held_half(result, half, verbose)
    result = _computed_float32(result, half, port_cast, flats[-1], verbose)
    # what both return is judged; what one does not is said first
    first = [line for line in (one_sided_outputs(flats[0], flats[-1], "logits"),
                               extra_outputs_finding(extra, "logits")) if line is not None]
    if first:
        result = dataclasses.replace(result, options=dict(
            result.options, findings=[*first, *result.options.get("findings", ())]))
        if verbose:
            for line in first:
                print(line, flush=True)
    result = uncalibrated(result, skipped, verbose)  # and before them, why the noise is not the twin's
    if out_dir is not None:
        _write_diff_log(result, os.path.join(os.fspath(out_dir), "forward_diff.log"),
                        verbose=verbose)
    return result


def _run_half(twin: Any, torch_model: Any, half: str, args: Any, kwargs: Any, dev: Any,
              seed: int) -> Any:
    """The outputs of ``twin`` (a copy of the torch model in ``half``), on the inputs cast to
    it."""
    import torch

    dtype = getattr(torch, half)
    torch.manual_seed(seed)
    try:
        return twin(*_to_torch(args, dev, dtype=dtype), **_to_torch(kwargs, dev, dtype=dtype))
    except Exception as e:  # a kernel torch lacks in that precision on this device
        raise ReprodError(
            f"align_forward: the port computes in {half}, and {type(torch_model).__name__} in "
            f"{half}, its reference, failed on {dev} ({type(e).__name__}: {_first_line(e)}); "
            "pass precision='float32' to judge it against the float32 model") from e


def _run_rounded(twin: Any, half: str, args: Any, kwargs: Any, dev: Any, seed: int) -> Any:
    """The outputs of ``twin`` (the half-weights twin) on the inputs rounded to ``half``, as
    the half reference takes them, held in their own dtype."""
    import torch

    dtype = getattr(torch, half)
    torch.manual_seed(seed)
    return twin(*_to_torch(args, dev, rounded_to=dtype),
                **_to_torch(kwargs, dev, rounded_to=dtype))


def _run_port(paddle_model: Any, args: Any, kwargs: Any, port_cast: Optional[str],
              place: Any) -> Any:
    """The port's outputs; where it holds half-precision weights and Paddle cannot run them
    (no float16 or bfloat16 kernel for most operations on the CPU), one line that says so."""
    try:
        return paddle_model(*args, **kwargs)
    except Exception as e:
        if port_cast is None:
            raise  # the port's own code: its error as it is
        cpu = "cpu" in str(place).lower() or place is None
        raise ReprodError(
            f"align_forward: the port {type(paddle_model).__name__} holds {port_cast} weights, "
            f"and Paddle could not run it on {place} ({type(e).__name__}: {_first_line(e)})"
            + ("; Paddle has no float16 or bfloat16 kernels for most operations on the CPU: "
               "run both models on a GPU" if cpu else "")) from e


def _localised(
    result: Any,
    torch_model: Any,
    paddle_model: Any,
    args: Any,
    kwargs: Any,
    *,
    seed: int,
    by_order: bool,
    calibrate: bool,
    criteria: Criteria,
    out_dir: Optional[PathLike],
    verbose: bool,
    rules: Any = None,
    outputs_passed: bool = False,
    half: Optional[str] = None,
    port_cast: Optional[str] = None,
    half_twin: Any = None,
    noise_twin: Any = None,
) -> Any:
    """``result`` with ``align_forward``'s localisation in its options, the layers' dumps
    written and, with ``verbose``, the findings printed. ``outputs_passed``: the layers are
    judged although the outputs pass; a layer that differs fails the result (``layers/<key>``),
    and where none does, or the layers do not pair, the result is as it was. ``half``: the
    reference runs in that precision (``half_twin``, the copy the outputs ran, where made), and
    the torch model as given is the noise; ``port_cast``: the port's inputs' dtype."""
    import paddle
    import torch

    with _modes(torch_model, paddle_model, train=False), _deterministic(seed):
        dev, place = _torch_device(torch_model), _paddle_place(paddle_model)
        reference = torch_model if half is None else half_twin if half_twin is not None \
            else _half_twin(torch_model, half, "align_forward")
        dtype = None if half is None else getattr(torch, half)
        targs, tkw = _to_torch(args, dev, dtype=dtype), _to_torch(kwargs, dev, dtype=dtype)
        pargs = _to_paddle(args, place, dtype=port_cast)
        pkw = _to_paddle(kwargs, place, dtype=port_cast)

        def run_torch() -> None:
            with torch.no_grad():
                torch.manual_seed(seed)
                reference(*targs, **tkw)

        def run_paddle() -> None:
            with paddle.no_grad():
                paddle_model(*pargs, **pkw)

        twin = None
        if calibrate and half is not None:
            if noise_twin is None:
                noise_twin = _half_weights_twin(torch_model, half, half_rounded_keys(
                    torch_model, paddle_model, half, rules)[0])
            a32 = _to_torch(args, dev, rounded_to=dtype)
            k32 = _to_torch(kwargs, dev, rounded_to=dtype)

            def run_float32() -> None:
                with torch.no_grad():
                    torch.manual_seed(seed)
                    noise_twin(*a32, **k32)

            twin = (noise_twin, run_float32)
        elif calibrate:
            model64 = _float64_twin(torch_model)
            a64, k64 = _to_torch(args, dev, float64=True), _to_torch(kwargs, dev, float64=True)

            def run_twin() -> None:
                with torch.no_grad():
                    torch.manual_seed(seed)
                    model64(*a64, **k64)

            twin = (model64, run_twin)
        found = localise_forward(reference, paddle_model, run_torch, run_paddle,
                                 by_order=by_order, criteria=criteria, run_twin=twin,
                                 rules=rules)
        # in half precision a layer's whole-run noise holds all the rounding upstream: each
        # layer is judged again alone, on the half reference's input
        local, unjudged = None, None
        if calibrate and half is not None:
            try:
                # by order only the leaves were recorded: the blocks too, to judge them alone
                ref = found.ref if not found.by_order else _capture(reference, run_torch, True)
                local = local_layers(ref, noise_twin, paddle_model,
                                     port_names=found.port_names, precision=half,
                                     factor=criteria.noise_factor, containers=True,
                                     run_port=run_paddle, run_twin=twin[1])
            except Exception as e:  # noqa: BLE001 - the whole run's judgement stands, said
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                unjudged = f"the layers could not be replayed alone ({type(e).__name__}: " \
                           f"{first[:160]})"
    div = found.divergence
    findings: list[str] = []
    if outputs_passed:
        judged = len(found.result.results) if found.result is not None else 0
        if div is None or not _fails_the_layers(div):
            info: dict[str, Any] = {"judged": judged, "passed": div is None}
            if div is not None:  # what differs, and fails nothing (_fails_the_layers)
                info["not_failed"] = div.message
            result = dataclasses.replace(result, options=dict(result.options, layers=info))
            div = None
        else:
            failing = dataclasses.replace(div.output, key=f"layers/{div.output.key}")
            findings = [f"the outputs align, but not the layers inside: {found.findings[0]}",
                        *found.findings[1:]]
            result = dataclasses.replace(
                result, results=tuple(result.results) + (failing,),
                options=dict(result.options, layers={"judged": judged, "passed": False}))
    else:
        findings = list(found.findings)
    options = dict(result.options)
    if div is not None:
        options["divergence"] = {"layer": div.layer, "kind": div.kind, "message": div.message,
                                 "hint": found.hint}
        if found.port_layer() is not None:  # paired by order with a layer named otherwise
            options["divergence"]["port_layer"] = found.port_layer()
    if unjudged is not None:
        options["layers"] = dict(options.get("layers") or {}, alone={"skipped": unjudged})
    if local is not None:
        findings = _judged_alone(options, findings, found, local, half, torch_model,
                                 paddle_model, outputs_passed=outputs_passed)
        result = dataclasses.replace(result, results=tuple(result.results) + tuple(
            dataclasses.replace(kr, key=f"alone/{kr.key}") for kr in local.failed))
    if findings:
        options["findings"] = findings
    result = dataclasses.replace(result, options=options)
    if out_dir is not None and (findings or local is not None or not outputs_passed):
        out = os.fspath(out_dir)
        save(os.path.join(out, "forward_layers_torch.npy"), found.ref)
        save(os.path.join(out, "forward_layers_paddle.npy"), found.port)
    if verbose:
        for line in findings:
            print(line, flush=True)
    return result


def _judged_alone(options: dict[str, Any], findings: list[str], found: Any, local: Any,
                  half: str, torch_model: Any, paddle_model: Any, *, outputs_passed: bool
                  ) -> list[str]:
    """The findings, with ``options`` updated in place, where a half-precision port's layers
    were also judged each alone (``local``, from ``half_local.local_layers``) beside the whole
    run (``found``): ``options["layers"]["alone"]`` says how; the first layer failing alone is
    the divergence, its line first (the whole run's findings follow where they name the same
    layer, its likely cause among them; where they name another, they follow as what the whole
    run saw)."""
    failed = local.failed
    alone: dict[str, Any] = {"judged": local.judged, "inputs": local.inputs,
                             "passed": not failed, "factor": local.factor}
    top = max((kr for kr in local.result.results if kr.noise_multiple is not None),
              key=lambda kr: kr.noise_multiple, default=None)
    if top is not None:  # how close the layers came: what a bug must exceed to be seen
        alone["largest"] = {"key": top.key, "multiple": top.noise_multiple}
    if local.inputs_skipped is not None:
        alone["inputs_skipped"] = (f"the code between the layers could not be judged "
                                   f"({local.inputs_skipped})")
    layers = dict(options.get("layers") or {"judged": 0, "passed": True})
    layers["alone"] = alone
    layers["passed"] = bool(layers.get("passed", True)) and not failed
    options["layers"] = layers
    if not failed:
        return findings
    first = failed[0]
    layer = _layer_of(first.key)
    port = found.port_names.get(layer)
    cls = type(dict(torch_model.named_modules()).get(layer)).__name__
    named = f"{layer} ({cls}" + (f"; the port's {port})" if port and port != layer else ")")
    between = _is_input(first.key)
    if between:  # the code before the layer, not the layer
        after = _layer_before(found.ref, first.key, torch_model)
        call = first.key.rpartition(".")[0]  # its call: a ReLU a block calls twice
        named = named if call == layer else f"{call}{named[len(layer):]}"
        line = (f"diverges before {named}" + (f", after {after}" if after else "")
                + f": its input, computed by the port's code between the layers from the "
                f"reference's {half} layer outputs, is {first.noise_multiple:.3g}x that code's "
                f"own {half} rounding (> {local.factor:g}x)")
    elif first.noise_multiple is None:  # its own verdict: NaN, Inf, another shape
        line = f"diverges at {named}: replayed alone on the reference's {half} input, " \
               f"{first.reason}"
    else:
        line = (f"diverges at {named}: replayed alone on the reference's {half} input, it is "
                f"{first.noise_multiple:.3g}x its own {half} rounding (> {local.factor:g}x)")
    more = [kr.key for kr in failed[1:]]
    if more:
        line += (f"; {len(more)} more fail{'' if len(more) > 1 else 's'} alone: "
                 + ", ".join(more[:4]) + (", ..." if len(more) > 4 else ""))
    if outputs_passed:
        line = f"the outputs align, but not the layers inside: {line}"
    before = options.get("divergence")
    same = before is not None and _layer_of(str(before["layer"])) == layer
    hint = before.get("hint") if same and not between else None
    cause: list[str] = []
    if hint is None and not between:
        from .localise import _torch_context

        theirs = dict(paddle_model.named_sublayers()).get(port or layer)
        other = None if theirs is None else type(theirs).__name__
        other = None if other is None or other.lower() == cls.lower() else other
        hint = local.hint(first.key, found.ref, (cls, other),
                          _torch_context(torch_model, found.ref))
        if hint is not None:  # its label is the layer's classes, named in the line above
            label = f"{cls} vs {other}: " if other else f"{cls}: "
            cause = [f"likely cause at {layer}: "
                     + (hint[len(label):] if hint.startswith(label) else hint)]
    options["divergence"] = {"layer": layer, "kind": "layer", "message": line,
                             "hint": hint, "alone": True}
    if between:
        options["divergence"]["input"] = True
    if port and port != layer:
        options["divergence"]["port_layer"] = port
    if same and not between:  # the whole run's own line of it goes: its likely cause stays
        return [line, *cause, *findings[1:]]
    return [line, *cause, *(f"in the whole run: {f}" for f in findings)]


def _layer_before(ref: Mapping[str, Any], key: str, torch_model: Any) -> Optional[str]:
    """The layer whose output the reference recorded last before its input ``key``, of those
    computing something: where the code between the two is."""
    from ..capture.naming import ROOT, parse_key
    from .localise import _inert

    inert, last = _inert(torch_model), None
    for k in ref:
        if k == key:
            return last
        parsed = parse_key(k)
        if parsed is not None and parsed.what == "out" and parsed.name != ROOT \
                and parsed.name not in inert:
            last = parsed.name if parsed.call == 1 else f"{parsed.name}#{parsed.call}"
    return None


def _layer_of(key: str) -> str:
    """The layer a capture's output key names (``layer2.1.conv2.out`` -> ``layer2.1.conv2``)."""
    from ..capture.naming import parse_key

    parsed = parse_key(key)
    return key if parsed is None else parsed.name


# what a layer's key says of its values (not of its shape or dtype)
_VALUE_STATUSES = ("failed", "mismatch", "nan", "inf")


def _fails_the_layers(div: Any) -> bool:
    """Whether a divergence found where the outputs pass fails the run: a layer's values that
    differ and carry on. Not where the layers do not pair, nor a difference the data flowing on
    no longer shows (mBART's embedding scaled by 8 inside the layer on one side and after it on
    the other), nor another number of rows a near tie upstream chose (a Mixtral expert's): the
    outputs agree, and those say nothing of a bug."""
    return (div.kind == "layer" and not div.not_carried
            and div.output.status in _VALUE_STATUSES)
