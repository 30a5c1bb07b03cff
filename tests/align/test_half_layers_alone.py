"""A half-precision port's layers, each judged alone on the half reference's input.

Judged in the whole run, a layer's bfloat16 noise (its distance from the float32 model) holds all
the rounding upstream and the rounding of the weights, which the port shares: a weight 2 % off
passed there (resnet18 0.84x, a BERT query 5 % off 0.81x) where float32 fails it at 10^4x.
Each paired layer of the port now runs alone on the half reference's recorded input, against
the half-weights twin (the torch model holding the half weights, in float32) on the same input.

The port computes as a GPU half kernel does (half weights and inputs widened to float32, the
result rounded to the half dtype), as in test_half_precision_forward.py: Paddle has no
half-precision kernels for these operations on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
F = paddle.nn.functional

from half_kernels import HalfGELU as _Gelu  # noqa: E402
from half_kernels import HalfLayerNorm as _LN  # noqa: E402
from half_kernels import HalfLinear as _Lin  # noqa: E402

from reprod import compare  # noqa: E402
from reprod.align import align_forward, load_into_paddle  # noqa: E402
from reprod.align.calibration import _half_weights_twin, half_rounded_keys  # noqa: E402
from reprod.capture import record  # noqa: E402
from reprod.diff.noise import LOW_PRECISION_NOISE_FACTOR  # noqa: E402

X = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
DEPTH = 4  # blocks of Linear, LayerNorm, GELU
BUGGED = 6  # the port's Linear of the third block (Sequential index 6)


def _torch_net():
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.GELU()]
    m = torch.nn.Sequential(*layers, torch.nn.Linear(32, 4))
    with torch.no_grad():  # every tensor matters: no zero biases or unit LayerNorm
        for name, p in m.named_parameters():
            p.normal_(1.0 if name.endswith("weight") and p.ndim == 1 else 0.0, 0.3)
    return m.eval()


def _port(dtype, *, bug=1.0, unfused=False, keep_norms=False):
    t = _torch_net()
    layers = []
    for _ in range(DEPTH):
        layers += [_Lin(32, 32), _LN(32), _Gelu()]
    p = paddle.nn.Sequential(*layers, _Lin(32, 4))
    load_into_paddle(p, t)
    if bug != 1.0:
        p[BUGGED].weight.set_value(p[BUGGED].weight.numpy() * np.float32(bug))
    for layer in p:
        if isinstance(layer, _Lin):
            layer.unfused = unfused
        if not (keep_norms and isinstance(layer, _LN)):  # Paddle's AMP O2 keeps norms float32
            layer.to(dtype=dtype)
    p.eval()
    return t, p


def _whole_run_multiple(t, p, dtype, layer):
    """The layer's multiple as the whole run judges it: the half reference's capture against
    the port's, the float32 model's capture the noise."""
    td = getattr(torch, dtype)
    half = _torch_net().to(td).eval()
    with record(half) as ref, torch.no_grad():
        half(torch.from_numpy(X).to(td))
    with record(t) as noise, torch.no_grad():
        t(torch.from_numpy(X))
    with record(p) as port, paddle.no_grad():
        p(paddle.to_tensor(X).astype(dtype))
    r = compare(dict(ref.data), dict(port.data), noise=dict(noise.data))
    return r[f"{layer}.out"].noise_multiple


@pytest.mark.parametrize("dtype,bug", [("bfloat16", 1.02), ("float16", 1.003)])
def test_a_weight_bug_the_whole_run_noise_hides_fails_its_layer_alone(dtype, bug):
    t, p = _port(dtype, bug=bug)
    # the wrong verdict this fixes: in the whole run, the bug is within the layer's noise
    assert _whole_run_multiple(t, p, dtype, str(BUGGED)) < LOW_PRECISION_NOISE_FACTOR
    r = align_forward(t, p, X, calibrate=True)
    assert not r.passed
    alone = r.options["layers"]["alone"]
    assert not r.options["layers"]["passed"] and not alone["passed"]
    assert alone["largest"]["key"] == f"{BUGGED}.out"
    assert r.options["divergence"]["layer"] == str(BUGGED) and r.options["divergence"]["alone"]
    failing = [kr.key for kr in r.results if not kr.passed]
    assert failing == [f"alone/{BUGGED}.out"], r.to_table()
    multiple = r[f"alone/{BUGGED}.out"].noise_multiple
    assert multiple > LOW_PRECISION_NOISE_FACTOR
    assert any(f"diverges at {BUGGED} (Linear)" in f and "replayed alone" in f
               for f in r.options["findings"])
    # the multiple, by hand: the torch half layer and the port's on the same half input, the
    # half weights in float32 the noise
    td = getattr(torch, dtype)
    half = _torch_net().to(td).eval()
    with record(half) as ref, torch.no_grad():
        half(torch.from_numpy(X).to(td))
    x_in = np.asarray(ref.data[f"{BUGGED}.in"], np.float32)
    want = np.asarray(ref.data[f"{BUGGED}.out"], np.float64)
    w = torch.from_numpy(x_in)
    lin = t[BUGGED]
    with torch.no_grad():
        twin = torch.nn.functional.linear(w, lin.weight.to(td).float(), lin.bias.to(td).float())
    with paddle.no_grad():
        got = p[BUGGED](paddle.to_tensor(x_in).astype(dtype)).astype("float32").numpy()
    d, n = got.astype(np.float64) - want, twin.numpy().astype(np.float64) - want
    # each noise no lower than an eighth of a half unit (L2) and half a unit (max) at the
    # values' scale
    eps = {"bfloat16": 2.0**-7, "float16": 2.0**-10}[dtype]
    n_l2 = max(np.linalg.norm(n), eps / 8 * np.linalg.norm(want))
    n_max = max(np.abs(n).max(), eps / 2 * np.abs(want).max())
    by_hand = max(np.linalg.norm(d) / n_l2, np.abs(d).max() / n_max)
    np.testing.assert_allclose(multiple, by_hand, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_faithful_half_kernels_of_another_rounding_pass_alone(dtype):
    for unfused in (False, True):
        t, p = _port(dtype, unfused=unfused)
        r = align_forward(t, p, X, calibrate=True)
        assert r.passed, r.to_table()
        layers = r.options["layers"]
        alone = layers["alone"]
        # every leaf, and the model itself (a container: its own code between its layers)
        assert layers["passed"] and alone["passed"] and alone["judged"] == 3 * DEPTH + 2
        # how close they came: the unfused bias is one more rounding, a few times at most
        assert alone["largest"]["multiple"] < LOW_PRECISION_NOISE_FACTOR / 2


def test_the_noise_twin_rounds_what_the_port_holds_in_half():
    t, p = _port("bfloat16")
    assert half_rounded_keys(t, p, "bfloat16")[0] is None  # every weight
    t, p = _port("float32")
    keys, how = half_rounded_keys(t, p, "bfloat16")
    assert keys == set() and "float32" in how
    # Paddle's AMP O2 keeps norm layers in float32: their reference weights are not rounded
    t, p = _port("bfloat16", keep_norms=True)
    keys, how = half_rounded_keys(t, p, "bfloat16")
    norms = {f"{i}.{w}" for i in range(1, 3 * DEPTH, 3) for w in ("weight", "bias")}
    assert keys == {k for k, _ in t.named_parameters()} - norms
    twin = _half_weights_twin(t, "bfloat16", keys)
    for name, v in twin.named_parameters():
        orig = dict(t.named_parameters())[name]
        want = orig if name in norms else orig.to(torch.bfloat16).float()
        assert v.dtype == torch.float32 and torch.equal(v, want), name
    # and that port, faithful, passes
    r = align_forward(t, p, X, calibrate=True, precision="bfloat16")
    assert r.passed and r.options["half_noise"] == how, r.to_table()


def test_a_float32_port_keeps_the_whole_run_check():
    t, p = _port("float32", bug=1.02)
    r = align_forward(t, p, X, calibrate=True)
    assert not r.passed and "alone" not in r.options.get("layers", {})
    assert r.options["divergence"]["layer"] == str(BUGGED)


class _Hardswish(paddle.nn.Hardswish):
    """Paddle's old fluid Hardswish, slope 1/5, as a half kernel computes it."""

    def forward(self, x):
        v = x.astype("float32")
        return (v * paddle.clip(v * 0.2 + 0.5, 0, 1)).astype(x.dtype)


