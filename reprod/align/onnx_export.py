"""``align_onnx``: a torch model against its ONNX export, run by onnxruntime: the outputs and
every layer the graph holds apart judged against float32 noise, and the first layer the export
computes differently named, from one capture of each side (``reprod.capture.record_onnx``)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from ..capture._onnx import _capture, _layer_calls, _load, _Modules, pair_onnx
from ..capture.naming import ROOT
from ..diff.criteria import Criteria
from ..errors import ReprodError
from ..logger import ReprodLogger
from .calibration import _float64_twin, float64_default, twin_failed, uncalibrated
from .framework import _criteria, _flatten, _split_inputs, _to_torch, _torch_device
from .results import PathLike, _write_diff_log, noise_multiples

__all__ = ["align_onnx"]


def _graph_outputs(onnx_log: ReprodLogger) -> list[np.ndarray]:
    keys = [k for k in onnx_log.keys() if k == "<model>.out" or k.startswith("<model>.out[")]
    keys.sort(key=lambda k: -1 if k == "<model>.out" else int(k[len("<model>.out["):-1]))
    return [onnx_log.data[k] for k in keys]


def _fused_note(layer: str, proto: Any, modules: Any, folded: Mapping[str, str],
                ref: Mapping[str, Any], held: Mapping[str, Any],
                types: Mapping[str, str]) -> str:
    """Where the exporter fused the layer named with the one before it (a BatchNorm folded into
    its convolution), that the cause may be the other's."""
    before: list[str] = []
    if layer in folded:  # TorchScript: the convolution's output is the BatchNorm's
        before = [folded[layer]]
    elif layer in {c.subject for c in _layer_calls(proto.graph, modules) if c.rewritten} \
            and f"{layer}.in" in ref:
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
    ``onnx_onnx.npy`` (and ``onnx_torch64.npy``), which ``reprod-diff`` compares again, and
    ``onnx_diff.log``.

    >>> torch.onnx.export(model, (x,), "model.onnx")
    >>> r = align_onnx(model, "model.onnx", x)
    >>> r.passed, r.options.get("divergence", {}).get("message")
    """
    import torch

    from ..capture import first_divergence, layer_types, record
    from ..diff.engine import compare
    from ..storage import save

    crit = _criteria(criteria, calibrate, methods=method, threshold=threshold, atol=atol,
                     rtol=rtol, per_key=per_key, noise_factor=noise_factor)
    args, kwargs = _split_inputs(inputs)
    feeds = _feeds(args, kwargs)
    dev = _torch_device(torch_model)
    skipped: Optional[str] = None
    ref: dict[str, np.ndarray] = {}
    ref64: Optional[dict[str, np.ndarray]] = None
    with _eval(torch_model), torch.no_grad():
        with record(torch_model) if layers else contextlib.nullcontext() as torch_layers:
            _flatten(torch_model(*_to_torch(args, dev), **_to_torch(kwargs, dev)), "logits", ref)
        noise_layers = None
        if calibrate:
            try:
                twin = _float64_twin(torch_model)
                ref64 = {}
                with float64_default(), (record(twin) if layers
                                         else contextlib.nullcontext()) as noise_layers:
                    _flatten(twin(*_to_torch(args, dev, float64=True),
                                  **_to_torch(kwargs, dev, float64=True)), "logits", ref64)
                del twin
            except Exception as e:  # the model's own code: judged as if uncalibrated
                skipped, ref64, noise_layers, calibrate = twin_failed(e), None, None, False
    # one run of the graph holds its outputs and every layer's
    proto, _ = _load(onnx_model)
    onnx_log, folded = _capture(proto, feeds, torch_model=torch_model, optimization=optimization,
                                providers=providers)
    outs = _graph_outputs(onnx_log)
    port = dict(zip(ref, outs))
    findings: list[str] = []
    if len(outs) != len(ref):
        findings.append(f"the graph returns {len(outs)} output(s), the torch model {len(ref)}: "
                        "paired by position, the rest not compared")
    options: dict[str, Any] = {}
    ref_all, port_all, noise_all = dict(ref), dict(port), ref64
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
        if noise_layers is not None and ref64 is not None:
            noise_all = {**ref64, **noise_layers.data}
    result = compare(ref_all, port_all, criteria=crit, noise=noise_all)
    options = dict(result.options, **options)
    if ref64 is not None:
        options.update(noise="torch float64", noise_multiple=noise_multiples(
            result, default_group="onnx"))
    if torch_layers is not None and not result.passed:
        types = layer_types(torch_model)
        div = first_divergence(result, layer_types=types)
        if div is not None:
            message = div.message + _fused_note(
                div.layer, proto, _Modules.of(torch_model, proto.graph), folded,
                torch_layers.data, held, types)
            options["divergence"] = {"layer": div.layer, "kind": div.kind, "message": message}
            findings.insert(0, message)
        elif any(not r.passed for r in result if r.key.startswith("logits")):
            findings.append("every layer the graph holds apart aligns: the difference is made "
                            "between them, or in the outputs' order")
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
            save(os.path.join(out, "onnx_torch64.npy"), noise_all)
        _write_diff_log(result, os.path.join(out, "onnx_diff.log"), verbose=verbose)
    return result
