"""The optimizers' hyperparameters (``reprod.align.optim_settings``), compared as the layers'
settings are.

Each pair is checked both ways, as the layer and call settings are: the same optimizer spelled
the two frameworks' ways is no difference, and one step of each from the same weights and the
same gradient updates the weights alike; a changed hyperparameter, or a default that differs
between them, is exactly the differences named, and the step updates the weights otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")

from reprod.align import align_train  # noqa: E402
from reprod.align.optim_settings import compare_optimizers  # noqa: E402

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4)).astype(np.float32)  # torch layout [out, in]
B = RNG.standard_normal(3).astype(np.float32)
GW = (RNG.standard_normal((3, 4)) * 1e-3).astype(np.float32)  # small: epsilon matters
GB = (RNG.standard_normal(3) * 1e-3).astype(np.float32)
# a second step's gradient, another one: Adam's first step does not depend on its betas
GW2 = (RNG.standard_normal((3, 4)) * 1e-3).astype(np.float32)
GB2 = (RNG.standard_normal(3) * 1e-3).astype(np.float32)
NAMES = {"weight": "weight", "bias": "bias"}


def _models():
    tm = torch.nn.Linear(4, 3)
    pm = paddle.nn.Linear(4, 3)
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(W))
        tm.bias.copy_(torch.from_numpy(B))
    pm.weight.set_value(W.T.copy())
    pm.bias.set_value(B)
    return tm, pm


def _step(tm, pm, topt, popt):
    """Two updates of each from the same weights and gradients: (torch's, Paddle's) new
    weights, both in torch's layout."""
    for gw, gb in ((GW, GB), (GW2, GB2)):
        tm.weight.grad = torch.from_numpy(gw.copy())
        tm.bias.grad = torch.from_numpy(gb.copy())
        topt.step()
        pm.weight.grad = paddle.to_tensor(gw.T.copy())  # the gradient, as backward sets it
        pm.bias.grad = paddle.to_tensor(gb.copy())
        popt.step()
    t = np.concatenate([tm.weight.detach().numpy().ravel(), tm.bias.detach().numpy()])
    p = np.concatenate([pm.weight.numpy().T.ravel(), pm.bias.numpy()])
    return t, p


def _diffs(make_torch, make_paddle):
    tm, pm = _models()
    topt, popt = make_torch(tm), make_paddle(pm)
    diffs, info = compare_optimizers(topt, popt, tm, pm, NAMES)
    t, p = _step(tm, pm, topt, popt)
    return [(d.paddle_layer, d.setting, d.torch_value, d.paddle_value) for d in diffs], t, p, info


TO, PO = torch.optim, paddle.optimizer

SAME = [
    ("SGD", lambda m: TO.SGD(m.parameters(), lr=0.1),
     lambda m: PO.SGD(0.1, parameters=m.parameters())),
    ("SGD with L2", lambda m: TO.SGD(m.parameters(), lr=0.1, weight_decay=1e-2),
     lambda m: PO.SGD(0.1, parameters=m.parameters(), weight_decay=1e-2)),
    ("momentum, nesterov, L2", lambda m: TO.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                nesterov=True, weight_decay=1e-2),
     lambda m: PO.Momentum(0.1, 0.9, parameters=m.parameters(), use_nesterov=True,
                           weight_decay=1e-2)),
    ("momentum, L2 as a regularizer", lambda m: TO.SGD(m.parameters(), lr=0.1, momentum=0.9,
                                                       weight_decay=1e-2),
     lambda m: PO.Momentum(0.1, 0.9, parameters=m.parameters(),
                           weight_decay=paddle.regularizer.L2Decay(1e-2))),
    ("Adam with L2", lambda m: TO.Adam(m.parameters(), lr=0.01, weight_decay=1e-2),
     lambda m: PO.Adam(0.01, parameters=m.parameters(), weight_decay=1e-2)),
    ("AdamW", lambda m: TO.AdamW(m.parameters(), lr=0.01, weight_decay=0.05, betas=(0.8, 0.99)),
     lambda m: PO.AdamW(0.01, beta1=0.8, beta2=0.99, parameters=m.parameters(),
                        weight_decay=0.05)),
    # epsilons too small to matter, as no value of one computes what the other does (below)
    ("RMSProp", lambda m: TO.RMSprop(m.parameters(), lr=0.01, alpha=0.9, eps=1e-14,
                                     momentum=0.5, centered=True),
     lambda m: PO.RMSProp(0.01, rho=0.9, epsilon=1e-14, momentum=0.5, centered=True,
                          parameters=m.parameters())),
]