def test_an_activation_failing_alone_in_half_precision_is_named_with_its_cause():
    torch.manual_seed(0)
    t = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Hardswish(),
                            torch.nn.Linear(32, 4)).eval()
    p = paddle.nn.Sequential(_Lin(32, 32), _Hardswish(), _Lin(32, 4))
    load_into_paddle(p, t)
    p.to(dtype="bfloat16")
    r = align_forward(t, p, X * 3, calibrate=True)
    assert not r.passed and r.options["divergence"]["layer"] == "1"
    assert r.options["divergence"]["alone"]
    assert "likely cause at 1: activation: reference Hardswish (slope 1/6), port Hardswish " \
           "(slope 0.2)" in r.options["findings"], r.options["findings"]


def test_activations_are_recognised_in_the_rounding_of_half_values():
    """Rounded to bfloat16, Hardswish's output is ~2^-9 off its float64 value, 100x the float32
    tolerance a candidate is recognised within: no candidate fitted and no cause was named."""
    from reprod.diagnose.activations import _which

    x = np.linspace(-5, 5, 4001).astype(np.float32)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    for f, name in ((torch.nn.functional.hardswish, "Hardswish (slope 1/6)"),
                    (lambda v: v * torch.clamp(v * 0.2 + 0.5, 0, 1), "Hardswish (slope 0.2)")):
        out = f(xb.float()).to(torch.bfloat16).float().numpy()  # a half kernel: rounded once
        inp = xb.float().numpy()
        assert _which(inp, out) == name
        # in float32 the tolerance stays float32's: the bfloat16 output is no float32 Hardswish
        assert _which(inp, out + np.float32(1e-6) * np.sign(out)) is None


