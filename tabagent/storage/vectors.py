"""The ``embeddings`` database: vectors persisted in LanceDB, served from hnswlib indexes.

One LanceDB table per embedding model (``<root>/lance``), columns ``label`` int64 (unique per
model; the caller encodes what it points at), ``kind`` string, ``vector``
fixed_size_list<float32>[dim] and ``created_at`` float64. Model names are arbitrary
("sentence-transformers/all-MiniLM-L6-v2"), so a table is named by a slug plus a short SHA-1 and
the real name lives in the schema metadata.

LanceDB is the durable truth; each model's :class:`~tabagent.storage.vector_index.VectorIndex`
is a cache of it, snapshotted to ``<root>/index/<table>.hnsw`` by :meth:`VectorStore.save_indexes`
with the LanceDB table version it reflects. :meth:`VectorStore.open` makes the index equal to the
table however the last process ended:

- snapshot version == table version (and the same count): used as is;
- otherwise the snapshot (or an empty index) catches up: the label column is read (columnar,
  cheap), labels missing from the index are added, labels gone from LanceDB are deleted, and rows
  written after the snapshot (``created_at`` newer than the newest write it reflects) are
  re-added, which covers vectors replaced in place;
- a snapshot newer than the table (the table was restored from an older backup) is discarded.

``created_at`` is when the row's current vector was written: an upsert that changes nothing
(an outbox replay) writes nothing and keeps it, one that changes a row stamps it anew. Stamps
are strictly increasing per table, so "written after the snapshot" is exact even if the wall
clock steps back.

Each LanceDB write makes a version (a merge_insert costs milliseconds whatever its size), so
callers batch; every ``compact_every`` writes the table is compacted and versions older than a
few minutes are removed, so thousands of small versions do not pile up.

Threads: any number may :meth:`~VectorStore.search` while one writes; writers (upsert, delete,
save_indexes, compact) are serialised by a lock. Every call blocks: run them off the event loop.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tabagent.storage.vector_index import (
    FloatArray,
    LabelArray,
    Space,
    VectorIndex,
    check_vectors,
)

if TYPE_CHECKING:  # LanceDB and pyarrow take about two seconds to import: only when opened
    from lancedb.db import DBConnection
    from lancedb.table import Table

__all__ = ["VectorIndex", "VectorRow", "VectorStore", "table_name"]

log = logging.getLogger(__name__)

MODEL_KEY = b"tabagent.model"
_IN_CHUNK = 2000  # labels per "label IN (...)" filter
_KEEP_VERSIONS = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class VectorRow:
    label: int
    kind: str
    vector: FloatArray


def table_name(model: str) -> str:
    """A LanceDB-safe, collision-free table name for a model name."""
    slug = re.sub(r"[^a-z0-9]+", "_", model.lower()).strip("_")[:48] or "model"
    return f"{slug}_{hashlib.sha1(model.encode()).hexdigest()[:10]}"


@dataclass
class _Model:
    name: str
    table: Table
    index: VectorIndex
    kinds: dict[int, str]  # label -> kind of every row in the table
    version: int  # the LanceDB table version the index reflects
    written_at: float  # newest created_at written to the table
    dirty: bool  # the index changed since its last snapshot
    writes: int = 0  # writes since the last compaction

    @property
    def dim(self) -> int:
        return self.index.dim


class VectorStore:
    def __init__(
        self,
        root: Path,
        *,
        space: Space = "cosine",
        compact_every: int = 200,
        ef_search: int = 96,
    ) -> None:
        self.root = Path(root)
        self.space: Space = space
        self.compact_every = compact_every
        self.ef_search = ef_search
        self._db: DBConnection | None = None
        self._models: dict[str, _Model] = {}
        self._write = threading.RLock()

    # -- lifecycle ----------------------------------------------------------------------------

    def table_dir(self) -> Path:
        return self.root / "lance"

    def _index_path(self, table: str) -> Path:
        return self.root / "index" / f"{table}.hnsw"

    def open(self) -> None:
        """Connect LanceDB and bring every model's index in step with its table."""
        with self._write:
            if self._db is not None:
                raise RuntimeError("VectorStore is already open")
            self.table_dir().mkdir(parents=True, exist_ok=True)
            (self.root / "index").mkdir(parents=True, exist_ok=True)
            import lancedb  # see the TYPE_CHECKING import above

            db = lancedb.connect(self.table_dir())
            models = {}
            for name in _table_names(db):
                table = db.open_table(name)
                if MODEL_KEY not in (table.schema.metadata or {}):
                    log.warning("embeddings: ignoring table %s, which TabAgent did not make", name)
                    continue
                entry = self._load(name, table)
                models[entry.name] = entry
            self._db, self._models = db, models

    def close(self) -> None:
        """Snapshot changed indexes and let go of LanceDB."""
        with self._write:
            if self._db is None:
                return
            self.save_indexes()
            self._models = {}
            self._db = None

    def _load(self, name: str, table: Table) -> _Model:
        started = time.perf_counter()
        schema = table.schema
        model = schema.metadata[MODEL_KEY].decode()
        dim = int(schema.field("vector").type.list_size)
        cols = table.search().select(["label", "kind", "created_at"]).limit(None).to_arrow()
        labels: LabelArray = cols.column("label").to_numpy().astype(np.int64, copy=False)
        stamps = cols.column("created_at").to_numpy(zero_copy_only=False)
        kinds = dict(zip(labels.tolist(), cols.column("kind").to_pylist(), strict=True))
        version = int(table.version)
        written_at = float(np.nanmax(stamps)) if len(stamps) else 0.0
        entry = _Model(model, table, self._new_index(dim), kinds, version, written_at, dirty=True)

        snapshot = VectorIndex.load(self._index_path(name))
        since: float | None = None  # re-add rows written after this; None: no usable snapshot
        if snapshot is not None:
            index, extra = snapshot
            snap_version, snap_written = extra.get("version"), extra.get("written_at")
            if index.dim != dim or index.space != self.space:
                log.warning(
                    "index snapshot of %s is %d-d %s: rebuilding", model, index.dim, index.space
                )
            elif not isinstance(snap_version, int) or not isinstance(snap_written, float | int):
                log.warning("index snapshot of %s records no table version: rebuilding", model)
            elif snap_version > version:
                log.warning(
                    "index snapshot of %s is newer (v%d) than its table (v%d): rebuilding",
                    model,
                    snap_version,
                    version,
                )
            else:
                index.ef_search = self.ef_search
                entry.index = index
                if snap_version == version and len(index) == len(labels):
                    entry.dirty = False
                    log.info(
                        "embeddings %s: index snapshot matches LanceDB v%d (%d vectors)",
                        model,
                        version,
                        len(labels),
                    )
                    return entry
                since = float(snap_written)

        in_index = entry.index.labels()
        stale = np.setdiff1d(in_index, labels, assume_unique=True)
        wanted = np.setdiff1d(labels, in_index, assume_unique=True)
        if since is not None:
            wanted = np.union1d(wanted, labels[stamps > since])
        entry.index.delete(stale.tolist())
        for chunk_labels, chunk_vectors in _read_vectors(table, wanted, len(labels)):
            entry.index.add(chunk_labels, chunk_vectors)
        log.info(
            "embeddings %s: index caught up with LanceDB v%d: +%d (re)added, -%d removed, "
            "%d vectors, %.2fs",
            model,
            version,
            len(wanted),
            len(stale),
            len(entry.index),
            time.perf_counter() - started,
        )
        return entry

    def _new_index(self, dim: int) -> VectorIndex:
        return VectorIndex(dim, self.space, ef_search=self.ef_search)

    def _require_db(self) -> DBConnection:
        if self._db is None:
            raise RuntimeError("VectorStore is not open")
        return self._db

    # -- writes -------------------------------------------------------------------------------

    def upsert(self, model: str, rows: Sequence[VectorRow]) -> None:
        """Insert or replace rows (one LanceDB merge_insert), then update the index.

        Rows identical to what is stored are skipped, so replaying a batch writes nothing.
        """
        if not rows:
            return
        with self._write:
            db = self._require_db()
            entry = self._models.get(model)
            dim = np.asarray(rows[0].vector).size if entry is None else entry.dim
            if not dim:
                raise ValueError("an embedding vector cannot be empty")
            for row in rows:
                if np.asarray(row.vector).size != dim:
                    raise ValueError(
                        f"embedding model {model!r} {'stores' if entry else 'starts with'} "
                        f"{dim}-dimensional vectors; "
                        f"row {row.label} has {np.asarray(row.vector).size}"
                    )
                if not isinstance(row.kind, str) or not row.kind:
                    raise ValueError(f"row {row.label}: kind must be a non-empty string")
            labels = np.fromiter((row.label for row in rows), dtype=np.int64, count=len(rows))
            vectors = check_vectors([np.ravel(row.vector) for row in rows], dim, self.space)
            kinds = [row.kind for row in rows]
            _, last = np.unique(labels[::-1], return_index=True)  # the last row of a label wins
            keep = np.sort(len(labels) - 1 - last)
            if entry is None:
                entry = self._create(db, model, dim)
            keep = keep[self._changed(entry, labels[keep], [kinds[i] for i in keep], vectors[keep])]
            if not len(keep):
                return
            labels, vectors, kinds = labels[keep], vectors[keep], [kinds[i] for i in keep]
            stamp = max(time.time(), np.nextafter(entry.written_at, np.inf))
            import pyarrow as pa  # type: ignore[import-untyped]

            data = pa.table(
                {
                    "label": pa.array(labels, pa.int64()),
                    "kind": pa.array(kinds, pa.string()),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                    "created_at": pa.array(np.full(len(labels), stamp), pa.float64()),
                },
                schema=entry.table.schema,
            )
            (
                entry.table.merge_insert("label")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(data)
            )
            entry.version, entry.written_at = int(entry.table.version), float(stamp)
            entry.kinds.update(zip(labels.tolist(), kinds, strict=True))
            entry.index.add(labels, vectors)
            self._wrote(entry)

    def _create(self, db: DBConnection, model: str, dim: int) -> _Model:
        import pyarrow as pa

        name = table_name(model)
        schema = pa.schema(
            [
                pa.field("label", pa.int64(), nullable=False),
                pa.field("kind", pa.string(), nullable=False),
                pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
                pa.field("created_at", pa.float64(), nullable=False),
            ],
            metadata={MODEL_KEY: model.encode()},
        )
        table = db.create_table(name, schema=schema)
        log.info("embeddings: new table %s for %s (%d-d)", name, model, dim)
        entry = _Model(model, table, self._new_index(dim), {}, int(table.version), 0.0, True)
        self._models[model] = entry
        return entry

    def _changed(
        self, entry: _Model, labels: LabelArray, kinds: list[str], vectors: FloatArray
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Which rows differ from the stored ones (new labels always do)."""
        changed = np.fromiter((x not in entry.kinds for x in labels.tolist()), bool, len(labels))
        if changed.all():
            return changed
        stored = dict(_fetch(entry.table, labels[~changed]))
        for i, label in enumerate(labels.tolist()):
            if not changed[i]:
                old = stored.get(label)
                changed[i] = (
                    old is None
                    or entry.kinds.get(label) != kinds[i]
                    or not np.array_equal(old, vectors[i])
                )
        return changed

    def delete(self, model: str, labels: Iterable[int]) -> None:
        """Delete rows; labels not stored are ignored (and deleting none writes nothing)."""
        with self._write:
            self._require_db()
            entry = self._models.get(model)
            if entry is None:
                return
            doomed = sorted({int(x) for x in labels if int(x) in entry.kinds})
            if not doomed:
                return
            for start in range(0, len(doomed), _IN_CHUNK):
                entry.table.delete(_label_filter(doomed[start : start + _IN_CHUNK]))
            entry.version = int(entry.table.version)
            entry.index.delete(doomed)
            for label in doomed:
                del entry.kinds[label]
            self._wrote(entry)

    def _wrote(self, entry: _Model) -> None:
        entry.dirty = True
        entry.writes += 1
        if entry.writes >= self.compact_every:
            self._compact(entry)

    def compact(self) -> None:
        """Compact every table now and drop versions older than a few minutes."""
        with self._write:
            self._require_db()
            for entry in self._models.values():
                self._compact(entry)

    def _compact(self, entry: _Model) -> None:
        started = time.perf_counter()
        entry.table.optimize(cleanup_older_than=_KEEP_VERSIONS)
        entry.writes = 0
        version = int(entry.table.version)
        if version != entry.version:  # same rows, new version: the index reflects it too
            entry.version, entry.dirty = version, True
        log.debug("embeddings %s: compacted in %.2fs", entry.name, time.perf_counter() - started)

    def save_indexes(self) -> None:
        """Snapshot every index changed since its last save, with the table version it reflects.

        A failed save is logged and retried next time: snapshots are a cache, LanceDB holds
        the data.
        """
        with self._write:
            for entry in list(self._models.values()):
                if not entry.dirty:
                    continue
                started = time.perf_counter()
                extra = {
                    "model": entry.name,
                    "version": entry.version,
                    "written_at": entry.written_at,
                }
                try:
                    entry.index.save(self._index_path(table_name(entry.name)), extra)
                except OSError:
                    log.exception("could not save the index of %s", entry.name)
                    continue
                entry.dirty = False
                log.debug(
                    "embeddings %s: index saved (%d vectors, v%d) in %.2fs",
                    entry.name,
                    len(entry.index),
                    entry.version,
                    time.perf_counter() - started,
                )

    # -- reads --------------------------------------------------------------------------------

    def search(
        self,
        model: str,
        query: Any,
        k: int,
        *,
        kinds: Collection[str] | None = None,
        allowed: Callable[[int], bool] | None = None,
    ) -> list[tuple[int, float]]:
        """(label, similarity) best first: 1 - cosine distance, or -squared L2 for ``l2``."""
        entry = self._models.get(model)
        if entry is None or k <= 0:
            return []
        accept = allowed
        if kinds is not None:
            wanted, kind_of = frozenset(kinds), entry.kinds
            if not wanted:
                return []
            if allowed is None:
                accept = lambda label: kind_of.get(label) in wanted  # noqa: E731
            else:
                accept = lambda label: kind_of.get(label) in wanted and allowed(label)  # noqa: E731
        return self._similarities(entry.index.search(query, k, allowed=accept))

    def lance_search(self, model: str, query: Any, k: int) -> list[tuple[int, float]]:
        """LanceDB's own exact (flat) search, same output as :meth:`search`: for cross-checks."""
        entry = self._models.get(model)
        if entry is None or k <= 0:
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if q.size != entry.dim:
            raise ValueError(f"expected a query of dimension {entry.dim}, got {q.size}")
        from lancedb.query import LanceVectorQueryBuilder

        builder = entry.table.search(q)
        assert isinstance(builder, LanceVectorQueryBuilder)  # a vector query builds one
        result = (
            builder.distance_type(self.space).limit(k).select(["label", "_distance"]).to_arrow()
        )
        hits = zip(
            result.column("label").to_pylist(), result.column("_distance").to_pylist(), strict=True
        )
        return self._similarities(list(hits))

    def _similarities(self, hits: list[tuple[int, float]]) -> list[tuple[int, float]]:
        if self.space == "cosine":
            return [(label, 1.0 - dist) for label, dist in hits]
        return [(label, -dist) for label, dist in hits]

    def get(self, model: str, labels: Sequence[int]) -> dict[int, FloatArray]:
        """Stored vectors (as written, not normalised) of the labels that exist."""
        entry = self._models.get(model)
        if entry is None:
            return {}
        present = np.asarray([x for x in labels if x in entry.kinds], dtype=np.int64)
        return dict(_fetch(entry.table, present))

    def has(self, model: str, label: int) -> bool:
        entry = self._models.get(model)
        return entry is not None and label in entry.kinds

    def count(self, model: str | None = None) -> int:
        if model is not None:
            entry = self._models.get(model)
            return 0 if entry is None else len(entry.kinds)
        return sum(len(entry.kinds) for entry in list(self._models.values()))

    def models(self) -> list[str]:
        return sorted(self._models)

    def labels(self, model: str) -> LabelArray:
        """Live labels of the model's in-memory index."""
        entry = self._models.get(model)
        return np.empty(0, dtype=np.int64) if entry is None else entry.index.labels()

    def stored_labels(self, model: str) -> LabelArray:
        """Labels in the model's LanceDB table, read from disk (for consistency checks)."""
        entry = self._models.get(model)
        if entry is None:
            return np.empty(0, dtype=np.int64)
        cols = entry.table.search().select(["label"]).limit(None).to_arrow()
        return np.asarray(cols.column("label").to_numpy(), dtype=np.int64)


def _table_names(db: DBConnection) -> list[str]:
    names: list[str] = []
    token: str | None = None
    while True:
        page = db.list_tables(page_token=token)
        names.extend(page.tables)
        if not page.page_token or page.page_token == token:
            return names
        token = page.page_token


def _label_filter(labels: Sequence[int]) -> str:
    return f"label IN ({', '.join(str(int(x)) for x in labels)})"


def _vectors_of(table: Any) -> FloatArray:
    """The vector column of an Arrow table as a (n, dim) float32 array."""
    column = table.column("vector")
    dim = column.type.list_size
    if not column.num_chunks:
        return np.empty((0, dim), dtype=np.float32)
    flat = np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks])
    vectors: FloatArray = flat.astype(np.float32, copy=False).reshape(-1, dim)
    return vectors


