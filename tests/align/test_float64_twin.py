"""calibrate=True's float64 copy of the torch model runs with torch's default dtype float64: a
model's own code makes tensors of the default dtype in its forward pass (Hugging Face's causal
mask: ``torch.full((L, L), torch.finfo(h.dtype).min)``), and float64's lowest value does not fit
float32, so MBart's and Pegasus's float64 copy crashed. Where the copy still fails, the run is
judged without calibration and says why."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

import reprod  # noqa: E402
from reprod.align import align_forward, align_train, load_into_paddle  # noqa: E402

H, B, L = 8, 2, 5
# the default dtype each call of a torch model below found, forward and backward: a class
# attribute, shared by the float64 copy (a deep copy would copy an instance's list)
SEEN: list[tuple[str, torch.dtype, torch.dtype]] = []


class CausalSelf(tnn.Module):
    """Self-attention over a causal mask made as Hugging Face's ``_make_causal_mask`` makes it:
    ``torch.full`` with the hidden states' lowest value and no dtype. ``mask_dtype``: the
    mask's own dtype, where the model's code fixes one (float32: float64's lowest value
    overflows whatever the default is)."""

    def __init__(self, mask_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fc = tnn.Linear(H, H)
        self.mask_dtype = mask_dtype

    def forward(self, x):
        h = self.fc(x)
        SEEN.append(("forward", h.dtype, torch.get_default_dtype()))
        if h.requires_grad:
            h.register_hook(lambda g: SEEN.append(("backward", g.dtype,
                                                   torch.get_default_dtype())))
        scores = h @ h.transpose(-1, -2) / math.sqrt(H)
        n = x.shape[1]
        kw = {} if self.mask_dtype is None else {"dtype": self.mask_dtype}
        mask = torch.full((n, n), torch.finfo(h.dtype).min, **kw).triu(1)
        return torch.softmax(scores + mask, dim=-1) @ h


class PaddleCausalSelf(pnn.Layer):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.fc = pnn.Linear(H, H)
        self.scale = scale  # != 1: a bug in the attention scores

    def forward(self, x):
        h = self.fc(x)
        scores = h @ h.transpose([0, 2, 1]) / math.sqrt(H) * self.scale
        n = x.shape[1]
        mask = paddle.triu(paddle.full([n, n], float(np.finfo(np.float32).min)), 1)
        return paddle.nn.functional.softmax(scores + mask, axis=-1) @ h


def _causal_self_numpy(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The reference in float64, written again in numpy (w: torch's [out, in])."""
    h = x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    scores = h @ h.transpose(0, 2, 1) / math.sqrt(H)
    scores = scores + np.triu(np.full((L, L), -np.inf), 1)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ h


def _pair(mask_dtype: torch.dtype | None = None, scale: float = 1.0):
    torch.manual_seed(0)
    tm = CausalSelf(mask_dtype)
    with torch.no_grad():  # sharp attention: the mask matters
        tm.fc.weight.mul_(4.0)
    pm = PaddleCausalSelf(scale)
    load_into_paddle(pm, tm)
    return tm, pm


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((B, L, H)).astype(np.float32)


@pytest.fixture(autouse=True)
def _clean():
    SEEN.clear()
    yield
    assert torch.get_default_dtype() == torch.float32  # whatever the test did


def test_plain_float64_copy_crashes_as_hugging_face_does() -> None:
    """The case itself: the copy cast with .double() fails on its own mask."""
    tm, _ = _pair()
    with pytest.raises(RuntimeError, match="overflow"):
        tm.double()(torch.from_numpy(_x()).double())


