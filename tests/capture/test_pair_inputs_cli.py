"""``reprod-diff --pair-inputs``: layer captures whose names agree but whose inputs one side keys
by keyword and the other by position (``in[hidden_states]`` against ``in[0]``). By name the two
keys are a missing and an extra key; with the flag an input holding the same values is compared
under the reference's key (``reprod.capture.pair_inputs``), and one that differs stays unpaired.
Numpy only: dumps written by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reprod
from reprod.cli import build_parser, main

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 5, 8)).astype(np.float32)
Y = RNG.standard_normal((2, 5, 8)).astype(np.float32)


def _dumps(tmp_path, port_input=X, port_out=Y, layer="layers.0.self_attn"):
    ref = {"layers.0.self_attn.in[hidden_states]": X, "layers.0.self_attn.out": Y}
    port = {f"{layer}.in[0]": port_input, f"{layer}.out": port_out}
    a, b = tmp_path / "ref.npz", tmp_path / "port.npz"
    reprod.save(a, ref)
    reprod.save(b, port)
    return str(a), str(b)


def _report(tmp_path, *argv):
    out = tmp_path / "r.json"
    code = main([*argv, "--format", "json", "--output", str(out), "--threshold", "1e-5"])
    return code, {k["key"]: k for k in json.loads(out.read_text())["keys"]}


def test_by_name_the_two_keys_are_missing_and_extra(tmp_path) -> None:
    code, keys = _report(tmp_path, *_dumps(tmp_path))
    assert code == 1
    assert keys["layers.0.self_attn.in[hidden_states]"]["status"] == "missing"
    assert keys["layers.0.self_attn.in[0]"]["status"] == "extra"


@pytest.mark.parametrize("fast", [True, False])
def test_the_input_holding_the_same_values_is_compared_under_the_reference_s_key(tmp_path, fast
                                                                                ) -> None:
    a, b = _dumps(tmp_path, port_input=X + np.float32(1e-7))
    # the flag alone goes through the fast reading of the command line; with an abbreviation
    # argparse reads it: both the same
    flags = ["--pair-inputs"] if fast else ["--pair-in"]
    code, keys = _report(tmp_path, a, b, *flags)
    assert code == 0, keys
    assert set(keys) == {"layers.0.self_attn.in[hidden_states]", "layers.0.self_attn.out"}
    got = keys["layers.0.self_attn.in[hidden_states]"]
    assert got["status"] == "passed" and got["max_abs"] == pytest.approx(1e-7, rel=0.5)


def test_an_input_that_differs_stays_unpaired_and_fails(tmp_path) -> None:
    code, keys = _report(tmp_path, *_dumps(tmp_path, port_input=X * 1.1), "--pair-inputs")
    assert code == 1
    assert keys["layers.0.self_attn.in[hidden_states]"]["status"] == "missing"
    assert keys["layers.0.self_attn.in[0]"]["status"] == "extra"


def test_a_renamed_port_has_its_inputs_paired_after_the_renaming(tmp_path) -> None:
    a, b = _dumps(tmp_path, layer="encoder.0.attn")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([["^encoder\\.0\\.attn", "layers.0.self_attn"]]))
    code, keys = _report(tmp_path, a, b, "--rename", str(rules), "--pair-inputs")
    assert code == 0, keys
    assert set(keys) == {"layers.0.self_attn.in[hidden_states]", "layers.0.self_attn.out"}


def test_by_order_pairs_inputs_already(tmp_path) -> None:
    a, b = _dumps(tmp_path, layer="encoder.0.attn")
    for extra in ([], ["--pair-inputs"]):
        code, keys = _report(tmp_path, a, b, "--by-order", *extra)
        assert code == 0 and "layers.0.self_attn.in[hidden_states]" in keys, keys


def test_folders_on_several_processes_are_refused_in_one_line(tmp_path, capsys) -> None:
    for side in ("ref", "port"):
        (tmp_path / side).mkdir()
        reprod.save(tmp_path / side / "a.npz", {"x.in[0]": X})
    code = main([str(tmp_path / "ref"), str(tmp_path / "port"), "--pair-inputs", "--jobs", "2"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(
        "--by-order/--rename/--pair-inputs work in one process: leave out --jobs/--scheduler")


def test_the_parser_knows_the_flag() -> None:
    assert build_parser().parse_args(["a", "b"]).pair_inputs is False
    assert build_parser().parse_args(["a", "b", "--pair-inputs"]).pair_inputs is True


def test_outputs_pair_where_no_call_records_an_input(tmp_path) -> None:
    """Captures of outputs alone (``record(..., inputs=False)``, or hand-made): the lone output
    against the first of several paired all the same."""
    a, b = tmp_path / "ref.npz", tmp_path / "port.npz"
    reprod.save(a, {"attn.out": Y, "loss": np.float32(1.0)})
    reprod.save(b, {"attn.out[0]": Y, "attn.out[1]": X[:1], "loss": np.float32(1.0)})
    code, keys = _report(tmp_path, str(a), str(b), "--pair-inputs")
    assert keys["attn.out"]["status"] == "passed" and keys["attn.out[1]"]["status"] == "extra"
    assert code == 1  # the port's extra output is still a key the reference lacks
