"""A reference that fuses what its port keeps apart, both written by others: Hugging Face's
Phi-3 (torch) holds one ``qkv_proj`` [E + 2 E_kv, E] and one ``gate_up_proj`` [2 I, E] per
layer, and a porter who writes Phi-3 in Paddle on PaddleNLP's LLaMA (the same decoder: RMSNorm,
rotary attention, SwiGLU) holds ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` and
``up_proj``. Small config (2 layers, hidden 64, 4 heads, 2 key-value heads), RMSNorm weights
perturbed so every tensor counts.

- By name, Phi-3's fused tensors are split into the port's parts (``reprod.align.fusion.Split``):
  the structure matches, the weights load into the parts, the port passes against float32
  noise, forward and in three AdamW steps, each part judged on its own.
- A bug in one part is localised at the port's layer for it, which the reference has not.
- Split in a layout Phi-3 does not read (per key-value head), the divergence names the one it
  reads (side by side).

And timm's ViT (one ``qkv`` Linear and ``proj`` per block) against a Paddle ViT a porter
writes on Paddle's own ``TransformerEncoderLayer`` (``paddle.nn.MultiHeadAttention``: ``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``), loaded by name with the porter's rename rules; the port is
ten lines around Paddle's layers:

- the structure matches with timm's ``qkv`` split into Paddle's three, and the port passes;
- Paddle's LayerNorm epsilon default (1e-5 against timm's 1e-6) is named as a setting;
- a bug in one part is named at the reference's virtual part and the port's layer;
- parts a porter's script cut per head are judged so, and the layout timm reads is named.

And a port mirroring timm's blocks (``norm1``, ``attn``, ``norm2``, ``mlp``) with Paddle's
``MultiHeadAttention`` as ``attn``: by name ``proj`` and ``out_proj`` differ and nothing splits;
by order timm's ``qkv`` pairs with the run ``q_proj``, ``k_proj``, ``v_proj``, and the port loads
and passes.

transformers, paddlenlp, timm, torch and paddle are imported inside the tests only (see
test_bert_real.py).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore")

CONFIG: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _phi3_and_llama(rules: Any = None, causal: bool = False) -> tuple[Any, Any]:
    """Phi-3 (no padding row: Phi-3's default pad token 32000 is outside this vocabulary, and
    PaddleNLP's LLaMA embeds without one) against PaddleNLP's LLaMA, loaded by name.
    ``causal``: both ``...ForCausalLM``, HF's ``model.layers...`` against PaddleNLP's
    ``llama.layers...``, renamed by a rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
        import paddlenlp.transformers as pnlp
        import torch
        import transformers

        from reprod.align import ConversionRules, load_into_paddle

        torch.manual_seed(0)
        kind = "ForCausalLM" if causal else "Model"
        tm = getattr(transformers, f"Phi3{kind}")(transformers.Phi3Config(
            **CONFIG, pad_token_id=None, attn_implementation="eager"))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # HF initialises every RMSNorm weight to 1
            for name, p in tm.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        tm.eval()
        tm.config.use_cache = False
        paddle.seed(0)
        pm = getattr(pnlp, f"Llama{kind}")(pnlp.LlamaConfig(**CONFIG))
        pm.eval()
        if causal:
            rules = ConversionRules(rename={r"^model\.": "llama."},
                                    fuse_groups=(rules.fuse_groups if rules else ()))
        load_into_paddle(pm, tm, rules=rules)
    return tm, pm, rules


def _ids() -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(0).integers(1, 1000, (2, 12)).astype(np.int64)}


def test_the_fused_tensors_split_into_the_port_s_parts_in_the_structure_and_on_load() -> None:
    from reprod.align import compare_structure

    tm, pm, _ = _phi3_and_llama()
    report = compare_structure(tm, pm)
    assert report.ok, report.to_table(only_problems=True)
    split = {r.paddle_name: r.torch_name for r in report.rows_with("split")}
    assert len(split) == 10  # q, k, v, gate and up in each of 2 layers
    assert split["layers.1.mlp.up_proj.weight"] == "layers.1.mlp.gate_up_proj.weight"
    assert "4 split into 10" in report.summary_line()
    t = tm.state_dict()
    qkv, gate_up = (t[f"layers.0.{k}.weight"].numpy() for k in ("self_attn.qkv_proj",
                                                                "mlp.gate_up_proj"))
    # 4 query heads of 16, then 2 key heads, then 2 value heads: rows 64:96 are the keys
    np.testing.assert_array_equal(pm.layers[0].self_attn.k_proj.weight.numpy(), qkv[64:96].T)
    np.testing.assert_array_equal(pm.layers[0].mlp.up_proj.weight.numpy(), gate_up[172:].T)


