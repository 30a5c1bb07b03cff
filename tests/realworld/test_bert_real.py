"""A transformer through ``reprod.align`` paired by order (collected only where torchvision and
paddle import, see conftest.py): Hugging Face's ``transformers.BertModel`` (torch, the reference)
against PaddleNLP's own port ``paddlenlp.transformers.BertModel``, written by neither side here.

The two libraries name every block's layers otherwise and define them in another order (HF:
``attention.self.query/key/value``, ``attention.output.dense``, ``attention.output.LayerNorm``,
``intermediate.dense``, ``output.dense``, ``output.LayerNorm``; PaddleNLP: ``self_attn.q_proj/
k_proj/v_proj/out_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``). Checked on a small
config (2 layers, hidden 128) whose LayerNorms and biases are perturbed so every tensor counts:

- ``pair_weights_by_order`` pairs all 39 tensors, the LayerNorms and feed-forward Linears by kind
  where their positions part; ``load_into_paddle(by_order=True)`` copies them where they belong,
  and the loaded port computes HF's numbers (checked with numpy, outside reprod);
- ``align_forward(by_order=True)`` pairs HF's named outputs with PaddleNLP's tuple by position;
  both pass, and the one failing key is a real difference: HF's word embedding has
  ``padding_idx`` 0, PaddleNLP's none, so the padding row trains in Paddle only (checked with one
  backward pass in each framework). The dropouts, placed otherwise, raise no setting;
- a 5 % scale on Paddle's second-block ``q_proj`` is named at HF's
  ``encoder.layer.1.attention.self.query``, not at the position embeddings (HF embeds position
  ids of shape [1, L], PaddleNLP [B, L]: broadcast-equal captures are judged by value);
- a LayerNorm epsilon of 1e-5 for HF's 1e-12 fails as that layer's setting.

About 4 s single-threaded (pytest -n0), most of it importing transformers and paddlenlp.

transformers, paddlenlp, torch and paddle are imported inside the fixtures and tests only:
importing paddlenlp at collection time would change the process every other realworld test runs
in.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

# transformers and paddlenlp warn on import and on building (deprecations, unused arguments)
pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=512, max_position_embeddings=64, type_vocab_size=2,
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
SEED = 0
BATCH, LENGTH, PADDED = 2, 16, 4
PAD_ID = 0  # HF's BertConfig.pad_token_id, its word embedding's padding_idx
PADDING_KEY = "settings/embeddings.word_embeddings/padding_idx"


def _build() -> tuple[Any, Any]:
    """A fresh (HF torch model, PaddleNLP model) pair, neither loaded: the Paddle one keeps its
    own random weights."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
        import torch
        from paddlenlp.transformers import BertConfig as PaddleBertConfig
        from paddlenlp.transformers import BertModel as PaddleBert
        from transformers import BertConfig, BertModel

        torch.manual_seed(SEED)
        tm = BertModel(BertConfig(**CONFIG), add_pooling_layer=True).eval()
        # HF initialises every LayerNorm to (1, 0) and every bias to 0: a weight loaded into the
        # wrong one of two such tensors would go unseen
        g = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for name, p in tm.named_parameters():
                if "LayerNorm" in name or name.endswith("bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        paddle.seed(SEED)
        pm = PaddleBert(PaddleBertConfig(**CONFIG))
        pm.eval()
    return tm, pm


def _loaded() -> tuple[Any, Any]:
    from reprod.align import load_into_paddle

    tm, pm = _build()
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def _feed() -> dict[str, np.ndarray]:
    """Two rows of 16 tokens, the second padded with id 0 in its last 4 positions (masked out);
    the second half of each row is segment 1."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1, CONFIG["vocab_size"], (BATCH, LENGTH)).astype(np.int64)
    token_types = np.zeros((BATCH, LENGTH), np.int64)
    token_types[:, LENGTH // 2:] = 1
    mask = np.ones((BATCH, LENGTH), np.int64)
    mask[1, -PADDED:] = 0
    ids[1, -PADDED:] = PAD_ID
    return {"input_ids": ids, "token_type_ids": token_types, "attention_mask": mask}


@pytest.fixture(scope="module")
def bert() -> tuple[Any, Any]:
    """One pair loaded by ``load_into_paddle(by_order=True)``, shared by the tests that leave it
    as it is."""
    return _loaded()


def _torch_np(tm: Any, key: str) -> np.ndarray:
    return tm.state_dict()[key].detach().cpu().numpy()


def _paddle_np(pm: Any, key: str) -> np.ndarray:
    return pm.state_dict()[key].numpy()


def _block_keys(layer: int) -> list[str]:
    """HF's keys of one encoder block in its definition order."""
    names = ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
             "output.dense", "output.LayerNorm"]
    return [f"encoder.layer.{layer}.{n}.{p}" for n in names for p in ("weight", "bias")]


