"""Speed and memory of reprod against reprod_log, end to end, each run in a fresh process.

    python benchmarks/run.py            # full size (few-large is 2 GiB a side; see README.md)
    python benchmarks/run.py --quick    # small sizes, a minute or two

Generates the workloads (seeded) under benchmarks/data/ unless they are there already, then runs
reprod_log and reprod on the same files in interleaved rounds and prints a Markdown table of the
median wall time, peak RSS, peak private memory (RssAnon, sampled from /proc every 2 ms) and the
reprod/reprod_log ratios. Beside every figure, a floor measured in the same rounds: for a
comparison, starting Python and importing numpy, plus reading both files from the page cache and
one numpy pass over them (``_child.py floor``); for a save, writing every array's bytes to one
file; for start-up, ``python -c "import numpy"``. Linux only (it reads /proc and uses wait4).
"""

from __future__ import annotations

import argparse
import compileall
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import workloads  # noqa: E402

PY = sys.executable
CHILD = os.path.join(HERE, "_child.py")


# --- one measured process --------------------------------------------------------------------------


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmHWM) of a running process, 0 where unreadable."""
    anon = hwm = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return anon, hwm


def measure(cmd: list[str], *, env: Optional[dict[str, str]] = None, sample_s: float = 0.002,
            root: str = ROOT) -> dict[str, Any]:
    """Wall seconds, peak RSS and peak RssAnon (bytes) of one process; stdout kept in a file.
    ``root``: the checkout whose ``reprod`` it imports (its folder and PYTHONPATH).

    Peak RSS is the process's own VmHWM, sampled: wait4's ru_maxrss is not used because after a
    vfork/exec it also counts the parent's resident memory."""
    full_env = {**os.environ, "PYTHONPATH": root, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, cwd=root)
        peak_anon = peak_rss = 0
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon, hwm = _memory_kib(proc.pid)
            peak_anon = max(peak_anon, anon)
            peak_rss = max(peak_rss, hwm)
            time.sleep(sample_s)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"wall": wall, "rss": peak_rss * 1024, "anon": peak_anon * 1024,
            "rc": proc.returncode, "stdout": stdout, "stderr": stderr}


# --- what is run -----------------------------------------------------------------------------------


def diff_runs(files: dict[str, str], variants: bool) -> list[tuple[str, list[str], dict[str, str]]]:
    runs = [
        ("reprod_log .npy", [PY, CHILD, "reprod_log-diff", files["ref.npy"], files["other.npy"]], {}),
        ("reprod .npy", [PY, "-m", "reprod", files["ref.npy"], files["other.npy"], "--quiet"], {}),
        ("reprod .npz", [PY, "-m", "reprod", files["ref.npz"], files["other.npz"], "--quiet"], {}),
    ]
    if variants:
        runs += [
            ("reprod .npz, 1 thread", [PY, "-m", "reprod", files["ref.npz"], files["other.npz"], "--quiet"],
             {"REPROD_THREADS": "1"}),
            ("reprod .npz, numpy path", [PY, "-m", "reprod", files["ref.npz"], files["other.npz"], "--quiet"],
             {"REPROD_KERNEL": "0"}),
        ]
    return runs


def verify(files: dict[str, str], failing: list[str]) -> str:
    """Untimed: the keys reprod fails are exactly the perturbed ones, in both formats."""
    found = []
    for fmt in ("npy", "npz"):
        r = measure([PY, "-m", "reprod", files[f"ref.{fmt}"], files[f"other.{fmt}"], "--format", "json"])
        if r["rc"] not in (0, 1):
            raise SystemExit(f"reprod failed on {files[f'ref.{fmt}']} (exit {r['rc']}):\n{r['stderr'][-3000:]}")
        doc = json.loads(r["stdout"])
        found.append(sorted(k["key"] for k in doc["keys"] if not k["passed"]))
    if found[0] == found[1] == sorted(failing):
        return f"reprod fails exactly the {len(failing)} perturbed key(s), in both formats"
    return f"MISMATCH: reprod fails {found[0]} (.npy) and {found[1]} (.npz), perturbed {sorted(failing)}"


