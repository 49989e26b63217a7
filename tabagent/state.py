"""AppState: the services one server owns, built by ``tabagent.app`` and handed to operations.

No transport types live here, so operations stay importable without aiohttp.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tabagent.components import Components
from tabagent.config import Settings
from tabagent.errors import ServiceUnavailable
from tabagent.hardware.detect import HardwareCache
from tabagent.metrics import Metrics
from tabagent.ops.registry import Registry

if TYPE_CHECKING:
    from tabagent.ml.services import MLServices
    from tabagent.models.service import ModelService
    from tabagent.storage.memory import Memory
    from tabagent.webrtc.sessions import SessionManager


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    components: Components = field(default_factory=Components)
    started_at: float = field(default_factory=time.monotonic)
    mode: str = "http"
    transports: tuple[str, ...] = ()
    ml: MLServices | None = None
    models: ModelService | None = None
    memory: Memory | None = None
    webrtc: SessionManager | None = None
    hardware: HardwareCache = field(default_factory=HardwareCache)
    # Required by the envelope endpoint; published in the run file for this user's native hosts.
    run_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def require_models(self) -> ModelService:
        if self.models is None:  # pragma: no cover - always built by the app
            raise ServiceUnavailable("the model cache is not available", code="cache_unavailable")
        return self.models

    def require_ml(self) -> MLServices:
        if self.ml is None:
            raise ServiceUnavailable(
                "inference is off in this server (started with --no-ml-worker)", code="ml_disabled"
            )
        return self.ml

    def require_memory(self) -> Memory:
        if self.memory is None:
            raise ServiceUnavailable(
                "memory is off in this server (started with --memory false)", code="memory_disabled"
            )
        return self.memory

    def require_webrtc(self) -> SessionManager:
        if self.webrtc is None:
            raise ServiceUnavailable(
                f"WebRTC is not served in mode {self.mode!r} (use --mode web or all)",
                code="webrtc_disabled",
            )
        return self.webrtc

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at