def test_pairing_by_order_pairs_every_tensor_across_the_two_block_orders() -> None:
    from reprod.align import pair_weights_by_order
    from reprod.align.by_order import _order_plan

    tm, pm = _build()
    pairs = pair_weights_by_order(tm, pm)
    assert len(pairs) == 39
    assert sorted(pairs) == sorted(tm.state_dict())
    assert sorted(pairs.values()) == sorted(pm.state_dict())
    assert pairs["encoder.layer.0.attention.self.query.weight"] == \
        "encoder.layers.0.self_attn.q_proj.weight"
    assert pairs["encoder.layer.0.attention.output.LayerNorm.weight"] == \
        "encoder.layers.0.norm1.weight"
    assert pairs["encoder.layer.0.intermediate.dense.weight"] == "encoder.layers.0.linear1.weight"
    assert pairs["encoder.layer.0.output.dense.bias"] == "encoder.layers.0.linear2.bias"
    assert pairs["encoder.layer.1.output.LayerNorm.bias"] == "encoder.layers.1.norm2.bias"

    moved = _order_plan(tm, pm, None).moved
    assert moved
    assert "encoder.layer.0.attention.output.LayerNorm.weight" in moved
    assert "encoder.layer.0.attention.self.query.weight" not in moved  # same position both sides
    # positions 5-7 of each block part (LayerNorm, Linear, Linear against Linear, Linear,
    # LayerNorm); the attention projections before them and the last LayerNorm stay put
    assert moved == {k for layer in (0, 1) for k in _block_keys(layer)[8:14]}


def test_loading_by_order_puts_each_weight_where_it_belongs(bert: tuple[Any, Any]) -> None:
    tm, pm = bert
    # a torch Linear holds [out, in], Paddle's [in, out]
    np.testing.assert_array_equal(_paddle_np(pm, "encoder.layers.0.linear1.weight"),
                                  _torch_np(tm, "encoder.layer.0.intermediate.dense.weight").T)
    np.testing.assert_array_equal(_paddle_np(pm, "encoder.layers.0.norm1.weight"),
                                  _torch_np(tm, "encoder.layer.0.attention.output.LayerNorm.weight"))
    np.testing.assert_array_equal(_paddle_np(pm, "encoder.layers.1.norm2.bias"),
                                  _torch_np(tm, "encoder.layer.1.output.LayerNorm.bias"))


def test_the_loaded_port_computes_hf_s_numbers(bert: tuple[Any, Any]) -> None:
    """Outside reprod: both models run by hand on the same inputs."""
    import paddle
    import torch

    tm, pm = bert
    feed = _feed()
    with torch.no_grad():
        t_out = tm(**{k: torch.from_numpy(v) for k, v in feed.items()})
    with paddle.no_grad():
        p_out = pm(**{k: paddle.to_tensor(v) for k, v in feed.items()})
    np.testing.assert_allclose(p_out[0].numpy(), t_out.last_hidden_state.numpy(), rtol=0,
                               atol=1e-5)
    np.testing.assert_allclose(p_out[1].numpy(), t_out.pooler_output.numpy(), rtol=0, atol=1e-5)


