"""A dump truncated by another process while it is mapped (issue 20): reading the vanished pages
raises SIGBUS. The kernel's reads are guarded (reprod/_kernel.c): the comparison ends with one
line naming the file and the key instead of the process dying. Each case runs in a child process
that maps the dumps, truncates one of them, then compares; the numpy path, which has no guard,
is shown still dying of the signal (SECURITY.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from reprod import _native

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS on truncated mmaps: Linux"),
    pytest.mark.skipif(_native.built() is None or not hasattr(_native.built(), "stats3"),
                       reason="the guard is in the compiled kernel"),
]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# argv: mode, folder, which file to truncate, extra compare() keywords as a Python literal
DRIVER = textwrap.dedent("""
    import ast, os, sys
    import reprod
    from reprod.errors import DumpChangedError, DumpFormatError
    mode, folder, victim, extra = sys.argv[1], sys.argv[2], sys.argv[3], ast.literal_eval(sys.argv[4])
    names = {n: os.path.join(folder, n) for n in os.listdir(folder)}
    if mode == "cli":
        import reprod.storage as storage
        load = storage.load
        def truncating_load(path, **kw):  # mapped, then truncated before anything is compared
            dump = load(path, **kw)
            if os.path.basename(str(path)) == victim:
                os.truncate(path, 4096)
            return dump
        storage.load = truncating_load
        from reprod.cli import main
        sys.exit(main([names["ref" + extra["ext"]], names["other" + extra["ext"]], "--quiet"]))
    dumps = {n: reprod.load(p) for n, p in names.items()}
    os.truncate(names[victim], 4096)
    kw = {k: dumps[v] if k == "noise" else v for k, v in extra.items()}
    ref = next(d for n, d in dumps.items() if n.startswith("ref."))
    other = next(d for n, d in dumps.items() if n.startswith("other."))
    try:
        reprod.compare(ref, other, **kw)
    except DumpFormatError as exc:
        print(type(exc).__name__, exc, sep="|")
        sys.exit(3)
    print("no error")
""")


def _run(folder: str, victim: str, extra: str = "{}", mode: str = "api",
         kernel: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO, REPROD_KERNEL="1" if kernel else "0",
               PYTHONFAULTHANDLER="")
    return subprocess.run([sys.executable, "-c", DRIVER, mode, folder, victim, extra], env=env,
                          capture_output=True, text=True, timeout=120)


def _write(folder: str, ext: str, arrays: dict[str, np.ndarray], side: str) -> None:
    path = os.path.join(folder, side + ext)
    if ext == ".npz":
        import reprod

        reprod.save(path, arrays)
    else:  # reprod_log's pickled dict: no checksum, arrays viewed in place
        np.save(path, arrays, allow_pickle=True)


def _dumps(folder: str, ext: str, shapes: dict[str, tuple[int, ...]], noise: bool = False) -> None:
    rng = np.random.default_rng(0)
    ref = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    _write(folder, ext, ref, "ref")
    _write(folder, ext, {k: v + np.float32(1e-7) for k, v in ref.items()}, "other")
    if noise:
        _write(folder, ext, {k: v.astype(np.float64) for k, v in ref.items()}, "noise")


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return lines[0]


@pytest.mark.parametrize("ext", [".npz", ".npy"])
def test_large_key_names_file_and_key(tmp_path, ext):
    # 3M elements: > 1 MiB (no CRC check on access), several chunks on two threads
    for victim in ("ref", "other"):
        folder = tmp_path / victim
        folder.mkdir()
        _dumps(str(folder), ext, {"big": (3, 1 << 20)})
        line = _one_line(_run(str(folder), victim + ext))
        kind, text = line.split("|")
        assert kind == "DumpChangedError"
        assert text == f"{folder / (victim + ext)}: key 'big': the file was truncated while being read (SIGBUS)"


def test_batch_of_small_keys_falls_back_and_names_the_key(tmp_path):
    # small .npz members: the batch call faults (stats_many), the per-key path's CRC check then
    # faults in crc32 and the reader names the key
    _dumps(str(tmp_path), ".npz", {f"k{i:03d}": (4096,) for i in range(200)})
    line = _one_line(_run(str(tmp_path), "other.npz"))
    kind, text = line.split("|")
    assert kind == "DumpFormatError"
    assert text.startswith(f"{tmp_path / 'other.npz'}: key 'k")
    assert "SIGBUS" in text and "truncated" in text


def test_calibrated_comparison_names_the_noise_file(tmp_path):
    for victim in ("noise", "ref"):
        folder = tmp_path / victim
        folder.mkdir()
        _dumps(str(folder), ".npy", {"big": (1 << 21,)}, noise=True)
        line = _one_line(_run(str(folder), victim + ".npy", extra="{'noise': 'noise.npy'}"))
        assert line == (f"DumpChangedError|{folder / (victim + '.npy')}: key 'big': the file was "
                        "truncated while being read (SIGBUS)")


def test_cli_exits_2_with_one_line(tmp_path):
    _dumps(str(tmp_path), ".npz", {"big": (1 << 21,)})
    proc = _run(str(tmp_path), "ref.npz", extra="{'ext': '.npz'}", mode="cli")
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (f"reprod-diff: error: {tmp_path / 'ref.npz'}: key 'big': the file "
                                   "was truncated while being read (SIGBUS)")


def test_numpy_path_is_not_guarded(tmp_path):
    # documented limitation: without the kernel the process still dies of the signal
    _dumps(str(tmp_path), ".npy", {"big": (1 << 21,)})
    proc = _run(str(tmp_path), "ref.npy", kernel=False)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)


def test_faults_elsewhere_still_kill(tmp_path):
    # the handler stays installed after a guarded call; a SIGBUS outside one takes the old way
    code = textwrap.dedent("""
        import os, signal, numpy as np
        from reprod import _native
        _native.kernel().stats(np.zeros(4, np.float32), "f", np.zeros(4, np.float32), "f", 8,
                               False, 0.0, 0.0, False)
        os.kill(os.getpid(), signal.SIGBUS)
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO, REPROD_KERNEL="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)


