"""The graph half of the knowledge store: walking it and folding duplicate entities together.

:class:`GraphMixin` is a base of :class:`~tabagent.storage.knowledge.KnowledgeStore`, which
supplies ``db``. Reads (:meth:`~GraphMixin.traverse`, :meth:`~GraphMixin.neighbourhood`) run on
any thread; :meth:`~GraphMixin.merge` and :meth:`~GraphMixin.consolidate` are writes, called on
the writer thread inside ``Database.transaction`` like the store's other writes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, Literal

from tabagent.errors import BadRequest
from tabagent.storage.knowledge_rows import (
    _ENTITY_COLUMNS,
    _LIVE,
    THING,
    _compatible,
    _entity,
    _entity_row,
    _free,
    _ids_json,
    _merge_aliases,
    _relations,
    _set_alias_keys,
    normalise,
    relation_name,
)
from tabagent.storage.records import Entity, Graph
from tabagent.storage.sqlite import Database

log = logging.getLogger(__name__)

MAX_HOPS = 6
DIRECTIONS = ("out", "in", "both")
Direction = Literal["out", "in", "both"]


class GraphMixin:
    """Traversal and merging over a knowledge database; the store that inherits it sets ``db``."""

    db: Database

    # -- reads (any thread) -----------------------------------------------------------------

    def neighbourhood(
        self, entity_id: int, hops: int = 1, relation: str | None = None, limit: int = 200
    ) -> Graph:
        """What is around an entity, whichever way the relations point."""
        relations = () if relation is None else (relation,)
        return self.traverse(entity_id, hops=hops, relations=relations, limit=limit)

    def traverse(
        self,
        start_id: int,
        hops: int = 2,
        relations: Sequence[str] = (),
        direction: Direction = "both",
        limit: int = 500,
    ) -> Graph:
        """Entities within ``hops`` of the start (nearest first, at most ``limit``), every
        relation among them that passes the filter, and their distances.

        One recursive CTE walks the graph breadth first. It is cycle-safe because its rows are
        (entity, depth) pairs joined by ``UNION`` (a pair is never expanded twice) and depth
        stops at ``hops``, so a cycle ends in at most ``hops`` rounds; an entity's distance
        is the smallest depth it was reached at.
        """
        if not 1 <= hops <= MAX_HOPS:
            raise BadRequest(
                f"hops must be between 1 and {MAX_HOPS}", param="hops", code="hops_out_of_range"
            )
        if direction not in DIRECTIONS:
            raise BadRequest("direction is one of out, in, both", param="direction")
        if limit < 1:
            raise BadRequest("limit must be at least 1", param="limit")
        names = [relation_name(r) for r in relations]
        only = f" AND r.relation IN ({','.join('?' * len(names))})" if names else ""
        steps: list[str] = []
        args: list[Any] = []
        if direction in ("out", "both"):
            steps.append(
                "SELECT r.target_id, w.depth + 1 FROM walk w"
                f" JOIN relations r ON r.source_id = w.id WHERE w.depth < ?{only}"
            )
            args += [hops, *names]
        if direction in ("in", "both"):
            steps.append(
                "SELECT r.source_id, w.depth + 1 FROM walk w"
                f" JOIN relations r ON r.target_id = w.id WHERE w.depth < ?{only}"
            )
            args += [hops, *names]
        walk = (
            "WITH RECURSIVE walk(id, depth) AS (SELECT ?, 0 UNION "
            + " UNION ".join(steps)
            + ") SELECT id, min(depth) AS distance FROM walk GROUP BY id"
            " ORDER BY distance, id LIMIT ?"
        )
        with self.db.snapshot() as conn:
            _entity_row(conn, start_id)
            distances = {
                r[0]: r[1] for r in conn.execute(walk, (start_id, *args, limit)).fetchall()
            }
            reached = _ids_json(distances)
            entity_rows = conn.execute(
                f"SELECT {_ENTITY_COLUMNS} FROM entities"
                " WHERE id IN (SELECT value FROM json_each(?))",
                (reached,),
            ).fetchall()
            relation_rows = conn.execute(
                "SELECT * FROM relations r WHERE r.source_id IN (SELECT value FROM json_each(?))"
                f" AND r.target_id IN (SELECT value FROM json_each(?)){only} ORDER BY r.id",
                (reached, reached, *names),
            ).fetchall()
            entities = sorted(
                (_entity(r) for r in entity_rows), key=lambda e: (distances[e.id], e.id)
            )
            return Graph(
                entities=entities,
                relations=_relations(conn, relation_rows),
                distances=distances,
            )

    # -- merging (called on the writer thread, inside Database.transaction) -----------------

    def merge(self, conn: sqlite3.Connection, duplicate_id: int, into_id: int) -> Entity:
        """Fold ``duplicate_id`` into ``into_id`` and delete it; returns the survivor.

        Relations move (a triple the survivor already has adds its weight and sources; one
        between the two becomes a self-loop and is dropped), and so do fact links, aliases
        (the duplicate's name among them), attributes (the survivor's win), provenance and
        the type when the survivor's was only ``thing``.
        """
        if duplicate_id == into_id:
            raise BadRequest("an entity cannot be merged into itself", param="duplicate_id")
        dup, into = _entity_row(conn, duplicate_id), _entity_row(conn, into_id)
        rows = conn.execute(
            "SELECT id, source_id, relation, target_id, weight FROM relations"
            " WHERE source_id = ? OR target_id = ? ORDER BY id",
            (duplicate_id, duplicate_id),
        ).fetchall()
        for r in rows:
            was_loop = r["source_id"] == r["target_id"]
            src = into_id if r["source_id"] == duplicate_id else r["source_id"]
            dst = into_id if r["target_id"] == duplicate_id else r["target_id"]
            if src == dst and not was_loop:
                conn.execute("DELETE FROM relations WHERE id = ?", (r["id"],))
                continue
            same = conn.execute(
                "SELECT id FROM relations WHERE source_id = ? AND relation = ? AND target_id = ?",
                (src, r["relation"], dst),
            ).fetchone()
            if same is None:
                conn.execute(
                    "UPDATE relations SET source_id = ?, target_id = ? WHERE id = ?",
                    (src, dst, r["id"]),
                )
            else:
                conn.execute(
                    "UPDATE relations SET weight = weight + ? WHERE id = ?",
                    (r["weight"], same["id"]),
                )
                _move_provenance(conn, "relation", r["id"], same["id"])
                conn.execute("DELETE FROM relations WHERE id = ?", (r["id"],))
        conn.execute(
            "INSERT OR IGNORE INTO fact_entities(fact_id, entity_id)"
            " SELECT fact_id, ? FROM fact_entities WHERE entity_id = ?",
            (into_id, duplicate_id),
        )
        _move_provenance(conn, "entity", duplicate_id, into_id)
        conn.execute(
            "UPDATE entities SET merged_into = ? WHERE merged_into = ?", (into_id, duplicate_id)
        )
        conn.execute("DELETE FROM entities WHERE id = ?", (duplicate_id,))

        aliases = _merge_aliases(
            into["norm"], json.loads(into["aliases"]), [dup["name"], *json.loads(dup["aliases"])]
        )
        attrs = {**json.loads(dup["attributes"]), **json.loads(into["attributes"])}
        kept_type = into["type"]
        if kept_type == THING and dup["type"] != THING and _free(conn, into["norm"], dup["type"]):
            kept_type = dup["type"]
        conn.execute(
            "UPDATE entities SET type = ?, aliases = ?, attributes = ?, created_at = ?,"
            " updated_at = ? WHERE id = ?",
            (
                kept_type,
                json.dumps(aliases),
                json.dumps(attrs),
                min(into["created_at"], dup["created_at"]),
                time.time(),
                into_id,
            ),
        )
        _set_alias_keys(conn, into_id, aliases)
        log.info("knowledge: merged entity %d into %d", duplicate_id, into_id)
        return _entity(_entity_row(conn, into_id))

    def consolidate(self, conn: sqlite3.Connection) -> list[tuple[int, int]]:
        """Merge duplicate entities; returns (merged id, surviving id) pairs.

        Duplicates: the same normalised name and type; the same name where one is a bare
        ``thing`` (if the name has a single specific type); or a name that is another's alias
        (same type, or either is ``thing``). A group never joins two specific types (Jordan the
        person and Jordan the country stay two). The oldest entity of a group survives.
        Afterwards every stored key is recomputed in Python, which also repairs keys that the
        version-2 migration derived with SQLite's ASCII-only ``lower``.
        """
        rows = conn.execute(f"SELECT {_ENTITY_COLUMNS} FROM entities ORDER BY id").fetchall()
        groups = _Groups({r["id"]: r["type"] for r in rows})
        by_name: dict[str, list[sqlite3.Row]] = {}
        for r in rows:
            by_name.setdefault(normalise(r["name"]), []).append(r)
            if r["merged_into"] is not None and r["merged_into"] in groups.parent:
                groups.union(r["id"], r["merged_into"])
        for same_name in by_name.values():
            by_type: dict[str, list[int]] = {}
            for r in same_name:
                by_type.setdefault(r["type"], []).append(r["id"])
            for ids in by_type.values():
                for other in ids[1:]:
                    groups.union(ids[0], other)
            specific = [t for t in by_type if t != THING]
            if THING in by_type and len(specific) == 1:
                groups.union(by_type[THING][0], by_type[specific[0]][0])
        for r in rows:
            for alias in json.loads(r["aliases"]):
                for named in by_name.get(normalise(alias), []):
                    if named["id"] != r["id"] and _compatible(r["type"], named["type"]):
                        groups.union(r["id"], named["id"])

        merged: list[tuple[int, int]] = []
        for entity_id in sorted(groups.parent):
            survivor = groups.find(entity_id)
            if survivor != entity_id:
                self.merge(conn, entity_id, survivor)
                merged.append((entity_id, survivor))
        self._rekey(conn)
        if merged:
            log.info("knowledge: consolidated %d duplicate entities", len(merged))
        return merged

    def _rekey(self, conn: sqlite3.Connection) -> None:
        """Make every stored name and alias key what :func:`normalise` says it is."""
        rows = conn.execute(
            f"SELECT id, name, norm, aliases FROM entities WHERE {_LIVE}"
        ).fetchall()
        for r in rows:
            if r["norm"] != normalise(r["name"]):
                conn.execute(
                    "UPDATE entities SET norm = ? WHERE id = ?", (normalise(r["name"]), r["id"])
                )
            stored = {
                a[0]
                for a in conn.execute(
                    "SELECT alias FROM entity_aliases WHERE entity_id = ?", (r["id"],)
                )
            }
            aliases = json.loads(r["aliases"])
            if stored != {normalise(a) for a in aliases if normalise(a)}:
                _set_alias_keys(conn, r["id"], aliases)


def _move_provenance(conn: sqlite3.Connection, kind: str, from_id: int, to_id: int) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO provenance(kind, item_id, source, created_at)"
        " SELECT kind, ?, source, created_at FROM provenance WHERE kind = ? AND item_id = ?",
        (to_id, kind, from_id),
    )


class _Groups:
    """Union-find over entity ids whose groups hold at most one specific type; the smallest
    (oldest) id of a group is its root, the survivor."""

    def __init__(self, types: dict[int, str]) -> None:
        self.parent = {i: i for i in types}
        self.types = {i: {t} - {THING} for i, t in types.items()}

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb or len(self.types[ra] | self.types[rb]) > 1:
            return
        keep, drop = min(ra, rb), max(ra, rb)
        self.parent[drop] = keep
        self.types[keep] |= self.types[drop]
