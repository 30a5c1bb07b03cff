"""What align_forward and align_train return and write: known-difference notes, the worst noise multiple per step, and the reprod_log-style diff log."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

from ..diagnose import MOMENTUM_HINT, VAR_BIAS_HINT, _prev_key, _stat_hint, _with_noise
from ..logger import ReprodLogger

PathLike = Union[str, "os.PathLike[str]"]

# (glob over keys, explanation): framework differences a porter meets, measured on torch 2.x /
# Paddle 3.x. The BatchNorm ones are offered only where the numbers fit (``reprod.diagnose``): a
# failing statistic whose previous step is recorded is checked, and gets the hint only when its
# magnitudes fit; one that cannot be checked (step 0) gets "possible: <hint> (not checked ...)".
KNOWN_DIFFERENCES: tuple[tuple[str, str], ...] = (
    ("*/stat/*_variance", VAR_BIAS_HINT),
    ("*/stat/*_mean", MOMENTUM_HINT),
    (
        "*/lr",
        "the learning rates differ: check that the Paddle scheduler mirrors the torch one "
        "(StepDecay/StepLR: same step_size and gamma) and that both are stepped once per step",
    ),
)
_STAT_PATTERNS = ("*/stat/*_variance", "*/stat/*_mean")

# Paddle's softmax cross entropy clips each sample's shifted logit (its logit less the sample's
# largest) at -64 before taking the log-sum-exp from it (its CPU and GPU kernels, Paddle 3.x); torch
# does not: a sample's loss is at most 64 + log(sum(exp(shifted logits))) on Paddle's side
# (measured: a 1,000-class sample whose label sits 100 below its largest logit loses 65.54 in
# Paddle, 101.54 in torch; 64.04 was a diverging mobilenet_v3_small's correct mean loss)
CE_CLIP = 64.0
CE_CLIP_HINT = (
    "Paddle's cross entropy clips each sample's shifted logit (the logit less the sample's "
    "largest) at -64, so a sample's loss is at most 64 + log(sum(exp(shifted logits))), and "
    "torch's does not: the reference's logits here reach below -64, so such samples count less "
    "on the port's side (the gradients are unaffected); outputs this large mean the model is "
    "diverging"
)


def _shifted(logits: Any) -> Any:
    import numpy as np

    a = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # inf logits (a diverged run): NaN, which fits no clip
        return a - a.max(axis=-1, keepdims=True)


def _loss_note(key: str, ref: Mapping[str, Any], other: Mapping[str, Any]) -> Optional[str]:
    """The cross-entropy clip, where the numbers fit: the port's loss is the lower one and the
    reference's logits of that step hold a shifted logit below -64."""
    import numpy as np

    step = key.rsplit("/", 1)[0]
    logits = ref.get(f"{step}/logits")
    if logits is None or key not in ref or key not in other:
        return None
    try:
        shifted = _shifted(logits)
        lo, lp = float(np.asarray(ref[key])), float(np.asarray(other[key]))
    except (TypeError, ValueError):
        return None
    if shifted.ndim < 1 or shifted.size == 0 or not lp < lo:
        return None
    return CE_CLIP_HINT if float(shifted.min()) < -CE_CLIP else None


_NOT_CHECKED = "not checked: the statistics before this step are not recorded"


def _with_notes(
    result: Any,
    ref: Optional[Mapping[str, Any]] = None,
    other: Optional[Mapping[str, Any]] = None,
    initial: Optional[tuple[Mapping[str, Any], Mapping[str, Any]]] = None,
) -> Any:
    """Offer known framework differences as the note of the failing keys they explain.

    BatchNorm statistics are checked by magnitude (``reprod.diagnose``) against the previous
    step's: the momentum swap, then the biased running variance. A layer's statistics checked at
    some step give their verdict to its other steps (step 0 has no previous statistics); where no
    step of the layer can be checked the hint is offered as "possible: ... (not checked)".
    Other known differences (the learning rate) are offered by key. ``initial``: each side's
    statistics before training, under their step-0 keys, which make step 0 checkable too.

    A running variance whose numbers fit Paddle's biased update at its own step passes with
    status ``"known"`` (the hint stays its note): no port can remove that difference; so does a
    loss the cross-entropy clip fits, the port's no more than the clip allows. The other
    notes leave the verdict as it is: a swapped momentum is the port's to fix.
    """
    ref = ref or {}
    other = other or {}
    verdicts = _stat_verdicts(result, ref, other, initial)
    results = []
    changed = False
    for r in result.results:
        if not r.passed:
            why = None
            for pattern, text in KNOWN_DIFFERENCES:
                if not fnmatch.fnmatchcase(r.key, pattern):
                    continue
                if pattern in _STAT_PATTERNS:
                    why = _stat_note(r.key, text, verdicts)
                else:
                    why = text
                break
            if why is None and fnmatch.fnmatchcase(r.key, "*/loss"):
                why = _loss_note(r.key, ref, other)
            if why:
                note = f"{r.note}; {why}" if r.note else why
                known = KNOWN_VAR_BIAS if _known(r.key, verdicts) else \
                    KNOWN_CE_CLIP if why == CE_CLIP_HINT and _clipped(r.key, ref, other) else None
                if r.status in ("failed", "mismatch") and known:
                    r = dataclasses.replace(r, passed=True, status="known", note=note,
                                            reason=f"{known}; {r.reason}")
                else:
                    r = dataclasses.replace(r, note=note)
                changed = True
        results.append(r)
    return dataclasses.replace(result, results=tuple(results)) if changed else result


