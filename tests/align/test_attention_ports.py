"""torch's ``nn.MultiheadAttention`` ported to Paddle's ``nn.MultiHeadAttention``.

torch packs the query, key and value projections in one ``in_proj_weight`` [3E, E] and
``in_proj_bias`` [3E]; Paddle holds ``q_proj``, ``k_proj`` and ``v_proj`` as Linear layers
([E, E], transposed, and [E]). The conversion splits the packed tensors in Paddle's order, so
that a transformer port loads by name or by order, its structure checks, and ``align_forward``
compares it, and ``align_train`` records each slice's gradient, weight and optimizer state under
Paddle's name (views of the packed tensor: what is loaded into a slice is written into it).
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
from reprod.align.rules import split_attention  # noqa: E402

X = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)


class _T(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(x)[:, 0])


class _P(paddle.nn.Layer):
    """The port; ``names``: its encoder's and head's attribute names (others than torch's pair
    by order only)."""

    def __init__(self, names=("enc", "head")):
        super().__init__()
        self.names = names
        setattr(self, names[0], paddle.nn.TransformerEncoder(
            paddle.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 2))
        setattr(self, names[1], paddle.nn.Linear(16, 3))

    def forward(self, x):
        return getattr(self, self.names[1])(getattr(self, self.names[0])(x)[:, 0])


def _models():
    torch.manual_seed(0)
    tm, pm = _T().eval(), _P()
    pm.eval()
    return tm, pm


def test_the_packed_projection_splits_into_paddle_s_three_in_its_order():
    m = torch.nn.MultiheadAttention(8, 2)
    sd = m.state_dict()
    split, origin = split_attention(sd)
    assert list(split) == ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                           "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias"]
    w, b = sd["in_proj_weight"].numpy(), sd["in_proj_bias"].numpy()
    for i, q in enumerate("qkv"):
        np.testing.assert_array_equal(split[f"{q}_proj.weight"].numpy(), w[8 * i:8 * (i + 1)])
        np.testing.assert_array_equal(split[f"{q}_proj.bias"].numpy(), b[8 * i:8 * (i + 1)])
    assert origin["k_proj.weight"] == "in_proj_weight"
    # a tensor of another shape that happens to be named so is kept as it is
    odd = {"in_proj_weight": np.zeros((5, 8)), "out_proj.weight": np.zeros((8, 8))}
    assert list(split_attention(odd)[0]) == ["in_proj_weight", "out_proj.weight"]


def test_a_transformer_port_loads_checks_and_computes_the_same():
    tm, pm = _models()
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table()
    conv = convert(tm)
    q = next(p for p in conv.plan if p.torch_name == "enc.layers.0.self_attn.q_proj.weight")
    assert q.action == "transpose" and "rows of enc.layers.0.self_attn.in_proj_weight" in q.why
    load_into_paddle(pm, tm)
    # an independent reference: torch's own output, and Paddle's q projection is torch's rows
    w = tm.enc.layers[0].self_attn.in_proj_weight.detach().numpy()
    np.testing.assert_array_equal(pm.enc.layers[0].self_attn.q_proj.weight.numpy(), w[:16].T)
    with torch.no_grad():
        ref = tm(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(pm(paddle.to_tensor(X)).numpy(), ref, rtol=1e-5, atol=1e-6)
    r = align_forward(tm, pm, {"x": X}, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


def test_a_renamed_transformer_port_pairs_by_order():
    tm, _ = _models()
    pm = _P(("body", "out"))
    pm.eval()
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["enc.layers.1.self_attn.v_proj.bias"] == "body.layers.1.self_attn.v_proj.bias"
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, {"x": X}, by_order=True, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


def test_a_renamed_port_s_attention_bug_is_named_at_the_attention_by_order():
    """By order only leaves are recorded: torch's attention is one (it holds in_proj_weight and
    applies out_proj as a function), Paddle's four Linears. Its block is recorded whole in their
    place, so the two meet; before, the bug lay "between enc.layers.0.norm2 and
    enc.layers.1.norm1, outside the recorded layers"."""
    tm, _ = _models()
    pm = _P(("body", "out"))
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    attn = pm.body.layers[1].self_attn
    attn.k_proj.weight.set_value(attn.k_proj.weight.numpy() * 1.05)
    r = align_forward(tm, pm, {"x": X}, by_order=True, calibrate=True)
    div = r.options["divergence"]
    assert (div["layer"], div["port_layer"]) == ("enc.layers.1.self_attn",
                                                 "body.layers.1.self_attn")
    assert div["message"].startswith(
        "diverges at enc.layers.1.self_attn (MultiheadAttention; the port's "
        "body.layers.1.self_attn): input aligned"), div


