"""The reprod_log drop-in pieces, one by one: ``load_info``'s plain dicts (copy-on-write views of the
file), ``reprod.compare`` as both a function and reprod_log's module, ``reprod.utils``,
``helper.diff_dict`` and the missing-file error.
"""

from __future__ import annotations

import ast
import copy
import inspect
import io
import json
import logging
import mmap
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import ReprodDiffHelper
from reprod.errors import DumpFormatError, DumpNotFoundError, KeyMismatchError, ReprodError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ("torch", "paddle", "pandas")


def _sample() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "logits": rng.normal(size=(4, 8)).astype(np.float32),
        "loss": np.array(0.25, dtype=np.float32),
        "labels": rng.integers(0, 10, 8),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
        "empty": np.zeros((0, 2), dtype=np.float32),
        "grads": {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": {"x": np.arange(3.0)}},
    }


def _base_mmap(arr: np.ndarray) -> Any:
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------------------------------------
# load_info: plain dicts of writable, copy-on-write arrays
# ---------------------------------------------------------------------------------------------


def test_load_info_returns_plain_nested_dicts(tmp_path: Path, fmt: str, assert_same_tree) -> None:
    p = reprod.save(tmp_path / f"d.{fmt}", _sample())
    info = ReprodDiffHelper().load_info(p)
    assert type(info) is dict and type(info["grads"]) is dict and type(info["grads"]["b"]) is dict
    assert_same_tree(info, _sample())
    for key, arr in _leaves(info).items():
        assert type(arr) is np.ndarray and arr.flags.writeable, key


def test_load_info_dict_edits_never_reach_the_file(tmp_path: Path, fmt: str) -> None:
    p = reprod.save(tmp_path / f"d.{fmt}", _sample())
    before = Path(p).read_bytes()
    h = ReprodDiffHelper()
    info = h.load_info(p)
    info["logits"] *= 2
    info["grads"]["w"][0, 0] = 123.0
    info["fortran"] += 1
    info["new"] = np.ones(2)
    del info["labels"]
    assert info.pop("loss").shape == ()
    info.update({"extra": np.zeros(1)}, more=np.ones(1))
    assert list(info) == ["logits", "fortran", "empty", "grads", "new", "extra", "more"]
    np.testing.assert_array_equal(info["logits"], _sample()["logits"] * 2)
    assert Path(p).read_bytes() == before
    again = h.load_info(p)
    np.testing.assert_array_equal(again["logits"], _sample()["logits"])
    assert again["grads"]["w"][0, 0] == _sample()["grads"]["w"][0, 0]
    assert list(again) == list(_sample())


def test_load_info_dict_copies_pickles_and_prints(tmp_path: Path, fmt: str, assert_same_tree) -> None:
    p = reprod.save(tmp_path / f"d.{fmt}", _sample())
    info = ReprodDiffHelper().load_info(p)
    deep = copy.deepcopy(info)
    deep["logits"][:] = 0  # the deep copy is independent
    assert info["logits"].any()
    assert_same_tree(pickle.loads(pickle.dumps(info)), _sample())
    assert_same_tree(copy.copy(info), _sample())
    text = repr(info)
    assert text.startswith("{'logits': array(") and "'grads': {'w': array(" in text
    print(info)


def test_load_info_views_a_private_mapping_without_copying(tmp_path: Path, fmt: str) -> None:
    big = np.arange(1 << 18, dtype=np.float32)
    p = reprod.save(tmp_path / f"big.{fmt}", {"big": big, "small": np.ones(3)})
    info = ReprodDiffHelper().load_info(p)
    arr = info["big"]
    assert not arr.flags.owndata
    base = _base_mmap(arr)
    assert isinstance(base, mmap.mmap), type(base)  # a view of the file, not a copy
    arr[:] = -1.0  # copy-on-write: this process's pages only
    np.testing.assert_array_equal(reprod.load(p)["big"], big)


