"""A real aiortc peer that signals over HTTP and speaks the envelope on a data channel."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel

from tabagent.ops.envelope import Reassembler, dumps, split_message


@dataclass
class Peer:
    pc: RTCPeerConnection
    channel: RTCDataChannel
    session_id: str
    inbox: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    _pending: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    _assembler: Reassembler = field(default_factory=Reassembler)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    chunks_received: int = 0

    def send(self, message: Mapping[str, Any], limit: int = 65536) -> None:
        for part in split_message(dumps(dict(message)), message.get("id"), limit):
            self.channel.send(part)

    async def recv(self, within: float = 60) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(self.inbox.get(), within)
            message = json.loads(raw)
            if message.get("event") == "chunk":
                self.chunks_received += 1
            whole = self._assembler.add(message)
            if whole is not None:
                return whole

    async def events(self, request_id: Any, within: float = 60) -> AsyncIterator[dict[str, Any]]:
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
        request_id = f"w{next(self._ids)}"
        self.send({"id": request_id, "method": method, "params": dict(params or {})})
        messages = [m async for m in self.events(request_id)]
        return messages[-1]

    async def result(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        reply = await self.call(method, params)
        assert reply["event"] == "done", reply
        return reply["data"]


async def connect(http: aiohttp.ClientSession, base_url: str, label: str = "tabagent") -> Peer:
    """Offer, answer, and an open data channel."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        return await _negotiate(http, base_url, pc, label)
    except BaseException:
        await pc.close()
        raise


async def _negotiate(
    http: aiohttp.ClientSession, base_url: str, pc: RTCPeerConnection, label: str
) -> Peer:
    channel = pc.createDataChannel(label)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await pc.setLocalDescription(await pc.createOffer())
    async with http.post(
        f"{base_url}/v1/webrtc/offer",
        json={"sdp": pc.localDescription.sdp, "type": pc.localDescription.type},
    ) as response:
        body = await response.json()
        assert response.status == 200, body
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    peer = Peer(pc, channel, body["session_id"])
    channel.on("message", peer.inbox.put_nowait)
    await asyncio.wait_for(opened.wait(), 20)
    return peer


@contextlib.asynccontextmanager
async def peer(http: aiohttp.ClientSession, base_url: str) -> AsyncIterator[Peer]:
    connected = await connect(http, base_url)
    try:
        yield connected
    finally:
        await connected.pc.close()
