"""PyTorch state dicts -> Paddle state dicts: the name and layout rules, and the files that carry them.

What differs between the two frameworks' state dicts, and what this module does about it:

- ``nn.Linear`` stores its weight as ``[out, in]`` in torch and ``[in, out]`` in Paddle: transposed.
  Which weights are Linear weights is read from the torch model (``isinstance(m, nn.Linear)``) when
  one is given; without a model a heuristic decides (see ``guess_linear_weight``) and a warning says so.
- BatchNorm's ``running_mean``/``running_var`` are Paddle's ``_mean``/``_variance``;
  ``num_batches_tracked`` has no Paddle counterpart and is dropped.
- Everything else keeps its name and layout (Conv, Embedding, LayerNorm, ConvTranspose, LSTM, ...).

User rules (``ConversionRules``) add renames, skips and transposes. Every pattern is a regular
expression searched in the *original PyTorch key*; renames apply in order, each to the result of
the previous one, and the BatchNorm suffix renames apply after them. Exact ``pairs`` (torch key ->
Paddle key) come before all renames; ``pair_by_order`` finds them by definition order when names
cannot be mapped by rules.

Files: ``.pth``/``.pt``/``.bin``/``.ckpt`` are read with ``torch.load(weights_only=True)``;
``.pdparams`` (a pickle of a dict of numpy arrays) is read without running the pickle and written
as a protocol-4 pickle of numpy arrays, atomically, which ``paddle.load`` reads.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from ..adapters import to_numpy
from ..errors import DumpFormatError, KeyMismatchError, ReprodError

__all__ = [
    "ConversionRules",
    "KeyPlan",
    "pair_by_order",
    "by_order_rules",
    "Conversion",
    "HeuristicLinearWarning",
    "TORCH_SUFFIXES",
    "PADDLE_SUFFIXES",
    "convert",
    "torch_to_paddle",
    "plan_conversion",
    "linear_weight_names",
    "guess_linear_weight",
    "read_torch_state_dict",
    "read_pdparams",
    "write_pdparams",
    "load_weights_as_dump",
    "check_fits",
    "load_into_paddle",
]

PathLike = Union[str, "os.PathLike[str]"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
PADDLE_SUFFIXES = (".pdparams",)

# torch BatchNorm statistics -> Paddle's names for the same tensors
_BUILTIN_RENAMES = (
    (re.compile(r"running_mean$"), "_mean"),
    (re.compile(r"running_var$"), "_variance"),
)
_DROPPED = re.compile(r"(^|\.)num_batches_tracked$")
# a module-path segment naming a layer whose 2-D weight is NOT stored transposed in Paddle
_NOT_LINEAR_SEGMENT = re.compile(r"(?i)conv|emb|^wte$|^wpe$")
# keys paddle.save adds beside the tensors (name tables, big-tensor slicing info)
_PADDLE_META_SUFFIX = "@@"
# top-level keys of training checkpoints that wrap the actual state dict
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


class HeuristicLinearWarning(UserWarning):
    """No torch model was given, so Linear weights were recognised by name and shape."""


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ReprodError(
            f"{what} pattern {pattern!r} is not a valid regular expression ({exc})"
        ) from None


def _tuple_of_str(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    out = tuple(value)
    for p in out:
        if not isinstance(p, str):
            raise ReprodError(f"{what} pattern {p!r} is a {type(p).__name__}, expected a str")
    return out


@dataclass(frozen=True)
class ConversionRules:
    """User additions to the built-in torch -> Paddle rules. Patterns are regexes searched in the
    original PyTorch key.

    - ``rename``: ``(pattern, replacement)`` pairs (or a dict), applied in order with ``re.sub``.
    - ``skip``: keys matching any of these are left out of the result.
    - ``transpose``: 2-D tensors matching these are transposed even if not ``nn.Linear`` weights.
    - ``no_transpose``: tensors matching these are never transposed (overrides model and heuristic).
    - ``pairs``: exact torch key -> Paddle key (or a dict); a paired key takes this name and no
      rename applies to it (see ``from_pairs`` and ``pair_by_order``).

    >>> rules = ConversionRules(rename={r"^module\\.": ""}, skip=[r"^head\\."])
    >>> weights = torch_to_paddle("model.pth", rules=rules)
    """

    rename: tuple[tuple[str, str], ...] = ()
    skip: tuple[str, ...] = ()
    transpose: tuple[str, ...] = ()
    no_transpose: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    _compiled: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rename = self.rename.items() if isinstance(self.rename, Mapping) else self.rename
        pairs: list[tuple[str, str]] = []
        for pair in rename:
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                raise ReprodError(
                    f"rename rule {pair!r} must be a (pattern, replacement) pair of str"
                )
            pairs.append((pair[0], pair[1]))
        object.__setattr__(self, "rename", tuple(pairs))
        exact = self.pairs.items() if isinstance(self.pairs, Mapping) else self.pairs
        exact_pairs: list[tuple[str, str]] = []
        for pair in exact:
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
                raise ReprodError(f"pair {pair!r} must be a (torch key, paddle key) pair of str")
            exact_pairs.append((pair[0], pair[1]))
        object.__setattr__(self, "pairs", tuple(exact_pairs))
        for name in ("skip", "transpose", "no_transpose"):
            object.__setattr__(self, name, _tuple_of_str(getattr(self, name), name))
        renames = tuple((_compile(p, "rename"), r) for p, r in self.rename)
        compiled: dict[str, Any] = {
            "rename": renames,
            "skip": tuple(_compile(p, "skip") for p in self.skip),
            "transpose": tuple(_compile(p, "transpose") for p in self.transpose),
            "no_transpose": tuple(_compile(p, "no-transpose") for p in self.no_transpose),
            "pairs": dict(self.pairs),
        }
        for pat, repl in renames:
            try:
                pat.sub(repl, "")  # a bad group reference in the replacement shows up here
            except (re.error, IndexError) as exc:
                raise ReprodError(
                    f"rename replacement {repl!r} is invalid for {pat.pattern!r} ({exc})"
                ) from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def from_strings(
        cls,
        *,
        rename: Collection[str] = (),
        skip: Collection[str] = (),
        transpose: Collection[str] = (),
        no_transpose: Collection[str] = (),
    ) -> ConversionRules:
        """Rules from command-line style strings; a rename is ``"PATTERN=REPLACEMENT"``.

        >>> ConversionRules.from_strings(rename=[r"^backbone\\.=body."]).rename
        (('^backbone\\\\.', 'body.'),)
        """
        pairs = []
        for item in rename:
            if "=" not in item:
                raise ReprodError(f"rename rule {item!r} must look like PATTERN=REPLACEMENT")
            pat, repl = item.split("=", 1)
            pairs.append((pat, repl))
        return cls(
            rename=tuple(pairs),
            skip=tuple(skip),
            transpose=tuple(transpose),
            no_transpose=tuple(no_transpose),
        )

    @classmethod
    def from_pairs(
        cls,
        pairs: Mapping[str, str],
        *,
        transpose: Collection[str] = (),
        no_transpose: Collection[str] = (),
        base: Optional[ConversionRules] = None,
    ) -> ConversionRules:
        """Rules that name each torch key's Paddle key exactly, e.g. the result of
        ``pair_by_order``. ``transpose``/``no_transpose`` are exact torch keys (not patterns);
        ``base`` keeps another rule set's renames, skips and transposes beside the pairs.

        >>> rules = ConversionRules.from_pairs({"features.0.weight": "stem.conv.weight"})
        >>> rules.paddle_name("features.0.weight")
        'stem.conv.weight'
        """
        base = base or _DEFAULT_RULES
        exact = tuple(f"^{re.escape(k)}$" for k in transpose)
        exact_no = tuple(f"^{re.escape(k)}$" for k in no_transpose)
        return cls(
            rename=base.rename,
            skip=base.skip,
            transpose=base.transpose + exact,
            no_transpose=base.no_transpose + exact_no,
            pairs=base.pairs + tuple(pairs.items()),
        )

    def skip_pattern(self, torch_name: str) -> Optional[str]:
        for pat in self._compiled["skip"]:
            if pat.search(torch_name):
                return str(pat.pattern)
        return None

    def transpose_pattern(self, torch_name: str) -> Optional[str]:
        for pat in self._compiled["transpose"]:
            if pat.search(torch_name):
                return str(pat.pattern)
        return None

    def no_transpose_pattern(self, torch_name: str) -> Optional[str]:
        for pat in self._compiled["no_transpose"]:
            if pat.search(torch_name):
                return str(pat.pattern)
        return None

    def paddle_name(self, torch_name: str) -> str:
        """The Paddle key for a torch key: user renames, then the built-in BatchNorm renames."""
        paired = self._compiled["pairs"].get(torch_name)
        if paired is not None:
            return str(paired)
        name = torch_name
        for pat, repl in self._compiled["rename"]:
            name = pat.sub(repl, name)
        for pat, repl in _BUILTIN_RENAMES:
            name = pat.sub(repl, name)
        return name


_DEFAULT_RULES = ConversionRules()


@dataclass(frozen=True)
class KeyPlan:
    """What happens to one torch key: ``action`` is copy, transpose, skip (a user rule) or drop
    (no Paddle counterpart); ``why`` says which rule decided."""

    torch_name: str
    paddle_name: Optional[str]
    action: str
    why: str
    torch_shape: tuple[int, ...]

    @property
    def paddle_shape(self) -> Optional[tuple[int, ...]]:
        if self.paddle_name is None:
            return None
        return tuple(reversed(self.torch_shape)) if self.action == "transpose" else self.torch_shape


@dataclass(frozen=True)
class Conversion:
    """The result of ``convert``: Paddle-named, Paddle-layout arrays plus what was done to each key.

    ``linear_source`` is ``"model"`` when Linear weights were found with ``isinstance`` on the torch
    model, ``"order"`` when read from the shapes of the Paddle tensors paired by order (a square one
    still from the model or the heuristic), ``"heuristic"`` otherwise. ``source_dtypes`` names dtypes numpy lacks (bfloat16, stored
    here as float32).
    """

    weights: dict[str, np.ndarray]
    plan: tuple[KeyPlan, ...]
    linear_source: str
    source_dtypes: dict[str, str] = field(default_factory=dict)

    def by_action(self, action: str) -> list[KeyPlan]:
        return [p for p in self.plan if p.action == action]

    def summary_line(self) -> str:
        n = {a: len(self.by_action(a)) for a in ("copy", "transpose", "skip", "drop")}
        renamed = sum(p.paddle_name not in (None, p.torch_name) for p in self.plan)
        how = {
            "model": "nn.Linear layers of the torch model",
            "order": "the shapes of the Paddle tensors paired by order",
        }.get(self.linear_source, "a name/shape heuristic (no torch model given)")
        return (
            f"{len(self.weights)} tensors converted: {n['transpose']} transposed (found by {how}), "
            f"{renamed} renamed, {n['copy']} copied, {n['skip']} skipped by rule, "
            f"{n['drop']} dropped"
        )


def guess_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """The fallback when no torch model is given: a key is taken for an ``nn.Linear`` weight when it
    is 2-D, its last segment is ``weight`` and no segment of its module path mentions ``conv`` or
    ``emb`` (embedding) or is ``wte``/``wpe`` (GPT-style embeddings).

    >>> guess_linear_weight("head.fc.weight", (10, 64)), guess_linear_weight("tok_emb.weight", (100, 64))
    (True, False)
    """
    parts = name.split(".")
    if len(shape) != 2 or parts[-1] != "weight":
        return False
    return not any(_NOT_LINEAR_SEGMENT.search(seg) for seg in parts[:-1])


def linear_weight_names(torch_model: Any) -> set[str]:
    """Keys of every ``nn.Linear`` (and subclass) weight in a torch model's state dict."""
    import torch

    return {
        f"{name}.weight" if name else "weight"
        for name, module in torch_model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _rule_why(kind: str, pattern: str, name: str) -> str:
    # from_pairs (pair_by_order) writes one exact pattern per key; quoting it back is just noise
    if pattern == f"^{re.escape(name)}$":
        return f"exact {kind} rule for this key"
    return f"{kind} rule {pattern!r}"


def plan_conversion(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    linear_weights: Optional[Collection[str]] = None,
    rules: Optional[ConversionRules] = None,
) -> tuple[KeyPlan, ...]:
    """Decide, for each torch key, its Paddle name and whether it is transposed, skipped or dropped.

    ``linear_weights`` are the torch keys known to be ``nn.Linear`` weights; ``None`` means unknown,
    and ``guess_linear_weight`` decides. Raises ``ReprodError`` when two keys land on one Paddle name
    or a transpose rule matches a tensor that is not 2-D.

    >>> [p.action for p in plan_conversion({"fc.weight": (2, 3), "bn.num_batches_tracked": ()},
    ...                                    linear_weights={"fc.weight"})]
    ['transpose', 'drop']
    """
    rules = rules or _DEFAULT_RULES
    plans: list[KeyPlan] = []
    not_2d: list[str] = []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        skip = rules.skip_pattern(name)
        if skip is not None:
            plans.append(KeyPlan(name, None, "skip", f"skip rule {skip!r}", shape))
            continue
        if _DROPPED.search(name):
            plans.append(
                KeyPlan(name, None, "drop", "BatchNorm counter, no Paddle counterpart", shape)
            )
            continue
        paddle = rules.paddle_name(name)
        forced = rules.transpose_pattern(name)
        kept = rules.no_transpose_pattern(name)
        if kept is not None:
            action, why = "copy", _rule_why("no-transpose", kept, name)
        elif forced is not None:
            action, why = "transpose", _rule_why("transpose", forced, name)
            if len(shape) != 2:
                not_2d.append(f"{name} {list(shape)}")
        elif linear_weights is not None and name in linear_weights:
            action, why = "transpose", "nn.Linear weight"
        elif linear_weights is None and guess_linear_weight(name, shape):
            action, why = "transpose", "heuristic: 2-D weight outside conv/embedding"
        else:
            action, why = "copy", "same layout"
        plans.append(KeyPlan(name, paddle, action, why, shape))
    if not_2d:
        raise ReprodError(f"transpose rules match tensors that are not 2-D: {', '.join(not_2d)}")
    seen: dict[str, str] = {}
    clashes = []
    for p in plans:
        if p.paddle_name is None:
            continue
        if p.paddle_name in seen:
            clashes.append(f"{seen[p.paddle_name]} and {p.torch_name} -> {p.paddle_name}")
        else:
            seen[p.paddle_name] = p.torch_name
    if clashes:
        raise ReprodError(f"rename rules map several keys to one Paddle name: {'; '.join(clashes)}")
    return tuple(plans)


# --- pairing by definition order -----------------------------------------------------------------

# torch BatchNorm statistics and Paddle's names for them: a statistic pairs only with a statistic
# of the same kind, so a shifted pairing among same-shaped BN tensors is caught, not loaded.
_TORCH_STAT = (
    (re.compile(r"(^|\.)running_mean$"), "mean"),
    (re.compile(r"(^|\.)running_var$"), "var"),
)
_PADDLE_STAT = ((re.compile(r"(^|\.)_mean$"), "mean"), (re.compile(r"(^|\.)_variance$"), "var"))


def _stat_kind(name: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> Optional[str]:
    for pat, kind in table:
        if pat.search(name):
            return kind
    return None


def _torch_shapes(obj: Any) -> tuple[dict[str, tuple[int, ...]], Optional[set[str]], str]:
    """(name -> shape in state-dict order, Linear weight names or None, a label for messages)."""
    if _is_torch_module(obj):
        sd: Mapping[str, Any] = obj.state_dict()
        linear: Optional[set[str]] = linear_weight_names(obj)
        label = f"torch {type(obj).__name__}"
    elif isinstance(obj, (str, os.PathLike)):
        label = os.fspath(obj)
        sd, linear = read_torch_state_dict(label), None
    elif isinstance(obj, Mapping):
        sd, linear, label = obj, None, "torch state dict"
    else:
        raise ReprodError(
            f"cannot pair a {type(obj).__name__}: expected a torch model, state dict or .pth path"
        )
    return {k: tuple(int(s) for s in np.shape(v)) for k, v in sd.items()}, linear, label


def _paddle_shapes(obj: Any) -> tuple[dict[str, tuple[int, ...]], str]:
    if isinstance(obj, (str, os.PathLike)):
        label = os.fspath(obj)
        sd: Mapping[str, Any] = read_pdparams(label)
    elif isinstance(obj, Mapping):
        sd, label = obj, "paddle state dict"
    elif hasattr(obj, "state_dict"):
        sd, label = obj.state_dict(), f"paddle {type(obj).__name__}"
    else:
        raise ReprodError(
            f"cannot pair a {type(obj).__name__}: expected a Paddle model, state dict or "
            ".pdparams path"
        )
    # paddle tensors report their shape as a list; numpy's np.shape would copy them
    return {
        k: tuple(int(s) for s in getattr(v, "shape", np.shape(v))) for k, v in sd.items()
    }, label


@dataclass(frozen=True)
class _OrderPlan:
    """Positional pairs ``(torch key, paddle key, transpose)`` for every position both sides have,
    and the problems found: ``(torch key or None, text)``, one per position; ``wrong_kind`` holds
    the torch keys paired with a tensor of another kind (a BatchNorm statistic with a weight)."""

    pairs: tuple[tuple[str, str, bool], ...]
    problems: tuple[tuple[Optional[str], str], ...]
    header: str
    wrong_kind: frozenset[str] = frozenset()

    def raise_problems(self) -> None:
        if self.problems:
            listed = "; ".join(text for _, text in self.problems)
            raise KeyMismatchError(f"pairing by order failed: {self.header}: {listed}")


def _order_plan(torch_side: Any, paddle_side: Any, rules: Optional[ConversionRules]) -> _OrderPlan:
    rules = rules or _DEFAULT_RULES
    tshapes, linear, tlabel = _torch_shapes(torch_side)
    pshapes, plabel = _paddle_shapes(paddle_side)
    torch_keys = [k for k in tshapes if not _DROPPED.search(k) and rules.skip_pattern(k) is None]
    paddle_keys = list(pshapes)
    pairs: list[tuple[str, str, bool]] = []
    problems: list[tuple[Optional[str], str]] = []
    wrong_kind: set[str] = set()
    for i, (tk, pk) in enumerate(zip(torch_keys, paddle_keys)):
        ts, ps = tshapes[tk], pshapes[pk]
        if ts == ps and len(ts) == 2 and ts[0] == ts[1]:
            # a square weight's layout cannot be read from shapes: ask the model, else the heuristic
            transpose = tk in linear if linear is not None else guess_linear_weight(tk, ts)
        elif ts == ps:
            transpose = False
        elif len(ts) == 2 and ts[::-1] == ps:
            transpose = True
        else:
            problems.append((tk, f"#{i} {tk} {list(ts)} vs {pk} {list(ps)}"))
            pairs.append((tk, pk, False))
            continue
        if _stat_kind(tk, _TORCH_STAT) != _stat_kind(pk, _PADDLE_STAT):
            wrong_kind.add(tk)
            problems.append(
                (tk, f"#{i} {tk} vs {pk}: a BatchNorm statistic paired with another kind of tensor")
            )
        pairs.append((tk, pk, transpose))
    n = len(pairs)
    problems += [
        (k, f"#{n + j} {k} {list(tshapes[k])} vs nothing") for j, k in enumerate(torch_keys[n:])
    ]
    problems += [
        (None, f"#{n + j} nothing vs {k} {list(pshapes[k])}") for j, k in enumerate(paddle_keys[n:])
    ]
    header = f"{tlabel} ({len(torch_keys)} tensors) vs {plabel} ({len(paddle_keys)} tensors)"
    return _OrderPlan(tuple(pairs), tuple(problems), header, frozenset(wrong_kind))


def pair_by_order(
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None
) -> dict[str, str]:
    """Pair torch keys with Paddle keys by definition order, for ports whose names no rule maps
    (``features.0`` against ``stem.conv``). Both frameworks list parameters in definition order,
    BatchNorm statistics included (``running_mean``/``running_var`` against ``_mean``/``_variance``),
    so the n-th tensor on one side is the n-th on the other when the port defines its layers in the
    same order.

    Each pair is checked: the shapes must be equal, or a 2-D weight the transpose (a Linear); a
    BatchNorm statistic pairs only with a statistic of the same kind. ``num_batches_tracked`` and
    keys that ``rules`` skip are left out. Any disagreement raises one ``KeyMismatchError`` listing
    every position with both names and shapes.

    ``torch_side``: a torch model, state dict or ``.pth`` path; ``paddle_side``: a Paddle model,
    state dict or ``.pdparams`` path. Returns torch key -> Paddle key, in order.

    >>> pair_by_order(torch_model, paddle_model)
    {'features.0.weight': 'stem.conv.weight', ..., 'classifier.weight': 'head.weight', ...}
    >>> load_into_paddle(paddle_model, torch_model, by_order=True)   # pair, convert and load
    """
    plan = _order_plan(torch_side, paddle_side, rules)
    plan.raise_problems()
    return {tk: pk for tk, pk, _ in plan.pairs}


def _rules_from_order(plan: _OrderPlan, base: Optional[ConversionRules]) -> ConversionRules:
    return ConversionRules.from_pairs(
        {tk: pk for tk, pk, _ in plan.pairs},
        transpose=[tk for tk, _, t in plan.pairs if t],
        no_transpose=[tk for tk, _, t in plan.pairs if not t],
        base=base,
    )


def by_order_rules(
    torch_side: Any, paddle_side: Any, *, rules: Optional[ConversionRules] = None
) -> ConversionRules:
    """``pair_by_order``'s pairs as ``ConversionRules``, with each 2-D tensor's transpose decided by
    the two shapes (a square one by the torch model's ``nn.Linear`` layers, or the name heuristic).
    ``rules`` (skips, extra transposes) are kept. Raises like ``pair_by_order``.

    >>> rules = by_order_rules(torch_model, paddle_model)
    >>> paddle_model.set_state_dict(torch_to_paddle(torch_model, rules=rules))
    """
    plan = _order_plan(torch_side, paddle_side, rules)
    plan.raise_problems()
    return _rules_from_order(plan, rules)


# --- reading and writing files -------------------------------------------------------------------


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _torch_load_detail(exc: BaseException, head: bytes) -> str:
    text = str(exc)
    for pat in (r"Unsupported global: GLOBAL (\S+)", r"unsupported GLOBAL (\S+)"):
        m = re.search(pat, text)
        if m:
            g = m.group(1)
            hint = (
                " (a whole pickled model? save model.state_dict() instead)"
                if g.startswith("torch.nn.")
                else ""
            )
            return f"it refers to {g}, which is not tensor data{hint}"
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return "it is not a file torch.save wrote (neither a zip archive nor a pickle)"
    if re.search(r"Unsupported operand \d+", text) or not head.startswith(b"PK"):
        return "it is not a file torch.save wrote (a Paddle .pdparams or another pickle?)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
    """The mapping of tensors inside what ``torch.load`` returned, unwrapping training checkpoints."""
    if not isinstance(obj, Mapping):
        raise DumpFormatError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
        )

    def is_tensor_map(m: Any) -> bool:
        return (
            isinstance(m, Mapping)
            and len(m) > 0
            and all(
                type(v).__module__.startswith("torch") and hasattr(v, "detach") for v in m.values()
            )
        )

    if is_tensor_map(obj):
        return obj
    for key in _WRAPPER_KEYS:
        if is_tensor_map(obj.get(key)):
            return obj[key]
    bad = [
        f"{k} ({type(v).__name__})"
        for k, v in obj.items()
        if not (type(v).__module__.startswith("torch") and hasattr(v, "detach"))
    ][:5]
    raise DumpFormatError(
        f"{path}: not a state dict of tensors; non-tensor entries: {', '.join(bad) or 'none (empty)'}"
        f" and no {'/'.join(_WRAPPER_KEYS)} entry holding one"
    )


def read_torch_state_dict(path: PathLike) -> dict[str, Any]:
    """Read a PyTorch state dict with ``torch.load(weights_only=True)`` (nothing in the file runs).

    A training checkpoint that wraps the state dict (``{"state_dict": ..., "epoch": 3}``, also
    ``model_state_dict``/``model``/``net``/``module``) is unwrapped. Returns name -> torch tensor.

    >>> sd = read_torch_state_dict("resnet50.pth")
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DumpFormatError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, KeyError, RuntimeError, EOFError...
        with open(path, "rb") as f:
            head = f.read(4)
        raise DumpFormatError(
            f"{path}: cannot be read by torch.load(weights_only=True): {_torch_load_detail(exc, head)}"
        ) from None
    return dict(_state_dict_of(obj, path))


def read_pdparams(path: PathLike) -> dict[str, np.ndarray]:
    """Read a Paddle ``.pdparams`` (a pickle of name -> numpy array) without running the pickle.

    Only numpy array, dtype and scalar globals, ``_codecs.encode`` and ``collections.OrderedDict`` are
    accepted; anything else raises ``UnsafeDumpError`` before it can run. Paddle's bookkeeping
    entries (``StructuredToParameterName@@``) are dropped and tensors that ``paddle.save`` sliced
    (``UnpackBigParamInfor@@``, protocols 2 and 3) are joined again.

    >>> weights = read_pdparams("model.pdparams")
    """
    from ..storage.lazy import Dump, MappedFile
    from ..storage.legacy import restricted_unpickle, tree_from_pickle

    path = os.fspath(path)
    mf = MappedFile(path)
    try:
        buf = mf.buffer()
        if mf.size < 2 or buf[0] != 0x80:
            hint = " (it looks like a zip: a torch.save file?)" if bytes(buf[:2]) == b"PK" else ""
            raise DumpFormatError(f"{path}: not a .pdparams file (no pickle header){hint}")
        root = restricted_unpickle(buf, 0, mf.size, path)
        if not isinstance(root, dict):
            raise DumpFormatError(f"{path}: holds a {type(root).__name__}, not a dict of arrays")
        unpack = root.get("UnpackBigParamInfor@@")
        tensors = {
            k: v
            for k, v in root.items()
            if not (isinstance(k, str) and k.endswith(_PADDLE_META_SUFFIX))
        }
        out = Dump(tree_from_pickle(tensors, mf), mf, path=path, fmt="pdparams").to_dict()
    finally:
        mf.close()
    for k, v in out.items():
        if isinstance(v, dict):
            raise DumpFormatError(f"{path}: key {k!r} holds a nested dict, not an array")
    if isinstance(unpack, dict):
        out = _join_slices(out, unpack, path)
    return out


def _join_slices(
    out: dict[str, np.ndarray], unpack: dict[str, Any], path: str
) -> dict[str, np.ndarray]:
    for key, info in unpack.items():
        try:
            parts = [out.pop(name) for name in info["slices"]]
            out[key] = np.concatenate([p.reshape(-1) for p in parts]).reshape(
                tuple(info["OriginShape"])
            )
        except (KeyError, TypeError, ValueError):
            raise DumpFormatError(
                f"{path}: key {key!r}: corrupt big-tensor slicing information"
            ) from None
    return out


def write_pdparams(path: PathLike, weights: Mapping[str, Any]) -> str:
    """Write name -> array as a ``.pdparams`` that ``paddle.load`` reads (pickle protocol 4 of a dict
    of numpy arrays), atomically: a temporary file renamed into place, so a failure never leaves a
    truncated file or damages an existing one. Returns the path written.

    >>> write_pdparams("model.pdparams", torch_to_paddle("model.pth"))
    'model.pdparams'
    """
    from ..storage._atomic import AtomicFile

    path = os.fspath(path)
    arrays = {
        str(k): np.ascontiguousarray(to_numpy(v, key=str(k)).array) for k, v in weights.items()
    }
    with AtomicFile(path) as af:
        pickle.dump(arrays, af.file, protocol=4)
    return path


# --- conversion ----------------------------------------------------------------------------------


def _is_torch_module(obj: Any) -> bool:
    return (
        hasattr(obj, "state_dict")
        and hasattr(obj, "named_modules")
        and type(obj).__module__.split(".")[0] != "paddle"
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
        parts.append(f"missing {len(missing)} key(s): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected)}")
    if wrong:
        parts.append(f"wrong shape: {'; '.join(wrong)}")
    if dtypes:
        parts.append(f"wrong dtype: {'; '.join(dtypes)}")
    if parts:
        raise KeyMismatchError(f"{source}: does not fit {target}: {' | '.join(parts)}")


def convert(
    state_dict_or_path: Any,
    *,
    model: Any = None,
    rules: Optional[ConversionRules] = None,
    by_order: bool = False,
    paddle_model: Any = None,
) -> Conversion:
    """Convert a PyTorch state dict (a mapping, a file, or a torch model) into a Paddle one, and say
    what was done to every key.

    With ``model`` (the torch ``nn.Module``), Linear weights are found by ``isinstance`` and the
    state dict must fit the model (every key, every shape); without it ``guess_linear_weight``
    decides and ``HeuristicLinearWarning`` is issued.

    ``by_order=True`` names each key after the Paddle key at the same position of ``paddle_model``
    (a Paddle model, state dict or ``.pdparams`` path), see ``pair_by_order``; Linear weights are
    then recognised by shape. ``rules`` still skip keys.

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
        if _suffix(source) in PADDLE_SUFFIXES:
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
    if by_order:
        if paddle_model is None:
            raise ReprodError(f"{source}: by_order needs paddle_model= to take the order from")
        rules = by_order_rules(model if model is not None else sd, paddle_model, rules=rules)
    elif paddle_model is not None:
        raise ReprodError(f"{source}: paddle_model= is only used with by_order=True")
    plan = plan_conversion(
        {k: tuple(np.shape(v)) for k, v in sd.items()}, linear_weights=linear, rules=rules
    )
    weights: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for p in plan:
        if p.paddle_name is None:
            continue
        conv = to_numpy(sd[p.torch_name], key=p.torch_name)
        arr = conv.array
        if p.action == "transpose":
            arr = np.ascontiguousarray(arr.T)
        weights[p.paddle_name] = arr
        if conv.source_dtype is not None:
            dtypes[p.paddle_name] = conv.source_dtype
    how = "order" if by_order else "model" if linear is not None else "heuristic"
    result = Conversion(weights, plan, how, dtypes)
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


def load_weights_as_dump(
    path: PathLike,
    *,
    rules: Optional[ConversionRules] = None,
    model: Any = None,
) -> dict[str, np.ndarray]:
    """Either kind of weight file as Paddle-named, Paddle-layout arrays, so that a ``.pth`` and a
    ``.pdparams`` can be compared key by key. ``rules`` and ``model`` apply to PyTorch files only
    (they describe the torch -> Paddle mapping); a ``.pdparams`` is read as it is.

    >>> reprod.compare(load_weights_as_dump("m.pth"), load_weights_as_dump("m.pdparams"))
    """
    path = os.fspath(path)
    suffix = _suffix(path)
    if suffix in PADDLE_SUFFIXES:
        return read_pdparams(path)
    if suffix in TORCH_SUFFIXES:
        return convert(path, model=model, rules=rules).weights
    raise DumpFormatError(
        f"{path}: unknown weight file suffix {suffix or '(none)'!r}; expected one of "
        f"{', '.join(TORCH_SUFFIXES + PADDLE_SUFFIXES)}"
    )


def _paddle_dtype_name(t: Any) -> str:
    return str(t.dtype).replace("paddle.", "")


def check_fits(
    paddle_model: Any, weights: Mapping[str, Any], *, source: str = "converted weights"
) -> None:
    """Raise one ``KeyMismatchError`` listing every key that keeps ``weights`` from loading into
    ``paddle_model``: missing, unexpected, wrong shape (with a hint when it is the transpose), wrong
    dtype. Paddle's own ``set_state_dict`` only warns about missing keys.

    >>> check_fits(paddle_model, torch_to_paddle("model.pth", model=torch_model))
    """
    expected = paddle_model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong, dtypes = [], []
    for k, v in weights.items():
        if k not in expected:
            continue
        want = tuple(expected[k].shape)
        got = tuple(np.shape(v))
        if got != want:
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
) -> None:
    """Load weights into a Paddle model after checking that every key fits (see ``check_fits``).

    ``weights`` is a Paddle-named mapping, a ``.pdparams`` or ``.pth`` path, a torch state dict or a
    torch model (converted with ``model``/``rules`` first). ``by_order=True`` pairs torch keys with
    ``paddle_model``'s keys by definition order (see ``pair_by_order``) instead of by name.

    >>> load_into_paddle(paddle_model, torch_model)          # copy a torch model's weights
    >>> load_into_paddle(paddle_model, torch_model, by_order=True)   # names differ, order agrees
    >>> load_into_paddle(paddle_model, "model.pdparams")
    """
    source = "converted weights"
    target = paddle_model if by_order else None
    if isinstance(weights, (str, os.PathLike)) and by_order:
        source = os.fspath(weights)
        if _suffix(source) in PADDLE_SUFFIXES:
            raise ReprodError(f"{source}: by_order converts PyTorch files, not a .pdparams")
        arrays: Mapping[str, Any] = convert(
            source, model=model, rules=rules, by_order=by_order, paddle_model=target
        ).weights
    elif isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights)
        arrays = load_weights_as_dump(source, rules=rules, model=model)
    elif _is_torch_module(weights):
        source = f"weights of {type(weights).__name__}"
        arrays = convert(
            weights, model=model, rules=rules, by_order=by_order, paddle_model=target
        ).weights
    elif isinstance(weights, Mapping) and any(
        type(v).__module__.startswith("torch") for v in weights.values()
    ):
        arrays = convert(
            weights, model=model, rules=rules, by_order=by_order, paddle_model=target
        ).weights
    elif by_order:
        raise ReprodError("by_order needs PyTorch weights (a torch model, state dict or .pth)")
    elif isinstance(weights, Mapping):
        arrays = weights
    else:
        raise ReprodError(f"cannot load a {type(weights).__name__} into a Paddle model")
    check_fits(paddle_model, arrays, source=source)
    paddle_model.set_state_dict(dict(arrays))
