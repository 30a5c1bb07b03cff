"""``reprod-diff`` through a subprocess (``python -m reprod``): exit codes, every format checked
against numpy, bad input, folders, --first, --keys, --key-threshold, --output."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reprod
from reprod.cli import main
from reprod.report.data import files_from_json, from_json

REPO = Path(__file__).resolve().parents[1]


def run(*args: Any, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "reprod", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *names: str) -> str:
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("reprod-diff: error: "), err
    for name in names:
        assert name in err, err
    return err


@pytest.fixture
def dumps(tmp_path: Path) -> dict[str, Any]:
    """ref.npy and other.npy in reprod_log's format (np.save of a dict): x differs, n/y equal."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    x2 = x + (rng.standard_normal((4, 5)) * 1e-3).astype(np.float32)
    y = np.arange(6, dtype=np.int64).reshape(2, 3)
    ref = {"x": x, "n": {"y": y}, "loss": np.float32(0.5).reshape(())}
    other = {"x": x2, "n": {"y": y.copy()}, "loss": np.array([0.5], dtype=np.float32)}
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "other.npy", other)
    np.save(tmp_path / "same.npy", ref)
    diff = np.abs(x2.astype(np.float64) - x.astype(np.float64))
    return {"dir": tmp_path, "x": x, "x2": x2, "diff": diff}


# --- exit codes ----------------------------------------------------------------------------------


