"""The frameworks' own weight files: PyTorch ``.pth`` and Paddle ``.pdparams``, read and written
safely.

``.pth``/``.pt``/``.bin``/``.ckpt`` are read with ``torch.load(weights_only=True)`` (nothing in the
file runs); ``.pdparams`` (a pickle of a dict of numpy arrays) is read without running the pickle
and written as a protocol-4 pickle of numpy arrays, atomically, which ``paddle.load`` reads.
``load_weights_as_dump`` brings either kind to Paddle's names and layout, so the two can be
compared key by key.

Importing this module imports neither torch nor paddle; ``read_torch_state_dict`` imports torch.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from ..adapters import to_numpy
from ..errors import DumpFormatError, MissingDependencyError

if TYPE_CHECKING:
    from ..align.rules import ConversionRules

__all__ = [
    "TORCH_SUFFIXES",
    "PADDLE_SUFFIXES",
    "weight_file_suffix",
    "read_torch_state_dict",
    "read_pdparams",
    "write_pdparams",
    "load_weights_as_dump",
]

PathLike = Union[str, "os.PathLike[str]"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
PADDLE_SUFFIXES = (".pdparams",)

# keys paddle.save adds beside the tensors (name tables, big-tensor slicing info)
_PADDLE_META_SUFFIX = "@@"
# top-level keys of training checkpoints that wrap the actual state dict
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def weight_file_suffix(path: str) -> str:
    """The lower-cased suffix that says which framework wrote a weight file (``".pth"``)."""
    return os.path.splitext(path)[1].lower()


# --- PyTorch -------------------------------------------------------------------------------------


def _torch_load_detail(exc: BaseException, head: bytes) -> str:
    text = str(exc)
    for pat in (r"Unsupported global: GLOBAL (\S+)", r"unsupported GLOBAL (\S+)"):
        m = re.search(pat, text)
        if m:
            g = m.group(1)
            hint = (
                " (a whole pickled model? save model.state_dict() instead)"
                if g.startswith("torch.nn.")
                else ""
            )
            return f"it refers to {g}, which is not tensor data{hint}"
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        return "it is not a file torch.save wrote (neither a zip archive nor a pickle)"
    if re.search(r"Unsupported operand \d+", text) or not head.startswith(b"PK"):
        return "it is not a file torch.save wrote (a Paddle .pdparams or another pickle?)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
    """The mapping of tensors inside what ``torch.load`` returned, unwrapping training checkpoints."""
    if not isinstance(obj, Mapping):
        raise DumpFormatError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)"
        )

    def is_tensor_map(m: Any) -> bool:
        return (
            isinstance(m, Mapping)
            and len(m) > 0
            and all(
                type(v).__module__.startswith("torch") and hasattr(v, "detach") for v in m.values()
            )
        )

    if is_tensor_map(obj):
        return obj
    for key in _WRAPPER_KEYS:
        if is_tensor_map(obj.get(key)):
            return obj[key]
    bad = [
        f"{k} ({type(v).__name__})"
        for k, v in obj.items()
        if not (type(v).__module__.startswith("torch") and hasattr(v, "detach"))
    ][:5]
    raise DumpFormatError(
        f"{path}: not a state dict of tensors; non-tensor entries: {', '.join(bad) or 'none (empty)'}"
        f" and no {'/'.join(_WRAPPER_KEYS)} entry holding one"
    )


def read_torch_state_dict(path: PathLike) -> dict[str, Any]:
    """Read a PyTorch state dict with ``torch.load(weights_only=True)`` (nothing in the file runs).

    A training checkpoint that wraps the state dict (``{"state_dict": ..., "epoch": 3}``, also
    ``model_state_dict``/``model``/``net``/``module``) is unwrapped. Returns name -> torch tensor.

    >>> sd = read_torch_state_dict("resnet50.pth")
    """
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(
            f"{os.fspath(path)}: reading a PyTorch file needs torch: pip install \"reprod-align[torch]\""
        ) from None

    from .lazy import open_regular

    path = os.fspath(path)
    # a FIFO or a device is refused, and torch reads the very file that was checked
    with os.fdopen(open_regular(path)[0], "rb") as f:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            exc = None
        except Exception as e:  # torch raises UnpicklingError, KeyError, RuntimeError, EOFError...
            exc = e
            f.seek(0)
            head = f.read(4)
    if exc is not None:
        raise DumpFormatError(
            f"{path}: cannot be read by torch.load(weights_only=True): {_torch_load_detail(exc, head)}"
        ) from None
    return dict(_state_dict_of(obj, path))


# --- Paddle --------------------------------------------------------------------------------------


def read_pdparams(path: PathLike) -> dict[str, np.ndarray]:
    """Read a Paddle ``.pdparams`` (a pickle of name -> numpy array) without running the pickle.

    Only numpy array, dtype and scalar globals, ``_codecs.encode`` and ``collections.OrderedDict`` are
    accepted; anything else raises ``UnsafeDumpError`` before it can run. Paddle's bookkeeping
    entries (``StructuredToParameterName@@``) are dropped and tensors that ``paddle.save`` sliced
    (``UnpackBigParamInfor@@``, protocols 2 and 3) are joined again.

    >>> weights = read_pdparams("model.pdparams")
    """
    from .lazy import Dump, MappedFile
    from .legacy import restricted_unpickle, tree_from_pickle

    path = os.fspath(path)
    mf = MappedFile(path)
    try:
        buf = mf.buffer()
        if mf.size < 2 or buf[0] != 0x80:
            hint = " (it looks like a zip: a torch.save file?)" if bytes(buf[:2]) == b"PK" else ""
            raise DumpFormatError(f"{path}: not a .pdparams file (no pickle header){hint}")
        root = restricted_unpickle(buf, 0, mf.size, path)
        if not isinstance(root, dict):
            raise DumpFormatError(f"{path}: holds a {type(root).__name__}, not a dict of arrays")
        unpack = root.get("UnpackBigParamInfor@@")
        tensors = {
            k: v
            for k, v in root.items()
            if not (isinstance(k, str) and k.endswith(_PADDLE_META_SUFFIX))
        }
        # keys sharing one payload (the pickle's memo) share one copy: bounded like reprod.load
        out = Dump(tree_from_pickle(tensors, mf, markers=False), mf, path=path,
                   fmt="pdparams").to_dict()
    finally:
        mf.close()
    for k, v in out.items():
        if isinstance(v, dict):
            raise DumpFormatError(f"{path}: key {k!r} holds a nested dict, not an array")
    if isinstance(unpack, dict):
        out = _join_slices(out, unpack, path)
    return out


def _join_slices(
    out: dict[str, np.ndarray], unpack: dict[str, Any], path: str
) -> dict[str, np.ndarray]:
    for key, info in unpack.items():
        try:
            parts = [out.pop(name) for name in info["slices"]]
            out[key] = np.concatenate([p.reshape(-1) for p in parts]).reshape(
                tuple(info["OriginShape"])
            )
        except (KeyError, TypeError, ValueError):
            raise DumpFormatError(
                f"{path}: key {key!r}: corrupt big-tensor slicing information"
            ) from None
    return out


def write_pdparams(path: PathLike, weights: Mapping[str, Any]) -> str:
    """Write name -> array as a ``.pdparams`` that ``paddle.load`` reads (pickle protocol 4 of a dict
    of numpy arrays), atomically: a temporary file renamed into place, so a failure never leaves a
    truncated file or damages an existing one. Returns the path written.

    >>> write_pdparams("model.pdparams", torch_to_paddle("model.pth"))
    'model.pdparams'
    """
    from .atomic import AtomicFile

    path = os.fspath(path)
    arrays = {
        str(k): np.ascontiguousarray(to_numpy(v, key=str(k)).array) for k, v in weights.items()
    }
    with AtomicFile(path) as af:
        pickle.dump(arrays, af.file, protocol=4)
    return path


# --- either --------------------------------------------------------------------------------------


def load_weights_as_dump(
    path: PathLike,
    *,
    rules: Optional[ConversionRules] = None,
    model: Any = None,
) -> dict[str, np.ndarray]:
    """Either kind of weight file as Paddle-named, Paddle-layout arrays, so that a ``.pth`` and a
    ``.pdparams`` can be compared key by key. ``rules`` and ``model`` apply to PyTorch files only
    (they describe the torch -> Paddle mapping, see ``reprod.align.convert``); a ``.pdparams`` is
    read as it is.

    >>> reprod.compare(load_weights_as_dump("m.pth"), load_weights_as_dump("m.pdparams"))
    """
    path = os.fspath(path)
    suffix = weight_file_suffix(path)
    if suffix in PADDLE_SUFFIXES:
        return read_pdparams(path)
    if suffix in TORCH_SUFFIXES:
        # the torch -> Paddle name and layout rules live in reprod.align (imported only here)
        from ..align.conversion import convert

        return convert(path, model=model, rules=rules).weights
    raise DumpFormatError(
        f"{path}: unknown weight file suffix {suffix or '(none)'!r}; expected one of "
        f"{', '.join(TORCH_SUFFIXES + PADDLE_SUFFIXES)}"
    )
