"""Video from a WebRTC peer: every incoming frame is read as it arrives, only the newest is kept.

aiortc decodes a remote track into an unbounded queue that only ``recv()`` empties, so a track
nobody reads grows the server's memory with every frame. A :class:`FrameSampler` is started for
each incoming video track as soon as it appears and reads it for its whole life; it holds one
frame, the newest. Analysis (``video.faces``) takes that frame at its own rate: frames that
arrive while a detection runs, or between two samples, are replaced by newer ones and counted as
dropped. Under load the sample rate falls; memory and latency do not grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from av import VideoFrame

if TYPE_CHECKING:
    from aiortc.mediastreams import MediaStreamTrack

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sample:
    frame: VideoFrame
    seq: int  # 1 for the track's first frame, 2 for the next…
    received_at: float  # time.monotonic() when it arrived


class FrameSampler:
    """Reads a remote video track to its end, keeping only the newest frame."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self.received = 0
        self.ended = False
        self._latest: Sample | None = None
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._read(), name=f"webrtc-video-{track.id}")

    async def _read(self) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await self.track.recv()
                self.received += 1
                if not isinstance(frame, VideoFrame):  # audio: read and let go
                    continue
                async with self._changed:
                    self._latest = Sample(frame, self.received, time.monotonic())
                    self._changed.notify_all()
        except MediaStreamError:  # the track ended (the peer stopped it or went away)
            pass
        finally:
            self.ended = True
            self._latest = None
            async with self._changed:
                self._changed.notify_all()

    async def newer_than(self, seq: int) -> Sample | None:
        """The newest frame after frame ``seq``, waiting for one; None once the track has ended."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.ended or (self._latest is not None and self._latest.seq > seq)
            )
            return None if self.ended else self._latest

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def to_rgb(frame: VideoFrame, max_side: int) -> npt.NDArray[np.uint8]:
    """The frame as an H x W x 3 RGB array, scaled down (by libswscale) to at most ``max_side``
    pixels on its longer side; face detection looks at 128 x 128 anyway."""
    width, height = frame.width, frame.height
    scale = min(1.0, max_side / max(width, height))
    if scale < 1.0:
        width = max(2, round(width * scale) // 2 * 2)
        height = max(2, round(height * scale) // 2 * 2)
        frame = frame.reformat(width=width, height=height, format="rgb24")
    return np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
