"""Layers only one side records, compared by call order (``match_by_order``).

A port often records a layer the reference calls as a function (paddle.vision's ``nn.ReLU`` and
``AdaptiveAvgPool2D`` layers against torchvision's ``F.relu`` and ``adaptive_avg_pool2d``), or the
other way round. Such a layer keeps its input's shape, so shapes alone paired a ``BatchNorm`` with
the ``ReLU`` after it, and the layer itself stayed as keys one side lacks: a correct
inception_v3 port failed 419 of 604 keys, alexnet 16, mobilenet_v2 2. Now the pairing prefers
calls that see the same values, and a call one side makes where the other makes none between
the same two paired calls is left out, said in the summary. The captures are numpy-built, named
as ``record`` names its keys.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import reprod
from reprod.capture import first_divergence, match_by_order
from reprod.capture.naming import pair_layer_calls

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(1)
W = [RNG.standard_normal((6, 6)) * 0.4 for _ in range(4)]


def _ref(x: np.ndarray) -> dict[str, np.ndarray]:
    """lin0 -> bn0 -> relu (as a function) -> lin1 -> bn1 -> relu -> pool (a function) -> head."""
    log: dict[str, np.ndarray] = {"<model>.in": x}
    h = x
    for i in range(2):
        log[f"lin{i}.in"] = h
        log[f"lin{i}.out"] = h = h @ W[i]
        log[f"bn{i}.in"] = h
        log[f"bn{i}.out"] = h = (h - h.mean(0)) / h.std(0) * 0.8 + 0.1
        h = np.maximum(h, 0)
    h = h.mean(1, keepdims=True) * np.ones((1, 6))
    log["head.in"] = h
    log["head.out"] = h = h @ W[3]
    log["<model>.out"] = h
    return log


def _port(x: np.ndarray, *, eps: float = 0.0, wide: bool = False) -> dict[str, np.ndarray]:
    """The same with the ReLUs and the pooling as layers of their own; ``eps`` changes bn1 (a
    bug); ``wide`` gives lin1 another output size (a bug the pairing cannot bridge)."""
    log: dict[str, np.ndarray] = {"<model>.in": x}
    h = x
    for i in range(2):
        w = np.hstack([W[i], W[2][:, :1]]) if wide and i == 1 else W[i]
        log[f"blocks.{i}.fc.in"] = h
        log[f"blocks.{i}.fc.out"] = h = h @ w
        log[f"blocks.{i}.norm.in"] = h
        e = eps if i == 1 else 0.0
        log[f"blocks.{i}.norm.out"] = h = (h - h.mean(0)) / np.sqrt(h.var(0) + e) * 0.8 + 0.1
        log[f"blocks.{i}.act.in"] = h
        log[f"blocks.{i}.act.out"] = h = np.maximum(h, 0)
        if wide and i == 1:
            h = h[:, :6]
    log["pool.in"] = h
    log["pool.out"] = h = h.mean(1, keepdims=True) * np.ones((1, 6))
    log["fc_out.in"] = h
    log["fc_out.out"] = h = h @ W[3]
    log["<model>.out"] = h
    return log


X = RNG.standard_normal((4, 6))


def test_a_batchnorm_pairs_with_the_batchnorm_by_its_values() -> None:
    pairs = pair_layer_calls(_ref(X), _port(X))
    assert pairs["blocks.0.norm"] == "bn0" and pairs["blocks.1.norm"] == "bn1"
    assert "blocks.0.act" not in pairs and "pool" not in pairs


def test_layers_only_the_port_records_are_left_out_and_a_correct_port_passes() -> None:
    ref, other = match_by_order(_ref(X), _port(X))
    assert set(ref) == set(other)
    assert not any(k.startswith(("blocks.0.act", "blocks.1.act", "pool.")) for k in other)
    assert reprod.compare(ref, other, threshold=1e-12).passed
    # compare(pair=...) says what was left out
    r = reprod.compare(_ref(X), _port(X), pair=match_by_order, threshold=1e-12)
    assert r.passed and r.options["left_out"] == {"other": 6}
    assert "(6 other keys with no counterpart left out): PASSED" in r.summary_line()
    # the other way round: layers only the reference records
    r = reprod.compare(_port(X), _ref(X), pair=match_by_order, threshold=1e-12)
    # of those, the first ReLU sits between two paired layers, its data straight from the one
    # and into the other: it is judged on what the other side computed there (a function)
    assert r.passed and r.options["left_out"] == {"ref": 4}
    assert [k for k in r.keys() if "act" in k or "pool" in k] == ["blocks.0.act.in",
                                                                   "blocks.0.act.out"]


def test_a_bug_is_still_found_at_its_layer() -> None:
    r = reprod.compare(_ref(X), _port(X, eps=0.5), pair=match_by_order, threshold=1e-9)
    assert not r.passed and r.first_failure.key == "bn1.out"
    assert r["bn0.out"].passed and r["lin1.out"].passed
    d = first_divergence(r)
    assert d is not None and d.layer == "bn1"


def test_a_layer_of_another_size_still_fails_where_it_starts() -> None:
    # lin1 gives 7 outputs in the port: neither its fc nor its norm pairs; the calls around
    # them pair by shape as they can (shapes that agree by chance pair wrongly), and the first
    # failure is the first call after bn0, which aligns
    r = reprod.compare(_ref(X), _port(X, wide=True), pair=match_by_order, threshold=1e-9)
    assert not r.passed
    assert r["bn0.out"].passed
    assert r.first_failure.key.startswith(("lin1", "bn1")), r.first_failure.key


def test_cli_by_order_passes_the_correct_port_and_says_what_it_left_out(tmp_path: Path) -> None:
    reprod.save(str(tmp_path / "ref.npz"), _ref(X))
    reprod.save(str(tmp_path / "port.npz"), _port(X))
    run = subprocess.run([sys.executable, "-m", "reprod", str(tmp_path / "ref.npz"),
                          str(tmp_path / "port.npz"), "--by-order", "--threshold", "1e-9",
                          ], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 other keys with no counterpart left out" in run.stdout + run.stderr


# --- a port layer computing two reference layers in a row ---------------------------------------

def _ref_layers(x: np.ndarray) -> dict[str, np.ndarray]:
    """lin -> bn -> relu (a layer) -> head: torch's BatchNorm2d and ReLU."""
    log: dict[str, np.ndarray] = {"<model>.in": x}
    log["lin.in"] = x
    log["lin.out"] = h = x @ W[0]
    log["bn.in"] = h
    log["bn.out"] = h = (h - h.mean(0)) / h.std(0) * 0.8 + 0.1
    log["relu.in"] = h
    log["relu.out"] = h = np.maximum(h, 0)
    log["head.in"] = h
    log["head.out"] = h = h @ W[3]
    log["<model>.out"] = h
    return log


