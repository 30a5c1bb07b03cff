"""Layer-by-layer capture of an ONNX model under its torch layers' names, run by onnxruntime.

An exported graph keeps which torch layer each node came from: the dynamo exporter (the
default since torch 2.9) writes the chain of layer names into every node's
``pkg.torch.onnx.name_scopes`` metadata; the TorchScript exporter (``dynamo=False``) spells it
in the node's name (``/features/features.0/Conv``). A layer call's output in the graph is the
value its nodes make that nodes outside it read, and its input the value it reads from outside:
the same tensors ``reprod.capture.record`` logs from the torch model, under the same keys, so
``first_divergence`` over the two captures names the first layer the export computes
differently. onnx and onnxruntime are imported when this runs, never by ``import reprod``.
"""

from __future__ import annotations

import ast
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from ..errors import (
    DumpFormatError,
    DumpNotFoundError,
    MissingDependencyError,
    UnsupportedValueError,
)
from ..logger import ReprodLogger
from .naming import ROOT
from .recorder import _patterns, _selected

__all__ = ["record_onnx", "onnx_layers", "pair_onnx", "OnnxLayerCall"]

_SCOPES = "pkg.torch.onnx.name_scopes"
_REWRITTEN = "pkg.onnxscript.rewriter.rule_name"
# TorchScript names a layer's second call by suffixing its scope: /act/Relu then /act_1/Relu
_CALL_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<n>[1-9][0-9]*)$")
# TorchScript keeps a convolution's weight under its parameter's name unless export changed it;
# a renamed one (onnx::Conv_15) had the following BatchNorm folded into it in eval mode
_FOLDED_WEIGHT = re.compile(r"^onnx::(Conv|ConvTranspose)_[0-9]+$")
_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                 "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

Feeds = Union[Mapping[str, Any], Sequence[Any], Any]


@dataclass
class OnnxLayerCall:
    """One call of a torch layer as the graph holds it: its nodes, and the values that cross
    its edge (``inputs`` read from outside, ``outputs`` read outside or returned)."""

    subject: str  # capture subject: layer name, with #<call> from the second call on
    name: str
    nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    leaf: bool = True
    rewritten: bool = False  # a node the exporter's optimiser fused (its input is not the layer's)
    folded: bool = False  # a convolution with the next BatchNorm folded in (TorchScript export)


def _import(what: str) -> Any:
    try:
        return __import__(what)
    except ImportError as exc:
        raise MissingDependencyError(
            f"record_onnx needs {what} (pip install onnx onnxruntime): {exc}") from None


def _load(model: Any) -> tuple[Any, str]:
    onnx = _import("onnx")
    if isinstance(model, onnx.ModelProto):
        return model, "<onnx model>"
    path = os.fspath(model)
    if not os.path.exists(path):
        raise DumpNotFoundError(path)
    try:
        # the weights stay where they are: onnxruntime reads external data from its files
        # (_external_folder); loaded, a model over 2 GiB could not be handed to it at all
        return onnx.load(path, load_external_data=False), path
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DumpFormatError(f"{path}: not an ONNX model ({first})") from None


def _external_folder(proto: Any, where: str) -> Optional[str]:
    """The folder a graph's external data lies in (its file's, as ONNX locations are relative
    to it), where an initializer of ``proto`` holds its data in another file; None where none
    does. A proto given without a file to name the folder: its locations resolve where
    onnxruntime looks by itself (the working directory)."""
    external = any(i.data_location == 1 for i in proto.graph.initializer)  # TensorProto.EXTERNAL
    if not external or not os.path.isfile(where):
        return None
    return os.path.dirname(os.path.abspath(where))


def _metadata(node: Any) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _dynamo_chain(value: str) -> Optional[list[str]]:
    try:
        scopes = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(scopes, list) or not scopes:
        return None
    # ['', 'b1', 'b1.bn', '<fx node>']: the model, its layers outermost first, then the op
    return [str(s) for s in scopes[1:-1] if s]


