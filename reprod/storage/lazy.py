"""The read-only, lazy mapping that ``reprod.load`` returns: keys and shapes come from the file's
structure; an array's bytes are viewed (mmap) only when the key is accessed."""

from __future__ import annotations

import math
import mmap
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from ..adapters import BFLOAT16, bf16_bits_to_float32
from ..errors import DumpFormatError

__all__ = ["ArraySpec", "Dump", "MappedFile", "NonNumericValue", "VERIFY_SMALL_BYTES", "open_regular"]

from .._native import crc32  # zlib's CRC-32, by the kernel where it is on

# By default a member's CRC is checked on first access when the member is smaller than this: the
# check then costs well under a millisecond, and larger members are left to ``verify=True``.
VERIFY_SMALL_BYTES = 1 << 20
_CRC_CHUNK = 16 << 20
# a member this large is remembered as verified (MappedFile.verified); a smaller one is checked
# again when read again, which costs less than remembering it (a million members held ~90 bytes
# each in that set, the largest part of a million-key .npz comparison but for the results)
REMEMBER_VERIFIED = 4096
# files from this size on give their mapped pages back once read through (MappedFile.drop_pages):
# below it, mapping them in again would cost more than the memory is worth
DROP_PAGES_BYTES = 32 << 20


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) \
    | getattr(os, "O_BINARY", 0)


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """``(fd, fstat)`` of ``path`` opened for reading, or a one-line ``DumpFormatError``: a FIFO,
    a device, a socket or a directory is refused. ``os.stat`` first, so that nothing but a regular
    file is opened at all, then ``O_NONBLOCK`` (opening a FIFO swapped in meanwhile does not wait
    for a writer) and ``S_ISREG`` on the opened descriptor, which is what is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DumpFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise DumpFormatError(f"{path}: cannot open ({exc.strerror or exc})") from None
    _check_regular(path, st)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise DumpFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DumpFormatError(f"{path}: is a directory, not a dump") from None
    except OSError as exc:
        raise DumpFormatError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        _check_regular(path, st)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _check_regular(path: str, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise DumpFormatError(f"{path}: is a directory, not a dump")
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file")
    raise DumpFormatError(f"{path}: is {what}, not a dump (only regular files are read)")


class MappedFile:
    """One read-only mmap of a dump, shared by every array viewed from it."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd, st = open_regular(path)
        try:
            self.size = st.st_size
            if self.size == 0:
                raise DumpFormatError(f"{path}: empty file, not a dump")
            try:
                self.mm: Optional[mmap.mmap] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise DumpFormatError(f"{path}: cannot map the file ({_one_line(exc)})") from None
        finally:
            os.close(fd)
        # byte ranges whose checksum has been verified; shared by every Dump viewing this file
        self.verified: set[int] = set()
        self._view: Optional[memoryview] = None

    def drop_pages(self) -> None:
        """Let go of the file's pages this process has mapped in (a large dump, read through):
        they stay in the page cache, and a later read maps them in again. The mapping is shared
        and read-only, so nothing is lost; resident memory stops counting a file read once."""
        mm = self.mm
        if mm is not None and self.size >= DROP_PAGES_BYTES and hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):  # not offered here: pages stay mapped
                pass

    def buffer(self) -> mmap.mmap:
        if self.mm is None:
            raise DumpFormatError(f"{self.path}: the dump was closed")
        return self.mm

    def view(self) -> memoryview:
        """A memoryview of the whole mapping, made once: slicing it costs less than slicing the
        mmap (which copies) or a fresh view per checksum (thousands of members)."""
        if self._view is None:
            self._view = memoryview(self.buffer())
        return self._view

    def close(self) -> None:
        # Arrays handed out keep the buffer alive through numpy's base reference; closing while
        # they exist raises BufferError, in which case the mmap goes when the last view goes.
        if self._view is not None:
            self._view.release()  # slices of it still held keep the mapping alive (BufferError below)
            self._view = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
            self.mm = None


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """Where one array lives: dtype, shape and either a byte range of the mapped file or a loader.

    Slotted: a dump holds one per key (88 bytes here, against 330 with an instance dict: a
    million keys a side made it the largest part of a loaded dump)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int = 0
    fortran: bool = False
    source_dtype: Optional[str] = None
    loader: Optional[Callable[[], np.ndarray]] = None  # for data that cannot be viewed in place
    # (start, length, crc32) of the bytes a stored zip member's CRC covers; None where there is none
    check: Optional[tuple[int, int, int]] = None

    @classmethod
    def in_file(cls, dtype: np.dtype, shape: tuple[int, ...], offset: int, fortran: bool,
                source_dtype: Optional[str] = None,
                check: Optional[tuple[int, int, int]] = None) -> ArraySpec:
        """``ArraySpec(...)`` of bytes in the file, for readers building one per key of a dump: a
        frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, a quarter
        of a reader's per-key cost on dumps of many small keys; the slots' own setters cost half
        of that (tests/diff/test_batch_paths.py checks this builds what ``__init__`` builds)."""
        obj = object.__new__(cls)
        sd, ss, so, sf, ssrc, sl, sc = _SPEC_SETTERS
        sd(obj, dtype)
        ss(obj, shape)
        so(obj, offset)
        sf(obj, fortran)
        ssrc(obj, source_dtype)
        sl(obj, None)
        sc(obj, check)
        return obj

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    @property
    def display_dtype(self) -> str:
        return self.source_dtype or str(self.dtype)

    def materialize(self, mf: Optional[MappedFile]) -> np.ndarray:
        if self.loader is not None:
            arr = self.loader()
        else:
            if mf is None:
                raise RuntimeError("an in-file array spec without its file (a reprod bug)")
            count = math.prod(self.shape) if self.dtype.itemsize else 0
            arr = np.frombuffer(mf.buffer(), dtype=self.dtype, count=count, offset=self.offset)
            if len(self.shape) != 1:  # frombuffer's result is already the 1-D array
                arr = arr.reshape(self.shape, order="F" if self.fortran else "C")
        if self.source_dtype == BFLOAT16:
            arr = bf16_bits_to_float32(arr)
        if arr.flags.writeable:
            arr.flags.writeable = False
        return arr


    def verify(self, mf: Optional[MappedFile], where: Union[str, Callable[[], str]]) -> None:
        """Check the member's CRC32 against its bytes once per opened file; raise on a mismatch.
        ``where`` names the key in the message (a callable is called only then)."""
        if self.check is None or mf is None:
            return
        start, length, crc = self.check
        if start in mf.verified:
            return
        view = mf.view()
        if length <= _CRC_CHUNK:  # most members: one call
            got = crc32(view[start : start + length])
        else:
            got = 0
            for pos in range(start, start + length, _CRC_CHUNK):
                got = crc32(view[pos : min(pos + _CRC_CHUNK, start + length)], got)
        if got != crc:
            text = where() if callable(where) else where
            raise DumpFormatError(f"{text}: checksum mismatch (CRC32 {got:08x}, the zip directory "
                                  f"says {crc:08x}): the file is corrupt")
        if length >= REMEMBER_VERIFIED:
            mf.verified.add(start)


# the slot descriptors' setters, in field order: what a frozen dataclass's __setattr__ bypasses
_SPEC_SETTERS = tuple(ArraySpec.__dict__[f].__set__ for f in ("dtype", "shape", "offset", "fortran",
                                                                "source_dtype", "loader", "check"))


class NonNumericValue:
    """What ``Dump[key]`` gives for a value of a reprod_log ``.npy`` that is not numeric data (a
    ``str``, ``None``, a list that is no array, an array of strings or objects): the key loads,
    and so do the file's other keys; the comparison engine reports this key as a ``type``
    verdict. ``what`` says what the file holds (one line, for a reason); ``value`` is the plain
    Python value where the file holds one (a str, bytes, None, a number, or lists and tuples of
    them), else ``None`` with ``has_value`` False. Nothing in the file is run to build it.

    >>> reprod.load("old_run.npy")["model_name"]
    <reprod non-numeric value: a str ('resnet50')>
    """

    __slots__ = ("what", "kind", "value", "has_value", "source_dtype", "loader", "check")

    def __init__(self, what: str, kind: str, value: Any = None, has_value: bool = False) -> None:
        self.what = what
        self.kind = kind  # "str", "bytes", "NoneType", "list", "tuple", "array", ...
        self.value = value
        self.has_value = has_value
        # the ArraySpec attributes the readers and the engine look at, so it passes as a leaf
        self.source_dtype: Optional[str] = None
        self.loader = None
        self.check = None

    @property
    def nbytes(self) -> int:
        return 0

    def __str__(self) -> str:
        return self.what

    def __repr__(self) -> str:
        return f"<reprod non-numeric value: {self.what}>"


Node = Union[ArraySpec, NonNumericValue, "dict[str, Node]"]


class Dump(Mapping[str, Any]):
    """A read-only mapping of key -> numpy array (or a nested ``Dump`` for nested dicts).

    Iteration follows the order the keys were added. ``spec(key)`` gives shape and dtype without
    reading data; ``dump[key]`` returns a read-only array viewing the file (mmap) where the format
    allows it. ``source_dtype(key)`` is ``"bfloat16"`` for values stored from bfloat16 tensors.

    ``verify`` (native ``.npz`` only, whose members carry a CRC32): ``None`` checks a member smaller
    than ``VERIFY_SMALL_BYTES`` the first time it is read, ``True`` every member (``load`` checks
    them all at once), ``False`` none. A corrupt member raises ``DumpFormatError``.
    """

    def __init__(self, tree: dict[str, Any], mf: Optional[MappedFile], *, path: str, fmt: str,
                 meta: Union[None, dict[str, Any], Callable[[], dict[str, Any]]] = None,
                 verify: Optional[bool] = None,
                 prefix: str = "") -> None:
        self._tree = tree
        self._mf = mf
        self.path = path
        self.format = fmt
        # a dict, or a function returning it (the native reader's: a dump of a million keys would
        # hold their metadata entries twice over, ~400 bytes a key, for an attribute rarely read)
        self._meta: Union[None, dict[str, Any], Callable[[], dict[str, Any]]] = meta
        self._verify = verify
        self._prefix = prefix

    @property
    def meta(self) -> dict[str, Any]:
        """The file's metadata (native ``.npz``: its JSON member), read when first asked for."""
        m = self._meta
        if m is None or callable(m):
            m = self._meta = {} if m is None else m()
        return m

    @meta.setter
    def meta(self, value: dict[str, Any]) -> None:
        self._meta = value

    def __getitem__(self, key: str) -> Any:
        node = self._tree[key]
        if isinstance(node, dict):
            return self._child(key, node)
        if type(node) is NonNumericValue:
            return node
        try:
            if self.pending_check(node) is not None:
                node.verify(self._mf, lambda: self._where(key))
            return node.materialize(self._mf)
        except DumpFormatError:
            raise
        except (ValueError, OSError, EOFError, OverflowError) as exc:
            raise DumpFormatError(f"{self._where(key)}: cannot read array "
                                  f"({_one_line(exc)})") from None

    def in_file(self, key: str) -> Optional[ArraySpec]:
        """The spec of ``key`` when its bytes lie in the mapped file exactly as ``self[key]`` would
        view them (no loader, no bfloat16 widening), ``None`` otherwise; its checksum is not
        verified (see ``pending_check``). For readers that compute on the mapping directly (the
        engine's batch)."""
        node = self._tree[key]
        if type(node) is not ArraySpec or node.loader is not None or node.source_dtype is not None \
                or self._mf is None:
            return None
        return node

    def pending_check(self, spec: ArraySpec) -> Optional[tuple[int, int, int]]:
        """(start, length, CRC32) that ``self[key]`` verifies before viewing ``spec``, or ``None``
        (no checksum, not wanted, or verified already). A caller that checks it itself adds its
        start to ``mapped_file.verified``."""
        check = spec.check
        if check is None or self._mf is None or check[0] in self._mf.verified:
            return None
        if self._verify or (self._verify is None and check[1] < VERIFY_SMALL_BYTES):
            return check
        return None

    @property
    def mapped_file(self) -> Optional[MappedFile]:
        return self._mf

    def key_past(self, size: int) -> Optional[str]:
        """Of the keys whose bytes in the mapped file reach past ``size`` bytes, the one that
        starts first (a file truncated to ``size`` while mapped: the key a read faults on first),
        or ``None``."""
        past = [(spec.offset, key) for key, spec in self._in_file() if spec.offset + spec.nbytes > size]
        return min(past)[1] if past else None

    def _in_file(self) -> Iterator[tuple[str, ArraySpec]]:
        for key in self:
            node = self.spec(key)
            if isinstance(node, Dump):
                yield from node._in_file()
            elif type(node) is ArraySpec and node.loader is None:
                yield self._prefix + key, node

    def _where(self, key: str) -> str:
        # built only when needed: formatting it costs as much as viewing a small array
        return f"{self.path}: key {self._prefix + key!r}"

    def _child(self, key: str, node: dict[str, Any]) -> Dump:
        return Dump(node, self._mf, path=self.path, fmt=self.format, meta=self._meta,
                    verify=self._verify, prefix=f"{self._prefix}{key}/")

    def _release(self, key: str) -> None:
        """Drop ``key``'s spec (the key stays, its value becomes ``None``): for the engine, once
        it has compared a key of a dump it opened itself and no one else holds. A million keys a
        side held ~120 bytes each in specs until the comparison ended. Replacing a value keeps
        the dict's size, so a walk iterating it meanwhile goes on."""
        tree = self._tree
        if type(tree) is dict:
            if key in tree and not isinstance(tree[key], dict):
                tree[key] = None
        else:
            tree.release(key)  # a ColumnTree

    def verify(self) -> None:
        """Check the CRC32 of every member now (native ``.npz``; a no-op for formats without one).

        >>> reprod.load("run.npz").verify()   # raises DumpFormatError naming a corrupt key
        """
        for key, node in self._tree.items():
            if isinstance(node, dict):
                self._child(key, node).verify()
            elif type(node) is ArraySpec:
                node.verify(self._mf, f"{self.path}: key {self._prefix + key!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def __contains__(self, key: object) -> bool:
        return key in self._tree

    def spec(self, key: str) -> Union[ArraySpec, Dump]:
        node = self._tree[key]
        if isinstance(node, dict):
            return self._child(key, node)
        return node

    def source_dtype(self, key: str) -> Optional[str]:
        node = self._tree[key]
        return None if isinstance(node, dict) else node.source_dtype

    def to_dict(self) -> dict[str, Any]:
        """Read everything into plain (writable) numpy arrays and dicts (``NonNumericValue``s stay
        as they are). Keys that the file stores as one shared payload (a pickle's memo) share one
        copy here too, as ``pickle.load`` would give them: memory stays that of the file's data,
        however many keys refer to it (but for arrays of 0 or 1 byte: pickle stores distinct ones
        of those as one payload too, so each gets its own copy)."""
        return self._to_dict({})

    def _to_dict(self, copies: dict[Any, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, node in self._tree.items():
            if isinstance(node, dict):
                out[k] = self._child(k, node)._to_dict(copies)
            elif type(node) is NonNumericValue:
                out[k] = node
            else:
                # in-file bytes by where they lie and how they are read (a ColumnTree builds a
                # new spec per lookup), anything else by the spec object itself
                # (an empty or one-byte payload is one bytes object CPython shares between
                # distinct arrays, so pickle writes it once: those are never taken as one; a
                # loader's spec lives in a dict tree, so its id stays its own)
                if node.loader is None and node.nbytes <= 1:
                    out[k] = np.array(self[k])
                    continue
                ident: Any = id(node) if node.loader is not None else \
                    (node.offset, node.dtype, node.shape, node.fortran, node.source_dtype)
                arr = copies.get(ident)
                if arr is None:
                    arr = copies[ident] = np.array(self[k])
                out[k] = arr
        return out

    def close(self) -> None:
        if self._mf is not None:
            self._mf.close()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<reprod.Dump {self.path!r} ({self.format}), {len(self)} keys>"

    def to_writable_dict(self) -> dict[str, Any]:
        """The dump as plain nested ``dict``s of writable numpy arrays, without reading it: arrays
        whose bytes lie in the file view a private copy-on-write mapping of it (``mmap.ACCESS_COPY``,
        ``np.load(mmap_mode="c")``'s semantics), so writing to one changes this process's copy of
        those pages, never the file. Values not stored as viewable bytes (pickled scalars,
        compressed members, bfloat16 widened to float32) are copies. Checksums are verified as
        ``self[key]`` verifies them. What ``ReprodDiffHelper.load_info`` returns; the dump itself
        can be closed afterwards."""
        mf = self._mf
        cow: Optional[mmap.mmap] = None
        if mf is not None:
            try:
                fd, st = open_regular(self.path)
                try:
                    if st.st_size == mf.size:
                        cow = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    os.close(fd)
            except DumpFormatError:
                raise
            except (OSError, ValueError) as exc:
                raise DumpFormatError(f"{self.path}: cannot map the file again "
                                      f"({_one_line(exc)})") from None
            # opened by path a second time: it must still be the file the structure was read from
            n = min(mf.size, 1 << 16)
            buf = mf.buffer()
            if cow is None or cow[:n] != buf[:n] or cow[mf.size - n:] != buf[mf.size - n:]:
                raise DumpFormatError(f"{self.path}: the file changed on disk while it was read")

        def build(dump: Dump) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, node in dump._tree.items():
                if isinstance(node, dict):
                    out[key] = build(dump._child(key, node))
                elif type(node) is NonNumericValue:
                    # what numpy.load gives for it, where the file holds a plain value
                    out[key] = node.value if node.has_value else node
                elif cow is None or node.loader is not None or node.nbytes <= 1:
                    # (a payload of 0 or 1 byte may be shared by distinct arrays: see _to_dict)
                    out[key] = np.array(dump[key])  # its own copy: a loader may cache its array
                elif node.source_dtype is not None:
                    arr = dump[key]  # bfloat16 widened: a fresh array, flagged read-only
                    arr.flags.writeable = True
                    out[key] = arr
                else:
                    try:
                        if dump.pending_check(node) is not None:
                            node.verify(mf, lambda k=key: dump._where(k))
                        count = math.prod(node.shape) if node.dtype.itemsize else 0
                        arr = np.frombuffer(cow, dtype=node.dtype, count=count, offset=node.offset)
                    except DumpFormatError:
                        raise
                    except (ValueError, OSError, EOFError, OverflowError) as exc:
                        raise DumpFormatError(f"{dump._where(key)}: cannot read array "
                                              f"({_one_line(exc)})") from None
                    if len(node.shape) != 1:
                        arr = arr.reshape(node.shape, order="F" if node.fortran else "C")
                    out[key] = arr
            return out

        return build(self)


def _one_line(exc: BaseException) -> str:
    """An exception's message as one printable line (it may quote bytes from the file)."""
    text = " ".join(str(exc).split())
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text[:200] or type(exc).__name__
