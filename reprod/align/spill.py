"""Records that outgrow memory, kept in a file the kernel pages in and out.

``align_train`` keeps every step's logits, gradients, weights, statistics and optimizer state of
three runs (float32 reference, float64 twin, port), the kink layers' activations and a copy of
the reference's optimizer state per step: on resnet18 about 16 times the parameters per step
(730 MiB), so that resnet50 over ten steps needs 16 GiB. Every step is read again after the runs
(compared, forced, localised), so none can be dropped; but none needs to stay in anonymous
memory. Past a budget, each array is copied into an unlinked temporary file mapped into memory
(``mmap``, shared): the page cache holds it while memory is free, and the kernel writes it out
and drops it when memory is wanted, where anonymous memory would have ended in the OOM killer.
The array stays an ordinary writable ``numpy.ndarray``; the file's blocks are reserved before
they are mapped (``posix_fallocate``), so a full disk is an error at the copy, never a SIGBUS
at a write into the mapping, and the records it refuses stay in memory.
"""

from __future__ import annotations

import copy
import mmap
import os
import tempfile
from typing import Any, Optional, Union

import numpy as np

from ..adapters import empty_array
from ..errors import ReprodError
from ..logger import ReprodLogger, _key

PathLike = Union[str, "os.PathLike[str]"]

CHUNK = 256 << 20  # bytes mapped at a time: few mappings, and little reserved beyond the need
_ALIGN = 64  # each array's start: what numpy and the C kernel's vector loads like


def available_memory() -> Optional[int]:
    """The memory the kernel can give without swapping (``MemAvailable``), less where a cgroup
    (v1 or v2) limits this process to less (a container), or None where the system does not say."""
    free: Optional[int] = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_room()
    return free if limit is None else min(free, limit)


def _cgroup_room(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The room left under this process's cgroup memory limit (v2 ``memory.max`` less
    ``memory.current``; v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``), or None
    where there is no limit or nothing says."""
    try:
        with open(proc) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for hierarchy, controllers, path in (p for p in lines if len(p) == 3):
        if hierarchy == "0" and controllers == "":
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = os.path.join(root, "memory"), ("memory.limit_in_bytes",
                                                    "memory.usage_in_bytes")
        else:
            continue
        try:
            here = os.path.join(base, path.lstrip("/"))
            with open(os.path.join(here, files[0])) as f:
                top = f.read().strip()
            if top == "max" or int(top) >= 1 << 60:  # v1 says "no limit" with a huge number
                continue
            with open(os.path.join(here, files[1])) as f:
                return max(int(top) - int(f.read().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def in_memory_filesystem(directory: PathLike, mounts: str = "/proc/mounts") -> Optional[str]:
    """The type of the filesystem ``directory`` is on where that lives in memory (``tmpfs``,
    ``ramfs``): a file there takes memory as the arrays would. None otherwise, or where the
    mount table cannot be read."""
    path = os.path.realpath(os.fspath(directory))
    best, kind = "", None
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind if kind in ("tmpfs", "ramfs") else None


def default_budget() -> Optional[int]:
    """Half the memory available now: the rest is for the models, their copies and the
    comparison's passes. None (no limit) where the system does not say."""
    free = available_memory()
    return None if free is None else free // 2


