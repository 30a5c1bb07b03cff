"""Real models for the calibration measurements: torchvision models with seeded random weights
and paddle.vision's own port of each, weights copied by order.

No pretrained weights are reachable here, so every tensor is random but fixed by the seed, and
every BatchNorm has random affine parameters and random (but calibrated) running statistics, so
that each tensor matters in eval mode. A "correct port" is paddle.vision's model with the same
weights; the injected bugs (``BUGS``) each change one thing in it.

>>> pair = build_pair("resnet50", seed=0)
>>> pair.torch32, pair.torch64, pair.paddle()          # float32 ref, float64 ref, fresh port
>>> port = pair.paddle(bug="bn_eps")                   # the port with one BN epsilon changed
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

os.environ.setdefault("FLAGS_use_mkldnn", "0")

import paddle  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

MODELS = ("resnet50", "mobilenet_v3_large", "mobilenet_v3_small")
NUM_CLASSES = 1000


# --- building ---------------------------------------------------------------------------------


def build_torch(name: str) -> torch.nn.Module:
    ctor = getattr(torchvision.models, name)
    if name == "inception_v3":  # paddle.vision's has no auxiliary head
        return ctor(weights=None, num_classes=NUM_CLASSES, aux_logits=False, init_weights=False)
    return ctor(weights=None, num_classes=NUM_CLASSES)


def build_paddle(name: str) -> paddle.nn.Layer:
    ctor = getattr(paddle.vision.models, name)
    if name.startswith("mobilenet"):
        return ctor(pretrained=False, scale=1.0, num_classes=NUM_CLASSES)
    return ctor(pretrained=False, num_classes=NUM_CLASSES)


def make_inputs(seed: int, batch: int, size: int = 224) -> np.ndarray:
    """A fixed float32 image batch, N(0, 1)."""
    return np.random.RandomState(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def make_labels(seed: int, batch: int) -> np.ndarray:
    return np.random.RandomState(seed + 1000).randint(0, NUM_CLASSES, size=batch).astype(np.int64)


def _bns(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights where every tensor matters.

    Conv/Linear weights keep torchvision's (seeded) init; biases that init leaves at zero get
    N(0, 0.02). BatchNorm: weight ~ U(0.5, 1.5), bias ~ N(0, 0.1); running statistics are first
    calibrated on a random batch (so activations stay O(1) through 50 layers instead of growing
    block after block), then perturbed: mean += N(0, 0.1) * std, var *= U(0.5, 1.5).
    """
    # torchvision's own init ran at construction, under the seed set by build_pair
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias") and torch.count_nonzero(p) == 0:
            p.normal_(0.0, 0.02)
    bns = _bns(model)
    for bn in bns:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
    # calibrate: one train-mode pass with a cumulative average sets the batch statistics
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = model.training
    model.train()
    gen = torch.Generator().manual_seed(seed + 7)
    model(torch.randn(2, 3, 224, 224, generator=gen))
    model.train(was_training)
    for bn, mom in zip(bns, saved):
        bn.momentum = mom
        std = bn.running_var.sqrt()
        bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=gen) * 0.1 * std)
        bn.running_var.mul_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
        bn.num_batches_tracked.zero_()
    # the head: logits of std ~3, so that softmax and cross-entropy are not saturated
    # (squeezenet's is a 1x1 conv: there are no Linear layers)
    head = ([m for m in model.modules() if isinstance(m, torch.nn.Linear)]
            or [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)])[-1]
    model.eval()
    logits = model(torch.randn(2, 3, 224, 224, generator=gen))
    scale = 3.0 / float(logits.std())
    head.weight.mul_(scale)
    if isinstance(head, torch.nn.Conv2d) and head.bias is not None:  # a ReLU follows it
        head.bias.mul_(scale)
    model.train(was_training)
    return model


def without_dropout(*models: object) -> None:
    """Dropout off (p = 0) in torch and Paddle models: train-mode runs compare without the two
    frameworks' random masks."""
    for model in models:
        for m in (model.modules() if hasattr(model, "modules") else model.sublayers()):
            if isinstance(m, (torch.nn.Dropout, paddle.nn.Dropout)):
                m.p = 0.0


