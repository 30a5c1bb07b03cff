"""compare_structure: names and shapes side by side, counts that agree across the frameworks."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from align_twins import PaddleNet, TorchNet  # noqa: E402

from reprod.align import ConversionRules, compare_structure  # noqa: E402


def _numel_torch_state(model: torch.nn.Module) -> int:
    return sum(
        v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    )


def test_twins_match_and_counts_agree_with_each_framework() -> None:
    tm, pm = TorchNet(), PaddleNet()
    report = compare_structure(tm, pm)
    assert report.ok
    # independent references: torch's parameters + buffers, Paddle's state dict
    assert report.torch_total == _numel_torch_state(tm)
    assert report.paddle_total == sum(int(v.size) for v in pm.state_dict().values())
    assert report.torch_total == report.paddle_total
    assert report.torch_trainable == sum(p.numel() for p in tm.parameters())
    assert report.paddle_trainable == sum(
        int(p.size) for p in pm.parameters() if not p.stop_gradient
    )
    # a naive count of Paddle parameters includes the BatchNorm statistics
    assert sum(int(p.size) for p in pm.parameters()) == report.torch_trainable + 2 * 8
    statuses = {r.torch_name: r.status for r in report.rows}
    assert statuses["fc1.weight"] == statuses["head.weight"] == "transposed"
    assert statuses["bn.num_batches_tracked"] == "dropped"
    assert statuses["bn.running_var"] == "ok"
    row = next(r for r in report.rows if r.torch_name == "fc1.weight")
    assert (row.torch_shape, row.paddle_shape, row.note) == (
        (16, 8),
        (8, 16),
        "transposed: will be converted",
    )
    assert not next(r for r in report.rows if r.paddle_name == "bn._mean").trainable
    assert all(lc.ok for lc in report.layers)
    assert {lc.layer for lc in report.layers} == {"conv", "bn", "emb", "fc1", "norm", "head"}


class _PaddleWrong(paddle.nn.Layer):
    """The port with three mistakes: a missing layer, a wrong width, a layer torch does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(8)
        self.emb = paddle.nn.Embedding(11, 8)
        self.fc1 = paddle.nn.Linear(8, 32)
        self.head = paddle.nn.Linear(16, 5)
        self.extra = paddle.nn.Linear(5, 5)


def test_missing_extra_and_shape_are_reported_row_by_row() -> None:
    report = compare_structure(TorchNet(), _PaddleWrong())
    assert not report.ok
    by_status = {
        s: sorted(r.paddle_name for r in report.rows_with(s)) for s in ("missing", "extra", "shape")
    }
    assert by_status == {
        "missing": ["norm.bias", "norm.weight"],
        "extra": ["extra.bias", "extra.weight"],
        "shape": ["fc1.bias", "fc1.weight"],
    }
    fc1 = next(r for r in report.rows if r.paddle_name == "fc1.weight")
    assert "converted [8, 16] vs paddle [8, 32]" in fc1.note
    counts = {lc.layer: (lc.torch_count, lc.paddle_count) for lc in report.layers}
    assert counts["norm"] == (32, 0)
    assert counts["extra"] == (0, 30)
    assert counts["fc1"] == (16 * 8 + 16, 8 * 32 + 32)
    table = report.to_table(only_problems=True, layers=True)
    assert "missing in paddle" in table and "extra: only in paddle" in table
    assert "structure differs: 2 missing, 2 extra, 2 shape" in table
    assert "fc1.weight" in table and "conv.weight" not in table.split("\n\n")[0]


def test_a_linear_that_paddle_stores_untransposed_gets_a_hint() -> None:
    class T(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 4)

    class P(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.proj = paddle.nn.Layer()
            self.proj.weight = self.proj.create_parameter(
                [4, 3]
            )  # a hand-written layer, torch layout
            self.proj.bias = self.proj.create_parameter([4], is_bias=True)

    report = compare_structure(T(), P())
    row = next(r for r in report.rows if r.paddle_name == "proj.weight")
    assert row.status == "shape" and "no-transpose rule" in row.note
    fixed = compare_structure(T(), P(), rules=ConversionRules(no_transpose=[r"proj\.weight"]))
    assert fixed.ok


def test_rules_apply_to_the_structure_check() -> None:
    class P(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.body = PaddleNet()

    assert not compare_structure(TorchNet(), P()).ok
    report = compare_structure(TorchNet(), P(), rules=ConversionRules(rename=[("^", "body.")]))
    assert report.ok, report.to_table(only_problems=True)


@pytest.mark.parametrize("skip", [r"^head\.", r"^head\.weight$"])
def test_skipped_keys_are_shown_and_left_out_of_the_counts(skip: str) -> None:
    tm = TorchNet()
    report = compare_structure(tm, PaddleNet(), rules=ConversionRules(skip=[skip]))
    skipped = report.rows_with("skipped")
    assert skipped and all(r.torch_name.startswith("head.") for r in skipped)
    assert report.torch_total == _numel_torch_state(tm) - sum(
        r.torch_shape[0] * (r.torch_shape[1] if len(r.torch_shape) > 1 else 1) for r in skipped
    )
    assert {r.paddle_name for r in report.rows_with("extra")} == {r.torch_name for r in skipped}


class _RenamedPort(paddle.nn.Layer):
    """The twin port with every layer under another name: nothing pairs by name."""

    def __init__(self) -> None:
        super().__init__()
        inner = PaddleNet()
        for name, layer in list(inner.named_children()):
            setattr(self, f"renamed_{name}", layer)


def test_names_that_do_not_pair_with_equal_totals_suggest_by_order() -> None:
    report = compare_structure(TorchNet(), _RenamedPort())
    assert not report.ok
    assert "try compare_structure(..., by_order=True)" in report.summary_line()
    assert compare_structure(TorchNet(), _RenamedPort(), by_order=True).ok


def test_conversion_errors_name_a_few_keys_a_count_and_the_by_order_hint() -> None:
    from reprod.align import convert
    from reprod.errors import KeyMismatchError

    torch_model = TorchNet()
    sd = {f"renamed_{k}": v for k, v in torch_model.state_dict().items()}
    with pytest.raises(KeyMismatchError) as info:
        convert(sd, model=torch_model)
    text = str(info.value)
    assert "\n" not in text and len(text) < 1000, text
    assert "more)" in text and "by_order=True" in text
