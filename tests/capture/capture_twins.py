"""A small network written twice, in torch and in paddle, with the same attribute names, and
the bugs a port can carry (one at a time, paddle side only)."""

from __future__ import annotations

from typing import Optional

import numpy as np

BUGS = ("bn_eps", "hardsigmoid", "linear_not_transposed", "no_residual")
# the layer each bug changes: what the first divergence must name
BUG_LAYER = {
    "bn_eps": "bn",
    "hardsigmoid": "act",
    "linear_not_transposed": "fc",
    "no_residual": "res",
}
LINEARS = ("fc", "head")  # paddle keeps Linear weights as [in, out]


def torch_net():
    import torch
    from torch import nn

    class SqueezeExcitation(nn.Module):
        def __init__(self, c: int, squeeze: int) -> None:
            super().__init__()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(c, squeeze, 1)
            self.relu = nn.ReLU()
            self.fc2 = nn.Conv2d(squeeze, c, 1)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))

    class Residual(nn.Module):
        def forward(self, x, shortcut):
            return x + shortcut

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.Hardswish()
            self.se = SqueezeExcitation(8, 4)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.res = Residual()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(8, 8)  # square: an untransposed weight still fits
            self.act2 = nn.Hardswish()
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.act(self.bn(self.conv(x)))
            x = self.se(x)
            x = self.res(self.bn2(self.conv2(x)), x)
            x = self.flatten(self.pool(x))
            return self.head(self.act2(self.fc(x)))

    torch.manual_seed(0)
    net = Net()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics worth the name, so eval mode is not identity
        for bn in (net.bn, net.bn2):
            bn.running_mean.copy_(torch.randn(8, generator=gen) * 0.2)
            bn.running_var.copy_(torch.rand(8, generator=gen) * 0.5 + 0.05)
            bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(8, generator=gen) * 0.1)
    return net.eval()


def paddle_net(bug: Optional[str] = None):
    import paddle
    from paddle import nn

    class SqueezeExcitation(nn.Layer):
        def __init__(self, c: int, squeeze: int) -> None:
            super().__init__()
            self.avgpool = nn.AdaptiveAvgPool2D(1)
            self.fc1 = nn.Conv2D(c, squeeze, 1)
            self.relu = nn.ReLU()
            self.fc2 = nn.Conv2D(squeeze, c, 1)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            scale = self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
            # a bug in a container's own code, between recorded leaf layers
            return x + scale if bug == "se_add" else x * scale

    class BadAddGrad(paddle.autograd.PyLayer):
        """x + shortcut, with a backward that doubles the shortcut's gradient."""

        @staticmethod
        def forward(ctx, x, shortcut):
            return x + shortcut

        @staticmethod
        def backward(ctx, grad):
            return grad, grad * 2

    class Residual(nn.Layer):
        def forward(self, x, shortcut):
            if bug == "no_residual":
                return x
            if bug == "residual_backward":
                return BadAddGrad.apply(x, shortcut)
            return x + shortcut

    class Net(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2D(3, 8, 3, padding=1, bias_attr=False)
            # torch's momentum 0.1 is paddle's 0.9
            self.bn = nn.BatchNorm2D(8, momentum=0.9, epsilon=1e-3 if bug == "bn_eps" else 1e-5)
            self.act = nn.Hardsigmoid() if bug == "hardsigmoid" else nn.Hardswish()
            self.se = SqueezeExcitation(8, 4)
            self.conv2 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False)
            self.bn2 = nn.BatchNorm2D(8, momentum=0.9, epsilon=1e-5)
            self.res = Residual()
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.flatten = nn.Flatten()
            self.fc = nn.Linear(8, 8)
            self.act2 = nn.Hardswish()
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.act(self.bn(self.conv(x)))
            x = self.se(x)
            x = self.res(self.bn2(self.conv2(x)), x)
            x = self.flatten(self.pool(x))
            return self.head(self.act2(self.fc(x)))

    paddle.set_device("cpu")
    net = Net()
    net.eval()
    return net


def copy_weights(torch_model, paddle_model, *, bug: Optional[str] = None) -> None:
    """torch state dict -> paddle: BN running stats renamed, Linear weights transposed."""
    import paddle

    state = {}
    for name, value in torch_model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        arr = value.detach().numpy()
        layer = name.rpartition(".")[0]
        if layer in LINEARS and name.endswith(".weight"):
            if not (bug == "linear_not_transposed" and layer == "fc"):
                arr = arr.T
        name = name.replace("running_mean", "_mean").replace("running_var", "_variance")
        state[name] = paddle.to_tensor(np.ascontiguousarray(arr))
    missing, unexpected = paddle_model.set_state_dict(state)
    assert not missing and not unexpected, (missing, unexpected)


