"""The SQLite layer of memory: migrations, the writer's group commit, the relational stores.

Real SQLite files in tmp_path; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tabagent.errors import NotFound, SchemaTooNew, StorageError
from tabagent.storage import outbox
from tabagent.storage.conversations import MIGRATIONS, ConversationStore
from tabagent.storage.fts import match_expression
from tabagent.storage.history import (
    EXPERIENCE_MIGRATIONS,
    SUMMARIES_MIGRATIONS,
    TOOL_RESULTS_MIGRATIONS,
    ExperienceStore,
    SummaryStore,
    ToolResultStore,
)
from tabagent.storage.keywords import KeywordIndex
from tabagent.storage.meta import MIGRATIONS as META_MIGRATIONS
from tabagent.storage.meta import MetaStore
from tabagent.storage.records import Message, NewMessage, label_parts, vector_label
from tabagent.storage.sqlite import Database
from tabagent.storage.writer import Writer


def open_db(path: Path, migrations: tuple[str, ...] = MIGRATIONS) -> Database:
    db = Database(path, migrations)
    db.open()
    return db


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = open_db(tmp_path / "conversations.db")
    yield database
    database.close()


@pytest.fixture
def store(db: Database) -> ConversationStore:
    return ConversationStore(db)


@contextlib.contextmanager
def keyword_index(db: Database) -> Iterator[KeywordIndex]:
    """The keyword index of ``db`` with a running writer (it prunes through it)."""
    writer = Writer()
    writer.start()
    index = KeywordIndex(db, writer)
    try:
        index.open()
        index.flush()  # what its thread does first: catch up, or rebuild
        yield index
    finally:
        index.stop()
        writer.close()


@pytest.fixture
def keywords(db: Database) -> Iterator[KeywordIndex]:
    with keyword_index(db) as index:
        yield index


def user(text: str) -> NewMessage:
    return NewMessage(role="user", content=text)


# ---- Database: pragmas and migrations ---------------------------------------------------


def test_a_new_database_is_in_wal_mode_with_foreign_keys_and_the_latest_schema(
    db: Database,
) -> None:
    conn = db.writer
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages", "keyword_outbox", "vector_outbox"} <= tables
    assert "messages_fts" not in tables  # the keyword index has its own file


@pytest.mark.parametrize("since", [1, 2], ids=["before keyword search", "index in the database"])
def test_migrating_from_a_previous_schema_keeps_data_and_indexes_it(
    tmp_path: Path, since: int
) -> None:
    path = tmp_path / "conversations.db"
    old = open_db(path, MIGRATIONS[:since])
    with old.transaction() as conn:
        conn.execute(
            "INSERT INTO conversations(id, title, created_at, updated_at) VALUES ('c1', 't', 1, 1)"
        )
        conn.execute(
            "INSERT INTO messages(conversation_id, role, content, created_at)"
            " VALUES ('c1', 'user', 'my dogs are called Rex and Fido', 1)"
        )
    old.close()

    new = open_db(path)
    store = ConversationStore(new)
    assert new.writer.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conv = store.get("c1")
    assert conv.tags == []
    assert conv.message_count == 1
    with keyword_index(new) as index:  # built over rows that predate it
        assert index.rebuilds == 1
        assert index.indexed == 0
        assert index.applied == 0
        assert [mid for mid, _ in store.keyword_search("dog")] == [1]
    new.close()


def test_a_database_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer"):
        Database(path, MIGRATIONS).open()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 99


def test_a_failing_migration_leaves_the_previous_version_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    open_db(path, ("CREATE TABLE a(x);",)).close()
    broken = ("CREATE TABLE a(x);", "CREATE TABLE b(y); INSERT INTO nowhere VALUES (1);")
    with pytest.raises(StorageError, match="migration to version 2 failed"):
        Database(path, broken).open()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"a"}  # b was rolled back with the failed step


# ---- the writer ---------------------------------------------------------------------------


def test_concurrent_writes_are_grouped_into_few_commits_and_all_acknowledged(
    db: Database, store: ConversationStore
) -> None:
    writer = Writer()
    writer.start()
    writer.run(db, lambda conn: store.create(conn, conversation_id="c"))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(writer.run, db, lambda conn, i=i: store.append(conn, "c", [user(f"m{i}")]))
            for i in range(400)
        ]
        ids = [f.result()[0].id for f in futures]
    writer.close()
    assert len(set(ids)) == 400
    assert store.get("c").message_count == 400
    assert writer.writes == 401
    assert writer.rounds < 401  # some rounds committed several writes at once


def test_one_failing_write_in_a_round_is_undone_alone(
    db: Database, store: ConversationStore
) -> None:
    writer = Writer()
    gate = threading.Event()
    writer.start()
    writer.run(db, lambda conn: store.create(conn, conversation_id="c"))
    # hold the writer so the next three land in one round
    blocker = writer.submit(db, lambda conn: gate.wait(5))
    ok1 = writer.submit(db, lambda conn: store.append(conn, "c", [user("first")]))
    bad = writer.submit(db, lambda conn: store.append(conn, "missing", [user("lost")]))
    ok2 = writer.submit(db, lambda conn: store.append(conn, "c", [user("second")]))
    gate.set()
    assert blocker.result() is True
    assert ok1.result()[0].content == "first"
    assert ok2.result()[0].content == "second"
    with pytest.raises(NotFound, match="missing"):
        bad.result()
    writer.close()
    assert [m.content for m in store.messages("c")] == ["first", "second"]
    with pytest.raises(StorageError, match="closed"):
        writer.submit(db, lambda conn: None)


def test_writes_fail_clearly_when_their_transaction_cannot_begin(
    db: Database, store: ConversationStore
) -> None:
    """Another process holds the database's write lock past the busy timeout: BEGIN fails, and
    every write of the round gets that error (none is left waiting forever); once the lock is
    gone, writes go through again."""
    writer = Writer()
    writer.start()
    writer.run(db, lambda conn: store.create(conn, conversation_id="c"))
    db.writer.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        first = writer.submit(db, lambda conn: store.append(conn, "c", [user("one")]))
        second = writer.submit(db, lambda conn: store.append(conn, "c", [user("two")]))
        for future in (first, second):
            with pytest.raises(StorageError, match="not committed: database is locked"):
                future.result(timeout=10)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert writer.run(db, lambda conn: store.append(conn, "c", [user("after")]))[0].id
    writer.close()
    assert [m.content for m in store.messages("c")] == ["after"]


async def test_tasks_get_their_own_outcome_of_a_shared_round_and_a_cancelled_write_never_runs(
    db: Database, store: ConversationStore
) -> None:
    """submit_async: a round's outcomes reach the loop together, each task its own; a task
    cancelled before its round began leaves no trace; BEGIN failing fails every waiter."""
    writer = Writer()
    gate = threading.Event()
    writer.start()
    await writer.submit_async(db, lambda conn: store.create(conn, conversation_id="c"))
    began = threading.Event()
    blocker = writer.submit_async(db, lambda conn: began.set() or gate.wait(5))
    assert began.wait(5)  # the writer is held: the next ones share a round
    texts = [f"m{i}" for i in range(50)]
    oks = [
        asyncio.ensure_future(
            writer.submit_async(db, lambda c, t=t: store.append(c, "c", [user(t)]))
        )
        for t in texts
    ]
    bad = writer.submit_async(db, lambda conn: store.append(conn, "missing", [user("lost")]))
    gone = writer.submit_async(db, lambda conn: store.append(conn, "c", [user("cancelled")]))
    gone.cancel()
    rounds = writer.rounds
    gate.set()
    assert await blocker is True
    assert [(await f)[0].content for f in oks] == texts
    with pytest.raises(NotFound, match="missing"):
        await bad
    assert writer.rounds == rounds + 2  # the blocker's round, then all the others in one
    assert [m.content for m in store.messages("c")] == texts

    db.writer.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        waiters = [writer.submit_async(db, lambda conn: store.append(conn, "c", [user("x")]))]
        waiters.append(writer.submit_async(db, lambda conn: store.append(conn, "c", [user("y")])))
        for waiter in waiters:
            with pytest.raises(StorageError, match="not committed: database is locked"):
                await asyncio.wait_for(waiter, 10)
    finally:
        other.execute("ROLLBACK")
        other.close()
    writer.close()
    assert len(store.messages("c")) == len(texts)


# ---- conversations ---------------------------------------------------------------------------


def test_messages_keep_their_order_and_conversations_list_newest_first(
    db: Database, store: ConversationStore
) -> None:
    with db.transaction() as conn:
        a = store.create(conn, title="A", tags=["work"])
        b = store.create(conn, title="B")
        store.append(conn, a.id, [user("one"), NewMessage(role="assistant", content="two")])
    with db.transaction() as conn:
        store.append(conn, b.id, [user("three")])
    assert [c.id for c in store.recent()] == [b.id, a.id]
    assert [c.id for c in store.recent(tag="work")] == [a.id]
    msgs = store.messages(a.id)
    assert [(m.role, m.content) for m in msgs] == [("user", "one"), ("assistant", "two")]
    assert [m.content for m in store.messages(a.id, limit=1, newest=True)] == ["two"]
    assert store.message(msgs[1].id).content == "two"
    with pytest.raises(NotFound):
        store.message(10_000)
    with pytest.raises(NotFound), db.transaction() as conn:
        store.append(conn, "nope", [user("x")])
    with db.transaction() as conn:  # create: a missing conversation is made, with the model
        store.append(
            conn, "chat-1", [NewMessage(role="user", content="hi", model="m")], create=True
        )
    with db.transaction() as conn:  # and an existing one is marked updated
        store.append(conn, a.id, [user("four")], create=True)
    assert store.get("chat-1").model == "m"
    assert [c.id for c in store.recent()][:2] == [a.id, "chat-1"]
    assert store.get(a.id).message_count == 3


def test_reads_by_id_see_every_commit_from_any_thread_and_after_a_reopen(
    tmp_path: Path,
) -> None:
    """Each thread reuses one read cursor: a read must still see the latest commit, give each
    thread its own rows, and work again after the database is closed and opened."""
    db = open_db(tmp_path / "conversations.db")
    store = ConversationStore(db)
    with db.transaction() as conn:
        ids = [
            m.id for m in store.append(conn, "c", [user(f"m{i}") for i in range(50)], create=True)
        ]
    assert store.message(ids[0]).content == "m0"
    with db.transaction() as conn:  # committed after this thread's cursor exists
        (late,) = store.append(conn, "c", [user("late")])
    assert store.message(late.id).content == "late"

    def read(offset: int) -> list[str]:
        return [store.message(ids[(i + offset) % 50]).content for i in range(200)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(read, range(4)))
    assert got == [[f"m{(i + k) % 50}" for i in range(200)] for k in range(4)]
    db.close()
    with pytest.raises(StorageError, match="not open"):
        store.message(ids[0])
    db.open()
    try:
        assert store.message(late.id).content == "late"
    finally:
        db.close()


def test_a_kept_read_snapshot_never_hides_a_commit_nor_holds_the_wal(tmp_path: Path) -> None:
    """Reads by id keep their thread's read transaction open between calls. A read after a
    commit still sees it, even when the commit came while that reader was busy; a reader that
    then sits idle does not stop a checkpoint from emptying the WAL; a read inside the
    thread's own snapshot() stays in that snapshot."""
    db = open_db(tmp_path / "conversations.db")
    store = ConversationStore(db)
    reader = concurrent.futures.ThreadPoolExecutor(1)  # one long-lived reading thread
    try:
        with db.transaction() as conn:
            (first,) = store.append(conn, "c", [user("first")], create=True)
        assert reader.submit(store.message, first.id).result().content == "first"
        (kept,) = db._readers
        assert kept.snapshot == db.commits  # the snapshot outlives the call

        with kept.lock:  # the reader is busy when the next commit lands: its snapshot stays
            with db.transaction() as conn:
                (second,) = store.append(conn, "c", [user("second")])
            assert kept.snapshot is not None
            assert kept.snapshot != db.commits
        assert reader.submit(store.message, second.id).result().content == "second"

        # the same, then a plain reader() on that thread: it is current too
        with kept.lock, db.transaction() as conn:
            (third,) = store.append(conn, "c", [user("third")])

        def plain_read() -> str:
            sql = "SELECT content FROM messages WHERE id = ?"
            return str(db.reader().execute(sql, (third.id,)).fetchone()[0])

        assert reader.submit(plain_read).result() == "third"

        at_commit: list[int | None] = []  # the reader's kept snapshot as each COMMIT starts

        def trace(sql: str) -> None:
            if sql == "COMMIT":
                at_commit.append(kept.snapshot)

        db.writer.set_trace_callback(trace)
        try:
            reader.submit(store.message, first.id).result()
            assert kept.snapshot is not None
            # ended just before COMMIT, whose checkpoint it would otherwise hold back
            with db.transaction() as conn:
                store.append(conn, "c", [user("fourth")])
            with db.transaction() as conn:  # a read while a write is open keeps nothing
                store.append(conn, "c", [user("fifth")])
                assert reader.submit(store.message, first.id).result().content == "first"
                assert kept.snapshot is None
        finally:
            db.writer.set_trace_callback(None)
        assert at_commit == [None, None]

        with db.transaction() as conn:  # the reader is idle: the commit ends its snapshot
            store.append(conn, "c", [user(f"more {i}") for i in range(200)])
        assert kept.snapshot is None
        busy, _, _ = db.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        assert (tmp_path / "conversations.db-wal").stat().st_size == 0

        def inside_a_snapshot() -> tuple[bool, str]:
            with db.snapshot():
                assert store.message(first.id).content == "first"  # the snapshot begins here
                with db.transaction() as conn:  # committed after the snapshot began
                    (late,) = store.append(conn, "c", [user("late")])
                hidden = late.id not in store.messages_by_id([first.id, late.id])
            return hidden, store.message(late.id).content

        assert reader.submit(inside_a_snapshot).result() == (True, "late")
    finally:
        reader.shutdown()
        db.close()


