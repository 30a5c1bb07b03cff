"""Vision ports nobody here wrote, through ``reprod.align`` (collected only where torchvision and
paddle import, see conftest.py; skipped where timm or paddleclas is not installed): timm 1.0.31's
ViT, Swin and ConvNeXt (torch, the references) against PaddleClas 2.6.0's own ports
(``ppcls.arch.backbone``), built in ``vision_ports.py`` (32-64 px, one or two blocks per stage,
seeded, every norm weight and bias perturbed on the torch side). Porter 10 tried each as a porter
would, and reprod got each wrong somewhere:

- ConvNeXt: PaddleClas defines its four downsampling layers before the stages, timm inside
  them. ``compare_settings`` by order paired a downsampling conv with a depthwise one and
  invented 13 stride/padding/groups differences on the faithful port; the port's hand-written
  ``ChannelsFirstLayerNorm`` was never compared (its epsilon off by 100x passed, "the settings
  of 17 paired layers agree"); and the porter's hand pairs given as ``rules=`` were ignored by the
  localisation ("layer names do not pair: only 6 of 81"), in align_forward and align_train.
- Swin: PaddleClas registers ``relative_position_index`` as a saved buffer (timm does not save
  it): align_train recorded it as a Paddle-only "BatchNorm statistic" and failed the faithful
  port at every step.
- DropPath (stochastic depth, in all three): unknown to reprod. In train mode the refusal named
  no layer ("functional dropout, random augmentation, ..."), ``dropout="off"`` left it on, and
  its rate was no setting.
- ViT: timm defines ``cls_token`` before ``pos_embed``, PaddleClas after: loading by order was
  refused over two tensors both sides name alike, and localisation by order (and by name, for a
  bug that removes a call) answered "layer names do not pair" for every bug: timm's 18
  ``nn.Identity`` placeholders counted as unpaired calls.

About 20 s single-threaded (10 s of it importing torch, paddle and timm), under 40 s with the
suite's default two xdist workers.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
import warnings
from typing import Any

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("timm")
# not imported: paddleclas's own __init__ pulls cv2, faiss and more; only its ppcls directory
if importlib.util.find_spec("paddleclas") is None:
    pytest.skip("paddleclas is not installed", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vision_ports as V  # noqa: E402

if not V.ppcls_on_path():
    pytest.skip("paddleclas holds no ppcls directory", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore")

TOL = 1e-5  # the faithful ports' logits: 1e-7 to 5e-7 apart (float64 noise 2e-8 to 2e-7)


def _failed(r: Any) -> set[str]:
    return {k.key for k in r.failed}


def _divergence(r: Any) -> dict[str, Any]:
    return r.options.get("divergence") or {}


def _assert_same_logits(tm: Any, pm: Any, x: np.ndarray) -> None:
    t, p = V.logits(tm, pm, x)
    assert np.abs(t - p).max() < TOL, np.abs(t - p).max()


@functools.cache
def _faithful_convnext() -> tuple[Any, Any]:
    """The faithful ConvNeXt pair, loaded with the hand pairs; shared, never mutated."""
    return V.built("convnext")


def _train(tm: Any, pm: Any, data: list, steps: int, momentum: bool = False, **kw: Any) -> Any:
    """align_train with plain cross entropy and SGD (with momentum: Paddle's Momentum)."""
    import paddle
    import torch

    from reprod.align import align_train

    tm.train()
    pm.train()
    if momentum:
        t_opt = torch.optim.SGD(tm.parameters(), lr=0.1, momentum=0.9)
        p_opt = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9,
                                          parameters=pm.parameters())
    else:
        t_opt = torch.optim.SGD(tm.parameters(), lr=0.1)
        p_opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters())
    return align_train(tm, pm, data, steps=steps,
                       torch_loss_fn=torch.nn.CrossEntropyLoss(),
                       paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                       torch_optimizer=t_opt, paddle_optimizer=p_opt, **kw)


