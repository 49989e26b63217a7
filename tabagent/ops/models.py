"""Models: list (OpenAI format plus local details), get, load, unload."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.ml.orchestrator import ModelSpec, cached_spec
from tabagent.models.cache import CachedModel
from tabagent.models.pull import PullEvent
from tabagent.models.refs import parse_ref
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
    n_threads: int | None = Field(None, description="GGUF models: generation threads in use.")
    n_gpu_layers: int | None = Field(
        None, description="GGUF models: layers offloaded to a GPU (-1: all, 0: none)."
    )


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
        n_threads=(info.n_threads or None) if info else None,
        n_gpu_layers=info.n_gpu_layers if info and spec.backend == pb.LLAMA_CPP else None,
    )


@group.operation("models.list", http=Http("GET", "/v1/models"))
async def list_models(ctx: OpContext, req: Empty) -> ModelList:
    """Every model this server can use, and whether it is loaded now."""
    orchestrator = ctx.state.require_ml().orchestrator
    loaded = orchestrator.loaded()
    return ModelList(data=[_card(s, loaded.get(s.id)) for s in orchestrator.catalog.values()])


@group.operation("models.get", http=Http("GET", "/v1/models/{id:.+}"))
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


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        max_length=512,
        description="org/repo, org/repo:QUANT, org/repo/path/to/file, each with optional @revision",
    )
    refresh: bool = Field(False, description="Ask the Hub even if the pull is complete locally.")


class PullProgress(BaseModel):
    event_name: ClassVar[str] = "progress"
    status: str = Field(description="resolved, progress or file_done")
    file: str = Field("", description="The file this event is about (none for resolved).")
    completed: int = Field(description="Bytes of the whole pull on the disk.")
    total: int = Field(description="Bytes of the whole pull.")
    file_completed: int = Field(0, description="Bytes of `file` on the disk.")
    file_total: int = Field(0, description="Bytes of `file`.")


class PullDone(BaseModel):
    event_name: ClassVar[str] = "done"
    status: str = "success"
    model: ModelCard
    cached: bool = Field(description="Everything was already in the cache: no network was used.")
    files: list[str]


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=512)


class DeleteResponse(BaseModel):
    id: str
    deleted: bool
    freed_bytes: int


@group.operation("models.pull", http=Http("POST", "/v1/models/pull"))
async def pull_model(ctx: OpContext, req: PullRequest) -> AsyncIterator[PullProgress | PullDone]:
    """Download a model from the Hugging Face Hub, streaming progress; usable right away.

    Cancelling (closing the stream) leaves a resumable download: pull again to continue.
    """
    models = ctx.state.require_models()
    ref = parse_ref(req.model)
    events: asyncio.Queue[PullEvent] = asyncio.Queue()
    cached = False

    def on_event(event: PullEvent) -> None:
        nonlocal cached
        cached = cached or event.cached
        if event.kind != "done":
            events.put_nowait(event)

    async def run() -> CachedModel:
        async with models.lock_for(str(ref)):
            return await models.puller.pull(ref, on_event, refresh=req.refresh)

    task = asyncio.create_task(run())
    last_progress = 0.0
    try:
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            event = getter.result()
            now = time.monotonic()
            if event.kind == "progress" and now - last_progress < 0.1:
                continue  # at most ten progress events a second
            last_progress = now
            yield PullProgress(
                status=event.kind, file=event.file, completed=event.done, total=event.total,
                file_completed=event.file_done, file_total=event.file_total,
            )  # fmt: skip
        model = task.result()
    finally:
        if not task.done():
            task.cancel()  # the client went away: stop; the partial download stays resumable
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    paths = models.paths(model)
    spec = None
    if ctx.state.ml is not None:
        spec = cached_spec(model, [Path(p) for p in paths])
        if spec is not None:
            ctx.state.ml.orchestrator.register(spec)
    protected = set(ctx.state.ml.orchestrator.loaded()) if ctx.state.ml else set()
    await models.enforce_budget(protected | {model.ref})
    card = _card(spec, None) if spec else ModelCard(
        id=model.ref, created=int(model.pulled_at), owned_by=model.repo_id.split("/")[0],
        kind="files", backend="none", size_bytes=model.size, loaded=False,
    )  # fmt: skip
    yield PullDone(model=card, cached=cached, files=paths)


@group.operation("models.delete", http=Http("DELETE", "/v1/models/{id:.+}"))
async def delete_model(ctx: OpContext, req: DeleteRequest) -> DeleteResponse:
    """Remove a pulled model from the cache (unloading it first)."""
    models = ctx.state.require_models()
    ref = parse_ref(req.id)
    if ctx.state.ml is not None and str(ref) in ctx.state.ml.orchestrator.catalog:
        await ctx.state.ml.orchestrator.unload(str(ref), ctx.request_id)
        ctx.state.ml.orchestrator.catalog.pop(str(ref), None)
    freed = await asyncio.to_thread(models.cache.remove, str(ref), ref.repo_id)
    return DeleteResponse(id=str(ref), deleted=True, freed_bytes=freed)