def test_kernel_reports_the_faulting_buffer(tmp_path):
    # stats3 on a mapped, truncated file: MappedReadError (an OSError) says which buffer faulted
    code = textwrap.dedent("""
        import mmap, os, sys, numpy as np
        from reprod import _native
        path = sys.argv[1]
        np.zeros(1 << 20, np.float32).tofile(path)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        h = np.frombuffer(mm, np.float32)
        os.truncate(path, 4096)
        r = np.zeros(1 << 20, np.float32)
        k = _native.kernel()
        for args, want in (((r, "f", r, "f", h, "f"), 2), ((h, "f", r, "f", r, "f"), 0)):
            try:
                k.stats3(*args, 8192, False, 0.0, 0.0, False)
            except _native.MappedReadError as exc:
                assert isinstance(exc, OSError) and exc.argument == want and exc.job == -1, exc.argument
        try:
            k.crc32(mm)
        except _native.MappedReadError as exc:
            assert exc.argument == 0
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.bin")],
                          env=dict(os.environ, PYTHONPATH=REPO, REPROD_KERNEL="1"), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stdout, proc.stderr)


BY_ORDER = textwrap.dedent("""
    import os, sys
    import reprod.storage as storage
    load = storage.load
    folder, victim = sys.argv[1], sys.argv[2]
    def truncating_load(path, **kw):  # mapped, then truncated before the pairing reads it
        dump = load(path, **kw)
        if os.path.basename(str(path)) == victim:
            os.truncate(path, 4096)
        return dump
    storage.load = truncating_load
    from reprod.cli import main
    sys.exit(main([os.path.join(folder, "ref.npy"), os.path.join(folder, "port.npy"), "--by-order",
                   "--quiet"]))
""")


@pytest.mark.parametrize("victim", ["ref", "port"])
def test_pairing_by_order_names_the_truncated_file_and_its_first_key_past_the_end(tmp_path, victim):
    # the pairing compares whole layer captures (is a call's output its input?) before any key
    # is compared: those reads go through the kernel too, and the file that shrank is named with
    # the first key whose bytes lay past its new end (legacy .npy: views of the file, no CRC)
    torch = pytest.importorskip("torch")
    import reprod
    from reprod.capture import record

    class Renamed(torch.nn.Module):
        def __init__(self, seq: torch.nn.Sequential) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2, self.drop = seq

        def forward(self, x):
            return self.drop(self.fc2(self.act(self.fc1(x))))

    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.Dropout()).eval()
    x = torch.randn(512, 256)
    for side, model in (("ref", seq), ("port", Renamed(seq))):
        logger = reprod.ReprodLogger()
        with record(model, logger):
            model(x)
        logger.save(str(tmp_path / f"{side}.npy"))
    want = reprod.load(str(tmp_path / f"{victim}.npy")).key_past(4096)
    assert want is not None
    proc = subprocess.run([sys.executable, "-c", BY_ORDER, str(tmp_path), f"{victim}.npy"],
                          env=dict(os.environ, PYTHONPATH=REPO, REPROD_KERNEL="1", PYTHONFAULTHANDLER=""),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip() == (f"reprod-diff: error: {tmp_path / (victim + '.npy')}: key {want!r}: the file "
                                   "was truncated while being read (SIGBUS)")


@pytest.mark.parametrize("ext", [".npy", ".npz"])
def test_key_past_is_the_first_array_reaching_past_the_end(tmp_path, ext):
    # each array's bytes found in the raw file, independently of the reader's specs
    import reprod

    arrays = {"a": np.full(3000, 1, np.float32), "nested/b": np.full(5000, 2, np.float64),
              "c": np.full(100, 3, np.int16), "d": np.full(2000, 4, np.float32)}
    path = str(tmp_path / f"dump{ext}")
    if ext == ".npz":
        reprod.save(path, arrays)
    else:
        np.save(path, {"a": arrays["a"], "nested": {"b": arrays["nested/b"]}, "c": arrays["c"],
                       "d": arrays["d"]}, allow_pickle=True)
    raw = open(path, "rb").read()
    where = {k: (raw.find(v.tobytes()), v.nbytes) for k, v in arrays.items()}
    assert all(at > 0 for at, _ in where.values())
    dump = reprod.load(path)
    for size in (0, 100, where["a"][0] + 10, where["c"][0] + 1, where["d"][0] + 8000, len(raw) - 1,
                 len(raw)):
        past = sorted((at, k) for k, (at, n) in where.items() if at + n > size)
        assert dump.key_past(size) == (past[0][1] if past else None), size
