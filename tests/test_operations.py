"""The operation layer seen through HTTP: JSON errors, validation, streaming, graceful drain."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import BaseModel, ConfigDict, Field

from tabagent.api.keys import STATE
from tabagent.app import build_app
from tabagent.config import Settings
from tabagent.errors import ServiceUnavailable
from tabagent.metrics import Metrics
from tabagent.ops import default_registry, system
from tabagent.ops.registry import Empty, Http, OpContext, OperationGroup, Registry
from tabagent.state import AppState
from tests.helpers import Server

# --- a test-only group: a streaming operation and a slow one (no real stream exists yet) ---
testing = OperationGroup(tag="testing")


class CountRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: int = Field(ge=1, le=50)
    fail_at: int | None = None


class Tick(BaseModel):
    n: int


class SlowRequest(BaseModel):
    seconds: float = Field(ge=0, le=5)


class Slept(BaseModel):
    slept: float


@testing.operation("testing.count", http=Http("POST", "/v1/testing/count"))
async def count(ctx: OpContext, req: CountRequest) -> AsyncIterator[Tick]:
    """Count up to ``to``, one event per number."""
    for n in range(1, req.to + 1):
        if n == req.fail_at:
            raise ServiceUnavailable("worker went away", retry_after=2)
        yield Tick(n=n)
        await asyncio.sleep(0)


@testing.operation("testing.slow", http=Http("GET", "/v1/testing/slow"))
async def slow(ctx: OpContext, req: SlowRequest) -> Slept:
    """Sleep, then answer."""
    await asyncio.sleep(req.seconds)
    return Slept(slept=req.seconds)


def registry_with_testing() -> Registry:
    return Registry(system.group, testing)


@pytest.fixture
async def test_client(
    aiohttp_client, settings: Settings
) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(Server(build_app(settings, registry=registry_with_testing())))


def parse_sse(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# --- health: the answer made from kept bytes is the handler's answer ---


async def test_health_over_http_is_the_handler_answer_and_follows_component_changes(
    client: TestClient[web.Request, web.Application],
) -> None:
    state = client.app[STATE]
    ctx = OpContext(state=state, request_id="t", transport="test")
    health = state.registry.get("system.health")
    for change in (None, ("memory", "degraded", "disk full"), ("memory", "ok", "")):
        if change is not None:
            state.components.set(*change)
        answered = await (await client.get("/v1/health")).json()
        expected = (await health.call(ctx, Empty())).model_dump(mode="json")
        assert abs(answered.pop("uptime_s") - expected.pop("uptime_s")) < 5
        assert answered == expected
    assert answered["components"]["memory"] == {"state": "ok", "detail": ""}
    state.components.set("memory", "degraded", "disk full")
    assert (await (await client.get("/v1/health")).json())["status"] == "degraded"
    with_query = await client.get("/v1/health?verbose=1")  # parameters: validated as before
    assert with_query.status == 422


@pytest.mark.parametrize("uptime", [0.0, 0.001, 0.1, 2.29, 59.999, 3600.0, 86399.5, 1e9 + 0.125])
def test_health_json_is_the_model_with_the_uptime_in_milliseconds(
    settings: Settings, uptime: float
) -> None:
    state = AppState(settings=settings, registry=default_registry(), metrics=Metrics())
    state.components.set("http", "ok")
    state.started_at = time.monotonic() - uptime
    render = state.registry.get("system.health").http.render  # type: ignore[union-attr]
    assert render is not None
    rendered = render(state)
    model = system.Health.model_validate_json(rendered)  # valid JSON of the model
    assert json.loads(rendered) == json.loads(model.model_dump_json())  # nothing else in it
    assert re.search(rb'"uptime_s":\d+\.\d{3},', rendered)
    assert uptime <= model.uptime_s < uptime + 1  # milliseconds, truncated; the test's own time
    state.started_at -= 2.0  # the same components two seconds later: not the kept answer
    assert system.Health.model_validate_json(render(state)).uptime_s >= model.uptime_s + 2


def test_health_json_keeps_each_app_apart_and_reuses_an_answer_within_a_millisecond(
    settings: Settings,
) -> None:
    states = [
        AppState(settings=settings, registry=default_registry(), metrics=Metrics()) for _ in "ab"
    ]
    states[0].components.set("memory", "ok", "first")
    states[1].components.set("memory", "degraded", "second")
    render = states[0].registry.get("system.health").http.render  # type: ignore[union-attr]
    assert render is not None
    for _ in range(3):  # one renderer serves every app in the process, in turn
        first, second = (system.Health.model_validate_json(render(s)) for s in states)
        assert first.components["memory"].detail == "first"
        assert (second.status, second.components["memory"].detail) == ("degraded", "second")
    for _ in range(100):  # two answers in the same millisecond are the same bytes
        one, two = render(states[0]), render(states[0])
        if one == two:
            assert one is two
            break
    else:
        pytest.fail("no two health answers within one millisecond in 100 tries")


# --- errors: every failure is JSON in the OpenAI shape ---


async def test_unknown_route_is_json_404(client: TestClient[web.Request, web.Application]) -> None:
    response = await client.get("/v1/nope")
    assert response.status == 404
    assert response.content_type == "application/json"
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "not_found"
    assert "/v1/nope" in error["message"]


async def test_wrong_method_is_json_405_with_allow(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.delete("/v1/health")
    assert response.status == 405
    assert "GET" in response.headers["Allow"]
    assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_get_routes_answer_head_with_headers_only(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.head("/v1/health", headers={"X-Request-Id": "probe-1"})
    assert response.status == 200
    assert response.headers["X-Request-Id"] == "probe-1"
    assert response.headers["Content-Type"] == "application/json"
    assert await response.read() == b""


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b"[1, 2]", "bad_request"),
    ],
)
async def test_bad_json_is_400(
    client: TestClient[web.Request, web.Application], body: bytes, code: str
) -> None:
    response = await client.post("/v1/system/log-level", data=body)
    assert response.status == 400
    assert (await response.json())["error"]["code"] == code


@pytest.mark.parametrize(
    ("payload", "param"),
    [({}, "level"), ({"level": "LOUD"}, "level"), ({"level": "INFO", "extra": 1}, "extra")],
)
async def test_validation_error_is_422_naming_the_field(
    client: TestClient[web.Request, web.Application], payload: dict[str, object], param: str
) -> None:
    response = await client.post("/v1/system/log-level", json=payload)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "validation_error"
    assert error["param"] == param
    assert param in error["message"]


async def test_query_parameters_are_validated_too(
    test_client: TestClient[web.Request, web.Application],
) -> None:
    response = await test_client.get("/v1/testing/slow", params={"seconds": "99"})
    assert response.status == 422
    assert (await response.json())["error"]["param"] == "seconds"


async def test_unary_operation_roundtrip(client: TestClient[web.Request, web.Application]) -> None:
    response = await client.post("/v1/system/log-level", json={"level": "WARNING"})
    assert response.status == 200
    assert (await response.json())["level"] == "WARNING"
    again = await client.post("/v1/system/log-level", json={"level": "INFO"})
    assert (await again.json())["previous"] == "WARNING"


async def test_operations_catalogue_lists_every_registered_operation(
    test_client: TestClient[web.Request, web.Application],
) -> None:
    response = await test_client.get("/v1/system/operations")
    listed = {op["name"]: op for op in (await response.json())["operations"]}
    assert set(listed) == {op.name for op in registry_with_testing()}
    assert listed["testing.count"]["streaming"] is True
    assert listed["system.health"]["http_path"] == "/v1/health"


# --- streaming ---


async def test_streaming_operation_is_server_sent_events(
    test_client: TestClient[web.Request, web.Application],
) -> None:
    response = await test_client.post("/v1/testing/count", json={"to": 3})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["X-Request-Id"]
    events = parse_sse(await response.text())
    assert events == [("delta", {"n": 1}), ("delta", {"n": 2}), ("delta", {"n": 3}), ("done", {})]


async def test_error_mid_stream_is_an_error_event(
    test_client: TestClient[web.Request, web.Application],
) -> None:
    response = await test_client.post("/v1/testing/count", json={"to": 5, "fail_at": 3})
    events = parse_sse(await response.text())
    assert [name for name, _ in events] == ["delta", "delta", "error"]
    assert events[-1][1]["error"]["code"] == "unavailable"  # type: ignore[index]


async def test_stream_request_validated_before_streaming(
    test_client: TestClient[web.Request, web.Application],
) -> None:
    response = await test_client.post("/v1/testing/count", json={"to": 0})
    assert response.status == 422
    assert response.content_type == "application/json"


# --- the registry itself ---


def test_registry_refuses_duplicate_names_and_reports_unknown_methods() -> None:
    registry = default_registry()
    with pytest.raises(ValueError, match="twice"):
        registry.include(system.group)
    from tabagent.errors import NotFound

    with pytest.raises(NotFound) as excinfo:
        registry.get("chat.nonexistent")
    assert excinfo.value.code == "unknown_method"


async def test_operation_called_directly_validates_like_http(settings: Settings) -> None:
    """Native messaging and the data channel call operations by name; same validation."""
    from tabagent.errors import ValidationFailed
    from tabagent.metrics import Metrics
    from tabagent.state import AppState

    registry = default_registry()
    state = AppState(settings=settings, registry=registry, metrics=Metrics())
    op = registry.get("system.set_log_level")
    with pytest.raises(ValidationFailed) as excinfo:
        op.parse({"level": "LOUD"})
    assert excinfo.value.param == "level"
    ctx = OpContext(state=state, request_id="r1", transport="native")
    result = await op.call(ctx, op.parse({"level": "INFO"}))
    assert result.model_dump()["level"] == "INFO"
    health = await registry.get("system.health").call(ctx, Empty())
    assert health.model_dump()["status"] == "ok"


# --- graceful shutdown drains in-flight requests ---


async def test_shutdown_lets_in_flight_requests_finish(settings: Settings) -> None:
    app = build_app(settings, registry=registry_with_testing())
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(
            session.get(f"http://127.0.0.1:{port}/v1/testing/slow", params={"seconds": "0.5"})
        )
        await asyncio.sleep(0.1)  # let the request reach the handler
        await runner.cleanup()  # what SIGTERM triggers
        response = await pending
        assert response.status == 200
        assert (await response.json())["slept"] == 0.5
