"""A port returning more outputs than the reference: PaddleNLP's Pegasus returns (decoder output,
None cache, encoder output, mask) where Hugging Face's returns the two outputs by name, and
DeBERTa-v2 with its default ``output_hidden_states=True`` returns (output, hidden states) where
Hugging Face's returns the output. The reference's outputs pair with the port's leading ones,
a None is nothing to compare, and the port's other outputs are said, not failed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

import reprod  # noqa: E402
from reprod.align import align_forward, load_into_paddle  # noqa: E402
from reprod.align.framework import pair_outputs  # noqa: E402

H, B, L, S = 8, 2, 5, 7


# --- pair_outputs -----------------------------------------------------------------------------


def test_a_port_returning_hidden_states_after_the_output_pairs_its_first() -> None:
    h = np.zeros((B, L, H), np.float32)
    ref = {"logits/last_hidden_state": h}
    port = {"logits/0": h, "logits/1/0": h + 1, "logits/1/1": h + 2}
    extra: list[str] = []
    out, renamed = pair_outputs(ref, port, extra=extra)
    assert renamed == {"logits/0": "logits/last_hidden_state"}
    assert extra == ["logits/1/0", "logits/1/1"] and list(out) == ["logits/last_hidden_state"]
    assert out["logits/last_hidden_state"] is h
    # a caller that does not take them keeps them, the port's own
    assert list(pair_outputs(ref, port)[0]) == ["logits/last_hidden_state", "logits/1/0",
                                                "logits/1/1"]


def test_a_port_returning_a_cache_and_a_mask_pairs_around_them() -> None:
    """Pegasus: the None cache leaves no key, so the positions do not line up; the mask's shape
    is no output's."""
    dec, enc, mask = np.zeros((B, L, H)), np.ones((B, S, H)), np.zeros((B, 1, 1, S))
    ref = {"logits/last_hidden_state": dec, "logits/encoder_last_hidden_state": enc}
    extra: list[str] = []
    out, renamed = pair_outputs(ref, {"logits/0": dec, "logits/2": enc, "logits/3": mask},
                                extra=extra)
    assert renamed == {"logits/0": "logits/last_hidden_state",
                       "logits/2": "logits/encoder_last_hidden_state"}
    assert extra == ["logits/3"] and list(out) == list(ref)


def test_outputs_in_another_order_pair_by_their_shapes_where_each_is_one_output_s() -> None:
    """PaddleNLP's LUKE returns (sequence, entity states, pooled), HF's ModelOutput
    (last_hidden_state, pooler_output, entity_last_hidden_state): the first paired, the other
    two were MISSING on one side and EXTRA on the other."""
    seq, pooled, ents = np.zeros((B, L, H)), np.ones((B, H)), np.full((B, 3, H), 2.0)
    ref = {"logits/last_hidden_state": seq, "logits/pooler_output": pooled,
           "logits/entity_last_hidden_state": ents}
    port = {"logits/0": seq, "logits/1": ents, "logits/2": pooled}
    out, renamed = pair_outputs(ref, port)
    assert renamed == {"logits/0": "logits/last_hidden_state",
                       "logits/1": "logits/entity_last_hidden_state",
                       "logits/2": "logits/pooler_output"}
    assert out["logits/pooler_output"] is pooled and out["logits/entity_last_hidden_state"] is ents
    # two of one shape: which is which is a guess, and those stay each side's own
    twin = {"logits/last_hidden_state": seq, "logits/a": pooled, "logits/b": pooled}
    _, renamed = pair_outputs(twin, {"logits/0": pooled, "logits/1": seq, "logits/2": pooled})
    assert renamed == {"logits/1": "logits/last_hidden_state"}
    # none leading alike: the shapes alone pair them
    _, renamed = pair_outputs({"logits/x": seq, "logits/y": pooled},
                              {"logits/0": pooled, "logits/1": seq})
    assert renamed == {"logits/0": "logits/y", "logits/1": "logits/x"}

