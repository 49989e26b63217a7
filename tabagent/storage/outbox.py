"""The vector outbox: how a row and its embedding are written together across two databases.

A message lives in ``conversations`` (SQLite); its vector lives in ``embeddings`` (LanceDB),
and no commit spans the two. So the vector is first written *with the row*, in the same SQLite
transaction, into that database's ``vector_outbox`` table; that commit is the acknowledgement.
A sync step later moves outbox entries into LanceDB (an idempotent merge on the label) and only
then deletes them. Deleting a row queues a ``delete`` entry by trigger, in the same transaction.

After a crash the recovery pass simply runs the sync again: entries that reached LanceDB are
merged a second time (no change), the rest arrive now. Hence, after recovery, every committed
row has its vector and no vector outlives its row, which is the invariant the tests check with
a ``kill -9`` in the middle of a write loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tabagent.storage.records import KIND_CODES

OUTBOX_TABLE = """
CREATE TABLE vector_outbox(
    id INTEGER PRIMARY KEY,
    op TEXT NOT NULL CHECK (op IN ('upsert', 'delete')),
    label INTEGER NOT NULL,
    kind TEXT NOT NULL,
    model TEXT,           -- NULL on a delete: every model's vector for the label goes
    vector BLOB           -- little-endian float32
);
"""


def delete_trigger(table: str, kind: str) -> str:
    """DDL: deleting a row of ``table`` queues the deletion of its vectors."""
    code = KIND_CODES[kind]
    return f"""
CREATE TRIGGER {table}_vector_delete AFTER DELETE ON {table} BEGIN
    INSERT INTO vector_outbox(op, label, kind) VALUES ('delete', ({code} << 48) | old.id, '{kind}');
END;
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    op: str
    label: int
    kind: str
    model: str | None
    vector: npt.NDArray[np.float32] | None


def queue_vector(
    conn: sqlite3.Connection, label: int, kind: str, model: str, vector: npt.NDArray[np.float32]
) -> None:
    """Queue one row's vector, in the caller's transaction (the row's own)."""
    queue_vectors(conn, [label], kind, model, np.asarray(vector).reshape(1, -1))


def queue_vectors(
    conn: sqlite3.Connection,
    labels: Sequence[int],
    kind: str,
    model: str,
    vectors: npt.NDArray[np.float32],
) -> None:
    """Queue the vectors of many rows (``vectors`` row for row) in one statement."""
    blobs = np.ascontiguousarray(vectors, dtype="<f4")
    conn.executemany(
        "INSERT INTO vector_outbox(op, label, kind, model, vector) VALUES ('upsert', ?, ?, ?, ?)",
        [(label, kind, model, blobs[i].tobytes()) for i, label in enumerate(labels)],
    )


def pending(conn: sqlite3.Connection, limit: int) -> list[OutboxEntry]:
    rows = conn.execute(
        "SELECT id, op, label, kind, model, vector FROM vector_outbox ORDER BY id LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        OutboxEntry(
            id=r[0],
            op=r[1],
            label=r[2],
            kind=r[3],
            model=r[4],
            vector=np.frombuffer(r[5], dtype="<f4") if r[5] is not None else None,
        )
        for r in rows
    ]


def retire(conn: sqlite3.Connection, entries: Sequence[OutboxEntry]) -> None:
    """Forget entries that have reached the vector store (ids are increasing; delete up to max)."""
    if entries:
        conn.execute("DELETE FROM vector_outbox WHERE id <= ?", (entries[-1].id,))


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM vector_outbox").fetchone()[0])