def generate(root: str, name: str, scale: float) -> dict[str, str]:
    """The workload's files, generated in a child process so that this one stays small (a child
    started from a big parent would inherit its memory figures)."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import workloads; "
            "workloads.generate(sys.argv[3], sys.argv[4], scale=float(sys.argv[5]), "
            "log=lambda m: print(m, file=sys.stderr))")
    subprocess.run([PY, "-c", code, HERE, ROOT, root, name, repr(scale)], check=True,
                   env={**os.environ, "PYTHONPATH": ROOT})
    return workloads.paths(root, name, scale)


def _evict(paths: Any) -> None:
    """Drop files from the page cache (reprod_log's copies of the next workload need the room)."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
        finally:
            os.close(fd)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def floor_of(samples: dict[str, list[Any]], fmt: str) -> dict[str, float]:
    """A comparison's floor from one run's samples: the median start of ``python -c "import
    numpy"`` plus the median in-process read of both files from the page cache and one numpy pass
    over them (``_child.py floor``); the read and the pass also apart."""
    start = _median(samples["start"])
    read = _median([s["read"] for s in samples[fmt]])
    read_pass = _median([s["read_pass"] for s in samples[fmt]])
    return {"start": start, "read": read, "pass": max(read_pass - read, 0.0), "floor": start + read_pass}


def run_workload(name: str, files: dict[str, str], rounds: int, reprod_log_rounds: int,
                 variants: bool, log: Any) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    for p in files.values():  # into the page cache, as for every later round
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    runs = diff_runs(files, variants)
    samples: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in runs}
    floor_samples: dict[str, list[Any]] = {"start": [], "npy": [], "npz": []}
    for r in range(rounds):
        # the floor, in the same rounds as the runs it is the floor of
        floor_samples["start"].append(measure([PY, "-c", "import numpy"])["wall"])
        for fmt in ("npy", "npz"):
            m = measure([PY, CHILD, "floor", files[f"ref.{fmt}"], files[f"other.{fmt}"]])
            if m["rc"] != 0:
                raise SystemExit(f"floor {fmt} failed:\n{m['stderr'][-3000:]}")
            floor_samples[fmt].append(json.loads(m["stdout"].strip().splitlines()[-1]))
        for label, cmd, env in runs:
            if label.startswith("reprod_log") and r >= reprod_log_rounds:
                continue
            m = measure(cmd, env=env)
            if m["rc"] not in (0, 1):
                raise SystemExit(f"{label} failed (exit {m['rc']}):\n{m['stderr'][-3000:]}")
            samples[label].append(m)
            log(f"  {name:10s} round {r + 1}/{rounds} {label:26s} {m['wall']:7.3f} s  "
                f"rss {m['rss'] / 2**20:7.0f} MiB  anon {m['anon'] / 2**20:7.0f} MiB")
    floors = {fmt: floor_of(floor_samples, fmt) for fmt in ("npy", "npz")}
    log(f"  {name:10s} floor: " + ", ".join(
        f".{fmt} {f['floor']:.3f} s (start {f['start']:.3f} + read {f['read']:.3f} + pass {f['pass']:.3f})"
        for fmt, f in floors.items()))
    return [{"workload": name, "run": label, "n": len(ms),
             "wall": _median([m["wall"] for m in ms]), "rss": _median([m["rss"] for m in ms]),
             "anon": _median([m["anon"] for m in ms]),
             "floor": floors["npz" if ".npz" in label else "npy"]["floor"]}
            for label, ms in samples.items()], floors


def run_logger(workload: str, scale: float, rounds: int, tmp: str, log: Any) -> list[dict[str, Any]]:
    # floor: every array's bytes written to one file, one write each (no format at all)
    cases = [("reprod_log", "npy"), ("reprod", "npy"), ("reprod", "npz"), ("floor", "bin")]
    samples: dict[str, list[dict[str, Any]]] = {f"{t} .{f}": [] for t, f in cases}
    for r in range(rounds):
        for tool, fmt in cases:
            m = measure([PY, CHILD, "logger", tool, fmt, workload, str(scale), os.path.join(tmp, "log")])
            if m["rc"] != 0:
                raise SystemExit(f"logger {tool} {fmt} failed:\n{m['stderr'][-3000:]}")
            m.update(json.loads(m["stdout"].strip().splitlines()[-1]))
            samples[f"{tool} .{fmt}"].append(m)
            log(f"  logger {workload:10s} round {r + 1}/{rounds} {tool} .{fmt}: add {m['add']:.3f} s "
                f"save {m['save']:.3f} s, anon {m['anon'] / 2**20:.0f} MiB")
    return [{"workload": workload, "run": label, "n": len(ms),
             "add": _median([m["add"] for m in ms]), "save": _median([m["save"] for m in ms]),
             "anon": _median([m["anon"] for m in ms])} for label, ms in samples.items()]