@dataclass
class _Modules:
    """What is known of the torch model's layer names: from the model itself when given (every
    name, and the first name of a layer registered under several), else the layers holding
    parameters, from the initializers' names (``fc_1.weight``)."""

    names: set[str]
    exact: bool
    alias: dict[str, str] = field(default_factory=dict)
    classes: list[tuple[str, str]] = field(default_factory=list)  # definition order

    @classmethod
    def of(cls, model: Any, graph: Any) -> _Modules:
        if model is None:
            names = set()
            for init in graph.initializer:
                parts = init.name.split(".")
                names.update(".".join(parts[:i]) for i in range(1, len(parts)))
            return cls(names, exact=False)
        if not hasattr(model, "named_modules"):
            raise UnsupportedValueError(
                f"record_onnx: torch_model= is the torch model the graph was exported from, not a "
                f"{type(model).__module__}.{type(model).__qualname__}")
        first: dict[int, str] = {}
        alias: dict[str, str] = {}
        classes = []
        for name, module in model.named_modules(remove_duplicate=False):
            if not name:
                continue
            canonical = first.setdefault(id(module), name)
            if canonical != name:
                alias[name] = canonical
            else:
                classes.append((name, type(module).__name__))
        return cls({n for n, _ in model.named_modules(remove_duplicate=False)} - {""}, True,
                   alias, classes)

    def real(self, qual: str) -> bool:
        return qual in self.names

    def canonical(self, qual: str) -> str:
        return self.alias.get(qual, qual)


def _torchscript_chain(name: str, seen: dict[str, set[str]],
                       modules: _Modules) -> list[tuple[str, int]]:
    """``/b1/conv/Conv`` -> [("b1", 1), ("b1.conv", 1)]; ``/act_1/Relu`` after ``/act/..``
    -> [("act", 2)]. A segment is the attribute name, or for a container's child the parent's
    segment, a dot and the index (``/features/features.1/block/block.0/``). A suffixed segment
    that names a layer of its own (``fc_1`` beside ``fc``) is that layer."""
    chain: list[tuple[str, int]] = []
    parent, parent_seg = "", ""
    for seg in name.split("/")[1:-1]:
        if not seg:
            continue
        call = 1
        names = seen.setdefault(parent, set())
        m = _CALL_SUFFIX.match(seg)
        if (m is not None and m.group("base") in names
                and not modules.real(_qualified(parent, parent_seg, seg))
                and (not modules.exact or modules.real(
                    _qualified(parent, parent_seg, m.group("base"))))):
            seg, call = m.group("base"), int(m.group("n")) + 1
        names.add(seg)
        qual = _qualified(parent, parent_seg, seg)
        if modules.exact and not modules.real(qual):
            # a layer shared by two containers: TorchScript names it in the second after its
            # attribute in the first (/b/a/ for the layer ``a`` also registered as ``b.2``)
            named = [n for n in modules.names if n == seg or n.endswith("." + seg)]
            if len(named) == 1:
                qual = modules.canonical(named[0])
        chain.append((qual, call))
        parent, parent_seg = qual, seg
    return chain


def _qualified(parent: str, parent_seg: str, seg: str) -> str:
    if parent_seg and seg.startswith(parent_seg + "."):
        return parent + seg[len(parent_seg):]
    return f"{parent}.{seg}" if parent else seg


def _constants(graph: Any) -> set[str]:
    """Values that do not depend on the graph's inputs (initializers, Constant nodes and what is
    computed from them alone): never a layer's input."""
    const = {i.name for i in graph.initializer}
    const.update(i.name for i in graph.sparse_initializer)
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type in ("Constant", "ConstantOfShape") and all(i in const for i in ins):
            const.update(node.output)
        elif ins and all(i in const for i in ins):
            const.update(node.output)
    return const


def onnx_layers(model: Any, *, torch_model: Any = None) -> list[OnnxLayerCall]:
    """The torch layer calls an exported ONNX graph holds, in call order (the order in which
    they finish), each with its nodes and the values crossing its edge.

    ``model`` is a path or an ``onnx.ModelProto``. The model itself is ``<model>``. Layers are
    read from the dynamo exporter's ``name_scopes`` metadata, or else from TorchScript-style node
    names; a graph with neither (written by another converter) holds only ``<model>``.
    ``torch_model``: as for ``record_onnx``.

    >>> [c.subject for c in onnx_layers("mobilenet.onnx")][:3]
    ['features.0.0', 'features.0.1', 'features.0.2']
    """
    _check_model(model)
    proto, _ = _load(model)
    return _layer_calls(proto.graph, _Modules.of(torch_model, proto.graph))


