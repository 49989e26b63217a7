"""Mount the operation registry on aiohttp: one thin route per operation with an HTTP binding.

Parameters come from the path (``{id}``), the query string (GET/DELETE) or the JSON body
(POST/PUT/PATCH). A unary operation answers JSON. A streaming operation answers Server-Sent
Events, one ``event: <name>`` / ``data: <json>`` block per event, ending with ``event: done``;
an error after the stream has started arrives as ``event: error`` with the usual error object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ValidationError

from tabagent.api.keys import CORS_ORIGIN, STATE
from tabagent.api.middleware import add_route, common_headers, mark_public
from tabagent.errors import BadRequest, InvalidJSON, PayloadTooLarge, TabAgentError
from tabagent.logs import request_id_var
from tabagent.ops.registry import Done, OpContext, Operation, Registry, event_name
from tabagent.state import AppState

log = logging.getLogger(__name__)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_JSON = {hdrs.CONTENT_TYPE: "application/json"}


async def read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    return await request.read()  # client_max_size enforces the limit on chunked bodies


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, or a clear 400/413."""
    return json_object(await read_body(request, limit))


def json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise InvalidJSON("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidJSON(
            f"request body is not valid JSON: {exc.msg} at position {exc.pos}"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _merge(base: dict[str, Any], path_params: Mapping[str, str]) -> dict[str, Any]:
    for key, value in path_params.items():
        if key in base and base[key] != value:
            raise BadRequest(f"{key!r} is given both in the path and the body", param=key)
        base[key] = value
    return base


def sse_headers(request: web.Request) -> dict[str, str]:
    """Headers of a Server-Sent Events stream (sent before the middleware sees the response)."""
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        **common_headers(request_id_var.get(), request.get(CORS_ORIGIN)),
    }


def sse_block(event: str, payload: str) -> bytes:
    return f"event: {event}\ndata: {payload}\n\n".encode()


def _handler(op: Operation, state: AppState, max_body: int) -> Handler:
    assert op.http is not None
    status = op.http.status
    takes_body = op.http.method in _BODY_METHODS
    # operations without parameters (health, say) skip validation unless a client sends some
    no_params = not op.request_model.model_fields and "{" not in op.http.path
    empty = op.request_model() if no_params else None
    unary = op.handler  # what op.call runs, without its check that the op is unary (done here)
    render = op.http.render if no_params and not takes_body else None
    # model_validate_json's own work, without its Python frame: this runs on every body
    validate_json = op.request_model.__pydantic_validator__.validate_json

    async def handle(request: web.Request) -> web.StreamResponse:
        if render is not None and not request.query_string:
            return web.Response(body=render(state), status=status, headers=_JSON)
        if empty is not None and not takes_body and not request.query_string:
            parsed = empty
        elif takes_body:
            raw = await read_body(request, max_body)
            fast: BaseModel | None = None
            if not request.match_info:  # the usual case: the body is the request, one pass
                try:
                    fast = validate_json(raw)
                except ValidationError:
                    fast = None  # parsed again below
            # path parameters, no body, or bad input: the way that names what is wrong
            parsed = (
                fast if fast is not None else op.parse(_merge(json_object(raw), request.match_info))
            )
        else:
            parsed = op.parse(_merge(dict(request.query), request.match_info))
        ctx = OpContext(state=state, request_id=request_id_var.get(), transport="http")
        if not op.streaming:
            result = await unary(ctx, parsed)
            return web.Response(
                body=result.__pydantic_serializer__.to_json(result), status=status, headers=_JSON
            )
        return await stream_sse(request, op, ctx, parsed)

    handle.__name__ = op.name.replace(".", "_")
    return mark_public(handle) if op.public else handle


async def started(events: AsyncIterator[BaseModel]) -> AsyncIterator[BaseModel]:
    """The same events once the first has arrived. A stream that fails before its first event
    (unknown model, bad reference, full queue) then answers a plain JSON error with its HTTP
    status, instead of an error event inside a 200 stream."""
    try:
        first = await anext(events)
    except StopAsyncIteration:
        return _chain(None, events)
    except BaseException:
        await events.aclose()  # type: ignore[attr-defined]
        raise
    return _chain(first, events)


async def _chain(
    first: BaseModel | None, rest: AsyncIterator[BaseModel]
) -> AsyncIterator[BaseModel]:
    try:
        if first is not None:
            yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def stream_sse(
    request: web.Request, op: Operation, ctx: OpContext, parsed: BaseModel
) -> web.StreamResponse:
    events = await started(op.stream(ctx, parsed))
    response = web.StreamResponse(headers=sse_headers(request))
    await response.prepare(request)
    finished = False
    try:
        async for item in events:
            name = event_name(item)
            await response.write(sse_block(name, item.model_dump_json()))
            finished = name == "done"
        if not finished:
            await response.write(sse_block("done", Done().model_dump_json()))
    except (ConnectionResetError, ConnectionError):
        log.info("client went away during %s; stream cancelled", op.name)
        return response
    except TabAgentError as exc:
        await response.write(sse_block("error", json.dumps({"error": exc.to_dict()})))
    except Exception:
        log.exception("stream %s failed", op.name)
        err = TabAgentError(f"internal server error (request id {ctx.request_id})")
        await response.write(sse_block("error", json.dumps({"error": err.to_dict()})))
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    await response.write_eof()
    return response


def mount_operations(
    app: web.Application,
    registry: Registry,
    max_body: int,
    served: Callable[[Operation], bool] = lambda op: True,
) -> None:
    for op in registry:
        if op.http is not None and op.http.adapter == "default" and served(op):
            handler = _handler(op, app[STATE], max_body)
            add_route(app, op.http.method, op.http.path, handler, name=op.name)