def test_more_outputs_pair_only_where_the_pairing_is_no_guess() -> None:
    h, enc = np.zeros((B, L, H)), np.zeros((B, S, H))
    ref = {"logits/last_hidden_state": h}
    # the hidden states first: a hidden state of the tuple is not the reference's output
    extra: list[str] = []
    hidden_first = {"logits/0/0": h, "logits/0/1": h, "logits/1": h}
    assert pair_outputs(ref, hidden_first, extra=extra) == (hidden_first, {})
    assert extra == []  # the reference's output has no pair: nothing is set aside
    # two outputs of its shape: either could be it
    assert pair_outputs(ref, {"logits/0": h, "logits/1": h}, extra=extra)[1] == {}
    # the reference's outputs in another order, as many, of shapes each one output's: they
    # pair by shape; of one shape (S == L), which is which is a guess and nothing pairs
    two = {"logits/last_hidden_state": h, "logits/encoder_last_hidden_state": enc}
    assert pair_outputs(two, {"logits/0": enc, "logits/1": h}, extra=extra)[1] == {
        "logits/0": "logits/encoder_last_hidden_state", "logits/1": "logits/last_hidden_state"}
    same = {"logits/last_hidden_state": h, "logits/encoder_last_hidden_state": h + 1}
    assert pair_outputs(same, {"logits/0": h + 1, "logits/1": h}, extra=extra)[1] == {
        "logits/0": "logits/last_hidden_state", "logits/1": "logits/encoder_last_hidden_state"}
    # named outputs beyond the reference's are not positions: they stay, the port's own
    got, _ = pair_outputs(ref, {"logits/last_hidden_state": h, "logits/attn": enc}, extra=extra)
    assert extra == [] and list(got) == ["logits/last_hidden_state", "logits/attn"]


# --- align_forward ------------------------------------------------------------------------------


class Encoder(tnn.Module):
    """Hugging Face's: its output by name."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(H, H), tnn.Linear(H, H)

    def forward(self, x):
        return {"last_hidden_state": self.fc2(torch.tanh(self.fc1(x)))}


class PaddleEncoder(pnn.Layer):
    """PaddleNLP's: (output, cache, hidden states), the cache None; ``hidden_first``: the
    hidden states before the output; ``scale`` != 1: a bug in the output."""

    def __init__(self, hidden_first: bool = False, scale: float = 1.0) -> None:
        super().__init__()
        self.fc1, self.fc2 = pnn.Linear(H, H), pnn.Linear(H, H)
        self.hidden_first, self.scale = hidden_first, scale

    def forward(self, x):
        h1 = paddle.tanh(self.fc1(x))
        out = self.fc2(h1) * self.scale
        return ((x, h1), None, out) if self.hidden_first else (out, None, (x, h1))


def _pair(**kw):
    torch.manual_seed(0)
    tm, pm = Encoder(), PaddleEncoder(**kw)
    load_into_paddle(pm, tm)
    return tm, pm


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((B, L, H)).astype(np.float32)


def test_align_forward_passes_a_port_returning_more_and_says_what_it_did_not_compare(
        tmp_path) -> None:
    tm, pm = _pair()
    x = _x()
    r = align_forward(tm, pm, x, out_dir=tmp_path)
    assert r.passed, r.to_table()
    assert [kr.key for kr in r.results if not kr.key.startswith("settings/")] == [
        "logits/last_hidden_state"]
    assert r.options["outputs_paired"] == {"logits/0": "logits/last_hidden_state"}
    assert r.options["outputs_not_compared"] == {
        "logits/1": "None in Paddle",
        "logits/2/0": "returned by the port beyond the reference's outputs",
        "logits/2/1": "returned by the port beyond the reference's outputs"}
    extra = [f for f in r.options["findings"] if f.startswith("the port returns 1 more output ")]
    assert len(extra) == 1 and "logits/2/0, logits/2/1" in extra[0]
    assert "output_hidden_states=True" in extra[0]
    # what was compared is the port's output, against the reference written again in numpy
    w1, b1 = tm.fc1.weight.detach().numpy(), tm.fc1.bias.detach().numpy()
    w2, b2 = tm.fc2.weight.detach().numpy(), tm.fc2.bias.detach().numpy()
    want = np.tanh(x.astype(np.float64) @ w1.T + b1) @ w2.T + b2
    port = reprod.load(tmp_path / "forward_paddle.npy")
    assert list(port) == ["logits/last_hidden_state"]
    np.testing.assert_allclose(port["logits/last_hidden_state"], want, atol=1e-5)


def test_a_bug_in_the_paired_output_still_fails_under_the_reference_name() -> None:
    tm, pm = _pair(scale=1.05)
    r = align_forward(tm, pm, _x(), localise=False)
    assert [kr.key for kr in r.failed] == ["logits/last_hidden_state"]
    assert r["logits/last_hidden_state"].status == "failed"


def test_a_port_returning_its_hidden_states_first_fails_unpaired() -> None:
    tm, pm = _pair(hidden_first=True)
    r = align_forward(tm, pm, _x())
    assert not r.passed and "outputs_paired" not in r.options
    assert r["logits/last_hidden_state"].status == "missing"
    assert {kr.key for kr in r.results if kr.status == "extra"} == {
        "logits/0/0", "logits/0/1", "logits/2"}
    assert r.options["outputs_not_compared"] == {"logits/1": "None in Paddle"}
    assert "output_hidden_states=True" in r.options["findings"][0]


class Seq2Seq(tnn.Module):
    """Hugging Face's Pegasus: the decoder's and the encoder's outputs by name."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = tnn.Linear(H, H), tnn.Linear(H, H)

    def forward(self, src, tgt):
        e = torch.tanh(self.enc(src))
        return {"last_hidden_state": self.dec(tgt) + e.mean(1, keepdim=True),
                "encoder_last_hidden_state": e}


