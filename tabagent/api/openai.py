"""OpenAI's wire format over our operations: chat and legacy completions, plus image uploads.

``chat.complete`` and ``text.complete`` are streaming operations. With ``stream: true`` each
event goes out as an OpenAI chunk (``data: {...}``), ending with ``data: [DONE]``; otherwise the
events are gathered into one ``chat.completion`` / ``text_completion`` object. A client that
disconnects closes the event stream, which cancels the gRPC call, which stops generation in the
worker within one token.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import BodyPartReader, web
from pydantic import BaseModel

from tabagent.api.keys import STATE
from tabagent.api.middleware import add_route
from tabagent.api.routes import read_json_object, sse_headers, started
from tabagent.errors import BadRequest, PayloadTooLarge, TabAgentError
from tabagent.logs import request_id_var
from tabagent.ops.chat import Delta, Finished, SamplingFields
from tabagent.ops.registry import OpContext, Operation, Registry
from tabagent.ops.vision import MAX_IMAGE_BYTES, detect

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "X-Conversation-Id"  # same as the conversation_id extension field


def _context(request: web.Request) -> OpContext:
    return OpContext(state=request.app[STATE], request_id=request_id_var.get(), transport="http")


class _Shape:
    """How one endpoint names its objects and carries text."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.prefix = "chatcmpl-" if chat else "cmpl-"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def full_choice(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(
    request: web.Request, shape: _Shape, events: AsyncIterator[BaseModel], parsed: SamplingFields
) -> web.StreamResponse:
    response = web.StreamResponse(headers=sse_headers(request))
    ident, created = shape.prefix + secrets.token_hex(12), int(time.time())
    include_usage = bool((parsed.stream_options or {}).get("include_usage"))
    first = True

    def envelope(model: str, choices: list[dict[str, Any]], usage: Any = None) -> dict[str, Any]:
        body = {"id": ident, "object": shape.chunk_object, "created": created, "model": model,
                "system_fingerprint": None, "choices": choices}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return body

    events = await started(events)
    await response.prepare(request)
    try:
        async for event in events:
            if isinstance(event, Delta):
                await response.write(
                    _sse(envelope(event.model, [shape.chunk_choice(event.text, None, first)]))
                )
                first = False
            elif isinstance(event, Finished):
                finish = "stop" if event.finish_reason == "cancelled" else event.finish_reason
                await response.write(
                    _sse(
                        envelope(
                            event.model,
                            [shape.chunk_choice(None if shape.chat else "", finish, first)],
                        )
                    )
                )
                if include_usage or event.memory is not None:
                    tail = envelope(event.model, [], event.usage.model_dump())
                    if event.memory is not None:
                        tail["tabagent"] = {"memory": event.memory.model_dump()}
                    await response.write(_sse(tail))
        await response.write(_sse("[DONE]"))
    except (ConnectionResetError, ConnectionError):
        log.info("client disconnected; generation cancelled")
        return response
    except TabAgentError as exc:
        await response.write(_sse({"error": exc.to_dict()}))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


async def _gather(shape: _Shape, events: AsyncIterator[BaseModel]) -> web.Response:
    parts: list[str] = []
    finished: Finished | None = None
    model = ""
    try:
        async for event in events:
            if isinstance(event, Delta):
                parts.append(event.text)
                model = event.model
            elif isinstance(event, Finished):
                finished = event
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if finished is None:  # pragma: no cover - the worker always ends with a final chunk
        raise TabAgentError("generation ended without a result")
    body = {
        "id": shape.prefix + secrets.token_hex(12),
        "object": shape.object,
        "created": int(time.time()),
        "model": finished.model or model,
        "system_fingerprint": None,
        "choices": [shape.full_choice("".join(parts), finished.finish_reason)],
        "usage": finished.usage.model_dump(),
    }
    if finished.memory is not None:  # extension: what memory added to this answer
        body["tabagent"] = {"memory": finished.memory.model_dump()}
    return web.json_response(body)


def _generation_route(op: Operation, chat: bool, max_body: int) -> Any:
    shape = _Shape(chat)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request, max_body)
        conversation = request.headers.get(CONVERSATION_HEADER)
        if chat and conversation and "conversation_id" not in body:
            body["conversation_id"] = conversation
        parsed = op.parse(body)
        assert isinstance(parsed, SamplingFields)
        events = op.stream(_context(request), parsed)
        if parsed.stream:
            return await _stream(request, shape, events, parsed)
        return await _gather(shape, events)

    handle.__name__ = op.name.replace(".", "_")
    return handle


def _faces_route(op: Operation, max_body: int) -> Any:
    async def handle(request: web.Request) -> web.Response:
        result: BaseModel
        if request.content_type.startswith("multipart/"):
            image, min_confidence, model = await _read_upload(request)
            result = await detect(_context(request), image, min_confidence, model)
        else:
            parsed = op.parse(await read_json_object(request, max_body))
            result = await op.call(_context(request), parsed)
        return web.Response(body=result.model_dump_json().encode(), content_type="application/json")

    return handle


async def _read_upload(request: web.Request) -> tuple[bytes, float | None, str | None]:
    reader = await request.multipart()
    image: bytes | None = None
    fields: dict[str, str] = {}
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "image":
            data = bytearray()
            while chunk := await part.read_chunk(65536):
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise PayloadTooLarge(f"image is larger than {MAX_IMAGE_BYTES} bytes")
            image = bytes(data)
        elif part.name in ("min_confidence", "model"):
            fields[part.name] = (await part.text())[:256]
    if not image:
        raise BadRequest("multipart upload needs a non-empty 'image' file field", param="image")
    try:
        min_conf = float(fields["min_confidence"]) if "min_confidence" in fields else None
    except ValueError:
        raise BadRequest("min_confidence must be a number", param="min_confidence") from None
    if min_conf is not None and not 0 <= min_conf <= 1:
        raise BadRequest("min_confidence must be between 0 and 1", param="min_confidence")
    return image, min_conf, fields.get("model")


def mount_custom(app: web.Application, registry: Registry, max_body: int) -> None:
    """Routes for the operations whose HTTP binding says ``adapter="custom"``."""
    builders: dict[str, Callable[[Operation], Any]] = {
        "chat.complete": lambda op: _generation_route(op, True, max_body),
        "text.complete": lambda op: _generation_route(op, False, max_body),
        "vision.faces": lambda op: _faces_route(op, MAX_IMAGE_BYTES + 1024 * 1024),
    }
    for op in registry:
        if op.http is not None and op.http.adapter == "custom":
            route = builders[op.name](op)
            add_route(app, op.http.method, op.http.path, route, name=op.name)
