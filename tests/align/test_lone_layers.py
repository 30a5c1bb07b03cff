"""Ports where one side holds a few layers the other has not: a reference's sinusoidal table the
port computes, a pooler only the port defines (Hugging Face's RoFormer against PaddleNLP's). A
refused pairing by order names them and the rules that load the rest; ``port_only`` says a
Paddle tensor is the port's alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod import KeyMismatchError  # noqa: E402
from reprod.align import (  # noqa: E402
    ConversionRules,
    align_forward,
    compare_settings,
    compare_structure,
    load_into_paddle,
    pair_weights_by_order,
)

D, FF, VOCAB, TABLE = 16, 32, 50, 24
PAIRING = (r'rules=ConversionRules(skip=[r"^encoder\.table\."], '
           r'port_only=[r"^pooler\.dense\."])')


class TorchBlock(torch.nn.Module):
    """Hugging Face's order: the attention's LayerNorm before the feed-forward Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(D, D)
        self.out = torch.nn.Linear(D, D)
        self.norm1 = torch.nn.LayerNorm(D)
        self.fc1 = torch.nn.Linear(D, FF)
        self.fc2 = torch.nn.Linear(FF, D)
        self.norm2 = torch.nn.LayerNorm(D)

    def forward(self, x):
        x = self.norm1(x + self.out(torch.tanh(self.query(x))))
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


class TorchEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(TABLE, D // 2)  # a frozen sinusoidal table, as a layer
        self.layers = torch.nn.ModuleList([TorchBlock(), TorchBlock()])


class TorchModel(torch.nn.Module):
    def __init__(self, padding_idx: int | None = None) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, D, padding_idx=padding_idx)
        self.norm = torch.nn.LayerNorm(D)
        self.encoder = TorchEncoder()

    def forward(self, ids):
        x = self.norm(self.emb(ids))
        for block in self.encoder.layers:
            x = block(x)
        return x


