"""The embeddings database: hnswlib index semantics, snapshots, and LanceDB consistency.

Everything is real: hnswlib indexes in memory, LanceDB tables and snapshots in ``tmp_path``.
Small indexes (a few hundred vectors) are searched exactly by hnswlib at the default ef, so the
expected neighbours come from numpy brute force.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from tabagent.storage.vector_index import Space, VectorIndex
from tabagent.storage.vectors import VectorRow, VectorStore, table_name

DIM = 16
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _brute(space: Space, data: np.ndarray, q: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    if space == "cosine":
        dist = 1 - (data @ q) / (np.linalg.norm(data, axis=1) * np.linalg.norm(q))
    else:
        dist = ((data - q) ** 2).sum(axis=1)
    order = np.argsort(dist)[:k]
    return order.tolist(), dist[order]


def _rows(labels: range | list[int], vectors: np.ndarray, kind: str = "message") -> list[VectorRow]:
    return [VectorRow(label, kind, vectors[i]) for i, label in enumerate(labels)]


# -- VectorIndex ----------------------------------------------------------------------------


@pytest.mark.parametrize("space", ["cosine", "l2"])
def test_search_finds_the_true_nearest_neighbours(space: Space) -> None:
    data = _vectors(300)
    index = VectorIndex(DIM, space, capacity=8)  # grows by doubling along the way
    index.add(np.arange(300), data)
    assert len(index) == 300
    assert index.capacity >= 300
    for qi in (0, 17, 299):
        query = data[qi] + 0.01
        expected, dist = _brute(space, data, query, 5)
        hits = index.search(query, 5)
        assert [label for label, _ in hits] == expected
        np.testing.assert_allclose([d for _, d in hits], dist, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("space", ["cosine", "l2"])
def test_upsert_replaces_the_vector_of_an_existing_label(space: Space) -> None:
    data = _vectors(50)
    index = VectorIndex(DIM, space)
    index.add(np.arange(50), data)
    replacement = _vectors(1, seed=9)[0] * 3
    index.add([7], replacement[None])
    assert len(index) == 50
    assert index.search(replacement, 1)[0][0] == 7
    assert index.search(replacement, 1)[0][1] == pytest.approx(0.0, abs=1e-5)
    assert all(label != 7 or d > 1e-3 for label, d in index.search(data[7], 3))


def test_a_batch_repeating_a_label_keeps_its_last_vector() -> None:
    data = _vectors(3)
    index = VectorIndex(DIM, "l2")
    index.add([5, 6, 5], data)
    assert len(index) == 2
    assert index.search(data[2], 1) == [(5, pytest.approx(0.0))]


@pytest.mark.parametrize("space", ["cosine", "l2"])
def test_deleted_labels_are_never_returned_and_can_come_back(space: Space) -> None:
    data = _vectors(200)
    index = VectorIndex(DIM, space, capacity=200)
    index.add(np.arange(200), data)
    index.delete([*range(0, 200, 2), 10_000])  # an unknown label is ignored
    assert len(index) == 100
    assert 4 not in index
    assert 5 in index
    assert set(index.labels().tolist()) == set(range(1, 200, 2))
    for label, _ in index.search(data[4], 50):
        assert label % 2 == 1
    index.delete([4])  # deleting again changes nothing
    assert len(index) == 100

    index.add([4], data[4][None])  # revives its tombstone
    assert index.search(data[4], 1)[0][0] == 4
    # An update beside new labels: still one slot per label.
    moved = _vectors(1, seed=8)[0]
    index.add([1, 2000], np.stack([moved, data[0]]))
    index.add(np.arange(1000, 1098), _vectors(98, seed=3))
    assert len(index) == 200
    labels = [label for label, _ in index.search(data[1], 500)]
    assert len(labels) == len(set(labels)) == 200
    assert set(labels) == set(index.labels().tolist())
    assert index.search(moved, 1)[0] == (1, pytest.approx(0.0, abs=1e-5))
    assert all(label != 1 for label, _ in index.search(data[1], 3))
    index.delete([4, 1000])  # the revived label still owns its one slot
    assert {4, 1000}.isdisjoint(label for label, _ in index.search(data[4], 500))
    index.add([4, 1000], np.stack([data[4], moved * -1]))
    assert len(index) == 200
    assert index.search(moved * -1, 1)[0][0] == 1000


def test_many_deletes_rebuild_the_index_without_its_tombstones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = _vectors(1000)
    index = VectorIndex(DIM, rebuild_after=850)
    index.add(np.arange(1000), data)
    index.delete(range(0, 800))
    assert index.capacity == 1024  # 800 tombstones: not yet
    with caplog.at_level(logging.INFO, logger="tabagent.storage.vector_index"):
        index.delete(range(800, 900))
    assert "rebuilt" in caplog.text
    assert index.capacity < 200
    assert set(index.labels().tolist()) == set(range(900, 1000))
    assert {label for label, _ in index.search(data[950], 1000)} == set(range(900, 1000))
    assert index.search(data[950], 1)[0][0] == 950
    index.add([5], data[5][None])  # a label deleted before the rebuild is simply new again
    assert index.search(data[5], 1)[0][0] == 5
    assert len(index) == 101


def test_k_beyond_the_count_and_a_filter_matching_one_item() -> None:
    data = _vectors(40)
    index = VectorIndex(DIM)
    index.add(np.arange(40), data)
    assert len(index.search(data[0], 100)) == 40
    assert [label for label, _ in index.search(data[0], 10, allowed=lambda x: x == 33)] == [33]
    three = {3, 30, 39}
    assert {label for label, _ in index.search(data[0], 10, allowed=three.__contains__)} == three
    assert index.search(data[0], 10, allowed=lambda x: False) == []
    assert VectorIndex(DIM).search(data[0], 5) == []


def test_negative_labels_round_trip() -> None:
    data = _vectors(3)
    index = VectorIndex(DIM)
    index.add([-1, -(2**62), 2**62], data)
    assert index.search(data[1], 1)[0][0] == -(2**62)
    assert sorted(index.labels().tolist()) == [-(2**62), -1, 2**62]
    assert index.search(data[0], 3, allowed=lambda x: x < 0)[0][0] == -1


def test_bad_vectors_are_refused() -> None:
    index = VectorIndex(4)
    with pytest.raises(ValueError, match="dimension 4"):
        index.add([1], np.ones((1, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        index.add([1], np.array([[1, np.nan, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="zero vector"):
        index.add([1], np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="dimension 4"):
        index.search(np.ones(3, np.float32), 1)
    assert len(index) == 0


def test_searches_from_many_threads_while_one_thread_adds_and_deletes() -> None:
    total, batch = 5000, 250
    data = _vectors(total, dim=32, seed=1)
    index = VectorIndex(32, capacity=64, m=8, ef_construction=64, ef_search=32)
    index.add(np.arange(batch), data[:batch])
    added: set[int] = set(range(batch))
    deleted: set[int] = set()
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[set[int]] = []

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        found: set[int] = set()
        searches = 0
        try:
            while not done.is_set() or searches < 20:
                query = data[rng.integers(total)]
                allowed = (lambda x: x % 3 == 0) if searches % 2 else None
                hits = index.search(query, 10, allowed=allowed)
                assert len(hits) <= 10
                if allowed is not None:
                    assert all(label % 3 == 0 for label, _ in hits)
                found.update(label for label, _ in hits)
                searches += 1
        except BaseException as exc:
            errors.append(exc)
        seen.append(found)

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for start in range(batch, total, batch):
            labels = np.arange(start, start + batch)
            index.add(labels, data[start : start + batch])  # new slots, resizes, reused slots
            added.update(labels.tolist())
            doomed = list(range(start - batch, start - batch + 50))
            index.delete(doomed)
            deleted.update(doomed)
            index.add(labels[:5], data[start : start + 5] + 0.5)  # in-place updates
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert seen
    assert all(found <= added for found in seen)
    assert len(index) == total - len(deleted)
    assert set(index.labels().tolist()) == added - deleted
    everything = {label for label, _ in index.search(data[0], total)}
    assert everything == added - deleted


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    data = _vectors(300)
    index = VectorIndex(DIM, "l2", m=12, ef_search=50)
    index.add(np.arange(300), data)
    index.delete(range(100, 150))
    path = tmp_path / "idx" / "model.hnsw"
    index.save(path, {"version": 7, "model": "m"})
    assert json.loads((tmp_path / "idx" / "model.hnsw.json").read_text())["count"] == 250
    assert not list(path.parent.glob("*.tmp"))

    loaded = VectorIndex.load(path)
    assert loaded is not None
    copy, extra = loaded
    assert extra == {"version": 7, "model": "m"}
    assert (copy.dim, copy.space, copy.m, copy.ef_search) == (DIM, "l2", 12, 50)
    assert set(copy.labels().tolist()) == set(index.labels().tolist())
    for qi in (0, 120, 299):
        assert copy.search(data[qi], 10) == index.search(data[qi], 10)
    # Its tombstones are known: a deleted label comes back in its slot, new ones reuse slots.
    copy.add([120], data[120][None])
    assert copy.search(data[120], 1)[0][0] == 120
    copy.add(np.arange(1000, 1049), _vectors(49, seed=5))
    assert len(copy) == 300
    assert len({x for x, _ in copy.search(data[0], 400)}) == 300


def _corrupt(kind: str, path: Path) -> None:
    sidecar = path.with_name(path.name + ".json")
    if kind == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif kind == "flipped byte":
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif kind == "no sidecar":
        sidecar.unlink()
    elif kind == "garbage sidecar":
        sidecar.write_text("{not json")
    elif kind == "crash between renames":  # a newer index, the older sidecar
        index = VectorIndex(DIM)
        index.add(np.arange(5), _vectors(5))
        index.save(path.with_name("other.hnsw"), {})
        os.replace(path.with_name("other.hnsw"), path)
    elif kind == "no index":
        path.unlink()


@pytest.mark.parametrize(
    "kind",
    ["truncated", "flipped byte", "no sidecar", "garbage sidecar", "crash between renames",
     "no index"],
)  # fmt: skip
def test_a_damaged_snapshot_is_refused(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    index = VectorIndex(DIM)
    index.add(np.arange(100), _vectors(100))
    path = tmp_path / "model.hnsw"
    index.save(path, {"version": 1})
    assert VectorIndex.load(path) is not None
    _corrupt(kind, path)
    with caplog.at_level(logging.INFO, logger="tabagent.storage.vector_index"):
        assert VectorIndex.load(path) is None
    assert caplog.records  # says why


# -- VectorStore ----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "embeddings"


def _open(root: Path, **kwargs: object) -> VectorStore:
    store = VectorStore(root, **kwargs)  # type: ignore[arg-type]
    store.open()
    return store


def _index_labels(store: VectorStore, model: str) -> set[int]:
    return {label for label, _ in store.search(model, np.ones(DIM, np.float32), 100_000)}


def _lance_labels(store: VectorStore, model: str) -> set[int]:
    return {label for label, _ in store.lance_search(model, np.ones(DIM, np.float32), 100_000)}


def test_upsert_is_idempotent_and_survives_a_reopen(root: Path) -> None:
    data = _vectors(200)
    store = _open(root)
    store.upsert(MODEL, _rows(range(200), data))
    assert store.count(MODEL) == store.count() == 200
    assert store.models() == [MODEL]
    table = store._models[MODEL].table
    version = table.version
    store.upsert(MODEL, _rows(range(200), data))  # a replay writes nothing
    assert store.count(MODEL) == 200
    assert table.version == version
    store.upsert(MODEL, _rows([5], data[6:7]))  # a real change is written
    assert table.version == version + 1
    assert store.search(MODEL, data[6], 2)[0][1] == pytest.approx(1.0, abs=1e-5)
    assert {label for label, _ in store.search(MODEL, data[6], 2)} == {5, 6}

    store.delete(MODEL, [1, 2, 3, 999])
    store.delete(MODEL, [1, 2, 3])  # idempotent, writes nothing
    assert store.count(MODEL) == 197
    assert not store.has(MODEL, 2)
    assert store.has(MODEL, 4)
    assert table.version == version + 2
    before = [store.search(MODEL, data[i], 5) for i in (0, 50, 199)]
    got = store.get(MODEL, [4, 5, 2])
    assert set(got) == {4, 5}
    assert np.array_equal(got[5], data[6])
    store.close()

    again = _open(root)
    assert again.count(MODEL) == 197
    assert again.models() == [MODEL]
    assert [again.search(MODEL, data[i], 5) for i in (0, 50, 199)] == before
    assert _index_labels(again, MODEL) == _lance_labels(again, MODEL)
    again.close()


@pytest.mark.parametrize("space", ["cosine", "l2"])
def test_hnsw_search_agrees_with_lancedb_flat_search(root: Path, space: Space) -> None:
    data = _vectors(300)
    store = _open(root, space=space)
    store.upsert(MODEL, _rows(range(300), data))
    for qi in (3, 150):
        query = data[qi] + 0.05
        ours, theirs = store.search(MODEL, query, 10), store.lance_search(MODEL, query, 10)
        assert [x for x, _ in ours] == [x for x, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], atol=1e-4)
        assert ours[0][1] > ours[-1][1]  # best first
    store.close()


def test_a_crash_after_the_last_snapshot_is_caught_up(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _vectors(400)
    store = _open(root)
    store.upsert(MODEL, _rows(range(300), data))
    store.save_indexes()
    store.upsert(MODEL, _rows(range(300, 400), data[300:]))  # after the snapshot
    store.delete(MODEL, range(0, 40))
    moved = _vectors(1, seed=42)[0]
    store.upsert(MODEL, [VectorRow(100, "message", moved)])  # a vector replaced in place
    del store  # no close(), no save: as if the process died

    with caplog.at_level(logging.INFO, logger="tabagent.storage.vectors"):
        again = _open(root)
    assert "caught up" in caplog.text
    assert again.count(MODEL) == 360
    assert _index_labels(again, MODEL) == set(range(40, 400)) == _lance_labels(again, MODEL)
    assert again.search(MODEL, moved, 1) == [(100, pytest.approx(1.0, abs=1e-5))]
    assert again.search(MODEL, data[350], 1)[0][0] == 350
    again.close()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tabagent.storage.vectors"):
        third = _open(root)  # close() saved a snapshot of the current version: used as is
    assert "matches LanceDB" in caplog.text
    assert "caught up" not in caplog.text
    assert _index_labels(third, MODEL) == set(range(40, 400))
    third.close()


def test_a_killed_process_is_caught_up(root: Path) -> None:
    """A real process that dies with os._exit between writes, never saving its last changes."""
    script = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        from tabagent.storage.vectors import VectorRow, VectorStore
        data = np.random.default_rng(0).standard_normal((300, {DIM})).astype(np.float32)
        rows = [VectorRow(i, "fact", data[i]) for i in range(300)]
        store = VectorStore(sys.argv[1])
        store.open()
        store.upsert("m", rows[:200])
        store.save_indexes()
        store.upsert("m", rows[200:])
        store.delete("m", range(10))
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, timeout=60)
    store = _open(root)
    assert store.count("m") == 290
    assert _index_labels(store, "m") == set(range(10, 300)) == _lance_labels(store, "m")
    store.close()


def test_a_damaged_snapshot_is_rebuilt_from_lancedb(root: Path) -> None:
    data = _vectors(250)
    store = _open(root)
    store.upsert(MODEL, _rows(range(250), data))
    store.close()
    snapshot = root / "index" / f"{table_name(MODEL)}.hnsw"
    with open(snapshot, "r+b") as f:
        f.truncate(snapshot.stat().st_size - 100)
    again = _open(root)
    assert _index_labels(again, MODEL) == set(range(250))
    assert again.search(MODEL, data[77], 1)[0][0] == 77
    again.close()
    assert VectorIndex.load(snapshot) is not None  # closing wrote a good one


def test_another_dimension_for_the_same_model_is_refused(root: Path) -> None:
    store = _open(root)
    store.upsert(MODEL, _rows(range(10), _vectors(10)))
    version = store._models[MODEL].table.version
    with pytest.raises(ValueError, match="16-dimensional"):
        store.upsert(MODEL, _rows(range(10, 12), _vectors(2, dim=8)))
    with pytest.raises(ValueError, match="16-dimensional"):  # one bad row spoils the batch
        store.upsert(
            MODEL,
            [VectorRow(20, "fact", _vectors(1)[0]), VectorRow(21, "fact", _vectors(1, dim=8)[0])],
        )
    assert store.count(MODEL) == 10
    assert store._models[MODEL].table.version == version
    store.close()


def test_models_are_kept_apart(root: Path) -> None:
    small, large = "org/small-model", "org/large model v2"
    a, b = _vectors(30), _vectors(30, dim=24, seed=1)
    store = _open(root)
    store.upsert(small, _rows(range(30), a))
    store.upsert(large, _rows(range(20, 50), b))
    store.delete(small, [25])
    assert store.models() == sorted([small, large])
    assert (store.count(small), store.count(large), store.count()) == (29, 30, 59)
    assert store.search(small, a[3], 1)[0][0] == 3
    assert store.search(large, b[3], 1)[0][0] == 23
    assert store.has(large, 25)
    assert not store.has(small, 25)
    assert store.search("unknown/model", a[0], 5) == []
    store.close()
    again = _open(root)
    assert again.models() == sorted([small, large])
    assert again.count() == 59
    assert again.search(large, b[3], 1)[0][0] == 23
    again.close()


def test_kinds_and_allowed_filter_the_results(root: Path) -> None:
    data = _vectors(90)
    store = _open(root)
    kinds = ["message", "fact", "document"]
    store.upsert(MODEL, [VectorRow(i, kinds[i % 3], data[i]) for i in range(90)])
    facts = store.search(MODEL, data[0], 100, kinds=["fact"])
    assert {label for label, _ in facts} == set(range(1, 90, 3))
    mixed = store.search(MODEL, data[0], 100, kinds={"fact", "document"}, allowed=lambda x: x < 30)
    assert {label for label, _ in mixed} == {x for x in range(30) if x % 3}
    assert store.search(MODEL, data[0], 5, kinds=[]) == []
    # Changing a row's kind moves it between filters.
    store.upsert(MODEL, [VectorRow(0, "fact", data[0])])
    assert store.search(MODEL, data[0], 1, kinds=["fact"])[0][0] == 0
    store.close()


def test_compaction_keeps_the_index_and_snapshot_in_step(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _vectors(60)
    store = _open(root, compact_every=5)
    for i in range(0, 60, 5):  # 12 writes: compacted twice
        store.upsert(MODEL, _rows(range(i, i + 5), data[i : i + 5]))
    store.delete(MODEL, [0])
    store.compact()
    assert store._models[MODEL].version == store._models[MODEL].table.version
    store.close()
    with caplog.at_level(logging.INFO, logger="tabagent.storage.vectors"):
        again = _open(root)
    assert "matches LanceDB" in caplog.text
    assert _index_labels(again, MODEL) == set(range(1, 60)) == _lance_labels(again, MODEL)
    again.close()


def test_store_searches_run_beside_a_writer(root: Path) -> None:
    data = _vectors(2000, seed=4)
    store = _open(root, compact_every=7)
    store.upsert(MODEL, _rows(range(100), data))
    written: set[int] = set(range(100))
    done = threading.Event()
    errors: list[BaseException] = []
    seen: set[int] = set()

    def searcher() -> None:
        rng = np.random.default_rng()
        try:
            while not done.is_set():
                hits = store.search(MODEL, data[rng.integers(2000)], 10, kinds=["message"])
                seen.update(label for label, _ in hits)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for start in range(100, 2000, 100):
            store.upsert(MODEL, _rows(range(start, start + 100), data[start : start + 100]))
            written.update(range(start, start + 100))
            store.delete(MODEL, range(start - 100, start - 90))
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert seen
    assert seen <= written
    assert store.count(MODEL) == 2000 - 190
    store.close()
