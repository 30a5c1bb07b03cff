"""align_forward's localisation: when the outputs differ, the first layer that makes them differ,
and why where the numbers fit; align_train and align_forward with by_order."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
from align_twins import make_batch, twins  # noqa: E402
from test_by_order import EXPECTED, PaddlePort, TorchNet  # noqa: E402

import reprod  # noqa: E402
from reprod import KeyMismatchError  # noqa: E402
from reprod.align import align_forward, align_train, load_into_paddle  # noqa: E402


def _by_order_twins(seed: int = 0) -> tuple[TorchNet, PaddlePort]:
    torch.manual_seed(seed)
    paddle.seed(seed)
    tm, pm = TorchNet(), PaddlePort()
    with torch.no_grad():
        for bn in (tm.features[1], tm.features[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def _image(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, 6, 6)).astype(np.float32)


# --- localisation -------------------------------------------------------------------------------


def test_a_passing_forward_is_not_localised(tmp_path) -> None:
    tm, pm = twins(seed=0)
    inputs, _ = make_batch(1)
    r = align_forward(tm, pm, inputs, out_dir=tmp_path)
    assert r.passed and "findings" not in r.options
    assert not (tmp_path / "forward_layers_torch.npy").exists()


def test_a_bn_epsilon_bug_is_named_and_diagnosed(tmp_path) -> None:
    tm, pm = twins(seed=0)
    pm.bn._epsilon = 1e-2
    inputs, _ = make_batch(1)
    r = align_forward(tm, pm, inputs, out_dir=tmp_path, method="max", threshold=1e-6)
    assert not r.passed
    div = r.options["divergence"]
    assert (div["layer"], div["kind"]) == ("bn", "layer")
    assert div["message"].startswith("diverges at bn (BatchNorm2d): input aligned")
    assert div["hint"] is not None and "BN epsilon: port uses ~1e-2, reference 1e-5" in div["hint"]
    setting = ("1 layer setting of the port differs from the reference's, whatever the values "
               "say: bn: epsilon 1e-05 in torch, 0.01 in Paddle; bn is the layer where the "
               "values first differ: the likely cause")
    assert r.options["findings"] == [
        div["message"], "likely cause at bn: BN epsilon: port uses ~1e-2, reference 1e-5", setting]
    assert r["settings/bn/epsilon"].status == "setting"
    # the diff log keeps reprod_log's lines, then the findings
    log = (tmp_path / "forward_diff.log").read_text().splitlines()
    assert log[-4].endswith("diff check failed")
    assert log[-3].endswith(f"finding: {div['message']}")
    assert log[-1].endswith(f"finding: {setting}")
    # the layer captures are written, and reproduce the divergence on their own
    ref = reprod.load(tmp_path / "forward_layers_torch.npy")
    port = reprod.load(tmp_path / "forward_layers_paddle.npy")
    again = reprod.compare(ref, port, method="max", threshold=1e-6)
    assert reprod.capture.first_divergence(again).layer == "bn"


def test_a_layernorm_epsilon_bug_is_diagnosed_only_when_it_fits() -> None:
    tm, pm = twins(seed=0)
    pm.norm._epsilon = 1e-3
    inputs, _ = make_batch(1)
    r = align_forward(tm, pm, inputs, calibrate=True)
    div = r.options["divergence"]
    assert div["layer"] == "norm" and "LayerNorm epsilon: port uses ~1e-3, reference 1e-5" in div["hint"]
    # a wrong LayerNorm weight is no epsilon: named, and the weight said, not an epsilon
    tm, pm = twins(seed=0)
    pm.norm.weight.set_value(pm.norm.weight.numpy() * 1.5)
    r = align_forward(tm, pm, inputs, calibrate=True)
    assert r.options["divergence"]["layer"] == "norm"
    hint = r.options["divergence"]["hint"]
    assert hint.startswith("its own parameter weight (max diff ") and "epsilon" not in hint, hint


class _TorchAct(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Hardsigmoid(), torch.nn.Linear(16, 4)
        )

    def forward(self, x):
        return self.body(x)


class _OldHardsigmoid(paddle.nn.Layer):
    """The fluid-era default: slope 0.2 where torch's Hardsigmoid has 1/6."""

    def forward(self, x):
        return paddle.nn.functional.hardsigmoid(x, slope=0.2, offset=0.5)