def test_append_returns_the_stored_messages_even_after_the_newest_was_deleted(
    db: Database, store: ConversationStore
) -> None:
    with db.transaction() as conn:
        a = store.create(conn)
        first = store.append(conn, a.id, [user("one"), user("two"), user("three")])
        conn.execute("DELETE FROM messages WHERE id = ?", (first[-1].id,))
    with db.transaction() as conn:  # another conversation's rows in between, same transaction
        store.append(conn, "other", [user("elsewhere")], create=True)
        later = store.append(
            conn, a.id, [NewMessage(role="assistant", content="four", created_at=5.0), user("5")]
        )
    assert store.messages(a.id) == first[:2] + later
    assert [m.id for m in later] == [first[-1].id + 2, first[-1].id + 3]  # never reused
    assert later[0].created_at == 5.0
    assert later[1].created_at > 5.0
    with db.transaction() as conn:
        assert store.append(conn, a.id, []) == []


def test_messages_read_back_are_the_models_validation_would_build(
    db: Database, store: ConversationStore
) -> None:
    # rows become Messages without validation (the schema holds their types): each must equal,
    # field for field and in everything pydantic keeps, the model validated from the same values
    with db.transaction() as conn:
        stored = store.append(
            conn,
            "c",
            [
                NewMessage(role="assistant", content="hi", model="smollm2", created_at=7),
                NewMessage(role="tool", content="12"),
            ],
            create=True,
        )
        conn.execute("UPDATE messages SET embedded = 1 WHERE id = ?", (stored[0].id,))
    read = [store.message(m.id) for m in stored]
    assert [m.embedded for m in read] == [True, False]
    assert read[0].model == "smollm2"
    assert read[1].model is None
    assert type(read[0].created_at) is float
    assert read[0].created_at == 7.0
    by_numpy = store.message(np.int64(stored[0].id))  # type: ignore[arg-type]
    assert by_numpy == read[0]
    assert type(by_numpy.id) is int
    with pytest.raises(TypeError):
        store.message("1")  # type: ignore[arg-type]
    for message in [*stored, *read, *store.messages("c"), *store.messages_by_id([1, 2]).values()]:
        validated = Message.model_validate(dict(message))
        assert message == validated
        assert message.model_dump_json() == validated.model_dump_json()
        assert message.model_fields_set == validated.model_fields_set == set(Message.model_fields)
        assert message.__pydantic_extra__ == validated.__pydantic_extra__
        assert message.__pydantic_private__ == validated.__pydantic_private__
        assert message.model_copy(update={"content": "x"}).content == "x"
        assert message.content != "x"


