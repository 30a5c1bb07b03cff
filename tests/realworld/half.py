"""Half-precision runs of torchvision models and a correct deployment rewrite of each, for
test_low_precision.py and the measurements in MEASUREMENTS.md ("Half precision").

paddle has no float16 or bfloat16 kernels on the CPU, so the port is the torchvision model itself
with every BatchNorm folded into its conv (``fuse_conv_bn_eval``), cast to half precision: how an
exported fp16/bf16 model is checked against its float32 source. Keys: every activation's and
residual block's output (in call order) and the logits.

    .venv-real/bin/python tests/realworld/half.py resnet50 0 bfloat16   # one JSON line
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from models import build_pair, make_inputs  # noqa: E402
from torch.nn.utils.fusion import fuse_conv_bn_eval  # noqa: E402

import reprod  # noqa: E402

BLOCK = {"resnet50": "layer3.2", "mobilenet_v3_small": "features.5",
         "mobilenet_v3_large": "features.5"}
ACTIVATIONS = (torch.nn.ReLU, torch.nn.Hardswish, torch.nn.Hardsigmoid)


def fold_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm that follows a conv folded into it (the BN becomes an Identity)."""
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        kids = list(parent.named_children())
        for (n1, c1), (n2, c2) in zip(kids, kids[1:]):
            if isinstance(c1, torch.nn.Conv2d) and isinstance(c2, torch.nn.BatchNorm2d):
                setattr(parent, n1, fuse_conv_bn_eval(c1, c2))
                setattr(parent, n2, torch.nn.Identity())
        for i in (1, 2, 3):  # resnet's Bottleneck: conv1/bn1 ... as attributes
            c1, c2 = getattr(parent, f"conv{i}", None), getattr(parent, f"bn{i}", None)
            if isinstance(c1, torch.nn.Conv2d) and isinstance(c2, torch.nn.BatchNorm2d):
                setattr(parent, f"conv{i}", fuse_conv_bn_eval(c1, c2))
                setattr(parent, f"bn{i}", torch.nn.Identity())
    return m


def drop_residual(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The model with the residual add of its ``BLOCK`` dropped."""
    m = copy.deepcopy(model)
    blk = m.get_submodule(BLOCK[name])
    if name == "resnet50":
        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)))

        blk.forward = types.MethodType(forward, blk)  # deepcopy rebinds it to the copy
    else:
        assert blk.use_res_connect
        blk.use_res_connect = False
    return m


def outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation's and residual block's output (in call order) and the logits."""
    out, hooks, calls = {}, [], {}
    for n, mod in model.named_modules():
        if isinstance(mod, ACTIVATIONS) or type(mod).__name__ in ("Bottleneck", "InvertedResidual"):
            def hook(mod, args, o, n=n):
                k = f"{n}#{calls.setdefault(n, 0)}"
                calls[n] += 1
                out[k] = o.detach().clone()
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        out["logits"] = model(x)
    for h in hooks:
        h.remove()
    return out


def runs(model: str, prec: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The reference in float32 and float64, and in ``prec``: itself, the folded port, and the
    folded port with a dropped residual."""
    dt = getattr(torch, prec)
    pair = build_pair(model, seed=seed)
    x = torch.from_numpy(make_inputs(seed, 2))
    t32 = pair.torch32.eval()

    def half(m):
        return outputs(copy.deepcopy(m).to(dt), x.to(dt))

    return {"ref32": outputs(t32, x), "ref64": outputs(pair.torch64.eval(), x.double()),
            "ref": half(t32), "port": half(fold_bn(t32)),
            "bug": half(fold_bn(drop_residual(t32, model)))}


def measure(model: str, seed: int, prec: str) -> dict:
    r = runs(model, prec, seed)
    out = {"model": model, "seed": seed, "dtype": prec}
    for name in ("port", "bug"):
        res = reprod.compare(r["ref"], r[name], noise=r["ref32"])
        first = res.first_failure
        out[name] = {"max": max(kr.noise_multiple for kr in res),
                     "block": res[f"{BLOCK[model]}#0"].noise_multiple,
                     "logits": res["logits"].noise_multiple,
                     "first_failure": None if first is None else first.key}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
