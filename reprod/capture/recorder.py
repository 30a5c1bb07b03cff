"""The framework-free part of layer capture: which layers, which keys, in which order.

A backend (``_torch``, ``_paddle``) knows how to walk a model and attach hooks; the Recorder
decides what each hook writes. Every value is copied to host memory inside its hook: an in-place
op later in the forward pass cannot change what was recorded, and no tensor, hence no autograd
graph, is kept alive.

Copying is what capture costs, so it is done as little and as cheaply as it can be:

- a tensor recorded again unchanged (a layer's output is the next layer's input and its
  container's output: same object, same in-place version counter) is copied once, and its keys
  share that copy as read-only views;
- copies go into host arrays reused from the model's previous ``record`` block where nobody holds
  them any more (their reference count says so: numpy makes every view of an array hold that
  array), so a step's copies land in memory already faulted in rather than ~300 fresh
  allocations; an array the user (or a logger) still holds is never written again;
- a streaming logger writes each tensor from the tensor's own memory, inside the hook; keys of
  one unchanged tensor share its CRC, computed once. With a writer thread
  (``ReprodLogger(stream_queue_bytes=N)``) the hooks copy each tensor into host memory reused as
  soon as the thread has written it (a pool bounded in bytes, like the thread's queue), and keys
  of one unchanged tensor hand over the same copy;
- a CUDA tensor is copied into pinned host memory without blocking, on its own stream (the copy
  overlaps the next layers; an in-place op later on that stream runs after it); the block's end
  waits for those copies, so the logger's values are complete once the block has ended. A
  streaming logger hands such copies to its writer thread (started for them whatever
  ``stream_queue_bytes`` says), which waits for each copy's event before writing it.
"""

from __future__ import annotations

import fnmatch
import math
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Protocol, Union

import numpy as np

from ..adapters import Converted, empty_array
from ..logger import ReprodLogger
from .naming import ROOT, layer_key, param_key

__all__ = ["Backend", "Recorder", "Patterns", "Buffers", "StreamBuffers"]

Patterns = Union[str, Sequence[str], None]
Items = tuple[Any, ...]
# called with the positional and keyword arguments of a layer call
PreHook = Callable[[tuple[Any, ...], dict[str, Any]], None]
# tensors a streamed block remembers, for keys that record one again (MobileNetV3's repeat
# within 2)
_RECENT = 8


class Backend(Protocol):
    """What a framework module provides to the Recorder."""

    def named_layers(self, model: Any) -> list[tuple[str, Any]]: ...  # root first, as ""

    def is_leaf(self, layer: Any) -> bool: ...

    def is_tensor(self, value: Any) -> bool: ...

    def wants_grad(self, tensor: Any) -> bool: ...

    def trainable_parameters(self, model: Any) -> list[tuple[str, Any]]: ...

    def add_pre_hook(self, layer: Any, fn: PreHook) -> Any: ...

    def add_post_hook(self, layer: Any, fn: Callable[[Any], None]) -> Any: ...

    # a handle to remove, or None where holding one would keep a transient tensor alive
    def add_grad_hook(self, tensor: Any, fn: Callable[[Any], None], *, persistent: bool) -> Any: ...

    def layer_types(self, model: Any) -> dict[str, str]: ...

    # the tensor's in-place version counter; None where it has none (then it is never shared)
    def version(self, tensor: Any) -> Optional[int]: ...

    # whether a gradient's version counter also counts autograd's own in-place accumulation
    # into it (a gradient handed to two hooks may be summed into between them)
    shares_gradients: bool

    # a host copy of the tensor taken now (or, second item True, enqueued on its device, complete
    # after ``synchronize``), in an array from ``buffers`` where it can
    def host_copy(self, tensor: Any, key: str, buffers: HostArrays) -> tuple[Converted, bool]: ...

    # the tensor's host memory as numpy (a copy only where it must convert), for a caller done
    # with it before the tensor can change
    def host_view(self, tensor: Any, key: str) -> Converted: ...

    def synchronize(self) -> None: ...

    # whether host_copy enqueues the tensor's copy on a device (then a streamed block hands it
    # to the writer thread with ``copy_ready``'s wait rather than blocking the model on it)
    def on_device(self, tensor: Any) -> bool: ...

    # a wait for the copies enqueued so far on the tensor's device stream, for another thread
    def copy_ready(self, tensor: Any) -> Callable[[], None]: ...