def test_keyword_search_stems_ignores_query_syntax_and_filters(
    db: Database, store: ConversationStore, keywords: KeywordIndex
) -> None:
    with db.transaction() as conn:
        a = store.create(conn, tags=["pets"])
        b = store.create(conn)
        store.append(
            conn,
            a.id,
            [
                user("My dog's name is Rex"),
                NewMessage(role="assistant", content="Rex is a good dog"),
            ],
        )
        store.append(conn, b.id, [user("Dogs bark at night")])
    assert keywords.flush() == 3
    found = store.keyword_search('what is my "dog called? AND title:x')
    assert len(found) == 3
    assert store.keyword_search("dog", roles=["assistant"])[0][0] == 2
    assert [i for i, _ in store.keyword_search("dog", conversation_id=b.id)] == [3]
    assert {i for i, _ in store.keyword_search("dog", tags=["pets"])} == {1, 2}
    assert store.keyword_search("???") == []
    assert match_expression("what is my dog called?") == '"dog" OR "called"'


def _found(store: ConversationStore, text: str) -> set[int]:
    return {mid for mid, _ in store.keyword_search(text)}


def test_the_keyword_index_follows_edits_and_deletes_of_messages(
    db: Database, store: ConversationStore, keywords: KeywordIndex
) -> None:
    with db.transaction() as conn:
        a = store.create(conn)
        b = store.create(conn)
        m1, m2 = store.append(conn, a.id, [user("parrots talk"), user("owls hoot at night")])
        (m3,) = store.append(conn, b.id, [user("parrots are green")])
    keywords.flush()
    assert _found(store, "parrot") == {m1.id, m3.id}
    with db.transaction() as conn:
        conn.execute("UPDATE messages SET content = 'ravens croak' WHERE id = ?", (m1.id,))
        conn.execute("DELETE FROM messages WHERE id = ?", (m2.id,))
        store.delete(conn, b.id)  # its messages go by cascade
        (m4,) = store.append(conn, a.id, [user("a short-lived parrot")])
        conn.execute("DELETE FROM messages WHERE id = ?", (m4.id,))  # never seen by the index
    assert _found(store, "parrot") == {m1.id, m3.id}  # not applied yet: the outbox holds it
    assert keywords.backlog() == 4  # an edit and three deletes; the new message is gone again
    assert keywords.flush() == 4
    assert _found(store, "parrot") == set()
    assert _found(store, "owl") == set()
    assert _found(store, "ravens") == {m1.id}
    rows = keywords.conn.execute("SELECT count(*) FROM messages_fts").fetchone()[0]
    assert rows == 1  # nothing left behind for deleted messages