def _chains(graph: Any, modules: _Modules, seen: dict[str, set[str]]
            ) -> list[list[tuple[str, int]]]:
    """Each node's chain of (layer name, TorchScript's call number or 0), outermost first.

    A node no exporter labelled (a Cast a float16 converter inserted, an Identity) belongs to the
    layers both its labelled neighbours are in: a Cast between two layers of a block is the
    block's, not the first layer's, whose output stays the value it made."""
    labelled: list[Optional[list[tuple[str, int]]]] = []
    for node in graph.node:
        meta = _metadata(node)
        chain: Optional[list[tuple[str, int]]] = None
        if _SCOPES in meta:
            names = _dynamo_chain(meta[_SCOPES])
            if names is not None:
                # the dynamo exporter does not number calls: a layer's run of consecutive nodes
                # is one call, and it is called again when its nodes come back after others
                chain = [(modules.canonical(n), 0) for n in names]
        elif node.name.startswith("/"):
            chain = _torchscript_chain(node.name, seen, modules)
        labelled.append(chain)
    chains: list[list[tuple[str, int]]] = []
    following: list[Optional[list[tuple[str, int]]]] = [None] * len(labelled)
    upcoming: Optional[list[tuple[str, int]]] = None
    for i in range(len(labelled) - 1, -1, -1):
        following[i] = upcoming
        if labelled[i] is not None:
            upcoming = labelled[i]
    before: list[tuple[str, int]] = []
    for chain, after in zip(labelled, following):
        if chain is None:
            after = after or []
            common = 0
            while common < min(len(before), len(after)) and before[common] == after[common]:
                common += 1
            chain = before[:common]
        else:
            before = chain
        chains.append(chain)
    return chains


def _layer_calls(graph: Any, modules: _Modules) -> list[OnnxLayerCall]:
    const = _constants(graph)
    seen: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    calls: list[OnnxLayerCall] = []
    # (layer name, TorchScript's call number or 0) -> the call the previous node was in
    open_calls: dict[tuple[str, int], OnnxLayerCall] = {}
    made_in: dict[str, set[int]] = {}  # value -> ids of every call that made it (nested)
    node_calls: list[list[OnnxLayerCall]] = []
    chains = _chains(graph, modules, seen)
    for node, chain_calls in zip(graph.node, chains):
        meta = _metadata(node)
        current: list[OnnxLayerCall] = []
        still_open: dict[tuple[str, int], OnnxLayerCall] = {}
        for depth, (name, call) in enumerate(chain_calls):
            existing = open_calls.get((name, call))
            if existing is not None:
                c = existing
            else:
                # a layer's calls count on whatever scope each sat in (a layer shared by two
                # containers is named once): TorchScript's suffix is a floor
                n = counts[name] = max(call, counts.get(name, 0) + 1)
                c = OnnxLayerCall(name if n == 1 else f"{name}#{n}", name)
                calls.append(c)
            still_open[(name, call)] = c
            current.append(c)
            if depth < len(chain_calls) - 1:
                c.leaf = False
        open_calls = still_open
        for c in current:
            c.nodes.append(node.name)
            if c is current[-1]:
                c.ops.append(node.op_type)
                if "Fuse" in meta.get(_REWRITTEN, ""):
                    # FuseBatchNormIntoConv & co: the node carries the last fused layer's
                    # name and the first one's input (rules such as RemoveOptionalBias* stay
                    # within their layer)
                    c.rewritten = True
                if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 \
                        and _FOLDED_WEIGHT.match(node.input[1]):
                    c.folded = True
        node_calls.append(current)
        ids = {id(c) for c in current}
        for out in node.output:
            if out:
                made_in[out] = ids

    # a value crosses a call's edge where it is made inside and read outside, or the reverse
    by_id = {id(c): c for c in calls}
    graph_outputs = [o.name for o in graph.output]
    for node, current in zip(graph.node, node_calls):
        inside = {id(c) for c in current}
        for value in node.input:
            if not value or value in const:
                continue
            makers = made_in.get(value, set())
            for c in current:
                if id(c) not in makers and value not in c.inputs:
                    c.inputs.append(value)
            for cid in makers - inside:
                c = by_id[cid]
                if value not in c.outputs:
                    c.outputs.append(value)
    for value in graph_outputs:
        for cid in made_in.get(value, set()):
            c = by_id[cid]
            if value not in c.outputs:
                c.outputs.append(value)
    # a layer call finishes with its last node: call order is the order of last nodes, and a
    # layer ending on the same node as its container finishes first
    last = {id(c): (i, -depth) for i, current in enumerate(node_calls)
            for depth, c in enumerate(current)}
    calls.sort(key=lambda c: last[id(c)])
    root = OnnxLayerCall(ROOT, ROOT, leaf=not calls)
    root.nodes = [n.name for n in graph.node]
    root.ops = [n.op_type for n in graph.node]
    initializers = {i.name for i in graph.initializer}
    root.inputs = [i.name for i in graph.input if i.name not in initializers]
    root.outputs = graph_outputs
    return calls + [root]


