"""Measure, on real models, how far a Paddle port is from the torch float32 reference in units of
the reference's own float32 noise (its distance from the float64 reference), for correct ports and
for injected bugs. This is what picks the default ``noise_factor`` of calibrated verdicts.

    .venv-real/bin/python tests/realworld/measure.py                       # resnet50 + mnv3 large
    .venv-real/bin/python tests/realworld/measure.py --models mobilenet_v3_small --seeds 0 1
    .venv-real/bin/python tests/realworld/measure.py --per-key              # every key on stdout

Per key: d = port - ref, n = ref - ref64 (the noise), and the noise multiple
    m = max( L2(d) / max(L2(n), eps32 * L2(ref)),  max|d| / max(max|n|, eps32 * max|ref|) )
(eps32 = 2**-23: a zero or tiny noise is floored at one float32 rounding of the reference).
The full per-key table goes to ``--detail`` (TSV).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import scenarios as S  # noqa: E402
import torch  # noqa: E402
from models import bugs_for, build_pair  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
PLAIN_MAX = 1e-5
PLAIN_MEAN = 1e-6


@dataclass
class Row:
    model: str
    seed: int
    scenario: str
    variant: str  # "correct" or a bug name
    key: str
    d_max: float
    d_l2: float
    d_mean: float
    n_max: float
    n_l2: float
    mult: float
    affected: bool  # differs from the correct port's value (always True for "correct")
    known: Optional[str]
    kink: bool = False  # downstream (in the gradient sense) of a ref-vs-port kink crossing

    @property
    def fails_plain(self) -> tuple[bool, bool]:
        return self.d_max > PLAIN_MAX, self.d_mean > PLAIN_MEAN


def key_stats(ref: np.ndarray, ref64: np.ndarray, port: np.ndarray) -> tuple[float, ...]:
    r = np.asarray(ref, dtype=np.float64)
    d = np.asarray(port, dtype=np.float64) - r
    n = r - np.asarray(ref64, dtype=np.float64)
    d_abs = np.abs(d)
    d_max = float(d_abs.max()) if d.size else 0.0
    d_l2 = float(np.sqrt(np.sum(d * d)))
    d_mean = float(d_abs.mean()) if d.size else 0.0
    n_max = float(np.abs(n).max()) if n.size else 0.0
    n_l2 = float(np.sqrt(np.sum(n * n)))
    r_max = float(np.abs(r).max()) if r.size else 0.0
    r_l2 = float(np.sqrt(np.sum(r * r)))
    mult = noise_multiple(d_max, d_l2, n_max, n_l2, r_max, r_l2)
    return d_max, d_l2, d_mean, n_max, n_l2, mult


def noise_multiple(d_max, d_l2, n_max, n_l2, r_max, r_l2) -> float:
    if d_max == 0.0:
        return 0.0
    fl_max = max(n_max, EPS32 * r_max)
    fl_l2 = max(n_l2, EPS32 * r_l2)
    if fl_max == 0.0 or fl_l2 == 0.0:
        return float("inf")
    return max(d_l2 / fl_l2, d_max / fl_max)


def kink_crossings(
    ref: dict, ref64: dict, port: dict, kinks_of: dict
) -> dict[str, tuple[int, int, int]]:
    """Per activation input key: (elements where ref and port lie on opposite sides of a kink,
    elements where ref and ref64 do, elements of the key)."""
    out = {}
    for k in ref:
        a = np.asarray(ref[k], np.float64)
        p = np.asarray(port[k], np.float64)
        t = np.asarray(ref64[k], np.float64)
        name = k.rsplit(".", 1)[0].split("#")[0]
        kinks = kinks_of.get(name, (0.0,))
        cp = ct = 0
        for kink in kinks:
            sa, sp, st = np.sign(a - kink), np.sign(p - kink), np.sign(t - kink)
            # one side strictly above, the other at or below (ReLU's derivative jumps there)
            cp += int(np.count_nonzero((sa > 0) != (sp > 0)))
            ct += int(np.count_nonzero((sa > 0) != (st > 0)))
        out[k] = (cp, ct, a.size)
    return out


def kink_affected(
    keys: list[str], crossing_calls: dict[int, list[str]], order: dict[str, int]
) -> set[str]:
    """Train keys that a kink crossing of the port (ref and port on opposite sides of a ReLU /
    Hardswish / Hardsigmoid kink in step s's forward) can reach: step-s gradients and step-s
    weights of parameters whose layer runs before the last crossing, and every key of later steps
    (their forward starts from weights that differ)."""
    steps = sorted(s for s, c in crossing_calls.items() if c)
    if not steps:
        return set()
    out = set()
    for k in keys:
        head, kind, *rest = k.split("/", 2)
        step = int(head[4:])
        if step > steps[0]:
            out.add(k)
            continue
        if step not in steps or kind == "loss":
            continue
        name = rest[0]
        if name.endswith(("running_mean", "running_var")):
            continue  # computed in the forward pass, before the crossing's backward
        last = max(order.get(c, -1) for c in crossing_calls[step])
        if order.get(name.rsplit(".", 1)[0], 10**9) < last:
            out.add(k)
    return out


def dist(values: list[float]) -> str:
    if not values:
        return "n=0"
    v = np.asarray(values)
    return (
        f"n={v.size:4d}  max={np.max(v):9.3g}  p99={np.percentile(v, 99):9.3g}  "
        f"median={np.median(v):9.3g}"
    )


def fmt_row(r: Row) -> str:
    flag = " KNOWN" if r.known else ""
    return (
        f"{r.model:20s} {r.scenario:7s} {r.variant:17s} {r.key:55s} "
        f"|d|max={r.d_max:9.3g} L2={r.d_l2:9.3g}  noise max={r.n_max:9.3g} L2={r.n_l2:9.3g}  "
        f"x{r.mult:9.3g}{flag}"
    )


def category(scenario: str, key: str) -> str:
    if scenario != "train":
        return scenario
    step, kind = key.split("/")[:2]
    if kind == "weight" and (key.endswith("running_mean") or key.endswith("running_var")):
        kind = "bn_stat"
    return f"{kind}@{step}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    ap.add_argument("--scenarios", nargs="+", default=list(S.SCENARIOS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--bugs", nargs="*", default=None, help="default: every bug that fits the model"
    )
    ap.add_argument("--per-key", action="store_true", help="print every key (long)")
    ap.add_argument("--detail", default="/tmp/reprod_realworld_detail.tsv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows: list[Row] = []
    kinks: list[tuple[str, int, dict]] = []
    timings: list[str] = []
    notes: list[str] = []
    t_all = time.time()
    for name in args.models:
        for seed in args.seeds:
            t0 = time.time()
            pair = build_pair(name, seed)
            timings.append(f"{name} seed {seed}: build {time.time() - t0:.1f}s")
            bugs = (
                bugs_for(name)
                if args.bugs is None
                else [b for b in args.bugs if b in bugs_for(name)]
            )
            for sc in args.scenarios:
                t0 = time.time()
                correct = S.run(sc, pair, seed)
                t_first = time.time() - t0
                notes += [f"{name}/{sc}: {n}" for n in correct.notes]
                for k in correct.ref:
                    st = key_stats(correct.ref[k], correct.ref64[k], correct.port[k])
                    rows.append(
                        Row(name, seed, sc, "correct", k, *st, True, S.known_difference(sc, k))
                    )
                crossing_calls: dict[int, list[str]] = {}
                for aux_key, triple in correct.aux.items():
                    if aux_key.startswith("act_in"):
                        kc = kink_crossings(*triple, correct.act_kinks)
                        kinks.append((f"{name} {aux_key.split('@')[1]}", seed, kc))
                        step = int(aux_key.split("@step")[1])
                        crossing_calls[step] = [k.rsplit(".", 1)[0] for k, v in kc.items() if v[0]]
                if crossing_calls:
                    hit = kink_affected(list(correct.ref), crossing_calls, correct.order)
                    for r in rows:
                        if (r.model, r.seed, r.scenario, r.variant) == (name, seed, sc, "correct"):
                            r.kink = r.key in hit
                t1 = time.time()
                for bug in bugs:
                    res = S.run(sc, pair, seed, bug)
                    notes += [f"{name}/{sc}/{bug}: {n}" for n in res.notes]
                    for k in res.ref:
                        st = key_stats(res.ref[k], res.ref64[k], res.port[k])
                        affected = not np.array_equal(res.port[k], correct.port[k])
                        rows.append(
                            Row(name, seed, sc, bug, k, *st, affected, S.known_difference(sc, k))
                        )
                t_bugs = time.time() - t1
                timings.append(
                    f"{name} seed {seed} {sc:7s}: torch f32+f64 and correct port {t_first:5.1f}s, "
                    f"{len(bugs)} bugged ports {t_bugs:5.1f}s, {len(correct.ref)} keys"
                )
                print(timings[-1], flush=True)
            S.clear_cache()
    total = time.time() - t_all

    with open(args.detail, "w") as f:
        f.write(
            "model\tseed\tscenario\tvariant\tkey\td_max\td_l2\td_mean\tn_max\tn_l2\tmult\taffected\tknown\n"
        )
        for r in rows:
            f.write(
                f"{r.model}\t{r.seed}\t{r.scenario}\t{r.variant}\t{r.key}\t{r.d_max:.6g}\t{r.d_l2:.6g}\t"
                f"{r.d_mean:.6g}\t{r.n_max:.6g}\t{r.n_l2:.6g}\t{r.mult:.6g}\t{int(r.affected)}\t{r.known or ''}\n"
            )

    if args.per_key:
        print("\n## Per key")
        for r in rows:
            if r.variant == "correct" or r.affected:
                print(fmt_row(r))

    print("\n## Timings")
    for t in timings:
        print("  " + t)
    print(f"  total {total:.1f}s")
    if notes:
        print("\n## Notes")
        for n in dict.fromkeys(notes):
            print("  " + n)

    print(
        f"\n## Before: keys failing plain thresholds (max|d| <= {PLAIN_MAX:g}; mean|d| <= {PLAIN_MEAN:g}),"
        f" summed over seeds {args.seeds}"
    )
    print(
        "| model | scenario | variant | keys | affected | fail max | fail mean | multiple over affected keys |"
    )
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.scenario, r.variant), []).append(r)
    for (m, sc, v), rs in groups.items():
        aff = [r for r in rs if r.affected and not r.known]
        fm = sum(r.fails_plain[0] for r in rs)
        fmean = sum(r.fails_plain[1] for r in rs)
        print(
            f"| {m} | {sc} | {v} | {len(rs)} | {len(aff) if v != 'correct' else '-'} | {fm} | {fmean} | "
            f"{dist([r.mult for r in aff])} |"
        )

    correct = [r for r in rows if r.variant == "correct" and not r.known]
    clean = [r for r in correct if not r.kink]
    print("\n## Noise multiple, correct ports (known differences excluded), by key category")
    print("   (kink-free keys; 'kink' = keys downstream of a ref-vs-port kink crossing, see below)")
    cats: dict[str, list[Row]] = {}
    for r in correct:
        cats.setdefault(f"{r.model} {category(r.scenario, r.key)}", []).append(r)
    for c, rs in cats.items():
        kinked = [r.mult for r in rs if r.kink]
        print(
            f"  {c:40s} {dist([r.mult for r in rs if not r.kink])}"
            + (f"   | kink: {dist(kinked)}" if kinked else "")
        )
    print(f"  {'ALL correct, kink-free':40s} {dist([r.mult for r in clean])}")
    print(f"  {'ALL correct, kink-affected':40s} {dist([r.mult for r in correct if r.kink])}")
    print("  largest kink-free:")
    for r in sorted(clean, key=lambda r: -r.mult)[:10]:
        print("    " + fmt_row(r))
    print("  largest kink-affected:")
    for r in sorted([r for r in correct if r.kink], key=lambda r: -r.mult)[:5]:
        print(f"    seed {r.seed} " + fmt_row(r))

    known = [r for r in rows if r.variant == "correct" and r.known]
    if known:
        print("\n## Known differences on correct ports (excluded above)")
        print(
            f"  {len(known)} keys: {dist([r.mult for r in known])}; "
            f"{sum(r.fails_plain[0] for r in known)} fail max<=1e-5"
        )

    print(
        "\n## Noise multiple over keys affected by each bug (keys whose port value changed; "
        "known-difference keys left out), all seeds"
    )
    # the weakest evidence per (bug, model, scenario): the smallest over seeds of the largest multiple
    bug_max: dict[str, float] = {}
    for bug in dict.fromkeys(r.variant for r in rows if r.variant != "correct"):
        for model in args.models:
            rs = [
                r
                for r in rows
                if r.variant == bug and r.model == model and r.affected and not r.known
            ]
            if not any(r.variant == bug and r.model == model for r in rows):
                continue
            print(f"  {bug:17s} {model:20s} {dist([r.mult for r in rs])}")
            for sc in args.scenarios:
                v = [r for r in rs if r.scenario == sc]
                if not v:
                    print(f"      {sc:8s} no key changed")
                    continue
                per_seed = {}
                for r in v:
                    per_seed[r.seed] = max(per_seed.get(r.seed, 0.0), r.mult)
                lead = max(v, key=lambda r: r.mult)
                print(
                    f"      {sc:8s} {dist([r.mult for r in v])}   min over seeds of max "
                    f"{min(per_seed.values()):9.3g}   (top: {lead.key})"
                )
                bug_max[f"{bug}/{model}/{sc}"] = min(per_seed.values())

    print("\n## Kink crossings in training (activation inputs of each step, correct port)")
    for model, seed, kc in kinks:
        sites_p = [k for k, (cp, _, _) in kc.items() if cp]
        sites_t = [k for k, (_, ct, _) in kc.items() if ct]
        n_p = sum(cp for cp, _, _ in kc.values())
        n_t = sum(ct for _, ct, _ in kc.values())
        n_all = sum(n for _, _, n in kc.values())
        print(
            f"  {model} seed {seed}: {len(kc)} activation calls, {n_all} elements; "
            f"ref vs port: {n_p} elements cross in {len(sites_p)} calls; "
            f"ref vs ref64: {n_t} elements in {len(sites_t)} calls"
        )
        for k in sites_p[:4]:
            print(f"      {k}: {kc[k][0]} (ref64: {kc[k][1]})")
    by_run: dict[tuple[str, int], list[Row]] = {}
    for r in correct:
        if r.scenario == "train":
            by_run.setdefault((r.model, r.seed), []).append(r)
    for (model, seed), rs in by_run.items():
        hit = [r for r in rs if r.kink]
        print(
            f"  {model} seed {seed}: {len(hit)} of {len(rs)} train keys downstream of a port-side "
            f"crossing; of those {sum(r.mult > 10 for r in hit)} exceed 10x noise "
            f"(max {max((r.mult for r in hit), default=0):.3g})"
        )

    print("\n## Factor")
    f_min = max((r.mult for r in clean), default=0.0)
    print(
        f"  kink-free correct keys need F >= {f_min:.3g}; with kink-affected keys "
        f"F >= {max((r.mult for r in correct), default=0.0):.3g}"
    )
    if bug_max:
        weakest = min(bug_max, key=bug_max.get)
        print(
            f"  every (bug, model, scenario) with an effect is caught, in every seed, while "
            f"F < {bug_max[weakest]:.3g} (weakest: {weakest})"
        )
    aff = [r for r in rows if r.variant != "correct" and r.affected and not r.known]
    for F in (2, 3, 5, 10, 15, 20, 30, 50, 100, 1000):
        fp = sum(r.mult > F for r in clean)
        fk = sum(r.mult > F for r in correct if r.kink)
        missed = [k for k, v in bug_max.items() if v <= F]
        frac = sum(r.mult > F for r in aff) / max(len(aff), 1)
        print(
            f"  F={F:5g}: correct keys failing {fp:4d} kink-free + {fk:4d} kink-affected; "
            f"(bug, model, scenario) missed {len(missed)} {missed[:2]}; "
            f"bug-affected keys flagged {frac:6.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
