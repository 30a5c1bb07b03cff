"""The MobileNetV3 example, run as a user runs it: ``python examples/mobilenetv3/run.py``.

Each scenario runs the entry point once in a subprocess (module-scoped fixtures); the tests then
check its exit code, its verdicts and its files, and check the numbers against independent
references: numpy recomputes the logged differences, reprod_log reads the dumps, torch and paddle
read the weight files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

import reprod

pytest.importorskip("torch")
pytest.importorskip("paddle")

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "mobilenetv3"
RUN = EXAMPLE / "run.py"

STEP_FILES = ["weights", "forward", "loss", "backward", "train", "bn_variance", "layers"]
STEP_TITLES = [
    "1. structure",
    "1. settings",
    "2. weights",
    "3. forward",
    "4. loss",
    "5. backward",
    "6. training",
    "6. BN variance",
    "7. layers",
]

# reprod_log's line shapes, after its "[date time] root INFO: " prefix
PREFIX = r"^\[\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\] root INFO: "


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


class Run:
    def __init__(self, proc: subprocess.CompletedProcess[str], out: Path) -> None:
        self.proc = proc
        self.out = out
        self.summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))

    def step(self, title: str) -> dict:
        return next(s for s in self.summary["steps"] if s["title"] == title)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    # the README's command: no --out, so the results land in ./result of the working directory
    cwd = tmp_path_factory.mktemp("aligned")
    proc = _run([], cwd)
    assert (cwd / "result" / "summary.json").is_file(), proc.stdout + proc.stderr
    yield Run(proc, cwd / "result")
    shutil.rmtree(cwd, ignore_errors=True)  # a few hundred MB of dumps


@pytest.fixture(scope="module", params=["hardswish", "bn-eps", "no-transpose"])
def broken(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    out = tmp_path_factory.mktemp(request.param) / "out"
    # one training step is enough to see a failure; it keeps the three runs short
    proc = _run(["--out", str(out), "--inject-bug", request.param, "--steps", "1"], REPO)
    assert (out / "summary.json").is_file(), proc.stdout + proc.stderr
    yield Run(proc, out)
    shutil.rmtree(out.parent, ignore_errors=True)


# --- the aligned port --------------------------------------------------------------------------


def test_aligned_port_passes_every_step(aligned: Run) -> None:
    assert aligned.proc.returncode == 0, aligned.proc.stdout + aligned.proc.stderr
    assert aligned.summary["passed"] is True
    assert [s["title"] for s in aligned.summary["steps"]] == STEP_TITLES
    assert all(s["passed"] for s in aligned.summary["steps"])
    assert aligned.summary["first_divergent_layer"] is None
    assert "ALIGNED" in aligned.proc.stdout and "NOT ALIGNED" not in aligned.proc.stdout
    # the squeeze-excitations' hardsigmoids are functional calls in both models, compared too
    assert aligned.step("1. settings")["detail"] == (
        "the settings of 97 paired layers, 9 paired calls and the optimizers agree")


def test_aligned_run_writes_every_file(aligned: Run) -> None:
    out = aligned.out
    expected = ["fake_data.npy", "fake_label.npy", "model.pth", "model.pdparams"]
    expected += ["summary.txt", "summary.json", "report.html", "tables/structure.txt",
                 "tables/settings.txt", "optimizer_torch.json", "optimizer_paddle.json"]
    for name in STEP_FILES:
        expected += [f"{name}_torch.npy", f"{name}_paddle.npy", f"log/{name}_diff.log"]
        expected += [f"tables/{name}.txt"]
    expected += ["backward_torch64.npy", "train_torch64.npy"]  # the calibration
    missing = [name for name in expected if not (out / name).is_file()]
    assert not missing
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_the_optimizers_each_side_saved_join_the_settings_step(aligned: Run,
                                                             tmp_path: Path) -> None:
    """Each side's training saves its optimizer; a port whose Momentum lost its nesterov flag
    or its weight decay fails the settings step, naming them."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import run
    finally:
        sys.path.remove(str(EXAMPLE))
    torch_file = json.loads((aligned.out / "optimizer_torch.json").read_text(encoding="utf-8"))
    assert torch_file["optimizer"]["settings"]["algorithm"] == "SGD with momentum"
    assert {d for _, d in torch_file["optimizer"]["decay"]} == {"L2 4e-05"}
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    for name in ("optimizer_torch.json", "tables/structure.json"):
        shutil.copy(aligned.out / name, out / name)
    port = json.loads((aligned.out / "optimizer_paddle.json").read_text(encoding="utf-8"))
    port["optimizer"]["settings"]["nesterov"] = True
    port["optimizer"]["decay"] = [[n, "none"] for n, _ in port["optimizer"]["decay"]]
    # the schedules, stepped on past the 3 steps trained: a rate of step 11 off by 1 %
    assert len(port["lr_schedule"]["lrs"]) == 1000
    lr11 = port["lr_schedule"]["lrs"][10]
    port["lr_schedule"]["lrs"][10] = lr11 * 1.01
    (out / "optimizer_paddle.json").write_text(json.dumps(port), encoding="utf-8")
    outcome = run.settings_outcome(out, run.optimizer_differ(out))
    assert not outcome.passed
    assert outcome.detail == ("optimizer: nesterov False in torch, True in Paddle; optimizer: "
                              "weight_decay 'L2 4e-05' in torch, 'none' in Paddle; optimizer: "
                              f"lr_at_step_11 {lr11:g} in torch, {lr11 * 1.01:g} in Paddle")