# --- ConvNeXt ----------------------------------------------------------------------------------


def test_convnext_faithful_port_passes_settings_and_values_by_order() -> None:
    """PaddleClas's ConvNeXt defines ``downsample_layers`` (stem and the three downsamplings)
    before its stages; timm puts each downsampling at the start of its stage. By order the
    settings paired layer k of a kind on each side, so ``downsample_layers.1.1`` (a 2x2 stride-2
    conv) met ``stages.0.blocks.0.conv_dw`` (a 7x7 depthwise one): 13 invented stride, padding
    and groups differences failed a port whose logits are 2.6e-7 apart. A kind's layers now pair
    by their weights' shapes where the definition order differs."""
    from reprod.align import align_forward, compare_settings

    tm, pm = _faithful_convnext()
    x = V.image(hw=V.CONVNEXT_HW)
    _assert_same_logits(tm, pm, x)
    rep = compare_settings(tm, pm, by_order=True)
    assert rep.passed and not rep.differ, str(rep)
    r = align_forward(tm, pm, x, by_order=True)
    assert r.passed, r.to_table(failed_only=True)
    assert not [k for k in r.results if k.key.startswith("settings/")
                and k.key.endswith(("/stride", "/groups", "/padding")) and not k.passed]


def test_convnext_pairs_by_the_order_its_layers_run_as_its_porter_paired_it_by_hand() -> None:
    """By definition order ConvNeXt is refused (the downsamplings defined apart), and the
    porter wrote 56 pairs by hand (``V.convnext_pairs``). Both sides run stem, stage, downsampling,
    stage...: by the order the layers run (``inputs=``) the pairing is those 56 pairs, the refusal
    says to try it, and the port so loaded passes; a bug is then named at its layer."""
    from reprod import KeyMismatchError
    from reprod.align import align_forward, load_into_paddle, pair_weights_by_order

    tm, pm = V.built("convnext", load=False)
    x = V.image(hw=V.CONVNEXT_HW)
    with pytest.raises(KeyMismatchError) as refused:
        pair_weights_by_order(tm, pm)
    assert "in another order" in str(refused.value) and "inputs=x" in str(refused.value)
    assert pair_weights_by_order(tm, pm, inputs=x) == V.convnext_pairs()
    load_into_paddle(pm, tm, by_order=True, inputs=x)
    _assert_same_logits(tm, pm, x)
    r = align_forward(tm, pm, x, by_order=True, calibrate=True, layers=True)
    assert r.passed, r.to_table(failed_only=True)
    _pwconv_weight(pm)
    r = align_forward(tm, pm, x, by_order=True, calibrate=True)
    d = _divergence(r)
    assert (d.get("layer"), d.get("kind")) == ("stages.2.blocks.0.mlp.fc1", "layer"), d
    assert "its own parameter weight" in (d.get("hint") or ""), d


def test_convnext_hand_written_layernorm_epsilon_is_a_setting() -> None:
    """PaddleClas normalises the stem and the downsamplings with its own
    ``ChannelsFirstLayerNorm`` (``epsilon``), timm with ``LayerNorm2d`` (an ``nn.LayerNorm``).
    The four pairs were paired by the rules but of no kind the settings read, so skipped without
    a word: all four at 1e-4 (timm 1e-6; logits 2.4e-4 apart) passed "the settings of 17 paired
    layers agree". A hand-written LayerNorm's epsilon is now a setting, each pair named."""
    from reprod.align import compare_settings

    rules = V.convnext_rules()
    assert compare_settings(*_faithful_convnext(), rules=rules).passed  # the faithful port
    tm, pm = V.built("convnext")
    for i in range(4):
        pm.downsample_layers[i][1 if i == 0 else 0].epsilon = 1e-4
    t, p = V.logits(tm, pm, V.image(hw=V.CONVNEXT_HW))
    assert np.abs(t - p).max() > 10 * TOL  # the premise: a real bug, not rounding
    rep = compare_settings(tm, pm, rules=rules)
    assert not rep.passed, str(rep)
    said = sorted((d.torch_layer, d.paddle_layer, d.setting, d.torch_value, d.paddle_value)
                  for d in rep.differ)
    assert said == [
        ("stages.1.downsample.0", "downsample_layers.1.0", "epsilon", 1e-6, 1e-4),
        ("stages.2.downsample.0", "downsample_layers.2.0", "epsilon", 1e-6, 1e-4),
        ("stages.3.downsample.0", "downsample_layers.3.0", "epsilon", 1e-6, 1e-4),
        ("stem.1", "downsample_layers.0.1", "epsilon", 1e-6, 1e-4),
    ], str(rep)