def test_loaded_by_name_the_port_passes_against_float32_noise() -> None:
    from reprod.align import align_forward

    tm, pm, _ = _phi3_and_llama()
    r = align_forward(tm, pm, _ids(), calibrate=True)
    assert r.passed, r.to_table()
    assert [k.key for k in r.results] == ["logits/last_hidden_state"]


def test_with_the_head_renamed_by_a_rule_the_causal_models_align_too() -> None:
    from reprod.align import align_forward, compare_structure

    tm, pm, rules = _phi3_and_llama(causal=True)
    report = compare_structure(tm, pm, rules=rules)
    assert report.ok, report.to_table(only_problems=True)
    assert "4 split into 10" in report.summary_line()
    r = align_forward(tm, pm, _ids(), calibrate=True, rules=rules)
    assert r.passed, r.to_table()


def test_a_bug_in_one_part_is_localised_at_the_port_s_layer_the_reference_has_not() -> None:
    from reprod.align import align_forward

    tm, pm, _ = _phi3_and_llama()
    w = pm.layers[1].mlp.up_proj.weight
    w.set_value(w.numpy() * 1.01)
    r = align_forward(tm, pm, _ids(), calibrate=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "layers.1.mlp.up_proj"
    assert "input aligned" in div["message"] and "constant factor 0.990099" in div["message"]


def test_split_per_key_value_head_the_layout_phi3_reads_is_named() -> None:
    from reprod.align import ConversionRules, align_forward

    rules = ConversionRules(fuse_groups={"qkv_proj": 2})
    tm, pm, _ = _phi3_and_llama(rules)
    r = align_forward(tm, pm, _ids(), calibrate=True, rules=rules)
    assert not r.passed
    # HF calls its attention with keywords (in[hidden_states]), PaddleNLP positionally
    # (in[0]): paired by value (reprod.capture.pair_inputs), its input aligns and the
    # attention's own code is named, the input of o_proj differing inside it
    assert r.options["divergence"]["layer"] == "layers.0.self_attn"
    assert "input aligned" in r.options["divergence"]["message"]
    assert "the input of layers.0.self_attn.o_proj already differs" in \
        r.options["divergence"]["message"]
    assert r.options["divergence"]["hint"] == (
        "layers.0.self_attn.qkv_proj.weight holds q_proj, k_proj, v_proj laid out [q_proj | "
        "k_proj | v_proj] side by side, and they were split from it as [q_proj_1 | k_proj_1 | "
        "v_proj_1 | ...] in 2 groups: split so, the port aligns; load with "
        "ConversionRules(fuse_groups={'qkv_proj': 1})")


@pytest.mark.parametrize("bug", [False, True])
def test_adamw_steps_judge_each_part_and_find_a_bug_in_one(bug: bool) -> None:
    """Three AdamW steps in train mode: each of the port's 20 tensors (10 of them parts of
    Phi-3's) judged against the float64 twin's noise, gradient, weight and both moments; a
    port whose k_proj of layer 1 is scaled by 1.01 is localised there at step 0."""
    import paddle
    import torch

    from reprod.align import align_train

    tm, pm, _ = _phi3_and_llama()
    if bug:
        w = pm.layers[1].self_attn.k_proj.weight
        w.set_value(w.numpy() * 1.01)
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(_ids(), None)], steps=3, dropout="off", calibrate=True,
        torch_loss_fn=lambda out, *_: out.last_hidden_state.square().mean(),
        paddle_loss_fn=lambda out, *_: out[0].square().mean(),
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-3),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-3, parameters=pm.parameters()))
    if bug:
        assert not r.passed
        assert r.options["divergence"]["layer"] == "layers.1.self_attn.k_proj"
        assert r.options["divergence"]["step"] == 0
        return
    assert r.passed, r.to_table(failed_only=True)
    keys = [k.key for k in r.results]
    params = [k for k in keys if k.startswith("step2/param/")]
    assert len(params) == 20
    assert "step2/param/layers.1.mlp.gate_proj.weight" in params
    assert "step2/opt/layers.0.self_attn.v_proj.weight.moment2" in keys
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)


# --- timm's ViT against Paddle's TransformerEncoderLayer ----------------------------------------

