"""``GET /v1/envelope``: the message envelope over a WebSocket, for native hosts that proxy.

A native-messaging host started by the browser while a server is already running forwards its
frames here instead of loading the models and opening the databases a second time. Each text
message is one envelope (PROTOCOL.md); the server's answers come back the same way, any size
(the host splits what exceeds Chrome's 1 MiB). The endpoint needs the per-launch token the
server wrote to its run file (``tabagent.discovery``), which only this user can read; it is not
part of the public API and not in the OpenAPI document.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import weakref
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tabagent.api.keys import STATE
from tabagent.api.middleware import add_route, mark_public
from tabagent.errors import BadRequest, InvalidJSON, Unauthorized
from tabagent.ops.envelope import EnvelopeSession, error_message

log = logging.getLogger(__name__)

ENVELOPE_PATH = "/v1/envelope"


def add_envelope_route(app: web.Application, token: str, max_message: int) -> None:
    expected = f"Bearer {token}".encode()
    open_sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    async def close_all(_: web.Application) -> None:
        # On shutdown relaying hosts hear "going away" at once (their browser then reconnects)
        # instead of the connection hanging until the shutdown timeout.
        for ws in list(open_sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    app.on_shutdown.append(close_all)

    async def handle(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise Unauthorized(
                "this endpoint is for TabAgent's native host: it needs the token from the "
                "server's run file",
                code="invalid_token",
            )
        ws = web.WebSocketResponse(max_msg_size=max_message, autoping=True)
        await ws.prepare(request)
        open_sockets.add(ws)
        lock = asyncio.Lock()

        async def send(message: dict[str, Any]) -> None:
            text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
            async with lock:
                await ws.send_str(text)

        session = EnvelopeSession(
            request.app[STATE],
            send,
            transport="native",
            hello={"mode": "proxy", "pid": os.getpid()},
        )
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        value = json.loads(msg.data)
                    except ValueError as exc:
                        await send(error_message(None, InvalidJSON(f"message is not JSON: {exc}")))
                        continue
                    await session.handle(value)
                elif msg.type == WSMsgType.BINARY:
                    await send(error_message(None, BadRequest("send envelopes as text messages")))
        finally:
            await session.close()
        return ws

    add_route(app, "GET", ENVELOPE_PATH, mark_public(handle), name="envelope")
