"""``align_train`` on real model pairs, against the training steps it has to run.

    OMP_NUM_THREADS=1 .venv-real/bin/python benchmarks/align_train_cost.py
    .venv-real/bin/python benchmarks/align_train_cost.py --config resnet18:train --reps 5
    .venv-real/bin/python benchmarks/align_train_cost.py --breakdown      # and where it goes
    .venv-real/bin/python benchmarks/align_train_cost.py --reprod DIR     # another checkout

Needs torch, torchvision and paddle (the real-model environment of tests/realworld): torchvision's
model against paddle.vision's port, weights copied by order (tests/realworld/models.py), batch 2 at
224 px, 2 steps of SGD (momentum 0.9, lr 0.01, Paddle's ``Momentum``), CrossEntropyLoss. Two
configurations: resnet18 in train mode (BatchNorm on batch statistics), and shufflenet_v2_x1_0 in
eval mode, whose step 0 has kink crossings (max-pool elements within noise of a tie, a ReLU input
within noise of 0) that explain failing keys, so that the kink relabelling, the counterfactual
check of the relabelled gradients and the per-step judging of step 1 all run. (resnet18 in train
mode has crossings too, but every key passes without them: the crossings are found and listed,
nothing is relabelled or judged again.)

Each figure comes from its own child process (one interpreter per variant and configuration, so
that memory peaks do not mix), run with ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``
for stable numbers. In a child, every repetition gets fresh models and optimizers, built before
its clock starts; the time is the median of ``--reps`` repetitions (the first one is cold: the
first Paddle call, first backward). Variants:

- ``floor``: what any training comparison of this pair runs, each part timed on its own: the
  torch model's ``steps`` float32 training steps (forward, loss, backward, optimizer step), the
  Paddle model's, and ``steps`` float64 forward+backward of a deep copy of the torch model cast
  to double (the cast itself outside the clock): what ``calibrate=True`` adds. The floor of the
  plain run is the first two; of the calibrated run, all three.
- ``plain``: ``align_train(by_order=True, calibrate=False, kinks=False, localise=False)``.
- ``full``: ``align_train(by_order=True, calibrate=True)``, everything else at its default (kinks
  on, per-step judging on, localisation on).

Memory: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the
call) less the resident set just before it, in the first repetition (later ones reuse what the
allocator kept): what the call adds on top of the models it is given. It is shown as a multiple
of the model's state, measured: the bytes of the torch parameters and buffers plus the torch
optimizer's state (the momentum buffers) after a step.

``--breakdown`` runs ``plain`` and ``full`` once more per configuration (one child each) with
timers around the phases of ``align_train`` (functions of ``reprod.align.steps``,
``counterfactual`` and ``forcing``, wrapped in the child where ``align_train`` looks them up) and
prints where the time goes, and each top-level phase's resident-set peak over the call's start
(the high-water mark is reset as each phase starts). About 25 s more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

from _realmodels import check_env, mib, revision, status, use_checkout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REALWORLD = os.path.join(ROOT, "tests", "realworld")
CONFIGS = ("resnet18:train", "shufflenet_v2_x1_0:eval")
VARIANTS = ("floor", "plain", "full")
STEPS, BATCH, LR, MOMENTUM = 2, 2, 0.01, 0.9


# --- the child ------------------------------------------------------------------------------------




def _reset_peak() -> None:
    """Set ``VmHWM`` back to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Peak:
    """The resident memory a block adds at its peak: ``VmHWM`` after it less ``VmRSS`` before."""

    def __enter__(self) -> _Peak:
        import gc

        gc.collect()
        _reset_peak()
        self.before = status("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak = status("VmHWM")
        self.added = self.peak - self.before


class _Setup:
    """The model pair, built once per child, and fresh models and optimizers for each repetition."""

    def __init__(self, name: str, mode: str) -> None:
        import numpy as np
        import paddle
        import torch
        from models import build_pair, make_inputs, make_labels

        paddle.set_device("cpu")
        torch.set_num_threads(1)
        self.name, self.train = name, mode == "train"
        self.pair = build_pair(name, seed=0)
        self.pair.torch64 = None  # not used: the floor and align_train make their own
        self.batches = [(make_inputs(i, BATCH), make_labels(i, BATCH)) for i in range(STEPS)]
        self.np = np

    def models(self) -> tuple[Any, Any, Any, Any]:
        import copy

        import paddle
        import torch

        tm = copy.deepcopy(self.pair.torch32).train(self.train)
        pm = self.pair.paddle()
        if self.train:
            pm.train()
        else:
            pm.eval()
        topt = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM)
        popt = paddle.optimizer.Momentum(LR, MOMENTUM, parameters=pm.parameters())
        return tm, pm, topt, popt


