"""A GPT-2 block as Hugging Face writes it against a Paddle port written as PaddleNLP's GPT is:
HF's ``Conv1D`` layers (a Linear whose weight is [in, out], as Paddle's Linear holds one), the
query, key and value packed side by side in one ``c_attn`` [E, 3E], norms defined before the
Linears; the port holds ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and its norms after its
Linears. tests/realworld/test_gpt2_real.py runs the real pair (transformers' GPT2Model against
PaddleNLP's GPTModel)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from align_twins import perturbed  # noqa: E402

from reprod.align import (  # noqa: E402
    align_forward,
    align_train,
    load_into_paddle,
    pair_weights_by_order,
)
from reprod.align.by_order import _order_plan  # noqa: E402
from reprod.align.conversion import convert  # noqa: E402
from reprod.align.framework import pair_outputs  # noqa: E402
from reprod.align.rules import known_layouts, packed_slices, split_attention, torch_views  # noqa: E402

E, HEADS, B, L = 16, 4, 2, 5


class Conv1D(tnn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D``, as it is written."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = tnn.Parameter(torch.empty(nx, nf))
        self.bias = tnn.Parameter(torch.zeros(nf))
        tnn.init.normal_(self.weight, std=0.3)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class HFAttention(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(3 * E, E), Conv1D(E, E)

    def forward(self, x):
        d = E // HEADS
        q, k, v = self.c_attn(x).split(E, dim=2)

        def heads(t):
            return t.view(B, L, HEADS, d).transpose(1, 2)

        probs = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / d ** 0.5, dim=-1)
        return self.c_proj((probs @ heads(v)).transpose(1, 2).reshape(B, L, E))


class HFMLP(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * E, E), Conv1D(E, 4 * E)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


class HFBlock(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn = tnn.LayerNorm(E), HFAttention()
        self.ln_2, self.mlp = tnn.LayerNorm(E), HFMLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class HFModel(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.h = tnn.ModuleList([HFBlock(), HFBlock()])
        self.ln_f = tnn.LayerNorm(E)

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return {"last_hidden_state": self.ln_f(x)}


class GPTLayerNorm(pnn.LayerNorm):
    """PaddleNLP's: a LayerNorm by its base class, not its name."""


class PaddleBlock(pnn.Layer):
    """As PaddleNLP's GPTDecoderLayer: attention first, then the Linears, the norms last."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = pnn.MultiHeadAttention(E, HEADS)
        self.linear1, self.linear2 = pnn.Linear(E, 4 * E), pnn.Linear(4 * E, E)
        self.norm1, self.norm2 = GPTLayerNorm(E), GPTLayerNorm(E)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h)
        return x + self.linear2(paddle.nn.functional.gelu(self.linear1(self.norm2(x))))


class PaddleModel(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.layers = pnn.LayerList([PaddleBlock(), PaddleBlock()])
        self.norm = GPTLayerNorm(E)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)  # a lone tensor where HF returns a one-field ModelOutput


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    paddle.seed(0)
    tm = perturbed(HFModel().eval(), "ln")
    pm = PaddleModel()
    pm.eval()
    return tm, pm


X = np.random.default_rng(0).standard_normal((B, L, E)).astype(np.float32)


def _outputs(tm, pm):
    with torch.no_grad():
        t = tm(torch.tensor(X))["last_hidden_state"].numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(X)).numpy()
    return t, p


def _numpy_block0_q(tm) -> np.ndarray:
    """Block 0's query projection computed from HF's packed tensors with numpy alone."""
    w = tm.h[0].attn.c_attn.weight.detach().numpy()
    b = tm.h[0].attn.c_attn.bias.detach().numpy()
    x = tm.h[0].ln_1(torch.tensor(X)).detach().numpy()
    return x @ w[:, :E] + b[:E]


def test_c_attn_splits_by_columns_and_conv1d_weights_are_not_transposed(pair) -> None:
    tm, pm = pair
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["h.0.attn.q_proj.weight"] == "layers.0.self_attn.q_proj.weight"
    assert pairs["h.0.attn.v_proj.bias"] == "layers.0.self_attn.v_proj.bias"
    assert pairs["h.0.attn.c_proj.weight"] == "layers.0.self_attn.out_proj.weight"
    assert pairs["h.0.ln_1.weight"] == "layers.0.norm1.weight"
    assert pairs["h.1.mlp.c_fc.weight"] == "layers.1.linear1.weight"
    assert pairs["ln_f.bias"] == "norm.bias"
    assert len(pairs) == 2 * 16 + 2
    # Conv1D holds [in, out] as Paddle does: nothing is transposed, square weights included
    assert [tk for tk, _, t in _order_plan(tm, pm, None).pairs if t] == []
    slices = split_attention(tm.state_dict())[0]
    np.testing.assert_array_equal(slices["h.0.attn.k_proj.weight"].numpy(),
                                  tm.h[0].attn.c_attn.weight.detach().numpy()[:, E:2 * E])


def test_the_port_loaded_by_order_computes_the_reference(pair) -> None:
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-5)
    # the port's query projection is HF's first E columns, checked with numpy alone
    with paddle.no_grad():
        x = pm.layers[0].norm1(paddle.to_tensor(X))
        q = pm.layers[0].self_attn.q_proj(x).numpy()
    np.testing.assert_allclose(q, _numpy_block0_q(tm), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_file_tells_its_conv1d_layout_without_the_model(pair, tmp_path) -> None:
    """From a .pth file there is no model to say which weights are Linear ones: the name
    heuristic would transpose every square one (c_proj, the q/k/v slices). A c_attn packed by
    columns says the file is GPT-2's, its Conv1D weights [in, out]."""
    tm, pm = pair
    path = tmp_path / "gpt2.pth"
    torch.save(tm.state_dict(), path)
    known = known_layouts(tm.state_dict())
    assert known["h.0.attn.c_proj.weight"] is False and known["h.1.attn.q_proj.weight"] is False
    assert known_layouts(tnn.MultiheadAttention(E, HEADS).state_dict())["q_proj.weight"] is True
    result = convert(path, by_order=True, paddle_model=pm)
    assert not [p.torch_name for p in result.plan if p.action == "transpose"]
    why = {p.torch_name: p.why for p in result.plan}["h.0.attn.v_proj.weight"]
    assert "columns of h.0.attn.c_attn.weight" in why
    load_into_paddle(pm, path, by_order=True)
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-5)
    # without the pairing by order, a name rule-less conversion keeps the same layouts
    plain = convert(path)
    assert not [p.torch_name for p in plain.plan if p.action == "transpose"]


