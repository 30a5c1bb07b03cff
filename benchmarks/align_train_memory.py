"""The memory of ``align_train`` against the number of steps, its records in memory or spilled.

Records past a memory budget go to a file mapped into memory (``reprod/align/spill.py``).

    OMP_NUM_THREADS=1 .venv-real/bin/python benchmarks/align_train_memory.py
    .venv-real/bin/python benchmarks/align_train_memory.py --steps 1 2 4 8 --model resnet18:train
    .venv-real/bin/python benchmarks/align_train_memory.py --json out.json --reprod DIR

Needs torch, torchvision and paddle (the real-model environment of tests/realworld): torchvision's
model against paddle.vision's port, weights copied by order (tests/realworld/models.py), batch 2 at
224 px, SGD (momentum 0.9, lr 0.01, Paddle's ``Momentum``), CrossEntropyLoss, one batch per step.
The call is ``align_train(by_order=True, calibrate=True)`` with every other option at its default
(kinks, per-step judging, localisation, the determinism check, the optimizer-state records), once
with ``memory_budget=None`` (every record in memory) and once with ``memory_budget=0`` (every
record of 64 KiB or more in the unlinked file under the system's temporary directory: ``spill_dir``
and ``out_dir`` are not given), for each number of steps in ``--steps``.

Each (steps, budget) runs in its own child process (so that memory peaks do not mix), with
``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``; the child builds the models, optimizers
and batches, then makes one call (cold: its time includes the first Paddle call and the first
backward of the process). Figures, all over the process as the call starts (models built):

- **wall**: the call's time.
- **anon peak**: the peak of the anonymous resident memory (``RssAnon`` in ``/proc/self/status``,
  read by a thread every ~3 ms) less ``RssAnon`` just before the call: what the kernel can only
  swap, never drop. ``anon after``: ``RssAnon`` once the call has returned, its result still
  held, less the same.
- **RSS peak**: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` just
  before the call) less ``VmRSS`` just before it: anonymous memory and the pages of the file
  that are resident (the page cache keeps them while memory is free; the kernel writes them out
  and drops them when memory is wanted).
- **spilled** / **kept**: ``result.options["memory"]``, the bytes of records in the file and
  those kept in memory through the budget (absent, so 0, when nothing was spilled).
- **verdict**: ``result.passed``.

Then, per budget, the slopes from the first and last ``--steps`` (MiB per step, and as a multiple
of the torch model's parameter bytes), and per step count the time spilled over the time in
memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from _realmodels import check_env, mib, revision, status, use_checkout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REALWORLD = os.path.join(ROOT, "tests", "realworld")
BUDGETS: tuple[Optional[int], ...] = (None, 0)
BATCH, LR, MOMENTUM = 2, 0.01, 0.9


# --- the child ------------------------------------------------------------------------------------




class _AnonPeak:
    """The peak of ``RssAnon`` during a block, read by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.003) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> _AnonPeak:
        self.before = status("RssAnon")
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status("RssAnon"))
        self.added = self.peak - self.before


def child(name: str, mode: str, steps: int, budget: Any) -> int:
    import copy
    import gc

    sys.path.insert(1, REALWORLD)
    import paddle
    import torch
    from models import build_pair, make_inputs, make_labels

    from reprod.align import align_train

    paddle.set_device("cpu")
    torch.set_num_threads(1)
    train = mode == "train"
    pair = build_pair(name, seed=0)
    pair.torch64 = None  # not used: align_train makes its own float64 twin
    batches = [(make_inputs(i, BATCH), make_labels(i, BATCH)) for i in range(steps)]
    tm = copy.deepcopy(pair.torch32).train(train)
    pm = pair.paddle()
    if train:
        pm.train()
    else:
        pm.eval()
    topt = torch.optim.SGD(tm.parameters(), lr=LR, momentum=MOMENTUM)
    popt = paddle.optimizer.Momentum(LR, MOMENTUM, parameters=pm.parameters())
    params = sum(p.numel() * p.element_size() for p in tm.parameters())

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to VmRSS (Linux >= 4.0)
        f.write("5")
    rss_before = status("VmRSS")
    with _AnonPeak() as anon:
        t0 = time.perf_counter()
        r = align_train(
            tm, pm, batches, steps=steps, by_order=True, calibrate=True,
            torch_loss_fn=torch.nn.CrossEntropyLoss(),
            paddle_loss_fn=paddle.nn.CrossEntropyLoss(),
            torch_optimizer=topt, paddle_optimizer=popt, memory_budget=budget)
        secs = time.perf_counter() - t0
    rss_peak = status("VmHWM") - rss_before
    anon_after = status("RssAnon") - anon.before
    memory = r.options.get("memory") or {}
    out = {
        "steps": steps, "budget": budget, "secs": secs, "anon_peak": anon.added,
        "anon_after": anon_after, "rss_peak": rss_peak, "spilled": memory.get("spilled", 0),
        "kept": memory.get("in_memory"), "reason": memory.get("reason"),
        "passed": bool(r.passed), "keys": len(r.results), "params": params,
    }
    print("RESULT " + json.dumps(out))
    return 0


