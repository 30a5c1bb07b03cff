"""Anything numeric -> numpy, losslessly. torch and paddle are recognised by their type's module,
so neither framework is ever imported here; the one that made the tensor is already loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np

from .errors import UnsupportedValueError
from .keys import bad_key, key_text, twin_key

__all__ = ["to_numpy", "to_tree", "Converted", "BFLOAT16", "empty_array"]

BFLOAT16 = "bfloat16"

Tree = Union[np.ndarray, "dict[str, Tree]"]


class Converted:
    """A numpy array plus the name of the dtype it came from when numpy has no such dtype.

    bfloat16 is held as float32 (exact: every bfloat16 is a float32) and remembered here so that the
    native format can store the original bits and the report can show the original dtype.
    """

    __slots__ = ("array", "source_dtype")

    def __init__(self, array: np.ndarray, source_dtype: str | None = None) -> None:
        self.array = array
        self.source_dtype = source_dtype


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values that are exact bfloat16 numbers -> their uint16 bit patterns."""
    return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


# numpy asks for transparent huge pages (madvise) for every allocation from 4 MiB up; where the
# kernel then compacts memory at each fault (THP defrag "madvise", the common default), copying
# a 1 GiB model's activations took 3.0 s against 0.7 s into pre-faulted plain pages (measured on
# the benchmark machine). Large copies therefore go into an anonymous mapping populated at once.
_POPULATE_FROM = 4 << 20
_MAP_FLAGS: Optional[int] = None
try:
    import mmap as _mmap

    if hasattr(_mmap, "MAP_POPULATE"):
        _MAP_FLAGS = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | _mmap.MAP_POPULATE
except ImportError:  # pragma: no cover
    pass


