"""The ``conversations`` database: conversations and their messages, with keyword search.

Messages are indexed by an FTS5 table (porter stemming, so "dogs" finds "dog") that lives in
its own file and is kept in step from an outbox (``tabagent.storage.keywords``); a message's
embedding rides in the same transaction through the vector outbox.
Message ids come from AUTOINCREMENT so an id (and the vector label made from it) is never
reused after a delete.
"""

from __future__ import annotations

import json
import operator
import sqlite3
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tabagent.errors import Conflict, NotFound
from tabagent.storage import keywords, outbox
from tabagent.storage.fts import match_expression, ranked
from tabagent.storage.records import Conversation, Message, NewMessage, vector_label
from tabagent.storage.sqlite import Database

MIGRATIONS = (
    # 1: conversations and messages
    """
    CREATE TABLE conversations(
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        model TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
        content TEXT NOT NULL,
        model TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    CREATE INDEX conversations_by_update ON conversations(updated_at);
    """,
    # 2: tags, keyword search, the vector outbox
    """
    ALTER TABLE conversations ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE messages ADD COLUMN embedded INTEGER NOT NULL DEFAULT 0;
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content='messages', content_rowid='id',
        tokenize='porter unicode61 remove_diacritics 2'
    );
    INSERT INTO messages_fts(messages_fts) VALUES ('rebuild');
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END;
    """
    + outbox.OUTBOX_TABLE
    + outbox.delete_trigger("messages", "message"),
    # 3: the keyword index moves to its own file, fed from an outbox (tabagent.storage.keywords)
    """
    DROP TRIGGER messages_fts_insert;
    DROP TRIGGER messages_fts_delete;
    DROP TRIGGER messages_fts_update;
    DROP TABLE messages_fts;
    """
    + keywords.OUTBOX_DDL,
)

_MESSAGE_COLUMNS = "id, conversation_id, role, content, model, created_at, embedded"
# by id: the id is the caller's, not a column (each column fetched costs sqlite3 a description
# entry of its own per query, a twentieth of a read by id)
_MESSAGE_BY_ID = f"SELECT {_MESSAGE_COLUMNS.removeprefix('id, ')} FROM messages WHERE id = ?"


def new_conversation_id() -> str:
    return f"conv_{uuid.uuid4().hex}"