def test_load_info_copies_what_cannot_be_viewed(tmp_path: Path) -> None:
    """A compressed member, and bfloat16 widened to float32: writable arrays of their own."""
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=np.arange(6.0).reshape(2, 3))
    info = ReprodDiffHelper().load_info(str(p))
    assert info["x"].flags.writeable
    info["x"] *= 2
    np.testing.assert_array_equal(reprod.load(p)["x"], np.arange(6.0).reshape(2, 3))
    bf = np.array([1.0, 2.5, -0.375], dtype=np.float32)  # exact bfloat16 values
    q = reprod.save(tmp_path / "bf.npz", {"w": bf}, source_dtypes={"w": "bfloat16"})
    w = ReprodDiffHelper().load_info(q)["w"]
    assert w.dtype == np.float32 and w.flags.writeable
    np.testing.assert_array_equal(w, bf)
    w[0] = 9.0
    np.testing.assert_array_equal(reprod.load(q)["w"], bf)


def test_to_writable_dict_refuses_a_replaced_file(tmp_path: Path) -> None:
    p = reprod.save(tmp_path / "d.npy", {"x": np.arange(4.0)})
    dump = reprod.load(p)
    reprod.save(p, {"x": np.arange(4.0) + 1})  # same size, other bytes (an atomic replace)
    with pytest.raises(DumpFormatError, match="changed on disk"):
        dump.to_writable_dict()
    dump = reprod.load(p)
    dump.close()
    with pytest.raises(DumpFormatError, match="closed"):
        dump.to_writable_dict()


def test_reprod_load_stays_lazy_and_read_only(tmp_path: Path) -> None:
    p = reprod.save(tmp_path / "d.npz", _sample())
    d = reprod.load(p)
    assert isinstance(d, reprod.storage.Dump) and not d["logits"].flags.writeable


def test_compare_info_of_loaded_dicts_equals_compare_of_files(tmp_path: Path, fmt: str) -> None:
    a = _sample()
    b = copy.deepcopy(a)
    b["logits"] += np.float32(1e-3)
    b["grads"]["b"]["x"][1] = np.nan
    pa, pb = reprod.save(tmp_path / f"a.{fmt}", a), reprod.save(tmp_path / f"b.{fmt}", b)
    h = ReprodDiffHelper()
    h.compare_info(h.load_info(pa), h.load_info(pb))
    assert h.report(diff_method="all", diff_threshold=1e-4, path=None) is False
    want = reprod.compare(pa, pb, method="all", threshold=1e-4)
    assert [(r.key, r.status, r.mean_abs, r.max_abs) for r in h.result] == \
        [(r.key, r.status, r.mean_abs, r.max_abs) for r in want]


# ---------------------------------------------------------------------------------------------
# missing files
# ---------------------------------------------------------------------------------------------


