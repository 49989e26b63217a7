"""WebRTC signaling (``webrtc.offer``, ``webrtc.candidate``, ``webrtc.close``,
``webrtc.sessions``) and ``video.faces``, face detection on the video a peer sends.

The peers themselves live in :mod:`tabagent.webrtc` (aiortc); the signaling operations only hand
the offer over and report. They are served when the server runs the ``webrtc`` transport (modes
``webrtc``, ``web`` and ``all``). ``video.faces`` is a method of the data channel only: it reads
the video track of the session whose channel carries the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml_service.proto import ml_inference_pb2 as pb
from tabagent.errors import BadRequest
from tabagent.ops.registry import Empty, Http, OpContext, OperationGroup
from tabagent.ops.vision import Face, faces_of

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
    video_tracks: int = Field(description="Video tracks the peer sends.")
    video_frames: int = Field(description="Video frames received so far.")


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


class VideoFacesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fps: float = Field(5.0, ge=0.2, le=30, description="Frames analysed per second, at most.")
    min_confidence: float | None = Field(None, ge=0, le=1)
    max_side: int = Field(
        640, ge=64, le=1920, description="Frames are scaled down to this many pixels (longer side)."
    )
    model: str | None = Field(None, max_length=256)


class FrameFaces(BaseModel):
    event_name: ClassVar[str] = "faces"
    frame: int = Field(description="Which frame of the track (1 = its first).")
    pts_time: float | None = Field(description="The frame's presentation time, sender's clock (s).")
    width: int
    height: int
    faces: list[Face]
    inference_ms: float
    latency_ms: float = Field(description="Frame arrived -> these detections sent.")
    received: int = Field(description="Frames received since this request started.")
    analyzed: int
    dropped: int = Field(description="Frames replaced by newer ones before they were analysed.")


class VideoDone(BaseModel):
    event_name: ClassVar[str] = "done"
    received: int
    analyzed: int
    dropped: int


@group.operation("video.faces")
async def video_faces(
    ctx: OpContext, req: VideoFacesRequest
) -> AsyncIterator[FrameFaces | VideoDone]:
    """Face detection on the video track of this WebRTC session, as ``faces`` events.

    Samples the newest frame at most ``fps`` times a second; frames that arrive meanwhile are
    dropped (counted), never queued. Runs until ``session.cancel`` or the end of the track.
    """
    from tabagent.webrtc.video import to_rgb

    if ctx.peer is None:
        raise BadRequest(
            "video.faces reads the video of a WebRTC session: call it on a data channel of a "
            "peer connection that sends video (for single images use vision.faces)",
            code="no_video_track",
        )
    sampler = ctx.state.require_webrtc().video(ctx.peer)
    ml = ctx.state.require_ml()
    model_id = ml.orchestrator.resolve(req.model, "vision")
    period, first_seen, seq, analyzed = 1.0 / req.fps, sampler.received, sampler.received, 0
    next_at = time.monotonic()
    while True:
        if (wait := next_at - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        sample = await sampler.newer_than(seq)
        if sample is None:
            break
        seq = sample.seq
        next_at = max(next_at + period, time.monotonic())  # late: no burst to catch up
        frame = sample.frame
        rgb = await asyncio.to_thread(to_rgb, frame, req.max_side)
        request = pb.DetectFacesRequest(
            model_id=model_id,
            raw=pb.RawImage(width=rgb.shape[1], height=rgb.shape[0], rgb=rgb.tobytes()),
        )
        if req.min_confidence is not None:
            request.min_confidence = req.min_confidence
        async with ml.orchestrator.use(model_id, ctx.request_id):
            reply = await ml.supervisor.unary(
                "DetectFaces", request, ctx.request_id, 30.0, "face detection"
            )
        analyzed += 1
        received = sampler.received - first_seen
        yield FrameFaces(
            frame=sample.seq,
            pts_time=None if frame.time is None else float(frame.time),
            width=frame.width,
            height=frame.height,
            faces=faces_of(reply),
            inference_ms=reply.inference_ms,
            latency_ms=(time.monotonic() - sample.received_at) * 1000,
            received=received,
            analyzed=analyzed,
            dropped=max(0, seq - first_seen - analyzed),
        )
    received = sampler.received - first_seen
    yield VideoDone(received=received, analyzed=analyzed, dropped=max(0, received - analyzed))