def test_fake_data_is_the_documented_seeded_batch(aligned: Run) -> None:
    data = np.load(aligned.out / "fake_data.npy")
    labels = np.load(aligned.out / "fake_label.npy")
    assert data.shape == (4, 3, 224, 224) and data.dtype == np.float32
    assert labels.shape == (4,) and labels.dtype == np.int64
    rng = np.random.RandomState(2024)
    np.testing.assert_array_equal(data, rng.standard_normal(data.shape).astype("float32"))
    np.testing.assert_array_equal(labels, rng.randint(0, 1000, (4,)))


def test_forward_log_is_reprod_log_format_with_numpy_value(aligned: Run) -> None:
    lines = (aligned.out / "log" / "forward_diff.log").read_text(encoding="utf-8").splitlines()
    assert [re.sub(PREFIX, "", line) for line in lines][0] == "logits: "
    m = re.fullmatch(PREFIX + r"\tmean diff: check passed: True, value: (\S+)", lines[1])
    assert m, lines[1]
    assert re.fullmatch(PREFIX + "diff check passed", lines[-1])
    # the logged value is numpy's mean |torch - paddle| over the dumped logits
    torch_logits = np.load(aligned.out / "forward_torch.npy", allow_pickle=True).item()["logits"]
    paddle_logits = np.load(aligned.out / "forward_paddle.npy", allow_pickle=True).item()["logits"]
    assert torch_logits.shape == (4, 1000)
    expected = np.abs(torch_logits.astype(np.float64) - paddle_logits).mean()
    assert float(m.group(1)) == pytest.approx(expected, rel=1e-5)
    assert expected <= 1e-5
    # and the logits are not trivially small, so 1e-5 is a real check
    assert np.abs(torch_logits).mean() > 1e-2


def test_dumps_load_in_reprod_log(aligned: Run) -> None:
    reprod_log = pytest.importorskip("reprod_log")
    helper = reprod_log.ReprodDiffHelper()
    torch_info = helper.load_info(str(aligned.out / "backward_torch.npy"))
    paddle_info = helper.load_info(str(aligned.out / "backward_paddle.npy"))
    helper.compare_info(torch_info, paddle_info)
    # reprod_log's own statistics are the ones reprod judged, and float32 gradients agree closely
    assert len(helper.diff_dict) == 142
    ours = reprod.compare(aligned.out / "backward_torch.npy", aligned.out / "backward_paddle.npy")
    for key, v in helper.diff_dict.items():
        assert float(v["max"]) == pytest.approx(ours[key].max_abs, rel=1e-5, abs=1e-12), key
    assert max(v["mean"] for v in helper.diff_dict.values()) <= 1e-5
    train = helper.load_info(str(aligned.out / "train_torch.npy"))
    assert list(train) == ["step_1", "step_2", "step_3"]
    assert set(train["step_1"]) == {"loss", "lr", "grad", "weight"}


