"""The writer thread: every write of the memory layer, serialised, with group commit.

Callers (on the event loop or any thread) submit a function ``fn(conn) -> T`` for one database
and get a future that resolves only after the transaction holding it has **committed**, which is
what "acknowledged" means. While one transaction commits, newer submissions queue; the next
round takes them all and runs them in one transaction per database, each inside its own
savepoint, so one failing write is undone alone and the others still commit. Many concurrent
single writes thus cost one commit per round instead of one each.

Callers on an event loop use :meth:`Writer.submit_async`: the outcomes of a round reach each
loop in one thread-safe callback, not one wake-up per write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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
    future: concurrent.futures.Future[Any] | None = None  # a thread waits on it
    waiter: asyncio.Future[Any] | None = None  # or a task, on its loop
    loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """False when the caller gave up (cancelled) before the write began."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        assert self.waiter is not None
        return not self.waiter.cancelled()  # a cancel from here on lets the write go on


Outcome = tuple[bool, Any]  # (succeeded, result or exception)


def await_commits(
    wake: threading.Event, stop: threading.Event, interval: float, linger: float
) -> bool:
    """The wait of a thread that works after commits (the vector sync, the keyword index):
    until a commit wakes it (``wake``) or ``interval`` passes, then ``linger`` more, so the
    writes of a busy moment share one pass. False once ``stop`` is set."""
    wake.wait(interval)
    stop.wait(linger)
    wake.clear()
    return not stop.is_set()


def _settle(outcomes: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    """On the loop: hand each waiting task its write's outcome."""
    for waiter, (ok, value) in outcomes:
        if waiter.done():  # cancelled meanwhile
            continue
        if ok:
            waiter.set_result(value)
        else:
            waiter.set_exception(value)


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
        self._queue.put(_Write(db, fn, future=future))
        return future

    def submit_async(
        self, db: Database, fn: Callable[[sqlite3.Connection], T]
    ) -> asyncio.Future[T]:
        """Like :meth:`submit`, for a task on the running loop (await the result)."""
        if self._closed:
            raise StorageError("the memory store is closed", code="storage_closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Write(db, fn, waiter=waiter, loop=loop))
        return waiter

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
            outcomes: list[Outcome | None] = []  # None: cancelled before it began
            try:
                with db.transaction() as conn:
                    for item in items:
                        if not item.start():
                            outcomes.append(None)
                            continue
                        try:
                            with db.savepoint(conn):
                                outcomes.append((True, item.fn(conn)))
                        except BaseException as exc:
                            outcomes.append((False, exc))
            except BaseException as exc:  # BEGIN or COMMIT failed: nothing in it holds
                log.exception("%s: commit failed", db.name)
                # every write of the round fails, those not reached yet too (none waits forever)
                error = StorageError(f"{db.name}: write not committed: {exc}")
                started = len(outcomes)
                outcomes = [(False, error) if o is not None else None for o in outcomes]
                outcomes += [(False, error) if i.start() else None for i in items[started:]]
                self._resolve(items, outcomes)
                continue
            self.rounds += 1
            self.writes += len(items)
            if self._on_commit is not None:
                self._on_commit(db)
            self._resolve(items, outcomes)

    @staticmethod
    def _resolve(items: list[_Write], outcomes: list[Outcome | None]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is None:
                continue
            if item.future is not None:
                ok, value = outcome
                if ok:
                    item.future.set_result(value)
                else:
                    item.future.set_exception(value)
            else:
                assert item.loop is not None
                assert item.waiter is not None
                by_loop.setdefault(item.loop, []).append((item.waiter, outcome))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, settled)
