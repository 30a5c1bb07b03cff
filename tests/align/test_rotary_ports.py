"""A rotary embedding held once for every block (Hugging Face's Llama computes it in the model,
its base only in its ``inv_freq``) against one in each block (PaddleNLP's, holding ``base`` and
``dim``): its base (``rope_theta``: 10000 in Llama 2, 500000 in Llama 3) is a setting, each of
the port's set against the reference's one. tests/realworld/test_llama_real.py runs the real
pair."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
paddle = pytest.importorskip("paddle")
tnn = torch.nn
pnn = paddle.nn

from reprod.align import align_forward, load_into_paddle  # noqa: E402
from reprod.align.settings import read_settings  # noqa: E402

D, B, L = 8, 2, 6
X = np.random.default_rng(0).standard_normal((B, L, D)).astype(np.float32)


class LlamaRotaryEmbedding(tnn.Module):
    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x):
        freqs = torch.outer(torch.arange(x.shape[1]).float(), self.inv_freq)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()


class TorchBlock(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = tnn.Linear(D, D)

    def forward(self, x, cos, sin):
        x1, x2 = x.chunk(2, -1)
        return self.proj(x * cos + torch.cat([-x2, x1], -1) * sin)


class TorchModel(tnn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rotary_emb = LlamaRotaryEmbedding(D, 10000.0)
        self.layers = tnn.ModuleList([TorchBlock(), TorchBlock()])

    def forward(self, x):
        cos, sin = self.rotary_emb(x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class PaddleRotary(pnn.Layer):
    def __init__(self, dim: int, base: float) -> None:
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, x):
        inv = 1.0 / (self.base ** (paddle.arange(0, self.dim, 2, dtype="float32") / self.dim))
        freqs = paddle.outer(paddle.arange(x.shape[1], dtype="float32"), inv)
        emb = paddle.concat([freqs, freqs], -1)
        return emb.cos(), emb.sin()


PaddleRotary.__name__ = "LlamaRotaryEmbedding"


class PaddleBlock(pnn.Layer):
    def __init__(self, base: float) -> None:
        super().__init__()
        self.proj = pnn.Linear(D, D)
        self.rotary_emb = PaddleRotary(D, base)

    def forward(self, x):
        cos, sin = self.rotary_emb(x)
        x1, x2 = x.chunk(2, -1)
        return self.proj(x * cos + paddle.concat([-x2, x1], -1) * sin)


class PaddleModel(pnn.Layer):
    def __init__(self, bases: tuple[float, float] = (10000.0, 10000.0)) -> None:
        super().__init__()
        self.layers = pnn.LayerList([PaddleBlock(b) for b in bases])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_the_base_is_read_from_the_frequencies_alone() -> None:
    for base in (10000.0, 500000.0, 1e6):
        assert read_settings(LlamaRotaryEmbedding(128, base)) == (
            "rotary", {"base": base, "dim": 128})
    assert read_settings(PaddleRotary(D, 500.0)) == ("rotary", {"base": 500.0, "dim": D})


@pytest.mark.parametrize("bases, failed", [
    ((10000.0, 10000.0), []),
    ((10000.0, 500.0), ["settings/layers.1.rotary_emb/base"]),
])
def test_each_block_s_rotary_embedding_is_set_against_the_reference_s_one(bases, failed) -> None:
    torch.manual_seed(0)
    tm = TorchModel().eval()
    pm = PaddleModel(bases)
    pm.eval()
    load_into_paddle(pm, tm)
    r = align_forward(tm, pm, {"x": X})
    assert [k.key for k in r.failed if k.status == "setting"] == failed, \
        r.to_table(failed_only=True)
    assert not [u for u in r.options["settings"].get("unpaired", ()) if u.startswith("rotary")]
