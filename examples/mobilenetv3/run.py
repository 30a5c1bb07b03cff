"""MobileNetV3-Small, PyTorch -> Paddle: the whole alignment procedure, one command.

    python examples/mobilenetv3/run.py [--out result] [--inject-bug hardswish] [--steps 3]

1. structure   parameters of both models, names and shapes side by side
2. weights     seeded random torch weights -> model.pth -> model.pdparams -> the Paddle model
3. forward     logits on a fixed synthetic batch (fake_data.npy)
4. loss        cross entropy on fake labels (fake_label.npy)
5. backward    the gradient of every parameter
6. training    a few SGD-with-momentum steps under a cosine schedule, step by step
7. layers      every layer's output, both forwards: where the two models first part

Everything runs in float32. Backward and training are calibrated: the torch side runs them a
second time on a float64 copy of its model, and each key is judged as a multiple of the torch
dump's own distance from that float64 run (its rounding noise), not by an absolute threshold.

The torch side (``torch_side.py``) and the Paddle side (``paddle_side.py``) run in processes of
their own, as in a real migration; this driver imports neither framework. It compares their dumps
with ``reprod.ReprodDiffHelper`` (``reprod.compare(..., noise=)`` for the calibrated steps), writes
each step's log in reprod_log's format, the tables and an HTML report under ``--out``, prints a
summary and exits 0 when every step passes, 1 when one fails, 2 when a side crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# A checkout runs without installing reprod: use the one beside the example
if (REPO / "reprod" / "__init__.py").is_file() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config import (  # noqa: E402
    BATCH,
    BN_MOMENTUM_TORCH,
    BUGS,
    IMAGE_SIZE,
    NOISE_FACTOR,
    NUM_CLASSES,
    SEED,
)

import reprod  # noqa: E402
from reprod import ReprodDiffHelper  # noqa: E402
from reprod.align import compare_settings, noise_multiples  # noqa: E402
from reprod.diff.result import DiffResult  # noqa: E402
from reprod.messages import fmt_multiple, fmt_num  # noqa: E402
from reprod.report.log import emit_log_lines, render_log  # noqa: E402
from reprod.report.table import render_table  # noqa: E402


@dataclass(frozen=True)
class Check:
    """One comparison of a torch dump with a paddle dump, judged as reprod_log judges it."""

    name: str  # dumps <name>_torch.npy and <name>_paddle.npy, log log/<name>_diff.log
    title: str
    what: str
    method: str
    threshold: float
    # judged against <name>_torch64.npy, the torch side's float64 run: each key passes within
    # NOISE_FACTOR times the torch dump's own noise; method/threshold then judge the float64 runs
    # of both sides when that fails (noise_or_bug)
    calibrated: bool = False


def checks(steps: int) -> list[Check]:
    # Paddle updates BatchNorm's running variance with the biased batch variance, torch with the
    # unbiased one: each step they drift apart by about momentum / (n - 1) relatively (times the
    # batch's variance over the running one), n the values per channel, fewest at the 7x7 maps.
    n_min = BATCH * (IMAGE_SIZE // 32) ** 2
    drift = steps * BN_MOMENTUM_TORCH / (n_min - 1)
    return [
        Check("weights", "2. weights", "converted weights, bit for bit", "max", 0.0),
        Check("forward", "3. forward", "logits, eval mode, float32", "mean", 1e-5),
        # the loss is near 7, where float32 values are 5e-7 apart
        Check("loss", "4. loss", "loss, training mode, float32", "mean", 1e-5),
        Check("backward", "5. backward", "every gradient, float32", "mean", 1e-6, True),
        Check(
            "train", "6. training", "loss, lr, grads, weights per step, float32", "mean", 1e-6, True
        ),
        Check(
            "bn_variance",
            "6. BN variance",
            f"running variance, known drift ~{fmt_num(drift)}",
            "max_rel",
            10 * drift,
        ),
        # deep activations reach 10 and float32 drift grows layer by layer (measured up to 7e-6
        # mean); every injected bug is above 1e-3 at its layer
        Check("layers", "7. layers", "each layer's input and output, float32", "mean", 1e-4),
    ]


@dataclass(frozen=True)
class Outcome:
    title: str
    what: str
    passed: bool
    keys: int
    criterion: str
    detail: str
    file: str
    largest: str = "-"  # the worst value of the judged statistic (a noise multiple: "3.1x")
    # calibrated steps: the worst noise multiple per training step (or of the whole step)
    noise: Optional[dict[str, Any]] = None
    # a calibrated step that failed in float32: the float64 runs' comparison (noise_or_bug)
    float64: Optional[dict[str, Any]] = None
    result: Optional[DiffResult] = None


def say(text: str = "") -> None:
    print(text, flush=True)


def shown(path: Path | str) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def make_data(out: Path) -> None:
    rng = np.random.RandomState(SEED)
    data = rng.standard_normal((BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).astype("float32")
    np.save(out / "fake_data.npy", data)
    np.save(out / "fake_label.npy", rng.randint(0, NUM_CLASSES, (BATCH,)).astype("int64"))


def run_side(script: str, out: Path, *extra: str) -> int:
    """Run one side's script in a fresh interpreter; its output goes straight to the console."""
    env = dict(os.environ)
    if (REPO / "reprod" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(HERE / script), "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, check=False).returncode


def structure_outcome(out: Path) -> Outcome:
    facts = json.loads((out / "tables" / "structure.json").read_text(encoding="utf-8"))
    return Outcome(
        "1. structure",
        "parameter names and shapes",
        facts["ok"],
        facts["tensors"],
        "same shapes",
        facts["summary"],
        "tables/structure.txt",
    )


def optimizer_differ(out: Path) -> list[str] | None:
    """The optimizers' hyperparameters that differ, from what each side's training saved
    (``save_settings(..., optimizer=)``); None before the port's side has run."""
    ours, theirs = out / "optimizer_torch.json", out / "optimizer_paddle.json"
    if not (ours.is_file() and theirs.is_file()):
        return None
    report = compare_settings(str(ours), str(theirs))
    return [d.line() for d in report.differ if d.kind == "optimizer"]


def settings_outcome(out: Path, optimizer: list[str] | None = None) -> Outcome:
    facts = json.loads((out / "tables" / "structure.json").read_text(encoding="utf-8"))["settings"]
    agree = f"the settings of {facts['layers']} paired layers, {facts['calls']} paired calls"
    agree += " and the optimizers agree" if optimizer is not None else " agree"
    return Outcome(
        "1. settings",
        "settings: layers, calls, optimizer",
        facts["passed"] and not optimizer,
        facts["layers"],
        "same settings",
        "; ".join(facts["differ"] + (optimizer or []))
        or "; ".join([agree] + [f"not paired: {u}" for u in facts["unpaired"]]),
        "tables/settings.txt",
    )


def compare_step(check: Check, out: Path, suffix: str = "") -> Outcome:
    """The reprod_log procedure, through reprod: load both dumps, compare, write the log.
    ``suffix="64"``: the float64 dumps ``<name>_torch64.npy`` and ``<name>_paddle64.npy``."""
    if check.calibrated and not suffix:
        return compare_calibrated(check, out)
    helper = ReprodDiffHelper()
    torch_info = helper.load_info(str(out / f"{check.name}_torch{suffix}.npy"))
    paddle_info = helper.load_info(str(out / f"{check.name}_paddle{suffix}.npy"))
    helper.compare_info(torch_info, paddle_info)
    log = out / "log" / f"{check.name}{suffix}_diff.log"
    # report() prints every line too; the log has them all, the console gets one line per step
    with contextlib.redirect_stdout(io.StringIO()):
        passed = helper.report(
            diff_method=check.method, diff_threshold=check.threshold, path=str(log)
        )
    result: DiffResult = helper.result
    table = out / "tables" / f"{check.name}{suffix}.txt"
    table.write_text(render_table(result) + "\n", encoding="utf-8")
    first = result.first_failure
    worst = max(result.results, key=lambda r: r.stat(check.method) or 0.0)
    value = fmt_num(worst.stat(check.method))
    if first is None:
        detail = f"largest {check.method} diff {value} ({worst.key})"
    else:
        detail = f"first failure {first.key}: {first.reason}"
    criterion = f"{'float64 ' if suffix else ''}{check.method} <= {fmt_num(check.threshold)}"
    file = str(log.relative_to(out))
    return Outcome(check.title, check.what, passed, len(result), criterion, detail, file, value,
                   result=result)


def noise_or_bug(check: Check, out: Path, float32: Outcome) -> Outcome:
    """A float32 gradient check failed: compare the float64 runs of both sides.

    ReLU and Hardswish have kinks where the derivative jumps. An activation that lands within
    rounding of a kink may fall on one side in torch and on the other in Paddle; that element's
    gradient then differs by the whole jump and the difference spreads to every earlier layer,
    far beyond rounding noise, although both frameworks are right. In float64 that becomes
    vanishingly unlikely, while a bug stays: when the float64 runs agree, the float32 failure was
    rounding and the step passes; when they do not, it was a bug and the step fails.
    """
    f64 = compare_step(check, out, "64")
    worst = max(float32.noise.values(), key=lambda w: w["multiple"]) if float32.noise else None
    where = "" if worst is None else f"{fmt_multiple(worst['multiple'])} at {worst['key']}"
    check64 = {"passed": f64.passed, "criterion": f64.criterion, "largest": f64.largest,
               "detail": f64.detail, "file": f64.file}
    if not f64.passed:  # a bug: the float32 verdict stands, with the float64 one beside it
        detail = f"{float32.detail}; float64 fails too ({check.method} diff up to {f64.largest})"
        return dataclasses.replace(float32, detail=detail, float64=check64)
    detail = f"float32 {where}: rounding across a kink, not a bug: in float64, {f64.detail}"
    return dataclasses.replace(float32, passed=True, detail=detail, criterion=f64.criterion,
                               largest=f64.largest, file=f64.file, float64=check64)


def compare_calibrated(check: Check, out: Path) -> Outcome:
    """The torch dump, the Paddle dump and the torch float64 dump: every key judged as a multiple
    of the torch dump's own distance from float64 (``reprod.compare(..., noise=...)``)."""
    result = reprod.compare(
        out / f"{check.name}_torch.npy",
        out / f"{check.name}_paddle.npy",
        noise=out / f"{check.name}_torch64.npy",
        noise_factor=NOISE_FACTOR,
        method=check.method,
        threshold=check.threshold,
    )
    log = out / "log" / f"{check.name}_diff.log"
    emit_log_lines(render_log(result), str(log), console=False)
    (out / "tables" / f"{check.name}.txt").write_text(render_table(result) + "\n", encoding="utf-8")
    factor = result.options["noise_factor"]
    # the worst multiple of each training step (step_1, ...), or of the whole step
    noise = noise_multiples(result, default_group=check.name)
    worst = max(noise.values(), key=lambda w: w["multiple"], default=None)
    largest = "-" if worst is None else fmt_multiple(worst["multiple"])
    first = result.first_failure
    if first is not None:
        detail = f"first failure {first.key}: {first.reason}"
    elif worst is None:
        detail = "no key calibrated"
    else:
        detail = f"largest noise multiple {largest} ({worst['key']})"
    criterion = f"noise <= {fmt_multiple(factor)}"
    file = str(log.relative_to(out))
    return Outcome(check.title, check.what, result.passed, len(result), criterion, detail, file,
                   largest, noise=noise, result=result)


def noise_line(outcome: Outcome) -> Optional[str]:
    """``worst noise multiple per step: step_1 2.1x, step_2 3.4x`` for a step with several."""
    if not outcome.noise or len(outcome.noise) < 2:
        return None
    steps = ", ".join(f"{k} {fmt_multiple(w['multiple'])}" for k, w in outcome.noise.items())
    return f"worst noise multiple per step: {steps}"


def layer_window(table: str, result: DiffResult, layer: str, around: int = 4) -> str:
    """The per-layer table's header and its rows from a few keys before ``layer`` to a few after."""
    lines = table.splitlines()
    keys = result.keys()
    at = next((i for i, k in enumerate(keys) if k.startswith(layer + ".")), 0)
    lo, hi = max(0, at - around), min(len(keys), at + around + 1)
    rows = lines[2 + lo : 2 + hi]  # two header lines, then one line per key
    return "\n".join(
        lines[:2] + (["    ..."] if lo else []) + rows + (["    ..."] if hi < len(keys) else [])
    )


def localise(out: Path, layers: Outcome) -> Any:
    """The first layer whose output differs (``reprod.capture.first_divergence``), or None."""
    from reprod.capture import first_divergence

    # the port's layer classes, written by paddle_side.py: this process imports no framework
    types = json.loads((out / "layers_paddle_types.json").read_text(encoding="utf-8"))
    return first_divergence(layers.result, layer_types=types)


def write_html_report(outcomes: list[Outcome], out: Path, findings: Sequence[str] = ()) -> str:
    """Every step's keys in one page, each key prefixed with its step (``forward/logits``)."""
    from reprod.report.html import write_html

    rows = []
    for o in outcomes:
        if o.result is None:
            continue
        step = o.title.split(" ", 1)[1].replace(" ", "_")
        for r in o.result.results:
            path = (step, *(r.path or (r.key,)))
            rows.append(dataclasses.replace(r, key=f"{step}/{r.key}", path=path))
    result = DiffResult(tuple(rows), ref_name="torch", other_name="paddle")
    return write_html(result, out / "report.html", title="MobileNetV3-Small: PyTorch vs Paddle",
                      findings=findings)


def summary_table(outcomes: list[Outcome]) -> str:
    from tabulate import tabulate

    rows = [
        [o.title, o.what, o.keys, o.criterion, o.largest, "passed" if o.passed else "FAILED",
         o.file]
        for o in outcomes
    ]
    headers = ["step", "compared", "keys", "check", "largest", "verdict", "details in"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="MobileNetV3-Small, PyTorch -> Paddle: the whole alignment procedure."
    )
    parser.add_argument("--out", default="result", help="output folder (default: ./result)")
    parser.add_argument(
        "--inject-bug",
        choices=sorted(BUGS),
        default=None,
        help="break one layer of the port on purpose, to see a failure and its localisation",
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps (default: 3)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    out = Path(args.out).resolve()
    (out / "tables").mkdir(parents=True, exist_ok=True)
    bug = args.inject_bug
    bug_args = ["--inject-bug", bug] if bug else []
    start = time.perf_counter()

    say(f"MobileNetV3-Small, PyTorch -> Paddle; results in {shown(out)}")
    if bug:
        say(f"injected bug '{bug}' in {BUGS[bug][0]}: {BUGS[bug][1]}")
    make_data(out)
    shape = f"{BATCH}x3x{IMAGE_SIZE}x{IMAGE_SIZE}"
    say(f"fake_data.npy {shape}, fake_label.npy {BATCH} labels, seed {SEED}")

    say("[torch]   torch_side.py: seeded weights, the reference dumps")
    if run_side("torch_side.py", out, "--steps", str(args.steps)):
        say("the torch side failed (see above)")
        return 2
    say("[align]   align_weights.py: structure and settings checks, model.pth -> model.pdparams")
    rc = run_side("align_weights.py", out, *bug_args)
    if rc not in (0, 1):
        say("the structure check or the weight conversion failed (see above)")
        return 2
    outcomes = [structure_outcome(out), settings_outcome(out)]
    divergence = None
    if outcomes[0].passed:
        say("[paddle]  paddle_side.py: the port's dumps")
        if run_side("paddle_side.py", out, "--steps", str(args.steps), *bug_args):
            say("the paddle side failed (see above)")
            return 2
        say("[compare] reprod, each step against the torch reference")
        # the optimizers each side's training built, saved there, join the settings
        outcomes[1] = settings_outcome(out, optimizer_differ(out))
        verdict = "passed" if outcomes[1].passed else "FAILED"
        say(f"  {outcomes[1].title:<15} {verdict:<7} {outcomes[1].detail}")
        have64 = False
        for check in checks(args.steps):
            outcome = compare_step(check, out)
            if check.calibrated and not outcome.passed:
                if not have64:
                    say("  [paddle]  paddle_side.py --float64: a float32 gradient check failed; "
                        "noise or bug?")
                    if run_side("paddle_side.py", out, "--steps", str(args.steps), "--float64",
                                *bug_args):
                        say("the paddle side failed (see above)")
                        return 2
                    have64 = True
                outcome = noise_or_bug(check, out, outcome)
            outcomes.append(outcome)
            verdict = "passed" if outcome.passed else "FAILED"
            say(f"  {check.title:<15} {verdict:<7} {outcome.detail}")
            per_step = noise_line(outcome)
            if per_step:
                say(f"  {'':<15} {'':<7} {per_step}")

        layers = outcomes[-1]
        divergence = localise(out, layers)
        if divergence is None:
            say(f"\nper-layer check: all {layers.keys} layer inputs and outputs agree")
        else:
            table = (out / "tables" / "layers.txt").read_text(encoding="utf-8")
            say("\nper-layer errors around the first divergent layer (tables/layers.txt):")
            say(layer_window(table, layers.result, divergence.layer))
    else:
        say("the structures differ (tables/structure.txt); fix the port before comparing numbers")

    # the divergence sentence the console prints heads the page too
    report = write_html_report(outcomes, out, [divergence.message] if divergence is not None else [])
    passed = all(o.passed for o in outcomes)
    seconds = time.perf_counter() - start
    table = summary_table(outcomes)
    (out / "summary.txt").write_text(table + "\n", encoding="utf-8")
    summary = {
        "passed": passed,
        "inject_bug": bug,
        "bug_layer": BUGS[bug][0] if bug else None,
        "first_divergent_layer": None if divergence is None else divergence.layer,
        "localisation": None if divergence is None else divergence.message,
        "steps": [
            {k: v for k, v in dataclasses.asdict(o).items() if k != "result"} for o in outcomes
        ],
        "report": os.path.relpath(report, out),
        "seconds": round(seconds, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    say("\n" + table)
    if divergence is not None:
        say(f"\nfirst divergence: {divergence.message}")
        if bug:
            found = divergence.layer == BUGS[bug][0]
            verdict = "found there" if found else f"NOT found (reported {divergence.layer})"
            say(f"the injected bug '{bug}' is in {BUGS[bug][0]}: {verdict}")
    say(f"HTML report: {shown(report)}")
    say(f"\n{'ALIGNED' if passed else 'NOT ALIGNED'} ({seconds:.0f} s)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
