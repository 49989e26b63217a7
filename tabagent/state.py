"""AppState: the services one server owns, built by ``tabagent.app`` and handed to operations.

No transport types live here, so operations stay importable without aiohttp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from tabagent.config import Settings
from tabagent.metrics import Metrics
from tabagent.ops.registry import Registry

ComponentHealth = Literal["ok", "starting", "degraded", "down", "unavailable", "off"]


@dataclass(slots=True)
class ComponentStatus:
    state: ComponentHealth
    detail: str = ""


@dataclass
class Components:
    """Each component reports its own state here; health reads the snapshot."""

    _status: dict[str, ComponentStatus] = field(default_factory=dict)

    def set(self, name: str, state: ComponentHealth, detail: str = "") -> None:
        self._status[name] = ComponentStatus(state, detail)

    def snapshot(self) -> dict[str, ComponentStatus]:
        return dict(self._status)

    @property
    def healthy(self) -> bool:
        return all(s.state in ("ok", "off", "unavailable") for s in self._status.values())


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    components: Components = field(default_factory=Components)
    started_at: float = field(default_factory=time.monotonic)
    mode: str = "http"
    transports: tuple[str, ...] = ()

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at
