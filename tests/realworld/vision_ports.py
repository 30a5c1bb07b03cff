"""timm 1.0.31 models (torch, the references) and PaddleClas 2.6.0's ports of them
(``ppcls.arch.backbone``), built tiny and seeded for ``test_vision_ports_real.py``: ViT, Swin and
ConvNeXt as porter 10 built them (/tmp/porter10: 32-64 px, depth 1-2 per stage), every norm
weight and bias, every bias, the layer-scale gammas, the position embedding, the class token and
the relative-position-bias tables perturbed on the torch side (timm initialises them to 1/0/...),
so that every tensor matters to the outputs.

PaddleClas is installed ``--no-deps``: importing ``paddleclas`` itself pulls cv2, faiss and the
rest, so its ``ppcls`` directory (a namespace package inside the installed ``paddleclas``) is put
on ``sys.path`` without importing ``paddleclas``; only the three model files are imported. Nothing
of either library is patched: the bugs the tests need are put into the port's *instances*.

Loading: ViT and Swin have the reference's names (ViT) or order (Swin) and load by reprod's own
pairing; PaddleClas's ConvNeXt defines its four downsampling layers before the stages (timm puts
each inside its stage) and renames every block's layers, so it loads with the porter's hand
pairs (``convnext_pairs``) through ``ConversionRules.from_pairs``.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from typing import Any, Callable, Optional

import numpy as np

SEED = 0


def ppcls_on_path() -> bool:
    """Put the installed paddleclas's ``ppcls`` directory on sys.path (without importing
    paddleclas); False where paddleclas is not installed. Called again, True at once: with
    that directory on sys.path, ``paddleclas`` is found as the ``paddleclas.py`` inside it (no
    package), and a second module calling this was skipped whole."""
    if importlib.util.find_spec("ppcls") is not None:
        return True
    spec = importlib.util.find_spec("paddleclas")
    if spec is None or not spec.submodule_search_locations:
        return False
    where = list(spec.submodule_search_locations)[0]
    if where not in sys.path:
        sys.path.insert(0, where)
    return importlib.util.find_spec("ppcls") is not None


def _seed() -> None:
    import paddle
    import torch

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    np.random.seed(SEED)


def perturb(tm: Any, seed: int = SEED + 1, scale: float = 0.1) -> None:
    """Seeded noise (porter 10's ``common.perturb``) on every norm weight and bias, every bias,
    every 1-d parameter (layer-scale gammas), the position embedding, the class token and the
    relative-position-bias tables."""
    import torch

    g = torch.Generator().manual_seed(seed)
    keys = ("norm", "bias", "gamma", "pos_embed", "cls_token", "relative_position_bias_table",
            "ls", "scale")
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if any(k in name for k in keys) or p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def image(n: int = 2, hw: int = 32, seed: int = SEED) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, hw, hw).astype("float32")


def batches(hw: int, steps: int = 2, n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """``steps`` seeded (image, label) batches for align_train, 10 classes."""
    rs = np.random.RandomState(SEED)
    return [(image(n, hw, seed=s), rs.randint(0, 10, size=(n,)).astype("int64"))
            for s in range(steps)]


def logits(tm: Any, pm: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both models' outputs on ``x`` (eval mode, no gradients), as numpy."""
    import paddle
    import torch

    tm.eval()
    pm.eval()
    with torch.no_grad():
        t = tm(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        p = pm(paddle.to_tensor(x)).numpy()
    return t, p


# --- ViT ---------------------------------------------------------------------------------------

VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
           qkv_bias=True)
VIT_HW = 32


def vit(drop: float = 0.1, drop_path: Optional[float] = None,
        load: Optional[bool] = False) -> tuple[Any, Any]:
    """timm's ``VisionTransformer`` against PaddleClas's (``model_zoo.vision_transformer``),
    LayerNorm epsilon 1e-6 both sides. timm's ``drop_rate`` is its head dropout and PaddleClas's
    the pos/proj/MLP dropouts: ``drop`` is given to timm as ``pos_drop_rate``/``proj_drop_rate``
    and to both as the attention dropout, so the rates match (porter 10's ``vit_base.build``).
    ``drop_path`` defaults to ``drop``. Eval mode. ``load``: True by order, False by name, None
    not loaded."""
    import timm
    from ppcls.arch.backbone.model_zoo.vision_transformer import VisionTransformer

    from reprod.align import load_into_paddle

    dp = drop if drop_path is None else drop_path
    _seed()
    tm = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10,
                           drop_rate=0.0, pos_drop_rate=drop, proj_drop_rate=drop,
                           attn_drop_rate=drop, drop_path_rate=dp, **VIT)
    perturb(tm)
    pm = VisionTransformer(class_num=10, epsilon=1e-6, drop_rate=drop, attn_drop_rate=drop,
                           drop_path_rate=dp, **VIT)
    tm.eval()
    pm.eval()
    if load is not None:
        load_into_paddle(pm, tm, by_order=load)
    return tm, pm


