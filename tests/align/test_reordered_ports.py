"""Ports that hold the reference's layers in another arrangement: a BERT block as Hugging Face writes
it (attention LayerNorm defined before the feed-forward Linears, attention as hand-written Linears,
three Dropout layers) against Paddle's own ``nn.TransformerEncoderLayer`` (norms after the
Linears, a ``MultiHeadAttention`` applying its dropout as a function, an activation dropout of
p 0); outputs returned as a tuple against named ones; position ids embedded at [1, L] against
[B, L]; an embedding's padding row. tests/realworld/test_bert_real.py runs the real pair
(transformers' BertModel against PaddleNLP's)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from align_twins import perturbed  # noqa: E402

from reprod.align import (  # noqa: E402
    align_forward,
    compare_settings,
    compare_structure,
    load_into_paddle,
    pair_weights_by_order,
    trace_settings,
)
from reprod.align.by_order import _order_plan  # noqa: E402
from reprod.align.framework import pair_outputs  # noqa: E402
from reprod.errors import KeyMismatchError  # noqa: E402

H, HEADS, B, L = 16, 4, 2, 6


class HFSelfAttention(tnn.Module):
    """Hugging Face's BertSelfAttention: query/key/value Linears, dropout on the probabilities."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.query, self.key, self.value = tnn.Linear(H, H), tnn.Linear(H, H), tnn.Linear(H, H)
        self.dropout = tnn.Dropout(p)

    def forward(self, x):
        d = H // HEADS

        def heads(t):
            return t.view(B, L, HEADS, d).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        probs = self.dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1))
        return (probs @ v).transpose(1, 2).reshape(B, L, H)


