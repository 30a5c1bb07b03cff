"""A write the system refuses raises one line naming the file, the key where known, and the problem.

The refusals are the system's own: a file-size limit (``RLIMIT_FSIZE`` with SIGXFSZ ignored: the
write fails with EFBIG, as a full disk fails with ENOSPC) in a child process, a path through a
regular file, a folder of /proc, the full device. Every saver is run: the logger's and
``reprod.save``'s two formats, a streaming logger (inline and on its writer thread), reports.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reprod
from reprod import ReprodLogger, WriteError
from reprod.errors import StreamWriteError, write_error

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX rlimits and devices")

ROOT = Path(__file__).resolve().parents[2]

_LIMITED = r"""
import json, os, resource, signal, sys
import numpy as np
import reprod
from reprod import ReprodLogger

folder, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
many = {f"k{i}": np.full(100, i, np.float32) for i in range(3000)}  # ~1.2 MB of small keys
big = {"big": np.ones(1 << 19)}  # 4 MiB in one key


def logger_save(path, data):
    lg = ReprodLogger()
    for k, v in data.items():
        lg.add(k, v)
    return lg.save(path)


def stream(path, data, queue=0):
    lg = ReprodLogger(stream_to=path, stream_queue_bytes=queue)
    for k, v in data.items():
        if queue:
            lg._put_later(k, np.array(v))  # the writer thread's path (capture's)
        else:
            lg.add(k, v)
    return lg.close()


def report(path, data):
    with reprod.load(os.path.join(folder, "small.npz")) as d:
        reprod.compare(d, d).to_html(path)


reprod.save(os.path.join(folder, "small.npz"), {"x": np.ones(3)})
cases = []
for fmt in ("npy", "npz"):
    for name, data in (("many", many), ("big", big)):
        cases.append((f"logger {fmt} {name}", logger_save, f"out.{fmt}", data))
        cases.append((f"save {fmt} {name}", reprod.save, f"out.{fmt}", data))
cases.append(("stream", stream, "out.npz", big | {"after": np.ones(1 << 19)}))
cases.append(("stream thread", lambda p, d: stream(p, d, 1 << 30), "out.npz",
              {"first": np.ones(1 << 19), "second": np.ones(1 << 19)}))
cases.append(("report", report, "report.html", None))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
for name, fn, file, data in cases:
    path = os.path.join(folder, file)
    with open(path, "wb") as f:
        f.write(b"the earlier file")
    # the report is a few KiB: it fails a little way in, as the dumps do
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit if data is not None else 1024, hard))
    out = {"case": name, "path": path}
    try:
        fn(path, data)
        out["raised"] = None
    except BaseException as exc:
        out.update(raised=[c.__name__ for c in type(exc).__mro__], message=str(exc),
                   errno=exc.errno, filename=exc.filename,
                   cause=type(exc.__cause__).__name__)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with open(path, "rb") as f:
        out["kept"] = f.read() == b"the earlier file"
    out["left"] = sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))
    print(json.dumps(out), flush=True)