def _as_feeds(feeds: Feeds, inputs: Sequence[Any], where: str,
              cast: bool = False) -> dict[str, np.ndarray]:
    """The graph's inputs by name, as numpy arrays of the dtypes it declares: a floating one of
    another floating dtype is cast with ``cast`` (align_onnx: a float16 graph fed the float32
    model's inputs), else refused."""
    from ..adapters import to_numpy

    names = [i.name for i in inputs]
    if isinstance(feeds, Mapping):
        given = dict(feeds)
        unknown = [k for k in given if k not in names]
        if unknown:
            raise UnsupportedValueError(
                f"{where}: no input named {unknown[0]!r}; its inputs are {', '.join(names)}")
    else:
        if isinstance(feeds, (list, tuple)) and not (feeds and isinstance(feeds[0], (int, float))):
            values = list(feeds)
        else:
            values = [feeds]
        if len(values) != len(names):
            raise UnsupportedValueError(
                f"{where}: {len(values)} input(s) given, the graph takes {len(names)} "
                f"({', '.join(names)}); pass a dict to name them")
        given = dict(zip(names, values))
    missing = [n for n in names if n not in given]
    if missing:
        raise UnsupportedValueError(f"{where}: input {missing[0]!r} not given")
    arrays = {}
    for k, v in given.items():
        try:
            arrays[k] = to_numpy(v, key=k, copy=False).array
        except UnsupportedValueError as exc:
            why = str(exc).removeprefix(f"key {k!r}: ")
            raise UnsupportedValueError(f"{where}: input {k!r}: {why}") from None
    from onnx.helper import tensor_dtype_to_np_dtype

    for graph_input in inputs:
        elem = graph_input.type.tensor_type.elem_type
        if not elem:
            continue
        try:
            want = np.dtype(tensor_dtype_to_np_dtype(elem))
        except (KeyError, TypeError, ValueError):
            continue
        got = arrays[graph_input.name].dtype
        if got != want and cast and got.kind == "f" and want.kind == "f":
            arrays[graph_input.name] = arrays[graph_input.name].astype(want)
        elif got != want:  # onnxruntime neither casts nor names the input
            raise UnsupportedValueError(
                f"{where}: input {graph_input.name!r} is {got}, the graph takes {want}")
    return arrays


def _keys(call: OnnxLayerCall, record_inputs: bool,
          out_subject: Optional[str] = None) -> list[tuple[str, str]]:
    """(capture key, value name) pairs one layer call is logged under. A layer with several
    inputs or outputs is logged only where their order is known (the model's own, by position):
    inside, the graph does not say which argument or tuple item a value was. ``out_subject``:
    where the output is another layer's (a convolution's with its BatchNorm folded in)."""
    keys: list[tuple[str, str]] = []
    root = call.subject == ROOT
    ins = call.inputs if (root or (not call.rewritten and len(call.inputs) == 1)) else []
    if record_inputs:
        for i, value in enumerate(ins):
            keys.append((f"{call.subject}.in" if len(ins) == 1 else f"{call.subject}.in[{i}]", value))
    subject = out_subject or call.subject
    outs = call.outputs if (root or len(call.outputs) == 1) else []
    if call.folded and out_subject is None:
        outs = []
    for i, value in enumerate(outs):
        keys.append((f"{subject}.out" if len(outs) == 1 else f"{subject}.out[{i}]", value))
    return keys


