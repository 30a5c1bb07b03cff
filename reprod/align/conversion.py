"""Converting a PyTorch state dict into a Paddle one by the rules of ``reprod.align.rules``, and
loading the result into a Paddle model after checking that every key fits.

Weight files are read and written by ``reprod.storage.framework_files`` (``.pth`` with
``torch.load(weights_only=True)``, ``.pdparams`` without running the pickle).
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..adapters import to_numpy
from ..errors import DumpFormatError, KeyMismatchError, ReprodError
from ..storage.framework_files import (
    PADDLE_SUFFIXES,
    TORCH_SUFFIXES,
    load_weights_as_dump,
    read_torch_state_dict,
    weight_file_suffix,
)
from .by_order import _paddle_shapes, by_order_rules
from .fusion import find_fusions, find_splits, fuse, port_splits, split
from .rules import (
    ConversionRules,
    KeyPlan,
    _is_torch_module,
    active_splits,
    as_target_layout,
    kernel_against_matrix,
    known_layouts,
    linear_weight_names,
    packed_linear_weights,
    packed_why,
    plan_conversion,
    port_constants,
    port_splitting,
    split_attention,
    torch_aliases,
    torch_constants,
    unaliased,
    unit_axes_apart,
    with_aliases,
)

__all__ = [
    "Conversion",
    "HeuristicLinearWarning",
    "convert",
    "torch_to_paddle",
    "check_fits",
    "load_into_paddle",
]


class HeuristicLinearWarning(UserWarning):
    """No torch model was given, so Linear weights were recognised by name and shape."""



@dataclass(frozen=True)
class Conversion:
    """The result of ``convert``: Paddle-named, Paddle-layout arrays plus what was done to each key.

    ``linear_source`` is ``"model"`` when Linear weights were found with ``isinstance`` on the torch
    model, ``"order"`` when read from the shapes of the Paddle tensors paired by order (a square one
    still from the model or the heuristic), ``"heuristic"`` otherwise. ``source_dtypes`` names
    dtypes numpy lacks (bfloat16, stored here as float32).
    """

    weights: dict[str, np.ndarray]
    plan: tuple[KeyPlan, ...]
    linear_source: str
    source_dtypes: dict[str, str] = field(default_factory=dict)
    # a port tensor -> the converted tensors fused into it (``reprod.align.fusion``)
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # a reference tensor -> the port tensors it was split into (``reprod.align.fusion.Split``)
    split: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def by_action(self, action: str) -> list[KeyPlan]:
        return [p for p in self.plan if p.action == action]

    def summary_line(self) -> str:
        n = {a: len(self.by_action(a)) for a in ("copy", "transpose", "skip", "drop")}
        renamed = sum(p.paddle_name not in (None, p.torch_name) for p in self.plan)
        how = {
            "model": "nn.Linear layers of the torch model",
            "order": "the shapes of the Paddle tensors paired by order",
        }.get(self.linear_source, "a name/shape heuristic (no torch model given)")
        joined = (f", {sum(len(p) for p in self.fused.values())} of the reference's fused "
                  f"into {len(self.fused)}" if self.fused else "")
        joined += (f", {len(self.split)} of the reference's split into "
                   f"{sum(len(p) for p in self.split.values())}" if self.split else "")
        return (
            f"{len(self.weights)} tensors converted{joined}: {n['transpose']} transposed (found by {how}), "
            f"{renamed} renamed, {n['copy']} copied, {n['skip']} skipped by rule, "
            f"{n['drop']} dropped"
        )


def _check_fits_torch_model(sd: Mapping[str, Any], model: Any, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {list(np.shape(sd[k]))} vs model {list(expected[k])}"
        for k in sd
        if k in expected and tuple(np.shape(sd[k])) != expected[k]
    ]
    _raise_misfit(source, f"the torch model {type(model).__name__}", missing, unexpected, wrong, [])


def _raise_misfit(
    source: str,
    target: str,
    missing: list[str],
    unexpected: list[str],
    wrong: list[str],
    dtypes: list[str],
) -> None:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_few(missing, ', ')}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected, ', ')}")
    if wrong:
        parts.append(f"wrong shape: {_few(wrong, '; ')}")
    if dtypes:
        parts.append(f"wrong dtype: {_few(dtypes, '; ')}")
    if parts:
        hint = ""
        if missing and unexpected and len(missing) == len(unexpected):
            # as many names missing as unexpected: the port names its layers differently
            hint = " | the names do not pair but the counts match: try by_order=True (reprod-convert --by-order)"
        elif missing and not unexpected and len(missing) <= 6:
            # a few tensors only the port holds (a position table it resamples, a pooler)
            patterns = ", ".join(f'r"^{re.escape(k)}$"' for k in missing)
            hint = (" | where only the port has them, keep its own: "
                    f"rules=ConversionRules(port_only=[{patterns}])")
        raise KeyMismatchError(f"{source}: does not fit {target}: {' | '.join(parts)}{hint}")


def _few(names: list[str], sep: str, shown: int = 3) -> str:
    """A few names and a count of the rest: an error stays one readable line."""
    more = len(names) - shown
    return sep.join(names[:shown]) + (f"{sep}... ({more} more)" if more > 0 else "")


def convert(
    state_dict_or_path: Any,
    *,
    model: Any = None,
    rules: Optional[ConversionRules] = None,
    by_order: bool = False,
    paddle_model: Any = None,
    copy: bool = True,
    inputs: Any = None,
) -> Conversion:
    """Convert a PyTorch state dict (a mapping, a file, or a torch model) into a Paddle one, and say
    what was done to every key.

    With ``model`` (the torch ``nn.Module``), Linear weights are found by ``isinstance`` and the
    state dict must fit the model (every key, every shape); without it ``guess_linear_weight``
    decides and ``HeuristicLinearWarning`` is issued.

    ``by_order=True`` names each key after the Paddle key at the same position of ``paddle_model``
    (a Paddle model, state dict or ``.pdparams`` path), see ``pair_weights_by_order``; Linear weights are
    then recognised by shape; with ``inputs`` (example inputs, and the torch model itself), by the
    order the layers run in instead. ``rules`` still skip keys. Without ``by_order``, ``paddle_model``
    is the port the weights are for: the tensors one of its tensors fuses are fused
    (``reprod.align.fusion``: PaddleNLP's ``qkv_proj``, laid out as ``rules.fuse_groups`` says).

    ``copy=False``: a weight kept as it is may share memory with its torch tensor, for a caller
    done with the arrays before the tensors can change (``load_into_paddle`` hands them to
    ``set_state_dict``, which copies them): one copy of the model fewer, in time and memory.

    >>> conv = convert(torch_model.state_dict(), model=torch_model)
    >>> paddle_model.set_state_dict(conv.weights); print(conv.summary_line())
    """
    source = "state dict"
    if _is_torch_module(state_dict_or_path):
        model = state_dict_or_path if model is None else model
        sd: Mapping[str, Any] = state_dict_or_path.state_dict()
        source = f"state dict of {type(state_dict_or_path).__name__}"
    elif isinstance(state_dict_or_path, (str, os.PathLike)):
        source = os.fspath(state_dict_or_path)
        if weight_file_suffix(source) in PADDLE_SUFFIXES:
            raise DumpFormatError(
                f"{source}: is already a Paddle file; convert reads PyTorch files "
                f"({', '.join(TORCH_SUFFIXES)})"
            )
        sd = read_torch_state_dict(source)
    elif isinstance(state_dict_or_path, Mapping):
        sd = state_dict_or_path
    else:
        raise ReprodError(
            f"cannot convert a {type(state_dict_or_path).__name__}: expected a state dict, "
            "a path to a .pth file, or a torch model"
        )
    if model is not None:
        _check_fits_torch_model(sd, model, source)
        linear: Optional[set[str]] = linear_weight_names(model)
    else:
        linear = None
    if inputs is not None and not by_order:
        raise ReprodError(f"{source}: inputs= pairs by call order, with by_order=True")
    if by_order:
        if paddle_model is None:
            raise ReprodError(f"{source}: by_order needs paddle_model= to take the order from")
        # paired before the split: a packed tensor tells its slices' layout (GPT-2's c_attn)
        rules = by_order_rules(model if model is not None else sd, paddle_model, rules=rules,
                               inputs=inputs)
    # the reference's tensors holding what the port keeps apart (Phi-3's qkv_proj for a port's
    # q_proj, k_proj, v_proj): split, each part named as the port's
    splits = active_splits() or (port_splits(sd, paddle_model, rules, linear)
                                 if paddle_model is not None else [])
    with port_splitting(splits):
        if linear is not None:
            linear |= packed_linear_weights(sd)
        known = known_layouts(sd)
        why = packed_why(sd)
        sd = split_attention(sd)[0]  # a packed attention's q, k, v as Paddle's q/k/v_proj
    plan = plan_conversion({k: tuple(np.shape(v)) for k, v in sd.items()}, linear_weights=linear,
                           rules=rules, known=known)
    if by_order:
        # a tied weight pairs by its first name (by_order leaves the second out, as Paddle's
        # aliases): Paddle's tied names take it through with_aliases
        tied = torch_aliases(sd)
        plan = tuple(KeyPlan(p.torch_name, None, "drop", f"tied to {tied[p.torch_name]}: loaded "
                             "under its name", p.torch_shape) if p.torch_name in tied else p
                     for p in plan)
    plan = tuple(dataclasses.replace(p, why=f"{p.why}; {why[p.torch_name]}")
                 if p.torch_name in why else p for p in plan)
    weights: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for p in plan:
        if p.paddle_name is None:
            continue
        # a weight transposed is copied by the transpose: its tensor's view is enough
        conv = to_numpy(sd[p.torch_name], key=p.torch_name,
                        copy=copy and p.action != "transpose")
        arr = conv.array
        if p.action == "transpose":
            arr = np.ascontiguousarray(arr.T)
        weights[p.paddle_name] = arr
        if conv.source_dtype is not None:
            dtypes[p.paddle_name] = conv.source_dtype
    fused: dict[str, tuple[str, ...]] = {}
    if paddle_model is not None and not by_order:
        weights, plan, fused = _fused_for(paddle_model, weights, plan, rules)
    how = "order" if by_order else "model" if linear is not None else "heuristic"
    result = Conversion(weights, plan, how, dtypes, fused,
                        {s.torch_key: s.parts for s in splits})
    if linear is None and result.by_action("transpose"):
        names = ", ".join(
            p.torch_name for p in result.by_action("transpose") if p.why.startswith("heur")
        )
        if names:
            warnings.warn(
                f"{source}: no torch model given, so Linear weights were guessed by name and shape "
                f"(2-D '.weight' outside conv/embedding) and transposed: {names}; pass model= "
                "(--model) to decide from nn.Linear layers",
                HeuristicLinearWarning,
                stacklevel=2,
            )
    return result


def _fused_for(paddle_model: Any, weights: dict[str, np.ndarray], plan: tuple[KeyPlan, ...],
               rules: Optional[ConversionRules]
               ) -> tuple[dict[str, np.ndarray], tuple[KeyPlan, ...], dict[str, tuple[str, ...]]]:
    """``weights`` with the tensors one tensor of ``paddle_model`` (a Paddle model, state dict
    or ``.pdparams`` path) fuses made into it (``reprod.align.fusion``), each part's plan
    saying so, and each fused tensor's parts."""
    port = _paddle_shapes(paddle_model)[0]
    fusions = find_fusions({k: tuple(np.shape(v)) for k, v in weights.items()}, port, rules)
    if not fusions:
        return weights, plan, {}
    part_of = {p: f for f in fusions for p in f.parts}
    plan = tuple(dataclasses.replace(p, why=f"{p.why}; fused {part_of[p.paddle_name].why(p.paddle_name)}")
                 if p.paddle_name in part_of else p for p in plan)
    return fuse(weights, fusions), plan, {f.port_key: f.parts for f in fusions}


def torch_to_paddle(
    state_dict_or_path: Any,
    *,
    model: Any = None,
    rules: Optional[ConversionRules] = None,
) -> dict[str, np.ndarray]:
    """A PyTorch state dict as a dict ``paddle.Layer.set_state_dict`` accepts: Linear weights
    transposed, BatchNorm statistics renamed, ``num_batches_tracked`` dropped, user rules applied.

    >>> paddle_model.set_state_dict(torch_to_paddle(torch_model.state_dict(), model=torch_model))
    >>> write_pdparams("model.pdparams", torch_to_paddle("model.pth", model=build_torch_model()))
    """
    return convert(state_dict_or_path, model=model, rules=rules).weights


def _paddle_dtype_name(t: Any) -> str:
    return str(t.dtype).replace("paddle.", "")


def _own_constants(paddle_model: Any, weights: Mapping[str, Any],
                   rules: Optional[ConversionRules] = None) -> dict[str, Any]:
    """The Paddle model's constants ``weights`` leaves out: its integer and bool tensors
    (PaddleNLP's persistable ``position_ids``, which Hugging Face keeps out of its state dict)
    and its registered buffers (PaddleNLP GPT-J's causal mask and ``masked_bias``, which Hugging
    Face's does not hold). The model keeps them: they are not weights to load. So it keeps the
    tensors ``rules.port_only`` names, which the user says only the port has."""
    state = unaliased(paddle_model.state_dict())[0]
    trainable = {k for k, v in state.items() if not getattr(v, "stop_gradient", True)}
    buffers = {name for name, _ in paddle_model.named_buffers()}
    constants = port_constants(state, buffers) - trainable
    if rules is not None and rules.port_only:
        constants |= {k for k in state if rules.port_only_pattern(k) is not None}
    return {k: state[k] for k in constants if k not in weights}


def _unit_axes_as_the_model_s(paddle_model: Any, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """``arrays`` with those whose shape differs from the model's only by axes of size 1
    reshaped to it: Paddle's ``set_state_dict`` refuses a 0-d array for a [1] parameter; a 1x1
    convolution's kernel against a Linear's weight is transposed too (``as_target_layout``)."""
    expected, aliases = unaliased(paddle_model.state_dict())
    out = dict(arrays)
    for k, v in arrays.items():
        want = expected.get(aliases.get(k, k))
        if want is None:
            continue
        got, shape = tuple(np.shape(v)), tuple(int(d) for d in want.shape)
        if unit_axes_apart(got, shape) or kernel_against_matrix(got, shape):
            out[k] = np.ascontiguousarray(as_target_layout(v, shape))
    return out


def _fused_as_the_port_holds(paddle_model: Any, arrays: Mapping[str, Any],
                             rules: Optional[ConversionRules] = None) -> Mapping[str, Any]:
    """``arrays`` with the reference's tensors that one port tensor holds together (PaddleNLP's
    ``qkv_proj`` for ``q_proj``, ``k_proj``, ``v_proj``) fused as ``rules.fuse_groups`` lays
    them out, and each reference tensor holding several the port keeps apart (Phi-3's
    ``qkv_proj`` against LLaMA's three) split so (``reprod.align.fusion``)."""
    expected = {k: tuple(int(d) for d in v.shape)
                for k, v in unaliased(paddle_model.state_dict())[0].items()}
    shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    fusions = find_fusions(shapes, expected, rules)
    # and the reverse: a reference tensor holding several the port keeps apart
    splits = find_splits(shapes, expected, rules, fusions)
    return split(fuse(arrays, fusions), splits) if fusions or splits else arrays


def check_fits(
    paddle_model: Any, weights: Mapping[str, Any], *, source: str = "converted weights",
    rules: Optional[ConversionRules] = None,
) -> None:
    """Raise one ``KeyMismatchError`` listing every key that keeps ``weights`` from loading into
    ``paddle_model``: missing, unexpected, wrong shape (with a hint when it is the transpose), wrong
    dtype. Shapes apart only by axes of size 1 fit (they load reshaped). Paddle's own
    ``set_state_dict`` only warns about missing keys. The model's integer
    and bool tensors and its registered buffers may be left out: it keeps its own
    (``position_ids``, a causal mask); so may the keys ``rules.port_only`` names (a pooler only
    the port has).

    >>> check_fits(paddle_model, torch_to_paddle("model.pth", model=torch_model))
    """
    expected, aliases = unaliased(paddle_model.state_dict())
    constants = _own_constants(paddle_model, weights, rules)
    missing = [k for k in expected if k not in weights and k not in constants and
               not any(a in weights for a, kept in aliases.items() if kept == k)]
    unexpected = [k for k in weights if k not in expected and k not in aliases]
    wrong, dtypes = [], []
    for k, v in weights.items():
        if k in aliases:  # a file Paddle saved holds both names of an RNN's weight
            k = aliases[k]
        if k not in expected:
            continue
        want = tuple(expected[k].shape)
        got = tuple(np.shape(v))
        if got != want and not unit_axes_apart(got, want) and \
                not kernel_against_matrix(got, want):
            hint = (
                " (transposed: a Linear weight? pass the torch model or a transpose rule)"
                if len(got) == 2 and got[::-1] == want
                else ""
            )
            wrong.append(f"{k} {list(got)} vs model {list(want)}{hint}")
            continue
        got_dt = str(getattr(v, "dtype", ""))
        want_dt = _paddle_dtype_name(expected[k])
        if isinstance(v, np.ndarray) and got_dt != want_dt:
            dtypes.append(f"{k} {got_dt} vs model {want_dt}")
    _raise_misfit(
        source,
        f"the Paddle model {type(paddle_model).__name__}",
        missing,
        unexpected,
        wrong,
        dtypes,
    )


def load_into_paddle(
    paddle_model: Any,
    weights: Any,
    *,
    model: Any = None,
    rules: Optional[ConversionRules] = None,
    by_order: bool = False,
    inputs: Any = None,
) -> None:
    """Load weights into a Paddle model after checking that every key fits (see ``check_fits``).

    ``weights`` is a Paddle-named mapping, a ``.pdparams`` or ``.pth`` path, a torch state dict or a
    torch model (converted with ``model``/``rules`` first). ``by_order=True`` pairs torch keys with
    ``paddle_model``'s keys by definition order (see ``pair_weights_by_order``) instead of by name;
    with ``inputs`` (example inputs, a torch model given), by the order the layers run in: for a
    port that defines sibling layers in another order than the reference.

    >>> load_into_paddle(paddle_model, torch_model)          # copy a torch model's weights
    >>> load_into_paddle(paddle_model, torch_model, by_order=True)   # names differ, order agrees
    >>> load_into_paddle(paddle_model, torch_model, by_order=True, inputs=x)  # as they run
    >>> load_into_paddle(paddle_model, "model.pdparams")
    """
    source = "converted weights"
    target = paddle_model if by_order else None
    if inputs is not None and not (by_order and _is_torch_module(weights)):
        raise ReprodError("load_into_paddle: inputs= pairs by call order, with by_order=True "
                          "and the torch model itself as weights")
    if isinstance(weights, (str, os.PathLike)) and by_order:
        source = os.fspath(weights)
        if weight_file_suffix(source) in PADDLE_SUFFIXES:
            raise ReprodError(f"{source}: by_order converts PyTorch files, not a .pdparams")
        arrays: Mapping[str, Any] = convert(
            source, model=model, rules=rules, by_order=by_order, paddle_model=target, copy=False
        ).weights
    elif isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights)
        arrays = load_weights_as_dump(source, rules=rules, model=model)
    elif _is_torch_module(weights):
        source = f"weights of {type(weights).__name__}"
        conv = convert(
            weights, model=model, rules=rules, by_order=by_order, paddle_model=target, copy=False,
            inputs=inputs,
        )
        # the reference's constants the port does not hold (it computes them): not weights
        constants = torch_constants(weights)
        held = set(paddle_model.state_dict())
        gone = {p.paddle_name for p in conv.plan
                if p.torch_name in constants and p.paddle_name not in held}
        arrays = {k: v for k, v in conv.weights.items() if k not in gone}
    elif isinstance(weights, Mapping) and any(
        type(v).__module__.startswith("torch") for v in weights.values()
    ):
        arrays = convert(
            weights, model=model, rules=rules, by_order=by_order, paddle_model=target, copy=False
        ).weights
    elif by_order:
        raise ReprodError("by_order needs PyTorch weights (a torch model, state dict or .pth)")
    elif isinstance(weights, Mapping):
        arrays = weights
    else:
        raise ReprodError(f"cannot load a {type(weights).__name__} into a Paddle model")
    arrays = _fused_as_the_port_holds(paddle_model, arrays, rules)
    check_fits(paddle_model, arrays, source=source, rules=rules)
    arrays = {**_own_constants(paddle_model, arrays, rules), **_unit_axes_as_the_model_s(
        paddle_model, arrays)}  # set_state_dict wants them all
    paddle_model.set_state_dict(with_aliases(paddle_model, arrays))
