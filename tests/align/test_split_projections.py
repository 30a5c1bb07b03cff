"""The reverse of a fused port (``reprod.align.fusion.Split``): a reference that fuses Linears
the port keeps apart, one ``qkv_proj`` for the port's ``q_proj``, ``k_proj`` and ``v_proj``
(grouped-query: ``k`` and ``v`` narrower), one ``gate_up_proj`` for ``gate_proj`` and
``up_proj``, as Hugging Face's Phi-3 holds them against a port written as LLaMA is.

The reference here is a hand-written torch block reading its fused output side by side (as
Phi-3 does) or per key-value head (as GPT-NeoX reads its ``query_key_value``); the port is
Paddle with a Linear a projection. tests/realworld/test_split_ports_real.py runs Phi-3 itself
against PaddleNLP's LLaMA.
"""

from __future__ import annotations

import numpy as np
import pytest

from reprod.align.fusion import Split, find_splits, split
from reprod.align.rules import ConversionRules, active_splits

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, compare_structure, convert, load_into_paddle  # noqa: E402

E, H, KV, D = 16, 4, 2, 4  # hidden, query heads, key-value heads, head size
INPUTS = {"x": np.random.default_rng(0).standard_normal((2, 5, E)).astype(np.float32)}
QKV = (H + 2 * KV) * D