def _folded_into(calls: Sequence[OnnxLayerCall], modules: _Modules) -> dict[str, str]:
    """Folded convolution call -> the BatchNorm call folded into it: the first BatchNorm defined
    after it beside it (same parent) that has no nodes of its own and no other convolution."""
    if not modules.exact:
        return {}
    in_graph = {c.name for c in calls}
    order = [name for name, _ in modules.classes]
    kinds = dict(modules.classes)
    taken: set[str] = set()
    found: dict[str, str] = {}
    for call in calls:
        if not call.folded or call.name not in kinds:
            continue
        parent = call.name.rpartition(".")[0]
        for name in order[order.index(call.name) + 1:]:
            if (name.rpartition(".")[0] == parent and "BatchNorm" in kinds[name]
                    and name not in in_graph and name not in taken):
                taken.add(name)
                suffix = call.subject[len(call.name):]  # the convolution's call, #2...
                found[call.subject] = name + suffix
                break
    return found


def _check_model(model: Any) -> None:
    onnx = _import("onnx")
    if isinstance(model, (str, bytes, os.PathLike, onnx.ModelProto)):
        return
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    hint = " (the torch model goes in torch_model=)" if hasattr(model, "named_modules") else ""
    raise UnsupportedValueError(
        f"record_onnx: the model is a {kind}; give the .onnx path or an onnx.ModelProto{hint}")


def record_onnx(
    model: Any,
    feeds: Feeds,
    logger: Optional[ReprodLogger] = None,
    *,
    torch_model: Any = None,
    inputs: bool = True,
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    containers: bool = True,
    providers: Optional[Sequence[Any]] = None,
    optimization: str = "disable",
    session_options: Any = None,
) -> ReprodLogger:
    """Run an exported ONNX model once in onnxruntime and log every torch layer call's input
    and output under the keys ``reprod.capture.record`` gives the torch model's.

    ``model`` is the ``.onnx`` path or an ``onnx.ModelProto``; ``feeds`` the graph's inputs: a
    dict by input name, a list in the graph's order, or one value (numpy arrays or torch/paddle
    tensors). Compare the result with a ``record`` of the torch model on the same inputs,
    paired by ``pair_onnx``, and ``first_divergence`` names the first layer the export computes
    differently (``reprod.align.align_onnx`` does all of it in one call):

    >>> with record(model) as torch_log:
    ...     model(x)
    >>> onnx_log = record_onnx("model.onnx", x, torch_model=model)
    >>> result = reprod.compare(torch_log.data, onnx_log.data, pair=pair_onnx, threshold=1e-5)
    >>> div = first_divergence(result)

    A layer is logged where the graph says which value is its input and output: one value in and
    one out (layers that take or return several are left out, except the model itself, whose
    inputs and outputs are the graph's, by position). ``include``/``exclude`` are glob patterns on
    layer names and ``containers=False`` keeps leaf layers only, as for ``record``. onnxruntime's
    graph optimisations are off by default (``optimization="disable"``), so that every node runs
    as exported; ``"basic"``, ``"extended"`` or ``"all"`` run what a deployment runs.
    ``providers`` defaults to ``["CPUExecutionProvider"]``.

    ``torch_model``, the model the graph was exported from, makes the names exact: a layer
    registered under two names is logged under the first, as ``record`` does; a TorchScript
    scope ``fc_1`` is the layer ``fc_1`` where there is one, else the second call of ``fc``
    (without it, a layer without parameters named so is taken for a second call); and a
    convolution the TorchScript exporter folded the next BatchNorm into (eval mode,
    ``dynamo=False``, the default constant folding) is logged as that BatchNorm's output, which
    it is. Without it such a convolution's output is not logged, and a warning says so. Two
    consecutive calls of one layer (``act(act(x))``) are one call to the dynamo exporter's
    metadata: ``pair_onnx`` leaves out a layer whose calls the two sides count differently.
    """
    logger, _ = _capture(model, feeds, logger, torch_model=torch_model, inputs=inputs,
                         include=include, exclude=exclude, containers=containers,
                         providers=providers, optimization=optimization,
                         session_options=session_options)
    return logger


