"""The streaming writer's key index: which keys a stream holds and where their metadata texts
are, in memory for a few thousand keys and, past 20,000, in an anonymous SQLite database and
temporary files beside the dump, so memory stays bounded however many keys are logged."""

from __future__ import annotations

import os
import re
import struct
import weakref
from typing import Any, Callable, Iterator, Optional

__all__: list[str] = []  # the streaming writer's private helpers


def _side_file(folder: str) -> Any:
    """An anonymous temporary file beside the dump (gone with the process, however it ends)."""
    import tempfile

    return tempfile.TemporaryFile(dir=folder)


class _KeyLog:
    """A writer's top-level keys and their metadata texts, in first-added order, a re-added key's
    last text in its first place. The first ``spill`` keys stay in a dict; later keys go to an
    anonymous SQLite database on disk (key -> position) and their texts to a temporary file, so
    a stream of any length holds a bounded amount of memory (a key re-added after the spill
    keeps its latest text in memory: streams re-log a few keys, not all of them). In a forked
    child the database and files are the parent's: the child lets go of them untouched
    (``_disown_in_child``), and its writer refuses to be used."""

    spill = 20_000

    def __init__(self, folder: str, indexed: bool = True) -> None:
        self.folder = folder
        # unindexed: a writer whose keys are known unique and never asked for again (one save
        # of a dict): the spilled keys' texts go to the side file and nothing to SQLite, whose
        # inserts were half of a 200,000-key save
        self.indexed = indexed
        self.mem: dict[str, str] = {}
        self.db: Any = None
        self.texts_file: Any = None
        self.spilled = 0
        self.replaced: dict[int, str] = {}
        self.no_db = False
        self.spools: list[Any] = []

    def seen(self, key: str) -> bool:
        if key in self.mem:
            return True
        return self.db is not None and self._position(key) is not None

    def _position(self, key: str) -> Optional[int]:
        row = self.db.execute("SELECT pos FROM k WHERE key = ?", (_db_key(key),)).fetchone()
        return None if row is None else int(row[0])

    def records(self, key: str) -> Optional[bytes]:
        """The member records ``put`` stored with ``key``'s latest text, or None for a new key."""
        text = self.mem.get(key)
        if text is None and self.db is not None:
            row = self.db.execute("SELECT pos, recs FROM k WHERE key = ?", (_db_key(key),)).fetchone()
            if row is not None:
                text = self.replaced.get(int(row[0]))
                if text is None:
                    return bytes(row[1])
        if text is None:
            return None
        return text[text.index("\0") + 1 :].encode("latin1")

    def put(self, key: str, text: str, records: bytes = b"") -> None:
        # the records ride after the JSON text, past a NUL (which JSON always escapes), as latin-1
        # characters: one string per key, in memory, on disk and in ``replaced`` alike
        rec_text = records.decode("latin1")
        if key in self.mem or (self.db is None and (len(self.mem) < self.spill or self.no_db)):
            self.mem[key] = text + "\0" + rec_text
            return
        if self.texts_file is None:  # the first key past the spill
            if self.indexed:
                try:
                    import sqlite3
                except ImportError:  # a Python built without it: the keys stay in memory
                    self.no_db = True
                    self.mem[key] = text + "\0" + rec_text
                    return
                # a private database in a temporary file; the logger may be used from any one
                # thread
                self.db = sqlite3.connect("", check_same_thread=False)
                self.db.execute("CREATE TABLE k (key BLOB PRIMARY KEY, pos INTEGER, recs BLOB)")
            self.texts_file = _side_file(self.folder)
            _track(self)
        if self.db is not None:
            pos = self._position(key)
            if pos is not None:
                self.replaced[pos] = text + "\0" + rec_text
                return
            self.db.execute("INSERT INTO k VALUES (?, ?, ?)", (_db_key(key), self.spilled, records))
        raw = text.encode("utf-8", "surrogatepass")
        self.texts_file.write(_TEXT_RECORD.pack(len(raw)) + raw)
        self.spilled += 1

    def put_rows(self, rows: list[tuple[bytes, int, bytes]], texts: bytes) -> None:
        """``put`` of new keys past the spill, as ``npz_pack`` lays them out: the database's rows
        (key, position, records) and the side file's length-prefixed texts."""
        if self.db is not None:
            self.db.executemany("INSERT INTO k VALUES (?, ?, ?)", rows)
        self.texts_file.write(texts)
        self.spilled += len(rows)

    def text_blocks(self, n: int) -> Iterator[list[str]]:
        """The dict part's texts in lists of up to ``n``, each text possibly followed by a NUL
        and more (its records), for ``join_texts``: no Python step per key. The spilled texts
        come from ``spilled_joined``."""
        values = list(self.mem.values())
        for i in range(0, len(values), n):
            yield values[i : i + n]

    def spilled_joined(self, size: int = 1 << 20, check: bool = True) -> Iterator[Optional[bytes]]:
        """The spilled keys' JSON texts joined by ", ", as UTF-8, in blocks of about ``size``
        bytes, read from the side file in large pieces and cut at the NUL before each text's
        records without decoding them (~0.3 us a key; reading them one by one as ``str`` took
        several). A block holding a lone surrogate (which the side file keeps as
        surrogatepass bytes) is None, as ``join_texts`` returns for one, unless ``check`` is
        false."""
        f = self.texts_file
        if f is None or not self.spilled:
            return
        f.flush()
        f.seek(0)
        unpack = _TEXT_RECORD.unpack_from
        replaced = self.replaced
        buf = b""
        pos = 0
        out: list[bytes] = []
        out_size = 0
        try:
            for i in range(self.spilled):
                if len(buf) - pos < 4:
                    buf = buf[pos:] + f.read(max(size, 4))
                    pos = 0
                (n,) = unpack(buf, pos)
                end = pos + 4 + n
                if end > len(buf):
                    buf = buf[pos:] + f.read(max(size, end - pos))
                    pos, end = 0, 4 + n
                text = replaced.get(i)
                if text is not None:
                    raw = text.partition("\0")[0].encode("utf-8", "surrogatepass")
                else:
                    cut = buf.find(b"\0", pos + 4, end)
                    raw = buf[pos + 4 : end if cut < 0 else cut]
                pos = end
                if raw:
                    out.append(raw)
                    out_size += len(raw) + 2
                if out_size >= size:
                    data = b", ".join(out)
                    yield _checked(data) if check else data
                    out, out_size = [], 0
            if out:
                data = b", ".join(out)
                yield _checked(data) if check else data
        finally:
            f.seek(0, 2)

    @property
    def spilling(self) -> bool:
        """Whether keys go past the dict part now (to the side file, and SQLite if indexed)."""
        return self.texts_file is not None

    def keys(self) -> list[str]:
        if not self.indexed and self.spilled:
            raise RuntimeError("the key log of a one-time save does not keep its spilled keys")
        out = list(self.mem)
        if self.db is not None:
            out += [k.decode("utf-8", "surrogatepass") for (k,) in
                    self.db.execute("SELECT key FROM k ORDER BY pos")]
        return out

    def spool(self) -> Any:
        """An anonymous file beside the dump for the writer's metadata, closed with the log."""
        f = _side_file(self.folder)
        self.spools.append(f)
        _track(self)
        return f

    def close(self) -> None:
        _LIVE.discard(self)
        for f in self.spools:
            f.close()
        self.spools.clear()
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.texts_file is not None:
            self.texts_file.close()
            self.texts_file = None

    def _disown(self) -> None:
        """In a forked child: forget the parent's database and files without closing them.

        Closing the child's copy of the connection (its finalizer does, at the child's exit) rolls
        back the transaction the parent keeps open into the temporary database file they share:
        the parent's next look-up of a spilled key found "database disk image is malformed".
        SQLite forbids using a connection across a fork at all, so the child's copy is never
        freed. The files' buffers, flushed at the child's exit into the file offsets shared with
        the parent, would put their bytes there a second time: they write to the null device."""
        _to_null([f for f in (self.texts_file, *self.spools) if f is not None])
        if self.db is not None:
            _keep_forever(self.db)
        self.db = self.texts_file = None
        self.spools = []