def _swapped_k_and_v():
    """The port with its second layer's key and value projections swapped."""
    tm, pm = _models()
    load_into_paddle(pm, tm)
    attn = pm.enc.layers[1].self_attn
    k, v = attn.k_proj.weight.numpy(), attn.v_proj.weight.numpy()
    attn.k_proj.weight.set_value(v)
    attn.v_proj.weight.set_value(k)
    return tm, pm


def test_a_swapped_k_and_v_is_found_where_it_is():
    tm, pm = _swapped_k_and_v()
    r = align_forward(tm, pm, {"x": X}, calibrate=True)
    assert not r.passed
    # the attention itself: torch's (out, None) is recorded as Paddle's out (before, the two
    # did not pair and the encoder layer's "own forward code" was blamed)
    assert r.options["divergence"]["layer"] == "enc.layers.1.self_attn"


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_align_train_follows_the_packed_projection(optimizer):
    """Gradients, weights and optimizer state of in_proj_weight are recorded as Paddle's three
    projections hold them; a correct port passes, calibrated, step after step."""
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
    r = align_train(tm, pm, [(X, np.array([0, 1]))], steps=3, calibrate=True,
                    torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=topt, paddle_optimizer=popt)
    assert r.passed, r.to_table(failed_only=True)
    keys = set(r.keys())
    for q in "qkv":
        assert f"step2/grad/enc.layers.0.self_attn.{q}_proj.weight" in keys
        assert f"step2/param/enc.layers.1.self_attn.{q}_proj.bias" in keys
    accumulator = "velocity" if optimizer == "momentum" else "moment1"
    assert f"step2/opt/enc.layers.0.self_attn.k_proj.weight.{accumulator}" in keys
    assert not any("in_proj" in k for k in keys)
    # the slices recorded are torch's rows, in Paddle's layout: an independent check
    w = tm.enc.layers[0].self_attn.in_proj_weight.detach().numpy()
    np.testing.assert_allclose(pm.enc.layers[0].self_attn.v_proj.weight.numpy(), w[32:].T,
                               rtol=1e-4, atol=1e-6)


def test_align_train_names_a_swapped_key_and_value_projection():
    tm, pm = _swapped_k_and_v()
    r = align_train(tm, pm, [(X, np.array([0, 1]))], steps=1, calibrate=True,
                    torch_loss_fn=torch.nn.CrossEntropyLoss(),
                    paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                    torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                    paddle_optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()))
    assert not r.passed and r.first_failure.key == "step0/logits"
    assert r.options["divergence"]["layer"] == "enc.layers.1.self_attn"


def test_a_head_count_that_differs_is_a_setting_the_weights_cannot_show():
    """4 heads against 2: every weight has the same shape and loads; the attention computes
    another function, and its setting says so, as the likely cause where the values part."""
    tm, _ = _models()
    pm = _P()
    pm.enc = paddle.nn.TransformerEncoder(
        paddle.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 2)
    pm.eval()
    assert compare_structure(tm, pm).ok
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X}, calibrate=True)
    assert not r.passed
    assert [k.key for k in r.failed if k.status == "setting"] == [
        "settings/enc.layers.0.self_attn/num_heads", "settings/enc.layers.1.self_attn/num_heads"]
    assert r.options["divergence"]["layer"].startswith("enc.layers.0")
    assert r.options["findings"][-1].endswith("where the values first differ: the likely cause")