def test_align_forward_pairs_the_outputs_and_fails_only_on_the_padding_row(
        bert: tuple[Any, Any]) -> None:
    from reprod.align import align_forward

    tm, pm = bert
    r = align_forward(tm, pm, _feed(), by_order=True)
    # PaddleNLP returns a tuple, HF a BaseModelOutputWithPoolingAndCrossAttentions
    assert r.options["outputs_paired"] == {"logits/0": "logits/last_hidden_state",
                                           "logits/1": "logits/pooler_output"}
    assert r["logits/last_hidden_state"].passed
    assert r["logits/pooler_output"].passed
    assert {k.key for k in r.failed} == {PADDING_KEY}, r.to_table(failed_only=True)
    # PaddleNLP keeps an activation dropout of p 0 and applies attention dropout as a function,
    # HF has a dropout layer for each: paired in call order, they agree
    assert not [k for k in r.keys() if "dropout" in k]


def test_the_padding_row_trains_in_paddle_only(bert: tuple[Any, Any]) -> None:
    """What the padding_idx key claims, by one backward pass through each whole model (a sum
    loss) on the padded input: torch's row 0 gets no gradient, Paddle's does."""
    import paddle
    import torch

    tm, pm = bert
    feed = _feed()
    assert (feed["input_ids"] == PAD_ID).sum() == PADDED
    try:
        tm(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.sum().backward()
        pm(**{k: paddle.to_tensor(v) for k, v in feed.items()})[0].sum().backward()
        t_grad = tm.embeddings.word_embeddings.weight.grad.numpy()
        p_grad = pm.embeddings.word_embeddings.weight.grad.numpy()
    finally:  # the shared pair is left without gradients
        tm.zero_grad(set_to_none=True)
        pm.clear_gradients()
    assert np.all(t_grad[PAD_ID] == 0)
    assert np.abs(p_grad[PAD_ID]).max() > 0
    # the rows of tokens the input holds get gradients on both sides
    token = int(feed["input_ids"][0, 0])
    assert np.abs(t_grad[token]).max() > 0 and np.abs(p_grad[token]).max() > 0


def test_waiving_the_padding_idx_passes_the_correct_port(bert: tuple[Any, Any]) -> None:
    from reprod.align import align_forward

    tm, pm = bert
    r = align_forward(tm, pm, _feed(), by_order=True, check_settings=["*/padding_idx"])
    assert r.passed, r.to_table(failed_only=True)


def test_settings_compared_without_a_trace_find_the_padding_row_only(
        bert: tuple[Any, Any], tmp_path: Any) -> None:
    """Without a trace, dropouts pair by definition order: PaddleNLP's attention rate counted as
    a dropout after its attention, its p-0 activation dropouts left out (they had paired with
    HF's attention dropouts: "p 0.1 in torch, 0 in Paddle"), from the models and from files."""
    from reprod.align import compare_settings, save_settings

    tm, pm = bert
    lines = [d.line().split(":")[0] for d in compare_settings(tm, pm, by_order=True).differ]
    assert lines == ["embeddings.word_embeddings"]
    saved = compare_settings(save_settings(tm, tmp_path / "t.json"),
                             save_settings(pm, tmp_path / "p.json"))
    assert [d.setting for d in saved.differ] == ["padding_idx"], str(saved)


def test_a_scaled_query_weight_is_named_at_hf_s_query_layer() -> None:
    """Before judging broadcast-equal captures by value, the localisation blamed
    embeddings.position_embeddings: HF embeds position ids of shape [1, L], PaddleNLP [B, L]."""
    from reprod.align import align_forward

    tm, pm = _loaded()
    w = pm.encoder.layers[1].self_attn.q_proj.weight
    w.set_value(w * 1.05)
    r = align_forward(tm, pm, _feed(), by_order=True, check_settings=["*/padding_idx"])
    assert not r.passed
    divergence = r.options["divergence"]
    assert divergence["layer"] == "encoder.layer.1.attention.self.query", divergence
    assert "input aligned" in divergence["message"], divergence


def test_a_layernorm_epsilon_is_named_as_its_setting() -> None:
    from reprod.align import align_forward

    tm, pm = _loaded()
    pm.encoder.layers[0].norm2._epsilon = 1e-5  # HF's layer_norm_eps is 1e-12
    r = align_forward(tm, pm, _feed(), by_order=True, check_settings=["*/padding_idx"])
    # its outputs move by less than the threshold (max 2.9e-6 measured): the setting alone fails
    assert {k.key for k in r.failed} == {"settings/encoder.layers.0.norm2/epsilon"}, \
        r.to_table(failed_only=True)


def test_adamw_training_steps_align_with_the_outputs_paired_at_every_step() -> None:
    """Three AdamW steps of a sentence classification on the pooled output: the losses,
    gradients and updated weights of all 39 tensors agree, each step's outputs pair under HF's
    names, and the padding row is again the one difference (waived here)."""
    import paddle
    import torch

    from reprod.align import align_train

    tm, pm = _loaded()
    labels = np.array([0, 1], np.int64)

    def torch_loss(out: Any, y: Any) -> Any:
        return torch.nn.functional.cross_entropy(out.pooler_output[:, :2], y)

    def paddle_loss(out: Any, y: Any) -> Any:
        return paddle.nn.functional.cross_entropy(out[1][:, :2], y)

    r = align_train(
        tm, pm, [(_feed(), labels)], steps=3, by_order=True,
        torch_loss_fn=torch_loss, paddle_loss_fn=paddle_loss,
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-3, weight_decay=0.01),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-3, parameters=pm.parameters(),
                                                weight_decay=0.01),
        check_settings=["*/padding_idx"])
    assert r.passed, r.to_table(failed_only=True)
    keys = set(r.keys())
    assert {f"step{s}/logits/{name}" for s in range(3)
            for name in ("last_hidden_state", "pooler_output")} <= keys
    assert len([k for k in keys if k.startswith("step2/param/")]) == 39


