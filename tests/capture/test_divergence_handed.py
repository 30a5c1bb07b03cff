"""A block handed one input already differing while its others align: an unpatched PaddleNLP
MegatronBERT adds its 0/1 attention mask as it is where HF adds float32's lowest. The first leaf
whose input differs was put "between value and dropout, outside the recorded layers", and the
mask, the block's own input, was never mentioned. Numpy only: captures built by hand, in the
order ``record`` writes them (a container's inputs, its sublayers', then its outputs)."""

from __future__ import annotations

import numpy as np

from reprod.capture import first_divergence
from reprod.diff.engine import compare

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 5, 8)).astype(np.float32)
V = RNG.standard_normal((2, 5, 8)).astype(np.float32)
W = RNG.standard_normal((2, 4, 5, 5)).astype(np.float32)


def _captures(mask: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    return {"attn.in[0]": X, "attn.in[1]": mask,
            "attn.value.in": X, "attn.value.out": V,
            "attn.dropout.in": weights, "attn.dropout.out": weights,
            "attn.out": weights[:, 0, :, :3].copy()}


def test_the_block_s_differing_input_is_said() -> None:
    additive = np.zeros((2, 1, 1, 5), np.float32)
    additive[1, ..., 3:] = np.finfo(np.float32).min
    ref = _captures(additive, W)
    port = _captures((additive == 0).astype(np.float32), W * 1.2)
    div = first_divergence(compare(ref, port, threshold=1e-5))
    assert div is not None and div.layer == "attn.dropout" and div.input_aligned is False
    assert div.handed is not None and div.handed[0] == "attn"
    assert div.message.endswith(
        "; the block around it, attn, is handed its input[1] already differing (max diff "
        f"{div.handed[1].max_abs:.3e}) while its other inputs align: look first where that "
        "input is made (a mask built before the block)"), div.message


def test_nothing_is_said_where_every_input_of_the_block_aligns_or_none_does() -> None:
    ref = _captures(np.zeros((2, 1, 1, 5), np.float32), W)
    same_mask = _captures(np.zeros((2, 1, 1, 5), np.float32), W * 1.2)
    div = first_divergence(compare(ref, same_mask, threshold=1e-5))
    assert div is not None and div.handed is None and "is handed" not in div.message
    both = dict(same_mask, **{"attn.in[0]": X + 1, "attn.in[1]": np.ones((2, 1, 1, 5), np.float32)})
    div = first_divergence(compare(ref, both, threshold=1e-5))
    assert div is not None and div.handed is None