class _PaddleAct(paddle.nn.Layer):
    def __init__(self, act: paddle.nn.Layer) -> None:
        super().__init__()
        self.body = paddle.nn.Sequential(paddle.nn.Linear(8, 16), act, paddle.nn.Linear(16, 4))

    def forward(self, x):
        return self.body(x)


def test_an_activation_variant_is_named_with_both_layer_types() -> None:
    torch.manual_seed(0)
    tm, pm = _TorchAct().eval(), _PaddleAct(_OldHardsigmoid())
    load_into_paddle(pm, tm)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32) * 3
    r = align_forward(tm, pm, x, calibrate=True)
    div = r.options["divergence"]
    assert div["layer"] == "body.1"
    assert "(Hardsigmoid vs _OldHardsigmoid)" in div["message"]
    assert "activation: reference Hardsigmoid (slope 1/6), port Hardsigmoid (slope 0.2)" in div["hint"]
    # the same port with paddle's own Hardsigmoid aligns
    pm2 = _PaddleAct(paddle.nn.Hardsigmoid())
    load_into_paddle(pm2, tm)
    assert align_forward(tm, pm2, x, calibrate=True).passed


# --- by order -----------------------------------------------------------------------------------


def test_forward_by_order_names_the_reference_layer_and_the_port_s() -> None:
    tm, pm = _by_order_twins()
    pm.body.bn._epsilon = 1e-2  # torch's features.4
    tm.eval()
    r = align_forward(tm, pm, _image(), calibrate=True, by_order=True)
    div = r.options["divergence"]
    assert div["layer"] == "features.4" and "BN epsilon: port uses ~1e-2" in div["hint"]
    # the port's name too, where the porter edits
    assert div["message"].startswith(
        "diverges at features.4 (BatchNorm2d; the port's body.bn): input aligned")


def test_forward_without_by_order_fails_closed_when_names_do_not_pair() -> None:
    tm, pm = _by_order_twins()
    pm.body.bn._epsilon = 1e-2
    r = align_forward(tm, pm, _image(), calibrate=True)
    div = r.options["divergence"]
    assert div["kind"] == "unpaired" and div["layer"] == ""
    assert "--by-order" in div["message"] and "match_by_order" in div["message"]


def test_train_by_order_pairs_parameters_that_no_rule_maps() -> None:
    batches = [(_image(s), np.array([s % 5, (s + 1) % 5], dtype=np.int64)) for s in range(2)]

    def run(tm, pm, **kw):
        tm.train()
        pm.train()
        return align_train(
            tm, pm, batches,
            torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
            torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
            paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters()),
            **kw,
        )

    tm, pm = _by_order_twins()
    with pytest.raises(KeyMismatchError, match="by_order"):
        run(tm, pm)
    tm, pm = _by_order_twins()
    r = run(tm, pm, by_order=True, calibrate=True)
    # keys carry the Paddle names, one gradient and one updated value per parameter and step
    trainable = [p for t, p in EXPECTED.items() if not t.endswith(("running_mean", "running_var"))]
    for step in (0, 1):
        for name in trainable:
            assert f"step{step}/grad/{name}" in r.keys()
            assert f"step{step}/param/{name}" in r.keys()
    # the only failures are the known running-variance difference
    assert {k.key.rsplit("/", 1)[1] for k in r.failed} <= {"stem.bn._variance", "body.bn._variance"}
    assert r["step1/param/head.hidden.weight"].passed


def test_one_criteria_object_judges_the_outputs_and_the_layers() -> None:
    tm, pm = twins(seed=0)
    pm.bn._epsilon = 1e-2
    inputs, _ = make_batch(1)
    by_keywords = align_forward(tm, pm, inputs, method="max", threshold=1e-6)
    crit = reprod.Criteria(methods="max", threshold=1e-6)
    by_criteria = align_forward(tm, pm, inputs, criteria=crit)
    assert by_criteria.results == by_keywords.results
    assert by_criteria.options["findings"] == by_keywords.options["findings"]
    # a shortcut given beside it overrides its field: nothing fails at a threshold of 1
    # the values within a threshold of 1; the epsilon injected is a setting that differs
    assert align_forward(tm, pm, inputs, criteria=crit, threshold=1.0, check_settings=False).passed
    with pytest.raises(reprod.ReprodError, match="noise_factor needs calibrate"):
        align_forward(tm, pm, inputs, criteria=crit, noise_factor=5)