def squeezenet_as_torchvision(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """paddle.vision's squeezenet1_1 made to compute torchvision's: its first conv unpadded (it
    pads by 1 where torchvision's does not), its Dropout scaling in training as torch's does
    (not by 1 - p in inference), its max-pool (one layer called three times) rounding its output
    size up as torchvision's three do (at 224 px no size changes)."""
    model._conv._padding, model._conv._updated_padding = 0, [0, 0]
    model._pool.ceil_mode = True
    for m in model.sublayers():
        if isinstance(m, paddle.nn.Dropout):
            m.mode = "upscale_in_train"
    return model


def train_copies(pair: Any, seed: int, *, steps: int = 2, batch: int = 2
                 ) -> tuple[torch.nn.Module, paddle.nn.Layer, list[tuple[np.ndarray, np.ndarray]]]:
    """Fresh copies of a pair's two models in train mode with dropout off (squeezenet's first
    conv as torchvision's), and ``steps`` batches of seeds ``seed``, ``seed + 1``, ...: what an
    ``align_train`` survey run of the pair starts from."""
    tm, pm = copy.deepcopy(pair.torch32), pair.paddle()
    if pair.name == "squeezenet1_1":
        squeezenet_as_torchvision(pm)
    without_dropout(tm, pm)
    tm.train()
    pm.train()
    return tm, pm, [(make_inputs(seed + i, batch), make_labels(seed + i, batch))
                    for i in range(steps)]


def to_float64(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of a torch model (same weights, exactly: float32 -> float64 is exact)."""
    return copy.deepcopy(model).double()


def torch_input(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def paddle_input(x: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.ascontiguousarray(x))


# --- weights by order -------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightPair:
    torch_key: str
    paddle_key: str
    transpose: bool  # a Linear weight: torch [out, in], paddle [in, out]


def pair_weights(torch_model: torch.nn.Module, paddle_model: paddle.nn.Layer) -> list[WeightPair]:
    """Torch state-dict keys (without ``num_batches_tracked``) paired with Paddle's by position,
    checking every shape (a Linear weight pairs with its transpose)."""
    linear = {
        f"{n}.weight" for n, m in torch_model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    t_sd = {
        k: v for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    p_sd = paddle_model.state_dict()
    if len(t_sd) != len(p_sd):
        raise ValueError(f"state dicts differ in length: torch {len(t_sd)} vs paddle {len(p_sd)}")
    pairs = []
    for (tk, tv), (pk, pv) in zip(t_sd.items(), p_sd.items()):
        tshape, pshape = tuple(tv.shape), tuple(pv.shape)
        transpose = tk in linear
        want = tshape[::-1] if transpose else tshape
        if want != pshape:
            raise ValueError(f"by-order pairing broke at {tk} {tshape} vs {pk} {pshape}")
        pairs.append(WeightPair(tk, pk, transpose))
    return pairs


def _copy_by_order(torch_model, paddle_model, pairs: list[WeightPair]) -> None:
    sd = torch_model.state_dict()
    arrays = {}
    for p in pairs:
        a = sd[p.torch_key].detach().cpu().numpy()
        arrays[p.paddle_key] = np.ascontiguousarray(a.T if p.transpose else a)
    paddle_model.set_state_dict(arrays)


def copy_weights(torch_model, paddle_model, pairs: list[WeightPair]) -> str:
    """Copy by order with reprod's converter (``reprod.align.load_into_paddle(by_order=True)``);
    if that API is unavailable or broken, with the plain copy here. Either way every Paddle tensor
    is then checked bit for bit against its torch source. Returns which path was used."""
    how = "reprod.align.load_into_paddle(by_order=True)"
    try:
        from reprod.align import load_into_paddle

        load_into_paddle(paddle_model, torch_model, by_order=True)
    except Exception as exc:  # the align API is being reworked: fall back, say so
        how = f"own by-order copy (reprod.align failed: {type(exc).__name__}: {exc})"[:200]
        _copy_by_order(torch_model, paddle_model, pairs)
    tsd, psd = torch_model.state_dict(), paddle_model.state_dict()
    for p in pairs:
        a = tsd[p.torch_key].detach().cpu().numpy()
        b = psd[p.paddle_key].numpy()
        if p.transpose:
            b = b.T
        if a.shape != b.shape or a.tobytes() != np.ascontiguousarray(b).tobytes():
            if how.startswith("reprod"):  # reprod's copy is wrong: use ours and say so
                _copy_by_order(torch_model, paddle_model, pairs)
                return copy_weights_checked(torch_model, paddle_model, pairs, why=p.torch_key)
            raise AssertionError(f"weight copy wrong at {p.torch_key} -> {p.paddle_key}")
    return how


def copy_weights_checked(torch_model, paddle_model, pairs, why: str) -> str:
    _copy_by_order(torch_model, paddle_model, pairs)
    psd = paddle_model.state_dict()
    for p in pairs:
        b = psd[p.paddle_key].numpy()
        a = torch_model.state_dict()[p.torch_key].numpy()
        assert np.array_equal(a, b.T if p.transpose else b), p.torch_key
    return f"own by-order copy (reprod.align copied {why} wrongly)"


# --- injected bugs ------------------------------------------------------------------------------
# Each takes (pair, paddle_model) and changes one thing. Targets are named by torch module names
# and found on the Paddle side through the weight pairing.

# target torch module per model and bug
TARGETS: dict[str, dict[str, str]] = {
    "resnet50": {
        "bn_eps": "layer2.1.bn2",
        "bn_momentum": "layer3.0.bn1",
        "no_residual": "layer3.2",
    },
    "mobilenet_v3_large": {
        "bn_eps": "features.7.block.0.1",
        "bn_momentum": "features.10.block.1.1",
        "no_residual": "features.5",
        "hardsigmoid_slope": "features.12.block.2",
    },
    "mobilenet_v3_small": {
        "bn_eps": "features.7.block.0.1",
        "bn_momentum": "features.10.block.1.1",
        "no_residual": "features.5",
        "hardsigmoid_slope": "features.6.block.2",
    },
}


def _bug_bn_eps(pair: ModelPair, model: paddle.nn.Layer) -> str:
    target = TARGETS[pair.name]["bn_eps"]
    bn = pair.paddle_layer(model, target)
    old = bn._epsilon
    bn._epsilon = 1e-3 if old < 1e-4 else 1e-5
    return f"{target}: BN epsilon {old:g} -> {bn._epsilon:g}"


def _bug_bn_momentum(pair: ModelPair, model: paddle.nn.Layer) -> str:
    target = TARGETS[pair.name]["bn_momentum"]
    bn = pair.paddle_layer(model, target)
    torch_mom = dict(pair.torch32.named_modules())[target].momentum
    old = bn._momentum
    bn._momentum = torch_mom  # torch's value used as is; Paddle's convention is 1 - torch's
    return f"{target}: BN momentum {old:g} -> {torch_mom:g} (torch's value, not 1 - it)"


def _bug_no_residual(pair: ModelPair, model: paddle.nn.Layer) -> str:
    target = TARGETS[pair.name]["no_residual"]
    block = pair.paddle_layer(model, target)
    if pair.name == "resnet50":

        def forward(self, x):  # BottleneckBlock.forward without ``out += identity``
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out)

        block.forward = types.MethodType(forward, block)
    else:
        assert block.use_res_connect, target
        block.use_res_connect = False
    return f"{target}: residual add dropped"


def _bug_hardsigmoid_slope(pair: ModelPair, model: paddle.nn.Layer) -> str:
    target = TARGETS[pair.name]["hardsigmoid_slope"]
    se = pair.paddle_layer(model, target)
    act = se.scale_activation

    def forward(self, x):  # the old fluid default: slope 0.2 instead of 1/6
        return paddle.nn.functional.hardsigmoid(x, slope=0.2, offset=0.5)

    act.forward = types.MethodType(forward, act)
    return f"{target}: SE hardsigmoid slope 1/6 -> 0.2"


BUGS: dict[str, Callable[[Any, paddle.nn.Layer], str]] = {
    "bn_eps": _bug_bn_eps,
    "hardsigmoid_slope": _bug_hardsigmoid_slope,
    "no_residual": _bug_no_residual,
    "bn_momentum": _bug_bn_momentum,
}


def bugs_for(name: str) -> list[str]:
    return [b for b in BUGS if b in TARGETS[name]]


# --- the pair -----------------------------------------------------------------------------------


@dataclass
class ModelPair:
    name: str
    seed: int
    torch32: torch.nn.Module
    torch64: torch.nn.Module
    pairs: list[WeightPair]
    copied_with: str = ""
    last_bug: str = ""

    def paddle(self, bug: Optional[str] = None) -> paddle.nn.Layer:
        """A fresh Paddle port with the torch weights (eval mode); ``bug`` injects one of BUGS."""
        model = build_paddle(self.name)
        self.copied_with = copy_weights(self.torch32, model, self.pairs)
        model.eval()
        if bug is not None:
            self.last_bug = BUGS[bug](self, model)
        return model

    def paddle_name(self, torch_module: str) -> str:
        """The Paddle layer name of a torch module, through the first weight under it."""
        # the longest common dotted prefix of the Paddle keys of the weights under it
        keys = [
            p.paddle_key.split(".")
            for p in self.pairs
            if p.torch_key.startswith(torch_module + ".")
        ]
        if not keys:
            raise KeyError(torch_module)
        common = []
        for words in zip(*(k[:-1] for k in keys)):
            if len(set(words)) != 1:
                break
            common.append(words[0])
        return ".".join(common)

    def paddle_layer(self, model: paddle.nn.Layer, torch_module: str) -> paddle.nn.Layer:
        return dict(model.named_sublayers())[self.paddle_name(torch_module)]

    def torch_key(self, paddle_key: str) -> str:
        return {p.paddle_key: p.torch_key for p in self.pairs}[paddle_key]

    @property
    def linear_weights(self) -> set[str]:
        return {p.torch_key for p in self.pairs if p.transpose}


def build_pair(name: str, seed: int = 0) -> ModelPair:
    """The torch model (float32, eval, seeded random weights), its float64 copy, and the weight
    pairing with paddle.vision's port."""
    torch.manual_seed(seed)
    t = randomize(build_torch(name), seed).eval()
    probe = build_paddle(name)
    pairs = pair_weights(t, probe)
    return ModelPair(name, seed, t, to_float64(t).eval(), pairs)
