"""The state of each part of the server (memory, ML worker, transports…), as health reports it.

Kept apart from ``tabagent.state`` so operations can name these models without import cycles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ComponentHealth = Literal["ok", "starting", "degraded", "down", "unavailable", "off"]


class ComponentStatus(BaseModel):
    """One component's state, as ``/v1/health`` reports it."""

    model_config = ConfigDict(frozen=True)

    state: ComponentHealth = Field(description="ok, starting, degraded, down, unavailable or off")
    detail: str = ""


Overall = Literal["ok", "starting", "degraded"]


def overall_of(status: Mapping[str, ComponentStatus]) -> Overall:
    """ok when every component is ok (or deliberately off); starting while one starts."""
    states = {s.state for s in status.values()}
    if states & {"down", "degraded"}:
        return "degraded"
    return "starting" if "starting" in states else "ok"


@dataclass
class Components:
    """Each component reports its own state here; health reads the snapshot.

    Health is probed far more often than a component changes state, so a change builds a new
    snapshot and its overall state, and a read only hands them out.
    """

    _status: Mapping[str, ComponentStatus] = field(default_factory=dict)
    overall: Overall = "ok"

    def set(self, name: str, state: ComponentHealth, detail: str = "") -> None:
        status = {**self._status, name: ComponentStatus(state=state, detail=detail)}
        self._status = status  # replaced, never changed in place: snapshots stay as they were
        self.overall = overall_of(status)

    def snapshot(self) -> Mapping[str, ComponentStatus]:
        return self._status