def _capture(
    model: Any,
    feeds: Feeds,
    logger: Optional[ReprodLogger] = None,
    *,
    torch_model: Any = None,
    inputs: bool = True,
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    containers: bool = True,
    providers: Optional[Sequence[Any]] = None,
    optimization: str = "disable",
    session_options: Any = None,
    where: Optional[str] = None,
    cast_inputs: bool = False,
) -> tuple[ReprodLogger, dict[str, Optional[str]]]:
    """``record_onnx``, and the layer calls the graph computes fused with the one before them:
    a folded BatchNorm -> its convolution (TorchScript), or -> None where the graph does not say
    which (a node dynamo's optimiser fused, under the last fused layer's name)."""
    _check_model(model)
    proto, loaded_from = _load(model)
    where = where or loaded_from
    ort = _import("onnxruntime")
    onnx = _import("onnx")
    if optimization not in _OPTIMIZATION:
        raise UnsupportedValueError(
            f"record_onnx: optimization={optimization!r}; expected one of {', '.join(_OPTIMIZATION)}")
    if logger is None:
        logger = ReprodLogger()
    modules = _Modules.of(torch_model, proto.graph)
    calls = _layer_calls(proto.graph, modules)
    if len(calls) == 1:
        warnings.warn(
            f"{where}: no node names a torch layer (not exported by torch.onnx.export, or its "
            "names were stripped): only the model's inputs and outputs are logged",
            stacklevel=3)
    inc, exc = _patterns(include), _patterns(exclude) or ()
    into = _folded_into(calls, modules)
    folded = [c.subject for c in calls if c.folded and c.subject not in into]
    if folded:
        warnings.warn(
            f"{where}: {len(folded)} convolution(s) have the next BatchNorm folded in "
            f"({', '.join(folded[:3])}{', ...' if len(folded) > 3 else ''}): their outputs are "
            "not logged; give torch_model= to log them as the BatchNorms', or export with "
            "dynamo=True or do_constant_folding=False",
            stacklevel=3)
    wanted: list[tuple[str, str]] = []
    for call in calls:
        if call.subject != ROOT and not call.leaf and not containers:
            continue
        if call.subject != ROOT and not _selected(call.name, inc, exc):
            continue
        wanted.extend(_keys(call, inputs, into.get(call.subject)))
    graph_inputs = {i.name for i in proto.graph.input}
    fetch = list(dict.fromkeys(v for _, v in wanted if v not in graph_inputs))
    present = {o.name for o in proto.graph.output}
    try:
        size = proto.ByteSize()
    except Exception:  # noqa: BLE001 - protobuf cannot even size it past 2 GiB (EncodeError)
        size = sum(len(i.raw_data) for i in proto.graph.initializer)
    if size >= (1 << 31) - (1 << 20):  # the outputs added below take a few bytes each
        raise UnsupportedValueError(
            f"{where}: the graph holds its weights in itself, {size / (1 << 30):.1f} GiB, past "
            "the 2 GiB protobuf can hand to onnxruntime: save it with its weights as external "
            "data (onnx.save(model, path, save_as_external_data=True)) and pass the path")
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=v) for v in fetch if v not in present)
    opts = session_options if session_options is not None else ort.SessionOptions()
    if session_options is None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION[optimization])
    folder = _external_folder(proto, where)
    if folder is not None:  # the graph goes as bytes, which name no folder of their own
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      folder)
    session_inputs = [i for i in proto.graph.input if i.name not in {
        t.name for t in proto.graph.initializer}]
    values = _as_feeds(feeds, session_inputs, where, cast=cast_inputs)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), opts,
                                       providers=list(providers or ["CPUExecutionProvider"]))
        names = [o.name for o in session.get_outputs()]
        results = session.run(names, values)
    except Exception as exc:  # onnxruntime raises its own classes, one per failure kind
        # its messages run over lines ("Got invalid dimensions ...\n index: 2 Got: 32 ..."):
        # one line, all of it
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise UnsupportedValueError(
            f"{where}: onnxruntime could not run it: {text or type(exc).__name__}") from None
    got = dict(zip(names, results))
    got.update(values)
    # onnxruntime's outputs are new arrays no one else holds: logged as they are (the copy
    # add makes was two thirds of record_onnx's cost beyond its session and run); the feeds
    # are the caller's, copied
    own = {id(a) for a in results if isinstance(a, np.ndarray)}
    for key, value in wanted:
        array = got.get(value)
        if isinstance(array, np.ndarray):
            if id(array) in own and array.dtype.kind in "biuf":
                logger._put(key, array)
            else:
                logger.add(key, array)
    fused: dict[str, Optional[str]] = {c.subject: None for c in calls if c.rewritten}
    fused.update((bn, conv) for conv, bn in into.items())
    return logger, fused


