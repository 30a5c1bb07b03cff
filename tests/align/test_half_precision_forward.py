"""``align_forward`` on a port that computes in float16 or bfloat16 (``model.to(dtype=...)``).

Judged against the float32 model, every key of a faithful half-precision port fails by its own
rounding (and Paddle refused the float32 inputs outright: "The type of data we are trying to
retrieve (float32) does not match the type of data (float16)"). With ``precision="auto"``, the
reference is the torch model in the port's precision, and its float32 run is the noise.

Paddle has no half-precision kernels for most operations on the CPU, so the port here computes
each layer as a GPU half kernel does: its half weights and inputs widened to float32, the result
rounded to the half dtype (``_Emulated``); a Paddle port of real half layers gets the clear error
it would get on a CPU. A GPU run of real kernels is left to a machine that has one.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
F = paddle.nn.functional

from half_kernels import HalfGELU as _Gelu  # noqa: E402
from half_kernels import HalfLayerNorm as _LN  # noqa: E402
from half_kernels import HalfLinear as _Lin  # noqa: E402

from reprod import compare, load  # noqa: E402
from reprod.align import align_forward, load_into_paddle  # noqa: E402
from reprod.diff.noise import LOW_PRECISION_NOISE_FACTOR  # noqa: E402
from reprod.errors import ReprodError  # noqa: E402

X = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)


def _torch_net():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                            torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    with torch.no_grad():  # every tensor matters: no zero biases or unit LayerNorm
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def _port(dtype, *, weight_bug=1.0):
    t = _torch_net()
    p = paddle.nn.Sequential(_Lin(16, 64), _LN(64), _Gelu(), _Lin(64, 64), _Gelu(), _Lin(64, 8))
    load_into_paddle(p, t)
    if weight_bug != 1.0:
        p[3].weight.set_value(p[3].weight.numpy() * np.float32(weight_bug))
    p.to(dtype=dtype)
    p.eval()
    return t, p


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_faithful_half_port_passes_against_the_reference_in_its_precision(dtype, tmp_path):
    t, p = _port(dtype)
    r = align_forward(t, p, X, calibrate=True, out_dir=tmp_path)
    assert r.passed, r.to_table()
    assert r.options["precision"] == dtype and r.options["noise"] == "torch float32"
    assert r.options["layers"]["passed"] and r.options["layers"]["judged"] >= 10
    # and the six layers and the model, each alone on the half reference's input
    assert r.options["layers"]["alone"] == {**r.options["layers"]["alone"], "judged": 7,
                                            "passed": True}
    # the reference is torch's own half run: an independent check of what was compared
    with torch.no_grad():
        ref = t.to(getattr(torch, dtype))(torch.from_numpy(X).to(getattr(torch, dtype)))
    saved = load(os.fspath(tmp_path / "forward_torch.npy"))
    np.testing.assert_array_equal(np.asarray(saved["logits"], np.float32),
                                  ref.float().numpy())
    # the dumps re-judge the same way from the command line's inputs
    again = compare(load(os.fspath(tmp_path / "forward_torch.npy")),
                    load(os.fspath(tmp_path / "forward_paddle.npy")),
                    noise=load(os.fspath(tmp_path / "forward_torch32.npy")))
    assert again.passed


def test_a_weight_bug_fails_past_the_half_noise_at_its_layer():
    t, p = _port("float16", weight_bug=1.01)
    r = align_forward(t, p, X, calibrate=True)
    assert not r.passed
    assert r["logits"].noise_multiple > LOW_PRECISION_NOISE_FACTOR
    assert r.options["divergence"]["layer"] == "3"
    # its float32 version is judged by float64 noise, as before
    t32, p32 = _port("float32", weight_bug=1.01)
    r32 = align_forward(t32, p32, X, calibrate=True)
    assert not r32.passed and "precision" not in r32.options
    assert r32.options["noise"] == "torch float64"


def test_the_half_reference_is_copied_once_for_the_outputs_and_the_layers(monkeypatch):
    """The half copy of the reference ran the outputs and was made again for the layers: two
    deep copies of the model where one does."""
    from reprod.align import forward

    made = []
    real = forward._half_twin

    def counted(*a, **k):
        made.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(forward, "_half_twin", counted)
    t, p = _port("float16", weight_bug=1.01)
    r = align_forward(t, p, X, calibrate=True)
    assert r.options["divergence"]["layer"] == "3"  # the layers were localised
    assert made == ["float16"]


def test_judged_against_float32_the_half_port_says_what_to_run_instead():
    t, p = _port("float16")
    r = align_forward(t, p, X, calibrate=True, precision="float32")
    assert not r.passed and "precision" not in r.options
    assert "compare the reference run in float16 against other" in r.summary_line()


def test_paddle_without_half_kernels_says_so_in_one_line():
    t = _torch_net()
    p = paddle.nn.Sequential(paddle.nn.Linear(16, 64), paddle.nn.LayerNorm(64), paddle.nn.GELU(),
                             paddle.nn.Linear(64, 64), paddle.nn.GELU(), paddle.nn.Linear(64, 8))
    load_into_paddle(p, t)
    p.to(dtype="float16")
    p.eval()
    if "gpu" in str(paddle.get_device()):
        pytest.skip("Paddle has float16 kernels on this GPU")
    with pytest.raises(ReprodError) as e:
        align_forward(t, p, X, calibrate=True)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("align_forward: the port Sequential holds float16 weights, and "
                           "Paddle could not run it on Place(cpu)")
    assert line.endswith("Paddle has no float16 or bfloat16 kernels for most operations on "
                         "the CPU: run both models on a GPU")


def test_an_unknown_precision_is_refused():
    t, p = _port("float32")
    with pytest.raises(ReprodError, match="precision='float8'; expected 'auto'"):
        align_forward(t, p, X, precision="float8")


class _RoundedOut(paddle.nn.Layer):
    """A float32 port whose outputs are rounded to bfloat16 (held in float32): what a port
    running its own half-precision code on float32 parameters returns."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).astype("bfloat16").astype("float32")


def test_half_values_held_in_float32_are_told_which_precision_to_pass():
    t, p = _port("float32")
    port = _RoundedOut(p)
    port.eval()
    r = align_forward(t, port, X, calibrate=True, rules=None, by_order=True, localise=False)
    assert r.options["findings"][0] == (
        "the port's values are bfloat16, held in float32 (its parameters are float32, so "
        "precision='auto' read float32): pass precision='bfloat16' to judge it against the "
        "reference run in bfloat16, with the float32 run as the noise")
    # the same port judged as it says
    told = align_forward(t, port, X, calibrate=True, by_order=True, localise=False,
                         precision="bfloat16")
    assert not any(f.startswith("the port's values are") for f in told.options.get("findings", ()))