def test_the_keyword_index_resumes_where_it_stopped_and_prunes_the_outbox(
    db: Database, store: ConversationStore
) -> None:
    with keyword_index(db) as index:
        with db.transaction() as conn:
            c = store.create(conn)
            store.append(conn, c.id, [user(f"note {i} about lemons") for i in range(1500)])
        assert index.flush() == 1500  # new messages, found by id: no outbox entry
        assert db.reader().execute("SELECT count(*) FROM keyword_outbox").fetchone()[0] == 0
        with db.transaction() as conn:  # 1,500 edits: 1,500 outbox entries
            conn.execute("UPDATE messages SET content = content || ' and limes'")
        assert index.flush() == 1500
        copied, applied = index.copied, index.applied
    with db.transaction() as conn:  # written while the index is closed
        store.append(conn, c.id, [user("oranges too")])
        conn.execute("UPDATE messages SET content = 'grapefruit' WHERE id = 1")
    with keyword_index(db) as index:
        assert (index.copied, index.applied) == (copied + 1, applied + 1)  # from where it stopped
        assert index.indexed == 2
        assert index.rebuilds == 0
        assert len(store.keyword_search("limes", limit=2000)) == 1499
        assert _found(store, "oranges") == {1501}
        assert _found(store, "grapefruit") == {1}
    # applied entries were pruned in a batch through the writer; the seq never goes back
    assert db.reader().execute("SELECT count(*) FROM keyword_outbox").fetchone()[0] == 0
    with db.transaction() as conn:
        conn.execute("UPDATE messages SET content = 'kiwi' WHERE id = 2")
    assert [r[0] for r in db.reader().execute("SELECT seq FROM keyword_outbox")] == [1502]


