"""One SQLite database file: pragmas, versioned migrations, one writer, many readers.

Every relational store of the memory layer is a :class:`Database`. The settings that matter:

- **WAL** journal: readers never block the writer and see a consistent snapshot each.
- ``synchronous=NORMAL``: a committed transaction survives the process being killed (it is in
  the WAL, in the OS page cache); only a power cut can lose the last few commits. ``durable=True``
  (``synchronous=FULL``) closes that gap at about 2x the cost per commit.
- ``foreign_keys=ON`` so cascades and references hold; a busy timeout for the rare checkpoint.

Migrations are SQL scripts, numbered by their position; each runs in its own transaction that
also sets ``PRAGMA user_version``, so a crash mid-migration leaves the previous version whole.

Writes go through :meth:`Database.transaction` (one writer at a time, serialised by a lock);
reads through :meth:`Database.reader`, a connection per thread opened read-only.

Hot reads (:meth:`Database.fetch_one`, :meth:`Database.fetch_all`: messages by id and by
conversation) keep their thread's read transaction open from one call to the next while nothing
is written: half the cost of a read by id in WAL mode is beginning and ending its transaction
(two ``fcntl`` locks on the shared-memory index). Each commit counts itself
(``Database.commits``) before it returns, so a read after an acknowledged write always starts a
new snapshot. No snapshot is kept across a commit, so none holds the WAL back from the
checkpoint SQLite runs inside COMMIT: while a write transaction is open, reads end theirs as
they finish, and just before COMMIT the kept snapshots of idle readers are ended (by the
committing thread, under each reader's lock). All commits to a database happen in this
process, through :meth:`transaction` (the server holds the databases for itself; the ``db``
commands need it stopped).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tabagent.errors import SchemaTooNew, StorageError

log = logging.getLogger(__name__)


def tuple_cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """A cursor of ``conn`` whose rows are plain tuples: building a ``sqlite3.Row`` per row
    costs as much as fetching it, which halves the rate of hot reads (messages by id)."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return cursor


READ_MMAP_BYTES = 256 * 1024 * 1024  # address space per reader, not memory


class _Reader:
    """One thread's read-only connection, its tuple cursor, and the snapshot it keeps open."""

    __slots__ = ("attached", "conn", "cursor", "lock", "snapshot")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.cursor = tuple_cursor(conn)
        self.attached: dict[str, Path] = {}
        self.lock = threading.Lock()  # its thread while reading; a commit ending the snapshot
        self.snapshot: int | None = None  # the commit count its open read transaction saw

    def end_snapshot(self) -> None:
        """End the kept read transaction (with ``lock`` held)."""
        if self.snapshot is not None:
            self.conn.execute("COMMIT")
            self.snapshot = None  # only once ended: a failed COMMIT is retried by the next read


