"""The fourth batch of Hugging Face (torch, the references) against PaddleNLP 2.8.1 ports, built
small and seeded for ``test_fourth_batch_real.py``: LUKE, BigBird, MegatronBERT, RemBERT, Funnel,
ConvBERT, XLM, CTRL, ErnieM, LayoutLM, BlenderbotSmall and mT5, as the surveys of session 33
built them (2 layers, hidden 64, every norm weight and bias perturbed on the torch side, the
query and key weights sharpened where HF's initialisation leaves attention near uniform).

PaddleNLP 2.8.1's MegatronBERT and RemBERT do not compute HF's function as shipped, for reasons
that are not reprod's; the builders patch the port's instances (same values, the maths the port
meant), never the library's classes:

- MegatronBERT and RemBERT unsqueeze a 2-D 0/1 ``attention_mask`` and add it to the scores as it
  is (1 on kept tokens, 0 on padded ones: nothing masked), where their own default (no mask) is
  additive, -1e4 on the pad ids: the model's forward turns a 2-D mask into that additive form.
- RemBERT's ``RemBertAttention.forward`` hands its self-attention's (context, probs) tuple to the
  output block's Linear, which cannot run: the attention's forward hands it the context.

Funnel's PaddleNLP model reads ``encoder_outputs.last_hidden_state``: it runs only with
``return_dict=True``, set in the port's config.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable

import numpy as np
from third_batch_models import SEED, ids, perturb, sharpen


def _bert_norms(name: str) -> bool:
    return "LayerNorm" in name or "layer_norm" in name or "layernorm" in name


def _pair(hf_model: Any, hf_config: Any, pd_model: Any, pd_config: Any, cfg: dict, *,
          hf_extra: Any = None, pd_extra: Any = None, norms: Callable[[str], bool] = _bert_norms,
          sharp: Any = None, patch: Any = None, rules: Any = None) -> tuple[Any, Any]:
    """The pair seeded, the torch side's norms perturbed (and ``sharp`` weights x10), the port
    ``patch``-ed and loaded by order under ``rules``."""
    import paddle
    import torch

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = hf_model(hf_config(**cfg, **(hf_extra or {}))).eval()
    perturb(tm, norms)
    if sharp:
        sharpen(tm, sharp)
    pm = pd_model(pd_config(**{**cfg, **(pd_extra or {})}))
    pm.eval()
    if patch is not None:
        patch(pm)
    load_into_paddle(pm, tm, by_order=True, rules=rules)
    return tm, pm


def padded(pad: int, vocab: int = 1000, segments: bool = True) -> dict[str, np.ndarray]:
    """Two rows of 16 tokens, the second padded (``pad``, masked out) in its last 4; token types
    0 then 1 where ``segments``."""
    x = ids(length=16, vocab=vocab)
    mask = np.ones_like(x)
    mask[1, -4:] = 0
    x[1, -4:] = pad
    feed = {"input_ids": x, "attention_mask": mask}
    if segments:
        types_ = np.zeros_like(x)
        types_[:, 8:] = 1
        feed["token_type_ids"] = types_
    return feed


# --- LUKE --------------------------------------------------------------------------------------

_LUKE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=64, type_vocab_size=1,
             entity_vocab_size=50, entity_emb_size=32, pad_token_id=1, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0, hidden_act="gelu")


def luke() -> tuple[Any, Any]:
    """Entity-aware attention on both sides. PaddleNLP's LUKE lists its encoder before its
    embeddings and names its LayerNorms ``layer_norm`` (HF ``LayerNorm``), their epsilon a module
    constant, 1e-6 (HF's ``layer_norm_eps`` set to it): loaded by order."""
    from paddlenlp.transformers import LukeConfig as PC
    from paddlenlp.transformers import LukeModel as PM
    from transformers import LukeConfig, LukeModel

    return _pair(LukeModel, LukeConfig, PM, PC, _LUKE, sharp=("query.weight", "key.weight"),
                 hf_extra=dict(layer_norm_eps=1e-6, use_entity_aware_attention=True))


def luke_feed() -> dict[str, np.ndarray]:
    """:func:`padded` (pad 1, no token types) and three entities a row, the last masked in the
    second row."""
    feed = padded(1, segments=False)
    feed["entity_ids"] = np.array([[3, 7, 9], [4, 5, 0]], np.int64)
    pos = np.full((2, 3, 4), -1, np.int64)
    pos[:, 0, :2] = [1, 2]
    pos[:, 1, :3] = [4, 5, 6]
    pos[:, 2, :1] = [8]
    feed["entity_position_ids"] = pos
    feed["entity_attention_mask"] = np.array([[1, 1, 1], [1, 1, 0]], np.int64)
    return feed


# --- BigBird -----------------------------------------------------------------------------------

_BIGBIRD = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
                pad_token_id=0, layer_norm_eps=1e-12)


