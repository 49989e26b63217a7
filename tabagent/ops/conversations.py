"""Conversations and their messages, kept in the ``conversations`` database.

Chat persists turns here when a request names a conversation (see ``chat.complete``); these
operations let a client list, read, write and delete them directly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tabagent.ops.registry import Http, OpContext, OperationGroup
from tabagent.storage.records import Conversation, Message, NewMessage

group = OperationGroup(tag="conversations")

MAX_CONTENT_CHARS = 200_000
ID_PATTERN = r"^[A-Za-z0-9._:\-]+$"


class ConversationList(BaseModel):
    object: str = "list"
    data: list[Conversation]


class ListConversations(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(50, ge=1, le=1000)
    before: float | None = Field(None, description="Page: updated before this Unix time.")
    tag: str | None = Field(None, max_length=64)


class CreateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(
        None, min_length=1, max_length=128, pattern=ID_PATTERN, description="Default: conv_…"
    )
    title: str = Field("", max_length=500)
    model: str | None = Field(None, max_length=256)
    tags: list[str] = Field(default_factory=list, max_length=32)
    metadata: dict[str, Any] = Field(default_factory=dict)


class ConversationRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)


class UpdateConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    title: str | None = Field(None, max_length=500)
    tags: list[str] | None = Field(None, max_length=32)
    metadata: dict[str, Any] | None = None


class Deleted(BaseModel):
    id: str
    deleted: bool = True
    messages: int = Field(description="Messages deleted with it.")


class ListMessages(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    limit: int = Field(200, ge=1, le=5000)
    after_id: int = Field(0, ge=0, description="Page: messages after this id.")


class MessageList(BaseModel):
    object: str = "list"
    data: list[Message]


class BoundedMessage(NewMessage):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(max_length=MAX_CONTENT_CHARS)


class AppendMessages(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    messages: list[BoundedMessage] = Field(min_length=1, max_length=1000)


@group.operation("conversations.list", http=Http("GET", "/v1/conversations"))
async def list_conversations(ctx: OpContext, req: ListConversations) -> ConversationList:
    """Conversations, most recently updated first."""
    memory = ctx.state.require_memory()
    data = await memory.list_conversations(limit=req.limit, before=req.before, tag=req.tag)
    return ConversationList(data=data)


@group.operation("conversations.create", http=Http("POST", "/v1/conversations", status=201))
async def create(ctx: OpContext, req: CreateConversation) -> Conversation:
    """Start a conversation (chat also creates one on first use of a new id)."""
    return await ctx.state.require_memory().create_conversation(
        conversation_id=req.id, title=req.title, model=req.model, tags=req.tags,
        metadata=req.metadata,
    )  # fmt: skip


@group.operation("conversations.get", http=Http("GET", "/v1/conversations/{id}"))
async def get(ctx: OpContext, req: ConversationRef) -> Conversation:
    """One conversation with its message count."""
    return await ctx.state.require_memory().get_conversation(req.id)


@group.operation("conversations.update", http=Http("PATCH", "/v1/conversations/{id}"))
async def update(ctx: OpContext, req: UpdateConversation) -> Conversation:
    """Rename, retag or annotate a conversation."""
    return await ctx.state.require_memory().update_conversation(
        req.id, title=req.title, tags=req.tags, metadata=req.metadata
    )


@group.operation("conversations.delete", http=Http("DELETE", "/v1/conversations/{id}"))
async def delete(ctx: OpContext, req: ConversationRef) -> Deleted:
    """Delete a conversation with its messages, their vectors and its summaries."""
    count = await ctx.state.require_memory().delete_conversation(req.id)
    return Deleted(id=req.id, messages=count)


@group.operation("conversations.messages", http=Http("GET", "/v1/conversations/{id}/messages"))
async def messages(ctx: OpContext, req: ListMessages) -> MessageList:
    """Messages of a conversation, oldest first."""
    memory = ctx.state.require_memory()
    await memory.get_conversation(req.id)  # 404 for an unknown conversation, not an empty list
    data = await memory.messages(req.id, limit=req.limit, after_id=req.after_id)
    return MessageList(data=data)


@group.operation(
    "conversations.append", http=Http("POST", "/v1/conversations/{id}/messages", status=201)
)
async def append(ctx: OpContext, req: AppendMessages) -> MessageList:
    """Append messages (embedded for memory search when an embedding model is available)."""
    memory = ctx.state.require_memory()
    data = await memory.add_messages(req.id, req.messages, create=False)
    return MessageList(data=data)