def test_packed_column_views_write_into_the_packed_tensor(pair) -> None:
    tm, _ = pair
    sd = tm.state_dict()
    views = dict(torch_views(sd.items(), packed_slices(sd)))
    views["h.1.attn.v_proj.weight"].fill_(7.0)
    assert (tm.h[1].attn.c_attn.weight[:, 2 * E:] == 7.0).all()
    assert not (tm.h[1].attn.c_attn.weight[:, :2 * E] == 7.0).any()


def test_a_lone_tensor_pairs_with_a_one_field_model_output() -> None:
    x = np.zeros((2, 3), np.float32)
    out, renamed = pair_outputs({"logits/last_hidden_state": x}, {"logits": x})
    assert renamed == {"logits": "logits/last_hidden_state"} and list(out) == list(renamed.values())
    # a lone tensor of another shape is not taken for it
    assert pair_outputs({"logits/last_hidden_state": x}, {"logits": x.T})[1] == {}


def test_the_leading_outputs_that_agree_pair_and_the_rest_stay_their_own() -> None:
    """Bloom's key/value cache: HF's [B, H, L, D] against PaddleNLP's [B, L, H, D]. Before, one
    shape that differed left every output unpaired, the hidden states "missing" too."""
    h, k = np.zeros((2, 6, 8), np.float32), np.zeros((2, 4, 6, 2), np.float32)
    ref = {"logits/last_hidden_state": h, "logits/past_key_values/0/0": k}
    port = {"logits/0": h, "logits/1/0/0": k.transpose(0, 2, 1, 3).copy()}
    out, renamed = pair_outputs(ref, port)
    assert renamed == {"logits/0": "logits/last_hidden_state"}
    assert list(out) == ["logits/last_hidden_state", "logits/1/0/0"]


def test_align_forward_passes_the_port_and_names_a_bug_in_a_packed_slice(pair) -> None:
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, {"x": X}, by_order=True)
    assert r.passed, r.to_table(failed_only=True)
    assert r.options["outputs_paired"] == {"logits": "logits/last_hidden_state"}
    w = pm.layers[1].linear2.weight
    w.set_value(w * 1.05)
    r = align_forward(tm, pm, {"x": X}, by_order=True)
    assert r.options["divergence"]["layer"] == "h.1.mlp.c_proj", r.options["divergence"]


def test_a_layernorm_subclass_has_its_epsilon_compared(pair) -> None:
    from reprod.align import compare_settings

    tm, pm = pair
    pm.layers[0].norm2._epsilon = 1e-3
    assert [d.line() for d in compare_settings(tm, pm, by_order=True).differ] == [
        "layers.0.norm2 (torch h.0.ln_2): epsilon 1e-05 in torch, 0.001 in Paddle"]