def _fetch(table: Table, labels: LabelArray) -> Iterable[tuple[int, FloatArray]]:
    """(label, vector) of the given labels that the table holds."""
    for start in range(0, len(labels), _IN_CHUNK):
        chunk = labels[start : start + _IN_CHUNK].tolist()
        found = (
            table.search().where(_label_filter(chunk)).select(["label", "vector"]).limit(None)
        ).to_arrow()
        yield from zip(found.column("label").to_pylist(), _vectors_of(found), strict=True)


def _read_vectors(
    table: Table, labels: LabelArray, total: int
) -> Iterable[tuple[LabelArray, FloatArray]]:
    """Vectors of ``labels`` in batches: by filter when few, by one full scan when many."""
    if not len(labels):
        return
    if len(labels) <= 4 * _IN_CHUNK and len(labels) * 8 < total:
        pairs = list(_fetch(table, labels))
        yield np.asarray([p[0] for p in pairs], dtype=np.int64), np.stack([p[1] for p in pairs])
        return
    scan = table.search().select(["label", "vector"]).limit(None).to_arrow()
    all_labels = scan.column("label").to_numpy().astype(np.int64, copy=False)
    mask = np.isin(all_labels, labels, assume_unique=True)
    yield all_labels[mask], _vectors_of(scan)[mask]