def test_whole_numbers_are_no_half_precision_values():
    """Values with few significant bits are every dtype's: a float32 ReLU of whole numbers keeps
    float32's tolerance."""
    from reprod.diagnose.activations import _half_unit

    rng = np.random.default_rng(0)
    assert _half_unit(np.arange(-50, 50, dtype=np.float32)) == 0.0
    assert _half_unit(np.arange(-50, 50, dtype=np.float32) / 4) == 0.0
    v = rng.standard_normal(1000).astype(np.float32)
    assert _half_unit(v) == 0.0
    assert _half_unit(torch.from_numpy(v).to(torch.bfloat16).float().numpy()) == 2.0**-7
    assert _half_unit(v.astype(np.float16).astype(np.float32)) == 2.0**-10


class _TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.norm(self.fc(x)))


class _PortBlock(paddle.nn.Layer):
    """The block, its residual scaled by ``scale`` in its own code (none of its layers')."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.fc, self.norm, self.scale = _Lin(32, 32), _LN(32), scale

    def forward(self, x):
        h = self.norm(self.fc(x)).astype("float32")
        return (self.scale * x.astype("float32") + F.gelu(h)).astype(x.dtype)


@pytest.mark.parametrize("by_order", [False, True])
def test_a_block_s_own_code_fails_alone_where_its_layers_pass(by_order):
    """The blocks are replayed alone as the layers are (by order, recorded again for it and
    paired by the leaves they hold): a residual 3 % short, code between the layers, passes the
    whole run in bfloat16."""
    torch.manual_seed(0)
    t = torch.nn.Sequential(*[_TorchBlock() for _ in range(4)], torch.nn.Linear(32, 4))
    with torch.no_grad():
        for name, v in t.named_parameters():
            v.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3)
    t.eval()
    for scale, passes in ((1.0, True), (0.97, False)):
        p = paddle.nn.Sequential(*[_PortBlock(scale if i == 2 else 1.0) for i in range(4)],
                                 _Lin(32, 4))
        load_into_paddle(p, t)
        p.to(dtype="bfloat16")
        p.eval()
        r = align_forward(t, p, X, calibrate=True, by_order=by_order)
        assert r.passed is passes, r.to_table()
        alone = r.options["layers"]["alone"]
        assert alone["judged"] == 4 * 2 + 1 + 4 + 1  # leaves, blocks, the model
        if not passes:
            assert r["logits"].passed  # the whole run does not see it
            assert r.options["divergence"]["layer"] == "2" and r.options["divergence"]["alone"]
            assert [kr.key for kr in r.results if not kr.passed][0] == "alone/2.out"


def test_a_port_asked_for_in_half_precision_that_computed_in_float32_is_told():
    """``paddle.amp.auto_cast`` does nothing where Paddle has no half kernels: the port ran in
    float32, and a check asked for bfloat16 said nothing of it."""
    t, p = _port("float32")
    r = align_forward(t, p, X, calibrate=True, precision="bfloat16")
    assert r.options["findings"][0].startswith(
        "precision='bfloat16', but the port's weights and outputs are float32 values: it "
        "computed in float32")
    # a port holding half weights is not told so
    t, p = _port("bfloat16")
    r = align_forward(t, p, X, calibrate=True, precision="bfloat16")
    assert not any("computed in float32" in f for f in r.options.get("findings", ()))


def test_layers_that_cannot_be_replayed_leave_the_whole_run_s_verdict_and_say_so(monkeypatch):
    from reprod.align import forward

    def broken(*a, **k):
        raise RuntimeError("a capture replay cannot read\nmore")

    monkeypatch.setattr(forward, "local_layers", broken)
    t, p = _port("bfloat16")
    r = align_forward(t, p, X, calibrate=True)
    assert r.passed and r.options["layers"]["passed"]
    assert r.options["layers"]["alone"] == {
        "skipped": "the layers could not be replayed alone (RuntimeError: a capture replay "
                   "cannot read)"}


class _TorchGated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x, gate):
        return self.fc(x) * gate


class _PortGated(paddle.nn.Layer):
    """The gate taken in another convention (its complement), as a port may take a mask; its
    own code scales the product by ``scale``."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.fc, self.scale = _Lin(32, 32), scale

    def forward(self, x, gate):
        out = self.fc(x).astype("float32") * (1 - gate.astype("float32")) * self.scale
        return out.astype(x.dtype)


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = _TorchGated(), torch.nn.Linear(32, 4)

    def forward(self, x):
        gate = (x > -1).to(x.dtype)  # a mask: ones but for a sixth of the values
        return self.head(self.block(x, gate))