def test_transformer_settings_each_framework_spells_its_way():
    from reprod.align import compare_settings

    def torch_layer(**kw):
        return torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, **kw), 1,
                                           enable_nested_tensor=False)

    def paddle_layer(**kw):
        return paddle.nn.TransformerEncoder(paddle.nn.TransformerEncoderLayer(16, 4, 32, **kw), 1)

    assert compare_settings(torch_layer(batch_first=True, norm_first=True, activation="gelu"),
                            paddle_layer(normalize_before=True, activation="gelu")).passed
    assert [d.line() for d in compare_settings(
        torch_layer(batch_first=True, norm_first=True, activation="gelu"),
        paddle_layer(activation="relu")).differ] == [
        "layers.0: norm_first True in torch, False in Paddle",
        "layers.0: activation 'gelu' in torch, 'relu' in Paddle"]
    # torch's attention takes the sequence first unless told; Paddle's the batch, always: a
    # layout, said and not failed (the model around it may transpose)
    report = compare_settings(torch_layer(), paddle_layer())
    assert report.passed and not report.differ
    assert [d.line() for d in report.said] == [
        "layers.0.self_attn: batch_first False in torch, True in Paddle"]
    assert "batch_first False in torch, True in Paddle (a layout of the inputs: not failed, " \
        "the values decide)" in str(report)


class _SeqFirst(torch.nn.Module):
    """torch's default sequence-first encoder, the reference transposing around it (or, with
    ``transpose=False``, feeding it the batch first: a bug in the layout)."""

    def __init__(self, transpose: bool = True) -> None:
        super().__init__()
        self.transpose = transpose
        layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 8)

    def forward(self, x):
        if self.transpose:
            return self.head(self.enc(x.transpose(0, 1)).transpose(0, 1))
        return self.head(self.enc(x))


