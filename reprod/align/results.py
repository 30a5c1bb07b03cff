"""What align_forward and align_train return and write: known-difference notes, the worst noise multiple per step, and the reprod_log-style diff log."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from typing import Any, Optional, Union

from ..logger import ReprodLogger

PathLike = Union[str, "os.PathLike[str]"]

# (glob over keys, explanation) offered as the note of a failing key: framework differences a
# porter meets, measured on torch 2.x / Paddle 3.x.
KNOWN_DIFFERENCES: tuple[tuple[str, str], ...] = (
    (
        "*/stat/*_variance",
        "in training Paddle updates the running variance with the biased batch "
        "variance, torch with the unbiased one (ratio n/(n-1) per update); the forward pass is not affected",
    ),
    ("*/stat/*_mean", "check BatchNorm momentum: Paddle's momentum is torch's 1 - momentum"),
    (
        "*/lr",
        "the learning rates differ: check that the Paddle scheduler mirrors the torch one "
        "(StepDecay/StepLR: same step_size and gamma) and that both are stepped once per step",
    ),
)



def _with_notes(result: Any) -> Any:
    """Offer known framework differences as the note of the failing keys they may explain."""
    results = []
    changed = False
    for r in result.results:
        if not r.passed:
            for pattern, why in KNOWN_DIFFERENCES:
                if fnmatch.fnmatchcase(r.key, pattern):
                    r = dataclasses.replace(r, note=f"{r.note}; {why}" if r.note else why)
                    changed = True
                    break
        results.append(r)
    return dataclasses.replace(result, results=tuple(results)) if changed else result


def _finish(
    torch_log: ReprodLogger,
    paddle_log: ReprodLogger,
    *,
    out_dir: Optional[PathLike],
    name: str,
    method: Any,
    threshold: float,
    atol: Optional[float],
    rtol: Optional[float],
    per_key: Any,
    verbose: bool,
    noise_log: Optional[ReprodLogger] = None,
    noise_factor: Optional[float] = None,
) -> Any:
    from ..diff.engine import compare

    calibrated: dict[str, Any] = {}
    if noise_log is not None:
        calibrated = {"noise": noise_log.data}
        if noise_factor is not None:
            calibrated["noise_factor"] = noise_factor
    result = _with_notes(
        compare(
            torch_log.data,
            paddle_log.data,
            method=method,
            threshold=threshold,
            atol=atol,
            rtol=rtol,
            per_key=per_key,
            **calibrated,
        )
    )
    if noise_log is not None:
        worst = noise_multiples(result, default_group=name)
        options = dict(result.options, noise="torch float64", noise_multiple=worst)
        result = dataclasses.replace(result, options=options)
    if out_dir is not None:
        out = os.fspath(out_dir)
        os.makedirs(out, exist_ok=True)
        torch_log.save(os.path.join(out, f"{name}_torch.npy"))
        paddle_log.save(os.path.join(out, f"{name}_paddle.npy"))
        if noise_log is not None:
            noise_log.save(os.path.join(out, f"{name}_torch64.npy"))
        _write_diff_log(result, os.path.join(out, f"{name}_diff.log"), verbose=verbose)
    if verbose and noise_log is not None:
        print(_noise_summary(result), flush=True)
    return result


_STEP = re.compile(r"step_?\d+")


def noise_multiples(result: Any, *, default_group: str = "all") -> dict[str, dict[str, Any]]:
    """The worst noise multiple of each step of a calibrated result: ``{"step0": {"multiple": 2.4,
    "key": "step0/grad/fc1.weight"}, ...}``. Keys are grouped by their first ``/`` segment when it
    is ``step<N>`` or ``step_<N>`` (``align_train``'s keys, reprod_log's training dumps), all
    others under ``default_group``; keys the noise reference did not calibrate are left out.
    ``align_forward``/``align_train`` with ``calibrate=True`` put this in
    ``result.options["noise_multiple"]``.
    """
    worst: dict[str, dict[str, Any]] = {}
    for r in result:
        if r.noise_multiple is None:
            continue
        head = r.key.split("/", 1)[0]
        group = head if _STEP.fullmatch(head) else default_group
        seen = worst.get(group)
        # NaN compares False: a NaN multiple (never produced by the engine) would not hide others
        if seen is None or r.noise_multiple > seen["multiple"]:
            worst[group] = {"multiple": float(r.noise_multiple), "key": r.key}
    return worst


def _noise_summary(result: Any) -> str:
    """One line: the worst noise multiple per step and the factor a key may reach."""
    from ..messages import fmt_multiple

    factor = result.options.get("noise_factor")
    parts = [
        f"{group} {fmt_multiple(w['multiple'])} ({w['key']})"
        for group, w in result.options.get("noise_multiple", {}).items()
    ]
    return (
        f"worst noise multiple (a key passes up to {fmt_multiple(factor)}): "
        + ("; ".join(parts) if parts else "no key calibrated")
    )


def _write_diff_log(result: Any, log_path: str, *, verbose: bool) -> None:
    """The reprod_log-style log the porting tutorials ask for, with ``ReprodDiffHelper``'s lines,
    rendered from the very result returned (so per-key thresholds and atol/rtol show in it too)."""
    from ..report.log import emit_log_lines, render_log

    lines = render_log(result)
    # The records would also reach the root logger, where importing paddle installs a stderr
    # handler: unless asked to be verbose, a training run's hundreds of keys go to the file only.
    emit_log_lines(lines, log_path, console=verbose, propagate=verbose)
