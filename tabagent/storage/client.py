"""The database client interface, and its remote implementation over gRPC.

:class:`MemoryClient` is what the rest of the program needs from memory: ``Memory`` (the
databases in this process) satisfies it, and so does :class:`RemoteMemory`, which reaches a
``Memory`` served by ``tabagent.storage.grpc_service`` in another process (the native host
proxying to a running server, a second machine). Code written against ``MemoryClient`` cannot
tell them apart: the same records come back and the same ``TabAgentError`` classes, with the
same codes, are raised, and one storage test suite runs against both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ml_service.lifecycle import TOKEN_METADATA
from ml_service.proto import database_pb2 as pb
from ml_service.proto import database_pb2_grpc as pb_grpc
from tabagent.errors import ServiceUnavailable
from tabagent.storage.records import (
    Conversation,
    Entity,
    Episode,
    Fact,
    Graph,
    Message,
    NewMessage,
    Relation,
    SearchHit,
    Summary,
    ToolResult,
)
from tabagent.storage.search import SearchQuery
from tabagent.storage.wire import ProtoMessage, build, error_from_status, from_proto, values

log = logging.getLogger(__name__)

SERVICE_NAME = "tabagent.database.v1.DatabaseService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # 1000 long messages in one call, or their search hits
CALL_TIMEOUT = 60.0


class MemoryClient(Protocol):
    """Memory's public async interface; see ``tabagent.storage.memory.Memory`` for each call."""

    async def close(self) -> None: ...

    async def create_conversation(
        self,
        *,
        conversation_id: str | None = None,
        title: str = "",
        model: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Conversation: ...

    async def list_conversations(
        self, *, limit: int = 50, before: float | None = None, tag: str | None = None
    ) -> list[Conversation]: ...

    async def get_conversation(self, conversation_id: str) -> Conversation: ...

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        title: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Conversation: ...

    async def delete_conversation(self, conversation_id: str) -> int: ...

    async def add_messages(
        self,
        conversation_id: str,
        messages: Sequence[NewMessage],
        *,
        create: bool = True,
        embed: bool = True,
    ) -> list[Message]: ...

    async def messages(
        self, conversation_id: str, *, limit: int = 1000, after_id: int = 0, newest: bool = False
    ) -> list[Message]: ...

    async def message(self, message_id: int) -> Message: ...

    async def search(self, query: SearchQuery) -> list[SearchHit]: ...

    async def upsert_entity(
        self,
        name: str,
        *,
        type: str = "thing",
        aliases: Sequence[str] = (),
        attributes: dict[str, Any] | None = None,
        provenance: str | None = None,
    ) -> Entity: ...

    async def add_relation(
        self,
        source_id: int,
        relation: str,
        target_id: int,
        *,
        weight: float = 1.0,
        provenance: str | None = None,
    ) -> Relation: ...

    async def add_fact(
        self,
        text: str,
        *,
        entity_ids: Sequence[int] = (),
        confidence: float = 1.0,
        provenance: str | None = None,
        embed: bool = True,
    ) -> Fact: ...

    async def entity(self, entity_id: int) -> Entity: ...

    async def entities(
        self, *, limit: int = 100, type: str | None = None, query: str | None = None
    ) -> list[Entity]: ...

    async def facts(self, *, entity_id: int | None = None, limit: int = 100) -> list[Fact]: ...

    async def traverse(
        self,
        start_id: int,
        *,
        hops: int = 2,
        relations: Sequence[str] = (),
        direction: str = "both",
        limit: int = 500,
    ) -> Graph: ...

    async def consolidate(self) -> list[tuple[int, int]]: ...

    async def record_tool_result(self, **fields: Any) -> ToolResult: ...

    async def tool_result_list(self, **filters: Any) -> list[ToolResult]: ...

    async def record_episode(self, **fields: Any) -> Episode: ...

    async def episodes(self, **filters: Any) -> list[Episode]: ...

    async def add_summary(
        self,
        text: str,
        *,
        conversation_id: str | None = None,
        period: str = "conversation",
        covers_to_message_id: int | None = None,
        embed: bool = True,
    ) -> Summary: ...

    async def latest_summary(self, conversation_id: str) -> Summary | None: ...

    async def stats(self) -> dict[str, dict[str, Any]]: ...


class RemoteMemory:
    """A :class:`MemoryClient` over a gRPC channel to ``DatabaseService``.

    Each method sends its arguments as they are (defaults included), so the server's
    ``Memory`` sees the same call a local caller would make. Errors come back as the
    ``TabAgentError`` the server raised (``tabagent.storage.wire``).
    """

    def __init__(self, channel: grpc.aio.Channel, token: str, *, call_timeout: float) -> None:
        self._channel = channel
        self._stub = pb_grpc.DatabaseServiceStub(channel)  # type: ignore[no-untyped-call]
        self._metadata = ((TOKEN_METADATA, token),)
        self._timeout = call_timeout

    @classmethod
    async def connect(
        cls,
        address: str,
        token: str,
        *,
        call_timeout: float = CALL_TIMEOUT,
        ready_timeout: float = 10.0,
    ) -> RemoteMemory:
        """Open a channel and wait (up to ``ready_timeout``) until the service answers healthy.

        Connecting checks the token too, so a misconfigured client fails here, not on its
        first write. ``call_timeout`` is the deadline of every later call.
        """
        channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        client = cls(channel, token, call_timeout=call_timeout)
        try:
            await client._ready(address, ready_timeout)
        except BaseException:
            await channel.close()
            raise
        return client

    async def _ready(self, address: str, ready_timeout: float) -> None:
        health = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                metadata=self._metadata,
                timeout=ready_timeout,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, f"connecting to {address}") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ServiceUnavailable(
                f"the database server at {address} is not serving",
                code="database_unavailable",
                retry_after=1,
            )
        log.debug("connected to the database server at %s", address)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> RemoteMemory:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, method: str, request: ProtoMessage) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, method) from None

    # -- conversations ----------------------------------------------------------------------

    async def create_conversation(
        self,
        *,
        conversation_id: str | None = None,
        title: str = "",
        model: str | None = None,
        tags: Sequence[str] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        request = build(
            pb.CreateConversationRequest,
            {
                "conversation_id": conversation_id,
                "title": title,
                "model": model,
                "tags": tags,
                "metadata": metadata,
            },
        )
        return from_proto(await self._call("CreateConversation", request), Conversation)

    async def list_conversations(
        self, *, limit: int = 50, before: float | None = None, tag: str | None = None
    ) -> list[Conversation]:
        request = build(pb.ListConversationsRequest, {"limit": limit, "before": before, "tag": tag})
        reply = await self._call("ListConversations", request)
        return [from_proto(c, Conversation) for c in reply.conversations]

    async def get_conversation(self, conversation_id: str) -> Conversation:
        request = pb.GetConversationRequest(conversation_id=conversation_id)
        return from_proto(await self._call("GetConversation", request), Conversation)

    async def update_conversation(
        self,
        conversation_id: str,
        *,
        title: str | None = None,
        tags: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Conversation:
        request = build(
            pb.UpdateConversationRequest,
            {
                "conversation_id": conversation_id,
                "title": title,
                "tags": tags,
                "metadata": metadata,
            },
        )
        return from_proto(await self._call("UpdateConversation", request), Conversation)

    async def delete_conversation(self, conversation_id: str) -> int:
        request = pb.DeleteConversationRequest(conversation_id=conversation_id)
        reply = await self._call("DeleteConversation", request)
        return int(reply.deleted_messages)

    async def add_messages(
        self,
        conversation_id: str,
        messages: Sequence[NewMessage],
        *,
        create: bool = True,
        embed: bool = True,
    ) -> list[Message]:
        request = build(
            pb.AddMessagesRequest,
            {
                "conversation_id": conversation_id,
                "messages": messages,
                "create": create,
                "embed": embed,
            },
        )
        reply = await self._call("AddMessages", request)
        return [from_proto(m, Message) for m in reply.messages]

    async def messages(
        self, conversation_id: str, *, limit: int = 1000, after_id: int = 0, newest: bool = False
    ) -> list[Message]:
        request = pb.ListMessagesRequest(
            conversation_id=conversation_id, limit=limit, after_id=after_id, newest=newest
        )
        reply = await self._call("ListMessages", request)
        return [from_proto(m, Message) for m in reply.messages]

    async def message(self, message_id: int) -> Message:
        request = pb.GetMessageRequest(message_id=message_id)
        return from_proto(await self._call("GetMessage", request), Message)

    # -- search -----------------------------------------------------------------------------

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        request = build(pb.SearchRequest, dataclasses.asdict(query))
        reply = await self._call("Search", request)
        return [from_proto(h, SearchHit) for h in reply.hits]

    # -- knowledge --------------------------------------------------------------------------

    async def upsert_entity(
        self,
        name: str,
        *,
        type: str = "thing",
        aliases: Sequence[str] = (),
        attributes: dict[str, Any] | None = None,
        provenance: str | None = None,
    ) -> Entity:
        request = build(
            pb.UpsertEntityRequest,
            {
                "name": name,
                "type": type,
                "aliases": aliases,
                "attributes": attributes,
                "provenance": provenance,
            },
        )
        return from_proto(await self._call("UpsertEntity", request), Entity)

    async def add_relation(
        self,
        source_id: int,
        relation: str,
        target_id: int,
        *,
        weight: float = 1.0,
        provenance: str | None = None,
    ) -> Relation:
        request = build(
            pb.AddRelationRequest,
            {
                "source_id": source_id,
                "relation": relation,
                "target_id": target_id,
                "weight": weight,
                "provenance": provenance,
            },
        )
        return from_proto(await self._call("AddRelation", request), Relation)

    async def add_fact(
        self,
        text: str,
        *,
        entity_ids: Sequence[int] = (),
        confidence: float = 1.0,
        provenance: str | None = None,
        embed: bool = True,
    ) -> Fact:
        request = build(
            pb.AddFactRequest,
            {
                "text": text,
                "entity_ids": entity_ids,
                "confidence": confidence,
                "provenance": provenance,
                "embed": embed,
            },
        )
        return from_proto(await self._call("AddFact", request), Fact)

    async def entity(self, entity_id: int) -> Entity:
        request = pb.GetEntityRequest(entity_id=entity_id)
        return from_proto(await self._call("GetEntity", request), Entity)

    async def entities(
        self, *, limit: int = 100, type: str | None = None, query: str | None = None
    ) -> list[Entity]:
        request = build(pb.ListEntitiesRequest, {"limit": limit, "type": type, "query": query})
        reply = await self._call("ListEntities", request)
        return [from_proto(e, Entity) for e in reply.entities]

    async def facts(self, *, entity_id: int | None = None, limit: int = 100) -> list[Fact]:
        request = build(pb.ListFactsRequest, {"entity_id": entity_id, "limit": limit})
        reply = await self._call("ListFacts", request)
        return [from_proto(f, Fact) for f in reply.facts]

    async def traverse(
        self,
        start_id: int,
        *,
        hops: int = 2,
        relations: Sequence[str] = (),
        direction: str = "both",
        limit: int = 500,
    ) -> Graph:
        request = pb.TraverseRequest(
            start_id=start_id, hops=hops, relations=relations, direction=direction, limit=limit
        )
        return from_proto(await self._call("Traverse", request), Graph)

    async def consolidate(self) -> list[tuple[int, int]]:
        reply = await self._call("Consolidate", pb.ConsolidateRequest())
        return [(int(m.merged_id), int(m.surviving_id)) for m in reply.merges]

    # -- tool results, experience, summaries ------------------------------------------------

    async def record_tool_result(self, **fields: Any) -> ToolResult:
        request = build(pb.RecordToolResultRequest, fields)
        return from_proto(await self._call("RecordToolResult", request), ToolResult)

    async def tool_result_list(self, **filters: Any) -> list[ToolResult]:
        request = build(pb.ListToolResultsRequest, filters)
        reply = await self._call("ListToolResults", request)
        return [from_proto(t, ToolResult) for t in reply.tool_results]

    async def record_episode(self, **fields: Any) -> Episode:
        request = build(pb.RecordEpisodeRequest, fields)
        return from_proto(await self._call("RecordEpisode", request), Episode)

    async def episodes(self, **filters: Any) -> list[Episode]:
        request = build(pb.ListEpisodesRequest, filters)
        reply = await self._call("ListEpisodes", request)
        return [from_proto(e, Episode) for e in reply.episodes]

    async def add_summary(
        self,
        text: str,
        *,
        conversation_id: str | None = None,
        period: str = "conversation",
        covers_to_message_id: int | None = None,
        embed: bool = True,
    ) -> Summary:
        request = build(
            pb.AddSummaryRequest,
            {
                "text": text,
                "conversation_id": conversation_id,
                "period": period,
                "covers_to_message_id": covers_to_message_id,
                "embed": embed,
            },
        )
        return from_proto(await self._call("AddSummary", request), Summary)

    async def latest_summary(self, conversation_id: str) -> Summary | None:
        request = pb.LatestSummaryRequest(conversation_id=conversation_id)
        reply = await self._call("LatestSummary", request)
        return from_proto(reply.summary, Summary) if reply.HasField("summary") else None

    # -- maintenance ------------------------------------------------------------------------

    async def stats(self) -> dict[str, dict[str, Any]]:
        reply = await self._call("GetStats", pb.StatsRequest())
        stats: dict[str, dict[str, Any]] = values(reply)["stats"]
        return stats


def _error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    trailing = exc.trailing_metadata() or ()
    return error_from_status(exc.code(), exc.details() or "", tuple(trailing), what)


if TYPE_CHECKING:  # both clients have the whole interface, checked by mypy
    from tabagent.storage.memory import Memory

    _local: type[MemoryClient] = Memory
    _remote: type[MemoryClient] = RemoteMemory