class _BatchFirst(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.enc = paddle.nn.TransformerEncoder(
            paddle.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 2)
        self.head = paddle.nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize("transpose", [True, False])
def test_a_sequence_first_reference_and_a_batch_first_port_are_judged_by_their_values(transpose):
    """A faithful port of torch's default layout (the reference transposes around its
    sequence-first encoder, Paddle's takes the batch first) computes the same numbers: it
    failed on ``batch_first False in torch, True in Paddle``. A reference that does not
    transpose fails on its values, and the layout is said as what to check."""
    from reprod.align import align_forward

    torch.manual_seed(0)
    tm = _SeqFirst(transpose).eval()
    with torch.no_grad():
        for p in tm.parameters():  # LayerNorms' weights and biases matter too
            p.add_(torch.randn_like(p) * 0.1)
    from reprod.align import load_into_paddle

    pm = _BatchFirst()
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    r0 = align_forward(tm, pm, X, by_order=True)
    if transpose:
        assert r0.passed, r0.to_table(failed_only=True)
        assert not any(k.key.startswith("settings/") for k in r0.results)
        assert r0.options["settings"]["layout"] == [
            "enc.layers.0.self_attn: batch_first False in torch, True in Paddle",
            "enc.layers.1.self_attn: batch_first False in torch, True in Paddle"]
        assert not any("layout" in f for f in r0.options.get("findings", ()))
        return
    assert not r0.passed
    assert r0.options["divergence"]["layer"] == "enc.layers.0.self_attn"
    assert any(f.startswith("the port's layers take their inputs in another layout: "
                            "enc.layers.0.self_attn") and "transposes its inputs" in f
               for f in r0.options["findings"])


def test_a_forced_step_loads_the_reference_s_state_into_the_packed_tensor():
    """What a step judged from the reference's state loads: the recorded slices are written
    into torch's packed tensor (its rows), and torch's Adam moments of it into the accumulators
    of Paddle's three projections."""
    from reprod.align import forcing
    from reprod.align.framework import _torch_params_plan
    from reprod.align.rules import unaliased

    tm, pm = _models()
    load_into_paddle(pm, tm)
    plan = _torch_params_plan(tm, None)
    data = {f"step0/param/{k}": v.numpy() * 1.5 for k, v in unaliased(pm.state_dict())[0].items()}
    forcing.load_reference_state(0, data, tm, pm, plan)
    packed = tm.enc.layers[0].self_attn.in_proj_weight.detach().numpy()
    np.testing.assert_array_equal(
        packed[16:32], data["step0/param/enc.layers.0.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(
        tm.enc.layers[1].self_attn.in_proj_bias.detach().numpy()[32:],
        data["step0/param/enc.layers.1.self_attn.v_proj.bias"])

    topt = torch.optim.Adam(tm.parameters(), lr=1e-3)
    popt = paddle.optimizer.Adam(1e-3, parameters=pm.parameters())
    for model, opt in ((tm, topt), (pm, popt)):  # one step each: the accumulators exist
        out = model(torch.from_numpy(X) if model is tm else paddle.to_tensor(X))
        out.sum().backward()
        opt.step()
    forcing.load_paddle_optimizer(popt, topt.state_dict(), topt, tm, pm, plan)
    exp_avg = topt.state[tm.enc.layers[0].self_attn.in_proj_weight]["exp_avg"].numpy()
    moment1 = forcing.paddle_accumulators(popt)["moment1"][
        pm.enc.layers[0].self_attn.k_proj.weight.name].numpy()
    np.testing.assert_allclose(moment1, exp_avg[16:32].T * forcing._paddle_weight(0.9),
                               rtol=1e-6)


L = 5


class _TMasked(torch.nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.mask = mask

    def forward(self, x):
        if self.mask == "causal":
            mask = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=x.dtype)
            return self.attn(x, x, x, attn_mask=mask, is_causal=True)[0]
        if self.mask == "padding":  # the last key of the second sequence is padding
            pad = torch.zeros(2, L, dtype=torch.bool)
            pad[1, -1] = True
            return self.attn(x, x, x, key_padding_mask=pad,
                             attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1))[0]
        if self.mask == "is_causal":
            return self.attn(x, x, x, is_causal=True,
                             attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1))[0]
        return self.attn(x, x, x, attn_mask=torch.triu(torch.ones(L, L, dtype=torch.bool), 1))[0]


class _PMasked(paddle.nn.Layer):
    def __init__(self, mask):
        super().__init__()
        self.attn = paddle.nn.MultiHeadAttention(16, 2)
        self.mask = mask

    def forward(self, x):
        upper = np.triu(np.ones((L, L), bool), 1)
        if self.mask == "folded":  # the padding folded into the one mask, [batch, 1, L, L]
            keep = np.broadcast_to(~upper, (2, 1, L, L)).copy()
            keep[1, :, :, -1] = False
            return self.attn(x, x, x, paddle.to_tensor(keep))
        if self.mask == "float":
            return self.attn(x, x, x, paddle.to_tensor(np.where(upper, -1e9, 0.0).astype("float32")))
        return self.attn(x, x, x, paddle.to_tensor(upper if self.mask == "same array" else ~upper))


@pytest.mark.parametrize("torch_mask,paddle_mask,expected", [
    ("bool", "kept", None),                # Paddle's True keeps: the complement is the port
    ("causal", "float", None),             # torch's -inf against a port's -1e9
    ("is_causal", "kept", None),
    ("padding", "folded", None),           # torch's key_padding_mask, folded into Paddle's mask
    ("padding", "kept", (0.42, 0.4)),      # the padding left out: 21 of 50 against 20
    ("bool", "same array", (0.4, 0.6)),    # the same boolean array means the opposite
])
def test_an_attention_mask_is_compared_as_each_framework_reads_it(torch_mask, paddle_mask,
                                                                   expected):
    torch.manual_seed(0)
    tm, pm = _TMasked(torch_mask), _PMasked(paddle_mask)
    load_into_paddle(pm, tm)
    x = np.random.default_rng(1).standard_normal((2, L, 16)).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    out = pm(paddle.to_tensor(x)).numpy()
    r = align_forward(tm, pm, {"x": x}, calibrate=True)
    if expected is None:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)  # the same function
        assert r.passed, r.to_table(failed_only=True)
        return
    assert not np.allclose(out, ref, atol=1e-3)
    assert r["settings/attn/masked"].reason.startswith(
        f"attn: masked {expected[0]:g} in torch, {expected[1]:g} in Paddle (the share of "
        "attention positions the mask takes out: torch's boolean mask is True where masked, "
        "Paddle's True where kept)")