def run_stream(steps_list: list[int], tmp: str, log: Any) -> list[dict[str, Any]]:
    rows = []
    for steps in steps_list:
        m = measure([PY, CHILD, "stream", str(steps), os.path.join(tmp, "stream.npz")])
        if m["rc"] != 0:
            raise SystemExit(f"stream failed:\n{m['stderr'][-3000:]}")
        info = json.loads(m["stdout"].strip().splitlines()[-1])
        rows.append({"steps": steps, "keys": steps * 50, "bytes": info["bytes"],
                     "seconds": info["seconds"], "anon": m["anon"], "rss": m["rss"]})
        log(f"  stream {steps} steps: {info['seconds']:.2f} s, anon {m['anon'] / 2**20:.0f} MiB")
    return rows


def run_startup(tmp: str, rounds: int, log: Any) -> dict[str, Any]:
    import numpy as np

    import reprod

    a, b = os.path.join(tmp, "a.npy"), os.path.join(tmp, "b.npy")
    reprod.save(a, {"x": np.ones(10, np.float32)})
    reprod.save(b, {"x": np.ones(10, np.float32)})
    cases = {"python -c pass": [PY, "-c", "pass"],
             "python -c 'import numpy'": [PY, "-c", "import numpy"],
             "python -m reprod a.npy b.npy": [PY, "-m", "reprod", a, b],
             "reprod_log on a.npy b.npy": [PY, CHILD, "reprod_log-diff", a, b]}
    out: dict[str, Any] = {}
    for label, cmd in cases.items():
        out[label] = _median([measure(cmd)["wall"] for _ in range(rounds)])
        log(f"  startup {label}: {out[label]:.3f} s")
    imp = measure([PY, "-X", "importtime", "-m", "reprod", a, b])["stderr"]
    heavy = sorted({line.split("|")[-1].strip().split(".")[0] for line in imp.splitlines()
                    if line.startswith("import time:") and
                    line.split("|")[-1].strip().split(".")[0] in ("torch", "paddle", "pandas", "tabulate")})
    out["heavy imports"] = heavy
    return out


def _ratio(x: float, base: Optional[float]) -> str:
    return f"{x / base:.2f}x" if base else ""


# --- report ----------------------------------------------------------------------------------------


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB" if x < 2**30 else f"{x / 2**30:.2f} GiB"


