"""The learning-rate schedules, compared far past the steps a check trains.

``align_train`` compares each step's learning rate, but it trains a few steps of a schedule made
for thousands: a cosine's ``T_max`` of the epochs against the iterations, a warmup one step
longer, a step decay's milestones, a polynomial decay's end value all agree at step 3. Here each
side's scheduler is copied, detached from its optimizer (torch's writes the rate into a stand-in
holding a copy of the param groups, without the parameters; Paddle's holds no parameters), and
stepped on to a horizon of twice the longest period either schedule names (``T_max``,
``total_iters``, milestones, warmup and decay steps..., and the integers a schedule of a
function holds: at least 1,000 steps, at most 100,000),
and the two sequences are compared, from the rate both hold when training ends (the step after
the last one trained: each step's ``lr`` key compares only the steps trained). The first step
where they part fails, with both rates; where neither side has a scheduler, both rates are the
constants they were from step 0, so a difference is named there.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from .settings import SettingDiff

__all__ = ["compare_schedules", "first_parting", "schedule_record", "simulate_paddle",
           "simulate_torch"]

_PERIODS = ("T_max", "total_iters", "T_0", "step_size", "milestones", "warmup_steps",
            "decay_steps", "total_steps", "boundaries", "_step_size", "T_i")
MIN_HORIZON, MAX_HORIZON = 1_000, 100_000


class _Groups:
    """What a torch scheduler reads and writes of its optimizer: the param groups' values."""

    def __init__(self, groups: Sequence[dict[str, Any]]) -> None:
        self.param_groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                             for g in groups]
        self._opt_called = True  # torch warns at a scheduler's first step otherwise

    def step(self) -> None:  # pragma: no cover - never called: the wrapper schedulers check
        pass

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def _periods(sched: Any, seen: Optional[set[int]] = None) -> list[int]:
    """The integers a schedule names as its lengths, its inner schedules' included."""
    seen = set() if seen is None else seen
    if sched is None or id(sched) in seen:
        return []
    seen.add(id(sched))
    out: list[int] = []
    for name in _PERIODS:
        v = getattr(sched, name, None)
        values = list(v) if isinstance(v, (list, tuple, set)) or type(v).__name__ == "Counter" \
            else [v]
        out += [int(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)
                and math.isfinite(x) and x > 0]
    for inner in list(getattr(sched, "_schedulers", None) or ()) + [
            getattr(sched, "learning_rate", None)]:
        if inner is not None and hasattr(inner, "step"):
            out += _periods(inner, seen)
    # a schedule of a function (torch's LambdaLR, Paddle's LambdaDecay) names no length: Hugging
    # Face's linear warmup is a LambdaLR of a partial holding num_training_steps, PaddleNLP's
    # LinearDecayWithWarmup a LambdaDecay of a closure over total_steps, and schedules of
    # 100,000 steps against 50,000 were compared to step 1,000 only, and passed
    fns = list(getattr(sched, "lr_lambdas", None) or ()) + [getattr(sched, "lr_lambda", None)]
    for fn in fns:
        out += _held_integers(fn)
    return out


def _held_integers(fn: Any, depth: int = 0) -> list[int]:
    """The positive integers a schedule's function holds: a ``functools.partial``'s arguments,
    a closure's cells (and those of the functions they hold, two deep)."""
    if fn is None or depth > 2:
        return []
    values: list[Any] = []
    if isinstance(fn, functools.partial):
        values += list(fn.args) + list(fn.keywords.values())
        values.append(fn.func)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    out: list[int] = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out.append(v)
        elif callable(v) and not isinstance(v, type):
            out += _held_integers(v, depth + 1)
    return out


def horizon_of(torch_sched: Any, paddle_sched: Any) -> int:
    periods = _periods(torch_sched) + _periods(paddle_sched)
    return max(MIN_HORIZON, min(MAX_HORIZON, 2 * max(periods, default=0) + 10))


def simulate_torch(sched: Any, optimizer: Any, steps: int, *, current: bool = False
                   ) -> list[float]:
    """Param group 0's learning rate after each of ``steps`` more steps of a copy of ``sched``
    (the constant rate without one); with ``current``, the rate it holds now first. The
    scheduler and optimizer are left as they are."""
    if sched is None:
        return [float(optimizer.param_groups[0]["lr"])] * (steps + int(current))
    stand_in = _Groups(optimizer.param_groups)
    twin = copy.deepcopy(sched, {id(optimizer): stand_in})
    # the optimizer's rate, not the scheduler's last: what the next step trained would use
    out = [float(stand_in.param_groups[0]["lr"])] if current else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            twin.step()
            out.append(float(stand_in.param_groups[0]["lr"]))
    return out


