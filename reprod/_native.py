"""The optional compiled kernel (``reprod/_kernel.c``), imported here and nowhere else.

It serves the comparison (``stats``, ``stats3``, ``stats_many``) and storage (``crc32``, the pickle opcode
scanner ``scan_items``, the ``.npz`` writer's batch of members ``npz_pack`` and its metadata's
``join_texts``, the ``.npy`` dict writer's runs of keys ``npy_pack`` and its check ``npy_check``) and the
report writers (``float_texts``: ``float.__repr__`` of a column). Without a C compiler at install it is absent and every caller takes its
numpy/zlib/Python path, with the same results. ``REPROD_KERNEL=0`` switches it off for the
process (read once, here); tests switch it with :func:`set_enabled`. Its reads of mapped dumps
are guarded against SIGBUS (a file truncated by another process meanwhile): they raise
:data:`MappedReadError` instead of killing the process; the numpy path has no such guard.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["kernel", "built", "set_enabled", "crc32", "scanner", "float_texts",
           "MappedReadError"]

try:
    from . import _kernel as _built  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _built = None


class _NeverRaised(OSError):
    """Stands for MappedReadError where the kernel is not built (nothing raises it then)."""


# A SIGBUS caught while the kernel read a buffer: the file mapped under it was truncated (or
# could not be read) meanwhile. An OSError with ``argument`` (which buffer argument faulted,
# 0-based, -1 unknown) and ``job`` (the stats_many row, -1 elsewhere); callers name the file.
MappedReadError: type[OSError] = getattr(_built, "MappedReadError", _NeverRaised)

_enabled = _built is not None and os.environ.get("REPROD_KERNEL", "1") != "0"


def kernel() -> Optional[Any]:
    """The compiled module, or ``None`` when it is not built or switched off."""
    return _built if _enabled else None


def built() -> Optional[Any]:
    """The compiled module whether or not it is switched off (``None`` when not built)."""
    return _built


def set_enabled(on: bool) -> bool:
    """Use the kernel (when built) or not; returns the previous setting."""
    global _enabled
    previous = _enabled
    _enabled = bool(on) and _built is not None
    return previous


def crc32(data: Any, value: int = 0) -> int:
    """zlib's CRC-32, computed by the kernel where it is on (~3x faster with PCLMULQDQ)."""
    if _enabled:
        return _built.crc32(data, value)  # type: ignore[union-attr]
    import zlib  # only without the kernel: ~0.25 ms of a process that saves

    return zlib.crc32(data, value)


def scanner() -> Optional[Any]:
    """The compiled scanner of numpy's per-array pickle opcodes, or ``None``."""
    return _built.scan_items if _enabled else None  # type: ignore[union-attr]


def float_texts(col: Sequence[float]) -> list[str]:
    """``list(map(float.__repr__, col))``, the same texts byte for byte, from the kernel where it
    is on (~80 ns a value against CPython's ~0.6 us: its dtoa works in bignums). ``col`` holds
    exact floats: the kernel raises TypeError on anything else, a float subclass included (whose
    ``__repr__`` may differ); the fallback only on a non-float."""
    if _enabled:
        return _built.float_texts(col)  # type: ignore[union-attr]
    return list(map(float.__repr__, col))
