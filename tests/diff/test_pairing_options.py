"""Pairing keys whose names differ: ``compare(pair=...)``, ``reprod-diff --by-order`` and
``--rename FILE`` (captures by call order, anything else leaf by leaf while shapes agree)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import reprod
from reprod.capture.naming import layer_key
from reprod.diff.pairing import rename_leaves_by_order


def _weights(names: list[str], rng: np.random.Generator, transpose_fc: bool = False) -> dict:
    shapes = [(8, 3, 3, 3), (8,), (10, 8), (10,)]
    out = {}
    for name, shape in zip(names, shapes):
        a = np.random.default_rng(len(out)).standard_normal(shape).astype(np.float32)
        out[name] = a.T.copy() if transpose_fc and a.ndim == 2 else a
    return out


def test_leaves_pair_by_order_while_shapes_agree() -> None:
    rng = np.random.default_rng(0)
    torch_side = _weights(["conv.weight", "conv.bias", "fc.weight", "fc.bias"], rng)
    paddle_side = _weights(["c0.w", "c0.b", "linear_1.w_0", "linear_1.b_0"], rng)
    r = reprod.compare(torch_side, paddle_side, method="max", threshold=0.0,
                       pair=rename_leaves_by_order)
    assert r.passed and r.keys() == list(torch_side)
    # an untransposed Linear still pairs, and is then reported as the transpose it is
    paddle_t = _weights(["c0.w", "c0.b", "linear_1.w_0", "linear_1.b_0"], rng, transpose_fc=True)
    r = reprod.compare(torch_side, paddle_t, pair=rename_leaves_by_order)
    assert r["fc.weight"].status == "shape" and "transpose" in r["fc.weight"].reason
    # a shape that disagrees stops the pairing: the rest are missing/extra, never paired wrongly
    shifted = dict(list(paddle_side.items())[1:])
    r = reprod.compare(torch_side, shifted, pair=rename_leaves_by_order)
    assert {kr.status for kr in r} == {"missing", "extra"}


def _captures(prefix: str, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for i in range(3):
        y = (x * (i + 1) * (scale if i == 1 else 1.0)).astype(np.float32)
        out[layer_key(f"{prefix}.{i}", 1, "in", [0])] = x
        out[layer_key(f"{prefix}.{i}", 1, "out")] = y
        x = y
    return out


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    paths = {
        "torch_w": reprod.save(tmp_path / "torch_w.npz", _weights(["conv.weight", "conv.bias", "fc.weight", "fc.bias"], rng)),
        "paddle_w": reprod.save(tmp_path / "paddle_w.npz", _weights(["c0.w", "c0.b", "l1.w", "l1.b"], rng)),
        "torch_cap": reprod.save(tmp_path / "torch_cap.npz", _captures("features")),
        "paddle_cap": reprod.save(tmp_path / "paddle_cap.npz", _captures("blocks", scale=1.5)),
    }
    return tmp_path, paths


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reprod", *args], capture_output=True, text=True)


def test_cli_by_order_pairs_weights_and_captures(files) -> None:
    tmp, p = files
    plain = _run(p["torch_w"], p["paddle_w"], "--quiet")
    assert plain.returncode == 1  # nothing pairs by name
    assert _run(p["torch_w"], p["paddle_w"], "--by-order", "--threshold", "0").returncode == 0
    cap = _run(p["torch_cap"], p["paddle_cap"], "--by-order", "--method", "max", "--threshold", "1e-6")
    assert cap.returncode == 1
    assert "features.1.out" in cap.stdout and "missing" not in cap.stdout


def test_cli_rename_file_dict_and_regex(files) -> None:
    tmp, p = files
    names = tmp / "names.json"
    names.write_text(json.dumps({"c0.w": "conv.weight", "c0.b": "conv.bias", "l1.w": "fc.weight",
                                 "l1.b": "fc.bias"}))
    assert _run(p["torch_w"], p["paddle_w"], "--rename", str(names), "--threshold", "0").returncode == 0
    regex = tmp / "regex.json"
    regex.write_text(json.dumps([["^blocks", "features"]]))
    r = _run(p["torch_cap"], p["paddle_cap"], "--rename", str(regex), "--method", "max",
             "--threshold", "1e-6")
    assert r.returncode == 1 and "features.1.out" in r.stdout and "missing" not in r.stdout
    bad = tmp / "bad.json"
    bad.write_text("{not json")
    r = _run(p["torch_w"], p["paddle_w"], "--rename", str(bad))
    assert r.returncode == 2 and "bad.json" in r.stderr and r.stderr.count("\n") == 1
    r = _run(p["torch_w"], p["paddle_w"], "--rename", str(names), "--by-order")
    assert r.returncode == 2
