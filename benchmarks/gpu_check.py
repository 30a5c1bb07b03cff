"""The GPU checks of issue 23, prepared for a session that is lent a CUDA device (one short run):

    python benchmarks/gpu_check.py                 # on cuda; exits 2 with one line where there is none
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU (the tests run this)

On MobileNetV3-Small from examples/mobilenetv3/ (seeded random weights, batch 8, 224x224):

1. **Complete copies.** ``record(model, backward=True)`` in float32 and in bfloat16: every key a
   leaf layer's output or a parameter's gradient is bit for bit what hand-written hooks copied
   in the same step with a blocking copy to the host (in float32 for bfloat16 values, which is exact),
   once the block has ended; bfloat16 keys carry their source dtype. On CUDA the record copies
   into pinned memory without blocking, so this is what proves they are complete.
2. **Overlap.** Forward steps (eval, no_grad), each ended by a synchronize: the model alone;
   hooks that copy every leaf layer's output to the host with a blocking copy (``.to("cpu",
   copy=True)``: the naive floor); ``record(containers=False, inputs=False)`` into memory; the same streaming to a file.
   Medians of ``--rounds`` after a warm-up, interleaved. ``record`` under the blocking hooks says
   its copies overlap the next layers. The floor of the streamed step: the model, then the
   streamed dump's bytes written to the same disk (``plain + write``).
3. **Streamed copies.** A streamed training step's dump is bit for bit what blocking hooks copied
   in the same step and the gradients left after it: on CUDA the copies reach the writer thread
   still in flight.

4. **Half-precision ports.** ``align_forward(calibrate=True)`` of the example's MobileNetV3
   against its Paddle port cast to float16 and to bfloat16 (``precision="auto"``: the torch
   model in that precision is the reference, its float32 run the noise): the faithful port
   passes, and the port with the example's Hardswish bug fails at that layer. Paddle's own GPU
   kernels, which the CPU lacks (the tests check the judging on emulated half layers); skipped
   where Paddle is not installed or, on the CPU, reported as the one-line error the CPU gives.

Prints a table and, last, one JSON line with every figure; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, "examples", "mobilenetv3")


def _model(torch: Any, device: str, dtype: Any, batch: int) -> tuple[Any, Any]:
    import numpy as np

    sys.path.insert(0, EXAMPLE)
    from torch_model import mobilenet_v3_small

    torch.manual_seed(0)
    m = mobilenet_v3_small(num_classes=1000)
    with torch.no_grad():  # BN statistics and biases that matter: no layer is an identity
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32))
    return m.eval().to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def _leaves(m: Any) -> list[tuple[str, Any]]:
    return [(n, mod) for n, mod in m.named_modules()
            if next(iter(mod.children()), None) is None or any(True for _ in mod.parameters(False))]


def check_stream(torch: Any, device: str, batch: int) -> dict[str, Any]:
    """A streamed training step's dump (leaf outputs and parameter gradients) against blocking
    copies taken by hooks in the same step and the gradients left after it (on CUDA the writer
    thread waits for each copy still in flight; the gradients' copies are enqueued on autograd's
    stream)."""
    import numpy as np

    import reprod
    from reprod import ReprodLogger
    from reprod.capture import parse_key, record

    m, x = _model(torch, device, torch.float32, batch)
    seen: dict[str, list[np.ndarray]] = {}
    handles = [mod.register_forward_hook(
        lambda mod, a, out, n=n: seen.setdefault(n, []).append(out.detach().to("cpu", copy=True).numpy()))
        for n, mod in _leaves(m)]
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    path = os.path.join(tmp, "s.npz")
    try:
        with ReprodLogger(stream_to=path) as log, \
                record(m, log, backward=True, containers=False, inputs=False):
            m(x).sum().backward()
    finally:
        for h in handles:
            h.remove()
    bad: list[str] = []
    checked = 0
    dump = reprod.load(path, verify=True)
    for key in dump:
        k = parse_key(key)
        if k is None or k.items:
            continue
        if k.is_param:
            want = m.get_parameter(k.name).grad.detach().to("cpu", copy=True).numpy()
        elif k.what == "out" and k.name in seen:
            want = seen[k.name][k.call - 1]
        else:
            continue
        checked += 1
        value = np.asarray(dump[key])
        if value.shape != want.shape or not np.array_equal(value, want):
            bad.append(key)
    del dump
    os.remove(path)
    os.rmdir(tmp)
    return {"dtype": "float32, streamed", "keys checked": checked, "wrong": bad[:10],
            "passed": checked > 100 and not bad}


def check_copies(torch: Any, device: str, dtype: Any, batch: int) -> dict[str, Any]:
    """``record``'s keys against blocking copies taken by hooks in the same step."""
    import numpy as np

    from reprod.capture import parse_key, record

    m, x = _model(torch, device, dtype, batch)
    seen: dict[str, list[np.ndarray]] = {}

    def keep(name: str) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            # copy=True: on the CPU .cpu() is the tensor itself, which an in-place activation
            # after it changes
            seen.setdefault(name, []).append(out.detach().to("cpu", torch.float32, copy=True).numpy())
        return hook

    handles = [mod.register_forward_hook(keep(n)) for n, mod in _leaves(m)]
    try:
        with record(m, backward=True, containers=False, inputs=False) as log:
            m(x).float().sum().backward()
    finally:
        for h in handles:
            h.remove()
    bad: list[str] = []
    checked = 0
    sources = log.source_dtypes
    want_source = "bfloat16" if dtype == torch.bfloat16 else None
    for key, value in log.data.items():
        k = parse_key(key)
        if k is None or k.items:
            continue
        if k.is_param:
            p = m.get_parameter(k.name)
            expected = p.grad.detach().to("cpu", torch.float32, copy=True).numpy()
        elif k.what == "out" and k.name in seen:
            expected = seen[k.name][k.call - 1]
        else:
            continue
        checked += 1
        if value.shape != expected.shape or not np.array_equal(value, expected):
            bad.append(key)
        elif sources.get(key) != want_source:
            bad.append(f"{key} (source dtype {sources.get(key)!r})")
    return {"dtype": str(dtype).replace("torch.", ""), "keys checked": checked, "wrong": bad[:10],
            "passed": checked > 100 and not bad}