def bigbird() -> tuple[Any, Any]:
    """Full attention on both sides (HF's ``original_full``, PaddleNLP's ``default_attention``).
    PaddleNLP's queries, keys and values are ``Linear3D`` layers whose outputs come split into
    heads, [B, H, L, D], where HF's Linears give [B, L, E]."""
    from paddlenlp.transformers import BigBirdConfig as PC
    from paddlenlp.transformers import BigBirdModel as PM
    from transformers import BigBirdConfig, BigBirdModel

    return _pair(BigBirdModel, BigBirdConfig, PM, PC, _BIGBIRD,
                 sharp=("query.weight", "key.weight"), norms=lambda n: "LayerNorm" in n,
                 hf_extra=dict(hidden_act="gelu", attention_type="original_full",
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                 pd_extra=dict(attention_type="default_attention", activation="gelu",
                               dropout=0.0, attn_dropout=0.0, act_dropout=0.0,
                               hidden_dropout_prob=0.0, padding_idx=0))


def bigbird_feed() -> dict[str, np.ndarray]:
    """Two rows of 16 tokens, no padding and no mask: PaddleNLP's default attention takes none
    in HF's form."""
    return {"input_ids": ids(length=16, vocab=1000)}


# --- MegatronBERT, RemBERT ---------------------------------------------------------------------


def _additive_mask(pm: Any) -> None:
    """The model's forward with a 2-D 0/1 ``attention_mask`` made additive (0 kept, -1e4 padded)
    before PaddleNLP's, which adds it to the scores as it is."""
    forward = type(pm).forward

    def fixed(self: Any, input_ids: Any = None, token_type_ids: Any = None,
              position_ids: Any = None, attention_mask: Any = None) -> Any:
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = (1.0 - attention_mask.unsqueeze(axis=[1, 2]).astype("float32")) * -1e4
        return forward(self, input_ids=input_ids, token_type_ids=token_type_ids,
                       position_ids=position_ids, attention_mask=attention_mask)

    pm.forward = types.MethodType(fixed, pm)


_MEGATRON = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, hidden_act="gelu", hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, max_position_embeddings=64, type_vocab_size=2,
                 initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                 position_embedding_type="absolute")


def megatron() -> tuple[Any, Any]:
    """Pre-norm BERT; both attentions' ``self`` return the context, PaddleNLP's with the
    attention probabilities too."""
    import paddlenlp.transformers as pt
    import transformers as hf

    return _pair(hf.MegatronBertModel, hf.MegatronBertConfig, pt.MegatronBertModel,
                 pt.MegatronBertConfig, _MEGATRON, norms=lambda n: _bert_norms(n) or ".ln." in n,
                 sharp=("query.weight", "key.weight"), patch=_additive_mask,
                 hf_extra=dict(attn_implementation="eager"))


_REMBERT = dict(vocab_size=1000, input_embedding_size=32, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, hidden_act="gelu",
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                max_position_embeddings=64, type_vocab_size=2, initializer_range=0.02,
                pad_token_id=0, layer_norm_eps=1e-12)


def _rembert_attention_forward(self: Any, hidden_states: Any, attention_mask: Any = None) -> Any:
    """PaddleNLP 2.8.1's ``RemBertAttention.forward``, the self-attention's context (its first
    output) handed to the output block, not the (context, probs) tuple."""
    self_outputs = self.self(hidden_states, attention_mask)
    return self.output(self_outputs[0], hidden_states)


def _rembert_patch(pm: Any) -> None:
    for layer in pm.encoder.layer:
        layer.attention.forward = types.MethodType(_rembert_attention_forward, layer.attention)
    _additive_mask(pm)


def rembert() -> tuple[Any, Any]:
    import paddlenlp.transformers as pt
    import transformers as hf

    return _pair(hf.RemBertModel, hf.RemBertConfig, pt.RemBertModel, pt.RemBertConfig, _REMBERT,
                 sharp=("query.weight", "key.weight"), patch=_rembert_patch,
                 hf_extra=dict(output_embedding_size=32))


