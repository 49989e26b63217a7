"""The OpenAPI document is generated from the registry and is a valid OpenAPI 3.1 document."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate

from tabagent.api.openapi import build_openapi
from tabagent.ops import default_registry
from tests.test_operations import registry_with_testing


async def test_served_document_is_valid_openapi_31(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/api-doc/openapi.json")
    assert response.status == 200
    doc = await response.json()
    validate(doc)  # raises on any violation of the 3.1 schema
    assert doc["openapi"] == "3.1.0"


def test_every_http_operation_appears_with_its_models() -> None:
    registry = default_registry()
    doc = build_openapi(registry)
    operation_ids = {
        op["operationId"] for methods in doc["paths"].values() for op in methods.values()
    }
    assert operation_ids == {op.name for op in registry if op.http is not None}
    post = doc["paths"]["/v1/system/log-level"]["post"]
    body_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = doc["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
    assert body_schema["properties"]["level"]["enum"] == ["DEBUG", "INFO", "WARNING", "ERROR"]
    assert "422" in post["responses"]
    assert "401" in post["responses"]
    health = doc["paths"]["/v1/health"]["get"]
    assert health["security"] == []  # health is open even with an API key


def test_new_operations_appear_without_editing_the_document() -> None:
    doc = build_openapi(registry_with_testing())
    validate(doc)
    stream = doc["paths"]["/v1/testing/count"]["post"]
    assert "text/event-stream" in stream["responses"]["200"]["content"]
    slow = doc["paths"]["/v1/testing/slow"]["get"]
    assert [p["name"] for p in slow["parameters"]] == ["seconds"]
    assert slow["parameters"][0]["in"] == "query"