class PaddleBlock(paddle.nn.Layer):
    """Paddle's TransformerEncoderLayer order: both Linears, then both LayerNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.query = paddle.nn.Linear(D, D)
        self.out = paddle.nn.Linear(D, D)
        self.fc1 = paddle.nn.Linear(D, FF)
        self.fc2 = paddle.nn.Linear(FF, D)
        self.norm1 = paddle.nn.LayerNorm(D)
        self.norm2 = paddle.nn.LayerNorm(D)

    def forward(self, x):
        x = self.norm1(x + self.out(paddle.tanh(self.query(x))))
        return self.norm2(x + self.fc2(paddle.nn.functional.relu(self.fc1(x))))


class Pooler(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.dense = paddle.nn.Linear(D, D)


class PaddleModel(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.emb = paddle.nn.Embedding(VOCAB, D)
        self.norm = paddle.nn.LayerNorm(D)
        self.layers = paddle.nn.LayerList([PaddleBlock(), PaddleBlock()])
        self.pooler = Pooler()  # the port's own: the reference has none

    def forward(self, ids):
        x = self.norm(self.emb(ids))
        for block in self.layers:
            x = block(x)
        return x


def models(padding_idx: int | None = None) -> tuple[TorchModel, PaddleModel]:
    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchModel(padding_idx).eval(), PaddleModel()
    pm.eval()
    with torch.no_grad():
        for p in tm.parameters():  # every tensor matters: no LayerNorm at its init of 1 and 0
            p.add_(torch.randn(p.shape) * 0.1)
    return tm, pm


def test_a_refusal_names_what_each_side_alone_holds_and_the_rules_that_load_the_rest():
    tm, pm = models()
    with pytest.raises(KeyMismatchError) as caught:
        pair_weights_by_order(tm, pm)
    text = str(caught.value)
    assert ("every other tensor pairs by shape, but the torch side alone holds "
            f"encoder.table.weight [{TABLE}, {D // 2}] and the Paddle side alone holds "
            f"pooler.dense.weight [{D}, {D}], pooler.dense.bias [{D}]") in text
    assert PAIRING in text
    # and where those sit: theirs, not the definition order's (which parts wherever a layer
    # defines its tensors in another order on each side)
    assert text.endswith(f"; the positions: #3 encoder.table.weight [{TABLE}, {D // 2}] vs "
                         f"nothing; #27 nothing vs pooler.dense.weight [{D}, {D}]; #28 nothing "
                         f"vs pooler.dense.bias [{D}]")


def test_the_rules_it_names_load_the_port_and_leave_its_own_layers_alone():
    tm, pm = models()
    pooler = pm.pooler.dense.weight.numpy().copy()
    rules = ConversionRules(skip=[r"^encoder\.table\."], port_only=[r"^pooler\.dense\."])
    pairs = pair_weights_by_order(tm, pm, rules=rules)
    assert pairs["encoder.layers.0.norm1.weight"] == "layers.0.norm1.weight"  # kind by kind
    assert "encoder.table.weight" not in pairs
    assert "pooler.dense.weight" not in pairs.values()

    load_into_paddle(pm, tm, by_order=True, rules=rules)
    np.testing.assert_array_equal(pm.pooler.dense.weight.numpy(), pooler)
    np.testing.assert_array_equal(pm.layers[1].fc1.weight.numpy(),
                                  tm.encoder.layers[1].fc1.weight.detach().numpy().T)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 5))
    with torch.no_grad():
        want = tm(torch.from_numpy(ids)).numpy()
    got = pm(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_structure_shows_the_ports_own_layer_outside_the_totals():
    tm, pm = models()
    rules = ConversionRules(skip=[r"^encoder\.table\."], port_only=[r"^pooler\.dense\."])
    report = compare_structure(tm, pm, rules=rules, by_order=True)
    assert report.ok, report.to_table(only_problems=True)
    own = {r.paddle_name: r.note for r in report.rows_with("own")}
    assert own["pooler.dense.weight"].startswith("own: only the port has it (port_only")
    assert report.torch_total == report.paddle_total


def test_by_name_a_port_only_layer_is_not_missing():
    tm, pm = models()
    rules = ConversionRules(
        skip=[r"^encoder\.table\."], rename=[(r"^encoder\.", "")],
        port_only=[r"^pooler\."])
    with pytest.raises(KeyMismatchError) as caught:
        # a torch block's LayerNorms come first, but by name the order does not matter
        load_into_paddle(pm, tm, rules=ConversionRules(
            skip=[r"^encoder\.table\."], rename=[(r"^encoder\.", "")]))
    assert ('missing 2 key(s): pooler.dense.weight, pooler.dense.bias | where only the port has '
            'them, keep its own: rules=ConversionRules(port_only=[r"^pooler\\.dense\\.weight$", '
            'r"^pooler\\.dense\\.bias$"])') in str(caught.value)
    load_into_paddle(pm, tm, rules=rules)
    np.testing.assert_array_equal(pm.layers[0].norm1.weight.numpy(),
                                  tm.encoder.layers[0].norm1.weight.detach().numpy())


def test_no_rules_are_named_where_the_shapes_cannot_tell_which_layer_is_alone():
    # the port's extra Linear sits among Linears of its shape: any of them could be the extra
    tm = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Linear(D, D), torch.nn.LayerNorm(D))
    pm = paddle.nn.Sequential(paddle.nn.Linear(D, D), paddle.nn.Linear(D, D),
                              paddle.nn.Linear(D, D), paddle.nn.LayerNorm(D))
    with pytest.raises(KeyMismatchError) as caught:
        pair_weights_by_order(tm, pm)
    assert "alone holds" not in str(caught.value)
    assert "ConversionRules(" not in str(caught.value)


def test_port_only_patterns_are_checked_like_the_others():
    from reprod import ReprodError

    with pytest.raises(ReprodError, match="port-only pattern"):
        ConversionRules(port_only=["(unclosed"])
    assert ConversionRules.from_strings(port_only=[r"^pooler\."]).port_only_pattern(
        "pooler.dense.weight") == r"^pooler\."


RULES = ConversionRules(skip=[r"^encoder\.table\."], port_only=[r"^pooler\.dense\."])


def test_settings_pair_the_layers_as_the_shapes_read_them():
    # Hugging Face's RoFormer: padding_idx 0, PaddleNLP's none; by order, kind by kind, its
    # three embeddings against the port's two left all of them unpaired and the report passed
    tm, pm = models(padding_idx=0)
    report = compare_settings(tm, pm, by_order=True)
    assert [(d.torch_layer, d.paddle_layer, d.setting, d.torch_value, d.paddle_value)
            for d in report.differ] == [("emb", "emb", "padding_idx", "0 (its row is not zero)", None)]
    assert not report.passed
    assert (r"layers with parameters: paired by order, leaving alone the layers the shapes say "
            r"one side alone holds (torch: ^encoder\.table\.; Paddle: ^pooler\.dense\.)"
            in str(report))
    # given the rules, as the weights were loaded: the same, and no note
    given = compare_settings(tm, pm, by_order=True, rules=RULES)
    assert given.differ == report.differ
    assert not any("leaving alone" in u for u in given.unpaired)


class TorchTwoTables(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Embedding(10, D, padding_idx=0)
        self.b = torch.nn.Embedding(10, D)
        self.norm = torch.nn.LayerNorm(D)


class PaddleOneTable(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.a = paddle.nn.Embedding(10, D)
        self.norm = paddle.nn.LayerNorm(D)


class PaddleOtherName(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.x = paddle.nn.Embedding(10, D)
        self.norm = paddle.nn.LayerNorm(D)


def test_a_kind_with_parameters_left_unpaired_is_no_pass():
    # by shapes and names, either embedding could be the one the port lacks: nothing pairs
    # them, and the padding index of the one that is ported goes unchecked
    report = compare_settings(TorchTwoTables(), PaddleOtherName(), by_order=True)
    assert not report.differ and report.compared == 1  # the LayerNorms
    assert report.unchecked == ("embedding: 2 in torch, 1 in Paddle",)
    assert not report.passed
    assert "unchecked, not paired: embedding: 2 in torch, 1 in Paddle" in str(report)


def test_a_name_both_sides_hold_settles_which_layer_the_port_lacks():
    # the port's embedding is named as the reference's first: that one pairs, b is the one the
    # port lacks, and a's padding index is compared
    report = compare_settings(TorchTwoTables(), PaddleOneTable(), by_order=True)
    assert [(d.torch_layer, d.paddle_layer, d.setting) for d in report.differ] == [
        ("a", "a", "padding_idx")]
    assert not report.unchecked


def test_align_forward_pairs_under_the_rules_the_weights_were_loaded_with():
    tm, pm = models()
    load_into_paddle(pm, tm, by_order=True, rules=RULES)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    assert align_forward(tm, pm, ids, by_order=True, rules=RULES).passed
    w = pm.layers[1].fc1.weight
    w.set_value(w * 1.05)
    for rules in (RULES, None):  # without them, as the shapes read the two models
        r = align_forward(tm, pm, ids, by_order=True, rules=rules)
        assert not r.passed
        assert r.options["divergence"]["layer"] == "encoder.layers.1.fc1", r.options


class PaddleWithIndex(PaddleModel):
    """PaddleClas's Swin registers its ``relative_position_index`` (int64) as a buffer, which
    timm keeps out of its state dict (``persistent=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("index", paddle.arange(6, dtype="int64").reshape([2, 3]))


def test_align_train_leaves_the_port_s_own_tensors_out_of_its_records():
    from reprod.align import align_train

    torch.manual_seed(0)
    paddle.seed(0)
    tm, pm = TorchModel().train(), PaddleWithIndex()
    pm.train()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    load_into_paddle(pm, tm, by_order=True, rules=RULES)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, VOCAB, (2, 5)), rng.standard_normal((2, 5, D)).astype("float32"))
               for _ in range(2)]
    topt = torch.optim.SGD(tm.parameters(), lr=0.1)
    popt = paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters())
    r = align_train(tm, pm, batches, steps=2, by_order=True, rules=RULES,
                    torch_loss_fn=torch.nn.MSELoss(), paddle_loss_fn=paddle.nn.MSELoss(),
                    torch_optimizer=topt, paddle_optimizer=popt)
    keys = {k.key for k in r.results}
    assert not any("pooler" in k or k.endswith("/index") for k in keys), sorted(keys)[:5]
    assert "step1/grad/layers.1.fc1.weight" in keys and "step1/stat/layers.1.norm1.weight" not in keys
    assert r.passed, r.to_table(failed_only=True)


