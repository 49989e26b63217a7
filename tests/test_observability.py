"""Request ids, Prometheus metrics and log lines that carry the request id."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tabagent.logs import RequestIdFilter


async def test_incoming_request_id_is_honoured(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/v1/health", headers={"X-Request-Id": "abc-123.def"})
    assert response.headers["X-Request-Id"] == "abc-123.def"


@pytest.mark.parametrize("incoming", [None, "", "x" * 200, "bad id\twith spaces"])
async def test_missing_or_unsafe_request_id_is_replaced(
    client: TestClient[web.Request, web.Application], incoming: str | None
) -> None:
    headers = {} if incoming is None else {"X-Request-Id": incoming}
    response = await client.get("/v1/health", headers=headers)
    created = response.headers["X-Request-Id"]
    assert created
    assert created != incoming
    assert len(created) == 16


async def test_errors_carry_a_request_id_too(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/v1/missing", headers={"X-Request-Id": "req-404"})
    assert response.status == 404
    assert response.headers["X-Request-Id"] == "req-404"


async def test_metrics_count_requests_by_route_and_status(
    client: TestClient[web.Request, web.Application],
) -> None:
    for _ in range(3):
        await client.get("/v1/health")
    await client.post("/v1/system/log-level", json={"level": "LOUD"})
    await client.post("/v1/system/log-level", json={"level": "WARNING"})
    await client.delete("/v1/nowhere")  # matches no route: one label for all such requests
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert 'tabagent_http_requests_total{method="GET",route="/v1/health",status="200"} 3.0' in text
    assert 'route="/v1/system/log-level",status="422"} 1.0' in text
    assert (
        'tabagent_http_request_duration_seconds_count{method="GET",route="/v1/health"} 3.0' in text
    )
    # the latency histogram of a route sums its answers of every status
    post = 'duration_seconds_count{method="POST",route="/v1/system/log-level"}'
    assert f"{post} 2.0" in text
    assert (
        'tabagent_http_requests_total{method="DELETE",route="unmatched",status="405"} 1.0' in text
    )


async def test_log_lines_carry_the_request_id(
    client: TestClient[web.Request, web.Application], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    logging.getLogger().setLevel(logging.ERROR)  # so that the request below changes it
    with caplog.at_level(logging.INFO, logger="tabagent.ops.system"):
        await client.post(
            "/v1/system/log-level", json={"level": "INFO"}, headers={"X-Request-Id": "trace-7"}
        )
    records = [r for r in caplog.records if r.name == "tabagent.ops.system"]
    assert records
    assert records[0].request_id == "trace-7"


async def test_docs_pages_and_assets_are_served_locally(
    client: TestClient[web.Request, web.Application],
) -> None:
    index = await client.get("/api-doc")
    text = await index.text()
    for link in ("/api-doc/swagger", "/api-doc/redoc", "/api-doc/rapidoc"):
        assert link in text
        page = await client.get(link)
        assert page.status == 200
        html = await page.text()
        assert "http://" not in html
        assert "https://" not in html
    for asset in (
        "/api-doc/assets/swagger/js/swagger-ui-bundle.js",
        "/api-doc/assets/swagger/css/swagger-ui.css",
        "/api-doc/assets/redoc/js/redoc.standalone.js",
        "/api-doc/assets/rapidoc/js/rapidoc-min.js",
    ):
        response = await client.get(asset)
        assert response.status == 200, asset
        assert len(await response.read()) > 10_000


async def test_web_ui_is_served_at_root_without_escaping_its_folder(
    client: TestClient[web.Request, web.Application],
) -> None:
    root = await client.get("/")
    assert root.status == 200
    assert "TabAgent" in await root.text()
    for sneaky in ("/../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd", "/..%2fapp.py"):
        response = await client.get(sneaky)
        assert response.status == 404, sneaky
