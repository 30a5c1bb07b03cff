"""Cost of ``reprod.capture.record`` on the example's model against its floors (project issue 23).

    python benchmarks/capture.py                      # torch and paddle, 7 rounds
    python benchmarks/capture.py --frameworks torch --rounds 5 --batch 8
    python benchmarks/capture.py --frameworks torch --against ../before  # and a checkout's reprod

MobileNetV3-Small from examples/mobilenetv3/ (batch 8, 224x224, CPU). Each framework runs in its
own process; within it, for one pass after the other, every variant runs once per round, rounds
interleaved, so that a change of machine load hits every variant alike; the figure is the median. Variants, for the forward pass
(eval, no_grad) and for forward + backward (eval mode, ``out.sum().backward()``):

- ``plain``: the model alone;
- ``hooks leaf``: hand-written hooks that ``detach().clone()`` every leaf layer's output (with
  backward: the gradients at every leaf layer's outputs and inputs, which ``record`` takes with
  ``inputs=False`` too, and every parameter's gradient), the issue's floor;
- ``hooks all``: hand-written hooks that clone what ``record`` records by default: every layer's
  (containers too) inputs and outputs (with backward: the gradients at them, and the parameters');
- ``record leaf``: ``record(containers=False, inputs=False)``, the set of ``hooks leaf``;
- ``record``: ``record`` with its defaults, the set of ``hooks all``;
- ``record stream``: the same with ``ReprodLogger(stream_to=...)`` (closed inside the timing);
- ``record stream thread`` (only with ``--variants``): the same with ``stream_queue_bytes=64
  MiB``: the hooks hand copies to a writer thread;
- ``plain + write``: the model alone, then the bytes of the pass's streamed dump (read once, in
  the warm-up, into memory) written to a new file beside it with ``os.write``, 1 MiB at a time:
  what any streaming capture of that set costs at the least, its file's bytes through the page
  cache (the streamed variants' second floor).

``--against DIR`` also runs every record variant (``record stream (against)``, ...) with DIR's
``reprod``, loaded beside this checkout's in the same process, each beside its twin in every
round: before and after a change under the same load, against the same floors.

A ratio is a variant's median over its floor's (``hooks leaf`` for ``record leaf``, ``hooks all``
for the others, and ``plain + write`` too for the streamed ones), for wall time and for CPU time (all the process's threads; steadier than wall
time on a shared machine). No figure is asserted anywhere; results go in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, "examples", "mobilenetv3")

VARIANTS = ["plain", "hooks leaf", "hooks all", "record leaf", "record", "record stream",
            "plain + write"]
# timed only when asked for (--variants): its pool of host memory slowed the floors it was
# interleaved with (hooks all +12 %), which would flatter the other variants' ratios
EXTRA_VARIANTS = ["record stream thread"]
FLOOR = {"record leaf": ["hooks leaf"], "record": ["hooks all"],
         "record stream": ["hooks all", "plain + write"],
         "record stream thread": ["hooks all", "plain + write"], "hooks leaf": ["plain"],
         "hooks all": ["plain"], "plain + write": ["plain"]}
# per pass (backward or not), the bytes of its streamed dump, which ``plain + write`` writes
_STREAMED: dict[bool, Any] = {}


# --- the two frameworks, behind one small interface ------------------------------------------------


class Torch:
    name = "torch"

    def __init__(self, batch: int, threads: int) -> None:
        import numpy as np
        import torch
        from torch_model import mobilenet_v3_small

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = mobilenet_v3_small(num_classes=1000).eval()
        self.x = torch.from_numpy(np.random.default_rng(0).standard_normal(
            (batch, 3, 224, 224), dtype=np.float32))

    def layers(self) -> list[tuple[str, Any, bool]]:
        out = []
        for name, m in self.model.named_modules():
            leaf = next(iter(m.children()), None) is None or any(True for _ in m.parameters(False))
            out.append((name, m, leaf))
        return out

    def params(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def is_tensor(self, v: Any) -> bool:
        return isinstance(v, self.torch.Tensor)

    def clone(self, t: Any) -> Any:
        return t.detach().clone()

    def wants_grad(self, t: Any) -> bool:
        return t.requires_grad

    def pre_hook(self, m: Any, fn: Callable[[Any], None]) -> Any:
        return m.register_forward_pre_hook(lambda mod, args: fn(args))

    def post_hook(self, m: Any, fn: Callable[[Any], None]) -> Any:
        return m.register_forward_hook(lambda mod, args, out: fn(out))

    def grad_hook(self, t: Any, fn: Callable[[Any], None]) -> Any:
        return t.register_hook(fn)

    def step(self, backward: bool) -> None:
        if backward:
            for p in self.model.parameters():
                p.grad = None
            self.model(self.x).sum().backward()
        else:
            with self.torch.no_grad():
                self.model(self.x)


class Paddle:
    name = "paddle"

    def __init__(self, batch: int, threads: int) -> None:
        import numpy as np

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import paddle
        from paddle_model import mobilenet_v3_small

        paddle.set_device("cpu")
        paddle.seed(0)
        self.paddle = paddle
        self.model = mobilenet_v3_small(num_classes=1000)
        self.model.eval()
        self.x = paddle.to_tensor(np.random.default_rng(0).standard_normal(
            (batch, 3, 224, 224), dtype=np.float32))

    def layers(self) -> list[tuple[str, Any, bool]]:
        out = []
        for name, m in self.model.named_sublayers(include_self=True):
            leaf = next(iter(m.children()), None) is None or any(
                True for _ in m.named_parameters(include_sublayers=False))
            out.append((name, m, leaf))
        return out

    def params(self) -> list[Any]:
        return [p for p in self.model.parameters() if not p.stop_gradient]

    def is_tensor(self, v: Any) -> bool:
        return isinstance(v, self.paddle.Tensor)

    def clone(self, t: Any) -> Any:
        return t.detach().clone()

    def wants_grad(self, t: Any) -> bool:
        return not t.stop_gradient

    def pre_hook(self, m: Any, fn: Callable[[Any], None]) -> Any:
        return m.register_forward_pre_hook(lambda lay, args: fn(args))

    def post_hook(self, m: Any, fn: Callable[[Any], None]) -> Any:
        return m.register_forward_post_hook(lambda lay, args, out: fn(out))

    def grad_hook(self, t: Any, fn: Callable[[Any], None]) -> Any:
        return t.register_hook(fn)

    def step(self, backward: bool) -> None:
        if backward:
            self.model.clear_gradients()
            self.model(self.x).sum().backward()
        else:
            with self.paddle.no_grad():
                self.model(self.x)


def _tensors(fw: Any, value: Any) -> list[Any]:
    if fw.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(fw, v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(fw, v)]
    return []


def hand_hooks(fw: Any, backward: bool, *, containers: bool) -> tuple[float, float]:
    """One step with hand-written clone hooks (registered and removed inside the timing, as
    ``record`` has to); returns its wall and CPU seconds. ``containers``: every layer, inputs and outputs;
    otherwise leaf outputs only."""
    kept: list[Any] = []

    def grab(value: Any, forward: bool = True) -> None:
        for t in _tensors(fw, value):
            if forward:
                kept.append(fw.clone(t))
            if backward and fw.wants_grad(t):
                fw.grad_hook(t, lambda g: kept.append(fw.clone(g)) and None)

    t0, c0 = time.perf_counter(), time.process_time()
    handles = []
    for _name, m, leaf in fw.layers():
        if containers:
            handles.append(fw.pre_hook(m, grab))
        elif leaf and backward:  # the gradients leaving through the inputs, as record takes them
            handles.append(fw.pre_hook(m, lambda args: grab(args, forward=False)))
        if containers or leaf:
            handles.append(fw.post_hook(m, grab))
    if backward:
        for p in fw.params():
            handles.append(fw.grad_hook(p, lambda g: kept.append(fw.clone(g)) and None))
    fw.step(backward)
    for h in handles:
        h.remove()
    dt = time.perf_counter() - t0, time.process_time() - c0
    assert kept
    return dt


AGAINST = " (against)"  # a record variant run with --against DIR's reprod


def _load_against(folder: str) -> None:
    """DIR's reprod as the package ``reprod_against``, beside this checkout's (the capture and
    storage code imports itself relatively, so a second copy runs under another name)."""
    import importlib.util

    pkg = os.path.join(os.path.abspath(folder), "reprod")
    spec = importlib.util.spec_from_file_location(
        "reprod_against", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reprod_against"] = mod
    spec.loader.exec_module(mod)


def _variants(args: argparse.Namespace, round_: int) -> list[str]:
    """A round's variants; with --against each record variant beside its twin, which of the two
    runs first alternating from round to round."""
    out: list[str] = []
    for v in args.variants:
        if args.against and v.startswith("record") and v not in EXTRA_VARIANTS:
            pair = [v, v + AGAINST]
            out += pair if round_ % 2 == 0 else pair[::-1]
        else:
            out.append(v)
    return out


def one(fw: Any, variant: str, backward: bool, tmp: str) -> tuple[float, float]:
    """Wall and CPU (all of the process's threads) seconds of one step of ``variant``."""
    if variant.endswith(AGAINST):
        import importlib

        ReprodLogger = sys.modules["reprod_against"].ReprodLogger  # noqa: N806
        record = importlib.import_module("reprod_against.capture").record
        variant = variant[: -len(AGAINST)]
    else:
        from reprod import ReprodLogger
        from reprod.capture import record

    if variant == "plain":
        t0, c0 = time.perf_counter(), time.process_time()
        fw.step(backward)
        return time.perf_counter() - t0, time.process_time() - c0
    if variant == "plain + write":
        return plain_and_write(fw, backward, tmp)
    if variant.startswith("hooks"):
        return hand_hooks(fw, backward, containers=variant == "hooks all")
    leaf = variant == "record leaf"
    path = os.path.join(tmp, "run.npz")
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "record stream":
        logger = ReprodLogger(stream_to=path)
    elif variant == "record stream thread":
        logger = ReprodLogger(stream_to=path, stream_queue_bytes=64 << 20)
    else:
        logger = ReprodLogger()
    with record(fw.model, logger, backward=backward, containers=not leaf, inputs=not leaf):
        fw.step(backward)
    logger.close()
    dt = time.perf_counter() - t0, time.process_time() - c0
    assert logger.keys()
    if os.path.exists(path):
        if backward not in _STREAMED and not variant.endswith(AGAINST):
            with open(path, "rb") as f:  # faulted in here, outside any timing
                _STREAMED[backward] = memoryview(bytearray(f.read()))
        os.unlink(path)
    return dt


def plain_and_write(fw: Any, backward: bool, tmp: str) -> tuple[float, float]:
    """The step, then the streamed dump's bytes written to a new file (unlinked after)."""
    if backward not in _STREAMED:  # not streamed yet in this pass: once, to know its bytes
        one(fw, "record stream", backward, tmp)
    data = _STREAMED[backward]
    path = os.path.join(tmp, "floor.bin")
    t0, c0 = time.perf_counter(), time.process_time()
    fw.step(backward)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for at in range(0, len(data), 1 << 20):
            os.write(fd, data[at:at + (1 << 20)])
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0, time.process_time() - c0
    os.unlink(path)
    return dt


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, ROOT)
    sys.path.insert(0, EXAMPLE)
    fw = (Torch if args.child == "torch" else Paddle)(args.batch, args.threads)
    if args.against:
        _load_against(args.against)
    modes = [m == "fwd+bwd" for m in args.modes]
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        # one pass after the other, each repeated as a loop repeats its step
        for backward in modes:
            for v in _variants(args, 0):  # warm-up: allocator, first-call costs, page cache
                one(fw, v, backward, tmp)
            for r in range(args.rounds):
                for v in _variants(args, r):
                    key = f"{'fwd+bwd' if backward else 'fwd'}|{v}"
                    times.setdefault(key, []).append(one(fw, v, backward, tmp))
    json.dump({k: [statistics.median(w for w, _ in v), statistics.median(c for _, c in v)]
               for k, v in times.items()}, sys.stdout)


