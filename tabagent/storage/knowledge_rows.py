"""Row helpers shared by the knowledge store (:mod:`tabagent.storage.knowledge`) and its graph
half (:mod:`tabagent.storage.graph`): the name rules entities are unique by, the column list,
turning rows into records with their provenance, and the alias bookkeeping of upserts and
merges. Kept apart so the two modules need not import each other.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Sequence

from tabagent.errors import BadRequest, NotFound
from tabagent.storage.records import Entity, Relation

THING = "thing"
_ENTITY_COLUMNS = "id, name, type, aliases, attributes, created_at, updated_at, norm, merged_into"
_LIVE = "merged_into IS NULL"


def normalise(name: str) -> str:
    """The key an entity is unique by: ``"  Rex\\t the  Dog "`` → ``"rex the dog"``."""
    return " ".join(name.split()).lower()


def _clean(name: str) -> str:
    return " ".join(name.split())


def relation_name(relation: str) -> str:
    """Relations are snake case, so "has dog", "Has-Dog" and "has_dog" are one triple."""
    name = re.sub(r"[\s\-]+", "_", relation.strip().lower())
    if not name:
        raise BadRequest("a relation needs a name", param="relation")
    return name


def _compatible(a: str, b: str) -> bool:
    return a == b or THING in (a, b)


def _ids_json(ids: Iterable[int]) -> str:
    """Id lists are passed as one JSON parameter (``IN (SELECT value FROM json_each(?))``), so
    a long list never meets SQLite's limit on bound variables."""
    return json.dumps(sorted(set(ids)))


def _entity(row: sqlite3.Row) -> Entity:
    return Entity(
        id=row["id"],
        name=row["name"],
        type=row["type"],
        aliases=json.loads(row["aliases"]),
        attributes=json.loads(row["attributes"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _entity_row(conn: sqlite3.Connection, entity_id: int) -> sqlite3.Row:
    row: sqlite3.Row | None = conn.execute(
        f"SELECT {_ENTITY_COLUMNS} FROM entities WHERE id = ?", (entity_id,)
    ).fetchone()
    if row is None:
        raise NotFound(f"no entity {entity_id}", code="entity_not_found")
    return row


def _free(conn: sqlite3.Connection, norm: str, type_: str) -> bool:
    """True when no live entity has this (norm, type), so a ``thing`` may be promoted to it."""
    row = conn.execute(
        f"SELECT 1 FROM entities WHERE norm = ? AND type = ? AND {_LIVE}", (norm, type_)
    ).fetchone()
    return row is None


def _provenance(conn: sqlite3.Connection, kind: str, ids: Iterable[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    rows = conn.execute(
        "SELECT item_id, source FROM provenance WHERE kind = ?"
        " AND item_id IN (SELECT value FROM json_each(?)) ORDER BY created_at, source",
        (kind, _ids_json(ids)),
    )
    for item_id, source in rows:
        out.setdefault(item_id, []).append(source)
    return out


def _relations(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[Relation]:
    sources = _provenance(conn, "relation", (r["id"] for r in rows))
    return [
        Relation(
            id=r["id"],
            source_id=r["source_id"],
            relation=r["relation"],
            target_id=r["target_id"],
            weight=r["weight"],
            provenance=sources.get(r["id"], []),
            created_at=r["created_at"],
        )
        for r in rows
    ]


def _merge_aliases(norm: str, known: Sequence[str], more: Iterable[str]) -> list[str]:
    """``known`` plus the new names of ``more``, minus the entity's own name, by key."""
    out: list[str] = []
    seen = {norm}
    for alias in [*known, *more]:
        key = normalise(alias)
        if key and key not in seen:
            seen.add(key)
            out.append(_clean(alias))
    return out


def _set_alias_keys(conn: sqlite3.Connection, entity_id: int, aliases: Sequence[str]) -> None:
    conn.execute("DELETE FROM entity_aliases WHERE entity_id = ?", (entity_id,))
    conn.executemany(
        "INSERT OR IGNORE INTO entity_aliases(alias, entity_id) VALUES (?, ?)",
        [(normalise(a), entity_id) for a in aliases if normalise(a)],
    )
