"""Measure ``align_onnx`` on torchvision's models against their own ONNX exports: each model
exported three ways (dynamo; TorchScript; TorchScript without constant folding), each run by
onnxruntime with its graph optimisations off and on, judged against the float64 twin's noise.

    OMP_NUM_THREADS=1 .venv-real/bin/python tests/realworld/measure_onnx.py
    OMP_NUM_THREADS=1 .venv-real/bin/python tests/realworld/measure_onnx.py --models resnet18 vit

Prints one row per export and optimisation level: the verdict, the worst noise multiple and its
key, the keys compared and the layer calls the graph does not hold apart. Seeded random weights,
every BatchNorm's statistics and affine and every LayerNorm's affine perturbed (as in
test_onnx_exports_real.py). Small ViT, Swin and ConvNeXt configurations, 64-96 px inputs: about
three minutes on one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torchvision  # noqa: E402
from test_onnx_exports_real import randomised  # noqa: E402

from reprod.align import align_onnx  # noqa: E402

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "squeezenet1_0",
          "vit", "swin", "convnext"]
EXPORTS = {"dynamo": {"dynamo": True, "verbose": False}, "torchscript": {"dynamo": False},
           "torchscript, no folding": {"dynamo": False, "do_constant_folding": False}}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    tv = torchvision.models
    size = 64
    if name == "squeezenet1_0":
        size = 96
    if name == "vit":
        model = tv.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                     hidden_dim=64, mlp_dim=128)
    elif name == "swin":
        from torchvision.models.swin_transformer import SwinTransformer

        model = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], stochastic_depth_prob=0.0)
    elif name == "convnext":
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt

        model = ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)],
                         stochastic_depth_prob=0.0)
    else:
        model = getattr(tv, name)()
    model = randomised(model)
    torch.manual_seed(123)
    return model, torch.randn(1, 3, size, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | export | onnxruntime | verdict | worst noise multiple | keys | not in graph |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, x = build(name)
            for export, kwargs in EXPORTS.items():
                path = os.path.join(tmp, f"{name}.{export.replace(' ', '')}.onnx")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(model, (x,), path, **kwargs)
                for opt in ("disable", "all"):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = align_onnx(model, path, x, optimization=opt)
                    worst = r.options["noise_multiple"]["onnx"]
                    print(f"| {name} | {export} | {opt} | {'passed' if r.passed else 'FAILED'} "
                          f"| {worst['multiple']:.2f} ({worst['key']}) | {len(list(r))} "
                          f"| {r.options.get('layers_not_in_graph')} |", flush=True)


if __name__ == "__main__":
    main()
