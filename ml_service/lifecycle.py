"""Worker lifecycle helpers: the per-launch token, parent-death watch, memory figures.

The worker must never outlive the server that started it (not even after ``kill -9`` of the
server): on Linux the kernel sends SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), and on
every platform a watcher polls the parent pid as a fallback.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import logging
import os
import signal
import sys
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "TABAGENT_WORKER_TOKEN"
TOKEN_METADATA = "x-tabagent-token"
REQUEST_ID_METADATA = "x-request-id"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when our parent exits; no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        log.warning("prctl(PR_SET_PDEATHSIG) unavailable; relying on polling")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def watch_parent(
    parent_pid: int, on_orphaned: Callable[[], None], interval: float = 0.5
) -> None:
    """Poll for re-parenting (the portable fallback for platforms without PDEATHSIG)."""
    while True:
        await asyncio.sleep(interval)
        if os.getppid() != parent_pid:
            log.warning("parent %d is gone; shutting down", parent_pid)
            on_orphaned()
            return


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; ru_maxrss as a coarse fallback)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects every call that lacks the per-launch token (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _authorised(self, metadata: object) -> bool:
        for key, value in metadata or ():  # type: ignore[attr-defined]
            if key == TOKEN_METADATA:
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._token)
        return False

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or self._authorised(handler_call_details.invocation_metadata):
            return handler
        return _denying_handler(handler)


async def _deny(request: object, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong worker token")


def _denying_handler(real: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape (unary/stream) as the real one that only aborts."""
    kwargs = {
        "request_deserializer": real.request_deserializer,
        "response_serializer": real.response_serializer,
    }
    if real.request_streaming and real.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny, **kwargs)
    if real.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny, **kwargs)
    if real.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(_deny, **kwargs)