def _paddle_scheduler(sched: Any, optimizer: Any) -> Any:
    if sched is not None:
        return sched
    lr = getattr(optimizer, "_learning_rate", None)
    return lr if hasattr(lr, "step") and hasattr(lr, "last_lr") else None


def simulate_paddle(sched: Any, optimizer: Any, steps: int, *, current: bool = False
                    ) -> list[float]:
    """The learning rate after each of ``steps`` more steps of a copy of the Paddle scheduler
    (``sched``, else the optimizer's own; the constant rate without one); with ``current``, the
    rate it holds now first."""
    sched = _paddle_scheduler(sched, optimizer)
    if sched is None:
        return [float(optimizer.get_lr())] * (steps + int(current))
    twin = copy.deepcopy(sched)
    out = [float(twin.last_lr)] if current else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            twin.step()
            out.append(float(twin.last_lr))
    return out


def compare_schedules(torch_sched: Any, torch_opt: Any, paddle_sched: Any, paddle_opt: Any,
                      *, done: int = 0, horizon: Optional[int] = None
                      ) -> tuple[list[SettingDiff], dict[str, Any]]:
    """The first step at which the two schedules' rates part (one ``SettingDiff``, setting
    ``lr_at_step_<k>``, k counted as ``align_train`` counts its steps, from 0), within the
    horizon; and what was simulated (``from_step``: the first step compared). ``done``: the
    steps both schedulers have taken; the rates compared start with those both hold now, step
    ``done``'s, or step 0's where neither side has a scheduler (a rate that never changed)."""
    p_sched = _paddle_scheduler(paddle_sched, paddle_opt)
    if type(torch_sched).__name__ == "ReduceLROnPlateau" or \
            type(p_sched).__name__ == "ReduceOnPlateau":
        return [], {"skipped": "a schedule on a metric (ReduceLROnPlateau) steps on what training "
                               "measures, not on the step"}
    h = horizon_of(torch_sched, p_sched) if horizon is None else int(horizon)
    try:
        ts = simulate_torch(torch_sched, torch_opt, h, current=True)
        ps = simulate_paddle(p_sched, paddle_opt, h, current=True)
    except Exception as e:  # a scheduler that cannot be copied or stepped alone: said
        return [], {"skipped": f"the schedules could not be stepped on alone "
                               f"({type(e).__name__}: {e})"}
    # the steps before ``done`` are no schedule's to name: each step's lr key compares them
    start = 0 if torch_sched is None and p_sched is None else int(done)
    info: dict[str, Any] = {"horizon": h, "from_step": start}
    found = first_parting(ts, ps, start=start)
    if found is None:
        return [], info
    info["part_at"] = int(found.setting.rpartition("_")[2])
    return [found], info


def first_parting(ours: Sequence[float], theirs: Sequence[float], *, done: int = 0,
                  sides: tuple[str, str] = ("torch", "Paddle"),
                  start: Optional[int] = None) -> Optional[SettingDiff]:
    """The first step at which two sequences of rates part by more than 1e-6 of them, as a
    ``SettingDiff``; None where they agree as far as both go. The first rates are step
    ``start``'s, else (each the rate after one more step) step ``done + 1``'s."""
    first = done + 1 if start is None else int(start)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12):
            k = first + i
            return SettingDiff("optimizer", "optimizer", f"lr_at_step_{k}", float(a), float(b),
                               "optimizer", sides)
    return None


def schedule_record(sched: Any, optimizer: Any, framework: str) -> Optional[dict[str, Any]]:
    """What ``save_settings(..., scheduler=)`` writes: the rates after each of the next steps,
    to a horizon from this schedule's own periods; None without a scheduler (a script that
    gives none says nothing of its schedule: a torch optimizer does not know its scheduler)."""
    if sched is None:
        return None
    h = horizon_of(sched, None)
    if framework == "torch":
        opt = optimizer if optimizer is not None else sched.optimizer
        return {"horizon": h, "lrs": simulate_torch(sched, opt, h)}
    return {"horizon": h, "lrs": simulate_paddle(sched, optimizer, h)}
