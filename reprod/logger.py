"""ReprodLogger: reprod_log's capture API, accepting any framework's tensors and copying at add time."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import numpy as np

from .adapters import _POPULATE_FROM, fresh_copy, to_tree
from .errors import UnsupportedValueError
from .keys import bad_key, key_text

__all__ = ["ReprodLogger"]

PathLike = Union[str, "os.PathLike[str]"]

_NUMERIC_KINDS = frozenset("biufc")
_SCALARS = (float, int, bool)


def _plain_copy(val: Any) -> Optional[np.ndarray]:
    """What ``to_tree`` makes of the values logged most, plain numpy arrays and Python numbers
    (a C-ordered copy; a 0-d array), without its per-value dispatch; ``None`` for anything else."""
    tv = type(val)
    if tv is np.ndarray and val.dtype.kind in _NUMERIC_KINDS:
        return fresh_copy(val)
    if tv in _SCALARS:
        arr = np.array(val)
        if arr.dtype.kind != "O":  # an int beyond 64 bits: to_tree raises the error
            return arr
    return None


def _key(key: Any) -> str:
    """A key reprod_log accepted that reprod stores: str as is, an integer (not a bool) as its str."""
    text = key_text(key)
    if text is None:
        raise bad_key(key, f"key {key!r}")
    return text


class ReprodLogger:
    """Collect named tensors and save them as one dump.

    >>> logger = ReprodLogger()
    >>> logger.add("logits", model(x))          # numpy, torch, paddle, scalars, nested dicts
    >>> logger.save("result/forward_torch.npy")  # reprod_log's format; ``.npz`` for the native one

    With ``stream_to="run.npz"`` every ``add`` is written to disk at once (native format) and
    memory stays bounded however many steps are logged (an index of the keys, moved to disk past
    20,000 keys); ``save()``/``close()`` finishes the file (it appears, complete, only then).
    ``reprod.capture.record`` writes each tensor inside its hook, from the tensor's own memory.
    With ``stream_queue_bytes=N`` (> 0) it hands copies to a writer thread instead, so that the
    model computes on while they reach the file, at most N bytes of them waiting: worth it where
    the framework leaves a CPU core idle (paddle's CPU kernels: 1.2x -> 1.0x of clone hooks), a
    loss where its threads take every core (torch's, by default; benchmarks/README.md, "Capture").
    CUDA tensors always go through that thread (64 MiB waiting by default): their copies reach it
    still in flight, and it waits for each before writing it.
    Once that thread runs, ``add`` queues a copy of its value behind them. A failed write (a full
    disk) raises ``reprod.errors.StreamWriteError``, naming the file, the key and the problem: from
    that ``add``, or, where the thread wrote it, from the next ``add``/``keys``/``close``; the dump
    is then abandoned. A failed ``save`` raises ``reprod.errors.WriteError`` (the same, less the
    streaming); either way any earlier file at the path is kept.
    Differences from reprod_log: values are copied at ``add`` (reprod_log keeps a reference, so an
    in-place update after ``add`` changed what it saved); an integer key is stored (and reported)
    as its ``str`` (``add(3, x)`` logs key ``"3"``); bad keys or values raise ``ReprodError`` instead
    of ``AssertionError``.
    """

    def __init__(self, stream_to: Optional[PathLike] = None, *,
                 stream_queue_bytes: int = 0) -> None:
        self._data: dict[str, Any] = {}
        self._dtypes: dict[str, Any] = {}
        self._writer: Any = None
        self._background: Any = None  # npz_background.BackgroundWriter, from the first hand-over
        self._queue_bytes = int(stream_queue_bytes)  # 0: no writer thread for capture's CPU copies
        if self._queue_bytes < 0:
            raise ValueError(f"stream_queue_bytes={stream_queue_bytes}: must be >= 0")
        self._stream_path = None if stream_to is None else os.fsdecode(stream_to)
        if self._stream_path is not None:
            from .storage.npz_writer import NpzWriter

            self._writer = NpzWriter(self._stream_path, stream=True)

    @property
    def data(self) -> dict[str, Any]:
        """The logged values (key -> numpy array or nested dict). Empty in streaming mode."""
        return self._data

    @property
    def source_dtypes(self) -> dict[str, Any]:
        """Original dtypes numpy cannot hold (``"bfloat16"``), by key; values are stored as float32."""
        return self._dtypes

    def add(self, key: Union[str, int], val: Any) -> None:
        if type(key) is not str:
            key = _key(key)
        if (type(val) is np.ndarray and self._writer is None and val.nbytes < _POPULATE_FROM
                and val.dtype.kind in _NUMERIC_KINDS):
            # the value logged most, a small numeric array: _plain_copy's copy, inline
            self._data[key] = val.copy()
            if self._dtypes:
                self._dtypes.pop(key, None)
            return
        tree = _plain_copy(val) if self._writer is None else None
        if tree is not None:
            dtypes = None
        else:
            # a streaming logger writes the value before returning (no copy of it is needed),
            # unless its writer thread runs: then a copy waits behind what the thread has
            background = self._background
            tree, dtypes = to_tree(val, key=key, copy=self._writer is None or background is not None)
            if self._writer is not None:
                if background is not None:
                    background.put(key, tree, dtypes)
                else:
                    self._writer.add(key, tree, dtypes)
                return
        self._data[key] = tree
        if dtypes is not None:
            self._dtypes[key] = dtypes
        else:
            self._dtypes.pop(key, None)

    def _put(self, key: str, array: np.ndarray, source_dtype: Optional[str] = None,
             crcs: Optional[dict[bytes, int]] = None) -> None:
        """``add`` of an array that is already the logger's own copy (``reprod.capture`` makes
        it): kept as is in memory, written at once when streaming (``crcs``: see
        ``NpzWriter.add_array``)."""
        if self._writer is not None:
            if self._background is not None:  # the order of keys: what waits goes first
                self._background.drain()
            self._writer.add_array(key, array, source_dtype, crcs)
            return
        self._data[key] = array
        if source_dtype is not None:
            self._dtypes[key] = source_dtype
        else:
            self._dtypes.pop(key, None)

    def _put_later(self, key: str, array: np.ndarray, source_dtype: Optional[str] = None,
                   crcs: Optional[dict[bytes, int]] = None,
                   ready: Optional[Callable[[], None]] = None) -> None:
        """``_put`` of an array nobody changes any more, written by the logger's writer thread
        (started here the first time) once ``ready()`` has returned (the wait for a device's
        copy into it); waits while ``stream_queue_bytes`` are waiting."""
        background = self._background
        if background is None:
            from .storage.npz_background import QUEUE_BYTES, BackgroundWriter

            background = self._background = BackgroundWriter(self._writer,
                                                             self._queue_bytes or QUEUE_BYTES)
        background.put(key, array, source_dtype, crcs, ready)

    def remove(self, key: Union[str, int]) -> None:
        if type(key) is not str:
            key = key_text(key) or key  # a key add refuses is in no log: reprod_log's message
        if self._writer is not None:
            raise UnsupportedValueError(
                f"key {key!r}: cannot remove from a streaming logger, it is already on disk"
            )
        if key in self._data:
            self._data.pop(key)
            self._dtypes.pop(key, None)
        else:
            # reprod_log's exact message
            print(f"{key} is not in {self._data.keys()}")

    def clear(self) -> None:
        self._data.clear()
        self._dtypes.clear()

    def keys(self) -> list[str]:
        if self._writer is None:
            return list(self._data)
        if self._background is not None:
            self._background.drain()
        return self._writer.keys()

    def save(self, path: Optional[PathLike] = None) -> str:
        """Write the dump atomically and return the path written.

        The format follows the suffix: ``.npz`` native, anything else reprod_log's pickled ``.npy``
        dict (numpy appends ``.npy`` to a path without it, as reprod_log's ``np.save`` did).
        In streaming mode ``path`` may be omitted (or must be the stream path).
        """
        if self._writer is not None:
            if path is not None and os.path.abspath(os.fsdecode(path)) != os.path.abspath(self._stream_path or ""):
                raise UnsupportedValueError(
                    f"{os.fsdecode(path)}: this logger streams to {self._stream_path}; save() there"
                )
            return self.close()
        if path is None:
            raise TypeError("save() needs a path")
        p = os.fsdecode(path)
        if not p.endswith(".npz"):
            # what storage.save does for this suffix (storage.legacy.write_legacy), minus its
            # re-check of every value (add() has converted them all already) and without importing
            # the reader of the format (~2.5 ms)
            from .storage._npy_writer import save_npy_dict

            return save_npy_dict(p if p.endswith(".npy") else p + ".npy", self._data)
        # what storage.save does for this suffix (storage.npz_writer.write_npz), minus its re-check
        # of every value, as above (~0.4 us a key)
        from .storage.npz_writer import write_npz

        return write_npz(p, self._data, self._dtypes)

    def close(self) -> str:
        """Finish a streaming dump (no-op otherwise)."""
        if self._writer is None:
            return ""
        if self._background is not None:
            return self._background.close()
        return self._writer.close()

    def __enter__(self) -> ReprodLogger:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._writer is not None:
            if exc_type is None:
                self.close()
            elif self._background is not None:
                self._background.abort()
            else:
                self._writer.abort()
