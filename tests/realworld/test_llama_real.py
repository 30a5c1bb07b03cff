"""A decoder port nobody here wrote: Hugging Face's ``transformers.LlamaModel`` (torch, the
reference) against PaddleNLP's ``paddlenlp.transformers.LlamaModel``, on a small config (2 layers,
hidden 64, 4 heads) whose RMSNorm weights are perturbed so every tensor counts.

- Both name every tensor alike; the weights load by name, the Linear ones transposed.
- HF returns its hidden states and its key/value cache, PaddleNLP its hidden states (a tuple of
  one): the hidden states pair by position, the cache fails as missing and the first finding says
  how to turn it off, with no localisation; with the cache off the port passes against float32
  noise.
- An RMSNorm epsilon of 1e-2 for 1e-6 is localised at that layer and named as its setting
  (``LlamaRMSNorm.variance_epsilon`` on both sides).

transformers, paddlenlp, torch and paddle are imported inside the tests only (see
test_bert_real.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6)


def _loaded(use_cache: bool = False) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
        import torch
        from paddlenlp.transformers import LlamaConfig as PaddleLlamaConfig
        from paddlenlp.transformers import LlamaModel as PaddleLlama
        from transformers import LlamaConfig, LlamaModel

        from reprod.align import load_into_paddle

        torch.manual_seed(0)
        tm = LlamaModel(LlamaConfig(**CONFIG, attn_implementation="eager")).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # HF initialises every RMSNorm weight to 1
            for name, p in tm.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        tm.config.use_cache = use_cache
        paddle.seed(0)
        pm = PaddleLlama(PaddleLlamaConfig(**CONFIG))
        pm.eval()
        load_into_paddle(pm, tm)
    return tm, pm


def _ids() -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(0).integers(1, 1000, (2, 12)).astype(np.int64)}


def test_the_weights_load_by_name_with_the_linears_transposed() -> None:
    tm, pm = _loaded()
    t, p = tm.state_dict(), pm.state_dict()
    assert sorted(t) == sorted(p)
    np.testing.assert_array_equal(p["layers.0.mlp.gate_proj.weight"].numpy(),
                                  t["layers.0.mlp.gate_proj.weight"].numpy().T)
    np.testing.assert_array_equal(p["layers.1.input_layernorm.weight"].numpy(),
                                  t["layers.1.input_layernorm.weight"].numpy())


def test_with_the_cache_off_the_port_passes_against_float32_noise() -> None:
    from reprod.align import align_forward

    tm, pm = _loaded()
    r = align_forward(tm, pm, _ids(), calibrate=True)
    assert r.passed, r.to_table()
    assert r.options["outputs_paired"] == {"logits/0": "logits/last_hidden_state"}
    assert [k.key for k in r.results] == ["logits/last_hidden_state"]


def test_the_reference_s_cache_is_named_not_localised() -> None:
    from reprod.align import align_forward

    tm, pm = _loaded(use_cache=True)
    r = align_forward(tm, pm, _ids())
    status = {k.key: k.status for k in r.results}
    assert status.pop("logits/last_hidden_state") == "passed"
    # two layers, a key and a value each
    assert sorted(status) == [f"logits/past_key_values/{i}/{j}" for i in (0, 1) for j in (0, 1)]
    assert set(status.values()) == {"missing"}
    assert len(r.options["findings"]) == 1 and "divergence" not in r.options
    assert r.options["findings"][0].startswith("outputs only torch returns: ")
    assert r.options["findings"][0].endswith("set model.config.use_cache = False on the "
                                             "reference, or pass use_cache=False)")


def test_an_rmsnorm_epsilon_is_localised_and_named_as_its_setting() -> None:
    from reprod.align import align_forward

    tm, pm = _loaded()
    pm.layers[1].post_attention_layernorm.variance_epsilon = 1e-2
    r = align_forward(tm, pm, _ids(), calibrate=True)
    assert not r.passed
    assert r.options["divergence"]["layer"] == "layers.1.post_attention_layernorm"
    assert [k.key for k in r.failed if k.status == "setting"] == [
        "settings/layers.1.post_attention_layernorm/epsilon"]
    assert r.options["findings"][-1].endswith(
        "layers.1.post_attention_layernorm: epsilon 1e-06 in torch, 0.01 in Paddle; "
        "layers.1.post_attention_layernorm is the layer where the values first differ: the "
        "likely cause")


def test_adamw_steps_in_train_mode_align_against_float32_noise() -> None:
    """Three AdamW steps of both models in train mode (dropout off), judged against the float64
    twin's noise: every loss, gradient, weight and Adam moment of the 20 tensors agrees."""
    import paddle
    import torch

    from reprod.align import align_train

    tm, pm = _loaded()
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(_ids(), None)], steps=3, dropout="off", calibrate=True,
        torch_loss_fn=lambda out, *_: out.last_hidden_state.square().mean(),
        paddle_loss_fn=lambda out, *_: out[0].square().mean(),
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-3),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-3, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    keys = [k.key for k in r.results]
    assert len([k for k in keys if k.startswith("step2/param/")]) == 20
    assert any(k.startswith("step2/opt/") and k.endswith(".moment2") for k in keys)


