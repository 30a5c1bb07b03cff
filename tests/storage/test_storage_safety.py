"""reprod.load never executes a file, and every unreadable file is a one-line DumpFormatError.

Each malicious file is first shown to be live (plain ``pickle``/``np.load(allow_pickle=True)`` runs
its payload), then reprod must refuse it with UnsafeDumpError naming the file and the global, and
the payload's side effect must not happen.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest

import reprod
from reprod import DumpFormatError, ReprodError, UnsafeDumpError


def _npy_object_header() -> bytes:
    """The .npy header numpy writes in front of a pickled 0-d object array (reprod_log's dict)."""
    buf = io.BytesIO()
    arr = np.empty((), dtype=object)
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker puts in a file."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _np_save_dict(path, payload, proto=None) -> None:
    d = {"logits": np.arange(100.0), "nested": {"w": np.ones((4, 4)), "evil": payload}}
    if proto is None:
        np.save(path, d, allow_pickle=True)
    else:
        arr = np.empty((), dtype=object)
        arr[()] = d
        with open(path, "wb") as f:
            f.write(_npy_object_header())
            pickle.dump(arr, f, protocol=proto)


def _raw(path, pickle_bytes: bytes) -> None:
    with open(path, "wb") as f:
        f.write(_npy_object_header() + pickle_bytes)


def _make(kind: str, path, marker: str) -> str:
    """Write a malicious dump; return the dotted global reprod's message must name."""
    cmd = f"touch {marker}"
    if kind == "os.system":
        _np_save_dict(path, _Reduce(os.system, (cmd,)))
        return f"{os.system.__module__}.system"  # posix.system on Linux
    if kind == "os.system-proto2":
        _np_save_dict(path, _Reduce(os.system, (cmd,)), proto=2)
        return f"{os.system.__module__}.system"
    if kind == "object-array":
        np.save(path, np.array([_Reduce(os.system, (cmd,)), None], dtype=object), allow_pickle=True)
        return f"{os.system.__module__}.system"
    if kind == "builtins.eval":
        src = f"__import__('os').system({cmd!r})"
        _raw(path, b"cbuiltins\neval\n(V" + src.encode() + b"\ntR.")
        return "builtins.eval"
    if kind == "posix.system":
        _raw(path, b"\x80\x02cposix\nsystem\nq\x00X" + len(cmd).to_bytes(4, "little")
             + cmd.encode() + b"\x85R.")  # fmt: skip
        return "posix.system"
    if kind == "stack-global-eval":
        src = f"__import__('os').system({cmd!r})".encode()
        _raw(path, b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c" + bytes([len(src)]) + src
             + b"\x85R.")  # fmt: skip
        return "builtins.eval"
    if kind == "subprocess.Popen":
        _np_save_dict(path, _Reduce(subprocess.Popen, (["touch", marker],)))
        return "subprocess.Popen"
    raise AssertionError(kind)


KINDS = ["os.system", "os.system-proto2", "object-array", "builtins.eval", "posix.system",
         "stack-global-eval", "subprocess.Popen"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_malicious_pickle_is_refused_and_not_run(tmp_path, kind, assert_one_line_error) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.npy"
    global_name = _make(kind, p, str(marker))

    if kind != "subprocess.Popen":  # control: the file really runs its payload when unpickled
        np.load(p, allow_pickle=True)
        assert marker.exists(), "the crafted file is not live; the test would prove nothing"
        marker.unlink()

    with pytest.raises(UnsafeDumpError) as info:
        d = reprod.load(p)
        for k in d:  # were the refusal lazy, reading the values would have to trigger it
            d[k]
    assert isinstance(info.value, DumpFormatError) and isinstance(info.value, ReprodError)
    assert_one_line_error(info.value, p)
    assert global_name in str(info.value)
    assert not marker.exists()


def test_refusal_also_through_compare_and_helper(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npy"
    _make("os.system", evil, str(marker))
    good = reprod.save(tmp_path / "good.npy", {"logits": np.arange(100.0)})
    with pytest.raises(UnsafeDumpError):
        reprod.compare(good, evil)
    with pytest.raises(UnsafeDumpError):
        reprod.ReprodDiffHelper().load_info(str(evil))
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02c__main__\nEvil\nq\x00)\x81q\x01.",  # NEWOBJ of an arbitrary class
        b"(cos\nsystem\nS'true'\no.",  # OBJ opcode
        b"(S'true'\nios\nsystem\n.",  # INST opcode
        b"\x80\x02\x82\x01.",  # EXT1: extension registry lookup
        b"\x80\x02(K\x01K\x02dcos\ngetcwd\n.",
    ],
    ids=["newobj", "obj", "inst", "ext1", "global-after-dict"],
)
def test_object_building_opcodes_are_refused(tmp_path, payload, assert_one_line_error) -> None:
    p = tmp_path / "evil.npy"
    _raw(p, payload)
    with pytest.raises(DumpFormatError) as info:
        reprod.load(p)
    assert_one_line_error(info.value, p)


