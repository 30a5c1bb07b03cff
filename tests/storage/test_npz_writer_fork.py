"""A streaming dump in a forked child (a DataLoader worker, a multiprocessing fork): the child's
copy of the writer neither writes to its parent's file nor removes it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

import reprod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")

_SCRIPT = r"""
import os, sys
import numpy as np
from reprod import ReprodLogger
from reprod.errors import ReprodError
path, how = sys.argv[1], sys.argv[2]
lg = ReprodLogger(stream_to=path)
lg.add("a", np.ones(1000))  # 8 KB, still in the file's buffer
if how != "no_fork":
    pid = os.fork()
    if pid == 0:
        for call in (lambda: lg.add("child", 1), lg.close):
            try:
                call()
                print("child wrote", flush=True)
            except ReprodError as exc:
                assert "forked child" in str(exc), exc
        if how == "child_aborts":
            lg._writer.abort()  # what a with block's exception does
        sys.exit(0)  # a normal exit: the child's objects are finalized, its files closed
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
lg.add("b", np.zeros(500))
lg.close()
"""


def _run(path, how: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _SCRIPT, str(path), how], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("how", ["child_exits", "child_aborts"])
def test_a_forked_child_leaves_its_parents_dump_as_the_parent_writes_it(tmp_path, how) -> None:
    """The child's copy of the file's buffer, flushed at its exit into the file offset it shares
    with its parent, wrote the parent's bytes twice (the dump grew by the buffer and shifted);
    an abort in the child removed the parent's temporary file."""
    sizes = []
    for name, mode in (("plain.npz", "no_fork"), ("forked.npz", how)):
        p = _run(tmp_path / name, mode)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "child wrote" not in p.stdout and "never closed" not in p.stderr
        sizes.append((tmp_path / name).stat().st_size)
        with zipfile.ZipFile(tmp_path / name) as z:
            assert z.testzip() is None
            assert [(i.filename, i.header_offset) for i in z.infolist()][:1] == [("a.npy", 0)]
        d = reprod.load(tmp_path / name, verify=True)
        assert list(d) == ["a", "b"] and d["a"].sum() == 1000
    assert sizes[0] == sizes[1]
    assert sorted(os.listdir(tmp_path)) == ["forked.npz", "plain.npz"]


_SIGTERM_SCRIPT = r"""
import os, signal, sys, time
import numpy as np
from reprod import ReprodLogger
path = sys.argv[1]
lg = ReprodLogger(stream_to=path)  # its temporary file exists from here
lg.add("a", np.ones(1000))
tmp = [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]
assert len(tmp) == 1, tmp
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), signal.SIGTERM)  # a worker stopped: the default action, at once
    time.sleep(5)
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
assert os.path.exists(os.path.join(os.path.dirname(path), tmp[0])), "the parent's file is gone"
lg.add("b", np.zeros(500))
lg.close()
"""


def test_a_sigterm_in_a_forked_child_leaves_its_parents_temporary_file(tmp_path) -> None:
    """The child inherited the parent's SIGTERM handler and the names of its temporary files:
    stopping the child removed the file the parent was still writing."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = tmp_path / "d.npz"
    p = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, str(path)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    d = reprod.load(path, verify=True)
    assert list(d) == ["a", "b"] and d["a"].sum() == 1000
    assert os.listdir(tmp_path) == ["d.npz"]
