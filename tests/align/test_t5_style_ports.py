"""A T5-style port: an RMS norm without a bias named ``T5LayerNorm`` (no class name says RMS),
and an additive attention mask the reference writes as float32's lowest value and the port as
-1e4 (Hugging Face's T5 against PaddleNLP's), carried as a layer's output (T5 passes its
position bias, mask added, from block to block). tests/realworld/test_more_transformers_real.py
runs the real pair."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from reprod.align import align_forward, compare_settings, load_into_paddle  # noqa: E402
from reprod.align.localise import _masked_alike  # noqa: E402
from reprod.diagnose import layernorm_epsilon  # noqa: E402

H, B, L = 8, 2, 6
X = np.random.default_rng(0).standard_normal((B, L, H)).astype(np.float32)
MASK = np.ones((B, L), np.float32)
MASK[1, -2:] = 0


class T5LayerNorm(tnn.Module):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(H) + 0.3 * torch.randn(H))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) +
                                             self.variance_epsilon)


class TorchBias(tnn.Module):
    """The position bias with the mask added, returned to the attention after it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = tnn.Parameter(0.3 * torch.randn(L, L))

    def forward(self, mask):
        return self.table + (1.0 - mask)[:, None, :] * torch.finfo(torch.float32).min


class TorchModel(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer_norm = T5LayerNorm()
        self.bias = TorchBias()
        self.q, self.o = tnn.Linear(H, H, bias=False), tnn.Linear(H, H, bias=False)

    def forward(self, x, mask):
        h = self.layer_norm(x)
        q = self.q(h)
        probs = torch.softmax(q @ h.transpose(1, 2) + self.bias(mask), dim=-1)
        return self.o(probs @ h)


class PaddleT5LayerNorm(pnn.Layer):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = self.create_parameter([H])
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * x * paddle.rsqrt(x.pow(2).mean(-1, keepdim=True) +
                                              self.variance_epsilon)


PaddleT5LayerNorm.__name__ = "T5LayerNorm"


class PaddleBias(pnn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.table = self.create_parameter([L, L])

    def forward(self, mask):
        return self.table + (1.0 - mask).unsqueeze(1) * -1e4


class PaddleModel(pnn.Layer):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.layer_norm = PaddleT5LayerNorm(eps)
        self.bias = PaddleBias()
        self.q, self.o = pnn.Linear(H, H, bias_attr=False), pnn.Linear(H, H, bias_attr=False)

    def forward(self, x, mask):
        h = self.layer_norm(x)
        q = self.q(h)
        probs = paddle.nn.functional.softmax(q @ h.transpose([0, 2, 1]) + self.bias(mask), -1)
        return self.o(probs @ h)


def _pair(eps: float = 1e-6):
    torch.manual_seed(0)
    tm = TorchModel().eval()
    pm = PaddleModel(eps)
    pm.eval()
    load_into_paddle(pm, tm)
    return tm, pm


FEED = {"x": X, "mask": MASK}


def test_the_faithful_port_passes_whatever_its_mask_value() -> None:
    tm, pm = _pair()
    r = align_forward(tm, pm, FEED)
    assert r.passed, r.to_table(failed_only=True)


def test_a_bug_after_the_mask_is_named_where_it_is_not_at_the_mask() -> None:
    """Before, the bias layer's output differed by 3.4e38 where both sides mask, and every bug
    was put there (T5: at block 0's attention, whatever the bug)."""
    tm, pm = _pair()
    pm.q.weight.set_value(pm.q.weight * 1.05)
    div = align_forward(tm, pm, FEED).options["divergence"]
    assert div["layer"] == "q", div


def test_a_mask_on_one_side_only_still_differs() -> None:
    ref = {"k": np.array([0.5, -3.4e38, 1.0], np.float32)}
    assert np.array_equal(_masked_alike(ref, {"k": np.array([0.5, -1e4 + 0.3, 1.0],
                                                            np.float32)})["k"], ref["k"])
    one_sided = {"k": np.array([0.5, 2.0, 1.0], np.float32)}
    assert _masked_alike(ref, one_sided)["k"] is one_sided["k"]
    unmasked = {"k": np.array([0.5, 2.0, 1.0], np.float32)}
    assert _masked_alike(unmasked, {"k": np.array([0.4, 2.0, 1.0], np.float32)})["k"][0] == \
        np.float32(0.4)


def test_an_rms_norm_named_t5layernorm_has_its_epsilon_checked_and_fitted() -> None:
    tm, pm = _pair(eps=1e-2)
    assert [d.line() for d in compare_settings(tm, pm).differ] == [
        "layer_norm: epsilon 1e-06 in torch, 0.01 in Paddle"]
    r = align_forward(tm, pm, FEED)
    assert r.options["divergence"]["layer"] == "layer_norm", r.options["divergence"]
    assert r.options["divergence"]["hint"] == \
        "T5LayerNorm: RMSNorm epsilon: port uses ~1e-2, reference 1e-6"


def test_the_rms_epsilon_fit_against_numpy() -> None:
    x = np.random.default_rng(1).standard_normal((4, 16)) * 0.05

    def rms(eps):
        return x / np.sqrt(np.square(x).mean(-1, keepdims=True) + eps)

    assert layernorm_epsilon(x, rms(1e-6), rms(1e-3), 1e-6, rms=True) == \
        "RMSNorm epsilon: port uses ~1e-3, reference 1e-6"
    # read as a LayerNorm, the fit finds no one epsilon for every row
    assert layernorm_epsilon(x, rms(1e-6), rms(1e-3), 1e-6) != \
        "LayerNorm epsilon: port uses ~1e-3, reference 1e-6"


@pytest.mark.parametrize("name", ["T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm",
                                  "LongT5LayerNorm", "LlamaRMSNorm", "RMSNorm"])
def test_t5_s_norm_and_its_copies_are_rms_norms(name: str) -> None:
    from reprod.align.settings import _kind

    assert _kind(name) == ("rmsnorm", 0)
    assert _kind("LayerNorm") == ("layernorm", 0)
