"""A tie the port leaves out: the reference's head reads its embedding's weight (GPT-2's
lm_head.weight is transformer.wte.weight), the port's head has a weight of its own. Loading by
order refused it and suggested port_only for the port's head, which loads it as it was and hides
that the embedding's gradient misses the head's share."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import load_into_paddle  # noqa: E402
from reprod.errors import KeyMismatchError  # noqa: E402

V, E = 50, 8


class TorchLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(V, E)
        self.ln = torch.nn.LayerNorm(E)
        self.lm_head = torch.nn.Linear(E, V, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, ids):
        return self.lm_head(self.ln(self.wte(ids)))


class PaddleLM(paddle.nn.Layer):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        self.embeddings = paddle.nn.Embedding(V, E)
        self.norm = paddle.nn.LayerNorm(E)
        if not tied:
            self.lm_head = paddle.nn.Linear(E, V, bias_attr=False)

    def forward(self, ids):
        h = self.norm(self.embeddings(ids))
        if self.tied:
            return paddle.matmul(h, self.embeddings.weight, transpose_y=True)
        return self.lm_head(h)


def test_the_refusal_says_the_port_left_a_tie_out() -> None:
    with pytest.raises(KeyMismatchError) as e:
        load_into_paddle(PaddleLM(tied=False), TorchLM(), by_order=True)
    text = str(e.value)
    assert "the Paddle side alone holds lm_head.weight [8, 50]" in text
    assert ("the reference's lm_head.weight is wte.weight (tied: one tensor), the port's "
            "lm_head.weight a parameter of its own: a tie the port leaves out "
            "(tie_word_embeddings), which port_only would load as it is, its gradient missing "
            "from the embedding's: tie it in the port instead") in text


def test_a_tied_port_loads() -> None:
    tm, pm = TorchLM(), PaddleLM(tied=True)
    load_into_paddle(pm, tm, by_order=True)
    assert (pm.embeddings.weight.numpy() == tm.wte.weight.detach().numpy()).all()


def test_a_head_of_its_own_on_both_sides_says_nothing_of_ties() -> None:
    class Untied(TorchLM):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(E, V, bias=False)  # untied again

    class PaddleBig(PaddleLM):
        def __init__(self) -> None:
            super().__init__(tied=False)
            self.extra = paddle.nn.Linear(E, 3)

    with pytest.raises(KeyMismatchError) as e:
        load_into_paddle(PaddleBig(), Untied(), by_order=True)
    text = str(e.value)
    assert "tie it in the port" not in text and 'port_only=[r"^extra\\."]' in text
