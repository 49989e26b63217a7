"""The keyword index of messages: FTS5 in its own file, fed in the background.

Indexing a message for FTS5 (tokenising, stemming, merging segments) costs several times as much
as storing it. Done by a trigger inside the write, it capped acknowledged writes at what one
core can index. So the index lives in its own SQLite file (``conversations.keywords.db``) and a
background thread brings it in step with ``conversations.db``, on the other core. A write adds
nothing for it, except when it edits or deletes a message:

* **New messages** are found by id: ids come from AUTOINCREMENT and the writer is one thread,
  so every message up to the largest id a snapshot shows is committed (or already deleted). The
  index remembers the largest id it has copied; a pass copies the messages above it.
* **Edits and deletes** are rare, so a trigger notes the message id in ``keyword_outbox``, in
  the same commit; a pass removes the index rows of messages that no longer exist and copies the
  current content of those that do.
* **State-based and idempotent.** Each step is one statement over the attached
  ``conversations.db`` (the work runs inside SQLite, without the GIL) and leaves an index row
  equal to its message row, or absent: the order of changes within a pass does not matter.
* **Crash-safe.** The largest copied id and the last applied outbox ``seq`` are stored in the
  index file, in the same transaction as the index rows; after a kill the next pass starts
  after them. Applied outbox entries are then pruned through the writer (garbage collection).
* **Read your writes.** A keyword search first calls :meth:`KeywordIndex.flush`, which applies
  whatever was committed before it, so an acknowledged message is always findable.
* **Derived data.** The index is rebuilt from ``messages`` when it is missing (a new or migrated
  database, a restored backup), unreadable, or belongs to another database (its id differs) or
  a later point of this one (it is ahead of the database: an older copy was restored).
  The rebuild runs at the first flush (the thread's, right after start-up, or a search's, which
  waits for it), in place, over one snapshot of the messages while writes go on: a long history
  never holds up the server's start. Deleting the file is always a safe way to force one.

Readers of ``conversations.db`` attach the file as ``keywords``, so queries name
``messages_fts`` as before.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from functools import partial
from pathlib import Path

from tabagent.storage.sqlite import Database
from tabagent.storage.writer import Writer, await_commits

log = logging.getLogger(__name__)

SCHEMA = "keywords"  # the name readers of conversations.db attach the index under
_BATCH = 50_000  # new messages, and outbox entries, per index transaction
_PRUNE_EVERY = 1024  # applied outbox entries are deleted (through the writer) in batches

# In conversations.db (migration 3 of the conversations store).
OUTBOX_DDL = """
CREATE TABLE keyword_outbox(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after pruning
    message_id INTEGER NOT NULL
);
CREATE TABLE keyword_index_id(id TEXT NOT NULL);
INSERT INTO keyword_index_id VALUES (lower(hex(randomblob(16))));
CREATE TRIGGER messages_keywords_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO keyword_outbox(message_id) VALUES (new.id);
END;
CREATE TRIGGER messages_keywords_delete AFTER DELETE ON messages BEGIN
    INSERT INTO keyword_outbox(message_id) VALUES (old.id);