# --- Funnel ------------------------------------------------------------------------------------

_FUNNEL = dict(vocab_size=1000, block_sizes=[1, 1], num_decoder_layers=1, d_model=64, n_head=4,
               d_head=16, d_inner=128, hidden_act="gelu_new", hidden_dropout=0.0,
               attention_dropout=0.0, activation_dropout=0.0, type_vocab_size=3,
               initializer_range=0.1, layer_norm_eps=1e-9, pooling_type="mean",
               attention_type="relative_shift", separate_cls=True, truncate_seq=True,
               pool_q_only=True, pad_token_id=0)


def funnel() -> tuple[Any, Any]:
    """Two blocks of one layer, pooled between them (``avg_pool2d``, no padding), one decoder
    layer."""
    import paddlenlp.transformers as pt
    import transformers as hf

    return _pair(hf.FunnelModel, hf.FunnelConfig, pt.FunnelModel, pt.FunnelConfig, _FUNNEL,
                 pd_extra=dict(return_dict=True))


# --- XLM, CTRL, ErnieM, LayoutLM ---------------------------------------------------------------

_XLM = dict(vocab_size=1000, emb_dim=64, n_layers=2, n_heads=4, dropout=0.0, attention_dropout=0.0,
            max_position_embeddings=64, n_langs=1, use_lang_emb=False, layer_norm_eps=1e-12,
            pad_index=2, pad_token_id=2, causal=False, sinusoidal_embeddings=False)


def xlm() -> tuple[Any, Any]:
    from paddlenlp.transformers import XLMConfig as PC
    from paddlenlp.transformers import XLMModel as PM
    from transformers import XLMConfig, XLMModel

    return _pair(XLMModel, XLMConfig, PM, PC, _XLM, norms=lambda n: "layer_norm" in n,
                 sharp=("q_lin.weight", "k_lin.weight"), pd_extra=dict(hidden_act="gelu"),
                 hf_extra=dict(gelu_activation=True, attn_implementation="eager"))


_CTRL = dict(vocab_size=1000, n_positions=64, n_embd=64, dff=128, n_layer=2, n_head=4,
             resid_pdrop=0.0, embd_pdrop=0.0, layer_norm_epsilon=1e-6, use_cache=False)


def ctrl_rules() -> Any:
    """PaddleNLP's CTRL holds its sinusoidal table as a parameter (``pos_encoding``), HF
    computes it: the port's own, as reprod's refusal suggests."""
    from reprod.align import ConversionRules

    return ConversionRules(port_only=[r"^pos_encoding\."])


def ctrl() -> tuple[Any, Any]:
    from paddlenlp.transformers import CTRLConfig as PC
    from paddlenlp.transformers import CTRLModel as PM
    from transformers import CTRLConfig, CTRLModel

    return _pair(CTRLModel, CTRLConfig, PM, PC, _CTRL, norms=lambda n: "layernorm" in n,
                 sharp=("Wq.weight", "Wk.weight"), rules=ctrl_rules())


_ERNIE_M = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, max_position_embeddings=64, pad_token_id=1,
                hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def ernie_m() -> tuple[Any, Any]:
    """PaddleNLP's ErnieM ignores ``intermediate_size`` (4 x hidden, 256 here) and keeps
    LayerNorm's default epsilon (1e-5, HF's set to it)."""
    from paddlenlp.transformers import ErnieMConfig as PC
    from paddlenlp.transformers import ErnieMModel as PM
    from transformers import ErnieMConfig, ErnieMModel

    return _pair(ErnieMModel, ErnieMConfig, PM, PC, _ERNIE_M, norms=lambda n: "norm" in n,
                 sharp=("q_proj.weight", "k_proj.weight"), hf_extra=dict(layer_norm_eps=1e-5))


_LAYOUTLM = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, hidden_act="gelu", hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, max_position_embeddings=64,
                 max_2d_position_embeddings=1024, type_vocab_size=2, initializer_range=0.02,
                 layer_norm_eps=1e-12, pad_token_id=0)


def layoutlm() -> tuple[Any, Any]:
    from paddlenlp.transformers import LayoutLMConfig as PC
    from paddlenlp.transformers import LayoutLMModel as PM
    from transformers import LayoutLMConfig, LayoutLMModel

    return _pair(LayoutLMModel, LayoutLMConfig, PM, PC, _LAYOUTLM,
                 sharp=("query.weight", "key.weight"), hf_extra=dict(attn_implementation="eager"))


