"""The report writers' cost per key: ``reprod-diff REF OTHER --format F --output PATH`` against
``--quiet`` (the comparison alone) on the same pair, each run in a fresh process.

    python benchmarks/report_writers.py                        # 5,000 and 200,000 small keys
    python benchmarks/report_writers.py --keys 5000 --rounds 9
    python benchmarks/report_writers.py --data benchmarks/data/many-small   # a run.py workload
    python benchmarks/report_writers.py --against /path/to/other/checkout   # before/after

Pairs: ``many_keys.py``'s small keys (float32[16], ``block{i // 1000}/layer{i % 1000}.out``, one
key in 1,000 failing), written once under ``benchmarks/data/many_keys/``, or the ``ref.npy`` and
``other.npy`` of ``--data``. Every checkout (this one, then each ``--against``, its compiled
kernel built and its modules byte-compiled) runs every format in each round, interleaved, so that
a change of load hits all alike; the order alternates between rounds. The output file is removed
after each run, outside the clock (replacing a 200 MB file costs its unlink).

Table: median wall seconds; per key, the median less the same checkout's ``--quiet`` median,
divided by the keys; the ratio to ``--quiet``; the largest peak RSS of the runs. The machine's
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from many_keys import _files  # noqa: E402
from run import PY, _mib, measure  # noqa: E402

FORMATS = ("json", "csv", "log")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _command(root: str, ref: str, other: str, fmt: str, out: str) -> list[str]:
    if fmt == "quiet":
        return [PY, "-m", "reprod", ref, other, "--quiet"]
    return [PY, "-m", "reprod", ref, other, "--format", fmt, "--output", out, "--quiet"]


def _rounds(roots: list[str], ref: str, other: str, formats: list[str], rounds: int,
            tmp: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    got: dict[tuple[str, str], list[dict[str, Any]]] = {(r, f): [] for r in roots for f in formats}
    order = [(r, f) for r in roots for f in formats]
    for i in range(rounds):
        for root, fmt in order if i % 2 == 0 else order[::-1]:
            out = os.path.join(tmp, f"out.{fmt}")
            res = measure(_command(root, ref, other, fmt, out), root=root)
            if res["rc"] not in (0, 1):
                raise SystemExit(f"{root} {fmt}: exit {res['rc']}\n{res['stderr'][-3000:]}")
            got[(root, fmt)].append(res)
            if os.path.exists(out):
                os.remove(out)
    return got


def _table(title: str, keys: int, roots: list[str], formats: list[str],
           got: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    names = ["this checkout" if r == ROOT else r for r in roots]
    head = "| format | " + " | ".join(
        f"{n}: wall | per key | vs --quiet | peak RSS" for n in names) + " |"
    lines = [f"{title}, {keys:,} keys, median of {len(got[(roots[0], formats[0])])}", "",
             head, "|---|" + "---|---|---|---|" * len(roots)]
    for fmt in formats:
        cells = []
        for root in roots:
            runs = got[(root, fmt)]
            wall = statistics.median(r["wall"] for r in runs)
            quiet = statistics.median(r["wall"] for r in got[(root, "quiet")])
            per = "" if fmt == "quiet" else f"{(wall - quiet) / keys * 1e6:.1f} us"
            cells.append(f"{wall:.3f} s | {per} | {wall / quiet:.2f}x | "
                         f"{_mib(max(r['rss'] for r in runs))}")
        lines.append(f"| {'--quiet' if fmt == 'quiet' else fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, action="append",
                    help="keys of a many_keys.py small pair (repeatable; default 5,000 and 200,000)")
    ap.add_argument("--data", action="append", default=[],
                    help="a folder holding ref.npy and other.npy (repeatable)")
    ap.add_argument("--suffix", choices=("npy", "npz"), default="npy")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma list of json,csv,log")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--against", action="append", default=[],
                    help="another checkout whose reprod runs in the same rounds (repeatable)")
    args = ap.parse_args(argv)
    formats = ["quiet", *(f for f in args.formats.split(",") if f)]
    roots = [ROOT, *(os.path.abspath(a) for a in args.against)]
    for root in roots[1:]:
        if not os.path.isdir(os.path.join(root, "reprod")):
            raise SystemExit(f"{root}: no reprod package there")

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    pairs: list[tuple[str, str, str]] = []
    for d in args.data:
        pairs.append((d, os.path.join(d, f"ref.{args.suffix}"), os.path.join(d, f"other.{args.suffix}")))
    if not args.data or args.keys:
        for n in args.keys or [5_000, 200_000]:
            files = _files("small", n, log)
            pairs.append((f"many_keys small-{n}", files[f"ref.{args.suffix}"],
                          files[f"other.{args.suffix}"]))
    print(f"load average at start: {_load()}")
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, ref, other in pairs:
            keys = _count_keys(ref)
            log(f"{title}: {keys} keys, {args.rounds} rounds x {len(roots)} checkouts x "
                f"{len(formats)} runs")
            got = _rounds(roots, ref, other, formats, args.rounds, tmp)
            tables.append(_table(f"{title} .{args.suffix}", keys, roots, formats, got))
            print(f"load average after {title}: {_load()}", flush=True)
    print("\n\n".join(tables))
    return 0


def _count_keys(path: str) -> int:
    r = measure([PY, "-c", "import sys, reprod; print(len(reprod.load(sys.argv[1]).keys()))", path])
    if r["rc"]:
        raise SystemExit(f"{path}: {r['stderr'][-2000:]}")
    return int(r["stdout"].split()[-1])


if __name__ == "__main__":
    raise SystemExit(main())
