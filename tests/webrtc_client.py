"""A real aiortc peer that signals over HTTP and speaks the envelope on a data channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import numpy.typing as npt
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel
from av import VideoFrame

from tabagent.ops.envelope import Reassembler, dumps, split_message
from tests.envelope_client import EnvelopeClient


@dataclass
class Peer(EnvelopeClient):
    pc: RTCPeerConnection
    channel: RTCDataChannel
    session_id: str
    inbox: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    _assembler: Reassembler = field(default_factory=Reassembler)
    chunks_received: int = 0

    def send(self, message: Mapping[str, Any], limit: int = 65536) -> None:
        for part in split_message(dumps(dict(message)), message.get("id"), limit):
            self.channel.send(part)

    async def send_request(self, message: Mapping[str, Any]) -> None:
        self.send(message)

    async def recv(self, within: float = 60) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(self.inbox.get(), within)
            message = json.loads(raw)
            if message.get("event") == "chunk":
                self.chunks_received += 1
            whole = self._assembler.add(message)
            if whole is not None:
                return whole


class PhotoTrack(VideoStreamTrack):
    """A camera that films one still picture at 30 frames per second."""

    def __init__(self, rgb: npt.NDArray[np.uint8]) -> None:
        super().__init__()
        self.rgb = rgb
        self.sent = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(self.rgb, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


async def connect(
    http: aiohttp.ClientSession,
    base_url: str,
    label: str = "tabagent",
    video: MediaStreamTrack | None = None,
) -> Peer:
    """Offer (with a video track, if given), answer, and an open data channel."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    if video is not None:
        pc.addTrack(video)
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
async def peer(
    http: aiohttp.ClientSession, base_url: str, video: MediaStreamTrack | None = None
) -> AsyncIterator[Peer]:
    connected = await connect(http, base_url, video=video)
    try:
        yield connected
    finally:
        await connected.pc.close()
