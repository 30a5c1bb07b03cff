"""reprod as a drop-in for reprod_log, proven on the scripts migration repositories run.

Each script below follows the Step1-5 pipelines of public reprod_log migrations (forward, metric,
loss, learning-rate list, backward) as their authors wrote them: ``from reprod_log import ...``,
dumps written by ``ReprodLogger``, read back by ``load_info`` and then edited as plain dicts
(keys dropped, renamed, a Linear weight transposed, values scaled in place, deep copies, pickles)
before ``compare_info``/``report``, plus ``diff_dict[k]["mean"]``, ``reprod_log.utils`` and
``reprod_log.compare``. Each runs twice in fresh interpreters: under the real reprod_log 1.0.1 and
with ``reprod_log`` replaced by ``reprod`` in its text. Their printed lines (log timestamps
removed) must be identical, except the documented differences, which the last script exercises
and asserts line by line.

Data is chosen so that reprod_log's float32 statistics are exact (differences that are multiples
of 2**-20, element counts that are powers of two): reprod accumulates in float64, so arbitrary data
may differ in the last printed digit of a mean (a documented difference with its own golden test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("reprod_log")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STAMP = re.compile(r"^\[\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\] ")

_PREAMBLE = """
import copy
import pickle

import numpy as np

rng = np.random.RandomState(2024)


def exact(shape):
    # float32 multiples of 2**-10 in [-4, 4)
    return (rng.randint(-4096, 4096, size=shape) * 2.0**-10).astype(np.float32)


def nudge(a, steps=(0, 1)):
    # a + k * 2**-20: exact in float32, and so is every mean of the differences
    return (a + rng.choice(steps, size=a.shape) * 2.0**-20).astype(np.float32)
"""

SCRIPTS: dict[str, str] = {}

# Step 1: forward. The torch and paddle outputs are stood in for by numpy arrays.
SCRIPTS["forward"] = """
from reprod_log import ReprodDiffHelper, ReprodLogger

logits = exact((4, 8))
reprod_logger = ReprodLogger()
reprod_logger.add("logits", logits)
reprod_logger.save("result/forward_torch.npy")
reprod_logger = ReprodLogger()
reprod_logger.add("logits", nudge(logits))
reprod_logger.save("result/forward_paddle.npy")

diff_helper = ReprodDiffHelper()
torch_info = diff_helper.load_info("result/forward_torch.npy")
paddle_info = diff_helper.load_info("result/forward_paddle.npy")
print("dicts:", isinstance(torch_info, dict), type(paddle_info) is dict, list(torch_info))
print(torch_info)
diff_helper.compare_info(torch_info, paddle_info)
diff_helper.report(path="result/log/forward_diff.log", diff_threshold=1e-5)
mean = diff_helper.diff_dict["logits"]["mean"]
print("mean:", mean, type(mean).__name__, sorted(diff_helper.diff_dict["logits"]))
if diff_helper.diff_dict["logits"]["max"] > 1e-5:
    print("forward not aligned")
print(open("result/log/forward_diff.log").read())
"""

# Step 2: metric. An extra key on one side is deleted; a dict is merged in; copies are taken.
SCRIPTS["metric"] = """
from reprod_log import ReprodDiffHelper, ReprodLogger

for side in ("torch", "paddle"):
    reprod_logger = ReprodLogger()
    reprod_logger.add("top1", np.array(0.75))
    reprod_logger.add("top5", np.array(0.9375, dtype=np.float32))
    if side == "paddle":
        reprod_logger.add("eval_time", np.array(12.5))
    reprod_logger.save("result/metric_{}.npy".format(side))

diff_helper = ReprodDiffHelper()
torch_info = diff_helper.load_info("result/metric_torch.npy")
paddle_info = diff_helper.load_info("result/metric_paddle.npy")
del paddle_info["eval_time"]
paddle_info.update({"top1": np.array(0.75)})
torch_info.update(top5=torch_info["top5"])
print(sorted(torch_info), sorted(paddle_info))
kept = copy.deepcopy(paddle_info)
again = pickle.loads(pickle.dumps(paddle_info))
print("copies:", sorted(kept), float(again["top5"]), isinstance(again, dict))
diff_helper.compare_info(torch_info, paddle_info)
diff_helper.report(path="result/log/metric_diff.log")
print("top1 mean:", diff_helper.diff_dict["top1"]["mean"])
"""

# Step 3: loss. Values scaled in place after loading; the file keeps the logged value.
SCRIPTS["loss"] = """
from reprod_log import ReprodDiffHelper, ReprodLogger

reprod_logger = ReprodLogger()
reprod_logger.add("loss", np.array(1.5, dtype=np.float32))
reprod_logger.add("loss_vec", exact((8,)))
reprod_logger.save("result/loss_torch.npy")
reprod_logger = ReprodLogger()
reprod_logger.add("loss", np.array(1.5 + 2**-20, dtype=np.float32))
reprod_logger.add("loss_vec", np.zeros(8, dtype=np.float32))
reprod_logger.save("result/loss_paddle.npy")