def test_the_reference_s_update_of_a_slice_replays_as_its_rows():
    """An optimizer's update is element-wise: the replay of one slice of a packed tensor (used
    to judge an update made of the port's own gradient) is those rows of the whole update."""
    from reprod.align import forcing
    from reprod.align.framework import _torch_params_plan

    tm, _ = _models()
    plan = _torch_params_plan(tm, None)
    packed = tm.enc.layers[0].self_attn.in_proj_weight
    opt = torch.optim.Adam(tm.parameters(), lr=1e-2, weight_decay=0.01)
    tm(torch.from_numpy(X)).sum().backward()
    opt.step()  # a state to replay from: moments and a step count
    state = opt.state_dict()
    w0 = packed.detach().numpy().copy()
    g = np.random.default_rng(2).standard_normal(w0.shape).astype(np.float32)
    kp = plan["enc.layers.0.self_attn.v_proj.weight"]
    made, accs = forcing.replayed_state(opt, state, tm, kp, w0[32:].T.copy(), g[32:].T.copy())
    # the whole tensor's replay, by hand: the same optimizer over a copy of it
    whole = torch.nn.Parameter(torch.from_numpy(w0))
    whole.grad = torch.from_numpy(g)
    ref = torch.optim.Adam([whole], lr=1e-2, weight_decay=0.01)
    ref.state[whole] = {k: v.clone() for k, v in opt.state[packed].items()}
    ref.step()
    np.testing.assert_allclose(made, whole.detach().numpy()[32:].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(accs["moment1"],
                               ref.state[whole]["exp_avg"].numpy()[32:].T * forcing._paddle_weight(0.9),
                               rtol=1e-6, atol=1e-12)


def test_a_reference_leaf_whose_sublayers_are_recorded_keeps_the_port_s_layers_apart():
    """A torch encoder holding a positional parameter itself is a leaf, and so are the blocks it
    calls: the port's block holding the same weights is not recorded whole, so a bug in one of
    its Linears is still named there, not at the whole encoder."""

    class TorchEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.randn(1, 5, 16) * 0.1)
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
            self.ln = torch.nn.LayerNorm(16)

        def forward(self, x):
            return self.ln(self.b(torch.relu(self.a(x + self.pos))))

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = TorchEncoder(), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.enc(x))

    class Positions(paddle.nn.Layer):  # the parameter in a layer of its own, never called
        def __init__(self):
            super().__init__()
            self.pos = self.create_parameter([1, 5, 16])

    class PaddleEncoder(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.pe = Positions()
            self.fc1, self.fc2 = paddle.nn.Linear(16, 16), paddle.nn.Linear(16, 16)
            self.norm = paddle.nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(self.fc2(paddle.nn.functional.relu(self.fc1(x + self.pe.pos))))

    class PaddleNet(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.body, self.out = PaddleEncoder(), paddle.nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.body(x))

    torch.manual_seed(0)
    tm, pm = TorchNet().eval(), PaddleNet()
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    pm.body.fc2.weight.set_value(pm.body.fc2.weight.numpy() * 1.05)
    r = align_forward(tm, pm, {"x": X}, by_order=True, calibrate=True)
    div = r.options["divergence"]
    assert (div["layer"], div["port_layer"]) == ("enc.b", "body.fc2"), div