class HFOutput(tnn.Module):
    def __init__(self, n_in: int, p: float) -> None:
        super().__init__()
        self.dense = tnn.Linear(n_in, H)
        self.LayerNorm = tnn.LayerNorm(H)
        self.dropout = tnn.Dropout(p)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class HFAttention(tnn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.self = HFSelfAttention(p)
        self.output = HFOutput(H, p)

    def forward(self, x):
        return self.output(self.self(x), x)


class HFIntermediate(tnn.Module):
    """Its activation a layer (Hugging Face's ``GELUActivation``), where Paddle's
    TransformerEncoderLayer applies ``F.gelu``."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = tnn.Linear(H, 4 * H)
        self.intermediate_act_fn = tnn.GELU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class HFLayer(tnn.Module):
    """A post-norm BERT layer defined as Hugging Face defines it."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.attention = HFAttention(p)
        self.intermediate = HFIntermediate()
        self.output = HFOutput(4 * H, p)

    def forward(self, x):
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class HFEncoder(tnn.Module):
    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.layer = tnn.ModuleList([HFLayer(p), HFLayer(p)])

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class PaddleEncoder(pnn.Layer):
    """The port: Paddle's own TransformerEncoderLayer, as PaddleNLP's BERT builds its encoder."""

    def __init__(self, attn_dropout: float = 0.1, ffn: int = 4 * H) -> None:
        super().__init__()
        self.layers = pnn.LayerList([
            pnn.TransformerEncoderLayer(H, HEADS, ffn, dropout=0.1, activation="gelu",
                                        attn_dropout=attn_dropout, act_dropout=0)
            for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    paddle.seed(0)
    return perturbed(HFEncoder().eval(), "LayerNorm"), PaddleEncoder()


X = np.random.default_rng(0).standard_normal((B, L, H)).astype(np.float32)


def test_layers_pair_kind_by_kind_where_the_block_defines_them_in_another_order(pair) -> None:
    tm, pm = pair
    pairs = pair_weights_by_order(tm, pm)
    assert len(pairs) == 32
    for i in (0, 1):
        t, p = f"layer.{i}.", f"layers.{i}."
        assert pairs[t + "attention.self.query.weight"] == p + "self_attn.q_proj.weight"
        assert pairs[t + "attention.output.dense.bias"] == p + "self_attn.out_proj.bias"
        assert pairs[t + "attention.output.LayerNorm.weight"] == p + "norm1.weight"
        assert pairs[t + "intermediate.dense.weight"] == p + "linear1.weight"
        assert pairs[t + "output.dense.weight"] == p + "linear2.weight"
        assert pairs[t + "output.LayerNorm.bias"] == p + "norm2.bias"
    moved = _order_plan(tm, pm, None).moved
    # the attention's Linears and the last norm kept their positions; the others moved
    assert not {"layer.0.attention.self.query.weight", "layer.1.output.LayerNorm.bias"} & moved
    assert {"layer.0.attention.output.LayerNorm.weight", "layer.0.intermediate.dense.weight",
            "layer.1.output.dense.weight"} <= moved
    assert compare_structure(tm, pm, by_order=True).ok


def test_the_port_loaded_by_kind_computes_the_reference(pair) -> None:
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    np.testing.assert_array_equal(pm.layers[0].linear1.weight.numpy(),
                                  tm.layer[0].intermediate.dense.weight.detach().numpy().T)
    pm.eval()
    with torch.no_grad():
        want = tm(torch.tensor(X)).numpy()
    with paddle.no_grad():
        got = pm(paddle.to_tensor(X)).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)  # independent of reprod's judging
    r = align_forward(tm, pm, {"x": X}, by_order=True)
    assert r.passed, r.to_table()
    # the dropouts pair in the order the data meets them: torch's attention dropout with
    # Paddle's functional one, p 0 activation dropouts aside; no setting differs
    assert not [k for k in r.keys() if k.startswith("settings/")]


def test_files_pair_by_the_kinds_their_tensors_show(pair, tmp_path) -> None:
    """From files no layer's class is known: a layer whose weight has rank 1 is a norm's, rank 2
    a matrix's (Linear, Embedding), and the same pairs come out as from the models."""
    from reprod.align import convert
    from reprod.align.by_order import _shape_owners

    tm, pm = pair
    torch.save(tm.state_dict(), tmp_path / "ref.pth")
    paddle.save(pm.state_dict(), str(tmp_path / "port.pdparams"))
    from_files = pair_weights_by_order(tmp_path / "ref.pth", tmp_path / "port.pdparams")
    assert from_files == pair_weights_by_order(tm, pm)
    shapes = {k: tuple(v.shape) for k, v in pm.state_dict().items()}
    kinds = _shape_owners(list(shapes), shapes)
    assert kinds["layers.0.norm1.bias"] == ("layers.0.norm1", "norm")
    assert kinds["layers.0.linear1.weight"] == ("layers.0.linear1", "matrix")
    # converted from the files alone, the port computes the reference
    weights = convert(tmp_path / "ref.pth", by_order=True,
                      paddle_model=tmp_path / "port.pdparams").weights
    pm.set_state_dict({k: paddle.to_tensor(np.asarray(v)) for k, v in weights.items()})
    pm.eval()
    assert align_forward(tm, pm, {"x": X}, by_order=True).passed


def test_kinds_that_do_not_pair_one_for_one_still_fail_with_positions(pair) -> None:
    tm, _ = pair
    paddle.seed(0)
    narrow = PaddleEncoder(ffn=3 * H)  # the same layers, a feed-forward of another width
    with pytest.raises(KeyMismatchError, match=r"pairing by order failed: .*#10 "):
        pair_weights_by_order(tm, narrow)

    class Extra(PaddleEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.final_norm = pnn.LayerNorm(H)

    with pytest.raises(KeyMismatchError, match=r"\(32 tensors\) vs paddle Extra \(34 tensors\)"):
        pair_weights_by_order(tm, Extra())


def _traced_report(tm, pm):
    x = torch.tensor(X)
    with trace_settings(tm) as tt, torch.no_grad():
        tm(x)
    with trace_settings(pm) as pt, paddle.no_grad():
        pm(paddle.to_tensor(X))
    return compare_settings(tm, pm, by_order=True, traces=(tt, pt))


def test_dropouts_pair_in_call_order_and_a_changed_rate_is_named(pair) -> None:
    tm, pm = pair
    pm.eval()
    report = _traced_report(tm, pm)
    assert report.differ == () and not [u for u in report.unpaired if "dropout" in u]
    paddle.seed(0)
    other = PaddleEncoder(attn_dropout=0.2)
    other.eval()
    lines = [d.line() for d in _traced_report(tm, other).differ]
    assert lines == [
        f"layers.{i}.self_attn:dropout (torch layer.{i}.attention.self.dropout): "
        "p 0.1 in torch, 0.2 in Paddle" for i in (0, 1)]


def test_a_dropout_of_p_0_is_not_mistaken_for_a_missing_one() -> None:
    """Definition order would pair torch's attention dropout with Paddle's activation dropout
    (defined first, p 0), and say the rates differ: the trace's call order does not."""
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = HFEncoder().eval(), PaddleEncoder()
    pm.eval()
    assert [type(m).__name__ for _, m in pm.layers[0].named_children()][2] == "Dropout"
    assert pm.layers[0].dropout.p == 0
    assert _traced_report(tm, pm).differ == ()


def test_without_a_trace_dropouts_are_counted_as_a_trace_counts_them(pair, tmp_path) -> None:
    """No trace to pair them by call: the port's attention rate counts as a dropout after its
    attention and its p-0 activation dropouts are left out, so the reference's three dropouts a
    block pair with the port's three, from the models and from files saved without a trace."""
    from reprod.align import save_settings

    tm, pm = pair
    pm.eval()
    report = compare_settings(tm, pm, by_order=True)
    assert report.differ == () and not [u for u in report.unpaired if "dropout" in u]
    saved = compare_settings(save_settings(tm, tmp_path / "t.json"),
                             save_settings(pm, tmp_path / "p.json"))
    assert saved.differ == () and not [u for u in saved.unpaired if "dropout" in u]
    paddle.seed(0)
    other = PaddleEncoder(attn_dropout=0.2)
    other.eval()
    assert [d.line() for d in compare_settings(tm, other, by_order=True).differ] == [
        f"layers.{i}.self_attn:dropout (torch layer.{i}.attention.self.dropout): "
        "p 0.1 in torch, 0.2 in Paddle" for i in (0, 1)]


class TwoDropouts(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = tnn.Dropout(0.1), tnn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.a(x))


class TwoDropoutsDefinedOtherwise(pnn.Layer):
    def __init__(self, second: float = 0.3) -> None:
        super().__init__()
        self.b, self.a = pnn.Dropout(second), pnn.Dropout(0.1)

    def forward(self, x):
        return self.b(self.a(x))


def test_settings_a_reordering_would_explain_still_fail_and_say_so() -> None:
    """Without a trace, layers the port defines in another order may be a faithful port or
    swapped rates: the verdict stays a failure, and says that a trace would tell."""
    tm, pm = TwoDropouts(), TwoDropoutsDefinedOtherwise()
    report = compare_settings(tm, pm, torch_to_paddle={})
    assert [(d.torch_layer, d.paddle_layer) for d in report.differ] == [("a", "b"), ("b", "a")]
    assert report.unpaired == ("dropout: the same settings on both sides in another definition "
                               "order; give traces= to pair them in the order they are called",)
    x = torch.zeros(2, 3)
    with trace_settings(tm) as tt:
        tm(x)
    with trace_settings(pm) as pt:
        pm(paddle.zeros([2, 3]))
    assert compare_settings(tm, pm, torch_to_paddle={}, traces=(tt, pt)).differ == ()
    # a rate no reordering explains: no such hint
    other = compare_settings(tm, TwoDropoutsDefinedOtherwise(second=0.5), torch_to_paddle={})
    assert other.differ and other.unpaired == ()


def test_a_layer_the_port_applies_as_a_function_is_judged_and_diagnosed(pair) -> None:
    """Paddle's encoder layer applies its activation as a function and holds a p-0 dropout after
    it: by call order that dropout, computing nothing, would take the reference's activation
    layer's place. Left out, the activation layer is judged on what the port computed between the
    Linears around it, and a tanh-approximate GELU is named there."""
    import functools

    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    assert align_forward(tm, pm, {"x": X}, by_order=True, calibrate=True).passed
    pm.layers[0].activation = functools.partial(paddle.nn.functional.gelu, approximate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = align_forward(tm, pm, {"x": X}, by_order=True, calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "layer.0.intermediate.intermediate_act_fn"
    assert "(GELU vs a function in the port): input aligned" in div["message"]
    assert any("port GELU (tanh approximation)" in f for f in r.options["findings"])


def test_captures_compared_by_order_from_files_judge_the_function_too(pair, tmp_path) -> None:
    """The two-script workflow: each side records its layers, ``reprod-diff --by-order``
    compares the files (``match_by_order``), where no layer's class is known. The inert
    dropouts are left out and the activation layer is judged on the port's values around it."""
    import functools

    from reprod import ReprodLogger, compare
    from reprod.capture import match_by_order, record

    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()

    def captures():
        t_log, p_log = ReprodLogger(), ReprodLogger()
        with torch.no_grad(), record(tm, t_log):
            tm(torch.tensor(X))
        with paddle.no_grad(), record(pm, p_log):
            pm(paddle.to_tensor(X))
        return match_by_order(t_log.data, p_log.data)

    ref, port = captures()
    assert compare(ref, port, threshold=1e-6).passed
    assert "layer.0.intermediate.intermediate_act_fn.out" in port
    # the dropouts compute nothing in eval mode: left out on both sides
    assert not [k for k in ref if "dropout" in k] and not [k for k in port if "dropout" in k]
    pm.layers[0].activation = functools.partial(paddle.nn.functional.gelu, approximate=True)
    r = compare(*captures(), threshold=1e-6)
    assert r.first_failure.key == "layer.0.intermediate.intermediate_act_fn.out"
    passed = {k.key: k.passed for k in r.results}
    assert passed["layer.0.intermediate.intermediate_act_fn.in"]  # its input aligned


# --- outputs --------------------------------------------------------------------------------------


def test_pair_outputs_by_position_only_where_one_side_is_positional() -> None:
    a, b = np.zeros((2, 3)), np.ones(4)
    ref = {"logits/last_hidden_state": a, "logits/pooler_output": b}
    got, renamed = pair_outputs(ref, {"logits/0": a, "logits/1": b})
    assert renamed == {"logits/0": "logits/last_hidden_state", "logits/1": "logits/pooler_output"}
    assert list(got) == list(ref)
    # two named sides: other names are other outputs
    assert pair_outputs(ref, {"logits/seq": a, "logits/pooled": b})[1] == {}
    # in another order, each shape one output's alone on each side: paired by shape
    assert pair_outputs(ref, {"logits/0": b, "logits/1": a})[1] == {
        "logits/0": "logits/pooler_output", "logits/1": "logits/last_hidden_state"}
    # of one shape: which is which is a guess, nothing pairs
    assert pair_outputs(ref, {"logits/0": a[:, :1], "logits/1": a[:, :1]})[1] == {}
    # fewer on the port, by position: the reference's first ones, where the shapes agree
    assert pair_outputs(ref, {"logits/0": a})[1] == {"logits/0": "logits/last_hidden_state"}
    assert pair_outputs(ref, {"logits/0": b})[1] == {}
    # fewer, but named: not the reference's outputs by position
    assert pair_outputs(ref, {"logits/seq": a})[1] == {}


class Named(tnn.Module):
    """Its outputs named (a Hugging Face ``ModelOutput``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = tnn.Linear(H, 3)

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "pooled": y.mean(1)}


class Positional(pnn.Layer):
    """The same outputs as a tuple (PaddleNLP's); ``scale`` != 1 is a bug in the second."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = pnn.Linear(H, 3)
        self.scale = 1.0

    def forward(self, x):
        y = self.fc(x)
        return y, y.mean(1) * self.scale


def test_align_forward_pairs_a_tuple_with_named_outputs() -> None:
    torch.manual_seed(0)
    tm, pm = Named(), Positional()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X})
    assert r.passed, r.to_table()
    assert r.options["outputs_paired"] == {"logits/0": "logits/logits", "logits/1": "logits/pooled"}
    # a port whose second output is wrong fails under the reference's name
    pm.scale = 1.5
    failed = align_forward(tm, pm, {"x": X}, localise=False)
    assert [k.key for k in failed.failed] == ["logits/pooled"]


# --- broadcast captures -------------------------------------------------------------------------


class TorchPositions(tnn.Module):
    """Position ids embedded at [1, L], broadcast over the batch (Hugging Face's BERT)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = tnn.Embedding(L, H)
        self.fc = tnn.Linear(H, H)
        self.head = tnn.Linear(H, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x + self.pos(torch.arange(L)[None]))))


class PaddlePositions(pnn.Layer):
    """Position ids embedded at [B, L] (PaddleNLP's BERT)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = pnn.Embedding(L, H)
        self.fc = pnn.Linear(H, H)
        self.head = pnn.Linear(H, 2)

    def forward(self, x):
        ids = paddle.arange(L).unsqueeze(0).expand([x.shape[0], L])
        return self.head(paddle.nn.functional.relu(self.fc(x + self.pos(ids))))


def test_captures_that_broadcast_are_judged_by_value() -> None:
    torch.manual_seed(0)
    tm, pm = TorchPositions(), PaddlePositions()
    load_into_paddle(pm, tm)
    assert align_forward(tm, pm, {"x": X}).passed
    pm.fc.weight.set_value(pm.fc.weight * 1.05)  # the bug, after the embedding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = align_forward(tm, pm, {"x": X})
    assert not r.passed
    # not the embedding, whose [1, L] and [B, L] captures hold the same rows
    assert r.options["divergence"]["layer"] == "fc"
    assert "input aligned" in r.options["divergence"]["message"]


# --- an embedding's padding row -----------------------------------------------------------------


def _embeddings(torch_pad, paddle_pad, row_zero: bool):
    torch.manual_seed(0)
    t = tnn.Embedding(10, 4, padding_idx=torch_pad)
    with torch.no_grad():
        t.weight.normal_()
        if row_zero and torch_pad is not None:
            t.weight[torch_pad] = 0
    p = pnn.Embedding(10, 4, padding_idx=paddle_pad)
    p.weight.set_value(t.weight.detach().numpy())
    return t, p


def _settings_lines(t, p) -> list[str]:
    # the layer settings read the layers of a model: each embedding as layer "0" of one
    return [d.line() for d in compare_settings(tnn.Sequential(t), pnn.Sequential(p)).differ]


def test_torch_padding_row_that_is_not_zero_is_a_setting_paddle_reads_as_zeros() -> None:
    ids = np.array([[0, 3, 5]])
    t, p = _embeddings(0, 0, row_zero=False)
    # the claim, independently: Paddle's padding row reads as zeros, torch's as what it holds
    tout = t(torch.tensor(ids)).detach().numpy()
    pout = p(paddle.to_tensor(ids)).numpy()
    assert np.abs(tout[0, 0]).sum() > 0 and np.abs(pout[0, 0]).sum() == 0
    np.testing.assert_array_equal(tout[0, 1:], pout[0, 1:])
    assert _settings_lines(t, p) == [
        "0: padding_idx '0 (its row is not zero)' in torch, 0 in Paddle (the row that gets "
        "no gradient; Paddle's also reads as zeros whatever the row holds, torch's as the row)"]
    t, p = _embeddings(0, 0, row_zero=True)
    np.testing.assert_array_equal(t(torch.tensor(ids)).detach().numpy(),
                                  p(paddle.to_tensor(ids)).numpy())
    assert _settings_lines(t, p) == []


def test_a_padding_row_only_torch_leaves_untrained_is_a_setting() -> None:
    t, p = _embeddings(0, None, row_zero=True)
    ids = np.array([[0, 3, 0]])
    t(torch.tensor(ids)).sum().backward()
    out = p(paddle.to_tensor(ids))
    out.sum().backward()
    # the same forward, other gradients: torch's row 0 gets none, Paddle's gets two
    assert float(t.weight.grad[0].abs().sum()) == 0
    np.testing.assert_array_equal(p.weight.grad.numpy()[0], np.full(4, 2.0, np.float32))
    assert _settings_lines(t, p) == [
        "0: padding_idx 0 in torch, None in Paddle (the row that gets no gradient; Paddle's also "
        "reads as zeros whatever the row holds, torch's as the row)"]


def test_align_train_pairs_a_tuple_with_named_outputs_at_every_step() -> None:
    from reprod.align import align_train

    torch.manual_seed(0)
    tm, pm = Named(), Positional()
    load_into_paddle(pm, tm)
    r = align_train(
        tm, pm, [({"x": X}, None)], steps=2,
        torch_loss_fn=lambda out, *_: out["pooled"].square().mean(),
        paddle_loss_fn=lambda out, *_: out[1].square().mean(),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    keys = r.keys()
    assert {"step0/logits/logits", "step1/logits/pooled"} <= set(keys)
    assert not [k for k in keys if k.rpartition("/")[2].isdigit()]


# --- dropout in train mode ----------------------------------------------------------------------


def _train(tm, pm, **kw):
    from reprod.align import align_train

    y = np.zeros((B, L, H), np.float32)
    return align_train(
        tm, pm, [({"x": X}, y)], steps=2, by_order=True,
        torch_loss_fn=lambda out, t: torch.nn.functional.mse_loss(out, t),
        paddle_loss_fn=lambda out, t: paddle.nn.functional.mse_loss(out, t),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters()),
        **kw)


def test_dropout_off_trains_a_model_in_train_mode_and_gives_the_modes_back(pair) -> None:
    from reprod.errors import ReprodError

    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    tm.train()
    pm.train()
    with pytest.raises(ReprodError, match=r'dropout is active .* pass dropout="off"'):
        _train(tm, pm)
    # the Dropout layers alone in eval mode: Paddle's attention still drops its weights as a
    # function, and the two passes of one batch differ
    for layer in [*pm.sublayers(), *tm.modules()]:
        if "Dropout" in type(layer).__name__:
            layer.training = False
    with pytest.raises(ReprodError, match="forward pass is random"):
        _train(tm, pm)
    tm.train()
    pm.train()
    r = _train(tm, pm, dropout="off")
    assert r.passed, r.to_table(failed_only=True)
    assert tm.training and pm.training
    assert all(m.training for m in tm.modules()) and all(m.training for m in pm.sublayers())
    with pytest.raises(ReprodError, match="dropout='of'"):
        _train(tm, pm, dropout="of")


def test_dropout_off_leaves_a_model_named_like_an_attention_in_train_mode() -> None:
    from reprod.align.framework import _dropouts_off

    class SelfAttentionNet(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = tnn.Dropout(0.5)
            self.bn = tnn.BatchNorm1d(4)

    class PaddleSelfAttentionNet(pnn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.drop = pnn.Dropout(0.5)

    tm, pm = SelfAttentionNet().train(), PaddleSelfAttentionNet()
    pm.train()
    with _dropouts_off(tm, pm):
        assert tm.training and pm.training and tm.bn.training
        assert not tm.drop.training and not pm.drop.training
    assert tm.drop.training and pm.drop.training


def test_a_port_returning_fewer_outputs_pairs_the_first_and_names_the_rest() -> None:
    """Hugging Face's Llama returns its hidden states and its key/value cache, PaddleNLP's the
    hidden states: the first pair by position, and the cache is said (with the switch that
    turns it off), not localised."""
    class WithCache(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = tnn.Linear(H, H)

        def forward(self, x):
            y = self.fc(x)
            return {"last_hidden_state": y, "past_key_values": ((y * 2, y * 3),)}

    class Hidden(pnn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.fc = pnn.Linear(H, H)

        def forward(self, x):
            return (self.fc(x),)

    torch.manual_seed(0)
    tm, pm = WithCache(), Hidden()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X})
    assert r.options["outputs_paired"] == {"logits/0": "logits/last_hidden_state"}
    verdicts = {k.key: k.status for k in r.results}
    assert verdicts["logits/last_hidden_state"] == "passed"
    assert verdicts["logits/past_key_values/0/0"] == "missing"
    assert r.options["findings"] == [
        "outputs only torch returns: logits/past_key_values/0/0, logits/past_key_values/0/1 (a "
        "Hugging Face model's key/value cache: set model.config.use_cache = False on the "
        "reference, or pass use_cache=False)"]
    # more outputs on the port than the reference: nothing to pair by position
    assert pair_outputs({"logits/a": X}, {"logits/0": X, "logits/1": X})[1] == {}


# --- RMSNorm ------------------------------------------------------------------------------------


class PaddleRMSNorm(pnn.Layer):
    """RMSNorm as PaddleNLP's Llama writes it (Paddle 3.3 has no RMSNorm layer)."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = self.create_parameter([n], default_initializer=pnn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, x):
        scale = paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x * scale * self.weight


def test_an_rmsnorm_epsilon_is_a_setting() -> None:
    x = np.random.default_rng(1).standard_normal((2, H)).astype(np.float32) * 1e-2
    t = tnn.Sequential(tnn.RMSNorm(H, eps=1e-6))
    for eps, want in ((1e-6, []), (1e-5, ["0: epsilon 1e-06 in torch, 1e-05 in Paddle"])):
        p = pnn.Sequential(PaddleRMSNorm(H, eps))
        got = p(paddle.to_tensor(x)).numpy()
        ref = t(torch.tensor(x)).detach().numpy()
        # the claim, independently: the same epsilon computes the same numbers, another not
        assert np.allclose(got, ref, atol=1e-6) == (eps == 1e-6)
        assert [d.line() for d in compare_settings(t, p).differ] == want
    # torch's default epsilon is its dtype's machine epsilon, not PaddleNLP's 1e-6
    default = tnn.Sequential(tnn.RMSNorm(H))
    assert [d.line() for d in compare_settings(default, pnn.Sequential(PaddleRMSNorm(H, 1e-6))
                                               ).differ] == [
        "0: epsilon 'machine epsilon' in torch, 1e-06 in Paddle"]
