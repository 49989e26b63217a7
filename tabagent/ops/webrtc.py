"""WebRTC signaling: ``webrtc.offer``, ``webrtc.candidate``, ``webrtc.close``, ``webrtc.sessions``.

The peers themselves live in :mod:`tabagent.webrtc` (aiortc); these operations only hand the
offer over and report. They are served when the server runs the ``webrtc`` transport (modes
``webrtc``, ``web`` and ``all``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tabagent.ops.registry import Empty, Http, OpContext, OperationGroup

group = OperationGroup(tag="webrtc")

MAX_SDP_CHARS = 100_000


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"] = "offer"


class Answer(BaseModel):
    session_id: str
    sdp: str
    type: Literal["answer"] = "answer"


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64, description="The session id.")
    candidate: str | None = Field(
        None, max_length=2048, description="An ICE candidate line; empty or null: end of them."
    )
    sdpMid: str | None = Field(None, max_length=64)
    sdpMLineIndex: int | None = Field(None, ge=0, le=64)


class SessionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


class Accepted(BaseModel):
    ok: bool = True


class Closed(BaseModel):
    session_id: str
    closed: bool


class SessionInfo(BaseModel):
    session_id: str
    state: str = Field(description="new, connecting, connected, disconnected, failed or closed")
    age_s: float
    idle_s: float
    channels: list[str]
    bytes_received: int
    bytes_sent: int


class SessionList(BaseModel):
    object: str = "list"
    data: list[SessionInfo]


@group.operation("webrtc.offer", http=Http("POST", "/v1/webrtc/offer"))
async def offer(ctx: OpContext, req: Offer) -> Answer:
    """Start a WebRTC session: an SDP offer in, the answer out (ICE gathered, no trickle needed).

    Open a data channel on it to speak the message envelope (every operation, streamed).
    """
    session_id, answer = await ctx.state.require_webrtc().offer(req.sdp, req.type)
    return Answer(session_id=session_id, sdp=answer.sdp)


@group.operation("webrtc.candidate", http=Http("POST", "/v1/webrtc/sessions/{id}/candidates"))
async def candidate(ctx: OpContext, req: Candidate) -> Accepted:
    """Add a trickled ICE candidate of the browser to a session."""
    await ctx.state.require_webrtc().add_candidate(
        req.id, req.candidate, req.sdpMid, req.sdpMLineIndex
    )
    return Accepted()


@group.operation("webrtc.close", http=Http("DELETE", "/v1/webrtc/sessions/{id}"))
async def close(ctx: OpContext, req: SessionRef) -> Closed:
    """Close a session: its peer, channels and running requests."""
    manager = ctx.state.require_webrtc()
    manager.get(req.id)  # 404 for an unknown session
    return Closed(session_id=req.id, closed=await manager.close(req.id))


@group.operation("webrtc.sessions", http=Http("GET", "/v1/webrtc/sessions"))
async def sessions(ctx: OpContext, req: Empty) -> SessionList:
    """Open sessions: connection state, age, idle time, channels and bytes each way."""
    manager = ctx.state.require_webrtc()
    return SessionList(data=[SessionInfo(**s.describe()) for s in manager.sessions.values()])