# the reason of a running variance whose numbers fit Paddle's biased update at its own step: a
# framework difference no port can remove (the running variance is not used in training's
# forward pass), so it passes, status "known", and does not hide a real failure behind it
KNOWN_VAR_BIAS = ("a known framework difference: Paddle's BatchNorm updates the running variance "
                  "with the biased batch variance (its numbers fit it at this step)")


KNOWN_CE_CLIP = ("a known framework difference: Paddle's cross entropy clips each sample's "
                 "shifted logit at -64 (the reference's logits here reach below it)")


def _clipped(key: str, ref: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """The port's mean loss is no more than the clip allows: the mean over the samples of the
    reference's logits of 64 + log(sum(exp(shifted logits))) (a float32 unit over, for the
    port's own rounding)."""
    import numpy as np

    try:
        shifted = _shifted(ref[f"{key.rsplit('/', 1)[0]}/logits"])
        bound = CE_CLIP + float(np.log(np.exp(shifted).sum(axis=-1)).mean())
        return float(np.asarray(other[key])) <= bound * (1 + 2.0**-23)
    except (KeyError, TypeError, ValueError):
        return False


def _known(key: str, verdicts: Mapping[Any, Any]) -> bool:
    """A failing running variance fitted by the biased update at its own step (not only at
    another step of its layer, nor "possible")."""
    hint = verdicts.get(key)
    return (fnmatch.fnmatchcase(key, "*/stat/*_variance") and isinstance(hint, str)
            and hint.startswith(VAR_BIAS_HINT))


def _layer_of(key: str) -> tuple[str, str]:
    """``step3/stat/bn._variance`` -> (``bn.``, ``var``)."""
    tail = key.split("/stat/", 1)[1]
    if tail.endswith("_variance"):
        return tail[: -len("_variance")], "var"
    return tail[: -len("_mean")], "mean"


def _stat_verdicts(result: Any, ref: Mapping[str, Any], other: Mapping[str, Any],
                   initial: Optional[tuple[Mapping[str, Any], Mapping[str, Any]]] = None
                   ) -> dict[Any, Any]:
    """Each failing checkable statistic key (its previous step recorded on both sides) -> its hint or
    None; (layer, "var"|"mean") -> (hint, step) of the first checked step whose numbers fit, or
    None where steps were checked and none fit; absent where no step could be checked."""
    verdicts: dict[Any, Any] = {}
    for r in result.results:
        if r.passed or not any(fnmatch.fnmatchcase(r.key, p) for p in _STAT_PATTERNS):
            continue
        prev = _prev_key(r.key)
        if r.key not in ref or r.key not in other:
            continue
        ctx: dict[str, Any] = {}
        if prev is None and initial is not None and r.key in initial[0] and r.key in initial[1]:
            ctx = {"prev_ref": initial[0], "prev_other": initial[1]}  # step 0, from the start
        elif prev is None or prev not in ref or prev not in other:
            continue
        # the fit is judged against the variance's own rounding too
        hint = _stat_hint(r.key, ref, other, _with_noise(ctx, r, result))
        verdicts[r.key] = hint
        layer = _layer_of(r.key)
        if verdicts.get(layer) is None:
            verdicts[layer] = None if hint is None else (hint, r.key.split("/", 1)[0])
    return verdicts


def _stat_note(key: str, text: str, verdicts: dict[Any, Any]) -> Optional[str]:
    if key in verdicts:  # checked at its own step
        hint: Optional[str] = verdicts[key]
        return hint
    layer = _layer_of(key)
    if layer not in verdicts:
        return f"possible: {text} ({_NOT_CHECKED})"
    found = verdicts[layer]
    if found is None:
        return None
    return f"{found[0]} (checked at {found[1]})"


def _finish(
    torch_log: ReprodLogger,
    paddle_log: ReprodLogger,
    *,
    out_dir: Optional[PathLike],
    name: str,
    criteria: Any,
    verbose: bool,
    noise_log: Optional[ReprodLogger] = None,
    write_log: bool = True,
    kinks: Any = None,
    paddle_to_torch: Optional[Mapping[str, str]] = None,
    initial: Optional[tuple[Mapping[str, Any], Mapping[str, Any]]] = None,
    kink_line: bool = True,
    noise_precision: str = "float64",
) -> Any:
    """Compare, annotate and write the dumps (and, with ``write_log``, the diff log: a caller
    that adds findings first writes it itself), judged by ``criteria`` (a ``reprod.Criteria``,
``framework._criteria``). ``kinks``: the ``align.kinks.KinkCapture`` whose
    layer captures the loggers also hold (compared, used to explain kink crossings, then taken
    out of the result and the dumps); ``paddle_to_torch`` maps the gradients' parameter names.
    ``kink_line=False``: a caller that checks the kink labels further prints their line itself.
    ``noise_precision``: what the noise reference ran in (``"float32"`` for a reference in half
    precision), saved as ``<name>_torch64.npy`` or ``<name>_torch32.npy``."""
    from ..diff.engine import compare

    ref, other = torch_log.data, paddle_log.data
    noise = None if noise_log is None else noise_log.data
    if kinks is not None:  # the Paddle side's captures under the torch layer calls they pair with
        ref, other, noise = kinks.sides(ref, other, noise)
    result = _with_notes(compare(ref, other, criteria=criteria, noise=noise), ref, other, initial)
    if kinks is not None:
        result = kinks.explain(result, ref, other, noise, paddle_to_torch or {})
        del ref, other, noise  # the capture arrays go with the loggers' keys below
        for log, side in ((torch_log, "torch"), (paddle_log, "paddle"), (noise_log, "torch64")):
            kinks.strip(log, side)
    if noise_log is not None:
        worst = noise_multiples(result, default_group=name)
        options = dict(result.options, noise=f"torch {noise_precision}", noise_multiple=worst)
        result = dataclasses.replace(result, options=options)
    if out_dir is not None:
        out = os.fspath(out_dir)
        os.makedirs(out, exist_ok=True)
        torch_log.save(os.path.join(out, f"{name}_torch.npy"))
        paddle_log.save(os.path.join(out, f"{name}_paddle.npy"))
        if noise_log is not None:
            noise_log.save(os.path.join(out, f"{name}_torch{noise_precision[-2:]}.npy"))
        if write_log:
            _write_diff_log(result, os.path.join(out, f"{name}_diff.log"), verbose=verbose)
    if verbose and noise_log is not None:
        print(_noise_summary(result), flush=True)
    if verbose and kinks is not None and kink_line:
        print(_kink_summary(result), flush=True)
    return result


def _kink_summary(result: Any) -> str:
    """One line: how many keys kink crossings explain, and where they are."""
    info = result.options.get("kinks", {})
    if info.get("skipped"):
        return f"kink crossings not checked: {info['skipped']}"
    where = "; ".join(c["message"] for c in result.options.get("kink_crossings", [])
                      if c.get("explained"))
    head = f"kink crossings: {info.get('explained', 0)} keys explained"
    line = f"{head} ({where})" if where else head
    checks = result.options.get("counterfactual") or {}
    aligned = sum(c.get("aligned", 0) for c in checks.values())
    failed = sum(c.get("failed", 0) for c in checks.values())
    if aligned or failed:
        line += (f"; checked against the reference with the port's side of each crossing: "
                 f"{aligned} gradients align, {failed} do not")
    return line


def _rounding_summary(result: Any) -> list[str]:
    """Lines for ``verbose``: the keys put down to the port's own float32 rounding, and the
    parameters whose fitted weight decays differ."""
    lines = []
    checks = result.options.get("port_rounding") or {}
    known = sum(c.get("known", 0) for c in checks.values())
    skipped = sorted({c["skipped"] for c in checks.values() if c.get("skipped")})
    if known or skipped:
        line = (f"the port's own float32 rounding (run again in float64 from the same state): "
                f"{known} keys")
        lines.append(line + (f"; not checked: {'; '.join(skipped)}" if skipped else ""))
    fits = result.options.get("decay") or {}
    if fits:
        lines.append("weight decays differ (fitted from each side's updates): " + ", ".join(
            f"{name} {f['reference']:.3g} against {f['port']:.3g}" for name, f in fits.items()))
    return lines


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
    # after reprod_log's verdict line, so that tools reading the log as reprod_log's still can
    lines += [f"finding: {f}" for f in result.options.get("findings", ())]
    # The records would also reach the root logger, where importing paddle installs a stderr
    # handler: unless asked to be verbose, a training run's hundreds of keys go to the file only,
    # and verbose, they are printed once (not again by a root handler on the terminal).
    emit_log_lines(lines, log_path, console=verbose,
                   propagate=verbose and not _root_prints())


def _root_prints() -> bool:
    """Whether a handler of the root logger writes to the terminal (paddle installs one)."""
    import logging
    import sys

    terminal = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
                if s is not None}
    return any(isinstance(h, logging.StreamHandler) and id(getattr(h, "stream", None)) in terminal
               for h in logging.getLogger().handlers)
