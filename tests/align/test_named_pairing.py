"""Ports whose layers of one kind and shape come in another order, where only names tell them
apart: Hugging Face's BART and OPT define an attention's ``k_proj``, ``v_proj``, ``q_proj`` in
that order, PaddleNLP's ``q_proj``, ``k_proj``, ``v_proj``; HF's BART encoder defines its
embedding LayerNorm after its layers, PaddleNLP's before them. Every shape agrees, so pairing by
position or kind by kind in order loaded the port wrong, silently (BART's outputs 1.4 apart).
Also the captures such ports take otherwise: HF's OPT flattens its hidden states to [B*L, E]
before the feed-forward part, PaddleNLP's keeps [B, L, E]; PaddleNLP's BART position embedding
returns [L, E], HF's [B, L, E]. tests/realworld/test_more_transformers_real.py runs the real
pairs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from align_twins import perturbed  # noqa: E402

from reprod.align import align_forward, load_into_paddle, pair_weights_by_order  # noqa: E402
from reprod.align.by_order import _order_plan  # noqa: E402

H, B, L = 8, 2, 5
X = np.random.default_rng(0).standard_normal((B, L, H)).astype(np.float32)


def _attend(q, k, v):
    return torch.softmax(q @ k.transpose(1, 2) / H ** 0.5, -1) @ v


class TorchAttention(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k_proj, self.v_proj = tnn.Linear(H, H), tnn.Linear(H, H)
        self.q_proj, self.out_proj = tnn.Linear(H, H), tnn.Linear(H, H)

    def forward(self, x):
        return self.out_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class TorchPositions(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = tnn.Parameter(torch.randn(L, H))

    def forward(self, x):
        return self.weight[None].expand(x.shape[0], L, H)  # [B, L, E], as HF's BART


class TorchLayer(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.self_attn_layer_norm = TorchAttention(), tnn.LayerNorm(H)
        self.fc1, self.fc2, self.final_layer_norm = tnn.Linear(H, 4 * H), tnn.Linear(4 * H, H), \
            tnn.LayerNorm(H)

    def forward(self, x):
        x = self.self_attn_layer_norm(x + self.self_attn(x))
        flat = x.reshape(-1, H)  # as HF's OPT: [B*L, E] from here
        flat = self.final_layer_norm(flat + self.fc2(torch.relu(self.fc1(flat))))
        return flat.view(x.shape)


class TorchModel(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_positions = TorchPositions()
        self.layers = tnn.ModuleList([TorchLayer(), TorchLayer()])
        self.layernorm_embedding = tnn.LayerNorm(H)  # defined after the layers, applied first

    def forward(self, x):
        x = self.layernorm_embedding(x + self.embed_positions(x))
        for layer in self.layers:
            x = layer(x)
        return x


class PaddleAttention(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = pnn.Linear(H, H), pnn.Linear(H, H)
        self.v_proj, self.out_proj = pnn.Linear(H, H), pnn.Linear(H, H)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        probs = paddle.nn.functional.softmax(q @ k.transpose([0, 2, 1]) / H ** 0.5, -1)
        return self.out_proj(probs @ v)


class PaddlePositions(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.weight = self.create_parameter([L, H])

    def forward(self, x):
        return self.weight  # [L, E], broadcast where it is added, as PaddleNLP's BART


class PaddleLayer(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = PaddleAttention()
        self.linear1, self.linear2 = pnn.Linear(H, 4 * H), pnn.Linear(4 * H, H)
        self.norm1, self.norm2 = pnn.LayerNorm(H), pnn.LayerNorm(H)

    def forward(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(paddle.nn.functional.relu(self.linear1(x))))


class PaddleModel(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.embed_positions = PaddlePositions()
        self.layernorm_embedding = pnn.LayerNorm(H)
        self.layers = pnn.LayerList([PaddleLayer(), PaddleLayer()])

    def forward(self, x):
        x = self.layernorm_embedding(x + self.embed_positions(x))
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    paddle.seed(0)
    pm = PaddleModel()
    pm.eval()
    return perturbed(TorchModel().eval(), "norm"), pm


def test_layers_of_one_kind_and_shape_pair_by_their_names_within_each_block(pair) -> None:
    tm, pm = pair
    pairs = pair_weights_by_order(tm, pm)
    for i in (0, 1):
        for q in "qkv":
            assert pairs[f"layers.{i}.self_attn.{q}_proj.weight"] == \
                f"layers.{i}.self_attn.{q}_proj.weight"
        assert pairs[f"layers.{i}.self_attn_layer_norm.weight"] == f"layers.{i}.norm1.weight"
        assert pairs[f"layers.{i}.final_layer_norm.bias"] == f"layers.{i}.norm2.bias"
        assert pairs[f"layers.{i}.fc1.weight"] == f"layers.{i}.linear1.weight"
    assert pairs["layernorm_embedding.weight"] == "layernorm_embedding.weight"


def test_the_port_loaded_by_order_computes_the_reference(pair) -> None:
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    with torch.no_grad():
        t = tm(torch.tensor(X)).numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(X)).numpy()
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-5)


def test_positions_whose_shapes_all_agree_give_way_to_the_names() -> None:
    """The two attentions alone: every position pairs by shape, k with q; the names say
    otherwise, and decide."""
    torch.manual_seed(0)
    tm, pm = TorchAttention(), PaddleAttention()
    plan = _order_plan(tm, pm, None)
    assert [(t, p) for t, p, _ in plan.pairs if t.endswith("weight")] == [
        ("k_proj.weight", "k_proj.weight"), ("v_proj.weight", "v_proj.weight"),
        ("q_proj.weight", "q_proj.weight"), ("out_proj.weight", "out_proj.weight")]
    assert plan.moved == {"k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                          "q_proj.weight", "q_proj.bias"}


def test_positions_named_otherwise_keep_their_order() -> None:
    """Names that differ on the two sides say nothing: the definition order still pairs."""
    class Named(pnn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.d = (pnn.Linear(H, H) for _ in range(4))

    plan = _order_plan(TorchAttention(), Named(), None)
    assert [p for _, p, _ in plan.pairs][:3] == ["a.weight", "a.bias", "b.weight"]
    assert not plan.moved


def test_a_bug_is_named_where_it_is_through_merged_axes_and_broadcast_positions(pair) -> None:
    """Before: "diverges before layers.0.final_layer_norm: input already differs (shape (2, 5,
    8) does not match ref (10, 8))", whatever the bug; and the position embedding's [L, E]
    against [B, L, E] stopped it earlier."""
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    r = align_forward(tm, pm, {"x": X}, by_order=True)
    assert r.passed, r.to_table(failed_only=True)
    for layer, named in (("self_attn.q_proj", "layers.1.self_attn.q_proj"),
                         ("linear2", "layers.1.fc2")):
        load_into_paddle(pm, tm, by_order=True)
        sub = pm.layers[1]
        for part in layer.split("."):
            sub = getattr(sub, part)
        sub.weight.set_value(sub.weight * 1.05)
        div = align_forward(tm, pm, {"x": X}, by_order=True).options["divergence"]
        assert div["layer"] == named and "input aligned" in div["message"], div