def _state_bytes(tm: Any, topt: Any) -> dict[str, int]:
    import torch

    params = sum(p.numel() * p.element_size() for p in tm.parameters())
    buffers = sum(b.numel() * b.element_size() for b in tm.buffers())
    opt = sum(v.numel() * v.element_size() for s in topt.state.values() for v in s.values()
              if isinstance(v, torch.Tensor))
    return {"params": params, "buffers": buffers, "optimizer": opt}


def _floor(setup: _Setup, reps: int) -> dict[str, Any]:
    import copy

    import paddle
    import torch

    def torch_steps(tm: Any, topt: Any, double: bool) -> float:
        loss_fn = torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        for x, y in setup.batches:
            xt = torch.from_numpy(x)
            xt = xt.double() if double else xt
            if topt is not None:
                topt.zero_grad()
            else:
                tm.zero_grad(set_to_none=True)
            loss = loss_fn(tm(xt), torch.from_numpy(y))
            loss.backward()
            if topt is not None:
                topt.step()
        return time.perf_counter() - t0

    def paddle_steps(pm: Any, popt: Any) -> float:
        loss_fn = paddle.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        for x, y in setup.batches:
            popt.clear_grad()
            loss = loss_fn(pm(paddle.to_tensor(x)), paddle.to_tensor(y))
            loss.backward()
            popt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"torch": [], "paddle": [], "torch64": []}
    added: dict[str, int] = {}
    state: dict[str, int] = {}
    for rep in range(reps):
        tm, pm, topt, popt = setup.models()
        twin = copy.deepcopy(tm).double()
        with _Peak() as pk:
            times["torch"].append(torch_steps(tm, topt, False))
        added.setdefault("torch", pk.added)
        with _Peak() as pk:
            times["paddle"].append(paddle_steps(pm, popt))
        added.setdefault("paddle", pk.added)
        with _Peak() as pk:
            times["torch64"].append(torch_steps(twin, None, True))
        added.setdefault("torch64", pk.added)
        if rep == 0:
            state = _state_bytes(tm, topt)
        del tm, pm, topt, popt, twin
    return {"times": times, "added": added, "state": state}


def _align(setup: _Setup, reps: int, full: bool, breakdown: bool) -> dict[str, Any]:
    import paddle
    import torch

    from reprod.align import align_train

    timers = _Timers() if breakdown else None
    times: list[float] = []
    added: Optional[int] = None
    peak: Optional[int] = None
    info: dict[str, Any] = {}
    for _ in range(reps):
        tm, pm, topt, popt = setup.models()
        kwargs: dict[str, Any] = (dict(calibrate=True) if full else
                                  dict(calibrate=False, kinks=False, localise=False))
        with _Peak() as pk:
            if timers is not None:  # its peaks reset the high-water mark: pk.added is not kept
                timers.reset(pk.before)
            t0 = time.perf_counter()
            r = align_train(
                tm, pm, setup.batches, steps=STEPS, by_order=True,
                torch_loss_fn=torch.nn.CrossEntropyLoss(),
                paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
                torch_optimizer=topt, paddle_optimizer=popt, **kwargs)
            times.append(time.perf_counter() - t0)
        if added is None:
            added, peak = pk.added, pk.peak
        o = r.options
        info = {
            "passed": bool(r.passed),
            "keys": len(r.results),
            "kink_keys": sum(k.status == "kink" for k in r.results),
            "crossings": len(o.get("kink_crossings") or ()),
            "forced_steps": list((o.get("forcing") or {}).get("steps", [])),
            "counterfactual": {s: {k: v for k, v in c.items() if not isinstance(v, (list, dict))}
                               for s, c in (o.get("counterfactual") or {}).items()},
        }
        del r, tm, pm, topt, popt
    out = {"times": times, "added": added, "peak": peak, "info": info}
    if timers is not None:
        out["breakdown"] = timers.table()
    return out


