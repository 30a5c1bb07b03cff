"""Cost of ``reprod.align.load_into_paddle`` against its floor: the same weights handed to
Paddle's ``set_state_dict`` by hand.

    python benchmarks/load_weights.py                       # 12 blocks of width 768, 5 rounds
    python benchmarks/load_weights.py --blocks 24 --width 1024 --rounds 3
    python benchmarks/load_weights.py --reprod DIR          # another checkout (a "before")

The model: a GPT-2-small-sized stack (an embedding of 50,257 x width, then per block two
LayerNorms, a q/k/v/out attention of Linears and a 4x MLP), the same in torch and Paddle, names
differing (so ``by_order=True`` pairs them). Each variant runs in a child process of its own
(its peak memory is its own): the floor builds both models and calls ``set_state_dict`` with
each torch tensor's numpy view (the Linear weights transposed: the copy a conversion cannot
avoid); ``by order`` calls ``load_into_paddle(..., by_order=True)`` (pairing, conversion, the
fit check, the load). The figures are the medians of
``--rounds`` loads in one child, and the child's peak RSS above the two models built. No figure
is asserted anywhere; results go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _models(blocks: int, width: int):
    import paddle
    import torch

    vocab = 50257
    tnn, pnn = torch.nn, paddle.nn

    class TorchBlock(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = tnn.LayerNorm(width), tnn.LayerNorm(width)
            self.q, self.k, self.v, self.o = (tnn.Linear(width, width) for _ in range(4))
            self.fc_in, self.fc_out = tnn.Linear(width, 4 * width), tnn.Linear(4 * width, width)

    class PaddleBlock(pnn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = pnn.LayerNorm(width), pnn.LayerNorm(width)
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
                pnn.Linear(width, width) for _ in range(4))
            self.linear1, self.linear2 = pnn.Linear(width, 4 * width), pnn.Linear(4 * width, width)

    class TorchNet(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = tnn.Embedding(vocab, width)
            self.h = tnn.ModuleList(TorchBlock() for _ in range(blocks))

    class PaddleNet(pnn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = pnn.Embedding(vocab, width)
            self.layers = pnn.LayerList([PaddleBlock() for _ in range(blocks)])

    torch.manual_seed(0)
    return TorchNet(), PaddleNet()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(variant: str, blocks: int, width: int, rounds: int) -> dict:
    import numpy as np
    import paddle

    paddle.set_device("cpu")
    tm, pm = _models(blocks, width)
    from reprod.align import load_into_paddle
    from reprod.align.by_order import pair_weights_by_order

    pairs = pair_weights_by_order(tm, pm)
    built = _peak_mb()

    def floor() -> None:
        # what a porter writes by hand once the names are known: each tensor's numpy view, the
        # Linear weights transposed
        state = {}
        for name, t in tm.state_dict().items():
            a = t.detach().numpy()
            state[pairs[name]] = np.ascontiguousarray(a.T) if a.ndim == 2 and \
                not name.startswith("wte") else a
        pm.set_state_dict(state)

    run = {"floor": floor,
           "by order": lambda: load_into_paddle(pm, tm, by_order=True)}[variant]
    run()  # warm-up (imports, first allocations)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"seconds": statistics.median(times), "peak_above_models_mb": _peak_mb() - built,
            "params_mb": sum(p.numel() for p in tm.parameters()) * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reprod", default=ROOT, help="the checkout whose reprod is measured")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        sys.path.insert(0, os.path.abspath(a.reprod))
        print(json.dumps(_child(a.child, a.blocks, a.width, a.rounds)))
        return
    sys.path.insert(0, HERE)
    from _realmodels import revision

    print(f"reprod: {a.reprod} ({revision(a.reprod)}); {a.blocks} blocks of width {a.width}, "
          f"median of {a.rounds}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rows = {}
    for variant in ("floor", "by order"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--blocks",
                              str(a.blocks), "--width", str(a.width), "--rounds", str(a.rounds),
                              "--reprod", a.reprod], capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    size = rows["floor"]["params_mb"]
    print("\n| variant | weights | seconds | / floor | peak RSS above the two models |")
    print("|---|---|---|---|---|")
    for variant, r in rows.items():
        print(f"| {variant} | {size:.0f} MB | {r['seconds']:.3f} | "
              f"{r['seconds'] / rows['floor']['seconds']:.2f}x | {r['peak_above_models_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
