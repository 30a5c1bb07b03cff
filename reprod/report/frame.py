"""A DiffResult as a pandas DataFrame, for notebooks: sort, filter and plot the keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..diff.result import DiffResult
from .data import flat_columns, key_records

if TYPE_CHECKING:
    import pandas

__all__ = ["to_frame"]


def to_frame(result: DiffResult) -> pandas.DataFrame:
    """One row per key, indexed by key; every KeyResult field a column.

    Shapes, paths and indices stay tuples; ``thresholds`` and ``checks`` become
    ``threshold_<method>`` and ``check_<method>`` columns.

    >>> df = to_frame(reprod.compare("torch.npy", "paddle.npy"))
    >>> df.sort_values("max_abs", ascending=False).head()
    """
    import pandas as pd  # kept out of `import reprod` and of the command line's text formats

    columns = flat_columns(result)
    frame = pd.DataFrame.from_records(key_records(result), columns=columns)
    return frame.set_index("key")