def test_a_layer_alone_on_each_side_of_the_same_shapes_reads_as_moved() -> None:
    """HF's ConvBERT defines each attention's output Linear after its convolutions, PaddleNLP's
    before them: left alone, one on each side, of the same shapes, they are paired in the
    suggestion (skipping the one would load the port with the other random); a layer of other
    shapes stays one side's alone, and a BatchNorm's statistics pair by their own names."""
    from reprod.align.by_order import _moved

    t = {"l0.out.weight": (8, 8), "l0.out.bias": (8,), "l1.out.weight": (8, 8),
         "l1.out.bias": (8,), "bn.running_mean": (4,), "bn.running_var": (4,)}
    p = {"pool.weight": (8, 8), "pool.bias": (8,), "a.proj.weight": (8, 8), "a.proj.bias": (8,),
         "norm._mean": (4,), "norm._variance": (4,), "x.weight": (3, 8), "x.bias": (3,)}
    t_alone = [["l0.out.weight", "l0.out.bias"], ["l1.out.weight", "l1.out.bias"],
               ["bn.running_mean", "bn.running_var"]]
    p_alone = [["x.weight", "x.bias"], ["a.proj.weight", "a.proj.bias"],
               ["norm._variance", "norm._mean"], ["norm._mean", "norm._variance"],
               ["pool.weight", "pool.bias"]]
    got = _moved(t_alone, p_alone, t, p)
    assert got == [(t_alone[0], p_alone[1]), (t_alone[1], p_alone[4]), (t_alone[2], p_alone[3])]


