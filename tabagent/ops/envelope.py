"""The message envelope shared by native messaging and the data channel (ARCHITECTURE.md).

A transport hands each decoded message to :meth:`EnvelopeSession.handle` and gives the session a
``send`` coroutine; the session answers in the envelope's own form:

    {"id": "r1", "method": "chat.complete", "params": {...}}
    -> {"id": "r1", "event": "delta", "data": {...}}   (any number)
    -> {"id": "r1", "event": "done", "data": {...}}
    or {"id": "r1", "event": "error", "error": {"code", "message", "type", "param"}}

Every request ends with exactly one ``done`` or ``error``. Requests run concurrently, each in
its own task; ``session.cancel`` cancels one (the cancellation reaches the ML worker as on HTTP),
and closing the session cancels them all. Validation and errors come from the operation layer,
so a request rejected here is rejected on HTTP with the same code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tabagent import __version__
from tabagent.errors import (
    BadRequest,
    Cancelled,
    Conflict,
    ServiceUnavailable,
    TabAgentError,
    TooManyRequests,
)
from tabagent.logs import request_id_var
from tabagent.ops.registry import OpContext, event_name, validation_failed

if TYPE_CHECKING:
    from tabagent.state import AppState

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_IN_FLIGHT = 64
MAX_ID_CHARS = 128

# Room kept in each chunk message for everything but the piece: the envelope keys, the index and
# count, and the (bounded, 128-character) id escaped at its worst.
CHUNK_OVERHEAD = 1024

Send = Callable[[dict[str, Any]], Awaitable[None]]
MessageId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)] | int


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: MessageId
    method: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] | None = None


class CancelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: MessageId


def dumps(message: Any) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def split_message(text: str, message_id: Any, limit: int) -> list[str]:
    """The JSON texts to send for one message serialised as ``text``: itself when it fits
    ``limit`` bytes, else ``chunk`` messages carrying consecutive pieces of it (PROTOCOL.md)."""
    if len(text.encode("utf-8")) <= limit:
        return [text]
    pieces = list(split_text(text, limit - CHUNK_OVERHEAD))
    return [
        dumps(
            {
                "id": message_id,
                "event": "chunk",
                "chunk": {"index": index, "count": len(pieces)},
                "data": piece,
            }
        )
        for index, piece in enumerate(pieces)
    ]


def _escaped_size(piece: str) -> int:
    return len(dumps(piece).encode("utf-8"))


def split_text(text: str, budget: int) -> Iterator[str]:
    """Consecutive pieces of ``text`` whose JSON-string encoding fits ``budget`` bytes.

    A character costs 1 to 6 bytes once escaped, so each piece starts at ``budget`` characters
    and shrinks in proportion until it fits (once or twice for ordinary text)."""
    start = 0
    while start < len(text):
        length = min(budget, len(text) - start)
        while True:
            size = _escaped_size(text[start : start + length])
            if size <= budget:
                break
            length = max(1, min(length - 1, int(length * budget / size * 0.98)))
        yield text[start : start + length]
        start += length


class Reassembler:
    """The receiving side of chunking (used by tests and the proxy; the extension has its own)."""

    def __init__(self, limit: int | None = None) -> None:
        self._parts: dict[Any, list[str]] = {}
        self._sizes: dict[Any, int] = {}
        self.limit = limit  # most characters one reassembled message may have

    def add(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """A whole message: ``message`` itself, or the one its last chunk completes."""
        if message.get("event") != "chunk":
            return message
        key = json.dumps(message.get("id"))
        parts = self._parts.setdefault(key, [])
        chunk = message["chunk"]
        if chunk["index"] != len(parts):
            self._parts.pop(key, None)
            self._sizes.pop(key, None)
            raise ValueError(f"chunk {chunk['index']} arrived when {len(parts)} was expected")
        size = self._sizes.get(key, 0) + len(message["data"])
        if self.limit is not None and size > self.limit:
            self._parts.pop(key, None)
            self._sizes.pop(key, None)
            raise ValueError(f"chunked message is larger than the limit of {self.limit}")
        self._sizes[key] = size
        parts.append(message["data"])
        if len(parts) < chunk["count"]:
            return None
        del self._parts[key]
        del self._sizes[key]
        whole: dict[str, Any] = json.loads("".join(parts))
        return whole


def error_message(message_id: Any, exc: TabAgentError) -> dict[str, Any]:
    return {"id": message_id, "event": "error", "error": exc.to_dict()}


def _recoverable_id(message: Any) -> Any:
    """The id to answer an invalid envelope with: its own, when that id is itself valid."""
    if isinstance(message, dict):
        value = message.get("id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
            return value
    return None


class EnvelopeSession:
    """The requests of one connection (one browser port, one data channel)."""

    def __init__(
        self,
        state: AppState,
        send: Send,
        *,
        transport: str,
        hello: dict[str, Any] | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        ready: asyncio.Event | None = None,
        peer: str | None = None,
    ) -> None:
        self.state = state
        self.peer = peer
        self._send = send
        self.transport = transport
        self._hello = hello or {}
        self.max_in_flight = max_in_flight
        self._tasks: dict[Any, asyncio.Task[None]] = {}
        self._cancelled: set[Any] = set()
        self._prefix = f"{transport[:1]}{secrets.token_hex(3)}"
        self._counter = itertools.count(1)
        self.closed = False
        # Set once the server's components are up: until then requests are accepted and wait,
        # so a browser gets its hello at once. ``unavailable`` says why start-up failed.
        self._ready = ready
        self.unavailable: str | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def send(self, message: dict[str, Any]) -> None:
        await self._send(message)

    async def handle(self, message: Any) -> None:
        """Start serving one decoded message; returns once it is validated and scheduled."""
        try:
            request = Request.model_validate(message)
        except ValidationError as exc:
            error = validation_failed(exc)
            await self.send(
                error_message(
                    _recoverable_id(message),
                    BadRequest(f"invalid envelope: {error.message}", code="invalid_envelope"),
                )
            )
            return
        try:
            await self._dispatch(request)
        except TabAgentError as exc:
            await self.send(error_message(request.id, exc))

    async def _dispatch(self, request: Request) -> None:
        if request.method == "session.cancel":
            try:
                target = CancelParams.model_validate(request.params or {}).id
            except ValidationError as exc:
                raise validation_failed(exc) from None
            task = self._tasks.get(target)
            if task is not None and not task.done():
                self._cancelled.add(target)
                task.cancel()
            await self.send(
                {"id": request.id, "event": "done", "data": {"cancelled": task is not None}}
            )
            return
        if request.method == "session.hello":
            await self.send({"id": request.id, "event": "done", "data": self.hello()})
            return
        op = self.state.registry.get(request.method)
        parsed = op.parse(request.params)
        if request.id in self._tasks:
            raise Conflict(f"request id {request.id!r} is already in flight", code="duplicate_id")
        if len(self._tasks) >= self.max_in_flight:
            raise TooManyRequests(
                f"at most {self.max_in_flight} requests may be in flight on one connection",
                code="too_many_in_flight",
            )
        request_id = f"{self._prefix}{next(self._counter):06x}"
        ctx = OpContext(
            state=self.state, request_id=request_id, transport=self.transport, peer=self.peer
        )
        task = asyncio.create_task(self._run(request.id, op, ctx, parsed), name=request_id)
        self._tasks[request.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request.id, None))

    def hello(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "server_version": __version__,
            "transport": self.transport,
            "max_in_flight": self.max_in_flight,
            "ready": self._ready is None or self._ready.is_set(),
            **self._hello,
            **({"error": self.unavailable} if self.unavailable else {}),
        }

    async def _run(self, message_id: Any, op: Any, ctx: OpContext, parsed: BaseModel) -> None:
        token = request_id_var.set(ctx.request_id)
        try:
            if self._ready is not None and not self._ready.is_set():
                await self._ready.wait()
            if self.unavailable is not None:
                raise ServiceUnavailable(
                    f"TabAgent could not start: {self.unavailable}", code="startup_failed"
                )
            if op.streaming:
                events = op.stream(ctx, parsed)
                finished = False
                try:
                    async for item in events:
                        name = event_name(item)
                        await self.send(
                            {"id": message_id, "event": name, "data": item.model_dump(mode="json")}
                        )
                        finished = name == "done"
                finally:
                    await events.aclose()
                if not finished:
                    await self.send({"id": message_id, "event": "done", "data": {}})
            else:
                result = await op.call(ctx, parsed)
                await self.send(
                    {"id": message_id, "event": "done", "data": result.model_dump(mode="json")}
                )
        except asyncio.CancelledError:
            if message_id in self._cancelled and not self.closed:
                self._cancelled.discard(message_id)
                await self._send_quietly(
                    error_message(message_id, Cancelled("cancelled by the client"))
                )
                return  # the cancellation was ours to handle: the task ends normally
            raise
        except TabAgentError as exc:
            await self._send_quietly(error_message(message_id, exc))
        except Exception:
            log.exception("%s failed", op.name)
            err = TabAgentError(f"internal server error (request id {ctx.request_id})")
            await self._send_quietly(error_message(message_id, err))
        finally:
            request_id_var.reset(token)

    async def _send_quietly(self, message: dict[str, Any]) -> None:
        try:
            await self.send(message)
        except (ConnectionError, OSError):
            log.info("connection gone; could not deliver the end of %s", message.get("id"))

    async def close(self) -> None:
        """The connection is gone: cancel whatever is still running and wait for it."""
        self.closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