def table(results: dict[str, dict[str, list[float]]]) -> str:
    rows = ["| framework | pass | variant | wall ms | floor | floor wall ms | wall / floor "
            "| CPU ms | floor CPU ms | CPU / floor |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for fw, med in results.items():
        for key, (wall, cpu) in med.items():
            mode, variant = key.split("|")
            floors = [f for f in FLOOR.get(variant.removesuffix(AGAINST), [])
                      if f"{mode}|{f}" in med]
            if not floors:
                rows.append(f"| {fw} | {mode} | {variant} | {wall * 1e3:.1f} | | | "
                            f"| {cpu * 1e3:.1f} | | |")
            for floor in floors:  # a row for each floor it has
                fwall, fcpu = med[f"{mode}|{floor}"]
                rows.append(f"| {fw} | {mode} | {variant} | {wall * 1e3:.1f} | {floor} | "
                            f"{fwall * 1e3:.1f} | {wall / fwall:.2f}x | {cpu * 1e3:.1f} | "
                            f"{fcpu * 1e3:.1f} | {cpu / fcpu:.2f}x |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frameworks", nargs="+", default=["torch", "paddle"], choices=["torch", "paddle"])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + EXTRA_VARIANTS,
                    help="a subset to time (a ratio needs its floor among them)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tmp", default=None, help="where the streamed dump goes (default: the system's)")
    ap.add_argument("--against", metavar="DIR", default=None,
                    help="also run every record variant with DIR's reprod (a checkout of the commit "
                         "before a change, built in place), interleaved with this one's")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    results = {}
    for fw in args.frameworks:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", fw, "--rounds", str(args.rounds),
               "--batch", str(args.batch), "--threads", str(args.threads), "--modes", *args.modes,
               "--variants", *args.variants]
        if args.tmp:
            cmd += ["--tmp", args.tmp]
        if args.against:
            cmd += ["--against", os.path.abspath(args.against)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        load = os.getloadavg()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[fw] = json.loads(out.strip().splitlines()[-1])
        print(f"{fw}: load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
              f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    if args.against:
        print(f"(against): reprod from {os.path.abspath(args.against)}", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
