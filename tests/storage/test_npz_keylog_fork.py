"""A streaming dump past its key log's spill in a forked child (a DataLoader worker, a
multiprocessing fork): the child's copies of the key log's SQLite connection and anonymous files
are its parent's, and the child's exit must leave them as the parent has them. The parent's dump
is then byte for byte the dump of a run without the fork."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import reprod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")

# keys k0..k{n-1}; fork; every 7th key re-added (as float64 of another shape: most of them are
# past the spill, found through SQLite), 100 new keys; close
_SCRIPT = r"""
import os, sys
import numpy as np
from reprod import ReprodLogger
from reprod.errors import ReprodError
from reprod.storage import npz_keylog, npz_members
path, how, spill, n, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
npz_keylog._KeyLog.spill = spill
npz_members._FIXED_DOS = (0, 33)  # the same bytes in every run
lg = ReprodLogger(stream_to=path)
for i in range(n):
    lg.add(f"k{i}", np.full(2, i, np.float32))
    if i == spill and cache != "default":
        # a small page cache: SQLite writes its pages to its temporary file after a few hundred
        # keys (with its default 2 MB cache, after some 40,000)
        lg._writer._keys.db.execute(f"PRAGMA cache_size={cache}")
if how != "no_fork":
    pid = os.fork()
    if pid == 0:
        if how == "child_tries":
            for name, call in (("add", lambda: lg.add("child", np.ones(1))), ("keys", lg.keys),
                               ("close", lg.close)):
                try:
                    call()
                    print("child did", name, flush=True)
                except ReprodError as exc:
                    assert "forked child" in str(exc), exc
            lg._writer.abort()  # what a with block's exception does
        if how == "child_os_exit":
            os._exit(0)  # nothing finalized
        sys.exit(0)  # a normal exit: the child's objects are finalized, its files closed
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
for i in range(0, n, 7):
    lg.add(f"k{i}", np.full(3, -i, np.float64))
assert lg.keys()[-1] == f"k{n - 1}"
for i in range(n, n + 100):
    lg.add(f"k{i}", np.full(2, i, np.float32))
lg.close()
"""

# a fork while ``close`` has the metadata spooled to an anonymous file, with bytes in its buffer
# (a fork from a signal handler or a callback that runs then); the child unwinds through
# ``close`` and exits
_SPOOL_SCRIPT = r"""
import os, sys
import numpy as np
from reprod import ReprodLogger
from reprod.storage import npz_keylog, npz_members
path, how = sys.argv[1], sys.argv[2]
npz_keylog._KeyLog.spill = 50
npz_members._FIXED_DOS = (0, 33)
npz_members._KEEP_META = 700  # the metadata goes to a spool after a few keys
joined = npz_members._joined
forked = []

def forking(keys, ascii_only):
    for block in joined(keys, ascii_only):
        if how != "no_fork" and not forked and keys.spools and keys.spools[0].tell() > 0:
            forked.append(1)
            pid = os.fork()
            if pid == 0:
                if how == "child_os_exit":
                    os._exit(0)
                sys.exit(0)
            _, status = os.waitpid(pid, 0)
            assert status == 0, status
        yield block

npz_members._joined = forking
lg = ReprodLogger(stream_to=path)
for i in range(3000):
    lg.add(f"k{i}", np.full(2, i, np.float32))
lg.close()
assert forked or how == "no_fork", "no spool at the fork"
"""


def _run(script: str, *args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _expected(n: int) -> dict[str, np.ndarray]:
    out = {f"k{i}": np.full(2, i, np.float32) for i in range(n)}
    out.update({f"k{i}": np.full(3, -i, np.float64) for i in range(0, n, 7)})
    out.update({f"k{i}": np.full(2, i, np.float32) for i in range(n, n + 100)})
    return out


# (spill, keys, SQLite page cache): a few hundred keys past the spill with SQLite's pages on disk;
# the default spill and cache, with enough keys past it that SQLite writes its file
_SIZES = {"small": (50, 600, "10"), "default": (20_000, 60_000, "default")}


@pytest.fixture(scope="module")
def _no_fork(tmp_path_factory):
    """The dump of each size as a run without a fork writes it."""
    out = {}
    for size, (spill, n, cache) in _SIZES.items():
        path = tmp_path_factory.mktemp("no_fork") / "d.npz"
        p = _run(_SCRIPT, path, "no_fork", spill, n, cache)
        assert p.returncode == 0, p.stderr[-3000:]
        out[size] = _digest(path)
    return out


@pytest.mark.parametrize("how", ["child_exits", "child_tries", "child_os_exit"])
@pytest.mark.parametrize("size", list(_SIZES))
def test_a_forked_child_leaves_its_parents_key_log_as_the_parent_has_it(tmp_path, _no_fork, size,
                                                                        how) -> None:
    """The child's exit closed its copy of the SQLite connection, which rolled back the
    parent's open transaction into the database file they share: the parent's next look-up of a
    spilled key raised "database disk image is malformed". (The side file of the spilled keys'
    texts was pointed at the null device in the child already, by the writer's hook: without it, the child flushed its copy of the
    buffer into the shared offset and a key appeared twice in the metadata.)"""
    spill, n, cache = _SIZES[size]
    path = tmp_path / "d.npz"
    p = _run(_SCRIPT, path, how, spill, n, cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "child did" not in p.stdout and "never closed" not in p.stderr
    assert _digest(path) == _no_fork[size]
    d = reprod.load(path, verify=True)
    expected = _expected(n)
    assert list(d) == list(expected)
    for k in (f"k{i}" for i in (0, 1, 7, spill, spill + 3, n - 1, n + 99)):
        np.testing.assert_array_equal(d[k], expected[k])
        assert d[k].dtype == expected[k].dtype
    assert os.listdir(tmp_path) == ["d.npz"]


@pytest.mark.parametrize("how", ["child_exits", "child_os_exit"])
def test_a_child_forked_while_the_metadata_is_spooled_leaves_the_spool(tmp_path, how) -> None:
    """The child, unwinding through ``close``, closed its copy of the spool: the bytes its
    buffer held went into the file offset it shares with the parent, the parent's metadata
    member got them twice ("corrupt metadata member")."""
    digests = []
    for mode in ("no_fork", how):
        path = tmp_path / f"{mode}.npz"
        p = _run(_SPOOL_SCRIPT, path, mode)
        assert p.returncode == 0, p.stderr[-3000:]
        d = reprod.load(path, verify=True)
        assert list(d) == [f"k{i}" for i in range(3000)]
        digests.append(_digest(path))
    assert digests[0] == digests[1]