class Database:
    def __init__(
        self, path: Path, migrations: Sequence[str], *, durable: bool = False, name: str = ""
    ) -> None:
        self.path = path
        self.name = name or path.stem
        self.migrations = tuple(migrations)
        self._synchronous = "FULL" if durable else "NORMAL"
        self._lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[_Reader] = []
        self._readers_lock = threading.Lock()
        self.commits = 0  # counted by every commit, before it returns
        self.writing = False  # a write transaction is open
        self._writer: sqlite3.Connection | None = None
        self._attached: dict[str, Path] = {}  # schema name -> file, in every reader

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> int:
        """Open (creating if needed) and migrate; returns the schema version now in the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            version = self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._writer = conn
        return version

    def close(self) -> None:
        with self._readers_lock:
            for reader in self._readers:
                with reader.lock:
                    reader.snapshot = None
                    reader.conn.close()
            self._readers.clear()
        self._local = threading.local()
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def attach(self, schema: str, path: Path) -> None:
        """Every reader sees ``path`` (read-only) as ``schema`` from its next use on."""
        if not schema.isidentifier():
            raise ValueError(f"not a schema name: {schema!r}")
        self._attached = {**self._attached, schema: path}  # replaced whole: readers compare

    @property
    def version(self) -> int:
        return len(self.migrations)

    def _connect(self, *, readonly: bool = False) -> sqlite3.Connection:
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":  # pragma: no cover - a filesystem without shared memory
                log.warning("%s: WAL unavailable, journal mode is %s", self.path, mode)
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
        if readonly:
            # readers map the file: pages come from the OS page cache, shared by every reader,
            # instead of a read() into each connection's own 2 MB cache (reads by id +10%)
            conn.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")
        return conn

    def _attach_to(self, conn: sqlite3.Connection, had: dict[str, Path]) -> None:
        """Bring a reader's attached files in line with :meth:`attach` (on its own thread)."""
        for schema, path in self._attached.items():
            if had.get(schema) != path:
                if schema in had:
                    conn.execute(f"DETACH DATABASE {schema}")
                uri = f"{path.resolve().as_uri()}?mode=ro"
                conn.execute(f"ATTACH DATABASE ? AS {schema}", (uri,))

    def _migrate(self, conn: sqlite3.Connection) -> int:
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > len(self.migrations):
            raise SchemaTooNew(
                f"{self.path} has schema version {current}, newer than this TabAgent knows "
                f"({len(self.migrations)}); upgrade TabAgent or restore a backup"
            )
        for version in range(current + 1, len(self.migrations) + 1):
            script = self.migrations[version - 1]
            try:
                conn.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\n;PRAGMA user_version = {version};\nCOMMIT;"
                )
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(
                    f"{self.name}: migration to version {version} failed: {exc}"
                ) from exc
            log.info("%s: migrated to schema version %d", self.name, version)
        return len(self.migrations)

    # -- access ---------------------------------------------------------------------------

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StorageError(f"{self.name} is not open", code="storage_closed")
        return self._writer

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The writer connection inside ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error).

        Re-entrant on the same thread: an inner use joins the outer transaction.
        """
        with self._lock:
            conn = self.writer
            if conn.in_transaction:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            self.writing = True  # readers keep no snapshot now: the COMMIT may checkpoint
            try:
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                self._end_idle_snapshots()  # before COMMIT: its automatic checkpoint runs in it
                conn.execute("COMMIT")
                self.commits += 1  # before the caller hears of it: its next read sees it
            finally:
                self.writing = False
            self._end_idle_snapshots()  # a read that began before BEGIN and ended after

    def _end_idle_snapshots(self) -> None:
        """End the snapshots readers keep between reads, except where a read is under way
        (that reader starts a new one at its next read, as the commit count has moved)."""
        for reader in self._readers:  # appended to only; a reader added meanwhile has none
            if reader.snapshot is not None and reader.lock.acquire(blocking=False):
                try:
                    reader.end_snapshot()
                except sqlite3.Error as exc:  # never the committed write's failure
                    log.debug("%s: a kept snapshot stays until its next read: %s", self.name, exc)
                finally:
                    reader.lock.release()

    @contextlib.contextmanager
    def savepoint(self, conn: sqlite3.Connection) -> Iterator[None]:
        """A nested unit inside a transaction: its failure undoes only its own statements."""
        conn.execute("SAVEPOINT unit")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
            raise
        conn.execute("RELEASE unit")

    def _reader(self) -> _Reader:
        """This thread's reader, made on first use and kept in step with :meth:`attach`."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            if self._writer is None:
                raise StorageError(f"{self.name} is not open", code="storage_closed")
            reader = self._local.reader = _Reader(self._connect(readonly=True))
            with self._readers_lock:
                self._readers.append(reader)
        if reader.attached is not self._attached:
            with reader.lock:
                reader.end_snapshot()  # ATTACH needs no transaction open
                self._attach_to(reader.conn, reader.attached)
                reader.attached = self._attached
        return reader

    def reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (each statement sees one committed snapshot)."""
        reader = self._reader()
        if reader.snapshot is not None:  # leave the kept snapshot: this read must be current
            with reader.lock:
                reader.end_snapshot()
        return reader.conn

    def fetch_one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        """The first row of a query of this database's own tables, as a plain tuple, in the
        snapshot this thread keeps open while nothing is committed (see the module's notes)."""
        reader: _Reader | None = getattr(self._local, "reader", None)  # _reader(), inlined
        if reader is None or reader.attached is not self._attached:
            reader = self._reader()
        with reader.lock:
            if reader.snapshot != self.commits or self.writing:
                self._renew(reader)
            row: tuple[Any, ...] | None = reader.cursor.execute(sql, params).fetchone()
            if self.writing:
                reader.end_snapshot()
            return row

    def fetch_all(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query, as :meth:`fetch_one`."""
        reader = self._reader()
        with reader.lock:
            if reader.snapshot != self.commits or self.writing:
                self._renew(reader)
            rows: list[tuple[Any, ...]] = reader.cursor.execute(sql, params).fetchall()
            if self.writing:
                reader.end_snapshot()
            return rows

    def _renew(self, reader: _Reader) -> None:
        """A new kept snapshot for ``reader``, as something was committed since its last; none
        while a write is open (the read then has its own transaction, as on a plain reader)."""
        commits = self.commits  # read first: a commit after it only makes the next read renew
        if reader.snapshot is None and reader.conn.in_transaction:
            return  # inside this thread's snapshot(): read in that transaction
        reader.end_snapshot()
        if not self.writing:
            reader.cursor.execute("BEGIN")
            reader.snapshot = commits

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """Several reads that must agree with each other: one read transaction."""
        conn = self.reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def backup_to(self, target: Path, source: sqlite3.Connection | None = None) -> None:
        """Copy the database page by page into ``target`` (WAL content included).

        With ``source`` in an open read transaction, the copy is of that snapshot, whatever the
        writer does meanwhile.
        """
        dest = sqlite3.connect(target)
        try:
            conn = source or self.reader()
            conn.backup(dest)
        finally:
            dest.close()

    def checkpoint(self) -> None:
        with self._lock:
            self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
