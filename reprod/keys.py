"""The one rule for the keys of a logged tree, wherever a tree comes in (``ReprodLogger.add``,
``reprod.save``, ``reprod.compare`` of in-memory trees): a str as it is, an integer (not a bool)
as its decimal text, as reprod_log's pickled dicts kept an int key and every reader of a dump
sees it as text; anything else, or an int beside its own text at one level, is a one-line error.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any, Optional

from .errors import UnsupportedValueError

__all__ = ["key_text", "bad_key", "twin_key", "str_keyed"]


def key_text(key: Any) -> Optional[str]:
    """The text ``key`` is stored under, or None where it cannot be a key."""
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str(key)
    # numpy's integers are Integral, its bool_ is not; Python's bool is, and is refused: True is
    # no more "1" than it is "True"
    if isinstance(key, Integral) and not isinstance(key, bool):
        return str(int(key))
    return None


def bad_key(key: Any, where: str) -> UnsupportedValueError:
    """The error for a key ``key_text`` refuses; ``where`` names it (its path, its file)."""
    return UnsupportedValueError(f"{where} is a {type(key).__name__}; keys must be str (or int)")


def twin_key(where: str) -> UnsupportedValueError:
    """The error for an int key beside its own text at one level; ``where`` names the text."""
    return UnsupportedValueError(f"{where} is there both as an int and as a str")


def str_keyed(tree: Mapping[Any, Any], where: str) -> dict[str, Any]:
    """One level of ``tree`` as a dict keyed by ``key_text`` (values as they are); ``where`` is
    the text before the key in an error ("ref: key block/", "out.npz: key ")."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        text = key_text(k)
        if text is None:
            raise bad_key(k, f"{where}{k!r}")
        if text in out:
            raise twin_key(f"{where}{text}")
        out[text] = v
    return out