def pair_onnx(ref: Mapping[str, Any], other: Mapping[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``reprod.compare``'s ``pair=`` for a torch capture (``ref``) against ``record_onnx``'s:
    the layers the graph does not hold apart are left out of both, not failed as missing.

    - A reference layer key the graph has no value for (a convolution whose BatchNorm the
      exporter fused in, eval-mode dropout, a layer taking or returning several tensors) is
      left out; ``first_divergence`` then judges the layers around it.
    - The graph's one tensor in or out of a layer call, where the reference names it among
      several items, pairs with the reference's item of its shape (the first such, in the
      reference's order): ``MultiheadAttention(x, x, x)``'s ``.in[0]`` and the ``.out[0]``
      beside a ``None``, a Hugging Face layer called with ``input_ids=`` (``.in[input_ids]``)
      or returning a ``ModelOutput`` (``.out[last_hidden_state]``). The model's own outputs,
      positions in the graph, pair in the reference's order.
    - A layer whose calls the two sides count differently (``act(act(x))``, one call to the
      dynamo exporter's metadata) is left out of both: which call is which is not known.
    - What the graph logs under a key the reference does not have is left out.

    Keys that are not capture keys (``logits``) are kept as they are.

    >>> reprod.compare(torch_log.data, onnx_log.data, pair=pair_onnx, method="max", threshold=1e-5)
    """
    from .naming import parse_key

    def calls(tree: Mapping[str, Any]) -> dict[str, set[int]]:
        found: dict[str, set[int]] = {}
        for key in tree:
            parsed = parse_key(key)
            if parsed is not None and not parsed.is_param:
                found.setdefault(parsed.name, set()).add(parsed.call)
        return found

    def shape(value: Any) -> tuple[int, ...]:
        return tuple(getattr(value, "shape", ()))

    ref_calls, other_calls = calls(ref), calls(other)
    uneven = {n for n, c in other_calls.items() if n in ref_calls and c != ref_calls[n]}
    items: dict[str, list[str]] = {}  # "<subject>.<what>" -> the reference's item keys, in order
    for key in ref:
        parsed = parse_key(key)
        if parsed is not None and not parsed.is_param and parsed.items:
            items.setdefault(f"{parsed.subject}.{parsed.what}", []).append(key)
    renamed: dict[str, Any] = {}
    for key, value in other.items():
        parsed = parse_key(key)
        if parsed is None or parsed.is_param:
            renamed[key] = value
            continue
        if parsed.name in uneven:
            continue
        whole = f"{parsed.subject}.{parsed.what}"
        if key not in ref and whole in items:
            if not parsed.items:  # the graph's one tensor: the reference's item of its shape
                fits = [k for k in items[whole] if shape(ref[k]) == shape(value)]
                key = fits[0] if fits else key
            elif parsed.subject == ROOT and parsed.items[0].isdigit():
                # the model's outputs (or inputs): the graph's positions, the reference's order
                at = int(parsed.items[0])
                if at < len(items[whole]) and shape(ref[items[whole][at]]) == shape(value):
                    key = items[whole][at]
        if key in ref and key not in renamed:
            renamed[key] = value
    kept: dict[str, Any] = {}
    for key, value in ref.items():
        parsed = parse_key(key)
        if parsed is not None and not parsed.is_param and (
                parsed.name in uneven or key not in renamed):
            continue
        kept[key] = value
    return kept, renamed