def _index_file(db: Database) -> Path:
    return db.path.with_name("conversations.keywords.db")


@pytest.mark.parametrize("damage", ["deleted", "garbage", "another database", "restored older"])
def test_a_missing_damaged_or_foreign_keyword_index_is_rebuilt_from_the_messages(
    tmp_path: Path, damage: str
) -> None:
    db = open_db(tmp_path / "conversations.db")
    store = ConversationStore(db)
    with db.transaction() as conn:
        c = store.create(conn)
        store.append(conn, c.id, [user("quinces ripen in autumn")])
    older = tmp_path / "older.db"
    db.backup_to(older)  # a copy taken before the last message
    with db.transaction() as conn:
        store.append(conn, c.id, [user("medlars ripen later")])
    with keyword_index(db):
        pass
    db.close()
    index = _index_file(db)
    if damage == "deleted":
        index.unlink()
    elif damage == "garbage":
        index.write_bytes(b"not a database at all" * 100)
    elif damage == "another database":
        other = open_db(tmp_path / "other" / "conversations.db")
        other_store = ConversationStore(other)
        with other.transaction() as conn:
            x = other_store.create(conn)
            other_store.append(conn, x.id, [user("kumquats"), user("more"), user("and more")])
        with keyword_index(other):
            pass
        other.close()
        index.write_bytes(_index_file(other).read_bytes())
    else:  # the database goes back to the older copy; the index is ahead of it
        (tmp_path / "conversations.db").write_bytes(older.read_bytes())
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    db = open_db(tmp_path / "conversations.db")
    store = ConversationStore(db)
    writer = Writer()
    writer.start()
    index = KeywordIndex(db, writer)
    index.open()
    assert index.rebuilds == 0  # opening is quick: the rebuild waits for the first flush
    with db.transaction() as conn:  # a write meanwhile
        (late,) = store.append(conn, c.id, [user("sloes ripen last")])
    index.flush()
    assert index.rebuilds == 1
    earlier = {1} if damage == "restored older" else {1, 2}
    assert _found(store, "ripen") == earlier | {late.id}
    assert _found(store, "kumquats") == set()
    index.flush()
    assert index.rebuilds == 1  # once
    index.stop()
    writer.close()
    db.close()