class _Timers:
    """Wall time of the phases of ``align_train``: the functions below wrapped where
    ``align_train`` looks them up; each call's time is booked under its path of wrapped callers,
    so that the top-level phases partition the call."""

    WRAP = {
        "reprod.align.steps": ("_check_structure", "by_order_rules", "_torch_params_plan",
                               "_initial_stats", "_check_determinism", "_float64_twin",
                               "_float64_optimizer", "_torch_steps", "_paddle_steps", "_finish",
                               "_checked_kinks", "_judged_per_step", "_train_localised",
                               "_write_diff_log"),
        "reprod.align.counterfactual": ("counterfactual_grads", "checked"),
        "reprod.align.forcing": ("run_forced", "replay_kinks", "merged", "steps_to_force"),
        # inside _finish: the comparison, the BatchNorm statistics' hints, the kink crossings
        "reprod.diff.engine": ("compare",),
        "reprod.align.results": ("_stat_verdicts",),
        "reprod.align.kinks": ("explain_kinks", "flips_of"),
    }

    def __init__(self) -> None:
        import importlib

        self.stack: list[str] = []
        self.book: dict[tuple[str, ...], list[Any]] = {}
        self.base = 0
        for mod_name, names in self.WRAP.items():
            mod = importlib.import_module(mod_name)
            for n in names:
                fn = getattr(mod, n, None)
                if fn is not None:
                    setattr(mod, n, self._wrapped(n, fn))
        from reprod.align import steps, train_localise

        snap = train_localise.Snapshot
        take = snap.take.__func__  # a classmethod
        timed = self._wrapped("Snapshot.take", lambda *a, **k: take(snap, *a, **k))
        steps.Snapshot = type("Snapshot", (snap,), {"take": staticmethod(timed)})

    def _wrapped(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            label = name + ("[float64]" if kwargs.get("float64") else "")
            top = not self.stack
            if top:  # the peak of each top-level phase: its own high-water mark
                _reset_peak()
            self.stack.append(label)
            path = tuple(self.stack)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = self.book.setdefault(path, [0.0, 0, 0, 0])
                entry[0] += time.perf_counter() - t0
                entry[1] += 1
                self.stack.pop()
                if top:
                    entry[2] = max(entry[2], status("VmHWM") - self.base)
                    entry[3] = status("VmRSS") - self.base

        return timed

    def reset(self, base: int) -> None:
        """``base``: the resident set as the call starts; memory is booked over it."""
        self.book = {}
        self.base = base

    def table(self) -> list[list[Any]]:
        """[path, seconds, calls, peak over the call's start, held after] of each phase."""
        return [[list(p), *e] for p, e in self.book.items()]


def child(name: str, mode: str, variant: str, reps: int, breakdown: bool) -> int:
    sys.path.insert(1, REALWORLD)
    setup = _Setup(name, mode)
    if variant == "floor":
        out = _floor(setup, reps)
    else:
        out = _align(setup, reps, variant == "full", breakdown)
    print("RESULT " + json.dumps(out))
    return 0


# --- the parent -----------------------------------------------------------------------------------


def _spawn(config: str, variant: str, reps: int, reprod_root: str,
           breakdown: bool = False) -> dict[str, Any]:
    name, mode = config.split(":")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, mode, variant, str(reps),
           "--reprod", reprod_root]
    if breakdown:
        cmd.append("--breakdown")
    env = dict(os.environ, OMP_NUM_THREADS="1", FLAGS_use_mkldnn="0",
               PYTHONPATH=os.pathsep.join(p for p in (reprod_root, os.environ.get("PYTHONPATH"))
                                          if p))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip() or out.stdout.strip())[-3000:]
        raise SystemExit(f"{config} {variant} failed ({out.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["process"] = wall
    return res








def _print_breakdown(config: str, runs: dict[str, dict[str, Any]]) -> None:
    """Top-level phases of one call of each variant side by side, in call order, then what the
    phases spend inside them."""
    books = {v: {tuple(b[0]): b[1:] for b in r["breakdown"]} for v, r in runs.items()}
    totals = {v: r["times"][0] for v, r in runs.items()}
    print(f"\n{config}, one call of each, phases in call order: seconds (calls, where more than "
          "one), and the resident set's peak during the phase over the call's start")
    print("| phase | " + " | ".join(f"{v} | {v}: peak" for v in runs) + " |")
    print("|---|" + "---|---|" * len(runs))
    top: list[tuple[str, ...]] = []
    for b in sorted(books.values(), key=len, reverse=True):
        top += [p for p in b if len(p) == 1 and p not in top]

    def cells(v: str, p: tuple[str, ...]) -> str:
        if p not in books[v]:
            return "- | -"
        t, n, peak, _ = books[v][p]
        return f"{t:.2f}" + (f" ({n})" if n > 1 else "") + f" | {mib(peak)}"

    small = [p for p in top if all(books[v].get(p, (0.0,))[0] < 0.005 for v in runs)]
    for p in top:
        if p not in small:
            print(f"| {p[0]} | " + " | ".join(cells(v, p) for v in runs) + " |")
    if small:
        print(f"| ({', '.join(p[0] for p in small)}: each under 0.005 s) |"
              + " |".join(" |" for _ in runs) + " |")
    rest = {v: totals[v] - sum(e[0] for p, e in books[v].items() if len(p) == 1) for v in runs}
    print("| (outside these) | " + " | ".join(f"{rest[v]:.2f} | " for v in runs) + " |")
    print("| **total** | " + " | ".join(f"{totals[v]:.2f} | " for v in runs) + " |")
    nested = [(v, p, e[0], e[1]) for v in runs for p, e in books[v].items()
              if len(p) > 1 and e[0] >= 0.005]
    if nested:
        print(f"\n{config}: inside the phases (0.005 s or more)")
        print("| run | inside | phase | calls | seconds |")
        print("|---|---|---|---|---|")
        order = list(runs)
        for v, p, t, n in sorted(nested, key=lambda r: (order.index(r[0]), r[1][:1], -r[2])):
            print(f"| {v} | {' > '.join(p[:-1])} | {p[-1]} | {n} | {t:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", help="MODEL:train|eval (default: both of "
                    + ", ".join(CONFIGS) + ")")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--reprod", default=ROOT, help="the checkout whose reprod is measured")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, mode, variant, reps = args.child
        use_checkout(args.reprod)
        raise SystemExit(child(name, mode, variant, int(reps), args.breakdown))
    check_env("align_train_cost.py")
    root = os.path.abspath(args.reprod)
    print(f"reprod from {root} ({revision(root)}); children: OMP_NUM_THREADS=1, "
          f"torch.set_num_threads(1); {STEPS} steps, batch {BATCH} at 224 px, "
          f"SGD momentum {MOMENTUM} lr {LR}; time: median of {args.reps}")
    results: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()
    for config in args.config or CONFIGS:
        results[config] = {v: _spawn(config, v, args.reps, root) for v in VARIANTS}
        if args.breakdown:
            results[config]["breakdown"] = {v: _spawn(config, v, 1, root, breakdown=True)
                                            for v in ("plain", "full")}
    print(f"\n| model, mode | torch, {STEPS} steps | Paddle, {STEPS} steps | float64 fwd+bwd x "
          f"{STEPS} | floor plain | floor calibrated | state (params+buffers+momentum) |")
    print("|---|---|---|---|---|---|---|")
    floors: dict[str, tuple[float, float, int]] = {}
    for config, res in results.items():
        fl = res["floor"]
        t32, p32, t64 = (statistics.median(fl["times"][k]) for k in ("torch", "paddle", "torch64"))
        state = sum(fl["state"].values())
        floors[config] = (t32 + p32, t32 + p32 + t64, state)
        s = fl["state"]
        print(f"| {config} | {t32:.3f} s | {p32:.3f} s | {t64:.3f} s | {t32 + p32:.3f} s | "
              f"{t32 + p32 + t64:.3f} s | {mib(state)} ({mib(s['params'])} + "
              f"{mib(s['buffers'])} + {mib(s['optimizer'])}) |")
    print("\n| model, mode | run | n | wall (median) | runs | vs floor | peak RSS added | "
          "vs state | what ran |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config, res in results.items():
        plain_floor, cal_floor, state = floors[config]
        fl = res["floor"]
        f_added = max(fl["added"].values())
        print(f"| {config} | floor (largest of its parts) |  |  |  |  | {mib(f_added)} | "
              f"{f_added / state:.1f}x |  |")
        for v, floor in (("plain", plain_floor), ("full", cal_floor)):
            r = res[v]
            t = statistics.median(r["times"])
            i = r["info"]
            ran = (f"{'passed' if i['passed'] else 'FAILED'}, {i['keys']} keys")
            if v == "full":
                cf = "; ".join(f"{s}: " + ", ".join(f"{k} {x:.3g}" if isinstance(x, float)
                                                    else f"{k} {x}" for k, x in c.items())
                               for s, c in i["counterfactual"].items()) or "none"
                ran += (f", {i['crossings']} crossings, {i['kink_keys']} keys kink, "
                        f"forced steps {i['forced_steps']}, counterfactual {cf}")
            runs = ", ".join(f"{x:.2f}" for x in r["times"])
            print(f"| {config} | {v} | {len(r['times'])} | {t:.2f} s | {runs} | "
                  f"{t / floor:.1f}x | {mib(r['added'])} | {r['added'] / state:.1f}x | {ran} |")
    if args.breakdown:
        for config, res in results.items():
            _print_breakdown(config, res["breakdown"])
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
