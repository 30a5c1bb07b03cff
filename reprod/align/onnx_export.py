"""``align_onnx``: a torch model against its ONNX export, run by onnxruntime: the outputs and
every layer the graph holds apart judged against float32 noise, and the first layer the export
computes differently named, from one capture of each side (``reprod.capture.record_onnx``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from ..capture._onnx import _capture, _load, pair_onnx
from ..capture.naming import ROOT
from ..diff.criteria import Criteria
from ..errors import ReprodError
from ..logger import ReprodLogger
from .calibration import (
    _float64_twin,
    _half_weights_twin,
    float64_default,
    twin_failed,
    uncalibrated,
)
from .framework import (
    _HALF,
    _criteria,
    _flatten,
    _map_tree,
    _most,
    _split_inputs,
    _to_torch,
    _torch_device,
)
from .results import PathLike, _write_diff_log, noise_multiples

__all__ = ["align_onnx"]


def _graph_outputs(onnx_log: ReprodLogger) -> list[np.ndarray]:
    keys = [k for k in onnx_log.keys() if k == "<model>.out" or k.startswith("<model>.out[")]
    keys.sort(key=lambda k: -1 if k == "<model>.out" else int(k[len("<model>.out["):-1]))
    return [onnx_log.data[k] for k in keys]


def _fused_note(layer: str, fused: Mapping[str, Optional[str]], ref: Mapping[str, Any],
                held: Mapping[str, Any], types: Mapping[str, str]) -> str:
    """Where the exporter fused the layer named with the one before it (a BatchNorm folded into
    its convolution), that the cause may be the other's."""
    if layer not in fused:
        return ""
    before: list[str] = []
    partner = fused[layer]
    if partner is not None:  # TorchScript: the convolution's output is the BatchNorm's
        before = [partner]
    elif f"{layer}.in" in ref:
        # dynamo: the fused node carries the BatchNorm's name and reads the convolution's input
        entering = ref[f"{layer}.in"]
        before = [k[:-len(".out")] for k, v in ref.items()
                  if k.endswith(".out") and k not in held
                  and (v is entering or (np.shape(v) == np.shape(entering)
                                         and np.array_equal(v, entering)))]
    if not before:
        return ""
    names = ", ".join(f"{b} ({types.get(b.split('#')[0], '?')})" for b in before)
    return (f"; the graph computes it fused with {names}, whose output it does not hold: "
            "the difference is in either")


def _graph_precision(proto: Any) -> str:
    """The precision a graph computes in: that of most of its floating weights, by elements
    (a float16 converter keeps a few in float32, for the ops it leaves alone)."""
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
             TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
    sizes: dict[str, int] = {}
    for init in proto.graph.initializer:
        if init.data_type in names:
            n = int(np.prod(init.dims)) if len(init.dims) else 1
            sizes[names[init.data_type]] = sizes.get(names[init.data_type], 0) + n
    return _most(sizes)


def _run(model: Any, args: Any, kwargs: Any, dev: Any, layers: bool, *,
         cast: Any = None, float64: bool = False, rounded_to: Any = None
         ) -> tuple[dict[str, np.ndarray], Any]:
    """One forward pass of ``model`` (eval mode, no grad): its flattened outputs, and with
    ``layers`` its layer capture. ``cast``: the floating inputs' dtype (a half-precision twin);
    ``rounded_to``: a dtype the floating inputs are rounded to and held in their own (its
    noise, the half-weights twin)."""
    from ..capture import record

    def inputs(value: Any) -> Any:
        value = _to_torch(value, dev, float64=float64, rounded_to=rounded_to)
        if cast is not None:
            value = _map_tree(value, lambda t: t.to(cast) if t.is_floating_point() else t)
        return value

    out: dict[str, np.ndarray] = {}
    with (record(model) if layers else contextlib.nullcontext()) as log:
        _flatten(model(*inputs(args), **inputs(kwargs)), "logits", out)
    return out, log


def _reference_overflow(result: Any, ref: Mapping[str, Any], noise: Optional[Mapping[str, Any]],
                        precision: str) -> Optional[str]:
    """Where the torch model itself overflows in the graph's half precision (its finer run does
    not): the graph is then judged against an infinity, and the model cannot run so as it is."""
    if precision not in _HALF or noise is None:
        return None
    # the first layer it overflows in, in call order; the outputs only where no layer was judged
    for r in sorted(result, key=lambda r: r.key == "logits" or r.key.startswith("logits/")):
        if not (r.ref_inf or r.ref_nan) or r.key not in noise:
            continue
        finer = np.asarray(noise[r.key])
        if finer.dtype.kind == "f" and np.isfinite(finer).all():
            peak = float(np.abs(finer).max()) if finer.size else 0.0
            return (f"the torch model itself overflows in {precision} at {r.key} "
                    f"({(r.ref_inf or 0) + (r.ref_nan or 0)} values Inf or NaN; in float32 they "
                    f"peak at {peak:.3g}, past {precision}'s largest "
                    f"{65504.0 if precision == 'float16' else 3.39e38:.6g}): it cannot run in "
                    f"{precision} as it is, and the graph is judged there against it")
    return None


