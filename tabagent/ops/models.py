"""Models: list (OpenAI format plus local details), get, load, unload."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.ml.orchestrator import ModelSpec
from tabagent.ops.chat import parse_keep_alive
from tabagent.ops.registry import Empty, Http, OpContext, OperationGroup

group = OperationGroup(tag="models")
_CREATED = int(time.time())


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: str = Field(description="chat, embedding or vision")
    backend: str
    size_bytes: int
    loaded: bool
    description: str = ""
    context_length: int | None = None
    embedding_dimensions: int | None = None
    memory_bytes: int | None = Field(None, description="Measured when loaded.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=256)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    keep_alive: float | str | None = Field(
        None, description="How long to keep it loaded when idle."
    )


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)


class UnloadResponse(BaseModel):
    model: str
    unloaded: bool = Field(description="False when it was not loaded.")


def _card(spec: ModelSpec, info: pb.ModelInfo | None) -> ModelCard:
    return ModelCard(
        id=spec.id,
        created=_CREATED,
        owned_by=spec.owned_by,
        kind=spec.kind,
        backend=pb.Backend.Name(spec.backend).lower(),
        size_bytes=spec.size_bytes,
        loaded=info is not None,
        description=spec.description,
        context_length=(info.context_length or None) if info else None,
        embedding_dimensions=(info.embedding_dimensions or None) if info else None,
        memory_bytes=(info.memory_bytes or None) if info else None,
    )


@group.operation("models.list", http=Http("GET", "/v1/models"))
async def list_models(ctx: OpContext, req: Empty) -> ModelList:
    """Every model this server can use, and whether it is loaded now."""
    orchestrator = ctx.state.require_ml().orchestrator
    loaded = orchestrator.loaded()
    return ModelList(data=[_card(s, loaded.get(s.id)) for s in orchestrator.catalog.values()])


@group.operation("models.get", http=Http("GET", "/v1/models/{id}"))
async def get_model(ctx: OpContext, req: ModelRef) -> ModelCard:
    """One model; 404 model_not_found if it does not exist."""
    orchestrator = ctx.state.require_ml().orchestrator
    return _card(orchestrator.spec(req.id), orchestrator.loaded().get(req.id))


@group.operation("models.load", http=Http("POST", "/v1/models/load"))
async def load_model(ctx: OpContext, req: LoadRequest) -> ModelCard:
    """Load a model now (instead of on first use)."""
    orchestrator = ctx.state.require_ml().orchestrator
    spec = orchestrator.spec(req.model)
    info = await orchestrator.load(req.model, ctx.request_id, parse_keep_alive(req.keep_alive))
    return _card(spec, info)


@group.operation("models.unload", http=Http("POST", "/v1/models/unload"))
async def unload_model(ctx: OpContext, req: UnloadRequest) -> UnloadResponse:
    """Free a model's memory now."""
    orchestrator = ctx.state.require_ml().orchestrator
    unloaded = await orchestrator.unload(req.model, ctx.request_id)
    return UnloadResponse(model=req.model, unloaded=unloaded)