# --- Swin --------------------------------------------------------------------------------------

# 32 px, patch 2 -> 16x16 tokens, window 4: both stages (16x16, 8x8) are larger than the window,
# so neither library clamps the window or drops the shift.
SWIN = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
            window_size=4, mlp_ratio=2)
SWIN_HW = 32


def swin(drop: float = 0.0, load: Optional[bool] = True) -> tuple[Any, Any]:
    """timm's ``SwinTransformer`` against PaddleClas's (``legendary_models.swin_transformer``),
    no stochastic depth, attention/proj/MLP dropout ``drop``; eval mode, loaded by order (the
    names differ where timm's stages hold their downsampling at the start, PaddleClas's at the
    end)."""
    import timm
    from ppcls.arch.backbone.legendary_models.swin_transformer import SwinTransformer

    from reprod.align import load_into_paddle

    _seed()
    tm = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10,
                           drop_rate=0.0, proj_drop_rate=drop, attn_drop_rate=drop,
                           drop_path_rate=0.0, **SWIN)
    perturb(tm)
    cfg = dict(SWIN, depths=list(SWIN["depths"]), num_heads=list(SWIN["num_heads"]))
    pm = SwinTransformer(class_num=10, drop_rate=drop, attn_drop_rate=drop, drop_path_rate=0.0,
                         **cfg)
    tm.eval()
    pm.eval()
    if load is not None:
        load_into_paddle(pm, tm, by_order=load)
    return tm, pm


# --- ConvNeXt ----------------------------------------------------------------------------------

CONVNEXT_DEPTHS, CONVNEXT_DIMS = (1, 1, 1, 1), (16, 32, 64, 128)  # PaddleClas: 4 stages, fixed
CONVNEXT_HW = 64


def convnext_pairs() -> dict[str, str]:
    """torch key -> Paddle key, timm's ``convnext`` against PaddleClas's ``ConvNeXt``, by hand
    (porter 10's ``by_hand_pairs``): PaddleClas holds the stem and the three downsamplings in
    ``downsample_layers``, defined before the stages, and names a block's layers ``dwconv``,
    ``pwconv1``, ``pwconv2`` (timm: ``conv_dw``, ``mlp.fc1``, ``mlp.fc2``)."""
    m = {}
    for t in ("weight", "bias"):
        m[f"stem.0.{t}"] = f"downsample_layers.0.0.{t}"
        m[f"stem.1.{t}"] = f"downsample_layers.0.1.{t}"
        for i in range(1, 4):
            for a in ("0", "1"):
                m[f"stages.{i}.downsample.{a}.{t}"] = f"downsample_layers.{i}.{a}.{t}"
    for i, depth in enumerate(CONVNEXT_DEPTHS):
        for j in range(depth):
            T, P = f"stages.{i}.blocks.{j}.", f"stages.{i}.{j}."
            m[T + "gamma"] = P + "gamma"
            for a, b in (("conv_dw", "dwconv"), ("norm", "norm"), ("mlp.fc1", "pwconv1"),
                         ("mlp.fc2", "pwconv2")):
                for t in ("weight", "bias"):
                    m[f"{T}{a}.{t}"] = f"{P}{b}.{t}"
    for t in ("weight", "bias"):
        m[f"head.norm.{t}"] = f"norm.{t}"
        m[f"head.fc.{t}"] = f"head.{t}"
    return m


def convnext_rules() -> Any:
    from reprod.align import ConversionRules

    return ConversionRules.from_pairs(convnext_pairs())


def convnext(drop_path: float = 0.0, load: bool = True) -> tuple[Any, Any]:
    """timm's ``convnext_tiny`` at depth 1 per stage and dims 16-128 against PaddleClas's
    ``model_zoo.convnext.ConvNeXt``, layer scale 1e-6 (perturbed), eval mode, loaded with the
    hand pairs."""
    import timm
    from ppcls.arch.backbone.model_zoo.convnext import ConvNeXt

    from reprod.align import load_into_paddle

    _seed()
    tm = timm.create_model("convnext_tiny", pretrained=False, num_classes=10,
                           depths=CONVNEXT_DEPTHS, dims=CONVNEXT_DIMS,
                           drop_path_rate=drop_path, ls_init_value=1e-6)
    perturb(tm)
    pm = ConvNeXt(class_num=10, depths=list(CONVNEXT_DEPTHS), dims=list(CONVNEXT_DIMS),
                  drop_path_rate=drop_path, layer_scale_init_value=1e-6)
    tm.eval()
    pm.eval()
    if load:
        load_into_paddle(pm, tm, rules=convnext_rules())
    return tm, pm


BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "vit": vit,
    "swin": swin,
    "convnext": convnext,
}


def built(name: str, **kw: Any) -> tuple[Any, Any]:
    """A fresh pair, warnings (paddle's, timm's) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[name](**kw)
