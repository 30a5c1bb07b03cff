"""What one benchmark process runs; ``run.py`` starts each in a fresh interpreter and measures it.

    _child.py reprod_log-diff REF.npy OTHER.npy      reprod_log's ReprodDiffHelper, as its users call it
    _child.py reprod-api REF OTHER                     reprod.compare from a script (no CLI)
    _child.py logger TOOL FORMAT WORKLOAD SCALE OUT    ReprodLogger.add for every key, then save
    _child.py stream STEPS OUT                         a streaming ReprodLogger over STEPS steps
    _child.py floor REF OTHER                          the floor of a comparison (below)
    _child.py logger floor FORMAT WORKLOAD SCALE OUT   the floor of a save: every array's bytes written

The logger modes build their arrays before the clock starts and print one JSON line with the
seconds spent in ``add`` and ``save``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def reprod_log_diff(ref: str, other: str) -> int:
    from reprod_log import ReprodDiffHelper

    helper = ReprodDiffHelper()
    a = helper.load_info(ref)
    b = helper.load_info(other)
    helper.compare_info(a, b)
    helper.report(path=os.devnull)
    return 0


def reprod_api(ref: str, other: str) -> int:
    import reprod

    return 0 if reprod.compare(ref, other).passed else 1


def floor(ref: str, other: str) -> int:
    """What any comparison of two dumps costs at least, past starting Python and importing numpy:
    reading both files from the page cache (4 MiB at a time into a buffer, as ``cat`` does) and
    one numpy pass over both as float32 (``|a - b|`` and its maximum, chunk by chunk, on one
    thread). Prints the seconds of the read alone and of the read with the pass."""
    import numpy as np

    chunk = 1 << 22
    a, b = bytearray(chunk), bytearray(chunk)
    diff = np.empty(chunk // 4, np.float32)

    def sweep(compute: bool) -> float:
        t0 = time.perf_counter()
        top = np.float32(0)
        with open(ref, "rb", buffering=0) as fa, open(other, "rb", buffering=0) as fb:
            while True:
                na, nb = fa.readinto(a), fb.readinto(b)
                if not na and not nb:
                    break
                n = min(na, nb) // 4
                if compute and n:
                    d = diff[:n]
                    with np.errstate(all="ignore"):  # file bytes read as float32: NaN, Inf
                        np.subtract(np.frombuffer(a, np.float32, n), np.frombuffer(b, np.float32, n), out=d)
                        np.abs(d, out=d)
                        top = max(top, np.nanmax(d))
        return time.perf_counter() - t0

    read = sweep(False)
    read_pass = sweep(True)
    print(json.dumps({"read": min(read, sweep(False)), "read_pass": read_pass}))
    return 0


def _write_floor(data: dict, path: str) -> None:
    """The least a save of ``data`` writes: every array's bytes, one write each, to one file."""
    import numpy as np

    with open(path, "wb", buffering=1 << 20) as f:
        for v in data.values():
            f.write(memoryview(np.ascontiguousarray(v).reshape(-1)).cast("B"))


def logger(tool: str, fmt: str, workload: str, scale: str, out: str) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import workloads

    spec = workloads.WORKLOADS[workload](float(scale))
    data = dict(workloads._arrays(spec, 0, False))
    path = f"{out}.{fmt}"
    if tool == "floor":
        t0 = time.perf_counter()
        _write_floor(data, path)
        t1 = time.perf_counter()
        print(json.dumps({"add": 0.0, "save": t1 - t0, "bytes": os.path.getsize(path)}))
        os.remove(path)
        return 0
    if tool == "reprod_log":
        from reprod_log import ReprodLogger
    else:
        from reprod import ReprodLogger
    t0 = time.perf_counter()
    log = ReprodLogger()
    for k, v in data.items():
        log.add(k, v)
    t1 = time.perf_counter()
    log.save(path)
    t2 = time.perf_counter()
    print(json.dumps({"add": t1 - t0, "save": t2 - t1, "bytes": os.path.getsize(path)}))
    os.remove(path)
    return 0


def stream(steps: str, out: str) -> int:
    """25 layers x (activation, grad) of 32 KiB per step, streamed to ``out``."""
    import numpy as np

    from reprod import ReprodLogger

    rng = np.random.default_rng(0)
    acts = [rng.standard_normal(8192, dtype=np.float32) for _ in range(50)]
    t0 = time.perf_counter()
    with ReprodLogger(stream_to=out) as log:
        for s in range(int(steps)):
            for i, a in enumerate(acts):
                log.add(f"step{s:05d}.layer{i // 2:02d}.{'grad' if i % 2 else 'activation'}", a)
    t1 = time.perf_counter()
    print(json.dumps({"seconds": t1 - t0, "bytes": os.path.getsize(out)}))
    os.remove(out)
    return 0


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    fn = {"reprod_log-diff": reprod_log_diff, "reprod-api": reprod_api, "logger": logger,
          "stream": stream, "floor": floor}[mode]
    sys.exit(fn(*args))