def budget_of(memory_budget: Any) -> Optional[int]:
    """``align_train``'s ``memory_budget`` in bytes: ``"auto"`` (half the available memory),
    None (no limit) or a number of bytes (0: every large record to the file)."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, str):
        if memory_budget == "auto":
            return default_budget()
        raise ReprodError(f"memory_budget={memory_budget!r}: give \"auto\", None or a number "
                          "of bytes")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) \
            or not memory_budget >= 0:
        raise ReprodError(f"memory_budget={memory_budget!r}: give \"auto\", None or a number "
                          "of bytes >= 0")
    return int(memory_budget)


class SpillArena:
    """Copies of arrays, in memory up to ``budget`` bytes, then in a file under ``directory``
    (the system's temporary directory by default; made if ``create``) that is unlinked at once:
    it vanishes with the last array mapped from it, or with the process however it ends.

    ``budget=None``: everything in memory (``keep`` returns its argument). ``budget=0``: every
    array of at least ``min_bytes`` in the file. ``reason`` says why nothing more is spilled
    after a failure (no ``posix_fallocate`` here, a full disk): the arrays then stay in memory.
    """

    def __init__(self, budget: Optional[int], directory: Optional[PathLike] = None,
                 min_bytes: int = 1 << 16, *, create: bool = False) -> None:
        self.budget = budget
        self.directory = None if directory is None else os.fspath(directory)
        self.create = create  # make ``directory`` when the file is first needed
        self.min_bytes = int(min_bytes)
        self.in_memory = 0  # bytes kept in memory through keep()
        self.spilled = 0  # bytes copied into the file
        self.reason: Optional[str] = None
        self.note: Optional[str] = None  # the file is in memory too (a tmpfs)
        self._fd: Optional[int] = None
        self._size = 0  # bytes of the file reserved so far
        self._map: Optional[mmap.mmap] = None
        self._used = 0  # bytes of the current mapping given out
        self._maps: list[mmap.mmap] = []  # every mapping made, the current one last

    def wants(self, nbytes: int) -> bool:
        """Whether an array of ``nbytes`` goes to the file (``copy``/``empty``) rather than to
        memory."""
        return (self.budget is not None and self.reason is None and nbytes >= self.min_bytes
                and self.in_memory + nbytes > self.budget)

    def keep(self, array: np.ndarray) -> np.ndarray:
        """``array`` itself while the budget holds (the caller's own copy, not copied again),
        else a copy of it in the file; the same dtype, shape and values either way."""
        if self._maps and self._owned(array):
            return array
        out = self.copy(array) if self.wants(array.nbytes) else None
        if out is None:
            self.in_memory += array.nbytes
            return array
        return out

    def copy(self, array: np.ndarray) -> Optional[np.ndarray]:
        """A C-ordered copy of ``array`` in the file, or None where the file cannot take it."""
        if array.dtype.hasobject:
            return None
        out = self.empty(array.shape, array.dtype)
        if out is not None:
            np.copyto(out, array, casting="no")
        return out

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Optional[np.ndarray]:
        """An uninitialised C-ordered array in the file, or None where it cannot take it."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        n = count * dtype.itemsize
        start = -(-self._used // _ALIGN) * _ALIGN
        if self._map is None or start + n > len(self._map):
            if not self._grow(n):
                return None
            start = 0
        assert self._map is not None
        # np.ndarray over the mapping (not frombuffer + reshape): one array, whose base is the
        # mapping's buffer
        out = np.ndarray(shape, dtype=dtype, buffer=self._map, offset=start)
        self._used = start + n
        self.spilled += n
        return out

    def _owned(self, array: np.ndarray) -> bool:
        """Whether ``array`` (or what it views) is already in the file."""
        base: Any = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        return isinstance(base, mmap.mmap) and any(base is m for m in self._maps) or \
            isinstance(base, memoryview) and any(base.obj is m for m in self._maps)

    def _grow(self, n: int) -> bool:
        """Map a new chunk of at least ``n`` bytes at the end of the file, its blocks reserved
        first (False, with ``reason`` set, where they cannot be)."""
        if not hasattr(os, "posix_fallocate"):
            self.reason = "this system has no posix_fallocate: records stay in memory"
            return False
        size = max(CHUNK, -(-n // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY)
        try:
            if self._fd is None:
                directory = self.directory or tempfile.gettempdir()
                if self.create:
                    os.makedirs(directory, exist_ok=True)
                fd, path = tempfile.mkstemp(prefix="reprod-spill-", dir=directory)
                os.unlink(path)  # nothing left behind, however the process ends
                self._fd = fd
                kind = in_memory_filesystem(directory)
                if kind is not None:
                    self.note = (f"{directory} is a {kind}: the records there take memory as "
                                 "well (give spill_dir on a disk)")
            os.posix_fallocate(self._fd, self._size, size)
            m = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=self._size)
        except OSError as e:
            where = self.directory or tempfile.gettempdir()
            self.reason = (f"{where}: cannot reserve {size >> 20} MiB more for records past the "
                           f"memory budget ({e.strerror or e}); they stay in memory")
            return False
        self._map, self._used = m, 0
        self._maps.append(m)
        self._size += size
        return True

    def close(self) -> None:
        """Close the file descriptor; the arrays given out keep their mappings (and so the
        file's blocks) alive until they go."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # the mappings live on in the arrays made from them (each holds a reference to its own)
        self._map = None
        self._maps = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"in_memory": self.in_memory, "spilled": self.spilled,
                               "budget": self.budget}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.note is not None:
            out["note"] = self.note
        return out


class SpillingLogger(ReprodLogger):
    """A ``ReprodLogger`` (in memory, not streaming) whose arrays go through ``arena.keep``:
    the records of ``align_train``'s runs, read back as plain arrays whichever side of the budget
    they landed on."""

    copies_on_put = True  # reprod.capture.record waits for a device's copy before _put

    def __init__(self, arena: SpillArena) -> None:
        super().__init__()
        self._arena = arena

    def add(self, key: Union[str, int], val: Any) -> None:
        if type(val) is np.ndarray and val.dtype.kind in "biufc" and self._arena.wants(val.nbytes):
            out = self._arena.copy(val)  # straight into the file: no copy in memory on the way
            if out is not None:
                name = key if type(key) is str else _key(key)
                self._data[name] = out
                self._dtypes.pop(name, None)
                return
        super().add(key, val)
        name = key if type(key) is str else _key(key)
        self._data[name] = self._kept(self._data.get(name))

    def _kept(self, value: Any) -> Any:
        if type(value) is np.ndarray:
            return self._arena.keep(value)
        if type(value) is dict:  # a nested value: its leaves
            return {k: self._kept(v) for k, v in value.items()}
        return value

    def _put(self, key: str, array: np.ndarray, source_dtype: Optional[str] = None,
             crcs: Optional[dict[bytes, int]] = None) -> None:
        super()._put(key, self._arena.keep(array), source_dtype, crcs)

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """Where a record made by hand goes before ``_put``: the file, past the budget."""
        out = self._arena.empty(shape, dtype) if self._arena.wants(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize) else None
        return empty_array(shape, dtype) if out is None else out


def spilled_state(state: Any, arena: SpillArena) -> Any:
    """A copy of a torch ``state_dict`` (nested dicts and lists) whose CPU tensors share memory
    with ``arena.keep`` of their values: what ``torch.optim.Optimizer.load_state_dict`` reads."""
    if isinstance(state, dict):
        return {k: spilled_state(v, arena) for k, v in state.items()}
    if isinstance(state, list):
        return [spilled_state(v, arena) for v in state]
    if type(state).__module__.startswith("torch") and hasattr(state, "detach"):
        value = state.detach()
        if value.device.type == "cpu" and value.dtype.is_floating_point \
                and str(value.dtype) != "torch.bfloat16":  # numpy has no bfloat16
            import torch

            return torch.from_numpy(arena.keep(value.numpy().copy()))
        return value.clone()
    return copy.deepcopy(state)