def test_a_rotary_base_is_a_setting_of_each_block() -> None:
    """HF computes the rotary embedding once in the model (its base only in inv_freq),
    PaddleNLP in each attention (``base``): each of the port's is set against HF's one. A block
    rebuilt with base 500 (HF's rope_theta: 10000) was localised between v_proj and o_proj, and
    named by no setting."""
    from paddlenlp.transformers.llama.modeling import LlamaRotaryEmbedding

    from reprod.align import align_forward

    tm, pm = _loaded()
    r = align_forward(tm, pm, _ids())
    assert r.passed, r.to_table(failed_only=True)
    rotary = pm.layers[1].self_attn.rotary_emb
    pm.layers[1].self_attn.rotary_emb = LlamaRotaryEmbedding(
        rotary.dim, rotary.max_position_embeddings, base=500)
    r = align_forward(tm, pm, _ids())
    assert [k.key for k in r.failed if k.status == "setting"] == [
        "settings/layers.1.self_attn.rotary_emb/base"]
    assert "base 10000 in torch, 500 in Paddle" in r.options["findings"][-1]


def test_a_bug_in_the_port_s_attention_code_is_named_at_the_attention(monkeypatch: Any) -> None:
    """HF calls its attention with keywords (``self_attn.in[hidden_states]``), PaddleNLP
    positionally (``self_attn.in[0]``): paired by their values (``reprod.capture.pair_inputs``),
    the attention's input aligns, and queries scaled by 1.1 in PaddleNLP's own attention code
    (its ``scaled_dot_product_attention``, run between the projections) are named at the
    attention's forward code. Unpaired, the decoder layer around it was named."""
    import paddlenlp.transformers.llama.modeling as modeling

    from reprod.align import align_forward

    tm, pm = _loaded()
    original = modeling.scaled_dot_product_attention

    def scaled(query_states: Any, *args: Any, **kwargs: Any) -> Any:
        return original(query_states * 1.1, *args, **kwargs)

    monkeypatch.setattr(modeling, "scaled_dot_product_attention", scaled)
    r = align_forward(tm, pm, _ids(), calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "layers.0.self_attn", div["message"]
    assert div["message"].startswith(
        "diverges at layers.0.self_attn (LlamaAttention): input aligned"), div["message"]
    assert "the input of layers.0.self_attn.o_proj already differs" in div["message"]
    assert "cause is layers.0.self_attn's own forward code" in div["message"]


def _fused(rules: Any = None, causal: bool = False, by_order: bool = False
           ) -> tuple[Any, Any]:
    """HF's LLaMA with grouped-query attention (2 key-value heads for 4) against PaddleNLP's
    with ``fuse_attention_qkv`` and ``fuse_attention_ffn``: one ``qkv_proj`` [64, 128] for
    ``q_proj``, ``k_proj``, ``v_proj`` (read per key-value head), one ``gate_up_fused_proj``
    [64, 344] for ``gate_proj`` and ``up_proj`` (side by side). ``causal``: both
    ``LlamaForCausalLM`` (HF's ``model.layers...``, PaddleNLP's ``llama.layers...``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
        import paddlenlp.transformers as pnlp
        import torch
        import transformers

        from reprod.align import load_into_paddle

        config = dict(CONFIG, num_key_value_heads=2)
        kind = "LlamaForCausalLM" if causal else "LlamaModel"
        torch.manual_seed(0)
        tm = getattr(transformers, kind)(
            transformers.LlamaConfig(**config, attn_implementation="eager")).eval()
        tm.config.use_cache = False
        paddle.seed(0)
        pm = getattr(pnlp, kind)(pnlp.LlamaConfig(**config, fuse_attention_qkv=True,
                                                  fuse_attention_ffn=True))
        pm.eval()
        load_into_paddle(pm, tm, rules=rules, by_order=by_order)
    return tm, pm


def test_fused_projections_show_in_the_structure_and_load_into_their_columns() -> None:
    from reprod.align import compare_structure

    tm, pm = _fused()
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table(only_problems=True)
    fused = {r.torch_name: r.paddle_name for r in report.rows_with("fused")}
    assert len(fused) == 10  # q, k, v, gate and up in each of 2 layers
    assert fused["layers.1.mlp.up_proj.weight"] == "layers.1.mlp.gate_up_fused_proj.weight"
    t = tm.state_dict()
    gate_up = pm.layers[0].mlp.gate_up_fused_proj.weight.numpy()
    np.testing.assert_array_equal(gate_up, np.concatenate(
        [t["layers.0.mlp.gate_proj.weight"].numpy().T, t["layers.0.mlp.up_proj.weight"].numpy().T],
        axis=1))


def test_a_fused_qkv_read_per_key_value_head_is_named_with_its_groups() -> None:
    """Loaded side by side (the default), PaddleNLP's per-head reading mixes q, k and v: the
    localisation tries the other layouts and names the one PaddleNLP's own conversion uses;
    loaded so, the port passes against float32 noise, its fused layers judged as HF's parts."""
    from reprod.align import ConversionRules, align_forward

    tm, pm = _fused()
    r = align_forward(tm, pm, _ids(), calibrate=True)
    assert not r.passed
    # the attention's own code reads the fused output (its input paired by value across HF's
    # keyword and PaddleNLP's position)
    assert r.options["divergence"]["layer"] == "layers.0.self_attn"
    assert r.options["divergence"]["hint"].endswith(
        "in 2 groups: with that layout it aligns; load with "
        "ConversionRules(fuse_groups={'qkv_proj': 2})")
    rules = ConversionRules(fuse_groups={"qkv_proj": 2})
    tm, pm = _fused(rules)
    r = align_forward(tm, pm, _ids(), calibrate=True, rules=rules, layers=True)
    assert r.passed, r.to_table()
    assert r.options["layers"]["passed"] is True


def test_adamw_steps_of_the_fused_port_align_part_by_part() -> None:
    """Three AdamW steps of the fused port, loaded per key-value head: each of HF's q, k, v,
    gate and up projections is judged against its own noise, its gradient, weight and Adam
    moments cut out of the port's fused tensors."""
    import paddle
    import torch

    from reprod.align import ConversionRules, align_train

    rules = ConversionRules(fuse_groups={"qkv_proj": 2})
    tm, pm = _fused(rules)
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(_ids(), None)], steps=3, dropout="off", calibrate=True, rules=rules,
        torch_loss_fn=lambda out, *_: out.last_hidden_state.square().mean(),
        paddle_loss_fn=lambda out, *_: out[0].square().mean(),
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-3),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-3, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    keys = {k.key for k in r.results}
    assert len([k for k in keys if k.startswith("step2/param/")]) == 20
    assert "step2/opt/layers.1.self_attn.v_proj.weight.moment2" in keys
    assert not any("fused" in k or "qkv_proj" in k for k in keys)


