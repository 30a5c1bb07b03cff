"""What the real-model benchmarks (``align_train_cost.py``, ``align_train_memory.py``,
``pairing.py``) share: the process's memory figures, the environment check, the revision
measured, a median timer."""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable


def status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``, ``RssAnon``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if abs(n) < 2**30 else f"{n / 2**30:.2f} GiB"


def check_env(script: str) -> None:
    """SystemExit with one line where torch, torchvision or paddle is missing."""
    missing = [m for m in ("torch", "torchvision", "paddle") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"{script} needs torch, torchvision and paddle ({', '.join(missing)} missing): run "
            f"it with the real-model environment, OMP_NUM_THREADS=1 .venv-real/bin/python "
            f"benchmarks/{script}")


def revision(root: str) -> str:
    """The commit of ``root`` and whether its reprod/ differs from it, where it is a checkout."""
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "reprod"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (", reprod/ modified" if dirty else "")


def use_checkout(root: str) -> None:
    """Import reprod from ``root`` in a child (the checkout measured), and make sure it did."""
    sys.path.insert(0, os.path.abspath(root))
    import reprod

    assert os.path.dirname(os.path.dirname(os.path.abspath(reprod.__file__))) == \
        os.path.abspath(root), reprod.__file__


def median_seconds(fn: Callable[[], Any], rounds: int) -> float:
    """The median wall time of ``rounds`` calls of ``fn``."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
