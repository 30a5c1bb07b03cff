"""align_forward(by_order=True) names the block whose own forward code differs (a dropped residual
add), as pairing by name does: by order only leaf layers are recorded, and such a bug first shows
as a leaf whose input already differs; the blocks that end between the last aligned leaf and
that one are then recorded on both sides and paired by the leaves they hold."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_forward, load_into_paddle  # noqa: E402


class TorchBlock(torch.nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1),
                                        torch.nn.BatchNorm2d(c), torch.nn.ReLU())

    def forward(self, x):
        return x + self.body(x)


class TorchNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(TorchBlock(8), TorchBlock(8), TorchBlock(8))
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class PaddleBlock(paddle.nn.Layer):
    """The port: no inner Sequential, its own names; ``residual=False`` is the bug."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(c, c, 3, padding=1)
        self.norm = paddle.nn.BatchNorm2D(c)
        self.act = paddle.nn.ReLU()
        self.residual = True
        self.scale_in = 1.0  # the block's own code before its first leaf: a bug where not 1

    def forward(self, x):
        x = x * self.scale_in
        y = self.act(self.norm(self.conv(x)))
        return x + y if self.residual else y


class PaddleNet(paddle.nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = paddle.nn.Conv2D(3, 8, 3, padding=1)
        self.stages = paddle.nn.LayerList([PaddleBlock(8) for _ in range(3)])  # never called
        self.proj = paddle.nn.Conv2D(8, 4, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.proj(x)


def _pair(seed: int = 0) -> tuple[TorchNet, PaddleNet]:
    torch.manual_seed(seed)
    paddle.seed(seed)
    tm, pm = TorchNet().eval(), PaddleNet()
    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    return tm, pm


def _x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_the_port_aligns_as_it_is():
    tm, pm = _pair()
    r = align_forward(tm, pm, _x(), by_order=True, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


@pytest.mark.parametrize("block", [0, 1, 2])
@pytest.mark.parametrize("calibrate", [False, True])
def test_a_dropped_residual_is_named_at_its_block(block, calibrate, tmp_path):
    tm, pm = _pair()
    pm.stages[block].residual = False
    r = align_forward(tm, pm, _x(), by_order=True, calibrate=calibrate, out_dir=tmp_path)
    assert not r.passed
    div = r.options["divergence"]
    assert (div["layer"], div["kind"], div["hint"]) == (f"blocks.{block}", "layer", None)
    message = div["message"]
    # the porter edits the port's block, named as the leaves' port layers are
    assert message.startswith(f"diverges at blocks.{block} (TorchBlock vs PaddleBlock; the "
                              f"port's stages.{block}): input aligned (max "), message
    assert div["port_layer"] == f"stages.{block}"
    assert message.endswith("; its recorded sublayers align, so the cause is its own forward "
                            "code"), message
    assert r.options["findings"] == [message]
    # the block's captures are written with the leaves', under the reference's names
    import reprod

    with reprod.load(tmp_path / "forward_layers_paddle.npy") as port, \
            reprod.load(tmp_path / "forward_layers_torch.npy") as ref:
        assert f"blocks.{block}.out" in port and f"blocks.{block}.out" in ref
        again = reprod.compare(ref, port, threshold=1e-5)
        assert not again[f"blocks.{block}.out"].passed and again[f"blocks.{block}.in"].passed


def test_a_leaf_bug_is_still_named_at_its_leaf():
    tm, pm = _pair()
    with paddle.no_grad():
        pm.stages[1].norm._epsilon = 1e-1
    r = align_forward(tm, pm, _x(), by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "blocks.1.body.1" and div["message"].startswith(
        "diverges at blocks.1.body.1 (BatchNorm2d; the port's stages.1.norm): input aligned"), div


def test_a_difference_outside_every_block_keeps_the_between_message():
    # the model's own forward code between the blocks and the head: no block diverges
    tm, pm = _pair()
    forward = pm.forward

    def shifted(x):
        x = pm.conv_in(x)
        for stage in pm.stages:
            x = stage(x)
        return pm.proj(x * 1.5)

    pm.forward = shifted
    r = align_forward(tm, pm, _x(), by_order=True)
    message = r.options["divergence"]["message"]
    assert message.startswith(
        "diverges before head (Conv2d; the port's proj): input already differs"), message
    assert "although blocks.2.body.2 aligns" in message, message
    pm.forward = forward


class TorchBottleneck(torch.nn.Module):
    """ResNet's shape: the add inside the block, before its last leaf (a ReLU)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(c)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn(self.conv(x)))


class PaddleBottleneck(paddle.nn.Layer):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = paddle.nn.Conv2D(c, c, 3, padding=1)
        self.bn = paddle.nn.BatchNorm2D(c)
        self.relu = paddle.nn.ReLU()
        self.residual = True

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.relu(x + y if self.residual else y)


def test_a_dropped_add_inside_a_block_before_its_last_leaf_is_named_at_the_block():
    torch.manual_seed(0)
    paddle.seed(0)
    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), TorchBottleneck(8), TorchBottleneck(8),
                             torch.nn.Conv2d(8, 4, 1)).eval()
    pm = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 1), PaddleBottleneck(8), PaddleBottleneck(8),
                              paddle.nn.Conv2D(8, 4, 1))
    load_into_paddle(pm, tm, by_order=True)
    pm.eval()
    assert align_forward(tm, pm, _x(), by_order=True).passed
    pm[2].residual = False
    r = align_forward(tm, pm, _x(), by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "2", div
    message = div["message"]
    assert message.startswith("diverges at 2 (TorchBottleneck vs PaddleBottleneck): input aligned"), \
        message
    assert "; inside it, the input of 2.relu already differs (max diff " in message, message
    assert message.endswith("while its recorded sublayers before that align, so the cause is 2's "
                            "own forward code"), message


# --- replay by order, containers included ---------------------------------------------------------


def test_replay_by_order_pairs_blocks_by_their_leaves_and_finds_a_dropped_add():
    from reprod.capture import record, replay

    tm, pm = _pair()
    with torch.no_grad(), record(tm) as ref:
        tm(torch.from_numpy(_x()))
    r = replay(pm, ref, by_order=True, containers=True, threshold=1e-4)
    assert r.passed, r.to_table(failed_only=True)
    assert {f"blocks.{i}.out" for i in range(3)} <= {k.key for k in r}
    # the Sequential inside each block and the list of blocks pair with nothing on the port
    assert sorted(r.options["replay_unpaired"]) == ["blocks", "blocks.0.body", "blocks.1.body",
                                                    "blocks.2.body"]
    assert r.options["replay_skipped"] == []
    pm.stages[1].residual = False
    r = replay(pm, ref, by_order=True, containers=True, threshold=1e-4)
    assert sorted(k.key for k in r.failed) == ["<model>.out", "blocks.1.out"]


def test_a_layer_raising_with_no_message_is_skipped_with_its_exception_named():
    from reprod.capture import record, replay

    tm, pm = _pair()
    with torch.no_grad(), record(tm) as ref:
        tm(torch.from_numpy(_x()))

    def broken(x):
        raise NotImplementedError

    pm.proj.forward = broken
    r = replay(pm, ref, rename={"proj": "head", "conv_in": "stem"}, threshold=1e-4)
    assert {"layer": "proj", "reference": "head",
            "reason": "replay raised NotImplementedError"} in r.options["replay_skipped"]


def test_a_block_s_own_code_before_its_first_leaf_is_named_at_the_block():
    """diffusers' UpBlock2D concatenates its skip connection before its first resnet: a bug
    there showed as the first resnet's input differing, "between" the last leaf of the block
    before and it, as no block ending between the two holds that code."""
    tm, pm = _pair()
    pm.stages[1].scale_in = 1.5
    div = align_forward(tm, pm, _x(), by_order=True).options["divergence"]
    assert div["layer"] == "blocks.1", div
    assert div["message"].endswith("so the cause is blocks.1's own forward code"), div