def _port_fused(x: np.ndarray, eps: float = 0.0) -> dict[str, np.ndarray]:
    """paddle's BatchNorm(act="relu"): one layer computing both; ``eps`` a bug in it."""
    log: dict[str, np.ndarray] = {"<model>.in": x}
    log["fc.in"] = x
    log["fc.out"] = h = x @ W[0]
    log["norm.in"] = h
    log["norm.out"] = h = np.maximum((h - h.mean(0)) / np.sqrt(h.var(0) + eps) * 0.8 + 0.1, 0)
    log["out.in"] = h
    log["out.out"] = h = h @ W[3]
    log["<model>.out"] = h
    return log


def test_a_fused_batchnorm_and_relu_is_set_against_the_relu_output() -> None:
    ref, other = match_by_order(_ref_layers(X), _port_fused(X))
    # the port's norm pairs with bn (their inputs agree), its output is relu's
    assert other["relu.out"] is _port_fused(X)["norm.out"] or np.array_equal(
        other["relu.out"], _port_fused(X)["norm.out"])
    assert "bn.in" in other and "bn.out" not in other
    assert "bn.out" not in ref and "relu.in" not in ref and "relu.out" in ref
    assert reprod.compare(ref, other, threshold=1e-12).passed
    # a bug in the fused layer: its values agree with neither reference layer, and its output
    # is set against the one it is nearer, relu's (set against bn's, the ReLU's zeros differed
    # as much as the bug); the two are named as one call of the port
    r = reprod.compare(_ref_layers(X), _port_fused(X, eps=0.5), pair=match_by_order, threshold=1e-9)
    assert not r.passed and r.first_failure.key == "relu.out"
    assert r["bn.in"].passed and "bn.out" not in r.keys()
    div = first_divergence(r)
    assert (div.folded, div.layer, div.input_aligned) == ("bn", "relu", True), div
    assert div.message.startswith("diverges at bn + relu, one layer in the port: input aligned")


def _ref_functional_relu(x: np.ndarray, relu: bool = True) -> dict[str, np.ndarray]:
    """lin -> bn -> F.relu (a function: not recorded) -> head, as torchvision's densenet ends."""
    log = {k: v for k, v in _ref_layers(x).items() if not k.startswith(("relu.", "head."))}
    h = log["bn.out"]
    log["head.in"] = h = np.maximum(h, 0) if relu else h
    log["head.out"] = log["<model>.out"] = h @ W[3]
    return log