def _feeds(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """The graph's inputs from the model's: positional ones in order (the exporter names them
    after the arguments, keyword ones by name)."""
    if kwargs and args:
        raise ReprodError("align_onnx: give the inputs as a tuple (positional) or a dict "
                          "(by the graph's input names), not both")
    return dict(kwargs) if kwargs else list(args)


@contextlib.contextmanager
def _eval(model: Any) -> Any:
    saved = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in saved:
            m.training = t


def align_onnx(
    torch_model: Any,
    onnx_model: Any,
    inputs: Any,
    *,
    out_dir: Optional[PathLike] = None,
    threshold: float = 1e-5,
    method: Any = "max",
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    per_key: Any = None,
    calibrate: bool = True,
    noise_factor: Optional[float] = None,
    criteria: Optional[Criteria] = None,
    layers: bool = True,
    optimization: str = "disable",
    providers: Optional[Sequence[Any]] = None,
    precision: str = "auto",
    verbose: bool = False,
) -> Any:
    """Run the torch model (in eval mode) and its ONNX export (in onnxruntime) on the same inputs
    and compare their outputs; where one differs, name the first layer the export computes
    differently.

    ``onnx_model``: the ``.onnx`` path or an ``onnx.ModelProto``, exported from ``torch_model``
    (``torch.onnx.export``, either exporter). ``inputs``: one array or tensor, a tuple of them
    (the model's positional arguments, the graph's inputs in order) or a dict (by the graph's
    input names). The graph's outputs pair with the model's flattened outputs (``logits``,
    ``logits/0``, ...) by position. Returns ``reprod.compare``'s ``DiffResult`` (torch is the
    reference).

    ``calibrate=True`` (the default): float32 kernels differ between torch and onnxruntime by
    rounding that grows with depth, beyond any one absolute threshold on a real model. A float64
    copy of the torch model runs on the same inputs, and each output passes when the export
    differs from torch by at most ``noise_factor`` (default 20) times torch's own distance from
    float64 (``KeyResult.noise_multiple``), whatever ``threshold`` says; the layer comparison
    is calibrated the same way. ``calibrate=False`` judges by ``threshold``/``method`` alone.

    ``layers=True`` (the default) also judges every layer call the graph holds apart, captured
    on both sides in the same runs (``reprod.capture.record`` and ``record_onnx``), under its
    capture key (``features.3.block.1.out``): an export's bug in an early layer can move a deep
    model's outputs by less than their rounding, and pass at the outputs alone. Where a key
    fails, ``options["divergence"]`` holds the first layer that differs (``layer``, ``kind``,
    ``message``), also the first finding: ``diverges at blocks.3.mlp.act (GELU): input aligned
    (...), output max diff ...``. Layers the graph does not hold apart (a convolution with its
    BatchNorm folded in, eval-mode dropout, layers taking or returning several tensors) are not
    compared; ``options["layers_not_in_graph"]`` counts them. ``optimization`` and
    ``providers`` are ``record_onnx``'s. With ``out_dir``: ``onnx_torch.npy``,
    ``onnx_onnx.npy`` (and the noise, ``onnx_torch64.npy`` or ``onnx_torch32.npy``), which
    ``reprod-diff`` compares again, and ``onnx_diff.log``.

    ``precision``: what the graph computes in, ``"auto"`` (the default) reading it from its
    weights. A float16 or bfloat16 graph (a converter's ``convert_float_to_float16``, or a model
    exported in half precision) rounds every value thousands of times coarser than float32
    noise can judge: the reference is then a copy of the torch model in that precision, on the
    inputs cast to it, and the torch model holding those half weights, run in float32 on the
    inputs rounded the same way, is the noise, within
    ``reprod.diff.noise.LOW_PRECISION_NOISE_FACTOR`` (8). The graph's inputs are cast to the
    dtypes it declares. Where the torch model itself overflows in that precision (float32
    values past 65504), the first finding says so. ``options["precision"]`` holds the
    precision judged in.

    >>> torch.onnx.export(model, (x,), "model.onnx")
    >>> r = align_onnx(model, "model.onnx", x)
    >>> r.passed, r.options.get("divergence", {}).get("message")
    """
    import torch

    from ..capture import first_divergence, layer_types
    from ..diff.engine import compare
    from ..storage import save

    crit = _criteria(criteria, calibrate, methods=method, threshold=threshold, atol=atol,
                     rtol=rtol, per_key=per_key, noise_factor=noise_factor)
    proto, where = _load(onnx_model)
    if precision == "auto":
        precision = _graph_precision(proto)
    elif precision not in _HALF and precision != "float32":
        raise ReprodError(f"align_onnx: precision={precision!r}; expected 'auto', 'float32', "
                          "'float16' or 'bfloat16'")
    args, kwargs = _split_inputs(inputs)
    feeds = _feeds(args, kwargs)
    dev = _torch_device(torch_model)
    skipped: Optional[str] = None
    findings: list[str] = []
    with _eval(torch_model), torch.no_grad():
        # the reference runs in the graph's precision, and the next finer one is its noise: a
        # float16 graph against float32 noise would fail every key by float16's own rounding
        if precision in _HALF:
            half = getattr(torch, precision)
            try:
                twin = copy.deepcopy(torch_model).to(half)
                ref, torch_layers = _run(twin, args, kwargs, dev, layers, cast=half)
                del twin
            except Exception as e:  # a kernel torch lacks in that precision on this device
                raise ReprodError(
                    f"align_onnx: {where} computes in {precision}, and the torch model in "
                    f"{precision}, its reference, failed ({type(e).__name__}: "
                    f"{(str(e).strip().splitlines() or [''])[0][:160]}); pass precision="
                    "'float32' to judge it against the float32 model by threshold") from e
            ref_noise = None
            noise_layers = None
            if calibrate:
                # the same half weights and inputs in float32: the rounding of the values
                # alone, which a faithful graph has of its own (calibration._half_weights_twin)
                twin = _half_weights_twin(torch_model, precision)
                ref_noise, noise_layers = _run(twin, args, kwargs, dev, layers,
                                               rounded_to=half)
                del twin
        else:
            ref, torch_layers = _run(torch_model, args, kwargs, dev, layers)
            ref_noise, noise_layers = None, None
            if calibrate:
                try:
                    twin = _float64_twin(torch_model)
                    with float64_default():
                        ref_noise, noise_layers = _run(twin, args, kwargs, dev, layers,
                                                       float64=True)
                    del twin
                except Exception as e:  # the model's own code: judged as if uncalibrated
                    skipped, ref_noise, noise_layers, calibrate = twin_failed(e), None, None, False
    # one run of the graph holds its outputs and every layer's
    onnx_log, fused = _capture(proto, feeds, torch_model=torch_model, optimization=optimization,
                               providers=providers, where=where, cast_inputs=True)
    outs = _graph_outputs(onnx_log)
    port = dict(zip(ref, outs))
    if len(outs) != len(ref):
        findings.append(f"the graph returns {len(outs)} output(s), the torch model {len(ref)}: "
                        "paired by position, the rest not compared")
    options: dict[str, Any] = {}
    ref_all, port_all, noise_all = dict(ref), dict(port), ref_noise
    if torch_layers is not None:
        # each layer the graph holds apart, judged like the outputs: an export's bug in an early
        # layer may move a deep model's outputs by less than its rounding
        ref_layers, held = pair_onnx(torch_layers.data, onnx_log.data)
        every = {k.rsplit(".", 1)[0] for k in torch_layers.keys()} - {ROOT}
        compared = {k.rsplit(".", 1)[0] for k in ref_layers} - {ROOT}
        options["layers_not_in_graph"] = len(every - compared)
        if len(compared) * 2 < len(every):
            findings.append(
                f"only {len(compared)} of the torch model's {len(every)} layer calls are held "
                "apart in the graph (exported by another tool, or its node names stripped?): a "
                "difference inside the others is seen only where it reaches one of them")
        ref_all.update(ref_layers)
        port_all.update(held)
        if noise_layers is not None and ref_noise is not None:
            noise_all = {**ref_noise, **noise_layers.data}
    result = compare(ref_all, port_all, criteria=crit, noise=noise_all)
    options = dict(result.options, **options)
    options["precision"] = precision
    if ref_noise is not None:
        options.update(noise="torch float32" if precision in _HALF else "torch float64",
                       noise_multiple=noise_multiples(result, default_group="onnx"))
    if torch_layers is not None and not result.passed:
        types = layer_types(torch_model)
        div = first_divergence(result, layer_types=types)
        if div is not None:
            message = div.message + _fused_note(
                div.layer, fused, torch_layers.data, held, types)
            options["divergence"] = {"layer": div.layer, "kind": div.kind, "message": message}
            findings.insert(0, message)
        elif any(not r.passed for r in result if r.key.startswith("logits")):
            findings.append("every layer the graph holds apart aligns: the difference is made "
                            "between them, or in the outputs' order")
    overflow = _reference_overflow(result, ref_all, noise_all, precision)
    if overflow is not None:  # before the place named: it says why that place fails
        findings.insert(0, overflow)
    if findings:
        options["findings"] = [*findings, *options.get("findings", ())]
    result = dataclasses.replace(result, options=options)
    result = uncalibrated(result, skipped, verbose)
    if verbose:
        for line in findings:
            print(line, flush=True)
    if out_dir is not None:
        out = os.fspath(out_dir)
        os.makedirs(out, exist_ok=True)
        save(os.path.join(out, "onnx_torch.npy"), ref_all)
        save(os.path.join(out, "onnx_onnx.npy"), port_all)
        if noise_all is not None:
            noise_file = "onnx_torch32.npy" if precision in _HALF else "onnx_torch64.npy"
            save(os.path.join(out, noise_file), noise_all)
        _write_diff_log(result, os.path.join(out, "onnx_diff.log"), verbose=verbose)
    return result