# --- the parent -----------------------------------------------------------------------------------


def _spawn(model: str, steps: int, budget: Any, reprod_root: str,
           cgroup: Optional[str] = None) -> dict[str, Any]:
    name, mode = model.split(":")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, mode, str(steps),
           "none" if budget is None else str(budget), "--reprod", reprod_root]
    env = dict(os.environ, OMP_NUM_THREADS="1", FLAGS_use_mkldnn="0",
               PYTHONPATH=os.pathsep.join(p for p in (reprod_root, os.environ.get("PYTHONPATH"))
                                          if p))
    def enter() -> None:  # in the child, before exec: into the memory cgroup
        assert cgroup is not None
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                         preexec_fn=enter if cgroup else None)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if cgroup and out.returncode in (-9, 137):  # the cgroup's OOM killer
        return {"steps": steps, "budget": budget, "killed": True,
                "secs": time.perf_counter() - t0}
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip() or out.stdout.strip())[-3000:]
        raise SystemExit(f"{model} steps={steps} memory_budget={budget} failed "
                         f"({out.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def _memory_cgroup(limit: int) -> str:
    """A new memory cgroup under this process's own (v2, else v1) limited to ``limit`` bytes;
    SystemExit where none can be made (it needs root, or a delegated cgroup)."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    bases = []
    for hierarchy, controllers, path in (p for p in lines if len(p) == 3):
        if "memory" in controllers.split(","):
            bases.append((os.path.join("/sys/fs/cgroup/memory", path.lstrip("/")),
                          "memory.limit_in_bytes"))
        elif hierarchy == "0" and controllers == "":
            bases.append((os.path.join("/sys/fs/cgroup", path.lstrip("/")), "memory.max"))
    for base, limit_file in bases:
        here = os.path.join(base, f"reprod-bench-{os.getpid()}")
        try:
            os.mkdir(here)
            with open(os.path.join(here, limit_file), "w") as f:
                f.write(str(limit))
            return here
        except OSError:
            try:
                os.rmdir(here)
            except OSError:
                pass
    raise SystemExit("--limit: cannot make a memory cgroup here (it needs root, or a delegated "
                     "cgroup v2 with the memory controller)")








def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="the numbers of steps (default: 1 2 4 8)")
    ap.add_argument("--model", default="resnet18:train", help="MODEL:train|eval "
                    "(default resnet18:train)")
    ap.add_argument("--reprod", default=ROOT, help="the checkout whose reprod is measured")
    ap.add_argument("--json", help="write every child's figures there")
    ap.add_argument("--limit", type=float, help="GiB: run each child in a memory cgroup limited "
                    "to that, with memory_budget None and \"auto\" (needs root)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, mode, steps, budget = args.child
        use_checkout(args.reprod)
        raise SystemExit(child(name, mode, int(steps), None if budget == "none" else
                               budget if budget == "auto" else int(budget)))
    check_env("align_train_memory.py")
    root = os.path.abspath(args.reprod)
    steps_list = sorted(set(args.steps))
    print(f"reprod from {root} ({revision(root)}); {args.model}; children: OMP_NUM_THREADS=1, "
          f"torch.set_num_threads(1); align_train(by_order=True, calibrate=True), batch {BATCH} "
          f"at 224 px, SGD momentum {MOMENTUM} lr {LR}; one cold call per child")
    t_start = time.perf_counter()
    if args.limit:
        _limited(args, root, steps_list)
        return
    runs: list[dict[str, Any]] = []
    for steps in steps_list:
        for budget in BUDGETS:
            res = _spawn(args.model, steps, budget, root)
            runs.append(res)
            print(f"  steps {steps}, memory_budget={budget}: {res['secs']:.1f} s, anon peak "
                  f"{mib(res['anon_peak'])}", flush=True)
    at = {(r["steps"], r["budget"]): r for r in runs}

    print("\n| steps | memory_budget | wall | anon peak | anon after | RSS peak | spilled | "
          "kept | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        kept = "" if r["kept"] is None else mib(r["kept"])
        verdict = ("passed" if r["passed"] else "FAILED") + f", {r['keys']} keys"
        if r["reason"]:
            verdict += f" ({r['reason']})"
        print(f"| {r['steps']} | {r['budget']} | {r['secs']:.1f} s | {mib(r['anon_peak'])} | "
              f"{mib(r['anon_after'])} | {mib(r['rss_peak'])} | {mib(r['spilled'])} | "
              f"{kept} | {verdict} |")

    params = runs[0]["params"]
    lo, hi = steps_list[0], steps_list[-1]
    if hi > lo:
        print(f"\nper step, from {lo} and {hi} steps (the torch model's parameters: "
              f"{mib(params)})")
        print("| memory_budget | anon peak / step | x params | RSS peak / step | spilled / step "
              "| wall / step |")
        print("|---|---|---|---|---|---|")
        for budget in BUDGETS:
            a, b = at[(lo, budget)], at[(hi, budget)]
            n = hi - lo
            anon = (b["anon_peak"] - a["anon_peak"]) / n
            print(f"| {budget} | {mib(anon)} | {anon / params:.1f}x | "
                  f"{mib((b['rss_peak'] - a['rss_peak']) / n)} | "
                  f"{mib((b['spilled'] - a['spilled']) / n)} | "
                  f"{(b['secs'] - a['secs']) / n:.2f} s |")
    print("\ntime spilled / time in memory: " + ", ".join(
        f"{s} steps {at[(s, 0)]['secs'] / at[(s, None)]['secs']:.2f}x" for s in steps_list))
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "revision": revision(root), "runs": runs}, f,
                      indent=1)


def _limited(args: Any, root: str, steps_list: list[int]) -> None:
    """Each child in a fresh memory cgroup of ``--limit`` GiB: in memory against
    ``memory_budget="auto"`` (which reads the cgroup's room)."""
    limit = int(args.limit * 2**30)
    runs = []
    for steps in steps_list:
        for budget in (None, "auto"):
            cgroup = _memory_cgroup(limit)
            try:
                res = _spawn(args.model, steps, budget, root, cgroup)
            finally:
                os.rmdir(cgroup)
            runs.append(res)
            print(f"  steps {steps}, memory_budget={budget}: "
                  + ("killed by the OOM killer" if res.get("killed") else
                     f"{res['secs']:.1f} s, anon peak {mib(res['anon_peak'])}"), flush=True)
    print(f"\n| steps | memory_budget | in a cgroup of {args.limit:g} GiB | wall | anon peak | "
          "spilled | kept (the budget) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        if r.get("killed"):
            print(f"| {r['steps']} | {r['budget']} | killed (out of memory) | "
                  f"{r['secs']:.1f} s | | | |")
            continue
        verdict = ("passed" if r["passed"] else "FAILED") + f", {r['keys']} keys"
        kept = "" if r["kept"] is None else mib(r["kept"])
        print(f"| {r['steps']} | {r['budget']} | {verdict} | {r['secs']:.1f} s | "
              f"{mib(r['anon_peak'])} | {mib(r['spilled'])} | {kept} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "revision": revision(root), "limit": limit,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