def test_the_keyword_thread_indexes_committed_writes_without_being_asked(
    db: Database, store: ConversationStore, keywords: KeywordIndex
) -> None:
    keywords.start()
    with db.transaction() as conn:
        c = store.create(conn)
        store.append(conn, c.id, [user("figs and dates")])
    keywords.notify(db)  # what the memory writer does after each commit
    deadline = time.monotonic() + 10
    while keywords.backlog() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert keywords.backlog() == 0
    assert _found(store, "figs") == {1}


def test_a_message_and_its_vector_commit_together_and_deletes_queue_vector_deletes(
    db: Database, store: ConversationStore
) -> None:
    vectors = np.eye(2, 4, dtype=np.float32)
    with db.transaction() as conn:
        conv = store.create(conn)
        stored = store.append(conn, conv.id, [user("a"), user("b")], vectors, "m")
    try:
        with db.transaction() as conn:
            store.append(conn, conv.id, [user("c")], vectors[:1], "m")
            raise RuntimeError("crash before commit")
    except RuntimeError:
        pass
    entries = outbox.pending(db.reader(), 100)
    assert [(e.op, label_parts(e.label)) for e in entries] == [
        ("upsert", ("message", stored[0].id)),
        ("upsert", ("message", stored[1].id)),
    ]
    assert np.array_equal(entries[1].vector, vectors[1])
    assert all(m.embedded for m in store.messages(conv.id))

    with db.transaction() as conn:
        outbox.retire(conn, entries)
        assert store.delete(conn, conv.id) == 2
    deletes = outbox.pending(db.reader(), 100)
    assert sorted(e.label for e in deletes) == [vector_label("message", m.id) for m in stored]
    assert {e.op for e in deletes} == {"delete"}
    assert store.messages(conv.id) == []


