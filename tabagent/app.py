"""Composition root: builds every component from Settings and runs the server's lifecycle.

Components are created here and handed their dependencies; each one with a lifetime is an
async context manager in ``app.cleanup_ctx`` so aiohttp starts them in order and stops them in
reverse. Nothing lives in module globals, so two servers can run in one test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from tabagent import __version__
from tabagent.api.dispatch import Runner
from tabagent.api.docs import add_docs_routes, add_web_ui
from tabagent.api.envelope_ws import add_envelope_route
from tabagent.api.keys import OPENAPI, STATE
from tabagent.api.middleware import GATE, Gate, SecurityPolicy, add_route, close_gate
from tabagent.api.openai import mount_custom
from tabagent.api.openapi import build_openapi
from tabagent.api.routes import mount_operations
from tabagent.config import Settings
from tabagent.discovery import ServerInfo, find, publish
from tabagent.errors import TabAgentError
from tabagent.hardware.detect import HardwareCache
from tabagent.metrics import CONTENT_TYPE, Metrics
from tabagent.ops import default_registry
from tabagent.ops.registry import Operation, Registry
from tabagent.state import AppState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ml_service.proto.ml_inference_pb2 import LlamaOptions
    from tabagent.ml.orchestrator import ModelSpec
    from tabagent.ml.services import MLServices
    from tabagent.models.downloader import Counters
    from tabagent.models.service import ModelService
    from tabagent.native_messaging.stdio import StdioChannel
    from tabagent.storage.memory import Memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transports:
    """Which transports a mode asks for, and which this build can serve."""

    http: bool
    webrtc: bool
    native: bool

    @classmethod
    def for_mode(cls, mode: str, *, launched_by_browser: bool = False) -> Transports:
        return cls(
            http=mode in ("http", "web", "all"),
            webrtc=mode in ("webrtc", "web", "all"),
            native=mode == "native" or (mode == "all" and launched_by_browser),
        )


# Transports whose implementation has not landed yet; a mode that needs only these refuses to
# start rather than pretend (see README, "Modes").
UNAVAILABLE_TRANSPORTS: dict[str, str] = {}

# At shutdown, how long to wait for new downloads to reach the disk (a 4 GB model on a slow disk
# takes seconds); after that their markers make the next start check them.
FLUSH_AT_EXIT_S = 20.0


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE.split(";")[0]
    response.charset = "utf-8"
    return response


def _total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # Windows
        return 8 << 30


def build_models(settings: Settings, metrics: Metrics) -> ModelService:
    """The model cache (Hugging Face layout) and the puller that fills it."""
    from tabagent.models.cache import ModelCache
    from tabagent.models.pull import Puller
    from tabagent.models.service import ModelService

    def observe(c: Counters) -> None:
        metrics.observe_download(c.bytes_fetched, c.retries, c.seconds)

    cache = ModelCache(settings.model_cache_path)
    return ModelService(
        cache=cache,
        puller=Puller(cache, on_file=observe),
        budget_bytes=settings.cache_budget_mb << 20,
    )


def build_ml(settings: Settings, state: AppState, registry: CollectorRegistry) -> MLServices:
    """The worker supervisor and the model orchestrator, wired to health and metrics."""
    from ml_service.proto import ml_inference_pb2 as pb
    from tabagent.ml.orchestrator import ModelOrchestrator, embedded_models, pulled_specs
    from tabagent.ml.services import MLMetrics, MLServices
    from tabagent.ml.supervisor import WorkerSupervisor

    metrics = MLMetrics(registry)
    supervisor = WorkerSupervisor(
        run_dir=settings.run_dir,
        cache_dir=settings.model_cache_path / "converted",
        log_dir=settings.log_dir,
        log_level=settings.log_level,
        on_state=lambda s, detail: state.components.set("ml_worker", s, detail),  # type: ignore[arg-type]
        on_restart=metrics.worker_restarts.inc,
    )
    budget = settings.ram_budget_mb << 20 or _total_ram_bytes() // 2
    catalog = embedded_models() + (pulled_specs(state.models.cache) if state.models else [])
    orchestrator = ModelOrchestrator(
        supervisor,
        catalog,
        ram_budget_bytes=budget,
        default_keep_alive=settings.keep_alive,
        max_queue=settings.max_queue,
        request_timeout=settings.request_timeout,
        llama_options=functools.partial(_llama_options, settings, state.hardware),
        onnx_options=pb.OnnxOptions(providers=list(settings.onnx_providers)),
        on_load=lambda model, seconds: metrics.model_load.labels(model).observe(seconds),
    )
    metrics.queue_depth.set_function(orchestrator.queue_depth)
    return MLServices(supervisor=supervisor, orchestrator=orchestrator, metrics=metrics)


def _llama_options(settings: Settings, hardware: HardwareCache, spec: ModelSpec) -> LlamaOptions:
    """How to load a GGUF model now: the user's settings, the rest from the hardware as it is
    (free VRAM right before the load)."""
    from ml_service.proto import ml_inference_pb2 as pb
    from tabagent.ops.hardware import plan_gguf

    plan = plan_gguf(hardware.get(refresh=True), Path(spec.path), settings)
    log.info("loading %s: %s", spec.id, "; ".join(plan.reasons))
    return pb.LlamaOptions(
        n_ctx=settings.n_ctx, n_threads=plan.n_threads, n_gpu_layers=plan.n_gpu_layers
    )


def _ml_component(ml: MLServices) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await ml.supervisor.start()
        await ml.orchestrator.start()
        yield
        await ml.orchestrator.stop()
        await ml.supervisor.stop()

    return lifetime


def build_memory(settings: Settings, ml: MLServices | None) -> Memory:
    """The seven databases; vectors come from the worker's embedding model when there is one."""
    from tabagent.errors import NotFound
    from tabagent.ml.services import WorkerEmbedder
    from tabagent.storage.memory import Memory

    embedder = None
    if ml is not None:
        try:
            embedder = WorkerEmbedder(ml)
        except NotFound:  # no embedding model installed: keyword search only
            log.warning("no embedding model: memory search is keyword-only")
    return Memory(settings.db_path, embedder=embedder)


