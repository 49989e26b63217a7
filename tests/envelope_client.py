"""The client side of the message envelope, whatever carries it (native frames, a data channel):
requests by id, each one's messages up to its ``done`` or ``error``."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class EnvelopeClient:
    """Subclasses say how a whole message is received (:meth:`recv`) and a request is sent
    (:meth:`send_request`); messages for other ids wait for their own readers."""

    _pending: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def recv(self, within: float = 60) -> dict[str, Any]:
        raise NotImplementedError

    async def send_request(self, message: Mapping[str, Any]) -> None:
        raise NotImplementedError

    async def events(self, request_id: Any, within: float = 60) -> AsyncIterator[dict[str, Any]]:
        """Messages for ``request_id`` up to its done/error."""
        key = json.dumps(request_id)
        while True:
            queued = self._pending[key]
            message = queued.pop(0) if queued else await self.recv(within)
            if json.dumps(message.get("id")) != key:
                self._pending[json.dumps(message.get("id"))].append(message)
                continue
            yield message
            if message["event"] in ("done", "error"):
                return

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; its last message (done or error)."""
        request_id = f"r{next(self._ids)}"
        await self.send_request({"id": request_id, "method": method, "params": dict(params or {})})
        messages = [m async for m in self.events(request_id)]
        return messages[-1]

    async def result(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        reply = await self.call(method, params)
        assert reply["event"] == "done", reply
        return reply["data"]
