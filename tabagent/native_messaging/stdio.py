"""The host's end of the browser's pipes: frames in from stdin, frames out to stdout.

:meth:`StdioChannel.take_over` moves the two pipes to private descriptors and points fd 0 at
/dev/null and fd 1 at stderr. After that nothing else in the process (a library that prints, a
child process that inherits descriptors) can write into the frame stream or read frames meant
for the host: stdout carries frames and nothing else.

Pipes are driven by asyncio's pipe transports; where those cannot be used (a regular file as
stdin, Windows' console handles) a thread does the blocking reads and writes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

from tabagent.native_messaging.codec import FrameDecoder, FrameError, frames_for, frames_for_json

_READ_SIZE = 1 << 16
_QUEUE_HIGH = 64  # decoded frames waiting for the host before reading pauses


def _is_pipe(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - the threads serve Windows
        return False
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class _FeedProtocol(asyncio.Protocol):
    def __init__(self, channel: StdioChannel) -> None:
        self.channel = channel
        self.transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.channel._feed(data)
        if self.transport is not None and self.channel._queue.qsize() >= _QUEUE_HIGH:
            self.transport.pause_reading()
            self.channel._paused = self.transport

    def eof_received(self) -> bool:
        self.channel._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._end()


class StdioChannel:
    """Frames over two file descriptors (the browser's pipes, or any pair in tests)."""

    def __init__(self, read_fd: int, write_fd: int, limit: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.decoder = FrameDecoder(limit)
        self._queue: asyncio.Queue[bytes | FrameError | None] = asyncio.Queue()
        self._paused: asyncio.ReadTransport | None = None
        self._ended = False
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        self._closers: list[Any] = []

    @classmethod
    def take_over(cls, limit: int) -> StdioChannel:
        """The process's stdin/stdout as a channel, with fds 0 and 1 made harmless."""
        read_fd = os.dup(0)
        write_fd = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        return cls(read_fd, write_fd, limit)

    async def start(self) -> None:
        """Attach the descriptors to the running loop (each then belongs to its transport)."""
        loop = asyncio.get_running_loop()
        reader_file = os.fdopen(self.read_fd, "rb", buffering=0, closefd=True)
        try:
            if not _is_pipe(self.read_fd):  # /dev/null, a regular file: epoll cannot watch them
                raise ValueError("not a pipe")
            transport, _ = await loop.connect_read_pipe(lambda: _FeedProtocol(self), reader_file)
            self._closers.append(transport)
        except (ValueError, NotImplementedError, OSError):  # not a pipe, or Windows
            self._closers.append(reader_file)
            threading.Thread(
                target=self._read_thread, args=(loop,), name="native-stdin", daemon=True
            ).start()
        writer_file = os.fdopen(self.write_fd, "wb", buffering=0, closefd=True)
        try:
            if not _is_pipe(self.write_fd):
                raise ValueError("not a pipe")
            w_transport, w_protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, writer_file
            )
            self._writer = asyncio.StreamWriter(w_transport, w_protocol, None, loop)
            self._closers.append(w_transport)
        except (ValueError, NotImplementedError, OSError):
            self._closers.append(writer_file)

    # -- reading ---------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        for item in self.decoder.feed(data):
            self._queue.put_nowait(item)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        error = self.decoder.eof()
        if error is not None:
            self._queue.put_nowait(error)
        self._queue.put_nowait(None)

    def _read_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                data = os.read(self.read_fd, _READ_SIZE)
            except OSError:
                data = b""
            if not data:
                loop.call_soon_threadsafe(self._end)
                return
            loop.call_soon_threadsafe(self._feed, data)
            if self.decoder.broken:
                loop.call_soon_threadsafe(self._end)
                return

    async def incoming(self) -> AsyncIterator[bytes | FrameError]:
        """Frame payloads and framing errors until EOF (or a frame that breaks the stream)."""
        while True:
            if self._paused is not None and self._queue.qsize() < _QUEUE_HIGH // 2:
                self._paused.resume_reading()
                self._paused = None
            item = await self._queue.get()
            if item is None:
                return
            yield item
            if isinstance(item, FrameError) and not item.in_sync:
                return

    # -- writing ---------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self._write(b"".join(frames_for(message)))

    async def send_json(self, text: str, message_id: Any) -> None:
        await self._write(b"".join(frames_for_json(text, message_id)))

    async def _write(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)  # one call per message: frames never interleave
            await self._writer.drain()
            return
        async with self._write_lock:
            await asyncio.to_thread(self._write_all, data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.write_fd, view)
            view = view[written:]

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.drain()
        for closer in reversed(self._closers):
            with contextlib.suppress(OSError, ValueError):
                closer.close()