def layoutlm_feed() -> dict[str, np.ndarray]:
    """:func:`padded` (pad 0) and a box [x0, y0, x1, y1] a token, within 1000."""
    feed = padded(0)
    rng = np.random.default_rng(SEED + 1)
    x0, y0 = rng.integers(0, 500, (2, 2, 16, 1))
    w, h = rng.integers(1, 400, (2, 2, 16, 1))
    feed["bbox"] = np.concatenate([x0, y0, np.minimum(x0 + w, 1000), np.minimum(y0 + h, 1000)],
                                  -1).astype(np.int64)
    return feed


# --- BlenderbotSmall, mT5 ----------------------------------------------------------------------

_BLENDERBOT_SMALL = dict(vocab_size=1000, d_model=64, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         max_position_embeddings=64, activation_function="gelu", dropout=0.0,
                         attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                         scale_embedding=True)


def blenderbot_small() -> tuple[Any, Any]:
    """PaddleNLP reads ``attention_mask`` as 1 = masked, HF as 1 = attended: fed none (and no
    pad ids), both attend to everything. The port returns the decoder's output alone."""
    from paddlenlp.transformers import BlenderbotSmallConfig as PC
    from paddlenlp.transformers import BlenderbotSmallModel as PM
    from transformers import BlenderbotSmallConfig, BlenderbotSmallModel

    return _pair(BlenderbotSmallModel, BlenderbotSmallConfig, PM, PC, _BLENDERBOT_SMALL,
                 norms=lambda n: "layer_norm" in n or "layernorm" in n,
                 sharp=("q_proj.weight", "k_proj.weight"),
                 hf_extra=dict(encoder_layers=2, decoder_layers=2, use_cache=False,
                               attn_implementation="eager"),
                 pd_extra=dict(num_encoder_layers=2, num_decoder_layers=2,
                               normalize_before=False))


_MT5 = dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
            dropout_rate=0.0, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=False,
            tie_word_embeddings=False)


def mt5() -> tuple[Any, Any]:
    from paddlenlp.transformers import MT5Config as PC
    from paddlenlp.transformers import MT5Model as PM
    from transformers import MT5Config, MT5Model

    return _pair(MT5Model, MT5Config, PM, PC, _MT5, norms=lambda n: "layer_norm" in n,
                 hf_extra=dict(attn_implementation="eager"))


def seq2seq_feed(start: int, mask: bool) -> dict[str, np.ndarray]:
    """16 source tokens a row (the second's last 4 padded with 0 and masked, where ``mask``),
    8 target tokens, the first ``start``."""
    feed = padded(0, segments=False) if mask else {"input_ids": ids(length=16, vocab=1000)}
    target = np.random.default_rng(SEED + 2).integers(3, 1000, (2, 8)).astype(np.int64)
    target[:, 0] = start
    feed["decoder_input_ids"] = target
    return feed


_CONVBERT = dict(vocab_size=1000, hidden_size=64, embedding_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                 type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 layer_norm_eps=1e-12, pad_token_id=0, initializer_range=0.2, hidden_act="gelu",
                 head_ratio=2, conv_kernel_size=3, num_groups=1)


def convbert() -> tuple[Any, Any]:
    """Not loaded: HF defines each attention's output Linear after its convolutions, PaddleNLP's
    ``out_proj`` before them, and loading by order is refused (the test reads why)."""
    import paddle
    import paddlenlp.transformers as pt
    import torch
    import transformers as hf

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = hf.ConvBertModel(hf.ConvBertConfig(**_CONVBERT)).eval()
    perturb(tm, _bert_norms)
    sharpen(tm, ("query.weight", "key.weight"))
    pm = pt.ConvBertModel(pt.ConvBertConfig(**_CONVBERT))
    pm.eval()
    return tm, pm


BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = dict(luke=luke, bigbird=bigbird,
    megatron=megatron, rembert=rembert, funnel=funnel, xlm=xlm, ctrl=ctrl, ernie_m=ernie_m,
    layoutlm=layoutlm, blenderbot_small=blenderbot_small, mt5=mt5, convbert=convbert)


def built(name: str, **kw: Any) -> tuple[Any, Any]:
    """A fresh pair, warnings (PaddleNLP's, transformers') silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[name](**kw)
