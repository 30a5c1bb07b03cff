"""Every KeyResult field of thousands of keys, for a before/after check of a refactoring.

    python tests/snapshot_keyresults.py OUT.json      # with the package on sys.path

Builds dumps in both formats (odd dtypes and shapes, NaN/Inf, overflow, bf16 sources, nested keys,
missing/extra/type/shape/empty pairs), compares them under several option sets (methods,
thresholds, per-key rules, atol/rtol, equal_nan) and through ``assert_aligned``'s dtype defaults,
and writes every field of every KeyResult (the creation time left out). Two runs of two versions
of the engine must write identical files.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np


def _dumps(rng: np.random.Generator) -> tuple[dict, dict]:
    ref: dict = {}
    other: dict = {}
    dtypes = ["float32", "float64", "float16", "int8", "uint8", "int32", "int64", "bool",
              "complex64", "complex128"]
    for i in range(1500):
        dt = dtypes[i % len(dtypes)]
        shape = [(), (1,), (7,), (3, 4), (2, 3, 5), (130,), (70000,)][i % 7]
        if shape == (70000,) and i % 3:
            shape = (33,)
        a = rng.standard_normal(shape) * (10.0 ** rng.integers(-3, 3))
        if dt.startswith("complex"):
            a = a + 1j * rng.standard_normal(shape)
        a = np.asarray(a).astype(dt)
        b = a.copy()
        kind = i % 13
        if b.size and kind in (1, 2, 3, 4):
            noise = rng.standard_normal(b.shape) * (10.0 ** -(kind + 3))
            b = (b + noise.astype(b.dtype) if b.dtype.kind not in "biu" else b + (kind == 4)).astype(dt)
        if b.size and kind == 5 and b.dtype.kind in "fc":
            b.flat[0] = np.nan
        if b.size and kind == 6 and b.dtype.kind in "fc":
            a.flat[-1] = np.nan
            b.flat[-1] = np.nan
        if b.size and kind == 7 and b.dtype.kind == "f":
            b.flat[0] = np.inf
        if kind == 8 and a.ndim == 2:
            b = b.T.copy()
        if kind == 9 and a.ndim >= 1:
            b = b.reshape(b.shape + (1,))
        if kind == 10 and b.dtype.kind == "f" and b.size:
            b = b.astype("float64" if dt == "float32" else "float32")
        key = f"k{i}" if i % 4 else f"grp{i % 5}/sub.{i}"
        ref[key] = a
        if kind == 11 and i % 2:
            continue  # missing
        other[key] = b
    other["only_other"] = np.ones(3, np.float32)
    ref["typed"] = {"x": np.ones(2)}
    other["typed"] = np.ones(2)
    ref["empty"] = np.zeros((0,), np.float32)
    other["empty"] = np.zeros((2,), np.float32)
    ref["huge"] = np.array([1e308, -1e308, 3.0])
    other["huge"] = np.array([-1e308, 1e308, 3.0])
    return ref, other


def _nest(flat: dict) -> dict:
    out: dict = {}
    for k, v in flat.items():
        if "/" in k and not isinstance(v, dict):
            head, tail = k.split("/", 1)
            out.setdefault(head, {})[tail] = v
        else:
            out[k] = v
    return out


def main(out_path: str) -> None:
    import reprod
    from reprod.testing import assert_aligned

    rng = np.random.default_rng(7)
    ref, other = _dumps(rng)
    ref, other = _nest(ref), _nest(other)
    option_sets = [
        {},
        {"method": "all", "threshold": 1e-5},
        {"method": ["max", "max_rel"], "threshold": 1e-4, "atol": 1e-6, "rtol": 1e-5},
        {"method": "max", "threshold": 1e-3, "per_key": {"k1*": 1e-1, "k22": {"max": 1.0, "atol": 1e-2},
                                                          "grp*": {"mean": 1e-9}}},
        {"method": None, "threshold": None, "atol": 1e-5, "rtol": 1e-6, "equal_nan": True},
    ]
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        sides = []
        for suffix in (".npy", ".npz"):
            pa, pb = os.path.join(tmp, "a" + suffix), os.path.join(tmp, "b" + suffix)
            reprod.save(pa, ref)
            reprod.save(pb, other)
            sides.append((pa, pb))
        sides.append((ref, other))
        for si, (a, b) in enumerate(sides):
            for oi, opts in enumerate(option_sets):
                r = reprod.compare(a, b, **opts)
                rows.append([si, oi, r.options, [kr.to_dict() for kr in r]])
        # assert_aligned's own results (dtype-default tolerances), through the plugin's hook
        import reprod.testing as t

        got: list = []
        t._push_listener(lambda res, kind, refname: got.append(res))
        try:
            for a, b in sides:
                try:
                    assert_aligned(a, b)
                except AssertionError as e:
                    rows.append(["assert", str(e).splitlines()[-3:]])
        finally:
            t._listeners.clear()
        for res in got:
            rows.append(["dtype-defaults", res.options, [kr.to_dict() for kr in res]])
        text = json.dumps(rows, sort_keys=True, default=str).replace(tmp, "<tmp>")
    with open(out_path, "w") as f:
        f.write(text)
    print(out_path, sum(len(r[-1]) for r in rows if isinstance(r[-1], list)), "key results")


if __name__ == "__main__":
    main(sys.argv[1])