def time_overlap(torch: Any, device: str, batch: int, rounds: int) -> dict[str, float]:
    """Median ms of a forward step per variant, each step ended by a synchronize."""
    from reprod import ReprodLogger
    from reprod.capture import record

    m, x = _model(torch, device, torch.float32, batch)
    leaves = _leaves(m)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")

    def plain() -> None:
        m(x)

    def hooks() -> None:
        copies: list[Any] = []
        hs = [mod.register_forward_hook(lambda mod, a, out: copies.append(out.detach().to("cpu", copy=True)))
              for _, mod in leaves]
        try:
            m(x)
        finally:
            for h in hs:
                h.remove()

    def rec() -> None:
        with record(m, containers=False, inputs=False):
            m(x)

    def stream() -> None:
        path = os.path.join(tmp, "s.npz")
        with ReprodLogger(stream_to=path) as log, record(m, log, containers=False, inputs=False):
            m(x)
        os.remove(path)

    with torch.no_grad():  # the size of a streamed step's dump, for the write floor
        stream()
        path = os.path.join(tmp, "s.npz")
        with ReprodLogger(stream_to=path) as log, record(m, log, containers=False, inputs=False):
            m(x)
        dump_bytes = os.path.getsize(path)
        os.remove(path)
    # the dump's bytes in host memory, as the pinned copies are (round 7's floor wrote a
    # cache-hot 256 KiB chunk over and over, which skips reading them from memory)
    import numpy as np

    block = memoryview(np.ones(dump_bytes, np.uint8))

    def plain_write() -> None:
        # the floor of a streamed step: the model, then the dump's bytes written to the same disk
        m(x)
        sync()
        path = os.path.join(tmp, "w.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            rest = block
            while rest:
                rest = rest[os.write(fd, rest[: 8 << 20]):]
        finally:
            os.close(fd)
        os.remove(path)

    variants = {"plain": plain, "hooks copy": hooks, "record": rec, "plain + write": plain_write,
                "record stream": stream}
    times: dict[str, list[float]] = {v: [] for v in variants}
    with torch.no_grad():
        for r in range(rounds + 2):  # two warm-up rounds
            names = list(variants)
            names = names[r % len(names):] + names[: r % len(names)]
            for v in names:
                sync()
                t0 = time.perf_counter()
                variants[v]()
                sync()
                if r >= 2:
                    times[v].append(time.perf_counter() - t0)
    os.rmdir(tmp)
    ms = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    ms["dump MiB"] = dump_bytes / 2**20
    return ms


def check_half_ports(device: str) -> list[dict[str, Any]]:
    """``align_forward`` on the example's Paddle port in float16 and bfloat16 (see the module's
    docstring, 4.)."""
    try:
        import paddle
    except ImportError:
        return [{"dtype": "-", "skipped": "paddle is not installed", "passed": True}]
    import numpy as np
    import torch

    from reprod.align import align_forward, load_into_paddle
    from reprod.errors import ReprodError

    sys.path.insert(0, EXAMPLE)
    import paddle_model
    from torch_model import mobilenet_v3_small

    paddle.set_device("gpu" if device == "cuda" else "cpu")
    torch.manual_seed(0)
    tm = mobilenet_v3_small(num_classes=10)
    with torch.no_grad():  # BN statistics and biases that matter
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    tm = tm.eval().to(device)
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 96), dtype=np.float32)
    out = []
    for dt in ("float16", "bfloat16"):
        row: dict[str, Any] = {"dtype": dt}
        for bug in (None, "hardswish"):
            pm = paddle_model.mobilenet_v3_small(num_classes=10)
            load_into_paddle(pm, tm)
            where = paddle_model.inject_bug(pm, bug) if bug else None
            pm.to(dtype=dt)
            try:
                r = align_forward(tm, pm, x, calibrate=True)
            except ReprodError as e:
                row.update(skipped=str(e), passed=device == "cpu")
                break
            worst = r.options.get("noise_multiple", {}).get("forward", {}).get("multiple")
            # how close the layers came alone and between them, on Paddle's own kernels: the
            # margins the CPU measured only on emulated ones
            alone = (r.options.get("layers") or {}).get("alone") or {}
            if bug is None:
                row.update(faithful_passed=r.passed, faithful_multiple=worst,
                           faithful_alone_largest=(alone.get("largest") or {}).get("multiple"),
                           faithful_alone_judged=alone.get("judged"),
                           faithful_alone_inputs=alone.get("inputs"))
            else:
                row.update(bug_failed=not r.passed,
                           bug_layer=r.options.get("divergence", {}).get("layer"),
                           bug_expected=where)
        if "skipped" not in row:
            row["passed"] = bool(row["faithful_passed"] and row["bug_failed"]
                                 and row["bug_layer"] == row["bug_expected"])
        out.append(row)
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False)")
        return 2
    out: dict[str, Any] = {"device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    out["copies"] = [check_copies(torch, args.device, dt, args.batch)
                     for dt in (torch.float32, torch.bfloat16)]
    out["copies"].append(check_stream(torch, args.device, args.batch))
    ms = time_overlap(torch, args.device, args.batch, args.rounds)
    out["dump MiB"] = round(ms.pop("dump MiB"), 1)
    out["forward ms"] = {k: round(v, 2) for k, v in ms.items()}
    out["record / hooks copy"] = round(ms["record"] / ms["hooks copy"], 3)
    out["record stream / hooks copy"] = round(ms["record stream"] / ms["hooks copy"], 3)
    out["record stream / plain + write"] = round(ms["record stream"] / ms["plain + write"], 3)
    for c in out["copies"]:
        print(f"copies, {c['dtype']}: {c['keys checked']} keys checked, "
              f"{'all bit for bit' if c['passed'] else 'WRONG: ' + ', '.join(c['wrong'])}")
    print(f"a streamed step's dump: {out['dump MiB']} MiB")
    print("| variant | forward ms (median) | / hooks copy |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {v / ms['hooks copy']:.2f}x |")
    out["half ports"] = check_half_ports(args.device)
    for h in out["half ports"]:
        print(f"half-precision port, {h['dtype']}: " + (
            f"skipped ({h['skipped']})" if "skipped" in h else
            f"faithful {'passes' if h['faithful_passed'] else 'FAILS'} at "
            f"{h['faithful_multiple']}x its noise; the Hardswish bug "
            f"{'fails' if h['bug_failed'] else 'PASSES'} at {h['bug_layer']}"))
    print(json.dumps(out))
    return 0 if all(c["passed"] for c in out["copies"] + out["half ports"]) else 1


if __name__ == "__main__":
    sys.exit(main())
