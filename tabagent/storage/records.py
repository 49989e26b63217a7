"""What the memory layer stores and answers, as pydantic models.

The same models are the response bodies of the memory operations (HTTP, native messaging,
data channel) and travel as JSON through the remote database client, so there is one
definition of a message, a fact or a search hit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["system", "user", "assistant", "tool"]
Source = Literal["messages", "facts", "entities", "summaries", "experience", "tool_results"]

# A vector's label packs what it points at: the kind's code in the high bits, the row id below.
KIND_CODES = {"message": 1, "fact": 2, "entity": 3, "summary": 4, "experience": 5, "document": 6}
_KINDS = {code: kind for kind, code in KIND_CODES.items()}
_ROW_BITS = 48


def vector_label(kind: str, row_id: int) -> int:
    return (KIND_CODES[kind] << _ROW_BITS) | row_id


def label_parts(label: int) -> tuple[str, int]:
    return _KINDS[label >> _ROW_BITS], label & ((1 << _ROW_BITS) - 1)


class Conversation(BaseModel):
    id: str
    title: str = ""
    model: str | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    updated_at: float
    message_count: int = 0


class Message(BaseModel):
    id: int
    conversation_id: str
    role: Role
    content: str
    model: str | None = None
    created_at: float
    embedded: bool = Field(False, description="Whether a vector of this message is stored.")


class NewMessage(BaseModel):
    """A message to append; ``vector`` (with its ``embedding_model``) is stored with it."""

    role: Role
    content: str
    model: str | None = None
    created_at: float | None = None


class Entity(BaseModel):
    id: int
    name: str
    type: str = "thing"
    aliases: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    updated_at: float


class Relation(BaseModel):
    id: int
    source_id: int
    relation: str
    target_id: int
    weight: float = 1.0
    provenance: list[str] = Field(default_factory=list)
    created_at: float


class Fact(BaseModel):
    id: int
    text: str
    entity_ids: list[int] = Field(default_factory=list)
    confidence: float = 1.0
    provenance: list[str] = Field(default_factory=list)
    created_at: float


class Graph(BaseModel):
    """What a traversal reached: the entities, the relations among them, and each entity's
    distance in hops from the start (the start itself is 0)."""

    entities: list[Entity] = Field(default_factory=list)
    relations: list[Relation] = Field(default_factory=list)
    distances: dict[int, int] = Field(default_factory=dict)


class ToolResult(BaseModel):
    id: int
    conversation_id: str | None = None
    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    result: Any = None
    error: str | None = None
    duration_ms: float | None = None
    created_at: float


class Episode(BaseModel):
    id: int
    conversation_id: str | None = None
    event: str
    outcome: str | None = None
    feedback: str | None = None
    score: float | None = None
    created_at: float


class Summary(BaseModel):
    id: int
    conversation_id: str | None = None
    period: str = Field("conversation", description="'conversation', or a period like '2026-11'.")
    text: str
    covers_to_message_id: int | None = None
    created_at: float


class SearchHit(BaseModel):
    source: Source
    id: int
    text: str
    score: float = Field(description="Fused score: higher is better.")
    conversation_id: str | None = None
    role: Role | None = None
    created_at: float
    keyword_rank: int | None = None
    vector_rank: int | None = None
