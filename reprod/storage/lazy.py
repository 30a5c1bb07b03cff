"""The read-only, lazy mapping that ``reprod.load`` returns: keys and shapes come from the file's
structure; an array's bytes are viewed (mmap) only when the key is accessed."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from ..adapters import BFLOAT16, bf16_bits_to_float32
from ..errors import DumpFormatError

__all__ = ["ArraySpec", "Dump", "MappedFile"]


class MappedFile:
    """One read-only mmap of a dump, shared by every array viewed from it."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise DumpFormatError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise DumpFormatError(f"{path}: is a directory, not a dump") from None
        except OSError as exc:
            raise DumpFormatError(f"{path}: cannot open ({exc.strerror})") from None
        with f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size == 0:
                raise DumpFormatError(f"{path}: empty file, not a dump")
            self.mm: Optional[mmap.mmap] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def buffer(self) -> mmap.mmap:
        if self.mm is None:
            raise DumpFormatError(f"{self.path}: the dump was closed")
        return self.mm

    def close(self) -> None:
        # Arrays handed out keep the buffer alive through numpy's base reference; closing while
        # they exist raises BufferError, in which case the mmap goes when the last view goes.
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
            self.mm = None


@dataclass(frozen=True)
class ArraySpec:
    """Where one array lives: dtype, shape and either a byte range of the mapped file or a loader."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int = 0
    fortran: bool = False
    source_dtype: Optional[str] = None
    loader: Optional[Callable[[], np.ndarray]] = None  # for data that cannot be viewed in place

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
            assert mf is not None
            count = self.nbytes // self.dtype.itemsize if self.dtype.itemsize else 0
            arr = np.frombuffer(mf.buffer(), dtype=self.dtype, count=count, offset=self.offset)
            arr = arr.reshape(self.shape, order="F" if self.fortran else "C")
        if self.source_dtype == BFLOAT16:
            arr = bf16_bits_to_float32(arr)
        if arr.flags.writeable:
            arr.flags.writeable = False
        return arr


Node = Union[ArraySpec, "dict[str, Node]"]


class Dump(Mapping[str, Any]):
    """A read-only mapping of key -> numpy array (or a nested ``Dump`` for nested dicts).

    Iteration follows the order the keys were added. ``spec(key)`` gives shape and dtype without
    reading data; ``dump[key]`` returns a read-only array viewing the file (mmap) where the format
    allows it. ``source_dtype(key)`` is ``"bfloat16"`` for values stored from bfloat16 tensors.
    """

    def __init__(self, tree: dict[str, Any], mf: Optional[MappedFile], *, path: str, fmt: str,
                 meta: Optional[dict[str, Any]] = None) -> None:
        self._tree = tree
        self._mf = mf
        self.path = path
        self.format = fmt
        self.meta: dict[str, Any] = meta or {}

    def __getitem__(self, key: str) -> Any:
        node = self._tree[key]
        if isinstance(node, dict):
            return Dump(node, self._mf, path=self.path, fmt=self.format, meta=self.meta)
        try:
            return node.materialize(self._mf)
        except DumpFormatError:
            raise
        except (ValueError, OSError, EOFError) as exc:
            raise DumpFormatError(f"{self.path}: key {key!r}: cannot read array ({exc})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def __contains__(self, key: object) -> bool:
        return key in self._tree

    def spec(self, key: str) -> Union[ArraySpec, Dump]:
        node = self._tree[key]
        if isinstance(node, dict):
            return Dump(node, self._mf, path=self.path, fmt=self.format, meta=self.meta)
        return node

    def source_dtype(self, key: str) -> Optional[str]:
        node = self._tree[key]
        return None if isinstance(node, dict) else node.source_dtype

    def to_dict(self) -> dict[str, Any]:
        """Read everything into plain (writable) numpy arrays and dicts."""
        out: dict[str, Any] = {}
        for k in self:
            v = self[k]
            out[k] = v.to_dict() if isinstance(v, Dump) else np.array(v)
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