def table(rows: list[dict[str, Any]], sizes: dict[str, str]) -> str:
    lines = ["| workload | run | n | wall (median) | floor | wall / floor | peak RSS | "
             "peak private (RssAnon) | speed-up vs reprod_log | private memory vs reprod_log |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["workload"]: r for r in rows if r["run"].startswith("reprod_log") and r["n"]}
    for r in rows:
        if not r["n"]:
            continue
        b = base.get(r["workload"])
        speed = mem = ""
        if b is not None and r is not b:
            speed = f"{b['wall'] / r['wall']:.1f}x"
            mem = f"{r['anon'] / b['anon']:.3f}"
        floor = r.get("floor")
        lines.append(f"| {r['workload']} ({sizes[r['workload']]}) | {r['run']} | {r['n']} | "
                     f"{r['wall']:.3f} s | {'' if floor is None else f'{floor:.3f} s'} | "
                     f"{_ratio(r['wall'], floor)} | {_mib(r['rss'])} | {_mib(r['anon'])} | {speed} | {mem} |")
    return "\n".join(lines)


def logger_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | logger | add | save | add+save | floor | add+save / floor | "
             "speed vs reprod_log | peak private |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["workload"]: r for r in rows if r["run"].startswith("reprod_log")}
    floors = {r["workload"]: r["save"] for r in rows if r["run"].startswith("floor")}
    for r in rows:
        if r["run"].startswith("floor"):
            continue
        b = base[r["workload"]]
        ratio = "" if r is b else f"{(b['add'] + b['save']) / (r['add'] + r['save']):.2f}x"
        fl = floors.get(r["workload"])
        lines.append(f"| {r['workload']} | {r['run']} | {r['add']:.3f} s | {r['save']:.3f} s | "
                     f"{r['add'] + r['save']:.3f} s | {'' if fl is None else f'{fl:.4f} s'} | "
                     f"{_ratio(r['add'] + r['save'], fl)} | {ratio} | {_mib(r['anon'])} |")
    return "\n".join(lines)


def machine() -> str:
    import numpy as np

    from reprod.diff import metrics

    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kernel = "compiled kernel" if metrics.kernel_available() else "numpy path"
    if metrics.kernel_available():
        from reprod import _native

        isa = getattr(_native.kernel(), "isa", None)
        kernel += f" ({isa()})" if isa else ""
    return (f"{_dt.date.today().isoformat()}, {cpu}, {os.cpu_count()} CPUs, {mem} RAM, "
            f"Python {platform.python_version()}, numpy {np.__version__}, {kernel}, "
            f"load average at start {os.getloadavg()[0]:.1f}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (scale 1/8)")
    p.add_argument("--scale", type=float, help="workload scale (default 1, or 0.125 with --quick)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--workloads", default="many-small,mixed,few-large")
    p.add_argument("--reprod-log-large-rounds", type=int, default=1,
                   help="rounds of reprod_log on few-large at full size (default 1: it needs ~5 GiB)")
    p.add_argument("--variants", action="store_true",
                   help="also run reprod with one thread and with the numpy path")
    p.add_argument("--no-logger", action="store_true", help="skip the ReprodLogger benchmarks")
    p.add_argument("--data", default=os.path.join(HERE, "data"), help="where the workloads live")
    p.add_argument("--json", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.125 if args.quick else 1.0)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    header = machine()
    log(header)
    # An installed package has its .pyc files; a work tree run with PYTHONDONTWRITEBYTECODE=1 (as
    # this project's machines are) would otherwise compile reprod's modules in every run (~15 ms).
    compileall.compile_dir(os.path.join(ROOT, "reprod"), quiet=1)
    rows: list[dict[str, Any]] = []
    sizes: dict[str, str] = {}
    verdicts: dict[str, str] = {}
    floors: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.workloads.split(","):
        files = generate(args.data, name, scale)
        with open(os.path.join(os.path.dirname(files["ref.npy"]), "workload.json")) as f:
            info = json.load(f)
        sizes[name] = f"{info['keys']:,} keys, {_mib(info['bytes'])} a side"
        verdicts[name] = verify(files, info["failing"])
        log(f"  {name}: {verdicts[name]}")
        large = name == "few-large" and scale >= 1.0
        got, floors[name] = run_workload(name, files, args.rounds,
                                         args.reprod_log_large_rounds if large else args.rounds,
                                         args.variants, log)
        rows += got
        _evict(files.values())  # leave the page cache to the next workload
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        startup = run_startup(tmp, args.rounds, log)
        logger_rows: list[dict[str, Any]] = []
        stream_rows: list[dict[str, Any]] = []
        if not args.no_logger:
            for name in ("many-small", "mixed"):
                logger_rows += run_logger(name, scale, max(1, min(args.rounds, 3)), tmp, log)
            stream_rows = run_stream([100, 1000] if scale >= 1.0 else [20, 200], tmp, log)
    print(f"Machine: {header}, load average at end {os.getloadavg()[0]:.1f}\n")
    print(table(rows, sizes))
    print()
    for name, v in verdicts.items():
        print(f"- {name}: {v}")
    print()
    print("Floors (same run; start = `python -c 'import numpy'`, read = both files from the page "
          "cache, pass = one numpy pass over both as float32):")
    for name, by_fmt in floors.items():
        print(f"- {name}: " + "; ".join(
            f".{fmt} {f['floor']:.3f} s = start {f['start']:.3f} + read {f['read']:.4f} + pass {f['pass']:.4f}"
            for fmt, f in by_fmt.items()))
    print()
    numpy_start = startup.get("python -c 'import numpy'")
    print("Start-up (median wall; x the `import numpy` start): " + ", ".join(
        f"{k} {v:.3f} s ({_ratio(v, numpy_start)})" for k, v in startup.items() if k != "heavy imports")
        + "; torch/paddle/pandas/tabulate imported by `python -m reprod`: "
        + (", ".join(startup["heavy imports"]) or "none"))
    if logger_rows:
        print()
        print(logger_table(logger_rows))
    if stream_rows:
        print()
        print("| streaming ReprodLogger | keys | file | time | peak private | peak RSS |")
        print("|---|---|---|---|---|---|")
        for s in stream_rows:
            print(f"| {s['steps']} steps | {s['keys']:,} | {_mib(s['bytes'])} | {s['seconds']:.2f} s | "
                  f"{_mib(s['anon'])} | {_mib(s['rss'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "rows": rows, "floors": floors, "startup": startup,
                       "logger": logger_rows,
                       "stream": stream_rows, "verdicts": verdicts, "sizes": sizes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
