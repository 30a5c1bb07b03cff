"""timm 1.0.31 models (torch, the references) against PaddleClas 2.6.0's CNN and hybrid ports
(``ppcls.arch.backbone``), built small and seeded for ``test_paddleclas_ports_real.py``.

Each ``build(name)`` returns ``(torch_model, paddle_model, x)``: both in eval mode, the torch side
perturbed so that every tensor matters (every bias, 1-d parameter and norm; each BatchNorm's
running statistics), its weights loaded into the port by reprod's own pairing by order
(``load_into_paddle(pm, tm, by_order=True)``), ``x`` a float32 batch of two images. Nothing of
either library is patched; a test changes the port's *instance* where it needs another port.

Surveyed in session 37 (26 pairs; /tmp/survey_pcl): 13 load and compute what timm does to
float32 noise, 7 are refused by order for real differences of architecture (MobileNetV3's extra
expand conv, GhostNet's squeeze widths, Xception's aligned variant...), and these compute
otherwise than timm: DPN68 (BatchNorm epsilon 1e-5 against 1e-3), ResNeSt50 (its padded 3x3
pools exclude the padding; timm counts it), Res2Net50 (the same pools, and its first block's
splits), MobileViT (its last LayerNorms' epsilon), InceptionV3 (epsilon, and a head dropout that
scales in eval), EfficientNetB0 (TF's padding; it ports timm's ``tf_efficientnet_b0``).

PaddleClas is installed ``--no-deps`` and imported through ``vision_ports.ppcls_on_path``. Some
of its models name their parameters themselves (Res2Net): built twice in one process, Paddle
refuses the names, so each is built inside ``paddle.utils.unique_name.guard()``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import numpy as np

SEED = 0

# name -> (timm model, PaddleClas module under ppcls.arch.backbone, class, its arguments, px)
PAIRS: dict[str, tuple[str, str, str, dict[str, Any], int]] = {
    "resnet50d": ("resnet50d", "legendary_models.resnet", "ResNet50_vd", {}, 64),
    "repvgg_a0": ("repvgg_a0", "model_zoo.repvgg", "RepVGG_A0", {}, 64),
    "regnetx_002": ("regnetx_002", "model_zoo.regnet", "RegNetX_200MF", {}, 64),
    "rexnet_100": ("rexnet_100", "model_zoo.rexnet", "ReXNet_1_0", {}, 64),
    "dla34": ("dla34", "model_zoo.dla", "DLA34", {}, 64),
    "seresnext50": ("seresnext50_32x4d", "model_zoo.se_resnext", "SE_ResNeXt50_32x4d", {}, 64),
    "pvt_v2_b0": ("pvt_v2_b0", "model_zoo.pvt_v2", "PVT_V2_B0", {}, 64),
    "dpn68": ("dpn68", "model_zoo.dpn", "DPN68", {}, 64),
    "res2net50": ("res2net50_26w_4s", "model_zoo.res2net", "Res2Net50_26w_4s", {}, 64),
    "resnest50d": ("resnest50d", "model_zoo.resnest", "ResNeSt50", {}, 64),
    "inception_v3": ("inception_v3", "legendary_models.inception_v3", "InceptionV3", {}, 96),
    "mobilevit_xxs": ("mobilevit_xxs", "model_zoo.mobilevit", "MobileViT_XXS", {}, 64),
    # PaddleClas's default: TF's padding and epsilon, as timm's TF port
    "tf_efficientnet_b0": ("tf_efficientnet_b0", "model_zoo.efficientnet", "EfficientNetB0",
                           {}, 64),
    # surveyed in session 38 (/tmp/s38/survey): CSPDarkNet53, MobileNetV1, PP-HGNet-tiny,
    # MobileViTv2, Twins-PCPVT and DeiT (distilled) load and compute what timm does; these not
    "darknet53": ("darknet53", "model_zoo.darknet", "DarkNet53", {}, 64),  # ReLU for LeakyReLU
    "lcnet_050": ("lcnet_050", "legendary_models.pp_lcnet", "PPLCNet_x0_5", {}, 64),
    # timm pads zeros (F.pad) before its stem's max pool, PaddleClas's pool pads "SAME"
    "hgnetv2_b0": ("hgnetv2_b0", "legendary_models.pp_hgnet_v2", "PPHGNetV2_B0", {}, 64),
}
FAITHFUL = ("resnet50d", "repvgg_a0", "regnetx_002", "rexnet_100", "dla34", "seresnext50",
            "pvt_v2_b0")


def _ppcls_logger() -> None:
    """PaddleClas's logger is None until ``init_logger`` (its legendary models warn through it)."""
    from ppcls.utils import logger

    if getattr(logger, "_logger", None) is None:
        logger.init_logger(log_level=40)


def perturb(tm: Any, seed: int = SEED + 1, scale: float = 0.1) -> None:
    """Seeded noise on every bias, 1-d parameter and norm, and each BatchNorm's running
    statistics (mean ~ N(0, 0.1), variance ~ U(0.75, 1.25))."""
    import torch

    g = torch.Generator().manual_seed(seed)
    keys = ("norm", "bias", "gamma", "pos_embed", "cls_token", "scale", "attention_biases")
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if any(k in name for k in keys) or p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in tm.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)


def fold_split_attention_bias(tm: Any) -> None:
    """timm's ResNeSt ``SplitAttn.fc1`` is a convolution with a bias before ``bn1``;
    PaddleClas's has none. In eval the bias folds exactly into ``bn1``'s running mean: the
    porter's own step before loading (reprod has no rule folding a bias into a norm)."""
    import torch
    from timm.layers import SplitAttn

    with torch.no_grad():
        for m in tm.modules():
            if isinstance(m, SplitAttn) and m.fc1.bias is not None:
                m.bn1.running_mean.sub_(m.fc1.bias)
                old = m.fc1
                new = torch.nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size,
                                      groups=old.groups, bias=False)
                new.weight.copy_(old.weight)
                m.fc1 = new.eval()


def image(hw: int, n: int = 2, seed: int = SEED) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, hw, hw).astype("float32")


def build(name: str, hw: int | None = None, fold: bool | str = True
          ) -> tuple[Any, Any, np.ndarray]:
    """The pair, loaded; ``fold=False`` leaves timm's ResNeSt biases before their norms (and
    the load is refused), ``fold="reprod"`` folds them with ``reprod.align.fold_conv_biases``
    (``fold_split_attention_bias``, by hand, otherwise)."""
    import paddle
    import timm
    import torch

    from reprod.align import load_into_paddle

    timm_name, module, cls, kw, px = PAIRS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ppcls_logger()
        torch.manual_seed(SEED)
        paddle.seed(SEED)
        tm = timm.create_model(timm_name, pretrained=False, num_classes=10)
        perturb(tm)
        if name == "resnest50d" and fold == "reprod":
            from reprod.align import fold_conv_biases

            tm.eval()
            fold_conv_biases(tm, torch.from_numpy(image(hw or px)))
        elif name == "resnest50d" and fold:
            fold_split_attention_bias(tm)
        with paddle.utils.unique_name.guard():
            pm = getattr(importlib.import_module(f"ppcls.arch.backbone.{module}"), cls)(
                pretrained=False, class_num=10, **kw)
        tm.eval()
        pm.eval()
        load_into_paddle(pm, tm, by_order=True)
    return tm, pm, image(hw or px)


def logits(tm: Any, pm: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import paddle
    import torch

    with torch.no_grad():
        t = tm(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(x)).numpy()
    return t, p
