"""The third batch of Hugging Face (torch, the references) against PaddleNLP 2.8.1 ports, built
small and seeded for ``test_third_batch_real.py``: GPT-J, CodeGen, Mixtral, MBart, Pegasus,
DeBERTa-v2, SqueezeBERT and MPNet, as the porters built them (2 layers, hidden 64, every norm
weight and bias perturbed on the torch side).

PaddleNLP 2.8.1 does not run on paddle 3.x as shipped, for reasons that are not reprod's; the
builders patch the port's instances (same values, same maths), never the library's classes:

- GPT-J and CodeGen keep their causal mask as float32 and hand it to ``paddle.where``, which
  now wants a bool: the mask is recast to bool.
- Mixtral's ``MixtralSparseMoeBlock.forward`` indexes ``routing_weights[top_x, idx]``, [N] under
  paddle 3 where [N, 1] is needed: each MoE block gets the same forward with that reshape.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import numpy as np

SEED = 0


def perturb(tm: Any, norms: Callable[[str], bool]) -> None:
    """Seeded noise on every norm weight (``norms``) and every bias: HF initialises them to 1/0."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if norms(name) or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def sharpen(tm: Any, ends: tuple[str, ...]) -> None:
    """Query and key weights x10: HF's initialisation leaves attention near uniform."""
    import torch

    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith(ends):
                p.mul_(10)


def ids(batch: int = 2, length: int = 10, vocab: int = 200, low: int = 3) -> np.ndarray:
    return np.random.default_rng(SEED).integers(low, vocab, (batch, length)).astype(np.int64)


# --- GPT-J, CodeGen ----------------------------------------------------------------------------

_GPTJ = dict(vocab_size=200, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
             n_inner=None, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


def _ln(name: str) -> bool:
    return name.startswith("ln_f") or ".ln_" in name


def gptj(load: Optional[bool] = True) -> tuple[Any, Any]:
    """``load``: True by order, False by name, None not loaded."""
    import paddle
    import torch
    from paddlenlp.transformers import GPTJConfig as PC
    from paddlenlp.transformers import GPTJModel as PM
    from transformers import GPTJConfig, GPTJModel

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    tm = GPTJModel(GPTJConfig(**_GPTJ, attn_implementation="eager")).eval()
    tm.config.use_cache = False
    perturb(tm, _ln)
    paddle.seed(SEED)
    pm = PM(PC(**_GPTJ))
    pm.eval()
    for block in pm.h:  # the float32 causal mask paddle.where refuses: a bool, same values
        block.attn.register_buffer("bias", block.attn.bias.astype("bool"))
    if load is not None:
        load_into_paddle(pm, tm, by_order=load)
    return tm, pm


def codegen() -> tuple[Any, Any]:
    import paddle
    import torch
    from paddlenlp.transformers import CodeGenConfig as PC
    from paddlenlp.transformers import CodeGenModel as PM
    from transformers import CodeGenConfig, CodeGenModel

    from reprod.align import load_into_paddle

    cfg = dict(_GPTJ, n_ctx=64)
    torch.manual_seed(SEED)
    tm = CodeGenModel(CodeGenConfig(**cfg)).eval()
    tm.config.use_cache = False
    perturb(tm, _ln)
    paddle.seed(SEED)
    pm = PM(PC(**cfg))
    pm.eval()
    for block in pm.h:
        block.attn.causal_mask = block.attn.causal_mask.astype("bool")
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


# --- Mixtral -----------------------------------------------------------------------------------

_MIXTRAL = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2,
                hidden_act="silu", attention_dropout=0.0, sliding_window=None, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def _moe_forward(self: Any, hidden_states: Any) -> Any:
    """PaddleNLP 2.8.1's MixtralSparseMoeBlock.forward, the routing weight reshaped to [N, 1]."""
    import paddle
    import paddle.nn.functional as F

    batch_size, seq_len, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.reshape([-1, hidden_dim])
    router_logits = self.gate(hidden_states)
    with paddle.amp.auto_cast(False):
        routing_weights = F.softmax(router_logits.astype("float32"), axis=1)
    routing_weights, selected_experts = paddle.topk(routing_weights, self.top_k, axis=-1)
    routing_weights /= routing_weights.sum(axis=-1, keepdim=True)
    routing_weights = routing_weights.astype(hidden_states.dtype)
    final = paddle.zeros([batch_size * seq_len, hidden_dim], dtype=hidden_states.dtype)
    expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).transpose([2, 1, 0])
    for expert_id in range(self.num_experts):
        idx, top_x = paddle.where(expert_mask[expert_id])
        top_x = top_x.reshape([-1])
        idx = idx.reshape([-1])
        if top_x.shape[0] == 0:
            continue
        state = paddle.gather(hidden_states, top_x)
        out = self.experts[expert_id](state) * routing_weights[top_x, idx].reshape([-1, 1])
        final.index_add_(top_x, 0, out.astype(hidden_states.dtype))
    return final.reshape([batch_size, seq_len, hidden_dim]), router_logits


