"""The native-messaging host: what runs when the browser starts ``tabagent-server``.

1. If a TabAgent server is already running for this user (``tabagent.discovery``), the host
   is a thin relay: frames from the browser go to the server's ``/v1/envelope`` WebSocket and
   the answers come back as frames. No model is loaded and no database opened a second time.
2. Otherwise the host serves in-process: the same composition root as the web server builds
   the ML worker, model cache and memory, and the host publishes itself, so a second browser
   profile's host proxies to this one.

Either way a bad frame gets an ``error`` message with a stable code (PROTOCOL.md) and the host
keeps serving while the stream is in sync; EOF on stdin (the browser closed the port) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tabagent.api.envelope_ws import ENVELOPE_PATH
from tabagent.config import Settings
from tabagent.discovery import ServerInfo, find
from tabagent.errors import BadRequest, ServiceUnavailable
from tabagent.native_messaging.codec import CHROME_MAX_INCOMING, FrameError, decode_json
from tabagent.native_messaging.stdio import StdioChannel
from tabagent.ops.envelope import EnvelopeSession, error_message

log = logging.getLogger(__name__)


def frame_error(error: FrameError) -> dict[str, Any]:
    return error_message(None, BadRequest(error.message, code=error.code))


async def requests(channel: StdioChannel) -> AsyncIterator[tuple[bytes, Any]]:
    """The browser's messages that are JSON, raw and decoded, until EOF (or a frame that breaks
    the stream); every bad frame is answered here with its error code."""
    async for item in channel.incoming():
        value = item if isinstance(item, FrameError) else decode_json(item)
        if isinstance(value, FrameError):
            await channel.send(frame_error(value))
            continue  # incoming() ends by itself after an out-of-sync error
        assert isinstance(item, bytes)
        yield item, value


async def pump(channel: StdioChannel, session: EnvelopeSession) -> None:
    """Serve the browser's messages until EOF or a frame that breaks the stream."""
    async for _, value in requests(channel):
        await session.handle(value)


async def run_native(settings: Settings) -> int:
    """Serve native messaging on this process's stdin/stdout; the exit status."""
    channel = StdioChannel.take_over(min(settings.max_body_bytes, CHROME_MAX_INCOMING))
    await channel.start()
    try:
        server = find(settings.run_dir)
        if server is not None:
            try:
                return await proxy(channel, server, settings)
            except UpstreamUnavailable as exc:
                log.warning("%s; serving in-process instead", exc)
        return await serve_in_process(channel, settings)
    finally:
        await channel.close()


async def serve_in_process(channel: StdioChannel, settings: Settings) -> int:
    from tabagent.app import StartupError, Transports, serve

    try:
        await serve(
            settings, Transports(http=False, webrtc=False, native=True), native_channel=channel
        )
    except StartupError as exc:  # the browser was told, request by request, until it hung up
        log.error("cannot start: %s", exc)
        return 1
    return 0


class UpstreamUnavailable(RuntimeError):
    pass


async def proxy(channel: StdioChannel, server: ServerInfo, settings: Settings) -> int:
    """Relay frames to a running server's envelope endpoint and its answers back."""
    timeout = aiohttp.ClientTimeout(total=None, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            ws = await http.ws_connect(
                server.url + ENVELOPE_PATH,
                headers={"Authorization": f"Bearer {server.token}"},
                max_msg_size=0,
                autoping=True,
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(
                f"the server published at {server.url} (pid {server.pid}) does not answer: {exc}"
            ) from None
        log.info("native host proxying to TabAgent %s at %s", server.version, server.url)
        async with ws:
            down = asyncio.create_task(_to_browser(ws, channel))
            up = asyncio.create_task(_to_server(ws, channel))
            done, _ = await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
            for task in (down, up):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if up in done:  # the browser hung up: a clean end
                return 0
        await channel.send(
            error_message(
                None,
                ServiceUnavailable(
                    "the TabAgent server this host relayed to has stopped; reconnect to go on",
                    code="server_gone",
                ),
            )
        )
        return 1


async def _to_server(ws: aiohttp.ClientWebSocketResponse, channel: StdioChannel) -> None:
    async for raw, _ in requests(channel):
        await ws.send_str(raw.decode("utf-8"))


async def _to_browser(ws: aiohttp.ClientWebSocketResponse, channel: StdioChannel) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        text: str = msg.data
        message_id = None
        if len(text) > 1024 * 1024 // 4:  # might need chunking: the chunks carry its id
            with contextlib.suppress(ValueError):
                message_id = _json_id(text)
        await channel.send_json(text, message_id)


def _json_id(text: str) -> Any:
    value = json.loads(text)
    return value.get("id") if isinstance(value, dict) else None
