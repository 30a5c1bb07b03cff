"""``compare(..., noise=ref64, other_noise=port64)`` and ``reprod-diff --other-noise``: the port's
own rounding told from a bug in dumps of one's own scripts (``reprod.diff.noise.port_rounding``).

A torch script and its Paddle port each record a Linear's bias gradient over 8 x 4,096 rows, in
float32 and again in float64. Paddle's CPU kernel sums that gradient ~550x less exactly than
torch's: calibrated against torch's noise alone the correct port fails; with the port's float64
dump beside it, the two float64 runs agree, and it passes. A bug stays a bug in float64.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

import reprod
from reprod.diff.noise import port_rounding


def test_port_rounding_against_float64_runs_that_agree_or_not() -> None:
    rng = np.random.default_rng(1)
    t64 = rng.standard_normal(1000)
    t32 = (t64 + rng.standard_normal(1000) * 1e-7).astype(np.float32)
    p32 = (t64 + rng.standard_normal(1000) * 1e-5).astype(np.float32)
    found = port_rounding(t32, p32, t64, t64 + 1e-13)
    assert found is not None and 50 < found.times < 150  # ~100x the reference's noise
    assert found.agree == pytest.approx(1e-13, rel=1e-3)
    assert port_rounding(t32, p32, t64, t64 + 1e-6) is None  # another function in float64
    assert port_rounding(t32, p32, t64, (t64 + 1e-13)[:10]) is None  # a shape apart
    assert port_rounding(t32, p32, t64, np.full(1000, np.nan)) is None


def _dumps():
    torch = pytest.importorskip("torch")
    paddle = pytest.importorskip("paddle")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4096, 64)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    torch.manual_seed(0)
    fc, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 3)
    with torch.no_grad():
        for p in (*fc.parameters(), *head.parameters()):
            p.normal_(0.0, 0.05)
    dumps = {}
    for dtype in ("float32", "float64"):  # the torch script, and its float64 run
        f, h = (copy.deepcopy(fc).double(), copy.deepcopy(head).double()) \
            if dtype == "float64" else (fc, head)
        loss = torch.nn.functional.cross_entropy(h(f(torch.from_numpy(x).to(f.weight.dtype))
                                                   .mean(1)), torch.from_numpy(y))
        loss.backward()
        log = reprod.ReprodLogger()
        log.add("loss", loss)
        log.add("grad/fc.bias", f.bias.grad)
        log.add("grad/fc.weight", f.weight.grad.T)
        dumps[f"torch_{dtype}"] = log.data
    pfc, phead = paddle.nn.Linear(64, 64), paddle.nn.Linear(64, 3)
    pfc.weight.set_value(fc.weight.detach().numpy().T)
    pfc.bias.set_value(fc.bias.detach().numpy())
    phead.weight.set_value(head.weight.detach().numpy().T)
    phead.bias.set_value(head.bias.detach().numpy())
    for dtype in ("float32", "float64"):  # the port, and its float64 run
        if dtype == "float64":
            pfc.to(dtype="float64")
            phead.to(dtype="float64")
        loss = paddle.nn.functional.cross_entropy(
            phead(pfc(paddle.to_tensor(x.astype(dtype))).mean(1)), paddle.to_tensor(y))
        loss.backward()
        log = reprod.ReprodLogger()
        log.add("loss", loss)
        log.add("grad/fc.bias", pfc.bias.grad)
        log.add("grad/fc.weight", pfc.weight.grad)
        dumps[f"paddle_{dtype}"] = log.data
        pfc.clear_gradients()
        phead.clear_gradients()
    return dumps


def test_a_correct_ports_gradient_passes_with_its_float64_dump_and_a_bug_does_not() -> None:
    d = _dumps()
    plain = reprod.compare(d["torch_float32"], d["paddle_float32"], noise=d["torch_float64"])
    bias = plain["grad/fc.bias"]
    assert not bias.passed and bias.noise_multiple > 200, bias.reason
    r = reprod.compare(d["torch_float32"], d["paddle_float32"], noise=d["torch_float64"],
                       other_noise=d["paddle_float64"])
    assert r.passed, r.to_table(failed_only=True)
    assert r["grad/fc.bias"].status == "known"
    assert r["grad/fc.bias"].reason.startswith("a known framework difference: the port's float32 "
                                               "rounding, ")
    assert r.options["port_rounding"]["known"] == 1
    from reprod.testing import assert_aligned

    with pytest.raises(AssertionError, match="grad/fc.bias"):
        assert_aligned(d["torch_float32"], d["paddle_float32"], noise=d["torch_float64"])
    assert_aligned(d["torch_float32"], d["paddle_float32"], noise=d["torch_float64"],
                   other_noise=d["paddle_float64"])
    # a backward bug 1e-5 of the gradient (~30x under the port's own rounding): float64 keeps it
    bug = dict(d["paddle_float32"], **{"grad/fc.bias": d["paddle_float32"]["grad/fc.bias"]
                                       * np.float32(1 + 1e-5)})
    bug64 = dict(d["paddle_float64"], **{"grad/fc.bias": d["paddle_float64"]["grad/fc.bias"]
                                         * (1 + 1e-5)})
    r = reprod.compare(d["torch_float32"], bug, noise=d["torch_float64"], other_noise=bug64)
    assert not r.passed and r["grad/fc.bias"].status == "failed"


def test_reprod_diff_other_noise(tmp_path) -> None:
    d = _dumps()
    for name, data in d.items():
        reprod.save(tmp_path / f"{name}.npy", data)
    t = str(tmp_path)
    cmd = [sys.executable, "-m", "reprod", f"{t}/torch_float32.npy", f"{t}/paddle_float32.npy",
           "--noise", f"{t}/torch_float64.npy"]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "grad/fc.bias" in bad.stdout
    ok = subprocess.run(cmd + ["--other-noise", f"{t}/paddle_float64.npy"], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    usage = subprocess.run(cmd[:5] + ["--other-noise", f"{t}/paddle_float64.npy"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "--other-noise needs --noise" in usage.stderr
    missing = subprocess.run(cmd + ["--other-noise", f"{t}/nope.npy"], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "nope.npy: no such file" in missing.stderr


def test_other_noise_needs_noise_and_same_keys() -> None:
    a = {"x": np.ones(3, np.float32)}
    with pytest.raises(reprod.ReprodError, match="needs noise="):
        reprod.compare(a, a, other_noise=a)
    with pytest.raises(reprod.ReprodError, match="pair="):
        reprod.compare(a, a, noise=a, other_noise=a, pair=lambda r, o: o)


def test_the_drop_in_helper_takes_both_noises(tmp_path) -> None:
    d = _dumps()
    helper = reprod.ReprodDiffHelper()
    helper.compare_info(d["torch_float32"], d["paddle_float32"], noise=d["torch_float64"])
    assert set(helper.diff_dict["grad/fc.bias"]) == {"mean", "max", "min"}  # as reprod_log
    assert not helper.report(diff_threshold=1e-3, path=str(tmp_path / "a.log"))
    assert helper.result["grad/fc.bias"].noise_multiple > 200
    helper.compare_info(d["torch_float32"], d["paddle_float32"], noise=d["torch_float64"],
                        other_noise=d["paddle_float64"])
    assert helper.report(diff_threshold=1e-12, path=str(tmp_path / "b.log"))  # noise judges
    assert "diff check passed" in (tmp_path / "b.log").read_text()
    helper.compare_info(d["torch_float32"], d["paddle_float32"])  # plain again
    assert not helper.report(diff_threshold=1e-12, path=str(tmp_path / "c.log"))
    with pytest.raises(reprod.ReprodError, match="needs noise="):
        helper.compare_info(d["torch_float32"], d["paddle_float32"],
                            other_noise=d["paddle_float64"])