def test_missing_file_is_a_file_not_found_error_and_a_reprod_error(tmp_path: Path,
                                                                   assert_one_line_error) -> None:
    p = tmp_path / "nope.npy"
    for load in (ReprodDiffHelper().load_info, reprod.load):
        with pytest.raises(FileNotFoundError) as info:
            load(str(p))
        err = info.value
        assert isinstance(err, DumpNotFoundError) and isinstance(err, DumpFormatError)
        assert isinstance(err, ReprodError)
        assert err.filename == str(p) and err.errno == 2
        assert_one_line_error(err, p)
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is DumpNotFoundError and str(again) == str(err)
    with pytest.raises(DumpFormatError) as info:
        reprod.load(tmp_path)  # a directory: not "not found"
    assert not isinstance(info.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# reprod.compare: the function and reprod_log's module
# ---------------------------------------------------------------------------------------------


def test_compare_is_callable_module_with_engine_signature_and_doc() -> None:
    import reprod.compare as mod
    from reprod.diff import engine

    assert reprod.compare is mod is sys.modules["reprod.compare"]
    from reprod import compare

    assert compare is mod and callable(compare)
    assert inspect.signature(reprod.compare) == inspect.signature(engine.compare)
    assert reprod.compare.__doc__ == engine.compare.__doc__
    r = reprod.compare({"x": np.ones(3)}, {"x": np.ones(3) + 1e-7}, method="max", threshold=1e-6)
    assert r.passed and r["x"].max_abs == pytest.approx(1e-7)
    assert pickle.loads(pickle.dumps(reprod.compare)) is mod


@pytest.mark.parametrize("order", ["attribute_first", "submodule_first", "from_import"])
def test_compare_binding_in_a_fresh_interpreter(order: str, tmp_path: Path) -> None:
    code = {
        "attribute_first": """
            import reprod
            r = reprod.compare({"x": np.ones(2)}, {"x": np.ones(2)})
            from reprod.compare import compute_diff
            import reprod.compare
        """,
        "submodule_first": """
            from reprod.compare import compute_diff, check_data
            import reprod
            r = reprod.compare({"x": np.ones(2)}, {"x": np.ones(2)})
        """,
        "from_import": """
            from reprod import compare
            r = compare({"x": np.ones(2)}, {"x": np.ones(2)})
            import reprod.compare
            from reprod.compare import compute_diff
            assert compare is reprod.compare
        """,
    }[order]
    script = "import json, sys\nimport numpy as np\n" + textwrap.dedent(code) + textwrap.dedent(f"""
        from reprod.utils import torch2np, paddle2np, np2torch, np2paddle, check_print_diff, init_logger
        assert r.passed and callable(reprod.compare)
        assert reprod.compare is sys.modules["reprod.compare"]
        assert compute_diff({{"x": np.ones(2)}}, {{"x": np.ones(2)}})["x"]["max"] == 0
        print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(loaded.values()), loaded


def _public_names(module: str) -> set[str]:
    """The names a reprod_log module defines or imports from its own package (read from its
    source, so reprod_log, which imports paddle, is not imported)."""
    spec = __import__("importlib.util").util.find_spec("reprod_log")
    if spec is None or spec.origin is None:
        pytest.skip("reprod_log is not installed")
    src = Path(spec.origin).with_name(f"{module}.py").read_text(encoding="utf-8")
    names: set[str] = set()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update(a.asname or a.name for a in node.names)
    return names


@pytest.mark.parametrize("module", ["compare", "utils"])
def test_every_public_name_of_reprod_log_module_is_importable(module: str) -> None:
    names = _public_names(module)
    assert names, module
    mod = __import__(f"reprod.{module}", fromlist=["_"])
    missing = [n for n in sorted(names) if not callable(getattr(mod, n, None))]
    assert not missing, missing
    assert set(names) <= set(mod.__all__)


# ---------------------------------------------------------------------------------------------
# compute_diff, check_data, check_print_diff
# ---------------------------------------------------------------------------------------------


def test_compute_diff_shape_and_types_like_reprod_log() -> None:
    from reprod.compare import compute_diff

    a32 = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    d = compute_diff(
        {"x": a32, "n": {"i": np.array([1, 5], dtype=np.int64), "h": a32.astype(np.float16)},
         "c": (a32 + 1j).astype(np.complex64)},
        {"x": a32 + np.float32(2**-20), "n": {"i": np.array([2, 2], dtype=np.int64),
                                               "h": a32.astype(np.float16)},
         "c": (a32 + 1j).astype(np.complex64)},
    )
    assert list(d) == ["x", "n", "c"] and list(d["n"]) == ["i", "h"]
    assert sorted(d["x"]) == ["max", "mean", "min"]
    assert type(d["x"]["mean"]) is np.float32 and d["x"]["mean"] == np.float32(2**-20)
    assert type(d["n"]["i"]["mean"]) is np.float64 and d["n"]["i"]["mean"] == 2.0
    assert type(d["n"]["i"]["max"]) is np.int64 and d["n"]["i"]["max"] == 3
    assert d["n"]["i"]["min"] == 1
    assert type(d["n"]["h"]["max"]) is np.float16
    assert type(d["c"]["max"]) is np.float32


def test_compute_diff_never_wraps_and_never_passes_nan() -> None:
    from reprod.compare import compute_diff
    from reprod.utils import check_print_diff

    d = compute_diff({"u": np.array([0, 10], np.uint8)}, {"u": np.array([255, 10], np.uint8)})
    assert d["u"]["max"] == 255 and d["u"]["mean"] == 127.5  # reprod_log: 1 and 0.5 (wrapped)
    with pytest.warns(UserWarning, match="NaN"):
        d = compute_diff({"x": np.array([1.0, np.nan])}, {"x": np.array([1.0, np.nan])})
    assert all(np.isnan(v) for v in d["x"].values())
    lines: list[str] = []
    assert check_print_diff(d, print_func=lines.append) is False
    assert lines == ["x: ", "\tmean diff: check passed: False, value: nan"]


@pytest.mark.parametrize("other, why", [
    ({"w": np.ones((3, 2))}, "transpose"),
    ({}, "missing"),
    ({"w": np.ones((2, 3)), "extra": np.ones(1)}, "only in other"),
    ({"w": np.ones((0, 3))}, "empty"),
], ids=["transpose", "missing", "extra", "empty"])  # fmt: skip
def test_compute_diff_fails_what_it_cannot_judge_with_a_warning(other: dict, why: str) -> None:
    from reprod.compare import compute_diff
    from reprod.utils import check_print_diff

    with pytest.warns(UserWarning, match=why):
        d = compute_diff({"w": np.ones((2, 3))}, other)
    bad = [k for k, v in d.items() if np.isnan(v["mean"])]
    assert bad, d
    assert check_print_diff(d, print_func=lambda s: None) is False


def test_compute_diff_of_both_empty_and_of_inf() -> None:
    from reprod.compare import compute_diff

    d = compute_diff({"e": np.zeros(0)}, {"e": np.zeros(0)})
    assert d == {"e": {"mean": 0.0, "max": 0.0, "min": 0.0}}
    with pytest.warns(UserWarning, match="Inf"):
        d = compute_diff({"i": np.array([np.inf, 1.0])}, {"i": np.array([1.0, 1.0])})
    assert d["i"]["max"] == np.inf


def test_check_data_names_the_keys() -> None:
    from reprod.compare import check_data

    check_data({"a": 1, "b": 2}, {"b": 3, "a": 4})
    with pytest.raises(KeyMismatchError, match=r"in data1 only: 'x'; in data2 only: 'y'") as info:
        check_data({"a": 1, "x": 1}, {"a": 1, "y": 2})
    assert isinstance(info.value, KeyError) and "\n" not in str(info.value)


def test_check_print_diff_lines_methods_and_nesting() -> None:
    from reprod.utils import check_print_diff

    d = {"a": {"mean": np.float32(0.5), "max": np.float32(2.0), "min": np.float32(0.0)},
         "g": {"w": {"mean": 0.0, "max": 0.0, "min": 0.0}}}
    lines: list[str] = []
    assert check_print_diff(d, diff_method="all", diff_threshold=1.0, print_func=lines.append) is False
    assert lines == [
        "a: ",
        "\tmin diff: check passed: True, value: 0.0",
        "\tmax diff: check passed: False, value: 2.0",
        "\tmean diff: check passed: True, value: 0.5",  # reprod_log: False (the max's verdict)
        "g",
        "\tw: ",
        "\t\tmin diff: check passed: True, value: 0.0",
        "\t\tmax diff: check passed: True, value: 0.0",
        "\t\tmean diff: check passed: True, value: 0.0",
    ]
    lines.clear()
    assert check_print_diff(d, ["min", "mean"], 1.0, lines.append, indent="  ") is True
    assert lines[:3] == ["a: ", "  min diff: check passed: True, value: 0.0",
                         "  mean diff: check passed: True, value: 0.5"]
    buf = io.StringIO()
    sys_stdout, sys.stdout = sys.stdout, buf
    try:
        check_print_diff({"a": d["a"]}, diff_threshold=1.0)  # print by default
    finally:
        sys.stdout = sys_stdout
    assert buf.getvalue() == "a: \n\tmean diff: check passed: True, value: 0.5\n"
    with pytest.raises(ReprodError, match="diff_method 'median'"):
        check_print_diff(d, diff_method="median")


def test_init_logger_twice_adds_no_second_handler(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from reprod.utils import init_logger

    name = "reprod-test-init-logger"
    log1, log2 = tmp_path / "a" / "one.log", tmp_path / "two.log"
    lg = init_logger(str(log1), name=name)
    lg.info("first")
    lg = init_logger(str(log2), name=name, log_level=logging.INFO)
    lg.info("second")
    lg.debug("hidden")
    try:
        out = capsys.readouterr().out.splitlines()
        assert [line.split("] ", 1)[1] for line in out] == [f"{name} INFO: first", f"{name} INFO: second"]
        assert log1.read_text().endswith(f"{name} INFO: first\n")
        assert log2.read_text().count("INFO") == 1
        assert len(logging.getLogger(name).handlers) == 2
    finally:
        for h in list(logging.getLogger(name).handlers):
            logging.getLogger(name).removeHandler(h)
            h.close()


def test_converters(torch, paddle) -> None:
    from reprod.utils import np2paddle, np2torch, paddle2np, torch2np

    x = {"x": np.arange(6, dtype=np.float64).reshape(2, 3), "n": 3}
    t, p = np2torch(x), np2paddle(x)
    assert t["x"].dtype == torch.float32 and t["n"] == 3  # torch.Tensor(v), as reprod_log
    assert str(p["x"].dtype) == "paddle.float64"
    tt = torch.ones(2, 2, requires_grad=True) * 2
    got = torch2np({"a": tt, "b": torch.ones(2, dtype=torch.bfloat16), "c": {"d": torch.zeros(1)}})
    assert got["a"].dtype == np.float32 and got["b"].dtype == np.float32 and got["c"]["d"].shape == (1,)
    assert torch2np(tt)["output"].shape == (2, 2)
    assert paddle2np(paddle.ones([3]))["output"].tolist() == [1.0, 1.0, 1.0]
    assert set(paddle2np({"a": paddle.ones([1]), "b": paddle.zeros([2])})) == {"a", "b"}
    with pytest.raises(ReprodError):
        np2torch([1, 2])


# ---------------------------------------------------------------------------------------------
# helper.diff_dict
# ---------------------------------------------------------------------------------------------


def test_diff_dict_is_reprod_logs_nested_dict(tmp_path: Path) -> None:
    a = {"logits": np.ones(4, np.float32), "grads": {"w": np.zeros(2)}, "gone": np.ones(1)}
    b = {"logits": np.ones(4, np.float32) + np.float32(2**-20), "grads": {"w": np.zeros(2)}}
    h = ReprodDiffHelper()
    assert not hasattr(h, "diff_dict")
    h.compare_info(a, b)
    dd = h.diff_dict
    assert type(dd) is dict and list(dd) == ["logits", "grads", "gone"]
    assert dd["logits"]["mean"] == np.float32(2**-20) and type(dd["logits"]["mean"]) is np.float32
    assert dd["grads"]["w"] == {"mean": 0.0, "max": 0.0, "min": 0.0}
    assert np.isnan(dd["gone"]["mean"])
    assert h.diff_dict is dd  # built once
    assert max(v["mean"] for k, v in dd.items() if k == "logits") <= 1e-6
    assert h.report(path=None) is False  # "gone" is missing
    h.compare_info(a, a)
    assert h.diff_dict is not dd and np.isfinite(h.diff_dict["gone"]["mean"])


def test_assigned_diff_dict_is_what_report_judges(capsys: pytest.CaptureFixture[str]) -> None:
    from reprod.compare import compute_diff

    h = ReprodDiffHelper()
    h.diff_dict = compute_diff({"x": np.zeros(2)}, {"x": np.full(2, 0.5)})
    assert h.report(path=None) is False
    out = [line.split("root INFO: ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert out == ["x: ", "\tmean diff: check passed: False, value: 0.5", "diff check failed"]


def test_warnings_are_not_left_on() -> None:
    # compute_diff warns through the warnings module only; nothing global is changed
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from reprod.compare import compute_diff

        compute_diff({"x": np.ones(1)}, {"x": np.ones(1)})
    assert seen == []


def test_int_keyed_dicts_compare_as_their_str() -> None:
    """reprod_log took ``add(3, x)``: dicts keyed by ints (nested too) compare, reported by str."""
    from reprod.compare import compute_diff

    a = {3: np.ones(2), "n": {1: np.zeros(1)}}
    b = {3: np.ones(2) + 0.5, "n": {1: np.zeros(1)}}
    assert compute_diff(a, b) == {"3": {"mean": 0.5, "max": 0.5, "min": 0.5},
                                  "n": {"1": {"mean": 0.0, "max": 0.0, "min": 0.0}}}
    h = ReprodDiffHelper()
    h.compare_info(a, b)
    assert h.report(diff_threshold=0.5, path=None) is True
    assert [r.key for r in h.result] == ["3", "n/1"] and h.diff_dict["3"]["mean"] == 0.5
