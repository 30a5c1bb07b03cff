"""Real-model scenarios judged by reprod itself: ``reprod.compare(ref, port, noise=ref64)``, with
``reprod.capture.explain_kinks`` on training captures and ``first_divergence`` on per-layer ones.

Each scenario gives three dicts of numpy arrays with the same keys: ``ref`` (torch float32),
``ref64`` (torch float64, same weights and inputs) and ``port`` (paddle.vision's model, float32,
weights copied by order, optionally with an injected bug, ``models.BUGS``):

- ``forward``: logits in eval mode (batch 4, 224x224), as in scenarios.py;
- ``layers``:  ``record(model)`` of an eval forward pass, inputs and outputs of every leaf layer
  (batch 2, 224x224), the port's keys renamed with ``rename_by_order``;
- ``train``:   ``record(model, backward=True)`` around 2 SGD steps (lr 0.01, momentum 0.9,
  cross-entropy, training mode, dropout p=0, batch 2; resnet50 at 112x112 to keep the capture at
  ~0.6 GB a side): every leaf layer's inputs, outputs and gradients and every parameter gradient
  of both steps, plus ``step<s>/loss``, ``step<s>/weight/<name>`` (parameters after the step)
  and ``step<s>/buffer/<name>`` (BN running statistics) logged into the same capture in time
  order, all under torch names and torch layout.

    OMP_NUM_THREADS=1 MKL_DYNAMIC=FALSE .venv-real/bin/python tests/realworld/calibrated.py

prints, per model and scenario, the keys a correct port fails under plain thresholds
(max|d| <= 1e-5, mean|d| <= 1e-6) and under calibrated verdicts (MEASUREMENTS.md).
"""

from __future__ import annotations

import copy
import fnmatch
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle  # noqa: E402
import scenarios as S  # noqa: E402
import torch  # noqa: E402
from models import ModelPair, make_inputs, make_labels, paddle_input, torch_input  # noqa: E402

import reprod  # noqa: E402
from reprod.capture import explain_kinks, record, rename_by_order  # noqa: E402

Arrays = dict[str, np.ndarray]

# Keys a correct port gets wrong by design, left out of the verdict by name (glob -> why).
KNOWN_DIFFERENCES = {
    "step*/buffer/*running_var": (
        "BN running_var: paddle updates it with the biased batch variance, torch with the "
        "unbiased one (a factor n/(n-1) on the batch term; test_running_var_is_the_biased_variance "
        "checks exactly that)"
    ),
}
# training-step keys computed from the gradients (explain_kinks(updates=...))
UPDATES = "step*/weight/*"
TRAIN_SIZE = {"resnet50": 112}  # image size of the train scenario (default 224)
PLAIN = {"max": 1e-5, "mean": 1e-6}


def known_difference(key: str) -> Optional[str]:
    for pattern, why in KNOWN_DIFFERENCES.items():
        if fnmatch.fnmatchcase(key, pattern):
            return why
    return None


@dataclass
class Run:
    ref: Arrays
    ref64: Arrays
    port: Arrays
    notes: list[str] = field(default_factory=list)

    def compare(self) -> reprod.DiffResult:
        return reprod.compare(self.ref, self.port, noise=self.ref64)

    def plain(self, method: str) -> reprod.DiffResult:
        return reprod.compare(self.ref, self.port, method=method, threshold=PLAIN[method])


def _np(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy().copy()
    return np.array(t.numpy(), copy=True)


_CACHE: dict[tuple[str, str, int], tuple[Arrays, Arrays]] = {}


def clear_cache() -> None:
    _CACHE.clear()
    S.clear_cache()


def _torch_side(scenario: str, pair: ModelPair, seed: int, fn) -> tuple[Arrays, Arrays]:
    key = (scenario, pair.name, seed)
    if key not in _CACHE:
        _CACHE[key] = (fn(pair.torch32, torch.float32), fn(pair.torch64, torch.float64))
    return _CACHE[key]


def _common(ref: Arrays, ref64: Arrays, port: Arrays, notes: list[str]) -> Run:
    missing = [k for k in ref if k not in port]
    extra = [k for k in port if k not in ref]
    if missing or extra:
        notes.append(f"unpaired: {len(missing)} ref keys, {len(extra)} port keys: "
                     f"{missing[:3]} / {extra[:3]}")
    keys = [k for k in ref if k in port]
    return Run({k: ref[k] for k in keys}, {k: ref64[k] for k in keys}, {k: port[k] for k in keys},
               notes)


# --- forward and layers -----------------------------------------------------------------------------


def forward(pair: ModelPair, seed: int, bug: Optional[str] = None) -> Run:
    res = S.forward(pair, seed, bug)
    return Run(res.ref, res.ref64, res.port, list(res.notes))


def layers(pair: ModelPair, seed: int, bug: Optional[str] = None) -> Run:
    x = make_inputs(seed, S.BATCH["layers"])

    def capture(model, dtype):
        with torch.no_grad(), record(model, containers=False) as log:
            model(torch_input(x, dtype))
        return dict(log.data)

    ref, ref64 = _torch_side("layers", pair, seed, capture)
    model = pair.paddle(bug)
    with paddle.no_grad(), record(model, containers=False) as log:
        model(paddle_input(x))
    port = rename_by_order(ref, dict(log.data))
    return _common(ref, ref64, port, [pair.last_bug] if bug else [])


# --- training -------------------------------------------------------------------------------------


def _no_dropout(model: Any) -> None:
    for m in (model.modules() if hasattr(model, "modules") else model.sublayers()):
        if type(m).__name__ == "Dropout":
            m.p = 0.0


def _is_buffer(torch_name: str) -> bool:
    return torch_name.endswith(("running_mean", "running_var"))


def train_inputs(pair: ModelPair, seed: int) -> tuple[np.ndarray, np.ndarray]:
    size = TRAIN_SIZE.get(pair.name, 224)
    return make_inputs(seed, S.BATCH["train"], size), make_labels(seed, S.BATCH["train"])


def _torch_train(pair: ModelPair, seed: int):
    x, y = train_inputs(pair, seed)

    def run(model, dtype):
        model = copy.deepcopy(model)
        _no_dropout(model)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=S.LR, momentum=S.MOMENTUM)
        xt, yt = torch_input(x, dtype), torch.from_numpy(y)
        with record(model, backward=True, containers=False) as log:
            for step in range(1, S.STEPS + 1):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(xt), yt)
                log.add(f"step{step}/loss", loss.detach())
                loss.backward()
                opt.step()
                for n, v in model.state_dict().items():
                    if not n.endswith("num_batches_tracked"):
                        kind = "buffer" if _is_buffer(n) else "weight"
                        log.add(f"step{step}/{kind}/{n}", v)
        return dict(log.data)

    return run


