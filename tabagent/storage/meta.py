"""The ``meta`` database: schema versions of every store, settings, and high-water marks.

Each store's own ``PRAGMA user_version`` is the authority on its schema (it changes in the same
transaction as the migration); ``meta.schema_versions`` records when each version was reached,
for ``db stats`` and for support. High-water marks record how far derived state (the vector
index snapshot, say) has caught up.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from tabagent.storage.sqlite import Database

MIGRATIONS = (
    """
    CREATE TABLE schema_versions(
        store TEXT NOT NULL,
        version INTEGER NOT NULL,
        applied_at REAL NOT NULL,
        PRIMARY KEY (store, version)
    );
    CREATE TABLE settings(key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE high_water(
        name TEXT PRIMARY KEY, value INTEGER NOT NULL, updated_at REAL NOT NULL
    );
    """,
)


class MetaStore:
    name = "meta"

    def __init__(self, db: Database) -> None:
        self.db = db

    def record_schema(self, conn: sqlite3.Connection, store: str, version: int) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO schema_versions(store, version, applied_at) VALUES (?, ?, ?)",
            (store, version, time.time()),
        )

    def schema_versions(self) -> dict[str, int]:
        rows = self.db.reader().execute(
            "SELECT store, max(version) FROM schema_versions GROUP BY store"
        )
        return {r[0]: r[1] for r in rows}

    def set(self, conn: sqlite3.Connection, key: str, value: Any) -> None:
        conn.execute(
            "INSERT INTO settings(key, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE"
            " SET value = excluded.value, updated_at = excluded.updated_at",
            (key, json.dumps(value), time.time()),
        )

    def get(self, key: str, default: Any = None) -> Any:
        row = (
            self.db.reader().execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        )
        return json.loads(row[0]) if row is not None else default

    def set_mark(self, conn: sqlite3.Connection, name: str, value: int) -> None:
        conn.execute(
            "INSERT INTO high_water(name, value, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE"
            " SET value = excluded.value, updated_at = excluded.updated_at",
            (name, value, time.time()),
        )

    def marks(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.db.reader().execute("SELECT name, value FROM high_water")}
