"""The writer thread: every write of the memory layer, serialised, with group commit.

Callers (on the event loop or any thread) submit a function ``fn(conn) -> T`` for one database
and get a future that resolves only after the transaction holding it has **committed**, which is
what "acknowledged" means. While one transaction commits, newer submissions queue; the next
round takes them all and runs them in one transaction per database, each inside its own
savepoint, so one failing write is undone alone and the others still commit. Many concurrent
single writes thus cost one commit per round instead of one each.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from tabagent.errors import StorageError
from tabagent.storage.sqlite import Database

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_ROUND = 1024


@dataclass(slots=True)
class _Write:
    db: Database
    fn: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any]


class Writer:
    def __init__(self, on_commit: Callable[[Database], None] | None = None) -> None:
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tabagent-db-writer", daemon=True)
        self._on_commit = on_commit
        self._closed = False
        self.rounds = 0
        self.writes = 0

    def start(self) -> None:
        self._thread.start()

    def submit(
        self, db: Database, fn: Callable[[sqlite3.Connection], T]
    ) -> concurrent.futures.Future[T]:
        if self._closed:
            raise StorageError("the memory store is closed", code="storage_closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Write(db, fn, future))
        return future

    def run(self, db: Database, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Submit and wait (from a thread that is not the writer)."""
        return self.submit(db, fn).result()

    def close(self) -> None:
        """Finish every queued write, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < _MAX_ROUND:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._round(batch)

    def _round(self, batch: list[_Write]) -> None:
        by_db: dict[int, list[_Write]] = {}
        for item in batch:
            by_db.setdefault(id(item.db), []).append(item)
        for items in by_db.values():
            db = items[0].db
            outcomes: list[tuple[bool, Any]] = []
            try:
                with db.transaction() as conn:
                    for item in items:
                        if not item.future.set_running_or_notify_cancel():
                            outcomes.append((False, None))
                            continue
                        try:
                            with db.savepoint(conn):
                                outcomes.append((True, item.fn(conn)))
                        except BaseException as exc:
                            outcomes.append((False, exc))
            except BaseException as exc:  # BEGIN or COMMIT failed: nothing in it holds
                log.exception("%s: commit failed", db.name)
                for item in items:  # those not reached yet fail too, rather than wait forever
                    future = item.future
                    if future.running() or (
                        not future.done() and future.set_running_or_notify_cancel()
                    ):
                        future.set_exception(StorageError(f"{db.name}: write not committed: {exc}"))
                continue
            self.rounds += 1
            self.writes += len(items)
            if self._on_commit is not None:
                self._on_commit(db)
            for item, (ok, value) in zip(items, outcomes, strict=True):
                if not item.future.running():
                    continue
                if ok:
                    item.future.set_result(value)
                else:
                    item.future.set_exception(value)
