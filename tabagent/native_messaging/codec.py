"""Chrome's native-messaging framing: a 32-bit length in native byte order, then UTF-8 JSON.

Incoming frames go through :class:`FrameDecoder`, a sans-I/O decoder fed whatever bytes the pipe
gave (any split), so one tested piece of code serves the asyncio and the threaded readers.
Lengths are checked before anything of the announced size is allocated:

- a length above ``limit`` but within what Chrome can send (64 MiB) is skipped byte by byte
  without being stored, and reported as ``message_too_large``: the stream stays in sync;
- a length above 64 MiB cannot come from Chrome: the stream is corrupt (or not Chrome's), so
  the decoder reports ``frame_too_large`` and stops.

Outgoing messages are encoded by :func:`frames_for`. Chrome closes the port on a message of more
than 1 MiB, so a larger one is split into ``chunk`` messages (PROTOCOL.md,
:func:`tabagent.ops.envelope.split_message`, shared with the data channel).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tabagent.ops.envelope import Reassembler, dumps, split_message, split_text

__all__ = [
    "CHROME_MAX_INCOMING", "DEFAULT_LIMIT", "HEADER", "MAX_OUTGOING", "FrameDecoder", "FrameError",
    "Reassembler", "decode_json", "dumps", "frame", "frames_for", "frames_for_json",
    "split_message", "split_text",
]  # fmt: skip

HEADER = struct.Struct("=I")  # native byte order, standard 4-byte size, no alignment
MAX_OUTGOING = 1024 * 1024  # Chrome closes the port on one byte more (REFERENCE.md)
CHROME_MAX_INCOMING = 64 * 1024 * 1024  # the most Chrome sends to a host
DEFAULT_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame that could not be read. ``in_sync`` says whether the next frame can be."""

    code: str
    message: str
    in_sync: bool


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def decode_json(payload: bytes) -> Any | FrameError:
    """The JSON value of one frame's payload, or the error the sender gets back."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return FrameError("invalid_utf8", f"message is not UTF-8 (byte {exc.start})", True)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return FrameError("invalid_json", f"message is not JSON: {exc.msg} at {exc.pos}", True)
    except RecursionError:
        return FrameError("invalid_json", "message is nested too deeply", True)


class FrameDecoder:
    """Bytes in, whole frame payloads (or :class:`FrameError`) out."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if not 0 < limit <= CHROME_MAX_INCOMING:
            raise ValueError(f"limit must be between 1 and {CHROME_MAX_INCOMING} bytes")
        self.limit = limit
        self._buffer = bytearray()
        self._need: int | None = None  # body length of the frame being read
        self._skip = 0  # bytes of an oversized body still to throw away
        self._skipped = 0
        self.broken = False  # out of sync: nothing more can be decoded

    def feed(self, data: bytes) -> Iterator[bytes | FrameError]:
        """Take ``data``; yield every frame payload (and error) it completes."""
        if self.broken:
            return
        view = memoryview(data)
        while view:
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                if not self._skip:
                    yield FrameError(
                        "message_too_large",
                        f"message of {self._skipped} bytes is larger than the limit of "
                        f"{self.limit} bytes; it was skipped",
                        True,
                    )
                continue
            want = HEADER.size if self._need is None else self._need
            taken = min(want - len(self._buffer), len(view))
            self._buffer += view[:taken]
            view = view[taken:]
            if len(self._buffer) < want:
                return
            if self._need is None:
                (length,) = HEADER.unpack(self._buffer)
                self._buffer.clear()
                if length > CHROME_MAX_INCOMING:
                    self.broken = True
                    yield FrameError(
                        "frame_too_large",
                        f"frame header announces {length} bytes, more than a browser ever "
                        f"sends ({CHROME_MAX_INCOMING}): the stream is out of sync",
                        False,
                    )
                    return
                if length > self.limit:
                    self._skip = self._skipped = length
                    continue
                if length == 0:
                    yield b""
                    continue
                self._need = length
                continue
            payload = bytes(self._buffer)
            self._buffer.clear()
            self._need = None
            yield payload

    def eof(self) -> FrameError | None:
        """The stream ended: an error if it ended inside a frame."""
        if self.broken or (not self._buffer and self._need is None and not self._skip):
            return None
        self.broken = True
        where = "header" if self._need is None and not self._skip else "body"
        return FrameError("truncated_frame", f"input ended inside a frame {where}", False)


def frames_for(message: dict[str, Any]) -> list[bytes]:
    """Frames of one outgoing message: one frame, or its ``chunk`` frames when too large."""
    return frames_for_json(dumps(message), message.get("id"))


def frames_for_json(text: str, message_id: Any) -> list[bytes]:
    """Frames of one outgoing message already serialised as JSON ``text``."""
    return [frame(part.encode("utf-8")) for part in split_message(text, message_id, MAX_OUTGOING)]