# ---------------------------------------------------------------------------------------------
# files that are not dumps
# ---------------------------------------------------------------------------------------------


def _load_everything(path) -> None:
    d = reprod.load(path)
    stack = [d]
    while stack:
        m = stack.pop()
        for k in m:
            v = m[k]
            if isinstance(v, reprod.storage.Dump):
                stack.append(v)
            else:
                np.asarray(v).tobytes()  # touch every byte


def _bad_files(tmp_path):
    rng = np.random.default_rng(1)
    yield "missing", tmp_path / "nope.npy"
    (tmp_path / "empty.npy").write_bytes(b"")
    yield "empty", tmp_path / "empty.npy"
    (tmp_path / "folder.npz").mkdir()
    yield "directory", tmp_path / "folder.npz"
    for n in (1, 7, 100, 5000):
        (tmp_path / f"random{n}.npy").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        yield f"random{n}", tmp_path / f"random{n}.npy"
    (tmp_path / "magic.npy").write_bytes(b"\x93NUMPY" + rng.bytes(200))
    yield "npy-magic-then-garbage", tmp_path / "magic.npy"
    (tmp_path / "pk.npz").write_bytes(b"PK\x03\x04" + rng.bytes(200))
    yield "zip-magic-then-garbage", tmp_path / "pk.npz"
    with zipfile.ZipFile(tmp_path / "notes.npz", "w") as zf:
        zf.writestr("readme.txt", "hello")
    yield "zip-without-arrays", tmp_path / "notes.npz"
    with zipfile.ZipFile(tmp_path / "badmeta.npz", "w") as zf:
        zf.writestr("a.npy", b"")
        zf.writestr("__reprod__.json", "{not json")
    yield "zip-corrupt-metadata", tmp_path / "badmeta.npz"
    os.mkfifo(tmp_path / "fifo.npy")  # reading it would wait for a writer forever
    yield "fifo", tmp_path / "fifo.npy"
    yield "character-device", "/dev/null"
    os.symlink("/dev/zero", tmp_path / "zero.npz")
    yield "symlink-to-a-device", tmp_path / "zero.npz"
    np.save(tmp_path / "list.npy", np.array([np.ones(2), None], dtype=object))
    yield "object-array-not-dict", tmp_path / "list.npy"
    np.save(tmp_path / "str.npy", np.array(["a", "b"]))
    yield "plain-string-array", tmp_path / "str.npy"
    np.savez(tmp_path / "strs.npz", a=np.array(["a"]))
    yield "npz-string-member", tmp_path / "strs.npz"
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)}
        )
        f.write(b"\0" * 64)
    yield "header-claims-terabytes", tmp_path / "huge.npy"


def test_bad_files_raise_one_line_dump_format_error(tmp_path, assert_one_line_error) -> None:
    for name, path in list(_bad_files(tmp_path)):
        with pytest.raises(DumpFormatError) as info:
            _load_everything(path)
        assert_one_line_error(info.value, path)
        assert isinstance(info.value, ReprodError) and isinstance(info.value, ValueError), name


