"""Memory: search, the knowledge graph, remembering text, statistics and backup.

Every route here is an operation, so native messaging and the data channel reach the same
memory with the same validation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tabagent.errors import BadRequest
from tabagent.ops.registry import Empty, Http, OpContext, OperationGroup
from tabagent.storage.backup import BackupInfo
from tabagent.storage.records import Entity, Fact, Graph, Relation, SearchHit, Source
from tabagent.storage.search import SearchQuery

group = OperationGroup(tag="memory")

MAX_QUERY_CHARS = 4000
MAX_TEXT_CHARS = 20_000
Name = Field(min_length=1, max_length=200)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    mode: Literal["hybrid", "keyword", "vector"] = "hybrid"
    sources: list[Source] = Field(["messages", "facts", "summaries"], min_length=1)
    k: int = Field(10, ge=1, le=200)
    conversation_id: str | None = Field(None, max_length=128)
    roles: list[Literal["system", "user", "assistant", "tool"]] = Field(default_factory=list)
    since: float | None = Field(None, description="Unix time, inclusive.")
    until: float | None = Field(None, description="Unix time, exclusive.")
    tags: list[str] = Field(default_factory=list, max_length=32)
    recency_half_life_days: float | None = Field(
        None, gt=0, le=36500, description="Weigh newer memories up: halves every N days."
    )


class SearchResults(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
    took_ms: float


class EntityList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Entity]


class FactList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Fact]


class ListEntities(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(100, ge=1, le=1000)
    type: str | None = Field(None, max_length=64)
    query: str | None = Field(None, max_length=200)


class UpsertEntity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Name
    type: str = Field("thing", min_length=1, max_length=64)
    aliases: list[str] = Field(default_factory=list, max_length=32)
    attributes: dict[str, Any] = Field(default_factory=dict)
    provenance: str | None = Field(None, max_length=200)


class AddRelation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_id: int = Field(ge=1)
    relation: str = Field(min_length=1, max_length=64, pattern=r"^[\w\-. ]+$")
    target_id: int = Field(ge=1)
    weight: float = Field(1.0, ge=0, le=1e6)
    provenance: str | None = Field(None, max_length=200)


class ListFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entity_id: int | None = Field(None, ge=1)
    limit: int = Field(100, ge=1, le=1000)


class AddFact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    entity_ids: list[int] = Field(default_factory=list, max_length=64)
    confidence: float = Field(1.0, ge=0, le=1)
    provenance: str | None = Field(None, max_length=200)


class TraverseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=1, description="The entity to start from.")
    hops: int = Field(2, ge=1, le=6)
    relations: list[str] = Field(default_factory=list, max_length=32)
    direction: Literal["out", "in", "both"] = "both"
    limit: int = Field(500, ge=1, le=5000)


class Consolidated(BaseModel):
    merged: list[tuple[int, int]] = Field(description="(merged id, surviving id) pairs.")


class RememberRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    provenance: str | None = Field(None, max_length=200)
    use_llm: bool = Field(True, description="Ask the chat model first; rules are the fallback.")


class Remembered(BaseModel):
    method: Literal["llm", "rules"]
    entities: list[Entity]
    relations: list[Relation]
    facts: list[Fact]


class BackupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(
        None,
        max_length=4096,
        description="File or folder on the server's disk. Default: <data dir>/backups/.",
    )


class MemoryStats(BaseModel):
    stores: dict[str, dict[str, Any]]


@group.operation("memory.search", http=Http("POST", "/v1/memory/search"))
async def search(ctx: OpContext, req: SearchRequest) -> SearchResults:
    """Keyword, vector or hybrid (reciprocal-rank fusion) search over past messages, facts,
    summaries and experience, with filters and optional recency weighting."""
    memory = ctx.state.require_memory()
    started = time.perf_counter()
    hits = await memory.search(SearchQuery(**req.model_dump(exclude={"query"}), text=req.query))
    return SearchResults(data=hits, took_ms=(time.perf_counter() - started) * 1000)


@group.operation("memory.entities", http=Http("GET", "/v1/memory/knowledge/entities"))
async def entities(ctx: OpContext, req: ListEntities) -> EntityList:
    """Entities of the knowledge graph (filter by type or a name query)."""
    memory = ctx.state.require_memory()
    return EntityList(data=await memory.entities(limit=req.limit, type=req.type, query=req.query))


@group.operation("memory.upsert_entity", http=Http("POST", "/v1/memory/knowledge/entities"))
async def upsert_entity(ctx: OpContext, req: UpsertEntity) -> Entity:
    """Create an entity, or merge into the one with the same name (or alias) and type."""
    return await ctx.state.require_memory().upsert_entity(
        req.name, type=req.type, aliases=req.aliases, attributes=req.attributes,
        provenance=req.provenance,
    )  # fmt: skip


@group.operation("memory.add_relation", http=Http("POST", "/v1/memory/knowledge/relations"))
async def add_relation(ctx: OpContext, req: AddRelation) -> Relation:
    """Relate two entities (``user -has_dog-> Rex``); the same triple is stored once."""
    return await ctx.state.require_memory().add_relation(
        req.source_id, req.relation, req.target_id, weight=req.weight, provenance=req.provenance
    )


@group.operation("memory.facts", http=Http("GET", "/v1/memory/knowledge/facts"))
async def facts(ctx: OpContext, req: ListFacts) -> FactList:
    """Facts, newest first, optionally those about one entity."""
    memory = ctx.state.require_memory()
    return FactList(data=await memory.facts(entity_id=req.entity_id, limit=req.limit))


@group.operation("memory.add_fact", http=Http("POST", "/v1/memory/knowledge/facts"))
async def add_fact(ctx: OpContext, req: AddFact) -> Fact:
    """Store a fact with links to the entities it is about (embedded for vector search)."""
    return await ctx.state.require_memory().add_fact(
        req.text, entity_ids=req.entity_ids, confidence=req.confidence,
        provenance=req.provenance,
    )  # fmt: skip


@group.operation("memory.traverse", http=Http("GET", "/v1/memory/knowledge/entities/{id}/graph"))
async def traverse(ctx: OpContext, req: TraverseRequest) -> Graph:
    """The entities within ``hops`` of one entity, the relations between them, and distances."""
    return await ctx.state.require_memory().traverse(
        req.id, hops=req.hops, relations=req.relations, direction=req.direction,
        limit=req.limit,
    )  # fmt: skip


@group.operation("memory.consolidate", http=Http("POST", "/v1/memory/knowledge/consolidate"))
async def consolidate(ctx: OpContext, req: Empty) -> Consolidated:
    """Merge duplicate entities (same name, or a name that is another's alias), keeping every
    relation, fact link and provenance."""
    return Consolidated(merged=await ctx.state.require_memory().consolidate())


@group.operation("memory.remember", http=Http("POST", "/v1/memory/remember"))
async def remember(ctx: OpContext, req: RememberRequest) -> Remembered:
    """Extract entities, relations and facts from text into the knowledge graph."""
    from tabagent.ops.weaver import weave

    result = await weave(ctx, req.text, provenance=req.provenance, use_llm=req.use_llm)
    return Remembered(**result)


@group.operation("memory.stats", http=Http("GET", "/v1/memory/stats"))
async def stats(ctx: OpContext, req: Empty) -> MemoryStats:
    """Row counts, vector counts, sizes on disk and schema versions of the seven stores."""
    return MemoryStats(stores=await ctx.state.require_memory().stats())


@group.operation("memory.backup", http=Http("POST", "/v1/memory/backup"))
async def backup(ctx: OpContext, req: BackupRequest) -> BackupInfo:
    """Write one consistent archive of all seven stores while the server keeps running.
    Restore it with ``tabagent-server db restore PATH`` (server stopped)."""
    settings = ctx.state.settings
    default = settings.db_path.parent / "backups"
    target = Path(req.path) if req.path else default
    if not target.is_absolute():
        raise BadRequest("path must be absolute", param="path")
    return await ctx.state.require_memory().backup(target)
