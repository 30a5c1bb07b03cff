"""reprod: prove that a ported model computes the same numbers, and find where it does not.

>>> from reprod import ReprodLogger, ReprodDiffHelper   # drop-in for reprod_log
>>> result = reprod.compare("forward_torch.npy", "forward_paddle.npy", threshold=1e-5)
>>> result.passed, result.first_failure

Importing reprod imports numpy only; torch, paddle and pandas load when something needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    DumpFormatError,
    KeyMismatchError,
    ReprodError,
    UnsafeDumpError,
    UnsupportedValueError,
    WriteError,
)
from .logger import ReprodLogger

__version__ = "0.1.0"

__all__ = [
    "ReprodLogger",
    "ReprodDiffHelper",
    "compare",
    "Criteria",
    "load",
    "save",
    "DiffResult",
    "KeyResult",
    "compare_trees",
    "ReprodError",
    "DumpFormatError",
    "UnsafeDumpError",
    "KeyMismatchError",
    "UnsupportedValueError",
    "WriteError",
    "__version__",
]

# Resolved on first use so that `import reprod` stays cheap (PEP 562).
_LAZY = {
    "ReprodDiffHelper": ("reprod.helper", "ReprodDiffHelper"),
    # the module reprod.compare itself ("": no attribute): callable as reprod.diff.engine.compare,
    # and reprod_log.compare's functions under reprod's name; `import reprod.compare` binds the same
    "compare": ("reprod.compare", ""),
    "Criteria": ("reprod.diff.criteria", "Criteria"),
    "load": ("reprod.storage", "load"),
    "save": ("reprod.storage", "save"),
    "DiffResult": ("reprod.diff.result", "DiffResult"),
    "KeyResult": ("reprod.diff.result", "KeyResult"),
    "compare_trees": ("reprod.trees", "compare_trees"),
}

if TYPE_CHECKING:
    from .diff.criteria import Criteria
    from .diff.engine import compare
    from .diff.result import DiffResult, KeyResult
    from .helper import ReprodDiffHelper
    from .storage import load, save
    from .trees import compare_trees


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'reprod' has no attribute {name!r}") from None
    import importlib

    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
