"""Pairing layer captures by call order when they hold containers (``record``'s default).

By shapes alone a block pairs with a leaf, or a wrapper ``Sequential`` with the block around it
(a residual block keeps its input's shape), and a correct port failed most of its keys. Leaf layers
now pair by call order and each container with the one holding the same leaves
(``pair_layer_calls``); ``match_by_order`` (and ``reprod-diff --by-order``) leaves out the
containers that pair with nothing. The captures here are built in numpy, as ``record`` names
its keys, for a reference whose blocks wrap a ``Sequential`` and a port with other names, no
wrapper and a never-called list of blocks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import reprod
from reprod.capture import first_divergence, match_by_order, rename_by_order
from reprod.capture.naming import pair_layer_calls

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
W = [RNG.standard_normal((6, 6)).astype(np.float64) * 0.3 for _ in range(7)]


def _leaf(log: dict[str, np.ndarray], name: str, w: np.ndarray, v: np.ndarray,
          scale: float = 1.0) -> np.ndarray:
    """A linear leaf layer's call, recorded as ``record`` names it."""
    log[f"{name}.in"] = v
    log[f"{name}.out"] = out = (v @ w) * scale
    return out


def _ref(x: np.ndarray) -> dict[str, np.ndarray]:
    """stem -> blocks (Sequential of 3 blocks: x + relu(body(x)), body a Sequential of two
    linear layers) -> head, recorded with containers."""
    log: dict[str, np.ndarray] = {"<model>.in": x}

    def leaf(name: str, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return _leaf(log, name, w, v)

    h = leaf("stem", W[0], x)
    log["blocks.in"] = h
    for i in range(3):
        log[f"blocks.{i}.in"] = h
        log[f"blocks.{i}.body.in"] = h
        y = leaf(f"blocks.{i}.body.0", W[1 + 2 * i], h)
        y = leaf(f"blocks.{i}.body.1", W[2 + 2 * i], y)
        log[f"blocks.{i}.body.out"] = y
        h = h + np.maximum(y, 0)
        log[f"blocks.{i}.out"] = h
    log["blocks.out"] = h
    out = leaf("head", W[0].T, h)
    log["<model>.out"] = out
    return log


def _port(x: np.ndarray, residual: tuple[bool, ...] = (True, True, True),
          noise: float = 0.0) -> dict[str, np.ndarray]:
    """The same model under other names, no Sequential inside a block, the blocks in a list
    nobody calls; ``residual[i]=False`` drops block i's add."""
    log: dict[str, np.ndarray] = {"<model>.in": x}

    def leaf(name: str, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return _leaf(log, name, w, v, 1 + noise)

    h = leaf("conv_in", W[0], x)
    for i in range(3):
        log[f"stages.{i}.in"] = h
        y = leaf(f"stages.{i}.fc1", W[1 + 2 * i], h)
        y = leaf(f"stages.{i}.fc2", W[2 + 2 * i], y)
        h = h + np.maximum(y, 0) if residual[i] else np.maximum(y, 0)
        log[f"stages.{i}.out"] = h
    out = leaf("proj", W[0].T, h)
    log["<model>.out"] = out
    return log


X = RNG.standard_normal((4, 6))


def test_containers_pair_by_the_leaves_they_hold():
    pairs = pair_layer_calls(_ref(X), _port(X))
    assert pairs == {
        "conv_in": "stem", "proj": "head", "<model>": "<model>",
        **{f"stages.{i}.fc{j + 1}": f"blocks.{i}.body.{j}" for i in range(3) for j in range(2)},
        # a block and the Sequential inside it hold the same leaves: the outermost pair
        **{f"stages.{i}": f"blocks.{i}" for i in range(3)},
    }


def test_a_correct_port_passes_and_what_pairs_with_nothing_is_left_out():
    ref, other = match_by_order(_ref(X), _port(X, noise=1e-9))
    assert not any(".body.in" in k or ".body.out" in k or k.startswith("blocks.in")
                   or k.startswith("blocks.out") for k in ref)
    assert set(ref) == set(other)
    r = reprod.compare(ref, other, method="max", threshold=1e-6)
    assert r.passed and len(r) == 2 + 2 * 2 + 3 * 2 * 2 + 3 * 2  # model, stem/head, leaves, blocks
    # renamed alone, the wrappers with no counterpart are reported missing, not misjudged
    r = reprod.compare(_ref(X), rename_by_order(_ref(X), _port(X)), method="max", threshold=1e-6)
    assert {k.key for k in r.failed} == {"blocks.in", "blocks.out", *(
        f"blocks.{i}.body.{w}" for i in range(3) for w in ("in", "out"))}
    assert all(k.status == "missing" for k in r.failed)


def test_a_dropped_residual_is_named_at_its_block():
    for i in range(3):
        residual = tuple(j != i for j in range(3))
        r = reprod.compare(*match_by_order(_ref(X), _port(X, residual)), method="max",
                           threshold=1e-6)
        div = first_divergence(r)
        assert div.layer == f"blocks.{i}" and div.own_code, div.message
        assert div.message.endswith("its recorded sublayers align, so the cause is its own "
                                    "forward code")


def test_leaf_captures_pair_as_before():
    leaves = {k: v for k, v in _ref(X).items()  # what record(containers=False) keeps
              if k.rpartition(".")[0] in ("stem", "head")
              or k.rpartition(".")[0].rpartition(".")[0].endswith(".body")}
    port = {k: v for k, v in _port(X).items() if k.startswith(("conv_in", "proj", "stages.0.fc",
                                                                "stages.1.fc", "stages.2.fc"))}
    ref, other = match_by_order(leaves, port)
    renamed = rename_by_order(leaves, port)
    assert list(ref) == list(leaves) and all(ref[k] is leaves[k] for k in ref)
    assert list(other) == list(renamed) and all(other[k] is renamed[k] for k in other)
    assert reprod.compare(ref, other, threshold=1e-9).passed


def test_blocks_called_twice_pair_call_by_call():
    ref, port = _ref(X), _port(X)
    ref2, port2 = _ref(X * 2), _port(X * 2)
    for log, again in ((ref, ref2), (port, port2)):
        for k, v in again.items():  # a second forward pass in the same recording
            name, _, what = k.rpartition(".")
            log[f"{name}#2.{what}"] = v
    pairs = pair_layer_calls(ref, port)
    assert pairs["stages.1#2"] == "blocks.1#2" and pairs["stages.1"] == "blocks.1"
    assert reprod.compare(*match_by_order(ref, port), threshold=1e-9).passed


def test_reprod_diff_by_order_compares_captures_with_containers(tmp_path):
    reprod.save(tmp_path / "ref.npz", _ref(X))
    reprod.save(tmp_path / "port.npz", _port(X))
    reprod.save(tmp_path / "bug.npz", _port(X, (True, False, True)))
    cmd = [sys.executable, "-m", "reprod", str(tmp_path / "ref.npz")]
    env = {"PYTHONPATH": str(ROOT)}
    ok = subprocess.run([*cmd, str(tmp_path / "port.npz"), "--by-order", "--threshold", "1e-9",
                         "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    table = subprocess.run([*cmd, str(tmp_path / "port.npz"), "--by-order", "--threshold", "1e-9"],
                           capture_output=True, text=True, env=env, timeout=120)
    # what the pairing left out is said: the blocks' inner Sequentials and the list of blocks
    assert table.stdout.splitlines()[-1] == ("24 keys compared, 24 passed, 0 failed (8 reference "
                                             "keys with no counterpart left out): PASSED")
    bug = subprocess.run([*cmd, str(tmp_path / "bug.npz"), "--by-order", "--threshold", "1e-9",
                          "--first"], capture_output=True, text=True, env=env, timeout=120)
    assert bug.returncode == 1, bug.stdout + bug.stderr
    assert "blocks.1.out" in bug.stdout, bug.stdout


def test_compare_takes_a_pairing_that_leaves_reference_keys_out():
    r = reprod.compare(_ref(X), _port(X), pair=match_by_order, threshold=1e-9)
    assert r.passed and len(r) == 24 and r.options["left_out"] == {"ref": 8}
    assert r.summary_line() == ("24 keys compared, 24 passed, 0 failed (8 reference keys with no "
                                "counterpart left out): PASSED")
    assert "left_out" not in reprod.compare(_ref(X), _ref(X), threshold=0).options


def _port_wrapped(x: np.ndarray, residual: bool = True) -> dict[str, np.ndarray]:
    """The port nesting the other way round: each block alone in a one-block stage
    (``stages.i`` around ``stages.i.0``), no Sequential inside the block."""
    log: dict[str, np.ndarray] = {"<model>.in": x}

    def leaf(name: str, w: np.ndarray, v: np.ndarray) -> np.ndarray:
        return _leaf(log, name, w, v)

    h = leaf("conv_in", W[0], x)
    for i in range(3):
        log[f"stages.{i}.in"] = log[f"stages.{i}.0.in"] = h
        y = leaf(f"stages.{i}.0.fc1", W[1 + 2 * i], h)
        y = leaf(f"stages.{i}.0.fc2", W[2 + 2 * i], y)
        h = h + np.maximum(y, 0) if residual or i != 1 else np.maximum(y, 0)
        log[f"stages.{i}.0.out"] = log[f"stages.{i}.out"] = h
    log["<model>.out"] = leaf("proj", W[0].T, h)
    return log


def test_nested_the_other_way_round_only_the_outermost_pair():
    # pairing the inner ones too would set the port's block (after its add) against the
    # reference's Sequential (before it): a correct port would fail
    pairs = pair_layer_calls(_ref(X), _port_wrapped(X))
    assert {o: r for o, r in pairs.items() if o.startswith("stages.") and ".fc" not in o} == {
        f"stages.{i}": f"blocks.{i}" for i in range(3)}
    r = reprod.compare(*match_by_order(_ref(X), _port_wrapped(X)), threshold=1e-9)
    assert r.passed, r.to_table(failed_only=True)
    r = reprod.compare(*match_by_order(_ref(X), _port_wrapped(X, residual=False)), threshold=1e-9)
    assert first_divergence(r).layer == "blocks.1"
