"""The streaming writer's key index: which keys a stream holds and where their metadata texts
are, in memory for a few thousand keys and, past 20,000, in an anonymous SQLite database and
temporary files beside the dump, so memory stays bounded however many keys are logged."""

from __future__ import annotations

import re
import struct
from typing import Any, Iterator, Optional

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
    keeps its latest text in memory: streams re-log a few keys, not all of them)."""

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
        return f

    def close(self) -> None:
        for f in self.spools:
            f.close()
        self.spools.clear()
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.texts_file is not None:
            self.texts_file.close()
            self.texts_file = None


_TEXT_RECORD = struct.Struct("<I")


# a lone surrogate (U+D800-U+DFFF) as surrogatepass writes it: not UTF-8
_SURROGATE = re.compile(b"\xed[\xa0-\xbf]")


def _checked(data: bytes) -> Optional[bytes]:
    return None if _SURROGATE.search(data) else data


def _db_key(key: str) -> bytes:
    # keys may hold lone surrogates (file names decoded with surrogateescape): stored as bytes
    return key.encode("utf-8", "surrogatepass")
