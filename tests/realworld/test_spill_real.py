"""Every record of ``align_train`` kept in the file past a zero memory budget
(``reprod.align.spill``) on a real pair: torchvision's squeezenet1_1 against paddle.vision's,
train mode, seed 2, batch 2 at 224 px, 2 steps of SGD with momentum. This run uses every path
that reads the records back: kink crossings explained and checked counterfactually, step 1
forced from the reference's state, a gradient passed as the port's own rounding after a float64
rerun. The verdict, every key's statistics and every option are those of the run held in
memory. About 20 s.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import torch  # noqa: E402
from models import build_pair, train_copies  # noqa: E402

from reprod.align import align_train  # noqa: E402


def test_records_in_the_file_give_the_verdict_of_records_in_memory(tmp_path):
    pair = build_pair("squeezenet1_1", 2)
    runs = {}
    for budget in (None, 0):
        tm, pm, batches = train_copies(pair, 2)
        runs[budget] = align_train(
            tm, pm, batches, steps=2, by_order=True, calibrate=True,
            torch_loss_fn=torch.nn.CrossEntropyLoss(), paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
            torch_optimizer=torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9),
            paddle_optimizer=paddle.optimizer.Momentum(0.01, 0.9, parameters=pm.parameters()),
            memory_budget=budget, spill_dir=tmp_path)
    mem, spilled = runs[None], runs[0]
    assert mem.passed and spilled.passed
    # what makes this run worth it: every path that reads records after the runs ran
    assert mem.options["kinks"]["explained"] > 0
    assert mem.options["forcing"]["steps"] == [1]
    assert mem.options["port_rounding"]["step1"]["known"] >= 1
    # squeezenet1_1 holds 1.2 M parameters: three runs' gradients, weights and momentum at
    # least, twice
    assert spilled.options["memory"]["spilled"] > 2 * 3 * 3 * 4 * 1_200_000
    assert "memory" not in mem.options
    assert len(mem.results) == len(spilled.results)
    for a, b in zip(mem.results, spilled.results):
        assert repr(a) == repr(b)
    assert repr({k: v for k, v in mem.options.items() if k != "memory"}) == \
        repr({k: v for k, v in spilled.options.items() if k != "memory"})
    assert os.listdir(tmp_path) == []