def test_training_in_train_mode_with_dropout_off() -> None:
    """Both models in train mode, as fine-tuning runs them: HF's attention drops its weights in
    ``scaled_dot_product_attention`` and Paddle's in ``F.dropout``, neither a ``Dropout`` layer;
    ``dropout="off"`` switches both off with the Dropout layers, the steps align, and every
    layer is in train mode again after."""
    import paddle
    import torch

    from reprod.align import align_train

    tm, pm = _loaded()
    tm.train()
    pm.train()
    labels = np.array([1, 0], np.int64)
    r = align_train(
        tm, pm, [(_feed(), labels)], steps=2, by_order=True, dropout="off",
        torch_loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out.pooler_output[:, :2], y),
        paddle_loss_fn=lambda out, y: paddle.nn.functional.cross_entropy(out[1][:, :2], y),
        torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.1),
        paddle_optimizer=paddle.optimizer.SGD(learning_rate=0.1, parameters=pm.parameters()),
        check_settings=["*/padding_idx"])
    assert r.passed, r.to_table(failed_only=True)
    assert all(m.training for m in tm.modules()) and all(m.training for m in pm.sublayers())


def test_the_checkpoint_files_pair_as_the_models_do(tmp_path: Any) -> None:
    """The two-script workflow starts from files: HF's state dict saved by torch against
    PaddleNLP's saved by paddle. No layer's class is in them; the kinds read from the tensors
    pair all 39 as the models do."""
    import paddle
    import torch

    from reprod.align import pair_weights_by_order

    tm, pm = _build()
    torch.save(tm.state_dict(), tmp_path / "pytorch_model.bin")
    paddle.save(pm.state_dict(), str(tmp_path / "model_state.pdparams"))
    pairs = pair_weights_by_order(tmp_path / "pytorch_model.bin", tmp_path / "model_state.pdparams")
    assert pairs == pair_weights_by_order(tm, pm) and len(pairs) == 39