@pytest.mark.parametrize("q, columns", [("k", "16:32"), ("v", "32:48")])
def test_a_bug_in_one_of_the_three_is_named_at_its_columns_of_c_attn(pair, q, columns) -> None:
    """HF computes q, k and v in one call of c_attn, the port in three: the capture of c_attn is
    read as three calls, each its E columns, paired with the port's by their weights. Before,
    the divergence lay "between h.1.ln_1 and h.1.attn.c_proj, outside the recorded layers"."""
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    w = getattr(pm.layers[1].self_attn, f"{q}_proj").weight
    w.set_value(w * 1.05)
    div = align_forward(tm, pm, {"x": X}, by_order=True).options["divergence"]
    assert div["layer"] == f"h.1.attn.{q}_proj", div
    assert (f"(c_attn[..., {columns}] vs Linear; the port's layers.1.self_attn.{q}_proj): "
            "input aligned") in div["message"], div


def _trained(tm, pm, steps, torch_optimizer, paddle_optimizer, **kw):
    """``steps`` of an MSE to zeros, the port loaded by order first."""
    load_into_paddle(pm, tm, by_order=True)
    y = np.zeros((B, L, E), np.float32)
    return align_train(
        tm, pm, [({"x": X}, y)], steps=steps, by_order=True,
        torch_loss_fn=lambda out, t: torch.nn.functional.mse_loss(out["last_hidden_state"], t),
        paddle_loss_fn=lambda out, t: paddle.nn.functional.mse_loss(out, t),
        torch_optimizer=torch_optimizer, paddle_optimizer=paddle_optimizer, **kw)


def test_align_train_steps_the_packed_columns_with_momentum(pair) -> None:
    """The momentum of c_attn, sliced by columns as Paddle's three parameters keep it. (Not
    Adam: a key projection's bias gets no gradient but rounding noise, which Adam scales up to
    full steps on both sides, each its own.)"""
    tm, pm = pair
    r = _trained(tm, pm, 3, torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9),
                 paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9,
                                           parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    keys = {k.key for k in r.results}
    assert {"step2/param/layers.1.self_attn.k_proj.weight",
            "step2/opt/layers.1.self_attn.k_proj.weight.velocity"} <= keys, sorted(keys)[:20]
    # the weights the port ends with are HF's, its packed columns included (numpy, outside reprod)
    np.testing.assert_allclose(pm.layers[1].self_attn.k_proj.weight.numpy(),
                               tm.h[1].attn.c_attn.weight.detach().numpy()[:, E:2 * E],
                               rtol=1e-4, atol=1e-5)


def test_adam_on_a_key_bias_is_said_to_turn_noise_into_steps(pair) -> None:
    """A key projection's bias gets no gradient but rounding noise (softmax ignores a shift of
    every key); Adam scales it to steps of up to lr, each side its own. Before, the finding read
    "the optimizers differ: the port's update is -0.17x the reference's"."""
    tm, pm = pair
    r = _trained(tm, pm, 1, torch.optim.Adam(tm.parameters(), lr=1e-2),
                 paddle.optimizer.Adam(learning_rate=1e-2, parameters=pm.parameters()))
    failed = {k.key for k in r.failed}
    assert failed and all(k.endswith("self_attn.k_proj.bias") for k in failed), failed
    # the gradients themselves are noise: far under any threshold, as far apart as they are large
    t = tm.h[0].attn.c_attn.bias.grad.numpy()[E:2 * E]
    assert np.abs(t).max() < 1e-6
    finding = r.options["findings"][0]
    assert "each one's gradient is noise on both sides" in finding, finding
    assert "the optimizers differ" not in finding


def test_the_noise_said_at_a_later_step_where_a_warmup_from_0_moves_nothing_first(pair) -> None:
    """Hugging Face's warmups start at lr 0: step 0 moves nothing, the key bias's noise first
    shows at a later step, judged from the reference's state, and that finding read "the
    optimizers' hyperparameters differ (momentum, Adam's betas or epsilon...)" with every
    hyperparameter equal."""
    tm, pm = pair
    topt = torch.optim.Adam(tm.parameters(), lr=1e-2)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda k: min(1.0, k / 2))
    psched = paddle.optimizer.lr.LambdaDecay(1e-2, lambda k: min(1.0, k / 2))
    popt = paddle.optimizer.Adam(learning_rate=psched, parameters=pm.parameters())
    r = _trained(tm, pm, 3, topt, popt, torch_scheduler=tsched, paddle_scheduler=psched)
    failed = {k.key for k in r.failed}
    assert failed and all(k.endswith("self_attn.k_proj.bias") and not k.startswith("step0/")
                          for k in failed), failed
    forced = [f for f in r.options["findings"] if "run on both sides from the reference's" in f]
    assert forced, r.options["findings"]
    assert "each one's gradient is noise on both sides" in forced[0], forced[0]
    assert "hyperparameters differ" not in forced[0]
