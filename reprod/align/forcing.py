"""Later training steps judged on their own: each side's step s run again from the reference's
state after step s - 1 (its weights, BatchNorm statistics and optimizer state), so that a
difference an earlier step explained (a kink crossing, an Adam update of a gradient element
within noise of 0, Paddle's float32 Adam bias corrections) does not decide the verdict of the
steps after it. Within a step, an updated weight is explained where the reference's optimizer,
given the port's own (aligned) gradient, makes the port's update (``replay_kinks``).

Free-running, a port that crosses a kink at step 0 differs at every later step by far more than
noise, and ``explain_kinks`` can only put all of that down to the crossing: a wrong momentum or
Adam beta from step 1 on then passes with it (measured on torchvision's shufflenet and
mobilenet_v3_small against paddle.vision's). Forced, step s of both sides starts from the same
state, and the float64 twin's step s from that state too, so step s is judged against one step's
noise.

Optimizer state is carried from torch to Paddle for SGD (momentum buffer -> velocity) and
Adam/AdamW (moments; Paddle's beta powers from the step count and the port's own betas); other
optimizers, AMSGrad and ``stats=False`` leave the later steps as the free run judged them, and
``result.options["forcing"]`` says why.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional

import numpy as np

from ..logger import ReprodLogger
from .fusion import fuse, part_names
from .rules import KeyPlan, copy_into, packed_slices, torch_views, unaliased, with_aliases

# torch optimizer state -> the Paddle accumulator holding the same quantity
_STATE_TO_ACC = {"momentum_buffer": "velocity", "exp_avg": "moment1", "exp_avg_sq": "moment2"}
_BETA_POWS = ("beta1_pow_acc", "beta2_pow_acc")


# the accumulators recorded after each step as ``step<i>/opt/<name>.<accumulator>``
STATE_RECORDS = ("velocity", "moment1", "moment2")


def torch_state_records(torch_opt: Any, torch_model: Any, plan: Mapping[str, KeyPlan]
                        ) -> Iterator[tuple[str, Any, KeyPlan]]:
    """(``<Paddle name>.<accumulator>``, value, plan) of each parameter's momentum buffer and
    Adam moments in the torch optimizer's state, under the Paddle accumulator's name; the
    moments weighted as Paddle's float32 ``1 - beta`` weighs each gradient into them
    (``_paddle_weight``: 1.3e-5 apart for beta2 = 0.999, far over a moment's noise)."""
    names = {id(p): n for n, p in torch_model.named_parameters()}
    slices = packed_slices(torch_model.state_dict())
    for group in torch_opt.param_groups:
        betas = group.get("betas")
        for p in group["params"]:
            state = torch_opt.state.get(p)
            if not state:
                continue
            for key, acc in _STATE_TO_ACC.items():
                whole = state.get(key)
                if whole is None or not hasattr(whole, "detach"):
                    continue
                # a packed attention tensor's state, as Paddle's three parameters keep it
                for name, value in torch_views([(names.get(id(p), ""), whole)], slices):
                    kp = plan.get(name)
                    if kp is None or kp.paddle_name is None:
                        continue
                    if key in _MOMENT_BETA and betas is not None:
                        beta = float(betas[0] if _MOMENT_BETA[key] == "beta1" else betas[1])
                        value = value.detach() * _paddle_weight(beta)
                    yield f"{kp.paddle_name}.{acc}", value, kp


def paddle_state_records(paddle_opt: Any, paddle_model: Any) -> Iterator[tuple[str, Any]]:
    """(``<name>.<accumulator>``, value) of each parameter's velocity and Adam moments in the
    Paddle optimizer's accumulators (``STATE_RECORDS``)."""
    accs = paddle_accumulators(paddle_opt)
    if not accs:
        return
    for name, p in paddle_model.named_parameters():
        for acc in STATE_RECORDS:
            value = accs.get(acc, {}).get(p.name)
            if value is not None:
                yield f"{name}.{acc}", value


class Unsupported(Exception):
    """Forcing cannot mirror this run (its message says why)."""


def _torch_params_by_index(torch_opt: Any) -> list[Any]:
    """The parameters in the order ``state_dict()["state"]`` numbers them."""
    return [p for g in torch_opt.param_groups for p in g["params"]]


def paddle_accumulators(paddle_opt: Any) -> dict[str, dict[str, Any]]:
    return getattr(paddle_opt, "_accumulators", None) or {}


def _beta(paddle_opt: Any, name: str) -> float:
    value = getattr(paddle_opt, f"_{name}", None)
    if value is None:
        raise Unsupported(f"the Paddle optimizer {type(paddle_opt).__name__} has no {name}")
    return float(np.asarray(value.numpy() if hasattr(value, "numpy") else value).reshape(-1)[0])


# Adam's moments and the beta whose 1 - beta weighs each gradient into them
_MOMENT_BETA = {"exp_avg": "beta1", "exp_avg_sq": "beta2"}


def _paddle_weight(beta: float) -> float:
    """How much Paddle's ``1 - beta``, made in float32, is off the exact one: Paddle's moments
    are all that factor off torch's (1 - 0.999 is 1.3e-5 low in float32), and its bias
    correction cancels it; torch's moments loaded as they are would move its update by half
    that (measured: 40x Adam's float32 noise on a step that is otherwise exact)."""
    return float(np.float32(1.0) - np.float32(beta)) / (1.0 - beta)


def _beta_pow(beta: float, steps: int) -> np.float32:
    """Paddle's power of ``beta`` before update ``steps + 1``, as it makes it: ``beta`` in
    float32 multiplied by itself once an update, in float32. ``1 - beta2^t`` cancels: the float64
    power rounded once is another float32 (0.999^2: one unit apart), and the update moves by
    1e-5 relatively (measured, Adam lr 0.05)."""
    b = np.float32(beta)
    p = b
    for _ in range(steps):
        p = np.float32(p * b)
    return p


def load_paddle_optimizer(paddle_opt: Any, torch_state: Mapping[str, Any], torch_opt: Any,
                          torch_model: Any, paddle_model: Any,
                          plan: Mapping[str, KeyPlan], fusions: Sequence[Any] = ()) -> None:
    """Set the Paddle optimizer's accumulators to the torch optimizer state ``torch_state`` (a
    ``state_dict()``), parameter by parameter through ``plan`` (Linear weights transposed); a
    parameter one of ``fusions`` names (``reprod.align.fusion``) into its columns of the fused
    one's. Raises ``Unsupported`` where a quantity has no counterpart on the other side: a
    Paddle accumulator left as it was would carry the port's own history into the step."""
    accs = paddle_accumulators(paddle_opt)
    unknown = set(accs) - set(_STATE_TO_ACC.values()) - set(_BETA_POWS)
    if unknown:
        raise Unsupported(f"the Paddle optimizer's state {sorted(unknown)} has no torch "
                          "counterpart reprod maps")
    torch_name = {id(p): n for n, p in torch_model.named_parameters()}
    paddle_params = dict(paddle_model.named_parameters())
    states = torch_state.get("state", {})
    by_index = _torch_params_by_index(torch_opt)
    covered: set[tuple[str, str]] = set()
    slices = packed_slices(torch_model.state_dict())
    part_of = {part: (f.port_key, cols) for f in fusions
               for part, cols in zip(f.parts, f.columns())}
    for index, whole_state in states.items():
        p = by_index[int(index)]
        name = torch_name.get(id(p), "")
        # a packed attention tensor's state, sliced as Paddle's three parameters keep it
        for vname, index in list(slices.get(name, ())) or [(name, None)]:
            state = whole_state if index is None else {
                k: v[index] if hasattr(v, "dim") and v.dim() > 0 else v
                for k, v in whole_state.items()}
            _load_one(paddle_opt, accs, plan.get(vname), paddle_params, state, covered,
                      part_of)
    for acc_name, per_param in accs.items():
        for pname in per_param:
            if (acc_name, pname) not in covered:
                raise Unsupported(f"the Paddle optimizer's {acc_name!r} of {pname} has no "
                                  "counterpart in the torch optimizer's state")


def _load_one(paddle_opt: Any, accs: Mapping[str, Any], kp: Optional[KeyPlan],
              paddle_params: Mapping[str, Any], state: Mapping[str, Any],
              covered: set[tuple[str, str]],
              part_of: Optional[Mapping[str, tuple[str, Any]]] = None) -> None:
    """One torch parameter's optimizer ``state`` into the accumulators of its Paddle one; a
    part of a fused one (``part_of``: part -> (fused parameter, its columns)) into its
    columns."""
    if kp is None or kp.paddle_name is None:
        return
    target, cols = (part_of or {}).get(kp.paddle_name, (kp.paddle_name, None))
    if target not in paddle_params:
        return
    pname = paddle_params[target].name
    for key, value in state.items():
        if key == "step":
            for pow_name, beta in zip(_BETA_POWS, ("beta1", "beta2")):
                acc = accs.get(pow_name, {}).get(pname)
                if acc is not None:
                    t = int(float(np.asarray(value.cpu() if hasattr(value, "cpu") else value)))
                    acc.set_value(np.full(acc.shape, _beta_pow(_beta(paddle_opt, beta), t),
                                          dtype=np.float32))
                    covered.add((pow_name, pname))
            continue
        acc_name = _STATE_TO_ACC.get(key)
        if acc_name is None:
            raise Unsupported(f"the torch optimizer's state {key!r} has no Paddle "
                              "counterpart reprod maps")
        if value is None:
            continue
        acc = accs.get(acc_name, {}).get(pname)
        if acc is None:
            raise Unsupported(f"the torch optimizer keeps {key!r} and the Paddle optimizer "
                              f"{type(paddle_opt).__name__} no {acc_name!r}")
        arr = value.detach().cpu().numpy()
        if kp.action == "transpose":
            arr = arr.T
        if key in _MOMENT_BETA:
            arr = arr * _paddle_weight(_beta(paddle_opt, _MOMENT_BETA[key]))
        if cols is not None:  # the other parts' columns as earlier parts set them
            whole = np.array(acc.numpy())
            whole[..., cols] = arr
            arr = whole
        acc.set_value(np.ascontiguousarray(arr, dtype=np.dtype(str(acc.numpy().dtype))))
        covered.add((acc_name, pname))


@contextlib.contextmanager
def paddle_lr(paddle_opt: Any, lr: float) -> Iterator[None]:
    """The Paddle optimizer's learning rate set to ``lr`` for the block (its scheduler's, where
    it has one), restored after."""
    import paddle

    sched = paddle_opt._learning_rate
    if isinstance(sched, paddle.optimizer.lr.LRScheduler):
        saved = sched.last_lr
        sched.last_lr = lr
        try:
            yield
        finally:
            sched.last_lr = saved
    else:
        saved_lr = paddle_opt.get_lr()
        paddle_opt.set_lr(lr)
        try:
            yield
        finally:
            paddle_opt.set_lr(saved_lr)


@dataclasses.dataclass
class Saved:
    """The state forcing overwrites, put back afterwards: both models', the torch optimizer's and
    the Paddle optimizer's accumulators."""

    torch_model: dict[str, Any]
    torch_opt: dict[str, Any]
    paddle_model: dict[str, Any]
    paddle_accs: dict[tuple[str, str], np.ndarray]

    @classmethod
    def take(cls, torch_model: Any, torch_opt: Any, paddle_model: Any, paddle_opt: Any) -> Saved:
        return cls(copy.deepcopy(torch_model.state_dict()), copy.deepcopy(torch_opt.state_dict()),
                   {k: v.detach().clone() for k, v in paddle_model.state_dict().items()},
                   {(a, p): np.array(t.numpy()) for a, d in paddle_accumulators(paddle_opt).items()
                    for p, t in d.items()})

    def restore(self, torch_model: Any, torch_opt: Any, paddle_model: Any, paddle_opt: Any) -> None:
        torch_model.load_state_dict(self.torch_model)
        torch_opt.load_state_dict(self.torch_opt)
        paddle_model.set_state_dict(self.paddle_model)
        for (a, p), value in self.paddle_accs.items():
            paddle_accumulators(paddle_opt)[a][p].set_value(value)


def _recorded(step: int, data: Mapping[str, Any], name: str) -> np.ndarray:
    for kind in ("param", "stat"):
        value = data.get(f"step{step}/{kind}/{name}")
        if value is not None:
            return np.asarray(value)
    raise Unsupported(f"{name} after step {step} was not recorded (stats=False leaves BatchNorm "
                      "statistics out)")


def reference_state(step: int, data: Mapping[str, Any],
                    plan: Mapping[str, KeyPlan]) -> dict[str, np.ndarray]:
    """The weights and statistics one side recorded after ``step`` (``data``: its dump, Paddle
    names and layout), under the torch model's own names and in its own layout (a Linear weight
    transposed back). Raises ``Unsupported`` where a value was not recorded (``stats=False``)."""
    out = {}
    for tname, kp in plan.items():
        if kp.paddle_name is None:
            continue
        value = _recorded(step, data, kp.paddle_name)
        out[tname] = np.ascontiguousarray(value.T) if kp.action == "transpose" else value
    return out


def load_reference_state(step: int, torch_data: Mapping[str, Any], torch_model: Any,
                         paddle_model: Any, plan: Mapping[str, KeyPlan],
                         fusions: Sequence[Any] = ()) -> None:
    """Both models set to the weights and statistics the reference recorded after ``step``
    (Paddle names and layout in the dump; the torch model's own layout restored; a fused
    tensor of the port made of its parts). Raises ``Unsupported`` where a value was not
    recorded (``stats=False``)."""

    # a packed attention tensor also under its slices' names
    copy_into(torch_model.state_dict(), reference_state(step, torch_data, plan))
    paddle_model.set_state_dict(with_aliases(paddle_model, fuse({
        name: _recorded(step, torch_data, name)
        for name in part_names(unaliased(paddle_model.state_dict())[0], fusions)}, fusions)))


def renamed(result: Any, step: int) -> Any:
    """A one-step result's ``step0/`` keys as ``step<step>/``."""
    out = []
    for kr in result.results:
        key = f"step{step}/" + kr.key.split("/", 1)[1] if kr.key.startswith("step0/") else kr.key
        path = tuple(key if p == kr.key else p for p in kr.path)
        out.append(dataclasses.replace(kr, key=key, path=path))
    return dataclasses.replace(result, results=tuple(out))


def _step_of(key: str) -> Optional[int]:
    head = key.split("/", 1)[0]
    return int(head[4:]) if head.startswith("step") and head[4:].isdigit() else None


def steps_to_force(result: Any, normalised: bool = False) -> list[int]:
    """The steps after the first with a difference put down to an explanation (status
    ``"kink"``, or ``"known"`` gradients, weights or optimizer state: the port's own rounding,
    Paddle's Adam) that hold a key not passing plainly:
    their free-running verdict rests on it. With ``normalised`` (an optimizer that normalises
    each element's update: Adam), also the first failing step and those after it where that
    step fails only in updated weights and optimizer state whose own gradients align: Adam
    turns an element's gradient at its float32 noise into an update of up to the learning rate
    (an input channel a ReLU silenced in step 0, a gradient of 1e-8 in step 1), which the
    forced step's replay tells from a wrong beta or epsilon."""
    failing = {s for kr in result if kr.status not in ("passed", "known")
               and (s := _step_of(kr.key)) is not None}
    explained = [s for kr in result if (kr.status == "kink" or (
        kr.status == "known" and _carried(kr.key))) and (s := _step_of(kr.key)) is not None]
    starts = [min(explained) + 1] if explained else []
    first_failed = min((s for kr in result if kr.status in ("failed", "mismatch")
                        and (s := _step_of(kr.key)) is not None), default=None)
    # step 0 starts from the same state on both sides: nothing to judge it again from
    if normalised and first_failed and _update_only(result, first_failed):
        starts.append(first_failed)
    if not starts:
        return []
    return sorted(s for s in failing if s >= min(starts))


def _carried(key: str) -> bool:
    """Whether a key's difference is carried into the next step's state: a gradient, an updated
    weight, an optimizer state (not a loss, a logit, or a BatchNorm statistic: Paddle's biased
    running variance differs at every step, and training's forward pass does not read it)."""
    return any(f"/{kind}/" in key for kind in ("grad", "param", "opt"))


def _update_only(result: Any, step: int) -> bool:
    """Whether every key of ``step`` not passing plainly is an updated weight or optimizer
    state (``step<i>/param/<name>``, ``step<i>/opt/<name>.<state>``) whose own gradient key
    passes."""
    statuses = {kr.key: kr.status for kr in result}
    head = f"step{step}/"
    for kr in result:
        if not kr.key.startswith(head) or kr.status in ("passed", "known"):
            continue
        kind, _, name = kr.key[len(head):].partition("/")
        if kind == "opt":
            name = name.rpartition(".")[0]
        if kind not in ("param", "opt") or statuses.get(f"{head}grad/{name}") != "passed":
            return False
    return True


def merged(result: Any, forced: Mapping[int, Any]) -> Any:
    """The free run's result with each forced step's verdicts: a key that fails forced fails
    (its forced statistics, the reason saying so); a key whose free verdict rested on an earlier
    explanation (or failed) and that passes forced passes as ``"kink"``, saying so, unless it
    failed after a step with a failing key: that difference it carries, and it still fails."""
    by_key = {kr.key: kr for f in forced.values() for kr in f.results}
    # the first step with a key nothing explains: a later key whose difference it carries
    # passes forced and still fails (a port's bug of that step, not an explanation)
    broken = min((s for kr in result.results
                  if not kr.passed and (s := _step_of(kr.key)) is not None
                  and (s not in forced or not getattr(by_key.get(kr.key), "passed", False))),
                 default=None)
    out = []
    for kr in result.results:
        step = _step_of(kr.key)
        f = by_key.get(kr.key) if step in forced else None
        if f is None:
            out.append(kr)
            continue
        where = f"from the reference's state after step {step - 1}"
        if not f.passed:
            note = f"free-running: {kr.reason}"
            out.append(dataclasses.replace(
                f, reason=f"{where} (weights, statistics, optimizer state): {f.reason}",
                note=f"{f.note}; {note}" if f.note else note))
        elif kr.status in ("passed", "known"):
            out.append(kr)
        elif not kr.passed and broken is not None and broken < step:
            out.append(dataclasses.replace(
                kr, reason=f"{kr.reason}; {where} the step aligns: its difference is step "
                           f"{broken}'s, carried ({f.reason})"))
        else:
            # the free reason first: it names the earlier difference (the crossing)
            out.append(dataclasses.replace(
                kr, passed=True, status="known" if f.status == "known" else "kink",
                reason=f"{kr.reason}; {where} the step aligns ({f.reason})"))
    options = dict(result.options)
    options["forcing"] = {"steps": sorted(forced),
                          "failed": sum(not f.passed for f in forced.values())}
    return dataclasses.replace(result, results=tuple(out), options=options)


def run_forced(step: int, *, batches: Sequence[Any], torch_model: Any, paddle_model: Any,
               torch_opt: Any, paddle_opt: Any, torch_opt_state: Mapping[str, Any],
               torch_data: Mapping[str, Any], paddle_lr_value: float,
               plan: Mapping[str, KeyPlan], run_torch: Callable[..., None],
               run_twin: Optional[Callable[..., Any]], run_paddle: Callable[..., None],
               finish: Callable[..., Any], fusions: Sequence[Any] = (),
               keep: Optional[dict[int, Any]] = None) -> Any:
    """Step ``step`` of each side from the reference's state after the step before; the result
    under ``step<step>/`` keys. ``run_*`` run one step on a batch into a logger (``run_twin``
    builds the float64 twin from the torch model and optimizer as they are then, and returns
    its logger); ``finish`` compares (torch log, paddle log, noise log or None, initial).
    ``keep`` receives {step: (the result under ``step0/`` keys, the torch log's data, the
    Paddle log's)}: what localisation sets the two updates of that step against."""
    batch = batches[step % len(batches)]
    load_reference_state(step - 1, torch_data, torch_model, paddle_model, plan, fusions)
    torch_opt.load_state_dict(copy.deepcopy(dict(torch_opt_state)))
    load_paddle_optimizer(paddle_opt, torch_opt_state, torch_opt, torch_model, paddle_model, plan,
                          fusions)
    stats = {f"step0/stat/{k.split('/stat/', 1)[1]}": np.array(v)
             for k, v in torch_data.items() if k.startswith(f"step{step - 1}/stat/")}
    noise_log = run_twin(batch) if run_twin is not None else None
    torch_log, paddle_log = ReprodLogger(), ReprodLogger()
    run_torch(batch, torch_log)
    with paddle_lr(paddle_opt, paddle_lr_value):
        run_paddle(batch, paddle_log, torch_log.data)  # the reference's names for its outputs
    found = finish(torch_log, paddle_log, noise_log, (stats, dict(stats)))
    if keep is not None:
        keep[step] = (found, torch_log.data, paddle_log.data)
    return renamed(found, step)


# --- Paddle's Adam: bias corrections in float32 ------------------------------------------------

ADAM_HINT = ("Paddle's Adam computes its bias corrections (1 - beta^t) in float32, torch in "
             "float64: its update is R x torch's")


def _float32_rate(beta1: float, beta2: float, t: int) -> float:
    """R: Paddle's Adam update over torch's at update ``t`` (1-based) from the same moments, as
    Paddle's kernel makes it: the powers multiplied up in float32, ``1 - power`` in float32,
    and its moments weighted by its float32 ``1 - beta`` (``_paddle_weight``). Exactly 1 at the
    first update, -3.4e-6 off at the second with torch's default betas (measured: the port's
    step-1 update is off by that ratio to 3 digits)."""
    p1, p2 = _beta_pow(beta1, t - 1), _beta_pow(beta2, t - 1)
    port = np.sqrt(float(np.float32(1.0) - p2)) / float(np.float32(1.0) - p1)
    ref = np.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    return float(port / ref * _paddle_weight(beta1) / np.sqrt(_paddle_weight(beta2)))


def adam_betas(paddle_opt: Any) -> Optional[tuple[float, float, int]]:
    """(beta1, beta2, updates already made) of a Paddle Adam/AdamW, else None."""
    import paddle

    if not isinstance(paddle_opt, (paddle.optimizer.Adam, paddle.optimizer.AdamW)):
        return None
    try:
        b1, b2 = _beta(paddle_opt, "beta1"), _beta(paddle_opt, "beta2")
    except Unsupported:
        return None
    pows = paddle_accumulators(paddle_opt).get("beta1_pow_acc") or {}
    made = 0
    if pows and 0.0 < b1 < 1.0:  # trained before: its power says how often
        p = float(np.asarray(next(iter(pows.values())).numpy()).reshape(-1)[0])
        made = max(0, round(np.log(p) / np.log(b1)) - 1)
    return b1, b2, made


def adam_known(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
               noise: Optional[Mapping[str, Any]], criteria: Any, betas: tuple[float, float, int],
               *, first: int = 0, before: Optional[Mapping[str, Any]] = None) -> Any:
    """Failing updated parameters that pass once the reference's updates are scaled as Paddle's
    Adam scales them (``_float32_rate``): status ``"known"``. Free-running (``first=0``), step
    s's difference is the sum of every update's so far; one step forced (``first`` its update
    count less one, ``before`` the weights both started from), that step's alone."""
    from ..diff.engine import compare

    b1, b2, made = betas
    out, changed = [], False
    for kr in result.results:
        step = _step_of(kr.key)
        if (kr.passed or kr.status not in ("failed", "mismatch") or step is None
                or "/param/" not in kr.key or kr.key not in ref or kr.key not in other):
            out.append(kr)
            continue
        name = kr.key.split("/param/", 1)[1]
        value = np.asarray(ref[kr.key], dtype=np.float64)
        shift = np.zeros_like(value)
        rates = []
        for k in range(step + 1):  # every update the key's value holds
            t = made + first + k + 1
            prev = (before or {}).get(name) if k == 0 else ref.get(f"step{k - 1}/param/{name}")
            r = _float32_rate(b1, b2, t)
            if prev is None:
                if r != 1.0:
                    break
                continue
            after = ref.get(f"step{k}/param/{name}") if k < step else ref[kr.key]
            if after is None:
                break
            shift += (r - 1.0) * (np.asarray(after, np.float64) - np.asarray(prev, np.float64))
            rates.append(r)
        else:
            corrected = (value + shift).astype(np.asarray(ref[kr.key]).dtype)
            check = compare({kr.key: corrected}, {kr.key: other[kr.key]}, criteria=criteria,
                            noise=None if noise is None or kr.key not in noise
                            else {kr.key: noise[kr.key]})
            (c,) = check.results
            if c.passed and rates:
                changed = True
                worst = max(rates, key=lambda x: abs(x - 1.0))
                kr = dataclasses.replace(
                    kr, passed=True, status="known",
                    reason=f"a known framework difference: {ADAM_HINT} (R - 1 = {worst - 1:.2g}"
                           f"); with torch's updates scaled so, it passes ({c.reason}); "
                           f"{kr.reason}")
        out.append(kr)
    return dataclasses.replace(result, results=tuple(out)) if changed else result


# --- the reference's optimizer given the port's gradient ---------------------------------------


def replayed(torch_opt: Any, torch_state: Mapping[str, Any], torch_model: Any,
             kp: KeyPlan, before: np.ndarray, grad: np.ndarray) -> Optional[np.ndarray]:
    """The weights the reference's optimizer makes of ``before`` and ``grad`` (Paddle layout)
    from its state ``torch_state`` (a ``state_dict()``): one step of a copy of it over that one
    parameter. None where the parameter is not the optimizer's."""
    made = replayed_state(torch_opt, torch_state, torch_model, kp, before, grad)
    return None if made is None else made[0]


def replayed_state(torch_opt: Any, torch_state: Mapping[str, Any], torch_model: Any,
                   kp: KeyPlan, before: np.ndarray, grad: np.ndarray
                   ) -> Optional[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``replayed``'s weights and the optimizer state that step leaves, under the Paddle
    accumulators' names (``velocity``, ``moment1``, ``moment2``; the moments weighted as
    ``torch_state_records`` weighs them), Paddle layout."""
    import torch

    from .calibration import _constructor_kwargs

    target = dict(torch_model.named_parameters()).get(kp.torch_name)
    rows = None  # the slice's index into its packed tensor
    if target is None:  # a slice of a packed attention tensor: element-wise, so that slice alone
        for src, parts in packed_slices(torch_model.state_dict()).items():
            for name, index in parts:
                if name == kp.torch_name:
                    target, rows = dict(torch_model.named_parameters()).get(src), index
    if target is None:
        return None
    index, group = None, None
    for i, p in enumerate(_torch_params_by_index(torch_opt)):
        if p is target:
            index = i
    if index is None:
        return None
    for g, saved in zip(torch_opt.param_groups, torch_state.get("param_groups", ())):
        if any(p is target for p in g["params"]):
            group = {k: v for k, v in saved.items() if k != "params"}
    if group is None:
        return None

    def torch_layout(a: np.ndarray) -> np.ndarray:
        # always a copy: the step below updates it in place through torch.from_numpy, and the
        # transpose of a view of the weights before training (a Linear's, Paddle layout) is
        # already contiguous, so ascontiguousarray handed back that memory and the replay
        # moved the copy localisation starts from, and the decay fit's weights
        return np.array(a.T if kp.action == "transpose" else a, order="C")

    p = torch.nn.Parameter(torch.from_numpy(torch_layout(before)).to(target.dtype))
    p.grad = torch.from_numpy(torch_layout(grad)).to(target.dtype)
    cls = type(torch_opt)
    opt = cls([{**group, "params": [p]}], **_constructor_kwargs(cls, torch_opt.defaults))
    state = torch_state.get("state", {}).get(index)
    if state:
        opt.state[p] = {k: (v[rows] if rows is not None and v.dim() > 0 else v).clone()
                        if hasattr(v, "clone") else copy.deepcopy(v) for k, v in state.items()}
    opt.step()

    def paddle_layout(t: Any) -> np.ndarray:
        a = t.detach().numpy()
        return np.ascontiguousarray(a.T) if kp.action == "transpose" else a

    accs = {}
    betas = group.get("betas")
    for key, value in opt.state[p].items():
        acc = _STATE_TO_ACC.get(key)
        if acc is None or not hasattr(value, "detach"):
            continue
        if key in _MOMENT_BETA and betas is not None:
            value = value.detach() * _paddle_weight(float(betas[0 if _MOMENT_BETA[key] == "beta1"
                                                                 else 1]))
        accs[acc] = paddle_layout(value)
    return paddle_layout(p), accs


def _replayed_key(key: str, step: int) -> Optional[tuple[str, Optional[str]]]:
    """(parameter name, accumulator or None) of ``step<step>/param/<name>`` and
    ``step<step>/opt/<name>.<accumulator>``; None for any other key."""
    head = f"step{step}/"
    if not key.startswith(head):
        return None
    kind, _, rest = key[len(head):].partition("/")
    if kind == "param":
        return rest, None
    if kind == "opt":
        name, _, acc = rest.rpartition(".")
        return (name, acc) if acc in STATE_RECORDS else None
    return None


def replay_kinks(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                 noise: Optional[Mapping[str, Any]], criteria: Any, step: int, *,
                 torch_opt: Any, torch_state: Mapping[str, Any], torch_model: Any,
                 plan: Mapping[str, KeyPlan], before: Mapping[str, Any],
                 adam: Optional[tuple[float, float, int]], updates: int,
                 clip: Any = None) -> Any:
    """Step ``step``'s failing updated weights and optimizer state (velocity, Adam moments),
    both sides started from ``before`` (Paddle names and layout), whose gradient key aligns and
    whose port value is what the reference's optimizer (state ``torch_state``) makes of the
    port's own gradient, within the key's noise (Paddle's Adam rate applied to the weights,
    ``updates`` the update count before this one). Adam's weights are relabelled ``"kink"``: an
    optimizer that normalises the gradient per element (Adam) turns the float32 noise of
    elements near 0, within the aligned gradient's noise, into steps apart by up to twice the
    learning rate. Other weights (SGD), and optimizer state, are relabelled ``"known"``: the
    aligned gradient's own rounding (Paddle's, which the reference's noise does not hold)
    carried into the update, a momentum buffer or a second moment (2|g| times it). A wrong
    beta, epsilon, momentum or weight decay makes another update of the same gradient, and
    fails. ``clip``: the reference's gradient clipping (``grad_clip.GradClip``), applied to the
    port's gradients of the step before they are replayed; nothing is replayed where it cannot
    be (a custom function)."""
    from ..diff.engine import compare

    by_paddle = {kp.paddle_name: kp for kp in plan.values() if kp.paddle_name}
    grads: Optional[Mapping[str, Any]] = None  # the port's gradients, as the reference clips them
    if clip is not None:
        head = f"step{step}/grad/"
        grads = clip.arrays({k[len(head):]: other[k] for k in other if k.startswith(head)})
        if grads is None:
            return result
    out, changed = [], False
    for kr in result.results:
        which = _replayed_key(kr.key, step)
        name, acc = which if which is not None else (None, None)
        gkey = f"step{step}/grad/{name}"
        if (name is None or kr.passed or kr.status not in ("failed", "mismatch")
                or name not in by_paddle or name not in before or gkey not in other
                or kr.key not in other or not result[gkey].passed):
            out.append(kr)
            continue
        w0 = np.asarray(before[name])
        step_made = replayed_state(torch_opt, torch_state, torch_model, by_paddle[name], w0,
                                   np.asarray(other[gkey] if grads is None else grads[name]))
        made = None
        if step_made is not None:
            made = step_made[0] if acc is None else step_made[1].get(acc)
        if made is None or made.shape != np.shape(other[kr.key]):
            out.append(kr)
            continue
        if adam is not None and acc is None:
            rate = _float32_rate(adam[0], adam[1], adam[2] + updates + 1)
            made = (w0 + rate * (made.astype(np.float64) - w0)).astype(made.dtype)
        hi = None if noise is None or kr.key not in noise else np.asarray(noise[kr.key])
        if hi is not None and not (acc is None and adam is not None) and kr.key in ref:
            # the key's own noise, not the replay's distance from the twin: that holds the
            # port's gradient rounding, as large as a small weight decay's share of the update
            own = np.asarray(ref[kr.key], np.float64) - hi
            hi = made.astype(np.float64) - own if own.shape == made.shape else None
        check = compare({kr.key: made}, {kr.key: other[kr.key]}, criteria=criteria,
                        noise=None if hi is None else {kr.key: hi})
        (c,) = check.results
        if not c.passed:
            out.append(kr)
            continue
        changed = True
        if acc is None and adam is not None:
            out.append(dataclasses.replace(
                kr, passed=True, status="kink",
                reason=f"the reference's optimizer makes this update of the port's own "
                       f"gradient ({gkey}, aligned) to within noise ({c.reason}): a per-element "
                       f"normalised update (Adam) turns the gradients' float32 noise near 0 into "
                       f"steps apart; {kr.reason}"))
        else:
            what = "update" if acc is None else acc
            out.append(dataclasses.replace(
                kr, passed=True, status="known",
                reason=f"a known framework difference: the reference's optimizer makes this "
                       f"{what} of the port's own gradient ({gkey}, aligned) to within noise "
                       f"({c.reason}): the gradient's float32 rounding, carried; {kr.reason}"))
    return dataclasses.replace(result, results=tuple(out)) if changed else result