def inputs() -> tuple[np.ndarray, np.ndarray]:
    """A batch and the weights of a linear loss sum(out * w), same on both sides."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((2, 5)).astype(np.float32)
    return x, w


def run_torch(model, *, backward: bool = True, **record_kw):
    import torch

    from reprod.capture import record

    x, w = inputs()
    with record(model, backward=backward, **record_kw) as log:
        out = model(torch.from_numpy(x))
        if backward:
            (out * torch.from_numpy(w)).sum().backward()
    return log


def run_paddle(model, *, backward: bool = True, **record_kw):
    import paddle

    from reprod.capture import record

    x, w = inputs()
    with record(model, backward=backward, **record_kw) as log:
        out = model(paddle.to_tensor(x))
        if backward:
            (out * paddle.to_tensor(w)).sum().backward()
    return log


def torch_layout(paddle_data: dict) -> dict:
    """Paddle's Linear weight gradients transposed back to torch's [out, in] layout."""
    data = dict(paddle_data)
    for layer in LINEARS:
        key = f"param.{layer}.weight.grad"
        if key in data:
            data[key] = np.ascontiguousarray(data[key].T)
    return data


# --- containers whose own forward code holds the bug -------------------------------------------

# bugs in Block.forward (paddle side, block2 only): what first_divergence must name is "block2"
BLOCK_BUGS = ("no_residual_add", "wrong_transpose", "wrong_reshape", "concat_order")


def block_torch_net():
    """stem -> block1 -> block2 -> pool -> head; a Block concatenates two branches, normalises
    over channels in a (N, HW, C) layout and adds its input back."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c, c // 2, 1)
            self.conv2 = nn.Conv2d(c, c // 2, 3, padding=1)
            self.act = nn.Hardswish()
            self.norm = nn.LayerNorm(c)
            self.proj = nn.Conv2d(c, c, 1)

        def forward(self, x):
            y = torch.cat([self.conv1(x), self.act(self.conv2(x))], dim=1)
            n, c, h, w = y.shape
            y = self.norm(y.reshape(n, c, h * w).transpose(1, 2))
            y = y.transpose(1, 2).reshape(n, c, h, w)
            return self.proj(y) + x

    class BlockNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block1 = Block(8)
            self.block2 = Block(8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten()
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.block2(self.block1(self.stem(x)))
            return self.head(self.flatten(self.pool(x)))

    torch.manual_seed(0)
    return BlockNet().eval()


def block_paddle_net(bug: Optional[str] = None):
    """The paddle twin of ``block_torch_net``, with ``bug`` in block2's own forward code."""
    import paddle
    from paddle import nn

    class Block(nn.Layer):
        def __init__(self, c: int, bug: Optional[str]) -> None:
            super().__init__()
            self.bug = bug
            self.conv1 = nn.Conv2D(c, c // 2, 1)
            self.conv2 = nn.Conv2D(c, c // 2, 3, padding=1)
            self.act = nn.Hardswish()
            self.norm = nn.LayerNorm(c)
            self.proj = nn.Conv2D(c, c, 1)

        def forward(self, x):
            a, b = self.conv1(x), self.act(self.conv2(x))
            y = paddle.concat([b, a] if self.bug == "concat_order" else [a, b], axis=1)
            n, c, h, w = y.shape
            if self.bug == "wrong_reshape":  # (N, C, H, W) read as (N, HW, C) without a transpose
                y = y.reshape([n, h * w, c])
            else:
                y = y.reshape([n, c, h * w]).transpose([0, 2, 1])
            y = self.norm(y)
            if self.bug == "wrong_transpose":  # back to (N, C, H, W) without transposing
                y = y.reshape([n, c, h, w])
            else:
                y = y.transpose([0, 2, 1]).reshape([n, c, h, w])
            y = self.proj(y)
            return y if self.bug == "no_residual_add" else y + x

    class BlockNet(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2D(3, 8, 3, padding=1)
            self.block1 = Block(8, None)
            self.block2 = Block(8, bug)
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.flatten = nn.Flatten()
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.block2(self.block1(self.stem(x)))
            return self.head(self.flatten(self.pool(x)))

    paddle.set_device("cpu")
    net = BlockNet()
    net.eval()
    return net


def copy_block_weights(torch_model, paddle_model) -> None:
    """torch state dict -> paddle for the Block twins (the head's weight transposed)."""
    import paddle

    state = {}
    for name, value in torch_model.state_dict().items():
        arr = value.detach().numpy()
        if name == "head.weight":
            arr = arr.T
        state[name] = paddle.to_tensor(np.ascontiguousarray(arr))
    missing, unexpected = paddle_model.set_state_dict(state)
    assert not missing and not unexpected, (missing, unexpected)
