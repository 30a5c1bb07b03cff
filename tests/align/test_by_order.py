"""Pairing weights by definition order when no rename maps the names (features.0 vs stem.conv)."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod import KeyMismatchError, ReprodError  # noqa: E402
from reprod.align import (  # noqa: E402
    ConversionRules,
    by_order_rules,
    compare_structure,
    convert,
    load_into_paddle,
    pair_weights_by_order,
)
from reprod.align.cli import main  # noqa: E402
from reprod.storage.framework_files import read_pdparams  # noqa: E402

HERE = os.path.abspath(__file__)
HIDDEN, CLASSES = 16, 5


class TorchNet(torch.nn.Module):
    """torchvision style: Sequential containers, indices for names."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, HIDDEN, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(HIDDEN),
            torch.nn.ReLU(),
        )
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(HIDDEN, HIDDEN),  # square: the layout cannot be read from shapes
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, CLASSES),
        )

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class PaddleBlock(paddle.nn.Layer):
    def __init__(self, cin: int, cout: int, bias: bool) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(cin, cout, 3, padding=1, bias_attr=None if bias else False)
        self.bn = paddle.nn.BatchNorm2D(cout)

    def forward(self, x):
        return paddle.nn.functional.relu(self.bn(self.conv(x)))


class PaddleHead(paddle.nn.Layer):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.hidden = paddle.nn.Linear(HIDDEN, HIDDEN)
        self.out = paddle.nn.Linear(HIDDEN, classes)

    def forward(self, x):
        return self.out(paddle.nn.functional.relu(self.hidden(x)))