diff_helper = ReprodDiffHelper()
torch_info = diff_helper.load_info("result/loss_torch.npy")
paddle_info = diff_helper.load_info("result/loss_paddle.npy")
torch_info["loss"] *= 2
paddle_info["loss"] *= 2
torch_info["loss_vec"][:] = 0.0
print("scaled:", torch_info["loss"], paddle_info["loss"], torch_info["loss_vec"].sum())
again = diff_helper.load_info("result/loss_torch.npy")
print("file unchanged:", again["loss"], again["loss_vec"].sum() != 0)
diff_helper.compare_info(torch_info, paddle_info)
diff_helper.report(diff_method="all", path="result/log/loss_diff.log")
print("loss mean:", diff_helper.diff_dict["loss"]["mean"])
"""

# Step 4: learning rates, logged per step under integer keys and as one list.
SCRIPTS["lr"] = """
from reprod_log import ReprodDiffHelper, ReprodLogger

lrs = [0.1 * 0.5**i for i in range(4)]
for side in ("torch", "paddle"):
    reprod_logger = ReprodLogger()
    for idx, lr in enumerate(lrs):
        reprod_logger.add(idx, np.array(lr))
    reprod_logger.add("lr_list", np.array(lrs))
    reprod_logger.save("result/lr_{}.npy".format(side))

diff_helper = ReprodDiffHelper()
torch_info = diff_helper.load_info("result/lr_torch.npy")
paddle_info = diff_helper.load_info("result/lr_paddle.npy")
print("keys:", [str(k) for k in torch_info])
diff_helper.compare_info(torch_info, paddle_info)
diff_helper.report(diff_method="all", path="result/log/lr_diff.log")
print("diff keys:", [str(k) for k in diff_helper.diff_dict])
print("lr_list max:", diff_helper.diff_dict["lr_list"]["max"])
"""

# Step 5: backward. Keys dropped and renamed, a paddle Linear weight transposed to torch's layout.
SCRIPTS["backward"] = """
from reprod_log import ReprodDiffHelper, ReprodLogger

weight = exact((2, 4))
for side in ("torch", "paddle"):
    reprod_logger = ReprodLogger()
    for step in range(3):
        reprod_logger.add("loss_{}".format(step), np.array(1.0 + step / 8, dtype=np.float32))
        reprod_logger.add("lr_{}".format(step), np.array(0.1 * 0.5**step))
    w = weight if side == "torch" else nudge(weight).T.copy()
    reprod_logger.add("module.fc.weight", w)
    reprod_logger.add("module.fc.bias", np.arange(2, dtype=np.float32))
    reprod_logger.add("module.bn.num_batches_tracked", np.array(3))
    reprod_logger.save("result/backward_{}.npy".format(side))

diff_helper = ReprodDiffHelper()
torch_info = diff_helper.load_info("result/backward_torch.npy")
paddle_info = diff_helper.load_info("result/backward_paddle.npy")
for info in (torch_info, paddle_info):
    for k in list(info):
        if k.endswith("num_batches_tracked"):
            info.pop(k)
    for k in list(info):
        if k.startswith("module."):
            info[k.replace("module.", "")] = info.pop(k)
paddle_info["fc.weight"] = paddle_info["fc.weight"].T
snapshot = copy.deepcopy(paddle_info)
restored = pickle.loads(pickle.dumps(paddle_info))
print("round trips:", all(np.array_equal(snapshot[k], restored[k]) for k in paddle_info))
print(list(torch_info))
diff_helper.compare_info(torch_info, paddle_info)
diff_helper.report(diff_method="all", diff_threshold=1e-6, path="result/log/backward_diff.log")
print("weight mean:", diff_helper.diff_dict["fc.weight"]["mean"])
print(open("result/log/backward_diff.log").read())
"""

# reprod_log.utils and reprod_log.compare, with real torch and paddle models.
SCRIPTS["utils_and_compare"] = """
import paddle
import torch

from reprod_log.compare import check_data, compare_forward, compare_loss_and_backward, compute_diff
from reprod_log.utils import check_print_diff, init_logger, np2paddle, np2torch, paddle2np, torch2np

inputs = {"x": (np.arange(16, dtype=np.float32).reshape(4, 4) / 8)}
t_in, p_in = np2torch(inputs), np2paddle(inputs)
print("np2torch:", type(t_in["x"]).__name__, t_in["x"].dtype, tuple(t_in["x"].shape))
print("np2paddle:", type(p_in["x"]).__name__, p_in["x"].dtype, tuple(p_in["x"].shape))
t_out = torch2np({"y": t_in["x"] * 2, "z": t_in["x"].sum()})
p_out = paddle2np({"y": p_in["x"] * 2, "z": p_in["x"].sum()})
print("to numpy:", [(k, v.dtype.name, v.shape) for k, v in t_out.items()], sorted(paddle2np(p_in["x"])))
print(sorted(torch2np(t_in["x"])), torch2np(t_in["x"])["output"].shape)
check_data(t_out, p_out)
diff = compute_diff(t_out, p_out)
print("compute_diff:", sorted(diff), sorted(diff["y"]), diff["y"]["mean"], type(diff["y"]["max"]).__name__)
print("passed:", check_print_diff(diff, diff_method="all", diff_threshold=1e-6))
print("passed:", check_print_diff({"outer": diff}, diff_method=["max", "min"], indent="  "))
logger = init_logger("result/log/utils.log", name="pipeline")
logger.info("logged once")


class TorchScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full([4], 0.5))

    def forward(self, x):
        return x * self.w


class PaddleScale(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.w = self.create_parameter([4], default_initializer=paddle.nn.initializer.Constant(0.5))

    def forward(self, x):
        return x * self.w


compare_forward(TorchScale(), PaddleScale(), inputs, diff_threshold=1e-6)
compare_loss_and_backward(TorchScale(), PaddleScale(), lambda i, o: {"loss": o.sum() / 4},
                          lambda i, o: {"loss": o.sum() / 4}, inputs, lr=0.0625, steps=2)
"""

# The documented differences, one each; the test lists the lines that must differ.
SCRIPTS["differences"] = """
from reprod_log import ReprodDiffHelper, ReprodLogger
from reprod_log.compare import compute_diff
from reprod_log.utils import check_print_diff

diff_helper = ReprodDiffHelper()
try:
    diff_helper.load_info("result/never_written.npy")
except FileNotFoundError:
    print("missing file: FileNotFoundError")
except AssertionError:
    print("missing file: AssertionError")

for side, x in (("torch", np.array([1.0, np.nan], dtype=np.float32)), ("paddle", np.array([1.0, np.nan], dtype=np.float32))):
    reprod_logger = ReprodLogger()
    reprod_logger.add("logits", x)
    reprod_logger.save("result/nan_{}.npy".format(side))
torch_info = diff_helper.load_info("result/nan_torch.npy")
paddle_info = diff_helper.load_info("result/nan_paddle.npy")
diff_helper.compare_info(torch_info, paddle_info)
print("report returned:", diff_helper.report(path="result/log/nan_diff.log"))

diff = compute_diff({"labels": np.array([0, 10], dtype=np.uint8)}, {"labels": np.array([255, 10], dtype=np.uint8)})
print("uint8 max:", diff["labels"]["max"])
print("uint8 passed:", check_print_diff(diff, diff_method="max", diff_threshold=2))
"""

# (reprod_log's line, reprod's line) for every line that may differ, in order
EXPECTED_DIFFERENCES: dict[str, list[tuple[str, str]]] = {
    "differences": [
        # a missing file: reprod_log asserts; reprod raises a FileNotFoundError (a ReprodError)
        ("missing file: AssertionError", "missing file: FileNotFoundError"),
        # NaN passes every reprod_log check; it never passes in reprod
        ("root INFO: \tmean diff: check passed: True, value: nan",
         "root INFO: \tmean diff: check passed: False, value: nan"),
        ("root INFO: diff check passed", "root INFO: diff check failed"),
        # report returns None in reprod_log, the verdict in reprod
        ("report returned: None", "report returned: False"),
        # uint8 differences wrap around in reprod_log (0 - 255 == 1); reprod computes |0 - 255|
        ("uint8 max: 1", "uint8 max: 255"),
        ("max diff: check passed: True, value: 1", "max diff: check passed: False, value: 255"),
        ("uint8 passed: True", "uint8 passed: False"),
    ],
}


def _run(name: str, tool: str, tmp_path: Path) -> list[str]:
    src = _PREAMBLE + textwrap.dedent(SCRIPTS[name])
    if tool == "reprod":
        src = src.replace("reprod_log", "reprod")
    work = tmp_path / tool
    (work / "result").mkdir(parents=True)
    (work / "step.py").write_text(src)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "step.py"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{tool}: {out.stderr[-4000:]}"
    return [_STAMP.sub("", line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_prints_the_same_lines_under_both(name: str, tmp_path: Path) -> None:
    theirs = _run(name, "reprod_log", tmp_path)
    ours = _run(name, "reprod", tmp_path)
    assert len(theirs) == len(ours), "\n".join(["reprod_log:", *theirs, "reprod:", *ours])
    differing = [(a, b) for a, b in zip(theirs, ours) if a != b]
    expected = EXPECTED_DIFFERENCES.get(name, [])
    assert [(a.strip(), b.strip()) for a, b in differing] == [(a.strip(), b.strip()) for a, b in expected], \
        "\n".join(f"reprod_log: {a!r}\nreprod:     {b!r}" for a, b in differing)
    # the scripts did what they are about (not two empty outputs)
    assert any("diff check" in line or "passed:" in line for line in ours), ours


def test_scripts_reach_their_verdicts(tmp_path: Path) -> None:
    """A spot check of the reprod run's content, so the equality above compares real work."""
    out = _run("forward", "reprod", tmp_path)
    assert "dicts: True True ['logits']" in out
    assert "root INFO: diff check passed" in out
    assert any(line.startswith("mean: ") and line.endswith("float32 ['max', 'mean', 'min']") for line in out)
