"""The native ``.npz``'s metadata member: its JSON parsed and checked entry by entry (it comes
from the file, so nothing is trusted), whole or, for a large one, a few megabytes at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, Callable, Optional

from ..errors import DumpFormatError
from .lazy import _one_line
from .npy_header import MAX_DEPTH
from .npz_format import FORMAT_NAME, FORMAT_VERSION

__all__: list[str] = []

Entry = tuple[Any, Optional[str], Optional[str]]  # (path list, or its one name), member, source dtype


def _parse_meta(raw: Any, path: str, *, consume: bool = False
                ) -> tuple[dict[str, Any], list[tuple[list[str], Optional[str], Optional[str]]]]:
    """The metadata member (bytes or a memoryview of them), checked field by field: it comes from
    the file, so nothing is trusted. ``consume``: the key list is emptied as its entries are
    made (each key's dict goes as its entry comes: at a million keys the parsed document and the
    entries together were the peak of a load), for a caller that drops the document."""
    try:
        meta = json.loads(str(raw, "utf-8"), object_hook=_entry_hook if consume else None)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise DumpFormatError(f"{path}: corrupt metadata member ({_one_line(exc)})") from None

    def bad(what: str) -> DumpFormatError:
        return DumpFormatError(f"{path}: corrupt metadata member ({what})")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise bad("wrong format name")
    version = meta.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad(f"version {str(version)[:40]!r} is not an integer")
    if version > FORMAT_VERSION:
        raise DumpFormatError(f"{path}: written by a newer reprod (format version {version})")
    keys = meta.get("keys")
    if not isinstance(keys, list):
        raise bad("no key list")
    entries: list[Entry] = []
    if consume:
        keys.reverse()  # popped from the end, in the file's order
    check = _entry_checker(bad, consume)
    for e in _popping(keys) if consume else keys:
        entries.append(check(e))
    return meta, entries


def _entry_checker(bad: Callable[[str], DumpFormatError], consume: bool) -> Callable[[Any], Entry]:
    def check(e: Any) -> Entry:
        # json.loads makes exact dicts, lists and strs, so ``type(x) is`` checks what isinstance
        # would, faster: this runs once per key (5,000 in the many-small benchmark)
        if type(e) is _KeyEntry:
            p, src, kind, m = e
            if type(p) is _OneName:
                p = [str(p)]  # as the document had it
            m = None if kind == "dict" else m
        elif type(e) is not dict:
            raise bad("bad key entry")
        else:
            p, src, kind = e.get("path"), e.get("dtype"), e.get("kind")
            m = None if kind == "dict" else e.get("member")
        if type(p) is not list or not p or (type(p[0]) is not str if len(p) == 1
                                             else not all(type(s) is str for s in p)):
            raise bad("bad key path")
        if m is None and kind != "dict" or m is not None and type(m) is not str:
            raise bad(f"key {'/'.join(p)[:80]!r}: bad member name")
        if src is not None and not (isinstance(src, str) and 0 < len(src) <= 64 and src.isprintable()):
            raise bad(f"key {'/'.join(p)[:80]!r}: bad source dtype")
        if len(p) > MAX_DEPTH:
            raise bad(f"key nested more than {MAX_DEPTH} levels deep")
        # consume: a key of one name keeps its name, not a list of it (72 bytes a key)
        return (p[0] if consume and len(p) == 1 else p, m, src)

    return check


# A metadata member from this size on is parsed a chunk of entries at a time (iter_meta_chunked):
# whole, a million keys' document held its text and every entry at once (~300 bytes a key)
CHUNKED_FROM = 8 << 20
CHUNK_BYTES = 4 << 20
# the writer's head (npz_members.meta_bytes), exactly; any other spelling is parsed whole
_HEAD = re.compile(rb'\{"format": "([^"\\]*)", "version": (0|[1-9][0-9]{0,8}), "keys": \[')
_SPLIT = b'}, {"path": '


class Rechunk(Exception):
    """The chunked parse met something it does not read alike the whole parse: parse whole."""


def iter_meta_chunked(buf: Any, start: int, size: int, path: str,
                      chunk: int = CHUNK_BYTES) -> Iterator[Entry]:
    """The checked entries of the metadata member at ``buf[start:start + size]``, as
    ``_parse_meta(consume=True)`` gives them, parsing ``chunk`` bytes of entries at a time. Raises
    ``Rechunk`` (before or while entries come) wherever the document is not the writer's own
    layout or a piece does not parse, so that the caller parses it whole and gets the whole
    parse's result or error; the entries are checked as that parse checks them.

    Pieces are cut after a ``}`` followed by ``, {"path": ``; each is parsed as ``[piece]``. A cut
    inside a string or a nested value leaves a piece that does not parse (its string or bracket
    is left open), so pieces that all parse were cut between the key list's values, and together
    they are that list."""
    end = start + size
    m = _HEAD.match(buf, start, end) if hasattr(buf, "find") else None
    if m is None or m.group(1) != FORMAT_NAME.encode() or int(m.group(2)) > FORMAT_VERSION:
        raise Rechunk
    decoder = json.JSONDecoder(object_hook=_entry_hook)
    check = _entry_checker(lambda what: DumpFormatError(f"{path}: corrupt metadata member ({what})"),
                           True)
    pos = m.end()
    while True:
        cut = buf.find(_SPLIT, pos + chunk, end) if pos + chunk < end else -1
        if cut < 0:  # the last piece: the list's end, then the rest of the object
            text = _text(buf, pos, end)
            try:
                items, at = decoder.raw_decode("[" + text)
                tail = text[at - 1:].lstrip()  # ', "writer": {...}}' or '}', then blanks
                if tail[:1] == "," and tail[1:].lstrip()[:1] == '"':  # more members
                    rest = json.loads("{" + tail[1:])
                elif tail.rstrip() == "}":
                    rest = {}
                else:  # "],}", a missing comma...: what the whole parse words
                    raise Rechunk
            except (ValueError, RecursionError, IndexError):
                raise Rechunk from None
            if type(items) is not list or type(rest) is not dict or rest.keys() & {"format", "version", "keys"}:
                raise Rechunk
        else:
            try:
                items = json.loads("[" + _text(buf, pos, cut + 1) + "]", object_hook=_entry_hook)
            except (ValueError, RecursionError):
                raise Rechunk from None
        for e in items:
            yield check(e)
        if cut < 0:
            return
        pos = cut + 3  # past "}, "


# one key entry as the writer spells it for a key of one name with no escape in it (and no
# control character, which JSON refuses), and a list of them as the writer joins them
_PLAIN_STR = rb'"([^"\\\x00-\x1f]*)"'
_ONE = rb'\{"path": \[' + _PLAIN_STR + rb'\], "member": ' + _PLAIN_STR + rb'\}'
_ONE_RE = re.compile(_ONE)
_LIST_RE = re.compile(rb"(?:" + _ONE + rb"(?:, " + _ONE + rb")*)?\]")


def plain_meta_entries(buf: Any, start: int, size: int) -> Optional[list[tuple[bytes, bytes]]]:
    """(key, member) of every entry of the metadata member at ``buf[start:start + size]`` as
    UTF-8 bytes, where the document is the writer's own spelling and every key is one plain name
    without a source dtype (most dumps); None for any other document, which the JSON parse then
    reads or refuses. The whole key list is matched by one regular expression and the pairs
    taken by another: no JSON object per key. The rest of the document is parsed as JSON."""
    if not hasattr(buf, "find"):
        return None
    end = start + size
    m = _HEAD.match(buf, start, end)
    if m is None or m.group(1) != FORMAT_NAME.encode() or int(m.group(2)) > FORMAT_VERSION:
        return None
    keys = _LIST_RE.match(buf, m.end(), end)
    if keys is None:
        return None
    tail = bytes(buf[keys.end():end]).lstrip()  # ', "writer": {...}}' or '}', then blanks
    try:
        if tail[:1] == b"," and tail[1:].lstrip()[:1] == b'"':
            rest = json.loads(b"{" + tail[1:])
        elif tail.rstrip() == b"}":
            rest = {}
        else:
            return None
    except (ValueError, RecursionError):
        return None
    if type(rest) is not dict or rest.keys() & {"format", "version", "keys"}:
        return None
    return _ONE_RE.findall(buf, m.end(), keys.end())


def _text(buf: Any, a: int, b: int) -> str:
    try:
        return str(buf[a:b], "utf-8")
    except UnicodeDecodeError:
        raise Rechunk from None


class _KeyEntry(tuple):  # type: ignore[type-arg]
    """``(path, dtype, kind, member)`` of a JSON object holding no other field, as ``.get`` reads
    them: what a key's entry keeps of its dict while the document is parsed (a million keys'
    dicts were the peak of a load)."""

    __slots__ = ()


_ENTRY_FIELDS = frozenset(("path", "dtype", "kind", "member"))


def _entry_hook(d: dict[str, Any]) -> Any:
    """``json.loads``' object hook for ``_parse_meta(consume=True)``, whose caller keeps nothing
    of the document but the checked entries: a key's dict becomes a ``_KeyEntry`` as it is
    parsed (any other object stays a dict; the checks read both alike)."""
    if d.keys() <= _ENTRY_FIELDS:
        p = d.get("path")
        if type(p) is list and len(p) == 1 and type(p[0]) is str:
            p = _OneName(p[0])  # the common path, one name, without its list
        return _KeyEntry((p, d.get("dtype"), d.get("kind"), d.get("member")))
    return d


class _OneName(str):
    """A ``_KeyEntry``'s path that was a list of one str (read back as ``[str(name)]``)."""

    __slots__ = ()


def _popping(items: list[Any]) -> Any:
    """The items of ``items`` popped from its end, each dropped by the list as it is handed out."""
    pop = items.pop
    while items:
        yield pop()


