"""A fused projection in a port nobody here wrote, paired by order: torchvision's
``VisionTransformer`` (torch's ``nn.MultiheadAttention``, its q, k and v packed in
``in_proj_weight``) against PaddleClas's (``model_zoo.vision_transformer``: one ``qkv`` Linear
read side by side, and an output ``proj``), built tiny (32 px, patch 8, 2 blocks, width 64, 4
heads) and seeded, every bias, norm, token and the head perturbed.

- The names pair nowhere, and the class token and position table are defined in another order
  (torchvision: ``class_token``, ``conv_proj``, ``encoder.pos_embedding``; PaddleClas:
  ``pos_embed``, ``cls_token``, ``patch_embed``). By order, torch's packed tensor split as
  Paddle's q, k, v pairs with PaddleClas's ``qkv`` (``by_order._fused_order``), the bare
  parameters by their shapes: the structure matches, 28 tensors.
- Loaded so, the port passes against float32 noise, its layers judged too.
- An attention scale 1.5x in block 1 is localised at that block's attention, the port's
  ``blocks.1.attn`` named beside it (a port block of fused Linears recorded whole against
  torch's one attention leaf). Before, the pairing was refused at its first tensor.

torch, torchvision, paddle and ppcls are imported inside the tests only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Any

import pytest

if importlib.util.find_spec("paddleclas") is None:
    pytest.skip("paddleclas is not installed", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vision_ports as V  # noqa: E402

if not V.ppcls_on_path():
    pytest.skip("paddleclas holds no ppcls directory", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore")


def _models(load: bool = True) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from ppcls.arch.backbone.model_zoo.vision_transformer import VisionTransformer
        from torchvision.models.vision_transformer import VisionTransformer as TV

        from reprod.align import load_into_paddle

        torch.manual_seed(0)
        tm = TV(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                mlp_dim=128, num_classes=10).eval()
        V.perturb(tm)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # torchvision starts its head and class token at zero
            tm.heads.head.weight.copy_(torch.randn(tm.heads.head.weight.shape, generator=g) * 0.2)
            tm.class_token.copy_(torch.randn(tm.class_token.shape, generator=g) * 0.2)
        pm = VisionTransformer(class_num=10, epsilon=1e-6, **V.VIT)
        pm.eval()
        if load:
            load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def test_by_order_the_packed_attention_pairs_with_the_fused_qkv_and_the_tokens_by_shape() -> None:
    from reprod.align import compare_structure, pair_weights_by_order

    tm, pm = _models(load=False)
    report = compare_structure(tm, pm, by_order=True)
    assert report.ok, report.to_table(only_problems=True)
    assert len(report.rows_with("fused")) == 12  # q, k, v weight and bias, in 2 blocks
    pairs = pair_weights_by_order(tm, pm)
    assert pairs["class_token"] == "cls_token"
    assert pairs["encoder.pos_embedding"] == "pos_embed"
    assert pairs["encoder.layers.encoder_layer_1.self_attention.k_proj.weight"] == \
        "blocks.1.attn.k_proj.weight"


def test_loaded_by_order_the_port_passes_with_its_layers() -> None:
    import numpy as np

    from reprod.align import align_forward

    tm, pm = _models()
    w = tm.encoder.layers.encoder_layer_0.self_attention.in_proj_weight.detach().numpy()
    np.testing.assert_array_equal(pm.blocks[0].attn.qkv.weight.numpy(), w.T)
    r = align_forward(tm, pm, V.image(2, 32), calibrate=True, by_order=True, layers=True)
    assert r.passed, r.to_table()
    assert r.options["layers"]["passed"] is True and r.options["layers"]["judged"] > 30


def test_an_attention_scale_bug_is_localised_at_its_block() -> None:
    from reprod.align import align_forward

    tm, pm = _models()
    pm.blocks[1].attn.scale = pm.blocks[1].attn.scale * 1.5
    r = align_forward(tm, pm, V.image(2, 32), calibrate=True, by_order=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "encoder.layers.encoder_layer_1.self_attention"
    assert div["port_layer"] == "blocks.1.attn"
    # torch's attn(x, x, x) records one input, as PaddleClas's attn(x) does: they pair
    assert "): input aligned (max " in div["message"]