class _TorchMLM(torch.nn.Module):
    """Hugging Face's BertForMaskedLM, small: no pooler, a head transform of one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(D, D)
        self.cls = torch.nn.Module()
        self.cls.transform = torch.nn.Module()
        self.cls.transform.dense = torch.nn.Linear(D, D)
        self.cls.transform.LayerNorm = torch.nn.LayerNorm(D)


class _PaddleMLM(paddle.nn.Layer):
    """PaddleNLP's: a pooler between the encoder and the head, of the head transform's
    shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = paddle.nn.Linear(D, D)
        self.pooler = paddle.nn.Layer()
        self.pooler.dense = paddle.nn.Linear(D, D)
        self.cls = paddle.nn.Layer()
        self.cls.transform = paddle.nn.Linear(D, D)
        self.cls.layer_norm = paddle.nn.LayerNorm(D)


def test_the_lone_layer_is_the_one_whose_words_the_other_side_lacks():
    """By shape either the pooler or the head transform is the port's own. By the last name
    alone, ``dense`` paired the reference's ``cls.transform.dense`` with the pooler's, and the
    rules said to leave ``cls.transform`` as it was: loaded so, the head kept its random
    weights. The words the names share say the pooler."""
    with pytest.raises(KeyMismatchError) as info:
        pair_weights_by_order(_TorchMLM(), _PaddleMLM())
    text = str(info.value)
    assert "the Paddle side alone holds pooler.dense.weight [16, 16], pooler.dense.bias [16]" \
        in text
    assert r'rules=ConversionRules(port_only=[r"^pooler\.dense\."])' in text
    pairs = pair_weights_by_order(_TorchMLM(), _PaddleMLM(),
                                  rules=ConversionRules(port_only=[r"^pooler\.dense\."]))
    assert pairs["cls.transform.dense.weight"] == "cls.transform.weight"
    assert pairs["cls.transform.LayerNorm.weight"] == "cls.layer_norm.weight"
