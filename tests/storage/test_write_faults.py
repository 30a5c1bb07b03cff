"""Faults while writing: a full disk, a process killed mid-save, two processes saving to one path.

In every case the path holds either the old complete dump or the new complete dump (each is
loaded and every value checked), a clean failure leaves no temporary file behind, and what a
SIGKILL leaves behind (one ``.<name>.<random>.tmp``) is never mistaken for a dump and is removed
by a later save once stale. Each fault runs in a child process: a file-size limit
(``RLIMIT_FSIZE`` with SIGXFSZ ignored, so the write fails with EFBIG) stands in for a full disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import reprod
from reprod import DumpFormatError
from reprod.storage import atomic

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")

ROOT = Path(__file__).resolve().parents[2]


def _child(src: str, *args: Any, **kw: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", src, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _run_child(src: str, *args: Any, timeout: float = 120) -> str:
    p = _child(src, *args)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


def _dump(tag: float, n: int = 1000) -> dict[str, Any]:
    """A dump whose every value says which save wrote it: ``tag`` everywhere."""
    return {"a": np.full(n, tag), "b": {"c": np.full((n // 10, 10), tag, np.float32)},
            "s": np.float64(tag)}  # fmt: skip


def _tag_of(target: Path, suffix: str = "") -> float:
    """Load ``target`` and return the single tag all its values carry; fail if they disagree."""
    # a hard link pins the file a concurrent writer may replace, so both readers see one inode
    path = target.with_name(f"snapshot{suffix or target.suffix}")
    for attempt in range(100):
        try:
            os.link(target, path)
            break
        except FileNotFoundError:
            # Linux refuses to link an inode that a rename has just unlinked: the path itself
            # always exists (the next line proves it), so look it up again
            assert target.exists() and attempt < 99
    try:
        return _tag_of_file(path)
    finally:
        path.unlink()


def _tag_of_file(path: Path) -> float:
    with reprod.load(path) as d:
        values = [np.asarray(d["a"]), np.asarray(d["b"]["c"]), np.asarray(d["s"])]
        assert list(d) == ["a", "b", "s"] and d["a"].shape[0] == d["b"]["c"].shape[0] * 10
        tags = {float(v.ravel()[0]) for v in values}
        assert len(tags) == 1, f"{path}: values from different saves {tags}"
        tag = tags.pop()
        for v in values:
            assert (v == tag).all(), f"{path}: a partly written dump"
    if path.suffix == ".npy":  # and numpy (reprod_log's reader) agrees
        plain = np.load(path, allow_pickle=True).item()
        assert float(plain["a"][-1]) == tag and float(plain["b"]["c"][-1, -1]) == tag
    else:
        with np.load(path) as z:
            assert float(z["a"][-1]) == tag and float(z["b/c"][-1, -1]) == tag
    return tag


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------
# disk full
# ---------------------------------------------------------------------------------------------

_DISK_FULL = r"""
import json, os, resource, signal, sys
import numpy as np
import reprod
from reprod import ReprodLogger

path, mode, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
data = {"a": np.full(20000, 2.0), "b": {"c": np.full((2000, 10), 2.0, np.float32)},
        "s": np.float64(2.0)}
