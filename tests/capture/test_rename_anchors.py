"""rename_by_order with anchors: layers paired by their weights fix the pairing where shapes alone
would pair a BatchNorm with the ReLU after it."""

from __future__ import annotations

import numpy as np

from reprod.capture import rename_by_order


def _calls(*layers: tuple[str, int, int]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, cin, cout in layers:
        out[f"{name}.in"] = np.zeros((1, cin), np.float32)
        out[f"{name}.out"] = np.zeros((1, cout), np.float32)
    return out


# torch: conv, bn, relu as layers; the port calls relu as a function (one layer fewer)
REF = _calls(("f.0", 3, 8), ("f.1", 8, 8), ("f.2", 8, 8), ("f.3", 8, 16), ("f.4", 16, 16))
PORT = _calls(("stem.conv", 3, 8), ("stem.bn", 8, 8), ("body.conv", 8, 16), ("body.bn", 16, 16))


def test_shapes_alone_can_pair_a_batchnorm_with_a_relu() -> None:
    # what the anchors are for: the values here say nothing (zeros everywhere), and shapes alone
    # pair the port's BN with either 8 -> 8 layer; a ReLU is not a BatchNorm
    got = rename_by_order(REF, PORT)
    assert sum(got.get(k) is PORT["stem.bn.out"] for k in ("f.1.out", "f.2.out")) == 1


def test_values_pair_a_batchnorm_with_the_batchnorm_not_the_relu_after_it() -> None:
    # a correct port sees the same values: the port BN's input is the reference BN's, not the
    # ReLU's (which is the BN's output); found without anchors
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3)).astype(np.float32)
    conv = rng.standard_normal((1, 8)).astype(np.float32)
    bn = (conv - conv.mean()) / conv.std() * 0.5 + 0.1
    relu = np.maximum(bn, 0)
    conv2 = rng.standard_normal((1, 16)).astype(np.float32)
    ref = {"f.0.in": x, "f.0.out": conv, "f.1.in": conv, "f.1.out": bn, "f.2.in": bn,
           "f.2.out": relu, "f.3.in": relu, "f.3.out": conv2, "f.4.in": conv2, "f.4.out": conv2}
    port = {"stem.conv.in": x, "stem.conv.out": conv, "stem.bn.in": conv, "stem.bn.out": bn,
            "body.conv.in": relu, "body.conv.out": conv2, "body.bn.in": conv2, "body.bn.out": conv2}
    got = rename_by_order(ref, port)
    assert got["f.1.out"] is port["stem.bn.out"] and got["f.1.in"] is port["stem.bn.in"]
    assert "f.2.out" not in got and got["f.4.out"] is port["body.bn.out"]


def test_anchors_fix_the_layers_their_weights_pair() -> None:
    anchors = {"stem.conv": "f.0", "stem.bn": "f.1", "body.conv": "f.3", "body.bn": "f.4"}
    got = rename_by_order(REF, PORT, anchors=anchors)
    assert list(got) == ["f.0.in", "f.0.out", "f.1.in", "f.1.out", "f.3.in", "f.3.out",
                         "f.4.in", "f.4.out"]
    assert got["f.1.out"] is PORT["stem.bn.out"]


def test_calls_between_anchors_pair_by_shape_and_a_second_anchor_to_one_call_is_dropped() -> None:
    ref = _calls(("a", 1, 2), ("act", 2, 2), ("b", 2, 3), ("c", 3, 4))
    port = _calls(("x", 1, 2), ("relu", 2, 2), ("y", 2, 3), ("z", 3, 4))
    # y and z both anchor to c: one reference call per port call, the first anchor wins (an
    # anchor crossing an earlier one pairs all the same: tests/capture/test_swapped_siblings.py)
    got = rename_by_order(ref, port, anchors={"x": "a", "y": "c", "z": "c"})
    assert got["a.out"] is port["x.out"]
    assert got["act.out"] is port["relu.out"]  # between anchors, by shape
    assert got["c.out"] is port["y.out"]  # the first anchor to c wins
