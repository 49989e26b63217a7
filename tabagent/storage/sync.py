"""Moves vector outbox entries into the vector store (see ``tabagent.storage.outbox``).

One background thread wakes when a write queued vectors (or every ``interval`` seconds), moves
each database's outbox into LanceDB + the index in order, and only then retires the entries
through the writer. A search that must see the latest writes calls :meth:`VectorSync.flush`.
The recovery pass at start-up is the same :meth:`flush`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from functools import partial

from tabagent.storage import outbox
from tabagent.storage.sqlite import Database
from tabagent.storage.vectors import VectorRow, VectorStore
from tabagent.storage.writer import Writer, await_commits

log = logging.getLogger(__name__)

_BATCH = 2048


class VectorSync:
    def __init__(
        self,
        vectors: VectorStore,
        sources: Sequence[Database],
        writer: Writer,
        *,
        interval: float = 0.5,
        linger: float = 0.02,
        save_every: float = 60.0,
    ) -> None:
        self.vectors = vectors
        self.sources = tuple(sources)
        self.writer = writer
        self.interval = interval
        self.linger = linger  # after a wake-up, gather the commits of a busy moment (keywords.py)
        self.save_every = save_every
        self._lock = threading.Lock()  # one sync at a time; held by backup to freeze LanceDB
        self._wake = threading.Event()
        self._stop = threading.Event()
        # the sources whose committed writes may have queued vectors (set.add/discard are atomic)
        self._dirty: set[Database] = set(self.sources)
        self._thread = threading.Thread(target=self._run, name="tabagent-vector-sync", daemon=True)
        self.moved = 0

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()
        self.vectors.save_indexes()

    def notify(self, db: Database) -> None:
        """Called by the writer after each commit."""
        if db in self.sources:
            self._dirty.add(db)
            self._wake.set()

    def _run(self) -> None:
        last_save = time.monotonic()
        while await_commits(self._wake, self._stop, self.interval, self.linger):
            try:
                self.flush()
                if time.monotonic() - last_save > self.save_every:
                    with self._lock:  # backup copies the snapshots under this lock
                        self.vectors.save_indexes()
                    last_save = time.monotonic()
            except Exception:  # keep syncing later; the outbox still holds everything
                log.exception("vector sync failed; will retry")
                time.sleep(self.interval)

    def flush(self) -> int:
        """Move every pending outbox entry into the vector store; returns how many moved.

        Returns only once nothing committed before the call is still on its way: the dirty set
        is read under the lock, so a caller that arrives while the sync thread is moving entries
        (already taken from the outbox, the mark already cleared) waits for that move to land."""
        with self._lock:
            dirty = [db for db in self.sources if db in self._dirty]
            for db in dirty:
                self._dirty.discard(db)
            total = 0
            for db in dirty:  # a store with no commit since its last pass is not even read
                while True:
                    entries = outbox.pending(db.reader(), _BATCH)
                    if not entries:
                        break
                    self._apply(entries)
                    self.writer.run(db, partial(outbox.retire, entries=entries))
                    total += len(entries)
            self.moved += total
            return total

    def _apply(self, entries: Sequence[outbox.OutboxEntry]) -> None:
        """Apply in order, one store call per run of same-kind entries and model."""
        upserts: dict[str, list[VectorRow]] = {}
        deletes: dict[str | None, list[int]] = {}

        def push() -> None:
            for model, rows in upserts.items():
                self.vectors.upsert(model, rows)
            for maybe_model, labels in deletes.items():
                for model in [maybe_model] if maybe_model else self.vectors.models():
                    self.vectors.delete(model, labels)
            upserts.clear()
            deletes.clear()

        for entry in entries:
            if entry.op == "upsert":
                if deletes:
                    push()
                assert entry.model is not None
                assert entry.vector is not None
                upserts.setdefault(entry.model, []).append(
                    VectorRow(label=entry.label, kind=entry.kind, vector=entry.vector)
                )
            else:
                if upserts:
                    push()
                deletes.setdefault(entry.model, []).append(entry.label)
        push()
