"""Local-server security on a real socket: Host allow-list, origins and CORS, API key, body cap."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiohttp import web

from tabagent.api.middleware import GATE, close_gate
from tabagent.app import build_app
from tabagent.config import Settings
from tests.conftest import ClientFactory

EXT_ID = "abcdefghijklmnopabcdefghijklmnop"
EXT_ORIGIN = f"chrome-extension://{EXT_ID}"


async def raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (the client libraries always add a Host header)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:3000", "127.0.0.1.nip.io", "10.0.0.7"]
)
async def test_foreign_host_is_forbidden(make_client: ClientFactory, host: str) -> None:
    client = await make_client()
    response = await client.get("/v1/health", headers={"Host": host})
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:3000", "127.0.0.1:9", "[::1]:3000", "LOCALHOST."]
)
async def test_loopback_hosts_with_any_port_are_accepted(
    make_client: ClientFactory, host: str
) -> None:
    client = await make_client()
    response = await client.get("/v1/health", headers={"Host": host})
    assert response.status == 200


async def test_configured_host_name_is_accepted(make_client: ClientFactory) -> None:
    client = await make_client(allowed_hosts=("tabagent.lan",))
    assert (await client.get("/v1/health", headers={"Host": "tabagent.lan:3000"})).status == 200
    assert (await client.get("/v1/health", headers={"Host": "other.lan"})).status == 403


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/health HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        b"GET /v1/health HTTP/1.0\r\nConnection: close\r\n\r\n",
    ],
    ids=["empty-host", "missing-host"],
)
async def test_empty_or_missing_host_is_forbidden(
    make_client: ClientFactory, request_bytes: bytes
) -> None:
    client = await make_client()
    assert client.port is not None
    status, body = await raw_request(client.port, request_bytes)
    assert status == 403
    assert b"host_not_allowed" in body


async def test_foreign_origin_gets_no_cors_headers_and_no_action(
    make_client: ClientFactory,
) -> None:
    client = await make_client(extension_ids=(EXT_ID,))
    response = await client.post(
        "/v1/system/log-level",
        data='{"level": "DEBUG"}',
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert response.status == 403
    assert (await response.json())["error"]["code"] == "origin_not_allowed"
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]


async def test_foreign_origin_preflight_gets_no_cors_headers(make_client: ClientFactory) -> None:
    client = await make_client(extension_ids=(EXT_ID,))
    response = await client.options(
        "/v1/system/log-level",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 403
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]


@pytest.mark.parametrize("origin", [EXT_ORIGIN, "http://localhost:5173"])
async def test_allowed_origin_preflight_is_answered(
    make_client: ClientFactory, origin: str
) -> None:
    client = await make_client(extension_ids=(EXT_ID,), allowed_origins=("http://localhost:5173",))
    response = await client.options(
        "/v1/system/log-level",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
            "Access-Control-Request-Private-Network": "true",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert response.headers["Access-Control-Allow-Private-Network"] == "true"
    assert response.headers["Vary"] == "Origin"


async def test_preflight_needs_no_api_key_but_the_request_does(make_client: ClientFactory) -> None:
    """Browsers send preflights without credentials: they must pass, the real call must not."""
    client = await make_client(extension_ids=(EXT_ID,), api_key="correct horse")
    preflight = await client.options(
        "/v1/system/log-level",
        headers={"Origin": EXT_ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == EXT_ORIGIN
    refused = await client.post(
        "/v1/system/log-level", json={"level": "INFO"}, headers={"Origin": EXT_ORIGIN}
    )
    assert refused.status == 401
    assert refused.headers["Access-Control-Allow-Origin"] == EXT_ORIGIN  # the page can read why


async def test_allowed_origin_request_gets_cors_headers(make_client: ClientFactory) -> None:
    client = await make_client(extension_ids=(EXT_ID,))
    response = await client.get("/v1/system", headers={"Origin": EXT_ORIGIN})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == EXT_ORIGIN
    assert "X-Request-Id" in response.headers["Access-Control-Expose-Headers"]


async def test_same_origin_page_may_call_the_api(make_client: ClientFactory) -> None:
    client = await make_client()
    origin = f"http://127.0.0.1:{client.port}"
    response = await client.post(
        "/v1/system/log-level", json={"level": "INFO"}, headers={"Origin": origin}
    )
    assert response.status == 200
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_api_key_required_when_configured(make_client: ClientFactory) -> None:
    client = await make_client(api_key="correct horse")
    missing = await client.get("/v1/system")
    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    body = await missing.json()
    assert body["error"]["type"] == "authentication_error"
    wrong = await client.get("/v1/system", headers={"Authorization": "Bearer wrong horse"})
    assert wrong.status == 401
    right = await client.get("/v1/system", headers={"Authorization": "Bearer correct horse"})
    assert right.status == 200
    metrics = await client.get("/metrics")
    assert metrics.status == 401


@pytest.mark.parametrize(
    "path",
    [
        "/v1/health",
        "/api-doc",
        "/api-doc/swagger",
        "/api-doc/openapi.json",
        "/api-doc/assets/swagger/js/swagger-ui-bundle.js",
        "/api-doc/assets/redoc/js/redoc.standalone.js",
        "/",
    ],
)
async def test_health_docs_and_ui_stay_open_with_an_api_key(
    make_client: ClientFactory, path: str
) -> None:
    client = await make_client(api_key="correct horse")
    assert (await client.get(path)).status == 200


async def test_body_over_the_cap_is_413(make_client: ClientFactory) -> None:
    client = await make_client(max_body_bytes=2048)
    big = '{"level": "INFO", "pad": "' + "x" * 4096 + '"}'
    response = await client.post("/v1/system/log-level", data=big)
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "request_too_large"


async def test_chunked_body_over_the_cap_is_413(make_client: ClientFactory) -> None:
    client = await make_client(max_body_bytes=2048)

    async def chunks():  # no Content-Length: the cap must hold while reading
        for _ in range(8):
            yield b"x" * 1024

    response = await client.post("/v1/system/log-level", data=chunks())
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "request_too_large"


async def test_server_keeps_serving_after_rejections(make_client: ClientFactory) -> None:
    client = await make_client(max_body_bytes=2048)
    for _ in range(3):
        await client.post("/v1/system/log-level", data="x" * 5000)
        await client.get("/v1/health", headers={"Host": "evil.example"})
    assert (await client.get("/v1/health")).status == 200


@pytest.mark.parametrize("mode", ["all", "http", "webrtc", "native"])
async def test_every_route_checks_the_host(make_client: ClientFactory, mode: str) -> None:
    """Routes are added behind the gate one by one; none may have been added around it."""
    client = await make_client(mode=mode)
    checked = 0
    for route in client.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or re.sub(r"\{[^}]*\}", "x", info.get("formatter", "/"))
        method = "GET" if route.method == "*" else route.method
        response = await client.request(method, path, headers={"Host": "evil.example"})
        assert response.status == 403, (route.method, path)
        if method != "HEAD":
            assert (await response.json())["error"]["code"] == "host_not_allowed"
        checked += 1
    assert checked >= (3 if mode == "native" else 10)  # native: the envelope relay and 404s


def test_an_application_with_an_unguarded_route_refuses_to_start(settings: Settings) -> None:
    async def sneaky(request: web.Request) -> web.Response:
        return web.Response(text="no checks here")

    app = build_app(settings)
    app.router.add_get("/sneaky", sneaky)
    with pytest.raises(RuntimeError, match="not wrapped"):
        close_gate(app)
    assert GATE in app


@pytest.mark.parametrize(
    "path",
    [
        "/api-doc/assets/swagger/..%2f..%2f..%2f..%2fpyproject.toml",
        "/api-doc/assets/swagger/%2e%2e/%2e%2e/%2e%2e/%2e%2e/pyproject.toml",
        "/..%2f..%2fpyproject.toml",
    ],
)
async def test_static_files_never_leave_their_folder(make_client: ClientFactory, path: str) -> None:
    client = await make_client()
    assert client.port is not None
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    status, body = await raw_request(client.port, request.encode())
    assert status == 404
    assert b"[project]" not in body
