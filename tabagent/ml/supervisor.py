"""Start, watch and restart the ML worker process; talk to it over gRPC.

The worker is this same program (``tabagent-server ml-service`` when frozen, ``python -m
ml_service`` in development) listening on a Unix socket in the run directory (TCP loopback on
Windows). Readiness is the gRPC health check with a deadline. A worker that dies is restarted
with exponential backoff; too many crashes in a window open a circuit breaker, and calls get
503 with ``Retry-After`` until a half-open restart answers healthy again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ml_service.lifecycle import REQUEST_ID_METADATA, TOKEN_ENV, TOKEN_METADATA
from ml_service.proto import ml_inference_pb2_grpc as pb_grpc
from tabagent.errors import (
    BadRequest,
    NotFound,
    ServiceUnavailable,
    TabAgentError,
    Timeout,
)

log = logging.getLogger(__name__)

_MAX_UNIX_PATH = 100  # sun_path is 104-108 bytes depending on the OS
_MESSAGE_BYTES = 64 * 1024 * 1024
_RECONNECT_MS = 25


def worker_program() -> list[str]:
    """The command that runs the ML worker, before its arguments."""
    if getattr(sys, "frozen", False):  # the single binary spawns itself
        return [sys.executable, "ml-service"]
    return [sys.executable, "-m", "ml_service"]


def worker_capabilities(timeout: float = 60.0) -> dict[str, Any]:
    """What the worker's libraries can do (``ml-service --capabilities``), asked of a short-lived
    worker process: importing onnxruntime in the server would cost it ~25 MiB for one answer.
    Empty when the worker cannot start (logged)."""
    try:
        done = subprocess.run(
            [*worker_program(), "--capabilities"],
            capture_output=True, text=True, timeout=timeout, check=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return dict(json.loads(done.stdout))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("cannot ask the ML worker what it supports: %s", exc)
        return {}


def _worker_command(listen: str, cache_dir: Path, log_level: str, log_dir: Path) -> list[str]:
    return [
        *worker_program(),
        "--listen", listen,
        "--parent-pid", str(os.getpid()),
        "--cache-dir", str(cache_dir),
        "--log-level", log_level,
        "--log-dir", str(log_dir),
    ]  # fmt: skip


def _listen_address(run_dir: Path) -> tuple[str, Path | None]:
    if os.name == "nt":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{sock.getsockname()[1]}", None
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = run_dir / f"ml-worker-{os.getpid()}.sock"
    if len(str(path)) > _MAX_UNIX_PATH:
        path = Path(tempfile.mkdtemp(prefix="tabagent-")) / "ml-worker.sock"
    return f"unix:{path}", path


def grpc_error(exc: grpc.aio.AioRpcError, what: str) -> TabAgentError:
    """The worker's status codes, as the errors every transport knows."""
    code, details = exc.code(), exc.details() or what
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details, code="model_not_found")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return BadRequest(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return BadRequest(details, code="context_length_exceeded")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"{what} took too long")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return ServiceUnavailable(
            f"the ML worker stopped during {what}; it is restarting, try again",
            code="worker_unavailable",
            retry_after=1,
        )
    return TabAgentError(f"{what} failed in the ML worker: {details}")


class CircuitBreaker:
    """Opens after ``threshold`` failures within ``window`` seconds, for ``cooldown`` seconds."""

    def __init__(self, threshold: int = 5, window: float = 60.0, cooldown: float = 30.0) -> None:
        self.threshold, self.window, self.cooldown = threshold, window, cooldown
        self._failures: collections.deque[float] = collections.deque()
        self.open_until = 0.0

    def record_failure(self, now: float) -> None:
        self._failures.append(now)
        while self._failures and self._failures[0] < now - self.window:
            self._failures.popleft()
        if len(self._failures) >= self.threshold:
            self.open_until = now + self.cooldown
            self._failures.clear()

    def record_success(self) -> None:
        self.open_until = 0.0

    def retry_after(self, now: float) -> float:
        return max(0.0, self.open_until - now)


