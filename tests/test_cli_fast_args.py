"""``reprod-diff`` reads common command lines without argparse (``cli._fast_args``): the same
arguments argparse would give, or None so that argparse reads them (and words the errors)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reprod.cli import _DEFAULTS, _fast_args, build_parser

SAME = [
    ["a.npy", "b.npy"],
    ["a.npy", "b.npy", "--quiet"],
    ["--quiet", "a.npz", "--verify", "b.npz"],
    ["a", "b", "--equal-nan", "--strict-shape", "--by-order", "--failed-only", "--first", "--quiet"],
    ["a", "b", "--quiet", "--quiet"],
    ["a", "b", "--format", "json", "--output", "out.json"],
    ["a", "b", "--html", "r.html", "--format", "csv"],
    ["a", "b", "--threshold", "1e-5"],
    ["a", "b", "--threshold", "nan"],
    ["a", "b", "--threshold", "3", "--threshold", "4"],
    ["a b", "c d"],
]
TO_ARGPARSE = [
    [], ["a"], ["a", "b", "c"], ["-h"], ["--help"], ["--version"], ["a", "b", "--qui"],
    ["a", "b", "--format=json"], ["a", "b", "--format", "xml"], ["a", "b", "--output"],
    ["a", "b", "--output", "-x"], ["a", "b", "--threshold", "-1"], ["a", "b", "--threshold", "x"],
    ["a", "b", "--method", "max"], ["a", "b", "--keys", "x*"], ["-", "b"], ["a", "--", "-b"],
    ["", "b"], ["a", "b", "--max-rows", "3"], ["a", "b", "--atol", "1"],
]


def test_defaults_are_the_parsers() -> None:
    parsed = vars(build_parser().parse_args(["a", "b"]))
    assert {k: v for k, v in parsed.items() if k not in ("ref", "other")} == _DEFAULTS


@pytest.mark.parametrize("argv", SAME)
def test_same_arguments_as_argparse(argv: list[str]) -> None:
    fast = _fast_args(argv)
    assert fast is not None
    assert repr(sorted(vars(fast).items())) == repr(sorted(vars(build_parser().parse_args(argv)).items()))


@pytest.mark.parametrize("argv", TO_ARGPARSE)
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert _fast_args(argv) is None


def test_quiet_run_imports_no_parser_and_no_renderer(tmp_path) -> None:
    import numpy as np

    import reprod

    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    reprod.save(a, {"x": np.ones(3, np.float32)})
    reprod.save(b, {"x": np.ones(3, np.float32)})
    code = ("import sys; from reprod.cli import main\n"
            "assert main([sys.argv[1], sys.argv[2], '--quiet']) == 0\n"
            "bad = [m for m in ('argparse', 'shutil', 'logging', 'reprod.cli_output', 'reprod.report',"
            " 'torch', 'paddle') if m in sys.modules]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code, a, b], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