def _pwconv_weight(pm: Any) -> None:
    w = pm.stages[2][0].pwconv1.weight
    w.set_value(w * 1.05)


def _cfln_epsilon(pm: Any) -> None:
    pm.downsample_layers[2][0].epsilon = 1e-2


@pytest.mark.parametrize("bug, layer, hint", [
    (_pwconv_weight, "stages.2.blocks.0.mlp.fc1", "its own parameter weight"),
    (_cfln_epsilon, "stages.2.downsample.0", "LayerNorm epsilon: port uses ~1e-2"),
], ids=["pwconv1_weight", "layernorm_epsilon"])
def test_convnext_bug_is_localised_with_the_hand_pairs_as_rules(bug: Any, layer: str,
                                                                hint: str) -> None:
    """align_forward's docstring says ``rules=`` pairs the layers for the settings check and the
    localisation; the localisation paired the captures by their raw names all the same, and
    every ConvNeXt bug got "layer names do not pair: only 6 of 81 layer calls pair by name".
    Rules that rename the port's layers now pair the layer captures: one block's pwconv1 weight
    x1.05 is named at timm's ``stages.2.blocks.0.mlp.fc1``, a downsampling's hand-written
    LayerNorm at epsilon 1e-2 at ``stages.2.downsample.0``."""
    from reprod.align import align_forward

    tm, pm = V.built("convnext")
    bug(pm)
    r = align_forward(tm, pm, V.image(hw=V.CONVNEXT_HW), rules=V.convnext_rules(),
                      calibrate=True)
    assert not r.passed and "logits" in _failed(r), r.to_table(failed_only=True)
    d = _divergence(r)
    assert (d.get("layer"), d.get("kind")) == (layer, "layer"), d
    assert hint in (d.get("hint") or ""), d


def test_convnext_bug_is_localised_in_align_train_with_the_hand_pairs_as_rules() -> None:
    """The same in align_train: with ``rules=`` the faithful port passed one step, but a
    downsampling LayerNorm at epsilon 1e-2 got "layer names do not pair", so training gave no
    place at all (by order the loading refuses: the definition order differs). It is now named
    at timm's ``stages.2.downsample.0``, with the epsilon said."""
    rules = V.convnext_rules()
    data = V.batches(V.CONVNEXT_HW, steps=1)
    tm, pm = V.built("convnext")
    r = _train(tm, pm, data, steps=1, rules=rules)
    assert r.passed, r.to_table(failed_only=True)
    tm, pm = V.built("convnext")
    _cfln_epsilon(pm)
    r = _train(tm, pm, data, steps=1, rules=rules)
    assert not r.passed and "step0/logits" in _failed(r), r.to_table(failed_only=True)
    d = _divergence(r)
    assert (d.get("layer"), d.get("kind")) == ("stages.2.downsample.0", "layer"), d
    assert "LayerNorm epsilon: port uses ~1e-2" in (d.get("hint") or ""), d


# --- Swin --------------------------------------------------------------------------------------


