"""What only the remote database client has: the token, the wire, errors across it, load.

The shared storage behaviour runs against both clients in tests/test_memory.py; here a real
``Memory`` (SQLite and LanceDB in tmp_path, no embedder) is served over a real gRPC socket.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from ml_service.lifecycle import TOKEN_METADATA
from ml_service.proto import database_pb2 as pb
from ml_service.proto import database_pb2_grpc as pb_grpc
from tabagent.errors import BadRequest, NotFound, ServiceUnavailable, StorageError, TabAgentError
from tabagent.storage.client import MemoryClient, RemoteMemory
from tabagent.storage.grpc_service import serve_database
from tabagent.storage.memory import Memory
from tabagent.storage.records import NewMessage
from tabagent.storage.search import SearchQuery
from tests.helpers import free_port
from tests.memory_clients import serving


@pytest.fixture
async def memory(tmp_path: Path) -> AsyncIterator[Memory]:
    mem = Memory(tmp_path / "db")
    await mem.open()
    try:
        yield mem
    finally:
        await mem.close()


@pytest.fixture
async def served(memory: Memory) -> AsyncIterator[tuple[str, str]]:
    async with serving(memory) as address_token:
        yield address_token


@pytest.fixture
async def remote(served: tuple[str, str]) -> AsyncIterator[RemoteMemory]:
    async with await RemoteMemory.connect(*served) as client:
        yield client


def _public_methods(cls: type) -> list[str]:
    return sorted(n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n)))


def test_both_clients_have_every_method_with_memorys_signature() -> None:
    names = [n for n in _public_methods(MemoryClient) if n != "close"]
    assert len(names) == 24
    for name in ["close", *names]:
        expected = inspect.signature(getattr(Memory, name))
        assert inspect.signature(getattr(MemoryClient, name)) == expected, name
        assert inspect.signature(getattr(RemoteMemory, name)) == expected, name


@pytest.mark.parametrize("token", ["wrong-token", None])
async def test_a_wrong_or_missing_token_is_refused_and_writes_nothing(
    memory: Memory, served: tuple[str, str], token: str | None
) -> None:
    address, _ = served
    metadata = () if token is None else ((TOKEN_METADATA, token),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DatabaseServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateConversation(
                pb.CreateConversationRequest(title="intruder"), metadata=metadata, timeout=10
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await stub.ListConversations(pb.ListConversationsRequest(), metadata=metadata)
        assert read.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await memory.list_conversations() == []
    with pytest.raises(StorageError) as connecting:
        await RemoteMemory.connect(address, token or "", ready_timeout=10)
    assert connecting.value.code == "database_token_rejected"


async def test_errors_come_back_as_the_same_class_code_and_param(
    memory: Memory, remote: RemoteMemory
) -> None:
    async def failure(client: MemoryClient, call: str) -> TabAgentError:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "get_conversation": lambda: client.get_conversation("nope"),
            "delete_conversation": lambda: client.delete_conversation("nope"),
            "message": lambda: client.message(424242),
            "add_messages_empty": lambda: client.add_messages("c", []),
            "add_messages_no_create": lambda: client.add_messages(
                "nope", [NewMessage(role="user", content="x")], create=False
            ),
        }
        with pytest.raises(TabAgentError) as caught:
            await calls[call]()
        return caught.value

    for call in (
        "get_conversation",
        "delete_conversation",
        "message",
        "add_messages_empty",
        "add_messages_no_create",
    ):
        local, far = await failure(memory, call), await failure(remote, call)
        assert type(far) is type(local), call
        assert (far.code, far.param, far.message) == (local.code, local.param, local.message)
    missing = await failure(remote, "get_conversation")
    assert isinstance(missing, NotFound)
    assert missing.code == "conversation_not_found"
    empty = await failure(remote, "add_messages_empty")
    assert isinstance(empty, BadRequest)
    assert empty.param == "messages"


async def test_unknown_keyword_arguments_fail_like_they_do_locally(
    memory: Memory, remote: RemoteMemory
) -> None:
    with pytest.raises(TypeError):
        await memory.record_tool_result(tool="t", colour="red")
    with pytest.raises(TypeError):
        await remote.record_tool_result(tool="t", colour="red")
    with pytest.raises(TypeError):
        await remote.episodes(colour="red")
    assert await memory.tool_result_list() == []


async def test_records_and_json_fields_survive_the_wire(
    memory: Memory, remote: RemoteMemory
) -> None:
    metadata = {"nested": {"list": [1, 2.5, None, True], "text": "olá 🐕"}, "n": 0}
    conv = await remote.create_conversation(
        conversation_id="c1", title="t", tags=["a", "b"], metadata=metadata
    )
    assert conv == await memory.get_conversation("c1")
    assert conv.metadata == metadata
    assert conv.model is None
    updated = await remote.update_conversation("c1", tags=[])  # an empty list clears the tags
    assert updated.tags == []
    assert updated.title == "t"
    stored = await remote.add_messages(
        "c1", [NewMessage(role="assistant", content="hi", model="m", created_at=1234.5)]
    )
    assert stored == await memory.messages("c1")
    assert stored[0].created_at == 1234.5
    for result in (None, [1, {"a": "b"}], "text", 3.25):
        await remote.record_tool_result(tool="calc", arguments={"x": 1}, result=result)
    assert await remote.tool_result_list(tool="calc") == await memory.tool_result_list(tool="calc")
    assert [t.result for t in await remote.tool_result_list(tool="calc")] == [
        3.25, "text", [1, {"a": "b"}], None,
    ]  # fmt: skip
    episode = await remote.record_episode(event="e", score=0.5)
    assert await remote.episodes() == [episode]
    assert await remote.latest_summary("c1") is None
    summary = await remote.add_summary("s", conversation_id="c1", covers_to_message_id=7)
    assert await remote.latest_summary("c1") == summary
    hits = await remote.search(SearchQuery("hi", mode="keyword"))
    assert hits == await memory.search(SearchQuery("hi", mode="keyword"))
    assert [h.source for h in hits] == ["messages"]
    rex = await remote.upsert_entity("Rex", type="dog", attributes={"age": 3}, aliases=["Rexy"])
    assert rex == await memory.entity(rex.id)
    assert await remote.entities(query="rexy") == await memory.entities(query="rexy")
    assert await remote.consolidate() == []  # upserts never make duplicates
    graph = await remote.traverse(rex.id)
    assert graph == await memory.traverse(rex.id)
    assert graph.distances == {rex.id: 0}
    far, near = await remote.stats(), await memory.stats()
    for figures in (*far.values(), *near.values()):
        figures.pop("bytes")  # the WAL files may grow or shrink between the two calls
    assert far == near


async def test_a_thousand_long_messages_round_trip_in_one_call(remote: RemoteMemory) -> None:
    # ~8 MB each way: over gRPC's default 4 MB message limit, which both ends raise.
    messages = [
        NewMessage(role="user" if i % 2 else "assistant", content=f"{i} " + "é🐕x" * 2000)
        for i in range(1000)
    ]
    stored = await remote.add_messages("big", messages)
    assert [m.content for m in stored] == [m.content for m in messages]
    back = await remote.messages("big", limit=1000)
    assert back == stored
    assert (await remote.get_conversation("big")).message_count == 1000


async def test_concurrent_calls_from_many_tasks(memory: Memory, remote: RemoteMemory) -> None:
    async def chat(n: int) -> None:
        cid = f"conv-{n}"
        await remote.create_conversation(conversation_id=cid, title=str(n))
        for turn in range(5):
            await remote.add_messages(cid, [NewMessage(role="user", content=f"{n}:{turn}")])
        assert [m.content for m in await remote.messages(cid)] == [f"{n}:{t}" for t in range(5)]

    await asyncio.gather(*(chat(n) for n in range(25)))
    listed = await memory.list_conversations(limit=100)
    assert len(listed) == 25
    assert {c.message_count for c in listed} == {5}


async def test_a_closed_store_is_a_storage_error_on_the_client(
    memory: Memory, remote: RemoteMemory
) -> None:
    await memory.close()
    with pytest.raises(StorageError) as closed:
        await remote.list_conversations()
    assert closed.value.code == "storage_closed"


async def test_a_stopped_server_is_service_unavailable(memory: Memory, tmp_path: Path) -> None:
    port = free_port()
    token = secrets.token_urlsafe(16)
    server = await serve_database(memory, f"127.0.0.1:{port}", token)
    client = await RemoteMemory.connect(f"127.0.0.1:{port}", token, call_timeout=5)
    try:
        assert await client.list_conversations() == []
        await server.stop(grace=None)
        with pytest.raises(ServiceUnavailable) as gone:
            await client.list_conversations()
        assert gone.value.code == "database_unavailable"
        assert gone.value.retry_after == 1
    finally:
        await client.close()
        await server.stop(grace=None)