def test_a_fused_relu_the_reference_calls_as_a_function_is_set_against_its_relu() -> None:
    """paddle's BatchNorm(act="relu") against a BatchNorm2d followed by F.relu: no reference
    layer records what the port's layer gives. A correct densenet121 port failed
    ``features.norm5`` so; the layer's output is set against the ReLU of the reference's now, and
    a noise reference's value is derived alike."""
    ref_map, port_map = _ref_functional_relu(X), _port_fused(X)
    ref, other = match_by_order(ref_map, port_map)
    assert np.array_equal(ref["bn.out"], np.maximum(ref_map["bn.out"], 0))
    assert ref.derived == {"bn.out": "relu"}
    r = reprod.compare(ref_map, port_map, pair=match_by_order, threshold=1e-12)
    assert r.passed and "relu of the reference's output" in r["bn.out"].note, r.summary_line()
    # the noise: a float32 run of the same reference, derived alike (an underived one, the
    # pre-activation, would read the ReLU's zeros as noise and pass anything)
    hi = _ref_functional_relu(X.astype(np.float64))
    lo = {k: v.astype(np.float32) for k, v in ref_map.items()}
    r = reprod.compare(lo, {k: v.astype(np.float32) for k, v in port_map.items()},
                       pair=match_by_order, noise=hi)
    assert r.passed and r["bn.out"].noise_multiple is not None, r.to_table()
    # a small bug in the fused layer: its statistics still look like the ReLU's, and the noise
    # finds it at the layer
    bug = {k: v.astype(np.float32) for k, v in _port_fused(X, eps=1e-3).items()}
    r = reprod.compare(lo, bug, pair=match_by_order, noise=hi)
    assert r.first_failure.key == "bn.out" and r["bn.in"].passed, r.to_table()
    # a large one: its output agrees with neither, and fails at the layer
    r = reprod.compare(ref_map, _port_fused(X, eps=0.5), pair=match_by_order, threshold=1e-9)
    assert r.first_failure.key == "bn.out" and r["bn.in"].passed
    # a port applying a ReLU the reference does not: the next layer's inputs differ, so the
    # layer's output is set against the reference's own, and fails there
    r = reprod.compare(_ref_functional_relu(X, relu=False), port_map, pair=match_by_order,
                       threshold=1e-9)
    assert r.first_failure.key == "bn.out" and r["bn.in"].passed
    assert not getattr(match_by_order(_ref_functional_relu(X, relu=False), port_map)[0],
                       "derived", None)


# --- blocks whose activations only one side records -------------------------------------------

def _blocks(x: np.ndarray, *, port: bool, residual: tuple[bool, ...] = (True, True)
            ) -> dict[str, np.ndarray]:
    """Two residual blocks x + relu(x @ w); the reference records its ReLU as a layer
    (``blocks.i.act``), the port calls it as a function, under other names."""
    log: dict[str, np.ndarray] = {"<model>.in": x}
    h = x
    for i in range(2):
        box = f"stages.{i}" if port else f"blocks.{i}"
        lin = f"{box}.lin" if port else f"{box}.fc"
        log[f"{box}.in"] = h
        log[f"{lin}.in"] = h
        log[f"{lin}.out"] = y = h @ W[i]
        if not port:
            log[f"{box}.act.in"] = y
            log[f"{box}.act.out"] = np.maximum(y, 0)
        y = np.maximum(y, 0)
        h = h + y if residual[i] else y
        log[f"{box}.out"] = h
    log["<model>.out"] = h
    return log


def test_blocks_pair_although_only_one_side_records_their_activations() -> None:
    pairs = pair_layer_calls(_blocks(X, port=False), _blocks(X, port=True))
    assert pairs["stages.0"] == "blocks.0" and pairs["stages.1"] == "blocks.1"
    r = reprod.compare(_blocks(X, port=False), _blocks(X, port=True), pair=match_by_order,
                       threshold=1e-12)
    assert r.passed and "blocks.1.out" in r.keys()
    bug = reprod.compare(_blocks(X, port=False), _blocks(X, port=True, residual=(True, False)),
                         pair=match_by_order, threshold=1e-9)
    d = first_divergence(bug)
    assert d is not None and d.layer == "blocks.1" and "own forward code" in d.message


def test_blocks_holding_the_same_leaves_but_giving_other_shapes_do_not_pair() -> None:
    # paddle.vision's dense layer returns its input and new features concatenated, torchvision's
    # the new features alone: the same leaves, blocks cut differently
    port = _blocks(X, port=True)
    port["stages.0.out"] = np.concatenate([port["stages.0.in"], port["stages.0.out"]], 1)
    pairs = pair_layer_calls(_blocks(X, port=False), port)
    assert "stages.0" not in pairs and pairs["stages.1"] == "blocks.1"
    r = reprod.compare(_blocks(X, port=False), port, pair=match_by_order, threshold=1e-12)
    assert r.passed and "blocks.0.out" not in r.keys()