def train(pair: ModelPair, seed: int, bug: Optional[str] = None) -> Run:
    ref, ref64 = _torch_side("train", pair, seed, _torch_train(pair, seed))
    x, y = train_inputs(pair, seed)
    model = pair.paddle(bug)
    _no_dropout(model)
    model.train()
    opt = paddle.optimizer.Momentum(learning_rate=S.LR, momentum=S.MOMENTUM,
                                    parameters=model.parameters(), use_nesterov=False)
    xp, yp = paddle_input(x), paddle.to_tensor(y)
    to_torch = {p.paddle_key: p for p in pair.pairs}
    with record(model, backward=True, containers=False) as log:
        for step in range(1, S.STEPS + 1):
            loss = paddle.nn.functional.cross_entropy(model(xp), yp)
            log.add(f"step{step}/loss", _np(loss).reshape(()))
            loss.backward()
            opt.step()
            opt.clear_grad()
            for pk, v in model.state_dict().items():
                wp = to_torch[pk]
                a = _np(v)
                kind = "buffer" if _is_buffer(wp.torch_key) else "weight"
                log.add(f"step{step}/{kind}/{wp.torch_key}", a.T.copy() if wp.transpose else a)
    port = rename_by_order(ref, dict(log.data))
    for k, v in port.items():  # paddle's Linear weight gradients are [in, out]
        parsed = reprod.capture.parse_key(k)
        if parsed is not None and parsed.is_param and parsed.name in pair.linear_weights:
            port[k] = np.ascontiguousarray(v.T)
    return _common(ref, ref64, port, [pair.last_bug] if bug else [])


def explained(run: Run, result: Optional[reprod.DiffResult] = None) -> reprod.DiffResult:
    """The calibrated result of a training run with its kink crossings explained."""
    result = run.compare() if result is None else result
    return explain_kinks(result, run.ref, run.port, run.ref64, updates=UPDATES)


SCENARIOS = {"forward": forward, "layers": layers, "train": train}


def run(scenario: str, pair: ModelPair, seed: int, bug: Optional[str] = None) -> Run:
    return SCENARIOS[scenario](pair, seed, bug)


def verdict_failures(result: reprod.DiffResult) -> list[str]:
    """Failing keys that are neither known differences nor explained by a kink crossing."""
    return [r.key for r in result.failed if known_difference(r.key) is None]


# --- the before/after table -------------------------------------------------------------------------


def counts(scenario: str, r: Run) -> dict[str, Any]:
    plain_max, plain_mean = r.plain("max"), r.plain("mean")
    cal = r.compare()
    after = explained(r, cal) if scenario == "train" else cal
    known = [k.key for k in after.failed if known_difference(k.key)]
    return {
        "keys": len(r.ref),
        "max": len(plain_max.failed),
        "mean": len(plain_mean.failed),
        "calibrated": len(cal.failed),
        "kink": sum(k.status == "kink" for k in after),
        "known": len(known),
        "left": len(verdict_failures(after)),
        "crossings": len(after.options.get("kink_crossings", [])),
        "worst": max((k.noise_multiple or 0.0 for k in after
                      if k.status == "passed" and not known_difference(k.key)), default=0.0),
    }


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from models import build_pair

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large",
                                                    "mobilenet_v3_small"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)  # as the tests (conftest.py)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | seed | scenario | keys | fail max<=1e-5 | fail mean<=1e-6 | fail calibrated "
          "| of which kink | known (running_var) | failing after | crossings | worst passing |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for seed in args.seeds:
            pair = build_pair(name, seed)
            for sc in SCENARIOS:
                t0 = time.time()
                c = counts(sc, run(sc, pair, seed))
                print(f"| {name} | {seed} | {sc} | {c['keys']} | {c['max']} | {c['mean']} | "
                      f"{c['calibrated']} | {c['kink']} | {c['known']} | {c['left']} | "
                      f"{c['crossings']} | {c['worst']:.3g}x | <!-- {time.time() - t0:.0f}s -->",
                      flush=True)
            clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