class WorkerSupervisor:
    """Owns the worker process and the channel to it."""

    def __init__(
        self,
        *,
        run_dir: Path,
        cache_dir: Path,
        log_dir: Path,
        log_level: str = "INFO",
        ready_timeout: float = 60.0,
        breaker: CircuitBreaker | None = None,
        on_state: Callable[[str, str], None] = lambda state, detail: None,
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_dir, self.cache_dir, self.log_dir = run_dir, cache_dir, log_dir
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.breaker = breaker or CircuitBreaker()
        self._on_state, self._on_restart = on_state, on_restart
        self.token = secrets.token_urlsafe(32)
        self.generation = 0  # bumps on every (re)start: loaded models are gone after a restart
        self.proc: asyncio.subprocess.Process | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.MLInferenceStub | None = None
        self._socket_path: Path | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._monitor: asyncio.Task[None] | None = None

    # ---- lifecycle ----

    async def start(self) -> None:
        """Spawn in the background: the server is up at once, ML calls wait for readiness."""
        self._monitor = asyncio.create_task(self._run(), name="ml-worker")

    async def _spawn(self) -> None:
        listen, self._socket_path = _listen_address(self.run_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TOKEN_ENV: self.token}
        self._on_state("starting", "")
        started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *_worker_command(listen, self.cache_dir, self.log_level, self.log_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,  # stdout may carry native-messaging frames
            env=env,
        )
        if self._channel is not None:
            await self._channel.close()
        self._channel = grpc.aio.insecure_channel(
            listen,
            options=[
                ("grpc.max_receive_message_length", _MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MESSAGE_BYTES),
                # The socket appears only once the worker has imported its libraries (a second
                # or more). gRPC's default reconnect backoff (1 s, growing) would notice it up to
                # 1.5 s late; a reconnect to a local socket costs microseconds, so retry often.
                ("grpc.initial_reconnect_backoff_ms", _RECONNECT_MS),
                ("grpc.min_reconnect_backoff_ms", _RECONNECT_MS),
                ("grpc.max_reconnect_backoff_ms", 4 * _RECONNECT_MS),
            ],
        )
        self._stub = pb_grpc.MLInferenceStub(self._channel)  # type: ignore[no-untyped-call]
        try:
            await self._wait_healthy()
        except BaseException:
            await self._kill()
            raise
        self.generation += 1
        self.breaker.record_success()
        self._ready.set()
        self._on_state("ok", f"pid {self.proc.pid}")
        log.info("ML worker %d ready in %.2f s", self.proc.pid, time.monotonic() - started)

    async def _wait_healthy(self) -> None:
        assert self._channel is not None
        assert self.proc is not None
        health = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise ServiceUnavailable(
                    f"the ML worker exited with {self.proc.returncode} at start"
                )
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    metadata=self.metadata(),
                    timeout=min(2.0, max(0.1, deadline - time.monotonic())),
                    wait_for_ready=True,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)
        raise ServiceUnavailable(f"the ML worker was not ready within {self.ready_timeout:.0f} s")

    async def _run(self) -> None:
        """Keep a worker alive: restart with backoff; the breaker spaces out crash loops."""
        backoff = 0.25
        while not self._stopping:
            try:
                await self._spawn()
                backoff = 0.25
                assert self.proc is not None
                code: int | str = await self.proc.wait()
            except (ServiceUnavailable, OSError) as exc:
                code = str(exc)
            if self._stopping:
                return
            self._ready.clear()
            now = time.monotonic()
            self.breaker.record_failure(now)
            self._on_restart()
            wait = max(backoff, self.breaker.retry_after(now))
            state = "degraded" if self.breaker.retry_after(now) else "down"
            log.error("ML worker failed (%s); restarting in %.1f s", code, wait)
            self._on_state(state, f"worker failed ({code}); restart in {wait:.1f} s")
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, 30.0)

    async def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self._kill()
        if self._channel is not None:
            await self._channel.close()
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)
        self._on_state("off", "stopped")

    # ---- calls ----

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def metadata(self, request_id: str = "-") -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, self.token), (REQUEST_ID_METADATA, request_id))

    async def stub(self, wait: float = 30.0) -> pb_grpc.MLInferenceStub:
        """The stub of a healthy worker; 503 with Retry-After while the breaker is open."""
        retry = self.breaker.retry_after(time.monotonic())
        if retry > 0:
            raise ServiceUnavailable(
                "the ML worker keeps crashing; waiting before the next try",
                code="worker_circuit_open",
                retry_after=retry,
            )
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout=wait)
            except TimeoutError:
                raise ServiceUnavailable(
                    "the ML worker is not ready", code="worker_unavailable", retry_after=2
                ) from None
        assert self._stub is not None
        return self._stub

    async def unary(
        self, method: str, request: Any, request_id: str, seconds: float, what: str
    ) -> Any:
        stub = await self.stub()
        try:
            return await getattr(stub, method)(
                request, metadata=self.metadata(request_id), timeout=seconds
            )
        except grpc.aio.AioRpcError as exc:
            raise grpc_error(exc, what) from None

    async def stream(
        self, method: str, request: Any, request_id: str, seconds: float, what: str
    ) -> AsyncIterator[Any]:
        stub = await self.stub()
        call = getattr(stub, method)(request, metadata=self.metadata(request_id), timeout=seconds)
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise grpc_error(exc, what) from None
        finally:
            call.cancel()  # the client went away: stop generation in the worker
