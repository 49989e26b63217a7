"""Three small stores of what happened: ``tool_results``, ``experience`` and ``summaries``.

- ``tool_results``: each function call a model made, with its arguments, result or error.
- ``experience``: episodic events (what happened, the outcome, the user's feedback, a score).
- ``summaries``: rolling summaries of a conversation (older turns folded into text when the
  history no longer fits the context) or of a period; keyword-searchable and embedded, so
  memories of long conversations stay findable.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tabagent.errors import NotFound
from tabagent.storage import outbox
from tabagent.storage.fts import ranked
from tabagent.storage.records import Episode, Summary, ToolResult, vector_label
from tabagent.storage.sqlite import Database

TOOL_RESULTS_MIGRATIONS = (
    """
    CREATE TABLE tool_results(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT,
        tool TEXT NOT NULL,
        arguments TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        error TEXT,
        duration_ms REAL,
        created_at REAL NOT NULL
    );
    CREATE INDEX tool_results_by_conversation ON tool_results(conversation_id, id);
    CREATE INDEX tool_results_by_tool ON tool_results(tool, created_at);
    """,
)

EXPERIENCE_MIGRATIONS = (
    """
    CREATE TABLE episodes(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT,
        event TEXT NOT NULL,
        outcome TEXT,
        feedback TEXT,
        score REAL,
        created_at REAL NOT NULL
    );
    CREATE INDEX episodes_by_time ON episodes(created_at);
    CREATE VIRTUAL TABLE episodes_fts USING fts5(
        event, outcome, feedback, content='episodes', content_rowid='id',
        tokenize='porter unicode61 remove_diacritics 2'
    );
    CREATE TRIGGER episodes_fts_insert AFTER INSERT ON episodes BEGIN
        INSERT INTO episodes_fts(rowid, event, outcome, feedback)
        VALUES (new.id, new.event, new.outcome, new.feedback);
    END;
    CREATE TRIGGER episodes_fts_delete AFTER DELETE ON episodes BEGIN
        INSERT INTO episodes_fts(episodes_fts, rowid, event, outcome, feedback)
        VALUES ('delete', old.id, old.event, old.outcome, old.feedback);
    END;
    CREATE TRIGGER episodes_fts_update AFTER UPDATE ON episodes BEGIN
        INSERT INTO episodes_fts(episodes_fts, rowid, event, outcome, feedback)
        VALUES ('delete', old.id, old.event, old.outcome, old.feedback);
        INSERT INTO episodes_fts(rowid, event, outcome, feedback)
        VALUES (new.id, new.event, new.outcome, new.feedback);
    END;
    """,
)

SUMMARIES_MIGRATIONS = (
    """
    CREATE TABLE summaries(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT,
        period TEXT NOT NULL DEFAULT 'conversation',
        text TEXT NOT NULL,
        covers_to_message_id INTEGER,
        created_at REAL NOT NULL
    );
    CREATE INDEX summaries_by_conversation ON summaries(conversation_id, id);
    CREATE VIRTUAL TABLE summaries_fts USING fts5(
        text, content='summaries', content_rowid='id',
        tokenize='porter unicode61 remove_diacritics 2'
    );
    CREATE TRIGGER summaries_fts_insert AFTER INSERT ON summaries BEGIN
        INSERT INTO summaries_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER summaries_fts_delete AFTER DELETE ON summaries BEGIN
        INSERT INTO summaries_fts(summaries_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    """
    + outbox.OUTBOX_TABLE
    + outbox.delete_trigger("summaries", "summary"),
)


class ToolResultStore:
    name = "tool_results"

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self,
        conn: sqlite3.Connection,
        *,
        tool: str,
        arguments: dict[str, Any] | None = None,
        result: Any = None,
        error: str | None = None,
        duration_ms: float | None = None,
        conversation_id: str | None = None,
    ) -> ToolResult:
        now = time.time()
        row_id = conn.execute(
            "INSERT INTO tool_results(conversation_id, tool, arguments, result, error,"
            " duration_ms, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                conversation_id,
                tool,
                json.dumps(arguments or {}),
                json.dumps(result),
                error,
                duration_ms,
                now,
            ),
        ).lastrowid
        assert row_id is not None
        return ToolResult(
            id=row_id,
            conversation_id=conversation_id,
            tool=tool,
            arguments=arguments or {},
            result=result,
            error=error,
            duration_ms=duration_ms,
            created_at=now,
        )

    def recent(
        self, *, conversation_id: str | None = None, tool: str | None = None, limit: int = 100
    ) -> list[ToolResult]:
        where: list[str] = []
        args: list[Any] = []
        if conversation_id is not None:
            where.append("conversation_id = ?")
            args.append(conversation_id)
        if tool is not None:
            where.append("tool = ?")
            args.append(tool)
        sql = "SELECT * FROM tool_results" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.db.reader().execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [
            ToolResult(
                id=r["id"],
                conversation_id=r["conversation_id"],
                tool=r["tool"],
                arguments=json.loads(r["arguments"]),
                result=json.loads(r["result"]) if r["result"] is not None else None,
                error=r["error"],
                duration_ms=r["duration_ms"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def stats(self) -> dict[str, int]:
        conn = self.db.reader()
        return {"tool_results": conn.execute("SELECT count(*) FROM tool_results").fetchone()[0]}


class ExperienceStore:
    name = "experience"

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self,
        conn: sqlite3.Connection,
        *,
        event: str,
        outcome: str | None = None,
        feedback: str | None = None,
        score: float | None = None,
        conversation_id: str | None = None,
    ) -> Episode:
        now = time.time()
        row_id = conn.execute(
            "INSERT INTO episodes(conversation_id, event, outcome, feedback, score, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (conversation_id, event, outcome, feedback, score, now),
        ).lastrowid
        assert row_id is not None
        return Episode(
            id=row_id,
            conversation_id=conversation_id,
            event=event,
            outcome=outcome,
            feedback=feedback,
            score=score,
            created_at=now,
        )

    def give_feedback(
        self, conn: sqlite3.Connection, episode_id: int, feedback: str, score: float | None
    ) -> None:
        cur = conn.execute(
            "UPDATE episodes SET feedback = ?, score = coalesce(?, score) WHERE id = ?",
            (feedback, score, episode_id),
        )
        if cur.rowcount == 0:
            raise NotFound(f"no episode {episode_id}", code="episode_not_found")

    def recent(self, *, limit: int = 100, since: float | None = None) -> list[Episode]:
        rows = (
            self.db.reader()
            .execute(
                "SELECT * FROM episodes WHERE created_at >= ? ORDER BY id DESC LIMIT ?",
                (since or 0.0, limit),
            )
            .fetchall()
        )
        return [Episode(**dict(r)) for r in rows]

    def by_id(self, ids: Sequence[int]) -> dict[int, Episode]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.reader().execute(f"SELECT * FROM episodes WHERE id IN ({marks})", ids)
        return {r["id"]: Episode(**dict(r)) for r in rows}

    def keyword_search(self, query: str, limit: int = 20) -> list[tuple[int, float]]:
        return ranked(self.db.reader(), "episodes_fts", query, limit)

    def stats(self) -> dict[str, int]:
        conn = self.db.reader()
        return {"episodes": conn.execute("SELECT count(*) FROM episodes").fetchone()[0]}


class SummaryStore:
    name = "summaries"

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self,
        conn: sqlite3.Connection,
        *,
        text: str,
        conversation_id: str | None = None,
        period: str = "conversation",
        covers_to_message_id: int | None = None,
        vector: npt.NDArray[np.float32] | None = None,
        embedding_model: str | None = None,
    ) -> Summary:
        now = time.time()
        row_id = conn.execute(
            "INSERT INTO summaries(conversation_id, period, text, covers_to_message_id,"
            " created_at) VALUES (?, ?, ?, ?, ?)",
            (conversation_id, period, text, covers_to_message_id, now),
        ).lastrowid
        assert row_id is not None
        if vector is not None and embedding_model is not None:
            label = vector_label("summary", row_id)
            outbox.queue_vector(conn, label, "summary", embedding_model, vector)
        return Summary(
            id=row_id,
            conversation_id=conversation_id,
            period=period,
            text=text,
            covers_to_message_id=covers_to_message_id,
            created_at=now,
        )

    def latest(self, conversation_id: str) -> Summary | None:
        row = (
            self.db.reader()
            .execute(
                "SELECT * FROM summaries WHERE conversation_id = ? AND period = 'conversation'"
                " ORDER BY id DESC LIMIT 1",
                (conversation_id,),
            )
            .fetchone()
        )
        return Summary(**dict(row)) if row is not None else None

    def recent(self, *, conversation_id: str | None = None, limit: int = 100) -> list[Summary]:
        if conversation_id is None:
            rows = self.db.reader().execute(
                "SELECT * FROM summaries ORDER BY id DESC LIMIT ?", (limit,)
            )
        else:
            rows = self.db.reader().execute(
                "SELECT * FROM summaries WHERE conversation_id = ? ORDER BY id DESC LIMIT ?",
                (conversation_id, limit),
            )
        return [Summary(**dict(r)) for r in rows]

    def by_id(self, ids: Sequence[int]) -> dict[int, Summary]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.reader().execute(f"SELECT * FROM summaries WHERE id IN ({marks})", ids)
        return {r["id"]: Summary(**dict(r)) for r in rows}

    def delete_conversation(self, conn: sqlite3.Connection, conversation_id: str) -> None:
        conn.execute("DELETE FROM summaries WHERE conversation_id = ?", (conversation_id,))

    def keyword_search(self, query: str, limit: int = 20) -> list[tuple[int, float]]:
        return ranked(self.db.reader(), "summaries_fts", query, limit)

    def stats(self) -> dict[str, int]:
        conn = self.db.reader()
        return {
            "summaries": conn.execute("SELECT count(*) FROM summaries").fetchone()[0],
            "vector_outbox": outbox.count(conn),
        }