# the key logs holding a database or files (from their spill or first spool), for the fork hook;
# a WeakSet: a log dropped without ``close`` is not kept alive by it
_LIVE: weakref.WeakSet[_KeyLog] = weakref.WeakSet()
# Py_IncRef (or None where there is none), looked up at the first spill: in the parent, as the
# fork hook must not load a library (another thread may have held the loader's lock at the fork)
_INCREF: list[Optional[Callable[[Any], None]]] = []
# what ``_keep_forever`` keeps where it cannot take a reference of its own: alive until the
# child's interpreter frees its modules at its exit (when they are finalized after all)
_KEPT: list[Any] = []


def _track(log: _KeyLog) -> None:
    if not _INCREF:
        _INCREF.append(_py_incref())
    _LIVE.add(log)


def _py_incref() -> Optional[Callable[[Any], None]]:
    try:
        import ctypes

        # a function object of its own: ``pythonapi.Py_IncRef`` is shared, its argtypes too
        return ctypes.PYFUNCTYPE(None, ctypes.py_object)(("Py_IncRef", ctypes.pythonapi))
    except (ImportError, AttributeError, OSError):  # pragma: no cover - not CPython
        return None


def _keep_forever(obj: Any) -> None:
    """Never free ``obj`` in this process: an object in a module's list is still freed when the
    interpreter exits (a connection in one was closed, and rolled back, all the same); a
    reference taken from the interpreter and never given back outlives it."""
    incref = _INCREF[0] if _INCREF else None
    if incref is not None:
        incref(obj)
    else:  # pragma: no cover - not CPython
        _KEPT.append(obj)


def _to_null(files: list[Any]) -> None:
    """Point the descriptors of ``files`` at the null device: what their buffers flush goes
    nowhere, and the descriptors the child shares with its parent are left as they are."""
    if not files:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # pragma: no cover - no null device
        return
    try:
        for f in files:
            try:
                if not f.closed:
                    os.dup2(null, f.fileno())
            except (OSError, ValueError):  # pragma: no cover - closed meanwhile
                pass
    finally:
        os.close(null)


def _disown_in_child() -> None:
    logs = list(_LIVE)
    _LIVE.clear()
    for log in logs:
        log._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_in_child)


_TEXT_RECORD = struct.Struct("<I")


# a lone surrogate (U+D800-U+DFFF) as surrogatepass writes it: not UTF-8
_SURROGATE = b"\xed[\xa0-\xbf]"  # compiled by re at first use: past the spill only


def _checked(data: bytes) -> Optional[bytes]:
    return None if re.search(_SURROGATE, data) else data


def _db_key(key: str) -> bytes:
    # keys may hold lone surrogates (file names decoded with surrogateescape): stored as bytes
    return key.encode("utf-8", "surrogatepass")