def test_swin_faithful_port_passes_align_train() -> None:
    """PaddleClas's ``WindowAttention`` saves ``relative_position_index`` (timm registers it
    ``persistent=False``). align_train logged every stop_gradient tensor of the port's state dict
    as a statistic: ``step0/stat/layers.*.attn.relative_position_index`` failed (one side only)
    at every step of a faithful port, "only BatchNorm statistics differ first" in a model with no
    BatchNorm. Only the port's tensors that pair with the reference's are recorded now."""
    tm, pm = V.built("swin")
    _assert_same_logits(tm, pm, V.image(hw=V.SWIN_HW))
    r = _train(tm, pm, V.batches(V.SWIN_HW), steps=2, momentum=True, by_order=True)
    assert r.passed, r.to_table(failed_only=True)
    assert not [k.key for k in r.results if "relative_position_index" in k.key]
    assert not any("BatchNorm" in str(f) for f in r.options.get("findings", []))


# --- DropPath ----------------------------------------------------------------------------------


def test_vit_drop_path_is_refused_by_name_in_train_mode_and_dropout_off_switches_it_off() -> None:
    """Stochastic depth alone (every Dropout p 0, drop_path_rate 0.1: block 1's rate is 0.1,
    block 0's 0) in train mode: the determinism check refused with "functional dropout, random
    augmentation, ..." and no layer named, and ``dropout="off"`` did not switch DropPath off
    (same refusal; without the check the faithful port failed, blamed on blocks.1's own code).
    DropPath is now refused by name, like Dropout, and ``dropout="off"`` runs it in eval mode."""
    from reprod.errors import ReprodError

    data = V.batches(V.VIT_HW)
    tm, pm = V.built("vit", drop=0.0, drop_path=0.1)
    with pytest.raises(ReprodError) as err:
        _train(tm, pm, data, steps=2)
    said = str(err.value)
    for name in ("torch blocks.1.drop_path1", "torch blocks.1.drop_path2",
                 "paddle blocks.1.drop_path"):
        assert name in said, said
    assert "dropout=\"off\"" in said, said
    tm, pm = V.built("vit", drop=0.0, drop_path=0.1)
    r = _train(tm, pm, data, steps=2, dropout="off")
    assert r.passed, r.to_table(failed_only=True)


def test_vit_drop_path_rate_is_a_setting() -> None:
    """The port's stochastic depth at twice the reference's rate (0.2 against 0.1) went unsaid:
    in eval mode both are identities, so the values pass, and DropPath was no kind the settings
    read. Its rate is now a setting, named at both of the port's calls."""
    from reprod.align import align_forward, load_into_paddle

    tm, _ = V.built("vit", drop=0.0, drop_path=0.1, load=None)
    _, pm = V.built("vit", drop=0.0, drop_path=0.2, load=None)
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, V.image(hw=V.VIT_HW))
    assert _failed(r) == {"settings/blocks.1.drop_path/p", "settings/blocks.1.drop_path#2/p"}, \
        r.to_table(failed_only=True)
    said = {k.key: k.reason for k in r.failed}["settings/blocks.1.drop_path/p"]
    assert "torch blocks.1.drop_path1" in said and "p 0.1 in torch, 0.2 in Paddle" in said, said


# --- ViT by order ------------------------------------------------------------------------------


def test_vit_loads_by_order_though_cls_token_and_pos_embed_swap() -> None:
    """timm creates ``cls_token`` then ``pos_embed``, PaddleClas ``pos_embed`` then
    ``cls_token``: by order the loading refused ("#0 cls_token [1, 1, 64] vs pos_embed
    [1, 17, 64]") over two tensors both sides name alike. Such tensors now pair by name where
    their order differs: the port loads by order and passes by order."""
    from reprod.align import align_forward, load_into_paddle

    tm, pm = V.built("vit", load=None)
    load_into_paddle(pm, tm, by_order=True)
    np.testing.assert_array_equal(pm.cls_token.numpy(), tm.cls_token.detach().numpy())
    np.testing.assert_array_equal(pm.pos_embed.numpy(), tm.pos_embed.detach().numpy())
    x = V.image(hw=V.VIT_HW)
    _assert_same_logits(tm, pm, x)
    r = align_forward(tm, pm, x, by_order=True, calibrate=True)
    assert r.passed, r.to_table(failed_only=True)