def _conversation(row: sqlite3.Row, count: int = 0) -> Conversation:
    return Conversation(
        id=row["id"],
        title=row["title"],
        model=row["model"],
        tags=json.loads(row["tags"]),
        metadata=json.loads(row["metadata"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        message_count=count,
    )


_new_message = Message.__new__
_set = object.__setattr__
_MESSAGE_FIELDS = frozenset(Message.model_fields)


def _message(row: tuple[Any, ...]) -> Message:
    """A :class:`Message` from a row of ``_MESSAGE_COLUMNS``, built without validation: the
    table's schema already holds every field to the model's type (INTEGER PRIMARY KEY, TEXT
    NOT NULL with the roles' CHECK, REAL NOT NULL, a 0/1 INTEGER). What this sets is what
    ``Message.model_construct`` sets, without its Python loop over the fields (it costs twice
    what validation does); validating the row took a fifth of a read by id. A test holds it
    equal to the validated model, so a pydantic that keeps its instances otherwise fails it."""
    message = _new_message(Message)
    _set(
        message,
        "__dict__",
        {
            "id": row[0],
            "conversation_id": row[1],
            "role": row[2],
            "content": row[3],
            "model": row[4],
            "created_at": row[5],
            "embedded": bool(row[6]),
        },
    )
    _set(message, "__pydantic_fields_set__", set(_MESSAGE_FIELDS))
    _set(message, "__pydantic_extra__", None)
    _set(message, "__pydantic_private__", None)
    return message


class ConversationStore:
    name = "conversations"

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes (called on the writer thread, inside Database.transaction) ------------------

    def create(
        self,
        conn: sqlite3.Connection,
        *,
        conversation_id: str | None = None,
        title: str = "",
        model: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        now = time.time()
        cid = conversation_id or new_conversation_id()
        if conversation_id is not None and self._exists(conn, conversation_id):
            raise Conflict(f"conversation {cid!r} exists", code="conversation_exists")
        conn.execute(
            "INSERT INTO conversations(id, title, model, tags, metadata, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (cid, title, model, json.dumps(list(tags)), json.dumps(metadata or {}), now, now),
        )
        return Conversation(
            id=cid,
            title=title,
            model=model,
            tags=list(tags),
            metadata=metadata or {},
            created_at=now,
            updated_at=now,
        )

    @staticmethod
    def _exists(conn: sqlite3.Connection, conversation_id: str) -> bool:
        row = conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,))
        return row.fetchone() is not None

    def update(
        self,
        conn: sqlite3.Connection,
        conversation_id: str,
        *,
        title: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        sets, args = ["updated_at = ?"], [time.time()]
        if title is not None:
            sets.append("title = ?")
            args.append(title)  # type: ignore[arg-type]
        if tags is not None:
            sets.append("tags = ?")
            args.append(json.dumps(list(tags)))  # type: ignore[arg-type]
        if metadata is not None:
            sets.append("metadata = ?")
            args.append(json.dumps(metadata))  # type: ignore[arg-type]
        cur = conn.execute(
            f"UPDATE conversations SET {', '.join(sets)} WHERE id = ?", (*args, conversation_id)
        )
        if cur.rowcount == 0:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")

    def delete(self, conn: sqlite3.Connection, conversation_id: str) -> int:
        """Delete a conversation and its messages (their vectors are queued for deletion)."""
        count = conn.execute(
            "SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()[0]
        cur = conn.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        if cur.rowcount == 0:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")
        return int(count)

    def append(
        self,
        conn: sqlite3.Connection,
        conversation_id: str,
        messages: Sequence[NewMessage],
        vectors: npt.NDArray[np.float32] | None = None,
        embedding_model: str | None = None,
        *,
        create: bool = False,
    ) -> list[Message]:
        """Append messages (and their vectors, row for row) in the caller's transaction.

        With ``create`` a missing conversation is made (chat names ids the client chose), with
        the first message's model; in the same statement that marks an existing one updated."""
        now = time.time()
        if create:
            conn.execute(
                "INSERT INTO conversations(id, model, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
                (conversation_id, messages[0].model if messages else None, now, now),
            )
        else:
            cur = conn.execute(
                "UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id)
            )
            if cur.rowcount == 0:
                raise NotFound(
                    f"no conversation {conversation_id!r}", code="conversation_not_found"
                )
        if not messages:
            return []
        embedded = vectors is not None and embedding_model is not None
        rows = [
            (
                conversation_id,
                m.role,
                m.content,
                m.model,
                now if m.created_at is None else m.created_at,
            )
            for m in messages
        ]
        conn.executemany(
            "INSERT INTO messages(conversation_id, role, content, model, created_at, embedded)"
            f" VALUES (?, ?, ?, ?, ?, {int(embedded)})",
            rows,
        )
        # One statement for the batch, so the ids come from last_insert_rowid(): AUTOINCREMENT
        # gives each row one more than the largest id yet, and nothing else inserts into
        # messages inside this transaction, so the batch holds last - n + 1 .. last in order.
        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        ids = range(last - len(rows) + 1, last + 1)
        if embedded:
            assert vectors is not None
            assert embedding_model is not None
            labels = [vector_label("message", i) for i in ids]
            outbox.queue_vectors(conn, labels, "message", embedding_model, vectors)
        return [
            Message(
                id=i,
                conversation_id=conversation_id,
                role=row[1],
                content=row[2],
                model=row[3],
                created_at=row[4],
                embedded=embedded,
            )
            for i, row in zip(ids, rows, strict=True)
        ]

    # -- reads (any thread) -----------------------------------------------------------------

    def get(self, conversation_id: str) -> Conversation:
        conn = self.db.reader()
        row = conn.execute(
            "SELECT * FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}", code="conversation_not_found")
        count = conn.execute(
            "SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()[0]
        return _conversation(row, count)

    def recent(
        self, *, limit: int = 50, before: float | None = None, tag: str | None = None
    ) -> list[Conversation]:
        """Most recently updated first; ``before`` pages by ``updated_at``."""
        where: list[str] = []
        args: list[Any] = []
        if before is not None:
            where.append("c.updated_at < ?")
            args.append(before)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(c.tags) WHERE value = ?)")
            args.append(tag)
        sql = (
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n"
            " FROM conversations c"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY c.updated_at DESC LIMIT ?"
        )
        rows = self.db.reader().execute(sql, (*args, limit)).fetchall()
        return [_conversation(r, r["n"]) for r in rows]

    def messages(
        self, conversation_id: str, *, limit: int = 1000, after_id: int = 0, newest: bool = False
    ) -> list[Message]:
        """Messages in order; ``newest`` takes the last ``limit`` (still returned oldest first)."""
        if newest:
            rows = self.db.fetch_all(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND id > ?"
                " ORDER BY id DESC LIMIT ?",
                (conversation_id, after_id, limit),
            )
            rows.reverse()
        else:
            rows = self.db.fetch_all(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? AND id > ?"
                " ORDER BY id LIMIT ?",
                (conversation_id, after_id, limit),
            )
        return [_message(r) for r in rows]

    def message(self, message_id: int) -> Message:
        if type(message_id) is not int:  # it becomes the Message's id as given
            message_id = operator.index(message_id)  # a bool or numpy integer; a str: TypeError
        row = self.db.fetch_one(_MESSAGE_BY_ID, (message_id,))
        if row is None:
            raise NotFound(f"no message {message_id}", code="message_not_found")
        return _message((message_id, *row))

    def messages_by_id(self, ids: Sequence[int]) -> dict[int, Message]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.fetch_all(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id IN ({marks})", tuple(ids)
        )
        return {r[0]: _message(r) for r in rows}

    def keyword_search(
        self,
        query: str,
        *,
        limit: int = 20,
        conversation_id: str | None = None,
        roles: Sequence[str] = (),
        since: float | None = None,
        until: float | None = None,
        tags: Sequence[str] = (),
    ) -> list[tuple[int, float]]:
        """(message id, bm25 score: higher is better), best first."""
        expr = match_expression(query)
        if expr is None:
            return []
        where: list[str] = ["messages_fts MATCH ?"]
        args: list[Any] = [expr]
        where_m, args_m = message_filters(conversation_id, roles, since, until, tags)
        if not where_m:  # FTS5's own rank order, no join: about 1.5x faster
            return ranked(self.db.reader(), "messages_fts", query, limit)
        sql = (
            "SELECT m.id, -bm25(messages_fts) AS score FROM messages_fts"
            " JOIN messages m ON m.id = messages_fts.rowid"
            f" WHERE {' AND '.join(where + where_m)} ORDER BY bm25(messages_fts) LIMIT ?"
        )
        rows = self.db.reader().execute(sql, (*args, *args_m, limit)).fetchall()
        return [(r[0], r[1]) for r in rows]

    def allowed_ids(
        self,
        conversation_id: str | None,
        roles: Sequence[str],
        since: float | None,
        until: float | None,
        tags: Sequence[str],
    ) -> set[int] | None:
        """Ids of the messages a filter admits (None: no filter, every message)."""
        where, args = message_filters(conversation_id, roles, since, until, tags)
        if not where:
            return None
        rows = (
            self.db.reader()
            .execute(f"SELECT m.id FROM messages m WHERE {' AND '.join(where)}", args)
            .fetchall()
        )
        return {r[0] for r in rows}

    def stats(self) -> dict[str, int]:
        conn = self.db.reader()
        return {
            "conversations": conn.execute("SELECT count(*) FROM conversations").fetchone()[0],
            "messages": conn.execute("SELECT count(*) FROM messages").fetchone()[0],
            "vector_outbox": outbox.count(conn),
        }


def message_filters(
    conversation_id: str | None,
    roles: Sequence[str],
    since: float | None,
    until: float | None,
    tags: Sequence[str],
) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    if conversation_id is not None:
        where.append("m.conversation_id = ?")
        args.append(conversation_id)
    if roles:
        where.append(f"m.role IN ({','.join('?' * len(roles))})")
        args.extend(roles)
    if since is not None:
        where.append("m.created_at >= ?")
        args.append(since)
    if until is not None:
        where.append("m.created_at < ?")
        args.append(until)
    if tags:
        where.append(
            "EXISTS (SELECT 1 FROM conversations c, json_each(c.tags) t"
            f" WHERE c.id = m.conversation_id AND t.value IN ({','.join('?' * len(tags))}))"
        )
        args.extend(tags)
    return where, args
