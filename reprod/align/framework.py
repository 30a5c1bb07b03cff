"""Small pieces shared by align_forward and align_train: values to and from each framework, train/eval modes, seeding, and the checks that run before a comparison."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import numpy as np

from ..adapters import empty_array, to_numpy
from ..diff.criteria import Criteria, build_criteria
from ..errors import KeyMismatchError, ReprodError
from ..logger import ReprodLogger
from .conversion import _few
from .rules import (
    ConversionRules,
    KeyPlan,
    linear_weight_names,
    number_attr,
    packed_linear_weights,
    plan_conversion,
    split_attention,
    torch_aliases,
)
from .structure import compare_structure

# --- small helpers ----------------------------------------------------------------------------


def _flatten(value: Any, prefix: str, out: dict[str, np.ndarray],
             nones: Optional[list[str]] = None) -> None:
    """Model outputs (a tensor, or tuples/lists/dicts of them) -> flat ``prefix/...`` keys.
    A None (PaddleNLP's cache with ``use_cache=False``) has nothing to compare: no key, its
    key in ``nones`` where given."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}/{k}", out, nones)
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}/{i}", out, nones)
    elif value is not None:
        out[prefix] = to_numpy(value, key=prefix).array
    elif nones is not None:
        nones.append(prefix)


def _shape_of(value: Any) -> tuple[int, ...]:
    # a record kept out of memory says its shape without being read
    shape = getattr(value, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else np.shape(value)


def pair_outputs(ref: Mapping[str, Any], port: dict[str, np.ndarray], head: str = "logits",
                 extra: Optional[list[str]] = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The port's flattened outputs under the reference's keys where one side returns a tuple and
    the other names the same outputs (a Hugging Face ``ModelOutput`` against PaddleNLP's tuple or
    lone tensor): the keys each side alone has pair by position when one side's are all
    positions, the leading ones whose shapes agree (a port may return fewer, or more: PaddleNLP's
    Pegasus adds its encoder's mask, DeBERTa-v2 its hidden states). A port returning more pairs
    only outputs as deep as the reference's (a hidden state of the port's tuple of them is not
    the reference's output), and only where none of its other outputs as deep has the shape of
    one paired (which would be the reference's is a guess). As many on each side, those after
    the leading ones pair by shape where a shape is one output's alone on each side (PaddleNLP's
    LUKE returns its entity states before its pooled output). ``head``: the outputs' key
    prefix, a lone tensor's whole key.

    ``extra``: where given, receives the port's outputs beyond the reference's (each reference
    output has its pair, and the port's others are positions), which then leave the outputs
    returned: the caller says them, they are not compared. Without it they stay, the port's own.
    Returns the outputs and port key -> reference key."""
    def _positional(key: str) -> bool:
        # a lone tensor is the first and only position
        return key == head or key.rpartition("/")[2].isdigit()

    only_ref = [k for k in ref if k not in port]
    only_port = [k for k in port if k not in ref]
    renamed = _paired_by_position(ref, port, only_ref, only_port, head, _positional)
    out = {renamed.get(k, k): v for k, v in port.items()} if renamed else port
    rest = [k for k in only_port if k not in renamed]
    if (extra is not None and rest and all(map(_positional, rest))
            and all(k in out for k in ref)):
        extra.extend(rest)
        out = {k: v for k, v in out.items() if k not in set(rest)}
    return out, renamed


def _depth(key: str, head: str) -> int:
    # a lone tensor is a first position, as deep as a tuple's
    return max(1, key[len(head):].count("/"))


def _paired_by_position(ref: Mapping[str, Any], port: Mapping[str, Any], only_ref: list[str],
                        only_port: list[str], head: str, positional: Callable[[str], bool]
                        ) -> dict[str, str]:
    if not only_ref or not only_port:
        return {}
    if len(only_ref) == len(only_port):
        if not (all(map(positional, only_ref)) or all(map(positional, only_port))):
            return {}  # both name theirs: names that differ are not the same outputs
    elif not all(map(positional, only_port)):
        return {}
    # a port returning fewer, by position, returns the reference's first ones (a model without
    # the cache a Hugging Face model returns after its hidden states); the leading positions
    # whose shapes agree pair, the rest stay each side's own (Bloom's key/value cache: HF's
    # [B, H, L, D] against PaddleNLP's [B, L, H, D])
    more = len(only_port) > len(only_ref)
    agree = 0
    for a, b in zip(only_ref, only_port):
        if _shape_of(ref[a]) != _shape_of(port[b]) or (
                more and _depth(a, head) != _depth(b, head)):
            break
        agree += 1
    if len(only_ref) == len(only_port):
        # after the leading ones, as many on each side in another order (PaddleNLP's LUKE
        # returns its entity states before its pooled output, HF after): each pairs with the
        # one of its shape where that shape is one output's on each side
        return {**dict(zip(only_port[:agree], only_ref[:agree])),
                **_by_shape(ref, port, only_ref[agree:], only_port[agree:], head)}
    if not agree:
        return {}
    if more:
        # a port's later output like one paired could be the reference's as well: no guess
        taken = {(_depth(a, head), _shape_of(ref[a])) for a in only_ref[:agree]}
        if any((_depth(b, head), _shape_of(port[b])) in taken for b in only_port[agree:]):
            return {}
    return dict(zip(only_port[:agree], only_ref[:agree]))


def _by_shape(ref: Mapping[str, Any], port: Mapping[str, Any], ref_keys: list[str],
              port_keys: list[str], head: str) -> dict[str, str]:
    """Port key -> reference key for the outputs whose shape and depth are one output's alone
    on each side."""
    def alone(tree: Mapping[str, Any], keys: list[str]) -> dict[Any, str]:
        seen: dict[Any, list[str]] = {}
        for k in keys:
            seen.setdefault((_depth(k, head), _shape_of(tree[k])), []).append(k)
        return {sig: ks[0] for sig, ks in seen.items() if len(ks) == 1}

    mine, theirs = alone(ref, ref_keys), alone(port, port_keys)
    return {theirs[sig]: key for sig, key in mine.items() if sig in theirs}


def not_compared_outputs(nones: Mapping[str, list[str]], extra: list[str]) -> dict[str, str]:
    """Output key -> why it is not compared: None on a side (``nones``: side -> keys), or one
    of the port's outputs beyond the reference's (``extra``, from ``pair_outputs``)."""
    sides: dict[str, list[str]] = {}
    for side, keys in nones.items():
        for k in keys:
            sides.setdefault(k, []).append(side)
    why = {k: f"None in {' and '.join(s)}" for k, s in sides.items()}
    why.update({k: "returned by the port beyond the reference's outputs" for k in extra})
    return why


def extra_outputs_finding(extra: list[str], head: str) -> Optional[str]:
    """A finding for the port's outputs beyond the reference's (``head``: their keys' prefix),
    or None: said, since a wrong switch on the port hides nothing here but costs time."""
    if not extra:
        return None
    n = len({k[len(head):].split("/")[1] if k != head else "" for k in extra})  # top-level
    more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
    return (f"the port returns {n} more output{'s' if n != 1 else ''} than the reference "
            f"({', '.join(extra[:3])}{more}): not compared; PaddleNLP models return their "
            "hidden states with config.output_hidden_states=True, their attention weights with "
            "output_attentions=True, and some their cache or attention mask")


def one_sided_outputs(ref: Mapping[str, Any], port: Mapping[str, Any], head: str
                      ) -> Optional[str]:
    """A finding for the outputs only one side returns (``head``: their keys' prefix), or None."""
    lines = []
    for side, mine, theirs in (("torch", ref, port), ("Paddle", port, ref)):
        only = [k for k in mine if k.startswith(head) and k not in theirs]
        if only:
            more = f" and {len(only) - 2} more" if len(only) > 2 else ""
            lines.append(f"outputs only {side} returns: {', '.join(only[:2])}{more}")
    if not lines:
        return None
    line = "; ".join(lines)
    if any("past_key_values" in k for k in ref if k not in port):
        line += (" (a Hugging Face model's key/value cache: set model.config.use_cache = False "
                 "on the reference, or pass use_cache=False)")
    elif (sum(k not in ref for k in port if k.startswith(head))
          > sum(k not in port for k in ref if k.startswith(head))):
        # outputs the pairing could not place (their order or shapes): a switch may drop them
        line += (" (the port returns more: a PaddleNLP model returns its hidden states with "
                 "config.output_hidden_states=True, its attention weights with "
                 "output_attentions=True)")
    return line


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


def _to_torch(value: Any, device: Any, *, float64: bool = False, dtype: Any = None,
              rounded_to: Any = None) -> Any:
    """numpy arrays (or tensors) -> torch tensors on ``device``; with ``float64``, floating ones
    (float16/bfloat16/float32) in float64, with ``dtype`` in that torch dtype, with
    ``rounded_to`` rounded to that torch dtype and held in their own (integer and boolean ones
    as they are)."""
    import torch

    def one(v: Any) -> Any:
        t = torch.from_numpy(np.array(_as_array(v))).to(device)
        if t.is_floating_point() and rounded_to is not None:
            return t.to(rounded_to).to(t.dtype)
        if t.is_floating_point() and (float64 or dtype is not None):
            return t.to(torch.float64 if float64 else dtype)
        return t

    return _map_tree(value, one)


def _paddle_place(model: Any) -> Any:
    for p in model.parameters():
        return p.place
    return None


def _to_paddle(value: Any, place: Any, *, dtype: Optional[str] = None) -> Any:
    """numpy arrays (or tensors) -> Paddle tensors on ``place``; with ``dtype`` (``"float16"``,
    ``"bfloat16"``), floating ones in it, as a half-precision port takes them."""
    import paddle

    def one(v: Any) -> Any:
        t = paddle.to_tensor(_as_array(v), place=place)
        return t.astype(dtype) if dtype is not None and t.is_floating_point() else t

    return _map_tree(value, one)


_HALF = ("float16", "bfloat16")


def _port_precision(paddle_model: Any) -> str:
    """The precision a Paddle model computes in: that of most of its floating parameters and
    buffers, by elements (``float16``, ``bfloat16``; otherwise ``float32``)."""
    sizes: dict[str, int] = {}
    for t in [*paddle_model.parameters(), *paddle_model.buffers()]:
        name = str(t.dtype).rpartition(".")[2]
        if name in ("float16", "bfloat16", "float32", "float64"):
            sizes[name] = sizes.get(name, 0) + int(np.prod(t.shape))
    return _most(sizes)


def _most(sizes: Mapping[str, int]) -> str:
    """The half precision most elements are in (dtype name -> elements), else ``float32``."""
    if not sizes:
        return "float32"
    found = max(sizes, key=lambda k: sizes[k])
    return found if found in _HALF else "float32"


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
    """Each torch key's plan; a packed attention tensor's under its slices' names
    (``rules.split_attention``: ``torch_views`` gives the tensors under those names)."""
    state = torch_model.state_dict()
    plan = plan_conversion(
        {k: tuple(v.shape) for k, v in split_attention(state)[0].items()},
        linear_weights=linear_weight_names(torch_model) | packed_linear_weights(state),
        rules=rules,
    )
    # a tied weight's second name has no Paddle key of its own (Paddle's alias is read once)
    tied = torch_aliases(state)
    return {p.torch_name: KeyPlan(p.torch_name, None, "drop", f"tied to {tied[p.torch_name]}",
                                  p.torch_shape) if p.torch_name in tied else p for p in plan}


def _torch_array(value: Any, plan: KeyPlan) -> np.ndarray:
    arr = to_numpy(value, key=plan.torch_name).array
    return np.ascontiguousarray(arr.T) if plan.action == "transpose" else arr


def _torch_view(value: Any, plan: KeyPlan) -> np.ndarray:
    """``_torch_array`` without its copy: the tensor's own memory (a Linear weight as a
    transposed view), for a value nobody changes while the view is read."""
    arr = to_numpy(value, key=plan.torch_name, copy=False).array
    return arr.T if plan.action == "transpose" else arr


def _log_torch(log: ReprodLogger, key: str, value: Any, plan: KeyPlan) -> None:
    """``log.add(key, _torch_array(value, plan))`` making one copy where that makes two or three:
    of the float64 twin's largest Linear weight (vgg's 25088x4096, 0.8 GB) two copies alive at
    once set ``align_train``'s peak memory."""
    import torch

    t = value.detach()
    if (plan.action == "transpose" and t.dim() == 2 and t.device.type == "cpu"
            and t.dtype in (torch.float32, torch.float64)):
        # torch's transposing copy goes by blocks: 3-4x faster than numpy's (0.23 s against
        # 0.9 s for that weight in float32); it is the logger's own copy
        # a logger that keeps its records in a file past a memory budget (align.spill) gives
        # the place itself
        out = getattr(log, "_empty", empty_array)(
            (t.shape[1], t.shape[0]), np.float32 if t.dtype == torch.float32 else np.float64)
        torch.from_numpy(out).copy_(t.t())
        log._put(key, out)
        return
    arr = to_numpy(t, key=plan.torch_name, copy=False).array  # add copies it
    log.add(key, arr.T if plan.action == "transpose" else arr)


def _paddle_view(value: Any) -> Any:
    """A CPU Paddle tensor's own memory, for ``ReprodLogger.add`` to copy once (the
    ``.numpy()`` that ``add`` uses holds two copies at a time); others as they are (a device's
    ``.numpy()`` is the one copy; a bfloat16 tensor's dtype is recorded by ``add``)."""
    place = getattr(value, "place", None)
    if place is None or not place.is_cpu_place():
        return value
    conv = to_numpy(value, key="<paddle>", copy=False)
    return value if conv.source_dtype is not None else conv.array


def _check_structure(torch_model: Any, paddle_model: Any, rules: Optional[ConversionRules]) -> None:
    report = compare_structure(torch_model, paddle_model, rules=rules)
    bad = [r for r in report.problems if r.status in ("missing", "extra", "shape")]
    if bad:
        listed = _few([f"{r.paddle_name or r.torch_name} ({r.note})" for r in bad], "; ")
        missing = sum(r.status == "missing" for r in bad)
        extra = sum(r.status == "extra" for r in bad)
        hint = ""
        if missing and missing == extra:  # the port names its layers differently
            hint = (
                f" | {missing} missing and {extra} extra: the names do not pair but the counts "
                "match: try by_order=True"
            )
        raise KeyMismatchError(
            f"the Paddle model does not mirror the torch model ({len(bad)} problems): {listed}{hint}"
        )


def _check_no_dropout(torch_model: Any, paddle_model: Any) -> None:
    """Dropout draws different masks in each framework: in train mode nothing would align."""
    found = []
    for side, layers in (
        ("torch", torch_model.named_modules()),
        ("paddle", paddle_model.named_sublayers()),
    ):
        for name, m in layers:
            rate = _drop_rate(m)
            if rate and m.training:
                found.append(f"{side} {name or type(m).__name__} (p={rate:g})")
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise ReprodError(
            f"dropout is active in train mode and draws different random masks in each framework: "
            f"{shown}; pass dropout=\"off\" (dropout, drop-path and attention layers run in "
            "eval mode), or build the models with dropout 0"
        )


# layers that drop at random in training: dropout, and stochastic depth (timm's and PaddleClas's
# DropPath, Hugging Face's ConvNextDropPath..., torchvision's StochasticDepth), which drops whole
# samples' residual branches
_RANDOM_DROPS = ("dropout", "droppath", "stochasticdepth")


def _drop_rate(layer: Any) -> float:
    """The rate a layer drops at random in training (0 for any other layer)."""
    name = type(layer).__name__.lower()
    if not any(k in name for k in _RANDOM_DROPS):
        return 0.0
    return number_attr(layer, ("p", "drop_prob", "_p")) or 0.0


def _switched_off(layer: Any) -> bool:
    name = type(layer).__name__.lower()
    return any(k in name for k in _RANDOM_DROPS) or "attention" in name


@contextlib.contextmanager
def _dropouts_off(torch_model: Any, paddle_model: Any) -> Iterator[None]:
    """Each dropout layer, and each attention layer (which drops its weights as a function:
    torch's and Paddle's ``MultiheadAttention``, Hugging Face's ``BertSdpaSelfAttention``), in
    eval mode while the block runs; only those layers' own flags, each restored after."""
    changed = []
    for layers in (torch_model.named_modules(), paddle_model.named_sublayers()):
        for name, layer in layers:
            # the model itself keeps its mode, whatever its class is called ("AttentionNet")
            if name and _switched_off(layer) and layer.training:
                layer.training = False
                changed.append(layer)
    try:
        yield
    finally:
        for layer in changed:
            layer.training = True


# align's own defaults for the keyword shortcuts (threshold 1e-5: float32 ports, not compare's 1e-6)
_ALIGN_DEFAULTS: dict[str, Any] = {"methods": "mean", "threshold": 1e-5, "atol": None, "rtol": None,
                                   "per_key": None, "noise_factor": None}


def _criteria(criteria: Optional[Criteria], calibrate: bool, **given: Any) -> Criteria:
    """One ``reprod.Criteria`` for every comparison of an align run: ``criteria`` with the keyword
    shortcuts given beside it (those left at align's defaults do not override it)."""
    _check_noise_factor(calibrate, given.get("noise_factor"))
    if criteria is not None:
        given = {k: v for k, v in given.items() if v != _ALIGN_DEFAULTS[k]}
    return build_criteria(criteria, **given)


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