def test_pdparams_holds_the_pth_weights_in_paddle_layout(aligned: Run) -> None:
    import paddle
    import torch

    pth = torch.load(aligned.out / "model.pth", weights_only=True)
    pdparams = paddle.load(str(aligned.out / "model.pdparams"), return_numpy=True)
    assert len(pdparams) == len([k for k in pth if not k.endswith("num_batches_tracked")])
    # Linear weights transposed, BatchNorm statistics renamed, everything else copied
    np.testing.assert_array_equal(
        pdparams["classifier.0.weight"], pth["classifier.0.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        pdparams["features.3.block.1.1._variance"],
        pth["features.3.block.1.1.running_var"].numpy(),
    )
    np.testing.assert_array_equal(
        pdparams["features.0.0.weight"], pth["features.0.0.weight"].numpy()
    )
    # the seeded weights have real BatchNorm statistics, not the (0, 1) that a lost copy hides
    assert not np.allclose(pdparams["features.3.block.1.1._variance"], 1.0)


def _multiple(ref: np.ndarray, other: np.ndarray, hi: np.ndarray) -> Optional[float]:
    """The noise multiple recomputed in numpy: the port's distance from the float32 reference
    over the reference's distance from float64, the larger of the L2 and the max ratio. None
    where the engine's floor (a rounding unit of the reference) could decide instead."""
    ref, other = ref.astype(np.float64), other.astype(np.float64)
    noise_l2, noise_max = np.linalg.norm(ref - hi), np.abs(ref - hi).max()
    if noise_l2 < 2.0**-20 * np.linalg.norm(ref) or noise_max < 2.0**-20 * np.abs(ref).max():
        return None
    return max(np.linalg.norm(other - ref) / noise_l2, np.abs(other - ref).max() / noise_max)


def test_gradients_are_float32_judged_by_the_float64_run(aligned: Run) -> None:
    out = aligned.out
    lo = reprod.load(out / "backward_torch.npy")
    hi = reprod.load(out / "backward_torch64.npy")
    port = reprod.load(out / "backward_paddle.npy")
    assert list(lo) == list(hi) and len(lo) == 142
    key = "features.0.0.weight"
    assert lo[key].dtype == port[key].dtype == np.float32 and hi[key].dtype == np.float64
    # the float64 run is the same model: float32 agrees with it to float32 rounding
    np.testing.assert_allclose(lo[key], hi[key], rtol=1e-3, atol=1e-6)
    step = aligned.step("5. backward")
    worst = step["noise"]["backward"]
    r = reprod.compare(out / "backward_torch.npy", out / "backward_paddle.npy",
                       noise=out / "backward_torch64.npy")
    assert worst["multiple"] == pytest.approx(r[worst["key"]].noise_multiple)
    checked = 0
    for k in lo:
        want = _multiple(lo[k], port[k], hi[k])
        if want is not None:
            assert r[k].noise_multiple == pytest.approx(want, rel=1e-6), k
            checked += 1
    assert checked > 100
    # the training dumps hold the same keys in float64, and each step reports its worst multiple
    train64 = reprod.load(out / "train_torch64.npy")
    assert list(train64) == ["step_1", "step_2", "step_3"]
    noise = aligned.step("6. training")["noise"]
    assert list(noise) == ["step_1", "step_2", "step_3"]
    assert "worst noise multiple per step: step_1 " in aligned.proc.stdout
    # every calibrated step passed within 20x its noise, or failed in float32 only: then the
    # float64 runs agree (a kink crossing, not a bug) and the step says so
    for title in ("5. backward", "6. training"):
        s = aligned.step(title)
        worst = max(w["multiple"] for w in s["noise"].values())
        if s["float64"] is None:
            assert worst <= 20 and s["criterion"] == "noise <= 20x"
        else:
            assert worst > 20 and s["float64"]["passed"] and "not a bug" in s["detail"]


def test_training_lr_follows_the_cosine_schedule(aligned: Run) -> None:
    train = np.load(aligned.out / "train_paddle.npy", allow_pickle=True).item()
    lrs = [float(train[f"step_{i}"]["lr"]) for i in (1, 2, 3)]
    expected = [0.1 * (1 + np.cos(np.pi * i / 3)) / 2 for i in range(3)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    losses = [float(train[f"step_{i}"]["loss"]) for i in (1, 2, 3)]
    assert losses[0] == pytest.approx(np.log(1000), rel=0.05)  # random weights: ~ln(classes)
    assert losses[2] < losses[0]  # and training does train


def test_layer_capture_covers_every_leaf_layer(aligned: Run) -> None:
    layers = np.load(aligned.out / "layers_torch.npy", allow_pickle=True).item()
    outs = [k for k in layers if k.endswith(".out")]
    # 141 leaf layer calls and 68 container calls (the model included), in the order they
    # finish: the stem conv first, the last Linear, its Sequential and the model last
    assert len(outs) == 141 + 68
    assert outs[0] == "features.0.0.out"
    assert outs[-3:] == ["classifier.3.out", "classifier.out", "<model>.out"]
    assert layers["classifier.3.out"].shape == (1, 1000)


# --- each side runs without the other framework ----------------------------------------------


def _run_blocking(
    script: str, blocked: str, out: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None makes every `import name` fail, as on a machine without it
    code = (
        "import runpy, sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        f"sys.path.insert(0, {str(EXAMPLE)!r})\n"
        f"sys.argv = [{script!r}, '--out', {str(out)!r}, *{list(args)!r}]\n"
        f"runpy.run_path({str(EXAMPLE / script)!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=False
    )


def test_each_side_runs_without_the_other_framework(aligned: Run, tmp_path: Path) -> None:
    for name in ("fake_data.npy", "fake_label.npy", "model.pdparams"):
        shutil.copy(aligned.out / name, tmp_path / name)
    try:
        proc = _run_blocking("torch_side.py", "paddle", tmp_path, "--steps", "1")
        assert proc.returncode == 0, proc.stderr
        proc = _run_blocking("paddle_side.py", "torch", tmp_path, "--steps", "1")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "forward_paddle.npy").is_file()
        proc = _run_blocking("paddle_side.py", "torch", tmp_path, "--steps", "1", "--float64")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "train_paddle64.npy").is_file()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# --- a broken port ----------------------------------------------------------------------------


def test_injected_bug_fails_and_names_its_layer(broken: Run) -> None:
    bug, layer = broken.summary["inject_bug"], broken.summary["bug_layer"]
    assert broken.proc.returncode == 1, broken.proc.stdout + broken.proc.stderr
    assert broken.summary["passed"] is False
    assert broken.summary["first_divergent_layer"] == layer
    assert f"diverges at {layer} (" in broken.proc.stdout
    assert f"the injected bug '{bug}' is in {layer}: found there" in broken.proc.stdout
    assert "NOT ALIGNED" in broken.proc.stdout
    # the HTML report says where too, at the top of the page
    assert f"diverges at {layer} (" in (broken.out / "report.html").read_text(encoding="utf-8")
    for title in ("3. forward", "7. layers"):
        assert broken.step(title)["passed"] is False
    # the calibrated steps fail far beyond the noise, and in float64 too: a bug, not rounding
    for title in ("5. backward", "6. training"):
        step = broken.step(title)
        assert step["passed"] is False
        assert max(w["multiple"] for w in step["noise"].values()) > 10_000
        assert step["float64"]["passed"] is False
    # the layer table marks the first failing key of that layer
    table = (broken.out / "tables" / "layers.txt").read_text(encoding="utf-8")
    first = next(line for line in table.splitlines() if line.startswith(">>"))
    assert first.split()[1] == f"{layer}.out"


def test_injected_bug_is_only_where_it_was_put(broken: Run) -> None:
    # everything before the broken layer still agrees, and the structure check cannot see it
    assert broken.step("1. structure")["passed"] is True
    # an epsilon is a layer setting, named before any number is compared; an activation
    # rewritten as another class, or a conversion bug, is not
    settings = broken.step("1. settings")
    bug = broken.summary["inject_bug"]
    assert settings["passed"] is (bug != "bn-eps")
    if bug == "bn-eps":
        assert settings["detail"] == (
            f"{broken.summary['bug_layer']}: epsilon 0.001 in torch, 1e-05 in Paddle")
        assert "settings: features.9.block.1.1: epsilon 0.001 in torch" in broken.proc.stdout
    if bug == "hardswish":
        # a Hardswish has no setting, but rewritten as x * F.hardsigmoid(x, slope=0.2) it adds a
        # call the torch model does not make: the trace names where
        assert settings["detail"].endswith(
            "not paired: hardsigmoid (calls and layers): 9 in torch, 10 in Paddle; 9 paired by "
            f"name, {broken.summary['bug_layer']}:hardsigmoid in Paddle only")
        assert f"{broken.summary['bug_layer']}:hardsigmoid in Paddle only" in broken.proc.stdout
    weights_ok = broken.step("2. weights")["passed"]
    # a conversion bug shows in the weights; a bug in the port's code does not
    assert weights_ok is (broken.summary["inject_bug"] != "no-transpose")
    log = (broken.out / "log" / "forward_diff.log").read_text(encoding="utf-8").splitlines()
    assert re.fullmatch(PREFIX + "diff check failed", log[-1])