class PaddleSeq2Seq(pnn.Layer):
    """PaddleNLP's: (decoder output, cache None, encoder output, the encoder's mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = pnn.Linear(H, H), pnn.Linear(H, H)

    def forward(self, src, tgt):
        e = paddle.tanh(self.enc(src))
        mask = paddle.zeros([src.shape[0], 1, 1, src.shape[1]])
        return self.dec(tgt) + e.mean(1, keepdim=True), None, e, mask


def test_align_forward_pairs_a_seq2seq_port_around_its_none_cache() -> None:
    torch.manual_seed(0)
    tm, pm = Seq2Seq(), PaddleSeq2Seq()
    load_into_paddle(pm, tm)
    rng = np.random.default_rng(1)
    src = rng.standard_normal((B, S, H)).astype(np.float32)
    tgt = rng.standard_normal((B, L, H)).astype(np.float32)
    r = align_forward(tm, pm, {"src": src, "tgt": tgt}, calibrate=True)
    assert r.passed, r.to_table()
    assert r.options["outputs_paired"] == {"logits/0": "logits/last_hidden_state",
                                           "logits/2": "logits/encoder_last_hidden_state"}
    assert r.options["outputs_not_compared"] == {
        "logits/1": "None in Paddle",
        "logits/3": "returned by the port beyond the reference's outputs"}
    assert {kr.key for kr in r.results} == {"logits/last_hidden_state",
                                            "logits/encoder_last_hidden_state"}


class TupleRef(tnn.Module):
    """A reference returning a tuple with a None in it (Hugging Face's ``return_dict=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = tnn.Linear(H, H)

    def forward(self, x):
        y = self.fc(x)
        return y, None, y.sum(-1)


class PaddleTwo(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.fc = pnn.Linear(H, H)

    def forward(self, x):
        y = self.fc(x)
        return y, y.sum(-1)


def test_a_none_in_the_reference_is_said_and_the_rest_pair_by_position() -> None:
    torch.manual_seed(0)
    tm, pm = TupleRef(), PaddleTwo()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, _x())
    assert r.passed, r.to_table()
    assert r.options["outputs_paired"] == {"logits/1": "logits/2"}
    assert r.options["outputs_not_compared"] == {"logits/1": "None in torch"}


def _train(tm, pm, steps: int = 2):
    from reprod.align import align_train

    x = _x()
    y = np.random.default_rng(1).standard_normal((B, L, H)).astype(np.float32)

    def torch_loss(out, target):
        return ((out["last_hidden_state"] - target) ** 2).mean()

    def paddle_loss(out, target):
        return ((out[0] - target) ** 2).mean()

    return align_train(tm, pm, [(x, y)], steps=steps, torch_loss_fn=torch_loss,
                       paddle_loss_fn=paddle_loss,
                       torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
                       paddle_optimizer=paddle.optimizer.SGD(0.1, parameters=pm.parameters()))


def test_align_train_pairs_the_output_and_says_the_port_s_others_once() -> None:
    # every step's port outputs beyond the reference's: not compared, said once for step 0
    r = _train(*_pair())
    assert r.passed, r.to_table(failed_only=True)
    assert not [kr.key for kr in r.results if "/logits/" in kr.key and "last_hidden" not in kr.key]
    assert "step1/logits/2/0" in r.options["outputs_not_compared"]
    said = [f for f in r.options["findings"] if f.startswith("the port returns 1 more output ")]
    assert len(said) == 1 and "step0/logits/2/0, step0/logits/2/1" in said[0], said
    r = _train(*_pair(scale=1.05))
    assert "step0/logits/last_hidden_state" in {kr.key for kr in r.failed}
