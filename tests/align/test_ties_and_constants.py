"""Ports whose state dicts differ in what is not a weight: tied weights listed under two names
(T5's ``shared.weight`` and ``encoder.embed_tokens.weight``), an integer buffer one side keeps in
its state dict and the other not (PaddleNLP's persistable ``position_ids``, which Hugging Face
registers ``persistent=False``). tests/realworld runs the real pairs (HF's T5 and ALBERT against
PaddleNLP's) in test_more_transformers_real.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from reprod.align import align_forward, load_into_paddle, pair_weights_by_order  # noqa: E402
from reprod.align.conversion import convert  # noqa: E402
from reprod.align.rules import torch_aliases  # noqa: E402
from reprod.errors import KeyMismatchError  # noqa: E402

V, H, B, L = 20, 8, 2, 5
IDS = np.random.default_rng(0).integers(0, V, (B, L)).astype(np.int64)


class TorchTied(tnn.Module):
    """T5's encoder: the token embedding is the shared one, under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = tnn.Embedding(V, H)
        self.embed_tokens = self.shared
        self.register_buffer("position_ids", torch.arange(L)[None], persistent=False)
        self.positions = tnn.Embedding(L, H)
        self.proj = tnn.Linear(H, H)

    def forward(self, ids):
        return self.proj(self.embed_tokens(ids) + self.positions(self.position_ids))


class PaddleTied(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("position_ids", paddle.arange(L).unsqueeze(0), persistable=True)
        self.word_embeddings = pnn.Embedding(V, H)
        self.tokens = self.word_embeddings
        self.position_embeddings = pnn.Embedding(L, H)
        self.linear = pnn.Linear(H, H)

    def forward(self, ids):
        return self.linear(self.tokens(ids) + self.position_embeddings(self.position_ids))


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    paddle.seed(0)
    return TorchTied().eval(), PaddleTied()


def _outputs(tm, pm):
    with torch.no_grad():
        t = tm(torch.tensor(IDS)).numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(IDS)).numpy()
    return t, p


def test_a_tied_weight_pairs_once_as_paddle_lists_it_once(pair) -> None:
    tm, pm = pair
    assert torch_aliases(tm.state_dict()) == {"embed_tokens.weight": "shared.weight"}
    assert pair_weights_by_order(tm, pm) == {
        "shared.weight": "word_embeddings.weight",
        "positions.weight": "position_embeddings.weight",
        "proj.weight": "linear.weight", "proj.bias": "linear.bias"}
    plan = {p.torch_name: p for p in convert(tm, by_order=True, paddle_model=pm).plan}
    assert plan["embed_tokens.weight"].action == "drop"
    assert "tied to shared.weight" in plan["embed_tokens.weight"].why


def test_the_port_loads_by_order_keeping_its_own_integer_constants(pair) -> None:
    """Before, the port's position_ids paired with the reference's first weight and nothing
    loaded: "#0 shared.weight [20, 8] vs position_ids [1, 5]"."""
    tm, pm = pair
    load_into_paddle(pm, tm, by_order=True)
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pm.position_ids.numpy(), np.arange(L)[None])
    assert pm.tokens.weight is pm.word_embeddings.weight  # still tied


def test_loading_by_name_leaves_the_constants_to_the_model(pair) -> None:
    from reprod.align import ConversionRules

    tm, pm = pair
    rules = ConversionRules(pairs={"shared.weight": "word_embeddings.weight",
                                   "embed_tokens.weight": "tokens.weight",
                                   "positions.weight": "position_embeddings.weight"},
                            rename={r"^proj\.": "linear."})
    load_into_paddle(pm, tm, rules=rules)  # before: "missing 1 key(s): position_ids"
    t, p = _outputs(tm, pm)
    np.testing.assert_allclose(p, t, rtol=1e-6, atol=1e-6)


def test_a_weight_still_missing_is_still_an_error(pair) -> None:
    from reprod.align import ConversionRules

    tm, pm = pair
    rules = ConversionRules(skip=[r"^positions\."], pairs={"shared.weight": "word_embeddings.weight",
                                                          "embed_tokens.weight": "tokens.weight"},
                            rename={r"^proj\.": "linear."})
    with pytest.raises(KeyMismatchError, match="position_embeddings.weight"):
        load_into_paddle(pm, tm, rules=rules)


class TorchTwo(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(4, 6), tnn.Linear(6, 4)
        self.drop = tnn.Dropout(0.1)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))


class PaddleTwoOtherOrder(pnn.Layer):
    """Its Linears defined in the other order and named otherwise: no name tells them apart."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.up, self.down = pnn.Linear(6, 4), pnn.Linear(4, 6)
        self.drop = pnn.Dropout(p)

    def forward(self, x):
        return self.up(self.drop(self.down(x)))


def test_settings_check_of_weights_that_do_not_pair_by_order_does_not_crash() -> None:
    from reprod.align import ConversionRules

    """The port loaded by name (its Linears defined in another order, which no pairing by order
    or by kind reads): align_forward(by_order=True) raised the pairing error from its settings
    check; the values judge the port, the dropouts are still compared, and the settings say
    why the layers with parameters were not."""
    torch.manual_seed(0)
    tm = TorchTwo().eval()
    x = np.ones((2, 4), np.float32)
    for p, passed in ((0.1, True), (0.3, False)):
        pm = PaddleTwoOtherOrder(p)
        pm.eval()
        load_into_paddle(pm, tm, rules=ConversionRules(pairs={
            "fc1.weight": "down.weight", "fc1.bias": "down.bias",
            "fc2.weight": "up.weight", "fc2.bias": "up.bias"}))
        with pytest.raises(KeyMismatchError):
            pair_weights_by_order(tm, pm)
        r = align_forward(tm, pm, x, by_order=True)
        assert r.passed is passed, r.to_table(failed_only=True)
        # a Linear has no settings: nothing with parameters was left unchecked
        assert not r.options["settings"].get("unpaired"), r.options["settings"]
        if not passed:
            assert [k.key for k in r.failed] == ["settings/drop/p"]