@pytest.mark.parametrize("name,mt,mp", SAME, ids=[s[0] for s in SAME])
def test_the_same_optimizer_spelled_each_framework_s_way_is_no_difference(name, mt, mp):
    diffs, t, p, info = _diffs(mt, mp)
    assert diffs == []
    assert info["weight_decay"]["differ"] == 0 and info["weight_decay"]["parameters"] == 2
    # the reading is right: one step of each updates the weights alike
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-7)


DIFFERENT = [
    ("Adam epsilon", lambda m: TO.Adam(m.parameters(), lr=0.01),
     lambda m: PO.Adam(0.01, parameters=m.parameters(), epsilon=1e-6),
     [("optimizer", "epsilon", 1e-8, 1e-6)]),
    ("Adam betas", lambda m: TO.Adam(m.parameters(), lr=0.01),
     lambda m: PO.Adam(0.01, beta1=0.8, parameters=m.parameters()),
     [("optimizer", "betas", (0.9, 0.999), (0.8, 0.999))]),
    ("nesterov", lambda m: TO.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
     lambda m: PO.Momentum(0.1, 0.9, parameters=m.parameters()),
     [("optimizer", "nesterov", True, False)]),
    # each framework's defaults: torch's alpha 0.99, Paddle's rho 0.95
    ("RMSProp defaults", lambda m: TO.RMSprop(m.parameters(), lr=0.01),
     lambda m: PO.RMSProp(0.01, parameters=m.parameters()),
     [("optimizer", "rho", 0.99, 0.95)]),
    # Adam's weight decay is an L2 term in both; AdamW's is decoupled
    ("Adam for AdamW", lambda m: TO.AdamW(m.parameters(), lr=0.01, weight_decay=0.05),
     lambda m: PO.Adam(0.01, parameters=m.parameters(), weight_decay=0.05),
     [("optimizer", "algorithm", "AdamW", "Adam"),
      ("optimizer", "weight_decay", "decoupled 0.05", "L2 0.05")]),
    ("weight decay missing", lambda m: TO.SGD(m.parameters(), lr=0.1, weight_decay=1e-2),
     lambda m: PO.SGD(0.1, parameters=m.parameters()),
     [("optimizer", "weight_decay", "L2 0.01", "none")]),
    ("gradient clipping in the port", lambda m: TO.SGD(m.parameters(), lr=0.1),
     lambda m: PO.SGD(0.1, parameters=m.parameters(),
                      grad_clip=paddle.nn.ClipGradByGlobalNorm(1e-3)),
     [("optimizer", "grad_clip", "none", "global norm 0.001")]),
]


@pytest.mark.parametrize("name,mt,mp,expected", DIFFERENT, ids=[s[0] for s in DIFFERENT])
def test_a_changed_hyperparameter_is_named_with_both_values(name, mt, mp, expected):
    diffs, t, p, _ = _diffs(mt, mp)
    assert [(w, s) for w, s, _, _ in diffs] == [(w, s) for w, s, _, _ in expected]
    for (_, _, tv, pv), (_, _, et, ep) in zip(diffs, expected):
        assert tv == (pytest.approx(et) if not isinstance(et, str) else et)
        assert pv == (pytest.approx(ep) if not isinstance(ep, str) else ep)
    # and the step does update the weights otherwise: the difference is real
    assert not np.allclose(p, t, rtol=1e-6, atol=1e-8)


