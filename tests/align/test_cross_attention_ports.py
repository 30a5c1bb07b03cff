"""torch's ``nn.MultiheadAttention`` with ``kdim``/``vdim`` other than ``embed_dim`` (cross
attention over another model's features) ported to Paddle's ``nn.MultiHeadAttention(kdim=,
vdim=)``.

torch then keeps the three projection weights apart, as ``q_proj_weight`` [E, E],
``k_proj_weight`` [E, kdim] and ``v_proj_weight`` [E, vdim], their biases still packed in one
``in_proj_bias`` [3E]; Paddle holds ``q_proj``, ``k_proj`` and ``v_proj`` Linears ([E, E],
[kdim, E], [vdim, E] and [E] each). Before, the three weights were "missing" on one side and
"extra" on the other, and nothing loaded.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import (  # noqa: E402
    align_forward,
    align_train,
    compare_structure,
    convert,
    load_into_paddle,
    pair_weights_by_order,
)
from reprod.align.rules import packed_slices, split_attention  # noqa: E402

E, KD, VD = 16, 12, 10
_RNG = np.random.default_rng(0)
INPUTS = {"q": _RNG.standard_normal((2, 5, E)).astype(np.float32),
          "k": _RNG.standard_normal((2, 7, KD)).astype(np.float32),
          "v": _RNG.standard_normal((2, 7, VD)).astype(np.float32)}


class _T(torch.nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(E, 4, kdim=KD, vdim=VD, batch_first=True,
                                                bias=bias)
        self.head = torch.nn.Linear(E, 3)

    def forward(self, q, k, v):
        return self.head(self.attn(q, k, v, need_weights=False)[0])


class _P(paddle.nn.Layer):
    def __init__(self, names=("attn", "head"), bias=True):
        super().__init__()
        self.names = names
        setattr(self, names[0], paddle.nn.MultiHeadAttention(
            E, 4, kdim=KD, vdim=VD, bias_attr=None if bias else False))
        setattr(self, names[1], paddle.nn.Linear(E, 3))

    def forward(self, q, k, v):
        return getattr(self, self.names[1])(getattr(self, self.names[0])(q, k, v))


def _models(bias=True, names=("attn", "head")):
    torch.manual_seed(0)
    tm = _T(bias)
    with torch.no_grad():  # every tensor matters: no zero biases
        for p in tm.parameters():
            p.normal_(0, 0.3)
    pm = _P(names, bias)
    return tm.eval(), pm


def test_the_apart_weights_are_renamed_in_paddle_s_order_and_the_bias_split_beside_them():
    sd = _T().state_dict()
    split, origin = split_attention(sd)
    assert list(split) == [f"attn.{q}_proj.{w}" for q in "qkv" for w in ("weight", "bias")] + [
        "attn.out_proj.weight", "attn.out_proj.bias", "head.weight", "head.bias"]
    b = sd["attn.in_proj_bias"].numpy()
    for i, q in enumerate("qkv"):
        np.testing.assert_array_equal(split[f"attn.{q}_proj.weight"].numpy(),
                                      sd[f"attn.{q}_proj_weight"].numpy())
        np.testing.assert_array_equal(split[f"attn.{q}_proj.bias"].numpy(), b[E * i:E * (i + 1)])
    assert origin["attn.k_proj.weight"] == "attn.k_proj_weight"
    assert origin["attn.v_proj.bias"] == "attn.in_proj_bias"
    # each tensor's slices: the apart weights whole, the bias by rows
    slices = packed_slices(sd)
    assert slices["attn.k_proj_weight"] == [("attn.k_proj.weight", (slice(None),))]
    assert [n for n, _ in slices["attn.in_proj_bias"]] == [
        "attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"]
    # without biases, the weights alone
    assert list(split_attention(_T(bias=False).state_dict())[0])[:3] == [
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"]
    # a tensor so named whose rows are not the attention's E is kept as it is
    odd = {"k_proj_weight": np.zeros((5, 12)), "out_proj.weight": np.zeros((8, 8))}
    assert list(split_attention(odd)[0]) == ["k_proj_weight", "out_proj.weight"]


@pytest.mark.parametrize("bias", [True, False])
def test_a_cross_attention_port_loads_checks_and_computes_the_same(bias):
    tm, pm = _models(bias)
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table()
    conv = convert(tm)
    k = next(p for p in conv.plan if p.torch_name == "attn.k_proj.weight")
    assert k.action == "transpose" and "attn.k_proj_weight renamed" in k.why
    load_into_paddle(pm, tm)
    # independent references: torch's own weights and output
    np.testing.assert_array_equal(pm.attn.v_proj.weight.numpy(),
                                  tm.attn.v_proj_weight.detach().numpy().T)
    if bias:
        np.testing.assert_array_equal(pm.attn.k_proj.bias.numpy(),
                                      tm.attn.in_proj_bias.detach().numpy()[E:2 * E])
    with torch.no_grad():
        ref = tm(*(torch.from_numpy(INPUTS[n]) for n in "qkv")).numpy()
    out = pm(*(paddle.to_tensor(INPUTS[n]) for n in "qkv")).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


def test_a_renamed_cross_attention_port_pairs_by_order():
    tm, pm = _models(names=("cross", "out"))
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["attn.k_proj.weight"] == "cross.k_proj.weight"
    assert pairs["attn.v_proj.bias"] == "cross.v_proj.bias"
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, INPUTS, by_order=True, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


def test_a_key_projection_off_by_one_percent_fails_at_the_attention():
    tm, pm = _models()
    load_into_paddle(pm, tm)
    pm.attn.k_proj.weight.set_value(pm.attn.k_proj.weight.numpy() * 1.01)
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    assert r.options["divergence"]["layer"] == "attn"


def test_a_renamed_port_s_key_projection_bug_is_named_at_its_attention_by_order():
    tm, pm = _models(names=("cross", "out"))
    load_into_paddle(pm, tm, by_order=True)
    pm.cross.k_proj.weight.set_value(pm.cross.k_proj.weight.numpy() * 1.05)
    r = align_forward(tm, pm, INPUTS, by_order=True, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert (div["layer"], div["port_layer"]) == ("attn", "cross"), div


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_align_train_records_the_apart_weights_under_paddle_s_names(optimizer):
    tm, pm = _models()
    load_into_paddle(pm, tm)
    tm.train()
    pm.train()
    if optimizer == "momentum":
        topt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
        popt = paddle.optimizer.Momentum(0.05, 0.9, parameters=pm.parameters())
    else:
        topt = torch.optim.Adam(tm.parameters(), lr=1e-3)
        popt = paddle.optimizer.Adam(1e-3, parameters=pm.parameters())
    batch = ((INPUTS["q"], INPUTS["k"], INPUTS["v"]), np.array([[0] * 5, [1] * 5]))

    def tloss(out, y):
        return torch.nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1))

    def ploss(out, y):
        return paddle.nn.functional.cross_entropy(out.reshape([-1, 3]), y.reshape([-1]))

    r = align_train(tm, pm, [batch], steps=3, calibrate=True, torch_loss_fn=tloss,
                    paddle_loss_fn=ploss, torch_optimizer=topt, paddle_optimizer=popt)
    assert r.passed, r.to_table(failed_only=True)
    keys = set(r.keys())
    accumulator = "velocity" if optimizer == "momentum" else "moment1"
    for q in "qkv":
        assert f"step2/grad/attn.{q}_proj.weight" in keys
        assert f"step2/param/attn.{q}_proj.bias" in keys
        assert f"step2/opt/attn.{q}_proj.weight.{accumulator}" in keys
    assert not any("_proj_weight" in k or "in_proj" in k for k in keys)
    # torch's key projection, trained, is Paddle's transposed: an independent check
    np.testing.assert_allclose(pm.attn.k_proj.weight.numpy(),
                               tm.attn.k_proj_weight.detach().numpy().T, rtol=1e-4, atol=1e-6)


def test_a_forced_step_writes_into_the_apart_weights_and_the_packed_bias():
    from reprod.align import forcing
    from reprod.align.framework import _torch_params_plan
    from reprod.align.rules import unaliased

    tm, pm = _models()
    load_into_paddle(pm, tm)
    plan = _torch_params_plan(tm, None)
    data = {f"step0/param/{k}": v.numpy() * 1.5 for k, v in unaliased(pm.state_dict())[0].items()}
    forcing.load_reference_state(0, data, tm, pm, plan)
    np.testing.assert_array_equal(tm.attn.k_proj_weight.detach().numpy(),
                                  data["step0/param/attn.k_proj.weight"].T)
    np.testing.assert_array_equal(tm.attn.in_proj_bias.detach().numpy()[2 * E:],
                                  data["step0/param/attn.v_proj.bias"])