if limits == "auto":
    # the size of the new dump as this process writes it (metadata names the modules loaded)
    probe = os.path.join(os.path.dirname(path), "probe", os.path.basename(path))
    size = os.path.getsize(reprod.save(probe, data))
    print(json.dumps({"size": size}), flush=True)
    # fail at every stage: the first header, inside each member, the metadata, the directory
    limits = sorted({1, 30, 100, 200, 1000, 4096, *range(8192, size, size // 23),
                     size - 200, size - 22, size - 1, size, size + 4096})
for limit in limits:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    result = {"limit": limit}
    try:
        if mode == "save":
            reprod.save(path, data)
        else:
            logger = ReprodLogger(stream_to=path)
            result["stage"] = "add"
            try:
                for k in ("a", "b", "s"):
                    logger.add(k, data[k])
            except OSError:
                try:
                    logger.close()
                except reprod.ReprodError as exc:
                    result["close_after_failure"] = type(exc).__name__
                raise
            result["stage"] = "close"
            logger.close()
        result["outcome"] = "saved"
    except OSError as exc:
        result["outcome"] = f"OSError errno={exc.errno}"
    except BaseException as exc:
        result["outcome"] = f"{type(exc).__name__}: {exc}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps(result), flush=True)
"""


# streaming writes the native format only, so it runs with .npz alone
@pytest.mark.parametrize(("fmt", "mode"), [("npy", "save"), ("npz", "save"), ("npz", "stream")])
def test_disk_full_keeps_the_old_dump_and_leaves_no_temporary(tmp_path, fmt, mode) -> None:
    import errno

    target = tmp_path / f"run.{fmt}"
    reprod.save(target, _dump(1.0))
    out = _run_child(_DISK_FULL, target, mode, '"auto"')
    first, *results = [json.loads(line) for line in out.splitlines()]
    new_size = first["size"]
    limits = [r["limit"] for r in results]
    assert len(limits) > 20 and min(limits) == 1 and max(limits) > new_size
    saved_at = []
    for r in results:
        if r["outcome"] == "saved":
            saved_at.append(r["limit"])
        else:
            assert r["outcome"] == f"OSError errno={errno.EFBIG}", r
            if mode == "stream" and r["stage"] == "add":  # the stream gave up; it says so
                assert r["close_after_failure"] == "ReprodError", r
    # every limit below the dump's size failed; the others saved (the last of them leaves 2.0)
    assert saved_at == [lim for lim in limits if lim >= new_size]
    assert _tag_of(target) == 2.0
    assert _temporaries(tmp_path) == []


def test_disk_full_every_failure_keeps_the_old_dump(tmp_path, fmt) -> None:
    """The same, checking the path after each failed save (not only at the end)."""
    target = tmp_path / f"run.{fmt}"
    reprod.save(target, _dump(1.0))
    for limit in (50, 3000, 9000, 15000):
        out = _run_child(_DISK_FULL, target, "save", json.dumps([limit]))
        assert json.loads(out)["outcome"].startswith("OSError"), out
        assert _tag_of(target) == 1.0
        assert _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# killed mid-save
# ---------------------------------------------------------------------------------------------

_SAVE_LOOP = r"""
import sys
import numpy as np
import reprod
path, n = sys.argv[1], int(sys.argv[2])
i = 10
while True:
    i += 1
    reprod.save(path, {"a": np.full(n, float(i)), "b": {"c": np.full((n // 10, 10), float(i), np.float32)},
                       "s": np.float64(i)})
    print(i, flush=True)
"""


def _kill_after(p: subprocess.Popen, saves: int, delay: float) -> int:
    """Let the child report ``saves`` saves, wait ``delay`` s more, SIGKILL it; its last save."""
    last = 0
    for _ in range(saves):
        line = p.stdout.readline()
        assert line, p.stderr.read()[-3000:]
        last = int(line)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    rest, _ = p.communicate()
    nums = [int(x) for x in rest.split()]
    return max([last, *nums])


def test_sigkill_mid_save_leaves_a_complete_dump(tmp_path, fmt) -> None:
    target = tmp_path / f"run.{fmt}"
    reprod.save(target, _dump(1.0, 2_000_000))
    rng = np.random.default_rng(5)
    kills = 8
    for _ in range(kills):
        p = _child(_SAVE_LOOP, target, 2_000_000)  # 16 MB + 8 MB a save: tens of ms each
        last = _kill_after(p, 1, float(rng.uniform(0, 0.15)))
        tag = _tag_of(target)
        # the last save reported complete, or the one after it that finished before the kill
        assert tag in (last, last + 1), (tag, last)
    leftovers = _temporaries(tmp_path)
    assert len(leftovers) <= kills
    for t in leftovers:  # what a kill leaves reads as a complete dump or as a DumpFormatError
        try:
            _tag_of(t, f".{fmt}")
        except DumpFormatError:
            pass
    # the next save removes the leftovers once they are stale (their writers are dead)
    old = time.time() - atomic.STALE_TMP_SECONDS - 60
    for t in leftovers:
        os.utime(t, (old, old))
    reprod.save(target, _dump(3.0, 100))
    assert _temporaries(tmp_path) == []
    assert _tag_of(target) == 3.0


_STREAM_LOOP = r"""
import sys
import numpy as np
from reprod import ReprodLogger
path, n = sys.argv[1], int(sys.argv[2])
logger = ReprodLogger(stream_to=path)
for step in range(100000):
    logger.add(f"step_{step}", np.full(n, float(step)))
    print(step, flush=True)
"""


def test_sigkill_during_a_streaming_run_keeps_the_previous_dump(tmp_path) -> None:
    """A streaming logger writes to a temporary file renamed on close: a run killed after N steps
    leaves the previous complete dump at the path (or no file), never a partial one."""
    target = tmp_path / "run.npz"
    reprod.save(target, _dump(1.0))
    p = _child(_STREAM_LOOP, target, 50_000)
    _kill_after(p, 25, 0.05)
    assert _tag_of(target) == 1.0
    leftovers = _temporaries(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".run.npz.")
    with pytest.raises(DumpFormatError, match="not a valid zip"):
        reprod.load(leftovers[0])
    # a fresh save the same minute keeps it: a live writer could own it (the lock says not, but
    # only a file that is also old is removed); once old, it goes
    reprod.save(target, _dump(2.0))
    assert _temporaries(tmp_path) == leftovers
    old = time.time() - atomic.STALE_TMP_SECONDS - 60
    os.utime(leftovers[0], (old, old))
    reprod.save(target, _dump(3.0))
    assert _temporaries(tmp_path) == [] and _tag_of(target) == 3.0


def _term_after(p: subprocess.Popen, saves: int, delay: float) -> int:
    """``_kill_after`` with SIGTERM: the last save reported before the child ended."""
    last = 0
    for _ in range(saves):
        line = p.stdout.readline()
        assert line, p.stderr.read()[-3000:]
        last = int(line)
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=60)
    # 143: SIGTERM came mid-save (SystemExit after the cleanup); -15: between saves, where the
    # default action is back in place and there is nothing to clean up
    assert p.returncode in (143, -signal.SIGTERM), (p.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    return max([last, *(int(x) for x in rest.split())])


def test_sigterm_mid_save_leaves_no_temporary(tmp_path, fmt) -> None:
    """Ctrl-C cleaned up after itself; SIGTERM (a job scheduler, ``kill``, a container stopping)
    left 200-350 MB of hidden temporary files. Now it runs the same cleanup."""
    target = tmp_path / f"run.{fmt}"
    reprod.save(target, _dump(1.0, 2_000_000))
    rng = np.random.default_rng(9)
    codes = []
    for _ in range(6):
        p = _child(_SAVE_LOOP, target, 2_000_000)
        last = _term_after(p, 1, float(rng.uniform(0, 0.15)))
        codes.append(p.returncode)
        assert _temporaries(tmp_path) == [], codes
        assert _tag_of(target) in (last, last + 1)
    print("exit statuses", codes)


_TERM_STREAM = r"""
import sys
import numpy as np
from reprod import ReprodLogger
path, n = sys.argv[1], int(sys.argv[2])
logger = ReprodLogger(stream_to=path)
for step in range(100000):
    logger.add(f"step_{step}", np.full(n, float(step)))
    print(step, flush=True)
"""


def test_sigterm_during_a_streaming_run_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "run.npz"
    reprod.save(target, _dump(1.0))
    p = _child(_TERM_STREAM, target, 50_000)
    for _ in range(25):
        assert p.stdout.readline()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-3000:]
    # between two adds the unclosed stream is given back at exit, and says so; during an add the
    # writer aborts itself (no message)
    assert "Traceback" not in err, err[-3000:]
    assert _temporaries(tmp_path) == [] and _tag_of(target) == 1.0


# SIGTERM comes where the main thread is: in a __del__, a weakref callback or a buffered file closed
# as it is collected, Python cannot let the handler's SystemExit out ("Exception ignored in") and
# went on. A save loop then kept saving after SIGTERM (CI, Python 3.13, under load).
_TERM_UNRAISABLE = r"""
import os, signal, sys, weakref
import numpy as np
import reprod
from reprod.storage import atomic
path, where = sys.argv[1], sys.argv[2]
af = atomic.AtomicFile(path)
af.file.write(b"partial")
print(af.tmp_path, flush=True)

def term():
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # the handler runs at the next bytecode boundary: here
        pass

class Dropped:
    def __del__(self):
        term()

class Owner:
    pass

if where == "del":
    Dropped()
else:
    o = Owner()
    weakref.finalize(o, term)
    del o
print("went on after SIGTERM", flush=True)
af.commit()
reprod.save(path, {"a": np.ones(3)})
print("saved after SIGTERM", flush=True)
"""


@pytest.mark.parametrize("where", ["del", "finalize"])
def test_sigterm_where_python_cannot_raise_still_ends_the_process(tmp_path, where) -> None:
    target = tmp_path / "run.npz"
    reprod.save(target, _dump(1.0))
    p = _child(_TERM_UNRAISABLE, target, where)
    out, err = p.communicate(timeout=60)
    # ended as SIGTERM's default action ends a process, once its temporary file was removed
    assert p.returncode == -signal.SIGTERM, (p.returncode, out, err[-3000:])
    assert "went on" not in out and "Exception ignored" not in err and "Traceback" not in err, err
    tmp = Path(out.split()[0])
    assert tmp.parent == tmp_path and not tmp.exists()
    assert _temporaries(tmp_path) == [] and _tag_of(target) == 1.0


_TERM_CAUGHT = r"""
import os, signal, sys
import numpy as np
import reprod
from reprod.storage import atomic
path = sys.argv[1]
af = atomic.AtomicFile(path)
af.file.write(b"partial")
try:
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):
        pass
except SystemExit as exc:  # a program that catches it and goes on: its own choice
    print("caught", exc.code, flush=True)
try:
    af.commit()
except OSError as exc:
    print("commit:", exc, flush=True)
reprod.save(path, {"a": np.full(1000, 2.0), "b": {"c": np.full((100, 10), 2.0, np.float32)},
                   "s": np.float64(2.0)})
"""


def test_a_save_sigterm_interrupted_fails_on_commit_where_the_program_caught_the_exit(tmp_path):
    """A program may catch SIGTERM's SystemExit, as any; the save it interrupted lost its
    temporary file to the cleanup, and committing it says so (before: "No such file or
    directory"). Saves after it work."""
    target = tmp_path / "run.npz"
    reprod.save(target, _dump(1.0))
    p = _child(_TERM_CAUGHT, target)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    lines = out.splitlines()
    assert lines[0] == "caught 143", out
    assert lines[1] == (f"commit: {target}: writing failed: interrupted by SIGTERM, whose cleanup "
                        "removed the temporary file (errno 4); nothing was replaced"), out
    assert _temporaries(tmp_path) == [] and _tag_of(target) == 2.0


_SLOW_STREAM = r"""
import sys
import numpy as np
from reprod import ReprodLogger
path = sys.argv[1]
logger = ReprodLogger(stream_to=path)
logger.add("a", np.full(1000, 7.0))
print("started", flush=True)
sys.stdin.readline()  # hold the stream open until the parent says so
logger.add("b", {"c": np.full((100, 10), 7.0, np.float32)})
logger.add("s", np.float64(7.0))
logger.close()
print("closed", flush=True)
"""


def test_cleanup_never_touches_a_live_writers_temporary(tmp_path) -> None:
    target = tmp_path / "run.npz"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_STREAM, str(target)], text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "started", p.stderr.read()
        (live,) = _temporaries(tmp_path)
        old = time.time() - 10 * atomic.STALE_TMP_SECONDS
        os.utime(live, (old, old))  # as old as a forgotten file, but its writer holds the lock
        reprod.save(target, _dump(1.0))
        assert atomic.remove_stale_temporaries(str(target)) == []
        assert _temporaries(tmp_path) == [live] and _tag_of(target) == 1.0
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "closed", p.stderr.read()
    finally:
        p.kill()
        p.wait()
    assert _tag_of(target) == 7.0  # the stream closed last: its dump replaced the other
    assert _temporaries(tmp_path) == []


def test_only_reprods_own_temporary_names_are_candidates(tmp_path) -> None:
    target = tmp_path / "run.npz"
    keep = [tmp_path / n for n in (".run.npz.tmp", ".run.npz.abc.tmp", ".run.npz.ABCDEFGH.tmp",
                                   ".other.npz.abcdefgh.tmp", "run.npz.abcdefgh.tmp",
                                   ".run.npz.abcdefgh.tmp.bak")]
    stale = tmp_path / ".run.npz.abcd_fgh.tmp"
    old = time.time() - 2 * atomic.STALE_TMP_SECONDS
    for f in [*keep, stale]:
        f.write_bytes(b"x")
        os.utime(f, (old, old))
    assert atomic.remove_stale_temporaries(str(target)) == [str(stale)]
    assert all(f.exists() for f in keep) and not stale.exists()


# ---------------------------------------------------------------------------------------------
# two writers, one path
# ---------------------------------------------------------------------------------------------

_WRITER = r"""
import sys
import numpy as np
import reprod
path, base, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
for i in range(rounds):
    t = base + i
    reprod.save(path, {"a": np.full(200_000, t), "b": {"c": np.full((20_000, 10), t, np.float32)},
                       "s": np.float64(t)})
"""


def test_two_processes_saving_to_one_path(tmp_path, fmt) -> None:
    target = tmp_path / f"run.{fmt}"
    rounds = 25
    reprod.save(target, _dump(1.0))
    writers = [_child(_WRITER, target, base, rounds) for base in (1000.0, 2000.0)]
    seen = set()
    while any(w.poll() is None for w in writers):
        seen.add(_tag_of(target))  # every read is one complete dump, whoever wrote it
    for w in writers:
        _, err = w.communicate()
        assert w.returncode == 0, err[-3000:]
    final = _tag_of(target)
    assert final in (1000.0 + rounds - 1, 2000.0 + rounds - 1)
    assert seen <= {1.0} | {b + i for b in (1000.0, 2000.0) for i in range(rounds)}
    assert _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# a streaming logger that is never closed
# ---------------------------------------------------------------------------------------------

_NEVER_CLOSED = r"""
import os, sys
import numpy as np
from reprod import ReprodLogger
path, how = sys.argv[1], sys.argv[2]
logger = ReprodLogger(stream_to=path)
logger.add("a", np.ones(1000))
if how == "fork":  # a child that exits normally must leave its parent's stream alone
    pid = os.fork()
    if pid == 0:
        sys.exit(0)
    os.waitpid(pid, 0)
    logger.add("b", {"c": np.ones((100, 10), np.float32)})
    logger.add("s", np.float64(1.0))
    logger.close()
elif how == "dropped":
    del logger
    folder = os.path.dirname(os.path.abspath(path))
    print(sum(n.endswith(".tmp") for n in os.listdir(folder)), "temporaries", flush=True)
elif how == "raise":
    raise RuntimeError("the training script failed")
"""


@pytest.mark.parametrize("how", ["exit", "dropped", "raise"])
def test_a_stream_never_closed_leaves_no_temporary_and_says_so(tmp_path, how) -> None:
    target = tmp_path / "run.npz"
    reprod.save(target, _dump(2.0))
    p = _child(_NEVER_CLOSED, target, how)
    out, err = p.communicate(timeout=120)
    assert p.returncode == (1 if how == "raise" else 0), err[-3000:]
    assert "was never closed, so nothing was written" in err
    assert _temporaries(tmp_path) == [] and _tag_of(target) == 2.0
    if how == "dropped":  # given back as soon as it is dropped, not only at exit
        assert out.strip() == "0 temporaries"


def test_a_forked_child_leaves_its_parents_stream_alone(tmp_path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    target = tmp_path / "run.npz"
    out = _run_child(_NEVER_CLOSED, target, "fork")
    assert out == "" and _tag_of(target) == 1.0 and _temporaries(tmp_path) == []