END;
"""

_FTS_TABLE = """
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
    content, tokenize='porter unicode61 remove_diacritics 2'
)
"""
_STATE_TABLE = """
CREATE TABLE IF NOT EXISTS keyword_state(
    source_id TEXT NOT NULL,   -- keyword_index_id of the database it was built from
    copied INTEGER NOT NULL,   -- every message up to this id is in the index
    applied INTEGER NOT NULL   -- and every outbox entry up to this seq
)
"""

_REMOVE_GONE = """
DELETE FROM messages_fts WHERE rowid IN (
    SELECT o.message_id FROM src.keyword_outbox o
    WHERE o.seq > ? AND o.seq <= ?
      AND NOT EXISTS (SELECT 1 FROM src.messages m WHERE m.id = o.message_id)
)
"""
_COPY_CURRENT = """
INSERT OR REPLACE INTO messages_fts(rowid, content)
SELECT m.id, m.content FROM src.keyword_outbox o JOIN src.messages m ON m.id = o.message_id
WHERE o.seq > ? AND o.seq <= ?
"""
_COPY_NEW = """
INSERT OR REPLACE INTO messages_fts(rowid, content)
SELECT id, content FROM src.messages WHERE id > ? AND id <= ?
"""


def index_path(source: Database) -> Path:
    return source.path.with_name(f"{source.path.stem}.keywords.db")


def _prune(conn: sqlite3.Connection, upto: int) -> None:
    conn.execute("DELETE FROM keyword_outbox WHERE seq <= ?", (upto,))


class KeywordIndex:
    def __init__(
        self, source: Database, writer: Writer, *, interval: float = 0.5, linger: float = 0.02
    ) -> None:
        self.source = source
        self.path = index_path(source)
        self.writer = writer
        self.interval = interval
        # After a commit wakes the thread it waits this long, so the writes of a busy moment
        # share one pass (and one transaction) instead of waking it one by one: sequential
        # acknowledged writes ran 1.7x faster. Searches never wait for it: they flush.
        self.linger = linger
        self.copied = 0  # every message up to this id is in the index
        self.applied = 0  # and every outbox entry up to this seq
        self.indexed = 0  # new messages and outbox entries applied since open (stats, tests)
        self._pruned = -1  # outbox entries up to this seq are known gone
        self._conn: sqlite3.Connection | None = None
        self._stale: str | None = None  # why the index must be rebuilt before it is used
        self.rebuilds = 0
        self._lock = threading.Lock()  # one pass at a time, on whichever thread asks
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Open the index file (milliseconds) and attach it to ``source``'s readers.

        Catching up, or a rebuild, is left to the first :meth:`flush`: the thread's, or a
        search's if one comes first (it waits for it). A long history thus never holds up the
        server's start."""
        try:
            self._conn = self._connect()
            self._stale = self._stale_reason()
        except sqlite3.DatabaseError as exc:  # not a database at all: it is derived data
            log.warning("%s: the keyword index is unreadable (%s); recreating", self.path, exc)
            if self._conn is not None:
                self._conn.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._conn = self._connect()
            self._stale = "it was unreadable"
        self.source.attach(SCHEMA, self.path)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tabagent-keywords", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def notify(self, db: Database) -> None:
        """Called by the writer after each commit."""
        if db is self.source:
            self._wake.set()

    # -- the index file ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # derived data: a power cut means a rebuild
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute(_FTS_TABLE)
        conn.execute(_STATE_TABLE)
        source = f"{self.source.path.resolve().as_uri()}?mode=ro"
        conn.execute("ATTACH DATABASE ? AS src", (source,))
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "the keyword index is not open"
        return self._conn

    def _source_state(self) -> tuple[str, int, int]:
        """(id of the source database, the last message id and the last outbox seq it ever
        handed out)."""
        conn = self.conn
        source_id = conn.execute("SELECT id FROM src.keyword_index_id").fetchone()[0]
        last = dict(conn.execute("SELECT name, seq FROM src.sqlite_sequence").fetchall())
        return source_id, last.get("messages", 0), last.get("keyword_outbox", 0)

    def _stale_reason(self) -> str | None:
        row = self.conn.execute("SELECT source_id, copied, applied FROM keyword_state").fetchone()
        if row is None:
            return "no index yet"
        source_id, last_id, last_seq = self._source_state()
        if row[0] != source_id:
            return "it was built from another database"
        if row[1] > last_id or row[2] > last_seq:
            return "it is ahead of the database: an older copy was restored"
        self.copied, self.applied = row[1], row[2]
        return None

    def _rebuild(self, reason: str) -> None:
        """The index anew from every message, in place (readers keep their attachment), in
        one transaction over one snapshot of ``source``: writes go on meanwhile, and those
        after the snapshot are applied from the outbox afterwards."""
        log.info("%s: rebuilding the keyword index: %s", self.source.name, reason)
        started = time.monotonic()
        conn = self.conn
        conn.execute("BEGIN")
        try:
            source_id, last_id, last_seq = self._source_state()
            conn.execute("DROP TABLE messages_fts")  # much faster than deleting its rows
            conn.execute(_FTS_TABLE)
            conn.execute(
                "INSERT INTO messages_fts(rowid, content) SELECT id, content FROM src.messages"
            )
            conn.execute("DELETE FROM keyword_state")
            conn.execute(
                "INSERT INTO keyword_state VALUES (?, ?, ?)", (source_id, last_id, last_seq)
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.copied, self.applied, self._stale = last_id, last_seq, None
        self.rebuilds += 1
        log.info(
            "%s: keyword index rebuilt in %.1f s", self.source.name, time.monotonic() - started
        )

    # -- catching up ------------------------------------------------------------------------

    def flush(self) -> int:
        """Index every message and outbox entry committed before the call; returns how many.

        The largest id and seq are read under the lock (two indexed lookups), so a caller that
        arrives while the thread is applying a range waits for it, then applies what is left."""
        with self._lock:
            if self._stale is not None:
                self._rebuild(self._stale)
            total = 0
            while (done := self._apply_next()) > 0:
                total += done
            self.indexed += total
            if self.applied - self._pruned >= _PRUNE_EVERY:
                self._prune()
            return total

    def _tops(self, conn: sqlite3.Connection, prefix: str = "src.") -> tuple[int, int]:
        top_id = conn.execute(f"SELECT max(id) FROM {prefix}messages").fetchone()[0] or 0
        top_seq = conn.execute(f"SELECT max(seq) FROM {prefix}keyword_outbox").fetchone()[0]
        return top_id, top_seq or 0

    def _apply_next(self) -> int:
        conn = self.conn
        top_id, top_seq = self._tops(conn)
        copied, applied = self.copied, self.applied
        to_id = max(copied, min(top_id, copied + _BATCH))
        to_seq = max(applied, min(top_seq, applied + _BATCH))
        if to_id == copied and to_seq == applied:
            return 0
        # Deferred: the write lock is taken on the index file only, and the reads of src share
        # one snapshot, which holds every message and entry up to the tops read above.
        conn.execute("BEGIN")
        try:
            if to_seq > applied:
                conn.execute(_REMOVE_GONE, (applied, to_seq))
                conn.execute(_COPY_CURRENT, (applied, to_seq))
            if to_id > copied:
                conn.execute(_COPY_NEW, (copied, to_id))
            conn.execute("UPDATE keyword_state SET copied = ?, applied = ?", (to_id, to_seq))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.copied, self.applied = to_id, to_seq
        return (to_id - copied) + (to_seq - applied)

    def _prune(self) -> None:
        try:
            future = self.writer.submit(self.source, partial(_prune, upto=self.applied))
        except Exception:  # closing: the next open prunes
            return
        self._pruned = self.applied
        future.add_done_callback(_log_prune_failure)

    def backlog(self) -> int:
        """New messages and outbox entries not in the index yet."""
        top_id, top_seq = self._tops(self.source.reader(), prefix="")
        return max(0, top_id - self.copied) + max(0, top_seq - self.applied)

    def _run(self) -> None:
        self._wake.set()  # catch up (or rebuild) at once
        while await_commits(self._wake, self._stop, self.interval, self.linger):
            try:
                self.flush()
            except Exception:  # the outbox keeps everything: retry later
                log.exception("keyword indexing failed; will retry")
                self._stop.wait(self.interval)


def _log_prune_failure(future: object) -> None:
    exc = future.exception()  # type: ignore[attr-defined]
    if exc is not None:
        log.warning("could not prune the keyword outbox (will retry): %s", exc)
