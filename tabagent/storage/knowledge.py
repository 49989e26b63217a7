"""The ``knowledge`` database: a graph of entities, relations and facts, with provenance.

- **Entities** are unique by normalised name (lower case, trimmed, inner whitespace collapsed)
  and type among the live rows, so "Rex", "rex " and "REX" are one dog. An upsert also finds an
  entity by one of its aliases, and the catch-all type ``thing`` matches any type (a name first
  seen as a capitalised word and later as "my dog" is one entity, promoted to ``dog``). Aliases
  are kept twice: as typed (the JSON column, what is shown) and normalised in
  ``entity_aliases`` (an index, so the alias lookup of every upsert is not a table scan).
- **Relations** are directed triples, stored once; asserting one again adds its weight when
  the evidence is new (a source not yet recorded) and keeps the larger weight otherwise, so
  replaying a message does not inflate it.
- **Facts** are sentences linked to the entities they are about, keyword-searchable (FTS5 with
  porter stemming, like messages) and embedded through the vector outbox in the same
  transaction. The same text about the same entities is stored once.
- **Provenance** says where each entity, relation and fact came from ("message:42",
  "conversation:conv_x", "user"): one row per (item, source), cleaned up by triggers.

Version 1 had entities unique by their exact name; version 2 normalises names. Rows that were
duplicates under the new rule cannot be merged by SQL alone (relations, fact links, aliases and
provenance move), so the migration marks them with ``merged_into`` and :meth:`consolidate`
finishes the merge; until then they are invisible to lists and upserts.

Ids come from AUTOINCREMENT, so a deleted fact's vector label is never reused.

This module holds the schema and :class:`KnowledgeStore`'s writes, reads, keyword search
and stats; graph traversal and merging are :mod:`tabagent.storage.graph` (a base of the
store), and the row helpers both use are :mod:`tabagent.storage.knowledge_rows`.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tabagent.errors import BadRequest, NotFound
from tabagent.storage import outbox
from tabagent.storage.fts import ranked
from tabagent.storage.graph import GraphMixin
from tabagent.storage.knowledge_rows import (
    _ENTITY_COLUMNS,
    _LIVE,
    THING,
    _clean,
    _compatible,
    _entity,
    _entity_row,
    _free,
    _ids_json,
    _merge_aliases,
    _provenance,
    _relations,
    _set_alias_keys,
    normalise,
    relation_name,
)
from tabagent.storage.records import Entity, Fact, Relation, vector_label
from tabagent.storage.sqlite import Database


def _sql_norm(column: str) -> str:
    """SQL for :func:`normalise`, as near as SQLite's ASCII-only ``lower`` gets (used only by
    the migration; :meth:`KnowledgeStore.consolidate` recomputes every key in Python)."""
    expr = column
    for ch in (9, 10, 13):
        expr = f"replace({expr}, char({ch}), ' ')"
    for _ in range(6):  # each pass halves a run of spaces
        expr = f"replace({expr}, '  ', ' ')"
    return f"lower(trim({expr}))"


MIGRATIONS = (
    # 1: entities unique by exact name, relations, facts with their entity links
    """
    CREATE TABLE entities(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        type TEXT NOT NULL DEFAULT 'thing',
        aliases TEXT NOT NULL DEFAULT '[]',
        attributes TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX entities_by_name ON entities(name, type);
    CREATE TABLE relations(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source_id INTEGER NOT NULL REFERENCES entities(id) ON DELETE CASCADE,
        relation TEXT NOT NULL,
        target_id INTEGER NOT NULL REFERENCES entities(id) ON DELETE CASCADE,
        weight REAL NOT NULL DEFAULT 1.0,
        created_at REAL NOT NULL,
        UNIQUE(source_id, relation, target_id)
    );
    CREATE INDEX relations_by_target ON relations(target_id, relation);
    CREATE TABLE facts(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        text TEXT NOT NULL,
        confidence REAL NOT NULL DEFAULT 1.0,
        source TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE fact_entities(
        fact_id INTEGER NOT NULL REFERENCES facts(id) ON DELETE CASCADE,
        entity_id INTEGER NOT NULL REFERENCES entities(id) ON DELETE CASCADE,
        PRIMARY KEY(fact_id, entity_id)
    ) WITHOUT ROWID;
    CREATE INDEX fact_entities_by_entity ON fact_entities(entity_id, fact_id);
    """,
    # 2: normalised names, alias index, provenance, keyword search, the vector outbox
    f"""
    DROP INDEX entities_by_name;
    ALTER TABLE entities ADD COLUMN norm TEXT NOT NULL DEFAULT '';
    ALTER TABLE entities ADD COLUMN merged_into INTEGER;
    UPDATE entities SET norm = {_sql_norm("name")};
    UPDATE entities SET merged_into = (
        SELECT min(d.id) FROM entities d WHERE d.norm = entities.norm AND d.type = entities.type
    );
    UPDATE entities SET merged_into = NULL WHERE merged_into = id;
    CREATE UNIQUE INDEX entities_by_norm ON entities(norm, type) WHERE merged_into IS NULL;
    CREATE INDEX entities_by_update ON entities(updated_at);
    CREATE TABLE entity_aliases(
        alias TEXT NOT NULL,
        entity_id INTEGER NOT NULL REFERENCES entities(id) ON DELETE CASCADE,
        PRIMARY KEY(alias, entity_id)
    ) WITHOUT ROWID;
    CREATE INDEX entity_aliases_by_entity ON entity_aliases(entity_id);
    INSERT OR IGNORE INTO entity_aliases(alias, entity_id)
        SELECT {_sql_norm("a.value")}, e.id FROM entities e, json_each(e.aliases) a
        WHERE trim(a.value) != '';

    CREATE TABLE provenance(
        kind TEXT NOT NULL CHECK (kind IN ('entity', 'relation', 'fact')),
        item_id INTEGER NOT NULL,
        source TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY(kind, item_id, source)
    ) WITHOUT ROWID;
    INSERT OR IGNORE INTO provenance(kind, item_id, source, created_at)
        SELECT 'fact', id, source, created_at FROM facts WHERE source IS NOT NULL;
    ALTER TABLE facts DROP COLUMN source;
    CREATE INDEX facts_by_text ON facts(text);
    CREATE TRIGGER entities_provenance_delete AFTER DELETE ON entities BEGIN
        DELETE FROM provenance WHERE kind = 'entity' AND item_id = old.id;
    END;
    CREATE TRIGGER relations_provenance_delete AFTER DELETE ON relations BEGIN
        DELETE FROM provenance WHERE kind = 'relation' AND item_id = old.id;
    END;
    CREATE TRIGGER facts_provenance_delete AFTER DELETE ON facts BEGIN
        DELETE FROM provenance WHERE kind = 'fact' AND item_id = old.id;
    END;

    CREATE VIRTUAL TABLE facts_fts USING fts5(
        text, content='facts', content_rowid='id',
        tokenize='porter unicode61 remove_diacritics 2'
    );
    INSERT INTO facts_fts(facts_fts) VALUES ('rebuild');
    CREATE TRIGGER facts_fts_insert AFTER INSERT ON facts BEGIN
        INSERT INTO facts_fts(rowid, text) VALUES (new.id, new.text);
    END;
    CREATE TRIGGER facts_fts_delete AFTER DELETE ON facts BEGIN
        INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END;
    CREATE TRIGGER facts_fts_update AFTER UPDATE OF text ON facts BEGIN
        INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO facts_fts(rowid, text) VALUES (new.id, new.text);
    END;
    """
    + outbox.OUTBOX_TABLE
    + outbox.delete_trigger("facts", "fact")
    + outbox.delete_trigger("entities", "entity"),
)


def _type_name(type_: str) -> str:
    return re.sub(r"[\s\-]+", "_", type_.strip().lower()) or THING


def _live_id(conn: sqlite3.Connection, entity_id: int) -> int:
    """The id that stands for ``entity_id``: itself, or the survivor a pending merge names."""
    for _ in range(64):  # merges point at a survivor directly; the bound only guards a loop
        row = _entity_row(conn, entity_id)
        if row["merged_into"] is None:
            return entity_id
        entity_id = row["merged_into"]
    raise NotFound(f"no live entity for {entity_id}", code="entity_not_found")


def _add_provenance(conn: sqlite3.Connection, kind: str, item_id: int, source: str | None) -> bool:
    """Record a source; False when it was already recorded for this item."""
    source = (source or "").strip()
    if not source:
        return False
    cur = conn.execute(
        "INSERT OR IGNORE INTO provenance(kind, item_id, source, created_at) VALUES (?, ?, ?, ?)",
        (kind, item_id, source, time.time()),
    )
    return cur.rowcount > 0


def _facts(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[Fact]:
    ids = _ids_json(r["id"] for r in rows)
    links: dict[int, list[int]] = {}
    for fact_id, entity_id in conn.execute(
        "SELECT fact_id, entity_id FROM fact_entities"
        " WHERE fact_id IN (SELECT value FROM json_each(?)) ORDER BY fact_id, entity_id",
        (ids,),
    ):
        links.setdefault(fact_id, []).append(entity_id)
    sources = _provenance(conn, "fact", (r["id"] for r in rows))
    return [
        Fact(
            id=r["id"],
            text=r["text"],
            entity_ids=links.get(r["id"], []),
            confidence=r["confidence"],
            provenance=sources.get(r["id"], []),
            created_at=r["created_at"],
        )
        for r in rows
    ]


class KnowledgeStore(GraphMixin):
    name = "knowledge"

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes (called on the writer thread, inside Database.transaction) ------------------

    def upsert_entity(
        self,
        conn: sqlite3.Connection,
        name: str,
        *,
        type: str = THING,
        aliases: Sequence[str] = (),
        attributes: dict[str, Any] | None = None,
        provenance: str | None = None,
    ) -> Entity:
        """The entity called ``name`` (or aliased so), created or enriched; never a duplicate."""
        display, norm, type_ = _clean(name), normalise(name), _type_name(type)
        if not norm:
            raise BadRequest("an entity needs a name", param="name")
        now = time.time()
        row = self._match(conn, norm, type_)
        if row is None:
            extra = _merge_aliases(norm, [], aliases)
            entity_id = conn.execute(
                "INSERT INTO entities(name, norm, type, aliases, attributes, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (display, norm, type_, json.dumps(extra), json.dumps(attributes or {}), now, now),
            ).lastrowid
            assert entity_id is not None
            _set_alias_keys(conn, entity_id, extra)
        else:
            entity_id = row["id"]
            known = json.loads(row["aliases"])
            new_names = [display] if norm != row["norm"] else []
            merged = _merge_aliases(row["norm"], known, [*new_names, *aliases])
            attrs = {**json.loads(row["attributes"]), **(attributes or {})}
            kept_type = row["type"]
            if kept_type == THING and type_ != THING and _free(conn, row["norm"], type_):
                kept_type = type_  # promote a bare name once something says what it is
            conn.execute(
                "UPDATE entities SET type = ?, aliases = ?, attributes = ?, updated_at = ?"
                " WHERE id = ?",
                (kept_type, json.dumps(merged), json.dumps(attrs), now, entity_id),
            )
            if merged != known:
                _set_alias_keys(conn, entity_id, merged)
        _add_provenance(conn, "entity", entity_id, provenance)
        return _entity(_entity_row(conn, entity_id))

    def add_relation(
        self,
        conn: sqlite3.Connection,
        source_id: int,
        relation: str,
        target_id: int,
        *,
        weight: float = 1.0,
        provenance: str | None = None,
    ) -> Relation:
        """``source -relation-> target``, stored once; see the module docstring for weights."""
        name = relation_name(relation)
        if weight < 0:
            raise BadRequest("a relation's weight cannot be negative", param="weight")
        source_id, target_id = _live_id(conn, source_id), _live_id(conn, target_id)
        row = conn.execute(
            "SELECT id, weight FROM relations WHERE source_id = ? AND relation = ?"
            " AND target_id = ?",
            (source_id, name, target_id),
        ).fetchone()
        if row is None:
            rel_id = conn.execute(
                "INSERT INTO relations(source_id, relation, target_id, weight, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (source_id, name, target_id, weight, time.time()),
            ).lastrowid
            assert rel_id is not None
            _add_provenance(conn, "relation", rel_id, provenance)
        else:
            rel_id = row["id"]
            new_evidence = _add_provenance(conn, "relation", rel_id, provenance)
            total = row["weight"] + weight if new_evidence else max(row["weight"], weight)
            conn.execute("UPDATE relations SET weight = ? WHERE id = ?", (total, rel_id))
        return self._relation(conn, rel_id)

    def add_fact(
        self,
        conn: sqlite3.Connection,
        text: str,
        *,
        entity_ids: Sequence[int] = (),
        confidence: float = 1.0,
        provenance: str | None = None,
        vector: npt.NDArray[np.float32] | None = None,
        embedding_model: str | None = None,
    ) -> Fact:
        """A fact with its entity links (and vector) in the caller's transaction.

        The same text about the same entities is stored once: the existing fact gains the new
        source and the higher confidence.
        """
        text = text.strip()
        if not text:
            raise BadRequest("a fact needs text", param="text")
        if not 0.0 <= confidence <= 1.0:
            raise BadRequest("confidence is between 0 and 1", param="confidence")
        linked = sorted({_live_id(conn, e) for e in entity_ids})
        fact_id = self._same_fact(conn, text, linked)
        if fact_id is None:
            fact_id = conn.execute(
                "INSERT INTO facts(text, confidence, created_at) VALUES (?, ?, ?)",
                (text, confidence, time.time()),
            ).lastrowid
            assert fact_id is not None
            conn.executemany(
                "INSERT INTO fact_entities(fact_id, entity_id) VALUES (?, ?)",
                [(fact_id, e) for e in linked],
            )
        else:
            conn.execute(
                "UPDATE facts SET confidence = max(confidence, ?) WHERE id = ?",
                (confidence, fact_id),
            )
        _add_provenance(conn, "fact", fact_id, provenance)
        if vector is not None and embedding_model is not None:
            # again for a known fact too: the merge in LanceDB is idempotent, and the vector
            # may be from a newer embedding model than the one stored
            label = vector_label("fact", fact_id)
            outbox.queue_vector(conn, label, "fact", embedding_model, vector)
        row = conn.execute("SELECT * FROM facts WHERE id = ?", (fact_id,)).fetchone()
        return _facts(conn, [row])[0]

    def delete_entity(self, conn: sqlite3.Connection, entity_id: int) -> None:
        """Delete an entity, its relations and fact links (the facts stay; a fact may be about
        several entities). Rows waiting to be merged into it are the same entity and go too."""
        _entity_row(conn, entity_id)
        conn.execute("DELETE FROM entities WHERE merged_into = ?", (entity_id,))
        conn.execute("DELETE FROM entities WHERE id = ?", (entity_id,))

    def delete_fact(self, conn: sqlite3.Connection, fact_id: int) -> None:
        cur = conn.execute("DELETE FROM facts WHERE id = ?", (fact_id,))
        if cur.rowcount == 0:
            raise NotFound(f"no fact {fact_id}", code="fact_not_found")

    # -- reads (any thread) -----------------------------------------------------------------

    def entity(self, entity_id: int) -> Entity:
        return _entity(_entity_row(self.db.reader(), entity_id))

    def find_entity(self, name: str, type: str | None = None) -> Entity | None:
        """The live entity a name (or alias) stands for; with ``type``, as an upsert would."""
        norm = normalise(name)
        if not norm:
            return None
        with self.db.snapshot() as conn:
            if type is not None:
                row = self._match(conn, norm, _type_name(type))
            else:
                row = conn.execute(
                    f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE norm = ? AND {_LIVE}"
                    " ORDER BY id LIMIT 1",
                    (norm,),
                ).fetchone() or self._by_alias(conn, norm, None)
            return None if row is None else _entity(row)

    def entities(
        self, *, limit: int = 100, type: str | None = None, query: str | None = None
    ) -> list[Entity]:
        """Live entities, most recently updated first; ``query`` matches names and aliases."""
        where: list[str] = [_LIVE]
        args: list[Any] = []
        if type is not None:
            where.append("type = ?")
            args.append(_type_name(type))
        if query is not None and normalise(query):
            pattern = "%" + re.sub(r"([\\%_])", r"\\\1", normalise(query)) + "%"
            where.append(
                "(norm LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM entity_aliases a"
                " WHERE a.entity_id = entities.id AND a.alias LIKE ? ESCAPE '\\'))"
            )
            args += [pattern, pattern]
        rows = (
            self.db.reader()
            .execute(
                f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE {' AND '.join(where)}"
                " ORDER BY updated_at DESC, id DESC LIMIT ?",
                (*args, limit),
            )
            .fetchall()
        )
        return [_entity(r) for r in rows]

    def relations_of(self, entity_id: int) -> list[Relation]:
        """Relations from or to an entity, oldest first."""
        with self.db.snapshot() as conn:
            _entity_row(conn, entity_id)
            rows = conn.execute(
                "SELECT * FROM relations WHERE source_id = ? OR target_id = ? ORDER BY id",
                (entity_id, entity_id),
            ).fetchall()
            return _relations(conn, rows)

    def provenance(self, kind: str, item_id: int) -> list[str]:
        """Where an entity, relation or fact came from, oldest source first."""
        return _provenance(self.db.reader(), kind, [item_id]).get(item_id, [])

    def fact(self, fact_id: int) -> Fact:
        with self.db.snapshot() as conn:
            row = conn.execute("SELECT * FROM facts WHERE id = ?", (fact_id,)).fetchone()
            if row is None:
                raise NotFound(f"no fact {fact_id}", code="fact_not_found")
            return _facts(conn, [row])[0]

    def facts(self, *, entity_id: int | None = None, limit: int = 100) -> list[Fact]:
        """Facts, newest first; with ``entity_id``, those linked to that entity."""
        with self.db.snapshot() as conn:
            if entity_id is None:
                rows = conn.execute(
                    "SELECT * FROM facts ORDER BY id DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                _entity_row(conn, entity_id)
                rows = conn.execute(
                    "SELECT f.* FROM fact_entities fe JOIN facts f ON f.id = fe.fact_id"
                    " WHERE fe.entity_id = ? ORDER BY f.id DESC LIMIT ?",
                    (entity_id, limit),
                ).fetchall()
            return _facts(conn, rows)

    def facts_by_id(self, ids: Sequence[int]) -> dict[int, Fact]:
        if not ids:
            return {}
        with self.db.snapshot() as conn:
            rows = conn.execute(
                "SELECT * FROM facts WHERE id IN (SELECT value FROM json_each(?))",
                (_ids_json(ids),),
            ).fetchall()
            return {f.id: f for f in _facts(conn, rows)}

    def keyword_search(self, query: str, limit: int = 20) -> list[tuple[int, float]]:
        """(fact id, -bm25: higher is better), best first."""
        return ranked(self.db.reader(), "facts_fts", query, limit)

    def stats(self) -> dict[str, int]:
        conn = self.db.reader()

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        return {
            "entities": count(f"SELECT count(*) FROM entities WHERE {_LIVE}"),
            "pending_merges": count("SELECT count(*) FROM entities WHERE merged_into IS NOT NULL"),
            "relations": count("SELECT count(*) FROM relations"),
            "facts": count("SELECT count(*) FROM facts"),
            "fact_links": count("SELECT count(*) FROM fact_entities"),
            "provenance": count("SELECT count(*) FROM provenance"),
            "vector_outbox": outbox.count(conn),
        }

    # -- helpers ----------------------------------------------------------------------------

    def _match(self, conn: sqlite3.Connection, norm: str, type_: str) -> sqlite3.Row | None:
        """The live entity an upsert of (norm, type) lands on: same name and type, then the
        same name where one side is ``thing``, then an alias."""
        row: sqlite3.Row | None = conn.execute(
            f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE norm = ? AND type = ? AND {_LIVE}",
            (norm, type_),
        ).fetchone()
        if row is not None:
            return row
        either = "" if type_ == THING else " AND type = 'thing'"
        row = conn.execute(
            f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE norm = ?{either} AND {_LIVE}"
            " ORDER BY id LIMIT 1",
            (norm,),
        ).fetchone()
        return row if row is not None else self._by_alias(conn, norm, type_)

    def _by_alias(
        self, conn: sqlite3.Connection, norm: str, type_: str | None
    ) -> sqlite3.Row | None:
        rows = conn.execute(
            f"SELECT {', '.join('e.' + c for c in _ENTITY_COLUMNS.split(', '))}"
            " FROM entity_aliases a JOIN entities e ON e.id = a.entity_id"
            f" WHERE a.alias = ? AND e.{_LIVE} ORDER BY (e.type = ?) DESC, e.id",
            (norm, type_),
        ).fetchall()
        for row in rows:
            if type_ is None or _compatible(row["type"], type_):
                return row  # type: ignore[no-any-return]
        return None

    def _relation(self, conn: sqlite3.Connection, rel_id: int) -> Relation:
        row = conn.execute("SELECT * FROM relations WHERE id = ?", (rel_id,)).fetchone()
        return _relations(conn, [row])[0]

    def _same_fact(self, conn: sqlite3.Connection, text: str, linked: list[int]) -> int | None:
        for (fact_id,) in conn.execute("SELECT id FROM facts WHERE text = ?", (text,)).fetchall():
            links = [
                r[0]
                for r in conn.execute(
                    "SELECT entity_id FROM fact_entities WHERE fact_id = ? ORDER BY entity_id",
                    (fact_id,),
                )
            ]
            if links == linked:
                return int(fact_id)
        return None