class _Ref(torch.nn.Module):
    """``per_group``: the fused output read per key-value head ([q_i | k_i | v_i] for each),
    else side by side ([q | k | v])."""

    def __init__(self, per_group: bool = False):
        super().__init__()
        self.per_group = per_group
        self.attn = torch.nn.Module()
        self.attn.qkv_proj = torch.nn.Linear(E, QKV)
        self.attn.o_proj = torch.nn.Linear(H * D, E)
        self.mlp = torch.nn.Module()
        self.mlp.gate_up_proj = torch.nn.Linear(E, 48, bias=False)
        self.mlp.down_proj = torch.nn.Linear(24, E, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        a = self.attn
        mixed = a.qkv_proj(x)
        if self.per_group:
            q, k, v = mixed.view(b, s, KV, -1).split([H // KV * D, D, D], dim=-1)
        else:
            q, k, v = mixed.split([H * D, KV * D, KV * D], dim=-1)
        q = q.reshape(b, s, H, D).transpose(1, 2)
        k = k.reshape(b, s, KV, D).repeat_interleave(H // KV, dim=2).transpose(1, 2)
        v = v.reshape(b, s, KV, D).repeat_interleave(H // KV, dim=2).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, dim=-1)
        x = x + a.o_proj((w @ v).transpose(1, 2).reshape(b, s, H * D))
        gate, up = self.mlp.gate_up_proj(x).chunk(2, dim=-1)
        return x + self.mlp.down_proj(torch.nn.functional.silu(gate) * up)


class _Port(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.attn = paddle.nn.Layer()
        self.attn.q_proj = paddle.nn.Linear(E, H * D)
        self.attn.k_proj = paddle.nn.Linear(E, KV * D)
        self.attn.v_proj = paddle.nn.Linear(E, KV * D)
        self.attn.o_proj = paddle.nn.Linear(H * D, E)
        self.mlp = paddle.nn.Layer()
        self.mlp.gate_proj = paddle.nn.Linear(E, 24, bias_attr=False)
        self.mlp.up_proj = paddle.nn.Linear(E, 24, bias_attr=False)
        self.mlp.down_proj = paddle.nn.Linear(24, E, bias_attr=False)

    def forward(self, x):
        b, s, _ = x.shape
        a = self.attn
        q = a.q_proj(x).reshape([b, s, H, D]).transpose([0, 2, 1, 3])
        k, v = (paddle.repeat_interleave(t.reshape([b, s, KV, D]), H // KV, axis=2)
                .transpose([0, 2, 1, 3]) for t in (a.k_proj(x), a.v_proj(x)))
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / D ** 0.5, axis=-1)
        x = x + a.o_proj((w @ v).transpose([0, 2, 1, 3]).reshape([b, s, H * D]))
        m = self.mlp
        return x + m.down_proj(paddle.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


def _models(per_group: bool = False):
    torch.manual_seed(0)
    tm = _Ref(per_group)
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(0, 0.3)
    return tm.eval(), _Port()


def reference():
    return _Ref()


def port():
    return _Port()


def _rows(w: torch.Tensor, a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` of a torch Linear's weight in Paddle's layout."""
    return w.detach().numpy()[a:b].T


# --- found from shapes, cut as numpy slices ------------------------------------------------------

def test_a_split_is_found_from_shapes_in_the_port_s_order_with_its_bias_beside_its_weight():
    converted = {"attn.qkv_proj.weight": (E, QKV), "attn.qkv_proj.bias": (QKV,),
                 "attn.o_proj.weight": (H * D, E), "attn.o_proj.bias": (E,)}
    port = {"attn.k_proj.weight": (E, KV * D), "attn.k_proj.bias": (KV * D,),
            "attn.q_proj.weight": (E, H * D), "attn.q_proj.bias": (H * D,),
            "attn.v_proj.weight": (E, KV * D), "attn.v_proj.bias": (KV * D,),
            "attn.o_proj.weight": (H * D, E), "attn.o_proj.bias": (E,)}
    found = {s.ref_key: s for s in find_splits(converted, port)}
    assert set(found) == {"attn.qkv_proj.weight", "attn.qkv_proj.bias"}
    # the port defines k first; a fused projection holds query, key, value in that order
    assert found["attn.qkv_proj.weight"].parts == (
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
    assert found["attn.qkv_proj.weight"].sizes == (H * D, KV * D, KV * D)
    # without the output projection named alike on both sides, shapes that add up say nothing
    del converted["attn.o_proj.weight"], converted["attn.o_proj.bias"]
    assert find_splits(converted, port) == []


def test_the_parts_are_numpy_s_slices_side_by_side_and_in_groups():
    rng = np.random.default_rng(1)
    whole = rng.standard_normal((3, 16))
    parts = ("q.weight", "k.weight", "v.weight")
    side = Split("qkv.weight", parts, (8, 4, 4))
    out = split({"qkv.weight": whole, "o.weight": whole[:, :2]}, [side])
    assert list(out) == [*parts, "o.weight"]
    for got, want in zip((out[p] for p in parts), np.split(whole, [8, 12], axis=-1)):
        np.testing.assert_array_equal(got, want)
    two = split({"qkv.weight": whole}, [Split("qkv.weight", parts, (8, 4, 4), groups=2)])
    np.testing.assert_array_equal(two["q.weight"], np.concatenate([whole[:, 0:4], whole[:, 8:12]],
                                                                  axis=-1))
    np.testing.assert_array_equal(two["k.weight"], np.concatenate([whole[:, 4:6], whole[:, 12:14]],
                                                                  axis=-1))


# --- conversion, structure, loading ------------------------------------------------------------

def test_the_structure_shows_a_row_a_part_with_the_reference_s_whole_tensor_and_matches():
    tm, pm = _models()
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table(only_problems=True)
    split_rows = report.rows_with("split")
    # part by part, each weight beside its bias, as the port lists them
    assert [(r.paddle_name, r.torch_name) for r in split_rows] == [
        (f"attn.{q}_proj.{w}", f"attn.qkv_proj.{w}") for q in "qkv" for w in ("weight", "bias")
    ] + [("mlp.gate_proj.weight", "mlp.gate_up_proj.weight"),
         ("mlp.up_proj.weight", "mlp.gate_up_proj.weight")]
    k = next(r for r in split_rows if r.paddle_name == "attn.k_proj.weight")
    assert (k.torch_shape, k.paddle_shape) == ((QKV, E), (E, KV * D))
    assert k.note == ("split: 8 of its 32 outputs: [q_proj | k_proj | v_proj] side by side; the "
                      "reference fuses what the port keeps apart; transposed")
    assert "3 split into 8" in report.summary_line()
    assert report.torch_total == report.paddle_total


def test_loaded_the_port_s_parts_are_the_rows_of_the_reference_s_tensor_and_it_aligns():
    tm, pm = _models()
    load_into_paddle(pm, tm)
    w, b = tm.attn.qkv_proj.weight, tm.attn.qkv_proj.bias.detach().numpy()
    np.testing.assert_array_equal(pm.attn.q_proj.weight.numpy(), _rows(w, 0, 16))
    np.testing.assert_array_equal(pm.attn.k_proj.weight.numpy(), _rows(w, 16, 24))
    np.testing.assert_array_equal(pm.attn.v_proj.weight.numpy(), _rows(w, 24, 32))
    np.testing.assert_array_equal(pm.attn.v_proj.bias.numpy(), b[24:32])
    np.testing.assert_array_equal(pm.mlp.up_proj.weight.numpy(),
                                  _rows(tm.mlp.gate_up_proj.weight, 24, 48))
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert r.passed, r.to_table()
    assert active_splits() == ()  # the splits hold for that call only


def test_convert_for_a_port_splits_and_each_part_s_plan_says_where_it_came_from():
    tm, pm = _models()
    conv = convert(tm, paddle_model=pm)
    plan = {p.paddle_name: p for p in conv.plan}
    assert plan["attn.v_proj.weight"].why == (
        "nn.Linear weight; split from attn.qkv_proj.weight (8 of its 32 outputs: [q_proj | k_proj "
        "| v_proj] side by side; the reference fuses what the port keeps apart)")
    assert "attn.qkv_proj.weight" not in conv.weights
    assert conv.split == {"attn.qkv_proj.weight": ("attn.q_proj.weight", "attn.k_proj.weight",
                                                   "attn.v_proj.weight"),
                          "attn.qkv_proj.bias": ("attn.q_proj.bias", "attn.k_proj.bias",
                                                 "attn.v_proj.bias"),
                          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
    assert conv.summary_line().startswith(
        "11 tensors converted, 3 of the reference's split into 8: 7 transposed")
    # without the port, nothing says the reference's tensors are to be split
    assert "attn.qkv_proj.weight" in convert(tm).weights


def test_a_reference_reading_per_group_loads_with_its_groups_and_aligns_only_so():
    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    load_into_paddle(pm, tm, rules=rules)
    # group i of the reference's tensor: [q_i (8) | k_i (4) | v_i (4)]
    w = tm.attn.qkv_proj.weight
    np.testing.assert_array_equal(pm.attn.k_proj.weight.numpy(),
                                  np.concatenate([_rows(w, 8, 12), _rows(w, 24, 28)], axis=1))
    assert align_forward(tm, pm, INPUTS, calibrate=True, rules=rules).passed
    load_into_paddle(pm, tm)  # side by side: q takes k's and v's rows
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    assert "fuse_groups={'qkv_proj': 2}" in r.options["divergence"]["hint"]


def test_reprod_convert_writes_the_port_s_parts_for_its_paddle_model(tmp_path):
    import os

    from reprod.align.cli import main
    from reprod.storage.framework_files import read_pdparams

    here = os.path.abspath(__file__)
    tm, pm = _models()
    src, dst = str(tmp_path / "m.pth"), str(tmp_path / "m.pdparams")
    torch.save(tm.state_dict(), src)
    assert main([src, dst, "--model", f"{here}:reference", "--paddle-model",
                 f"{here}:port", "-q"]) == 0
    written = read_pdparams(dst)
    assert "attn.qkv_proj.weight" not in written
    np.testing.assert_array_equal(written["attn.k_proj.weight"],
                                  _rows(tm.attn.qkv_proj.weight, 16, 24))
    pm.set_state_dict(written)
    assert align_forward(tm, pm, INPUTS, calibrate=True).passed


# --- layer captures and training steps ------------------------------------------------------

def test_a_bug_in_one_part_is_localised_at_the_port_s_layer_for_it():
    tm, pm = _models()
    load_into_paddle(pm, tm)
    w = pm.mlp.up_proj.weight
    w.set_value(w.numpy() * 1.01)
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "mlp.up_proj", div
    assert "input aligned" in div["message"] and "constant factor 0.990099" in div["message"]


def test_training_steps_judge_the_reference_s_fused_gradients_weights_and_moments_as_parts():
    from reprod.align import align_train

    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    load_into_paddle(pm, tm, rules=rules)
    tm.train()
    pm.train()

    def run():
        return align_train(
            tm, pm, [(INPUTS, None)], steps=2, calibrate=True, rules=rules,
            torch_loss_fn=lambda out, *_: out.square().mean(),
            paddle_loss_fn=lambda out, *_: out.square().mean(),
            torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-2),
            paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-2,
                                                    parameters=pm.parameters()))

    r = run()
    assert r.passed, r.to_table(failed_only=True)
    keys = {k.key for k in r.results}
    for what in ("grad", "param"):
        assert {f"step1/{what}/attn.{q}_proj.{w}" for q in "qkv" for w in ("weight", "bias")} \
            <= keys
        assert f"step1/{what}/mlp.up_proj.weight" in keys
    assert "step1/opt/attn.k_proj.weight.moment2" in keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    # the recorded gradient of k is the k rows (8:12, 24:28) of torch's fused gradient
    k_rows = np.r_[8:12, 24:28]
    assert np.isclose(np.abs(tm.attn.qkv_proj.weight.detach().numpy()[k_rows].T
                             - pm.attn.k_proj.weight.numpy()).max(), 0, atol=1e-5)

    # a bug in the port's value projection, found at that layer in step 0
    tm2, pm2 = _models(per_group=True)
    tm.load_state_dict(tm2.state_dict())
    load_into_paddle(pm, tm, rules=rules)
    b = pm.attn.v_proj.bias
    b.set_value(b.numpy() + 0.05)
    r = run()
    assert not r.passed
    assert r.options["divergence"]["layer"] == "attn.v_proj", r.options["divergence"]


def test_the_reference_s_recorded_state_is_written_into_its_fused_tensor_in_groups():
    """Forcing a step from the reference's state writes each part's recorded weights into its
    rows of the fused tensor, laid out in groups: no view of it, so through an index."""
    from reprod.align.forcing import load_reference_state
    from reprod.align.framework import _torch_params_plan
    from reprod.align.fusion import model_splits
    from reprod.align.rules import port_splitting
    from reprod.logger import ReprodLogger

    tm, pm = _models(per_group=True)
    rules = ConversionRules(fuse_groups={"qkv_proj": KV})
    splits = model_splits(tm, pm, rules)
    assert {(s.torch_key, s.groups, s.axis) for s in splits} == {
        ("attn.qkv_proj.weight", KV, 0), ("attn.qkv_proj.bias", KV, 0),
        ("mlp.gate_up_proj.weight", 1, 0)}
    with port_splitting(splits):
        plan = _torch_params_plan(tm, rules)
        assert plan["attn.k_proj.weight"].paddle_name == "attn.k_proj.weight"
        assert plan["attn.k_proj.weight"].action == "transpose"
        log = ReprodLogger()
        rng = np.random.default_rng(3)
        recorded = {}
        for name, kp in plan.items():
            value = rng.standard_normal(kp.paddle_shape).astype(np.float32)
            recorded[name] = value
            log.add(f"step0/param/{kp.paddle_name}", value)
        load_reference_state(0, log.data, tm, pm, plan)
    w = tm.attn.qkv_proj.weight.detach().numpy()
    np.testing.assert_array_equal(w[np.r_[8:12, 24:28]], recorded["attn.k_proj.weight"].T)
    np.testing.assert_array_equal(w[np.r_[0:8, 16:24]], recorded["attn.q_proj.weight"].T)
    np.testing.assert_array_equal(tm.attn.qkv_proj.bias.detach().numpy()[np.r_[12:16, 28:32]],
                                  recorded["attn.v_proj.bias"])
    np.testing.assert_array_equal(pm.attn.k_proj.weight.numpy(), recorded["attn.k_proj.weight"])


def test_split_in_the_wrong_layout_the_divergence_names_the_layout_the_reference_reads():
    """Loaded side by side, each part is cut alike from the reference's captures and aligns;
    the code reading them diverges, and splitting in 2 groups (the reference's key-value heads)
    is named, the port's weights put back after."""
    tm, pm = _models(per_group=True)
    load_into_paddle(pm, tm)
    before = pm.attn.k_proj.weight.numpy().copy()
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "<model>" and div["hint"] == (
        "attn.qkv_proj.weight holds q_proj, k_proj, v_proj laid out [q_proj_1 | k_proj_1 | "
        "v_proj_1 | ...] in 2 groups, and they were split from it as [q_proj | k_proj | v_proj] "
        "side by side: split so, the port aligns; load with "
        "ConversionRules(fuse_groups={'qkv_proj': 2})")
    np.testing.assert_array_equal(pm.attn.k_proj.weight.numpy(), before)


def test_a_torch_file_loads_into_the_port_s_parts_and_a_misfit_is_named(tmp_path):
    """A ``.pth`` read without its model is split as the model is; where the parts' outputs do
    not add up to the reference's tensor nothing is split, and loading names each key."""
    from reprod.errors import ReprodError

    tm, pm = _models()
    path = tmp_path / "ref.pth"
    torch.save(tm.state_dict(), path)
    load_into_paddle(pm, str(path))
    np.testing.assert_array_equal(pm.attn.v_proj.weight.numpy(),
                                  _rows(tm.attn.qkv_proj.weight, 24, 32))
    np.testing.assert_array_equal(pm.mlp.gate_proj.weight.numpy(),
                                  _rows(tm.mlp.gate_up_proj.weight, 0, 24))
    assert align_forward(tm, pm, INPUTS, calibrate=True).passed

    narrow = _Port()
    narrow.mlp.up_proj = paddle.nn.Linear(E, 20, bias_attr=False)  # 24 + 20 is not 48
    with pytest.raises(ReprodError) as err:
        load_into_paddle(narrow, tm)
    message = str(err.value)
    assert "mlp.gate_up_proj.weight" in message and "mlp.up_proj.weight" in message
    # the attention's split is unaffected
    assert [r.paddle_name for r in compare_structure(tm, narrow).rows_with("split")] == [
        f"attn.{q}_proj.{w}" for q in "qkv" for w in ("weight", "bias")]


def _load_parts(pm, tm, order=("q", "k", "v"), groups=1):
    """The port's attention loaded by a porter's own script: the reference's qkv rows cut
    ``groups`` ways, the pieces given to the parts in ``order``; the rest by reprod."""
    load_into_paddle(pm, tm)
    w = tm.attn.qkv_proj.weight.detach().numpy()
    b = tm.attn.qkv_proj.bias.detach().numpy()
    sizes = {"q": H * D, "k": KV * D, "v": KV * D}
    rows: dict[str, list[int]] = {q: [] for q in order}
    start = 0
    for _ in range(groups):
        for q in order:
            n = sizes[q] // groups
            rows[q] += list(range(start, start + n))
            start += n
    for q in order:
        proj = getattr(pm.attn, f"{q}_proj")
        proj.weight.set_value(w[rows[q]].T.copy())
        proj.bias.set_value(b[rows[q]].copy())


def test_parts_a_script_split_per_group_are_judged_so_and_the_layout_read_is_named():
    """The port's parts hold the reference's tensor cut in 2 groups (the porter's script):
    they are judged as cut so, each aligns, and the code reading them is where the layout
    the reference reads (side by side) is named."""
    from reprod.align.fusion import model_splits

    tm, pm = _models()
    _load_parts(pm, tm, groups=2)
    assert {s.torch_key: s.groups for s in model_splits(tm, pm)} == {
        "attn.qkv_proj.weight": 2, "attn.qkv_proj.bias": 2, "mlp.gate_up_proj.weight": 1}
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    assert r.options["divergence"]["hint"] == (
        "attn.qkv_proj.weight holds q_proj, k_proj, v_proj laid out [q_proj | k_proj | v_proj] "
        "side by side, and they were split from it as [q_proj_1 | k_proj_1 | v_proj_1 | ...] in "
        "2 groups: split so, the port aligns; load with "
        "ConversionRules(fuse_groups={'qkv_proj': 1})")


def test_parts_a_script_split_in_another_order_are_named_so_at_the_first_part():
    tm, pm = _models()
    _load_parts(pm, tm, order=("k", "v", "q"))
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "attn.q_proj"
    assert div["hint"] == (
        "the port's q_proj, k_proj, v_proj hold attn.qkv_proj.weight's outputs cut as [k_proj | "
        "v_proj | q_proj] side by side, and the reference reads them as [q_proj | k_proj | "
        "v_proj] side by side: its q_proj, k_proj, v_proj in another order")


def test_parts_holding_none_of_the_reference_s_outputs_are_named_so():
    tm, pm = _models()
    load_into_paddle(pm, tm)
    rng = np.random.default_rng(5)
    pm.attn.k_proj.weight.set_value(rng.standard_normal((E, KV * D)).astype(np.float32))
    r = align_forward(tm, pm, INPUTS, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "attn.k_proj"
    assert div["hint"].endswith("their values are not the reference's")


class _GradScaled(paddle.autograd.PyLayer):
    """The identity forward; its backward scales the gradient by 1.01 (a hand-written backward
    gone wrong)."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


class _BackwardBugPort(_Port):
    def forward(self, x):
        b, s, _ = x.shape
        a = self.attn
        q = a.q_proj(x).reshape([b, s, H, D]).transpose([0, 2, 1, 3])
        k, v = (paddle.repeat_interleave(t.reshape([b, s, KV, D]), H // KV, axis=2)
                .transpose([0, 2, 1, 3]) for t in (a.k_proj(x), _GradScaled.apply(a.v_proj(x))))
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / D ** 0.5, axis=-1)
        x = x + a.o_proj((w @ v).transpose([0, 2, 1, 3]).reshape([b, s, H * D]))
        m = self.mlp
        return x + m.down_proj(paddle.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))


def test_a_backward_only_bug_beside_a_part_is_localised_with_the_gradients_cut_as_parts():
    """The forward aligns and the gradient of v_proj's output is 1% off: the backward pass is
    localised between o_proj and v_proj, the reference's fused weight gradient cut into the
    parts' (turned to Paddle's layout first: cut in torch's, its rows would be read as
    columns)."""
    from reprod.align import align_train

    tm, _ = _models()
    pm = _BackwardBugPort()
    load_into_paddle(pm, tm)
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(INPUTS, None)], steps=1, calibrate=True,
        torch_loss_fn=lambda out, *_: out.square().mean(),
        paddle_loss_fn=lambda out, *_: out.square().mean(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=1e-2),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=1e-2, parameters=pm.parameters()))
    assert not r.passed
    div = r.options["divergence"]
    assert (div["layer"], div["direction"], div["step"]) == ("attn.v_proj", "backward", 0)
    assert "although attn.o_proj aligns" in div["message"]
    assert "gradient of param attn.v_proj.bias" in div["message"]
    status = {k.key: k.status for k in r.results}
    assert status["step0/logits"] == "passed"
    # the scaled gradient reaches v's weight, not q's (its path does not pass the scale)
    assert status["step0/grad/attn.v_proj.weight"] == "failed"
    assert status["step0/grad/attn.q_proj.weight"] == "passed"


# --- by order: a port of other names, in the reference's order ----------------------------------

class _Renamed(paddle.nn.Layer):
    """``_Port`` under other names (``attention.query``... ``ffn.gate``...), defined in the
    reference's order: by name nothing pairs; by order timm-like ``qkv_proj`` pairs with the
    run ``query``, ``key``, ``value``, and ``gate_up_proj`` with ``gate``, ``up``."""

    def __init__(self):
        super().__init__()
        self.attention = paddle.nn.Layer()
        self.attention.query = paddle.nn.Linear(E, H * D)
        self.attention.key = paddle.nn.Linear(E, KV * D)
        self.attention.value = paddle.nn.Linear(E, KV * D)
        self.attention.out = paddle.nn.Linear(H * D, E)
        self.ffn = paddle.nn.Layer()
        self.ffn.gate = paddle.nn.Linear(E, 24, bias_attr=False)
        self.ffn.up = paddle.nn.Linear(E, 24, bias_attr=False)
        self.ffn.down = paddle.nn.Linear(24, E, bias_attr=False)

    def forward(self, x):
        b, s, _ = x.shape
        a = self.attention
        q = a.query(x).reshape([b, s, H, D]).transpose([0, 2, 1, 3])
        k, v = (paddle.repeat_interleave(t.reshape([b, s, KV, D]), H // KV, axis=2)
                .transpose([0, 2, 1, 3]) for t in (a.key(x), a.value(x)))
        w = paddle.nn.functional.softmax(q @ k.transpose([0, 1, 3, 2]) / D ** 0.5, axis=-1)
        x = x + a.out((w @ v).transpose([0, 2, 1, 3]).reshape([b, s, H * D]))
        f = self.ffn
        return x + f.down(paddle.nn.functional.silu(f.gate(x)) * f.up(x))


def test_by_order_one_reference_layer_pairs_with_the_run_of_port_layers_it_holds():
    from reprod.align import pair_weights_by_order

    tm, _ = _models()
    pm = _Renamed()
    pairs = pair_weights_by_order(tm, pm)
    # the fused tensors named under the port's parent, by their own layer's name
    assert pairs["attn.qkv_proj.weight"] == "attention.qkv_proj.weight"
    assert pairs["attn.qkv_proj.bias"] == "attention.qkv_proj.bias"
    assert pairs["attn.o_proj.weight"] == "attention.out.weight"
    assert pairs["mlp.gate_up_proj.weight"] == "ffn.gate_up_proj.weight"
    report = compare_structure(tm, pm, by_order=True)
    assert report.ok, report.to_table(only_problems=True)
    assert [(r.paddle_name, r.torch_name) for r in report.rows_with("split")][:2] == [
        ("attention.query.weight", "attn.qkv_proj.weight"),
        ("attention.query.bias", "attn.qkv_proj.bias")]
    assert "3 split into 8" in report.summary_line()


def test_by_order_the_split_loads_aligns_and_a_bug_in_a_part_is_named():
    tm, _ = _models()
    pm = _Renamed()
    load_into_paddle(pm, tm, by_order=True)
    np.testing.assert_array_equal(pm.attention.key.weight.numpy(),
                                  _rows(tm.attn.qkv_proj.weight, 16, 24))
    np.testing.assert_array_equal(pm.ffn.up.weight.numpy(),
                                  _rows(tm.mlp.gate_up_proj.weight, 24, 48))
    r = align_forward(tm, pm, INPUTS, calibrate=True, by_order=True)
    assert r.passed, r.to_table()
    b = pm.attention.value.bias
    b.set_value(b.numpy() + 0.05)
    r = align_forward(tm, pm, INPUTS, calibrate=True, by_order=True)
    assert not r.passed
    div = r.options["divergence"]
    assert "input aligned" in div["message"], div
    assert div.get("port_layer", div["layer"]) == "attention.value", div


def test_by_order_training_steps_judge_the_fused_tensors_as_the_port_s_parts():
    from reprod.align import align_train

    tm, _ = _models()
    pm = _Renamed()
    load_into_paddle(pm, tm, by_order=True)
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(INPUTS, None)], steps=2, calibrate=True, by_order=True,
        torch_loss_fn=lambda out, *_: out.square().mean(),
        paddle_loss_fn=lambda out, *_: out.square().mean(),
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-2),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-2, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    keys = {k.key for k in r.results}
    assert {"step1/grad/attention.key.weight", "step1/param/ffn.up.weight",
            "step1/opt/attention.value.bias.moment2"} <= keys


class _RefOutputFirst(_Ref):
    """The reference defining its output projection before its fused one, as Phi-3 does."""

    def __init__(self, per_group: bool = False):
        super().__init__(per_group)
        qkv = self.attn.qkv_proj
        del self.attn.qkv_proj
        self.attn.qkv_proj = qkv  # after o_proj


def test_by_order_a_run_holding_a_layer_named_as_the_reference_s_is_refused_not_mispaired():
    """By shape, o_proj [16, 16] pairs with the port's q_proj and qkv_proj [32, 16] with k_proj,
    v_proj, o_proj (8 + 8 + 16): the port's o_proj in that run is named as a layer of the
    reference beside it, so the pairing is refused, as it was before splits were looked for."""
    from reprod.align import pair_weights_by_order
    from reprod.errors import KeyMismatchError

    torch.manual_seed(0)
    tm = _RefOutputFirst().eval()
    assert list(tm.state_dict())[:3] == ["attn.o_proj.weight", "attn.o_proj.bias",
                                         "attn.qkv_proj.weight"]
    with pytest.raises(KeyMismatchError, match="pairing by order failed"):
        pair_weights_by_order(tm, _Port())
    # by name it splits and loads
    pm = _Port()
    load_into_paddle(pm, tm)
    assert align_forward(tm, pm, INPUTS, calibrate=True).passed


def test_by_order_refused_the_error_says_the_models_pair_by_name():
    from reprod.align import load_into_paddle as load
    from reprod.errors import KeyMismatchError

    torch.manual_seed(0)
    tm = _RefOutputFirst().eval()
    with pytest.raises(KeyMismatchError) as err:
        load(_Port(), tm, by_order=True)
    message = str(err.value)
    assert message.startswith("pairing by order failed")
    by_name = compare_structure(tm, _Port())
    assert by_name.ok and "3 split into 8" in by_name.summary_line()
    assert message.endswith(f" | by name the models pair ({by_name.summary_line()}): leave "
                            "by_order off")
    # where the names do not pair either, the refusal is as it was
    with pytest.raises(KeyMismatchError) as err:
        load(_Port(), _seeded_mlp_only(), by_order=True)
    assert str(err.value).startswith("pairing by order failed") and "by name" not in str(err.value)


def _seeded_mlp_only():
    """A reference holding the port's MLP and no attention: no pairing, by order or by name."""
    torch.manual_seed(0)
    tm = _Ref()
    del tm.attn
    return tm.eval()
