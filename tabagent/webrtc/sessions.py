"""WebRTC peers: signaling sessions and the message envelope over their data channels.

A browser page POSTs an SDP offer; :meth:`SessionManager.offer` answers once ICE gathering is
done (aiortc does not trickle, so the answer carries every candidate and a client without trickle
ICE works). Each data channel the page opens carries the envelope of ARCHITECTURE.md: the same
:class:`~tabagent.ops.envelope.EnvelopeSession` as native messaging, so every operation is
reachable. Messages above the peer's SCTP maximum are split into ``chunk`` messages (PROTOCOL.md)
both ways; sending waits while the channel's ``bufferedAmount`` is high, so a slow reader cannot
grow the server's memory without bound.

Sessions are bounded in number, closed when idle or when their peer fails, and cleaned up
completely (peer, channels, envelope tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcdatachannel import RTCDataChannel
from aiortc.sdp import candidate_from_sdp

from tabagent.errors import BadRequest, NotFound, PayloadTooLarge, TabAgentError, TooManyRequests
from tabagent.ops.envelope import EnvelopeSession, Reassembler, dumps, error_message, split_message
from tabagent.webrtc.video import FrameSampler

if TYPE_CHECKING:
    from aiortc.mediastreams import MediaStreamTrack

    from tabagent.state import AppState

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 65536  # RFC 8841's default when the peer's SDP names no max-message-size
HIGH_WATER = 1 << 20  # stop sending while this much is queued on a channel ...
LOW_WATER = 256 << 10  # ... and go on once it has drained below this


def _remote_max_message(pc: RTCPeerConnection) -> int:
    sctp = pc.sctp
    size = getattr(sctp, "_remote_max_message_size", None) if sctp is not None else None
    return int(size) if size else DEFAULT_MAX_MESSAGE


class ChannelLink:
    """One data channel speaking the envelope."""

    def __init__(self, session: Session, channel: RTCDataChannel, state: AppState) -> None:
        self.session = session
        self.channel = channel
        self.limit = state.settings.max_body_bytes
        self.envelope = EnvelopeSession(
            state, self.send, transport="webrtc", hello={"session_id": session.id}, peer=session.id
        )
        self._inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._reassembler = Reassembler(limit=self.limit)
        self._drained = asyncio.Event()
        self._drained.set()
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("bufferedamountlow", self._drained.set)
        channel.on("message", self._on_message)
        channel.on("close", self.stop)
        self.task = asyncio.create_task(self._serve(), name=f"webrtc-{session.id}-{channel.label}")

    def stop(self) -> None:
        """No more messages: the serving task ends (its envelope cancels what still runs)."""
        self._inbox.put_nowait(None)

    def _on_message(self, message: str | bytes) -> None:
        # runs inside aiortc: an exception escaping here would close the whole peer connection
        self.session.touch(received=len(message))
        self._inbox.put_nowait(message)

    async def send(self, message: dict[str, Any]) -> None:
        for part in split_message(dumps(message), message.get("id"), self.max_message):
            while self.channel.bufferedAmount > HIGH_WATER:
                self._drained.clear()
                if self.channel.readyState != "open":
                    raise ConnectionError("data channel closed")
                await self._drained.wait()
            if self.channel.readyState != "open":
                raise ConnectionError("data channel closed")
            self.channel.send(part)
            self.session.touch(sent=len(part))

    @property
    def max_message(self) -> int:
        return _remote_max_message(self.session.pc)

    async def _serve(self) -> None:
        try:
            while (raw := await self._inbox.get()) is not None:
                await self._handle(raw)
        finally:
            await self.envelope.close()

    async def _handle(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            await self._error(BadRequest("send envelopes as text messages", code="invalid_json"))
            return
        if len(raw) > self.limit:
            await self._error(PayloadTooLarge(f"message is larger than {self.limit} bytes"))
            return
        try:
            value = json.loads(raw)
        except ValueError as exc:
            await self._error(BadRequest(f"message is not JSON: {exc}", code="invalid_json"))
            return
        if isinstance(value, dict) and value.get("event") == "chunk":
            try:
                value = self._reassembler.add(value)
            except (KeyError, TypeError, ValueError) as exc:
                await self._error(BadRequest(f"bad chunk: {exc}", code="invalid_envelope"))
                return
            if value is None:
                return
        await self.envelope.handle(value)

    async def _error(self, exc: TabAgentError) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send(error_message(None, exc))


@dataclass
class Session:
    id: str
    pc: RTCPeerConnection
    created_at: float = field(default_factory=time.time)
    last_activity: float = field(default_factory=time.monotonic)
    bytes_received: int = 0
    bytes_sent: int = 0
    links: list[ChannelLink] = field(default_factory=list)
    tracks: list[FrameSampler] = field(default_factory=list)

    def touch(self, *, received: int = 0, sent: int = 0) -> None:
        self.last_activity = time.monotonic()
        self.bytes_received += received
        self.bytes_sent += sent

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "state": self.pc.connectionState,
            "age_s": round(time.time() - self.created_at, 3),
            "idle_s": round(time.monotonic() - self.last_activity, 3),
            "channels": [link.channel.label for link in self.links],
            "video_tracks": sum(t.track.kind == "video" for t in self.tracks),
            "video_frames": sum(t.received for t in self.tracks if t.track.kind == "video"),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        }


class SessionManager:
    def __init__(
        self,
        state: AppState,
        *,
        max_sessions: int,
        idle_timeout: float,
        ice_servers: tuple[str, ...] = (),
    ) -> None:
        self.state = state
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        # No STUN by default: a local server and its browser share the machine (host candidates).
        self._config = RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in ice_servers])
        self.sessions: dict[str, Session] = {}
        self._janitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._janitor = asyncio.create_task(self._sweep(), name="webrtc-janitor")

    async def stop(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
        await asyncio.gather(*(self.close(sid) for sid in list(self.sessions)))

    async def offer(self, sdp: str, kind: str) -> tuple[str, RTCSessionDescription]:
        if len(self.sessions) >= self.max_sessions:
            raise TooManyRequests(
                f"at most {self.max_sessions} WebRTC sessions at once; close one first",
                code="too_many_sessions",
            )
        pc = RTCPeerConnection(self._config)
        session = Session(secrets.token_urlsafe(12), pc)
        self.sessions[session.id] = session

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            session.links.append(ChannelLink(session, channel, self.state))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            # read every track from the start (audio too, unused): aiortc queues unread frames
            session.tracks.append(FrameSampler(track))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close(session.id)

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
            if pc.sctp is None and not pc.getTransceivers():
                raise ValueError("it offers neither a data channel nor media")
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, AssertionError) as exc:  # aiortc's verdicts on a bad SDP
            await self.close(session.id)
            raise BadRequest(f"cannot use this offer: {exc}", code="invalid_sdp") from None
        return session.id, pc.localDescription

    def video(self, session_id: str) -> FrameSampler:
        """The session's live video track (the first, if the page sends several)."""
        for sampler in self.get(session_id).tracks:
            if sampler.track.kind == "video" and not sampler.ended:
                return sampler
        raise BadRequest(
            "this WebRTC session carries no video track: add one to the offer "
            "(pc.addTransceiver('video', {direction: 'sendonly'}), then sender.replaceTrack)",
            code="no_video_track",
        )

    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"no WebRTC session {session_id!r}", code="session_not_found") from None

    async def add_candidate(
        self, session_id: str, candidate: str | None, sdp_mid: str | None, index: int | None
    ) -> None:
        session = self.get(session_id)
        if not candidate:  # end of candidates
            await session.pc.addIceCandidate(None)
            return
        try:
            parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
        except (ValueError, IndexError) as exc:
            raise BadRequest(f"not an ICE candidate: {exc}", code="invalid_candidate") from None
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = index
        await session.pc.addIceCandidate(parsed)

    async def close(self, session_id: str) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        for link in session.links:
            link.stop()
        await session.pc.close()
        await asyncio.gather(*(link.task for link in session.links), return_exceptions=True)
        await asyncio.gather(*(sampler.stop() for sampler in session.tracks))
        log.info("WebRTC session %s closed", session_id)
        return True

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout / 2))
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.last_activity > self.idle_timeout:
                    log.info("WebRTC session %s idle; closing it", session.id)
                    await self.close(session.id)