def test_by_order_hf_s_causal_lm_loads_into_paddlenlp_s_fused_one_and_is_localised() -> None:
    """HF's ``LlamaForCausalLM`` (``model.layers...``) against PaddleNLP's with fused
    projections (``llama.layers...``): nothing pairs by name, and by order each run of q, k, v
    (and gate, up) pairs with the port's fused layer. Loaded per key-value head it passes;
    loaded side by side the divergence is put at the attention, whose code reads the fused
    output, and the layout the port reads is named."""
    from reprod.align import ConversionRules, align_forward

    for groups, passes in ((2, True), (1, False)):
        rules = ConversionRules(fuse_groups={"qkv_proj": groups})
        tm, pm = _fused(rules, causal=True, by_order=True)
        r = align_forward(tm, pm, _ids(), calibrate=True, by_order=True, rules=rules)
        assert r.passed is passes, r.to_table()
    # the attention block between v_proj and o_proj is found and named with the port's name
    # (its input, HF's keyword and PaddleNLP's position, paired by value)
    assert r.options["findings"][0].startswith(
        "diverges at model.layers.0.self_attn (LlamaAttention; the port's "
        "llama.layers.0.self_attn): input aligned"), r.options["findings"][0]
    assert "the input of model.layers.0.self_attn.o_proj already differs" in \
        r.options["findings"][0]
    assert r.options["divergence"]["port_layer"] == "llama.layers.0.self_attn"
    assert r.options["divergence"]["hint"] == (
        "llama.layers.0.self_attn.qkv_proj.weight holds q_proj, k_proj, v_proj laid out [q_proj "
        "| k_proj | v_proj] side by side, and the port reads them as [q_proj_1 | k_proj_1 | "
        "v_proj_1 | ...] in 2 groups: with that layout it aligns; load with "
        "ConversionRules(fuse_groups={'qkv_proj': 2})")
