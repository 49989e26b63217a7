"""An in-memory hnswlib index of one embedding model, searched from many threads at once.

hnswlib lets ``add_items`` and ``knn_query`` run at the same time, but not ``resize_index``,
``mark_deleted``/``unmark_deleted`` or ``save_index`` alongside them (they move or rewrite
memory that a running search walks). So :class:`VectorIndex` holds two locks:

- a readers-writer lock (:class:`RWLock`): searches and plain adds (inserts into free capacity,
  in-place updates) share it; a resize, a delete, reviving a deleted label and swapping in a
  rebuilt graph take it alone;
- a mutex that lets one mutator (add, delete, save) run at a time, which keeps the Python-side
  bookkeeping (live labels, tombstones) in step with hnswlib and keeps a save from seeing half an
  add. A save only reads the graph, so searches go on while it writes.

Labels are int64 (the caller encodes what they point at); hnswlib keys are uint64, so they are
reinterpreted bit for bit at the boundary and negative labels work.

Deleted items stay in the graph as tombstones: hnswlib never returns them, but searches still
walk through them, which keeps the graph connected. (hnswlib's ``replace_deleted`` slot reuse
was measured to leave the odd item unreachable, more so with several insert threads, so it is
not used.) Re-adding a deleted label revives its slot. Once tombstones outnumber half the live
items the index is rebuilt from the live vectors, off to the side while searches go on, and
swapped in.

Snapshots: :meth:`VectorIndex.save` writes the index to a temporary file, fsyncs it and renames
it over the old one, then does the same for a JSON sidecar (``<path>.json``) holding the
parameters, the counts, the deleted labels, the SHA-256 of the index file and the caller's
``extra``. The sidecar goes last: a crash between the two renames leaves a sidecar whose checksum
does not match the index, and :meth:`VectorIndex.load` answers None, so the caller rebuilds from
its durable store. The checksum is checked *before* hnswlib reads the file, because hnswlib trusts
its input and can crash the process on a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import hnswlib  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Space = Literal["cosine", "l2"]
FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]

SNAPSHOT_FORMAT = 1
_U64 = 1 << 64


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers so it cannot starve.

    Not reentrant: a thread holding it must not take it again (a search callback must not search
    the same index).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def check_vectors(vectors: Any, dim: int, space: Space, count: int | None = None) -> FloatArray:
    """``vectors`` as a C-contiguous float32 (n, dim) array, or ValueError.

    Checked before anything is written so a bad batch cannot leave LanceDB and the index apart:
    NaN/inf would poison the graph, and a zero vector has no direction for cosine.
    """
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    if data.ndim == 1:
        data = data.reshape(1, -1)
    if data.ndim != 2 or data.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {data.shape}")
    if count is not None and data.shape[0] != count:
        raise ValueError(f"{count} labels but {data.shape[0]} vectors")
    if not np.isfinite(data).all():
        raise ValueError("vectors contain NaN or infinity")
    if space == "cosine" and data.size and not np.einsum("ij,ij->i", data, data).all():
        raise ValueError("a zero vector has no cosine similarity")
    return data


def _raw(labels: LabelArray) -> npt.NDArray[np.uint64]:
    return labels.view(np.uint64)


def _signed(raw: int) -> int:
    return raw - _U64 if raw >= 1 << 63 else raw


class VectorIndex:
    """hnswlib index of one model with upsert, delete, filtered search and atomic snapshots."""

    def __init__(
        self,
        dim: int,
        space: Space = "cosine",
        *,
        capacity: int = 1024,
        m: int = 16,
        ef_construction: int = 200,
        ef_search: int = 96,
        rebuild_after: int = 1024,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        if space not in ("cosine", "l2"):
            raise ValueError(f"space must be 'cosine' or 'l2', got {space!r}")
        self.dim = dim
        self.space: Space = space
        self.m = m
        self.ef_construction = ef_construction
        self._ef_search = ef_search
        self.rebuild_after = rebuild_after  # tombstones tolerated before a rebuild is considered
        self._hnsw = self._new_hnsw(capacity)
        self._rw = RWLock()
        self._mutate = threading.Lock()
        self._book = threading.Lock()
        self._present: set[int] = set()
        self._tombstones: set[int] = set()  # labels hnswlib holds as deleted

    def _new_hnsw(self, capacity: int) -> Any:
        hnsw = hnswlib.Index(space=self.space, dim=self.dim)
        hnsw.init_index(
            max_elements=max(1, capacity), M=self.m, ef_construction=self.ef_construction
        )
        hnsw.set_ef(self._ef_search)
        return hnsw

    # -- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._present)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, int | np.integer) and int(label) in self._present

    def labels(self) -> LabelArray:
        with self._book:
            return np.fromiter(self._present, dtype=np.int64, count=len(self._present))

    @property
    def capacity(self) -> int:
        return int(self._hnsw.max_elements)

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        with self._rw.write():
            self._hnsw.set_ef(value)
            self._ef_search = value

    def search(
        self, query: Any, k: int, *, allowed: Callable[[int], bool] | None = None
    ) -> list[tuple[int, float]]:
        """Up to ``k`` (label, distance), nearest first: 1 - cos for cosine, squared L2 for l2.

        hnswlib raises when it finds fewer than ``k`` items (a filter matching few, a sparse
        graph after deletes); then the largest ``k`` that succeeds is found by bisection, so the
        caller always gets what exists.
        """
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"expected a query of dimension {self.dim}, got {q.shape[0]}")
        if k <= 0:
            return []
        filt = None if allowed is None else (lambda raw: bool(allowed(_signed(raw))))
        with self._rw.read():
            k = min(k, len(self._present))
            if k == 0:
                return []
            hits = self._knn(q, k, filt)
            if hits is not None:
                return hits
            found: list[tuple[int, float]] = []
            works, fails = 0, k
            while fails - works > 1:
                mid = (works + fails) // 2
                hits = self._knn(q, mid, filt)
                if hits is None:
                    fails = mid
                else:
                    works, found = mid, hits
            return found

    def _knn(
        self, q: FloatArray, k: int, filt: Callable[[int], bool] | None
    ) -> list[tuple[int, float]] | None:
        try:
            raw, dist = self._hnsw.knn_query(q, k=k, num_threads=1, filter=filt)
        except RuntimeError:  # "Cannot return the results in a contiguous 2D array"
            return None
        labels = np.asarray(raw[0], dtype=np.uint64).view(np.int64)
        return list(
            zip(labels.tolist(), np.asarray(dist[0], dtype=np.float64).tolist(), strict=True)
        )

    # -- mutations ----------------------------------------------------------------------------

    def add(self, labels: Any, vectors: Any) -> None:
        """Insert or replace; an existing label's vector is updated in place in the graph."""
        ids = np.asarray(labels, dtype=np.int64).reshape(-1)
        data = check_vectors(vectors, self.dim, self.space, len(ids))
        if not len(ids):
            return
        if len(np.unique(ids)) != len(ids):  # the last occurrence of a label wins
            _, first_from_end = np.unique(ids[::-1], return_index=True)
            keep = np.sort(len(ids) - 1 - first_from_end)
            ids, data = ids[keep], data[keep]
        with self._mutate:
            listed = ids.tolist()
            revive = np.fromiter((x in self._tombstones for x in listed), bool, len(ids))
            fresh = sum(1 for x in listed if x not in self._present) - int(revive.sum())
            grows = self._hnsw.element_count + fresh > self.capacity
            if revive.any() or grows:
                with self._rw.write():
                    self._grow(self._hnsw.element_count + fresh)
                    if revive.any():
                        # Un-deleting flips a flag searches read: do it, and give the label
                        # its new vector, before any search can see it again.
                        for label in ids[revive].tolist():
                            self._hnsw.unmark_deleted(label % _U64)
                        self._hnsw.add_items(data[revive], _raw(ids[revive]))
                        ids, data = ids[~revive], data[~revive]
            if len(ids):  # inserts into free capacity and updates run beside searches
                with self._rw.read():
                    self._hnsw.add_items(data, _raw(ids))
            with self._book:
                self._present.update(listed)
                self._tombstones.difference_update(listed)

    def _grow(self, needed: int) -> None:
        """Double the capacity until ``needed`` fits (write lock held)."""
        capacity = self.capacity
        if needed <= capacity:
            return
        capacity = max(capacity, 64)  # a loaded empty index has a capacity of 0
        while capacity < needed:
            capacity *= 2
        self._hnsw.resize_index(capacity)

    def delete(self, labels: Iterable[int]) -> None:
        """Mark labels deleted; unknown labels are ignored."""
        with self._mutate:
            doomed = {int(x) for x in labels} & self._present
            if not doomed:
                return
            with self._rw.write():
                for label in doomed:
                    self._hnsw.mark_deleted(label % _U64)
            with self._book:
                self._present -= doomed
                self._tombstones |= doomed
            if len(self._tombstones) > max(self.rebuild_after, len(self._present) // 2):
                self._rebuild()

    def _rebuild(self) -> None:
        """Rebuild from the live vectors without the tombstones (mutation lock held).

        The new graph is built while searches go on against the old one, then swapped in.
        """
        started = time.perf_counter()
        live = self.labels()
        with self._rw.read():
            vectors = self._hnsw.get_items(_raw(live), return_type="numpy") if len(live) else None
        hnsw = self._new_hnsw(max(64, len(live) + len(live) // 4))
        if vectors is not None:
            hnsw.add_items(vectors, _raw(live))
        dropped = len(self._tombstones)
        with self._rw.write():
            self._hnsw = hnsw
            with self._book:
                self._tombstones = set()
        log.info(
            "vector index rebuilt: %d live, %d tombstones dropped, %.2fs",
            len(live),
            dropped,
            time.perf_counter() - started,
        )

    # -- snapshots ----------------------------------------------------------------------------

    def save(self, path: Path, extra: dict[str, Any]) -> None:
        """Atomically write the index to ``path`` and its sidecar to ``<path>.json`` (last)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with self._mutate:
            with self._rw.read():  # saving only reads the graph; mutators are held off above
                deleted = sorted(self._tombstones)
                self._hnsw.save_index(str(tmp))
                elements, capacity = int(self._hnsw.element_count), self.capacity
            count = len(self._present)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = tmp.stat().st_size
        os.replace(tmp, path)
        meta = {
            "format": SNAPSHOT_FORMAT,
            "dim": self.dim,
            "space": self.space,
            "count": count,
            "elements": elements,
            "capacity": capacity,
            "params": {"m": self.m, "ef_construction": self.ef_construction,
                       "ef_search": self._ef_search},
            "size": size,
            "sha256": digest,
            "deleted": deleted,
            "extra": extra,
        }  # fmt: skip
        _write_atomic(_sidecar(path), json.dumps(meta).encode())

    @classmethod
    def load(cls, path: Path) -> tuple[VectorIndex, dict[str, Any]] | None:
        """The snapshot at ``path`` and its ``extra``, or None (logged) if unusable."""
        path = Path(path)
        try:
            meta = json.loads(_sidecar(path).read_bytes())
        except FileNotFoundError:
            log.info("no index snapshot at %s", path)
            return None
        except (OSError, ValueError) as exc:
            log.warning("index sidecar %s unreadable (%s): rebuilding", _sidecar(path), exc)
            return None
        try:
            return cls._load(path, meta)
        except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
            log.warning("index snapshot %s unusable (%s): rebuilding", path, exc)
            return None

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> tuple[VectorIndex, dict[str, Any]] | None:
        if meta["format"] != SNAPSHOT_FORMAT:
            raise ValueError(f"snapshot format {meta['format']}, expected {SNAPSHOT_FORMAT}")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ValueError(f"index file is {size} bytes, sidecar says {meta['size']}")
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != meta["sha256"]:
                raise ValueError("index file checksum differs from the sidecar's")
        params = meta["params"]
        index = cls(
            int(meta["dim"]), meta["space"], capacity=1, m=int(params["m"]),
            ef_construction=int(params["ef_construction"]), ef_search=int(params["ef_search"]),
        )  # fmt: skip
        hnsw = hnswlib.Index(space=index.space, dim=index.dim)
        hnsw.load_index(str(path))
        hnsw.set_ef(index.ef_search)
        held = set(np.asarray(hnsw.get_ids_list(), dtype=np.uint64).view(np.int64).tolist())
        deleted = {int(x) for x in meta["deleted"]}
        live = held - deleted
        if len(held) != meta["elements"] or not deleted <= held or len(live) != meta["count"]:
            raise ValueError(
                f"index holds {len(held)} items ({len(live)} live), sidecar says "
                f"{meta['elements']} ({meta['count']} live)"
            )
        index._hnsw, index._present, index._tombstones = hnsw, live, deleted
        extra = meta["extra"]
        if not isinstance(extra, dict):
            raise TypeError("sidecar 'extra' is not an object")
        return index, extra


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
