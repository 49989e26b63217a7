"""Serve a ``Memory`` over gRPC: ``DatabaseService`` (``protos/database.proto``).

The process that owns the seven databases serves them here, so another process (the native
host proxying to a running server, a second machine) gets the same interface through
``tabagent.storage.client.RemoteMemory`` without opening the files twice: SQLite in WAL mode
and LanceDB take one writer, and the vector index lives in this process's memory.

Each handler is one line of conversion around one ``Memory`` call (``tabagent.storage.wire``
converts). Every call must carry the per-launch token (``ml_service.lifecycle.TokenInterceptor``
refuses it with UNAUTHENTICATED before any handler runs, so a refused call writes nothing).
A ``TabAgentError`` becomes its status code with the class, code and param in trailing
metadata; anything else is logged here and sent as INTERNAL (a ``StorageError`` for the client).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
import pydantic
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ml_service.lifecycle import TokenInterceptor
from ml_service.proto import database_pb2 as pb
from ml_service.proto import database_pb2_grpc as pb_grpc
from tabagent.errors import StorageError, TabAgentError, ValidationFailed
from tabagent.storage.client import MAX_MESSAGE_BYTES, SERVICE_NAME, MemoryClient
from tabagent.storage.records import NewMessage
from tabagent.storage.search import SearchQuery
from tabagent.storage.wire import (
    ProtoMessage,
    dumps,
    error_metadata,
    status_of,
    to_proto,
    values,
)

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=ProtoMessage)
Rep = TypeVar("Rep", bound=ProtoMessage)
Handler = Callable[["DatabaseServicer", Req], Awaitable[Rep]]
GrpcHandler = Callable[["DatabaseServicer", Req, grpc.aio.ServicerContext], Awaitable[Rep]]


async def _abort(context: grpc.aio.ServicerContext, exc: TabAgentError) -> NoReturn:
    await context.abort(status_of(exc), exc.message, trailing_metadata=error_metadata(exc))
    raise AssertionError("unreachable")  # abort raises


def _rpc(handler: Handler[Req, Rep]) -> GrpcHandler[Req, Rep]:
    """A gRPC method from ``handler(self, request)``: errors become status + metadata."""

    @functools.wraps(handler)
    async def call(self: DatabaseServicer, request: Req, context: grpc.aio.ServicerContext) -> Rep:
        try:
            return await handler(self, request)
        except TabAgentError as exc:
            log.debug("%s: %s (%s)", handler.__name__, exc.message, exc.code)
            await _abort(context, exc)
        except pydantic.ValidationError as exc:
            await _abort(context, ValidationFailed(str(exc)))
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            await _abort(context, StorageError(f"{type(exc).__name__}: {exc}"))

    return call


class DatabaseServicer(pb_grpc.DatabaseServiceServicer):
    """``DatabaseService`` over one memory client (a ``Memory``, normally)."""

    def __init__(self, memory: MemoryClient) -> None:
        self.memory = memory

    # -- conversations ----------------------------------------------------------------------

    @_rpc
    async def CreateConversation(self, request: pb.CreateConversationRequest) -> pb.Conversation:
        conv = await self.memory.create_conversation(**values(request))
        return to_proto(conv, pb.Conversation)

    @_rpc
    async def ListConversations(self, request: pb.ListConversationsRequest) -> pb.ConversationList:
        found = await self.memory.list_conversations(**values(request))
        return pb.ConversationList(conversations=[to_proto(c, pb.Conversation) for c in found])

    @_rpc
    async def GetConversation(self, request: pb.GetConversationRequest) -> pb.Conversation:
        conv = await self.memory.get_conversation(request.conversation_id)
        return to_proto(conv, pb.Conversation)

    @_rpc
    async def UpdateConversation(self, request: pb.UpdateConversationRequest) -> pb.Conversation:
        conv = await self.memory.update_conversation(**values(request))
        return to_proto(conv, pb.Conversation)

    @_rpc
    async def DeleteConversation(
        self, request: pb.DeleteConversationRequest
    ) -> pb.DeleteConversationResponse:
        count = await self.memory.delete_conversation(request.conversation_id)
        return pb.DeleteConversationResponse(deleted_messages=count)

    @_rpc
    async def AddMessages(self, request: pb.AddMessagesRequest) -> pb.MessageList:
        kwargs = values(request)
        kwargs["messages"] = [NewMessage.model_validate(m) for m in kwargs["messages"]]
        stored = await self.memory.add_messages(**kwargs)
        return pb.MessageList(messages=[to_proto(m, pb.Message) for m in stored])

    @_rpc
    async def ListMessages(self, request: pb.ListMessagesRequest) -> pb.MessageList:
        found = await self.memory.messages(**values(request))
        return pb.MessageList(messages=[to_proto(m, pb.Message) for m in found])

    @_rpc
    async def GetMessage(self, request: pb.GetMessageRequest) -> pb.Message:
        return to_proto(await self.memory.message(request.message_id), pb.Message)

    # -- search -----------------------------------------------------------------------------

    @_rpc
    async def Search(self, request: pb.SearchRequest) -> pb.SearchResponse:
        hits = await self.memory.search(SearchQuery(**values(request)))
        return pb.SearchResponse(hits=[to_proto(h, pb.SearchHit) for h in hits])

    # -- knowledge --------------------------------------------------------------------------

    @_rpc
    async def UpsertEntity(self, request: pb.UpsertEntityRequest) -> pb.Entity:
        return to_proto(await self.memory.upsert_entity(**values(request)), pb.Entity)

    @_rpc
    async def AddRelation(self, request: pb.AddRelationRequest) -> pb.Relation:
        return to_proto(await self.memory.add_relation(**values(request)), pb.Relation)

    @_rpc
    async def AddFact(self, request: pb.AddFactRequest) -> pb.Fact:
        return to_proto(await self.memory.add_fact(**values(request)), pb.Fact)

    @_rpc
    async def GetEntity(self, request: pb.GetEntityRequest) -> pb.Entity:
        return to_proto(await self.memory.entity(request.entity_id), pb.Entity)

    @_rpc
    async def ListEntities(self, request: pb.ListEntitiesRequest) -> pb.EntityList:
        found = await self.memory.entities(**values(request))
        return pb.EntityList(entities=[to_proto(e, pb.Entity) for e in found])

    @_rpc
    async def ListFacts(self, request: pb.ListFactsRequest) -> pb.FactList:
        found = await self.memory.facts(**values(request))
        return pb.FactList(facts=[to_proto(f, pb.Fact) for f in found])

    @_rpc
    async def Traverse(self, request: pb.TraverseRequest) -> pb.Graph:
        return to_proto(await self.memory.traverse(**values(request)), pb.Graph)

    @_rpc
    async def Consolidate(self, request: pb.ConsolidateRequest) -> pb.ConsolidateResponse:
        merges = await self.memory.consolidate()
        return pb.ConsolidateResponse(
            merges=[pb.EntityMerge(merged_id=a, surviving_id=b) for a, b in merges]
        )

    # -- tool results, experience, summaries ------------------------------------------------

    @_rpc
    async def RecordToolResult(self, request: pb.RecordToolResultRequest) -> pb.ToolResult:
        return to_proto(await self.memory.record_tool_result(**values(request)), pb.ToolResult)

    @_rpc
    async def ListToolResults(self, request: pb.ListToolResultsRequest) -> pb.ToolResultList:
        found = await self.memory.tool_result_list(**values(request))
        return pb.ToolResultList(tool_results=[to_proto(t, pb.ToolResult) for t in found])

    @_rpc
    async def RecordEpisode(self, request: pb.RecordEpisodeRequest) -> pb.Episode:
        return to_proto(await self.memory.record_episode(**values(request)), pb.Episode)

    @_rpc
    async def ListEpisodes(self, request: pb.ListEpisodesRequest) -> pb.EpisodeList:
        found = await self.memory.episodes(**values(request))
        return pb.EpisodeList(episodes=[to_proto(e, pb.Episode) for e in found])

    @_rpc
    async def AddSummary(self, request: pb.AddSummaryRequest) -> pb.Summary:
        return to_proto(await self.memory.add_summary(**values(request)), pb.Summary)

    @_rpc
    async def LatestSummary(self, request: pb.LatestSummaryRequest) -> pb.LatestSummaryResponse:
        found = await self.memory.latest_summary(request.conversation_id)
        if found is None:
            return pb.LatestSummaryResponse()
        return pb.LatestSummaryResponse(summary=to_proto(found, pb.Summary))

    # -- maintenance ------------------------------------------------------------------------

    @_rpc
    async def GetStats(self, request: pb.StatsRequest) -> pb.StatsResponse:
        return pb.StatsResponse(stats_json=dumps(await self.memory.stats()))


def _socket_folder(address: str) -> None:
    """A private folder for a Unix socket (the file permissions guard who may connect)."""
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:").removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)


async def serve_database(memory: MemoryClient, address: str, token: str) -> grpc.aio.Server:
    """Start serving ``memory`` at ``address`` (``unix:///path/db.sock`` or ``HOST:PORT``).

    Returns the started server; the caller stops it (``await server.stop(grace)``) before
    closing ``memory``. With a TCP port of 0 the port gRPC picked is only logged, so callers
    that must connect pick a free port first (as the ML supervisor does).
    """
    _socket_folder(address)
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    pb_grpc.add_DatabaseServiceServicer_to_server(DatabaseServicer(memory), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StorageError(
            f"the database service cannot listen on {address}: {exc}", code="database_listen"
        ) from None
    if port == 0 and not address.startswith("unix:"):
        raise StorageError(
            f"the database service cannot listen on {address}", code="database_listen"
        )
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("database service on %s (bound port %d)", address, port)
    return server