def test_which_parameters_decay_is_compared_parameter_by_parameter():
    """torch's param groups (no decay on the bias) against Paddle's apply_decay_param_fun."""
    def torch_opt(m):
        return TO.AdamW([{"params": [m.weight], "weight_decay": 0.05},
                         {"params": [m.bias], "weight_decay": 0.0}], lr=0.01)

    diffs, t, p, info = _diffs(torch_opt, lambda m: PO.AdamW(
        0.01, parameters=m.parameters(), weight_decay=0.05,
        apply_decay_param_fun=lambda name: name == m.weight.name))
    assert diffs == [] and info["weight_decay"] == {"parameters": 2, "differ": 0}
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-7)
    # the port decays the bias too
    diffs, t, p, _ = _diffs(torch_opt, lambda m: PO.AdamW(0.01, parameters=m.parameters(),
                                                          weight_decay=0.05))
    assert diffs == [("optimizer/bias", "weight_decay", "none", "decoupled 0.05")]
    assert not np.allclose(p[-3:], t[-3:], rtol=1e-6, atol=1e-8)


def test_a_setting_that_differs_between_torch_param_groups_is_not_compared():
    tm, pm = _models()
    topt = TO.SGD([{"params": [tm.weight], "momentum": 0.9}, {"params": [tm.bias]}], lr=0.1)
    popt = PO.Momentum(0.1, 0.5, parameters=pm.parameters())
    diffs, info = compare_optimizers(topt, popt, tm, pm, NAMES)
    assert info["per_group"] == ["algorithm", "momentum"]
    assert [d.setting for d in diffs] == []


def test_rmsprop_s_epsilon_is_a_framework_difference_not_a_setting():
    """Paddle's sqrt(v + eps) against torch's sqrt(v) + eps: equal values compute otherwise."""
    diffs, t, p, info = _diffs(lambda m: TO.RMSprop(m.parameters(), lr=0.01, eps=1e-6),
                               lambda m: PO.RMSProp(0.01, rho=0.99, epsilon=1e-6,
                                                    parameters=m.parameters()))
    assert diffs == []
    assert info["not_compared"] == [
        "epsilon (RMSProp: Paddle's is under the square root, torch's added after it)"]
    assert not np.allclose(p, t, rtol=1e-3)


def test_an_optimizer_of_another_class_is_said_and_skipped():
    tm, pm = _models()
    diffs, info = compare_optimizers(TO.Adagrad(tm.parameters()),
                                     PO.Adagrad(0.1, parameters=pm.parameters()), tm, pm, NAMES)
    assert diffs == []
    assert info == {"skipped": "Adagrad is not an optimizer whose hyperparameters reprod reads "
                               "(SGD, momentum, Adam, AdamW, RMSProp)"}


def test_align_train_fails_an_epsilon_the_updates_cannot_name():
    """An Adam epsilon of 1e-6 for 1e-8: train_localise sees the optimizers differ, but neither
    by a learning rate nor by a weight decay; the setting names it, as the likely cause."""
    torch.manual_seed(0)
    tm, pm = torch.nn.Sequential(torch.nn.Linear(6, 6)), paddle.nn.Sequential(
        paddle.nn.Linear(6, 6))
    pm[0].weight.set_value(tm[0].weight.detach().numpy().T)
    pm[0].bias.set_value(tm[0].bias.detach().numpy())
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    y = RNG.integers(0, 6, 4)

    def run(eps, **kw):
        t, p = [torch.nn.Sequential(torch.nn.Linear(6, 6)),
                paddle.nn.Sequential(paddle.nn.Linear(6, 6))]
        t.load_state_dict(tm.state_dict())
        p.set_state_dict(pm.state_dict())
        return align_train(t, p, [(x, y)], steps=2, torch_loss_fn=torch.nn.CrossEntropyLoss(),
                           paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                           torch_optimizer=TO.Adam(t.parameters(), lr=0.01),
                           paddle_optimizer=PO.Adam(0.01, parameters=p.parameters(),
                                                    epsilon=eps),
                           calibrate=True, **kw)

    r = run(1e-6)
    assert r["settings/optimizer/epsilon"].status == "setting"
    assert r["settings/optimizer/epsilon"].reason == (
        "optimizer: epsilon 1e-08 in torch, 1e-06 in Paddle: the optimizers make other updates")
    assert r.options["findings"][-1] == (
        "1 setting of the port differs from the reference's, whatever the values say: "
        "optimizer: epsilon 1e-08 in torch, 1e-06 in Paddle; the optimizers' settings that "
        "differ are the likely cause")
    assert r.options["settings"]["optimizer"]["paddle"]["epsilon"] == pytest.approx(1e-6)
    waived = run(1e-6, check_settings=["optimizer/*"])
    assert not any(k.key.startswith("settings/") for k in waived.failed)
    assert waived.options["settings"]["waived"] == [
        "optimizer: epsilon 1e-08 in torch, 1e-06 in Paddle"]
    fine = run(1e-8)
    assert fine.passed, fine.to_table(failed_only=True)