VIT_E, VIT_HEADS, VIT_DEPTH = 64, 4, 2
VIT_RULES = [(r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.out_proj."),
             (r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."),
             (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.\1.linear1."),
             (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.\1.linear2."),
             (r"^blocks\.", "encoder.layers.")]


def _vit(eps: float = 1e-6) -> tuple[Any, Any, Any]:
    """timm's ViT (32 px, patch 8, 2 blocks of width 64, 4 heads; norms, biases, tokens and
    position table perturbed) and its port on Paddle's TransformerEncoderLayer (pre-norm, exact
    GELU, LayerNorm ``eps``), loaded by name with the rules renaming timm's blocks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle
        import timm
        import torch

        from reprod.align import ConversionRules, load_into_paddle

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from vision_ports import perturb  # the seeded noise test_vision_ports_real.py uses

        e = VIT_E

        class PaddleViT(paddle.nn.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.cls_token = self.create_parameter([1, 1, e])
                self.pos_embed = self.create_parameter([1, 17, e])
                self.patch_embed = paddle.nn.Layer()
                self.patch_embed.proj = paddle.nn.Conv2D(3, e, 8, 8)
                layer = paddle.nn.TransformerEncoderLayer(
                    e, VIT_HEADS, 4 * e, dropout=0.0, activation="gelu", normalize_before=True,
                    layer_norm_eps=eps)
                self.encoder = paddle.nn.TransformerEncoder(layer, VIT_DEPTH)
                self.norm = paddle.nn.LayerNorm(e, epsilon=1e-6)
                self.head = paddle.nn.Linear(e, 5)

            def forward(self, x: Any) -> Any:
                x = self.patch_embed.proj(x).flatten(2).transpose([0, 2, 1])
                x = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), x], 1)
                return self.head(self.norm(self.encoder(x + self.pos_embed))[:, 0])

        torch.manual_seed(0)
        tm = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                               patch_size=8, depth=VIT_DEPTH, num_classes=5, embed_dim=e,
                               num_heads=VIT_HEADS).eval()
        perturb(tm)
        paddle.seed(0)
        pm = PaddleViT()
        pm.eval()
        rules = ConversionRules(rename=VIT_RULES)
        load_into_paddle(pm, tm, rules=rules)
    return tm, pm, rules


def _images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)


def test_timm_s_qkv_splits_into_paddle_s_multi_head_attention_and_the_port_passes() -> None:
    from reprod.align import align_forward, compare_structure

    tm, pm, rules = _vit()
    report = compare_structure(tm, pm, rules=rules)
    assert report.ok, report.to_table(only_problems=True)
    assert report.summary_line().startswith(
        "structure matches: 28 tensors, 7 transposed on conversion, 4 split into 12")
    qkv = tm.blocks[1].attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(pm.encoder.layers[1].self_attn.v_proj.weight.numpy(),
                                  qkv[2 * VIT_E:].T)
    r = align_forward(tm, pm, _images(), calibrate=True, rules=rules)
    assert r.passed, r.to_table()


def test_paddle_s_layer_norm_epsilon_default_is_named_as_a_setting() -> None:
    from reprod.align import align_forward

    tm, pm, rules = _vit(eps=1e-5)
    r = align_forward(tm, pm, _images(), calibrate=True, rules=rules)
    assert not r.passed
    assert r.options["divergence"]["layer"] == "blocks.0.norm1"
    assert "encoder.layers.0.norm1 (torch blocks.0.norm1): epsilon 1e-06 in torch, 1e-05 in " \
        "Paddle" in r.options["findings"][-1]


def test_a_bug_in_one_part_is_named_at_the_reference_s_part_and_the_port_s_layer() -> None:
    from reprod.align import align_forward

    tm, pm, rules = _vit()
    b = pm.encoder.layers[1].self_attn.v_proj.bias
    b.set_value(b.numpy() + 0.05)
    r = align_forward(tm, pm, _images(), calibrate=True, rules=rules)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "blocks.1.attn.v_proj"
    assert div["port_layer"] == "encoder.layers.1.self_attn.v_proj"
    assert "input aligned" in div["message"]


def test_parts_a_script_cut_per_head_are_judged_so_and_timm_s_layout_is_named() -> None:
    """A porter's script reading timm's qkv rows as [head, 3, head size] (GPT-NeoX's layout):
    each part aligns as cut, and the attention block reading them is named with timm's layout,
    found by loading the parts so and running the port again."""
    from reprod.align import align_forward

    tm, pm, rules = _vit()
    d = VIT_E // VIT_HEADS
    for blk, layer in zip(tm.blocks, pm.encoder.layers):
        w = blk.attn.qkv.weight.detach().numpy().reshape(VIT_HEADS, 3, d, VIT_E)
        b = blk.attn.qkv.bias.detach().numpy().reshape(VIT_HEADS, 3, d)
        for j, name in enumerate("qkv"):
            proj = getattr(layer.self_attn, f"{name}_proj")
            proj.weight.set_value(np.ascontiguousarray(w[:, j].reshape(VIT_E, VIT_E).T))
            proj.bias.set_value(np.ascontiguousarray(b[:, j].reshape(VIT_E)))
    r = align_forward(tm, pm, _images(), calibrate=True, rules=rules)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "blocks.0.attn"
    assert div["hint"] == (
        "blocks.0.attn.qkv.weight holds q_proj, k_proj, v_proj laid out [q_proj | k_proj | "
        "v_proj] side by side, and they were split from it as [q_proj_1 | k_proj_1 | v_proj_1 | "
        "...] in 4 groups: split so, the port aligns; load with "
        "ConversionRules(fuse_groups={'qkv': 1})")


def test_adamw_steps_of_the_vit_judge_timm_s_qkv_as_paddle_s_three() -> None:
    """Two AdamW steps with a cross-entropy loss, in train mode (timm's dropouts are 0): every
    tensor of the port (40, timm's 2 qkv weights and biases as 12 of them) passes, calibrated."""
    import paddle
    import torch

    from reprod.align import align_train

    tm, pm, rules = _vit()
    tm.train()
    pm.train()
    r = align_train(
        tm, pm, [(_images(), np.array([1, 3]))], steps=2, calibrate=True, rules=rules,
        torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
        torch_optimizer=torch.optim.AdamW(tm.parameters(), lr=1e-3),
        paddle_optimizer=paddle.optimizer.AdamW(learning_rate=1e-3, parameters=pm.parameters()))
    assert r.passed, r.to_table(failed_only=True)
    params = [k.key for k in r.results if k.key.startswith("step1/param/")]
    assert len(params) == 40
    assert {f"step1/param/encoder.layers.1.self_attn.{q}_proj.{w}" for q in "qkv"
            for w in ("weight", "bias")} <= set(params)
    assert "step1/opt/encoder.layers.0.self_attn.k_proj.bias.moment1" in {k.key for k in r.results}


def _vit_blocks() -> tuple[Any, Any]:
    """timm's ViT (as ``_vit``) and a port mirroring its blocks, Paddle's MultiHeadAttention as
    each block's ``attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` for timm's ``qkv``,
    ``proj``); not loaded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import paddle

        e = VIT_E

        class Mlp(paddle.nn.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.fc1 = paddle.nn.Linear(e, 4 * e)
                self.act = paddle.nn.GELU()
                self.fc2 = paddle.nn.Linear(4 * e, e)

            def forward(self, x: Any) -> Any:
                return self.fc2(self.act(self.fc1(x)))

        class Block(paddle.nn.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.norm1 = paddle.nn.LayerNorm(e, epsilon=1e-6)
                self.attn = paddle.nn.MultiHeadAttention(e, VIT_HEADS)
                self.norm2 = paddle.nn.LayerNorm(e, epsilon=1e-6)
                self.mlp = Mlp()

            def forward(self, x: Any) -> Any:
                h = self.norm1(x)
                x = x + self.attn(h, h, h)
                return x + self.mlp(self.norm2(x))

        class PaddleViT(paddle.nn.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.cls_token = self.create_parameter([1, 1, e])
                self.pos_embed = self.create_parameter([1, 17, e])
                self.patch_embed = paddle.nn.Layer()
                self.patch_embed.proj = paddle.nn.Conv2D(3, e, 8, 8)
                self.blocks = paddle.nn.LayerList([Block() for _ in range(VIT_DEPTH)])
                self.norm = paddle.nn.LayerNorm(e, epsilon=1e-6)
                self.head = paddle.nn.Linear(e, 5)

            def forward(self, x: Any) -> Any:
                x = self.patch_embed.proj(x).flatten(2).transpose([0, 2, 1])
                x = paddle.concat([self.cls_token.expand([x.shape[0], -1, -1]), x], 1)
                x = x + self.pos_embed
                for block in self.blocks:
                    x = block(x)
                return self.head(self.norm(x)[:, 0])

        tm = _vit()[0]
        pm = PaddleViT()
        pm.eval()
    return tm, pm


def test_by_order_timm_s_qkv_pairs_with_paddle_s_three_and_the_port_passes() -> None:
    from reprod.align import align_forward, compare_structure, load_into_paddle

    tm, pm = _vit_blocks()
    by_name = compare_structure(tm, pm)
    assert not by_name.ok and len(by_name.rows_with("split")) == 0
    report = compare_structure(tm, pm, by_order=True)
    assert report.ok, report.to_table(only_problems=True)
    assert "4 split into 12" in report.summary_line()
    load_into_paddle(pm, tm, by_order=True)
    qkv = tm.blocks[0].attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(pm.blocks[0].attn.k_proj.weight.numpy(),
                                  qkv[VIT_E:2 * VIT_E].T)
    r = align_forward(tm, pm, _images(), calibrate=True, by_order=True)
    assert r.passed, r.to_table()
    w = pm.blocks[1].attn.k_proj.weight
    w.set_value(w.numpy() * 1.01)
    r = align_forward(tm, pm, _images(), calibrate=True, by_order=True)
    assert not r.passed
    div = r.options["divergence"]
    assert div["layer"] == "blocks.1.attn.k_proj" and "input aligned" in div["message"]
    assert div["hint"].endswith("their values are not the reference's")