def test_identical_dumps_exit_0(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "same.npy", cwd=dumps["dir"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1] == "3 keys compared, 3 passed, 0 failed: PASSED"
    assert proc.stderr == ""


def test_failing_dumps_exit_1_with_table(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", cwd=dumps["dir"])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.rstrip().splitlines()
    assert lines[0].split() == [
        "key",
        "shape",
        "dtype",
        "mean_abs",
        "max_abs",
        "threshold",
        "verdict",
    ]
    row = next(line for line in lines if line.startswith(">>"))
    cells = row.split()
    assert cells[1] == "x" and cells[-1] == "FAILED"
    assert f"{dumps['diff'].mean():.3e}" in cells and f"{dumps['diff'].max():.3e}" in cells
    # loss: a (1,) against a () scalar passes, as every tutorial's loss check needs
    assert next(line for line in lines if line.split()[:1] == ["loss"]).split()[-1] == "ok"
    assert lines[-1].startswith("3 keys compared, 2 passed, 1 failed: FAILED; first failure x:")


def test_threshold_decides(dumps: dict[str, Any]) -> None:
    mean = dumps["diff"].mean()
    assert run("ref.npy", "other.npy", "--threshold", mean * 1.01, cwd=dumps["dir"]).returncode == 0
    assert run("ref.npy", "other.npy", "--threshold", mean * 0.99, cwd=dumps["dir"]).returncode == 1
    # judged by max, the same threshold that passes the mean fails
    proc = run(
        "ref.npy", "other.npy", "--threshold", mean * 1.01, "--method", "max", cwd=dumps["dir"]
    )
    assert proc.returncode == 1


def test_help_and_usage_errors_exit_codes(dumps: dict[str, Any]) -> None:
    assert run("--help", cwd=dumps["dir"]).returncode == 0
    assert main(["--help"]) == 0
    for args in (
        ["ref.npy"],
        ["ref.npy", "other.npy", "--method", "median"],
        ["ref.npy", "other.npy", "--threshold", "abc"],
        ["ref.npy", "other.npy", "--key-threshold", "x"],
        ["ref.npy", "other.npy", "--key-threshold", "x=median=1"],
        ["ref.npy", "other.npy", "--format", "xml"],
    ):
        proc = run(*args, cwd=dumps["dir"])
        assert proc.returncode == 2, args
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("reprod-diff: error:")


# --- bad input -----------------------------------------------------------------------------------


def test_missing_file_is_a_one_line_error(dumps: dict[str, Any]) -> None:
    one_line_error(run("ref.npy", "nope.npy", cwd=dumps["dir"]), "nope.npy")
    one_line_error(run("nope.npy", "ref.npy", cwd=dumps["dir"]), "nope.npy")


def test_random_bytes_and_truncated_files_are_one_line_errors(dumps: dict[str, Any]) -> None:
    d = dumps["dir"]
    (d / "random.npy").write_bytes(np.random.default_rng(0).bytes(512))
    one_line_error(run("ref.npy", "random.npy", cwd=d), "random.npy")
    full = (d / "other.npy").read_bytes()
    (d / "cut.npy").write_bytes(full[: len(full) // 2])
    one_line_error(run("ref.npy", "cut.npy", cwd=d), "cut.npy")
    (d / "empty.npz").write_bytes(b"")
    one_line_error(run("empty.npz", "ref.npy", cwd=d), "empty.npz")


def test_file_against_folder_is_a_usage_error(dumps: dict[str, Any]) -> None:
    (dumps["dir"] / "sub").mkdir()
    one_line_error(run("ref.npy", "sub", cwd=dumps["dir"]), "sub", "ref.npy")


def test_unsafe_pickle_is_refused(dumps: dict[str, Any]) -> None:
    d = dumps["dir"]
    # an object array holding an arbitrary object: loading it would run pickled code
    np.save(d / "evil.npy", np.array([{"x": Path("/")}], dtype=object), allow_pickle=True)
    assert not (d / "pwned").exists()
    one_line_error(run("ref.npy", "evil.npy", cwd=d), "evil.npy")


# --- formats -------------------------------------------------------------------------------------


def test_json_format_values_match_numpy(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", "--format", "json", cwd=dumps["dir"])
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["passed"] is False
    assert doc["summary"]["first_failure"] == "x"
    keys = {k["key"]: k for k in doc["keys"]}
    assert list(keys) == ["x", "n/y", "loss"]
    diff = dumps["diff"]
    assert keys["x"]["mean_abs"] == pytest.approx(diff.mean(), rel=1e-12)
    assert keys["x"]["max_abs"] == diff.max()  # max of the same float64 differences: exact
    assert keys["x"]["min_abs"] == diff.min()
    assert tuple(keys["x"]["worst_index"]) == np.unravel_index(diff.argmax(), diff.shape)
    assert keys["n/y"]["path"] == ["n", "y"] and keys["n/y"]["max_abs"] == 0.0
    # the document reads back into the same result
    assert from_json(proc.stdout).keys() == ["x", "n/y", "loss"]


def test_csv_format_values_match_numpy(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", "--format", "csv", cwd=dumps["dir"])
    assert proc.returncode == 1
    rows = {row["key"]: row for row in csv.DictReader(io.StringIO(proc.stdout))}
    assert list(rows) == ["x", "n/y", "loss"]
    diff = dumps["diff"]
    assert float(rows["x"]["mean_abs"]) == pytest.approx(diff.mean(), rel=1e-12)
    assert float(rows["x"]["max_abs"]) == diff.max()
    assert rows["x"]["passed"] == "false" and rows["x"]["status"] == "failed"
    assert json.loads(rows["x"]["ref_shape"]) == [4, 5]
    assert json.loads(rows["loss"]["ref_shape"]) == [] and json.loads(
        rows["loss"]["other_shape"]
    ) == [1]


def test_markdown_format(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", "--format", "markdown", cwd=dumps["dir"])
    assert proc.returncode == 1
    lines = proc.stdout.rstrip().splitlines()
    assert all(line.startswith("|") for line in lines[:5])
    assert lines[1].replace("|", "").replace("-", "") == ""
    assert lines[2].startswith("| >>") and "| x " in lines[2]
    assert lines[-1].startswith("3 keys compared, 2 passed, 1 failed: FAILED")


def test_log_format_is_reprod_log_shaped(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", "--format", "log", cwd=dumps["dir"])
    assert proc.returncode == 1
    lines = proc.stdout.rstrip("\n").split("\n")
    assert lines[0] == "x: "
    assert lines[1].startswith("\tmean diff: check passed: False, value: ")
    assert float(lines[1].rsplit(" ", 1)[1]) == pytest.approx(dumps["diff"].mean(), rel=1e-6)
    assert lines[2] == "n"  # nested parent printed bare
    assert lines[3] == "\ty: "
    assert lines[-1] == "diff check failed"


def test_npz_dumps(tmp_path: Path) -> None:
    a = {"w": np.linspace(0, 1, 10, dtype=np.float32), "b": {"c": np.ones((2, 2))}}
    b = {"w": a["w"] + np.float32(2e-6), "b": {"c": np.ones((2, 2))}}
    reprod.save(tmp_path / "a.npz", a)
    reprod.save(tmp_path / "b.npz", b)
    np.save(tmp_path / "b_legacy.npy", b)
    proc = run("a.npz", "b.npz", "--format", "json", cwd=tmp_path)
    assert proc.returncode == 1
    w = json.loads(proc.stdout)["keys"][0]
    diff = np.abs(b["w"].astype(np.float64) - a["w"].astype(np.float64))
    assert w["key"] == "w" and w["max_abs"] == diff.max()
    # a native dump against a legacy one: same verdicts
    assert run("a.npz", "b_legacy.npy", "--threshold", "1e-5", cwd=tmp_path).returncode == 0


# --- options -------------------------------------------------------------------------------------


def test_keys_selects(dumps: dict[str, Any]) -> None:
    proc = run(
        "ref.npy",
        "other.npy",
        "--keys",
        "n/*",
        "--keys",
        "loss",
        "--format",
        "json",
        cwd=dumps["dir"],
    )
    assert proc.returncode == 0, proc.stdout
    assert [k["key"] for k in json.loads(proc.stdout)["keys"]] == ["n/y", "loss"]
    one_line_error(run("ref.npy", "other.npy", "--keys", "zzz*", cwd=dumps["dir"]), "zzz*")


def test_key_threshold_overrides_one_key(dumps: dict[str, Any]) -> None:
    d, diff = dumps["dir"], dumps["diff"]
    loose = diff.max() * 1.01
    assert run("ref.npy", "other.npy", "--key-threshold", f"x={loose}", cwd=d).returncode == 0
    assert run("ref.npy", "other.npy", "--key-threshold", f"x*={loose}", cwd=d).returncode == 0
    assert run("ref.npy", "other.npy", "--key-threshold", f"y={loose}", cwd=d).returncode == 1
    # METHOD=VALUE sets that method's threshold for the key; the run's other methods still judge it
    proc = run(
        "ref.npy", "other.npy", "--key-threshold", f"x=max={loose}", "--format", "json", cwd=d
    )
    x = json.loads(proc.stdout)["keys"][0]
    assert x["thresholds"] == {"mean": 1e-6, "max": loose}
    assert x["checks"] == {"mean": False, "max": True} and proc.returncode == 1
    tight = diff.max() * 0.99
    assert (
        run(
            "ref.npy", "other.npy", "--key-threshold", f"x=mean={loose},max={loose}", cwd=d
        ).returncode
        == 0
    )
    assert (
        run(
            "ref.npy", "other.npy", "--key-threshold", f"x=mean={loose},max={tight}", cwd=d
        ).returncode
        == 1
    )
    # repeated for one pattern, the method settings merge
    assert (
        run(
            "ref.npy",
            "other.npy",
            "--key-threshold",
            f"x=mean={loose}",
            "--key-threshold",
            f"x=max={loose}",
            cwd=d,
        ).returncode
        == 0
    )


def test_methods_repeatable_and_comma_list(dumps: dict[str, Any]) -> None:
    d = dumps["dir"]
    for args in (["--method", "mean,max"], ["--method", "mean", "--method", "max"]):
        proc = run("ref.npy", "other.npy", *args, "--format", "json", cwd=d)
        doc = json.loads(proc.stdout)
        assert doc["options"]["methods"] == ["mean", "max"]
        assert set(doc["keys"][0]["checks"]) == {"mean", "max"}
    doc = json.loads(
        run("ref.npy", "other.npy", "--method", "all", "--format", "json", cwd=d).stdout
    )
    assert doc["options"]["methods"] == ["min", "max", "mean"]


def test_atol_rtol_count_like_numpy_isclose(dumps: dict[str, Any]) -> None:
    x, x2 = dumps["x"].astype(np.float64), dumps["x2"].astype(np.float64)
    atol, rtol = 2e-4, 1e-3
    proc = run(
        "ref.npy",
        "other.npy",
        "--threshold",
        "1",
        "--atol",
        atol,
        "--rtol",
        rtol,
        "--format",
        "json",
        cwd=dumps["dir"],
    )
    doc = json.loads(proc.stdout)
    want = int((~np.isclose(x2, x, atol=atol, rtol=rtol)).sum())
    assert 0 < want < x.size
    assert doc["keys"][0]["mismatched"] == want
    assert proc.returncode == 1


def test_equal_nan(tmp_path: Path) -> None:
    a = {"v": np.array([1.0, np.nan, 3.0])}
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", {"v": np.array([1.0, np.nan, 3.0])})
    proc = run("a.npy", "b.npy", cwd=tmp_path)
    assert proc.returncode == 1  # reprod_log let this NaN pass; reprod does not by default
    assert "NAN" in proc.stdout
    assert run("a.npy", "b.npy", "--equal-nan", cwd=tmp_path).returncode == 0


def test_first(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", "--first", cwd=dumps["dir"])
    assert proc.returncode == 1
    text = proc.stdout
    assert text.startswith("first failure: x (FAILED)")
    diff, x, x2 = dumps["diff"], dumps["x"], dumps["x2"]
    idx = np.unravel_index(diff.argmax(), diff.shape)
    worst = next(line for line in text.splitlines() if line.strip().startswith("worst:"))
    assert f"index ({idx[0]}, {idx[1]})" in worst
    assert f"ref {float(x[idx])!r}" in worst and f"other {float(x2[idx])!r}" in worst
    for stat in ("mean_abs", "max_abs", "min_abs", "mean_rel", "max_rel", "cosine"):
        assert f"  {stat}:" in text
    assert "n/y" not in text  # only the first failing key
    proc = run("ref.npy", "same.npy", "--first", cwd=dumps["dir"])
    assert proc.returncode == 0 and proc.stdout.startswith("all keys passed")


def test_output_writes_file_and_prints_summary(dumps: dict[str, Any]) -> None:
    d = dumps["dir"]
    out = d / "reports" / "diff.json"
    proc = run("ref.npy", "other.npy", "--format", "json", "--output", out, cwd=d)
    assert proc.returncode == 1
    assert proc.stdout.strip().startswith("3 keys compared, 2 passed, 1 failed: FAILED")
    assert len(proc.stdout.strip().splitlines()) == 1
    assert json.loads(out.read_text())["passed"] is False
    assert sorted(p.name for p in out.parent.iterdir()) == ["diff.json"]  # no temp file left
    # --quiet: nothing on stdout, the file is replaced
    proc = run("ref.npy", "same.npy", "--format", "csv", "--output", out, "--quiet", cwd=d)
    assert proc.returncode == 0 and proc.stdout == ""
    assert next(csv.reader(io.StringIO(out.read_text())))[0] == "key"


def test_quiet_prints_nothing(dumps: dict[str, Any]) -> None:
    proc = run("ref.npy", "other.npy", "--quiet", cwd=dumps["dir"])
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == ""


# --- folders -------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    ref, other = tmp_path / "torch", tmp_path / "paddle"
    for root in (ref, other):
        (root / "step2").mkdir(parents=True)
    w = np.linspace(-1, 1, 8, dtype=np.float32)
    np.save(ref / "forward.npy", {"logits": w})
    np.save(other / "forward.npy", {"logits": w.copy()})
    np.save(ref / "step2" / "loss.npy", {"loss": np.array(0.25, np.float32)})
    np.save(other / "step2" / "loss.npy", {"loss": np.array([0.25], np.float32)})
    reprod.save(ref / "step2" / "grads.npz", {"g": w * 2})
    reprod.save(other / "step2" / "grads.npz", {"g": w * 2})
    (ref / "notes.txt").write_text("not a dump")
    return ref, other


def test_folders_all_passing(folders: tuple[Path, Path]) -> None:
    ref, other = folders
    proc = run(ref, other, cwd=ref.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sections = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert sections == ["== forward.npy ==", "== step2/grads.npz ==", "== step2/loss.npy =="]
    assert (
        proc.stdout.rstrip().splitlines()[-1]
        == "3 files, 3 keys compared, 3 passed, 0 failed: PASSED"
    )


def test_folders_missing_partner_and_difference(folders: tuple[Path, Path]) -> None:
    ref, other = folders
    os.remove(other / "step2" / "loss.npy")
    w = np.linspace(-1, 1, 8, dtype=np.float32)
    reprod.save(other / "step2" / "grads.npz", {"g": w * 2 + np.float32(1e-3)})
    proc = run(ref, other, cwd=ref.parent)
    assert proc.returncode == 1
    last = proc.stdout.rstrip().splitlines()[-1]
    assert last.startswith("3 files, 3 keys compared, 1 passed, 2 failed: FAILED; first failure")
    assert "step2/grads.npz: g:" in last

    proc = run(ref, other, "--format", "json", cwd=ref.parent)
    doc = json.loads(proc.stdout)
    assert doc["passed"] is False
    assert list(doc["files"]) == ["forward.npy", "step2/grads.npz", "step2/loss.npy"]
    loss = doc["files"]["step2/loss.npy"]["keys"][0]
    assert loss["key"] == "loss" and loss["status"] == "missing"
    assert str(other / "step2" / "loss.npy") in loss["reason"]
    g = doc["files"]["step2/grads.npz"]["keys"][0]
    want = np.abs((w * 2 + np.float32(1e-3)).astype(np.float64) - (w * 2).astype(np.float64))
    assert g["max_abs"] == want.max()
    back = files_from_json(proc.stdout)
    assert back["forward.npy"].passed and not back["step2/loss.npy"].passed

    proc = run(ref, other, "--first", cwd=ref.parent)
    assert proc.stdout.startswith("file: step2/grads.npz\nfirst failure: g (FAILED)")

    rows = list(
        csv.DictReader(io.StringIO(run(ref, other, "--format", "csv", cwd=ref.parent).stdout))
    )
    assert [(r["file"], r["key"]) for r in rows] == [
        ("forward.npy", "logits"),
        ("step2/grads.npz", "g"),
        ("step2/loss.npy", "loss"),
    ]


def test_folders_extra_file_in_other_fails(folders: tuple[Path, Path]) -> None:
    ref, other = folders
    np.save(other / "extra.npy", {"z": np.zeros(2)})
    proc = run(ref, other, "--format", "json", cwd=ref.parent)
    assert proc.returncode == 1
    extra = json.loads(proc.stdout)["files"]["extra.npy"]["keys"][0]
    assert extra["status"] == "extra" and str(ref / "extra.npy") in extra["reason"]


def test_folders_with_a_corrupt_file_name_it(folders: tuple[Path, Path]) -> None:
    ref, other = folders
    (other / "forward.npy").write_bytes(b"\x93NUMPY garbage")
    one_line_error(run(ref, other, cwd=ref.parent), "forward.npy")


def test_empty_folders_are_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one_line_error(run("a", "b", cwd=tmp_path), "a")


# --- startup -------------------------------------------------------------------------------------


def test_text_formats_do_not_import_heavy_modules(dumps: dict[str, Any]) -> None:
    code = (
        "import sys\n"
        "from reprod.cli import main\n"
        "for fmt in ('table', 'log', 'json', 'csv', 'markdown'):\n"
        "    main(['ref.npy', 'other.npy', '--format', fmt, '--quiet'])\n"
        "main(['ref.npy', 'other.npy', '--first', '--quiet'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'torch', 'paddle'})\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=dumps["dir"],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_main_in_process_returns_the_exit_status(dumps: dict[str, Any], capsys: Any) -> None:
    d = str(dumps["dir"])
    assert main([f"{d}/ref.npy", f"{d}/same.npy"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": PASSED")
    assert main([f"{d}/ref.npy", f"{d}/other.npy", "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["summary"]["failed"] == 1
    assert main([f"{d}/ref.npy", f"{d}/nope.npy"]) == 2
    assert (
        capsys.readouterr().err == f"reprod-diff: error: {d}/nope.npy: no such file or directory\n"
    )