def _memory_components(
    state: AppState, settings: Settings, *, required: bool
) -> tuple[Callable[[web.Application], AsyncIterator[None]], ...]:
    """Two start-up steps: ``prepare`` starts building the memory store in a thread (importing
    the vector stack, LanceDB, takes a second or two; a native host answers the browser's hello
    meanwhile and the ML worker starts beside it), ``lifetime`` opens it once built."""
    building: asyncio.Task[Memory] | None = None

    async def prepare(app: web.Application) -> AsyncIterator[None]:
        nonlocal building
        state.components.set("memory", "starting")
        building = asyncio.create_task(asyncio.to_thread(build_memory, settings, state.ml))
        yield
        if not building.done():  # start-up failed before the memory step
            building.cancel()
            await asyncio.gather(building, return_exceptions=True)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        assert building is not None
        memory = await building
        try:
            await memory.open(vectors_in_background=True)
        except TabAgentError as exc:
            if required or exc.code != "database_in_use":
                raise
            # `--get` beside a running server: answer without memory rather than fail
            state.components.set("memory", "unavailable", exc.message)
            yield
            return
        state.memory = memory
        # reads and writes work now; searches wait the second or two LanceDB takes to open
        state.components.set("memory", "ok", f"{memory.root}; vector index opening")
        vectors = asyncio.create_task(_vectors_opened(state, memory))
        yield
        vectors.cancel()
        state.memory = None
        await memory.close()
        state.components.set("memory", "down", "closed")

    return prepare, lifetime


async def _vectors_opened(state: AppState, memory: Memory) -> None:
    try:
        await memory.vectors_opened()
    except TabAgentError as exc:  # keyword reads and writes still work; search says why not
        state.components.set("memory", "degraded", exc.message)
    else:
        state.components.set("memory", "ok", str(memory.root))