# ---- the other relational stores ---------------------------------------------------------


def test_tool_results_experience_summaries_and_meta_round_trip(tmp_path: Path) -> None:
    tools = ToolResultStore(open_db(tmp_path / "tool_results.db", TOOL_RESULTS_MIGRATIONS))
    with tools.db.transaction() as conn:
        tools.record(
            conn, tool="search", arguments={"q": "x"}, result={"n": 3}, conversation_id="c"
        )
        tools.record(conn, tool="fetch", error="timeout", duration_ms=5000.0)
    assert [t.tool for t in tools.recent()] == ["fetch", "search"]
    assert tools.recent(tool="search")[0].result == {"n": 3}
    assert tools.recent(conversation_id="c")[0].arguments == {"q": "x"}

    exp = ExperienceStore(open_db(tmp_path / "experience.db", EXPERIENCE_MIGRATIONS))
    with exp.db.transaction() as conn:
        ep = exp.record(conn, event="summarised a web page", outcome="user copied it")
        exp.give_feedback(conn, ep.id, "great summary", 1.0)
        with pytest.raises(NotFound):
            exp.give_feedback(conn, 999, "x", None)
    assert exp.recent()[0].feedback == "great summary"
    assert [i for i, _ in exp.keyword_search("summaries")] == [ep.id]

    sums = SummaryStore(open_db(tmp_path / "summaries.db", SUMMARIES_MIGRATIONS))
    with sums.db.transaction() as conn:
        sums.add(conn, text="talked about the garden", conversation_id="c", covers_to_message_id=4)
        sums.add(conn, text="planned a trip to Lisbon", conversation_id="c", covers_to_message_id=9)
    latest = sums.latest("c")
    assert latest is not None
    assert latest.covers_to_message_id == 9
    assert sums.latest("other") is None
    assert [i for i, _ in sums.keyword_search("gardening")] == [1]

    meta = MetaStore(open_db(tmp_path / "meta.db", META_MIGRATIONS))
    with meta.db.transaction() as conn:
        meta.record_schema(conn, "conversations", 2)
        meta.set(conn, "default_embedding_model", "m")
        meta.set_mark(conn, "index", 42)
    assert meta.schema_versions() == {"conversations": 2}
    assert meta.get("default_embedding_model") == "m"
    assert meta.get("nope", 1) == 1
    assert meta.marks() == {"index": 42}