class _PortGatedNet(paddle.nn.Layer):
    def __init__(self, scale=1.0):
        super().__init__()
        self.block, self.head = _PortGated(scale), _Lin(32, 4)

    def forward(self, x):
        return self.head(self.block(x, (x <= -1).astype(x.dtype)))


@pytest.mark.parametrize("by_order", [False, True])
def test_a_block_taking_several_tensors_is_judged_on_the_port_s_own_mask(by_order):
    """A block its reference called on several tensors replays on the port's own arguments, the
    reference's states in place of the port's (those within a few % of one of the reference's
    of their shape): the port's mask, in its own convention (here the complement), stays. Given
    the reference's gate, the faithful port computed ``fc(x) * 0`` and failed; left to the
    whole run, a product 4 % short passed in bfloat16."""
    torch.manual_seed(0)
    t = _Gated().eval()
    with torch.no_grad():
        for v in t.parameters():
            v.normal_(0.0, 0.3)
    for scale, passes in ((1.0, True), (0.96, False)):
        p = _PortGatedNet(scale)
        load_into_paddle(p, t)
        p.to(dtype="bfloat16")
        r = align_forward(t, p, X, calibrate=True, by_order=by_order)
        assert r.passed is passes, r.to_table()
        alone = r.options["layers"]["alone"]
        assert alone["judged"] == 4  # block.fc, block, head, the model
        assert alone["inputs"] == 2  # block.fc's, head's
        if passes:
            assert alone["largest"]["multiple"] < LOW_PRECISION_NOISE_FACTOR / 2
            continue
        failed = [kr.key for kr in r.results if not kr.passed]
        # the block replayed alone, and its code judged between its layer and the next
        assert [k for k in failed if k.startswith("alone/")] == [
            "alone/block.out", "alone/head.in", "alone/<model>.out"]
        assert r.options["divergence"]["layer"] == "block"
        # by hand: the block's product 4 % short, against the twin's own rounding there
        bf = torch.bfloat16
        w, b = (v.detach().to(bf).float() for v in (t.block.fc.weight, t.block.fc.bias))
        x = torch.from_numpy(X).to(bf).float()
        fc = torch.nn.functional.linear(x, w, b)
        gate = (x > -1).float()
        ref = (fc.to(bf) * gate.to(bf)).float()
        twin = fc * gate
        port = (fc.to(bf).float() * gate * 0.96).to(bf).float()
        eps = 2.0 ** -8
        n_l2 = max(float((twin - ref).norm()), eps / 8 * float(ref.norm()))
        n_max = max(float((twin - ref).abs().max()), eps / 2 * float(ref.abs().max()))
        want = max(float((port - ref).norm()) / n_l2, float((port - ref).abs().max()) / n_max)
        assert want > LOW_PRECISION_NOISE_FACTOR
        assert r["alone/block.out"].noise_multiple == pytest.approx(want, rel=0.05)


def test_which_of_the_reference_s_arguments_a_port_s_argument_is():
    """A port's argument within a few % of one of the reference's of its shape is that one (a
    state, rounded its own way upstream); a mask in another convention, or a state off by more
    (upstream error the verdict would carry), is none, and the port's own stays."""
    from reprod.align.half_local import _counterpart
    from reprod.capture.replay import _Skip

    rng = np.random.default_rng(0)
    state = rng.standard_normal((4, 8))
    mask = np.where(rng.random((4, 8)) < 0.2, -1e4, 0.0)
    near = state * 1.02
    assert _counterpart(near, [state, mask]) is state
    assert _counterpart(near * 1.2, [state, mask]) is None  # 20 % off: not the same tensor
    assert _counterpart(np.where(mask < 0, 1.0, 0.0), [state, mask]) is None  # another mask
    assert _counterpart(np.where(mask < 0, -np.inf, 0.0), [state, mask]) is None
    assert _counterpart(mask.copy(), [state, mask]) is mask  # the same mask: the reference's
    ids = np.arange(8)
    assert _counterpart(ids.astype(np.int32), [ids, state]) is ids  # ids: any integer dtype
    with pytest.raises(_Skip, match="two of the reference's inputs"):
        _counterpart(near, [state, state * 1.01])
    assert _counterpart(near, [state, state.copy()]) is state  # one tensor passed twice