def test_each_script_saves_its_optimizer_and_the_files_compare(tmp_path, capsys):
    """The two-script workflow: the reference's and the port's script each save their model's
    settings with their optimizer; the files compare as the optimizers do, each parameter's
    weight decay paired by definition order (the names differ)."""
    import json

    from reprod.align import compare_settings, save_settings
    from reprod.cli import main

    tm = torch.nn.Sequential(torch.nn.Linear(4, 3))
    pm = paddle.nn.Sequential(paddle.nn.Linear(4, 3))
    topt = TO.AdamW([{"params": [tm[0].weight]}, {"params": [tm[0].bias], "weight_decay": 0.0}],
                    lr=0.01, weight_decay=0.05)
    a = save_settings(tm, tmp_path / "torch.json", optimizer=topt)
    same = PO.AdamW(0.01, parameters=pm.parameters(), weight_decay=0.05,
                    apply_decay_param_fun=lambda n: n == pm[0].weight.name)
    b = save_settings(pm, tmp_path / "paddle.json", optimizer=same)
    assert compare_settings(a, b).passed
    assert json.loads(open(a).read())["optimizer"]["decay"] == [
        ["0.weight", "decoupled 0.05"], ["0.bias", "none"]]
    other = PO.AdamW(0.01, parameters=pm.parameters(), weight_decay=0.05, epsilon=1e-6)
    c = save_settings(pm, tmp_path / "paddle_eps.json", optimizer=other)
    report = compare_settings(a, c)
    assert [d.line() for d in report.differ] == [
        "optimizer: epsilon 1e-08 in torch, 1e-06 in Paddle",
        "optimizer/0.bias: weight_decay 'none' in torch, 'decoupled 0.05' in Paddle"]
    assert main([a, c]) == 1
    assert "optimizer: epsilon 1e-08 in torch, 1e-06 in Paddle" in capsys.readouterr().out
    # a file without one: its optimizer is not compared
    d = save_settings(pm, tmp_path / "paddle_plain.json")
    assert compare_settings(a, d).passed


def test_a_bad_optimizer_in_a_settings_file_is_one_line_naming_it(tmp_path):
    import json

    from reprod.align import compare_settings, save_settings
    from reprod.errors import ReprodError

    tm = torch.nn.Linear(4, 3)
    path = save_settings(tm, tmp_path / "t.json", optimizer=TO.SGD(tm.parameters(), lr=0.1))
    doc = json.loads(open(path).read())
    doc["optimizer"]["decay"] = [["weight", 0.1]]
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(ReprodError, match=r"t\.json: its optimizer is not \{settings, decay: "
                                          r"\[\[parameter, decay\], \.\.\.\]\}"):
        compare_settings(path, path)


def test_paddle_s_batchnorm_statistics_are_not_trained_parameters(tmp_path):
    """Paddle's BatchNorm keeps its statistics as parameters (stop_gradient) that
    ``model.parameters()`` hands the optimizer: left out, the decays still pair by order."""
    from reprod.align import compare_settings, save_settings

    tm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    pm = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3), paddle.nn.BatchNorm2D(4))
    assert len(list(pm.parameters())) == 6
    a = save_settings(tm, tmp_path / "t.json", optimizer=TO.SGD(tm.parameters(), lr=0.1,
                                                                 weight_decay=1e-4))
    b = save_settings(pm, tmp_path / "p.json", optimizer=PO.SGD(0.1, parameters=pm.parameters()))
    assert [d.line() for d in compare_settings(a, b).differ] == [
        "optimizer: weight_decay 'L2 0.0001' in torch, 'none' in Paddle"]