def test_align_forward_calibrates_a_model_making_default_dtype_tensors(tmp_path) -> None:
    tm, pm = _pair()
    x = _x()
    r = align_forward(tm, pm, x, calibrate=True, out_dir=tmp_path)
    assert r.passed, r.to_table()
    assert "calibration" not in r.options and r.options["noise"] == "torch float64"
    assert r["logits"].methods == ("noise",)
    # the float64 run is the reference's formula in float64, recomputed in numpy
    hi = reprod.load(tmp_path / "forward_torch64.npy")["logits"]
    assert hi.dtype == np.float64
    want = _causal_self_numpy(x, tm.fc.weight.detach().numpy(), tm.fc.bias.detach().numpy())
    np.testing.assert_allclose(hi, want, rtol=1e-12, atol=1e-12)
    # the float32 model ran with the default float32, the copy with float64 (and so again
    # where the layers are judged: calibrated, they are by default)
    assert [s[1:] for s in SEEN[:2]] == [(torch.float32, torch.float32),
                                         (torch.float64, torch.float64)]
    assert {s[1:] for s in SEEN} == {(torch.float32, torch.float32),
                                     (torch.float64, torch.float64)}
    assert r.options["layers"]["passed"]
    # and a bug in the scores still fails, by many times the noise
    bad = align_forward(tm, _pair(scale=1.01)[1], x, calibrate=True, localise=False)
    assert not bad.passed and bad["logits"].noise_multiple > 100


def test_align_train_runs_the_copy_forward_and_backward_in_float64() -> None:
    tm, pm = _pair()
    batches = [(_x(i), _x(10 + i)) for i in range(2)]
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    popt = paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters())
    r = align_train(tm, pm, batches, torch_optimizer=topt, paddle_optimizer=popt, steps=2,
                    torch_loss_fn=tnn.MSELoss(), paddle_loss_fn=pnn.MSELoss(), calibrate=True,
                    localise=False)
    assert r.passed, r.to_table(failed_only=True)
    assert "calibration" not in r.options and r.options["noise"] == "torch float64"
    # float32 steps with the default float32 (forward and backward; the determinism check's
    # forward passes before them), then the copy's float64 steps with the default float64
    f32 = [s for s in SEEN if s[1] == torch.float32]
    assert f32[-4:] == [(d, torch.float32, torch.float32) for d in ("forward", "backward") * 2]
    assert all(s[2] == torch.float32 for s in f32)
    assert [s for s in SEEN if s[1] == torch.float64] == [
        (d, torch.float64, torch.float64) for d in ("forward", "backward") * 2]


def test_a_copy_that_still_fails_is_judged_uncalibrated_and_says_why() -> None:
    """A model whose own code fixes float32 for float64's lowest value fails whatever the
    default dtype: the run gives the uncalibrated verdict, not the model's traceback."""
    tm, pm = _pair(mask_dtype=torch.float32)
    x = _x()
    r = align_forward(tm, pm, x, calibrate=True)
    plain = align_forward(tm, pm, x)
    assert r.passed and plain.passed
    why = r.options["calibration"]["skipped"]
    assert "RuntimeError" in why and "overflow" in why and "\n" not in why
    assert r.options["findings"][0] == f"calibrate=True: {why}"
    assert "noise" not in r.options and r["logits"].methods == plain["logits"].methods
    assert r["logits"].mean_abs == plain["logits"].mean_abs
    # a bug fails as it fails uncalibrated
    pbug = _pair(mask_dtype=torch.float32, scale=1.01)[1]
    bad = align_forward(tm, pbug, x, calibrate=True)
    assert not bad.passed and bad.options["calibration"]["skipped"] == why
    assert [k.key for k in bad.failed] == [k.key for k in align_forward(tm, pbug, x).failed]


def test_align_train_with_a_copy_that_still_fails_is_judged_uncalibrated() -> None:
    tm, pm = _pair(mask_dtype=torch.float32)
    batches = [(_x(i), _x(10 + i)) for i in range(2)]
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    popt = paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters())
    r = align_train(tm, pm, batches, torch_optimizer=topt, paddle_optimizer=popt, steps=2,
                    torch_loss_fn=tnn.MSELoss(), paddle_loss_fn=pnn.MSELoss(), calibrate=True)
    assert r.passed, r.to_table(failed_only=True)
    why = r.options["calibration"]["skipped"]
    assert "overflow" in why and r.options["findings"][0] == f"calibrate=True: {why}"
    assert "noise" not in r.options
    assert all(kr.methods == ("mean",) for kr in r.results if kr.status == "passed")