def test_non_numeric_values_load_as_markers_beside_the_arrays(tmp_path) -> None:
    """reprod_log's ``.npy`` may hold a str, None, a list or an array of strings or objects as a
    value: that key is a ``NonNumericValue`` (the engine's ``type`` verdict), the other keys load."""
    from reprod.storage import NonNumericValue

    p = tmp_path / "mixed.npy"
    np.save(p, {"a": np.ones(3), "name": "resnet", "none": None, "lr": [0.1, "x"],
                "s": np.array(["abc"]), "o": np.array([1, "x"], dtype=object)})
    with reprod.load(p) as d:
        np.testing.assert_array_equal(d["a"], np.ones(3))
        got = {k: d[k] for k in ("name", "none", "lr", "s", "o")}
        assert all(isinstance(v, NonNumericValue) for v in got.values())
        assert "'resnet'" in got["name"].what and got["name"].value == "resnet"
        assert got["none"].has_value and got["none"].value is None
        assert got["lr"].value == [0.1, "x"] and "str" in got["lr"].what
        assert "<U3" in got["s"].what and not got["s"].has_value
        assert "object" in got["o"].what
        assert all("\n" not in v.what for v in got.values())


def test_npz_member_with_unknown_compression_method(tmp_path, assert_one_line_error) -> None:
    raw = bytearray(open(reprod.save(tmp_path / "ok.npz", {"a": np.ones(3)}), "rb").read())
    central = raw.find(b"PK\x01\x02")
    raw[central + 10 : central + 12] = (99).to_bytes(2, "little")  # method 99 (AES): unsupported
    p = tmp_path / "method99.npz"
    p.write_bytes(bytes(raw))
    with pytest.raises(DumpFormatError) as info:
        _load_everything(p)
    assert_one_line_error(info.value, p)


def test_deeply_nested_legacy_dict_is_an_error_not_a_crash(tmp_path, assert_one_line_error) -> None:
    depth = 5000
    body = b"}" + b"X\x01\x00\x00\x00k}" * depth + b"s" * depth
    p = tmp_path / "deep.npy"
    _raw(p, b"\x80\x04" + body + b".")
    try:
        _load_everything(p)  # reading it is fine too, as long as it is not another exception
    except DumpFormatError as exc:
        assert_one_line_error(exc, p)


# ---------------------------------------------------------------------------------------------
# truncated and corrupted dumps
# ---------------------------------------------------------------------------------------------


def _valid_dump(tmp_path, fmt) -> tuple[bytes, dict]:
    data = {"logits": np.arange(300, dtype=np.float32).reshape(10, 30), "loss": np.float32(0.25),
            "n": {"w": np.arange(80, dtype=np.int64), "b": np.array([1.5, -2.0])}}  # fmt: skip
    p = reprod.save(tmp_path / f"valid.{fmt}", data)
    return open(p, "rb").read(), data


def _check_same_or_dump_error(path, data, assert_one_line_error) -> None:
    """Loading may succeed lazily; then every value is right or the access is a DumpFormatError."""
    try:
        d = reprod.load(path)
        for k, want in data.items():
            if isinstance(want, dict):
                for k2, w2 in want.items():
                    np.testing.assert_array_equal(d[k][k2], w2)
            else:
                np.testing.assert_array_equal(d[k], want)
        d.close()
    except DumpFormatError as exc:
        assert_one_line_error(exc, path)


def test_truncated_files(tmp_path, fmt, assert_one_line_error) -> None:
    raw, data = _valid_dump(tmp_path, fmt)
    cut = tmp_path / f"cut.{fmt}"
    offsets = sorted(set(range(0, 300)) | set(range(300, len(raw), 7)) | {len(raw) - 1})
    for n in offsets:
        cut.write_bytes(raw[:n])
        try:
            _check_same_or_dump_error(cut, data, assert_one_line_error)
        except AssertionError as exc:
            raise AssertionError(f"cut at {n} of {len(raw)}: {exc}") from None
        except Exception as exc:
            raise AssertionError(f"cut at {n} of {len(raw)}: {type(exc).__name__}: {exc}") from None


def test_corrupted_bytes_never_escape_as_other_exceptions(tmp_path, fmt) -> None:
    """A flipped byte may go unnoticed (a .npy has no checksum), but it may never surface as
    anything other than a DumpFormatError."""
    raw, _ = _valid_dump(tmp_path, fmt)
    rng = np.random.default_rng(7)
    bad = tmp_path / f"bad.{fmt}"
    for i in range(300):
        b = bytearray(raw)
        for pos in rng.integers(0, len(raw), size=1 + i % 3):
            b[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(b))
        try:
            _load_everything(bad)
        except DumpFormatError as exc:
            assert "\n" not in str(exc) and str(bad) in str(exc), str(exc)
        except Exception as exc:
            raise AssertionError(f"flip #{i}: {type(exc).__name__}: {exc}") from None