def mixtral(tie: bool = False) -> tuple[Any, Any]:
    """``tie``: block 0's router row 3 is row 1 x (1 + 1e-7) on both sides (a faithful port
    whose routing sits on a near-tie: the float64 twin picks other experts on a few tokens)."""
    import types

    import paddle
    import torch
    from paddlenlp.transformers import MixtralConfig as PC
    from paddlenlp.transformers import MixtralModel as PM
    from transformers import MixtralConfig, MixtralModel

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    tm = MixtralModel(MixtralConfig(**_MIXTRAL, attn_implementation="eager")).eval()
    tm.config.use_cache = False
    perturb(tm, lambda n: "norm" in n)
    paddle.seed(SEED)
    pm = PM(PC(**_MIXTRAL))
    pm.eval()
    for layer in pm.layers:
        moe = layer.block_sparse_moe
        moe.forward = types.MethodType(_moe_forward, moe)
    if tie:
        with torch.no_grad():
            g = tm.layers[0].block_sparse_moe.gate.weight  # [E, H]
            g[3] = g[1] * (1 + 1e-7)
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


# --- MBart, Pegasus ----------------------------------------------------------------------------

_SEQ2SEQ = dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                decoder_ffn_dim=128, max_position_embeddings=64, activation_function="gelu",
                use_cache=False, scale_embedding=True, dropout=0.1, attention_dropout=0.0,
                activation_dropout=0.0)
_MBART = dict(_SEQ2SEQ, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
_PEGASUS = dict(_SEQ2SEQ, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                forced_eos_token_id=1)


def _seq2seq(hf: Any, hf_config: Any, pd: Any, pd_config: Any, cfg: dict) -> tuple[Any, Any]:
    import paddle
    import torch

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = hf(hf_config(**cfg, attn_implementation="eager")).eval()
    pm = pd(pd_config(**cfg))
    pm.eval()
    perturb(tm, lambda n: "layer_norm" in n or "layernorm" in n)
    sharpen(tm, ("q_proj.weight", "k_proj.weight"))
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def mbart() -> tuple[Any, Any]:
    from paddlenlp.transformers import MBartConfig as PC
    from paddlenlp.transformers import MBartModel as PM
    from transformers import MBartConfig, MBartModel

    return _seq2seq(MBartModel, MBartConfig, PM, PC, _MBART)


def pegasus() -> tuple[Any, Any]:
    from paddlenlp.transformers import PegasusConfig as PC
    from paddlenlp.transformers import PegasusModel as PM
    from transformers import PegasusConfig, PegasusModel

    return _seq2seq(PegasusModel, PegasusConfig, PM, PC, _PEGASUS)


def seq2seq_feed(pad: int, start: int) -> dict[str, np.ndarray]:
    """Two rows of 12 source tokens, the second padded (``pad``) in its last 3; 8 target
    tokens, the first ``start``."""
    rng = np.random.default_rng(SEED)
    src = rng.integers(3, 1000, (2, 12)).astype(np.int64)
    mask = np.ones((2, 12), np.int64)
    mask[1, -3:] = 0
    src[1, -3:] = pad
    tgt = rng.integers(3, 1000, (2, 8)).astype(np.int64)
    tgt[:, 0] = start
    return {"input_ids": src, "attention_mask": mask, "decoder_input_ids": tgt}


# --- DeBERTa-v2, SqueezeBERT, MPNet ------------------------------------------------------------

_DEBERTA = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, type_vocab_size=0,
                relative_attention=True, max_relative_positions=-1, position_buckets=8,
                pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                conv_kernel_size=3, conv_act="gelu", layer_norm_eps=1e-7,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                position_biased_input=False, pad_token_id=0, initializer_range=0.2)


def _bert_norms(name: str) -> bool:
    return "LayerNorm" in name or "layer_norm" in name or "layernorm" in name


def deberta() -> tuple[Any, Any]:
    """PaddleNLP's DebertaV2Config defaults to output_hidden_states=True: the port returns
    (sequence_output, hidden_states), HF last_hidden_state alone."""
    import paddle
    import torch
    from paddlenlp.transformers import DebertaV2Config as PC
    from paddlenlp.transformers import DebertaV2Model as PM
    from transformers import DebertaV2Config, DebertaV2Model

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = DebertaV2Model(DebertaV2Config(**_DEBERTA)).eval()
    perturb(tm, _bert_norms)
    pm = PM(PC(**_DEBERTA, share_attn_key=_DEBERTA["share_att_key"]))
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


_SQUEEZEBERT = dict(vocab_size=100, hidden_size=64, embedding_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                    type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    layer_norm_eps=1e-12, pad_token_id=0, initializer_range=0.2, q_groups=4,
                    k_groups=4, v_groups=4, post_attention_groups=1, intermediate_groups=4,
                    output_groups=4)


