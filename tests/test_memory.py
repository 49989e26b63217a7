"""The memory layer through its client interface, run against both clients: ``Memory``
in-process and ``RemoteMemory`` over gRPC (the same suite, parametrized).

Real SQLite, LanceDB and hnswlib files in tmp_path; real all-MiniLM-L6-v2 embeddings.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tabagent.errors import BadRequest, NotFound, ServiceUnavailable
from tabagent.storage.client import MemoryClient
from tabagent.storage.memory import Memory
from tabagent.storage.records import NewMessage
from tabagent.storage.search import SearchQuery
from tests.helpers import MiniLM
from tests.memory_clients import open_client

DOG = "My dog's name is Rex."
DISTRACTORS = [
    "I bought a new laptop for work yesterday.",
    "The weather in Lisbon was sunny all week.",
    "Can you recommend a good pasta recipe?",
    "My sister is studying medicine in Porto.",
    "Remind me to call the bank on Monday.",
    "The train to the airport leaves at 7 am.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> MiniLM:
    return MiniLM(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(params=["local", "remote"])
async def mem(
    request: pytest.FixtureRequest, tmp_path: Path, minilm: MiniLM
) -> AsyncIterator[MemoryClient]:
    async with open_client(request.param, tmp_path / "db", minilm) as client:
        yield client


def user(text: str, **kw: object) -> NewMessage:
    return NewMessage(role="user", content=text, **kw)  # type: ignore[arg-type]


async def seed(mem: MemoryClient) -> str:
    conv = await mem.create_conversation(title="pets", tags=["personal"])
    await mem.add_messages(conv.id, [user(DOG)])
    other = await mem.create_conversation(title="misc")
    await mem.add_messages(other.id, [user(t) for t in DISTRACTORS])
    return conv.id


async def test_conversations_and_messages_round_trip(mem: MemoryClient) -> None:
    conv = await mem.create_conversation(title="hello", model="m", metadata={"k": 1})
    stored = await mem.add_messages(
        conv.id, [user("hi"), NewMessage(role="assistant", content="hello!", model="m")]
    )
    assert [m.id for m in stored] == sorted(m.id for m in stored)
    assert all(m.embedded for m in stored)
    got = await mem.get_conversation(conv.id)
    assert (got.title, got.model, got.metadata, got.message_count) == ("hello", "m", {"k": 1}, 2)
    msgs = await mem.messages(conv.id)
    assert [(m.role, m.content) for m in msgs] == [("user", "hi"), ("assistant", "hello!")]
    assert (await mem.message(stored[1].id)).content == "hello!"
    # a chat client may name its own conversation id: it is created on first use
    await mem.add_messages("conv_from_client", [user("first")])
    assert (await mem.get_conversation("conv_from_client")).message_count == 1
    updated = await mem.update_conversation(conv.id, title="renamed", tags=["a"])
    assert (updated.title, updated.tags) == ("renamed", ["a"])
    listed = [c.id for c in await mem.list_conversations()]
    assert listed[0] == conv.id  # most recently updated first
    assert set(listed) == {conv.id, "conv_from_client"}
    with pytest.raises(NotFound):
        await mem.get_conversation("nope")
    with pytest.raises(NotFound):
        await mem.add_messages("nope", [user("x")], create=False)
    with pytest.raises(BadRequest):
        await mem.add_messages(conv.id, [])


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_what_is_my_dog_called_finds_the_message_about_rex(
    mem: MemoryClient, mode: str
) -> None:
    await seed(mem)
    hits = await mem.search(SearchQuery("what is my dog called?", mode=mode, k=3))  # type: ignore[arg-type]
    assert hits, mode
    assert hits[0].text == DOG
    assert hits[0].source == "messages"
    if mode == "hybrid":
        assert hits[0].keyword_rank == 1
        assert hits[0].vector_rank == 1


async def test_vector_search_finds_meaning_without_shared_words(mem: MemoryClient) -> None:
    await seed(mem)
    keyword = await mem.search(SearchQuery("puppy", mode="keyword"))
    assert keyword == []  # no message contains the word
    hits = await mem.search(SearchQuery("puppy", mode="hybrid", k=1))
    assert [h.text for h in hits] == [DOG]
    assert hits[0].keyword_rank is None


async def test_search_filters_by_conversation_role_time_and_tags(mem: MemoryClient) -> None:
    pets = await seed(mem)
    await mem.add_messages(
        pets, [NewMessage(role="assistant", content="Rex is a lovely dog name.")]
    )
    q = "dog name"
    by_conv = await mem.search(SearchQuery(q, conversation_id=pets, k=10))
    assert {h.conversation_id for h in by_conv} == {pets}
    by_role = await mem.search(SearchQuery(q, roles=["assistant"], k=10))
    assert [h.text for h in by_role] == ["Rex is a lovely dog name."]
    by_tag = await mem.search(SearchQuery(q, tags=["personal"], k=10))
    assert {h.conversation_id for h in by_tag} == {pets}
    future = await mem.search(SearchQuery(q, since=time.time() + 3600))
    assert future == []


async def test_recency_ranking_prefers_the_newer_of_two_equal_memories(mem: MemoryClient) -> None:
    conv = await mem.create_conversation()
    day = 86400.0
    old, new = await mem.add_messages(
        conv.id,
        [
            user("The spare key is under the flower pot.", created_at=time.time() - 60 * day),
            user("The spare key is under the flower pot.", created_at=time.time() - 1 * day),
        ],
    )
    plain = await mem.search(SearchQuery("where is the spare key?", k=2))
    assert {h.id for h in plain} == {old.id, new.id}
    recent = await mem.search(SearchQuery("where is the spare key?", k=2, recency_half_life_days=7))
    assert recent[0].id == new.id
    assert recent[0].score > 2 * recent[1].score


async def test_deleting_a_conversation_removes_its_messages_vectors_and_summaries(
    mem: MemoryClient,
) -> None:
    pets = await seed(mem)
    await mem.add_summary("The user talked about their dog Rex.", conversation_id=pets)
    assert await mem.delete_conversation(pets) == 1
    for mode in ("hybrid", "vector", "keyword"):
        hits = await mem.search(SearchQuery("dog Rex", mode=mode, k=10))  # type: ignore[arg-type]
        assert all("Rex" not in h.text for h in hits), mode
    assert await mem.latest_summary(pets) is None
    with pytest.raises(NotFound):
        await mem.delete_conversation(pets)


async def test_facts_entities_and_graph_traversal(mem: MemoryClient) -> None:
    user_e = await mem.upsert_entity("user", type="person")
    rex = await mem.upsert_entity("Rex", type="dog", provenance="message:1")
    vet = await mem.upsert_entity("Dr. Silva", type="person")
    await mem.add_relation(user_e.id, "has_dog", rex.id)
    await mem.add_relation(rex.id, "treated_by", vet.id)
    fact = await mem.add_fact("The user's dog is named Rex.", entity_ids=[user_e.id, rex.id])
    assert sorted(fact.entity_ids) == sorted([user_e.id, rex.id])
    assert (await mem.upsert_entity("rex ", type="dog")).id == rex.id  # no duplicate

    graph = await mem.traverse(user_e.id, hops=2)
    assert graph.distances == {user_e.id: 0, rex.id: 1, vet.id: 2}
    one_hop = await mem.traverse(user_e.id, hops=1)
    assert set(one_hop.distances) == {user_e.id, rex.id}
    assert [f.text for f in await mem.facts(entity_id=rex.id)] == [fact.text]
    hits = await mem.search(SearchQuery("what's the name of my pet?", sources=["facts"], k=1))
    assert [h.text for h in hits] == [fact.text]
    with pytest.raises(BadRequest):
        await mem.traverse(user_e.id, hops=50)
    with pytest.raises(NotFound):
        await mem.entity(999_999)


async def test_tool_results_episodes_summaries_and_stats(mem: MemoryClient) -> None:
    conv = await mem.create_conversation()
    await mem.record_tool_result(tool="web_search", arguments={"q": "rex"}, result=[1, 2])
    tools = await mem.tool_result_list(tool="web_search")
    assert tools[0].arguments == {"q": "rex"}
    assert tools[0].result == [1, 2]
    await mem.record_episode(event="answered a question", outcome="user satisfied", score=1.0)
    assert (await mem.episodes())[0].outcome == "user satisfied"
    s1 = await mem.add_summary("first part", conversation_id=conv.id, covers_to_message_id=3)
    s2 = await mem.add_summary("second part", conversation_id=conv.id, covers_to_message_id=8)
    latest = await mem.latest_summary(conv.id)
    assert latest is not None
    assert (latest.id, latest.covers_to_message_id) == (s2.id, 8)
    assert s1.id < s2.id
    stats = await mem.stats()
    assert set(stats) == {
        "conversations", "knowledge", "embeddings", "tool_results", "experience", "summaries",
        "meta",
    }  # fmt: skip
    assert stats["tool_results"]["tool_results"] == 1
    assert stats["meta"]["schema_versions"]["conversations"] >= 2


async def test_memory_persists_across_reopen(tmp_path: Path, minilm: MiniLM) -> None:
    root = tmp_path / "db"
    first = Memory(root, embedder=minilm)
    await first.open()
    conv = await seed(first)
    await first.close()

    again = Memory(root, embedder=minilm)
    await again.open()
    try:
        assert (await again.get_conversation(conv)).message_count == 1
        hits = await again.search(SearchQuery("what is my dog called?", mode="vector", k=1))
        assert [h.text for h in hits] == [DOG]
        assert again.vectors.count() == 1 + len(DISTRACTORS)
    finally:
        await again.close()


async def test_a_search_waits_for_vectors_the_background_sync_is_still_moving(
    tmp_path: Path, minilm: MiniLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read your own writes: when the sync thread has already taken a new message's vector from
    the outbox but not yet indexed it, a search must wait for it, not search without it."""
    memory = Memory(tmp_path / "db", embedder=minilm)
    await memory.open()
    try:
        entered, release = threading.Event(), threading.Event()
        upsert = memory.vectors.upsert

        def slow_upsert(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            assert release.wait(30)
            return upsert(*args, **kwargs)

        monkeypatch.setattr(memory.vectors, "upsert", slow_upsert)
        conv = await memory.create_conversation(title="notes")
        await memory.add_messages(conv.id, [user("The wifi password is hunter2.")])
        assert await asyncio.to_thread(entered.wait, 30)  # the sync thread holds the vector
        search = asyncio.create_task(memory.search(SearchQuery("wifi password", mode="vector")))
        await asyncio.sleep(0.3)
        assert not search.done()  # it waits for the move in flight ...
        release.set()
        hits = await asyncio.wait_for(search, 30)
        assert [h.text for h in hits] == ["The wifi password is hunter2."]  # ... and sees it
    finally:
        release.set()
        await memory.close()


async def test_the_vectors_open_in_the_background_while_reads_and_writes_go_on(
    tmp_path: Path, minilm: MiniLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's start-up: the SQLite stores open at once; LanceDB and the index open on a
    thread. Writes are acknowledged meanwhile (their vectors wait in the outbox) and a search
    waits for the index, then finds old and new rows alike."""
    root = tmp_path / "db"
    first = Memory(root, embedder=minilm)
    await first.open()
    conv = await first.create_conversation(title="pets")
    await first.add_messages(conv.id, [user(DOG)])
    await first.close()

    memory = Memory(root, embedder=minilm)
    entered, release = threading.Event(), threading.Event()
    open_vectors = memory.vectors.open

    def slow_open() -> None:
        entered.set()
        assert release.wait(30)
        open_vectors()

    monkeypatch.setattr(memory.vectors, "open", slow_open)
    await memory.open(vectors_in_background=True)
    try:
        assert await asyncio.to_thread(entered.wait, 30)  # still opening the vectors ...
        added = await memory.add_messages(conv.id, [user("The wifi password is hunter2.")])
        assert added[0].embedded  # ... yet the write is acknowledged with its vector queued
        assert [m.content for m in await memory.messages(conv.id)] == [
            DOG,
            "The wifi password is hunter2.",
        ]
        search = asyncio.create_task(memory.search(SearchQuery("wifi password", mode="vector")))
        opened = asyncio.create_task(memory.vectors_opened())
        await asyncio.sleep(0.3)
        assert not search.done()
        assert not opened.done()
        release.set()
        await asyncio.wait_for(opened, 30)
        hits = await asyncio.wait_for(search, 30)
        assert hits[0].text == "The wifi password is hunter2."
        dog = await memory.search(SearchQuery("what is my dog called?", mode="vector", k=1))
        assert [h.text for h in dog] == [DOG]
    finally:
        release.set()
        await memory.close()


async def test_a_vector_store_that_cannot_open_leaves_the_rest_of_memory_working(
    tmp_path: Path, minilm: MiniLM
) -> None:
    """A broken ``embeddings/`` folder: opened in the background, messages are still stored and
    read, search says why it cannot run; opened in the foreground, the open fails cleanly and
    lets go of the databases, so a later open (after the repair) finds everything."""
    root = tmp_path / "db"
    (root / "embeddings").mkdir(parents=True)
    (root / "embeddings" / "lance").write_text("not a folder")  # LanceDB's folder is a file

    memory = Memory(root, embedder=minilm)
    await memory.open(vectors_in_background=True)
    try:
        conv = await memory.create_conversation(title="notes")
        await memory.add_messages(conv.id, [user("The wifi password is hunter2.")])
        with pytest.raises(ServiceUnavailable) as opened:
            await memory.vectors_opened()
        assert opened.value.code == "vectors_unavailable"
        assert "could not be opened" in opened.value.message
        with pytest.raises(ServiceUnavailable):
            await memory.search(SearchQuery("wifi password", mode="keyword"))
        assert [m.content for m in await memory.messages(conv.id)] == [
            "The wifi password is hunter2."
        ]
    finally:
        await memory.close()

    with pytest.raises(FileExistsError):
        await Memory(root, embedder=minilm).open()  # the foreground open raises the cause

    (root / "embeddings" / "lance").unlink()  # repaired: nothing was lost, the vector replays
    repaired = Memory(root, embedder=minilm)
    await repaired.open()
    try:
        hits = await repaired.search(SearchQuery("wifi password", mode="vector"))
        assert [h.text for h in hits] == ["The wifi password is hunter2."]
    finally:
        await repaired.close()
