"""Hugging Face's RoFormer against PaddleNLP's, a port nobody here wrote, where each side holds a
layer the other has not: HF's sinusoidal table (``encoder.embed_positions``, which the port
computes) and PaddleNLP's pooler (which HF's ``RoFormerModel`` lacks). Pairing by order was
refused with a list of positions that led away from both; ``compare_settings(by_order=True)``
paired its embeddings by definition, 3 against 2, left them all unchecked and passed, missing the
real ``padding_idx`` difference."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("transformers")
    pytest.importorskip("paddlenlp")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from third_batch_models import built, ids  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

SAID = (r'rules=ConversionRules(skip=[r"^encoder\.embed_positions\."], '
        r'port_only=[r"^pooler\.dense\."])')


def _rules():
    from reprod.align import ConversionRules

    return ConversionRules(skip=[r"^encoder\.embed_positions\."], port_only=[r"^pooler\.dense\."])


def _feed() -> dict[str, np.ndarray]:
    x = ids(length=12, vocab=1000)
    return {"input_ids": x, "token_type_ids": np.zeros_like(x)}


def test_the_refusal_names_the_table_and_the_pooler_and_the_rules_that_load_the_rest() -> None:
    from reprod import KeyMismatchError
    from reprod.align import load_into_paddle

    tm, pm = built("roformer")
    with pytest.raises(KeyMismatchError) as caught:
        load_into_paddle(pm, tm, by_order=True)
    text = str(caught.value)
    assert ("the torch side alone holds encoder.embed_positions.weight [64, 16] and the Paddle "
            "side alone holds pooler.dense.weight [64, 64], pooler.dense.bias [64]") in text
    assert SAID in text


def test_loaded_under_those_rules_the_port_aligns_and_its_pooler_is_its_own() -> None:
    import paddle
    import torch

    from reprod.align import align_forward, compare_structure

    tm, pm = built("roformer")
    pooler = pm.pooler.dense.weight.numpy().copy()
    rules = _rules()
    from reprod.align import load_into_paddle

    load_into_paddle(pm, tm, by_order=True, rules=rules)
    np.testing.assert_array_equal(pm.pooler.dense.weight.numpy(), pooler)
    report = compare_structure(tm, pm, by_order=True, rules=rules)
    assert report.ok, report.to_table(only_problems=True)
    feed = _feed()
    with torch.no_grad():
        t = tm(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    with paddle.no_grad():
        p = pm(**{k: paddle.to_tensor(v) for k, v in feed.items()})[0].numpy()
    np.testing.assert_allclose(p, t, rtol=1e-5, atol=1e-5)
    # HF sets the pad row (padding_idx 0), PaddleNLP does not: real, and the one failure
    r = align_forward(tm, pm, feed, by_order=True, rules=rules)
    assert {k.key for k in r.failed} == {"settings/embeddings.word_embeddings/padding_idx"}
    r = align_forward(tm, pm, feed, by_order=True, rules=rules,
                      check_settings=["*/padding_idx"])
    assert r.passed, r.to_table(failed_only=True)


def test_settings_by_order_find_the_padding_index_without_being_told_the_rules() -> None:
    from reprod.align import compare_settings

    tm, pm = built("roformer")
    report = compare_settings(tm, pm, by_order=True)
    assert [(d.torch_layer, d.setting) for d in report.differ] == [
        ("embeddings.word_embeddings", "padding_idx")]
    assert not report.passed and not report.unchecked
    assert "leaving alone the layers the shapes say one side alone holds" in str(report)


def test_a_bug_is_put_at_its_layer_with_or_without_the_rules() -> None:
    from reprod.align import align_forward

    tm, pm = built("roformer", rules=_rules())
    w = pm.encoder.layers[1].linear1.weight
    w.set_value(w * 1.05)
    for rules in (_rules(), None):
        r = align_forward(tm, pm, _feed(), by_order=True, rules=rules,
                          check_settings=["*/padding_idx"])
        assert not r.passed
        assert r.options["divergence"]["layer"] == "encoder.layer.1.intermediate.dense", \
            r.options["divergence"]