def squeezebert(load: bool = True, **port: Any) -> tuple[Any, Any]:
    """``port``: the port's config where it differs from the reference's."""
    import paddle
    import torch
    from paddlenlp.transformers import SqueezeBertConfig as PC
    from paddlenlp.transformers import SqueezeBertModel as PM
    from transformers import SqueezeBertConfig, SqueezeBertModel

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = SqueezeBertModel(SqueezeBertConfig(**_SQUEEZEBERT)).eval()
    perturb(tm, _bert_norms)
    pm = PM(PC(**{**_SQUEEZEBERT, **port}))
    pm.eval()
    if load:
        load_into_paddle(pm, tm, by_order=True)
    return tm, pm


_MPNET = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=64,
              relative_attention_num_buckets=32, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, layer_norm_eps=1e-5, pad_token_id=1,
              initializer_range=0.2)


def mpnet() -> tuple[Any, Any]:
    import paddle
    import torch
    from paddlenlp.transformers import MPNetConfig as PC
    from paddlenlp.transformers import MPNetModel as PM
    from transformers import MPNetConfig, MPNetModel

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = MPNetModel(MPNetConfig(**_MPNET)).eval()
    perturb(tm, _bert_norms)
    pm = PM(PC(**_MPNET))
    pm.eval()
    load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def mpnet_batches() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    rng = np.random.RandomState(SEED)
    out = []
    for _ in range(2):
        x = rng.randint(2, 100, size=(2, 10)).astype("int64")
        out.append(({"input_ids": x, "attention_mask": np.ones_like(x)},
                    rng.randn(2, 64).astype("float32")))
    return out


_CLIP_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
_CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_channels=3, image_size=32, patch_size=8,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip(load: bool = True) -> tuple[Any, Any]:
    """The whole CLIP: PaddleNLP creates its projection heads and ``logit_scale`` ([1]) as the
    model's own parameters, listed first; HF's heads are Linears listed last, its scale 0-d."""
    import paddle
    import torch
    from paddlenlp.transformers import CLIPConfig as PC
    from paddlenlp.transformers import CLIPModel as PM
    from transformers import CLIPConfig, CLIPModel

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = CLIPModel(CLIPConfig(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION,
                              projection_dim=32, attn_implementation="eager")).eval()
    perturb(tm, lambda n: "layer_norm" in n or "layrnorm" in n or "layernorm" in n)
    with torch.no_grad():
        tm.logit_scale.fill_(1.5)
    pm = PM(PC(text_config=_CLIP_TEXT, vision_config=_CLIP_VISION, projection_dim=32))
    pm.eval()
    if load:
        load_into_paddle(pm, tm, by_order=True)
    return tm, pm


def clip_feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    ids = rng.integers(3, 1000, (2, 10)).astype(np.int64)
    ids[0, 7] = ids[1, 9] = 999  # both pool at the largest id (HF and PaddleNLP with eos id 2)
    ids[0, 8:] = 1
    mask = np.ones((2, 10), np.int64)
    mask[0, 8:] = 0
    return {"input_ids": ids, "pixel_values": rng.standard_normal((2, 3, 32, 32)).astype(
        np.float32), "attention_mask": mask}


# --- RoFormer ----------------------------------------------------------------------------------

_ROFORMER = dict(vocab_size=1000, embedding_size=64, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                 type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 layer_norm_eps=1e-12, pad_token_id=0, initializer_range=0.2, hidden_act="gelu",
                 rotary_value=False)


def roformer(rules: Any = None) -> tuple[Any, Any]:
    """HF's ``RoFormerModel`` keeps its sinusoidal table as a layer (``encoder.embed_positions``)
    the port computes, and has no pooler, which PaddleNLP's has: loaded by order under
    ``rules`` where given, else not loaded."""
    import paddle
    import paddlenlp.transformers as pt
    import torch
    import transformers

    from reprod.align import load_into_paddle

    torch.manual_seed(SEED)
    paddle.seed(SEED)
    tm = transformers.RoFormerModel(transformers.RoFormerConfig(**_ROFORMER)).eval()
    perturb(tm, lambda n: "LayerNorm" in n)
    pm = pt.RoFormerModel(pt.RoFormerConfig(**_ROFORMER))
    pm.eval()
    if rules is not None:
        load_into_paddle(pm, tm, by_order=True, rules=rules)
    return tm, pm


BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = dict(clip=clip, roformer=roformer,
    gptj=gptj, codegen=codegen, mixtral=mixtral, mbart=mbart, pegasus=pegasus, deberta=deberta,
    squeezebert=squeezebert, mpnet=mpnet)


def built(name: str, **kw: Any) -> tuple[Any, Any]:
    """A fresh pair, warnings (PaddleNLP's, transformers') silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[name](**kw)
