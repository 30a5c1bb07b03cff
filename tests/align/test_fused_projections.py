"""A port that fuses Linears the reference keeps apart (``reprod.align.fusion``): one ``qkv``
for ``q``, ``k`` and ``v`` (with grouped-query attention's narrower ``k`` and ``v``), one
``gate_up`` for ``gate`` and ``up``.

The reference here is a hand-written grouped-query attention block in torch; the ports hold
one fused Linear each and split its output either side by side or per key-value head, as
PaddleNLP's LLaMA with ``fuse_attention_qkv`` does (tests/realworld/test_llama_real.py runs
that port itself).
"""

from __future__ import annotations

import numpy as np
import pytest

from reprod.align.fusion import Fusion, find_fusions, fuse, group_choices, regroup, unfuse
from reprod.align.rules import ConversionRules
from reprod.errors import ReprodError

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, compare_structure, load_into_paddle  # noqa: E402

E, H, KV, D = 16, 4, 2, 4  # hidden, query heads, key-value heads, head size
INPUTS = {"x": np.random.default_rng(0).standard_normal((2, 5, E)).astype(np.float32)}


class _Ref(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.q_proj = torch.nn.Linear(E, H * D)
        self.attn.k_proj = torch.nn.Linear(E, KV * D)
        self.attn.v_proj = torch.nn.Linear(E, KV * D)
        self.attn.o_proj = torch.nn.Linear(H * D, E)
        self.mlp = torch.nn.Module()
        self.mlp.gate_proj = torch.nn.Linear(E, 24, bias=False)
        self.mlp.up_proj = torch.nn.Linear(E, 24, bias=False)
        self.mlp.down_proj = torch.nn.Linear(24, E, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        a = self.attn
        q = a.q_proj(x).view(b, s, H, D).transpose(1, 2)
        k = a.k_proj(x).view(b, s, KV, D).repeat_interleave(H // KV, dim=2).transpose(1, 2)
        v = a.v_proj(x).view(b, s, KV, D).repeat_interleave(H // KV, dim=2).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)
        x = x + a.o_proj((w @ v).transpose(1, 2).reshape(b, s, H * D))
        m = self.mlp
        return x + m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


class _Port(paddle.nn.Layer):
    """``per_group``: the fused output read per key-value head ([q_i | k_i | v_i] for each),
    as PaddleNLP's LLaMA reads its ``qkv_proj``; else side by side ([q | k | v])."""

    def __init__(self, per_group: bool, scale: float = 1.0):
        super().__init__()
        self.per_group, self.scale = per_group, scale
        self.attn = paddle.nn.Layer()
        self.attn.qkv_proj = paddle.nn.Linear(E, (H + 2 * KV) * D)
        self.attn.o_proj = paddle.nn.Linear(H * D, E)
        self.attn.num_key_value_heads = KV
        self.mlp = paddle.nn.Layer()
        self.mlp.gate_up_proj = paddle.nn.Linear(E, 48, bias_attr=False)
        self.mlp.down_proj = paddle.nn.Linear(24, E, bias_attr=False)

    def forward(self, x):
        b, s, _ = x.shape
        a = self.attn
        mixed = a.qkv_proj(x)
        if self.per_group:
            mixed = mixed.reshape([b, s, KV, (H // KV + 2) * D])
            q, k, v = paddle.split(mixed, [H // KV * D, D, D], axis=-1)
            q = q.reshape([b, s, H, D])
        else:
            q, k, v = paddle.split(mixed, [H * D, KV * D, KV * D], axis=-1)
            q, k, v = q.reshape([b, s, H, D]), k.reshape([b, s, KV, D]), v.reshape([b, s, KV, D])
        k = paddle.repeat_interleave(k, H // KV, axis=2).transpose([0, 2, 1, 3])
        v = paddle.repeat_interleave(v, H // KV, axis=2).transpose([0, 2, 1, 3])
        q = q.transpose([0, 2, 1, 3])
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / D ** 0.5 * self.scale,
                                         axis=-1)
        x = x + a.o_proj((w @ v).transpose([0, 2, 1, 3]).reshape([b, s, H * D]))
        gate, up = paddle.chunk(self.mlp.gate_up_proj(x), 2, axis=-1)
        return x + self.mlp.down_proj(paddle.nn.functional.silu(gate) * up)


def _seeded(tm):
    """``tm`` with seeded weights, every bias too, in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.3)
    return tm.eval()


def _models(per_group: bool, scale: float = 1.0):
    return _seeded(_Ref()), _Port(per_group, scale)


# --- the layouts, against numpy's own concatenation --------------------------------------------

def test_side_by_side_is_numpy_s_concatenation_and_groups_take_a_piece_of_each_in_turn():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((3, n)) for n in (8, 4, 4))
    side = Fusion("qkv.weight", ("q.weight", "k.weight", "v.weight"), (8, 4, 4), 1)
    arrays = {"q.weight": q, "k.weight": k, "v.weight": v, "o.weight": q[:, :2]}
    out = fuse(arrays, [side])
    assert list(out) == ["qkv.weight", "o.weight"]
    np.testing.assert_array_equal(out["qkv.weight"], np.concatenate([q, k, v], axis=-1))
    two = Fusion(side.port_key, side.parts, side.sizes, 2)
    want = np.concatenate([q[:, :4], k[:, :2], v[:, :2], q[:, 4:], k[:, 2:], v[:, 2:]], axis=-1)
    np.testing.assert_array_equal(fuse(arrays, [two])["qkv.weight"], want)
    for got, part in zip(unfuse(want, two), (q, k, v)):
        np.testing.assert_array_equal(got, part)
    np.testing.assert_array_equal(regroup(want, two, 1), np.concatenate([q, k, v], axis=-1))
    assert group_choices(side) == [2, 4]


def test_a_fusion_is_found_from_shapes_under_one_parent_with_its_bias_beside_its_weight():
    converted = {"a.q.weight": (16, 16), "a.q.bias": (16,), "a.k.weight": (16, 8),
                 "a.k.bias": (8,), "a.v.weight": (16, 8), "a.v.bias": (8,),
                 "a.o.weight": (16, 16), "b.q.weight": (16, 16)}
    port = {"a.qkv.weight": (16, 32), "a.qkv.bias": (32,), "a.o.weight": (16, 16),
            "b.q.weight": (16, 16)}
    found = {f.port_key: f for f in find_fusions(converted, port)}
    assert found["a.qkv.weight"].parts == ("a.q.weight", "a.k.weight", "a.v.weight")
    assert found["a.qkv.bias"].parts == ("a.q.bias", "a.k.bias", "a.v.bias")
    assert found["a.qkv.weight"].sizes == (16, 8, 8)
    # another parent, other leading axes, or a run of one: no fusion
    o = {"a.o.weight": (16, 16), "b.o.weight": (16, 16)}  # the layer both name alike
    assert find_fusions({**o, "b.q.weight": (16, 16), "b.k.weight": (16, 16)},
                        {**o, "a.qkv.weight": (16, 32)}) == []
    assert find_fusions({**o, "a.q.weight": (16, 16), "a.k.weight": (8, 16)},
                        {**o, "a.qkv.weight": (16, 32)}) == []
    assert find_fusions({**o, "a.q.weight": (16, 32)}, {**o, "a.qkv.weight": (16, 32)}) == []
    assert len(find_fusions({**o, "a.q.weight": (16, 16), "a.k.weight": (16, 16)},
                            {**o, "a.qkv.weight": (16, 32)})) == 1


def test_without_a_layer_named_alike_beside_them_or_a_weight_fused_nothing_fuses():
    """A port whose every layer is named otherwise: a BatchNorm's weight [8] and a Conv's bias
    [8] add up to a Linear's bias [16], and are no fusion of it."""
    converted = {"conv.bias": (8,), "bn.weight": (8,), "fc.weight": (8, 16)}
    port = {"renamed_fc.bias": (16,), "renamed_fc.weight": (8, 16)}
    assert find_fusions(converted, port) == []
    # the same parent holds a layer named alike, but no weight fused: the bias stays apart
    assert find_fusions({**converted, "head.weight": (16, 4)},
                        {**port, "head.weight": (16, 4)}) == []
    # the two weights with no layer named alike beside them
    assert find_fusions({"q.weight": (16, 16), "k.weight": (16, 16)},
                        {"qkv.weight": (16, 32)}) == []


def test_a_port_tensor_two_runs_could_fill_is_left_alone():
    o = {"a.o.weight": (8, 8)}
    converted = {**o, "a.p.weight": (4, 8), "a.q.weight": (4, 8), "a.r.weight": (4, 8)}
    assert find_fusions(converted, {**o, "a.pq.weight": (4, 16)}) == []
    assert len(find_fusions({**o, "a.p.weight": (4, 8), "a.q.weight": (4, 8)},
                            {**o, "a.pq.weight": (4, 16)})) == 1


def test_groups_come_from_the_rules_and_must_divide_every_part():
    converted = {"a.q.weight": (16, 16), "a.k.weight": (16, 8), "a.v.weight": (16, 8),
                 "a.o.weight": (16, 16)}
    port = {"a.qkv.weight": (16, 32), "a.o.weight": (16, 16)}
    rules = ConversionRules(fuse_groups={r"qkv": 4})
    assert find_fusions(converted, port)[0].groups == 1
    assert find_fusions(converted, port, rules)[0].groups == 4
    with pytest.raises(ReprodError, match=r"fuse_groups 'qkv': 3 groups do not divide "
                                          r"a\.qkv\.weight's parts \(16, 8, 8 outputs\)"):
        find_fusions(converted, port, ConversionRules(fuse_groups={"qkv": 3}))
    with pytest.raises(ReprodError, match="must be a .pattern, groups >= 1. pair"):
        ConversionRules(fuse_groups={"qkv": 0})
    kept = ConversionRules.from_pairs({"x": "y"}, base=rules)
    assert kept.fuse_groups == (("qkv", 4),)


# --- loading, structure and localisation on real models -----------------------------------------

def test_the_structure_shows_each_part_fused_into_the_port_s_tensor_and_matches():
    tm, pm = _models(per_group=False)
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table(only_problems=True)
    fused = {r.torch_name: r for r in report.rows_with("fused")}
    assert set(fused) == {f"attn.{q}_proj.{w}" for q in "qkv" for w in ("weight", "bias")} | {
        "mlp.gate_proj.weight", "mlp.up_proj.weight"}
    assert fused["attn.k_proj.weight"].paddle_name == "attn.qkv_proj.weight"
    assert "8 of its 32 outputs: [q_proj | k_proj | v_proj] side by side" in \
        fused["attn.k_proj.weight"].note
    assert not report.rows_with("extra") and not report.rows_with("missing")
    assert report.summary_line().startswith(
        "structure matches: 3 tensors, 2 transposed on conversion, 8 fused into 3; ")


def test_loaded_side_by_side_the_weights_are_the_reference_s_and_the_port_aligns():
    tm, pm = _models(per_group=False)
    load_into_paddle(pm, tm)
    w = pm.attn.qkv_proj.weight.numpy()
    np.testing.assert_array_equal(w[:, :16], tm.attn.q_proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(w[:, 24:], tm.attn.v_proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(pm.attn.qkv_proj.bias.numpy()[16:24],
                                  tm.attn.k_proj.bias.detach().numpy())
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert r.passed, r.to_table()


def test_a_port_reading_per_group_aligns_when_loaded_with_its_groups():
    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    load_into_paddle(pm, tm, rules=rules)
    r = align_forward(tm, pm, INPUTS, calibrate=True, rules=rules, layers=True)
    assert r.passed, r.to_table()
    # the fused layers' outputs are judged as the reference's parts, cut as the weights lie
    assert r.options["layers"] == {"judged": 16, "passed": True}


def test_the_fused_output_is_cut_into_the_parts_as_its_weights_lie():
    from reprod.align.fusion import split_captures

    out = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)
    f = Fusion("a.qkv.weight", ("a.q.weight", "a.k.weight", "a.v.weight"), (4, 4, 4), 2)
    ref = {"a.q.in": 0, "a.q.grad_in": 0, "a.q.out": 0, "b.out": 0}
    port = {"a.qkv.in": out[:, :3], "a.qkv.out": out, "a.qkv.grad_in": out[:, :3],
            "param.a.qkv.weight.grad": out, "b.out": 1}
    kept, got = split_captures(ref, port, [f])
    assert list(kept) == ["a.q.in", "a.q.out", "b.out"]  # the parts' input gradients: none
    np.testing.assert_array_equal(got["a.k.out"], out[:, [2, 3, 8, 9]])
    np.testing.assert_array_equal(got["param.a.v.weight.grad"], out[:, [4, 5, 10, 11]])
    np.testing.assert_array_equal(got["a.v.in"], out[:, :3])
    assert "a.qkv.out" not in got and not any("grad_in" in k for k in got)


def test_loaded_in_the_wrong_layout_the_divergence_names_the_layout_that_aligns():
    tm, pm = _models(per_group=True)
    load_into_paddle(pm, tm)  # side by side: not how this port reads it
    before = pm.attn.qkv_proj.weight.numpy().copy()
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    hint = r.options["divergence"]["hint"]
    assert hint == ("attn.qkv_proj.weight holds q_proj, k_proj, v_proj laid out [q_proj | k_proj "
                    "| v_proj] side by side, and the port reads them as [q_proj_1 | k_proj_1 | "
                    "v_proj_1 | ...] in 2 groups: with that layout it aligns; load with "
                    "ConversionRules(fuse_groups={'qkv_proj': 2})")
    # the layouts tried are put back
    np.testing.assert_array_equal(pm.attn.qkv_proj.weight.numpy(), before)


def test_a_bug_no_layout_mends_gets_no_layout_hint():
    tm, pm = _models(per_group=False, scale=1.5)  # the attention's scale is wrong
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    hint = r.options["divergence"]["hint"] or ""
    assert "fuse_groups" not in hint


def test_training_steps_judge_the_fused_tensors_gradients_weights_and_moments_as_the_parts():
    from reprod.align import align_train

    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    load_into_paddle(pm, tm, rules=rules)
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(INPUTS, None)], steps=2, calibrate=True, rules=rules,
        torch_loss_fn=lambda out, *_: out.square().mean(),
        paddle_loss_fn=lambda out, *_: out.square().mean(),
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-2),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-2, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    keys = {k.key for k in r.results}
    for what in ("grad", "param"):
        assert {f"step1/{what}/attn.{q}_proj.{w}" for q in "qkv" for w in ("weight", "bias")} \
            <= keys
        assert f"step1/{what}/mlp.up_proj.weight" in keys
    assert "step1/opt/attn.k_proj.weight.moment2" in keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    # after the steps the port's k columns (8:12 and 24:28, in 2 groups) hold torch's k
    moved = pm.attn.qkv_proj.weight.numpy()
    np.testing.assert_allclose(np.concatenate([moved[:, 8:12], moved[:, 24:28]], axis=1),
                               tm.attn.k_proj.weight.detach().numpy().T, rtol=1e-4, atol=1e-6)


class _MHA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(E, H, batch_first=True)
        self.head = torch.nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


class _HandWritten(paddle.nn.Layer):
    """torch's MultiheadAttention written out with one ``qkv`` Linear, read side by side."""

    def __init__(self):
        super().__init__()
        self.attn = paddle.nn.Layer()
        self.attn.qkv = paddle.nn.Linear(E, 3 * E)
        self.attn.out_proj = paddle.nn.Linear(E, E)
        self.head = paddle.nn.Linear(E, 3)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.reshape([b, s, H, E // H]).transpose([0, 2, 1, 3])
                   for t in paddle.split(self.attn.qkv(x), 3, axis=-1))
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / (E // H) ** 0.5, -1)
        return self.head(self.attn.out_proj((w @ v).transpose([0, 2, 1, 3]).reshape([b, s, E])))


def test_torch_s_packed_attention_loads_into_a_port_s_fused_qkv_and_aligns():
    """torch's ``in_proj_weight`` is split into Paddle's q/k/v_proj names (``split_attention``),
    which the port's one ``qkv`` fuses again: the rows of ``in_proj_weight``, transposed."""
    tm = _seeded(_MHA())
    pm = _HandWritten()
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table(only_problems=True)
    assert {r.torch_name for r in report.rows_with("fused")} == {
        f"attn.{q}_proj.{w}" for q in "qkv" for w in ("weight", "bias")}
    load_into_paddle(pm, tm)
    np.testing.assert_array_equal(pm.attn.qkv.weight.numpy(),
                                  tm.attn.in_proj_weight.detach().numpy().T)
    np.testing.assert_array_equal(pm.attn.qkv.bias.numpy(), tm.attn.in_proj_bias.detach().numpy())
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert r.passed, r.to_table()


def per_group_port():
    return _Port(per_group=True)


def reference():
    return _Ref()


def test_convert_for_a_port_fuses_and_each_part_s_plan_says_where_it_went():
    from reprod.align import convert

    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    conv = convert(tm, rules=rules, paddle_model=pm)
    plan = {p.torch_name: p for p in conv.plan}
    assert plan["attn.v_proj.weight"].why == (
        "nn.Linear weight; fused into attn.qkv_proj.weight (8 of its 32 outputs: [q_proj_1 | "
        "k_proj_1 | v_proj_1 | ...] in 2 groups)")
    assert "attn.q_proj.weight" not in conv.weights
    assert conv.fused == {"attn.qkv_proj.weight": ("attn.q_proj.weight", "attn.k_proj.weight",
                                                   "attn.v_proj.weight"),
                          "attn.qkv_proj.bias": ("attn.q_proj.bias", "attn.k_proj.bias",
                                                 "attn.v_proj.bias"),
                          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
    assert conv.summary_line().startswith(
        "6 tensors converted, 8 of the reference's fused into 3: 7 transposed")
    pm.set_state_dict(conv.weights)
    assert align_forward(tm, pm, INPUTS, calibrate=True, rules=rules).passed


def test_reprod_convert_writes_the_fused_tensors_for_its_paddle_model(tmp_path, capsys):
    import os

    from reprod.align.cli import main
    from reprod.storage.framework_files import read_pdparams

    here = os.path.abspath(__file__)
    tm, pm = _models(per_group=True)
    src, dst = str(tmp_path / "m.pth"), str(tmp_path / "m.pdparams")
    torch.save(tm.state_dict(), src)
    assert main([src, dst, "--model", f"{here}:reference", "--paddle-model",
                 f"{here}:per_group_port", "--fuse-groups", "qkv_proj=2", "-q"]) == 0
    pm.set_state_dict(read_pdparams(dst))
    assert align_forward(tm, pm, INPUTS, calibrate=True).passed
    assert main([src, dst, "--paddle-model", f"{here}:per_group_port",
                 "--fuse-groups", "qkv_proj"]) == 2
    assert "fuse-groups 'qkv_proj' must look like PATTERN=N" in capsys.readouterr().err


class _RefKVQ(_Ref):
    """The reference defining key, value, then query (as Hugging Face's BART and OPT do)."""

    def __init__(self):
        super().__init__()
        q = self.attn.q_proj
        del self.attn.q_proj
        self.attn.q_proj = q  # after k_proj and v_proj
        o = self.attn.o_proj
        del self.attn.o_proj
        self.attn.o_proj = o


def test_a_reference_defining_k_v_q_fills_the_fused_tensor_in_q_k_v_order():
    from reprod.align.fusion import _qkv_order

    tm = _seeded(_RefKVQ())
    assert [k for k in tm.state_dict()][:3] == ["attn.k_proj.weight", "attn.k_proj.bias",
                                                "attn.v_proj.weight"]
    pm = _Port(per_group=False)
    load_into_paddle(pm, tm)
    np.testing.assert_array_equal(pm.attn.qkv_proj.weight.numpy()[:, :16],
                                  tm.attn.q_proj.weight.detach().numpy().T)
    assert align_forward(tm, pm, INPUTS, calibrate=True).passed
    assert _qkv_order(["a.key.weight", "a.value.weight", "a.query.weight"]) == [
        "a.query.weight", "a.key.weight", "a.value.weight"]
    # names that do not say which is which keep the reference's order
    assert _qkv_order(["a.w1.weight", "a.w3.weight"]) == ["a.w1.weight", "a.w3.weight"]


def test_a_fused_tensor_filled_in_the_reference_s_definition_order_is_named_so():
    """A porter's own conversion script concatenating BART-style k, v, q as the state dict
    lists them: the port reads q, k, v, and the hint says which order the tensor holds."""
    tm = _seeded(_RefKVQ())
    pm = _Port(per_group=False)
    load_into_paddle(pm, tm)
    a = tm.attn
    pm.attn.qkv_proj.weight.set_value(np.concatenate(
        [m.weight.detach().numpy().T for m in (a.k_proj, a.v_proj, a.q_proj)], axis=1))
    pm.attn.qkv_proj.bias.set_value(np.concatenate(
        [m.bias.detach().numpy() for m in (a.k_proj, a.v_proj, a.q_proj)]))
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    assert r.options["divergence"]["hint"] == (
        "attn.qkv_proj.weight holds k_proj, v_proj, q_proj laid out [k_proj | v_proj | q_proj] "
        "side by side: the reference's q_proj, k_proj, v_proj in another order, which a fused "
        "projection reads as q_proj, k_proj, v_proj")
    # values of no layout at all: not the reference's
    pm.attn.qkv_proj.weight.set_value(pm.attn.qkv_proj.weight.numpy()[::-1].copy())
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert r.options["divergence"]["hint"].startswith(
        "attn.qkv_proj.weight holds the reference's q_proj, k_proj, v_proj in none of the "
        "layouts they allow")


# --- by order: a fused port whose names are its own ---------------------------------------------

class _RenamedPort(paddle.nn.Layer):
    """``_Port(per_group=True)`` with names of its own: ``mixer.wqkv``, ``mixer.wo``,
    ``ffn.w13``, ``ffn.w2``, so nothing pairs by name."""

    def __init__(self):
        super().__init__()
        self.mixer = paddle.nn.Layer()
        self.mixer.wqkv = paddle.nn.Linear(E, (H + 2 * KV) * D)
        self.mixer.wo = paddle.nn.Linear(H * D, E)
        self.ffn = paddle.nn.Layer()
        self.ffn.w13 = paddle.nn.Linear(E, 48, bias_attr=False)
        self.ffn.w2 = paddle.nn.Linear(24, E, bias_attr=False)

    def forward(self, x):
        b, s, _ = x.shape
        mixed = self.mixer.wqkv(x).reshape([b, s, KV, (H // KV + 2) * D])
        q, k, v = paddle.split(mixed, [H // KV * D, D, D], axis=-1)
        q = q.reshape([b, s, H, D]).transpose([0, 2, 1, 3])
        k = paddle.repeat_interleave(k, H // KV, axis=2).transpose([0, 2, 1, 3])
        v = paddle.repeat_interleave(v, H // KV, axis=2).transpose([0, 2, 1, 3])
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / D ** 0.5, axis=-1)
        x = x + self.mixer.wo((w @ v).transpose([0, 2, 1, 3]).reshape([b, s, H * D]))
        gate, up = paddle.chunk(self.ffn.w13(x), 2, axis=-1)
        return x + self.ffn.w2(paddle.nn.functional.silu(gate) * up)


def test_by_order_a_run_of_reference_layers_pairs_with_the_port_layer_fusing_them():
    from reprod.align import pair_weights_by_order

    tm, _ = _models(per_group=True)
    pm = _RenamedPort()
    pairs = pair_weights_by_order(tm, pm)
    assert pairs == {
        "attn.q_proj.weight": "mixer.q_proj.weight", "attn.q_proj.bias": "mixer.q_proj.bias",
        "attn.k_proj.weight": "mixer.k_proj.weight", "attn.k_proj.bias": "mixer.k_proj.bias",
        "attn.v_proj.weight": "mixer.v_proj.weight", "attn.v_proj.bias": "mixer.v_proj.bias",
        "attn.o_proj.weight": "mixer.wo.weight", "attn.o_proj.bias": "mixer.wo.bias",
        "mlp.gate_proj.weight": "ffn.gate_proj.weight", "mlp.up_proj.weight": "ffn.up_proj.weight",
        "mlp.down_proj.weight": "ffn.w2.weight"}
    report = compare_structure(tm, pm, by_order=True)
    assert report.ok, report.to_table(only_problems=True)
    assert {r.paddle_name for r in report.rows_with("fused")} == {
        "mixer.wqkv.weight", "mixer.wqkv.bias", "ffn.w13.weight"}


def test_by_order_the_fused_port_loads_and_aligns_forward_and_in_training():
    from reprod.align import align_train, by_order_rules

    tm, _ = _models(per_group=True)
    pm = _RenamedPort()
    rules = ConversionRules(fuse_groups={"wqkv": KV})
    load_into_paddle(pm, tm, by_order=True, rules=rules)
    np.testing.assert_array_equal(pm.ffn.w13.weight.numpy()[:, 24:],
                                  tm.mlp.up_proj.weight.detach().numpy().T)
    assert align_forward(tm, pm, INPUTS, calibrate=True, by_order=True, rules=rules).passed
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(INPUTS, None)], steps=2, calibrate=True, rules=by_order_rules(tm, pm, rules=rules),
        torch_loss_fn=lambda out, *_: out.square().mean(),
        paddle_loss_fn=lambda out, *_: out.square().mean(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    assert "step1/grad/mixer.k_proj.weight" in {k.key for k in r.results}


def test_by_order_a_wrong_layout_is_put_after_the_last_part_and_named():
    tm, _ = _models(per_group=True)
    pm = _RenamedPort()
    load_into_paddle(pm, tm, by_order=True)  # side by side: not how this port reads it
    r = align_forward(tm, pm, INPUTS, calibrate=True, by_order=True)
    assert not r.passed
    assert "although attn.v_proj aligns" in r.options["findings"][0]
    assert r.options["divergence"]["hint"].endswith(
        "in 2 groups: with that layout it aligns; load with "
        "ConversionRules(fuse_groups={'wqkv': 2})")


def test_by_order_a_fusion_at_the_model_s_root_pairs_and_loads():
    """Two reference Linears [8 -> 4] against one port Linear [8 -> 8], beside a head each:
    the parts take their own names at the port's root, which loading fuses."""
    from reprod.align.by_order import _order_plan

    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 4),
                                         torch.nn.Linear(8, 2))

    class P(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.ab, self.out = paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 2)

    tm, pm = T(), P()
    plan = _order_plan(tm, pm, None)
    assert not plan.problems
    assert [pk for _, pk, _ in plan.pairs] == ["a.weight", "a.bias", "b.weight", "b.bias",
                                                "out.weight", "out.bias"]
    load_into_paddle(pm, tm, by_order=True)
    np.testing.assert_array_equal(pm.ab.weight.numpy()[:, 4:], tm.b.weight.detach().numpy().T)
    np.testing.assert_array_equal(pm.ab.bias.numpy()[:4], tm.a.bias.detach().numpy())


def test_by_order_with_a_fusion_bare_parameters_pair_by_shape_wherever_defined():
    """torchvision's ViT defines its class token before its patch embedding, PaddleClas's after;
    with a fusion to read, each bare parameter pairs with the one of its shape."""
    from reprod.align.by_order import _order_plan

    class T(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token = torch.nn.Parameter(torch.zeros(1, 1, 8))
            self.a, self.b, self.head = (torch.nn.Linear(8, 4), torch.nn.Linear(8, 4),
                                         torch.nn.Linear(8, 2))
            self.table = torch.nn.Parameter(torch.zeros(1, 5, 8))

    class P(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.pos = self.create_parameter([1, 5, 8])
            self.cls = self.create_parameter([1, 1, 8])
            self.ab, self.out = paddle.nn.Linear(8, 8), paddle.nn.Linear(8, 2)

    plan = _order_plan(T(), P(), None)
    assert not plan.problems
    pairs = {tk: pk for tk, pk, _ in plan.pairs}
    assert pairs["token"] == "cls" and pairs["table"] == "pos"
    assert pairs["b.bias"] == "b.bias" and pairs["head.weight"] == "out.weight"

    class Q(P):  # two bare parameters of one shape: which is which, no shape says
        def __init__(self):
            super().__init__()
            self.pos = self.create_parameter([1, 1, 8])

    assert _order_plan(T(), Q(), None).problems


def test_forced_steps_load_the_reference_s_state_and_moments_into_the_fused_tensors():
    """After two identical AdamW steps each side holds its own moments; torch's, loaded into
    Paddle's accumulators through the fusions, are what Paddle computed itself for the fused
    tensors, and the recorded weights fuse back into the port's."""
    import copy

    from reprod.align.forcing import load_paddle_optimizer, load_reference_state
    from reprod.align.framework import _torch_params_plan
    from reprod.align.fusion import model_fusions
    from reprod.logger import ReprodLogger

    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    load_into_paddle(pm, tm, rules=rules)
    fusions = [f for f, _ in model_fusions(tm, pm, rules)]
    assert {f.port_key for f in fusions} == {"attn.qkv_proj.weight", "attn.qkv_proj.bias",
                                             "mlp.gate_up_proj.weight"}
    topt = torch.optim.AdamW(tm.parameters(), lr=1e-2)
    popt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=pm.parameters())
    x = INPUTS["x"]
    for _ in range(2):
        topt.zero_grad()
        tm(torch.from_numpy(x)).square().mean().backward()
        topt.step()
        popt.clear_grad()
        pm(paddle.to_tensor(x)).square().mean().backward()
        popt.step()
    own = {(a, p): np.array(t.numpy()) for a, d in popt._accumulators.items()
           for p, t in d.items()}
    for t in (t for d in popt._accumulators.values() for t in d.values()):
        t.set_value(np.zeros(t.shape, np.float32))
    plan = _torch_params_plan(tm, rules)
    load_paddle_optimizer(popt, copy.deepcopy(topt.state_dict()), topt, tm, pm, plan, fusions)
    fused_name = pm.attn.qkv_proj.weight.name
    for (a, p), value in own.items():
        got = popt._accumulators[a][p].numpy()
        # the two models trained apart by float32 rounding: a part in the wrong columns is
        # off by the moments themselves (1e-2)
        np.testing.assert_allclose(got, value, rtol=1e-3, atol=1e-6, err_msg=f"{a} {p}")
    assert any(p == fused_name for _, p in own)
    # the reference's recorded weights after a step, fused back into the port's tensors
    log = ReprodLogger()
    for name, p in tm.named_parameters():
        kp = plan[name]
        value = p.detach().numpy()
        log.add(f"step0/param/{kp.paddle_name}", value.T if kp.action == "transpose" else value)
    pm.attn.qkv_proj.weight.set_value(np.zeros([E, (H + 2 * KV) * D], np.float32))
    load_reference_state(0, log.data, tm, pm, plan, fusions)
    got = pm.attn.qkv_proj.weight.numpy()
    np.testing.assert_array_equal(got[:, 8:12], tm.attn.k_proj.weight.detach().numpy().T[:, :4])