class Buffers:
    """Host arrays for one model's captures, reused from one ``record`` block to the next.

    ``take`` hands out an array of the last block that nobody else holds (numpy makes every
    view of an array hold a reference to it, so its reference count is exact), ``keep`` registers
    a new one; ``end_block`` makes this block's arrays the next block's candidates. An array of
    the last block that this block did not take (still held when looked at, or of a shape this
    block did not need: a training step's gradients during an evaluation step) stays a candidate
    for one more block, then is forgotten: what a user keeps is never written again, and what
    nobody keeps is held for at most two blocks.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[tuple[int, np.ndarray]]] = {}
        self._made: list[tuple[tuple[Any, ...], np.ndarray]] = []
        self._busy: list[tuple[tuple[Any, ...], np.ndarray]] = []
        self._block = 0
        self.in_use = False

    def take(self, shape: tuple[int, ...], dtype: np.dtype, pinned: bool = False) -> Optional[np.ndarray]:
        spec = (shape, np.dtype(dtype).str, pinned)
        candidates = self._free.get(spec)
        while candidates:
            born, arr = candidates.pop()
            # two references: ``arr`` here and getrefcount's argument
            if sys.getrefcount(arr) == 2:
                self._made.append((spec, arr))
                return arr
            if born == self._block - 1:
                self._busy.append((spec, arr))
        return None

    def keep(self, arr: np.ndarray, pinned: bool = False) -> None:
        self._made.append(((arr.shape, arr.dtype.str, pinned), arr))

    def release(self, arr: np.ndarray) -> None:
        """Hand the array ``keep`` registered last back for reuse within this block (the
        logger took a copy of it): a no-op for any other array."""
        if self._made and self._made[-1][1] is arr:
            spec, _ = self._made.pop()
            self._free.setdefault(spec, []).append((self._block - 1, arr))

    def end_block(self) -> None:
        block = self._block
        free: dict[tuple[Any, ...], list[tuple[int, np.ndarray]]] = {}
        for spec, arr in self._busy:
            free.setdefault(spec, []).append((block - 1, arr))
        for spec, candidates in self._free.items():
            for born, arr in candidates:
                if born == block - 1:
                    free.setdefault(spec, []).append((born, arr))
        for spec, arr in self._made:
            free.setdefault(spec, []).append((block, arr))
        self._free, self._made, self._busy = free, [], []
        self._block = block + 1

    def clear(self) -> None:
        self._free.clear()
        self._made.clear()
        self._busy.clear()


# copies smaller than this come from malloc's heap, warm already: not pooled
_POOL_FROM = 64 << 10


def _capacity(nbytes: int) -> int:
    """The pooled buffer size for ``nbytes``: 8 sizes per power of two, at most 1/8 unused."""
    shift = max(nbytes.bit_length() - 4, 6)
    return -(-nbytes >> shift) << shift


class StreamBuffers:
    """Host memory for the copies a streamed ``record`` block hands to the writer thread.

    Unlike ``Buffers`` an array is reused within the block, as soon as nobody holds it (the
    writer thread drops it once written; the Recorder holds the last few, for keys that record
    the same tensor again): the copies in flight at once, not a step's, are what it needs. The
    pool keeps flat byte buffers by size class, each handed out as a view of the shape wanted (a
    view holds its buffer, so the buffer's reference count tells whether anyone still holds it),
    and at most ``limit`` bytes of them; past that a copy gets memory of its own, not kept.
    Pinned arrays (CUDA copies) are kept by exact shape and dtype, within the same limit.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._flat: dict[int, list[np.ndarray]] = {}
        self._pinned: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self._bytes = 0
        self.in_use = False

    def take(self, shape: tuple[int, ...], dtype: np.dtype, pinned: bool = False) -> Optional[np.ndarray]:
        dtype = np.dtype(dtype)
        if pinned:
            for arr in self._pinned.get((shape, dtype.str), ()):
                if sys.getrefcount(arr) == 3:  # the list, ``arr`` and getrefcount's argument
                    return arr
            return None
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < _POOL_FROM:
            return None  # ``keep`` is then told of a fresh array, and ignores it
        cap = _capacity(nbytes)
        for buf in self._flat.get(cap, ()):
            if sys.getrefcount(buf) == 3:
                return buf[:nbytes].view(dtype).reshape(shape)
        buf = empty_array((cap,), np.dtype(np.uint8))
        if self._room(cap):
            self._flat.setdefault(cap, []).append(buf)
            self._bytes += cap
        return buf[:nbytes].view(dtype).reshape(shape)

    def keep(self, arr: np.ndarray, pinned: bool = False) -> None:
        if pinned and self._room(arr.nbytes):
            self._pinned.setdefault((arr.shape, arr.dtype.str), []).append(arr)
            self._bytes += arr.nbytes

    def _room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in the limit, once unheld buffers are given up for them."""
        if self._bytes + nbytes <= self.limit:
            return True
        for pool in (self._flat, self._pinned):
            for spec in list(pool):
                arrays = pool[spec]
                kept = [a for a in arrays if sys.getrefcount(a) > 3]  # list, ``a``, argument
                self._bytes -= sum(a.nbytes for a in arrays) - sum(a.nbytes for a in kept)
                if kept:
                    pool[spec] = kept
                else:
                    del pool[spec]
                if self._bytes + nbytes <= self.limit:
                    return True
        return False

    def clear(self) -> None:
        self._flat.clear()
        self._pinned.clear()
        self._bytes = 0


# where a backend's host_copy takes its arrays from (take, keep)
HostArrays = Union[Buffers, StreamBuffers]

# model -> its Buffers (its StreamBuffers), for as long as the model lives
_BUFFERS: weakref.WeakKeyDictionary[Any, Buffers] = weakref.WeakKeyDictionary()
_STREAM_BUFFERS: weakref.WeakKeyDictionary[Any, StreamBuffers] = weakref.WeakKeyDictionary()
_BUFFERS_LOCK = threading.Lock()


def _buffers_for(model: Any, reuse: bool) -> Buffers:
    if not reuse:
        return Buffers()
    with _BUFFERS_LOCK:
        try:
            buffers = _BUFFERS.get(model)
            if buffers is None:
                buffers = _BUFFERS[model] = Buffers()
        except TypeError:  # a model that cannot be weakly referenced: no reuse
            return Buffers()
        if buffers.in_use:  # a record block of this model inside another: its own arrays
            return Buffers()
        buffers.in_use = True
        return buffers


def _stream_buffers_for(model: Any, reuse: bool, limit: int) -> StreamBuffers:
    if not reuse:
        return StreamBuffers(limit)
    with _BUFFERS_LOCK:
        try:
            pool = _STREAM_BUFFERS.get(model)
            if pool is None:
                pool = _STREAM_BUFFERS[model] = StreamBuffers(limit)
        except TypeError:
            return StreamBuffers(limit)
        if pool.in_use:
            return StreamBuffers(limit)
        pool.in_use = True
        pool.limit = limit
        return pool


def release_buffers(model: Any) -> None:
    """Drop the host arrays kept for reuse by ``model``'s next ``record`` block."""
    with _BUFFERS_LOCK:
        try:
            buffers = _BUFFERS.pop(model, None)
            pool = _STREAM_BUFFERS.pop(model, None)
        except TypeError:
            buffers = pool = None
    if buffers is not None:
        buffers.clear()
    if pool is not None:
        pool.clear()


def _patterns(p: Patterns) -> Optional[tuple[str, ...]]:
    if p is None:
        return None
    return (p,) if isinstance(p, str) else tuple(p)


def _selected(name: str, include: Optional[tuple[str, ...]], exclude: tuple[str, ...]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _outputs(output: Any, is_tensor: Callable[[Any], bool]) -> Iterable[tuple[Items, Any]]:
    """A layer's output tensors, as its inputs are named: a tuple whose tensors are all in its
    first item is that item (torch's ``MultiheadAttention`` returns ``(out, None)`` where
    Paddle's returns ``out``; a Hugging Face layer ``(hidden,)`` where PaddleNLP's returns
    ``hidden``), so that the two pair by name."""
    if not isinstance(output, (tuple, list)):  # most calls: one tensor, nothing to gather
        return flatten(output, is_tensor)
    found = list(flatten(output, is_tensor))
    if found and all(items[0] == 0 for items, _ in found):
        return [(items[1:], t) for items, t in found]
    return found


def flatten(
    value: Any, is_tensor: Callable[[Any], bool], prefix: Items = ()
) -> Iterator[tuple[Items, Any]]:
    """(items, tensor) for every tensor in a tensor / tuple / list / dict structure; others skipped."""
    if is_tensor(value):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from flatten(v, is_tensor, prefix + (k,))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from flatten(v, is_tensor, prefix + (i,))


class Recorder:
    """Hooks one model's layers into one logger for the life of a ``record`` block."""

    def __init__(
        self,
        backend: Backend,
        model: Any,
        logger: ReprodLogger,
        *,
        forward: bool,
        backward: bool,
        inputs: bool,
        include: Patterns,
        exclude: Patterns,
        containers: bool,
        reuse: bool = True,
    ) -> None:
        self.backend = backend
        self.model = model
        self.logger = logger
        self.forward = forward
        self.backward = backward
        self.inputs = inputs
        self._include = _patterns(include)
        self._exclude = _patterns(exclude) or ()
        self.containers = containers
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._open: dict[str, list[int]] = {}  # layer name -> calls entered, not yet left
        self._param_calls: dict[str, int] = {}
        self._lock = threading.Lock()  # backward hooks may run on autograd's worker threads
        self.active = False
        self._reuse = reuse
        self._buffers: Optional[Buffers] = None
        # id(tensor) -> (weak reference, version, its copy, the first key that took it)
        self._seen: dict[int, tuple[Any, int, Converted, str]] = {}
        self._pending = False  # copies enqueued on a device, to wait for at the end
        self._copies = False  # the logger copies at _put (set by start)
        # streaming: the pool of the copies handed to the logger's writer thread (None: written
        # in the hook), and the last tensors written, id(tensor) -> (weak reference, version,
        # the copy handed over or None, source dtype, its CRC cache)
        self._stream_pool: Optional[StreamBuffers] = None
        self._put_later: Any = None
        self._recent: dict[int, tuple[Any, int, Optional[np.ndarray], Optional[str], dict[bytes, int]]] = {}

    # --- which layers --------------------------------------------------------------------------
    def layers(self) -> list[tuple[str, Any]]:
        chosen = []
        for name, layer in self.backend.named_layers(self.model):
            name = name or ROOT
            if not (self.containers or self.backend.is_leaf(layer)):
                continue
            if _selected(name, self._include, self._exclude):
                chosen.append((name, layer))
        return chosen

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.active = True
        self._streaming = getattr(self.logger, "_writer", None) is not None
        self._put = getattr(self.logger, "_put", None)
        # a logger that keeps copies of its own at _put (align's records past their memory
        # budget): read once here, not per capture
        self._copies = bool(getattr(self.logger, "copies_on_put", False))
        if not self._streaming and self._put is not None:
            self._buffers = _buffers_for(self.model, self._reuse)
        elif self._put is not None:
            self._put_later = getattr(self.logger, "_put_later", None)
            queue = getattr(self.logger, "_queue_bytes", 0)
            if self._put_later is not None and queue:
                # what waits in the queue, the few copies kept for keys of the same tensor, the
                # next copies made meanwhile, and room for sizes to mix: MobileNetV3-Small's
                # training step settled at 140 MiB for a 64 MiB queue (allocating on at 2x)
                self._stream_pool = _stream_buffers_for(self.model, self._reuse, 4 * queue)
        try:
            for name, layer in self.layers():
                self._handles.append(self.backend.add_pre_hook(layer, self._pre(name)))
                self._handles.append(self.backend.add_post_hook(layer, self._post(name)))
            if self.backward:
                for name, param in self.backend.trainable_parameters(self.model):
                    owner = name.rpartition(".")[0] or ROOT
                    if _selected(owner, self._include, self._exclude):
                        hook = self._param(name)
                        self._handles.append(
                            self.backend.add_grad_hook(param, hook, persistent=True)
                        )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        # Gradient hooks on activations may outlive the block (a graph kept for a later
        # backward): disarm them all first, then remove every handle we hold.
        self.active = False
        handles, self._handles = self._handles, []
        try:
            for h in handles:
                if h is not None:
                    h.remove()
        finally:
            with self._lock:
                self._seen.clear()
                self._recent.clear()
                pool, self._stream_pool = self._stream_pool, None
                if pool is not None:
                    pool.in_use = False
                buffers, self._buffers = self._buffers, None
                pending, self._pending = self._pending, False
                if buffers is not None:
                    buffers.end_block()
                    buffers.in_use = False
            if pending:  # the logger's arrays are complete only once the device is done
                self.backend.synchronize()

    # --- hooks ---------------------------------------------------------------------------------
    def _add(self, key: str, value: Any, *, gradient: bool = False) -> None:
        with self._lock:
            if not self.active:
                return
            if self._buffers is not None:
                self._copy(key, value, share=not gradient or self.backend.shares_gradients)
            elif self._streaming and self._put is not None:
                self._stream(key, value, share=not gradient or self.backend.shares_gradients)
            else:  # a logger of another kind
                self.logger.add(key, value)

    def _copy(self, key: str, t: Any, *, share: bool) -> None:
        version = self.backend.version(t) if share else None
        seen = self._seen.get(id(t)) if version is not None else None
        if seen is not None and seen[0]() is t and seen[1] == version:
            # unchanged since it was copied: the keys share the copy, read-only so that no
            # write through one key shows under another
            conv, first = seen[2], seen[3]
            if conv.array.flags.writeable:
                shared = conv.array.view()
                shared.flags.writeable = False
                if self.logger.data.get(first) is conv.array:
                    self._put(first, shared, conv.source_dtype)
                conv = Converted(shared, conv.source_dtype)
                self._seen[id(t)] = (seen[0], version, conv, first)
            self._put(key, conv.array, conv.source_dtype)
            return
        assert self._buffers is not None
        conv, pending = self.backend.host_copy(t, key, self._buffers)
        if pending and self._copies:
            self.backend.synchronize()  # it copies the array at once: the device's copy first
            pending = False
        self._pending |= pending
        self._put(key, conv.array, conv.source_dtype)
        if self._copies:
            kept = self.logger.data.get(key)
            if kept is not conv.array and isinstance(kept, np.ndarray):
                # the logger kept a copy of its own (in a file): later keys share that one, and
                # this array is free for the next copy
                self._buffers.release(conv.array)
                conv = Converted(kept, conv.source_dtype)
        if version is not None:
            try:
                ref = weakref.ref(t)
            except TypeError:
                return
            self._seen[id(t)] = (ref, version, conv, key)

    def _stream(self, key: str, t: Any, *, share: bool) -> None:
        """Hand ``t`` to a streaming logger: a copy from the pool to its writer thread, or (no
        pool) the tensor's own memory, written before this returns. Keys that record the same
        tensor unchanged hand over the same copy, and the writer computes its CRC once."""
        version = self.backend.version(t) if share else None
        recent = self._recent
        if version is not None:
            seen = recent.get(id(t))
            if seen is not None and seen[0]() is t and seen[1] == version:
                _ref, _version, array, src, crcs = seen
                if array is not None:
                    self._put_later(key, array, src, crcs)
                else:
                    self._put(key, self.backend.host_view(t, key).array, src, crcs)
                return
        crcs: dict[bytes, int] = {}
        pool = self._stream_pool
        if pool is None and self._put_later is not None and self.backend.on_device(t):
            # a device tensor has no host memory to write from: its copy goes to pinned memory
            # without blocking and the writer thread waits for it, so the model computes on
            from ..storage.npz_background import QUEUE_BYTES

            pool = self._stream_pool = _stream_buffers_for(self.model, self._reuse, 4 * QUEUE_BYTES)
        if pool is not None:
            conv, pending = self.backend.host_copy(t, key, pool)
            # the thread writes items in order: keys recording this tensor again need no wait
            ready = self.backend.copy_ready(t) if pending else None
            kept: Optional[np.ndarray] = conv.array
            self._put_later(key, conv.array, conv.source_dtype, crcs, ready)
        else:
            conv, kept = self.backend.host_view(t, key), None
            self._put(key, conv.array, conv.source_dtype, crcs)
        if version is None:
            return
        try:
            ref = weakref.ref(t)
        except TypeError:
            return
        # the tensors a key records again are the last few (a layer's output is the next
        # layer's input and its container's output): a window of them bounds what is held
        recent.pop(id(t), None)
        recent[id(t)] = (ref, version, kept, conv.source_dtype, crcs)
        if len(recent) > _RECENT:
            del recent[next(iter(recent))]

    def _pre(self, name: str) -> PreHook:
        def hook(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active:
                return
            call = self._calls.get(name, 0) + 1
            self._calls[name] = call
            self._open.setdefault(name, []).append(call)
            if not (self.inputs and self.forward) and not self.backward:
                return
            for items, t in self._inputs(args, kwargs):
                if self.inputs and self.forward:
                    self._add(layer_key(name, call, "in", items), t)
                if self.backward and self.backend.wants_grad(t):
                    self._grad_hook(t, layer_key(name, call, "grad_in", items))

        return hook

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[Items, Any]]:
        found = list(flatten(dict(enumerate(args), **kwargs), self.backend.is_tensor))
        # one tensor-carrying first argument is "in", not "in[0]": non-tensor extras such as
        # flags, which one framework passes and the other does not, leave the key alone
        if found and all(items[0] == 0 for items, _ in found):
            return [(items[1:], t) for items, t in found]
        # one tensor passed as every argument is "in" too: torch's self-attention called as
        # attn(x, x, x) against a port's attention reading x once (PaddleClas's ViT)
        if len(found) > 1 and all(t is found[0][1] for _, t in found):
            return [((), found[0][1])]
        return found

    def _post(self, name: str) -> Callable[[Any], None]:
        def hook(output: Any) -> None:
            if not self.active:
                return
            stack = self._open.get(name)
            call = stack.pop() if stack else self._calls.get(name, 1)
            for items, t in _outputs(output, self.backend.is_tensor):
                if self.forward:
                    self._add(layer_key(name, call, "out", items), t)
                if self.backward and self.backend.wants_grad(t):
                    self._grad_hook(t, layer_key(name, call, "grad_out", items))

        return hook

    def _grad_hook(self, tensor: Any, key: str) -> None:
        def hook(grad: Any) -> None:
            if grad is not None:
                self._add(key, grad, gradient=True)

        handle = self.backend.add_grad_hook(tensor, hook, persistent=False)
        if handle is not None:
            self._handles.append(handle)

    def _param(self, name: str) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            if grad is None or not self.active:
                return
            with self._lock:
                call = self._param_calls.get(name, 0) + 1
                self._param_calls[name] = call
            self._add(param_key(name, call), grad, gradient=True)

        return hook
