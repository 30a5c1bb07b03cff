"""The three benchmark workloads of project issue 9, generated reproducibly (seeded).

Each workload is a pair of dumps, ``ref`` and ``other``, written in reprod_log's format (``np.save``
of a dict, ``.npy``) and in reprod's native format (``reprod.save``, ``.npz``). ``other`` is ``ref``
with one-ulp noise on every element, except a 1 % share of keys (at least one) that get a 1e-3
relative error and fail the default check (mean |diff| <= 1e-6).

- many-small: 100 steps x 25 layers x (activation, grad) = 5,000 keys of 1-10 KiB, 27 MiB a side
- mixed: ResNet50 forward outputs, parameter grads and block grads at batch 8, 320 keys, ~1.1 GiB
- few-large: 8 x float32 [8, 2048, 4096] (LLM activations), 2 GiB a side

``scale`` < 1 shrinks each workload (``--quick``): fewer steps, a smaller batch, shorter sequences.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Callable

import numpy as np

__all__ = ["WORKLOADS", "generate", "paths"]

Spec = list[tuple[str, tuple[int, ...]]]


def many_small(scale: float) -> Spec:
    steps = max(2, round(100 * scale))
    rng = np.random.default_rng(1)
    out: Spec = []
    for s in range(steps):
        for layer in range(25):
            for kind in ("activation", "grad"):
                n = int(rng.integers(256, 2561))  # 1-10 KiB of float32
                out.append((f"step{s:03d}.layer{layer:02d}.{kind}", (n,)))
    return out


def _resnet50_shapes(batch: int, size: int) -> Spec:
    """Forward outputs, block-output grads and parameter grads of torchvision's ResNet50."""
    fwd: Spec = []
    params: Spec = []
    block_grads: Spec = []
    h = size // 2
    fwd += [("conv1", (batch, 64, h, h)), ("bn1", (batch, 64, h, h)), ("relu", (batch, 64, h, h))]
    params += [("conv1.weight.grad", (64, 3, 7, 7)), ("bn1.weight.grad", (64,)), ("bn1.bias.grad", (64,))]
    h //= 2
    fwd.append(("maxpool", (batch, 64, h, h)))
    cin = 64
    for li, (blocks, mid, out, stride) in enumerate([(3, 64, 256, 1), (4, 128, 512, 2),
                                                     (6, 256, 1024, 2), (3, 512, 2048, 2)], 1):
        for b in range(blocks):
            name = f"layer{li}.{b}"
            s = stride if b == 0 else 1
            ho = h // s
            fwd += [(f"{name}.conv1", (batch, mid, h, h)), (f"{name}.bn1", (batch, mid, h, h)),
                    (f"{name}.conv2", (batch, mid, ho, ho)), (f"{name}.bn2", (batch, mid, ho, ho)),
                    (f"{name}.conv3", (batch, out, ho, ho)), (f"{name}.bn3", (batch, out, ho, ho))]
            params += [(f"{name}.conv1.weight.grad", (mid, cin, 1, 1)),
                       (f"{name}.bn1.weight.grad", (mid,)), (f"{name}.bn1.bias.grad", (mid,)),
                       (f"{name}.conv2.weight.grad", (mid, mid, 3, 3)),
                       (f"{name}.bn2.weight.grad", (mid,)), (f"{name}.bn2.bias.grad", (mid,)),
                       (f"{name}.conv3.weight.grad", (out, mid, 1, 1)),
                       (f"{name}.bn3.weight.grad", (out,)), (f"{name}.bn3.bias.grad", (out,))]
            if b == 0:
                fwd += [(f"{name}.downsample.0", (batch, out, ho, ho)),
                        (f"{name}.downsample.1", (batch, out, ho, ho))]
                params += [(f"{name}.downsample.0.weight.grad", (out, cin, 1, 1)),
                           (f"{name}.downsample.1.weight.grad", (out,)),
                           (f"{name}.downsample.1.bias.grad", (out,))]
            fwd.append((name, (batch, out, ho, ho)))
            block_grads += [(f"{name}.grad", (batch, out, ho, ho)),
                            (f"{name}.bn1.grad", (batch, mid, h, h))]
            h, cin = ho, out
    fwd += [("avgpool", (batch, 2048)), ("fc", (batch, 1000))]
    params += [("fc.weight.grad", (1000, 2048)), ("fc.bias.grad", (1000,))]
    grads = block_grads[: 320 - len(fwd) - len(params) - 1] + [("loss", ())]
    return fwd + params + grads


def mixed(scale: float) -> Spec:
    return _resnet50_shapes(max(1, round(8 * scale)), 224)


def few_large(scale: float) -> Spec:
    seq = max(64, round(2048 * scale))
    return [(f"decoder.layers.{i}.hidden_states", (8, seq, 4096)) for i in range(8)]


WORKLOADS: dict[str, Callable[[float], Spec]] = {
    "many-small": many_small,
    "mixed": mixed,
    "few-large": few_large,
}


def paths(root: str, name: str, scale: float = 1.0) -> dict[str, str]:
    d = os.path.join(root, name if scale == 1.0 else f"{name}@{scale:g}")
    return {f"{side}.{fmt}": os.path.join(d, f"{side}.{fmt}") for side in ("ref", "other")
            for fmt in ("npy", "npz")}


def _arrays(spec: Spec, seed: int, perturbed: bool) -> Iterator[tuple[str, np.ndarray]]:
    failing = _failing(spec, seed)
    for i, (key, shape) in enumerate(spec):
        rng = np.random.default_rng([seed, i])
        a = rng.standard_normal(shape, dtype=np.float32)
        if perturbed:
            if key in failing:
                a *= np.float32(1.0 + 1e-3)
            else:
                # one-ulp noise: the last bit of each element moves by -1, 0 or +1 (not at +-0,
                # where it would make a NaN)
                bits = a.reshape(-1).view(np.int32)
                step = rng.integers(-1, 2, size=bits.size, dtype=np.int8)
                step[(bits & 0x7FFFFFFF) == 0] = 0
                bits += step
        yield key, np.asarray(a)


def _failing(spec: Spec, seed: int) -> set[str]:
    rng = np.random.default_rng([seed, 999_999])
    k = max(1, round(0.01 * len(spec)))
    return {spec[int(i)][0] for i in rng.choice(len(spec), size=k, replace=False)}


def generate(root: str, name: str, *, scale: float = 1.0, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, str]:
    """Write the workload's four files under ``root/name`` unless they exist for this scale."""
    import reprod

    out = paths(root, name, scale)
    d = os.path.dirname(out["ref.npy"])
    stamp = os.path.join(d, "workload.json")
    spec = WORKLOADS[name](scale)
    want = {"name": name, "version": 2, "scale": scale, "seed": seed, "keys": len(spec),
            "bytes": int(sum(4 * int(np.prod(s)) for _, s in spec)),
            "failing": sorted(_failing(spec, seed))}
    if os.path.exists(stamp) and all(os.path.exists(p) for p in out.values()):
        with open(stamp) as f:
            if json.load(f) == want:
                return out
    os.makedirs(d, exist_ok=True)
    log(f"generating {name} (scale {scale}): {len(spec)} keys, {want['bytes'] / 2**20:.0f} MiB a side")
    for side, perturbed in (("ref", False), ("other", True)):
        data = dict(_arrays(spec, seed, perturbed))
        np.save(out[f"{side}.npy"], data, allow_pickle=True)  # exactly what reprod_log writes
        reprod.save(out[f"{side}.npz"], data)
        del data
    with open(stamp, "w") as f:
        json.dump(want, f)
    return out