def test_vit_layernorm_epsilon_is_named_by_order() -> None:
    """Block 1's norm1 at epsilon 1e-3 (timm 1e-6), localised by order and calibrated: the
    swapped root tensors left no weight anchors, and pairing by shapes alone stumbled on timm's
    identity placeholders: "layer calls do not pair even by call order: only 23 of 46 pair ...
    name the pairs with rename rules", though every name is the same. It is now named at
    ``blocks.1.norm1``, with the epsilon."""
    from reprod.align import align_forward

    tm, pm = V.built("vit")  # loaded by name: the localisation by order is what is pinned
    pm.blocks[1].norm1._epsilon = 1e-3
    r = align_forward(tm, pm, V.image(hw=V.VIT_HW), by_order=True, calibrate=True)
    assert _failed(r) == {"logits", "settings/blocks.1.norm1/epsilon"}, \
        r.to_table(failed_only=True)
    d = _divergence(r)
    assert (d.get("layer"), d.get("kind")) == ("blocks.1.norm1", "layer"), d
    assert "LayerNorm epsilon: port uses ~1e-3" in (d.get("hint") or ""), d


def test_vit_attention_scale_is_named_at_the_attention_by_order() -> None:
    """Block 0's attention scaled by dim**-0.5 (64) instead of head_dim**-0.5 (16), by order
    and calibrated: "layer calls do not pair even by call order" before. It is now named at
    ``blocks.0.attn``, its own forward code (the scale is no parameter nor layer)."""
    from reprod.align import align_forward

    tm, pm = V.built("vit")
    pm.blocks[0].attn.scale = 64 ** -0.5
    r = align_forward(tm, pm, V.image(hw=V.VIT_HW), by_order=True, calibrate=True)
    assert _failed(r) == {"logits"}, r.to_table(failed_only=True)
    d = _divergence(r)
    assert (d.get("layer"), d.get("kind")) == ("blocks.0.attn", "layer"), d
    assert "blocks.0.attn's own forward code" in (d.get("message") or ""), d


def test_vit_gelu_computed_in_the_forward_is_localised_by_name() -> None:
    """The port's block-0 Mlp computes ``F.gelu(approximate=True)`` itself instead of calling
    its ``act`` layer: one call fewer, and timm's 18 ``nn.Identity`` placeholders (q_norm,
    k_norm, ls1, ls2, norm_pre, fc_norm, ...) with its eval-mode DropPaths counted as unpaired
    reference calls, which left exactly half paired: "layer names do not pair: only 27 of 54".
    Placeholder calls that compute nothing and the port lacks are now left out: the bug is named
    at ``blocks.0.mlp``'s own code, and the settings say the tanh approximation."""
    import paddle.nn.functional as F

    from reprod.align import align_forward

    tm, pm = V.built("vit")
    mlp = pm.blocks[0].mlp

    def forward(self: Any, x: Any) -> Any:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate=True))))

    mlp.forward = types.MethodType(forward, mlp)
    r = align_forward(tm, pm, V.image(hw=V.VIT_HW), calibrate=True)
    # the tanh approximation in one early block moves the logits by about their 20x noise: past
    # it on one CPU, within it on another (an AMD EPYC here), where the layers judged inside the
    # passing outputs fail at the block's own output instead
    assert _failed(r) in ({"logits", "settings/blocks.0.mlp:gelu/approximate"},
                          {"layers/blocks.0.mlp.out", "settings/blocks.0.mlp:gelu/approximate"}), \
        r.to_table(failed_only=True)
    d = _divergence(r)
    assert (d.get("layer"), d.get("kind")) == ("blocks.0.mlp", "layer"), d
    assert "blocks.0.mlp's own forward code" in (d.get("message") or ""), d