def fresh_copy(a: np.ndarray) -> np.ndarray:
    """``a.copy()`` (C order, writable, its own memory); from 4 MiB into pre-faulted memory."""
    if a.nbytes < _POPULATE_FROM or _MAP_FLAGS is None:
        return a.copy()
    try:
        buf = _mmap.mmap(-1, a.nbytes, flags=_MAP_FLAGS)
    except (OSError, ValueError):
        return a.copy()
    out = np.frombuffer(buf, dtype=a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def empty_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-ordered array that is the owner of its memory as numpy sees it (a view
    of it has it as ``.base``, so its reference count tells whether anyone still holds it); from
    4 MiB in pre-faulted memory, for the reason given above ``fresh_copy``."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes >= _POPULATE_FROM and _MAP_FLAGS is not None:
        try:
            # np.ndarray over the mmap (not frombuffer + reshape): numpy collapses a view's base to
            # the first array that owns its data or whose base is no array, which is this one
            return np.ndarray(shape, dtype=dtype, buffer=_mmap.mmap(-1, nbytes, flags=_MAP_FLAGS))
        except (OSError, ValueError):
            pass
    return np.empty(shape, dtype=dtype)


def _module_of(obj: Any) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _torch_to_numpy(t: Any, key: str, copy: bool = True) -> Converted:
    import torch  # already imported by whoever made ``t``

    try:
        t = t.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        if t.device.type != "cpu":
            t = t.cpu()
        name = str(t.dtype).replace("torch.", "")
        if t.dtype == torch.bfloat16:
            bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
            return Converted(bf16_bits_to_float32(bits), BFLOAT16)
        if name.startswith("float8"):
            # every float8 value is a float32 value: keep the numbers, remember the dtype
            return Converted(t.float().numpy().copy(), name)
        if t.dtype == torch.complex32:
            t = t.to(torch.complex64)
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        # .numpy() shares memory with the tensor: copy so a later in-place update cannot change the log
        return Converted(fresh_copy(t.numpy()) if copy else t.numpy())
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        raise UnsupportedValueError(
            f"key {key!r}: cannot convert torch tensor (dtype {t.dtype}, layout {t.layout}, "
            f"device {t.device}) to numpy: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


_PADDLE_DLPACK = frozenset(["float16", "float32", "float64", "complex64", "complex128", "bool",
                            "uint8", "int8", "int16", "int32", "int64"])


def _paddle_to_numpy(t: Any, key: str, copy: bool = True) -> Converted:
    dtype = str(getattr(t, "dtype", "")).lower().replace("paddle.", "")
    if not copy and dtype in _PADDLE_DLPACK and getattr(t, "place", None) is not None \
            and t.place.is_cpu_place():
        try:
            # the tensor's own memory (.numpy() copies into fresh pages): read at once by the caller
            return Converted(np.from_dlpack(t.detach()))
        except (BufferError, RuntimeError, TypeError, ValueError, AttributeError):
            pass
    try:
        if "bfloat16" in dtype:
            # paddle hands bfloat16 out as its uint16 bit patterns
            return Converted(bf16_bits_to_float32(np.asarray(t.numpy()).view(np.uint16)), BFLOAT16)
        if "float8" in dtype:
            # .numpy() gives float8 as raw bits; the values go through float32 (exact)
            return Converted(np.array(t.astype("float32").numpy(), copy=True), dtype)
        arr = t.numpy()
    except (TypeError, RuntimeError, ValueError, NotImplementedError) as exc:
        raise UnsupportedValueError(
            f"key {key!r}: cannot convert paddle tensor (dtype {dtype}) to numpy: {str(exc).splitlines()[0]}"
        ) from None
    arr = np.asarray(arr)
    if not copy:
        return Converted(arr)
    if arr.flags.owndata and arr.base is None and arr.flags.c_contiguous and arr.flags.writeable:
        return Converted(arr)  # .numpy() made this copy (paddle 2.x and 3.x do): no second one
    return Converted(fresh_copy(arr))


def _is_numeric_dtype(dt: np.dtype) -> bool:
    return dt.kind in "biufc"


def to_numpy(value: Any, *, key: str = "<value>", copy: bool = True) -> Converted:
    """Convert one leaf value (array, tensor, scalar, list of numbers) to a numpy copy.

    ``copy=False``: the array may share memory with ``value`` (a CPU tensor, a numpy array), for
    a caller that is done with it before ``value`` can change (a streaming logger writes it at
    once). Raises UnsupportedValueError naming ``key`` for anything that is not numeric data.
    """
    mod = _module_of(value)
    if isinstance(value, np.ndarray):
        if not _is_numeric_dtype(value.dtype):
            raise UnsupportedValueError(
                f"key {key!r}: value is a numpy array of dtype {value.dtype}, which is not numeric"
            )
        return Converted(fresh_copy(value) if copy else value)
    if isinstance(value, np.generic):
        if not _is_numeric_dtype(value.dtype):
            raise UnsupportedValueError(f"key {key!r}: numpy scalar of dtype {value.dtype} is not numeric")
        return Converted(np.array(value))
    if mod == "torch" and hasattr(value, "detach"):
        return _torch_to_numpy(value, key, copy)
    if mod == "paddle" and hasattr(value, "numpy"):
        return _paddle_to_numpy(value, key, copy)
    if isinstance(value, (bool, int, float, complex)):
        arr = np.array(value)
        if arr.dtype == object:  # an int beyond int64/uint64
            raise UnsupportedValueError(f"key {key!r}: integer {value} does not fit in 64 bits")
        return Converted(arr)
    if isinstance(value, (list, tuple)):
        try:
            parts = [to_numpy(v, key=key).array for v in value]
            arr = np.array(parts) if parts else np.array([], dtype=np.float64)
        except UnsupportedValueError:
            raise
        except ValueError as exc:
            raise UnsupportedValueError(f"key {key!r}: list is ragged or not numeric ({exc})") from None
        if not _is_numeric_dtype(arr.dtype):
            raise UnsupportedValueError(f"key {key!r}: list does not hold numbers")
        return Converted(arr)
    raise UnsupportedValueError(
        f"key {key!r}: cannot log a value of type {type(value).__module__}.{type(value).__qualname__}; "
        "expected a numpy array, a torch or paddle tensor, a number, or a list/dict of them"
    )


def to_tree(value: Any, *, key: str = "<value>", copy: bool = True) -> tuple[Any, Any]:
    """Convert a leaf or a nested mapping. Returns (tree of arrays, tree of source dtypes or None);
    ``copy`` as for ``to_numpy``."""
    if isinstance(value, Mapping):
        data: dict[str, Any] = {}
        dtypes: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                text = key_text(k)
                if text is None:
                    raise bad_key(k, f"key {key!r}: nested key {k!r}")
                if text in value or text in data:  # its own text beside it, before or after
                    raise twin_key(f"key {key!r}: nested key {text}")
                k = text
            data[k], dt = to_tree(v, key=f"{key}/{k}", copy=copy)
            if dt is not None:
                dtypes[k] = dt
        return data, (dtypes or None)
    conv = to_numpy(value, key=key, copy=copy)
    return conv.array, conv.source_dtype
