"""System operations: health, server facts, the operation catalogue, runtime log level."""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from tabagent import __version__
from tabagent.components import ComponentStatus, Overall, overall_of
from tabagent.config import LogLevel
from tabagent.ops.registry import Empty, Http, OpContext, OperationGroup

if TYPE_CHECKING:
    from tabagent.state import AppState

group = OperationGroup(tag="system")

_REPORTED_PACKAGES = ("aiohttp", "pydantic", "click", "prometheus-client", "platformdirs")


class Health(BaseModel):
    status: Overall
    version: str
    uptime_s: float = Field(description="Seconds since the server started.")
    components: dict[str, ComponentStatus]


class Paths(BaseModel):
    db_path: str
    model_cache_path: str
    log_dir: str
    run_dir: str


class SystemInfo(BaseModel):
    version: str
    mode: str
    transports: list[str] = Field(description="Transports live in this process.")
    paths: Paths
    python: str
    platform: str
    packages: dict[str, str] = Field(description="Versions of the main libraries.")


class OperationInfo(BaseModel):
    name: str
    summary: str
    streaming: bool
    http_method: str | None = None
    http_path: str | None = None


class OperationList(BaseModel):
    operations: list[OperationInfo]


class LogLevelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: LogLevel = Field(description="New least severe level for the server's log.")


class LogLevelResponse(BaseModel):
    level: LogLevel
    previous: str


class _HealthJson:
    """``GET /v1/health``'s answer, made from bytes kept between changes.

    Supervisors and the extension probe health far more often than any component changes, and
    building and serialising the ``Health`` model was most of that route's cost. The JSON is
    rendered once per components snapshot (a change replaces the snapshot) with a placeholder
    uptime; each answer splices in the uptime, in whole milliseconds (``12.340``), and answers
    within the same millisecond are the same bytes. One instance serves every app in the
    process: what it keeps is one tuple, replaced whole, keyed by the snapshot itself."""

    def __init__(self) -> None:
        # (snapshot, head, tail, milliseconds, body)
        self._kept: tuple[Mapping[str, ComponentStatus] | None, bytes, bytes, int, bytes] = (
            None, b"", b"", -1, b"",
        )  # fmt: skip

    def __call__(self, state: AppState) -> bytes:
        ms = max(0, int((time.monotonic() - state.started_at) * 1000))
        snapshot = state.components.snapshot()
        kept, head, tail, kept_ms, body = self._kept
        if snapshot is kept and ms == kept_ms:
            return body
        if snapshot is not kept:
            head, tail = self._split(snapshot)
        seconds, milliseconds = divmod(ms, 1000)
        body = b"%s%d.%03d%s" % (head, seconds, milliseconds, tail)
        self._kept = (snapshot, head, tail, ms, body)
        return body

    @staticmethod
    def _split(snapshot: Mapping[str, ComponentStatus]) -> tuple[bytes, bytes]:
        health = Health(
            status=overall_of(snapshot), version=__version__, uptime_s=0.5, components=snapshot
        )
        head, found, tail = health.model_dump_json().encode().partition(b'"uptime_s":0.5')
        if not found:
            raise RuntimeError("Health's JSON no longer has the uptime where it is spliced in")
        return head + b'"uptime_s":', tail


@group.operation("system.health", http=Http("GET", "/v1/health", render=_HealthJson()), public=True)
async def health(ctx: OpContext, req: Empty) -> Health:
    """Liveness and the state of each component.

    Always open, even when an API key is configured, so supervisors and the extension can probe.
    """
    components = ctx.state.components
    return Health(
        status=components.overall,
        version=__version__,
        uptime_s=int(ctx.state.uptime_s * 1000) / 1000,  # milliseconds, as over HTTP
        components=components.snapshot(),  # ComponentStatus models: validated as they are
    )


@group.operation("system.info", http=Http("GET", "/v1/system"))
async def info(ctx: OpContext, req: Empty) -> SystemInfo:
    """Mode, paths and versions of this server."""
    settings = ctx.state.settings
    packages = {}
    for name in _REPORTED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "missing"
    return SystemInfo(
        version=__version__,
        mode=ctx.state.mode,
        transports=list(ctx.state.transports),
        paths=Paths(
            db_path=str(settings.db_path),
            model_cache_path=str(settings.model_cache_path),
            log_dir=str(settings.log_dir),
            run_dir=str(settings.run_dir),
        ),
        python=sys.version.split()[0],
        platform=platform.platform(),
        packages=packages,
    )


@group.operation("system.operations", http=Http("GET", "/v1/system/operations"))
async def operations(ctx: OpContext, req: Empty) -> OperationList:
    """Every operation this server offers, with its HTTP route when it has one.

    Native-messaging and data-channel clients use it to discover methods.
    """
    return OperationList(
        operations=[
            OperationInfo(
                name=op.name,
                summary=op.summary,
                streaming=op.streaming,
                http_method=op.http.method if op.http else None,
                http_path=op.http.path if op.http else None,
            )
            for op in ctx.state.registry
        ]
    )


@group.operation("system.set_log_level", http=Http("POST", "/v1/system/log-level"))
async def set_log_level(ctx: OpContext, req: LogLevelRequest) -> LogLevelResponse:
    """Change the server's log level without a restart (e.g. DEBUG while reporting a bug)."""
    root = logging.getLogger()
    previous = logging.getLevelName(root.level)
    if previous != req.level:  # setLevel clears every logger's cache, so only on a change
        root.setLevel(req.level)
        logging.getLogger(__name__).info("log level %s -> %s", previous, req.level)
    return LogLevelResponse(level=req.level, previous=previous)
