"""The ReprodError tree: every problem with the user's input is one of these, with a one-line message."""

from __future__ import annotations

__all__ = [
    "ReprodError",
    "DumpFormatError",
    "UnsafeDumpError",
    "KeyMismatchError",
    "UnsupportedValueError",
]


class ReprodError(Exception):
    """Base class of every error reprod raises for bad input (never for its own bugs)."""


class DumpFormatError(ReprodError, ValueError):
    """A file is missing, truncated, corrupt or not a dump reprod can read."""


class UnsafeDumpError(DumpFormatError):
    """A legacy pickle dump asks for something other than arrays, scalars and plain containers."""


class KeyMismatchError(ReprodError, KeyError):
    """Two dumps do not hold the keys an operation needs."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0]) if self.args else ""


class UnsupportedValueError(ReprodError, TypeError):
    """A value handed to reprod is not numeric data (a string, None, an object array, ...)."""
