"""Faithful bfloat16 ports of real models pass the layers judged alone and between them.

A guard against the wrong FAIL: the survey that built these checks found faithful ports failing
them one way after another (densenet121's norms holding their ReLU, up to 1640x; T5's position
bias, 1024x; MBart's embedding scaled on the other side of the layer, 896x; BigBird's query
returning its heads apart). Each pair here is a port nobody here wrote (paddle.vision's own,
PaddleNLP's own), emulated as a bfloat16 GPU kernel computes (``test_half_alone_real._emulated``:
Paddle has no CPU bfloat16 kernels), judged with ``align_forward(calibrate=True,
precision="bfloat16", by_order=True)``. The ten HF/PaddleNLP pairs of
test_more_transformers_real.py, with their bugs, are there; BERT, GPT-2 and the three
torchvision models with bugs are in test_half_alone_real.py. About 60 s single-threaded.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Any, Callable

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore")

# resnet50, resnext50 and vgg11 passed the survey too (largest 1.0x, 1.5x, 1.4x): left out here
# for time (17-19 s each)
VISION = ["densenet121", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v2",
          "mobilenet_v3_large"]
THIRD = ["gptj", "codegen", "mixtral", "mbart", "pegasus", "deberta", "squeezebert", "mpnet",
         "clip", "roformer"]
FOURTH = ["luke", "bigbird", "megatron", "rembert", "funnel", "xlm", "layoutlm"]
NLP = importlib.util.find_spec("transformers") is not None and \
    importlib.util.find_spec("paddlenlp") is not None
needs_nlp = pytest.mark.skipif(not NLP, reason="transformers and paddlenlp are not installed")


def _judged(tm: Any, pm: Any, feed: Any, **kw: Any) -> Any:
    from test_half_alone_real import _emulated

    from reprod.align import align_forward

    tm.eval()
    pm.eval()
    return align_forward(tm, _emulated(copy.deepcopy(pm)), feed, calibrate=True,
                         precision="bfloat16", by_order=True, check_settings=False, **kw)


def _passes(r: Any) -> None:
    alone = r.options["layers"]["alone"]
    assert r.passed and alone["passed"], r.to_table(failed_only=True)
    assert alone["inputs"] > 0 and alone["largest"]["multiple"] < 4, alone


@pytest.mark.parametrize("name", VISION)
def test_a_faithful_vision_port_passes(name: str) -> None:
    import paddle
    import torch
    from models import build_paddle, build_torch, randomize, squeezenet_as_torchvision

    from reprod.align import load_into_paddle

    torch.manual_seed(0)
    paddle.seed(0)
    tm = build_torch(name)
    randomize(tm, 0)
    pm = build_paddle(name)
    if name.startswith("squeezenet"):
        pm = squeezenet_as_torchvision(pm)
    load_into_paddle(pm, tm, by_order=True)
    x = np.random.RandomState(0).standard_normal((2, 3, 96, 96)).astype("float32")
    _passes(_judged(tm, pm, x))


def _nlp(name: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    import fourth_batch_models as fourth
    import third_batch_models as third

    feeds: dict[str, Callable[[], Any]] = dict(
        gptj=lambda: {"input_ids": third.ids()}, codegen=lambda: {"input_ids": third.ids()},
        mixtral=lambda: {"input_ids": third.ids()}, mbart=lambda: third.seq2seq_feed(1, 2),
        pegasus=lambda: third.seq2seq_feed(0, 0),
        deberta=lambda: {"input_ids": third.ids(vocab=100)},
        squeezebert=lambda: {"input_ids": third.ids(vocab=100)},
        mpnet=lambda: third.mpnet_batches()[0][0], clip=third.clip_feed,
        luke=fourth.luke_feed, bigbird=fourth.bigbird_feed,
        megatron=lambda: fourth.padded(1), rembert=lambda: fourth.padded(1),
        funnel=lambda: fourth.padded(0), xlm=lambda: fourth.padded(0, segments=False),
        layoutlm=fourth.layoutlm_feed)
    kw: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "roformer":
            from test_third_batch_real import _roformer_rules

            kw["rules"] = _roformer_rules()
            tm, pm = third.built(name, rules=kw["rules"])
            x = third.ids(length=12, vocab=100)
            return tm, pm, {"input_ids": x, "token_type_ids": np.zeros_like(x)}, kw
        tm, pm = (third if name in third.BUILDERS else fourth).built(name)
    return tm, pm, feeds[name](), kw


@needs_nlp
@pytest.mark.parametrize("name", THIRD + FOURTH)
def test_a_faithful_transformer_port_passes(name: str) -> None:
    tm, pm, feed, kw = _nlp(name)
    _passes(_judged(tm, pm, feed, **kw))