class PaddlePort(paddle.nn.Layer):
    """The same network with other names and containers: no rename rule maps one onto the other."""

    def __init__(self, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = PaddleBlock(3, 8, bias=True)
        self.body = PaddleBlock(8, HIDDEN, bias=False)
        self.head = PaddleHead(classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(axis=(2, 3)))


def wrong_port() -> PaddlePort:
    return PaddlePort(classes=CLASSES + 1)


EXPECTED = {
    "features.0.weight": "stem.conv.weight",
    "features.0.bias": "stem.conv.bias",
    "features.1.weight": "stem.bn.weight",
    "features.1.bias": "stem.bn.bias",
    "features.1.running_mean": "stem.bn._mean",
    "features.1.running_var": "stem.bn._variance",
    "features.3.weight": "body.conv.weight",
    "features.4.weight": "body.bn.weight",
    "features.4.bias": "body.bn.bias",
    "features.4.running_mean": "body.bn._mean",
    "features.4.running_var": "body.bn._variance",
    "classifier.0.weight": "head.hidden.weight",
    "classifier.0.bias": "head.hidden.bias",
    "classifier.2.weight": "head.out.weight",
    "classifier.2.bias": "head.out.bias",
}


@pytest.fixture
def models() -> tuple[TorchNet, PaddlePort]:
    torch.manual_seed(0)
    paddle.seed(1)
    tm = TorchNet()
    with torch.no_grad():  # non-trivial statistics, so a swapped mean/variance would show
        for bn in (tm.features[1], tm.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    return tm.eval(), PaddlePort()


def _forward_both(tm: TorchNet, pm: PaddlePort) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)
    pm.eval()
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    return want, pm(paddle.to_tensor(x)).numpy()


def test_pairs_follow_definition_order(models) -> None:
    tm, pm = models
    got = pair_weights_by_order(tm, pm)
    assert list(got.items()) == list(EXPECTED.items())  # num_batches_tracked left out
    # the same pairs from state dicts alone
    assert pair_weights_by_order(tm.state_dict(), pm.state_dict()) == EXPECTED


def test_pair_by_order_is_a_deprecated_alias(models) -> None:
    import reprod.align as align

    tm, pm = models
    with pytest.warns(DeprecationWarning, match="pair_weights_by_order"):
        assert align.pair_by_order(tm, pm) == EXPECTED


def test_load_by_order_then_forward_outputs_align(models) -> None:
    tm, pm = models
    want_before, got_before = _forward_both(tm, pm)
    assert np.abs(want_before - got_before).max() > 1e-3  # different random weights before
    load_into_paddle(pm, tm, by_order=True)
    want, got = _forward_both(tm, pm)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    sd = pm.state_dict()
    np.testing.assert_array_equal(
        sd["body.bn._variance"].numpy(), tm.features[4].running_var.numpy()
    )


def test_linear_weights_are_transposed(models) -> None:
    tm, pm = models
    conv = convert(tm, by_order=True, paddle_model=pm)
    w_out = tm.classifier[2].weight.detach().numpy()
    w_hidden = tm.classifier[0].weight.detach().numpy()
    np.testing.assert_array_equal(conv.weights["head.out.weight"], w_out.T)  # [5,16] -> [16,5]
    np.testing.assert_array_equal(conv.weights["head.hidden.weight"], w_hidden.T)  # square
    conv_w = tm.features[0].weight.detach().numpy()
    np.testing.assert_array_equal(conv.weights["stem.conv.weight"], conv_w)
    assert conv.linear_source == "order"
    assert {p.torch_name for p in conv.by_action("transpose")} == {
        "classifier.0.weight",
        "classifier.2.weight",
    }


def test_square_linear_follows_the_model_not_the_name() -> None:
    # a square 2-D weight whose name the heuristic takes for a conv: the torch model says Linear
    class T(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_proj = torch.nn.Linear(4, 4)

    class P(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.fc = paddle.nn.Linear(4, 4)

    tm, pm = T(), P()
    rules = by_order_rules(tm, pm)
    assert rules.paddle_name("conv_proj.weight") == "fc.weight"
    w = convert(tm, rules=rules).weights["fc.weight"]
    np.testing.assert_array_equal(w, tm.conv_proj.weight.detach().numpy().T)


def test_a_shape_disagreement_lists_every_position_in_one_error(models) -> None:
    tm, _ = models
    with pytest.raises(KeyMismatchError) as info:
        pair_weights_by_order(tm, wrong_port())
    assert str(info.value) == (  # the positions that agree are not listed
        "pairing by order failed: torch TorchNet (15 tensors) vs paddle PaddlePort (15 tensors): "
        "#13 classifier.2.weight [5, 16] vs head.out.weight [16, 6]; "
        "#14 classifier.2.bias [5] vs head.out.bias [6]"
    )
    with pytest.raises(KeyMismatchError, match="head.out.weight"):
        load_into_paddle(wrong_port(), tm, by_order=True)


def test_skipped_keys_are_left_out_of_the_order(models) -> None:
    tm, pm = models
    sd = OrderedDict((k, v.numpy()) for k, v in pm.state_dict().items() if k.startswith("stem."))
    rules = ConversionRules(skip=[r"^features\.[34]\.", r"^classifier\."])
    assert pair_weights_by_order(tm, sd, rules=rules) == {k: v for k, v in EXPECTED.items() if "stem" in v}
    with pytest.raises(
        KeyMismatchError, match=r"#6 features\.3\.weight \[16, 8, 3, 3\] vs nothing"
    ):
        pair_weights_by_order(tm, sd)


def test_a_missing_layer_shows_the_overhang(models) -> None:
    tm, pm = models
    sd = OrderedDict((k, v.numpy()) for k, v in pm.state_dict().items())
    del sd["head.out.bias"]
    with pytest.raises(KeyMismatchError, match=r"#14 classifier\.2\.bias \[5\] vs nothing"):
        pair_weights_by_order(tm, sd)


def test_a_statistic_never_pairs_with_a_weight(models) -> None:
    # all four BatchNorm tensors are [8]: only the kind check sees a reordered port
    tm, pm = models
    sd = pm.state_dict()
    keys = list(sd)
    i = keys.index("stem.bn.weight")
    keys[i], keys[i + 2] = keys[i + 2], keys[i]  # _mean where weight was
    reordered = OrderedDict((k, sd[k].numpy()) for k in keys)
    with pytest.raises(KeyMismatchError) as info:
        pair_weights_by_order(tm, reordered)
    msg = str(info.value)
    assert "#2 features.1.weight vs stem.bn._mean" in msg
    assert "#4 features.1.running_mean vs stem.bn.weight" in msg


def test_compare_structure_shows_the_pairs(models) -> None:
    tm, pm = models
    assert not compare_structure(tm, pm).ok  # by name nothing matches
    report = compare_structure(tm, pm, by_order=True)
    assert report.ok, report.to_table(only_problems=True)
    row = next(r for r in report.rows if r.torch_name == "classifier.2.weight")
    assert (row.paddle_name, row.status, row.torch_shape, row.paddle_shape) == (
        "head.out.weight",
        "transposed",
        (5, 16),
        (16, 5),
    )
    assert row.note.startswith("paired by order")
    table = report.to_table()
    assert "features.0.weight" in table and "stem.conv.weight" in table


def test_compare_structure_by_order_reports_instead_of_raising(models) -> None:
    tm, _ = models
    report = compare_structure(tm, wrong_port(), by_order=True)
    assert not report.ok
    assert [r.torch_name for r in report.problems] == ["classifier.2.weight", "classifier.2.bias"]
    assert all(r.status == "shape" for r in report.problems)


def test_from_pairs_does_not_chain_renames() -> None:
    # a swap: sequential regex renames would map a -> b -> a
    rules = ConversionRules.from_pairs({"a.weight": "b.weight", "b.weight": "a.weight"})
    assert rules.paddle_name("a.weight") == "b.weight"
    assert rules.paddle_name("b.weight") == "a.weight"
    assert rules.paddle_name("c.running_var") == "c._variance"  # unpaired keys: usual rules


def test_by_order_needs_a_paddle_model(models) -> None:
    tm, pm = models
    with pytest.raises(ReprodError, match="paddle_model"):
        convert(tm, by_order=True)
    # by name, the port only says which of its tensors fuse several: none here
    assert convert(tm, paddle_model=pm).weights.keys() == convert(tm).weights.keys()


def test_cli_by_order(models, tmp_path, capsys) -> None:
    tm, _ = models
    src, dst = str(tmp_path / "m.pth"), str(tmp_path / "m.pdparams")
    torch.save(tm.state_dict(), src)
    assert main([src, dst, "--by-order", "--paddle-model", f"{HERE}:PaddlePort"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(
        f"wrote {dst}: 15 tensors converted: 2 transposed (found by the shapes of the Paddle "
        "tensors paired by order), 15 renamed, 13 copied, 0 skipped by rule, 2 dropped"
    )
    assert list(read_pdparams(dst)) == list(EXPECTED.values())
    assert pair_weights_by_order(src, dst) == EXPECTED  # files on both sides
    pm = PaddlePort()
    pm.set_state_dict(paddle.load(dst))
    want, got = _forward_both(tm, pm)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_cli_by_order_errors(models, tmp_path, capsys) -> None:
    tm, _ = models
    src, dst = str(tmp_path / "m.pth"), str(tmp_path / "m.pdparams")
    torch.save(tm.state_dict(), src)
    assert main([src, dst, "--by-order"]) == 2
    assert "--by-order needs --paddle-model" in capsys.readouterr().err
    assert main([src, dst, "--by-order", "--paddle-model", f"{HERE}:wrong_port"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "head.out.weight [16, 6]" in err
    assert not os.path.exists(dst)


def test_a_port_of_another_architecture_lists_the_first_positions_and_counts_the_rest() -> None:
    """torchvision's googlenet against paddle.vision's (305 tensors against 69) disagreed at
    every position: one line of 300 of them buried where the orders part."""
    torch = pytest.importorskip("torch")
    tm = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])  # 20 tensors
    sd = OrderedDict((f"l{i}.weight", np.zeros((3, 3), np.float32)) for i in range(12))
    with pytest.raises(KeyMismatchError) as info:
        pair_weights_by_order(tm, sd)
    text = str(info.value)
    assert text.startswith("pairing by order failed: torch Sequential (20 tensors) vs paddle "
                           "state dict (12 tensors): #0 0.weight [4, 4] vs l0.weight [3, 3]; ")
    assert text.count(" vs ") == 1 + 8  # the header's and the eight positions listed
    assert "#7 " in text and "#8 " not in text
    assert text.endswith("; ... and 12 more positions (all of them: print(compare_structure("
                         "torch_model, paddle_model, by_order=True).to_table()))")