def _webrtc_component(
    state: AppState, settings: Settings
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        from tabagent.webrtc.sessions import SessionManager

        manager = SessionManager(
            state,
            max_sessions=settings.webrtc_max_sessions,
            idle_timeout=settings.webrtc_idle_timeout,
            ice_servers=settings.webrtc_ice_servers,
        )
        await manager.start()
        state.webrtc = manager
        state.components.set("webrtc", "ok")
        yield
        state.webrtc = None
        await manager.stop()
        state.components.set("webrtc", "down", "closed")

    return lifetime


def server_hardware() -> HardwareCache:
    """Hardware detection for the server: what onnxruntime and llama.cpp support is asked of the
    worker program once (they run there, and importing them here would cost memory for good)."""
    from tabagent.hardware.run import Probe
    from tabagent.ml.supervisor import worker_capabilities

    caps = functools.cache(worker_capabilities)
    return HardwareCache(
        Probe(
            onnxruntime_providers=lambda: list(caps().get("onnxruntime_providers", [])),
            llama_gpu_offload=lambda: bool(caps().get("llama_gpu_offload", False)),
        )
    )


def _hardware_component(state: AppState) -> Callable[[web.Application], AsyncIterator[None]]:
    """Detect the hardware in the background at start-up; health shows the one-line summary."""

    async def detect() -> None:
        try:
            hw = await asyncio.to_thread(state.hardware.get)
        except Exception as exc:  # a probe bug must not stop the server; loads fall back to CPU
            log.exception("hardware detection failed")
            state.components.set("hardware", "degraded", f"detection failed: {exc}")
            return
        log.info("hardware: %s (%.0f ms)", hw.summary(), hw.detect_ms)
        state.components.set("hardware", "ok", hw.summary())

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        # informational: the server serves meanwhile (a load detects for itself if it must)
        state.components.set("hardware", "ok", "detecting")
        task = asyncio.create_task(detect(), name="hardware-detection")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return lifetime


def _models_component(models: ModelService) -> Callable[[web.Application], AsyncIterator[None]]:
    """At shutdown, finish flushing downloaded models to the disk, for a bounded time (a blob
    left unflushed keeps its marker and is hashed again before its next use)."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        if not await models.puller.durable(within=FLUSH_AT_EXIT_S):
            log.warning("downloads still flushing to the disk at exit: checked at the next use")

    return lifetime


def _http_component(state: AppState) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        state.components.set("http", "ok")
        yield
        state.components.set("http", "down", "shutting down")

    return lifetime


def build_app(
    settings: Settings,
    *,
    mode: str | None = None,
    registry: Registry | None = None,
    transports: Transports | None = None,
    memory_required: bool = True,
) -> web.Application:
    """The aiohttp application for ``settings``: operations, docs, metrics, web UI, security.

    ``memory_required=False`` lets it start without memory when another process holds the
    databases (the one-request ``--get`` smoke path)."""
    mode = mode or settings.mode
    transports = transports or Transports.for_mode(mode)
    registry = registry or default_registry()
    live = [name for name in ("http", "webrtc", "native") if getattr(transports, name)]
    state = AppState(
        settings=settings,
        registry=registry,
        metrics=Metrics(),
        mode=mode,
        transports=tuple(live),
    )
    for name, reason in UNAVAILABLE_TRANSPORTS.items():
        if getattr(transports, name):
            state.components.set(name, "unavailable", reason)

    policy = SecurityPolicy(
        bind_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        extension_ids=settings.extension_ids,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
    )
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[GATE] = Gate(policy, state.metrics)  # before any route: each is added behind it
    app[STATE] = state
    app[OPENAPI] = build_openapi(registry)
    state.models = build_models(settings, state.metrics)
    app.cleanup_ctx.append(_models_component(state.models))
    state.hardware = server_hardware()
    if settings.ml_worker:
        state.ml = build_ml(settings, state, state.metrics.registry)
    if settings.memory:
        # built in a thread while the ML worker starts (both take about a second)
        prepare, open_memory = _memory_components(state, settings, required=memory_required)
        app.cleanup_ctx.append(prepare)
    else:
        state.components.set("memory", "off", "started with --memory false")
    if state.ml is not None:
        app.cleanup_ctx.append(_ml_component(state.ml))
    if settings.memory:
        app.cleanup_ctx.append(open_memory)
    if transports.http:
        app.cleanup_ctx.append(_http_component(state))
    # last: detection asks a worker process of its own, which would compete with start-up
    app.cleanup_ctx.append(_hardware_component(state))

    # native hosts of this user that find this server in the run directory relay to it here
    add_envelope_route(app, state.run_token, settings.max_body_bytes)
    if transports.webrtc:
        app.cleanup_ctx.append(_webrtc_component(state, settings))

    def served(op: Operation) -> bool:
        if "webrtc" in op.tags:  # signaling: the webrtc transport's own routes; over plain
            return transports.webrtc or transports.http  # HTTP they say webrtc_disabled
        return transports.http or (transports.webrtc and op.name == "system.health")

    mount_operations(app, registry, settings.max_body_bytes, served)
    if transports.http:
        mount_custom(app, registry, settings.max_body_bytes)
        add_route(app, "GET", "/metrics", _metrics, name="metrics")
        add_docs_routes(app)
    if transports.http or transports.webrtc:  # the page talks WebRTC, or HTTP when it must
        add_web_ui(app)  # last: its catch-all route must not shadow the API
    close_gate(app)
    return app


class StartupError(RuntimeError):
    """The server cannot start (port in use, unsafe binding…); the message says why."""


def check_bind_safety(settings: Settings) -> None:
    if not settings.binds_loopback and settings.api_key is None:
        raise StartupError(
            f"refusing to listen on {settings.host}: binding beyond loopback exposes your models "
            "and memory to the network. Set --api-key (or TABAGENT_API_KEY), or bind 127.0.0.1."
        )


async def _start_site(app: web.Application, settings: Settings) -> tuple[web.AppRunner, int]:
    runner = Runner(
        app, handle_signals=False, access_log=None, shutdown_timeout=settings.shutdown_timeout
    )
    try:
        await runner.setup()
    except TabAgentError as exc:  # a component could not start (databases in use, say)
        await runner.cleanup()
        raise StartupError(exc.message + _holder_hint(settings, exc)) from None
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    port = settings.port
    for address in runner.addresses:
        if isinstance(address, tuple):
            port = int(address[1])
            break
    return runner, port


def _holder_hint(settings: Settings, exc: TabAgentError) -> str:
    """Who holds the databases, when it is this user's browser host (a common surprise)."""
    if exc.code != "database_in_use":
        return ""
    other = find(settings.run_dir)
    if other is None or other.mode != "native":
        return ""
    return (
        f" (TabAgent's browser host, pid {other.pid}, serves the extension from them: close the"
        " TabAgent side panel, and the host lets go of them 15 s later; started then, the server"
        " is the one the extension relays to)"
    )


def _loopback_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::") or host.startswith("127.") or host == "localhost":
        return f"http://127.0.0.1:{port}"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    settings: Settings, transports: Transports, *, native_channel: StdioChannel | None = None
) -> None:
    """Run until SIGINT/SIGTERM (or, serving native messaging, until the browser hangs up),
    then drain in-flight requests and stop components in reverse."""
    if not (transports.http or transports.webrtc):  # native only: a private port for relays
        settings = settings.model_copy(update={"host": "127.0.0.1", "port": 0})
    check_bind_safety(settings)
    app = build_app(settings, transports=transports)
    state = app[STATE]
    stop = asyncio.Event()
    native: asyncio.Task[None] | None = None
    session = None
    if native_channel is not None:  # the browser gets its hello while the components start
        from tabagent.native_messaging.host import pump
        from tabagent.ops.envelope import EnvelopeSession

        ready = asyncio.Event()
        hello = {"mode": "in-process", "pid": os.getpid()}
        session = EnvelopeSession(
            state, native_channel.send, transport="native", hello=hello, ready=ready
        )
        native = asyncio.create_task(pump(native_channel, session))
        native.add_done_callback(lambda _: stop.set())
    try:
        runner, port = await _start_site(app, settings)
    except StartupError as exc:
        if native is None or session is None:
            raise
        # answer every request with the reason until the browser hangs up, then fail
        session.unavailable = str(exc)
        ready.set()
        await native
        await session.close()
        raise
    if session is not None:
        ready.set()
    publication = publish(
        settings.run_dir,
        ServerInfo(
            url=_loopback_url(settings.host, port),
            token=state.run_token,
            pid=os.getpid(),
            version=__version__,
            mode=state.mode,
        ),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows' proactor loop
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    if transports.http or transports.webrtc:
        shown_host = f"[{settings.host}]" if ":" in settings.host else settings.host
        unavailable = [
            n for n, s in state.components.snapshot().items() if s.state == "unavailable"
        ]
        log.info(
            "TabAgent %s listening on http://%s:%d (mode %s; live: %s%s)",
            __version__,
            shown_host,
            port,
            state.mode,
            ", ".join(state.transports) or "none",
            f"; not yet available: {', '.join(unavailable)}" if unavailable else "",
        )
        if transports.http:
            log.info("API docs at http://%s:%d/api-doc", shown_host, port)
    else:
        log.info("TabAgent %s serving native messaging (relay port %d)", __version__, port)
    try:
        await stop.wait()
    finally:
        if publication is not None:
            publication.withdraw()
        if native is not None and session is not None:
            native.cancel()
            await asyncio.gather(native, return_exceptions=True)
            await session.close()
        log.info("shutting down (in-flight requests get %.0f s)", settings.shutdown_timeout)
        await runner.cleanup()
        log.info("stopped")


async def get_once(settings: Settings, path: str) -> tuple[int, bytes]:
    """Serve one GET in-process on an ephemeral loopback port and return (status, body)."""
    settings = settings.model_copy(update={"host": "127.0.0.1", "port": 0})
    app = build_app(settings, mode="http", memory_required=False)
    runner, port = await _start_site(app, settings)
    ml = app[STATE].ml
    if ml is not None:  # the smoke test covers the worker too: wait until it is up (or failed)
        with contextlib.suppress(TabAgentError):
            await ml.supervisor.stub(wait=60)
    headers = {}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response,
        ):
            return response.status, await response.read()
    finally:
        await runner.cleanup()