"""


def test_every_saver_names_the_file_and_the_problem_when_the_system_refuses_a_write(tmp_path):
    limit = 64 << 10  # under every case's file, over the earlier file's 16 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _LIMITED, str(tmp_path), str(limit)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(results) == 11
    for out in results:
        case = out["case"]
        assert out["raised"] is not None, case  # never a silent pass
        assert "WriteError" in out["raised"] and "OSError" in out["raised"], out
        assert out["errno"] == errno.EFBIG and out["cause"] == "OSError", out
        message = out["message"]
        assert "\n" not in message, out
        assert message.startswith(out["path"] + ": "), out
        assert os.strerror(errno.EFBIG) in message and "writing failed" in message, out
        assert out["filename"] == out["path"], out
        assert out["kept"] and out["left"] == [], out  # nothing lost, nothing left behind
    by_case = {out["case"]: out for out in results}
    # where one key was being written, it is named
    assert by_case["logger npz big"]["message"].startswith(f"{by_case['logger npz big']['path']}: "
                                                           "key 'big': ")
    assert "key 'big'" in by_case["stream"]["message"]
    assert "StreamWriteError" in by_case["stream"]["raised"]
    thread = by_case["stream thread"]
    assert "StreamWriteError" in thread["raised"] and "key 'first'" in thread["message"], thread


def test_a_path_through_a_file_names_the_path_and_keeps_the_system_class(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    target = tmp_path / "plain" / "out.npz"
    for save in (lambda p: reprod.save(p, {"a": np.ones(3)}),
                 lambda p: ReprodLogger().save(p),
                 lambda p: ReprodLogger(stream_to=p)):
        with pytest.raises(WriteError) as info:
            save(target)
        err = info.value
        assert isinstance(err, NotADirectoryError) and isinstance(err, reprod.ReprodError)
        assert err.errno == errno.ENOTDIR and err.filename == str(target)
        assert str(err) == (f"{target}: cannot create the file ({tmp_path / 'plain'}: "
                            f"{os.strerror(errno.ENOTDIR)} (errno {errno.ENOTDIR}))")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc")
def test_a_folder_where_no_file_can_be_made_names_the_target_not_the_temporary_file():
    with pytest.raises(WriteError) as info:
        reprod.save("/proc/reprod-test.npy", {"a": np.ones(3)})
    message = str(info.value)
    assert message.startswith("/proc/reprod-test.npy: cannot create the file (/proc: ")
    assert ".tmp" not in message


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_device_written_in_place_does_not_claim_nothing_was_replaced(tmp_path):
    link = tmp_path / "out.npy"
    link.symlink_to("/dev/full")  # written through: the device, in place
    with pytest.raises(WriteError) as info:
        reprod.save(link, {"a": np.ones(100000)})
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"{link}: writing failed: {os.strerror(errno.ENOSPC)} "
                               f"(errno {errno.ENOSPC})")


def test_write_errors_pickle_as_raised():
    base = OSError(errno.EACCES, "Permission denied")
    err = write_error(base, "/x/out.npz", "k")
    assert isinstance(err, PermissionError) and type(err).__name__ == "WriteError"
    assert str(err) == "/x/out.npz: key 'k': writing failed: Permission denied (errno 13); " \
                       "nothing was replaced"
    for e in (err, write_error(OSError(errno.ENOSPC, "No space left on device"), "/x/a.npy"),
              write_error(base, "/x/s.npz", cls=StreamWriteError)):
        back = pickle.loads(pickle.dumps(e))
        assert type(back).__mro__[1:] == type(e).__mro__[1:] or type(back) is type(e)
        assert (str(back), back.errno, back.strerror, back.filename) == \
               (str(e), e.errno, e.strerror, e.filename)
        assert isinstance(back, WriteError) and isinstance(back, type(e).__mro__[1])
    assert isinstance(pickle.loads(pickle.dumps(write_error(base, "/x/s.npz",
                                                            cls=StreamWriteError))),
                      StreamWriteError)


def test_what_is_not_the_writes_fault_is_left_as_raised(tmp_path):
    other = FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "in.npz"))
    assert write_error(other, str(tmp_path / "out.npz")) is other  # a file being read
    interrupt = KeyboardInterrupt()
    assert write_error(interrupt, "out.npz") is interrupt
    already = WriteError("out.npz: writing failed")
    assert write_error(already, "out.npz") is already
    # the write's temporary file is the write's own
    tmp = OSError(errno.EIO, "Input/output error", str(tmp_path / ".out.npz.abcd1234.tmp"))
    assert isinstance(write_error(tmp, str(tmp_path / "out.npz")), WriteError)



def test_the_command_line_names_the_report_it_could_not_write(tmp_path):
    import resource
    import signal

    for side in ("a", "b"):
        reprod.save(tmp_path / f"{side}.npz", {"x": np.arange(300.0)})
    html = tmp_path / "report.html"
    html.write_bytes(b"the earlier report")

    def limited() -> None:  # in the child: a write past 1 KiB fails with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "reprod", str(tmp_path / "a.npz"),
                        str(tmp_path / "b.npz"), "--html", str(html)], env=env,
                       capture_output=True, text=True, timeout=120, preexec_fn=limited)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == (f"reprod-diff: error: {html}: writing failed: {os.strerror(errno.EFBIG)} "
                        f"(errno {errno.EFBIG}); nothing was replaced\n")
    assert html.read_bytes() == b"the earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "report.html"]


def test_a_full_disk_under_the_key_index_names_the_stream_and_key(tmp_path, monkeypatch):
    import sqlite3

    from reprod.storage import npz_keylog

    real = npz_keylog._KeyLog.put

    def put(self, key, *args):
        if key == "k3":  # what SQLite raises when its temporary database cannot grow
            raise sqlite3.OperationalError("database or disk is full")
        return real(self, key, *args)

    monkeypatch.setattr(npz_keylog._KeyLog, "put", put)
    path = tmp_path / "run.npz"
    path.write_bytes(b"the earlier dump")
    logger = ReprodLogger(stream_to=path)
    for i in range(3):
        logger.add(f"k{i}", np.ones(10))
    with pytest.raises(StreamWriteError) as info:
        logger.add("k3", np.ones(10))
    assert str(info.value) == (f"{path}: key 'k3': writing failed: the key index: database or "
                               "disk is full; nothing was replaced")
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert path.read_bytes() == b"the earlier dump"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]


def test_a_stream_failing_at_close_raises_a_stream_write_error(tmp_path, monkeypatch):
    # the last bytes are flushed at close: a full disk there is the stream's too
    from reprod.storage import atomic

    path = tmp_path / "run.npz"
    logger = ReprodLogger(stream_to=path)
    logger.add("a", np.ones(10))
    real_flush = atomic.AtomicFile.commit

    def commit(self):
        self.file.flush = _full  # the flush inside commit fails
        return real_flush(self)

    def _full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.AtomicFile, "commit", commit)
    with pytest.raises(StreamWriteError) as info:
        logger.close()
    assert str(info.value) == (f"{path}: writing failed: {os.strerror(errno.ENOSPC)} "
                               f"(errno {errno.ENOSPC}); nothing was replaced")
    assert isinstance(info.value.__cause__, OSError) and info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_a_folder_at_the_path_is_one_line_and_stays_as_it_was(tmp_path):
    folder = tmp_path / "out.npz"
    folder.mkdir()
    (folder / "inside").write_bytes(b"kept")
    for save in (lambda p: reprod.save(p, {"a": np.ones(3)}), lambda p: ReprodLogger().save(p)):
        with pytest.raises(WriteError) as info:
            save(folder)
        assert isinstance(info.value, IsADirectoryError) and info.value.errno == errno.EISDIR
        assert str(info.value) == (f"{folder}: cannot create the file: "
                                   f"{os.strerror(errno.EISDIR)} (errno {errno.EISDIR})")
    assert [p.name for p in folder.iterdir()] == ["inside"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_key_at_finds_each_key_where_numpy_writes_it():
    """``key_at`` against numpy's own pickle: each key's payload (distinct bytes) found in
    ``np.save``'s output lies inside that key's span, a nested dict's under its top-level key."""
    import io

    from reprod.storage._npy_writer import key_at

    tree = {f"k{i}": np.full(5000 + 300 * i, i + 1, np.float32) for i in range(6)}
    tree["nested"] = {"a": np.full(7000, 99, np.float64), "b": np.arange(3.0)}
    tree["small"] = np.full(3, 77, np.int16)
    buf = io.BytesIO()
    np.save(buf, tree, allow_pickle=True)
    raw = buf.getvalue()
    for key, value in (*((k, tree[k]) for k in tree if k != "nested"),
                       ("nested", tree["nested"]["a"])):
        at = raw.find(value.tobytes())
        assert at > 0, key
        assert key_at(tree, at) == key
        assert key_at(tree, at + value.nbytes - 1) == key
    assert key_at(tree, 0) is None  # the file's header: before any key
    assert key_at(tree, len(raw) + 10) == "small"  # past the end: the last key
    assert key_at({}, 100) is None


@pytest.mark.parametrize("how", ["save", "logger"])
def test_a_npy_dump_past_a_file_size_limit_names_the_key(tmp_path, how):
    import resource
    import signal

    path = tmp_path / "run.npy"
    path.write_bytes(b"the earlier dump")
    # eight keys of 400,000 bytes: a 1 MiB limit falls inside the third
    script = (
        "import sys, numpy as np, reprod\n"
        "d = {f'k{i}': np.ones(100_000, np.float32) for i in range(8)}\n"
        f"if {how!r} == 'save':\n"
        "    reprod.save(sys.argv[1], d)\n"
        "else:\n"
        "    log = reprod.ReprodLogger()\n"
        "    [log.add(k, v) for k, v in d.items()]\n"
        "    log.save(sys.argv[1])\n"
    )

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True,
                       text=True, timeout=120, preexec_fn=limited)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"reprod.errors.WriteError: {path}: key 'k2': writing failed: "
                    f"{os.strerror(errno.EFBIG)} (errno {errno.EFBIG}); nothing was replaced"), \
        r.stderr
    assert path.read_bytes() == b"the earlier dump"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npy"]
